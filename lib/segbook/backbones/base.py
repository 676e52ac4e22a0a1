"""The interface every backbone implements, and the :class:`Capture` it returns.

A *backbone* wraps a pretrained model (Stable Diffusion's UNet, a ViT, a CNN) and reads
from inside it what the papers use: self-attention probabilities, Q/K/V, block outputs.
Every backbone returns the same :class:`Capture`, so the graph builders and groupers never
need to know which model produced a tensor.

Conventions (all backbones):

* An attention map of a layer with an ``h x w`` token grid is ``(N, N)`` with
  ``N = h * w`` tokens in row-major order (row index = query, column index = key); heads
  summed or averaged give ``(N, N)``, heads kept give ``(H, N, N)``. Rows are probabilities
  (sum to 1). Special tokens (CLS, registers) are removed *before* the softmax is
  renormalised, unless a backbone documents otherwise.
* Q, K, V are ``(H, N, d)``; features are ``(C, h, w)``; all on the CPU unless the caller
  asks to keep them on the device.
* Memory: at a 64 x 64 grid one ``(N, N)`` map is 4096^2 entries = 64 MiB in float32,
  32 MiB in float16. Stable Diffusion 1.4 has 16 self-attention layers of 8 heads (5 at
  64 x 64, 5 at 32 x 32, 5 at 16 x 16, 1 at 8 x 8), so keeping every head of every layer
  costs 2.7 GiB in float32 (1.3 GiB in float16) against 171 MiB with heads reduced in
  float16 (see :class:`segbook.backbones.capture.CaptureOptions`). Backbones therefore
  reduce heads on the fly and store float16 by default; keeping heads or float32 must be
  asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from segbook.errors import GraphError


@dataclass
class LayerCapture:
    """What was read from one layer for one image.

    Attributes
    ----------
    name : the layer's name in the backbone (e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn1"``).
    kind : ``"self_attention"`` or ``"features"`` (a CNN stage, a ViT block's output).
    grid : ``(h, w)`` of the layer's spatial token grid.
    attn : attention probabilities, ``(N, N)`` (heads reduced) or ``(H, N, N)`` (heads kept).
    logits : pre-softmax scores, same shape as ``attn``, only when asked for.
    q, k, v : per-head projections ``(H, N, d)``, only when asked for.
    features : the block's output, ``(C, h, w)``, only when asked for.
    heads : number of heads the layer has (whether or not they were kept).
    reduction : how heads were reduced: ``"sum"``, ``"mean"`` or ``"none"``.
    prefix_tokens : CLS/register tokens kept in front of the ``h * w`` patch tokens in
        ``attn``, ``logits`` and ``q``/``k``/``v`` (0 unless a ViT capture asked to keep them).
    """

    name: str
    kind: str
    grid: tuple[int, int]
    attn: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    features: torch.Tensor | None = None
    heads: int = 1
    reduction: str = "sum"
    prefix_tokens: int = 0

    @property
    def resolution(self) -> int:
        """The grid's side for square grids, else its number of tokens' square root rounded."""
        h, w = self.grid
        return h if h == w else int(round((h * w) ** 0.5))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty tensors of this layer by field name (for caching)."""
        out = {}
        for key in ("attn", "logits", "q", "k", "v", "features"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class Capture:
    """Everything read from a backbone for one image.

    ``layers`` keeps the backbone's own layer order. ``meta`` records how the capture was
    made (timestep, inversion steps, input size, dtype) so that a result can say where it
    came from.
    """

    backbone: str
    image_size: tuple[int, int]
    layers: dict[str, LayerCapture] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerCapture:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def select(self, names: Iterable[str] | None = None, resolution: int | Iterable[int] | None = None,
               kind: str | None = None) -> list[LayerCapture]:
        """Layers filtered by name, resolution and kind.

        A name selects the layer of that exact name and every layer below it in the module
        tree: ``"up_blocks.1"`` selects ``"up_blocks.1.attentions.0..."`` but ``"blocks.1"``
        does not select ``"blocks.10"``."""
        if isinstance(resolution, int):
            resolution = {resolution}
        elif resolution is not None:
            resolution = set(resolution)
        names = list(names) if names is not None else None
        picked = []
        for layer in self.layers.values():
            if names is not None and not any(_name_matches(layer.name, n) for n in names):
                continue
            if resolution is not None and layer.resolution not in resolution:
                continue
            if kind is not None and layer.kind != kind:
                continue
            picked.append(layer)
        return picked

    def feature_layers(self, who: str = "this method", layer: str | None = None) -> list[LayerCapture]:
        """The layers that carry features, in capture order; with ``layer``, just that one.

        Raises :class:`~segbook.errors.GraphError` naming ``who`` when no layer has features,
        and listing the layers that do when ``layer`` is not among them."""
        candidates = [lc for lc in self.layers.values() if lc.features is not None]
        if not candidates:
            raise GraphError(f"{who} needs features and the capture has none: capture with "
                             "features=True (Stable Diffusion) or feature layers (CNN, "
                             "capture_attention(..., with_features=True))")
        if layer is None:
            return candidates
        picked = [lc for lc in candidates if lc.name == layer]
        if not picked:
            raise GraphError(f"no features for layer {layer!r}; captured: "
                             f"{[lc.name for lc in candidates]}")
        return picked

    def attention_by_resolution(self) -> dict[int, list[torch.Tensor]]:
        """Self-attention maps grouped by grid side: ``{64: [map, ...], 32: [...], ...}``.

        The input that :func:`segbook.graphs.aggregate_self_attention` expects.
        """
        groups: dict[int, list[torch.Tensor]] = {}
        for layer in self.layers.values():
            if layer.attn is not None:
                groups.setdefault(layer.resolution, []).append(layer.attn)
        return groups


def _name_matches(layer_name: str, wanted: str) -> bool:
    return layer_name == wanted or layer_name.startswith(wanted + ".")


class Backbone(ABC):
    """A loaded model that can be read from. Subclasses implement :meth:`capture`.

    Attributes
    ----------
    name : the registry name (``"sd14"``, ``"tiny-vit"``, ``"effnet-lite0"``, ...).
    family : ``"diffusion"``, ``"vit"`` or ``"cnn"``.
    device, dtype : where and in which precision the model runs.
    pretrained : False for the random-initialised miniatures.
    fingerprint : a short hash of the weights, part of every cache key.
    stand_in : True when the backbone's "attention" is a feature-similarity stand-in
        (the CNNs); chapters label such results.
    """

    name: str
    family: str
    device: torch.device
    dtype: torch.dtype
    pretrained: bool = True
    fingerprint: str = ""
    stand_in: bool = False

    @abstractmethod
    def layers(self) -> dict[str, dict[str, Any]]:
        """Layer name -> ``{"kind": ..., "grid": (h, w) or None, "heads": int}`` for a
        reference input size (grids depend on the input size for ViTs and CNNs)."""

    @abstractmethod
    def capture(self, image, layers=None, **options) -> Capture:
        """Run the model on ``image`` and return a :class:`Capture` of ``layers``.

        ``image`` is anything :func:`segbook.backbones.images.load_image` accepts or an
        ``(H, W, 3)`` uint8 array; ``layers`` selects by name, resolution or kind (each
        backbone documents its options)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype}, pretrained={self.pretrained})")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
