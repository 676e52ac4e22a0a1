"""Label maps in, confusion matrices out: the checked, vectorised first step of every protocol.

A *prediction* is a map of segment ids (any non-negative integers; they need not be
contiguous, and an unsupervised method's ids carry no class meaning). A *ground truth* is
a map of class ids in ``[0, num_classes)`` with ``ignore_index`` (default ``-1``) for
pixels that are not scored. A confusion matrix ``conf[c, s]`` counts the valid pixels of
class ``c`` that fell in segment ``s``; it is built with one ``np.bincount`` per image.
See chapter 05 (``book/05_evaluation.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Segment ids below this bound are compressed with a lookup table (linear time); larger
# ids fall back to np.unique (a sort).
_LUT_LIMIT = 1 << 22


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_label_list(maps, what: str) -> list[np.ndarray]:
    """One 2-D map, an ``(N, H, W)`` array or a sequence of 2-D maps -> list of 2-D arrays."""
    if maps is None:
        raise ValueError(f"{what} is None")
    if isinstance(maps, (list, tuple)):
        out = [_to_numpy(m) for m in maps]
    else:
        arr = _to_numpy(maps)
        if arr.ndim == 2:
            out = [arr]
        elif arr.ndim == 3:
            out = list(arr)
        else:
            raise ValueError(f"{what} must be a 2-D label map, an (N, H, W) array or a list of "
                             f"2-D maps; got an array of shape {arr.shape}")
    if not out:
        raise ValueError(f"{what} is empty: nothing to evaluate")
    for i, m in enumerate(out):
        if m.ndim != 2:
            raise ValueError(f"{what}[{i}] must be a 2-D label map; got shape {m.shape}")
    return out


def _as_int_map(m: np.ndarray, what: str) -> np.ndarray:
    if m.dtype == bool:
        return m.astype(np.int64)
    if np.issubdtype(m.dtype, np.integer):
        return m.astype(np.int64, copy=False)
    if np.issubdtype(m.dtype, np.floating):
        if np.isnan(m).any():
            raise ValueError(f"{what} contains NaN")
        if not np.all(np.isfinite(m)) or not np.all(m == np.round(m)):
            raise ValueError(f"{what} has non-integer values; label maps hold integer ids")
        return m.astype(np.int64)
    raise ValueError(f"{what} has dtype {m.dtype}; label maps hold integer ids")


def check_pair(pred, gt, num_classes: int, ignore_index: int, index: int = 0):
    """Validate one (prediction, ground truth) pair and return them as int64 arrays."""
    pred = _as_int_map(_to_numpy(pred), f"preds[{index}]")
    gt = _as_int_map(_to_numpy(gt), f"gts[{index}]")
    if pred.shape != gt.shape:
        raise ValueError(f"image {index}: prediction shape {pred.shape} != ground-truth shape "
                         f"{gt.shape}; resize the prediction to the label map first")
    if pred.size and pred.min() < 0:
        raise ValueError(f"preds[{index}] has negative segment ids (min {pred.min()}); predicted "
                         "segment ids must be >= 0")
    bad = (gt != ignore_index) & ((gt < 0) | (gt >= num_classes))
    if bad.any():
        values = np.unique(gt[bad])[:10].tolist()
        raise ValueError(f"gts[{index}] has labels {values} outside [0, {num_classes}) that are "
                         f"not ignore_index={ignore_index}")
    return pred, gt


@dataclass
class ImageConfusion:
    """The confusion matrix of one image (or of a whole dataset).

    Attributes
    ----------
    conf : (num_classes, S) int64, ``conf[c, s]`` = valid pixels of class c in segment s.
    segment_ids : (S,) the original predicted id of each column.
    columns : for each valid pixel (in ``valid`` order), its column in ``conf``.
    valid : boolean mask of the pixels that are scored (ground truth != ignore_index).
    """

    conf: np.ndarray
    segment_ids: np.ndarray
    columns: np.ndarray
    valid: np.ndarray

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def _compress(ids: np.ndarray, universe: np.ndarray | None = None):
    """Map arbitrary non-negative ids to 0..S-1; returns (columns, segment_ids)."""
    if universe is not None:
        return np.searchsorted(universe, ids), universe
    if ids.size == 0:
        return ids.astype(np.int64), np.zeros(0, np.int64)
    top = int(ids.max())
    if top < _LUT_LIMIT:
        used = np.flatnonzero(np.bincount(ids, minlength=top + 1))
        lut = np.empty(top + 1, np.int64)
        lut[used] = np.arange(used.size)
        return lut[ids], used
    used, columns = np.unique(ids, return_inverse=True)
    return columns.reshape(-1), used


def image_confusion(pred, gt, num_classes: int, ignore_index: int = -1,
                    segment_universe: np.ndarray | None = None) -> ImageConfusion:
    """Confusion matrix of one already-validated pair (see :func:`check_pair`).

    ``segment_universe`` (sorted ids) fixes the columns, so that matrices of different
    images add up (the dataset protocol); otherwise the columns are the ids that occur on
    this image's valid pixels.
    """
    valid = gt != ignore_index
    g = gt[valid]
    columns, segment_ids = _compress(pred[valid], segment_universe)
    n_seg = segment_ids.size
    conf = np.bincount(g * n_seg + columns, minlength=num_classes * n_seg)
    return ImageConfusion(conf.reshape(num_classes, n_seg).astype(np.int64), segment_ids,
                          columns, valid)


def segment_universe(preds: list[np.ndarray], gts: list[np.ndarray], ignore_index: int) -> np.ndarray:
    """Sorted predicted ids that occur on valid pixels anywhere in the dataset."""
    top = max((int(p.max()) if p.size else -1) for p in preds)
    if top < 0:
        return np.zeros(0, np.int64)
    if top < _LUT_LIMIT:
        seen = np.zeros(top + 1, bool)
        for p, g in zip(preds, gts):
            seen[p[g != ignore_index]] = True
        return np.flatnonzero(seen)
    return np.unique(np.concatenate([p[g != ignore_index] for p, g in zip(preds, gts)]))
