"""Rehearse the ``full`` profile without the papers' weights or datasets.

``python -m segbook.book rehearse --chapters 02 --limit 1 --device cpu`` runs a chapter's
``full`` profile through the real runner, with

* **random-initialised weights of the real architectures**, written in the Hugging Face hub
  layout under a temporary ``$SEGBOOK_WEIGHTS``: Stable Diffusion 1.4's U-Net, VAE and CLIP
  text encoder with SD 1.4's own configuration files (:data:`SD14_CONFIGS`, written from
  their known values since nothing can be downloaded), and timm's ViTs (DINOv3, DINO, CLIP,
  MAE) as ``timm.create_model(..., pretrained=False)`` saved where
  :func:`segbook.backbones.vit.load_vit` looks for them;
* **fake dataset trees** in each dataset's published layout and label encoding under a
  temporary ``$SEGBOOK_DATA`` (:func:`segbook.data.fake_trees.write_fake_dataset`);
* ``SEGBOOK_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``, and the profile overrides
  ``image_limit`` (a few images per dataset) and ``strict_datasets: false`` (the fake
  splits are smaller than the published ones).

Only what a chapter's ``full`` profile names is written (:func:`profile_requirements`), and
weights are cached in the work directory so that several chapters reuse them.

What a rehearsal proves: the full path *runs*. Every loader accepts the real repository
layouts and configurations, every capture works at the real sizes (SD 1.4 at 512 px: 64 x 64
latents, 8 heads, 4096-token attention), the datasets are found and decoded in their
published layouts, and every table and figure of the chapter is written, with the time and
peak memory it takes. What it does not prove: anything about the numbers. The weights are
random and the images are noise, so **every number and figure of a rehearsal is
meaningless**; ``$SEGBOOK_REHEARSAL=1`` makes :class:`segbook.book.Results` say so in every
caption, figure and ``provenance.json``, and the results go to ``results/rehearsal/full/``,
never to ``results/full/``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from segbook.book.paths import chapter_paths, profiles_dir, results_root

PROFILE = "full"
REHEARSAL_ENV = "SEGBOOK_REHEARSAL"

#: Stable Diffusion 1.4's configuration files (``CompVis/stable-diffusion-v1-4``), as
#: published: the U-Net, the VAE, the CLIP ViT-L/14 text encoder and the scheduler. The
#: text encoder's ``bos_token_id: 0, eos_token_id: 2`` are the published (outdated) values.
SD14_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.2.2",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.2.2",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    },
    "scheduler": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.7.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
}

#: Where each part's files go inside the repository (config file, weights file).
_SD_FILES = {
    "unet": ("unet/config.json", "unet/diffusion_pytorch_model.safetensors"),
    "vae": ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"),
    "text_encoder": ("text_encoder/config.json", "text_encoder/model.safetensors"),
    "scheduler": ("scheduler/scheduler_config.json", None),
}

_DONE = ".rehearsal-complete"  # written last: a directory without it is rewritten


# --------------------------------------------------------------------------- weights

def _save_state(module, path: Path, dtype) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()
             if v.is_floating_point()}
    state.update({k: v.detach().contiguous() for k, v in module.state_dict().items()
                  if not v.is_floating_point()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def write_sd_repository(directory: str | os.PathLike, configs: dict[str, dict] | None = None,
                        seed: int = 0, dtype=None) -> list[Path]:
    """Write a Stable Diffusion 1.x repository in the hub layout with random weights.

    Parameters
    ----------
    directory : the repository directory (``$SEGBOOK_WEIGHTS/CompVis/stable-diffusion-v1-4``).
    configs : the four configuration files (default :data:`SD14_CONFIGS`); the tests pass
        a reduced copy. Each config is written verbatim; the weights come from the class
        built from it (diffusers / transformers default initialisation) with ``seed``.
    dtype : weights on disk (default float16: 2.2 GB for SD 1.4; the loader casts).

    Returns the files written. No tokenizer is written: the loader does not need one.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = SD14_CONFIGS if configs is None else configs
    dtype = torch.float16 if dtype is None else dtype
    directory = Path(directory)
    written = []
    builders = {
        "unet": lambda c: UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
    }
    for part, (config_file, weight_file) in _SD_FILES.items():
        config = configs[part]
        config_path = directory / config_file
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        written.append(config_path)
        if weight_file is None:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = builders[part](dict(config))
        _save_state(module, directory / weight_file, dtype)
        written.append(directory / weight_file)
        del module
    return written


