"""CAFE (paper 3, sec. 3.2, supplement A): stages on planted inputs, the incremental sweep
against the naive one, the Table 4 variants, calibration and bad input."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from segbook.errors import GraphError, MissingDatasetError
from segbook.groupers.cafe import (
    CAFE,
    PAPER_TARGETS,
    TABLE4_VARIANTS,
    calibrate_granularity,
    calibration_size,
    granularity_target,
    planted_inputs,
)
from segbook.groupers.cafe_merge import (
    granularity,
    hierarchical_merging,
    merge_sweep,
    merge_sweep_naive,
    sweep_data,
    thresholds,
)
from segbook.groupers.cafe_stages import (
    attention_guided_grouping,
    bf16_error,
    cross_resolution_seeding,
    edge_refinement,
    fixed_margin,
    merge_operator,
    nearest_prototype,
    pooled_attention,
)
from segbook.upsamplers.base import LazyAttention, Upsampled, distance_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quadrants(H=64, W=96):
    gt = np.zeros((H, W), np.int64)
    gt[: H // 2, W // 2:] = 1
    gt[H // 2:, : W // 2] = 2
    gt[H // 2:, W // 2:] = 3
    return gt


def voronoi(H, W, n, seed):
    rng = np.random.default_rng(seed)
    sites = rng.integers(0, [H, W], size=(n, 2))
    yy, xx = np.mgrid[:H, :W]
    return np.argmin((yy[..., None] - sites[:, 0]) ** 2 + (xx[..., None] - sites[:, 1]) ** 2,
                     axis=-1)


def ari(a, b):
    return adjusted_rand_score(np.ravel(a), np.ravel(b))


# -- the whole grouper on planted regions ------------------------------------------------------
def test_cafe_recovers_planted_quadrants():
    gt = quadrants()
    src = planted_inputs(gt, noise=0.1, seed=0)
    res = CAFE().fit_predict(src)
    assert res.labels.shape == gt.shape and res.labels.dtype == np.int64
    assert ari(res.labels, gt) > 0.9
    hier = CAFE().hierarchy(src[0].features, src[1], src[0].attention).hierarchy
    ks = [s.k for s in hier.snapshots]
    assert ks == sorted(ks, reverse=True) and len(hier.levels) <= 40    # the sweep: fine to coarse
    assert max(ari(hier.labels(i), gt) for i in range(len(hier.levels))) > 0.95


def test_cafe_target_picks_the_level_of_that_granularity():
    gt = voronoi(64, 64, 6, seed=1)
    src = planted_inputs(gt, noise=0.05, seed=1)
    cafe = CAFE()
    cafe.fit_predict(src)
    hier = cafe.last.hierarchy
    gs = granularity(sweep_data(gt, src[0].features), np.arange(6))
    i = cafe.choose_level(hier, target=gs)
    assert hier.levels[i].k == 6 and ari(hier.labels(i), gt) > 0.95
    assert cafe.choose_level(hier, "finest") == 0
    assert cafe.choose_level(hier, "coarsest") == len(hier.levels) - 1


def test_thin_planted_cracks_survive_and_score_with_cliou():
    from segbook.eval import centreline_iou
    H, W = 96, 96
    gt = np.zeros((H, W), np.int64)
    gt[28:32, 4:92] = 1                      # a 4-px horizontal crack
    gt[8:88, 60:64] = 1                      # a 4-px vertical one
    src = planted_inputs(gt, grid=(24, 24), noise=0.05, seed=2)
    res = CAFE(target=(0.5, 1.0)).fit_predict(src)      # the 2-segment level
    crack = res.labels == np.bincount(res.labels[gt == 1]).argmax()
    assert centreline_iou(crack, gt == 1).cliou > 0.8


# -- stage 1 -----------------------------------------------------------------------------------
def test_merge_operator_merges_within_attention_groups_only():
    D = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0, 0.0], [0.99, 0.05, 0.0], [1.0, 0.0, 0.01], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        dim=1)
    # pixels: S chooses 0,1,2,3 (4 is empty); R puts 0 and 1 in group 0, 2 in group 3
    S = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    R = torch.tensor([0, 0, 0, 0, 3, 3, 3, 3])
    Dn, mapping = merge_operator(S, R, D, tau=0.97)
    assert mapping.tolist() == [0, 0, 1, 2, -1]       # 0+1 merge; 2 is in another group; 4 drops
    assert Dn.shape == (3, 3)
    assert torch.allclose(Dn.norm(dim=1), torch.ones(3))


def test_crs_shrinks_to_the_planted_classes():
    gt = quadrants()
    up, low = planted_inputs(gt, noise=0.02, seed=3)
    crs = cross_resolution_seeding(up.features, low, up.attention, iterations=5)
    assert crs.sizes[0] == low.shape[1] * low.shape[2]
    assert all(a >= b for a, b in zip(crs.sizes, crs.sizes[1:]))
    assert len(crs.sizes) <= 6
    assert crs.D.shape[0] < crs.sizes[0] // 4


def test_bfloat16_products_give_the_float32_labels():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(24, 40, 50, generator=g)
    D = torch.randn(80, 24, generator=g)        # above FAST_MIN_K: the bfloat16 path runs
    a = nearest_prototype(feats, D, precision="float32")
    b = nearest_prototype(feats, D, precision="bfloat16")
    assert torch.equal(a, b)
    # both products' rounding to bfloat16 is covered; the inputs' fully, at small C
    assert fixed_margin(320) > 2 * 2 ** -8
    assert bf16_error(24) == (2 * 2 ** -8, 2 ** -8)
    assert bf16_error(1024)[0] < bf16_error(320)[0] < 2 * 2 ** -8


# -- stage 2 -----------------------------------------------------------------------------------
def test_pooled_attention_equals_the_dense_product():
    att = distance_attention((20, 24), (5, 6), chunk=100)
    tok = torch.arange(30) % 7
    G = torch.nn.functional.one_hot(tok, 7).float()
    dense = att.dense() @ G
    chunks = torch.cat([c for _, _, c in pooled_attention(att, tok, 7, "chunks")])
    via_matmul = torch.cat([c for _, _, c in pooled_attention(att, tok, 7, "matmul")])
    assert torch.allclose(chunks, dense, atol=1e-6) and torch.allclose(via_matmul, dense, atol=1e-6)


def test_agg_attention_term_breaks_feature_ties():
    # identical features everywhere: only the attention decides (left half -> token 0)
    H, W = 8, 16
    feats = torch.ones(4, H, W)
    low = torch.ones(4, 1, 2)
    D = torch.nn.functional.normalize(torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1.0001]]), dim=1)
    att = distance_attention((H, W), (1, 2), sigma=0.3)
    out = attention_guided_grouping(feats, low, att, D, token_to_prototype=torch.tensor([0, 1]),
                                    precision="float32")
    assert (out.labels[:, : W // 2] == 0).all() and (out.labels[:, W // 2:] == 1).all()


def test_edge_refinement_flips_isolated_pixels_but_not_on_strong_gradients():
    lab = np.zeros((9, 9), np.int64)
    lab[4, 4] = 1
    lab[1, 1] = 2
    grad = np.zeros((9, 9))
    grad[1, 1] = 10.0                       # a strong feature edge keeps its label
    out = edge_refinement(lab, grad, gradient_quantile=0.99)
    assert out[4, 4] == 0 and out[1, 1] == 2


# -- stage 3 -----------------------------------------------------------------------------------
def test_thresholds_are_the_691_of_the_supplement():
    t = thresholds()
    assert len(t) == 691 and t[0] == 0.99 and t[-1] == 0.30


@pytest.mark.parametrize("seed,beta_bnd", [(0, 0.0), (1, 1.0)])
def test_incremental_sweep_equals_naive_recomputation(seed, beta_bnd):
    rng = np.random.default_rng(seed)
    H, W, n = 24, 32, 25
    lab = voronoi(H, W, n, seed)
    cls = rng.integers(0, 5, n)
    base = rng.normal(size=(5, 8))
    feats = base[cls[lab]] + 0.3 * rng.normal(size=(H, W, 8)) + 0.5 * rng.normal(size=(n, 8))[lab]
    F = torch.from_numpy(feats.transpose(2, 0, 1).copy()).float()
    data = sweep_data(lab, F, keep_features=True)
    taus = thresholds()
    fast = merge_sweep(data, taus, beta_bnd, min_size=20)
    slow = merge_sweep_naive(data, taus, beta_bnd, min_size=20)
    assert len(fast) == len(slow) >= 4
    for a, b in zip(fast, slow):
        assert np.array_equal(a.mapping, b.mapping) and a.tau == b.tau
        assert a.tau_conn == pytest.approx(b.tau_conn, abs=1e-6, nan_ok=True)
    h1 = hierarchical_merging(lab, F, min_size=20, beta_bnd=beta_bnd)
    h2 = hierarchical_merging(lab, F, min_size=20, beta_bnd=beta_bnd, naive=True)
    assert [lv.mapping.tolist() for lv in h1.levels] == [lv.mapping.tolist() for lv in h2.levels]


def test_level_scores_and_granularity():
    gt = voronoi(48, 48, 5, seed=4)
    up, _ = planted_inputs(gt, noise=0.05, seed=4)
    fine = voronoi(48, 48, 40, seed=5) * 5 + gt          # an over-segmentation of gt
    h = hierarchical_merging(fine, up.features, min_size=10)
    for lv in h.levels:
        if lv.k >= 2:
            assert lv.g_scale == pytest.approx(1 / lv.k)      # areas cover the image
            assert 0 < lv.g_sem <= 1
    assert any(lv.k == 5 and ari(lv.mapping[h.initial], gt) > 0.99 for lv in h.levels)
    hc = hierarchical_merging(fine, up.features, min_size=10, score="ch", top_n=3)
    assert len(hc.levels) <= 3
    assert max(lv.ch for lv in hc.levels) == pytest.approx(max(
        lv.ch for lv in hierarchical_merging(fine, up.features, min_size=10, top_n=1000).levels))


# -- Table 4 variants --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(TABLE4_VARIANTS))
def test_table4_variants_recover_planted_regions(variant):
    gt = quadrants(48, 64)
    src = planted_inputs(gt, noise=0.05, seed=6)
    res = CAFE(kmeans_k=20, kmeans_iterations=5, **TABLE4_VARIANTS[variant]).fit_predict(src)
    assert res.labels.shape == gt.shape
    assert ari(res.labels, gt) > 0.8


# -- calibration -------------------------------------------------------------------------------
def test_calibration_oracle_target_and_sizes():
    assert calibration_size(5000) == 200 and calibration_size(300) == 30
    assert calibration_size(3) == 1 and calibration_size(0) == 0
    items = []
    for s in range(3):
        gt = voronoi(40, 40, 4, seed=10 + s)
        items.append((planted_inputs(gt, noise=0.05, seed=s), gt))
    cal = calibrate_granularity(items, CAFE(), num_classes=4, dataset="planted", limit=3)
    assert cal["n_images"] == 3 and cal["miou"] > 0.9
    assert cal["target"][0] == pytest.approx(0.25, abs=0.02)
    gt_cal = calibrate_granularity(items, CAFE(), num_classes=4, target="gt", limit=3)
    assert gt_cal["target"][0] == pytest.approx(0.25)


def test_paper_targets_usable_directly():
    assert granularity_target("ADE20K") == (0.077, 0.511)
    assert granularity_target("coco-stuff") == PAPER_TARGETS["coco_stuff"][1:]
    gt = quadrants(32, 32)
    res = CAFE(target="voc").fit_predict(planted_inputs(gt, seed=0))
    assert res.n_segments >= 1
    with pytest.raises(KeyError, match="omnicrack"):
        granularity_target("omnicrack")


def test_calibration_without_annotated_training_images_names_dataset_and_split():
    with pytest.raises(MissingDatasetError, match=r"'train'.*'rsdd'"):
        calibrate_granularity([], CAFE(), num_classes=8, dataset="rsdd", split="train")


# -- bad input ---------------------------------------------------------------------------------
def test_single_colour_image_gives_one_segment_without_nan():
    feats = torch.ones(8, 32, 40)
    low = torch.ones(8, 4, 5)
    res = CAFE().fit_predict((Upsampled(feats, distance_attention((32, 40), (4, 5))), low))
    assert res.n_segments == 1 and (res.labels == 0).all()
    levels = CAFE().hierarchy(feats, low, distance_attention((32, 40), (4, 5))).hierarchy.levels
    assert all(lv.k == 1 for lv in levels)


def test_image_smaller_than_the_minimum_segment():
    gt = np.zeros((5, 6), np.int64)
    gt[:, 3:] = 1
    res = CAFE().fit_predict(planted_inputs(gt, grid=(1, 2), noise=0.01))
    assert res.labels.shape == (5, 6)
    # 30 pixels in all: a segment under min_size (50) is absorbed while it has a neighbour,
    # so the whole image ends as one segment
    assert res.n_segments == 1


def test_nan_features_are_a_clear_error():
    up, low = planted_inputs(quadrants(32, 32))
    up.features[0, 3, 3] = float("nan")
    with pytest.raises(GraphError, match="NaN"):
        CAFE().fit_predict((up, low))


def test_attention_rows_off_one_error_or_renormalise():
    gt = quadrants(32, 32)
    up, low = planted_inputs(gt, noise=0.05)
    base = up.attention
    bad = LazyAttention(lambda s, e: 2.0 * base._rows_fn(s, e), base.out_size, base.grid)
    with pytest.raises(GraphError, match="sum to one"):
        CAFE().fit_predict((Upsampled(up.features, bad), low))
    res = CAFE(renormalise_attention=True).fit_predict((Upsampled(up.features, bad), low))
    ref = CAFE().fit_predict((up, low))
    assert np.array_equal(res.labels, ref.labels)


def test_missing_lowres_or_attention_is_a_clear_error():
    up, low = planted_inputs(quadrants(32, 32))
    with pytest.raises(ValueError, match="low-resolution tokens"):
        CAFE().fit_predict(up)
    with pytest.raises(ValueError, match="no attention"):
        CAFE().fit_predict((Upsampled(up.features, None), low))
    res = CAFE().fit_predict(up, lowres=low)
    assert res.labels.shape == (32, 32)


def test_capture_source_goes_through_the_upsampler():
    from segbook.backbones import load_backbone
    from segbook.data import load_sample
    from segbook.pipelines import capture_attention
    img = load_sample("coffee", size=64)
    cap = capture_attention(img, load_backbone("effnet-lite0"), None, progress=False,
                            with_features=True)
    res = CAFE(layer="blocks.10").fit_predict(cap, image=img)
    assert res.labels.shape == (64, 64) and res.backbone == "effnet-lite0" and res.stand_in
    assert res.token_labels.ndim == 2 and res.n_segments >= 1


# -- stage 3's fast paths against plain references (cafe_merge speed-up) -----------------------
def _plain_segment_sums(labels, features, K, chunk):
    """The per-segment statistics computed the plain way: each chunk of ``chunk`` pixels
    transposed whole, float32 ``index_add_`` within it, float64 across chunks."""
    C = features.shape[0]
    X = features.reshape(C, -1)
    lab = torch.from_numpy(labels.reshape(-1))
    fsum = torch.zeros(K, C, dtype=torch.float64)
    nsum = torch.zeros(K, C, dtype=torch.float64)
    nsq = torch.zeros(K, dtype=torch.float64)
    fmax = torch.full((K, C), -np.inf)
    fmin = torch.full((K, C), np.inf)
    for s in range(0, X.shape[1], chunk):
        x = X[:, s:s + chunk].T.float().contiguous()
        lb = lab[s:s + chunk]
        fsum += torch.zeros(K, C).index_add_(0, lb, x).double()
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        nsum += torch.zeros(K, C).index_add_(0, lb, xn).double()
        nsq.index_add_(0, lb, xn.square().sum(1).double())
        idx = lb[:, None].expand(-1, C)
        fmax.scatter_reduce_(0, idx, x, "amax")
        fmin.scatter_reduce_(0, idx, x, "amin")
    return fsum.numpy(), nsum.numpy(), nsq.numpy(), fmax.double().numpy(), fmin.double().numpy()


@pytest.mark.parametrize("chunk,block,channel_block", [(16384, 2048, 64), (4096, 1000, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_segment_sums_equal_the_plain_chunked_sums_bit_for_bit(monkeypatch, chunk, block,
                                                              channel_block, threads):
    import segbook.groupers.cafe_merge as cm
    monkeypatch.setattr(cm, "_CHUNK", chunk)
    monkeypatch.setattr(cm, "_BLOCK", block)
    monkeypatch.setattr(cm, "_CHANNEL_BLOCK", channel_block)
    labels = cm._compact(voronoi(150, 121, 37, seed=3))       # 18150 pixels: chunks and blocks
    K = int(labels.max()) + 1                                  # do not divide it
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(70, 150, 121, generator=g) + 0.5       # 70 channels: a partial block
    feats[:, 0, :5] = 0                                        # zero vectors: clamped norms
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cm._segment_sums(labels, feats, K, native=False)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    want = _plain_segment_sums(labels, feats, K, chunk)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_segment_sums_compiled_equal_the_torch_code():
    import segbook.groupers.cafe_merge as cm
    from segbook.groupers import cafe_native
    if not cafe_native.available():
        pytest.skip("compiled kernels unavailable")
    labels = cm._compact(voronoi(150, 121, 37, seed=3))
    K = int(labels.max()) + 1 + 2                              # two empty segments
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(70, 150, 121, generator=g) + 0.5
    feats[:, 0, :5] = 0
    got = cm._segment_sums(labels, feats, K)
    want = cm._segment_sums(labels, feats, K, native=False)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.allclose(a, b, rtol=1e-5, atol=1e-4)        # float32 rounding (sums of 1e3)
    assert np.array_equal(got[3], want[3]) and np.array_equal(got[4], want[4])   # max, min
    assert np.isinf(got[3][-2:]).all()


def test_non_adjacent_merge_equals_union_find_over_non_adjacent_pairs():
    from segbook.groupers.cafe_merge import _canonical, _find, _group_rows, non_adjacent_merge
    labels = voronoi(40, 50, 24, seed=7)
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(4, 16, generator=g)                   # 4 kinds of region, scattered
    kind = torch.arange(24) % 4
    feats = protos[kind][torch.from_numpy(labels)].permute(2, 0, 1)
    feats = feats + 0.3 * torch.randn(feats.shape, generator=g)
    data = sweep_data(labels, feats)
    rng = np.random.default_rng(0)
    merged_any = False
    for mapping in (np.arange(24), _canonical(rng.integers(0, 12, 24))):
        for tau_conn in (0.5, 0.8, 0.95):
            K = int(mapping.max()) + 1
            fsum = _group_rows(data.fsum, mapping, K)
            P = fsum / np.linalg.norm(fsum, axis=1, keepdims=True)
            adj = {(min(mapping[a], mapping[b]), max(mapping[a], mapping[b]))
                   for a, b in data.pairs.tolist() if mapping[a] != mapping[b]}
            parent = np.arange(K)
            for a, b in zip(*np.nonzero(np.triu(P @ P.T > tau_conn, 1))):
                if (a, b) not in adj:
                    ra, rb = _find(parent, a), _find(parent, b)
                    parent[max(ra, rb)] = min(ra, rb)
            want = _canonical(np.array([_find(parent, k) for k in range(K)])[mapping])
            got = non_adjacent_merge(data, mapping, tau_conn)
            assert np.array_equal(got, want)
            merged_any |= got.max() < mapping.max()
    assert merged_any


@pytest.mark.parametrize("with_foreground", [False, True])
def test_granularity_equals_the_direct_computation(with_foreground):
    labels = voronoi(30, 40, 15, seed=2)
    feats = torch.randn(6, 30, 40, generator=torch.Generator().manual_seed(2))
    data = sweep_data(labels, feats)
    mapping = np.arange(15) % 4
    keep = np.arange(15) % 3 > 0 if with_foreground else np.ones(15, bool)
    m, ids = mapping[keep], np.unique(mapping[keep])
    area = np.array([data.area[keep][m == i].sum() for i in ids], np.float64)
    fmax = np.stack([data.fmax[keep][m == i].max(0) for i in ids])
    fmin = np.stack([data.fmin[keep][m == i].min(0) for i in ids])
    psi = (data.fmax[keep].max(0) - data.fmin[keep].min(0)).mean()
    want = (np.mean(area / area.sum()), np.mean(np.minimum((fmax - fmin).mean(1) / psi, 1.0)))
    got = granularity(data, mapping, keep if with_foreground else None)
    assert got == want
