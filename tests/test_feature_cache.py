"""The feature cache: exact round trips, every key component counts, corrupt files recompute."""

import json
import warnings

import numpy as np
import pytest
import torch

from segbook.backbones.base import Capture, LayerCapture
from segbook.backbones.cache import (
    CacheWarning,
    FeatureCache,
    capture_from_safetensors,
    capture_to_safetensors,
    default_cache_dir,
)


class CountingBackbone:
    """A fake backbone whose capture depends on the image and the params, and counts calls."""

    def __init__(self, name="fake", fingerprint="abc"):
        self.name = name
        self.fingerprint = fingerprint
        self.calls = 0

    def capture(self, image, scale=1.0, heads=2):
        self.calls += 1
        g = torch.Generator().manual_seed(int(image.sum()) % 1000)
        x = torch.randn(16, 8, generator=g) * scale
        attn = torch.softmax(x @ x.T, dim=1)
        q = torch.randn(heads, 16, 4, generator=g)
        cap = Capture(backbone=self.name, image_size=tuple(image.shape[:2]),
                      meta={"scale": scale, "input_size": (4, 4), "dtype": torch.float16,
                            "names": ["a", ("b", 1)], "nested": {"t": 0.5, "none": None}})
        cap.layers["blocks.2"] = LayerCapture("blocks.2", "features", (4, 4),
                                              features=x.T.reshape(8, 4, 4).contiguous(),
                                              heads=1, reduction="none")
        cap.layers["attn.1"] = LayerCapture("attn.1", "self_attention", (4, 4),
                                            attn=attn.to(torch.float16), logits=x @ x.T,
                                            q=q, k=q, v=q.to(torch.bfloat16), heads=heads,
                                            reduction="sum", prefix_tokens=0)
        cap.layers["attn.cls"] = LayerCapture("attn.cls", "self_attention", (2, 2),
                                              attn=torch.full((5, 5), 0.2), prefix_tokens=1)
        return cap


def _assert_same_capture(a: Capture, b: Capture):
    assert a.backbone == b.backbone and a.image_size == b.image_size
    assert a.meta == b.meta
    assert all(type(b.meta[k]) is tuple for k in ("input_size", "model_input_size") if k in b.meta)
    assert list(a.layers) == list(b.layers)
    for la, lb in zip(a, b):
        assert (la.name, la.kind, la.grid, la.heads, la.reduction, la.prefix_tokens) == \
               (lb.name, lb.kind, lb.grid, lb.heads, lb.reduction, lb.prefix_tokens)
        assert type(lb.grid) is tuple
        ta, tb = la.tensors(), lb.tensors()
        assert set(ta) == set(tb)
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape
            # bit-identical, not merely close (NaN-safe, dtype-agnostic)
            assert torch.equal(ta[key].contiguous().view(torch.uint8),
                               tb[key].contiguous().view(torch.uint8))


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)


def test_miss_then_exact_hit(tmp_path, image):
    cache, bb = FeatureCache(tmp_path), CountingBackbone()
    first = cache.get_or_compute(bb, image, {"scale": 2.0})
    second = cache.get_or_compute(bb, image, {"scale": 2.0})
    assert bb.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    _assert_same_capture(first, second)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    summary = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert summary["params"] == {"scale": 2.0} and summary["backbone"] == "fake"


def test_every_key_component_recomputes(tmp_path, image):
    cache = FeatureCache(tmp_path)
    bb = CountingBackbone()
    cache.get_or_compute(bb, image, {"scale": 1.0, "heads": 2})
    cache.get_or_compute(bb, image, {"heads": 2, "scale": 1.0})         # same params, other order
    assert bb.calls == 1
    cache.get_or_compute(bb, image, {"scale": 1.5, "heads": 2})          # a parameter
    assert bb.calls == 2
    other = image.copy()
    other[0, 0, 0] ^= 1
    cache.get_or_compute(bb, other, {"scale": 1.0, "heads": 2})          # one pixel
    assert bb.calls == 3
    bb.fingerprint = "def"                                                # the weights
    cache.get_or_compute(bb, image, {"scale": 1.0, "heads": 2})
    assert bb.calls == 4
    renamed = CountingBackbone(name="fake2")                              # the backbone
    cache.get_or_compute(renamed, image, {"scale": 1.0, "heads": 2})
    assert renamed.calls == 1
    assert cache.key(bb, image, {"scale": 1}) != cache.key(bb, image, {"scale": (1,)})


