"""Graphs: attention aggregation, power walks, adjacencies, affinity operators (known answers)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from segbook.errors import GraphError
from segbook.graphs import (
    DenseAffinity,
    FactoredAffinity,
    SparseAffinity,
    adjacency,
    aggregate_self_attention,
    as_affinity,
    diffseg_weights,
    feature_cosine_affinity,
    pixel_affinity,
    planted_random_walk,
    power_walk,
    sparsify_threshold,
    sparsify_topk,
)


def random_stochastic(n, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.uniform(0.1, 1.0, size=(n, n))
    return M / M.sum(1, keepdims=True)


def bilinear_1d(n_in, n_out):
    """Interpolation matrix of align_corners=False bilinear resizing, written out by hand."""
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        W[i, lo] += 1 - (src - lo)
        W[i, hi] += src - lo
    return W


# -- aggregation ----------------------------------------------------------------------------
def test_diffseg_weights_are_proportional_to_resolution():
    w = diffseg_weights([8, 16, 32, 64])
    assert [round(w[r], 3) for r in (8, 16, 32, 64)] == [0.067, 0.133, 0.267, 0.533]


def test_aggregate_keeps_rows_stochastic_for_any_subset():
    maps = {r: torch.from_numpy(random_stochastic(r * r, seed=r)) for r in (2, 4, 8)}
    for subset in [(2, 4, 8), (4, 8), (2, 8), (8,)]:
        P = aggregate_self_attention(maps, resolutions=subset, dtype=torch.float64)
        assert P.shape == (64, 64)
        np.testing.assert_allclose(P.sum(1).numpy(), 1.0, atol=1e-12)
        assert (P >= 0).all()


def test_aggregate_matches_hand_computed_two_resolution_case():
    S2 = random_stochastic(4, seed=1)          # resolution 2: 4 x 4
    S4 = random_stochastic(16, seed=2)         # resolution 4: 16 x 16
    P = aggregate_self_attention({2: S2, 4: S4}, dtype=torch.float64).numpy()
    # Key dimensions: bilinear 2x2 -> 4x4 per query row, i.e. the Kronecker product of the 1-D
    # interpolation matrices; then renormalised. Query dimensions: nearest repeat.
    U = np.kron(bilinear_1d(2, 4), bilinear_1d(2, 4))      # (16, 4)
    keys = S2 @ U.T                                           # (4, 16)
    keys /= keys.sum(1, keepdims=True)
    expected_up = np.zeros((16, 16))
    for qy in range(4):
        for qx in range(4):
            expected_up[qy * 4 + qx] = keys[(qy // 2) * 2 + qx // 2]
    expected = (2 / 6) * expected_up + (4 / 6) * S4
    np.testing.assert_allclose(P, expected, atol=1e-12)


def test_aggregate_averages_heads_and_layers():
    a, b = random_stochastic(16, 3), random_stochastic(16, 4)
    P = aggregate_self_attention({4: np.stack([a, b])}, dtype=torch.float64).numpy()
    np.testing.assert_allclose(P, (a + b) / 2, atol=1e-12)
    Q = aggregate_self_attention({4: [a, b]}, dtype=torch.float64).numpy()
    np.testing.assert_allclose(Q, (a + b) / 2, atol=1e-12)


def test_aggregate_rejects_bad_maps():
    with pytest.raises(GraphError, match="row-stochastic"):
        aggregate_self_attention({2: np.ones((4, 4))})
    with pytest.raises(GraphError, match="resolutions"):
        aggregate_self_attention({2: random_stochastic(4)}, resolutions=(2, 4))
    with pytest.raises(GraphError, match="must end in"):
        aggregate_self_attention({4: random_stochastic(4)})
    with pytest.raises(GraphError, match="multiple"):
        aggregate_self_attention({3: random_stochastic(9), 4: random_stochastic(16)})


def _reference_aggregate(maps, resolutions, R=None):
    """The aggregation written directly (float64, torch's own bilinear resize, expanded rows)."""
    import torch.nn.functional as F
    R = R or max(resolutions)
    w = diffseg_weights(resolutions)
    out = torch.zeros(R * R, R * R, dtype=torch.float64)
    for r in resolutions:
        value = maps[r]
        S = torch.stack([torch.as_tensor(v).double().reshape(-1, r * r, r * r).mean(0)
                         for v in (value if isinstance(value, list) else [value])]).mean(0)
        if r != R:
            keys = F.interpolate(S.reshape(r * r, 1, r, r), size=(R, R), mode="bilinear",
                                 align_corners=False).reshape(r * r, R * R)
            keys = keys / keys.sum(1, keepdim=True)
            f = R // r
            S = keys.reshape(r, 1, r, 1, R * R).expand(r, f, r, f, R * R).reshape(R * R, R * R)
        out += w[r] * S
    return out


@pytest.mark.parametrize("resolutions, R", [((2, 4, 8), None), ((4, 8), None), ((2, 8), None),
                                            ((2,), 8), ((2, 4), 8), ((2, 3), 6),
                                            ((2, 3, 6), None), ((3, 4), 12)])
def test_aggregate_equals_the_direct_recipe(resolutions, R):
    rng = np.random.default_rng(sum(resolutions))
    maps = {}
    for r in resolutions:
        heads = rng.uniform(0.05, 1.0, size=(3, r * r, r * r))
        heads /= heads.sum(-1, keepdims=True)
        maps[r] = [torch.from_numpy(h).half() for h in heads] if r % 2 else torch.from_numpy(heads)
    expected = _reference_aggregate(maps, resolutions, R)
    P64 = aggregate_self_attention(maps, resolutions=resolutions, output_resolution=R,
                                   dtype=torch.float64)
    torch.testing.assert_close(P64, expected, atol=1e-12, rtol=0)
    P32 = aggregate_self_attention(maps, resolutions=resolutions, output_resolution=R)
    assert P32.dtype == torch.float32
    torch.testing.assert_close(P32.double(), expected, atol=1e-6, rtol=1e-5)


def test_aggregate_leaves_its_inputs_alone():
    S8 = torch.from_numpy(random_stochastic(64, seed=5)).float()
    S4 = torch.from_numpy(random_stochastic(16, seed=6)).float()
    before = (S8.clone(), S4.clone())
    P = aggregate_self_attention({8: S8, 4: S4})
    assert P.data_ptr() not in (S8.data_ptr(), S4.data_ptr())
    torch.testing.assert_close(S8, before[0], atol=0, rtol=0)
    torch.testing.assert_close(S4, before[1], atol=0, rtol=0)
    Q = aggregate_self_attention({8: S8})
    assert Q.data_ptr() != S8.data_ptr()
    torch.testing.assert_close(Q, S8)


# -- power walks ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8])
def test_power_walk_matches_repeated_multiplication(k):
    P = random_stochastic(30, seed=k)
    expected = np.eye(30)
    for _ in range(k):
        expected = expected @ P
    out = power_walk(P, k).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-12)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)


