"""The registry: every name from issue 4 is there and really loads or says what is missing."""

from __future__ import annotations

import importlib

import pytest

from segbook.backbones import available_backbones, load_backbone
from segbook.backbones.base import Backbone
from segbook.errors import MissingWeightsError

PRETRAINED = {
    "sd14": "CompVis/stable-diffusion-v1-4",
    "dinov3-vits16": "timm/vit_small_patch16_dinov3.lvd1689m",
    "dinov3-vitb16": "timm/vit_base_patch16_dinov3.lvd1689m",
    "dinov3-vitl16": "timm/vit_large_patch16_dinov3.lvd1689m",
    "dino-vits16": "timm/vit_small_patch16_224.dino",
    "clip-vitb16": "timm/vit_base_patch16_clip_224.openai",
    "mae-vitb16": "timm/vit_base_patch16_224.mae",
}
MINIATURES = {"tiny-sd": "diffusion", "tiny-vit": "vit", "tiny-clip": "vit", "tiny-mae": "vit"}


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty $SEGBOOK_WEIGHTS, an empty hub cache and no network."""
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_every_name_is_registered_with_a_real_loader():
    entries = available_backbones()
    for name in list(PRETRAINED) + list(MINIATURES):
        assert name in entries, name
        module_name, func_name = entries[name].loader.split(":")
        assert callable(getattr(importlib.import_module(module_name), func_name))
    for name, hub_id in PRETRAINED.items():
        assert entries[name].hub_id == hub_id and entries[name].pretrained
    for name, family in MINIATURES.items():
        assert entries[name].family == family and not entries[name].pretrained


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_missing_weights_raise_naming_the_id(no_weights, name):
    with pytest.raises(MissingWeightsError) as info:
        load_backbone(name, device="cpu")
    assert info.value.model_id == PRETRAINED[name]
    message = str(info.value)
    assert PRETRAINED[name] in message and "SEGBOOK_WEIGHTS" in message


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_miniatures_load_without_weights(no_weights, name):
    backbone = load_backbone(name, device="cpu")
    assert isinstance(backbone, Backbone)
    assert backbone.name == name and backbone.family == MINIATURES[name]
    assert not backbone.pretrained and len(backbone.fingerprint) == 16
    assert any(info["kind"] == "self_attention" for info in backbone.layers().values())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="tiny-sd"):
        load_backbone("sd15")


def test_capture_select_matches_whole_dotted_names():
    import torch

    from segbook.backbones.base import Capture, LayerCapture

    cap = Capture("x", (8, 8))
    for name, grid in [("blocks.1", (4, 4)), ("blocks.10", (2, 2)), ("up.0.attn1", (4, 4))]:
        cap.layers[name] = LayerCapture(name, "self_attention", grid, attn=torch.eye(grid[0] ** 2))
    assert [l.name for l in cap.select(["blocks.1"])] == ["blocks.1"]
    assert [l.name for l in cap.select(["up.0"])] == ["up.0.attn1"]
    assert [l.name for l in cap.select(resolution=4)] == ["blocks.1", "up.0.attn1"]
    assert sorted(cap.attention_by_resolution()) == [2, 4]


def test_capture_feature_layers_picks_and_explains():
    import torch

    from segbook.backbones.base import Capture, LayerCapture
    from segbook.errors import GraphError

    cap = Capture("x", (32, 32), {
        "a": LayerCapture("a", "self", (4, 4), attn=torch.eye(16)),
        "b": LayerCapture("b", "block", (4, 4), features=torch.zeros(8, 4, 4)),
        "c": LayerCapture("c", "block", (2, 2), features=torch.zeros(8, 2, 2)),
    })
    assert [lc.name for lc in cap.feature_layers()] == ["b", "c"]
    assert [lc.name for lc in cap.feature_layers("CAFE", "b")] == ["b"]
    with pytest.raises(GraphError, match=r"no features for layer 'a'; captured: \['b', 'c'\]"):
        cap.feature_layers("CAFE", "a")
    empty = Capture("x", (32, 32), {"a": cap["a"]})
    with pytest.raises(GraphError, match="CAFE needs features"):
        empty.feature_layers("CAFE")