def test_a_path_and_its_pixels_share_a_key(tmp_path, image):
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "x.png")
    cache, bb = FeatureCache(tmp_path / "c"), CountingBackbone()
    cache.get_or_compute(bb, tmp_path / "x.png", {})
    cache.get_or_compute(bb, image, {})
    assert bb.calls == 1


def test_corrupt_files_are_recomputed_with_a_warning(tmp_path, image):
    cache, bb = FeatureCache(tmp_path), CountingBackbone()
    good = cache.get_or_compute(bb, image, {"scale": 3.0})
    path = next(tmp_path.rglob("*.safetensors"))
    for damage in (b"", b"garbage" * 20, path.read_bytes()[:200] if path.stat().st_size else b""):
        path.write_bytes(damage)
        with pytest.warns(CacheWarning, match="unreadable"):
            again = cache.get_or_compute(bb, image, {"scale": 3.0})
        _assert_same_capture(good, again)
    calls = bb.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_compute(bb, image, {"scale": 3.0})                   # repaired: a clean hit
    assert bb.calls == calls


def test_writes_leave_no_temporary_files(tmp_path, image):
    cache = FeatureCache(tmp_path)
    for scale in (1.0, 2.0, 3.0):
        cache.get_or_compute(CountingBackbone(), image, {"scale": scale})
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    assert cache.clear() == 3 and not list(tmp_path.rglob("*.safetensors"))


def test_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    assert FeatureCache().directory == tmp_path / "here"
    monkeypatch.delenv("SEGBOOK_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "segbook")


def test_bad_params_and_bad_fn_results_are_rejected(tmp_path, image):
    cache = FeatureCache(tmp_path)
    with pytest.raises(TypeError, match="cache key"):
        cache.key(CountingBackbone(), image, {"fn": object()})
    with pytest.raises(TypeError, match="Capture"):
        cache.get_or_compute(CountingBackbone(), image, {"x": 1}, fn=lambda: "not a capture")


def test_disabled_cache_always_computes_and_writes_nothing(tmp_path, image):
    cache, bb = FeatureCache(tmp_path, enabled=False), CountingBackbone()
    cache.get_or_compute(bb, image, {})
    cache.get_or_compute(bb, image, {})
    assert bb.calls == 2 and not list(tmp_path.rglob("*"))


def test_serialisation_round_trip_without_a_cache(image):
    cap = CountingBackbone().capture(image)
    back, extra = capture_from_safetensors(capture_to_safetensors(cap, extra={"k": 1}))
    _assert_same_capture(cap, back)
    assert back.meta["dtype"] is torch.float16 and back.meta["names"] == ["a", ("b", 1)]
    assert extra == {"k": 1}
    with pytest.raises(ValueError, match="not a readable"):
        capture_from_safetensors(b"\x00" * 16)


def test_real_backbone_capture_round_trips(tmp_path):
    from skimage.data import coffee

    from segbook.backbones import load_backbone

    bb = load_backbone("effnet-lite0", device="cpu")
    cache = FeatureCache(tmp_path)
    params = {"size": 128, "temperature": 0.1, "logits": True, "qkv": True}
    first = cache.get_or_compute(bb, coffee(), params)
    second = cache.get_or_compute(bb, coffee(), params)
    assert cache.hits == 1
    _assert_same_capture(first, second)
    assert second.meta["attention_layers"] == ("blocks.5", "blocks.10")
    att = second["similarity(blocks.5+blocks.10)"]
    assert att.q.shape[:2] == (1, 64) and att.logits.shape == (64, 64)  # 128 px / 16
