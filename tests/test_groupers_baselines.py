"""Baselines: DiffCut's recipe, TokenCut, MaskCut, K-means with the silhouette choice of K."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from segbook.errors import GraphError
from segbook.groupers import diffcut_segment, kmeans_silhouette, maskcut, tokencut


def grid_features(label_map, dim=16, noise=0.1, seed=0):
    """Token features: one random direction per region, plus noise."""
    rng = np.random.default_rng(seed)
    # Orthonormal centres: regions are unambiguously dissimilar (cosine 0 between them).
    centres = np.linalg.qr(rng.normal(size=(dim, label_map.max() + 1)))[0].T
    return centres[label_map] + noise * rng.normal(size=label_map.shape + (dim,))


def test_diffcut_segments_a_three_region_grid():
    labels = np.zeros((16, 16), dtype=int)
    labels[:, 6:] = 1
    labels[10:, 10:] = 2
    result = diffcut_segment(grid_features(labels), alpha=10.0, tau=0.5)
    assert result.n_segments == 3
    assert adjusted_rand_score(labels.ravel(), result.labels) == 1.0


def test_tokencut_finds_the_salient_square():
    labels = np.zeros((12, 12), dtype=int)
    labels[3:8, 4:9] = 1
    fg = tokencut(grid_features(labels, seed=1))
    assert fg.shape == (12, 12)
    np.testing.assert_array_equal(fg, labels == 1)


def test_maskcut_first_mask_is_the_object_and_masks_are_disjoint():
    labels = np.zeros((16, 16), dtype=int)
    labels[9:14, 3:7] = 1
    feats = grid_features(labels, noise=0.03, seed=2)
    out = maskcut(feats, n_masks=2)
    assert out.shape == (16, 16)
    np.testing.assert_array_equal(out == 1, labels == 1)
    assert set(np.unique(out)) <= {0, 1, 2}
    # One mask is TokenCut's foreground with MaskCut's tau.
    np.testing.assert_array_equal(maskcut(feats, n_masks=1) == 1, tokencut(feats, tau=0.15))


def test_maskcut_corner_rule_flips_a_background_foreground():
    # The "object" is the larger region touching all four corners: MaskCut flips to the centre.
    labels = np.ones((12, 12), dtype=int)
    labels[2:10, 2:10] = 0
    out = maskcut(grid_features(labels, noise=0.03, seed=3), n_masks=1)
    np.testing.assert_array_equal(out == 1, labels == 0)


def test_maskcut_needs_a_grid():
    with pytest.raises(GraphError, match="grid"):
        maskcut(np.ones((10, 4)))


def test_kmeans_silhouette_picks_the_number_of_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(4, 5))
    truth = np.repeat(np.arange(4), [30, 50, 40, 60])
    X = centres[truth] + rng.normal(size=(180, 5))
    sel = kmeans_silhouette(X, seed=0)
    assert sel.k == 4 and set(sel.scores) == set(range(2, 11))
    assert adjusted_rand_score(truth, sel.labels) == 1.0
    assert sel.labels[0] == 0


def test_kmeans_silhouette_degenerate_inputs():
    sel = kmeans_silhouette(np.ones((20, 3)))
    assert sel.k == 1 and (sel.labels == 0).all()
    with pytest.raises(GraphError):
        kmeans_silhouette(np.array([[np.nan, 1.0]]))
