"""``evaluate``: one entry point for the scoring protocols the three papers use.

An unsupervised segmentation has segment ids, not classes, so every protocol first decides
which class each segment stands for, and the protocols differ in *where* that decision is
made (once for the dataset, or per image), *how* (one-to-one Hungarian matching, many
segments to the background, or every segment to its majority class) and *how the counts are
averaged* (accumulated over the dataset, or per image then averaged). The numbers they give
for the same predictions differ a lot; chapter 05 (``book/05_evaluation.md``) shows by how
much.

====================  =============  =====================  =======================
protocol              matched where  rule                   averaged
====================  =============  =====================  =======================
``dataset``           whole dataset  Hungarian, one-to-one  counts over the dataset
``dataset_majority``  whole dataset  majority class         counts over the dataset
``per_image``         each image     Hungarian, one-to-one  counts over the dataset
``per_image_mean``    each image     Hungarian, one-to-one  metrics per image, mean
``oracle_merged``     each image     majority class         metrics per image, mean
``cliou``             each image     Hungarian + bg many    clIoU of the foreground
====================  =============  =====================  =======================

Metrics (fractions, not percent), from per-class counts ``tp, fp, fn`` (see
:mod:`segbook.eval.matching` for how a segment's pixels are counted):

* ``IoU_c = tp / (tp + fp + fn)``; ``mIoU`` = mean over classes whose IoU is defined;
* ``F1_c = 2 tp / (2 tp + fp + fn)``; ``f1`` = the macro mean over the same classes;
* ``pixel_accuracy = sum(tp) / valid pixels``.

A class with ``tp + fp + fn = 0`` (absent from the ground truth everywhere, and given no
segment) has IoU and F1 ``NaN`` and is left out of the means, as ``np.nanmean`` does in
STEGO's, DiffSeg's and DiffCut's code. (Paper 2's code divides with an epsilon instead, which
counts such a class as 0; with every class present, as on its benchmarks, the two agree.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segbook.eval.centreline import centreline_counts
from segbook.eval.confusion import as_label_list, check_pair, image_confusion, segment_universe
from segbook.eval.matching import (
    count_outcomes,
    diffseg_code_outcomes,
    hungarian_assignment,
    majority_assignment,
)

PROTOCOLS = ("dataset", "dataset_majority", "per_image", "per_image_mean", "oracle_merged",
             "cliou")


@dataclass
class Scores:
    """What :func:`evaluate` returns. Indexable like a dict (``scores["miou"]``).

    Attributes
    ----------
    miou, pixel_accuracy, f1 : fractions in [0, 1].
    per_class_iou, per_class_f1 : (num_classes,) fractions, NaN for classes never scored.
        For ``per_image_mean`` and ``oracle_merged`` they are means over the images in which
        the class is present.
    tp, fp, fn : (num_classes,) pixel counts summed over the dataset.
    per_image : for the per-image-averaged protocols, ``{"miou", "pixel_accuracy", "f1"}``
        arrays with one value per image (NaN for an image without valid pixels); with
        ``distributed=True``, this rank's images only.
    cliou : centreline IoU (``cliou`` protocol only).
    """

    protocol: str
    miou: float
    pixel_accuracy: float
    f1: float
    per_class_iou: np.ndarray
    per_class_f1: np.ndarray
    tp: np.ndarray = field(repr=False)
    fp: np.ndarray = field(repr=False)
    fn: np.ndarray = field(repr=False)
    n_images: int = 0
    per_image: dict[str, np.ndarray] | None = field(default=None, repr=False)
    cliou: float | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values: the headline metrics and the per-class IoU list."""
        out = {"protocol": self.protocol, "miou": self.miou,
               "pixel_accuracy": self.pixel_accuracy, "f1": self.f1,
               "per_class_iou": [float(v) for v in self.per_class_iou],
               "n_images": self.n_images}
        if self.cliou is not None:
            out["cliou"] = self.cliou
        return out


