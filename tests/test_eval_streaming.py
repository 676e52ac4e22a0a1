"""Evaluator (streaming evaluation): same scores as evaluate, shards merge, bounded state."""

import numpy as np
import pytest

from segbook.eval import PROTOCOLS, Evaluator, evaluate

FIELDS = ("miou", "pixel_accuracy", "f1", "per_class_iou", "per_class_f1", "tp", "fp", "fn",
          "n_images")


def _case(seed, n=9, num_classes=4):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(3, 9)), int(rng.integers(3, 9))) for _ in range(n)]
    gts = [rng.integers(-1, num_classes, s) for s in shapes]
    # ids sparse and image-dependent, so the dataset matrix has to grow its columns
    preds = [rng.choice([0, 2, 5, 11, 40 + i], size=s) for i, s in enumerate(shapes)]
    gts[3][:] = -1  # an image without valid pixels
    return preds, gts


def _assert_same(a, b, exact=True):
    for name in FIELDS + (("cliou",) if a.protocol == "cliou" else ()):
        x, y = np.asarray(getattr(a, name), float), np.asarray(getattr(b, name), float)
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=f"{a.protocol}: {name}")
        else:
            np.testing.assert_allclose(x, y, rtol=1e-12, equal_nan=True,
                                       err_msg=f"{a.protocol}: {name}")
    if a.per_image is not None:
        for key in a.per_image:
            np.testing.assert_array_equal(a.per_image[key], b.per_image[key])


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_equals_evaluate_and_halves_merge_to_the_whole(protocol, seed):
    preds, gts = _case(seed)
    kw = {"background_many_to_one": seed == 2 and protocol != "dataset_majority"}
    whole = evaluate(preds, gts, protocol, 4, **kw)

    ev = Evaluator(protocol, 4, **kw)
    for p, g in zip(preds, gts):
        ev.update(p, g)
    _assert_same(ev.result(), whole)
    _assert_same(ev.result(), whole)  # result() leaves the state alone

    first, second = Evaluator(protocol, 4, **kw), Evaluator(protocol, 4, **kw)
    first.update(preds[:4], gts[:4])       # a batch as a list
    for p, g in zip(preds[4:], gts[4:]):
        second.update(p, g)
    merged = first.merge(second).result()
    _assert_same(merged, whole, exact=False)
    assert merged.n_images == len(preds)


def test_diffseg_code_compat_streams_too():
    preds, gts = _case(5)
    for protocol in ("per_image", "per_image_mean"):
        ev = Evaluator(protocol, 4, diffseg_code_compat=True)
        for p, g in zip(preds, gts):
            ev.update(p, g)
        _assert_same(ev.result(), evaluate(preds, gts, protocol, 4, diffseg_code_compat=True))


def test_state_does_not_hold_label_maps():
    rng = np.random.default_rng(0)
    sizes = {}
    for protocol in ("dataset", "per_image", "per_image_mean"):
        ev = Evaluator(protocol, 3)
        for n in range(1, 201):
            gt = rng.integers(0, 3, (32, 32))
            ev.update(rng.integers(0, 5, (32, 32)), gt)
            if n in (10, 200):
                state = sum(np.asarray(v).nbytes for v in vars(ev).values()
                            if isinstance(v, np.ndarray))
                state += sum(len(v) * 8 for v in ev._img.values())
                sizes[protocol, n] = state
    assert sizes["dataset", 200] == sizes["dataset", 10]          # 3 x 5 matrix
    assert sizes["per_image", 200] == sizes["per_image", 10]      # per-class counts
    # per-image means: three floats per image, not a 32 x 32 map
    assert sizes["per_image_mean", 200] - sizes["per_image_mean", 10] == 190 * 3 * 8


def test_torch_tensors_and_batches_are_accepted():
    torch = pytest.importorskip("torch")
    gt = np.array([[[0, 0, 1, 1]], [[1, 1, 0, 0]]])
    ev = Evaluator("per_image", 2).update(torch.as_tensor(gt + 7), torch.as_tensor(gt))
    assert ev.n_images == 2 and ev.result().miou == 1.0


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown protocol"):
        Evaluator("nope", 3)
    with pytest.raises(ValueError, match="num_classes"):
        Evaluator("dataset", 0)
    with pytest.raises(ValueError, match="no images"):
        Evaluator("dataset", 3).result()
    ev = Evaluator("per_image", 3)
    with pytest.raises(ValueError, match="shape"):
        ev.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="outside"):
        ev.update(np.zeros((2, 2), int), np.full((2, 2), 5))
    with pytest.raises(ValueError, match="different settings"):
        ev.merge(Evaluator("per_image", 4))
    with pytest.raises(TypeError, match="Evaluator"):
        ev.merge({"tp": 1})
    assert ev.n_images == 0  # failed updates add nothing
