"""Graphs from what a model computes: attention random walks, feature and pixel affinities.

The pieces of paper 1 (sections 3.1-3.3) and DiffCut that turn captured tensors into the
graphs the spectral groupers cut (:mod:`segbook.groupers`):

* :func:`aggregate_self_attention` - DiffSeg's multi-resolution aggregation, row-stochastic.
* :func:`power_walk` - ``P^k``, the k-step random walk.
* :func:`adjacency` - ``P P^T`` ("dot") or cosine, dense or as a :class:`FactoredAffinity`.
* :func:`feature_cosine_affinity` - DiffCut's min-max normalised cosine to the power alpha.
* :func:`pixel_affinity` - Shi and Malik's brightness/colour-and-position graph.
* :func:`sparsify_topk`, :func:`sparsify_threshold`.
* :func:`as_affinity`, :class:`DenseAffinity`, :class:`SparseAffinity`,
  :class:`FactoredAffinity` - the operator view the NCut solver works on.
* :func:`planted_partition`, :func:`planted_random_walk` - graphs with a known answer.
* :func:`dataset_knn_graph`, :class:`KnnGraph` - paper 2's sparse top-k graph over the tokens
  of many images (intra- and inter-image neighbours), built chunk by chunk.
"""

from segbook.graphs.affinity import (
    adjacency,
    feature_cosine_affinity,
    pixel_affinity,
    sparsify_threshold,
    sparsify_topk,
)
from segbook.graphs.attention import (
    aggregate_self_attention,
    check_row_stochastic,
    diffseg_weights,
    grid_side,
    power_walk,
    token_grid,
)
from segbook.graphs.knn import KnnGraph, dataset_knn_graph
from segbook.graphs.operators import (
    Affinity,
    DenseAffinity,
    FactoredAffinity,
    SparseAffinity,
    as_affinity,
)
from segbook.graphs.synthetic import block_labels, planted_partition, planted_random_walk

__all__ = [
    "Affinity",
    "DenseAffinity",
    "FactoredAffinity",
    "KnnGraph",
    "SparseAffinity",
    "adjacency",
    "aggregate_self_attention",
    "as_affinity",
    "block_labels",
    "check_row_stochastic",
    "dataset_knn_graph",
    "diffseg_weights",
    "feature_cosine_affinity",
    "grid_side",
    "pixel_affinity",
    "planted_partition",
    "planted_random_walk",
    "power_walk",
    "sparsify_threshold",
    "sparsify_topk",
    "token_grid",
]
