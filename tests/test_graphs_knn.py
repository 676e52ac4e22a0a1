"""The chunked dataset-level kNN graph (paper 2, section 3.3) against a dense reference."""

import numpy as np
import pytest
import torch

from segbook.errors import GraphError
from segbook.graphs.knn import dataset_knn_graph, dense_knn_graph, knn_neighbours


def _features(B=4, n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B * n, d, generator=g), torch.randn(B * n, d, generator=g)


@pytest.mark.parametrize("qk", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_graph_equals_dense_reference(qk, chunk):
    x, y = _features()
    kw = dict(tokens_per_image=16, k_intra=5, k_inter=6, threshold=0.1)
    g = dataset_knn_graph(x, y if qk else None, chunk=chunk, **kw)
    ref = dense_knn_graph(x, y if qk else None, **kw)
    torch.testing.assert_close(g.to_dense(), ref, rtol=1e-5, atol=1e-6)
    # rows of D^-1 A sum to one (or are empty), and the unnormalised A is symmetric
    sums = torch.sparse.sum(g.matrix, 1).to_dense()
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)
    A = dataset_knn_graph(x, y if qk else None, chunk=chunk, normalise=False, **kw).to_dense()
    torch.testing.assert_close(A, A.T)
    assert torch.all(A.diagonal() == 0)


def test_neighbour_lists_respect_the_image_blocks():
    x, _ = _features(B=3, n=10)
    ii, iv, ei, ev = knn_neighbours(x, tokens_per_image=10, k_intra=4, k_inter=7, chunk=8)
    rows = torch.arange(30)[:, None]
    assert torch.all(ii // 10 == rows // 10) and torch.all(ii != rows)
    assert torch.all(ei // 10 != rows // 10)
    assert torch.all(iv[:, :-1] >= iv[:, 1:]) and torch.all(ev[:, :-1] >= ev[:, 1:])


def test_one_image_batch_has_no_inter_edges_and_k_is_clamped():
    x = _features(B=1, n=6)[0].abs() + 0.1           # all cosines positive
    g = dataset_knn_graph(x, tokens_per_image=6, k_intra=50, k_inter=50, threshold=0.0)
    assert g.info["k_inter"] == 0 and g.info["inter_edges"] == 0
    assert g.info["k_intra"] == 5                     # fewer tokens than k: all n - 1 kept
    dense = g.to_dense()
    assert torch.count_nonzero(dense) == 30           # complete graph without the diagonal


def test_duplicate_images_tie_but_keep_the_same_values():
    x, _ = _features(B=1, n=12)
    x2 = torch.cat([x, x])                            # two identical images
    g = dataset_knn_graph(x2, tokens_per_image=12, k_intra=3, k_inter=1, threshold=0.1)
    ref = dense_knn_graph(x2, tokens_per_image=12, k_intra=3, k_inter=1, threshold=0.1)
    # each token's best inter-image neighbour is its own copy, at similarity one
    _, _, ei, ev = knn_neighbours(x2, tokens_per_image=12, k_intra=3, k_inter=1)
    assert torch.all(ei[:, 0] == (torch.arange(24) + 12) % 24)
    assert torch.allclose(ev, torch.ones(()))
    torch.testing.assert_close(g.to_dense(), ref, rtol=1e-5, atol=1e-6)


def test_threshold_isolates_rows_without_nan():
    x = torch.eye(8)                                  # all cosines 0: every edge dropped
    g = dataset_knn_graph(x, tokens_per_image=4, k_intra=2, k_inter=2)
    assert g.info["edges"] == 0 and g.info["isolated"] == 8
    assert torch.isfinite(g.to_dense()).all()


def test_bad_input_is_a_clear_error():
    x, y = _features()
    bad = x.clone()
    bad[5, 2] = float("nan")
    with pytest.raises(GraphError, match="NaN"):
        dataset_knn_graph(bad, tokens_per_image=16)
    with pytest.raises(GraphError, match="whole number of images"):
        dataset_knn_graph(x, tokens_per_image=15)
    with pytest.raises(GraphError, match="differ in shape"):
        dataset_knn_graph(x, y[:-16], tokens_per_image=16)
    with pytest.raises(GraphError, match=r"\(N, d\)"):
        dataset_knn_graph(x[None], tokens_per_image=16)


def test_scipy_view_matches():
    x, _ = _features()
    g = dataset_knn_graph(x, tokens_per_image=16, k_intra=3, k_inter=3)
    np.testing.assert_allclose(g.to_scipy().toarray(), g.to_dense().numpy())
