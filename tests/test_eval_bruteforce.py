"""segbook.eval against brute force: every matching, pixel-loop accounting, and clIoU by hand."""

import itertools
import time

import numpy as np
import pytest

from segbook.eval import (
    centreline_iou,
    count_outcomes,
    evaluate,
    hungarian_assignment,
    image_confusion,
    majority_assignment,
)


def naive_outcomes(pred, gt, mapping, num_classes, ignore=-1):
    """Pixel by pixel: segment -> class dict, TP/FP/FN per class."""
    tp = np.zeros(num_classes, int)
    fp = np.zeros(num_classes, int)
    fn = np.zeros(num_classes, int)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g == ignore:
            continue
        c = mapping.get(int(p), -1)
        if c == g:
            tp[g] += 1
        else:
            fn[g] += 1
            if c >= 0:
                fp[c] += 1
    return tp, fp, fn


def all_matchings(classes, segments, overlap):
    """Every partial one-to-one map class -> segment, as (total overlap, {segment: class})."""
    out = []
    slots = list(segments) + [None] * len(classes)
    for perm in set(itertools.permutations(slots, len(classes))):
        mapping = {s: c for c, s in zip(classes, perm) if s is not None}
        if len(mapping) != sum(s is not None for s in perm):
            continue
        # a pair without overlap is not a match (segbook's rule): drop it.
        mapping = {s: c for s, c in mapping.items() if overlap[(c, s)] > 0}
        out.append((sum(overlap[(c, s)] for s, c in mapping.items()), mapping))
    return out


def brute_force_best(pred, gt, num_classes):
    classes = sorted(set(gt[gt >= 0].tolist()))
    segments = sorted(set(pred[gt >= 0].tolist()))
    overlap = {(c, s): int(((gt == c) & (pred == s)).sum()) for c in classes for s in segments}
    cands = all_matchings(classes, segments, overlap)
    best = max(v for v, _ in cands)
    optimal = {tuple(sorted(m.items())) for v, m in cands if v == best}
    return best, optimal


def random_case(rng, shape=(3, 4)):
    num_classes = int(rng.integers(1, 5))
    n_seg = int(rng.integers(1, 6))
    gt = rng.integers(-1, num_classes, shape)
    pred = rng.integers(0, n_seg, shape) * 3 + 1  # non-contiguous ids
    return pred, gt, num_classes


def test_hungarian_is_optimal_and_accounting_matches_pixel_loop():
    rng = np.random.default_rng(0)
    unique_cases = 0
    for _ in range(150):
        pred, gt, k = random_case(rng)
        ic = image_confusion(pred, gt, k)
        assign = hungarian_assignment(ic.conf)
        mapping = {int(ic.segment_ids[s]): int(c) for s, c in enumerate(assign) if c >= 0}
        ours = sum(int(((gt == c) & (pred == s)).sum()) for s, c in mapping.items())
        best, optimal = brute_force_best(pred, gt, k)
        assert ours == best
        got = count_outcomes(ic.conf, assign)
        for a, b in zip(got, naive_outcomes(pred, gt, mapping, k)):
            np.testing.assert_array_equal(a, b)
        if len(optimal) == 1:  # the metric itself is then fixed: compare with brute force
            unique_cases += 1
            ref = naive_outcomes(pred, gt, dict(next(iter(optimal))), k)
            s = evaluate(pred, gt, "per_image", k)
            np.testing.assert_array_equal(s.tp, ref[0])
            np.testing.assert_array_equal(s.fp, ref[1])
            np.testing.assert_array_equal(s.fn, ref[2])
    assert unique_cases > 30


def test_per_image_protocol_equals_brute_force_over_a_dataset():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(60):
        k = int(rng.integers(2, 5))
        cases = [random_case(rng) for _ in range(3)]
        preds = [c[0] for c in cases]
        gts = [np.where(c[1] >= k, -1, c[1]) for c in cases]
        tp = np.zeros(k, int)
        fp = np.zeros(k, int)
        fn = np.zeros(k, int)
        unique = True
        for p, g in zip(preds, gts):
            _, optimal = brute_force_best(p, g, k)
            unique &= len(optimal) == 1
            r = naive_outcomes(p, g, dict(next(iter(optimal))), k)
            tp, fp, fn = tp + r[0], fp + r[1], fn + r[2]
        if not unique:
            continue
        checked += 1
        s = evaluate(preds, gts, "per_image", k)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / (tp + fp + fn)
        np.testing.assert_allclose(s.per_class_iou, iou)
        assert s.miou == pytest.approx(np.nanmean(iou))
        assert s.pixel_accuracy == pytest.approx(tp.sum() / sum((g >= 0).sum() for g in gts))
    assert checked > 5


