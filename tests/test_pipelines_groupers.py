"""segbook.pipelines.groupers: device placement, split hierarchy, DiffCut's SD features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from segbook.backbones import load_backbone
from segbook.errors import GraphError
from segbook.groupers import diffcut_segment
from segbook.pipelines import (
    DiffCut,
    DiffSegGrouper,
    KMeansGrouper,
    WalkAndCut,
    WalkAndCutConfig,
    compare_methods,
    planted_attention,
    planted_scene,
    resolve_device,
    segment_attention,
    split_hierarchy,
)

torch.set_num_threads(1)

SIDE = 16
OUT = (32, 32)
TINY = {"size": 64, "num_inference_steps": 10, "inversion_steps": 2}


@pytest.fixture(scope="module")
def scene():
    labels = planted_scene(SIDE, n_regions=4)
    maps = planted_attention(labels, resolutions=(4, 8, 16), same=6.0, local=2.0, noise=0.5,
                             layers=2, seed=0)
    return labels, maps


@pytest.fixture(scope="module")
def features():
    labels = planted_scene(SIDE, n_regions=4)
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 12, generator=gen)
    X = centres[torch.from_numpy(labels.ravel())] + 0.1 * torch.randn(SIDE * SIDE, 12,
                                                                       generator=gen)
    return labels, X.T.reshape(12, SIDE, SIDE)


@pytest.fixture(scope="module")
def tiny_sd():
    return load_backbone("tiny-sd", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 56, 3), dtype=np.uint8)
    img[:, 28:] = (220, 40, 40)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


# -- device ---------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA"):
            WalkAndCut(device="cuda")


def test_groupers_give_the_same_labels_on_cpu_and_auto(scene, features):
    labels, maps = scene
    cases = [(WalkAndCut, {}, maps), (WalkAndCut, {"method": "random_walk", "threshold": 0.3}, maps),
             (DiffSegGrouper, {"grid": 4}, maps), (KMeansGrouper, {"k": 4}, maps),
             (DiffCut, {"tau": 0.5}, features[1])]
    for cls, kw, source in cases:
        cpu = cls(device="cpu", **kw).fit_predict(source, out_size=OUT)
        auto = cls(**kw).fit_predict(source, out_size=OUT)         # default "auto"
        np.testing.assert_array_equal(cpu.labels, auto.labels, err_msg=cls.__name__)
        np.testing.assert_array_equal(cpu.token_labels, auto.token_labels)
        override = cls(device="cpu", **kw).fit_predict(source, out_size=OUT, device="auto")
        np.testing.assert_array_equal(cpu.labels, override.labels)
        assert adjusted_rand_score(labels.ravel(), cpu.token_labels.ravel()) > 0.8, cls.__name__


# -- split hierarchy ------------------------------------------------------------------------
def test_split_hierarchy_levels(scene, features):
    _, maps = scene
    res = WalkAndCut().fit_predict(maps, out_size=OUT)
    tree = split_hierarchy(res)
    assert tree.stop == res.config.stop == "manc"
    np.testing.assert_array_equal(tree.labels_at_depth(0), np.zeros(SIDE * SIDE, np.int64))
    assert tree.labels_at_depth(1).max() == 1                       # the first split
    deepest = max(node.depth for node in tree.tree)
    np.testing.assert_array_equal(tree.labels_at_depth(deepest + 1),
                                  res.token_labels.ravel())
    counts = [tree.labels_at_depth(d).max() + 1 for d in range(deepest + 2)]
    assert counts == sorted(counts) and counts[-1] == res.n_segments >= 4
    # same for a direct call and DiffCut
    direct = split_hierarchy(segment_attention(maps, WalkAndCutConfig(), out_size=OUT))
    np.testing.assert_array_equal(direct.labels_at_depth(1), tree.labels_at_depth(1))
    cut = DiffCut(tau=0.5).fit_predict(features[1])
    assert split_hierarchy(cut).labels_at_depth(99).max() + 1 == cut.n_segments
    with pytest.raises(ValueError, match="no split tree"):
        split_hierarchy(DiffSegGrouper(grid=4).fit_predict(maps))


# -- DiffCut's features on Stable Diffusion -------------------------------------------------
def test_diffcut_layer_is_the_encoders(tiny_sd):
    layer = tiny_sd.diffcut_layer()
    n_down = len(tiny_sd.unet.down_blocks)
    assert layer.startswith(f"down_blocks.{n_down - 2}.attentions.") and layer.endswith("attn1")
    assert layer == [n for n in tiny_sd.layer_groups()["encoder"]
                     if n.startswith(f"down_blocks.{n_down - 2}.")][-1]
    kw = tiny_sd.diffcut_capture_kwargs(64)
    assert kw == {"layers": layer, "mode": "noised", "t": 50, "seed": 42, "features": True,
                  "size": 64}


def test_diffcut_reads_the_encoder_layer_at_t50(tiny_sd, image):
    layer = tiny_sd.diffcut_layer()
    rows = compare_methods([image], tiny_sd, {"ours": WalkAndCut(), "DiffCut": DiffCut(tau=0.5)},
                           capture_kwargs={**TINY, "size": 128}, progress=False, device="cpu")
    got = rows[0]["DiffCut"]
    grid = tiny_sd.layers(128)[layer]["grid"]
    assert got.token_labels.shape == tuple(grid)
    # the same labels as DiffCut's recipe on that layer's output at t = 50
    cap = tiny_sd.capture(image, **tiny_sd.diffcut_capture_kwargs(128), progress=False)
    assert cap.meta["timestep"] == 50 and cap.meta["mode"] == "noised"
    X = cap.layers[layer].features                                  # (C, h, w)
    assert X.shape[1:] == tuple(grid)
    ref = diffcut_segment(X.float().reshape(X.shape[0], -1).T, tau=0.5)
    np.testing.assert_array_equal(got.token_labels.ravel(), ref.labels)
    # one capture time for the row, attention and DiffCut's pass together
    assert len({r.timings["capture"] for r in rows[0].values()}) == 1
    # paper 1's decoder capture alone has no DiffCut layer: a clear error, not a wrong layer
    dec = tiny_sd.capture(image, size=64, features=True, progress=False)
    assert dec.meta["diffcut_layer"] == layer
    with pytest.raises(GraphError, match="diffcut_capture_kwargs"):
        DiffCut().fit_predict(dec)
    # an explicit layer still works
    assert DiffCut(layer=list(dec.layers)[-1], tau=0.5).fit_predict(dec).n_segments >= 1


def test_diffseg_reads_its_own_pass_on_stable_diffusion(tiny_sd, image):
    """DiffSeg's code reads all 16 self-attention layers of one clean-latent pass at t = 300;
    capture="shared" gives it paper 1's capture instead."""
    from segbook.pipelines.groupers import DIFFSEG_CAPTURE

    groupers = {"own": DiffSegGrouper(grid=4), "shared": DiffSegGrouper(grid=4, capture="shared")}
    kwargs = {"size": 64, "num_inference_steps": 10, "inversion_steps": 2}
    row = compare_methods([image], tiny_sd, groupers, capture_kwargs=kwargs, progress=False,
                          device="cpu")[0]
    own = tiny_sd.capture(image, **DIFFSEG_CAPTURE, size=64, progress=False)
    assert own.meta["mode"] == "clean" and own.meta["timestep"] == 300
    assert len(own.layers) == len(tiny_sd.layer_groups()["all"])
    ref = DiffSegGrouper(grid=4).fit_predict(own, out_size=image.shape[:2])
    np.testing.assert_array_equal(row["own"].labels, ref.labels)
    paper1 = tiny_sd.capture(image, **kwargs, progress=False)
    ref_shared = DiffSegGrouper(grid=4).fit_predict(paper1, out_size=image.shape[:2])
    np.testing.assert_array_equal(row["shared"].labels, ref_shared.labels)
    assert row["own"].config["capture"] == "own"
    with pytest.raises(ValueError, match="capture must be 'own' or 'shared'"):
        DiffSegGrouper(capture="mine")
