"""How predicted segments are given classes: Hungarian, background many-to-one, majority.

Every rule here reads a confusion matrix ``conf`` (classes x segments, see
:mod:`segbook.eval.confusion`) and returns an *assignment*: for each segment (column) the
class it stands for, or ``-1`` when it stands for none. :func:`count_outcomes` turns an
assignment into per-class true positives, false positives and false negatives, the one
accounting shared by every protocol:

* ``tp[c]``: pixels of class ``c`` inside segments assigned to ``c``;
* ``fp[c]``: pixels of other classes inside segments assigned to ``c``;
* ``fn[c]``: pixels of class ``c`` anywhere else (in segments assigned to another class,
  or to no class).

A segment assigned to no class therefore counts as misses of the classes under it and as
a false positive of no class (DiffSeg's accounting, ``google/diffseg`` ``hungarian_matching``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def hungarian_assignment(conf: np.ndarray, background_index: int | None = None) -> np.ndarray:
    """One-to-one matching of segments to the classes present, maximising the overlap.

    Parameters
    ----------
    conf : (C, S) confusion matrix.
    background_index : if given, the *background many-to-one* rule of EASe (paper 3,
        section 4.1, after DiffCut): the Hungarian matching runs between the segments and the
        present classes *other than* the background (on their pixels only), and every
        segment left unmatched is assigned to the background class, when the background is
        present. DiffCut's code merges the leftovers into one segment and runs a second full
        matching; the result is the same whenever that merged segment's best class is the
        background, which is what the rule is for.

    Returns
    -------
    (S,) int array: the matched class of each segment, ``-1`` if unmatched.

    Notes
    -----
    Only classes present (a non-zero row) take part: an absent class cannot be "found", and
    matching it would only let a leftover segment count as its false positive depending on
    how ties are broken. A pair with zero overlap is not kept as a match (it would add false
    positives without a true positive). With more segments than classes the extra segments
    stay unmatched; with fewer, some classes stay unmatched (all their pixels are misses).
    """
    conf = np.asarray(conf)
    n_seg = conf.shape[1]
    assign = np.full(n_seg, -1, np.int64)
    rows = np.flatnonzero(conf.sum(axis=1) > 0)
    if background_index is not None:
        rows = rows[rows != background_index]
    if rows.size and n_seg:
        r, c = linear_sum_assignment(conf[rows], maximize=True)
        keep = conf[rows[r], c] > 0
        assign[c[keep]] = rows[r[keep]]
    if background_index is not None and conf[background_index].sum() > 0:
        assign[assign < 0] = background_index
    return assign


def majority_assignment(conf: np.ndarray) -> np.ndarray:
    """Each segment to the class it overlaps most (the oracle merge; ties -> lowest class id).

    Segments without valid pixels get ``-1``. Used by the ``oracle_merged`` protocol (paper 1,
    supplement section A and Table 6) and by paper 2's oracle region scoring (section 4.1).
    """
    conf = np.asarray(conf)
    assign = conf.argmax(axis=0).astype(np.int64)
    assign[conf.sum(axis=0) == 0] = -1
    return assign


def count_outcomes(conf: np.ndarray, assign: np.ndarray):
    """Per-class ``(tp, fp, fn)`` (int64 arrays of length C) for an assignment."""
    conf = np.asarray(conf)
    n_classes = conf.shape[0]
    seg = np.flatnonzero(assign >= 0)
    cls = assign[seg]
    hit = conf[cls, seg].astype(np.float64)
    size = conf[:, seg].sum(axis=0).astype(np.float64)
    # float64 weights hold pixel counts exactly up to 2**53.
    tp = np.bincount(cls, weights=hit, minlength=n_classes).astype(np.int64)
    fp = np.bincount(cls, weights=size - hit, minlength=n_classes).astype(np.int64)
    fn = conf.sum(axis=1).astype(np.int64) - tp
    return tp, fp, fn


def diffseg_code_outcomes(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int):
    """``(tp, fp, fn)`` exactly as ``google/diffseg``'s ``hungarian_matching`` counts one image.

    Differences from :func:`hungarian_assignment` + :func:`count_outcomes`: the matrix has a
    row for *every* class (absent ones included) and a column for every raw id
    ``0..max(num_classes, max id + 1) - 1`` (empty ids included), and zero-overlap pairs
    are kept. Absent classes then take leftover columns, and which ones depends on how
    ``linear_sum_assignment`` breaks ties; a non-empty leftover counts as a false positive of
    an absent class. Offered to reproduce published DiffSeg/DiffCut numbers.
    """
    valid = gt != ignore_index
    g, p = gt[valid], pred[valid]
    n_cols = max(num_classes, int(p.max()) + 1 if p.size else 0)
    hist = np.bincount(g * n_cols + p, minlength=num_classes * n_cols).reshape(num_classes, n_cols)
    r, c = linear_sum_assignment(hist, maximize=True)
    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    tp[r] = hist[r, c]
    fp[r] = hist[:, c].sum(axis=0) - hist[r, c]
    fn = hist.sum(axis=1) - tp
    return tp, fp, fn
