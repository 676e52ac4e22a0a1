"""The Normalised Cut family on graphs with known answers."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from segbook.errors import GraphError
from segbook.graphs import (
    FactoredAffinity,
    adjacency,
    planted_partition,
    planted_random_walk,
    power_walk,
)
from segbook.groupers import (
    best_threshold_split,
    fiedler_vector,
    manc_threshold,
    ncut_eigenvectors,
    ncut_value,
    plain_recursive_ncut,
    random_walk_ncut,
    recursive_ncut,
)


# -- NCut value -----------------------------------------------------------------------------
def test_ncut_value_by_hand():
    # Two triangles (weight 1) joined by one edge of weight 0.5.
    A = np.zeros((6, 6))
    for a, b in itertools.combinations(range(3), 2):
        A[a, b] = A[b, a] = A[a + 3, b + 3] = A[b + 3, a + 3] = 1.0
    A[2, 3] = A[3, 2] = 0.5
    mask = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    # cut = 0.5, assoc(S, V) = 2 + 2 + 2.5 = 6.5 on both sides.
    assert ncut_value(A, mask) == pytest.approx(0.5 / 6.5 * 2)
    assert ncut_value(sp.csr_matrix(A), mask) == pytest.approx(0.5 / 6.5 * 2)
    with pytest.raises(GraphError, match="non-empty"):
        ncut_value(A, np.ones(6, dtype=bool))
    with pytest.raises(GraphError, match="entries"):
        ncut_value(A, mask[:5])


def test_ncut_value_of_an_edgeless_side_is_zero():
    A = np.zeros((3, 3))
    A[0, 1] = A[1, 0] = 1.0
    assert ncut_value(A, np.array([False, False, True])) == 0.0


# -- Fiedler vector -------------------------------------------------------------------------
def dense_fiedler(A):
    d = A.sum(1)
    M = A / np.sqrt(np.outer(d, d))
    vals, vecs = np.linalg.eigh(M)
    return vecs[:, -2] / np.sqrt(d), 1 - vals[-2]


@pytest.mark.parametrize("solver", ["dense", "krylov"])
def test_fiedler_vector_solves_the_generalised_eigenproblem(solver):
    A, _ = planted_partition([40, 60, 100], p_out=0.3, noise=0.9, seed=2)
    x, lam = fiedler_vector(A, solver=solver, tol=1e-8, return_value=True)
    ref, ref_lam = dense_fiedler(A)
    d = A.sum(1)
    assert lam == pytest.approx(ref_lam, rel=1e-6)
    L = np.diag(d) - A
    np.testing.assert_allclose(L @ x, lam * d * x, atol=1e-6 * np.abs(d * x).max())
    assert x @ (d * x) == pytest.approx(1.0)
    cos = abs(x @ (d * ref)) / np.sqrt(ref @ (d * ref))
    assert cos == pytest.approx(1.0, abs=1e-6)   # equal up to sign


def test_fiedler_vector_from_sparse_and_factored_operators():
    P, _ = planted_random_walk([90, 110, 100], leak=0.2, seed=4)
    A = P @ P.T
    ref, _ = dense_fiedler(A)
    d = A.sum(1)
    for graph in [sp.csr_matrix(A), FactoredAffinity(P, dtype=torch.float64)]:
        x = fiedler_vector(graph, solver="krylov", tol=1e-9)
        assert abs(x @ (d * ref)) / np.sqrt(ref @ (d * ref)) == pytest.approx(1.0, abs=1e-5)


def test_ncut_eigenvectors_dense_and_lanczos_agree():
    A, _ = planted_partition([20, 30, 40], p_out=0.1, seed=5)
    d = A.sum(1)
    vals, X = ncut_eigenvectors(A, k=4)
    vals_l, X_l = ncut_eigenvectors(A, k=4, dense_max_nodes=10)
    np.testing.assert_allclose(vals, vals_l, atol=1e-8)
    assert vals[0] == pytest.approx(0.0, abs=1e-10) and np.all(np.diff(vals) >= 0)
    np.testing.assert_allclose(np.abs(X.T @ (d[:, None] * X)), np.eye(4), atol=1e-8)
    _, ref_lam = dense_fiedler(A)
    assert vals[1] == pytest.approx(ref_lam)
    for j in range(1, 4):
        assert abs(X[:, j] @ (d * X_l[:, j])) == pytest.approx(1.0, abs=1e-6)


def test_fiedler_sign_is_deterministic():
    A, _ = planted_partition([30, 50], seed=1)
    x1 = fiedler_vector(A, solver="krylov", seed=0)
    x2 = fiedler_vector(A, solver="krylov", seed=7)
    assert x1[np.argmax(np.abs(x1))] > 0
    np.testing.assert_allclose(x1, x2, atol=1e-3)


def test_fiedler_rejects_isolated_nodes_and_tiny_graphs():
    A = np.ones((4, 4))
    A[0] = A[:, 0] = 0
    with pytest.raises(GraphError, match="isolated"):
        fiedler_vector(A)
    with pytest.raises(GraphError, match="at least 2"):
        fiedler_vector(np.ones((1, 1)))


# -- threshold search -----------------------------------------------------------------------
def test_threshold_search_is_the_brute_force_minimum():
    rng = np.random.default_rng(3)
    A = rng.uniform(size=(60, 60))
    A = (A + A.T) / 2
    x = rng.normal(size=60)
    split = best_threshold_split(A, x)
    best = min(ncut_value(A, x > t) for t in np.sort(x)[:-1])
    assert split.ncut == pytest.approx(best, rel=1e-10)
    assert ncut_value(A, split.mask) == pytest.approx(split.ncut, rel=1e-10)
    assert split.cut == pytest.approx(A[split.mask][:, ~split.mask].sum())


def test_threshold_grid_matches_diffcut_recipe():
    rng = np.random.default_rng(4)
    A = rng.uniform(size=(50, 50))
    A = (A + A.T) / 2
    x = rng.normal(size=50)
    split = best_threshold_split(A, x, n_thresholds=100)
    grid = np.linspace(0.99 * x.min(), 0.99 * x.max(), 100)
    values = [ncut_value(A, x > t) for t in grid if 0 < (x > t).sum() < 50]
    assert split.ncut == pytest.approx(min(values), rel=1e-10)


def test_threshold_search_respects_min_size_and_ties():
    A = np.ones((5, 5))
    assert best_threshold_split(A, np.zeros(5)) is None                # one value: no threshold
    assert best_threshold_split(A, np.arange(5.0), min_size=3) is None
    split = best_threshold_split(A, np.arange(5.0), min_size=2)
    assert split.mask.sum() in (2, 3)


# -- recursive NCut: planted partitions ----------------------------------------------------
@pytest.mark.parametrize("sizes, seed", [
    ([40, 24], 0),
    ([100, 30, 60, 200], 1),
    ([20, 35, 50, 65, 80, 95, 110, 125, 140, 60, 40, 30], 2),   # 12 blocks, 850 nodes
])
def test_recursive_ncut_recovers_planted_blocks(sizes, seed):
    A, labels = planted_partition(sizes, p_in=1.0, p_out=0.02, noise=0.5, seed=seed)
    result = recursive_ncut(A, stop="threshold", threshold=0.3)
    assert result.n_segments == len(sizes)
    assert adjusted_rand_score(labels, result.labels) >= 0.99


def test_recursive_ncut_on_a_large_factored_graph():
    sizes = [100, 200, 300, 400, 536]
    P, labels = planted_random_walk(sizes, leak=0.05, seed=5, dtype=np.float32)
    result = recursive_ncut(FactoredAffinity(P), stop="threshold", threshold=0.3)
    assert adjusted_rand_score(labels, result.labels) >= 0.99


@pytest.mark.parametrize("stop", ["manc", "scaled_mincut"])
@pytest.mark.parametrize("sizes, seed", [([64, 160], 0), ([50, 120, 200, 142], 1),
                                         ([40, 60, 80, 100, 120, 90, 110, 70], 2)])
def test_manc_stops_find_the_planted_number_of_segments(stop, sizes, seed):
    P, labels = planted_random_walk(sizes, leak=0.05, seed=seed)
    result = recursive_ncut(adjacency(P, "dot"), stop=stop)
    assert result.n_segments == len(sizes)
    assert adjusted_rand_score(labels, result.labels) >= 0.99


def test_manc_with_power_walk_and_factored_graph():
    P, labels = planted_random_walk([100, 150, 250], leak=0.1, seed=3)
    Pk = power_walk(P, 3)
    dense = recursive_ncut(adjacency(Pk, "dot"), stop="manc")
    assert adjusted_rand_score(labels, dense.labels) >= 0.99
    factored = recursive_ncut(adjacency(Pk, "dot", factored=True), stop="manc")
    assert dense.n_segments == factored.n_segments == 3
    np.testing.assert_array_equal(dense.labels, factored.labels)


def test_manc_threshold_formula_and_scale():
    P, _ = planted_random_walk([30, 30], leak=0.1, seed=0)
    A = P @ P.T
    n = 60
    T = (A.sum() - np.trace(A)) / 2
    assert manc_threshold(A) == pytest.approx(n * T / (2 * n * (n - 1) / 2))   # = T / (n - 1)
    assert manc_threshold(5 * A) == pytest.approx(5 * manc_threshold(A))       # scales with A
    # P P^T with row-stochastic P has sum(A) = |P^T 1|^2 >= n: the threshold is about 1/2.
    assert 0.4 < manc_threshold(A) < 0.6
    sparse = np.diag(np.ones(3), 1)
    sparse = sparse + sparse.T                                                  # a path: m = 3
    assert manc_threshold(sparse) == pytest.approx(4 * 3 / (2 * 3))
    assert manc_threshold(np.eye(3)) == 0.0


def test_manc_on_raw_affinity_scale_never_stops():
    """Documented behaviour: on [0, 1] feature affinities the MAN-C limit is ~n/2 * mean weight,
    far above any NCut (<= 2), so the MAN-C stop splits down to min_size."""
    A, _ = planted_partition([40, 40], p_in=1.0, p_out=0.5, noise=0.2, seed=0)
    assert manc_threshold(A) > 10
    result = recursive_ncut(A, stop="manc", min_size=10)
    assert result.n_segments >= 80 // 19
    # No leaf was refused by the stop rule: only the size limit ended the recursion.
    assert all(node.reason in ("min_size", "no_threshold") for node in result.leaves())
    assert all(10 <= node.size < 20 for node in result.leaves())


def test_split_tree_is_consistent():
    A, labels = planted_partition([30, 40, 50], p_out=0.01, seed=4)
    result = recursive_ncut(A, threshold=0.3)
    assert adjusted_rand_score(labels, result.labels) == 1.0
    root = result.tree[0]
    assert root.parent is None and root.size == 120
    for node in result.tree:
        if node.children:
            kids = [result.tree[c] for c in node.children]
            assert sorted(np.concatenate([k.indices for k in kids])) == sorted(node.indices)
            assert node.value < node.limit
        else:
            assert node.reason and node.label is not None
    assert sorted(node.label for node in result.leaves()) == [0, 1, 2]
    assert (result.labels_at_depth(0) == 0).all()
    assert result.labels_at_depth(1).max() == 1
    np.testing.assert_array_equal(result.labels_at_depth(10), result.labels)
    np.testing.assert_array_equal(np.asarray(result), result.labels)


def test_fast_solver_gives_the_plain_recipes_partition():
    P, _ = planted_random_walk([40, 60, 90, 70], leak=0.05, seed=6)
    A = P @ P.T
    for stop, threshold in [("manc", None), ("scaled_mincut", None), ("threshold", 0.4)]:
        fast = recursive_ncut(A, stop=stop, threshold=threshold)
        plain = plain_recursive_ncut(A, stop=stop, threshold=threshold, min_size=2)
        np.testing.assert_array_equal(fast.labels, plain)


# -- recursive NCut: degenerate graphs ------------------------------------------------------
def test_degenerate_sizes():
    assert recursive_ncut(np.zeros((0, 0)), threshold=0.5).labels.shape == (0,)
    np.testing.assert_array_equal(recursive_ncut(np.ones((1, 1)), threshold=0.5).labels, [0])
    two = np.array([[1.0, 0.1], [0.1, 1.0]])
    # NCut of the only split: 0.1/1.1 * 2 = 0.18.
    np.testing.assert_array_equal(recursive_ncut(two, threshold=0.5, min_size=1).labels, [0, 1])
    np.testing.assert_array_equal(recursive_ncut(two, threshold=0.1, min_size=1).labels, [0, 0])
    np.testing.assert_array_equal(recursive_ncut(two, threshold=0.5).labels, [0, 0])  # min_size 2


def test_constant_and_edgeless_graphs_stay_whole():
    for A in [np.ones((10, 10)), np.full((10, 10), 3.0), np.zeros((10, 10)), np.eye(10)]:
        for stop in ["threshold", "manc", "scaled_mincut"]:
            result = recursive_ncut(A, stop=stop, threshold=0.9)
            np.testing.assert_array_equal(result.labels, np.zeros(10))
    assert recursive_ncut(np.ones((10, 10)), threshold=0.9).tree[0].reason == "constant"
    assert recursive_ncut(np.eye(10), threshold=0.9).tree[0].reason == "no_edges"


@pytest.mark.parametrize("self_loop", [0.0, 1.0])
def test_isolated_nodes_become_one_segment(self_loop):
    A, _ = planted_partition([20, 20], p_out=0.0, noise=0.1, seed=0)
    A = np.pad(A, ((0, 3), (0, 3)))
    A[40:, 40:] = self_loop * np.eye(3)          # a self-loop is not an edge
    result = recursive_ncut(A, threshold=0.5)
    assert result.n_segments == 3
    assert len(set(result.labels[40:])) == 1 and result.labels[40] not in result.labels[:40]
    assert [nd.reason for nd in result.tree if nd.reason == "isolated"] == ["isolated"]
    walk = random_walk_ncut(A / np.maximum(A.sum(1, keepdims=True), 1e-300) + np.diag(
        (A.sum(1) == 0).astype(float)), threshold=0.5)
    np.testing.assert_array_equal(walk.labels, result.labels)


def test_disconnected_components_are_separated_with_zero_ncut():
    A, labels = planted_partition([25, 35, 30], p_out=0.0, noise=0.3, seed=1)
    result = recursive_ncut(A, threshold=0.01)
    assert adjusted_rand_score(labels, result.labels) == 1.0
    assert result.tree[0].ncut == pytest.approx(0.0, abs=1e-9)


def test_max_depth_and_min_size_bound_the_recursion():
    A, _ = planted_partition([16] * 8, p_out=0.01, seed=2)
    assert recursive_ncut(A, threshold=0.5, max_depth=1).n_segments == 2
    depth2 = recursive_ncut(A, threshold=0.5, max_depth=2)
    assert 3 <= depth2.n_segments <= 4 and max(nd.depth for nd in depth2.tree) == 2
    assert recursive_ncut(A, threshold=0.5).n_segments == 8
    # Every split accepted (threshold above any NCut): ends at min_size, no infinite recursion.
    result = recursive_ncut(A, threshold=3.0, min_size=4)
    assert all(4 <= node.size < 8 for node in result.leaves())


def test_bad_arguments():
    A, _ = planted_partition([5, 5])
    with pytest.raises(ValueError, match="stop"):
        recursive_ncut(A, stop="kl")
    with pytest.raises(ValueError, match="threshold"):
        recursive_ncut(A, stop="threshold")
    with pytest.raises(ValueError, match="min_size"):
        recursive_ncut(A, threshold=0.5, min_size=0)
    with pytest.raises(GraphError, match="symmetric"):
        recursive_ncut(np.triu(A), threshold=0.5)


# -- the random-walk view -------------------------------------------------------------------
@pytest.mark.parametrize("sizes, seed", [([30, 50], 0), ([40, 60, 80, 20], 1)])
def test_random_walk_ncut_agrees_with_symmetric_solution_on_reversible_chain(sizes, seed):
    A, labels = planted_partition(sizes, p_out=0.05, noise=0.5, seed=seed)
    P = A / A.sum(1, keepdims=True)                   # reversible: pi_i proportional to d_i
    walk = random_walk_ncut(P, threshold=0.3)
    sym = recursive_ncut(A, threshold=0.3)
    np.testing.assert_array_equal(walk.labels, sym.labels)
    assert adjusted_rand_score(labels, walk.labels) == 1.0
    assert walk.tree[0].ncut == pytest.approx(sym.tree[0].ncut, rel=1e-6)


def test_random_walk_ncut_on_a_non_symmetric_walk():
    P, labels = planted_random_walk([50, 70, 90], leak=0.05, seed=2)
    assert not np.allclose(P, P.T)
    result = random_walk_ncut(P, threshold=0.3)
    assert adjusted_rand_score(labels, result.labels) >= 0.99


def test_random_walk_ncut_rejects_non_stochastic_input():
    with pytest.raises(GraphError, match="row-stochastic"):
        random_walk_ncut(np.ones((4, 4)), threshold=0.3)
    with pytest.raises(GraphError, match="square"):
        random_walk_ncut(np.ones((2, 3)) / 3, threshold=0.3)
    with pytest.raises(GraphError, match="NaN"):
        random_walk_ncut(np.full((2, 2), np.nan), threshold=0.3)
    with pytest.raises(GraphError, match="square"):
        random_walk_ncut(np.ones(3) / 3, threshold=0.3)
    assert random_walk_ncut(np.zeros((0, 0)), threshold=0.3).labels.shape == (0,)
    np.testing.assert_array_equal(random_walk_ncut(np.ones((1, 1)), threshold=0.3).labels, [0])


# -- warm starts ----------------------------------------------------------------------------
def test_fiedler_vector_from_a_warm_start_equals_the_cold_one():
    P, _ = planted_random_walk([150, 250, 200], leak=0.05, seed=4)
    A = adjacency(P, "dot")
    cold, lam = fiedler_vector(A, solver="krylov", tol=1e-9, return_value=True)
    # A guess near the answer (as a parent's Ritz vectors are) and a useless one.
    rng = np.random.default_rng(0)
    near = cold[:, None] + 1e-2 * rng.normal(size=(600, 1))
    for start in (near, rng.normal(size=(600, 3)), np.ones((600, 2))):
        warm, lam_w = fiedler_vector(A, solver="krylov", tol=1e-9, return_value=True,
                                     start=start)
        assert lam_w == pytest.approx(lam, abs=1e-8)
        np.testing.assert_allclose(warm, cold, atol=1e-6)


@pytest.mark.parametrize("stop", ["manc", "threshold"])
@pytest.mark.parametrize("sizes, seed", [([300, 500, 400, 350], 0),
                                         ([200, 260, 340, 420, 500, 580], 1),
                                         ([40, 60, 80, 100, 120, 90, 110, 70], 2)])
def test_warm_started_recursion_gives_the_cold_partition(stop, sizes, seed):
    P, labels = planted_random_walk(sizes, leak=0.05, seed=seed, dtype=np.float32)
    kwargs = {"stop": stop, "threshold": 0.3 if stop == "threshold" else None}
    for graph in (FactoredAffinity(P), P @ P.T):
        warm = recursive_ncut(graph, warm_start=True, **kwargs)
        cold = recursive_ncut(graph, warm_start=False, **kwargs)
        np.testing.assert_array_equal(warm.labels, cold.labels)
        assert [nd.reason for nd in warm.tree] == [nd.reason for nd in cold.tree]
        np.testing.assert_allclose([nd.ncut for nd in warm.tree], [nd.ncut for nd in cold.tree],
                                   atol=1e-4)
        assert adjusted_rand_score(labels, warm.labels) >= 0.99


def test_recursion_releases_its_working_buffer():
    P, _ = planted_random_walk([200, 300], leak=0.05, seed=0, dtype=np.float32)
    op = FactoredAffinity(P)
    recursive_ncut(op, stop="manc")
    assert op._rows is None