def write_vit_weights(name: str, directory: str | os.PathLike, seed: int = 0,
                      spec=None) -> Path:
    """timm's ``VIT_SPECS[name]`` architecture (or ``spec``'s) with random weights, saved as
    the spec's ``weight_file`` in ``directory`` (``$SEGBOOK_WEIGHTS/<spec.hub_id>``), float32
    as on the hub. The model keeps timm's default head, as the hub's files do."""
    import timm
    import torch

    from segbook.backbones.vit import VIT_SPECS

    spec = VIT_SPECS[name] if spec is None else spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False, **spec.model_kwargs)
    path = Path(directory) / spec.weight_file
    _save_state(model, path, torch.float32)
    return path


def write_backbone_weights(name: str, weights_root: str | os.PathLike, seed: int = 0,
                           log=print) -> Path | None:
    """Random weights of registered backbone ``name`` under ``weights_root`` (its hub id's
    directory); None for a backbone that needs none (embedded CNNs have their real weights;
    ``tiny-*`` are random anyway). A directory completed earlier is reused."""
    from segbook.backbones.registry import available_backbones

    entry = available_backbones()[name]
    if not entry.pretrained or entry.hub_id is None or entry.family == "cnn":
        return None
    directory = Path(weights_root) / entry.hub_id
    if (directory / _DONE).is_file():
        log(f"  weights  {name:<16} reused        {directory}")
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    if entry.family == "diffusion":
        if name != "sd14":
            raise ValueError(f"no known configuration for diffusion backbone {name!r}")
        files = write_sd_repository(directory, seed=seed)
    elif entry.family == "vit":
        files = [write_vit_weights(name, directory, seed=seed)]
    else:  # pragma: no cover - a new family
        raise ValueError(f"cannot write rehearsal weights for family {entry.family!r}")
    (directory / _DONE).write_text("random weights written by segbook.book.rehearse\n")
    size = sum(f.stat().st_size for f in files)
    log(f"  weights  {name:<16} written       {directory} ({size / 2**30:.2f} GiB, "
        f"{time.perf_counter() - start:.0f} s)")
    return directory


# --------------------------------------------------------------------------- data

#: Size of the fake images (height, width): a photo's aspect ratio, small enough to write
#: fast; the chapters' preprocessing resizes them to the papers' sizes.
FAKE_IMAGE_SIZE = (120, 160)


def write_datasets(names: list[str], data_root: str | os.PathLike, n: int = 2, seed: int = 0,
                   log=print) -> None:
    """``n`` fake samples of each dataset under ``data_root``, in its published layout."""
    from segbook.data.fake_trees import write_fake_dataset
    from segbook.data.manifests import load_manifest

    for name in names:
        base = Path(data_root) / load_manifest(name).directory
        marker = base / f"{_DONE}-{name}-{n}"
        if marker.is_file():
            log(f"  data     {name:<16} reused        {base}")
            continue
        samples = write_fake_dataset(name, data_root, n=n, seed=seed, size=FAKE_IMAGE_SIZE)
        marker.write_text("fake data written by segbook.book.rehearse\n")
        log(f"  data     {name:<16} {len(samples)} fake images {base}")


# --------------------------------------------------------------------------- what a chapter needs

def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def profile_requirements(chapter: str, profile: str = PROFILE) -> dict[str, list[str]]:
    """The registered backbones and datasets that ``chapter`` names in ``profile``.

    Every value of the chapter's own section counts; a key shared by all chapters (e.g.
    ``vit_backbone``) counts only when the chapter's source mentions it, so that a chapter
    that never reads it does not make the rehearsal write a model.

    Returns ``{"backbones": [...], "datasets": [...]}`` in the order they appear.
    """
    from segbook.backbones.registry import available_backbones
    from segbook.book.profiles import load_profile
    from segbook.data.manifests import manifests_dir

    merged = load_profile(profile, chapter)
    with open(profiles_dir() / f"{profile}.yaml") as fh:
        section = ((yaml.safe_load(fh) or {}).get("chapters") or {}).get(chapter) or {}
    source = chapter_paths()[chapter].read_text()
    used = {k: v for k, v in merged.items() if k in section or k in source}
    backbones = set(available_backbones())
    datasets = {p.stem for p in manifests_dir().glob("*.yaml")}
    out: dict[str, list[str]] = {"backbones": [], "datasets": []}
    for s in _strings(used):
        for kind, known in (("backbones", backbones), ("datasets", datasets)):
            if s in known and s not in out[kind]:
                out[kind].append(s)
    return out


# --------------------------------------------------------------------------- the rehearsal



