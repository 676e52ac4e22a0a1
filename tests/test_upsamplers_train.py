"""Upsampler training: eq. 2, resume after an interruption replays the same curve, DDP with gloo."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from segbook.backbones import load_backbone
from segbook.errors import CorruptFileError
from segbook.upsamplers.train import TrainConfig, train, upsampler_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n=3, size=72, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]


def _config(**kw):
    base = {"model": "sauce", "backbone": "tiny-vit", "image_size": 64, "batch_size": 2,
            "steps": 6, "qk_dim": 16, "checkpoint_every": 2, "random_crop": True,
            "progress": False, "consistency_weight": 0.1, "guidance_scale": 0.5}
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_vit():
    return load_backbone("tiny-vit")


def test_loss_is_eq2():
    t = torch.randn(2, 5, 3, 3)
    terms = upsampler_loss(t, t)
    assert float(terms["cos"]) == pytest.approx(0, abs=1e-6) and float(terms["mse"]) == 0
    terms = upsampler_loss(-t, t)
    assert float(terms["cos"]) == pytest.approx(2, abs=1e-5)
    assert float(terms["mse"]) == pytest.approx(float((2 * t).square().mean()), rel=1e-6)


def test_resume_after_interruption_gives_the_same_curve(tmp_path, tiny_vit):
    images = _images()
    whole = train(_config(), images, tmp_path / "whole", backbone=tiny_vit)
    part = train(_config(), images, tmp_path / "part", backbone=tiny_vit, stop_after=3)
    assert part.steps_run == 3 and (tmp_path / "part" / "checkpoint.pt").exists()
    rest = train(_config(), images, tmp_path / "part", backbone=tiny_vit)
    assert rest.steps_run == 3
    a = [r["loss"] for r in whole.losses]
    b = [r["loss"] for r in rest.losses]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for k, v in whole.model.state_dict().items():
        assert torch.allclose(rest.model.state_dict()[k], v, atol=1e-6), k
    curve = pd.read_csv(tmp_path / "part" / "loss.csv")
    assert list(curve["step"]) == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(curve["loss"]).all()


def test_truncated_checkpoint_stops_with_a_clear_error(tmp_path, tiny_vit):
    images = _images(2)
    train(_config(steps=2), images, tmp_path, backbone=tiny_vit)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="truncated"):
        train(_config(steps=4), images, tmp_path, backbone=tiny_vit)
    assert (tmp_path / "loss.csv").exists()      # what the run had written is still there


def test_two_gloo_processes_train_through_the_command_line(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    for i, arr in enumerate(_images(3)):
        Image.fromarray(arr).save(folder / f"{i}.png")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "segbook.upsamplers.train", "--images", str(tmp_path / "images"), "--out", str(out),
           "--backbone", "tiny-vit", "--model", "jafar", "--image-size", "64", "--batch-size", "1",
           "--steps", "2", "--qk-dim", "16", "--checkpoint-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = pd.read_csv(out / "loss.csv")
    assert list(curve["step"]) == [1, 2] and np.isfinite(curve["loss"]).all()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["kind"] == "jafar"
    assert (out / "config.json").exists()
