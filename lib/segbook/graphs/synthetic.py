"""Graphs with a known answer: planted partitions, as affinities and as random walks.

Used by the tests and by chapter 01's toy examples. Two constructions:

* :func:`planted_partition` - a symmetric affinity whose weights are ``p_in`` inside a block and
  ``p_out`` across blocks, each multiplied by a symmetric random factor in ``[1 - noise, 1 + noise]``.
* :func:`planted_random_walk` - the way paper 1 builds its graphs: a row-stochastic ``P`` whose
  rows put mass ``1 - leak`` on their own block (random weights) and ``leak`` anywhere, from
  which ``A = P P^T`` (:func:`segbook.graphs.adjacency`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["block_labels", "planted_partition", "planted_random_walk"]


def block_labels(sizes) -> np.ndarray:
    """``[0] * sizes[0] + [1] * sizes[1] + ...`` as an int64 array."""
    return np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)


def planted_partition(sizes, p_in: float = 1.0, p_out: float = 0.05, noise: float = 0.5,
                      seed: int = 0, dtype=np.float64):
    """A symmetric planted-partition affinity and its block labels.

    Parameters
    ----------
    sizes : block sizes (unequal sizes allowed).
    p_in, p_out : mean weight inside and across blocks.
    noise : relative spread of the random factor on each weight (0: exact block matrix).
    seed : random seed.
    dtype : dtype of the matrix.

    Returns
    -------
    A : (n, n) symmetric non-negative matrix, ``n = sum(sizes)``.
    labels : (n,) int64 block index of each node.
    """
    rng = np.random.default_rng(seed)
    labels = block_labels(sizes)
    n = len(labels)
    factor = rng.uniform(1 - noise, 1 + noise, size=(n, n))
    factor = np.triu(factor) + np.triu(factor, 1).T
    A = np.where(labels[:, None] == labels[None, :], p_in, p_out) * factor
    return A.astype(dtype), labels


def planted_random_walk(sizes, leak: float = 0.05, seed: int = 0, dtype=np.float64):
    """A block-structured row-stochastic matrix (paper 1's graphs have this form).

    Row ``i`` spreads ``1 - leak`` of its mass over its own block with random (uniform [0.5,
    1.5]) weights and ``leak`` over all nodes (Dirichlet weights), like an attention row
    concentrated on the patches of the same object.

    Returns
    -------
    P : (n, n) row-stochastic matrix.
    labels : (n,) int64 block index of each node.
    """
    rng = np.random.default_rng(seed)
    labels = block_labels(sizes)
    n = len(labels)
    inside = rng.uniform(0.5, 1.5, size=(n, n)) * (labels[:, None] == labels[None, :])
    inside /= inside.sum(1, keepdims=True)
    spread = rng.dirichlet(np.ones(n), size=n) if leak > 0 else np.zeros((n, n))
    P = (1 - leak) * inside + leak * spread
    P /= P.sum(1, keepdims=True)
    return P.astype(dtype), labels
