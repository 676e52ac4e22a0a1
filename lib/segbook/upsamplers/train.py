"""Self-supervised training of JAFAR / SAUCE (EASe section 3.1, eq. 2; JAFAR's ``train.py``).

Each step takes a batch of images ``I`` (a square crop of ``image_size``), the backbone's
features of the whole image ``F_hr = f(I)`` (the target) and of a shrunk copy
``F_lr = f(I_lr)``, ``I_lr`` at a factor ``s ~ U(0.25, 0.5)`` of the size, rounded to the stride
(one ``s`` per step, as JAFAR's code), and minimises EASe's eq. 2::

    L = 1 - cos(F^_hr, F_hr) + ||F^_hr - F_hr||^2,    F^_hr = up(I, F_lr) at F_hr's grid

(cosine averaged over tokens, squared error averaged over elements). JAFAR's code differs in
three ways that are options here: the guidance image is the crop downscaled x0.5 (224 px for
448 crops; ``guidance_scale=0.5``), the squared error is taken after a min-max normalisation per
token by the target's range (``mse="minmax"``), and a consistency term (weight 0.1) asks the
upsampling of ``F_hr`` to the guidance size to be the same for a blurred/noised guidance as for
the clean one (``consistency_weight=0.1``; JAFAR applies the noise to the *normalised* image and
then clamps it to ``[0, 1]``, which cuts every negative value; here the noise is applied to the
``[0, 1]`` image). Optimiser: AdamW, lr 2e-4, weight decay 1e-5, no schedule (both).

Reproducible and restartable: every step's crops, scale and noise come from a generator seeded by
``(seed, step, rank)``, so a run resumed from a checkpoint replays exactly the batches it would
have seen; checkpoints (model, optimiser, step, loss history, config) are written atomically
(temporary file + rename) every ``checkpoint_every`` steps and at the end. Under ``torchrun`` the
model is wrapped in DistributedDataParallel (gloo on the CPU, NCCL on GPUs), each rank draws its
own batch, the logged loss is the mean over ranks, and rank 0 writes checkpoints and the CSV.

Command line: ``python -m segbook.upsamplers.train --images DIR --backbone effnet-lite0
--model sauce --steps 2000 --out runs/sauce`` (``torchrun --nproc_per_node=2 -m
segbook.upsamplers.train ...`` for DDP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segbook.book.results import atomic_torch_save
from segbook.errors import CorruptFileError
from segbook.upsamplers.features import (
    backbone_features,
    feature_stride,
    feature_width,
    image_tensor,
    round_to_stride,
)
from segbook.upsamplers.jafar import JAFAR
from segbook.upsamplers.sauce import SAUCE

__all__ = ["ImageSource", "TrainConfig", "TrainResult", "UpsamplerLoss", "build_upsampler",
           "imagenet_train_folder",
           "main", "train", "upsampler_loss"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe"}


@dataclass
class TrainConfig:
    """Training settings (defaults: EASe/JAFAR's; ``steps`` is theirs only on ImageNet).

    model : ``"jafar"`` or ``"sauce"``.  backbone / layer : see :mod:`segbook.upsamplers.features`.
    image_size : square crop side (448 in JAFAR).  random_crop : random crops + flips instead of
    the centre crop (small image sets).  low_scale : range of ``s``.  guidance_scale : 1.0 (the
    paper) or 0.5 (JAFAR's code).  mse : ``"plain"`` (eq. 2) or ``"minmax"`` (JAFAR's code).
    consistency_weight : 0 (the paper) or 0.1 (JAFAR's code).
    """

    model: str = "jafar"
    backbone: str = "effnet-lite0"
    layer: str | None = None
    steps: int = 1000
    batch_size: int = 4
    image_size: int = 448
    random_crop: bool = False
    low_scale: tuple[float, float] = (0.25, 0.5)
    guidance_scale: float = 1.0
    mse: str = "plain"
    consistency_weight: float = 0.0
    lr: float = 2e-4
    weight_decay: float = 1e-5
    qk_dim: int = 128
    num_heads: int = 4
    r: int = 2
    gate: str = "values_and_keys"
    seed: int = 0
    checkpoint_every: int = 100
    bf16: bool = True          # autocast on CUDA only
    device: str = "cpu"
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["low_scale"] = list(self.low_scale)
        return d


@dataclass
class TrainResult:
    model: nn.Module
    losses: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0


# The cpu book's training set, by name (so that the command line can reproduce the committed
# checkpoints): the bundled photos at 256 px and the first 12 mosaics of v1 at 224 px.
BOOK_IMAGES = {"segbook:chapter04-cpu": {"photos": ["astronaut", "coffee", "chelsea", "rocket", "motorcycle"],
                                         "photo_size": 256, "mosaic": ("v1", 12, 224)}}


def book_images(name: str) -> list:
    """The images of a :data:`BOOK_IMAGES` entry (``(H, W, 3)`` uint8 arrays)."""
    from segbook.data import load_sample, mosaic_benchmark

    spec = BOOK_IMAGES[name]
    version, n, size = spec["mosaic"]
    return ([load_sample(p, size=spec["photo_size"]) for p in spec["photos"]]
            + list(mosaic_benchmark(version, n=n, size=size).images[:n]))


class ImageSource:
    """Images for training: a folder (searched recursively), a list of paths, arrays or tensors,
    or a :data:`BOOK_IMAGES` name. Images are decoded on demand and kept (``cache``) as
    ``(3, H, W)`` float tensors."""

    def __init__(self, images, cache: bool = True):
        if isinstance(images, str) and images in BOOK_IMAGES:
            images = book_images(images)
        if isinstance(images, (str, Path)):
            root = Path(images)
            if not root.is_dir():
                raise FileNotFoundError(f"no image folder at {root}")
            images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
            if not images:
                raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
        self.items = list(images)
        if not self.items:
            raise ValueError("no training images")
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        t = image_tensor(self.items[i])
        if self._cache is not None:
            self._cache[i] = t
        return t


def _crop(img: torch.Tensor, size: int, g: torch.Generator, random_crop: bool) -> torch.Tensor:
    """Resize the short side to ``size`` (random: to ``size * U(1, 1.5)``), crop ``size``."""
    H, W = img.shape[-2:]
    short = size * (1.0 + 0.5 * float(torch.rand((), generator=g))) if random_crop else size
    f = short / min(H, W)
    h, w = max(size, round(H * f)), max(size, round(W * f))
    x = F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True,
                      align_corners=False)[0].clamp(0, 1)
    if random_crop:
        top = int(torch.randint(0, h - size + 1, (), generator=g))
        left = int(torch.randint(0, w - size + 1, (), generator=g))
        x = x[:, top:top + size, left:left + size]
        if float(torch.rand((), generator=g)) < 0.5:
            x = x.flip(-1)
    else:
        top, left = (h - size) // 2, (w - size) // 2
        x = x[:, top:top + size, left:left + size]
    return x


def _blur_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """JAFAR's guidance perturbation: Gaussian blur (kernel 5, sigma 1) with p 0.5, then
    ``+ 0.02 N(0, 1)`` with p 0.3, clamped to ``[0, 1]`` (on the ``[0, 1]`` image here)."""
    if float(torch.rand((), generator=g)) < 0.5:
        k = torch.exp(-0.5 * torch.arange(-2, 3, dtype=x.dtype) ** 2)
        k = k / k.sum()
        C = x.shape[1]
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(C, 1, 1, 1), groups=C)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(C, 1, 1, 1), groups=C)
    if float(torch.rand((), generator=g)) < 0.3:
        x = x + 0.02 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x.clamp(0, 1)


def upsampler_loss(pred: torch.Tensor, target: torch.Tensor, mse: str = "plain") -> dict:
    """EASe eq. 2: ``1 - cos`` (mean over tokens) + MSE (mean over elements); ``mse="minmax"``
    scales both by the target's per-token min/max first (JAFAR's ``cosine_mse``)."""
    cos = F.cosine_similarity(pred, target, dim=1).mean()
    if mse == "minmax":
        lo = target.amin(dim=1, keepdim=True)
        hi = target.amax(dim=1, keepdim=True)
        err = F.mse_loss((pred - lo) / (hi - lo + 1e-6), (target - lo) / (hi - lo + 1e-6))
    elif mse == "plain":
        err = F.mse_loss(pred, target)
    else:
        raise ValueError(f"mse must be 'plain' or 'minmax', got {mse!r}")
    return {"cos": 1 - cos, "mse": err}


class UpsamplerLoss(nn.Module):
    """The whole training objective as one module (so that DDP sees one forward per step)."""

    def __init__(self, upsampler: nn.Module, mse: str = "plain", consistency_weight: float = 0.0):
        super().__init__()
        self.upsampler = upsampler
        self.mse = mse
        self.consistency_weight = float(consistency_weight)

    def forward(self, guidance, lr_feats, hr_feats, noisy=None):
        pred = self.upsampler(guidance, lr_feats, tuple(hr_feats.shape[-2:]))
        terms = upsampler_loss(pred.float(), hr_feats, self.mse)
        total = terms["cos"] + terms["mse"]
        if self.consistency_weight and noisy is not None:
            size = tuple(guidance.shape[-2:])
            with torch.no_grad():
                target = self.upsampler(guidance, hr_feats, size)
            c = upsampler_loss(self.upsampler(noisy, hr_feats, size).float(), target.float(), self.mse)
            terms["consistency"] = c["cos"] + c["mse"]
            total = total + self.consistency_weight * terms["consistency"]
        terms["loss"] = total
        return terms


def build_upsampler(kind: str, v_dim: int, qk_dim: int = 128, num_heads: int = 4, r: int = 2,
                    gate: str = "values_and_keys") -> JAFAR:
    """A fresh ``"jafar"`` or ``"sauce"`` for ``v_dim``-channel tokens."""
    if kind == "jafar":
        return JAFAR(v_dim=v_dim, qk_dim=qk_dim, num_heads=num_heads)
    if kind == "sauce":
        return SAUCE(v_dim=v_dim, qk_dim=qk_dim, num_heads=num_heads, r=r, gate=gate)
    raise ValueError(f"unknown upsampler {kind!r}; known: jafar, sauce")


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) * 101 + int(rank))


def _write_curve(losses: list[dict], path: Path) -> None:
    import pandas as pd

    from segbook.book.results import atomic_write_csv

    atomic_write_csv(path, pd.DataFrame(losses))


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def train(config: TrainConfig, images, out_dir: str | Path | None = None, backbone=None,
          resume: bool = True, stop_after: int | None = None,
          upsampler: nn.Module | None = None) -> TrainResult:
    """Train an upsampler; returns the model (unwrapped) and the loss history.

    Parameters
    ----------
    config : :class:`TrainConfig`.
    images : a folder, or a list of paths / arrays / tensors (:class:`ImageSource`).
    out_dir : where ``checkpoint.pt`` and ``loss.csv`` go (None: nothing is written).
    backbone : a loaded backbone (default: ``load_backbone(config.backbone)``).
    resume : continue from ``out_dir/checkpoint.pt`` when it exists.
    stop_after : stop (after checkpointing) once this step is reached: an "interruption".
    upsampler : start from this model instead of a fresh one (e.g. SAUCE from JAFAR weights).
    """
    from tqdm.auto import tqdm

    dist, rank, world = _dist()
    device = torch.device(config.device)
    if backbone is None:
        from segbook.backbones import load_backbone

        backbone = load_backbone(config.backbone, device=device)
    stride = feature_stride(backbone, config.layer)
    v_dim = feature_width(backbone, config.layer)
    if config.image_size % stride:
        raise ValueError(f"image_size {config.image_size} is not a multiple of the stride {stride}")
    source = images if isinstance(images, ImageSource) else ImageSource(images)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = upsampler if upsampler is not None else build_upsampler(
            config.model, v_dim, config.qk_dim, config.num_heads, config.r, config.gate)
    if model.v_dim != v_dim:
        raise ValueError(f"the upsampler expects {model.v_dim}-channel tokens, {config.backbone} "
                         f"gives {v_dim}")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999))
    losses: list[dict] = []
    start = 0
    ckpt_path = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated zip, a damaged pickle
            raise CorruptFileError(ckpt_path, f"checkpoint {ckpt_path} is truncated or unreadable "
                                   f"({type(exc).__name__}); delete it to start over (loss.csv "
                                   "beside it shows how far the run got)") from None
        if state.get("config", {}).get("model") != config.model or state.get("v_dim") != v_dim:
            raise ValueError(f"{ckpt_path} was written for {state.get('config', {}).get('model')} "
                             f"on {state.get('v_dim')}-channel tokens, not {config.model} on {v_dim}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        losses = list(state["losses"])

    objective = UpsamplerLoss(model, config.mse, config.consistency_weight)
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    amp = config.bf16 and device.type == "cuda"

    def save(step):
        if ckpt_path is None or rank != 0:
            return
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "step": step, "losses": losses, "config": config.to_dict(),
                      "v_dim": v_dim, "kind": config.model}, ckpt_path)
        _write_curve(losses, ckpt_path.with_name("loss.csv"))

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not config.progress
               or rank != 0, desc=f"train {config.model}", leave=False)
    t0 = time.perf_counter()
    size = config.image_size
    for step in bar:
        g = _step_generator(config.seed, step, rank)
        idx = torch.randint(0, len(source), (config.batch_size,), generator=g).tolist()
        crops = torch.stack([_crop(source[i], size, g, config.random_crop) for i in idx])
        lo, hi = config.low_scale
        s = lo + (hi - lo) * float(torch.rand((), generator=g))
        low = round_to_stride(size * s, stride)
        small = F.interpolate(crops, size=(low, low), mode="bilinear", align_corners=False)
        hr = backbone_features(backbone, crops, config.layer).to(device)
        lr_feats = backbone_features(backbone, small, config.layer).to(device)
        gsize = round_to_stride(size * config.guidance_scale, 1)
        guidance = crops if gsize == size else F.interpolate(
            crops, size=(gsize, gsize), mode="bilinear", align_corners=False)
        noisy = _blur_noise(guidance, g) if config.consistency_weight else None
        guidance = guidance.to(device)
        noisy = noisy.to(device) if noisy is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            terms = objective(guidance, lr_feats, hr, noisy)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        row = torch.stack([terms[k].detach().float() for k in ("loss", "cos", "mse")])
        if dist is not None:
            dist.all_reduce(row)
            row /= world
        losses.append({"step": step + 1, "loss": float(row[0]), "one_minus_cos": float(row[1]),
                       "mse": float(row[2]), "low_res": low})
        bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < end:
            save(step + 1)
    bar.close()
    if end > start:
        save(end)
    model.eval()
    return TrainResult(model=model, losses=losses, seconds=time.perf_counter() - t0,
                       steps_run=max(0, end - start))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segbook.upsamplers.train",
                                description="Train JAFAR or SAUCE on a folder of images "
                                            "(EASe eq. 2); runs under torchrun with DDP.")
    p.add_argument("--images", required=True, help="folder of images (searched recursively), or "
                   f"one of {', '.join(BOOK_IMAGES)}")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, loss.csv, config.json")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("progress",):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",) or isinstance(f.default, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=f.default,
                           metavar="BOOL")
        elif f.name == "low_scale":
            p.add_argument(flag, type=float, nargs=2, default=f.default)
        else:
            kind = type(f.default) if f.default is not None else str
            p.add_argument(flag, type=kind, default=f.default)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "progress"}
    values["low_scale"] = tuple(values["low_scale"])
    config = TrainConfig(**values)
    result = train(config, args.images, args.out, resume=not args.no_resume)
    _, rank, _ = _dist()
    if rank == 0:
        (Path(args.out) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        last = result.losses[-1]["loss"] if result.losses else math.nan
        print(f"{config.model}: {result.steps_run} steps in {result.seconds:.1f} s, last loss "
              f"{last:.4f}; checkpoint {Path(args.out) / 'checkpoint.pt'}")
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def imagenet_train_folder(root=None) -> Path:
    """``$SEGBOOK_DATA/imagenet/train`` (``data_manifests/training/imagenet.yaml``), or
    :class:`~segbook.errors.MissingDatasetError` saying how to fetch it."""
    import yaml

    from segbook.book.paths import manifests_dir
    from segbook.data.root import require_files

    manifest = manifests_dir() / "training" / "imagenet.yaml"
    spec = yaml.safe_load(manifest.read_text())
    base = require_files("imagenet", ["train"], root=root, manifest=manifest,
                         instructions=spec["preparation"])
    folder = base / "train"
    if not any(folder.glob("n*/*.JPEG")):
        from segbook.errors import MissingDatasetError

        raise MissingDatasetError("imagenet", f"{folder} holds no class folders of JPEGs; "
                                  f"see {manifest}:\n{spec['preparation']}")
    return folder
