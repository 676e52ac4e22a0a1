"""PAMR pulls coarse masks onto image edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segbook.groupers.pamr import pamr, pamr_affinities, refine_labels

H, W, EDGE = 64, 64, 37


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors: on a shared 2-core runner intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scene():
    """A clean (noise-free) two-colour image whose edge (column 37) is off the 8-pixel block grid, a blocky
    label map that puts the edge at column 40, and the same with 10% of the labels flipped."""
    rng = np.random.default_rng(0)
    truth = np.zeros((H, W), dtype=np.int64)
    truth[:, EDGE:] = 1
    image = np.where(truth[..., None] == 0, [0.9, 0.2, 0.1], [0.1, 0.3, 0.8])
    block_cols = (np.arange(8) * 8 + 4 >= EDGE).astype(np.int64)
    blocky = np.kron(np.tile(block_cols, (8, 1)), np.ones((8, 8), dtype=np.int64))
    noisy = blocky.copy()
    flip = rng.random((H, W)) < 0.1
    noisy[flip] = 1 - noisy[flip]
    return image, truth, blocky, noisy


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_refine_labels_pulls_a_noisy_blocky_map_onto_the_edge(scene):
    image, truth, _blocky, noisy = scene
    before = iou(noisy == 1, truth == 1)
    out = refine_labels(image, noisy)
    after = iou(out == 1, truth == 1)
    assert before < 0.75
    assert after > 0.98 and after > before + 0.2
    # Every column between the blocky edge and the true edge is fixed in the image interior.
    assert (out[4:-4, EDGE:40] == 1).all() and (out[4:-4, EDGE - 3:EDGE] == 0).all()


def test_pamr_moves_a_blocky_soft_mask_to_the_edge(scene):
    image, truth, blocky, _ = scene
    masks = np.stack([blocky == 0, blocky == 1]).astype(np.float32)
    refined = pamr(image, masks, iterations=10, dilations=(1, 2, 4, 8))
    assert refined.shape == (2, H, W) and refined.dtype == np.float32
    assert iou(refined.argmax(0) == 1, truth == 1) > iou(blocky == 1, truth == 1)
    assert iou(refined.argmax(0) == 1, truth == 1) > 0.98
    # Convex combinations: masks that summed to 1 still do, and stay in [0, 1].
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    assert refined.min() >= 0 and refined.max() <= 1 + 1e-5


def test_affinities_are_a_distribution_over_the_neighbours(scene):
    image = scene[0]
    alpha, offsets = pamr_affinities(image, dilations=(1, 3))
    assert alpha.shape == (16, H, W) and len(offsets) == 16
    assert (-3, -3) in offsets and (0, 1) in offsets and (0, 0) not in offsets
    torch.testing.assert_close(alpha.sum(0), torch.ones(H, W))
    # Next to the edge, a left pixel barely listens to its right neighbour.
    right = offsets.index((0, 1))
    assert alpha[right, 32, EDGE - 1] < 1e-3
    # In a flat region the weights are close to uniform.
    assert torch.allclose(alpha[:, 32, 10], torch.full((16,), 1 / 16), atol=0.05)


def test_constant_image_is_plain_smoothing():
    image = torch.full((3, 16, 16), 0.5)
    alpha, _ = pamr_affinities(image, dilations=(1,))
    torch.testing.assert_close(alpha, torch.full((8, 16, 16), 1 / 8))


def test_label_map_input_shapes_dtypes_and_label_values(scene):
    image, _, _, noisy = scene
    labels = np.where(noisy == 1, 7, 3)  # non-contiguous label values are kept
    out = refine_labels(image, labels, iterations=3, dilations=(1, 2))
    assert out.shape == (H, W) and out.dtype == np.int64
    assert set(np.unique(out)) <= {3, 7}
    soft = pamr(image, labels, iterations=2)  # a label map becomes one-hot channels (3, 7)
    assert soft.shape == (2, H, W)
    # torch in, torch out; (C, H, W) image; the tensor's dtype is kept
    t_out = refine_labels(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(labels))
    assert isinstance(t_out, torch.Tensor) and t_out.dtype == torch.int64
    assert np.array_equal(t_out.numpy(), refine_labels(image, labels))
    # zero iterations and no median leave the labels alone
    assert np.array_equal(refine_labels(image, labels, iterations=0, median_size=None), labels)


def test_deterministic(scene):
    image, _, _, noisy = scene
    a = pamr(image, noisy.copy())
    b = pamr(image.copy(), noisy.copy())
    assert np.array_equal(a, b)


def test_bad_inputs(scene):
    image, _, _, noisy = scene
    with pytest.raises(ValueError, match="resize"):
        pamr(image, noisy[:32])
    with pytest.raises(ValueError, match="NaN"):
        pamr(np.full((8, 8, 3), np.nan), np.zeros((8, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        pamr(image, np.full((2, H, W), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="label map"):
        pamr(image, noisy.astype(np.float32))
    with pytest.raises(ValueError, match="dilations"):
        pamr(image, noisy, dilations=())
    with pytest.raises(ValueError, match="dilations"):
        pamr(image, noisy, dilations=(0, 1))
    with pytest.raises(ValueError, match="iterations"):
        pamr(image, noisy, iterations=-1)
    with pytest.raises(ValueError, match="integer"):
        refine_labels(image, noisy.astype(float))
    with pytest.raises(TypeError):
        pamr([[0.0]], noisy)
