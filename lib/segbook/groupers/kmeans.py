"""K-means with the number of clusters chosen by the silhouette score (paper 2's decoding).

Paper 2 (*What and Where*, section 4) turns its spectral embedding into regions by running
K-means for every ``K`` from 2 to 10 and keeping the ``K`` with the best silhouette score
(Rousseeuw, 1987): the mean over points of ``(b - a) / max(a, b)``, with ``a`` the mean distance
to the own cluster and ``b`` to the nearest other one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from segbook.errors import GraphError

__all__ = ["KMeansSelection", "kmeans_silhouette"]


@dataclass
class KMeansSelection:
    """``labels`` of the chosen ``k`` and the silhouette ``scores`` of every ``k`` tried."""

    labels: np.ndarray
    k: int
    scores: dict = field(default_factory=dict)

    @property
    def n_segments(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def __array__(self, dtype=None, copy=None):
        return self.labels if dtype is None else self.labels.astype(dtype)


def kmeans_silhouette(X, k_range=range(2, 11), seed: int = 0, n_init: int = 10,
                      sample_size: int | None = 4096) -> KMeansSelection:
    """K-means for each ``k`` in ``k_range``, keeping the best silhouette score.

    Parameters
    ----------
    X : (n, c) or (h, w, c) embedding (rows are points).
    k_range : candidate numbers of clusters (paper 2: 2..10). Values ``>= n`` are skipped.
    seed : K-means and silhouette-sampling seed.
    n_init : K-means restarts per ``k``.
    sample_size : points used by the silhouette score (``O(n^2)``); ``None`` uses all.

    Returns
    -------
    :class:`KMeansSelection`. Labels are renumbered ``0..k-1`` by first appearance. Points that
    are all identical (no ``k`` gives two non-empty clusters) give one cluster, ``k = 1``.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 3:
        X = X.reshape(-1, X.shape[-1])
    if X.ndim != 2 or not np.isfinite(X).all():
        raise GraphError("kmeans_silhouette needs a finite (n, c) array")
    n = X.shape[0]
    n_distinct = len(np.unique(X, axis=0))
    best = (-np.inf, None, 1)
    scores = {}
    for k in k_range:
        if k < 2 or k >= n or k > n_distinct:
            continue
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(X)
        if len(np.unique(labels)) < 2:
            continue
        size = None if sample_size is None or n <= sample_size else sample_size
        score = float(silhouette_score(X, labels, sample_size=size, random_state=seed))
        scores[int(k)] = score
        if score > best[0]:
            best = (score, labels, int(k))
    if best[1] is None:
        return KMeansSelection(labels=np.zeros(n, dtype=np.int64), k=1, scores=scores)
    _, first = np.unique(best[1], return_index=True)
    remap = np.empty(best[1].max() + 1, dtype=np.int64)
    remap[best[1][np.sort(first)]] = np.arange(len(first))
    return KMeansSelection(labels=remap[best[1]], k=best[2], scores=scores)
