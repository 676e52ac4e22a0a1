"""TokenCut and MaskCut: salient-object bipartitions of a binarised feature graph.

TokenCut (Wang et al., 2022) cuts a graph of ViT tokens once: the affinity is 1 where the
cosine similarity of two tokens is at least ``tau`` (0.2) and a small ``eps`` (1e-5) elsewhere,
the Fiedler vector (eq. 3 of chapter 01) is split at its mean, and the foreground is the side
holding the token of largest absolute Fiedler value. MaskCut (CutLER, Wang et al., 2023) repeats
this ``k`` times (``tau = 0.15``), each time on the tokens not yet covered by a mask, and flips
a bipartition whose foreground holds two or more of the grid's four corners.

Both are the single-bipartition and fixed-count baselines that paper 1 (section 2.1) contrasts
with a recursive NCut that decides its own number of segments.
"""

from __future__ import annotations

import numpy as np
import torch

from segbook.errors import GraphError
from segbook.groupers.ncut import fiedler_vector

__all__ = ["maskcut", "tokencut", "tokencut_affinity"]


def tokencut_affinity(features, tau: float = 0.2, eps: float = 1e-5) -> np.ndarray:
    """Binarised cosine graph: ``1`` where ``cos(f_i, f_j) >= tau``, ``eps`` elsewhere.

    The ``eps`` floor keeps the graph connected, so every degree is positive.
    """
    X = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    X = X.double().reshape(-1, X.shape[-1])
    if not torch.isfinite(X).all():
        raise GraphError("features contain NaN or Inf")
    norms = X.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise GraphError("a feature vector is all zero: its cosine similarity is undefined")
    Xn = X / norms
    C = (Xn @ Xn.T).numpy()
    return np.where(C >= tau, 1.0, eps)


def _salient_split(A: np.ndarray, seed: int) -> np.ndarray:
    """TokenCut's bipartition of ``A``: Fiedler vector at its mean, foreground = max |x| side."""
    x = fiedler_vector(A, seed=seed)
    mask = x > x.mean()
    if not mask[np.argmax(np.abs(x))]:
        mask = ~mask
    return mask


def tokencut(features, tau: float = 0.2, eps: float = 1e-5, seed: int = 0) -> np.ndarray:
    """TokenCut's foreground mask of a token set.

    Parameters
    ----------
    features : (n, c) or (h, w, c) token features.
    tau, eps : binarisation threshold and floor of :func:`tokencut_affinity`.
    seed : seed of the eigen-solver (large graphs).

    Returns
    -------
    bool array of the input's token shape (``(n,)`` or ``(h, w)``): True on the foreground.
    """
    shape = np.shape(features)[:-1]
    A = tokencut_affinity(features, tau=tau, eps=eps)
    if A.shape[0] < 2:
        raise GraphError("TokenCut needs at least 2 tokens")
    return _salient_split(A, seed).reshape(shape)


def maskcut(features, n_masks: int = 3, tau: float = 0.15, eps: float = 1e-5,
            grid: tuple[int, int] | None = None, seed: int = 0) -> np.ndarray:
    """MaskCut: ``n_masks`` successive TokenCut foregrounds on the tokens not yet masked.

    Parameters
    ----------
    features : (h, w, c) token grid, or (n, c) with ``grid=(h, w)``.
    n_masks : number of masks ``k`` (CutLER uses 3; EASe's comparison uses 5).
    tau, eps : binarisation of the graph (CutLER: tau = 0.15).
    grid : the token grid when ``features`` is 2-D (needed for the corner rule).
    seed : seed of the eigen-solver.

    Returns
    -------
    int64 label map of the grid's shape: 0 background, ``1..k`` the masks in the order found.
    Fewer than ``n_masks`` masks are returned when fewer than 2 unmasked tokens remain.
    """
    feats = np.asarray(features)
    if feats.ndim == 3:
        grid = feats.shape[:2]
        feats = feats.reshape(-1, feats.shape[-1])
    elif grid is None:
        raise GraphError("maskcut needs an (h, w, c) grid or grid=(h, w)")
    h, w = grid
    if h * w != feats.shape[0]:
        raise GraphError(f"grid {grid} does not hold {feats.shape[0]} tokens")
    A_full = tokencut_affinity(feats, tau=tau, eps=eps)
    corners = np.array([0, w - 1, (h - 1) * w, h * w - 1])
    labels = np.zeros(h * w, dtype=np.int64)
    for k in range(1, n_masks + 1):
        free = np.flatnonzero(labels == 0)
        if len(free) < 2:
            break
        fg = _salient_split(A_full[np.ix_(free, free)], seed)
        free_corners = np.isin(free, corners)
        if (fg & free_corners).sum() >= 2:
            fg = ~fg
        labels[free[fg]] = k
    return labels.reshape(h, w)
