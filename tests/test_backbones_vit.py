"""tiny-vit (DINOv3 class: RoPE, CLS + 4 registers): shapes, row sums, Q/K/V, tokens, sizes, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segbook.backbones import load_backbone
from segbook.backbones.vit import VIT_SPECS, ViTSpec, load_vit
from segbook.errors import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vit():
    return load_backbone("tiny-vit", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (75, 100, 3)).astype(np.uint8)
    img[10:40, 20:70] = [30, 200, 90]
    return img


def _attention_output_hook(module, store):
    return module.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out.detach()))


def test_shapes_rows_and_tokens(vit, image):
    assert vit.num_prefix_tokens == 5 and vit.patch_size == 16
    cap = vit.capture(image, dtype=torch.float32)  # longest side 128 -> 96 x 128 -> 6 x 8
    assert cap.meta["model_input_size"] == (96, 128) and cap.image_size == (75, 100)
    assert list(cap.layers) == ["blocks.0", "blocks.1", "blocks.2"]
    for layer in cap:
        assert layer.grid == (6, 8) and layer.attn.shape == (48, 48)
        assert layer.prefix_tokens == 0 and layer.heads == 2
        torch.testing.assert_close(layer.attn.sum(-1), torch.ones(48), atol=1e-5, rtol=0)
    half = vit.capture(image)
    assert all(layer.attn.dtype == torch.float16 for layer in half)


def test_probabilities_equal_manual_softmax_and_rebuild_the_layer(vit, image):
    store = {}
    attn_module = vit.model.blocks[1].attn
    handle = _attention_output_hook(attn_module, store)
    try:
        cap = vit.capture(image, layers="blocks.1", prefix="keep", heads="none", logits=True,
                          qkv=True, dtype=torch.float32)
    finally:
        handle.remove()
    layer = cap["blocks.1"]
    heads, tokens, d = layer.q.shape
    assert (heads, tokens) == (2, 5 + 48) and layer.prefix_tokens == 5
    manual = layer.q @ layer.k.transpose(-1, -2) / d ** 0.5
    torch.testing.assert_close(layer.logits, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.attn, manual.softmax(-1), atol=1e-6, rtol=1e-5)
    # the captured Q, K (with RoPE) and V rebuild what the attention module returned
    mixed = (layer.attn @ layer.v).transpose(0, 1).reshape(tokens, heads * d)
    rebuilt = attn_module.proj(attn_module.norm(mixed))
    out = store["out"][0]
    # relative error ~1e-7; leaving out the rotary embedding would give ~1e-2
    assert ((rebuilt - out).norm() / out.norm()).item() < 1e-5


def test_dropping_prefix_tokens_renormalises_the_patch_block(vit, image):
    keep = vit.capture(image, layers="last", prefix="keep", heads="none", dtype=torch.float32)
    drop = vit.capture(image, layers="last", heads="none", dtype=torch.float32, qkv=True)
    full = keep["blocks.2"].attn[:, 5:, 5:]
    torch.testing.assert_close(drop["blocks.2"].attn, full / full.sum(-1, keepdim=True),
                               atol=1e-6, rtol=1e-5)
    assert drop["blocks.2"].q.shape == (2, 48, 16)


def test_features_and_early_stop(vit, image):
    cap = vit.capture(image, layers=["blocks.0", "norm"], features=True, dtype=torch.float32)
    x = vit.preprocess(image)
    with torch.no_grad():
        final = vit.model.forward_features(x)[0, 5:]
    torch.testing.assert_close(cap["norm"].features, final.T.reshape(32, 6, 8))
    assert cap["norm"].kind == "features" and cap["norm"].attn is None
    assert cap["blocks.0"].features.shape == (32, 6, 8)
    only_first = vit.capture(image, layers="blocks.0", dtype=torch.float32)
    torch.testing.assert_close(only_first["blocks.0"].attn, cap["blocks.0"].attn)
    by_kind = vit.capture(image, layers=["all", "norm"], kind="features")
    assert list(by_kind.layers) == ["norm"]
    with pytest.raises(ValueError, match="unknown layer"):
        vit.capture(image, layers="blocks.7")


def test_input_size_rules(vit):
    assert vit.input_size(480, 640, 640, "longest") == (480, 640)
    assert vit.input_size(375, 500, 448, "shortest") == (448, 592)   # 597.3 -> 37 patches
    assert vit.input_size(375, 500, 224, "exact") == (224, 224)
    assert vit.input_size(375, 500, (100, 60)) == (96, 64)
    assert VIT_SPECS["dinov3-vitl16"].resize == "longest" and VIT_SPECS["dinov3-vitl16"].size == 640
    assert VIT_SPECS["dino-vits16"].resize == "shortest" and VIT_SPECS["dino-vits16"].size == 448
    assert VIT_SPECS["mae-vitb16"].resize == "exact" and VIT_SPECS["mae-vitb16"].size == 224
    with pytest.raises(ValueError, match="resize"):
        vit.input_size(10, 10, 64, "middle")


def test_learned_position_embedding_interpolates(image):
    """A timm VisionTransformer (DINO/CLIP/MAE class) trained at 224 runs at 448-short-side grids."""
    spec = ViTSpec("vit_small_patch16_224", None, "shortest", 448,
                   model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    small = load_vit("tiny-learned-pos", spec=spec)
    assert small.num_prefix_tokens == 1
    cap = small.capture(image, dtype=torch.float32)  # 448 x 597 -> 448 x 592 -> 28 x 37
    layer = cap["blocks.0"]
    assert layer.grid == (28, 37) and layer.attn.shape == (28 * 37, 28 * 37)
    torch.testing.assert_close(layer.attn.sum(-1), torch.ones(28 * 37), atol=1e-5, rtol=0)


def test_weights_load_offline_from_segbook_weights(tmp_path, monkeypatch, vit, image):
    from safetensors.torch import save_file

    repo = tmp_path / "local" / "tiny-vit"
    repo.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in vit.model.state_dict().items()}
    save_file(state, str(repo / "model.safetensors"))
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ViTSpec("vit_small_patch16_dinov3", "local/tiny-vit", "longest", 128,
                   model_kwargs=VIT_SPECS["tiny-vit"].model_kwargs)
    loaded = load_vit("tiny-vit-local", spec=spec, seed=123)
    assert loaded.pretrained
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    a = loaded.capture(image, dtype=torch.float32)["blocks.2"].attn
    b = vit.capture(image, dtype=torch.float32)["blocks.2"].attn
    torch.testing.assert_close(a, b)


def test_missing_vit_weights_name_the_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as info:
        load_backbone("dinov3-vitl16", device="cpu")
    assert info.value.model_id == "timm/vit_large_patch16_dinov3.lvd1689m"
    assert "timm/vit_large_patch16_dinov3.lvd1689m" in str(info.value)


def test_tiny_vit_is_deterministic(vit):
    again = load_backbone("tiny-vit", device="cpu")
    assert again.fingerprint == vit.fingerprint and not again.pretrained
    other = load_vit("tiny-vit", seed=1)
    assert other.fingerprint != vit.fingerprint
