"""Centreline IoU (clIoU) with a distance tolerance: OmniCrack30k's crack metric.

EASe (paper 3, Table 6) reports clIoU on OmniCrack30k "following the official protocol"
of Benz and Rodehorst (CVPRW 2024): both the ground truth and the prediction are reduced to
one-pixel centrelines, and a centreline pixel counts as found when the other centreline
passes within the tolerance (4 pixels). Per image::

    tp = GT centreline pixels within `tolerance` of the predicted centreline
    fn = GT centreline pixels farther than `tolerance` from it
    fp = predicted centreline pixels farther than `tolerance` from the GT centreline

and clIoU = sum tp / (sum tp + sum fp + sum fn), the counts pooled over the images of a
domain (the official script concatenates the pixels of a domain before one Jaccard score).
"Within the tolerance" is a Euclidean distance <= tolerance, the same set as a dilation with
a disk of that radius.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from segbook.eval.confusion import as_label_list


@dataclass
class CentrelineScores:
    """clIoU pooled over images, its counts, and the per-image values (NaN: nothing to score)."""

    cliou: float
    tp: int
    fp: int
    fn: int
    tolerance: float
    per_image: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"cliou": self.cliou, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "tolerance": self.tolerance}


def _binary(mask, what: str) -> np.ndarray:
    m = np.asarray(mask)
    if np.issubdtype(m.dtype, np.floating) and np.isnan(m).any():
        raise ValueError(f"{what} contains NaN")
    return m.astype(bool)


def centreline(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide centreline of a binary mask (``skimage.morphology.skeletonize``)."""
    from skimage.morphology import skeletonize

    return skeletonize(np.asarray(mask, bool))


def _within(skeleton: np.ndarray, tolerance: float) -> np.ndarray:
    if not skeleton.any():
        return np.zeros_like(skeleton)
    return ndimage.distance_transform_edt(~skeleton) <= tolerance


def centreline_counts(pred_mask, gt_mask, tolerance: float = 4, skeletonize_pred: bool = True,
                      skeletonize_gt: bool = True, valid=None):
    """``(tp, fp, fn)`` of one image; ``valid`` (optional) masks pixels out of scoring."""
    pred = _binary(pred_mask, "pred_mask")
    gt = _binary(gt_mask, "gt_mask")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if valid is not None:
        pred = pred & valid
        gt = gt & valid
    pred_cl = centreline(pred) if skeletonize_pred else pred
    gt_cl = centreline(gt) if skeletonize_gt else gt
    tp = int((gt_cl & _within(pred_cl, tolerance)).sum())
    fn = int(gt_cl.sum()) - tp
    fp = int((pred_cl & ~_within(gt_cl, tolerance)).sum())
    return tp, fp, fn


def centreline_iou(pred_masks, gt_masks, tolerance: float = 4, skeletonize_pred: bool = True,
                   skeletonize_gt: bool = True) -> CentrelineScores:
    """Centreline IoU of binary crack masks (True = crack), pooled over images.

    Parameters
    ----------
    pred_masks, gt_masks : a 2-D mask, an (N, H, W) array or a list of 2-D masks.
    tolerance : pixels; OmniCrack30k's protocol uses 4.
    skeletonize_pred, skeletonize_gt : reduce the masks to centrelines first. OmniCrack30k
        ships its ground truth as centrelines already: pass ``skeletonize_gt=False`` there.

    Returns
    -------
    :class:`CentrelineScores`. clIoU is NaN when neither side has a centreline pixel.
    """
    preds = as_label_list(pred_masks, "pred_masks")
    gts = as_label_list(gt_masks, "gt_masks")
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
    counts = np.array([centreline_counts(p, g, tolerance, skeletonize_pred, skeletonize_gt)
                       for p, g in zip(preds, gts)], dtype=np.int64).reshape(-1, 3)
    tp, fp, fn = (int(v) for v in counts.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_image = counts[:, 0] / counts.sum(axis=1)
    total = tp + fp + fn
    return CentrelineScores(tp / total if total else float("nan"), tp, fp, fn, float(tolerance),
                            per_image)
