"""``load_upsampler(name, backbone=...)``: trained upsamplers by name, through the weights resolver.

JAFAR's later releases publish checkpoints per backbone as GitHub release assets
(``https://github.com/PaulCouairon/JAFAR/releases/download/Weights/<timm name>.pth``, e.g.
``vit_large_patch16_dinov3.lvd1689m.pth``). segbook looks for them where it looks for every
weight (:func:`segbook.backbones.weights.resolve_weights`): ``$SEGBOOK_WEIGHTS/PaulCouairon/JAFAR/``
then the Hugging Face cache, and otherwise raises :class:`~segbook.errors.MissingWeightsError`
saying which file to fetch and where to put it. EASe publishes no SAUCE weights: a SAUCE comes
from :mod:`segbook.upsamplers.train` (pass its checkpoint as ``path``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from segbook.errors import MissingWeightsError
from segbook.upsamplers.jafar import JAFAR, load_checkpoint
from segbook.upsamplers.sauce import SAUCE

__all__ = ["BOOK_CHECKPOINTS", "JAFAR_RELEASE", "JAFAR_REPO", "TOKEN_WIDTHS", "book_checkpoint",
           "checkpoint_info", "load_upsampler"]

# Small checkpoints trained for the cpu book (see checkpoints/README.md for the commands).
BOOK_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

JAFAR_REPO = "PaulCouairon/JAFAR"
JAFAR_RELEASE = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights/"
# token width of the backbones JAFAR publishes weights for (JAFAR's hydra resolver)
TOKEN_WIDTHS = {
    "vit_small_patch16_dinov3.lvd1689m": 384, "vit_small_plus_patch16_dinov3.lvd1689m": 384,
    "vit_base_patch16_dinov3.lvd1689m": 768, "vit_large_patch16_dinov3.lvd1689m": 1024,
    "vit_small_patch14_dinov2.lvd142m": 384, "vit_base_patch14_dinov2.lvd142m": 768,
    "vit_small_patch14_reg4_dinov2": 384,
}


@contextmanager
def _offline():
    before = os.environ.get("SEGBOOK_OFFLINE")
    os.environ["SEGBOOK_OFFLINE"] = "1"   # release assets are not on the HF hub: never try it
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SEGBOOK_OFFLINE", None)
        else:
            os.environ["SEGBOOK_OFFLINE"] = before


def book_checkpoint(name: str) -> Path:
    """The path of a checkpoint shipped with segbook (``checkpoints/<name>``)."""
    path = BOOK_CHECKPOINTS / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in BOOK_CHECKPOINTS.glob("*.pt"))) or "none"
        raise FileNotFoundError(f"no book checkpoint {name!r} in {BOOK_CHECKPOINTS} (known: {known})")
    return path


def checkpoint_info(path) -> dict:
    """``config``, ``losses``, ``step`` and ``kind`` of a segbook training checkpoint (empty for
    other files)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "model" not in obj:
        return {}
    return {k: obj.get(k) for k in ("config", "losses", "step", "kind", "v_dim", "command")}


def _timm_name(backbone) -> str:
    name = getattr(backbone, "name", backbone)
    from segbook.backbones.vit import VIT_SPECS

    if name in VIT_SPECS:
        return VIT_SPECS[name].timm_name
    return str(name)


def load_upsampler(name: str, backbone, path: str | Path | None = None, device="cpu", **kwargs):
    """A trained ``"jafar"`` or ``"sauce"`` for ``backbone`` (a registry name such as
    ``"dinov3-vitl16"``, a timm name, or a loaded backbone).

    Parameters
    ----------
    path : a checkpoint file (official JAFAR or segbook's training checkpoint); default: the
        official JAFAR release for the backbone, through the weights resolver.
    kwargs : model options (``qk_dim``, ``gate``, ...).

    Raises
    ------
    MissingWeightsError : the file is not on this machine (the message names it and the URL).
    WidthMismatchError : the checkpoint was trained for another backbone width.
    CorruptFileError : the file is truncated.
    """
    if name not in ("jafar", "sauce"):
        raise ValueError(f"unknown upsampler {name!r}; known: jafar, sauce")
    timm = _timm_name(backbone)
    if path is None:
        if name == "sauce":
            raise MissingWeightsError(
                "EASe/SAUCE", "EASe publishes no SAUCE weights. Train one with\n"
                f"    python -m segbook.upsamplers.train --model sauce --backbone {getattr(backbone, 'name', backbone)} "
                "--images <ImageNet train folder> --steps 127500 --out runs/sauce\n"
                "(see data_manifests/imagenet.yaml) and pass path=runs/sauce/checkpoint.pt.")
        file = f"{timm}.pth"
        from segbook.backbones.weights import resolve_weights

        try:
            with _offline():
                root = resolve_weights(JAFAR_REPO, allow_patterns=[file])
        except MissingWeightsError as exc:
            raise MissingWeightsError(
                f"{JAFAR_REPO}/{file}",
                f"JAFAR's checkpoint for {timm} is not on this machine.\n{exc}\n"
                f"JAFAR's weights are GitHub release assets, not a hub repository: on a machine "
                f"that is online, fetch\n    {JAFAR_RELEASE}{file}\ninto "
                f"$SEGBOOK_WEIGHTS/{JAFAR_REPO}/{file}.") from None
        path = root / file
    state = load_checkpoint(path)
    key = "key_features_encoder.0.weight"
    if key not in state:
        from segbook.errors import CorruptFileError

        raise CorruptFileError(path, f"{path} holds no upsampler weights ({key} missing)")
    width = int(state[key].shape[1])
    expected = TOKEN_WIDTHS.get(timm) or (getattr(backbone, "model", None) and
                                          getattr(backbone.model, "num_features", None))
    if expected and int(expected) != width:
        from segbook.upsamplers.jafar import WidthMismatchError

        raise WidthMismatchError(f"{path} is a checkpoint for {width}-channel tokens, but {timm} "
                                 f"gives {int(expected)}-channel tokens")
    qk = int(state[key].shape[0])
    info = checkpoint_info(path) if name == "sauce" and "gate" not in kwargs else {}
    if info.get("config"):
        kwargs = {"gate": info["config"].get("gate", "values_and_keys"),
                  "r": info["config"].get("r", 2), **kwargs}
    has_se = any(k.startswith("se.") for k in state)
    if name == "sauce":
        model = SAUCE(v_dim=width, qk_dim=qk, **kwargs)
        if has_se:
            model.load_state_dict(state)
        else:
            model.load_jafar(state)
    else:
        model = JAFAR(v_dim=width, qk_dim=qk, **kwargs)
        model.load_official({k: v for k, v in state.items() if not k.startswith("se.")})
    return model.to(device).eval()
