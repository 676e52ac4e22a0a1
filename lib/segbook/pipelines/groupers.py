"""Paper 1 and its baselines behind one interface, for comparison tables on the same captures.

Every grouper here has ``fit_predict(source, out_size=None, image=None) -> SegmentationResult``,
where ``source`` is a :class:`~segbook.backbones.base.Capture`, the ``{resolution: maps}``
dictionary it gives, a ready row-stochastic ``P`` or (DiffCut) a feature map:

=====================  ========================================================================
:class:`WalkAndCut`    paper 1 (:func:`~segbook.pipelines.walk_and_cut.segment_attention`)
:class:`DiffSegGrouper` DiffSeg: anchors, symmetric-KL merging, bilinear upsampling + argmax
                       (:class:`segbook.groupers.DiffSeg`)
:class:`DiffCut`       DiffCut: feature cosine ** alpha, recursive NCut with tau, mean features
                       upsampled by dot product, optional PAMR
                       (:func:`segbook.groupers.diffcut_segment`)
:class:`KMeansGrouper` K-means on the attention rows (K fixed, or chosen by silhouette)
=====================  ========================================================================

:func:`segment_with` builds one by name; :func:`compare_methods` captures each image once
and runs several groupers on it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from segbook.errors import GraphError
from segbook.graphs import aggregate_self_attention
from segbook.groupers.diffcut import diffcut_segment
from segbook.groupers.diffseg import DiffSeg
from segbook.groupers.kmeans import kmeans_silhouette
from segbook.groupers.ncut import NCutResult
from segbook.pipelines.walk_and_cut import (
    SegmentationResult,
    WalkAndCutConfig,
    _as_transition,
    _Clock,
    _image_array,
    _pamr_refine,
    _renumber,
    _size2,
    capture_attention,
    peak_memory,
    segment_attention,
)
from segbook.upsamplers.labels import cosine_upsample, dot_upsample, nearest_upsample

__all__ = ["GROUPERS", "DiffCut", "DiffSegGrouper", "KMeansGrouper", "WalkAndCut",
           "compare_methods", "resolve_device", "segment_with", "split_hierarchy"]


def resolve_device(device="auto") -> torch.device:
    """``"auto"``: the first CUDA device when one is available, else the CPU; otherwise
    ``torch.device(device)``, checked to exist (so that the full profile's NCut on 4096 tokens
    runs on the GPU, not wherever the capture was copied to)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:i]' or a torch.device, got "
                         f"{device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use "
                         "device='auto' or 'cpu'")
    return dev


def _source_info(source):
    from segbook.backbones.base import Capture
    if isinstance(source, Capture):
        return source.backbone, bool(source.meta.get("stand_in", False))
    return None, False


def _transition_from(source, resolutions=None, grid=None, device=None):
    """``P`` (on ``device``) and its grid from a Capture, a ``{resolution: maps}`` dict or a
    ready ``P``."""
    from segbook.backbones.base import Capture
    if isinstance(source, Capture):
        source = source.attention_by_resolution()
    if isinstance(source, Mapping):
        P = aggregate_self_attention(source, resolutions=resolutions, device=device)
        return _as_transition(P, grid, validate=False)
    if resolutions is not None:
        raise ValueError("resolutions select maps to aggregate; a ready P has none")
    P, hw = _as_transition(source, grid)
    return (P if device is None else P.to(device)), hw


def _out_size(out_size, image, grid):
    if out_size is not None:
        return _size2(out_size)
    if image is not None:
        return tuple(_image_array(image).shape[:2])
    return tuple(grid)


