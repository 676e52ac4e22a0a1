"""The checkpoints shipped for the cpu book load, match the cpu profile and are complete."""

import numpy as np
import pytest
import torch

from segbook.book import load_profile
from segbook.upsamplers import JAFAR, SAUCE, book_checkpoint, checkpoint_info, load_upsampler

CHAPTER = "04_excite_attend_segment"


@pytest.mark.parametrize("kind,cls", [("jafar", JAFAR), ("sauce", SAUCE)])
def test_book_checkpoint_loads_with_the_cpu_profiles_settings(kind, cls):
    cfg = load_profile("cpu", chapter=CHAPTER)
    path = book_checkpoint(cfg["checkpoints"][kind])
    info = checkpoint_info(path)
    trained_with = info["config"]
    for key, value in cfg["train"].items():
        if key == "steps":
            continue   # the book replays only the first steps
        want = list(value) if isinstance(value, (list, tuple)) else value
        assert trained_with[key] == want, key
    assert trained_with["model"] == kind and trained_with["backbone"] == cfg["backbone"]
    assert trained_with["seed"] == 0
    losses = info["losses"]
    assert [r["step"] for r in losses] == list(range(1, info["step"] + 1))
    assert np.isfinite([r["loss"] for r in losses]).all()
    model = load_upsampler(kind, backbone="effnet-lite0", path=path)
    assert type(model) is cls and model.v_dim == 112 and model.qk_dim == trained_with["qk_dim"]
    if kind == "sauce":
        assert model.gate_mode == trained_with["gate"]
    out = model(torch.rand(3, 64, 64), torch.randn(112, 2, 2), (64, 64))
    assert out.features.shape == (112, 64, 64) and torch.isfinite(out.features).all()
