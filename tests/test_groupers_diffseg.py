"""DiffSeg on synthetic attention with a known answer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segbook.errors import GraphError
from segbook.groupers.diffseg import (
    DiffSeg,
    anchor_grid,
    merge_attention,
    proposals_to_labels,
    symmetric_kl,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are small: on a shared 2-core runner, intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def block_attention(labels: np.ndarray, leak: float = 0.05) -> torch.Tensor:
    """Row-stochastic attention: each position attends uniformly within its block, plus a
    small uniform leak everywhere (like a softmax, no exact zeros)."""
    lab = torch.as_tensor(np.asarray(labels)).reshape(-1)
    same = (lab[:, None] == lab[None, :]).float()
    P = same / same.sum(1, keepdim=True)
    return (1 - leak) * P + leak / P.shape[0]


def local_attention(h: int, w: int, sigma: float) -> torch.Tensor:
    """Attention that only decays with distance: no block structure, so the KL threshold
    alone decides how many segments come out."""
    yy, xx = np.mgrid[:h, :w]
    pos = torch.tensor(np.stack([yy.ravel(), xx.ravel()], 1), dtype=torch.float32)
    return torch.softmax(-torch.cdist(pos, pos) ** 2 / (2 * sigma**2), dim=1)


def quadrants(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy >= h // 2) * 2 + (xx >= w // 2)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a relabelling (a bijection between the label sets)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_anchor_grid_matches_diffseg_and_the_stride_rule():
    assert anchor_grid(64, 16).tolist() == list(range(1, 62, 4))
    assert anchor_grid(32, 8).tolist() == list(range(1, 30, 4))
    assert anchor_grid(64, 8).tolist() == list(range(0, 64, 9))  # stride 9, span 63
    assert anchor_grid(10, 1).tolist() == [4]
    assert anchor_grid(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        anchor_grid(8, 9)


def test_symmetric_kl_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(5, 30, generator=g, dtype=torch.float64) + 0.01
    Y = torch.rand(7, 30, generator=g, dtype=torch.float64) + 0.01
    X, Y = X / X.sum(1, keepdim=True), Y / Y.sum(1, keepdim=True)
    D = symmetric_kl(X, Y)
    for i in range(5):
        for j in range(7):
            kl_xy = (X[i] * (X[i] / Y[j]).log()).sum()
            kl_yx = (Y[j] * (Y[j] / X[i]).log()).sum()
            assert D[i, j].item() == pytest.approx(0.5 * (kl_xy + kl_yx).item(), rel=1e-9)
    assert torch.allclose(symmetric_kl(X, X).diagonal(), torch.zeros(5, dtype=X.dtype),
                          atol=1e-12)


def test_four_quadrant_blocks_give_four_segments_at_64x64_and_512():
    truth = quadrants(64, 64)
    ds = DiffSeg(kl_threshold=1.1, iterations=3, grid=16)
    labels = ds.fit_predict(block_attention(truth), out_size=(512, 512))
    assert ds.anchors_.shape == (256, 2)
    assert ds.n_segments_ == 4 and ds.proposals_.shape == (4, 64, 64)
    assert same_partition(ds.labels_, truth)
    assert labels.shape == (512, 512) and labels.dtype == np.int64
    # x8 bilinear upsampling of block maps then argmax puts the edges exactly on the blocks.
    assert np.array_equal(labels, np.kron(ds.labels_, np.ones((8, 8), dtype=np.int64)))
    # Merged proposals are averages of attention rows: still distributions.
    sums = ds.proposals_.reshape(4, -1).sum(1)
    assert torch.allclose(sums, torch.ones(4), atol=1e-4)


def test_threshold_controls_the_number_of_segments():
    P = local_attention(24, 24, sigma=3.0)
    counts = [DiffSeg(kl_threshold=t, grid=6).fit(P).n_segments_
              for t in (1e-6, 0.3, 1.1, 4.0, 1e6)]
    assert counts[0] == 36  # nothing merges: one segment per anchor
    assert counts[-1] == 1  # everything merges
    assert all(a >= b for a, b in itertools.pairwise(counts)), counts
    assert 1 < counts[2] < 36


def test_huge_threshold_merges_blocks_into_one():
    labels = DiffSeg(kl_threshold=1e6, grid=8).fit_predict(block_attention(quadrants(32, 32)))
    assert np.unique(labels).tolist() == [0]


def test_later_iterations_collapse_duplicate_proposals():
    P = block_attention(quadrants(32, 32))
    one = DiffSeg(kl_threshold=1.1, iterations=1, grid=8).fit(P)
    three = DiffSeg(kl_threshold=[1.1, 1.1, 1.1], iterations=3, grid=8).fit(P)
    assert len(one.proposals_) == 64  # the anchor pass makes one proposal per anchor
    assert len(three.proposals_) == 4
    assert same_partition(one.labels_, three.labels_)


def test_non_square_grid_and_4d_input_and_numpy():
    truth = (np.mgrid[:24, :40][1] >= 20).astype(int)  # left / right halves
    P = block_attention(truth)
    ds = DiffSeg(grid=6)
    labels = ds.fit_predict(P, spatial_shape=(24, 40), out_size=(48, 80))
    assert ds.n_segments_ == 2 and same_partition(ds.labels_, truth)
    assert labels.shape == (48, 80)
    four_d = DiffSeg(grid=6).fit_predict(P.reshape(24, 40, 24, 40).numpy())
    assert np.array_equal(four_d, ds.labels_)


def test_deterministic():
    P = local_attention(16, 16, sigma=2.0)
    a = DiffSeg(kl_threshold=0.5, grid=4).fit_predict(P, out_size=(40, 40))
    b = DiffSeg(kl_threshold=0.5, grid=4).fit_predict(P.clone(), out_size=(40, 40))
    assert np.array_equal(a, b)


def test_kmeans_refinement_keeps_the_blocks():
    truth = quadrants(32, 32)
    ds = DiffSeg(grid=8, refine=True).fit(block_attention(truth))
    assert same_partition(ds.labels_, truth)


def test_merge_and_nms_building_blocks():
    P = block_attention(quadrants(16, 16)).double()
    proposals = merge_attention(P, np.array([0, 15, 240, 255]), 1.0, iterations=2)
    assert proposals.shape == (4, 256)
    labels = proposals_to_labels(proposals, (16, 16), out_size=(16, 16))
    assert same_partition(labels, quadrants(16, 16))


@pytest.mark.parametrize("bad, match", [
    (torch.full((16, 20), 1 / 20), "square"),
    (torch.full((15, 15), 1 / 15), "perfect square"),
    (torch.full((16, 16), 1 / 8), "sum to 1"),
    (torch.full((16, 16), float("nan")), "NaN"),
    (torch.eye(16) * 2 - torch.full((16, 16), 1 / 16), "negative"),
    (torch.ones(16, 16, dtype=torch.long), "floating"),
])
def test_bad_attention_raises_graph_error(bad, match):
    with pytest.raises(GraphError, match=match):
        DiffSeg(grid=2).fit(bad)


def test_bad_settings():
    P = block_attention(quadrants(8, 8))
    with pytest.raises(GraphError, match="does not fit"):
        DiffSeg(grid=9).fit(P)
    with pytest.raises(GraphError, match="positions"):
        DiffSeg(grid=2).fit(P, spatial_shape=(4, 8))
    with pytest.raises(ValueError):
        DiffSeg(kl_threshold=0.0)
    with pytest.raises(ValueError):
        DiffSeg(kl_threshold=[1.1, 1.1], iterations=3)
    with pytest.raises(ValueError):
        DiffSeg(iterations=0)
    with pytest.raises(RuntimeError):
        DiffSeg().predict()