class WalkAndCut:
    """Paper 1 as a grouper: :func:`~segbook.pipelines.walk_and_cut.segment_attention` with a
    fixed :class:`~segbook.pipelines.walk_and_cut.WalkAndCutConfig` (keyword arguments
    replace its fields).

    ``device``: where aggregation, ``P^k``, NCut and upsampling run (``"auto"``: CUDA when
    available, else the CPU; see :func:`resolve_device`), whatever device the capture is on.
    The split tree of a result is :func:`split_hierarchy`."""

    name = "walk_and_cut"

    def __init__(self, config: WalkAndCutConfig | None = None, device="auto", **params):
        self.config = replace(config or WalkAndCutConfig(), **params)
        resolve_device(device)  # fail early on a bad or unavailable device
        self.device = device

    def fit_predict(self, source, out_size=None, image=None, device=None) -> SegmentationResult:
        """Segment ``source``; ``device`` (default: the grouper's) overrides where it runs."""
        dev = resolve_device(self.device if device is None else device)
        return segment_attention(source, self.config, out_size=out_size, image=image,
                                 device=dev)


class _TimedGrouper:
    """What DiffSeg, DiffCut and K-means share: device choice, the step clock, peak memory,
    renumbered labels and the result record. A subclass implements :meth:`_segment`, which
    returns ``(labels at out_size, token labels, split tree or None)`` and times its steps
    with ``clock.step(...)``."""

    name = "grouper"

    def fit_predict(self, source, out_size=None, image=None, device=None) -> SegmentationResult:
        """Segment ``source``; ``device`` (default: the grouper's) overrides where it runs."""
        dev = resolve_device(self.device if device is None else device)
        backbone, stand_in = _source_info(source)
        with peak_memory(dev) as peak:
            clock = _Clock(dev)
            with torch.no_grad():
                labels, token_labels, tree = self._segment(source, out_size, image, dev, clock)
                labels = _renumber(labels)
            timings = clock.finish()
        return SegmentationResult(labels=labels, token_labels=token_labels,
                                  n_segments=int(labels.max()) + 1, tree=tree, timings=timings,
                                  peak_memory_bytes=peak["bytes"], backbone=backbone,
                                  stand_in=stand_in, config=self.params(), method=self.name)


class DiffSegGrouper(_TimedGrouper):
    """DiffSeg (Tian et al., CVPR 2024) on the aggregated attention, as paper 1 runs it (sec. 4.5).

    Parameters
    ----------
    kl_threshold : symmetric-KL merge threshold (1.1 on COCO-Stuff-27, 0.9 on Cityscapes).
    iterations : merging passes (3).
    grid : anchors per axis (16; must fit on the token grid).
    refine : the authors' optional K-means refinement.
    resolutions : attention resolutions aggregated (None: all), DiffSeg's weights.
    pamr : PAMR refinement of the label map (needs the image).
    device : where aggregation, merging and upsampling run (``"auto"``: CUDA when available).
    capture : on a diffusion backbone, what :func:`compare_methods` gives DiffSeg to read:
        ``"own"`` (default) DiffSeg's own pass, all 16 self-attention layers of one U-Net call
        on the clean latent at t = 300 (:data:`DIFFSEG_CAPTURE`, as DiffSeg's code); ``"shared"``
        the capture the other groupers read (paper 1's: decoder layers after DDIM inversion),
        i.e. DiffSeg's grouper on paper 1's attention. Other backbones have one capture.
    """

    name = "diffseg"

    def __init__(self, kl_threshold=1.1, iterations: int = 3, grid: int = 16,
                 refine: bool = False, resolutions=None, pamr: bool = False, device="auto",
                 capture: str = "own"):
        resolve_device(device)
        if capture not in ("own", "shared"):
            raise ValueError(f"capture must be 'own' or 'shared', got {capture!r}")
        self.capture = capture
        self.device = device
        self.model = DiffSeg(kl_threshold=kl_threshold, iterations=iterations, grid=grid,
                             refine=refine)
        self.resolutions = None if resolutions is None else tuple(sorted(resolutions))
        self.pamr = bool(pamr)

    def params(self) -> dict:
        m = self.model
        return {"kl_threshold": m.kl_threshold, "iterations": m.iterations, "grid": m.grid,
                "refine": m.refine, "resolutions": self.resolutions, "pamr": self.pamr,
                "device": str(self.device), "capture": self.capture}

    def _segment(self, source, out_size, image, dev, clock):
        with clock.step("aggregate"):
            P, hw = _transition_from(source, self.resolutions, device=dev)
        with clock.step("ncut"):          # the grouping step (merging, for DiffSeg)
            self.model.fit(P, spatial_shape=hw)
        size = _out_size(out_size, image, hw)
        with clock.step("upsample"):
            labels = self.model.predict(None if size == hw else size)
        if self.pamr:
            with clock.step("pamr"):
                labels = _pamr_refine(image, labels)
        return labels, self.model.labels_.astype(np.int64), None