def test_power_walk_rejects_bad_input():
    with pytest.raises(ValueError):
        power_walk(random_stochastic(4), -1)
    with pytest.raises(GraphError):
        power_walk(np.ones((4, 4)), 2)


# -- adjacencies ----------------------------------------------------------------------------
def test_adjacency_dot_and_cosine():
    P = random_stochastic(20, seed=5)
    np.testing.assert_allclose(adjacency(P, "dot").numpy(), P @ P.T, atol=1e-12)
    norms = np.linalg.norm(P, axis=1)
    np.testing.assert_allclose(adjacency(P, "cosine").numpy(), (P @ P.T) / np.outer(norms, norms),
                               atol=1e-12)
    F = adjacency(P, "cosine", factored=True)
    np.testing.assert_allclose(F.to_dense(), adjacency(P, "cosine").numpy(), atol=1e-12)
    with pytest.raises(ValueError):
        adjacency(P, "kl")


def test_feature_cosine_affinity_is_minmax_normalised_power():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6))
    A = feature_cosine_affinity(X, alpha=3.0).numpy()
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = Xn @ Xn.T
    expected = ((C - C.min()) / (C.max() - C.min())) ** 3
    np.testing.assert_allclose(A, expected, atol=1e-10)
    assert A.max() == pytest.approx(1.0) and A.min() == pytest.approx(0.0, abs=1e-12)
    # Constant features: the documented all-ones graph.
    np.testing.assert_array_equal(feature_cosine_affinity(np.ones((5, 3))).numpy(), np.ones((5, 5)))
    with pytest.raises(GraphError, match="all zero"):
        feature_cosine_affinity(np.zeros((3, 2)))


