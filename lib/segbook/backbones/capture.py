"""What every attention-reading backbone shares: inputs, options, layer choice, the maths.

The diffusion and ViT backbones differ in *where* they find a layer's queries and keys
(diffusers attention processors, timm forward hooks); once Q, K, V of a layer are in hand,
turning them into what the papers read is the same code, here:

* :func:`as_image_tensor` turns the accepted image types into a ``(3, H, W)`` float tensor.
* :class:`CaptureOptions` says what to keep per layer and in which precision; its
  docstring lists what each option costs in memory.
* :func:`select_layer_names` picks layers by name, group, resolution or kind.
* :func:`record_attention` turns one layer's ``(H, N, d)`` queries/keys/values into a
  :class:`~segbook.backbones.base.LayerCapture`, one head at a time so that the transient
  memory stays at one ``N x N`` float32 map however many heads the layer has.
* :func:`capture_memory_bytes` is the arithmetic behind the memory tables.

The attention a layer computes is ``softmax(Q K^T / sqrt(d))`` per head (paper 2, eq. 6,
names the pre-softmax ``Q K^T / sqrt(d)`` the affinity; paper 1, section 3.1, and the
public code of both use the row-stochastic probabilities).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segbook.backbones.base import LayerCapture

HEAD_REDUCTIONS = ("mean", "sum", "none")

_FLOAT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------

def as_image_tensor(image: Any) -> torch.Tensor:
    """An image as a ``(3, H, W)`` float32 CPU tensor with values in ``[0, 1]``.

    Parameters
    ----------
    image : one of
        * an ``(H, W, 3)`` uint8 numpy array (what ``segbook.backbones.images.load_image``
          returns), or an ``(H, W, 3)`` float array in ``[0, 1]``;
        * a PIL image (converted to RGB);
        * a torch tensor ``(3, H, W)`` or ``(H, W, 3)``, uint8 or float in ``[0, 1]``
          (a leading batch dimension of 1 is accepted);
        * a path (``str`` or :class:`~pathlib.Path`), read with ``load_image`` when the
          image module is present, else with PIL.

    Raises
    ------
    TypeError : for other types or dtypes.
    ValueError : for a wrong shape, a non-finite value, or floats outside ``[0, 1]``.
    """
    if isinstance(image, (str, Path)):
        image = _read_image_file(Path(image))
    try:
        from PIL import Image as _PIL
        if isinstance(image, _PIL.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer)
                                           or np.issubdtype(image.dtype, np.floating)):
            raise TypeError(f"image array dtype must be uint8 or float, got {image.dtype}")
        array = np.ascontiguousarray(image)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise TypeError("image must be an (H, W, 3) numpy array, a PIL image, a torch tensor "
                        f"or a path, got {type(image).__name__}")

    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise ValueError(f"image must have 3 dimensions (H, W, 3) or (3, H, W), got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.shape[-1] == 3 and tensor.shape[0] != 3:
        tensor = tensor.permute(2, 0, 1)
    elif tensor.shape[0] != 3:
        raise ValueError(f"image must have 3 colour channels, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] < 2 or tensor.shape[2] < 2:
        raise ValueError(f"image is too small: {tuple(tensor.shape)}")

    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    if tensor.dtype in (torch.int16, torch.int32, torch.int64):
        if tensor.min() < 0 or tensor.max() > 255:
            raise ValueError("integer images must hold values in 0..255")
        return tensor.float().div_(255.0)
    if not tensor.is_floating_point():
        raise TypeError(f"image dtype must be uint8 or float, got {tensor.dtype}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError("image contains NaN or infinite values")
    if tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3:
        raise ValueError("float images must hold values in [0, 1] (divide uint8 data by 255); "
                         f"got range [{tensor.min().item():.3g}, {tensor.max().item():.3g}]")
    return tensor.clamp_(0.0, 1.0).contiguous()


def _read_image_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        from segbook.backbones.images import load_image
    except ImportError:
        load_image = None
    if load_image is not None:
        return load_image(path)
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureOptions:
    """What to keep per selected layer, and how.

    Memory per layer with ``N`` tokens, ``H`` heads of width ``d``, ``C`` channels and
    ``b`` bytes per stored value (2 for float16, 4 for float32):

    ========================  ===================================  =========================
    option                    stored                               bytes per layer
    ========================  ===================================  =========================
    ``attn`` (heads reduced)  ``(N, N)`` probabilities             ``N^2 b``
    ``attn`` + ``heads="none"`` ``(H, N, N)``                      ``H N^2 b``
    ``logits``                pre-softmax scores, same shape       same as ``attn`` again
    ``qkv``                   Q, K, V, each ``(H, N, d)``          ``3 N H d b``
    ``features``              the layer's output ``(C, h, w)``     ``N C b``
    ========================  ===================================  =========================

    At a 64 x 64 grid (N = 4096) one ``N x N`` map is 32 MiB in float16 and 64 MiB in
    float32, so ``heads="none"`` with ``dtype=torch.float32`` is the expensive corner. While
    a layer is processed, one extra ``N x N`` float32 buffer per head in ``head_chunk`` holds
    the scores and then, in place, the probabilities, plus one float32 accumulator when
    heads are reduced: about 160 MiB of transient memory at N = 4096 with the defaults
    (measured on the CPU: 156 MiB peak growth, 1.4 s for 8 heads of width 40 on one core).
    Nothing else of the layer outlives its forward call.

    Attributes
    ----------
    attn : keep the self-attention probabilities (rows sum to 1 for ``"mean"``/``"none"``).
    heads : ``"mean"`` (default: rows stay probabilities; equal to paper 1's head *sum*
        followed by the row normalisation its aggregation relies on), ``"sum"`` (rows sum
        to ``H``, as DiffSeg's code accumulates before normalising) or ``"none"`` (keep
        every head).
    logits : also keep the pre-softmax scores ``Q K^T / sqrt(d)`` (paper 2, eq. 6), reduced
        over heads like ``attn``.
    qkv : keep the per-head queries, keys and values ``(H, N, d)``.
    features : keep the layer's output as ``(C, h, w)``.
    dtype : precision of what is stored (float16 by default; the maths runs in float32).
    keep_on_device : leave the stored tensors on the model's device (default: move to CPU).
    head_chunk : heads processed together; transient memory is ``head_chunk x N^2 x 4`` bytes.
    """

    attn: bool = True
    heads: str = "mean"
    logits: bool = False
    qkv: bool = False
    features: bool = False
    dtype: torch.dtype = torch.float16
    keep_on_device: bool = False
    head_chunk: int = 1

    def __post_init__(self):
        if self.heads not in HEAD_REDUCTIONS:
            raise ValueError(f"heads must be one of {HEAD_REDUCTIONS}, got {self.heads!r}")
        if self.dtype not in _FLOAT_BYTES:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        if int(self.head_chunk) < 1:
            raise ValueError("head_chunk must be >= 1")
        if not (self.attn or self.logits or self.qkv or self.features):
            raise ValueError("nothing to capture: set at least one of attn, logits, qkv, features")

    @classmethod
    def build(cls, options: CaptureOptions | None = None, **overrides) -> CaptureOptions:
        """Options from an existing instance and/or keyword overrides (unknown keys raise)."""
        base = options if options is not None else cls()
        valid = set(cls.__dataclass_fields__)
        unknown = set(overrides) - valid
        if unknown:
            raise TypeError(f"unknown capture option(s) {sorted(unknown)}; valid: {sorted(valid)}")
        return replace(base, **overrides) if overrides else base


# --------------------------------------------------------------------------------------
# layer choice
# --------------------------------------------------------------------------------------

def select_layer_names(available: Mapping[str, Mapping[str, Any]],
                       layers: str | Iterable[str] | None = None,
                       resolution: int | Iterable[int] | None = None,
                       kind: str | None = None,
                       groups: Mapping[str, list[str]] | None = None,
                       default: str | None = None) -> list[str]:
    """Choose layers from a backbone's table, keeping the backbone's order.

    Parameters
    ----------
    available : name -> ``{"kind": ..., "grid": (h, w), ...}`` (from ``Backbone.layers()``).
    layers : None (the backbone's ``default`` group), a group name (``"decoder"``,
        ``"all"``, ...), an exact layer name, a name prefix ending at a dot boundary
        (``"up_blocks.1.attentions"`` picks every layer inside it), or a list of these. An
        exact name wins over a prefix: ``"up_blocks.1"`` is that block's output where the
        backbone lists it; write ``"up_blocks.1."`` (trailing dot) for the layers inside.
    resolution : keep only layers whose grid side is one of these.
    kind : keep only layers of this kind (``"self_attention"`` or ``"features"``).
    groups : group name -> layer names.
    default : the group used when ``layers`` is None.

    Raises
    ------
    ValueError : for a name that matches nothing (the message lists groups and names), a
        kind that no layer has, or a selection that ends up empty.
    """
    groups = dict(groups or {})
    if layers is None:
        layers = default if default is not None else list(available)
    requested = [layers] if isinstance(layers, str) else list(layers)
    chosen: set[str] = set()
    for item in requested:
        if not isinstance(item, str):
            raise TypeError(f"layer selectors must be strings, got {type(item).__name__}")
        if item in groups:
            chosen.update(groups[item])
        elif item in available:
            chosen.add(item)
        else:
            prefix = item.rstrip(".") + "."
            matched = [n for n in available if n.startswith(prefix)]
            if not matched:
                raise ValueError(f"unknown layer {item!r}; groups: {sorted(groups)}; "
                                 f"layers: {', '.join(available)}")
            chosen.update(matched)
    if kind is not None:
        kinds = {info["kind"] for info in available.values()}
        if kind not in kinds:
            raise ValueError(f"unknown layer kind {kind!r}; this backbone has {sorted(kinds)}")
    if resolution is not None:
        resolution = {resolution} if isinstance(resolution, int) else set(resolution)
    picked = []
    for name, info in available.items():
        if name not in chosen:
            continue
        if kind is not None and info["kind"] != kind:
            continue
        if resolution is not None and grid_side(info["grid"]) not in resolution:
            continue
        picked.append(name)
    if not picked:
        raise ValueError(f"no layer matches layers={layers!r}, resolution={resolution}, "
                         f"kind={kind!r}")
    return picked


def grid_side(grid: tuple[int, int]) -> int:
    """The side of a square grid, else the square root of its token count, rounded."""
    h, w = grid
    return h if h == w else round(math.sqrt(h * w))


# --------------------------------------------------------------------------------------
# the maths of one layer
# --------------------------------------------------------------------------------------

def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(Q K^T * scale), Q K^T * scale)`` per head, in float32.

    ``q`` and ``k`` are ``(..., N, d)``; ``scale`` defaults to ``1 / sqrt(d)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1), logits


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dimension, in place (no second N x N buffer)."""
    scores -= scores.amax(dim=-1, keepdim=True)
    scores.exp_()
    scores /= scores.sum(dim=-1, keepdim=True)
    return scores


