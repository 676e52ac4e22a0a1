"""Scoring unsupervised segmentations: matching protocols and metrics (chapter 05).

>>> from segbook.eval import evaluate
>>> scores = evaluate(preds, gts, "per_image", num_classes=27)   # doctest: +SKIP
>>> scores.miou, scores.pixel_accuracy, scores.f1, scores.per_class_iou  # doctest: +SKIP
>>> ev = Evaluator("per_image", num_classes=27)   # streaming: one image at a time
>>> for pred, gt in pairs: ev.update(pred, gt)   # doctest: +SKIP
>>> ev.result().miou  # doctest: +SKIP
"""

from segbook.eval.centreline import CentrelineScores, centreline, centreline_iou
from segbook.eval.confusion import image_confusion
from segbook.eval.matching import (
                                   count_outcomes,
                                   diffseg_code_outcomes,
                                   hungarian_assignment,
                                   majority_assignment,
)
from segbook.eval.nesting import is_refinement
from segbook.eval.protocols import PROTOCOLS, Evaluator, Scores, evaluate, matched_prediction

__all__ = [
                                   "PROTOCOLS",
                                   "CentrelineScores",
                                   "Evaluator",
                                   "Scores",
                                   "centreline",
                                   "centreline_iou",
                                   "count_outcomes",
                                   "diffseg_code_outcomes",
                                   "evaluate",
                                   "hungarian_assignment",
                                   "image_confusion",
    "is_refinement",
                                   "majority_assignment",
                                   "matched_prediction",
]
