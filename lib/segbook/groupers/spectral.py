"""k-way spectral clustering: the first eigenvectors of the normalised graph, then K-means.

Recursive NCut (:func:`segbook.groupers.recursive_ncut`) splits in two again and again; the
k-way alternative (Ng, Jordan and Weiss, 2002; Shi and Malik's "simultaneous k-way cut")
embeds every node by the ``k`` smallest solutions of ``L x = lambda D x`` at once and groups
the embedding with K-means. Paper 2's decoding (K-means on its spectral channels) and the
spectral baselines of CAFE's tables have this shape. Chapter 01 ("k-way spectral clustering")
explains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from segbook.errors import GraphError
from segbook.groupers.ncut import ncut_eigenvectors

__all__ = ["SpectralClustering", "spectral_clustering", "spectral_embedding"]


def spectral_embedding(A, k: int, drop_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``k`` smallest solutions of ``(D - A) x = lambda D x``, each row scaled to
    unit length (Ng-Jordan-Weiss), as ``(values (k,), embedding (n, k))``.

    The vectors are those of :func:`ncut_eigenvectors` (``x^T D x = 1``); ``drop_first``
    leaves out the constant first one. Row normalisation puts the nodes of one group near one
    point of the unit sphere whatever their degree.
    """
    values, vectors = ncut_eigenvectors(A, k=k)
    if drop_first:
        values, vectors = values[1:], vectors[:, 1:]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return values, vectors / np.maximum(norms, 1e-12)


@dataclass
class SpectralClustering:
    """``labels`` (n,), the ``eigenvalues`` of ``L x = lambda D x`` used, and the ``embedding``."""

    labels: np.ndarray
    eigenvalues: np.ndarray
    embedding: np.ndarray

    @property
    def n_segments(self) -> int:
        return int(self.labels.max()) + 1


def spectral_clustering(A, k: int, seed: int = 0, n_init: int = 10) -> SpectralClustering:
    """Cut the graph ``A`` into ``k`` groups at once: :func:`spectral_embedding` with ``k``
    vectors, then K-means with ``k`` clusters (Ng, Jordan and Weiss, NIPS 2002).

    Parameters
    ----------
    A : symmetric non-negative affinity (dense, sparse or a segbook operator); no isolated
        nodes (a :class:`~segbook.errors.GraphError` otherwise).
    k : number of groups (2 <= k <= n).
    seed, n_init : K-means seed and restarts.

    Returns
    -------
    :class:`SpectralClustering`; labels renumbered ``0..`` by first appearance.
    """
    n = A.shape[0]
    if not 2 <= int(k) <= n:
        raise GraphError(f"spectral_clustering needs 2 <= k <= n = {n}, got k = {k}")
    values, X = spectral_embedding(A, int(k))
    labels = KMeans(n_clusters=int(k), n_init=n_init, random_state=seed).fit_predict(X)
    _, first = np.unique(labels, return_index=True)
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    remap[labels[np.sort(first)]] = np.arange(len(first))
    return SpectralClustering(labels=remap[labels], eigenvalues=values, embedding=X)
