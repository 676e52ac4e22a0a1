"""The backbone registry: ``load_backbone(name)`` for every model the book uses.

Entries are registered lazily as ``"module:function"`` strings so that importing
``segbook.backbones`` never imports diffusers or timm, nor loads weights. Each loader is
called as ``loader(device=..., dtype=..., **kwargs)`` and returns a
:class:`~segbook.backbones.base.Backbone`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from segbook.backbones.base import Backbone, resolve_device


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    loader: str          # "segbook.backbones.diffusion:load_sd14"
    family: str          # "diffusion" | "vit" | "cnn"
    description: str
    pretrained: bool = True
    hub_id: str | None = None


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, loader: str, family: str, description: str,
                      pretrained: bool = True, hub_id: str | None = None) -> None:
    """Add (or replace) a registry entry."""
    _REGISTRY[name] = BackboneEntry(name, loader, family, description, pretrained, hub_id)


def available_backbones() -> dict[str, BackboneEntry]:
    """Name -> entry, in registration order."""
    return dict(_REGISTRY)


def load_backbone(name: str, device: str | torch.device | None = "auto",
                  dtype: torch.dtype | None = None, **kwargs) -> Backbone:
    """Load a registered backbone.

    Parameters
    ----------
    name : a registry name (see :func:`available_backbones`).
    device : ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    dtype : the model's precision; None lets the backbone choose (float16 on CUDA for the
        large models, float32 on the CPU).

    Raises
    ------
    ValueError : for an unknown name, listing the valid ones.
    MissingWeightsError : when a pretrained model's weights are not on this machine.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone '{name}'; valid backbones: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    module_name, func_name = entry.loader.split(":")
    loader = getattr(importlib.import_module(module_name), func_name)
    return loader(device=resolve_device(device), dtype=dtype, **kwargs)
