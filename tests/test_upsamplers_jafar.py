"""JAFAR and SAUCE: official key layout, lazy path = reference, half precision, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from segbook.errors import CorruptFileError, MissingWeightsError
from segbook.upsamplers import JAFAR, SAUCE, UpsamplerInputError, WidthMismatchError, load_upsampler
from segbook.upsamplers.jafar import DEAD_KEYS, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QK, V, HEADS = 32, 24, 4


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _official_layout(model: JAFAR, seed=1) -> dict:
    """The state dict JAFAR's own code would save for these weights: its module names, the
    attention as nn.MultiheadAttention's separate q/k/v projections (v_dim != d_qk), and the
    dead parameters (value/output projections, RMSNorm of the values) filled with noise."""
    g = torch.Generator().manual_seed(seed)
    A = "cross_decode.cross_attn."
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("cross_decode.") and not k.startswith("cross_decode.conv2d"):
            continue
        out[k] = v.clone()
    cd = model.cross_decode
    out[A + "norm_q.weight"] = cd.norm_q.weight.detach().clone()
    out[A + "norm_k.weight"] = cd.norm_k.weight.detach().clone()
    out[A + "norm_v.weight"] = torch.randn(V, generator=g)
    out[A + "attention.q_proj_weight"] = cd.q_proj.weight.detach().clone()
    out[A + "attention.k_proj_weight"] = cd.k_proj.weight.detach().clone()
    out[A + "attention.v_proj_weight"] = torch.randn(QK, V, generator=g)
    out[A + "attention.in_proj_bias"] = torch.cat([cd.q_proj.bias.detach(), cd.k_proj.bias.detach(),
                                                   torch.randn(QK, generator=g)])
    out[A + "attention.out_proj.weight"] = torch.randn(QK, QK, generator=g)
    out[A + "attention.out_proj.bias"] = torch.randn(QK, generator=g)
    return out


def _official_attention(state, q_tokens, k_tokens, values):
    """JAFAR's attention as its code computes it: RMSNorm then torch's nn.MultiheadAttention with
    need_weights / average_attn_weights, the weights applied to the raw values."""
    A = "cross_decode.cross_attn."
    mha = torch.nn.MultiheadAttention(QK, HEADS, vdim=V, batch_first=True)
    mha.load_state_dict({k[len(A + "attention."):]: v for k, v in state.items()
                         if k.startswith(A + "attention.")})
    nq = torch.nn.RMSNorm(QK)
    nk = torch.nn.RMSNorm(QK)
    nv = torch.nn.RMSNorm(V)
    nq.weight.data.copy_(state[A + "norm_q.weight"])
    nk.weight.data.copy_(state[A + "norm_k.weight"])
    nv.weight.data.copy_(state[A + "norm_v.weight"])
    _, weights = mha(nq(q_tokens), nk(k_tokens), nv(values), need_weights=True,
                     average_attn_weights=True)
    return weights @ values, weights


def test_official_checkpoint_loads_and_matches_torch_multihead_attention(tmp_path):
    torch.manual_seed(0)
    source = _perturbed(JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS))
    state = _official_layout(source)
    path = tmp_path / "official.pth"
    torch.save({"jafar": state, "optimizer_jafar": {}, "step": 3}, path)

    model = JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS)
    ignored = model.load_official(load_checkpoint(path))
    assert set(DEAD_KEYS) <= set(ignored)
    assert any(k.endswith("in_proj_bias[2d:]") for k in ignored)
    # the live parameters: JAFAR's count minus v_proj, out_proj and norm_v
    dead = QK * V + QK * QK + QK + V + QK
    assert model.num_live_parameters() == sum(v.numel() for v in state.values()) - dead

    image, lowres = torch.rand(3, 32, 48), torch.randn(V, 4, 6)
    H, W = 32, 48
    with torch.no_grad():
        # everything up to the attention from segbook's modules, the attention from torch's MHA
        E = model.rope(model.image_encoder(model._normalise(image[None])))
        q = F.group_norm(F.adaptive_avg_pool2d(model.query_encoder(E), (H, W)), 8)
        q = model.cross_decode.conv2d(q).flatten(2).transpose(1, 2)
        keys = F.adaptive_avg_pool2d(model.key_encoder(E), (4, 6))
        k = model.sft_key(keys, model.key_features_encoder(F.normalize(lowres[None], dim=1)))
        expected, weights = _official_attention(state, q, k.flatten(2).transpose(1, 2),
                                                lowres[None].flatten(2).transpose(1, 2))
    expected = expected[0].T.reshape(V, H, W)
    ref_out, ref_A = model.reference(image, lowres, (H, W))
    up = model(image, lowres, (H, W))
    assert torch.allclose(ref_out, expected, atol=1e-5)
    assert torch.allclose(ref_A, weights[0], atol=1e-6)
    assert torch.allclose(up.features, expected, atol=1e-5)
    assert torch.allclose(up.attention.dense(), weights[0], atol=1e-6)


def test_lazy_path_equals_the_materialising_reference_in_small_chunks(monkeypatch):
    import segbook.upsamplers.jafar as jafar_module

    monkeypatch.setattr(jafar_module, "_SMALL_BYTES", 0)   # the in-place path even for tiny maps
    monkeypatch.setattr(jafar_module, "_ENCODER_CHUNK_PIXELS", 100)   # several encoder chunks
    torch.manual_seed(1)
    model = _perturbed(JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS), seed=2)
    model.chunk_elements = HEADS * 12 * 2 * 7   # 7 query rows (under one image row) per chunk
    image, lowres = torch.rand(3, 30, 40), torch.randn(V, 3, 4)
    for size in [(30, 40), (15, 20), (45, 60)]:
        ref_out, ref_A = model.reference(image, lowres, size)
        up = model(image, lowres, size)
        assert up.features.shape == (V, *size)
        assert torch.allclose(up.features, ref_out, atol=1e-5)
        A = up.attention
        assert A.shape == (size[0] * size[1], 12)
        assert torch.allclose(A.dense(), ref_A, atol=1e-6)
        assert torch.allclose(A.rows([0, 5, A.shape[0] - 1]), ref_A[[0, 5, -1]], atol=1e-6)
        picked = ref_A.gather(1, A.argmax().reshape(-1, 1))[:, 0]
        assert torch.allclose(picked, ref_A.max(1).values, atol=1e-6)   # ties may pick either
        G = torch.randn(12, 3)
        assert torch.allclose(A @ G, ref_A @ G, atol=1e-5)
        assert torch.allclose(A.dense().sum(1), torch.ones(A.shape[0]), atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("image_size, out_size, grid", [((37, 53), (37, 53), (5, 7)),
                                                         ((30, 40), (45, 60), (3, 4)),
                                                         ((45, 60), (30, 40), (3, 4))])
def test_streamed_large_path_recomputes_queries_and_equals_the_reference(
        image_size, out_size, grid, kernel_size, monkeypatch):
    """The large-image path holds no query map: every GroupNorm's statistics are made once in
    chunked passes, the keys pooled band by band, and each chunk's queries recomputed from the
    image (pooling windows, the 3x3 conv's halo rows). Odd sizes, bands of a few rows, chunks
    under one row and rows asked for out of order must all give the reference."""
    import segbook.upsamplers.jafar as jafar_module

    monkeypatch.setattr(jafar_module, "_SMALL_BYTES", 0)
    monkeypatch.setattr(jafar_module, "_ENCODER_CHUNK_PIXELS", 3 * image_size[1] + 5)
    torch.manual_seed(6)
    model = _perturbed(JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS, kernel_size=kernel_size), seed=7)
    n_keys = grid[0] * grid[1]
    model.chunk_elements = HEADS * n_keys * 2 * 11    # 11 query pixels a chunk (one row)
    image, lowres = torch.rand(3, *image_size), torch.randn(V, *grid)
    ref_out, ref_A = model.reference(image, lowres, out_size)
    up = model(image, lowres, out_size)
    assert up.features.shape == (V, *out_size)
    assert (up.features - ref_out).abs().max() <= 1e-5
    A = up.attention
    assert A.shape == (out_size[0] * out_size[1], n_keys)
    assert (A.dense() - ref_A).abs().max() <= 1e-5
    idx = [A.shape[0] - 1, 0, 5, out_size[1] * 7 + 3, out_size[1] - 1, out_size[1]]
    assert (A.rows(idx) - ref_A[idx]).abs().max() <= 1e-5
    assert torch.allclose(A @ torch.eye(n_keys), ref_A, atol=1e-5)
    # the tokens of several rows at once (a chunk larger than a band)
    big = jafar_module.LazyAttention(A._rows_fn, out_size, grid, chunk=out_size[1] * 9 + 4)
    assert (big.dense() - ref_A).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_stays_close(dtype):
    torch.manual_seed(3)
    model = JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS)
    image, lowres = torch.rand(3, 32, 32), torch.randn(V, 4, 4)
    ref, _ = model.reference(image, lowres, (32, 32))
    up = model.upsample(image, lowres, (32, 32), dtype=dtype)
    assert up.features.dtype == dtype and torch.isfinite(up.features.float()).all()
    assert (up.features.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert model.rope.freqs.dtype == torch.float32   # the caller's model is left as it was


def test_sauce_gate_modes_and_convex_outputs():
    torch.manual_seed(4)
    feats = torch.randn(V, 3, 3)
    image = torch.rand(3, 24, 24)
    for gate in ("values_and_keys", "keys_only"):
        model = SAUCE(v_dim=V, qk_dim=QK, num_heads=HEADS, r=2, gate=gate)
        assert model.se.fc1.out_features == V // 2
        s = model.gate(feats[None])[0]
        assert s.shape == (V,) and ((s > 0) & (s < 1)).all()
        out, A = model.reference(image, feats, (24, 24))
        values = feats * s[:, None, None] if gate == "values_and_keys" else feats
        assert torch.allclose(out, (A @ values.flatten(1).T).T.reshape(V, 24, 24), atol=1e-5)
        up = model(image, feats, (24, 24))
        assert torch.allclose(up.features, out, atol=1e-5)
    with pytest.raises(ValueError, match="gate"):
        SAUCE(v_dim=V, gate="nowhere")


def test_sauce_starts_from_official_jafar_weights():
    jafar = _perturbed(JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS), seed=5)
    sauce = SAUCE(v_dim=V, qk_dim=QK, num_heads=HEADS)
    ignored = sauce.load_jafar(_official_layout(jafar))
    assert set(DEAD_KEYS) <= set(ignored)
    for k, v in jafar.state_dict().items():
        assert torch.equal(sauce.state_dict()[k], v)


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS)
    image = torch.rand(3, 48, 64)
    with pytest.raises(UpsamplerInputError, match="aspect"):
        model(image, torch.randn(V, 8, 3), (48, 64))          # a transposed/other-crop grid
    with pytest.raises(UpsamplerInputError, match="smaller than the token grid"):
        model(image, torch.randn(V, 6, 8), (3, 4))
    bad = torch.randn(V, 6, 8)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(UpsamplerInputError, match="NaN"):
        model(image, bad, (48, 64))
    with pytest.raises(UpsamplerInputError, match="channel"):
        model(image, torch.randn(V + 1, 6, 8), (48, 64))
    # a checkpoint for another width names both widths
    other = JAFAR(v_dim=2 * V, qk_dim=QK, num_heads=HEADS)
    with pytest.raises(WidthMismatchError, match=rf"{2 * V}.*{V}"):
        model.load_official(other.state_dict())
    # a truncated file
    path = tmp_path / "ckpt.pth"
    torch.save({"jafar": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_checkpoint(path)


def test_load_upsampler_through_the_weights_resolver(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="vit_small_patch16_dinov3.lvd1689m.pth"):
        load_upsampler("jafar", backbone="dinov3-vits16")
    with pytest.raises(MissingWeightsError, match="segbook.upsamplers.train"):
        load_upsampler("sauce", backbone="dinov3-vits16")
    # an official-layout file for ViT-S (384) where the resolver looks
    folder = tmp_path / "PaulCouairon" / "JAFAR"
    folder.mkdir(parents=True)
    official = _official_layout(JAFAR(v_dim=V, qk_dim=QK, num_heads=HEADS))
    torch.save(official, folder / "vit_small_patch16_dinov3.lvd1689m.pth")
    with pytest.raises(WidthMismatchError, match=rf"{V}-channel.*384-channel"):
        load_upsampler("jafar", backbone="dinov3-vits16")
    model = load_upsampler("jafar", backbone="custom", path=folder / "vit_small_patch16_dinov3.lvd1689m.pth")
    assert isinstance(model, JAFAR) and model.v_dim == V and model.qk_dim == QK
    sauce = load_upsampler("sauce", backbone="custom", path=folder / "vit_small_patch16_dinov3.lvd1689m.pth")
    assert isinstance(sauce, SAUCE)


def test_rope_is_learned_and_starts_at_jafars_frequencies():
    model = JAFAR(v_dim=V, qk_dim=QK)
    f = model.rope.freqs.detach()
    assert model.rope.freqs.requires_grad and f.shape == (2, QK)
    assert math.isclose(float(f[0, 0]), 2 * math.pi, rel_tol=1e-6)
    assert math.isclose(float(f[0, QK // 4 - 1]), 2 * math.pi / 100, rel_tol=1e-5)
    assert float(f[0, QK // 2:].abs().sum()) == 0 and float(f[1, : QK // 2].abs().sum()) == 0