def _features_from(source, layer):
    """``(N, C)`` features and their grid from a Capture (``layer`` or the default), a
    ``(C, h, w)`` map, or ``(features (N, C), grid)``."""
    from segbook.backbones.base import Capture
    if isinstance(source, Capture):
        candidates = source.feature_layers("DiffCut")
        if layer is None and source.meta.get("diffcut_layer"):
            # a diffusion backbone: DiffCut's own layer, never a decoder layer by default
            layer = source.meta["diffcut_layer"]
            if layer not in [lc.name for lc in candidates]:
                raise GraphError(f"DiffCut reads the features of {layer!r} (encoder, t = 50) "
                                 f"and this capture has features of "
                                 f"{[lc.name for lc in candidates]} only: capture with "
                                 "backbone.capture(image, **backbone.diffcut_capture_kwargs()) "
                                 "or pass layer=... explicitly")
        if layer is not None:
            lc = source.feature_layers("DiffCut", layer)[0]
        else:
            small = [lc for lc in candidates if lc.grid[0] * lc.grid[1] <= 32 * 32]
            pool = small or candidates
            best = max(g.grid[0] * g.grid[1] for g in pool)
            lc = [g for g in pool if g.grid[0] * g.grid[1] == best][-1]
        source = lc.features
    if isinstance(source, tuple) and len(source) == 2:
        X, grid = source
        X = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))
        return X.float(), tuple(int(s) for s in grid)
    X = source if isinstance(source, torch.Tensor) else torch.from_numpy(np.asarray(source))
    if X.ndim != 3:
        raise GraphError(f"features must be (C, h, w) (or (features (N, C), grid)), got "
                         f"{tuple(X.shape)}")
    C, h, w = X.shape
    return X.reshape(C, h * w).T.float(), (h, w)