def test_pixel_affinity_known_values():
    img = np.zeros((6, 7))
    img[:, 4:] = 1.0
    A = pixel_affinity(img, sigma_i=0.5, sigma_x=2.0, radius=2.0)
    assert A.shape == (42, 42)
    assert abs(A - A.T).max() < 1e-15
    idx = lambda y, x: y * 7 + x
    assert A[idx(2, 2), idx(2, 2)] == pytest.approx(1.0)
    assert A[idx(2, 2), idx(2, 3)] == pytest.approx(np.exp(-1 / 4))
    assert A[idx(2, 3), idx(2, 4)] == pytest.approx(np.exp(-1 / 0.25 - 1 / 4))
    assert A[idx(2, 2), idx(3, 3)] == pytest.approx(np.exp(-2 / 4))
    assert A[idx(2, 2), idx(2, 4)] == 0.0    # distance 2 is not < radius 2


def test_sparsify_topk_and_threshold():
    A, _ = np.random.default_rng(1).uniform(size=(10, 10)), None
    A = (A + A.T) / 2
    S = sparsify_topk(A, 2)
    assert abs(S - S.T).max() == 0
    off = S.toarray() - np.diag(np.diag(A))
    for i in range(10):
        top2 = np.argsort(np.where(np.arange(10) == i, -1, A[i]))[-2:]
        assert (off[i, top2] > 0).all()
    mutual = sparsify_topk(A, 2, symmetrise="min")
    assert mutual.nnz <= S.nnz
    T = sparsify_threshold(A, 0.5)
    np.testing.assert_array_equal(T.toarray() > 0, A > 0.5)


# -- affinity operators ---------------------------------------------------------------------
def test_operators_agree_with_dense_algebra():
    P, _ = planted_random_walk([10, 14, 16], leak=0.1, seed=3)
    A = P @ P.T
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    order = rng.permutation(40)
    idx = np.sort(rng.choice(40, 25, replace=False))
    expected_earlier = np.array([A[order[j], order[:j]].sum() for j in range(40)])
    for op in [DenseAffinity(A, dtype=torch.float64), SparseAffinity(sp.csr_matrix(A)),
               FactoredAffinity(P, dtype=torch.float64)]:
        np.testing.assert_allclose(op.matmat(X), A @ X, atol=1e-10)
        np.testing.assert_allclose(op.degrees(), A.sum(1), atol=1e-10)
        np.testing.assert_allclose(op.diagonal(), np.diag(A), atol=1e-12)
        np.testing.assert_allclose(op.earlier_weights(order), expected_earlier, atol=1e-10)
        np.testing.assert_allclose(op.subgraph(idx).to_dense(), A[np.ix_(idx, idx)], atol=1e-12)
        assert op.total_weight() == pytest.approx((A.sum() - np.trace(A)) / 2)
        assert op.n_edges() == 40 * 39 // 2
        mask = np.arange(40) < 10
        assert op.cut(mask) == pytest.approx(A[mask][:, ~mask].sum())


def test_float32_earlier_weights_are_accurate():
    P, _ = planted_random_walk([200, 300], leak=0.05, seed=1)
    A = P @ P.T
    order = np.random.default_rng(2).permutation(500)
    expected = np.array([A[order[j], order[:j]].sum() for j in range(500)])
    for op in [DenseAffinity(A), FactoredAffinity(P)]:   # float32 storage
        np.testing.assert_allclose(op.earlier_weights(order), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    (np.ones((3, 4)), "square"),
    (np.ones(3), "square"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN"),
    (np.array([[1.0, np.inf], [np.inf, 1.0]]), "NaN"),
    (np.array([[1.0, -0.5], [-0.5, 1.0]]), "negative"),
    (np.array([[1.0, 0.2], [0.7, 1.0]]), "not symmetric"),
])
def test_as_affinity_rejects_bad_matrices(bad, message):
    with pytest.raises(GraphError, match=message):
        as_affinity(bad)


def test_bad_sparse_and_factored_inputs():
    with pytest.raises(GraphError, match="not symmetric"):
        as_affinity(sp.csr_matrix(np.array([[0, 1.0], [0, 0]])))
    with pytest.raises(GraphError, match="negative"):
        FactoredAffinity(np.array([[1.0, -1.0], [0.5, 0.5]]))
    with pytest.raises(GraphError, match="2-D"):
        FactoredAffinity(np.ones(3))


