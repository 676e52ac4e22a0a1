"""The rehearsal's writers: SD 1.4's repository, timm ViT weights, fake data, what a chapter
needs, and the environment rehearse() runs the runner in (the runner itself is mocked)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from segbook.book import rehearse as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEGBOOK_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "weights"


def _reduced_sd_configs() -> dict:
    """SD 1.4's configs with tiny widths (same blocks, same keys, same encodings)."""
    cfg = copy.deepcopy(R.SD14_CONFIGS)
    cfg["unet"].update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8,
                       attention_head_dim=2, cross_attention_dim=32)
    cfg["vae"].update(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1)
    cfg["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, projection_dim=32)
    return cfg


def test_sd14_configs_build_sd14():
    """The written U-Net config builds the architecture segbook knows as SD 1.4."""
    from diffusers import UNet2DConditionModel

    from segbook.backbones.diffusion import SD14_UNET_CONFIG, sd14_layer_table

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(R.SD14_CONFIGS["unet"])
    for key, value in SD14_UNET_CONFIG.items():
        assert unet.config[key] == value
    attn1 = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    table = sd14_layer_table()
    assert len(attn1) == 16 == sum(1 for i in table.values() if i["kind"] == "self_attention")
    assert R.SD14_CONFIGS["text_encoder"]["vocab_size"] == 49408
    assert R.SD14_CONFIGS["vae"]["block_out_channels"] == [128, 256, 512, 512]


def test_sd_repository_loads_as_sd14(offline, tmp_path):
    """A repository written from (reduced) SD 1.4 configs passes load_stable_diffusion's
    required-files check (no tokenizer) and captures; configs are written verbatim."""
    from segbook.backbones.diffusion import SD_WEIGHT_FILES, load_stable_diffusion

    configs = _reduced_sd_configs()
    repo = offline / "rehearsal" / "sd"
    files = R.write_sd_repository(repo, configs=configs)
    assert {str(f.relative_to(repo)) for f in files} == set(SD_WEIGHT_FILES)
    assert json.loads((repo / "unet" / "config.json").read_text()) == configs["unet"]
    sd = load_stable_diffusion("rehearsal/sd", device="cpu", image_size=128)
    assert sd.pretrained and sd.tokenizer is None and sd.dtype == torch.float32
    assert type(sd.scheduler).__name__ == "DDIMScheduler"  # from SD 1.4's PNDM config
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    cap = sd.capture(image, layers="mid", progress=False)
    (layer,) = cap.layers.values()
    assert layer.grid == (2, 2) and torch.isfinite(layer.attn.float()).all()


def test_vit_weights_load_through_load_vit(offline):
    from segbook.backbones.vit import ViTSpec, load_vit

    spec = ViTSpec("vit_small_patch16_dinov3", "rehearsal/tiny-vit", "longest", 64,
                   model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    path = R.write_vit_weights("tiny", offline / spec.hub_id, spec=spec)
    assert path.name == "model.safetensors"
    vit = load_vit("tiny", device="cpu", spec=spec)
    assert vit.pretrained and vit.num_prefix_tokens == 5


def test_cnn_and_miniatures_need_no_weights(tmp_path):
    assert R.write_backbone_weights("effnet-lite0", tmp_path, log=lambda *_: None) is None
    assert R.write_backbone_weights("tiny-sd", tmp_path, log=lambda *_: None) is None
    assert not any(tmp_path.iterdir())


def test_profile_requirements_of_the_chapters():
    assert R.profile_requirements("02_diffusing_walking_cutting") == {
        "backbones": ["sd14"], "datasets": ["coco-stuff-27", "cityscapes-27", "ade20k"]}
    assert R.profile_requirements("05_evaluation") == {
        "backbones": [], "datasets": ["coco-stuff-27", "cityscapes-27", "voc2012"]}
    # the shared vit_backbone (dinov3-vitb16) is named by the profile but read by no chapter
    assert R.profile_requirements("01_spectral_clustering")["backbones"] == ["effnet-lite0"]
    assert R.profile_requirements("00_preface") == {"backbones": [], "datasets": []}


@pytest.mark.parametrize("name", ["coco-stuff-27", "cityscapes-27", "ade20k", "voc2012"])
def test_fake_trees_load(tmp_path, name):
    from segbook.data import load

    R.write_datasets([name], tmp_path, n=2, log=lambda *_: None)
    with pytest.warns(UserWarning):
        ds = load(name, root=tmp_path, strict=False, preprocess="stego320")
    assert len(ds) == 2
    image, label, meta = ds[0]
    assert image.shape == (320, 320, 3) and label.shape == (320, 320)
    assert meta["original_size"] == R.FAKE_IMAGE_SIZE
    assert label.max() < ds.num_classes and label.min() >= -1


def test_rehearse_sets_and_restores_the_environment(tmp_path, monkeypatch, capsys):
    """rehearse() runs the runner with the rehearsal's environment, overrides and output
    directory, restores the environment, and removes a work directory it created."""
    from segbook.book import runner

    seen = {}

    def fake_run_book(profile, chapters, **kwargs):
        seen.update(profile=profile, chapters=chapters, env={
            k: os.environ.get(k) for k in ("SEGBOOK_WEIGHTS", "SEGBOOK_DATA", "SEGBOOK_OFFLINE",
                                           "HF_HUB_OFFLINE", "SEGBOOK_REHEARSAL")}, **kwargs)
        return 0

    monkeypatch.setattr(runner, "run_book", fake_run_book)
    monkeypatch.delenv("SEGBOOK_REHEARSAL", raising=False)
    monkeypatch.setenv("SEGBOOK_DATA", "/somewhere/real")
    work = tmp_path / "work"
    assert R.rehearse(["00"], limit=2, device="cpu", workdir=work, progress=False) == 0
    assert seen["profile"] == "full" and seen["chapters"] == ["00_preface"]
    assert seen["env"] == {"SEGBOOK_WEIGHTS": str(work / "weights"),
                           "SEGBOOK_DATA": str(work / "data"), "SEGBOOK_OFFLINE": "1",
                           "HF_HUB_OFFLINE": "1", "SEGBOOK_REHEARSAL": "1"}
    assert seen["overrides"] == {"image_limit": 2, "strict_datasets": False}
    assert seen["parameters"] == {"device": "cpu"}
    assert seen["out_root"] == R.rehearsal_root()
    assert seen["out_root"].parts[-2:] == ("rehearsal", "full")
    assert os.environ["SEGBOOK_DATA"] == "/somewhere/real"
    assert "SEGBOOK_REHEARSAL" not in os.environ
    assert not work.exists()  # created by the call, not kept
    assert "meaningless" in capsys.readouterr().out

    work.mkdir()  # a directory that existed before the call is the caller's: kept
    monkeypatch.setattr(runner, "run_book", lambda *a, **k: 1)
    assert R.rehearse(["00"], workdir=work, progress=False) == 1
    assert work.is_dir()


def test_rehearse_passes_extra_overrides_and_the_cli_checks_them(tmp_path, monkeypatch):
    """--set on a rehearsal (fewer passes on a CPU) reaches the runner; an unknown key is a
    one-line error before anything is written."""
    import subprocess
    import sys

    from segbook.book import runner

    seen = {}
    monkeypatch.setattr(runner, "run_book", lambda profile, chapters, **kw: seen.update(kw) or 0)
    # chapter 00 needs no weights or data: nothing large is written (run_book is a stand-in)
    assert R.rehearse(["00"], workdir=tmp_path / "w", progress=False,
                      overrides={"recipe.passes": 40}) == 0
    assert seen["overrides"] == {"image_limit": 1, "strict_datasets": False, "recipe.passes": 40}
    proc = subprocess.run([sys.executable, "-m", "segbook.book", "rehearse", "--chapters", "03",
                           "--set", "recipe.pases=40"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown profile key")
