"""CAFE's compiled per-pixel reductions (segbook.groupers.cafe_native) against torch, and the
stages with and without them."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segbook.groupers import cafe_native
from segbook.groupers.cafe import CAFE, planted_inputs
from segbook.groupers.cafe_stages import (
    PixelFeatures,
    _token_nearest_pixel,
    attention_guided_grouping,
    bf16_error,
    cross_resolution_seeding,
    kmeans_pp,
    nearest_prototype,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_kernels = pytest.mark.skipif(
    not cafe_native.available(),
    reason="kernels unavailable (no C++ compiler, or SEGBOOK_NATIVE=0): the torch code runs")


def test_kernels_compile_where_there_is_a_compiler():
    if (shutil.which("g++") or shutil.which("c++")) and cafe_native._enabled():
        assert cafe_native.available()


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("SEGBOOK_NATIVE", "0")
    cafe_native._library.cache_clear()
    try:
        assert not cafe_native.available()
    finally:
        monkeypatch.delenv("SEGBOOK_NATIVE")
        cafe_native._library.cache_clear()


def _pooled(att, groups, K):
    return torch.zeros(att.shape[0], K).index_add_(1, groups, att)


@needs_kernels
@pytest.mark.parametrize("K", [1, 7, 16, 33, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_best_rows_equals_torch(K, dtype):
    g = torch.Generator().manual_seed(K)
    R, T = 300, 45
    scores = torch.randn(R, K, generator=g).to(dtype)
    att = torch.rand(R, T, generator=g)
    groups = torch.randint(0, K, (T,), generator=g)       # shared and unused prototypes
    bias = torch.randn(K, generator=g)
    v = 0.75 * scores.float() + 0.25 * _pooled(att, groups, K) + bias
    best, amb = cafe_native.best_rows(scores, att, groups, 0.75, 0.25, bias, error=(0.025, 0.0))
    assert torch.equal(best, v.argmax(dim=1))
    if K > 1:
        top = v.topk(2, dim=1).values
        gap = top[:, 0] - top[:, 1]
        sure = (gap - 0.75 * 0.05).abs() > 1e-5      # away from the margin itself (rounding)
        assert torch.equal(amb[sure], (gap < 0.75 * 0.05)[sure])
        assert 0 < int(amb.sum()) < R
    else:
        assert not amb.any()
    ident = torch.rand(R, K, generator=g)              # token k -> column k: no gather
    plan = cafe_native.PoolPlan(torch.arange(K), K)
    assert plan.identity and not cafe_native.PoolPlan(groups, K).identity
    got, _ = cafe_native.best_rows(scores, ident, plan, 0.75, 0.25, bias)
    assert torch.equal(got, (0.75 * scores.float() + 0.25 * ident + bias).argmax(dim=1))
    plain, none = cafe_native.best_rows(scores)
    assert none is None and torch.equal(plain, scores.float().argmax(dim=1))


@needs_kernels
def test_ties_go_to_the_lowest_column():
    scores = torch.zeros(4, 40)
    scores[0, [3, 20, 35]] = 1.0
    scores[1, [17, 33]] = 2.0
    scores[2, 39] = 1.0
    best, amb = cafe_native.best_rows(scores, error=(0.05, 0.0))
    assert best.tolist() == [3, 17, 39, 0]
    assert amb.tolist() == [True, True, False, True]


@needs_kernels
def test_subnormal_attention_is_read_as_zero():
    scores = torch.tensor([[0.5, 0.5 + 2 ** -8]]).repeat(300, 1)
    att = torch.full((300, 2), 1e-40)                  # subnormal float32
    att[:, 0] = 1.0
    best, _ = cafe_native.best_rows(scores, att, torch.tensor([0, 1]), 1.0, 0.01)
    assert (best == 0).all()


@needs_kernels
@pytest.mark.parametrize("identity", [False, True])
def test_recheck_picks_the_float32_winner_among_near_ties(identity):
    g = torch.Generator().manual_seed(1)
    C, K, R = 24, 50, 400
    X = torch.randn(C, R + 10, generator=g)             # pixels 10.. of a larger image
    D = F.normalize(torch.randn(K, C, generator=g), dim=1)
    inv = 1 / X.norm(dim=0)
    unit = (X * inv).T[10:]
    T = K if identity else 30
    att = torch.rand(R, T, generator=g)
    groups = torch.arange(K) if identity else torch.randint(0, K, (T,), generator=g)
    exact = 0.75 * (unit @ D.T) + 0.25 * _pooled(att, groups, K)
    scores = (unit.bfloat16() @ D.bfloat16().T)
    err = bf16_error(C)
    best, amb = cafe_native.best_rows(scores, att, groups, 0.75, 0.25, error=err)
    rows = amb.nonzero().squeeze(1)
    assert len(rows) > 0
    x = cafe_native.gather_rows(X, 10, rows)
    assert torch.equal(x, X[:, 10 + rows].T)
    cafe_native.recheck_rows(scores, rows, x, inv[10 + rows].contiguous(), D, best, att, groups,
                             0.75, 0.25, error=err)
    top = exact.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-5             # not a float32-level tie
    assert torch.equal(best[clear], exact.argmax(dim=1)[clear])


@needs_kernels
def test_block_col_max_and_unit_rows():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1000, 37, generator=g).bfloat16()
    top = cafe_native.block_col_max(s, 256)
    ref = torch.stack([s[i:i + 256].float().amax(dim=0) for i in range(0, 1000, 256)])
    assert torch.equal(top, ref)
    X = torch.randn(19, 5000, generator=g)
    X[:, 7] = 0                                          # no direction: stays zero
    inv, out = cafe_native.unit_rows(X)
    ref = 1 / X.norm(dim=0).clamp_min(1e-12)
    assert torch.allclose(inv, ref, rtol=1e-6)
    assert torch.equal(out, (X * inv).T.bfloat16())
    assert not out[7].any()
    assert cafe_native.unit_rows(X, bf16=False)[1] is None


@needs_kernels
def test_attention_rows_argmax_sums_and_minima():
    g = torch.Generator().manual_seed(3)
    A = torch.softmax(5 * torch.randn(700, 45, generator=g), dim=1)
    A[3] = 0.0
    A[5, 7] = float("nan")
    best, sums, mins = cafe_native.attention_rows(A)
    ok = torch.ones(700, dtype=torch.bool)
    ok[5] = False
    assert torch.equal(best[ok], A[ok].argmax(dim=1))
    assert best[3] == 0
    assert torch.allclose(sums[ok], A[ok].sum(dim=1), atol=1e-6)
    assert torch.isnan(sums[5])
    assert torch.equal(mins[ok], A[ok].amin(dim=1))


@needs_kernels
@pytest.mark.parametrize("shape", [(5, 1, 1), (3, 1, 7), (3, 2, 2), (4, 9, 1), (6, 19, 23)])
def test_feature_gradient_is_numpys(shape):
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    ref = np.zeros(shape[1:])
    for axis in (1, 2):
        if shape[axis] > 1:
            ref += (np.gradient(f.double().numpy(), axis=axis) ** 2).sum(0)
    got = cafe_native.feature_gradient_sq(f).double().numpy()
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_bad_arguments_are_clear_errors():
    s = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="groups must lie"):
        cafe_native.best_rows(s, torch.ones(4, 3), torch.tensor([0, 1, 5]), 1.0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        cafe_native.best_rows(s.T)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        cafe_native.best_rows(s.double())


# -- the stages with and without the kernels ---------------------------------------------------
def _inputs():
    gt = np.zeros((48, 64), np.int64)
    gt[:, 32:] = 1
    gt[24:, :20] = 2
    up, low = planted_inputs(gt, grid=(12, 16), channels=24, noise=0.3, seed=5)
    return up, low, gt


def _clear_rows(values: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Rows whose two best float32 values differ by more than ``eps``: there both paths must
    agree (closer ones are float32-level ties, decided by rounding)."""
    top = values.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) > eps


