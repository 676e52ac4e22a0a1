"""k-way spectral clustering on graphs with planted groups."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from segbook.errors import GraphError
from segbook.graphs import planted_partition
from segbook.groupers import ncut_eigenvectors, spectral_clustering, spectral_embedding


@pytest.mark.parametrize("sizes", [[12, 20, 28], [30, 30, 30, 30], [10, 50]])
def test_k_way_recovers_planted_groups(sizes):
    A, truth = planted_partition(sizes, p_in=1.0, p_out=0.05, noise=0.6, seed=1)
    out = spectral_clustering(A, len(sizes))
    assert out.n_segments == len(sizes)
    assert adjusted_rand_score(truth, out.labels) == 1.0
    # labels are numbered by first appearance
    _, first = np.unique(out.labels, return_index=True)
    assert list(out.labels[np.sort(first)]) == list(range(len(sizes)))


def test_the_eigengap_shows_the_number_of_groups():
    A, _ = planted_partition([20, 25, 30, 35], p_in=1.0, p_out=0.05, noise=0.5, seed=0)
    values, _ = ncut_eigenvectors(A, k=6)
    gaps = np.diff(values)
    assert int(np.argmax(gaps)) + 1 == 4


def test_embedding_rows_are_unit_length_and_drop_first_drops_the_constant():
    A, _ = planted_partition([15, 15], p_in=1.0, p_out=0.1, seed=0)
    values, X = spectral_embedding(A, 3)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-9)
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    values2, X2 = spectral_embedding(A, 3, drop_first=True)
    assert X2.shape == (30, 2) and values2[0] > 1e-6


@pytest.mark.parametrize("k", [1, 31])
def test_bad_k_is_a_graph_error(k):
    A, _ = planted_partition([15, 15], seed=0)
    with pytest.raises(GraphError, match="2 <= k <= n = 30"):
        spectral_clustering(A, k)


def test_isolated_node_is_a_graph_error():
    A, _ = planted_partition([10, 10], seed=0)
    A[3, :] = A[:, 3] = 0
    with pytest.raises(GraphError, match="isolated"):
        spectral_clustering(A, 2)
