"""CAFE, EASe's training-free grouper (paper 3, section 3.2, supplement A and B.2; chapter 04).

:class:`CAFE` turns an upsampler's high-resolution features and attention into a hierarchy of
segmentations and picks one level:

* stage 1, cross-resolution seeding (:func:`~segbook.groupers.cafe_stages.cross_resolution_seeding`);
* stage 2, attention-guided grouping and edge refinement
  (:func:`~segbook.groupers.cafe_stages.attention_guided_grouping`,
  :func:`~segbook.groupers.cafe_stages.edge_refinement`);
* stage 3, hierarchical merging, Algorithm 1 (:func:`~segbook.groupers.cafe_merge.hierarchical_merging`);
* level choice: the level whose granularity ``(G_scale, G_sem)`` (supp. eq. 4) is nearest a
  per-dataset target, calibrated on annotated training images (:func:`calibrate_granularity`)
  or taken from the paper's supplement Table 3 (:data:`PAPER_TARGETS`).

It has chapter 02's grouper shape, ``fit_predict(source, out_size=None, image=None,
device=None) -> SegmentationResult``, where ``source`` is what any backbone + upsampler pair
gives: ``(upsampled, lowres)`` (an :class:`~segbook.upsamplers.Upsampled` and the ``(C, h, w)``
tokens), an :class:`~segbook.upsamplers.Upsampled` with ``lowres=`` given to the constructor's
call, or a backbone :class:`~segbook.backbones.base.Capture` with features, which is upsampled
by ``upsampler`` (bilinear with a distance attention by default).

Defaults are the supplement's reading (Table 1 and Algorithm 1); the other readings are
options, named in each parameter's description. :data:`TABLE4_VARIANTS` are the ablation rows
of the paper's Table 4.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from segbook.errors import GraphError, MissingDatasetError
from segbook.groupers.cafe_merge import MergeHierarchy, hierarchical_merging
from segbook.groupers.cafe_stages import (
    PixelFeatures,
    attention_guided_grouping,
    check_attention_rows,
    check_finite,
    cross_resolution_seeding,
    edge_refinement,
    feature_gradient,
    kmeans_pp,
)

__all__ = [
    "CAFE",
    "PAPER_TARGETS",
    "TABLE4_VARIANTS",
    "CAFEResult",
    "calibrate_granularity",
    "calibration_size",
    "granularity_target",
    "planted_inputs",
]

#: Supplement Table 3, the default rows (DINOv3-L, beta_bnd = 0): dataset ->
#: (calibration-split mIoU %, G_scale, G_sem). OmniCrack30k has per-subset targets only
#: (supplement Table 4, other backbones and beta_bnd), so it is not here.
PAPER_TARGETS = {
    "ade20k": (42.70, 0.077, 0.511),
    "cityscapes": (27.74, 0.091, 0.537),
    "coco_object": (46.50, 0.150, 0.603),
    "coco_stuff": (53.98, 0.217, 0.668),
    "kitti": (24.60, 0.119, 0.614),
    "rsdd": (55.71, 0.010, 0.336),
    "partimagenet": (41.32, 0.099, 0.541),
    "voc": (63.42, 0.206, 0.663),
}

#: Table 4's configurations (paper sec. 5.1) as CAFE keyword arguments.
TABLE4_VARIANTS = {
    "kmeans": {"grouping": "kmeans", "edge_refinement": False},          # (i)
    "kmeans_er": {"grouping": "kmeans", "edge_refinement": True},        # (ii)
    "cafe_kmeans_seeding": {"seeding": "kmeans"},                        # (iii)
    "cafe_no_er": {"edge_refinement": False},                            # (iv)
    "cafe": {},                                                          # EASe
}


def granularity_target(dataset: str) -> tuple[float, float]:
    """``(G_scale, G_sem)`` printed in supplement Table 3 for ``dataset`` (default rows)."""
    key = dataset.lower().replace("-", "_").replace(" ", "_")
    if key not in PAPER_TARGETS:
        raise KeyError(f"no printed target for {dataset!r}; the supplement gives "
                       f"{sorted(PAPER_TARGETS)}")
    return PAPER_TARGETS[key][1:]


@dataclass
class CAFEResult:
    """Everything CAFE computed for one image (``CAFE.last``)."""

    hierarchy: MergeHierarchy
    stage2_labels: np.ndarray                 # after edge refinement (stage 3's input)
    stage2_raw: np.ndarray                    # before edge refinement
    dictionary_sizes: list = field(default_factory=list)
    level: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def n_levels(self) -> int:
        return len(self.hierarchy.levels)

    def level_labels(self, i: int) -> np.ndarray:
        return self.hierarchy.labels(i)


def _as_inputs(source, lowres):
    """``(features (C, H, W), lowres (C, h, w), attention)`` from the accepted sources."""
    from segbook.upsamplers.base import Upsampled
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Upsampled):
        source, lowres = source
    if isinstance(source, Upsampled):
        if lowres is None:
            raise ValueError("CAFE needs the low-resolution tokens too: pass (upsampled, "
                             "lowres) or lowres=...")
        if source.attention is None:
            raise ValueError("this Upsampled has no attention; CAFE reads the upsampler's "
                             "attention (use an attention upsampler, or BilinearUpsampler "
                             "for a distance-based one)")
        return source.features, torch.as_tensor(lowres), source.attention
    raise TypeError(f"CAFE reads (Upsampled, lowres), an Upsampled with lowres=..., or a "
                    f"Capture with features; got {type(source).__name__}")


def _capture_lowres(capture, layer=None) -> torch.Tensor:
    lc = capture.feature_layers("CAFE", layer)[-1]   # the named layer, else the last one
    X = lc.features
    X = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))
    if X.ndim == 4:
        X = X[0]
    if X.ndim == 2:
        X = X.T.reshape(X.shape[1], *lc.grid)
    return X.float()


class CAFE:
    """CAFE (Singh et al., EASe, sec. 3.2; supplement A, Algorithm 1, Table 1) as a grouper.

    Parameters
    ----------
    tau : stage 1 prototype merge threshold (0.97).
    crs_iterations : stage 1's ``T``, at most 5 applications of the merge operator.
    crs_average : ``"mean"`` (default) or ``"weighted"`` merging of prototypes (unstated).
    alpha, beta : stage 2 cost weights (0.75 feature, 0.25 attention; eq. 4).
    edge_refinement : run stage 2's edge refinement (True; Table 4 ablates it).
    er_majority, er_gradient_quantile, er_passes : its constants (unstated in the paper;
        5 of 8 neighbours, keep pixels at or above the 0.9 quantile of ``|grad F|``, 1 pass).
    tau_start, tau_end, step, beta_bnd, min_size, top_n, lam, gap_bonus, gap_factor :
        Algorithm 1 (0.99, 0.30, 0.001, 0, 50 px, 40 levels, 0.25, 0.2, 3).
    level_score : ``"supplement"`` (eq. 3, default) or ``"ch"`` (CH only, the main text).
    gap_cost : persistence-gap cost, ``"dissimilarity"`` (default, ``1 - tau``), ``"threshold"``
        (the literal text; never fires) or ``"step"`` (see :mod:`segbook.groupers.cafe_merge`).
    non_adjacent : run Algorithm 1's per-level non-adjacent merge (True).
    seeding : ``"crs"`` (stage 1) or ``"kmeans"`` (Table 4 (iii): the dictionary is K-means++
        centres).
    grouping : ``"agg"`` (stages 1-2) or ``"kmeans"`` (Table 4 (i)/(ii): K-means++ labels
        replace stages 1-2).
    kmeans_k, kmeans_iterations : the K-means++ baseline (``K' = 200``, 20 iterations).
    target : level choice: ``(G_scale, G_sem)``, a dataset name of :data:`PAPER_TARGETS`,
        ``"score"`` (the best-scoring level), ``"finest"``/``"coarsest"``, or an int index.
        None: ``"score"``.
    renormalise_attention : False (default): attention rows that do not sum to one (within
        1e-3) raise :class:`~segbook.errors.GraphError`; True divides them by their sums.
    upsampler : used when ``source`` is a Capture (default
        :class:`~segbook.upsamplers.BilinearUpsampler`).
    layer : the capture layer whose features are the tokens (None: the last with features).
    pool : how ``A G`` is read (:func:`~segbook.groupers.cafe_stages.pooled_attention`).
    precision : ``"auto"``, ``"float32"`` or ``"bfloat16"`` for the pixel-by-prototype
        products (see :mod:`segbook.groupers.cafe_stages`).
    seed : K-means++ seed. device : where the products run (``"auto"``: CUDA when available).

    Bad input: NaN/Inf features or tokens raise GraphError; a constant image gives one
    segment (every level has ``K = 1``: no NaN); an image with fewer pixels than ``min_size``
    keeps its segments (absorption needs a neighbour); attention rows off one raise or are
    renormalised (``renormalise_attention``).
    """

    name = "cafe"

    def __init__(self, tau: float = 0.97, crs_iterations: int = 5, crs_average: str = "mean",
                 alpha: float = 0.75, beta: float = 0.25, edge_refinement: bool = True,
                 er_majority: int = 5, er_gradient_quantile: float = 0.9, er_passes: int = 1,
                 tau_start: float = 0.99, tau_end: float = 0.30, step: float = 0.001,
                 beta_bnd: float = 0.0, min_size: int = 50, top_n: int = 40, lam: float = 0.25,
                 gap_bonus: float = 0.2, gap_factor: float = 3.0, level_score: str = "supplement",
                 gap_cost: str = "dissimilarity", non_adjacent: bool = True,
                 seeding: str = "crs", grouping: str = "agg", kmeans_k: int = 200,
                 kmeans_iterations: int = 20, target=None, renormalise_attention: bool = False,
                 upsampler=None, layer: str | None = None, pool: str = "chunks",
                 precision: str = "auto", seed: int = 0, device="auto"):
        if seeding not in ("crs", "kmeans"):
            raise ValueError(f"seeding must be 'crs' or 'kmeans', got {seeding!r}")
        if grouping not in ("agg", "kmeans"):
            raise ValueError(f"grouping must be 'agg' or 'kmeans', got {grouping!r}")
        if level_score not in ("supplement", "ch"):
            raise ValueError(f"level_score must be 'supplement' or 'ch', got {level_score!r}")
        if not 0 < tau_end <= tau_start:
            raise ValueError("need 0 < tau_end <= tau_start")
        self.tau, self.crs_iterations, self.crs_average = float(tau), int(crs_iterations), crs_average
        self.alpha, self.beta = float(alpha), float(beta)
        self.edge_refinement = bool(edge_refinement)
        self.er_majority, self.er_gradient_quantile = int(er_majority), float(er_gradient_quantile)
        self.er_passes = int(er_passes)
        self.tau_start, self.tau_end, self.step = float(tau_start), float(tau_end), float(step)
        self.beta_bnd, self.min_size, self.top_n = float(beta_bnd), int(min_size), int(top_n)
        self.lam, self.gap_bonus, self.gap_factor = float(lam), float(gap_bonus), float(gap_factor)
        self.level_score, self.gap_cost, self.non_adjacent = level_score, gap_cost, bool(non_adjacent)
        self.seeding, self.grouping = seeding, grouping
        self.kmeans_k, self.kmeans_iterations = int(kmeans_k), int(kmeans_iterations)
        self.target = target
        self.renormalise_attention = bool(renormalise_attention)
        self.upsampler, self.layer, self.pool, self.precision = upsampler, layer, pool, precision
        self.seed, self.device = int(seed), device
        self.last: CAFEResult | None = None

    def params(self) -> dict:
        keys = ("tau", "crs_iterations", "crs_average", "alpha", "beta", "edge_refinement",
                "er_majority", "er_gradient_quantile", "er_passes", "tau_start", "tau_end",
                "step", "beta_bnd", "min_size", "top_n", "lam", "gap_bonus", "gap_factor",
                "level_score", "gap_cost", "non_adjacent", "seeding", "grouping", "kmeans_k",
                "kmeans_iterations", "renormalise_attention", "layer", "pool", "precision",
                "seed")
        out = {k: getattr(self, k) for k in keys}
        out["target"] = self.target if not isinstance(self.target, np.ndarray) else \
            self.target.tolist()
        out["device"] = str(self.device)
        return out

    # -- the three stages -------------------------------------------------------------------
    def hierarchy(self, features: torch.Tensor, lowres: torch.Tensor, attention,
                  device=None) -> CAFEResult:
        """Stages 1-3 on ``features`` ``(C, H, W)``, ``lowres`` ``(C, h, w)`` and the lazy
        ``attention``; returns a :class:`CAFEResult` (no level chosen yet)."""
        from segbook.pipelines.groupers import resolve_device
        dev = resolve_device(self.device if device is None else device)
        features = torch.as_tensor(features)
        lowres = torch.as_tensor(lowres)
        check_finite(features, "the high-resolution features")
        check_finite(lowres, "the low-resolution tokens")
        if features.ndim != 3 or lowres.ndim != 3 or lowres.shape[0] != features.shape[0]:
            raise GraphError(f"features must be (C, H, W) and lowres (C, h, w) with the same C; "
                             f"got {tuple(features.shape)} and {tuple(lowres.shape)}")
        H, W = features.shape[1:]
        if attention.shape != (H * W, lowres.shape[1] * lowres.shape[2]):
            raise GraphError(f"attention is {attention.shape}, expected (H W, h w) = "
                             f"({H * W}, {lowres.shape[1] * lowres.shape[2]})")
        att = check_attention_rows(attention, self.renormalise_attention)
        times = {}
        t0 = time.perf_counter()
        grad = feature_gradient(features)
        times["gradient"] = time.perf_counter() - t0
        sizes = []
        t0 = time.perf_counter()
        # one bfloat16 copy of the unit features (where bfloat16 is fast) for every pass
        pix = PixelFeatures(features, self.precision, dev)
        times["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.grouping == "kmeans":
            raw, _ = kmeans_pp(pix, self.kmeans_k, self.kmeans_iterations, self.seed,
                               self.precision, dev)
            times["stage1"] = time.perf_counter() - t0
        else:
            if self.seeding == "crs":
                crs = cross_resolution_seeding(pix, lowres, att, self.tau,
                                               self.crs_iterations, self.crs_average,
                                               self.precision, dev)
                D, sizes = crs.D, crs.sizes
            else:
                _, D = kmeans_pp(pix, self.kmeans_k, self.kmeans_iterations, self.seed,
                                 self.precision, dev)
                sizes = [D.shape[0]]
            times["stage1"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            raw = attention_guided_grouping(pix, lowres, att, D, self.alpha, self.beta,
                                            self.precision, dev, self.pool).labels
        inv_norm = pix.inv_norm if pix.inv_norm.device.type == "cpu" else None
        del pix
        t1 = time.perf_counter()
        labels = (edge_refinement(raw, grad, self.er_majority, self.er_gradient_quantile,
                                  self.er_passes) if self.edge_refinement else raw)
        times["stage2"] = t1 - t0 if self.grouping == "agg" else 0.0     # without ER
        times["edge_refinement"] = time.perf_counter() - t1
        t0 = time.perf_counter()
        hier = hierarchical_merging(labels, features, self.tau_start, self.tau_end, self.step,
                                    self.beta_bnd, self.min_size, self.top_n, self.lam,
                                    self.gap_bonus, self.gap_factor, self.gap_cost,
                                    self.level_score, self.non_adjacent, gradient=grad,
                                    inv_norm=inv_norm)
        times["stage3"] = time.perf_counter() - t0
        return CAFEResult(hierarchy=hier, stage2_labels=np.asarray(labels),
                          stage2_raw=np.asarray(raw), dictionary_sizes=sizes, timings=times)

    def choose_level(self, hier: MergeHierarchy, target=None) -> int:
        """Index of the retained level for ``target`` (default: the grouper's)."""
        target = self.target if target is None else target
        n = len(hier.levels)
        if target is None or (isinstance(target, str) and target == "score"):
            return int(np.argmax([lv.score for lv in hier.levels]))
        if isinstance(target, str):
            if target == "finest":
                return 0
            if target == "coarsest":
                return n - 1
            return hier.nearest_level(granularity_target(target))
        if isinstance(target, (int, np.integer)):
            if not -n <= int(target) < n:
                raise IndexError(f"level {target} outside the {n} retained levels")
            return int(target) % n
        return hier.nearest_level(tuple(float(t) for t in target))

    # -- the grouper interface ------------------------------------------------------------
    def _inputs(self, source, out_size, image, lowres):
        from segbook.backbones.base import Capture
        if isinstance(source, Capture):
            from segbook.pipelines.groupers import _out_size
            from segbook.upsamplers.base import BilinearUpsampler
            lowres = _capture_lowres(source, self.layer)
            size = _out_size(out_size, image, tuple(lowres.shape[-2:]))
            up = self.upsampler or BilinearUpsampler()
            img = None
            if image is not None:
                from segbook.pipelines.walk_and_cut import _image_array
                img = torch.from_numpy(_image_array(image)).permute(2, 0, 1).float() / 255
            ups = up(img, lowres, size)
            return ups.features, lowres, ups.attention
        return _as_inputs(source, lowres)

    def fit_predict(self, source, out_size=None, image=None, device=None, lowres=None,
                    target=None):
        """Segment ``source`` (see the module docstring) and return a
        :class:`~segbook.pipelines.walk_and_cut.SegmentationResult` with the chosen level's
        labels (timings ``stage1``, ``stage2``, ``edge_refinement``, ``stage3``, ``total``);
        the whole hierarchy is in :attr:`last` (:class:`CAFEResult`). ``out_size`` must be
        the features' size or None (CAFE labels pixels of the upsampled features)."""
        from segbook.pipelines.groupers import _source_info, resolve_device
        from segbook.pipelines.walk_and_cut import SegmentationResult, peak_memory
        dev = resolve_device(self.device if device is None else device)
        backbone, stand_in = _source_info(source)
        with peak_memory(dev) as peak:
            t0 = time.perf_counter()
            with torch.no_grad():
                features, low, att = self._inputs(source, out_size, image, lowres)
                if out_size is not None:
                    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
                    if tuple(size) != tuple(features.shape[1:]):
                        raise ValueError(f"out_size {size} differs from the features' size "
                                         f"{tuple(features.shape[1:])}; upsample to out_size")
                res = self.hierarchy(features, low, att, dev)
            res.level = self.choose_level(res.hierarchy, target)
            labels = res.level_labels(res.level).astype(np.int64)
            total = time.perf_counter() - t0
        self.last = res
        h, w = low.shape[-2:]
        H, W = labels.shape
        ys = ((np.arange(h) + 0.5) * H / h).astype(int).clip(0, H - 1)
        xs = ((np.arange(w) + 0.5) * W / w).astype(int).clip(0, W - 1)
        timings = dict(res.timings, total=total)
        return SegmentationResult(labels=labels, token_labels=labels[np.ix_(ys, xs)],
                                  n_segments=int(labels.max()) + 1, tree=None, timings=timings,
                                  peak_memory_bytes=peak["bytes"], backbone=backbone,
                                  stand_in=stand_in, config=self.params(), method=self.name)


def calibration_size(n_train: int) -> int:
    """How many annotated training images calibrate a dataset: ``min(200, 10 %)`` (sec. 4.2;
    at least one when the split has any)."""
    if n_train <= 0:
        return 0
    return int(min(200, max(1, math.ceil(0.1 * n_train))))


def calibrate_granularity(items, cafe: CAFE, num_classes: int, dataset: str = "dataset",
                          split: str = "train", target: str = "oracle",
                          protocol: str = "per_image", background_index: int | None = None,
                          ignore_index: int = -1, limit: int | None = None):
    """Calibrate a dataset's granularity target (supp. B.2) on annotated training images.

    ``items``: a sequence of ``(source, gt)`` pairs (``source`` as :meth:`CAFE.fit_predict`
    reads; ``gt`` ``(H, W)`` int labels, -1 ignored) from the training split; the first
    :func:`calibration_size` of them are used (``limit`` overrides).

    ``target="oracle"`` (default; fits the supplement's Table 3, whose targets change with the
    backbone): on each image the retained level of best mIoU under ``protocol`` (per-image
    Hungarian by default) gives its ``(G_scale, G_sem)``, and the target is their mean.
    ``"gt"``: the target is the mean granularity of the ground-truth maps themselves, scored
    on the same features.

    Returns ``{"target": (G_scale, G_sem), "n_images": n, "miou": mean oracle mIoU,
    "per_image": [...]}``; ``target`` is None (and ``n_images`` 0) when no image had a level
    with two segments or more (a constant image), which :class:`CAFE` reads as "the
    best-scoring level". No annotated training image raises
    :class:`~segbook.errors.MissingDatasetError` naming ``dataset`` and ``split``.
    """
    from segbook.eval import evaluate
    from segbook.groupers.cafe_merge import granularity, sweep_data
    items = list(items) if not isinstance(items, list) else items
    n = calibration_size(len(items)) if limit is None else min(int(limit), len(items))
    if n == 0:
        raise MissingDatasetError(dataset, f"granularity calibration needs annotated images of "
                                  f"the {split!r} split of {dataset!r} and found none; put the "
                                  f"{split} images and their labels under the datasets root, or "
                                  "pass the paper's target (CAFE(target=...), PAPER_TARGETS)")
    if target not in ("oracle", "gt"):
        raise ValueError(f"target must be 'oracle' or 'gt', got {target!r}")
    per_image = []
    for source, gt in items[:n]:
        gt = np.asarray(gt, dtype=np.int64)
        if isinstance(source, tuple):
            res = cafe.hierarchy(source[0].features, source[1], source[0].attention)
            feats = source[0].features
        else:
            cafe.fit_predict(source)
            res = cafe.last
            feats = None
        if target == "gt":
            if feats is None:
                raise ValueError("target='gt' needs (Upsampled, lowres) sources")
            valid = gt >= 0
            lab = np.where(valid, gt, gt.max() + 1)
            data = sweep_data(lab, torch.as_tensor(feats))
            ids = np.unique(lab)
            keep = np.isin(np.arange(len(ids)), np.searchsorted(ids, np.unique(gt[valid])))
            g = granularity(data, np.arange(len(data.area)), keep)
            per_image.append({"g": g, "miou": float("nan")})
            continue
        best = None
        for i, lv in enumerate(res.hierarchy.levels):
            if lv.k < 2:
                continue
            pred = res.hierarchy.labels(i)
            bg = {} if background_index is None else {"background_many_to_one": True,
                                                      "background_index": background_index}
            s = evaluate([pred], [gt], protocol, num_classes=num_classes,
                         ignore_index=ignore_index, **bg)
            if best is None or s.miou > best[0]:
                best = (s.miou, (lv.g_scale, lv.g_sem))
        if best is not None:
            per_image.append({"g": best[1], "miou": best[0]})
    g = np.array([p["g"] for p in per_image], dtype=np.float64)
    if not len(g):
        # every level of every image is one segment: no granularity to match (CAFE with
        # target=None then takes the best-scoring level)
        return {"target": None, "n_images": 0, "miou": float("nan"), "per_image": []}
    return {"target": tuple(float(v) for v in g.mean(0)), "n_images": len(per_image),
            "miou": (float(np.mean([p["miou"] for p in per_image])) if target == "oracle"
                     else float("nan")), "per_image": per_image}


def planted_inputs(labels, grid=None, channels: int = 16, noise: float = 0.1,
                   separation: float = 1.0, seed: int = 0, sigma: float = 0.5):
    """A known answer for CAFE: pixel features ``separation * e_c + noise`` for the class ``c``
    of each pixel of ``labels`` (random unit class embeddings ``e_c``), tokens = the features
    average-pooled to ``grid`` (default: 8 x 8 pixels per token), and the distance attention of
    :class:`~segbook.upsamplers.BilinearUpsampler`. Returns ``(Upsampled, lowres)``, the
    input :meth:`CAFE.fit_predict` reads; the planted segmentation is ``labels``."""
    import torch.nn.functional as F

    from segbook.upsamplers.base import Upsampled, distance_attention
    labels = np.asarray(labels, dtype=np.int64)
    H, W = labels.shape
    if grid is None:
        grid = (max(1, H // 8), max(1, W // 8))
    g = torch.Generator().manual_seed(int(seed))
    n_cls = int(labels.max()) + 1
    emb = F.normalize(torch.randn(n_cls, channels, generator=g), dim=1) * float(separation)
    feats = emb[torch.from_numpy(labels)].permute(2, 0, 1).contiguous()
    feats = feats + float(noise) * torch.randn(channels, H, W, generator=g)
    low = F.adaptive_avg_pool2d(feats[None], tuple(grid))[0]
    att = distance_attention((H, W), tuple(grid), sigma=sigma)
    return Upsampled(feats, att), low
