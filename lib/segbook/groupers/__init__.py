"""Groupers: turn a graph (or an embedding) into segments.

* :mod:`segbook.groupers.ncut` - the Normalised Cut family: :func:`ncut_value`,
  :func:`fiedler_vector`, :func:`recursive_ncut` (threshold, MAN-C and scaled min-cut stops),
  :func:`random_walk_ncut` (paper 1, sections 2.2 and 3.2-3.5).
* :mod:`segbook.groupers.diffcut` - DiffCut's recipe and the plain reference implementation.
* :mod:`segbook.groupers.tokencut` - TokenCut and MaskCut.
* :mod:`segbook.groupers.kmeans` - K-means with the silhouette choice of K (paper 2).
* :mod:`segbook.groupers.spectral` - k-way spectral clustering (eigenvectors, then K-means).
* :mod:`segbook.groupers.diffseg` - DiffSeg: anchors, symmetric-KL merging, NMS (paper 1's baseline).
* :mod:`segbook.groupers.pamr` - PAMR label refinement (DiffCut; paper 1, Table 5).
* :mod:`segbook.groupers.cafe` - CAFE, EASe's training-free grouper (paper 3, sec. 3.2;
  stages in :mod:`~segbook.groupers.cafe_stages` and :mod:`~segbook.groupers.cafe_merge`).
"""

from segbook.groupers.cafe import CAFE, TABLE4_VARIANTS, calibrate_granularity
from segbook.groupers.diffcut import diffcut_segment, plain_recursive_ncut
from segbook.groupers.diffseg import (
    DiffSeg,
    anchor_grid,
    merge_attention,
    proposals_to_labels,
    symmetric_kl,
)
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
from segbook.groupers.pamr import pamr, pamr_affinities, refine_labels
from segbook.groupers.spectral import SpectralClustering, spectral_clustering, spectral_embedding
from segbook.groupers.tokencut import maskcut, tokencut, tokencut_affinity

__all__ = [
    "CAFE",
    "TABLE4_VARIANTS",
    "DiffSeg",
    "KMeansSelection",
    "NCutResult",
    "SpectralClustering",
    "SplitNode",
    "anchor_grid",
    "best_threshold_split",
    "calibrate_granularity",
    "diffcut_segment",
    "fiedler_vector",
    "kmeans_silhouette",
    "manc_threshold",
    "maskcut",
    "merge_attention",
    "ncut_eigenvectors",
    "ncut_value",
    "pamr",
    "pamr_affinities",
    "plain_recursive_ncut",
    "proposals_to_labels",
    "random_walk_ncut",
    "recursive_ncut",
    "refine_labels",
    "spectral_clustering",
    "spectral_embedding",
    "symmetric_kl",
    "tokencut",
    "tokencut_affinity",
]

# Layer-distributed spectral clustering (paper 2, chapter 03), loaded on first use: its
# grouper builds on segbook.pipelines, which itself imports this package.
_LAZY = {"LayerAffinity", "LayerDistributedSpectralClustering", "ldsc_loss"}
# Paper 2 across a dataset (chapter 03, second half), for the same reason.
_LAZY_DATASET = {"DatasetSpectralClustering"}
__all__ += sorted(_LAZY | _LAZY_DATASET)


def __getattr__(name):
    if name in _LAZY:
        from segbook.groupers import ldsc

        return getattr(ldsc, name)
    if name in _LAZY_DATASET:
        from segbook.groupers import ldsc_dataset

        return getattr(ldsc_dataset, name)
    raise AttributeError(f"module 'segbook.groupers' has no attribute {name!r}")