def _ratios(tp, fp, fn):
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
    return iou, f1


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _accumulated(protocol, tp, fp, fn, n_valid, n_images, **extra) -> Scores:
    iou, f1 = _ratios(tp, fp, fn)
    acc = float(tp.sum() / n_valid) if n_valid else float("nan")
    return Scores(protocol, _nanmean(iou), acc, _nanmean(f1), iou, f1, tp, fp, fn,
                  n_images, **extra)


def _sum_and_count(values: np.ndarray, axis=0):
    """Sums and counts of the non-NaN entries (what a mean over shards needs)."""
    ok = ~np.isnan(values)
    return np.where(ok, values, 0.0).sum(axis=axis), ok.sum(axis=axis).astype(np.float64)


def _ratio_or_nan(total, count):
    total, count = np.asarray(total, np.float64), np.asarray(count, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _no_reduce(array, op="sum"):
    return np.asarray(array)


def _torch_all_reduce():
    """A reducer over the default ``torch.distributed`` process group (sum or max)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process "
                           "group (run under torchrun and call init_process_group first)")
    on_gpu = dist.get_backend() == "nccl"

    def reduce(array, op="sum"):
        # float64 holds pixel counts exactly up to 2**53
        t = torch.as_tensor(np.array(array, dtype=np.float64, ndmin=1))
        if on_gpu:
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        out = t.cpu().numpy()
        return out if np.ndim(array) else out[0]

    return reduce


def evaluate(preds, gts, protocol: str, num_classes: int, ignore_index: int = -1,
             background_many_to_one: bool = False, background_index: int = 0,
             diffseg_code_compat: bool = False, tolerance: float = 4,
             distributed: bool = False) -> Scores:
    """Score unsupervised segmentations against ground truth under one protocol.

    Parameters
    ----------
    preds : predicted segment ids; a 2-D map, an (N, H, W) array or a list of 2-D maps
        (images may differ in size). Any non-negative integers: per-image protocols compare
        ids only within an image; ``"dataset"`` treats equal ids in different images as the
        same cluster (as a dataset-level K-means produces).
    gts : ground-truth class maps, same shapes, values in ``[0, num_classes)`` or
        ``ignore_index``.
    protocol :
        ``"dataset"``
            One confusion matrix over the whole dataset and one Hungarian matching of
            clusters to classes (STEGO's ``UnsupervisedMetrics``, PiCIE; paper 2, Table 3
            "Hungarian"). Clusters left unmatched count as misses of their classes.
        ``"dataset_majority"``
            The same matrix, but every cluster takes the class it overlaps most over the
            dataset (several clusters may share a class): paper 2's "greedy" matching
            (Table 2, and Table 3 "Greedy"; its code takes the argmax of each cluster's row).
        ``"per_image"``
            Per image, a Hungarian matching between the image's segments and the classes
            present in its ground truth, maximising overlap on the image's confusion
            matrix; per-class TP/FP/FN accumulated over the dataset, then IoU, F1, accuracy
            (DiffSeg, DiffCut, EASe; paper 1's Tables 1-4, which its supplement's Table 6
            calls "globally averaged", i.e. counts accumulated before the metrics). Segments
            left unmatched (more segments than classes) count as misses of their
            ground-truth classes and as false positives of no class, as in DiffSeg's code
            (paper 1's text calls the leftovers "false positives"; the code, which it
            follows, books their pixels as misses, the only choice that does not need a
            class to charge them to). With fewer segments than classes the unmatched
            classes are entirely missed.
        ``"per_image_mean"``
            The same matching, but IoU (over the classes present in the image), F1 and
            accuracy computed per image and then averaged over images (paper 1, supplement
            Table 6, "per-image averaged").
        ``"oracle_merged"``
            Per image, every segment is merged into the ground-truth class it overlaps most;
            metrics per image, then averaged (paper 1, supplement Table 6, "merged and
            per-image averaged"; paper 2, section 4.1, scores its per-image regions with the
            same majority rule). Over-segmentation costs nothing here.
        ``"cliou"``
            EASe on OmniCrack30k (Table 6): per-image matching with the background
            many-to-one, then the centreline IoU of the foreground (every class but
            ``background_index``) with a ``tolerance``-pixel tolerance. The other fields
            hold the ``per_image`` scores of the same matching.
    num_classes : number of ground-truth classes.
    ignore_index : ground-truth value of pixels left out of scoring (default -1).
    background_many_to_one : with the Hungarian protocols, let any number of segments map to
        the background class (EASe on VOC, COCO-Object, PartImageNet, OmniCrack30k and RSDD;
        rule in :func:`segbook.eval.matching.hungarian_assignment`). Has no effect on
        ``oracle_merged`` and ``dataset_majority``, which are many-to-one for every class.
    background_index : the background class (default 0).
    diffseg_code_compat : ``per_image``/``per_image_mean`` only: count each image exactly as
        ``google/diffseg``'s code does (see
        :func:`segbook.eval.matching.diffseg_code_outcomes`), to reproduce its numbers.
    tolerance : clIoU tolerance in pixels (``cliou`` only).
    distributed : each ``torch.distributed`` rank passes its own shard of the images; the
        counts (confusion matrix for the dataset protocols, TP/FP/FN and per-image sums for
        the others) are all-reduced, so every rank returns the scores of the whole dataset.
        Needs an initialised process group (``torchrun``; gloo on CPU, NCCL on GPUs) and at
        least one image per rank. The dataset protocols then index clusters by their raw ids
        (``0..max id``), so those ids must be small (cluster numbers).

    Returns
    -------
    :class:`Scores`

    Examples
    --------
    >>> import numpy as np
    >>> gt = np.array([[0, 0, 1, 1]])
    >>> evaluate(gt + 5, gt, "per_image", num_classes=2).miou  # ids are arbitrary
    1.0
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    bg_needed = background_many_to_one or protocol == "cliou"
    if bg_needed and not 0 <= background_index < num_classes:
        raise ValueError(f"background_index={background_index} is not a class in "
                         f"[0, {num_classes})")
    if diffseg_code_compat and protocol not in ("per_image", "per_image_mean"):
        raise ValueError("diffseg_code_compat applies to the per_image protocols only")
    if diffseg_code_compat and background_many_to_one:
        raise ValueError("diffseg_code_compat reproduces DiffSeg's one-to-one matching; it "
                         "cannot be combined with background_many_to_one")
    pred_list = as_label_list(preds, "preds")
    gt_list = as_label_list(gts, "gts")
    if len(pred_list) != len(gt_list):
        raise ValueError(f"{len(pred_list)} predictions but {len(gt_list)} ground-truth maps")
    pairs = [check_pair(p, g, num_classes, ignore_index, i)
             for i, (p, g) in enumerate(zip(pred_list, gt_list))]
    background = background_index if bg_needed else None
    reduce = _torch_all_reduce() if distributed else None

    if protocol in ("dataset", "dataset_majority"):
        return _dataset(pairs, protocol, num_classes, ignore_index, background, reduce)
    return _per_image(pairs, protocol, num_classes, ignore_index, background,
                      diffseg_code_compat, tolerance, reduce)


_MAX_DISTRIBUTED_CLUSTER_ID = 1 << 20


def _dataset(pairs, protocol, num_classes, ignore_index, background, reduce=None) -> Scores:
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    if reduce is None:
        universe = segment_universe(preds, gts, ignore_index)
    else:
        # every rank needs the same columns: all ids up to the largest on any rank
        top = int(reduce(max(int(p.max()) if p.size else -1 for p in preds), op="max"))
        if top >= _MAX_DISTRIBUTED_CLUSTER_ID:
            raise ValueError(f"cluster id {top} is too large for a distributed dataset "
                             "evaluation; number the clusters 0..K-1")
        universe = np.arange(top + 1)
    conf = np.zeros((num_classes, universe.size), np.int64)
    n_valid = 0
    for pred, gt in pairs:
        ic = image_confusion(pred, gt, num_classes, ignore_index, segment_universe=universe)
        conf += ic.conf
        n_valid += ic.n_valid
    n_images = len(pairs)
    if reduce is not None:
        conf = reduce(conf).astype(np.int64)
        n_valid, n_images = int(reduce(n_valid)), int(reduce(n_images))
    assign = (majority_assignment(conf) if protocol == "dataset_majority"
              else hungarian_assignment(conf, background))
    tp, fp, fn = count_outcomes(conf, assign)
    return _accumulated(protocol, tp, fp, fn, n_valid, n_images)


def _per_image(pairs, protocol, num_classes, ignore_index, background, compat,
               tolerance, reduce=None) -> Scores:
    n = len(pairs)
    counts = np.zeros((n, 3, num_classes), np.int64)
    n_valid = np.zeros(n, np.int64)
    cl_counts = np.zeros(3, np.int64)
    for i, (pred, gt) in enumerate(pairs):
        if compat:
            counts[i] = diffseg_code_outcomes(pred, gt, num_classes, ignore_index)
            n_valid[i] = int((gt != ignore_index).sum())
            continue
        ic = image_confusion(pred, gt, num_classes, ignore_index)
        n_valid[i] = ic.n_valid
        if protocol == "oracle_merged":
            assign = majority_assignment(ic.conf)
        else:
            assign = hungarian_assignment(ic.conf, background)
        counts[i] = count_outcomes(ic.conf, assign)
        if protocol == "cliou":
            matched = np.full(gt.shape, -1, np.int64)
            matched[ic.valid] = assign[ic.columns]
            fg_pred = (matched >= 0) & (matched != background)
            fg_gt = ic.valid & (gt != background)
            cl_counts += centreline_counts(fg_pred, fg_gt, tolerance, valid=ic.valid)
    reduce = reduce or _no_reduce
    tp, fp, fn = (reduce(counts[:, j].sum(0)).astype(np.int64) for j in range(3))
    n_total = int(reduce(n))
    if protocol in ("per_image", "cliou"):
        extra = {}
        if protocol == "cliou":
            cl_counts = reduce(cl_counts)
            total = float(cl_counts.sum())
            extra["cliou"] = float(cl_counts[0] / total) if total else float("nan")
        return _accumulated(protocol, tp, fp, fn, int(reduce(n_valid.sum())), n_total, **extra)

    iou, f1 = _ratios(counts[:, 0], counts[:, 1], counts[:, 2])  # (n, C) each
    has_pixels = n_valid > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        img_acc = np.where(has_pixels, counts[:, 0].sum(1) / np.maximum(n_valid, 1), np.nan)
    img_miou = np.array([_nanmean(row) for row in iou])
    img_f1 = np.array([_nanmean(row) for row in f1])
    # sums and counts of non-NaN values, all-reduced, then divided: a mean over all images
    (miou, acc, f1_mean), class_iou, class_f1 = (
        [_ratio_or_nan(*(reduce(v) for v in _sum_and_count(x))) for x in (img_miou, img_acc,
                                                                          img_f1)],
        _ratio_or_nan(*(reduce(v) for v in _sum_and_count(iou))),
        _ratio_or_nan(*(reduce(v) for v in _sum_and_count(f1))))
    return Scores(protocol, float(miou), float(acc), float(f1_mean), class_iou, class_f1,
                  tp, fp, fn, n_total,
                  per_image={"miou": img_miou, "pixel_accuracy": img_acc, "f1": img_f1})


def matched_prediction(pred, gt, num_classes: int, rule: str = "hungarian",
                       ignore_index: int = -1, background_index: int | None = None) -> np.ndarray:
    """One image's prediction rewritten in ground-truth classes, for figures.

    ``rule="hungarian"`` (the per-image protocols; ``background_index`` turns on the
    background many-to-one rule) or ``"majority"`` (``oracle_merged``). Pixels of unmatched
    segments and ignored pixels are ``-1``.
    """
    if rule not in ("hungarian", "majority"):
        raise ValueError(f"rule must be 'hungarian' or 'majority', got {rule!r}")
    pred, gt = check_pair(pred, gt, num_classes, ignore_index)
    ic = image_confusion(pred, gt, num_classes, ignore_index)
    assign = (majority_assignment(ic.conf) if rule == "majority"
              else hungarian_assignment(ic.conf, background_index))
    out = np.full(gt.shape, -1, np.int64)
    out[ic.valid] = assign[ic.columns]
    return out
