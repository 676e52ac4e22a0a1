"""Hand-computed cases for every protocol of segbook.eval.evaluate."""

import numpy as np
import pytest

from segbook.eval import evaluate, matched_prediction

A = np.array


def scores(pred, gt, protocol, k, **kw):
    return evaluate(pred, gt, protocol, num_classes=k, **kw)


def test_perfect_prediction_with_arbitrary_ids_scores_one_everywhere():
    gt = A([[0, 0, 1, 1], [2, 2, 1, 1]])
    pred = A([[7, 7, 3, 3], [9, 9, 3, 3]])
    for protocol in ("dataset", "dataset_majority", "per_image", "per_image_mean",
                     "oracle_merged"):
        s = scores(pred, gt, protocol, 3)
        assert (s.miou, s.pixel_accuracy, s.f1) == (1.0, 1.0, 1.0), protocol
        np.testing.assert_array_equal(s.per_class_iou, [1.0, 1.0, 1.0])


def test_over_segmentation_is_punished_by_hungarian_and_forgiven_by_oracle():
    gt = A([[0, 0, 0, 0, 1, 1, 1, 1]])
    pred = A([[0, 0, 1, 1, 2, 2, 2, 2]])
    # class 1 -> segment 2; class 0 -> one of two equal halves: tp0=2, fn0=2.
    for protocol in ("dataset", "per_image", "per_image_mean"):
        s = scores(pred, gt, protocol, 2)
        assert s.miou == pytest.approx(0.75)
        assert s.pixel_accuracy == pytest.approx(0.75)
        assert s.f1 == pytest.approx((2 / 3 + 1) / 2)
        np.testing.assert_allclose(s.per_class_iou, [0.5, 1.0])
    s = scores(pred, gt, "oracle_merged", 2)
    assert (s.miou, s.pixel_accuracy, s.f1) == (1.0, 1.0, 1.0)


def test_under_segmentation():
    gt = A([[0, 0, 1, 1, 2, 2, 2, 2]])
    pred = np.zeros_like(gt)
    # the one segment goes to class 2: tp2=4, fp2=4, fn0=2, fn1=2.
    for protocol in ("per_image", "oracle_merged"):
        s = scores(pred, gt, protocol, 3)
        np.testing.assert_allclose(s.per_class_iou, [0, 0, 0.5])
        assert s.miou == pytest.approx(1 / 6)
        assert s.pixel_accuracy == pytest.approx(0.5)
        assert s.f1 == pytest.approx((2 / 3) / 3)


def test_fewer_segments_than_classes_leaves_classes_missed():
    gt = A([[0, 0, 0, 1, 2, 2]])
    pred = np.zeros_like(gt)
    s = scores(pred, gt, "per_image", 3)
    np.testing.assert_array_equal(s.tp, [3, 0, 0])
    np.testing.assert_array_equal(s.fp, [3, 0, 0])
    np.testing.assert_array_equal(s.fn, [0, 1, 2])
    assert s.miou == pytest.approx(0.5 / 3)


def test_unmatched_segments_are_misses_and_false_positives_of_no_class():
    gt = A([[0, 0, 0, 1, 1, 1]])
    pred = A([[0, 0, 1, 2, 2, 2]])  # segment 1 (one pixel of class 0) is left over
    s = scores(pred, gt, "per_image", 2)
    np.testing.assert_array_equal(s.tp, [2, 3])
    np.testing.assert_array_equal(s.fp, [0, 0])
    np.testing.assert_array_equal(s.fn, [1, 0])


