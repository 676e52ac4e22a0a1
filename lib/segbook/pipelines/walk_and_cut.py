"""Paper 1's pipeline as one call: diffuse, walk, cut, upsample.

*Unsupervised Segmentation by Diffusing, Walking and Cutting* (paper 1):

1. capture self-attention of the U-Net decoder after DDIM inversion (10 of 50 steps), heads
   averaged (section 3.1) -- :meth:`StableDiffusionBackbone.capture` with ``mode="inverted"``;
2. aggregate the resolutions 8/16/32/64 with DiffSeg's weights into a row-stochastic ``P``
   (section 3.1) -- :func:`segbook.graphs.aggregate_self_attention`;
3. either (a) NCut on the random walk ``P`` itself (section 3.2) with a fixed threshold, or
   (b) ``A = P^k (P^k)^T`` ("dot") or the cosine of the rows of ``P^k`` (section 3.3), cut by
   recursive NCut (section 3.4) with a fixed threshold or a MAN-C stop (section 3.5);
4. mean attention row per segment, and every pixel to the segment of highest cosine similarity
   with its bilinearly upsampled row (section 3.6) -- :func:`~segbook.pipelines.upsample.cosine_upsample`;
5. optionally PAMR (paper 1, Table 5; :func:`segbook.groupers.pamr.refine_labels`).

:func:`segment_attention` runs steps 2-5 on captured maps (or on a ready ``P``),
:func:`walk_and_cut` runs 1-5 on an image, :func:`run_batch` on a list of images. Every
result records per-step wall time and the peak memory of the call.

Nothing here forms ``A``: the NCut solver only needs products ``A X = P^k ((P^k)^T X)``
(:class:`~segbook.graphs.operators.FactoredAffinity`), and the upsampling never forms the
``(H W) x N`` matrix of upsampled rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from segbook.errors import GraphError
from segbook.graphs.attention import (
    aggregate_self_attention,
    check_row_stochastic,
    power_walk,
    token_grid,
)
from segbook.graphs.operators import FactoredAffinity
from segbook.groupers.ncut import STOP_RULES, random_walk_ncut, recursive_ncut
from segbook.upsamplers.labels import cosine_upsample, nearest_upsample

__all__ = ["SegmentationResult", "WalkAffinity", "WalkAndCutConfig", "WalkAndCutResult",
           "capture_attention", "peak_memory", "run_batch",
           "segment_attention", "walk_and_cut"]

METHODS = ("adjacency", "random_walk")
ADJACENCIES = ("dot", "cosine")
UPSAMPLERS = ("cosine", "nearest")
STEPS = ("capture", "aggregate", "power_walk", "adjacency", "ncut", "upsample", "pamr", "total")


# -- configuration and result ---------------------------------------------------------------
@dataclass(frozen=True)
class WalkAndCutConfig:
    """Settings of paper 1's pipeline (defaults: its best variant, dot product, k = 1, MAN-C).

    Parameters
    ----------
    method : ``"adjacency"`` (section 3.3: NCut on ``A`` built from ``P^k``) or
        ``"random_walk"`` (section 3.2: NCut on ``P`` itself, fixed threshold).
    adjacency : ``"dot"`` (``A = P^k (P^k)^T``) or ``"cosine"`` (cosine of the rows of ``P^k``).
    k : walk length, ``P^k`` before the adjacency (section 3.3; Table 2 uses 1-5).
    resolutions : the attention resolutions aggregated (None: every captured one), e.g.
        ``(16, 32, 64)``; weights are DiffSeg's, renormalised over the subset.
    stop : ``"manc"`` (NCut vs the MAN-C threshold), ``"scaled_mincut"`` (cut / T vs MAN-C) or
        ``"threshold"`` (NCut vs ``threshold``) -- section 3.5. The random walk always uses
        ``"threshold"``.
    threshold : the NCut threshold for ``stop="threshold"`` and the random walk (paper 1:
        0.4-0.6 for the adjacency, Table 1; 0.3 for the random walk, Table 4).
    min_size : smallest segment in tokens (both sides of a split keep at least this many).
    max_depth : deepest split (None: no limit).
    upsample : ``"cosine"`` (section 3.6) or ``"nearest"`` (token labels repeated).
    out_size : ``(H, W)`` of the label map (None: the image's size, else the capture's input
        size).
    pamr : refine the labels with PAMR (10 iterations, dilations 1, 2, 4, 8, 3 x 3 median; Table 5).
        Needs the image.
    seed : seed of the eigen-solvers' start vectors (results are deterministic).
    tol : residual tolerance of the Fiedler-vector solver
        (:func:`~segbook.groupers.ncut.fiedler_vector`).
    """

    method: str = "adjacency"
    adjacency: str = "dot"
    k: int = 1
    resolutions: tuple[int, ...] | None = None
    stop: str = "manc"
    threshold: float | None = None
    min_size: int = 2
    max_depth: int | None = None
    upsample: str = "cosine"
    out_size: tuple[int, int] | None = None
    pamr: bool = False
    seed: int = 0
    tol: float = 1e-4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {self.adjacency!r}")
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {STOP_RULES}, got {self.stop!r}")
        needs_threshold = self.method == "random_walk" or self.stop == "threshold"
        if needs_threshold and (self.threshold is None or not math.isfinite(self.threshold)
                                or self.threshold <= 0):
            what = "the random walk" if self.method == "random_walk" else "stop='threshold'"
            raise ValueError(f"{what} needs a positive NCut threshold (paper 1: 0.3 for the "
                             f"random walk, 0.4-0.6 for the adjacency), got {self.threshold!r}")
        if self.method == "random_walk" and self.k != 1:
            raise ValueError("the random-walk method cuts P itself; k applies to method='adjacency'")
        if self.resolutions is not None:
            res = tuple(sorted(int(r) for r in self.resolutions))
            if not res or any(r < 1 for r in res):
                raise ValueError(f"resolutions must be positive grid sides, got {self.resolutions}")
            object.__setattr__(self, "resolutions", res)
        if int(self.min_size) != self.min_size or self.min_size < 1:
            raise ValueError(f"min_size must be a positive integer, got {self.min_size!r}")
        if self.max_depth is not None and (int(self.max_depth) != self.max_depth
                                           or self.max_depth < 0):
            raise ValueError(f"max_depth must be None or >= 0, got {self.max_depth!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"tol must be a positive number, got {self.tol!r}")
        if self.upsample not in UPSAMPLERS:
            raise ValueError(f"upsample must be one of {UPSAMPLERS}, got {self.upsample!r}")
        if self.out_size is not None:
            object.__setattr__(self, "out_size", _size2(self.out_size))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SegmentationResult:
    """One image's segmentation, with what it cost.

    Attributes
    ----------
    labels : (H, W) int64 label map, ``0..K-1``.
    token_labels : (h, w) int64 labels on the token grid (before upsampling).
    n_segments : ``K``, distinct labels in ``labels``.
    tree : the split tree (list of :class:`~segbook.groupers.ncut.SplitNode`) or None.
    timings : step -> seconds (``capture``, ``aggregate``, ``power_walk``, ``adjacency``,
        ``ncut``, ``upsample``, ``pamr``, ``total``; 0 for a step not run).
    peak_memory_bytes : peak resident memory during the call (CPU), or
        ``torch.cuda.max_memory_allocated`` when the work ran on a GPU.
    backbone : the backbone's name (None for attention given directly).
    stand_in : True when the attention is a CNN's feature-similarity stand-in.
    config : the settings (a :class:`WalkAndCutConfig` or a grouper's parameters).
    method : the grouper's name.
    """

    labels: np.ndarray
    token_labels: np.ndarray
    n_segments: int
    tree: list | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    backbone: str | None = None
    stand_in: bool = False
    config: Any = None
    method: str = "walk_and_cut"


@dataclass
class WalkAndCutResult(SegmentationResult):
    """The result of :func:`walk_and_cut` / :func:`segment_attention` (see
    :class:`SegmentationResult`)."""


def _size2(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise ValueError(f"sizes must be positive, got {size}")
    return H, W


# -- memory and time ------------------------------------------------------------------------
def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# Nesting level of peak_memory() and whether the outermost block could reset VmHWM: only the
# outermost block resets the counter.
_PEAK_STATE = {"depth": 0, "reset": False}


@contextmanager
def peak_memory(device=None):
    """Measure the peak memory of a block: ``with peak_memory() as peak: ...; peak["bytes"]``.

    On a CUDA device: ``torch.cuda.max_memory_allocated`` after a reset. On the CPU: the peak
    resident set size of the process (``VmHWM``, reset at entry where Linux allows it; else the
    process's lifetime peak from ``getrusage``, an upper bound). ``peak["start"]`` is the
    resident set size at entry (CPU), so ``bytes - start`` is what the block added. Nested
    blocks do not reset the counter (the outer block's peak stays exact; an inner block reports
    the peak since the outer one began, an upper bound of its own).
    """
    out = {"bytes": 0, "kind": "cpu_rss", "start": _read_status("VmRSS") or 0}
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    outermost = _PEAK_STATE["depth"] == 0
    if cuda:
        torch.cuda.synchronize(device)
        if outermost:
            torch.cuda.reset_peak_memory_stats(device)
        out["kind"] = "cuda_allocated"
    if outermost:
        _PEAK_STATE["reset"] = _reset_rss_peak()
    reset = _PEAK_STATE["reset"]
    _PEAK_STATE["depth"] += 1
    try:
        yield out
    finally:
        _PEAK_STATE["depth"] -= 1
        if cuda:
            torch.cuda.synchronize(device)
            out["bytes"] = int(torch.cuda.max_memory_allocated(device))
        else:
            peak = _read_status("VmHWM") if reset else None
            if peak is None:
                import resource
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                out["kind"] = "cpu_rss_lifetime"
            out["bytes"] = int(peak)


class _Clock:
    """Per-step wall time (synchronising CUDA so that GPU steps are timed, not queued)."""

    def __init__(self, device=None):
        self.times = {step: 0.0 for step in STEPS}
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.start = time.perf_counter()

    @contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.times[name] += time.perf_counter() - t0

    def finish(self, extra: float = 0.0) -> dict[str, float]:
        self.times["total"] = time.perf_counter() - self.start + extra
        return dict(self.times)


# -- aggregation ----------------------------------------------------------------------------
# One implementation of each check and of the aggregation: segbook.graphs.
_check_stochastic = check_row_stochastic


def _as_map(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if not t.is_floating_point():
        raise GraphError(f"attention maps must be floating point, got {t.dtype}")
    return t




# -- the graph ------------------------------------------------------------------------------
class WalkAffinity(FactoredAffinity):
    """``A = F F^T`` for ``F = P^k`` (paper 1, section 3.3), as the NCut solver reads it.

    A :class:`~segbook.graphs.operators.FactoredAffinity` (no ``N x N`` matrix besides ``F``)
    that keeps ``F``'s float32 (or float64) storage and is not validated again: the pipeline
    checked ``P`` on the way in. Everything else (Gram-block prefix weights, subgraphs that
    inherit their self-loops, the reused working buffer of the recursion) is
    ``FactoredAffinity``'s.
    """

    def __init__(self, F, diagonal: np.ndarray | None = None):
        super().__init__(F, dtype=torch.float32 if F.dtype != torch.float64 else torch.float64,
                         validate=False, diagonal=diagonal)


# -- the pipeline ---------------------------------------------------------------------------
def _as_transition(P, grid, validate: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    P = _as_map(P)
    if P.ndim == 4:
        h, w = P.shape[:2]
        if tuple(P.shape[2:]) != (h, w):
            raise GraphError(f"a 4-d attention tensor must be (h, w, h, w), got {tuple(P.shape)}")
        P, grid = P.reshape(h * w, h * w), (h, w) if grid is None else grid
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise GraphError(f"P must be a square (N, N) transition matrix, got {tuple(P.shape)}")
    if P.dtype not in (torch.float32, torch.float64):
        P = P.float()
    if validate:
        _check_stochastic(P)
    return P, token_grid(P.shape[0], grid, what="P")


def _image_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return arr
    if isinstance(image, np.ndarray):
        return image
    from segbook.backbones.images import load_image
    return load_image(image)


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image
    H, W = size
    return np.array(Image.fromarray(image).resize((W, H), Image.BILINEAR))


def _renumber(labels: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def _pamr_refine(image, labels: np.ndarray) -> np.ndarray:
    from segbook.groupers.pamr import refine_labels
    if image is None:
        raise ValueError("pamr=True needs the image (pass image=...)")
    rgb = _resize_image(_image_array(image), labels.shape)
    return refine_labels(rgb, labels)


def _cut(P: torch.Tensor, config: WalkAndCutConfig, clock: _Clock):
    """Steps 3 of the pipeline; returns (token labels, tree, rows used for upsampling)."""
    if config.method == "random_walk":
        with clock.step("ncut"):
            result = random_walk_ncut(P, threshold=config.threshold, min_size=config.min_size,
                                      max_depth=config.max_depth, seed=config.seed,
                                      device=P.device)
        return result.labels, result.tree, P
    with clock.step("power_walk"):
        Pk = P if config.k == 1 else power_walk(P, config.k, validate=False)
    with clock.step("adjacency"):
        # Factored: A = F F^T with F = P^k (or its rows L2-normalised); A is never formed.
        # P was checked (finite, non-negative) on the way in, so F needs no second check.
        if config.adjacency == "dot":
            factor = Pk
        else:
            norms = Pk.norm(dim=1, keepdim=True)
            if (norms == 0).any():
                raise GraphError("a row of P^k is all zero: its cosine similarity is undefined")
            factor = Pk / norms
        op = WalkAffinity(factor)
    with clock.step("ncut"):
        result = recursive_ncut(op, stop=config.stop, threshold=config.threshold,
                                min_size=config.min_size, max_depth=config.max_depth,
                                seed=config.seed, tol=config.tol, validate=False)
    return result.labels, result.tree, Pk


def segment_attention(attn, config: WalkAndCutConfig | None = None, out_size=None, image=None,
                      grid=None, device=None, **overrides) -> WalkAndCutResult:
    """Everything after capture: aggregation, ``P^k``, adjacency, NCut, upsampling, PAMR.

    Parameters
    ----------
    attn : ``{resolution: maps}`` as :meth:`Capture.attention_by_resolution` returns (or a
        :class:`~segbook.backbones.base.Capture`), aggregated with DiffSeg's weights over
        ``config.resolutions``; or one row-stochastic ``P`` ``(N, N)`` (or ``(h, w, h, w)``)
        already aggregated.
    config : :class:`WalkAndCutConfig` (default: paper 1's best variant); keyword ``overrides``
        replace its fields (``segment_attention(maps, k=3)``).
    out_size : ``(H, W)`` of the labels; default ``config.out_size``, else the image's size,
        else the token grid (no upsampling).
    image : the image (array, tensor, PIL or path), for PAMR and the default ``out_size``.
    grid : ``(h, w)`` of a non-square token grid (default: square).
    device : run on this torch device (default: where the maps are).

    Returns
    -------
    :class:`WalkAndCutResult`.

    Raises
    ------
    GraphError for maps or ``P`` that are not row-stochastic, contain NaN, or have the wrong
    shape; ValueError for unknown options.
    """
    config = replace(config or WalkAndCutConfig(), **overrides) if overrides \
        else (config or WalkAndCutConfig())
    if not isinstance(config, WalkAndCutConfig):
        raise TypeError(f"config must be a WalkAndCutConfig, got {type(config).__name__}")
    from segbook.backbones.base import Capture
    backbone, stand_in = None, False
    if isinstance(attn, Capture):
        backbone, stand_in = attn.backbone, bool(attn.meta.get("stand_in", False))
        attn = attn.attention_by_resolution()
    rgb = _image_array(image) if image is not None else None
    with peak_memory(device) as peak:
        clock = _Clock(device)
        with torch.no_grad():
            with clock.step("aggregate"):
                if isinstance(attn, Mapping):
                    P = aggregate_self_attention(attn, resolutions=config.resolutions,
                                                 device=device)
                    # a convex combination of checked maps: row-stochastic by construction
                    P, hw = _as_transition(P, grid, validate=False)
                else:
                    if config.resolutions is not None:
                        raise ValueError("config.resolutions selects maps to aggregate; a ready "
                                         "P has none (pass the per-resolution maps)")
                    P, hw = _as_transition(attn if device is None else _as_map(attn).to(device),
                                           grid)
            token_labels, tree, rows = _cut(P, config, clock)
            size = out_size if out_size is not None else config.out_size
            if size is None:
                size = rgb.shape[:2] if rgb is not None else hw
            size = _size2(size)
            with clock.step("upsample"):
                if size == hw:
                    labels = torch.from_numpy(token_labels.reshape(hw))
                elif config.upsample == "cosine":
                    labels = cosine_upsample(rows, token_labels, hw, size)
                else:
                    labels = nearest_upsample(token_labels, hw, size)
                labels = labels.cpu().numpy()
            if config.pamr:
                with clock.step("pamr"):
                    labels = _pamr_refine(rgb, labels)
            labels = _renumber(labels)
        timings = clock.finish()
    return WalkAndCutResult(labels=labels, token_labels=token_labels.reshape(hw).astype(np.int64),
                            n_segments=int(labels.max()) + 1, tree=tree, timings=timings,
                            peak_memory_bytes=peak["bytes"], backbone=backbone,
                            stand_in=stand_in, config=config, method="walk_and_cut")


def capture_attention(image, backbone, capture_kwargs: Mapping | None = None,
                      progress: bool = True, with_features: bool = False):
    """Capture what paper 1 reads (section 3.1) with the settings of each backbone family.

    ``StableDiffusionBackbone``: decoder self-attention (``layers="decoder"``) after DDIM
    inversion for 10 of 50 steps (``mode="inverted"``). CNN backbones: their feature-similarity
    stand-in (``kind="self_attention"``). Other backbones: their own defaults.
    ``with_features`` also keeps features (the attention layers' outputs for Stable Diffusion,
    the feature layers for CNNs), for DiffCut. ``capture_kwargs`` override these.
    """
    kwargs = dict(capture_kwargs or {})
    family = getattr(backbone, "family", None)
    if family == "diffusion":
        defaults = {"layers": "decoder", "mode": "inverted", "num_inference_steps": 50,
                    "inversion_steps": 10, "progress": progress}
        if with_features:
            defaults["features"] = True
    elif family == "cnn":
        defaults = {} if with_features else {"kind": "self_attention"}
    else:
        defaults = {}
    return backbone.capture(image, **{**defaults, **kwargs})


def walk_and_cut(image, backbone, config: WalkAndCutConfig | None = None,
                 capture_kwargs: Mapping | None = None, progress: bool = True,
                 **overrides) -> WalkAndCutResult:
    """Paper 1 end to end on one image: capture (section 3.1), then :func:`segment_attention`.

    Parameters
    ----------
    image : path, PIL image, ``(H, W, 3)`` uint8 array or tensor.
    backbone : a loaded :class:`~segbook.backbones.base.Backbone` (``load_backbone("sd14")``,
        ``"tiny-sd"``, ``"effnet-lite0"``, ...).
    config : :class:`WalkAndCutConfig`; keyword ``overrides`` replace its fields.
    capture_kwargs : passed to the backbone's ``capture`` (see :func:`capture_attention`).
    progress : the DDIM inversion's progress bar.

    Returns
    -------
    :class:`WalkAndCutResult` whose ``labels`` have the image's size (or ``config.out_size``),
    with the capture's time in ``timings["capture"]`` and ``total``, and the peak memory of
    the whole call.

    Examples
    --------
    >>> bb = load_backbone("tiny-sd")                                       # doctest: +SKIP
    >>> res = walk_and_cut(image, bb, WalkAndCutConfig(k=2))                # doctest: +SKIP
    >>> res.labels.shape, res.n_segments, res.timings["ncut"]               # doctest: +SKIP
    """
    config = replace(config or WalkAndCutConfig(), **overrides) if overrides \
        else (config or WalkAndCutConfig())
    rgb = _image_array(image)
    device = getattr(backbone, "device", None)
    with peak_memory(device) as peak:
        t0 = time.perf_counter()
        cap = capture_attention(rgb, backbone, capture_kwargs, progress)
        if getattr(backbone, "device", None) is not None and \
                torch.device(backbone.device).type == "cuda":
            torch.cuda.synchronize()
        t_capture = time.perf_counter() - t0
        out = segment_attention(cap, config, image=rgb,
                                device=device if device is not None and
                                torch.device(device).type == "cuda" else None)
    out.timings["capture"] = t_capture
    out.timings["total"] += t_capture
    out.peak_memory_bytes = max(peak["bytes"], out.peak_memory_bytes)
    out.backbone = getattr(backbone, "name", out.backbone)
    out.stand_in = bool(getattr(backbone, "stand_in", out.stand_in))
    return out


def run_batch(images, backbone, config: WalkAndCutConfig | None = None,
              capture_kwargs: Mapping | None = None, progress: bool = True, out_size=None,
              **overrides) -> list[WalkAndCutResult]:
    """:func:`walk_and_cut` on each image, with a progress bar (per-image timings and memory
    are in each result).

    Parameters
    ----------
    images : an iterable of images (paths, arrays, PIL images, tensors); with
        ``backbone=None``, an iterable of captured attention instead (Captures,
        ``{resolution: maps}`` dictionaries or ready ``P`` matrices), each passed to
        :func:`segment_attention`.
    backbone, config, capture_kwargs, overrides : as :func:`walk_and_cut`.
    progress : show a tqdm bar over the images (the DDIM bars are switched off).
    out_size : label size (None: each image's size, or the token grid for attention input).
    """
    from tqdm.auto import tqdm
    items = list(images)
    config = replace(config or WalkAndCutConfig(), **overrides) if overrides \
        else (config or WalkAndCutConfig())
    if out_size is not None:
        config = replace(config, out_size=out_size)
    name = getattr(backbone, "name", "attention") if backbone is not None else "attention"
    results = []
    bar = tqdm(items, desc=f"walk and cut ({name})", unit="image", disable=not progress)
    for item in bar:
        if backbone is None:
            res = segment_attention(item, config)
        else:
            res = walk_and_cut(item, backbone, config, capture_kwargs, progress=False)
        bar.set_postfix(segments=res.n_segments, seconds=f"{res.timings['total']:.2f}")
        results.append(res)
    return results
