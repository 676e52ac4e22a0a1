"""``evaluate`` (and its streaming form ``Evaluator``): one entry point for the scoring protocols the three papers use.

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
from segbook.eval.confusion import as_label_list, check_pair, image_confusion
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
    ev = Evaluator(protocol, num_classes, ignore_index=ignore_index,
                   background_many_to_one=background_many_to_one,
                   background_index=background_index,
                   diffseg_code_compat=diffseg_code_compat, tolerance=tolerance)
    pred_list = as_label_list(preds, "preds")
    gt_list = as_label_list(gts, "gts")
    if len(pred_list) != len(gt_list):
        raise ValueError(f"{len(pred_list)} predictions but {len(gt_list)} ground-truth maps")
    for pred, gt in zip(pred_list, gt_list):
        ev.update(pred, gt)
    return ev.result(distributed=distributed)


_MAX_DISTRIBUTED_CLUSTER_ID = 1 << 20


class Evaluator:
    """Streaming form of :func:`evaluate`: ``update`` one image at a time, ``result`` at the end.

    :func:`evaluate` is this accumulator run over a list, so the two give identical scores.
    The state holds only what a protocol needs, so memory does not grow with the number of
    images beyond three floats per image (the per-image means' headline values):

    * ``"dataset"``, ``"dataset_majority"``: the dataset confusion matrix (classes x cluster
      ids seen so far on valid pixels), matched once in :meth:`result`;
    * ``"per_image"``, ``"cliou"``: per-class TP/FP/FN summed over images (each image is
      matched on arrival), valid-pixel count, clIoU counts;
    * ``"per_image_mean"``, ``"oracle_merged"``: the same sums, plus each image's mIoU,
      accuracy and F1, and running per-class sums and counts of the per-image IoU and F1.

    Shards combine with :meth:`merge` (same process) or ``result(distributed=True)`` (an
    all-reduce over the default ``torch.distributed`` group, e.g. one shard per ``torchrun``
    rank). The parameters are those of :func:`evaluate`; see it for the protocols (paper 1,
    supplement Table 6, for the per-image variants).

    Examples
    --------
    >>> import numpy as np
    >>> ev = Evaluator("per_image", num_classes=2)
    >>> for gt in (np.array([[0, 0, 1, 1]]), np.array([[1, 1, 0, 0]])):
    ...     _ = ev.update(gt + 3, gt)
    >>> ev.result().miou, ev.n_images
    (1.0, 2)
    """

    def __init__(self, protocol: str, num_classes: int, ignore_index: int = -1,
                 background_many_to_one: bool = False, background_index: int = 0,
                 diffseg_code_compat: bool = False, tolerance: float = 4):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of "
                             f"{', '.join(PROTOCOLS)}")
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
        self.protocol = protocol
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.background_many_to_one = bool(background_many_to_one)
        self.background_index = background_index
        self.diffseg_code_compat = bool(diffseg_code_compat)
        self.tolerance = tolerance
        self._background = background_index if bg_needed else None
        self._dataset = protocol in ("dataset", "dataset_majority")
        self._means = protocol in ("per_image_mean", "oracle_merged")
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> Evaluator:
        """Forget every image seen so far."""
        c = self.num_classes
        self.n_images = 0
        self.n_valid = 0
        self._max_id = -1                              # largest id on any pixel (distributed)
        self._ids = np.zeros(0, np.int64)              # dataset: sorted cluster ids (columns)
        self._conf = np.zeros((c, 0), np.int64)        # dataset: confusion matrix
        self._counts = np.zeros((3, c), np.int64)      # per-image: tp, fp, fn sums
        self._cl_counts = np.zeros(3, np.int64)        # cliou
        self._img = {"miou": [], "pixel_accuracy": [], "f1": []}   # per-image means
        self._class_sums = np.zeros((4, c), np.float64)  # iou sum, iou count, f1 sum, f1 count
        return self

    def _config(self):
        return (self.protocol, self.num_classes, self.ignore_index, self.background_many_to_one,
                self._background, self.diffseg_code_compat, self.tolerance)

    def _add_columns(self, ids: np.ndarray, conf: np.ndarray) -> None:
        """Add a confusion matrix whose columns are the (sorted) cluster ``ids``."""
        if ids.size == 0:
            return
        pos = np.searchsorted(self._ids, ids)
        known = pos < self._ids.size
        known[known] = self._ids[pos[known]] == ids[known]
        if not known.all():
            union = np.union1d(self._ids, ids)
            grown = np.zeros((self.num_classes, union.size), np.int64)
            grown[:, np.searchsorted(union, self._ids)] = self._conf
            self._ids, self._conf = union, grown
            pos = np.searchsorted(self._ids, ids)
        self._conf[:, pos] += conf

    # ----------------------------------------------------------------- update
    def update(self, pred, gt) -> Evaluator:
        """Add one image (2-D maps) or a batch (``(N, H, W)`` arrays or lists of 2-D maps).

        Inputs are checked as in :func:`evaluate` (numpy arrays or torch tensors).
        """
        preds, gts = as_label_list(pred, "pred"), as_label_list(gt, "gt")
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth maps")
        for p, g in zip(preds, gts):
            self._update_one(*check_pair(p, g, self.num_classes, self.ignore_index,
                                         self.n_images))
        return self

    def _update_one(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.n_images += 1
        if pred.size:
            self._max_id = max(self._max_id, int(pred.max()))
        if self.diffseg_code_compat:
            counts = diffseg_code_outcomes(pred, gt, self.num_classes, self.ignore_index)
            n_valid = int((gt != self.ignore_index).sum())
        else:
            ic = image_confusion(pred, gt, self.num_classes, self.ignore_index)
            n_valid = ic.n_valid
            if self._dataset:
                self.n_valid += n_valid
                self._add_columns(ic.segment_ids, ic.conf)
                return
            if self.protocol == "oracle_merged":
                assign = majority_assignment(ic.conf)
            else:
                assign = hungarian_assignment(ic.conf, self._background)
            counts = count_outcomes(ic.conf, assign)
            if self.protocol == "cliou":
                matched = np.full(gt.shape, -1, np.int64)
                matched[ic.valid] = assign[ic.columns]
                fg_pred = (matched >= 0) & (matched != self._background)
                fg_gt = ic.valid & (gt != self._background)
                self._cl_counts += centreline_counts(fg_pred, fg_gt, self.tolerance,
                                                     valid=ic.valid)
        counts = np.asarray(counts, np.int64)
        self._counts += counts
        self.n_valid += n_valid
        if self._means:
            iou, f1 = _ratios(*counts)
            self._img["miou"].append(_nanmean(iou))
            self._img["f1"].append(_nanmean(f1))
            self._img["pixel_accuracy"].append(
                float(counts[0].sum() / n_valid) if n_valid > 0 else float("nan"))
            for row, values in ((0, iou), (2, f1)):
                ok = ~np.isnan(values)
                self._class_sums[row] += np.where(ok, values, 0.0)
                self._class_sums[row + 1] += ok

    # ------------------------------------------------------------------ merge
    def merge(self, other: Evaluator) -> Evaluator:
        """Add another accumulator's images to this one (same protocol and settings).

        Scoring ``a.merge(b)`` equals scoring ``a``'s images followed by ``b``'s.
        """
        if not isinstance(other, Evaluator):
            raise TypeError(f"can only merge another Evaluator, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(f"cannot merge evaluators with different settings: "
                             f"{self._config()} vs {other._config()}")
        self.n_images += other.n_images
        self.n_valid += other.n_valid
        self._max_id = max(self._max_id, other._max_id)
        self._add_columns(other._ids, other._conf)
        self._counts += other._counts
        self._cl_counts += other._cl_counts
        for key, values in other._img.items():
            self._img[key].extend(values)
        self._class_sums += other._class_sums
        return self

    # ----------------------------------------------------------------- result
    def result(self, distributed: bool = False) -> Scores:
        """The scores of every image seen (does not change the state).

        ``distributed=True``: every ``torch.distributed`` rank holds its own shard; the counts
        are all-reduced and every rank returns the scores of the whole dataset (see
        :func:`evaluate`). ``Scores.per_image`` then lists this rank's images only.
        """
        reduce = _torch_all_reduce() if distributed else _no_reduce
        n_total = int(reduce(self.n_images))
        if n_total == 0:
            raise ValueError("no images: call update(pred, gt) before result()")
        if self._dataset:
            return self._dataset_result(reduce, distributed, n_total)
        tp, fp, fn = (reduce(self._counts[j]).astype(np.int64) for j in range(3))
        if not self._means:
            extra = {}
            if self.protocol == "cliou":
                cl = reduce(self._cl_counts)
                total = float(cl.sum())
                extra["cliou"] = float(cl[0] / total) if total else float("nan")
            return _accumulated(self.protocol, tp, fp, fn, int(reduce(self.n_valid)), n_total,
                                **extra)
        img = {k: np.asarray(v, np.float64) for k, v in self._img.items()}
        # sums and counts of non-NaN values, all-reduced, then divided: a mean over all images
        miou, acc, f1_mean = (_ratio_or_nan(*(reduce(v) for v in _sum_and_count(img[k])))
                              for k in ("miou", "pixel_accuracy", "f1"))
        sums = [reduce(row) for row in self._class_sums]
        class_iou, class_f1 = _ratio_or_nan(sums[0], sums[1]), _ratio_or_nan(sums[2], sums[3])
        return Scores(self.protocol, float(miou), float(acc), float(f1_mean), class_iou,
                      class_f1, tp, fp, fn, n_total, per_image=img)

    def _dataset_result(self, reduce, distributed, n_total) -> Scores:
        ids, conf = self._ids, self._conf
        if distributed:
            # every rank needs the same columns: all ids up to the largest on any rank
            top = int(reduce(self._max_id, op="max"))
            if top >= _MAX_DISTRIBUTED_CLUSTER_ID:
                raise ValueError(f"cluster id {top} is too large for a distributed dataset "
                                 "evaluation; number the clusters 0..K-1")
            full = np.zeros((self.num_classes, top + 1), np.int64)
            full[:, ids] = conf
            conf = reduce(full).astype(np.int64)
        n_valid = int(reduce(self.n_valid))
        assign = (majority_assignment(conf) if self.protocol == "dataset_majority"
                  else hungarian_assignment(conf, self._background))
        tp, fp, fn = count_outcomes(conf, assign)
        return _accumulated(self.protocol, tp, fp, fn, n_valid, n_total)

    def __repr__(self) -> str:
        return (f"Evaluator({self.protocol!r}, num_classes={self.num_classes}, "
                f"n_images={self.n_images})")


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
