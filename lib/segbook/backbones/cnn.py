"""What the embedded CNN backbones share: multi-layer feature capture and the stand-in attention.

A CNN has no self-attention. So that the attention-based methods of the book (aggregation,
random walks, NCut on ``P`` or ``P P^T``) still run on a CPU with real pretrained weights,
the CNN backbones offer a **feature-similarity stand-in**:

.. math::

    P_{ij} = \\frac{\\exp(\\cos(x_i, x_j) / T)}{\\sum_k \\exp(\\cos(x_i, x_k) / T)}

where ``x_i`` is the concatenation of the L2-normalised feature vectors of a few layers at
position ``i`` (all brought to one grid), and ``T`` is a temperature. Each row is a
probability distribution over positions, as an attention row is, and ``P`` is what
:meth:`Capture.attention_by_resolution` returns for these backbones. It is **not** attention:
the backbones say so with ``stand_in = True`` and the chapters label such results.

The temperature sets how peaked the rows are, and with it the number of segments the
spectral methods find: on EfficientNet-Lite0 blocks 5 + 10, ``T = 0.1`` gives object-level
segments, ``0.05`` many more, ``0.02`` few (see ``IMPLEMENTATION_NOTES``). Calibrate it per
backbone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segbook.backbones.base import Backbone, Capture, LayerCapture
from segbook.backbones.images import load_image

_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | Path) -> str:
    """The first 16 hex digits of a weights file's sha256 (memoised per path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def similarity_attention(features: torch.Tensor, temperature: float = 0.1,
                         return_logits: bool = False):
    """The stand-in attention: row-softmax of cosine similarity over temperature.

    Parameters
    ----------
    features : ``(C, h, w)`` or ``(N, C)`` feature vectors (one per position).
    temperature : ``T > 0``; smaller is more peaked.
    return_logits : also return the pre-softmax scores ``cos / T``.

    Returns
    -------
    P : ``(N, N)`` float32, rows sum to 1 (row = query position, column = key position,
        row-major over the grid).
    logits : ``(N, N)``, only with ``return_logits``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    x = features.flatten(1).T if features.dim() == 3 else features
    if x.dim() != 2:
        raise ValueError(f"features must be (C, h, w) or (N, C), got {tuple(features.shape)}")
    x = F.normalize(x.float(), dim=1)
    logits = (x @ x.T) / temperature
    attn = torch.softmax(logits, dim=1)
    return (attn, logits) if return_logits else attn


class _StopForward(Exception):
    """Raised by a hook once every requested layer has been seen (saves the rest of the net)."""


class CNNBackbone(Backbone):
    """A pretrained CNN read through forward hooks on named modules.

    Subclasses set :attr:`model` (an ``nn.Module`` in eval mode), fill :attr:`_modules_by_name`
    (layer name -> (module, stride, channels)) and implement :meth:`preprocess`.

    Attributes
    ----------
    input_size : the square input side :meth:`capture` resizes to by default.
    default_layers : feature layers captured when ``layers`` is None.
    attention_layers : layers whose features make the stand-in attention by default.
    temperature : the stand-in's default temperature.
    """

    family = "cnn"
    stand_in = True
    input_size: int = 512
    default_layers: tuple[str, ...] = ()
    attention_layers: tuple[str, ...] = ()
    temperature: float = 0.1
    max_tokens: int = 16384  # a (16384, 16384) float32 map is 1 GiB

    def __init__(self, name: str, model: torch.nn.Module, modules_by_name: dict[str, tuple],
                 device: torch.device, dtype: torch.dtype, fingerprint: str):
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.pretrained = True
        self.model = model.to(device=self.device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._modules_by_name = modules_by_name

    # -- to be provided by subclasses ---------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> the network's ``(1, 3, H, W)`` input on its device."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor) -> None:
        """Run the network far enough for the hooks to fire."""
        self.model(x)

    # -- layer table -----------------------------------------------------------------------
    def layers(self, input_size: int | tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
        """Layer name -> ``{"kind": "features", "grid": (h, w), "heads": 1, "channels": C,
        "stride": s}`` for an input of ``input_size`` (default :attr:`input_size`)."""
        size = input_size or self.input_size
        h, w = (size, size) if isinstance(size, int) else size
        return {name: {"kind": "features", "grid": (math.ceil(h / s), math.ceil(w / s)),
                       "heads": 1, "channels": c, "stride": s}
                for name, (_, s, c) in self._modules_by_name.items()}

    def _select(self, layers, resolution, grid_table) -> list[str]:
        if layers is None:
            names = list(self.default_layers)
        elif layers == "all":
            names = list(self._modules_by_name)
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in self._modules_by_name]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} for {self.name}; "
                             f"valid layers: {', '.join(self._modules_by_name)}")
        if resolution is not None:
            wanted = {resolution} if isinstance(resolution, int) else set(resolution)
            pool = names if layers is not None else list(self._modules_by_name)
            names = [n for n in pool if max(grid_table[n]["grid"]) in wanted
                     or min(grid_table[n]["grid"]) in wanted]
            if not names:
                sides = sorted({grid_table[n]["grid"] for n in self._modules_by_name})
                raise ValueError(f"no layer of {self.name} has resolution {sorted(wanted)} at this "
                                 f"input size; grids available: {sides}")
        return names

    # -- reading -------------------------------------------------------------------------
    @torch.no_grad()
    def feature_maps(self, image, names: Sequence[str], size: int | None = None) -> dict[str, torch.Tensor]:
        """Raw block outputs ``{name: (C, h, w)}`` (float32, on the model's device).

        Parameters
        ----------
        image : anything :func:`load_image` accepts.
        names : layer names (see :meth:`layers`).
        size : square input side; None = :attr:`input_size`; 0 keeps the image's own size.
        """
        rgb = self._load(image, size)
        return self._feature_maps(self.preprocess(rgb), names)

    def _load(self, image, size) -> np.ndarray:
        size = self.input_size if size is None else size
        if size:
            return load_image(image, mode="square", size=int(size))
        return load_image(image)

    def _feature_maps(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = list(dict.fromkeys(names))
        out: dict[str, torch.Tensor] = {}
        handles = []

        def hook_for(name):
            def hook(_module, _inputs, output):
                out[name] = output[0].detach().float()
                if len(out) == len(wanted):
                    raise _StopForward
            return hook

        for name in wanted:
            module = self._modules_by_name[name][0]
            handles.append(module.register_forward_hook(hook_for(name)))
        try:
            self._run(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in wanted if n not in out]
        if missing:  # pragma: no cover - a wiring error in a subclass
            raise RuntimeError(f"layers {missing} of {self.name} produced no output")
        return out

    @torch.no_grad()
    def capture(self, image, layers=None, *, resolution=None, kind: str | None = None,
                size: int | None = None, temperature: float | None = None,
                attention_layers: Sequence[str] | None = None, logits: bool = False,
                qkv: bool = False, keep_on_device: bool = False,
                dtype: torch.dtype = torch.float32) -> Capture:
        """Capture block features and the stand-in attention for one image.

        Parameters
        ----------
        image : a path, PIL image or array (see :func:`segbook.backbones.images.load_image`).
        layers : feature layer names, ``"all"``, or None for :attr:`default_layers`.
        resolution : keep only feature layers whose grid side is this (int or ints).
        kind : None (features and stand-in attention), ``"features"`` or ``"self_attention"``
            (only the stand-in).
        size : square input side (None = :attr:`input_size`, 0 = the image's own size).
        temperature : the stand-in's ``T`` (None = :attr:`temperature`).
        attention_layers : layers whose L2-normalised features are concatenated for the
            stand-in (None = :attr:`attention_layers`); they are average-pooled to the
            smallest grid among them.
        logits : also keep ``cos / T`` (the pre-softmax scores).
        qkv : also keep ``q = k`` (the normalised concatenated features, ``(1, N, C)``) and
            ``v`` (the same features before normalisation).
        keep_on_device : leave tensors on the model's device (default: move to the CPU).
        dtype : dtype of the stored tensors (float32 by default: at 1024 tokens a map
            is 4 MiB, so there is no need to halve it).

        Returns
        -------
        Capture : feature layers (kind ``"features"``, ``features`` = ``(C, h, w)``) in
        network order, then one layer of kind ``"self_attention"`` named
        ``"similarity(<layers>)"`` holding ``attn`` ``(N, N)``. ``meta`` records the model
        input size, dtypes, weights fingerprint, temperature, attention layers and grid, and
        ``stand_in=True``.

        Raises
        ------
        ValueError : unknown layer names, an empty selection, a bad kind, or a stand-in
            with more than :attr:`max_tokens` positions (its memory is ``4 N^2`` bytes).
        """
        if kind not in (None, "features", "self_attention"):
            raise ValueError(f"kind must be None, 'features' or 'self_attention', got {kind!r}")
        rgb = self._load(image, size)
        table = self.layers(rgb.shape[:2])
        feature_names = [] if kind == "self_attention" else self._select(layers, resolution, table)
        want_attention = kind != "features"
        att_names = list(attention_layers or self.attention_layers) if want_attention else []
        if want_attention:
            unknown = [n for n in att_names if n not in self._modules_by_name]
            if unknown or not att_names:
                raise ValueError(f"attention_layers {att_names} invalid for {self.name}; "
                                 f"valid layers: {', '.join(self._modules_by_name)}")
            grid = min((table[n]["grid"] for n in att_names), key=lambda g: g[0] * g[1])
            n_tokens = grid[0] * grid[1]
            if n_tokens > self.max_tokens:
                raise ValueError(
                    f"the stand-in attention over a {grid[0]} x {grid[1]} grid has {n_tokens} "
                    f"positions ({4 * n_tokens ** 2 / 2 ** 30:.1f} GiB in float32), above "
                    f"max_tokens={self.max_tokens}; use a smaller input size or deeper layers")
        if not feature_names and not want_attention:
            raise ValueError("nothing to capture: the layer selection is empty")

        maps = self._feature_maps(self.preprocess(rgb), feature_names + att_names)
        T = float(self.temperature if temperature is None else temperature)

        def store(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dtype)
            return t if keep_on_device else t.cpu()

        cap = Capture(backbone=self.name, image_size=tuple(rgb.shape[:2]),
                      meta={"model_input_size": tuple(rgb.shape[:2]), "stand_in": True,
                            "fingerprint": self.fingerprint, "model_dtype": str(self.dtype),
                            "store_dtype": str(dtype)})
        order = list(self._modules_by_name)
        for name in sorted(feature_names, key=order.index):
            fmap = maps[name]
            cap.layers[name] = LayerCapture(name=name, kind="features", grid=tuple(fmap.shape[1:]),
                                            features=store(fmap), heads=1, reduction="none")
        if want_attention:
            h, w = grid
            pooled = [maps[n] if tuple(maps[n].shape[1:]) == (h, w)
                      else F.adaptive_avg_pool2d(maps[n][None], (h, w))[0] for n in att_names]
            # each layer normalised on its own, so that no layer dominates by its scale
            x = torch.cat([F.normalize(p.flatten(1), dim=0) for p in pooled], dim=0).T  # (N, C)
            attn, scores = similarity_attention(x, T, return_logits=True)
            name = f"similarity({'+'.join(att_names)})"
            cap.layers[name] = LayerCapture(
                name=name, kind="self_attention", grid=(h, w), attn=store(attn),
                logits=store(scores) if logits else None,
                q=store(F.normalize(x, dim=1)[None]) if qkv else None,
                k=store(F.normalize(x, dim=1)[None].clone()) if qkv else None,
                v=store(torch.cat(pooled).flatten(1).T[None]) if qkv else None,
                heads=1, reduction="none")
            cap.meta.update({"temperature": T, "attention_layers": tuple(att_names),
                             "attention_grid": (h, w)})
        return cap
