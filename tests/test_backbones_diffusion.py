"""tiny-sd: shapes, row sums, Q/K/V that reproduce the layer, DDIM round trip, loaders, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from segbook.backbones import load_backbone
from segbook.backbones.capture import CaptureOptions, attention_probabilities
from segbook.backbones.diffusion import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_VOCAB_SIZE,
    SD14_HUB_ID,
    SD_WEIGHT_FILES,
    StableDiffusionBackbone,
    build_tiny_sd_components,
    load_stable_diffusion,
    sd14_layer_table,
    sd14_memory_table,
)
from segbook.errors import MissingWeightsError

SIZE = 128  # latent 16 x 16: attention grids 16, 8, 4 and 2 (SD 1.4's 64..8 divided by 4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd():
    return load_backbone("tiny-sd", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:112]
    img = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1)
    img[20:60, 30:80] = [200, 40, 40]
    img = img + rng.integers(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_layer_table_has_sd14_structure(sd):
    table = sd.layers(SIZE)
    attn = [n for n, i in table.items() if i["kind"] == "self_attention"]
    assert len(attn) == 16 and all(n.endswith("attn1") for n in attn)
    sides = {}
    for n in attn:
        sides.setdefault(table[n]["grid"][0], []).append(n)
    assert {s: len(v) for s, v in sides.items()} == {16: 5, 8: 5, 4: 5, 2: 1}
    assert sides[2] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    decoder = sd.layer_groups()["decoder"]
    assert len(decoder) == 10 and all(n.startswith(("up_blocks", "mid_block")) for n in decoder)
    # the real SD 1.4, built on the meta device: the same structure at 64/32/16/8 with 8 heads
    real = sd14_layer_table(512)
    real_attn = {n: i for n, i in real.items() if i["kind"] == "self_attention"}
    assert list(real_attn) == attn
    assert sorted(i["grid"][0] for i in real_attn.values()) == [8] + [16] * 5 + [32] * 5 + [64] * 5
    assert {i["heads"] for i in real_attn.values()} == {8}


def test_capture_shapes_and_row_sums(sd, image):
    cap = sd.capture(image, layers="all", size=SIZE, dtype=torch.float32)
    assert len(cap) == 16 and cap.image_size == (96, 112)
    assert cap.meta["mode"] == "clean" and cap.meta["timestep"] == 300
    for layer in cap:
        n = layer.grid[0] * layer.grid[1]
        assert layer.attn.shape == (n, n) and layer.attn.dtype == torch.float32
        assert layer.attn.min() >= 0
        torch.testing.assert_close(layer.attn.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
        assert layer.q is None and layer.features is None and layer.heads == 2
    groups = cap.attention_by_resolution()
    assert {r: len(v) for r, v in groups.items()} == {16: 5, 8: 5, 4: 5, 2: 1}
    # the default: decoder only, float16, rows still sum to 1 up to float16 rounding
    default = sd.capture(image, size=SIZE)
    assert len(default) == 10 and all(layer.attn.dtype == torch.float16 for layer in default)
    for layer in default:
        assert (layer.attn.float().sum(-1) - 1).abs().max() < 5e-3


def test_probabilities_equal_manual_softmax_and_rebuild_the_layer(sd, image):
    name = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
    cap = sd.capture(image, layers=name, size=SIZE, heads="none", logits=True, qkv=True,
                     features=True, dtype=torch.float32)
    layer = cap[name]
    heads, n, d = layer.q.shape
    assert (heads, n) == (2, 256) and layer.attn.shape == (2, 256, 256)
    manual_logits = layer.q @ layer.k.transpose(-1, -2) / d ** 0.5
    torch.testing.assert_close(layer.logits, manual_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.attn, manual_logits.softmax(-1), atol=1e-6, rtol=1e-5)
    # Q, K, V are the ones the model used: they rebuild the layer's own output
    module = sd.unet.get_submodule(name)
    mixed = (layer.attn @ layer.v).transpose(0, 1).reshape(n, heads * d)
    rebuilt = module.to_out[0](mixed)
    got = layer.features.reshape(layer.features.shape[0], n).T
    assert ((rebuilt - got).norm() / got.norm()).item() < 1e-5
    # head reductions agree with the kept heads
    mean = sd.capture(image, layers=name, size=SIZE, dtype=torch.float32)[name].attn
    summed = sd.capture(image, layers=name, size=SIZE, heads="sum", dtype=torch.float32)[name].attn
    torch.testing.assert_close(mean, layer.attn.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(summed, layer.attn.sum(0), atol=1e-6, rtol=1e-5)


def test_selection_by_resolution_kind_and_name(sd, image):
    cap = sd.capture(image, layers="all", resolution=8, size=SIZE)
    assert len(cap) == 5 and all(layer.grid == (8, 8) for layer in cap)
    blocks = sd.capture(image, kind="features", layers="blocks", size=SIZE)
    expected = sd.layers(SIZE)
    for layer in blocks:
        assert layer.kind == "features" and layer.attn is None
        assert layer.features.shape[1:] == expected[layer.name]["grid"]
        assert layer.features.shape[0] == expected[layer.name]["channels"]
    prefix = sd.capture(image, layers="up_blocks.2.", size=SIZE)
    assert [layer.name.split(".attentions")[0] for layer in prefix] == ["up_blocks.2"] * 3
    exact = sd.capture(image, layers="up_blocks.2", size=SIZE)  # the block's output
    assert list(exact.layers) == ["up_blocks.2"] and exact["up_blocks.2"].kind == "features"
    assert exact["up_blocks.2"].features is not None  # features-kind layers always keep them
    with pytest.raises(ValueError, match="unknown layer"):
        sd.capture(image, layers="up_blocks.9", size=SIZE)
    with pytest.raises(ValueError, match="kind"):
        sd.capture(image, kind="cross_attention", size=SIZE)


def test_modes_timesteps_and_processors_restored(sd, image):
    before = {k: type(v) for k, v in sd.unet.attn_processors.items()}
    noised = sd.capture(image, layers="mid", mode="noised", seed=3, size=SIZE)
    again = sd.capture(image, layers="mid", mode="noised", seed=3, size=SIZE)
    assert 0 <= noised.meta["timestep"] <= 250
    assert noised.meta["timestep"] == again.meta["timestep"]
    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    torch.testing.assert_close(noised[name].attn, again[name].attn)
    clean = sd.capture(image, layers="mid", mode="clean", t=noised.meta["timestep"], size=SIZE)
    assert not torch.allclose(clean[name].attn, noised[name].attn)
    inverted = sd.capture(image, layers="mid", mode="inverted", size=SIZE, progress=False)
    assert inverted.meta["inversion_timesteps"] == list(range(1, 182, 20))
    assert inverted.meta["timestep"] == 181
    assert {k: type(v) for k, v in sd.unet.attn_processors.items()} == before


def test_ddim_inversion_then_sampling_returns_the_latent(sd, image):
    """10 of 50 steps, as paper 1: the round trip error is < 2 % of the latent's norm, while the
    inversion itself moved the latent by > 10 %."""
    z0 = sd.encode(image, SIZE)
    zt, steps = sd.invert(z0, num_inference_steps=50, num_steps=10, progress=False)
    assert steps[-1] == 181
    moved = ((zt - z0).norm() / z0.norm()).item()
    back = sd.sample(zt, steps[::-1], progress=False)
    error = ((back - z0).norm() / z0.norm()).item()
    assert moved > 0.1
    assert error < 0.02


def test_inputs_accepted_and_rejected(sd, image):
    from PIL import Image

    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    ref = sd.capture(image, layers=name, size=SIZE, dtype=torch.float32)[name].attn
    for other in (Image.fromarray(image), torch.from_numpy(image),
                  torch.from_numpy(image).permute(2, 0, 1).float() / 255):
        got = sd.capture(other, layers=name, size=SIZE, dtype=torch.float32)[name].attn
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    bad_nan = image.astype(np.float32) / 255
    bad_nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sd.capture(bad_nan, size=SIZE)
    with pytest.raises(ValueError, match="3 dimensions"):
        sd.capture(image[..., 0], size=SIZE)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sd.capture(image.astype(np.float32), size=SIZE)
    with pytest.raises(TypeError):
        sd.capture([[1, 2, 3]], size=SIZE)
    with pytest.raises(ValueError, match="multiple of 64"):
        sd.capture(image, size=100)
    with pytest.raises(ValueError, match="mode"):
        sd.capture(image, mode="noisy", size=SIZE)
    with pytest.raises(ValueError, match="t=None"):
        sd.capture(image, mode="inverted", t=100, size=SIZE)
    with pytest.raises(ValueError, match="timestep"):
        sd.capture(image, mode="clean", t=1000, size=SIZE)
    with pytest.raises(TypeError, match="unknown capture option"):
        sd.capture(image, size=SIZE, head="none")
    with pytest.raises(ValueError, match="heads"):
        CaptureOptions(heads="max")


def test_local_repository_loads_through_the_resolver(tmp_path, monkeypatch, sd, image):
    """The sd14 code path (resolver + from_pretrained) on a tiny repository saved offline."""
    unet, vae, text_encoder, scheduler = build_tiny_sd_components(seed=0)
    repo = tmp_path / "weights" / "local" / "tiny-sd"
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                         ("scheduler", scheduler)):
        module.save_pretrained(repo / part)
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors",
             "scheduler/scheduler_config.json"]
    loaded = load_stable_diffusion("local/tiny-sd", name="tiny-sd-local", device="cpu",
                                   image_size=SIZE, files=files)
    assert loaded.pretrained and len(loaded.fingerprint) == 16
    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    a = loaded.capture(image, layers=name, dtype=torch.float32)[name].attn
    b = sd.capture(image, layers=name, size=SIZE, dtype=torch.float32)[name].attn
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a repository with a file missing is reported, naming the id
    (repo / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as info:
        load_stable_diffusion("local/tiny-sd", device="cpu", files=files)
    assert info.value.model_id == "local/tiny-sd"


def test_default_files_do_not_need_a_tokenizer(tmp_path, monkeypatch):
    """SD_WEIGHT_FILES (what load_backbone("sd14") checks) asks for what the loader reads:
    a repository without tokenizer/ loads, and one without a weight file names the file."""
    unet, vae, text_encoder, scheduler = build_tiny_sd_components(seed=0)
    repo = tmp_path / "weights" / "local" / "tiny-sd"
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                         ("scheduler", scheduler)):
        module.save_pretrained(repo / part)
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert not any(f.startswith("tokenizer/") for f in SD_WEIGHT_FILES)
    loaded = load_stable_diffusion("local/tiny-sd", device="cpu", image_size=SIZE)
    assert loaded.tokenizer is None
    assert loaded.empty_prompt_embedding().shape == (1, 77, 32)
    (repo / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as info:
        load_stable_diffusion("local/tiny-sd", device="cpu")
    assert "text_encoder/model.safetensors" in str(info.value)
    assert "tokenizer" not in str(info.value)


def test_empty_prompt_without_tokenizer_uses_clips_ids():
    """SD 1.4's text-encoder config says bos 0 / eos 2; CLIP's tokenizer emits 49406 and
    49407 (padding with 49407). Without a tokenizer the loader must build CLIP's ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
        pad_token_id=1)).eval()
    unet, vae, _, scheduler = build_tiny_sd_components(seed=0)
    backbone = StableDiffusionBackbone("clip-vocab", unet, vae, encoder, scheduler, None,
                                       device=torch.device("cpu"), dtype=torch.float32,
                                       pretrained=False, fingerprint="0", image_size=SIZE)
    ids = torch.full((1, 77), CLIP_EOS_ID)
    ids[0, 0] = CLIP_BOS_ID
    with torch.no_grad():
        expected = encoder(ids)[0]
    torch.testing.assert_close(backbone.empty_prompt_embedding(), expected)


