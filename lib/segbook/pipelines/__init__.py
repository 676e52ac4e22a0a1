"""Pipelines: a paper's method as one reusable call, and the other methods on the same captures.

* :func:`walk_and_cut` / :func:`segment_attention` / :func:`run_batch` - paper 1
  (*Diffusing, Walking and Cutting*): capture, aggregation, random walk or ``P^k``
  adjacency, recursive NCut with a fixed or MAN-C stop, section 3.6 upsampling, optional PAMR.
* :mod:`segbook.pipelines.groupers` - :class:`WalkAndCut`, :class:`DiffSegGrouper`,
  :class:`DiffCut`, :class:`KMeansGrouper` with one ``fit_predict(source, out_size, image)``;
  :func:`segment_with` (by name) and :func:`compare_methods` (one capture, several groupers).
* :mod:`segbook.pipelines.synthetic` - planted-region attention with a known answer.
* :mod:`segbook.upsamplers.labels` (re-exported here) - paper 1's cosine upsampling and
  DiffCut's dot-product upsampling without forming the upsampled rows.
"""

from segbook.pipelines.groupers import (
    GROUPERS,
    DiffCut,
    DiffSegGrouper,
    KMeansGrouper,
    WalkAndCut,
    compare_methods,
    resolve_device,
    segment_with,
    split_hierarchy,
)
from segbook.pipelines.synthetic import planted_attention, planted_scene
from segbook.pipelines.walk_and_cut import (
    SegmentationResult,
    WalkAffinity,
    WalkAndCutConfig,
    WalkAndCutResult,
    capture_attention,
    peak_memory,
    run_batch,
    segment_attention,
    walk_and_cut,
)

# paper 1's label upsampling, re-exported from its one list (segbook.upsamplers.labels)
from segbook.upsamplers import labels as _labels
from segbook.upsamplers.labels import *

__all__ = [
    "GROUPERS",
    "DiffCut",
    "DiffSegGrouper",
    "KMeansGrouper",
    "SegmentationResult",
    "WalkAffinity",
    "WalkAndCut",
    "WalkAndCutConfig",
    "WalkAndCutResult",
    "capture_attention",
    "compare_methods",
    "peak_memory",
    "planted_attention",
    "planted_scene",
    "resolve_device",
    "run_batch",
    "segment_attention",
    "segment_with",
    "split_hierarchy",
    "walk_and_cut",
]
__all__ += _labels.__all__
