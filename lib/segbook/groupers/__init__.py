"""Groupers: turn a graph (or an embedding) into segments.

* :mod:`segbook.groupers.ncut` - the Normalised Cut family: :func:`ncut_value`,
  :func:`fiedler_vector`, :func:`recursive_ncut` (threshold, MAN-C and scaled min-cut stops),
  :func:`random_walk_ncut` (paper 1, sections 2.2 and 3.2-3.5).
* :mod:`segbook.groupers.diffcut` - DiffCut's recipe and the plain reference implementation.
* :mod:`segbook.groupers.tokencut` - TokenCut and MaskCut.
* :mod:`segbook.groupers.kmeans` - K-means with the silhouette choice of K (paper 2).
"""

from segbook.groupers.diffcut import diffcut_segment, plain_recursive_ncut
from segbook.groupers.kmeans import KMeansSelection, kmeans_silhouette
from segbook.groupers.ncut import (
    NCutResult,
    SplitNode,
    best_threshold_split,
    fiedler_vector,
    manc_threshold,
    ncut_eigenvectors,
    ncut_value,
    random_walk_ncut,
    recursive_ncut,
)
from segbook.groupers.tokencut import maskcut, tokencut, tokencut_affinity

__all__ = [
    "KMeansSelection",
    "NCutResult",
    "SplitNode",
    "best_threshold_split",
    "diffcut_segment",
    "fiedler_vector",
    "kmeans_silhouette",
    "manc_threshold",
    "maskcut",
    "ncut_eigenvectors",
    "ncut_value",
    "plain_recursive_ncut",
    "random_walk_ncut",
    "recursive_ncut",
    "tokencut",
    "tokencut_affinity",
]