def test_per_image_accumulated_vs_averaged_vs_dataset():
    gts = [A([[0, 0, 0, 0]]), A([[0, 0, 0, 1]])]
    preds = [A([[0, 0, 0, 0]]), A([[1, 1, 1, 1]])]
    s = evaluate(preds, gts, "per_image", 2)
    # tp0 = 4 + 3, fp0 = 1, fn1 = 1.
    np.testing.assert_allclose(s.per_class_iou, [7 / 8, 0.0])
    assert s.miou == pytest.approx(7 / 16)
    assert s.pixel_accuracy == pytest.approx(7 / 8)
    assert s.f1 == pytest.approx((14 / 15) / 2)

    m = evaluate(preds, gts, "per_image_mean", 2)
    # image 1: class 0 only, perfect; image 2: IoU0 = 3/4, IoU1 = 0.
    np.testing.assert_allclose(m.per_image["miou"], [1.0, 3 / 8])
    assert m.miou == pytest.approx(11 / 16)
    assert m.pixel_accuracy == pytest.approx(7 / 8)
    assert m.f1 == pytest.approx((1 + 3 / 7) / 2)
    np.testing.assert_allclose(m.per_class_iou, [7 / 8, 0.0])

    d = evaluate(preds, gts, "dataset", 2)
    # ids are shared across images: class 0 -> id 0 (4 px), class 1 -> id 1 (1 of 4 px).
    np.testing.assert_allclose(d.per_class_iou, [4 / 7, 1 / 4])
    assert d.miou == pytest.approx((4 / 7 + 1 / 4) / 2)
    assert d.pixel_accuracy == pytest.approx(5 / 8)


def test_dataset_majority_is_many_to_one_over_the_dataset():
    gt = A([[0, 0, 1, 1]])
    pred = A([[0, 1, 2, 2]])
    assert scores(pred, gt, "dataset_majority", 2).miou == 1.0
    assert scores(pred, gt, "dataset", 2).miou == pytest.approx(0.75)
    # clusters are shared across images: cluster 0 is mostly class 0 over the dataset
    gts = [A([[0, 0, 0, 1]]), A([[0, 1, 1, 1]])]
    preds = [A([[0, 0, 1, 1]]), A([[0, 0, 1, 1]])]
    s = evaluate(preds, gts, "dataset_majority", 2)
    np.testing.assert_allclose(s.per_class_iou, [3 / 5, 3 / 5])
    assert s.pixel_accuracy == pytest.approx(6 / 8)


def test_ignore_index_pixels_are_not_scored():
    gt = A([[-1, -1, 0, 1]])
    pred = A([[5, 5, 0, 1]])
    s = scores(pred, gt, "per_image", 2)
    assert (s.miou, s.pixel_accuracy) == (1.0, 1.0)
    s = scores(pred, A([[255, 255, 0, 1]]), "per_image", 2, ignore_index=255)
    assert s.miou == 1.0


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    gt = A([[0, 0, 1, 1]])
    pred = A([[0, 0, 0, 1]])
    s = scores(pred, gt, "per_image", 4)
    assert np.isnan(s.per_class_iou[2:]).all()
    assert s.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s.to_dict()["miou"] == s["miou"] == s.miou


def test_background_many_to_one():
    gt = A([[0, 0, 0, 0, 1, 1, 2, 2]])
    pred = A([[0, 1, 2, 2, 3, 3, 4, 4]])
    s = scores(pred, gt, "per_image", 3)
    np.testing.assert_allclose(s.per_class_iou, [0.5, 1, 1])
    s = scores(pred, gt, "per_image", 3, background_many_to_one=True)
    assert s.miou == 1.0
    s = scores(pred, gt, "dataset", 3, background_many_to_one=True)
    assert s.miou == 1.0
    # A leftover segment that covers foreground becomes a background false positive.
    gt = A([[0, 0, 1, 1, 1, 1]])
    pred = A([[0, 0, 1, 1, 1, 2]])
    s = scores(pred, gt, "per_image", 2, background_many_to_one=True)
    np.testing.assert_array_equal(s.tp, [2, 3])
    np.testing.assert_array_equal(s.fp, [1, 0])
    np.testing.assert_array_equal(s.fn, [0, 1])
    assert s.miou == pytest.approx((2 / 3 + 3 / 4) / 2)
    # Background index other than 0.
    s = scores(A([[0, 1, 2, 2]]), A([[1, 1, 0, 0]]), "per_image", 2,
               background_many_to_one=True, background_index=1)
    assert s.miou == 1.0