def rehearsal_root() -> Path:
    """Where a rehearsal's chapters go: ``results/rehearsal/full/`` (never ``results/full``)."""
    return results_root() / "rehearsal" / PROFILE


def rehearse(chapters: list[str] | None = None, limit: int = 1, device: str | None = None,
             workdir: str | Path | None = None, keep: bool = False, progress: bool = True,
             stream=None, overrides: dict | None = None) -> int:
    """Run ``chapters`` (default: all) in the ``full`` profile on random weights and fake data.

    Parameters
    ----------
    chapters : chapter stems, numbers or prefixes (as ``python -m segbook.book run``).
    limit : images per dataset (the profile override ``image_limit``); also how many fake
        images each dataset gets (at least 2).
    device : the chapters' ``device`` parameter (``"cpu"``, ``"cuda"``); None keeps the
        profile's (``auto``).
    workdir : where weights (``weights/``) and data (``data/``) are written; default a new
        temporary directory. Weights written there are reused by later chapters and later
        calls with the same ``workdir``.
    keep : keep the work directory. A ``workdir`` that existed before the call is always
        kept; one this call created is removed at the end unless ``keep``.
    progress : progress bars.
    overrides : more profile overrides (``--set key=value``), e.g. fewer optimisation passes
        for a CPU rehearsal; applied to each chapter that has the key, after ``image_limit``
        and ``strict_datasets``.

    Returns a process exit code: 0 when every chapter ran, 1 otherwise. Prints what was
    written, each chapter's time, and where its (meaningless) results are.
    """
    from segbook.book.runner import environment, resolve_chapters, run_book

    stream = stream or sys.stdout

    def log(text: str = "") -> None:
        print(text, file=stream, flush=True)

    if int(limit) < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    stems = resolve_chapters(chapters)
    created = workdir is None or not Path(workdir).exists()
    work = Path(tempfile.mkdtemp(prefix="segbook-rehearsal-")) if workdir is None else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    weights, data, out_root = work / "weights", work / "data", rehearsal_root()
    env = {
        "SEGBOOK_WEIGHTS": str(weights), "SEGBOOK_DATA": str(data),
        "SEGBOOK_OFFLINE": "1", "HF_HUB_OFFLINE": "1", REHEARSAL_ENV: "1",
        # nothing real: an empty Hugging Face cache, and captures cached inside the work dir
        "HF_HUB_CACHE": str(work / "hf-cache"), "SEGBOOK_CACHE": str(work / "feature-cache"),
    }
    overrides = {"image_limit": int(limit), "strict_datasets": False, **(overrides or {})}
    parameters = {"device": device} if device else None
    log(f"segbook rehearsal of the '{PROFILE}' profile: random weights of the real "
        "architectures on fake data; every number it writes is meaningless.")
    log(f"  work directory {work}; results -> {out_root}")
    outcomes: list[tuple[str, str, float, float]] = []
    try:
        with environment(env):
            for stem in stems:
                needs = profile_requirements(stem)
                log(f"\n[{stem}] needs backbones {needs['backbones'] or '-'}, "
                    f"datasets {needs['datasets'] or '-'}")
                start = time.perf_counter()
                try:
                    for name in needs["backbones"]:
                        if write_backbone_weights(name, weights, log=log) is None:
                            log(f"  weights  {name:<16} none needed   (embedded real weights or "
                                "a random miniature)")
                    write_datasets(needs["datasets"], data, n=max(2, int(limit)), log=log)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next chapter
                    log(f"  FAILED writing the rehearsal inputs: {type(exc).__name__}: {exc}")
                    outcomes.append((stem, "FAILED (inputs)", time.perf_counter() - start, 0.0))
                    continue
                prepared = time.perf_counter() - start
                start = time.perf_counter()
                code = run_book(PROFILE, [stem], keep_going=True, progress=progress,
                                stream=stream, overrides=overrides, out_root=out_root,
                                parameters=parameters)
                outcomes.append((stem, "ok" if code == 0 else "FAILED", prepared,
                                 time.perf_counter() - start))
    finally:
        if created and not keep:
            shutil.rmtree(work, ignore_errors=True)

    log("\nsegbook rehearsal summary (numbers meaningless; this checks that the full path runs):")
    for stem, status, prepared, ran in outcomes:
        log(f"  {status:<16} {stem:<32} inputs {prepared:6.1f} s, chapter {ran:7.1f} s")
    if created and not keep:
        log(f"  removed the work directory {work}")
    else:
        log(f"  kept the work directory {work} (weights and data for the next rehearsal)")
    return 0 if len(outcomes) == len(stems) and all(o[1] == "ok" for o in outcomes) else 1