@needs_kernels
@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_stages_equal_with_and_without_kernels(precision):
    up, low, _ = _inputs()
    nat = PixelFeatures(up.features, precision, native=True)
    ref = PixelFeatures(up.features, precision, native=False)
    assert nat.native and not ref.native
    assert torch.allclose(nat.inv_norm, ref.inv_norm, rtol=1e-6)
    if precision == "bfloat16":                         # equal but where rounding differs
        C = up.features.shape[0]
        assert nat.fast.shape == (nat.N, 32) and ref.fast.shape == (nat.N, C)
        assert (nat.fast[:, :C] != ref.fast).float().mean() < 1e-3
        assert torch.allclose(nat.fast[:, :C].float(), ref.fast.float(), atol=2 ** -8)
        assert (nat.fast[:, C] == 1).all() and not nat.fast[:, C + 1:].any()   # offset column
        d = torch.randn(3, C)
        assert torch.allclose((nat.fast[:5] @ nat.lowp(d).T).float(),
                              (ref.fast[:5] @ ref.lowp(d).T).float() - 0.875, atol=0.02)
    crs_n = cross_resolution_seeding(nat, low, up.attention, precision=precision)
    crs_r = cross_resolution_seeding(ref, low, up.attention, precision=precision)
    assert torch.equal(crs_n.seed_pixels, crs_r.seed_pixels)
    # a dictionary of 192 seeds (no merge), so that the products are bfloat16 (K >= 64)
    D = nat.exact_index(crs_n.seed_pixels)
    unit = nat.exact(0, nat.N)
    cos = unit @ F.normalize(D, dim=1).T
    S_n, S_r = nearest_prototype(nat, D, precision), nearest_prototype(ref, D, precision)
    clear = _clear_rows(cos)
    assert clear.float().mean() > 0.5
    assert torch.equal(S_n[clear], S_r[clear])
    assert torch.equal(S_n[clear], cos.argmax(dim=1)[clear])
    tok = torch.arange(D.shape[0])
    a = attention_guided_grouping(nat, low, up.attention, D, precision=precision,
                                  token_to_prototype=tok)
    b = attention_guided_grouping(ref, low, up.attention, D, precision=precision,
                                  token_to_prototype=tok)
    cost = 0.75 * cos + 0.25 * up.attention.matmul(F.one_hot(tok, D.shape[0]).float())
    clear = _clear_rows(cost)
    assert torch.equal(torch.from_numpy(a.labels).reshape(-1)[clear],
                       torch.from_numpy(b.labels).reshape(-1)[clear])
    assert torch.equal(torch.from_numpy(a.labels).reshape(-1)[clear], cost.argmax(dim=1)[clear])
    # K-means: Lloyd's passes take the bfloat16 argmax unchecked (rounding differs with the
    # offset column, so the paths' centres drift apart); the returned labels are re-checked:
    # each path's labels are its centres' float32 nearest, where that is clear
    for P in (nat, ref):
        lab, centres = kmeans_pp(P, 70, 3, precision=precision)
        score = unit @ centres.T - 0.5 * centres.square().sum(1)
        clear = _clear_rows(score)
        assert clear.float().mean() > 0.5
        assert torch.equal(torch.from_numpy(lab).reshape(-1)[clear], score.argmax(dim=1)[clear])


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_seeding_does_not_depend_on_the_chunking(precision):
    up, low, _ = _inputs()
    tokens = low.reshape(low.shape[0], -1).T
    seeds = [_token_nearest_pixel(PixelFeatures(up.features, precision, chunk=c), tokens,
                                  precision, None) for c in (2048, 1000, 333)]
    assert all(torch.equal(seeds[0], s) for s in seeds[1:])
    # the float32 argmax over all pixels
    X = up.features.reshape(up.features.shape[0], -1)
    exact = F.normalize(tokens, dim=1) @ (X / X.norm(dim=0))
    clear = _clear_rows(exact)
    assert clear.float().mean() > 0.9
    assert torch.equal(seeds[0][clear], exact.argmax(dim=1)[clear])


@needs_kernels
def test_cafe_with_and_without_kernels(monkeypatch):
    from sklearn.metrics import adjusted_rand_score
    up, low, gt = _inputs()
    a = CAFE(precision="bfloat16").hierarchy(up.features, low, up.attention)
    monkeypatch.setenv("SEGBOOK_NATIVE", "0")
    cafe_native._library.cache_clear()
    try:
        b = CAFE(precision="bfloat16").hierarchy(up.features, low, up.attention)
    finally:
        monkeypatch.delenv("SEGBOOK_NATIVE")
        cafe_native._library.cache_clear()
    # equal up to float32-level ties between near-identical prototypes
    assert (a.stage2_labels == b.stage2_labels).mean() > 0.98
    for res in (a, b):
        best = max(adjusted_rand_score(gt.ravel(), res.hierarchy.labels(i).ravel())
                   for i in range(len(res.hierarchy.levels)))
        assert best > 0.9