def test_diffseg_code_compat_counts_absent_classes_like_the_reference_code():
    gt = A([[0, 0, 0, 0]])
    pred = A([[0, 0, 1, 1]])
    ours = scores(pred, gt, "per_image", 2)
    assert np.isnan(ours.per_class_iou[1]) and ours.miou == pytest.approx(0.5)
    ref = scores(pred, gt, "per_image", 2, diffseg_code_compat=True)
    # the absent class 1 takes the leftover segment: two false positives, IoU 0.
    np.testing.assert_array_equal(ref.fp, [0, 2])
    assert ref.miou == pytest.approx(0.25)
    # Without leftovers the two agree.
    gt = A([[0, 0, 1, 1, 2, 2]])
    pred = A([[1, 1, 0, 0, 2, 0]])
    a = scores(pred, gt, "per_image", 3)
    b = scores(pred, gt, "per_image", 3, diffseg_code_compat=True)
    np.testing.assert_array_equal(a.tp, b.tp)
    assert a.miou == pytest.approx(b.miou)


def test_oracle_merged_majority_and_matched_prediction():
    gt = A([[0, 0, 0, 1, 1, 1]])
    pred = A([[0, 0, 1, 1, 1, 1]])  # segment 1: one pixel of class 0, three of class 1
    s = scores(pred, gt, "oracle_merged", 2)
    np.testing.assert_allclose(s.per_class_iou, [2 / 3, 3 / 4])
    np.testing.assert_array_equal(matched_prediction(pred, gt, 2, rule="majority"),
                                  [[0, 0, 1, 1, 1, 1]])
    over = A([[0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(matched_prediction(over, gt, 2), [[0, -1, -1, 1, -1, -1]])


def test_inputs_accepted_in_several_forms():
    gt = np.array([[[0, 1], [1, 0]], [[1, 1], [0, 0]]])
    a = evaluate(gt, gt, "per_image", 2)
    b = evaluate(list(gt), list(gt), "per_image", 2)
    c = evaluate(gt.astype(float), gt.astype(np.uint8), "per_image", 2)
    assert a.miou == b.miou == c.miou == 1.0
    # images of different sizes
    s = evaluate([np.zeros((2, 3), int), np.ones((4, 5), int)],
                 [np.zeros((2, 3), int), np.ones((4, 5), int)], "dataset", 2)
    assert s.miou == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"preds": [], "gts": []}, "empty"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.zeros((2, 3))]}, "shape"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.zeros((2, 2))] * 2}, "1 predictions but 2"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.full((2, 2), 5)]}, "outside"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.full((2, 2), -2)]}, "outside"),
    ({"preds": [np.full((2, 2), np.nan)], "gts": [np.zeros((2, 2))]}, "NaN"),
    ({"preds": [np.full((2, 2), 0.5)], "gts": [np.zeros((2, 2))]}, "non-integer"),
    ({"preds": [np.full((2, 2), -3)], "gts": [np.zeros((2, 2))]}, "negative"),
    ({"preds": np.zeros((2, 2, 2, 2)), "gts": np.zeros((2, 2, 2, 2))}, "shape"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.zeros((2, 2))], "protocol": "global"}, "unknown"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.zeros((2, 2))], "num_classes": 0}, "positive"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.zeros((2, 2))], "background_many_to_one": True,
          "background_index": 4}, "background_index"),
    ({"preds": [np.zeros((2, 2))], "gts": [np.zeros((2, 2))], "protocol": "dataset",
          "diffseg_code_compat": True}, "per_image"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = {"protocol": "per_image", "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate(**args)


def test_an_image_with_only_ignored_pixels_is_skipped_by_the_averages():
    gts = [np.full((2, 2), -1), np.array([[0, 1], [0, 1]])]
    preds = [np.zeros((2, 2), int), np.array([[0, 1], [0, 1]])]
    s = evaluate(preds, gts, "per_image_mean", 2)
    assert np.isnan(s.per_image["miou"][0])
    assert s.miou == 1.0 and s.pixel_accuracy == 1.0


def test_is_refinement():
    from segbook.eval import is_refinement

    coarse = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    fine = np.array([[5, 6, 7, 7], [5, 6, 8, 8]])
    assert is_refinement(fine, coarse) and is_refinement(coarse, coarse)
    assert not is_refinement(coarse, fine)
    straddles = np.array([[5, 5, 5, 7], [5, 6, 8, 8]])
    assert not is_refinement(straddles, coarse)
    with pytest.raises(ValueError, match="differ in size"):
        is_refinement(fine, coarse[:, :3])