def record_attention(name: str, grid: tuple[int, int], q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor | None, options: CaptureOptions, scale: float | None = None,
                     features: torch.Tensor | None = None, kind: str = "self_attention",
                     prefix_tokens: int = 0) -> LayerCapture:
    """Turn one layer's per-head projections into a :class:`LayerCapture`.

    Parameters
    ----------
    name, grid, kind : copied to the result; ``grid`` is the patch-token grid ``(h, w)``.
    q, k, v : ``(H, T, d)`` for a single image, ``T = prefix_tokens + h * w``.
    options : what to keep (:class:`CaptureOptions`).
    scale : the layer's softmax scale (default ``1 / sqrt(d)``).
    features : the layer's output tokens ``(T, C)`` (prefix tokens first), if wanted.
    prefix_tokens : CLS/register tokens in front of the patch tokens. They are kept only
        when the caller passes ``prefix_tokens > 0`` *and* wants them in the maps; a caller
        that drops them slices them off before calling (the softmax then runs over patch
        keys only, which is the same as renormalising the full map's patch columns).

    Returns
    -------
    LayerCapture with ``attn`` (``(T, T)`` or ``(H, T, T)``), ``logits``, ``q``/``k``/``v``
    and ``features`` (``(C, h, w)``, patch tokens only) as the options ask.
    """
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (heads, tokens, dim); got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    heads, tokens, _ = q.shape
    h, w = grid
    if tokens != prefix_tokens + h * w:
        raise ValueError(f"layer {name}: {tokens} tokens do not fit grid {grid} plus "
                         f"{prefix_tokens} prefix tokens")
    if not torch.isfinite(q).all() or not torch.isfinite(k).all():
        raise FloatingPointError(f"layer {name}: non-finite queries or keys (the model "
                                 "overflowed; run it in float32)")
    out_device = q.device if options.keep_on_device else torch.device("cpu")
    store = {"dtype": options.dtype, "device": out_device}

    attn = logits = None
    if options.attn or options.logits:
        keep_heads = options.heads == "none"
        shape = (heads, tokens, tokens) if keep_heads else (tokens, tokens)
        if keep_heads:
            attn = torch.empty(shape, **store) if options.attn else None
            logits = torch.empty(shape, **store) if options.logits else None
        else:
            attn = torch.zeros(shape, dtype=torch.float32, device=q.device) if options.attn else None
            logits = (torch.zeros(shape, dtype=torch.float32, device=q.device)
                      if options.logits else None)
        step = int(options.head_chunk)
        for start in range(0, heads, step):
            stop = min(start + step, heads)
            # one (chunk, N, N) float32 buffer: the scores, then (in place) the probabilities
            scores = torch.matmul(q[start:stop].float(), k[start:stop].float().transpose(-1, -2))
            scores *= scale if scale is not None else q.shape[-1] ** -0.5
            if logits is not None:
                if keep_heads:
                    logits[start:stop] = scores.to(**store)
                else:
                    logits += scores.sum(0)
            if attn is not None:
                _softmax_(scores)
                if keep_heads:
                    attn[start:stop] = scores.to(**store)
                else:
                    attn += scores.sum(0) if stop - start > 1 else scores[0]
            del scores
        if not keep_heads:
            if options.heads == "mean":
                if attn is not None:
                    attn /= heads
                if logits is not None:
                    logits /= heads
            attn = attn.to(**store) if attn is not None else None
            logits = logits.to(**store) if logits is not None else None

    result = LayerCapture(name=name, kind=kind, grid=(int(h), int(w)), attn=attn,
                          logits=logits, heads=int(heads), reduction=options.heads)
    result.prefix_tokens = int(prefix_tokens)
    if options.qkv:
        result.q = q.detach().to(**store)
        result.k = k.detach().to(**store)
        result.v = v.detach().to(**store) if v is not None else None
    if options.features and features is not None:
        result.features = tokens_to_grid(features[prefix_tokens:], grid).to(**store)
    return result


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(h * w, C)`` row-major tokens -> ``(C, h, w)``."""
    h, w = grid
    if tokens.ndim != 2 or tokens.shape[0] != h * w:
        raise ValueError(f"expected ({h * w}, C) tokens for grid {grid}, got {tuple(tokens.shape)}")
    return tokens.detach().transpose(0, 1).reshape(tokens.shape[1], h, w)


# --------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------

def weights_fingerprint(root: Path, files: list[str]) -> str:
    """A short hash of file names, sizes and the first and last MiB of each weight file."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        path = root / rel
        size = path.stat().st_size
        digest.update(f"{rel}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer (for the small random models)."""
    digest = hashlib.sha256()
    for module in modules:
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# memory arithmetic
# --------------------------------------------------------------------------------------

def capture_memory_bytes(layers: Iterable[Mapping[str, Any]], options: CaptureOptions) -> int:
    """Bytes that a capture of ``layers`` keeps, by the table in :class:`CaptureOptions`.

    Parameters
    ----------
    layers : entries with ``"grid"`` ``(h, w)``, ``"heads"`` and, for ``qkv``/``features``,
        ``"channels"`` (``H * d`` for attention layers) ; prefix tokens are ignored.
    options : the capture options.

    Returns
    -------
    int : the total stored bytes (not counting the model, nor the transient float32 maps).
    """
    b = _FLOAT_BYTES[options.dtype]
    total = 0
    for info in layers:
        h, w = info["grid"]
        n = h * w
        heads = int(info.get("heads", 1))
        channels = int(info.get("channels", 0))
        per_map = n * n * b * (heads if options.heads == "none" else 1)
        if info.get("kind", "self_attention") == "self_attention":
            total += per_map * (int(options.attn) + int(options.logits))
            if options.qkv:
                total += 3 * n * channels * b
        if options.features:
            total += n * channels * b
    return total


def format_bytes(n: int) -> str:
    """``123456789`` -> ``"117.7 MiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
