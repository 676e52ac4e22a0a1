"""Layer-distributed spectral clustering (paper 2): the loss, both solvers, decoding, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from segbook.errors import GraphError
from segbook.groupers.ldsc import (
    AttentionBuffer,
    LayerAffinity,
    LayerDistributedSpectralClustering,
    capture_all_heads,
    decode,
    eigenvector_images,
    grouped_affinities,
    grouped_loss,
    layer_affinities,
    ldsc_loss,
    orthogonalise,
    planted_layer_affinities,
    pool_matrices,
    sd_affinity_sampler,
)
from segbook.pipelines.synthetic import _downsample_labels, planted_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted():
    scene = planted_scene(64, 4)
    affs = planted_layer_affinities(scene, {16: 2, 8: 2, 4: 1}, heads=4, seed=0)
    return affs, _downsample_labels(scene, 16).ravel()


def _ari(gt, labels):
    return adjusted_rand_score(gt, np.asarray(labels).ravel())


# -- the loss on hand-checkable cases -------------------------------------------------------
def test_loss_identity_affinity_and_orthogonal_indicators_is_zero():
    # P = I: every unit z has z^T P z = 1; disjoint indicators are orthogonal -> loss 0
    Z = torch.zeros(2, 2, 2)
    Z[0, 0], Z[1, 1] = 1.0, 1.0
    a = LayerAffinity("id", (2, 2), torch.eye(4)[None])
    terms = ldsc_loss(Z, [a])
    assert float(terms.loss) == pytest.approx(0.0, abs=1e-6)


def test_loss_uniform_affinity_hand_value():
    # P = 1/N everywhere; z = e_1 (unit): z^T P z = 1/N = 1/4; |1/4 - 1| = 3/4, eig term 0.75;
    # two identical channels: z_1^T z_2 = 1 for both ordered pairs -> ortho 1; loss 2*0.75 + 2*1
    Z = torch.zeros(2, 2, 2)
    Z[:, 0, 0] = 1.0
    a = LayerAffinity("u", (2, 2), torch.full((1, 4, 4), 0.25))
    terms = ldsc_loss(Z, [a])
    assert float(terms.eig) == pytest.approx(0.75)
    assert float(terms.ortho) == pytest.approx(1.0)
    assert float(terms.loss) == pytest.approx(3.5)
    assert ldsc_loss(Z, [a], w_eig=1, w_ortho=0).loss.item() == pytest.approx(0.75)


def test_loss_pools_by_adaptive_average_and_normalises_per_channel():
    torch.manual_seed(0)
    Z = torch.rand(3, 4, 6)
    P = torch.softmax(torch.randn(2, 6, 6), -1)
    a = LayerAffinity("coarse", (2, 3), P)
    z = F.normalize(F.adaptive_avg_pool2d(Z[None], (2, 3))[0].reshape(3, -1), dim=1)
    e = torch.einsum("kn,hnm,km->hk", z, P, z)
    G = z @ z.T
    off = G[~torch.eye(3, dtype=torch.bool)]
    want = 2 * (e - 1).abs().mean() + 2 * off.pow(2).mean()
    assert float(ldsc_loss(Z, [LayerAffinity("fine", (4, 6), torch.eye(24)[None]), a]).e[-6:]
                 .sub(e.reshape(-1)).abs().max()) < 1e-6
    assert float(ldsc_loss(Z, [a]).loss) == pytest.approx(float(want), rel=1e-6)


def test_pool_matrices_match_torch_on_non_square_grids():
    torch.manual_seed(1)
    Z = torch.rand(2, 12, 20)
    for pool, ref in (("adaptive_avg", lambda x: F.adaptive_avg_pool2d(x, (5, 7))),
                      ("bilinear", lambda x: F.interpolate(x, size=(5, 7), mode="bilinear",
                                                           align_corners=False))):
        rh, rw = pool_matrices((12, 20), (5, 7), pool)
        got = rh.float() @ Z @ rw.float().T
        assert torch.allclose(got, ref(Z[None])[0], atol=1e-5)


def test_grouped_loss_equals_loss_when_objectives_are_below_one(planted):
    # symmetric stochastic maps (lazy uniform walks): every e <= 1, so the grouped loss is exact
    def lazy(n, a):
        return (1 - a) * torch.eye(n) + a * torch.full((n, n), 1 / n)
    affs = [LayerAffinity("f0", (4, 4), torch.stack([lazy(16, 0.2), lazy(16, 0.7)])),
            LayerAffinity("f1", (4, 4), lazy(16, 0.5)[None]),
            LayerAffinity("c0", (2, 2), torch.stack([lazy(4, 0.1), lazy(4, 0.9), lazy(4, 0.4)]))]
    Z = torch.softmax(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)), 0)
    exact = ldsc_loss(Z, affs)
    assert float(exact.e.max()) <= 1
    assert float(grouped_loss(Z, grouped_affinities(affs))) == pytest.approx(float(exact.loss),
                                                                             rel=1e-5)
    # in general it is a lower bound (|mean e - 1| <= mean |e - 1|)
    affs, _ = planted
    Z = torch.softmax(torch.randn(6, 16, 16, generator=torch.Generator().manual_seed(0)), 0)
    assert float(grouped_loss(Z, grouped_affinities(affs))) <= float(ldsc_loss(Z, affs).loss) + 1e-6


# -- both solvers recover planted multi-layer attention -------------------------------------
@pytest.mark.parametrize("solver,params", [("eigen", {}),
                                           ("adam", {"passes": 600, "lr": 4e-3, "width": 32})])
def test_solvers_recover_planted_regions(planted, solver, params):
    affs, gt = planted
    g = LayerDistributedSpectralClustering(solver=solver, n_channels=12, device="cpu", **params)
    res = g.fit_predict(affs)
    assert res.token_labels.shape == (16, 16)
    assert _ari(gt, res.token_labels) >= 0.95
    assert g.last.objective < 0.8
    assert g.last.affinities == 5 * 4 and g.last.layers == 5


def test_non_square_grids_and_bilinear_option():
    scene = np.zeros((16, 24), dtype=np.int64)
    scene[:, 12:] = 1
    scene[10:, :8] = 2
    affs = []
    for (h, w), seed in (((16, 24), 0), ((8, 12), 1)):
        lab = torch.from_numpy(scene[(np.arange(h) * 16 // h)][:, (np.arange(w) * 24 // w)].ravel())
        logits = 6.0 * (lab[:, None] == lab[None]).float()
        logits = logits + torch.randn(2, h * w, h * w, generator=torch.Generator().manual_seed(seed))
        affs.append(LayerAffinity(f"g{h}", (h, w), torch.softmax(logits, -1)))
    for pool in ("adaptive_avg", "bilinear"):
        g = LayerDistributedSpectralClustering(n_channels=6, pool=pool, device="cpu")
        res = g.fit_predict(affs, out_size=(32, 48))
        assert res.labels.shape == (32, 48) and res.token_labels.shape == (16, 24)
        assert _ari(scene.ravel(), res.token_labels) >= 0.95


def test_pre_and_post_softmax_from_a_capture_like_source(planted):
    from segbook.backbones.base import Capture, LayerCapture
    affs, gt = planted
    cap = Capture("planted", (64, 64))
    for a in affs:
        logits = torch.log(a.P.clamp_min(1e-12))
        cap.layers[a.name] = LayerCapture(a.name, "self_attention", a.grid, attn=a.P,
                                          logits=logits, heads=a.heads, reduction="none")
    post = layer_affinities(cap)
    pre = layer_affinities(cap, affinity="pre_softmax")
    assert torch.equal(post[0].P, affs[0].P) and not torch.equal(pre[0].P, post[0].P)
    res = LayerDistributedSpectralClustering(n_channels=12, device="cpu").fit_predict(cap)
    assert _ari(gt, res.token_labels) >= 0.95
    res_pre = LayerDistributedSpectralClustering(n_channels=12, affinity="pre_softmax",
                                                 device="cpu").fit_predict(cap)
    assert res_pre.token_labels.shape == (16, 16) and res_pre.labels.min() >= 0
    with pytest.raises(GraphError, match="logits"):
        cap2 = Capture("x", (4, 4), {"a": LayerCapture("a", "self_attention", (2, 2),
                                                       attn=torch.full((4, 4), 0.25))})
        layer_affinities(cap2, affinity="pre_softmax")


def test_determinism_with_a_seed(planted):
    affs, _ = planted
    for solver, params in (("eigen", {}), ("adam", {"passes": 60, "width": 16})):
        a = LayerDistributedSpectralClustering(solver=solver, n_channels=6, seed=3, device="cpu", **params)
        b = LayerDistributedSpectralClustering(solver=solver, n_channels=6, seed=3, device="cpu", **params)
        ra, rb = a.fit_predict(affs), b.fit_predict(affs)
        assert np.array_equal(ra.labels, rb.labels)
        assert np.array_equal(a.last.Z, b.last.Z)


def test_adam_counts_updates_like_the_code(planted):
    affs, _ = planted
    g = LayerDistributedSpectralClustering(solver="adam", n_channels=4, passes=100,
                                           accumulate=20, width=8, device="cpu")
    g.solve(affs)
    assert g.last is None  # solve() does not set the grouper's last result
    res = g.solve(affs)
    assert res.updates == 5 and res.passes == 101
    # the summed-gradient shortcut equals running every pass
    lit = LayerDistributedSpectralClustering(solver="adam", n_channels=4, passes=100, accumulate=20,
                                             width=8, repeat_fixed_passes=True, device="cpu")
    assert np.allclose(lit.solve(affs).Z, res.Z, atol=1e-4)


# -- X_ortho, decoding, figures --------------------------------------------------------------
def test_orthogonalise_decode_and_eigenvector_images():
    Z = torch.zeros(3, 4, 4)
    Z[0, :2], Z[1, 2:, :2], Z[2, 2:, 2:] = 1, 1, 1
    X, U, S = orthogonalise(Z)
    assert X.shape == (16, 3) and np.allclose(U.T @ U, np.eye(3), atol=1e-10)
    assert np.all(np.diff(S) <= 1e-12)
    sel = decode(X)
    assert sel.k == 3
    assert decode(X, k=2).k == 2
    with pytest.raises(GraphError, match="larger than the number of tokens"):
        decode(X, k=17)
    imgs = eigenvector_images(np.random.default_rng(0).normal(size=(16, 7)), (4, 4))
    assert len(imgs) == 2 and imgs[0].shape == (4, 4, 3)
    assert all(np.allclose(im.min((0, 1)), 0) and np.allclose(im.max((0, 1)), 1) for im in imgs)


# -- bad input -------------------------------------------------------------------------------
def test_bad_inputs_name_the_layer():
    good = torch.full((1, 4, 4), 0.25)
    bad_nan = good.clone()
    bad_nan[0, 1, 2] = float("nan")
    with pytest.raises(GraphError, match="layer nanny.*NaN"):
        layer_affinities([LayerAffinity("nanny", (2, 2), bad_nan)])
    with pytest.raises(GraphError, match="layer rows.*not probabilities"):
        layer_affinities([LayerAffinity("rows", (2, 2), good * 2)])
    with pytest.raises(GraphError, match="layer grid.*holds 6 tokens"):
        layer_affinities([LayerAffinity("grid", (2, 3), good)])
    with pytest.raises(GraphError, match="aspect ratio"):
        layer_affinities([LayerAffinity("wide", (4, 16), torch.full((1, 64, 64), 1 / 64)),
                          LayerAffinity("tall", (8, 2), torch.full((1, 16, 16), 1 / 16))])
    with pytest.raises(GraphError, match="empty layer selection"):
        layer_affinities([LayerAffinity("a", (2, 2), good)], layers=["nothing"])
    with pytest.raises(GraphError, match="empty layer selection"):
        layer_affinities({})
    # logits are fine as pre-softmax affinities
    assert layer_affinities([LayerAffinity("l", (2, 2), good * 7)], affinity="pre_softmax")


def test_constant_image_gives_one_region_never_nan():
    # every row uniform: nothing to separate; the result is documented, never NaN
    affs = [LayerAffinity("u", (6, 6), torch.full((2, 36, 36), 1 / 36))]
    for solver, params in (("eigen", {}), ("adam", {"passes": 40, "width": 8})):
        g = LayerDistributedSpectralClustering(solver=solver, n_channels=4, device="cpu", **params)
        res = g.fit_predict(affs, out_size=(12, 12))
        assert res.labels.shape == (12, 12) and res.n_segments == 1
        assert np.isfinite(g.last.x_ortho).all() and g.last.constant


def test_attention_buffer_reuses_and_keeps_decoder_layers():
    calls = []

    def sample(i):
        calls.append(i)
        return [LayerAffinity("down_blocks.0.x", (2, 2), torch.eye(4)[None]),
                LayerAffinity("up_blocks.1.x", (2, 2), torch.eye(4)[None])]
    buf = AttentionBuffer(sample, size=3, reuse=0.75, keep="decoder", seed=0)
    draws = [buf() for _ in range(40)]
    assert len(calls) < 40 and len(buf.entries) == 3
    assert all(len(e) == 1 and e[0].name.startswith("up_blocks") for e in buf.entries)
    assert sum(len(d) == 2 for d in draws) == len(calls)       # fresh draws have every layer
    with pytest.raises(ValueError):
        AttentionBuffer(sample, keep="some")


# -- real capture paths (tiny random models; shapes only) ------------------------------------
@pytest.fixture(scope="module")
def image():
    from segbook.data import load_sample
    return load_sample("coffee", size=64)


def test_fit_predict_on_a_tiny_sd_capture_and_sampler(image):
    from segbook.backbones import load_backbone
    sd = load_backbone("tiny-sd", device="cpu")
    cap = capture_all_heads(sd, image, seed=0, size=64)
    assert len(cap) == 16 and all(layer.attn.dim() == 3 for layer in cap)
    res = LayerDistributedSpectralClustering(n_channels=6, device="cpu").fit_predict(cap, image=image)
    assert res.labels.shape == image.shape[:2] and res.n_segments >= 1
    sampler = sd_affinity_sampler(sd, image, seed=0, size=64)
    g = LayerDistributedSpectralClustering(solver="adam", n_channels=4, passes=20, accumulate=10,
                                           width=8, buffer_size=3, device="cpu")
    res = g.fit_predict(sampler, out_size=(32, 32))
    assert res.labels.shape == (32, 32) and g.last.updates == 2
    assert 3 <= g.last.fresh_captures < 21
    e = LayerDistributedSpectralClustering(n_channels=4, noise_draws=2, device="cpu")
    assert e.fit_predict(sampler).token_labels.shape == g.last.grid
    assert e.last.fresh_captures == 2


def test_fit_predict_on_a_tiny_vit_capture(image):
    from segbook.backbones import load_backbone
    vit = load_backbone("tiny-vit", device="cpu")
    cap = capture_all_heads(vit, image, size=(64, 96), resize="exact")
    grid = cap.meta["grid"]
    assert grid[0] != grid[1]
    assert all(layer.attn.dim() == 3 and layer.prefix_tokens == 0 for layer in cap)
    res = LayerDistributedSpectralClustering(n_channels=6, device="cpu").fit_predict(cap, out_size=(40, 60))
    assert res.token_labels.shape == tuple(grid) and res.labels.shape == (40, 60)
    keep = vit.capture(image, heads="none", prefix="keep")
    with pytest.raises(GraphError, match="CLS"):
        layer_affinities(keep)


def test_vit_queries_and_keys_resized_to_another_grid(image):
    # paper 2's MAE: q/k upsampled to the DINO/CLIP grid; at the own grid it is the attention
    from segbook.backbones import load_backbone
    from segbook.groupers.ldsc import qk_resized_affinities
    vit = load_backbone("tiny-vit", device="cpu")
    cap = vit.capture(image, heads="none", qkv=True, dtype=torch.float32, size=64, resize="exact")
    same = qk_resized_affinities(cap, cap.meta["grid"])
    assert torch.allclose(same[0].P, cap[same[0].name].attn.float(), atol=1e-5)
    h, w = cap.meta["grid"]
    affs = capture_all_heads(vit, image, qk_grid=(2 * h, 3 * w), size=64, resize="exact")
    assert all(a.grid == (2 * h, 3 * w) and a.P.shape[-1] == 6 * h * w for a in affs)
    layer_affinities(affs)          # rows are probabilities
    res = LayerDistributedSpectralClustering(n_channels=4, device="cpu").fit_predict(affs)
    assert res.token_labels.shape == (2 * h, 3 * w)
    with pytest.raises(GraphError, match="qkv=True"):
        qk_resized_affinities(vit.capture(image, size=64, resize="exact"), (h, w))


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-mae"])
def test_clip_and_mae_run_every_head_of_every_layer(name, image):
    """Paper 2's CLIP and MAE have no working public code; ours runs on miniatures of the
    same timm classes: all heads of all layers, CLS dropped and re-softmaxed, then LDSC."""
    from segbook.backbones import load_backbone
    vit = load_backbone(name, device="cpu")
    cap = capture_all_heads(vit, image, size=64, resize="exact")
    assert len(cap.layers) == 3
    assert all(layer.attn.dim() == 3 and layer.attn.shape[0] == 2 and layer.prefix_tokens == 0
               for layer in cap)
    rows = torch.stack([layer.attn.float().sum(-1) for layer in cap])
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-3)
    res = LayerDistributedSpectralClustering(n_channels=4, device="cpu").fit_predict(
        cap, out_size=(32, 48))
    assert res.labels.shape == (32, 48) and res.n_segments >= 1
    assert not np.isnan(res.labels).any()
    # MAE's q/k resized to another grid, as paper 2 reads MAE on the DINO/CLIP grid
    h, w = cap.meta["grid"]
    affs = capture_all_heads(vit, image, qk_grid=(2 * h, 2 * w), size=64, resize="exact")
    assert all(a.P.shape[-1] == 4 * h * w for a in affs)


@pytest.mark.parametrize("statement", [
    "import segbook.pipelines",
    "from segbook.groupers import LayerDistributedSpectralClustering; import segbook.pipelines",
    "import segbook.groupers.ldsc",
    "from segbook.pipelines import WalkAndCut; from segbook.groupers import ldsc_loss",
])
def test_no_import_cycle_whatever_is_imported_first(statement):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