def test_sd14_memory_table_matches_the_formula():
    rows = {(r["layers"], r["heads"], r["dtype"]): r["bytes"] for r in sd14_memory_table()}
    n2 = 5 * 4096 ** 2 + 5 * 1024 ** 2 + 5 * 256 ** 2 + 64 ** 2          # all 16 layers
    n2_decoder = 3 * 4096 ** 2 + 3 * 1024 ** 2 + 3 * 256 ** 2 + 64 ** 2  # mid + up
    assert rows[("all", "reduced", "float16")] == 2 * n2
    assert rows[("all", "kept", "float32")] == 4 * 8 * n2
    assert rows[("decoder", "reduced", "float16")] == 2 * n2_decoder
    assert rows[("decoder", "kept", "float16")] == 2 * 8 * n2_decoder
    assert rows[("all", "kept", "float32")] / 2 ** 30 == pytest.approx(2.666, abs=1e-3)


def test_sd14_without_weights_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as info:
        load_backbone("sd14", device="cpu")
    assert info.value.model_id == SD14_HUB_ID
    assert SD14_HUB_ID in str(info.value)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_attention_probabilities_helper():
    q = torch.randn(3, 5, 4)
    k = torch.randn(3, 5, 4)
    probs, logits = attention_probabilities(q, k)
    torch.testing.assert_close(probs, torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1))
    torch.testing.assert_close(logits, q @ k.transpose(-1, -2) / 2.0)