def test_large_asymmetric_dense_matrix_is_caught_by_the_randomised_check():
    A = np.ones((1100, 1100), dtype=np.float32)
    A[3, 700] = 2.0
    with pytest.raises(GraphError, match="not symmetric"):
        as_affinity(A)


def test_factored_earlier_weights_across_row_chunks():
    # 1100 rows: four full 256-row chunks and a short one, each ending in a partial Gram
    # block.
    rng = np.random.default_rng(7)
    F = rng.uniform(size=(1100, 30))
    A = F @ F.T
    order = rng.permutation(1100)
    expected = np.tril(A[np.ix_(order, order)], -1).sum(1)
    got = FactoredAffinity(F, dtype=torch.float64).earlier_weights(order)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_working_subgraph_equals_subgraph_and_reuses_one_buffer():
    P, _ = planted_random_walk([30, 50, 40], leak=0.1, seed=4)
    A = P @ P.T
    rng = np.random.default_rng(1)
    for op in [DenseAffinity(A, dtype=torch.float64), FactoredAffinity(P, dtype=torch.float64),
               SparseAffinity(sp.csr_matrix(A))]:
        pointers = set()
        for m in (120, 77, 5, 2):
            idx = np.sort(rng.choice(120, m, replace=False))
            work = op.working_subgraph(idx)
            ref = op.subgraph(idx)
            np.testing.assert_allclose(work.to_dense(), A[np.ix_(idx, idx)], atol=1e-12)
            np.testing.assert_allclose(work.to_dense(), ref.to_dense(), atol=1e-12)
            np.testing.assert_allclose(work.diagonal(), np.diag(A)[idx], atol=1e-12)
            np.testing.assert_allclose(work.degrees(), A[np.ix_(idx, idx)].sum(1), atol=1e-10)
            order = rng.permutation(m)
            np.testing.assert_allclose(work.earlier_weights(order), ref.earlier_weights(order),
                                       atol=1e-10)
            storage = getattr(work, "F", getattr(work, "A", None))
            if isinstance(storage, torch.Tensor):
                pointers.add(storage.untyped_storage().data_ptr())
        if not isinstance(op, SparseAffinity):
            assert len(pointers) == 1          # every working subgraph lives in one buffer
        op.release_buffers()


def test_factored_subgraph_inherits_self_loops_and_class():
    P, _ = planted_random_walk([20, 30], leak=0.1, seed=5)

    class Tagged(FactoredAffinity):
        pass

    op = Tagged(P, dtype=torch.float64)
    idx = np.array([3, 7, 11, 40])
    sub = op.subgraph(idx)
    assert type(sub) is Tagged and type(op.working_subgraph(idx)) is Tagged
    np.testing.assert_allclose(sub.diagonal(), (P[idx] ** 2).sum(1), atol=1e-12)
    given = FactoredAffinity(P, diagonal=np.full(50, 7.0))
    assert given.diagonal()[0] == 7.0 and given.subgraph(idx).diagonal()[0] == 7.0


def test_float32_prefix_weights_on_a_4096_node_attention_graph():
    # The benchmark's scale: float32 Gram blocks and float64 carries against float64 sums.
    P, _ = planted_random_walk([1000, 1500, 1596], leak=0.05, seed=2, dtype=np.float32)
    order = np.random.default_rng(3).permutation(4096)
    got = FactoredAffinity(P).earlier_weights(order)
    ref = FactoredAffinity(P, dtype=torch.float64).earlier_weights(order)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * ref.max())


def test_finite_check_fast_path_still_names_the_problem():
    for value, message in [(np.inf, "NaN"), (np.nan, "NaN"), (-1.0, "negative")]:
        A = np.ones((600, 600), dtype=np.float32)
        A[550, 3] = A[3, 550] = value
        with pytest.raises(GraphError, match=message):
            as_affinity(A)
    F = np.ones((600, 5))
    F[599, 4] = np.inf
    with pytest.raises(GraphError, match="NaN"):
        FactoredAffinity(F)


def test_large_buffers_are_ordinary_tensors():
    from segbook.graphs.operators import _empty
    for shape, dtype in [((3, 4), torch.float32), ((2048, 2048), torch.float32),
                         ((1 << 21,), torch.float64)]:
        x = _empty(shape, dtype)
        assert tuple(x.shape) == shape and x.dtype == dtype and x.is_contiguous()
        x.fill_(2.0)
        assert float(x.sum()) == 2.0 * x.numel()
