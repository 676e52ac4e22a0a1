"""DiffCut's recursive Normalised Cut, and the plain recipe it is usually written as.

DiffCut (Couairon et al., NeurIPS 2024) cuts a graph of diffusion features: the cosine
similarity of the 32 x 32 tokens, min-max normalised and raised to ``alpha = 10``
(:func:`segbook.graphs.feature_cosine_affinity`), recursive NCut with the fixed stop
``NCut < tau`` (0.5 by default, 0.2 for SD 1.4), 100 evenly spaced thresholds of the Fiedler
vector, no depth limit.

:func:`diffcut_segment` is that recipe on top of :func:`segbook.groupers.ncut.recursive_ncut`.
:func:`plain_recursive_ncut` is the straightforward implementation (a full ``numpy.linalg.eigh``
per split, the NCut of each of the 100 thresholds computed on its own): the reference that
``benchmarks/ncut.py`` and the tests compare the fast solver with.
"""

from __future__ import annotations

import numpy as np

from segbook.errors import GraphError
from segbook.graphs.affinity import feature_cosine_affinity
from segbook.groupers.ncut import NCutResult, recursive_ncut

__all__ = ["diffcut_segment", "plain_recursive_ncut"]


def diffcut_segment(features, alpha: float = 10.0, tau: float = 0.5, n_thresholds: int = 100,
                    min_size: int = 1, **kwargs) -> NCutResult:
    """DiffCut's segmentation of a token grid: affinity, then recursive NCut with ``tau``.

    Parameters
    ----------
    features : (n, c) or (h, w, c) token features.
    alpha : exponent of the min-max normalised cosine affinity (DiffCut: 10).
    tau : NCut stop threshold (DiffCut: 0.5 with SSD-1B, 0.2 with SD 1.4).
    n_thresholds : evenly spaced thresholds tried per split (DiffCut: 100; ``None`` = exact).
    min_size : smallest segment (DiffCut: 1, i.e. no limit).
    **kwargs : passed to :func:`~segbook.groupers.ncut.recursive_ncut` (solver, device, ...).

    Returns
    -------
    :class:`~segbook.groupers.ncut.NCutResult`; ``labels`` follow the token order (reshape to
    ``(h, w)`` for a grid).
    """
    A = feature_cosine_affinity(features, alpha=alpha)
    return recursive_ncut(A, stop="threshold", threshold=tau, n_thresholds=n_thresholds,
                          min_size=min_size, **kwargs)


def _plain_split(A: np.ndarray, n_thresholds: int):
    d = A.sum(1)
    inv_sqrt = 1.0 / np.sqrt(d)
    L_sym = np.eye(len(d)) - inv_sqrt[:, None] * A * inv_sqrt[None, :]
    _, vecs = np.linalg.eigh(L_sym)
    x = inv_sqrt * vecs[:, 1]
    x = x if x[np.argmax(np.abs(x))] >= 0 else -x
    best = (np.inf, None, 0.0)
    for t in np.linspace(0.99 * x.min(), 0.99 * x.max(), n_thresholds):
        mask = x > t
        if mask.all() or not mask.any():
            continue
        cut = float(mask.astype(float) @ A @ (~mask).astype(float))
        value = cut / d[mask].sum() + cut / d[~mask].sum()
        if value < best[0]:
            best = (value, mask, cut)
    return best


def plain_recursive_ncut(A, stop: str = "threshold", threshold: float | None = 0.5,
                         n_thresholds: int = 100, min_size: int = 1) -> np.ndarray:
    """Recursive NCut the plain way: a dense ``eigh`` per split, each threshold on its own.

    The same algorithm as :func:`~segbook.groupers.ncut.recursive_ncut` (same stop rules, same
    MAN-C formulas), written as directly as possible: no operator, no cumulative sums. It costs
    a full eigendecomposition (``O(n^3)``) and ``n_thresholds`` products with ``A`` per split.
    Nodes of zero degree are not handled (they raise :class:`GraphError`).

    Returns
    -------
    labels : int64 array, ``0..K-1`` ordered by each segment's smallest node index.
    """
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0]
    leaves, stack = [], [np.arange(n)]
    while stack:
        idx = stack.pop()
        sub = A[np.ix_(idx, idx)]
        if len(idx) < max(2, 2 * min_size):
            leaves.append(idx)
            continue
        if (sub.sum(1) <= 0).any():
            raise GraphError("plain_recursive_ncut does not handle isolated nodes")
        value, mask, cut = _plain_split(sub, n_thresholds)
        if mask is None or mask.sum() < min_size or (~mask).sum() < min_size:
            leaves.append(idx)
            continue
        if stop != "threshold":
            m = (np.count_nonzero(sub) - np.count_nonzero(np.diag(sub))) / 2
            total = (sub.sum() - np.trace(sub)) / 2
            limit = len(idx) * total / (2 * m)
            if stop == "scaled_mincut":
                value = cut / total
        else:
            limit = threshold
        if value < limit:
            stack += [idx[~mask], idx[mask]]
        else:
            leaves.append(idx)
    labels = np.empty(n, dtype=np.int64)
    for k, idx in enumerate(sorted(leaves, key=lambda ix: ix.min())):
        labels[idx] = k
    return labels