def test_memory_estimate_equals_what_a_capture_stores(sd, image):
    for opts in ({}, {"heads": "none", "logits": True, "qkv": True, "features": True},
                 {"dtype": torch.float32, "qkv": True}):
        cap = sd.capture(image, layers="all", size=SIZE, **opts)
        stored = sum(t.numel() * t.element_size() for layer in cap
                     for t in layer.tensors().values())
        assert sd.memory_estimate(layers="all", size=SIZE, **opts) == stored


def test_head_chunks_do_not_change_the_result():
    from segbook.backbones.capture import record_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 36, 8, generator=gen) for _ in range(3))
    for heads in ("mean", "sum", "none"):
        one = record_attention("x", (6, 6), q, k, v, CaptureOptions(heads=heads, logits=True,
                                                                    dtype=torch.float32))
        three = record_attention("x", (6, 6), q, k, v,
                                 CaptureOptions(heads=heads, logits=True, dtype=torch.float32,
                                                head_chunk=3))
        torch.testing.assert_close(one.attn, three.attn)
        torch.testing.assert_close(one.logits, three.logits)


# -- Table 7 (paper 1, supplement): "step s" -> timestep -------------------------------------
def test_table7_timestep_mapping():
    from segbook.backbones.diffusion import table7_capture_kwargs, table7_timestep
    assert table7_timestep(40) == 181          # paper 1's setting: 10 of 50 inversion steps
    assert [table7_timestep(s) for s in (0, 1, 25, 49)] == [981, 961, 481, 1]
    assert all(table7_timestep(s) == 981 - 20 * s for s in range(50))
    assert table7_timestep(5, num_inference_steps=10) == 401     # 901, 801, ..., 1
    assert table7_capture_kwargs(40) == {"mode": "inverted", "inversion_steps": 10,
                                         "num_inference_steps": 50}
    assert table7_capture_kwargs(30, inversion=False) == {"mode": "clean", "t": 381}
    for bad in (-1, 50, 2.5, True):
        with pytest.raises(ValueError, match="step"):
            table7_timestep(bad)
    with pytest.raises(ValueError, match="step 0"):
        table7_capture_kwargs(0)


def test_table7_inverted_capture_lands_on_the_mapped_timestep():
    from segbook.backbones import load_backbone
    from segbook.backbones.diffusion import table7_capture_kwargs, table7_timestep
    bb = load_backbone("tiny-sd", device="cpu")
    img = np.zeros((32, 32, 3), np.uint8)
    for step, inverted in [(8, True), (6, False)]:
        kw = {**table7_capture_kwargs(step, inverted, num_inference_steps=10), "size": 64}
        cap = bb.capture(img, layers="mid", progress=False, **kw)
        assert cap.meta["timestep"] == table7_timestep(step, num_inference_steps=10)