class DiffCut(_TimedGrouper):
    """DiffCut (Couairon et al., NeurIPS 2024) as a grouper.

    Affinity ``((cos - min) / (max - min)) ** alpha`` of the token features, recursive NCut
    with the fixed stop ``NCut < tau`` and 100 evenly spaced thresholds per split
    (:func:`segbook.groupers.diffcut_segment`), then DiffCut's upsampling: mean feature per
    segment, features bilinearly upsampled, argmax of the dot product
    (:func:`~segbook.pipelines.upsample.dot_upsample`), and optionally PAMR (10 iterations,
    dilations 1, 2, 4, 8, 3 x 3 median).

    Parameters
    ----------
    alpha : exponent of the affinity (10).
    tau : NCut stop threshold (0.5 with SSD-1B, 0.2 with SD 1.4).
    n_thresholds : thresholds tried per split (100; None = exact search).
    min_size : smallest segment in tokens (1: no limit, as DiffCut).
    layer : the capture layer whose features are cut. None: on a Stable Diffusion capture,
        DiffCut's layer (the ``attn1`` output of the last block of ``down_blocks[-2]``,
        :meth:`~segbook.backbones.diffusion.StableDiffusionBackbone.diffcut_layer`); on other
        captures the last layer with features on the largest grid of at most 32 x 32 tokens,
        DiffCut's resolution.
    capture_size : on a diffusion backbone, :func:`compare_methods` captures DiffCut's
        features separately (that layer, t = 50, fixed-seed noise:
        :meth:`~segbook.backbones.diffusion.StableDiffusionBackbone.diffcut_capture_kwargs`)
        at this model input size (None: the attention capture's size). DiffCut's code resizes
        every image to 1024 px, where SD 1.4's layer has 32 x 32 tokens (16 x 16 at 512 px).
    upsample : ``"dot"`` (DiffCut's) or ``"nearest"``.
    pamr : refine with PAMR (needs the image).
    device : where the affinity, NCut and upsampling run (``"auto"``: CUDA when available).
    """

    name = "diffcut"

    def __init__(self, alpha: float = 10.0, tau: float = 0.5, n_thresholds: int | None = 100,
                 min_size: int = 1, layer: str | None = None, upsample: str = "dot",
                 pamr: bool = False, device="auto", capture_size=None):
        resolve_device(device)
        self.device = device
        self.capture_size = capture_size
        if upsample not in ("dot", "nearest"):
            raise ValueError(f"upsample must be 'dot' or 'nearest', got {upsample!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.alpha, self.tau, self.n_thresholds = float(alpha), float(tau), n_thresholds
        self.min_size, self.layer, self.upsample, self.pamr = int(min_size), layer, upsample, \
            bool(pamr)

    def params(self) -> dict:
        return {"alpha": self.alpha, "tau": self.tau, "n_thresholds": self.n_thresholds,
                "min_size": self.min_size, "layer": self.layer, "upsample": self.upsample,
                "pamr": self.pamr, "device": str(self.device), "capture_size": self.capture_size}

    def _segment(self, source, out_size, image, dev, clock):
        X, hw = _features_from(source, self.layer)
        X = X.to(dev)
        if not torch.isfinite(X).all():
            raise GraphError("the features contain NaN or Inf")
        with clock.step("ncut"):
            res = diffcut_segment(X, alpha=self.alpha, tau=self.tau,
                                  n_thresholds=self.n_thresholds, min_size=self.min_size,
                                  device=dev)
        size = _out_size(out_size, image, hw)
        with clock.step("upsample"):
            if size == hw:
                labels = torch.from_numpy(res.labels.reshape(hw))
            elif self.upsample == "dot":
                labels = dot_upsample(X, res.labels, hw, size)
            else:
                labels = nearest_upsample(res.labels, hw, size)
            labels = labels.cpu().numpy()
        if self.pamr:
            with clock.step("pamr"):
                labels = _pamr_refine(image, labels)
        return labels, res.labels.reshape(hw), res.tree


class KMeansGrouper(_TimedGrouper):
    """K-means on the rows of the aggregated attention ``P`` (each token's attention
    distribution), upsampled like paper 1 (section 3.6): a simple clustering baseline.

    Parameters
    ----------
    k : number of clusters, or None to choose it in ``k_range`` by the silhouette score.
    k_range : candidates when ``k`` is None (paper 2: 2..10).
    resolutions : attention resolutions aggregated (None: all).
    n_init : K-means restarts.
    upsample : ``"cosine"`` or ``"nearest"``.
    seed : K-means seed.
    device : where aggregation and upsampling run (``"auto"``: CUDA when available; the
        K-means itself runs on the CPU).
    """

    name = "kmeans"

    def __init__(self, k: int | None = None, k_range=range(2, 11), resolutions=None,
                 n_init: int = 4, upsample: str = "cosine", seed: int = 0, device="auto"):
        resolve_device(device)
        self.device = device
        if k is not None and (int(k) != k or k < 1):
            raise ValueError(f"k must be a positive integer or None, got {k!r}")
        if upsample not in ("cosine", "nearest"):
            raise ValueError(f"upsample must be 'cosine' or 'nearest', got {upsample!r}")
        self.k, self.k_range, self.resolutions = k, tuple(k_range), resolutions
        self.n_init, self.upsample, self.seed = int(n_init), upsample, int(seed)

    def params(self) -> dict:
        return {"k": self.k, "k_range": self.k_range, "resolutions": self.resolutions,
                "n_init": self.n_init, "upsample": self.upsample, "seed": self.seed,
                "device": str(self.device)}

    def _segment(self, source, out_size, image, dev, clock):
        with clock.step("aggregate"):
            P, hw = _transition_from(source, self.resolutions, device=dev)
        with clock.step("ncut"):      # the grouping step
            k_range = (self.k,) if self.k is not None else self.k_range
            sel = kmeans_silhouette(P.double().cpu().numpy(), k_range=k_range,
                                    seed=self.seed, n_init=self.n_init)
            token_labels = _renumber(sel.labels)
        size = _out_size(out_size, image, hw)
        with clock.step("upsample"):
            if size == hw:
                labels = token_labels.reshape(hw)
            elif self.upsample == "cosine":
                labels = cosine_upsample(P, token_labels, hw, size).cpu().numpy()
            else:
                labels = nearest_upsample(token_labels, hw, size).cpu().numpy()
        return labels, token_labels.reshape(hw), None


GROUPERS = {"walk_and_cut": WalkAndCut, "diffseg": DiffSegGrouper, "diffcut": DiffCut,
            "kmeans": KMeansGrouper}


def segment_with(method: str, source, out_size=None, image=None, **params) -> SegmentationResult:
    """Run the grouper named ``method`` (a key of :data:`GROUPERS`) with ``params`` on ``source``.

    >>> segment_with("diffseg", capture, out_size=(512, 512), kl_threshold=0.9)  # doctest: +SKIP
    """
    if method not in GROUPERS:
        raise ValueError(f"method must be one of {sorted(GROUPERS)}, got {method!r}")
    return GROUPERS[method](**params).fit_predict(source, out_size=out_size, image=image)


#: DiffSeg's own reading of Stable Diffusion (Tian et al.; its code): every self-attention layer
#: (16 in SD 1.4) of one U-Net pass on the clean latent at t = 300, heads averaged.
DIFFSEG_CAPTURE = {"layers": "all", "mode": "clean", "t": 300}


def _own_diffseg(grouper, diffusion: bool) -> bool:
    return diffusion and isinstance(grouper, DiffSegGrouper) and grouper.capture == "own"


def _diffcut_size(grouper, capture_kwargs):
    size = grouper.capture_size or (capture_kwargs or {}).get("size")
    return tuple(size) if isinstance(size, list) else size


def split_hierarchy(result: SegmentationResult) -> NCutResult:
    """The split tree of a recursive-NCut result (paper 1's :class:`WalkAndCut`, section 3.5,
    or :class:`DiffCut`) as an :class:`~segbook.groupers.ncut.NCutResult` on the token grid,
    for its ``labels_at_depth(d)`` (paper 1, Figure 5: the MAN-C hierarchy level by level).

    >>> tree = split_hierarchy(result)                                   # doctest: +SKIP
    >>> tree.labels_at_depth(1).reshape(result.token_labels.shape)       # doctest: +SKIP
    """
    tree = getattr(result, "tree", None)
    if tree is None:
        raise ValueError(f"this {getattr(result, 'method', type(result).__name__)} result has "
                         "no split tree (only recursive-NCut groupers have one)")
    stop = getattr(result.config, "stop", "threshold")
    return NCutResult(labels=np.asarray(result.token_labels, np.int64).reshape(-1),
                      tree=list(tree), stop=stop)


def compare_methods(images, backbone, groupers: Mapping, capture_kwargs: Mapping | None = None,
                    out_size=None, progress: bool = True,
                    device=None) -> list[dict[str, SegmentationResult]]:
    """Capture each image once and run every grouper on the capture.

    Parameters
    ----------
    images : iterable of images.
    backbone : a loaded backbone; captured as paper 1 does (:func:`capture_attention`), with
        features too when a :class:`DiffCut` is among the groupers. On a diffusion backbone
        DiffCut and DiffSeg read their own passes, as their code does: DiffCut's encoder layer
        at t = 50, DiffSeg's 16 layers on the clean latent at t = 300
        (:data:`DIFFSEG_CAPTURE`; ``DiffSegGrouper(capture="shared")`` reads paper 1's capture
        instead).
    groupers : ``{column name: grouper}``, e.g.
        ``{"ours": WalkAndCut(k=2), "DiffSeg": DiffSegGrouper(), "K-means": KMeansGrouper(k=5)}``.
    capture_kwargs : passed to the backbone's ``capture``.
    out_size : label size (None: each image's size).
    progress : tqdm bar over the images.
    device : where every grouper runs (``"auto"``: CUDA when available; see
        :func:`resolve_device`); None: each grouper's own ``device`` (``"auto"`` by default).

    Returns
    -------
    One ``{name: SegmentationResult}`` per image; each result's ``timings["capture"]`` is the
    time of the image's captures (not added to its ``total``): the shared attention capture
    and, on a diffusion backbone, DiffCut's and DiffSeg's own passes when they are among the
    groupers. Each result's
    ``peak_memory_bytes`` is the peak from the start of the image's capture to the end of
    that grouper (:func:`peak_memory` nests: the capture and the model are included; on a
    CPU the process's resident set, on CUDA ``max_memory_allocated``).
    """
    from tqdm.auto import tqdm
    if device is not None:
        resolve_device(device)
    diffcuts = [g for g in groupers.values() if isinstance(g, DiffCut)]
    diffusion = getattr(backbone, "family", None) == "diffusion"
    # DiffCut on Stable Diffusion reads its own pass (encoder layer, t = 50): captured apart
    want_features = bool(diffcuts) and not diffusion
    out = []
    peak_device = resolve_device(device) if device is not None else getattr(backbone, "device", None)
    for image in tqdm(list(images), desc="compare", unit="image", disable=not progress):
        # The outer block resets the peak before the capture; each grouper's own (nested)
        # block then reports the peak since that reset, capture and model included.
        with peak_memory(peak_device):
            out.append(_compare_one(image, backbone, groupers, capture_kwargs, out_size, device,
                                    diffcuts, diffusion, want_features))
    return out


def _compare_one(image, backbone, groupers, capture_kwargs, out_size, device, diffcuts,
                 diffusion, want_features) -> dict[str, SegmentationResult]:
    """One image of :func:`compare_methods`: the captures, then every grouper."""
    rgb = _image_array(image)
    t0 = time.perf_counter()
    cap = capture_attention(rgb, backbone, capture_kwargs, progress=False,
                            with_features=want_features)
    feature_caps = {}
    if diffusion:
        for g in diffcuts:
            size = _diffcut_size(g, capture_kwargs)
            if size not in feature_caps:
                feature_caps[size] = backbone.capture(
                    rgb, **backbone.diffcut_capture_kwargs(size), progress=False)
    diffseg_cap = None
    if any(_own_diffseg(g, diffusion) for g in groupers.values()):
        size = (capture_kwargs or {}).get("size")
        diffseg_cap = backbone.capture(rgb, **DIFFSEG_CAPTURE, size=size, progress=False)
    t_capture = time.perf_counter() - t0
    row = {}
    for name, grouper in groupers.items():
        source = cap
        if diffusion and isinstance(grouper, DiffCut):
            source = feature_caps[_diffcut_size(grouper, capture_kwargs)]
        elif _own_diffseg(grouper, diffusion):
            source = diffseg_cap
        res = (grouper.fit_predict(source, out_size=out_size, image=rgb) if device is None
               else grouper.fit_predict(source, out_size=out_size, image=rgb, device=device))
        res.timings["capture"] = t_capture
        res.backbone = getattr(backbone, "name", res.backbone)
        res.stand_in = bool(getattr(backbone, "stand_in", res.stand_in))
        row[name] = res
    return row
