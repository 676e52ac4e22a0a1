"""segbook.pipelines: paper 1's pipeline, its upsampling, and the baseline groupers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from segbook.errors import GraphError
from segbook.graphs import FactoredAffinity, aggregate_self_attention
from segbook.groupers import recursive_ncut
from segbook.pipelines import (
    DiffCut,
    DiffSegGrouper,
    KMeansGrouper,
    WalkAffinity,
    WalkAndCut,
    WalkAndCutConfig,
    WalkAndCutResult,
    cosine_upsample,
    cosine_upsample_bruteforce,
    dot_upsample,
    peak_memory,
    planted_attention,
    planted_scene,
    run_batch,
    segment_attention,
    segment_with,
    upsampled_row_norms,
)
from segbook.pipelines.upsample import bilinear_taps

torch.set_num_threads(1)

SIDE = 16            # token grid of the synthetic attention (256 tokens)
OUT = (64, 64)       # "image" size


@pytest.fixture(scope="module")
def scene():
    labels = planted_scene(SIDE, n_regions=4)
    maps = planted_attention(labels, resolutions=(4, 8, 16), same=6.0, local=2.0, noise=0.5,
                             layers=2, seed=0)
    return labels, maps


def _upsampled_truth(labels, out=OUT):
    f = out[0] // labels.shape[0]
    return np.kron(labels, np.ones((f, f), dtype=np.int64))


# -- aggregation ----------------------------------------------------------------------------
def test_aggregate_of_float16_captures_is_float32_and_row_stochastic(scene):
    # captures store float16; aggregation must not lose the row sums beyond that rounding
    _, maps = scene
    half = {r: [m.half() for m in v] for r, v in maps.items()}
    for res in (None, (8, 16), (4, 16)):
        P16 = aggregate_self_attention(half, resolutions=res)
        P32 = aggregate_self_attention(maps, resolutions=res)
        assert P16.dtype == torch.float32
        torch.testing.assert_close(P16, P32, atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(P16.sum(1), torch.ones(SIDE * SIDE), atol=1e-3, rtol=0)


def test_aggregate_rejects_bad_maps(scene):
    _, maps = scene
    with pytest.raises(GraphError, match="resolutions"):
        aggregate_self_attention(maps, resolutions=(32,))
    bad = {16: [maps[16][0] * 2]}
    with pytest.raises(GraphError, match="row-stochastic"):
        aggregate_self_attention(bad)
    nan = maps[16][0].clone()
    nan[3, 5] = float("nan")
    with pytest.raises(GraphError, match="NaN"):
        aggregate_self_attention({16: [nan]})
    with pytest.raises(GraphError, match="must end in"):
        aggregate_self_attention({16: [maps[8][0]]})


# -- the factored graph ---------------------------------------------------------------------
def test_walk_affinity_matches_factored(scene):
    _, maps = scene
    P = aggregate_self_attention(maps)
    rng = np.random.default_rng(0)
    for n in (256, 100, 31, 1):
        idx = np.sort(rng.choice(256, n, replace=False))
        order = rng.permutation(n)
        fast = WalkAffinity(P).subgraph(idx)
        ref = FactoredAffinity(P[torch.from_numpy(idx)])
        np.testing.assert_allclose(fast.earlier_weights(order), ref.earlier_weights(order),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(fast.diagonal(), ref.diagonal(), rtol=1e-6)
    F = torch.rand(600, 40)                       # several chunks of 256 rows and a short tail
    order = rng.permutation(600)
    np.testing.assert_allclose(WalkAffinity(F).earlier_weights(order),
                               FactoredAffinity(F).earlier_weights(order), rtol=1e-5)
    a = recursive_ncut(WalkAffinity(P), stop="manc")
    b = recursive_ncut(FactoredAffinity(P), stop="manc")
    np.testing.assert_array_equal(a.labels, b.labels)


# -- section 3.6 upsampling -----------------------------------------------------------------
@pytest.mark.parametrize("grid,out", [((6, 5), (20, 17)), ((4, 4), (16, 16)), ((5, 7), (5, 7)),
                                      ((3, 3), (11, 2)), ((1, 4), (3, 9)), ((8, 8), (5, 6))])
def test_cosine_upsample_equals_bruteforce(grid, out):
    gen = torch.Generator().manual_seed(sum(grid) + sum(out))
    n = grid[0] * grid[1]
    R = torch.softmax(2 * torch.randn(n, n, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, 3, (n,), generator=gen)
    labels[:3] = torch.arange(3)
    fast, sim = cosine_upsample(R, labels, grid, out, return_similarity=True)
    ref, ref_sim = cosine_upsample_bruteforce(R, labels, grid, out)
    assert fast.shape == out and fast.dtype == torch.int64
    torch.testing.assert_close(sim, ref_sim, atol=1e-12, rtol=1e-10)
    np.testing.assert_array_equal(fast.numpy(), ref.numpy())
    # float32 rows: the same labels (no ties in random data)
    np.testing.assert_array_equal(cosine_upsample(R.float(), labels, grid, out).numpy(),
                                  ref.numpy())


def test_row_norms_and_taps_follow_torch_interpolate():
    for n_in, n_out in ((4, 13), (7, 3), (5, 5)):
        x = torch.arange(n_in, dtype=torch.float64).pow(2)
        i0, i1, lam = bilinear_taps(n_in, n_out)
        mine = (1 - torch.from_numpy(lam)) * x[i0] + torch.from_numpy(lam) * x[i1]
        ref = torch.nn.functional.interpolate(x[None, None, None], size=(1, n_out),
                                              mode="bilinear", align_corners=False)[0, 0, 0]
        torch.testing.assert_close(mine, ref)
    R = torch.rand(12, 30, dtype=torch.float64)
    up = torch.nn.functional.interpolate(R.T.reshape(1, 30, 3, 4), size=(7, 9), mode="bilinear",
                                         align_corners=False)[0]
    torch.testing.assert_close(upsampled_row_norms(R, (3, 4), (7, 9)), up.norm(dim=0))


def test_dot_upsample_equals_upsampled_features_argmax():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3] * 5)
    out = dot_upsample(X, labels, (4, 5), (9, 11))
    means = torch.stack([X[labels == k].mean(0) for k in range(4)])
    up = torch.nn.functional.interpolate(X.T.reshape(1, 6, 4, 5), size=(9, 11), mode="bilinear",
                                         align_corners=False)[0]
    np.testing.assert_array_equal(out.numpy(), torch.einsum("chw,kc->khw", up, means)
                                  .argmax(0).numpy())


# -- the pipeline ---------------------------------------------------------------------------
def test_planted_regions_recovered_at_image_resolution(scene):
    labels, maps = scene
    res = segment_attention(maps, WalkAndCutConfig(), out_size=OUT)
    assert isinstance(res, WalkAndCutResult)
    assert res.labels.shape == OUT and res.labels.dtype == np.int64
    assert res.token_labels.shape == (SIDE, SIDE)
    assert res.n_segments == 4 == len(np.unique(res.labels))
    assert adjusted_rand_score(labels.ravel(), res.token_labels.ravel()) > 0.95
    assert adjusted_rand_score(_upsampled_truth(labels).ravel(), res.labels.ravel()) > 0.9
    assert res.tree is not None and res.tree[0].size == SIDE * SIDE


def _purity(reference, labels):
    """Share of tokens whose ``labels`` segment lies mostly in their ``reference`` region."""
    reference, labels = np.ravel(reference), np.ravel(labels)
    return sum(np.bincount(reference[labels == k]).max() for k in np.unique(labels)) / labels.size


@pytest.mark.parametrize("overrides", [
    {"stop": "threshold", "threshold": 0.5}, {"adjacency": "cosine", "stop": "threshold",
                                              "threshold": 0.5},
    {"upsample": "nearest"}, {"method": "random_walk", "threshold": 0.3}])
def test_variants_recover_the_regions(scene, overrides):
    labels, maps = scene
    res = segment_attention(maps, out_size=OUT, **overrides)
    assert res.config == WalkAndCutConfig(**overrides)
    assert adjusted_rand_score(labels.ravel(), res.token_labels.ravel()) > 0.9
    assert adjusted_rand_score(_upsampled_truth(labels).ravel(), res.labels.ravel()) > 0.85


def test_longer_walks_merge_and_scaled_mincut_refines(scene):
    """Paper 1, section 4.4: k is a scale parameter (P^k merges regions); the scaled min-cut
    stop splits more than the NCut-vs-MAN-C stop at k = 1."""
    labels, maps = scene
    counts = []
    for k in (1, 2, 3):
        res = segment_attention(maps, k=k)
        counts.append(res.n_segments)
        assert _purity(res.token_labels, labels) > 0.95      # a coarsening of the regions
    assert counts[0] == 4 and counts == sorted(counts, reverse=True) and counts[-1] < 4
    fine = segment_attention(maps, stop="scaled_mincut")
    assert fine.n_segments > 4 and _purity(labels, fine.token_labels) == 1.0   # a refinement


def test_random_walk_and_adjacency_agree_on_a_clean_case():
    labels = planted_scene(SIDE, n_regions=3)
    maps = planted_attention(labels, resolutions=(16,), same=8.0, local=0.0, noise=0.1)
    walk = segment_attention(maps, method="random_walk", threshold=0.3)
    cut = segment_attention(maps, method="adjacency", stop="manc")
    assert walk.labels.shape == (SIDE, SIDE)          # no image, no out_size: the token grid
    assert adjusted_rand_score(walk.token_labels.ravel(), cut.token_labels.ravel()) == 1.0
    assert adjusted_rand_score(labels.ravel(), cut.token_labels.ravel()) == 1.0


def test_ready_P_and_the_same_maps_give_the_same_result(scene):
    _, maps = scene
    P = aggregate_self_attention(maps, resolutions=(8, 16))
    a = segment_attention(P, out_size=OUT)
    b = segment_attention(maps, WalkAndCutConfig(resolutions=(16, 8)), out_size=OUT)
    np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="resolutions"):
        segment_attention(P, WalkAndCutConfig(resolutions=(16,)))


def test_run_batch_on_captured_attention(scene):
    _, maps = scene
    P = aggregate_self_attention(maps)
    results = run_batch([maps, P], None, WalkAndCutConfig(), out_size=OUT, progress=False)
    assert [r.labels.shape for r in results] == [OUT, OUT]
    np.testing.assert_array_equal(results[0].labels, results[1].labels)


def test_timings_and_peak_memory_are_recorded(scene):
    _, maps = scene
    res = segment_attention(maps, k=2, out_size=OUT)
    steps = ("capture", "aggregate", "power_walk", "adjacency", "ncut", "upsample", "pamr",
             "total")
    assert set(res.timings) == set(steps)
    assert all(v >= 0 for v in res.timings.values())
    assert res.timings["ncut"] > 0 and res.timings["power_walk"] > 0
    assert res.timings["capture"] == 0 and res.timings["pamr"] == 0
    parts = sum(v for k, v in res.timings.items() if k != "total")
    assert parts <= res.timings["total"] + 1e-6
    assert res.peak_memory_bytes > 1 << 20


def test_peak_memory_sees_a_large_temporary_and_nests():
    with peak_memory() as outer:
        big = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB, touched
        del big
        with peak_memory() as inner:
            torch.zeros(1 << 20).sum()
    assert outer["bytes"] - outer["start"] >= 60 << 20
    assert inner["bytes"] <= outer["bytes"]


def test_pamr_refinement(scene):
    labels, maps = scene
    image = np.zeros(OUT + (3,), dtype=np.uint8)
    image[_upsampled_truth(labels) == 1] = (200, 30, 30)
    image[_upsampled_truth(labels) == 2] = (30, 200, 30)
    image[_upsampled_truth(labels) == 3] = (30, 30, 200)
    res = segment_attention(maps, pamr=True, image=image)
    assert res.labels.shape == OUT and res.timings["pamr"] > 0
    assert adjusted_rand_score(_upsampled_truth(labels).ravel(), res.labels.ravel()) > 0.9
    with pytest.raises(ValueError, match="image"):
        segment_attention(maps, pamr=True, out_size=OUT)


def test_bad_inputs_get_clear_errors(scene):
    _, maps = scene
    P = aggregate_self_attention(maps)
    with pytest.raises(GraphError, match="row-stochastic"):
        segment_attention(P * 1.5)
    Q = P.clone()
    Q[0, 0] = float("nan")
    with pytest.raises(GraphError, match="NaN"):
        segment_attention(Q)
    with pytest.raises(GraphError, match="square"):
        segment_attention(P[:, :100])
    with pytest.raises(GraphError, match="grid"):
        segment_attention(torch.full((10, 10), 0.1))
    with pytest.raises(GraphError, match="negative"):
        segment_attention(P - 0.5 * torch.eye(256) + 0.5 / 256)
    for bad in ({"method": "spectral"}, {"adjacency": "kl"}, {"stop": "never"}, {"k": 0},
                {"stop": "threshold"}, {"method": "random_walk"}, {"upsample": "bicubic"},
                {"method": "random_walk", "threshold": 0.3, "k": 2}, {"min_size": 0}):
        with pytest.raises(ValueError):
            WalkAndCutConfig(**bad)


# -- baseline groupers ----------------------------------------------------------------------
def test_groupers_share_one_interface(scene):
    labels, maps = scene
    truth = _upsampled_truth(labels).ravel()
    ours = WalkAndCut(k=1).fit_predict(maps, out_size=OUT)
    diffseg = DiffSegGrouper(kl_threshold=1.1, grid=8).fit_predict(maps, out_size=OUT)
    kmeans = KMeansGrouper(k=4).fit_predict(maps, out_size=OUT)
    for res, name in ((ours, "walk_and_cut"), (diffseg, "diffseg"), (kmeans, "kmeans")):
        assert res.method == name and res.labels.shape == OUT
        assert res.timings["total"] > 0 and res.peak_memory_bytes > 0
    assert adjusted_rand_score(truth, kmeans.labels.ravel()) > 0.9
    assert adjusted_rand_score(truth, diffseg.labels.ravel()) > 0.5
    same = segment_with("diffseg", maps, out_size=OUT, kl_threshold=1.1, grid=8)
    np.testing.assert_array_equal(same.labels, diffseg.labels)
    with pytest.raises(ValueError, match="method"):
        segment_with("slic", maps)


def test_diffcut_grouper_on_planted_features():
    labels = planted_scene(SIDE, n_regions=4)
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 12, generator=gen)
    X = centres[torch.from_numpy(labels.ravel())] + 0.1 * torch.randn(SIDE * SIDE, 12,
                                                                       generator=gen)
    fmap = X.T.reshape(12, SIDE, SIDE)
    res = DiffCut(alpha=10, tau=0.5).fit_predict(fmap, out_size=OUT)
    assert res.method == "diffcut" and res.labels.shape == OUT
    assert adjusted_rand_score(labels.ravel(), res.token_labels.ravel()) == 1.0
    assert adjusted_rand_score(_upsampled_truth(labels).ravel(), res.labels.ravel()) > 0.9
    with pytest.raises(GraphError, match="features"):
        DiffCut().fit_predict(torch.randn(SIDE * SIDE, 12))