def test_dataset_protocol_is_optimal_over_the_pooled_matrix():
    rng = np.random.default_rng(2)
    for _ in range(40):
        k = int(rng.integers(1, 4))
        preds = [rng.integers(0, 4, (3, 3)) for _ in range(3)]
        gts = [rng.integers(-1, k, (3, 3)) for _ in range(3)]
        pooled_pred, pooled_gt = np.concatenate(preds), np.concatenate(gts)
        best, optimal = brute_force_best(pooled_pred, pooled_gt, k)
        s = evaluate(preds, gts, "dataset", k)
        assert s.tp.sum() == best
        if len(optimal) == 1:
            ref = naive_outcomes(pooled_pred, pooled_gt, dict(next(iter(optimal))), k)
            np.testing.assert_array_equal(s.fp, ref[1])


def test_oracle_merge_equals_per_segment_majority():
    rng = np.random.default_rng(3)
    for _ in range(50):
        pred, gt, k = random_case(rng)
        ic = image_confusion(pred, gt, k)
        assign = majority_assignment(ic.conf)
        for s, c in zip(ic.segment_ids, assign):
            votes = [int(((pred == s) & (gt == j)).sum()) for j in range(k)]
            assert c == int(np.argmax(votes))


def test_centreline_iou_hand_cases():
    gt = np.zeros((32, 64), bool)
    gt[10, 5:55] = True  # a 50-pixel centreline
    near = np.zeros_like(gt)
    near[12, 5:55] = True
    far = np.zeros_like(gt)
    far[20, 5:55] = True
    half = np.zeros_like(gt)
    half[10, 5:30] = True
    kw = {"skeletonize_pred": False, "skeletonize_gt": False}
    assert centreline_iou(near, gt, **kw).cliou == 1.0
    s = centreline_iou(far, gt, **kw)
    assert (s.tp, s.fp, s.fn, s.cliou) == (0, 50, 50, 0.0)
    s = centreline_iou(half, gt, **kw)  # GT columns 5..33 lie within 4 px of the half line
    assert (s.tp, s.fp, s.fn) == (29, 0, 21)
    assert s.cliou == pytest.approx(29 / 50)
    # pooled over images, not averaged
    s = centreline_iou([near, far], [gt, gt], **kw)
    assert s.cliou == pytest.approx(50 / 150)
    np.testing.assert_allclose(s.per_image, [1.0, 0.0])
    # thick bands are reduced to their centrelines first
    band = np.zeros((32, 64), bool)
    band[8:13, 5:55] = True
    assert centreline_iou(band, band).cliou == 1.0
    assert np.isnan(centreline_iou(np.zeros((8, 8)), np.zeros((8, 8))).cliou)
    with pytest.raises(ValueError, match="shape"):
        centreline_iou(np.zeros((8, 8)), np.zeros((8, 9)))


def test_cliou_protocol_matches_segments_then_scores_the_foreground():
    gt = np.zeros((32, 64), int)
    gt[8:13, 5:55] = 1  # a crack on background
    pred = np.zeros_like(gt)
    pred[:, 32:] = 2  # background split in two segments ...
    pred[9:14, 5:55] = 1  # ... and the crack found one pixel off
    s = evaluate(pred, gt, "cliou", num_classes=2)
    assert s.cliou == 1.0
    assert s.per_class_iou[1] == pytest.approx(200 / 300)


def test_500_images_of_320_take_seconds():
    rng = np.random.default_rng(4)
    gts = rng.integers(-1, 27, (500, 320, 320), dtype=np.int16)
    preds = rng.integers(0, 30, (500, 320, 320), dtype=np.int16)
    start = time.perf_counter()
    s = evaluate(preds, gts, "per_image", 27)
    elapsed = time.perf_counter() - start
    assert 0 < s.miou < 0.1
    assert elapsed < 20, f"per_image on 500 images of 320x320 took {elapsed:.1f} s"
