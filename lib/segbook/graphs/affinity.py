"""Affinity matrices: from attention rows, from features, from pixels; and sparsification.

* :func:`adjacency` - paper 1, section 3.3: ``A = P P^T`` ("dot") or the cosine similarity of
  the rows of a transition matrix ``P`` (or of ``P^k``).
* :func:`feature_cosine_affinity` - DiffCut: cosine similarity of features, min-max normalised
  to [0, 1] and raised to the power ``alpha`` (10 by default) to sharpen the contrast.
* :func:`pixel_affinity` - Shi and Malik (2000), section 4: brightness or colour similarity
  times spatial proximity, within a radius.
* :func:`sparsify_topk`, :func:`sparsify_threshold` - keep the strongest edges.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from segbook.errors import GraphError
from segbook.graphs.operators import FactoredAffinity

__all__ = [
    "adjacency",
    "feature_cosine_affinity",
    "pixel_affinity",
    "sparsify_threshold",
    "sparsify_topk",
]


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if t.is_floating_point() else t.double()


def _check_features(X: torch.Tensor, what: str) -> None:
    if X.ndim != 2:
        raise GraphError(f"{what} must be 2-D (tokens x channels), got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise GraphError(f"{what} contain NaN or Inf")


def adjacency(P, kind: str = "dot", factored: bool = False):
    """Adjacency from the rows of a transition matrix (paper 1, section 3.3).

    ``"dot"``: ``A = P P^T``, ``A_ij = p_i . p_j``; two patches are similar when their attention
    distributions overlap (paper 1 found it better than cosine: it keeps the locality of
    the sharply peaked attention rows, section 4.2). ``"cosine"``: ``A_ij = p_i . p_j /
    (|p_i| |p_j|)``. Both are symmetric and non-negative because ``P >= 0``.

    Parameters
    ----------
    P : (n, d) non-negative matrix whose rows are compared (a transition matrix or ``P^k``).
    kind : ``"dot"`` or ``"cosine"``.
    factored : return a :class:`~segbook.graphs.operators.FactoredAffinity` (``A = F F^T``
        with ``F = P`` or the row-normalised ``P``) instead of forming the ``n x n`` matrix.

    Returns
    -------
    torch.Tensor (n, n) or FactoredAffinity.
    """
    P = _as_tensor(P)
    _check_features(P, "the rows of P")
    if P.numel() and P.min() < 0:
        raise GraphError("adjacency() needs non-negative rows (a transition matrix)")
    if kind == "dot":
        Fm = P
    elif kind == "cosine":
        norms = P.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise GraphError("a row of P is all zero: its cosine similarity is undefined")
        Fm = P / norms
    else:
        raise ValueError(f"kind must be 'dot' or 'cosine', got {kind!r}")
    if factored:
        return FactoredAffinity(Fm, dtype=Fm.dtype)
    return Fm @ Fm.T


def feature_cosine_affinity(features, alpha: float = 10.0, normalise: bool = True):
    """DiffCut's affinity: cosine similarity, min-max normalised, raised to ``alpha``.

    ``A = ((C - min C) / (max C - min C)) ** alpha`` with ``C_ij = cos(f_i, f_j)``. The min-max
    step makes the weights non-negative (cosines can be negative) and the exponent, 10 in
    DiffCut, makes the graph contrast sharper, like a temperature.

    Parameters
    ----------
    features : (n, c) or (h, w, c) array/tensor of token features.
    alpha : exponent (``1`` leaves the normalised cosines as they are).
    normalise : apply the min-max normalisation (without it, negative cosines are clipped to 0).

    Returns
    -------
    torch.Tensor (n, n), float32 (float64 for float64 input), symmetric, entries in [0, 1].
    If every cosine is equal (constant features) the result is the all-ones matrix: a
    documented degenerate graph that :func:`~segbook.groupers.ncut.recursive_ncut` keeps whole.
    """
    X = _as_tensor(features)
    if X.ndim == 3:
        X = X.reshape(-1, X.shape[-1])
    _check_features(X, "features")
    norms = X.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise GraphError("a feature vector is all zero: its cosine similarity is undefined")
    Xn = X / norms
    C = Xn @ Xn.T
    if normalise:
        lo, hi = C.min(), C.max()
        C = torch.ones_like(C) if hi - lo <= 1e-12 else (C - lo) / (hi - lo)
    else:
        C = C.clamp_min(0)
    C = (C + C.T) / 2
    return C ** alpha


def pixel_affinity(image, sigma_i: float = 0.1, sigma_x: float = 4.0, radius: float = 5.0):
    """Shi and Malik's pixel affinity (their section 4, "brightness" and "colour" graphs).

    ``w_ij = exp(-||F_i - F_j||^2 / sigma_i^2) * exp(-||X_i - X_j||^2 / sigma_x^2)`` when
    ``||X_i - X_j|| < radius``, else 0; ``F`` is the brightness (2-D image) or the colour vector
    (3-D image), ``X`` the pixel position. Self-loops are included (``w_ii = 1``).

    Parameters
    ----------
    image : (h, w) or (h, w, c) array with values in [0, 1] (``sigma_i`` is in those units).
    sigma_i, sigma_x, radius : feature scale, spatial scale and neighbourhood radius (pixels).

    Returns
    -------
    scipy.sparse.csr_matrix of shape (h w, h w), symmetric, node ``i = row * w + col``.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise GraphError(f"pixel_affinity needs an (h, w) or (h, w, c) image, got {img.shape}")
    if not np.isfinite(img).all():
        raise GraphError("the image contains NaN or Inf")
    if sigma_i <= 0 or sigma_x <= 0 or radius <= 0:
        raise ValueError("sigma_i, sigma_x and radius must be positive")
    h, w, _ = img.shape
    index = np.arange(h * w).reshape(h, w)
    reach = int(np.ceil(radius))
    rows, cols, vals = [], [], []
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            dist2 = dy * dy + dx * dx
            if dist2 >= radius * radius:
                continue
            ys = slice(max(0, -dy), min(h, h - dy))
            xs = slice(max(0, -dx), min(w, w - dx))
            ys2 = slice(ys.start + dy, ys.stop + dy)
            xs2 = slice(xs.start + dx, xs.stop + dx)
            diff = img[ys, xs] - img[ys2, xs2]
            weight = np.exp(-(diff ** 2).sum(-1) / sigma_i ** 2 - dist2 / sigma_x ** 2)
            rows.append(index[ys, xs].ravel())
            cols.append(index[ys2, xs2].ravel())
            vals.append(weight.ravel())
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(h * w, h * w))
    return A


def _symmetrise(A: sp.spmatrix, how: str) -> sp.csr_matrix:
    if how == "max":
        return A.maximum(A.T).tocsr()
    if how == "min":
        return A.minimum(A.T).tocsr()
    if how == "mean":
        return ((A + A.T) / 2).tocsr()
    raise ValueError(f"symmetrise must be 'max', 'min' or 'mean', got {how!r}")


def sparsify_topk(A, k: int, symmetrise: str = "max", keep_diagonal: bool = True):
    """Keep each node's ``k`` strongest edges, then symmetrise.

    Parameters
    ----------
    A : (n, n) dense affinity (array or tensor).
    k : edges kept per row (besides the self-loop when ``keep_diagonal``); clipped to ``n - 1``.
    symmetrise : ``"max"`` (an edge survives if either end keeps it), ``"min"`` (both ends must
        keep it: a mutual k-NN graph) or ``"mean"``.
    keep_diagonal : keep the self-loops.

    Returns
    -------
    scipy.sparse.csr_matrix, symmetric.
    """
    A = _as_tensor(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise GraphError(f"an affinity matrix must be square, got shape {tuple(A.shape)}")
    n = A.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), max(n - 1, 0))
    off = A.clone()
    off.fill_diagonal_(-np.inf)
    top = torch.topk(off, k, dim=1)
    rows = np.repeat(np.arange(n), k)
    M = sp.csr_matrix((top.values.double().numpy().ravel(), (rows, top.indices.numpy().ravel())),
                      shape=(n, n))
    M = _symmetrise(M, symmetrise)
    if keep_diagonal:
        M = (M + sp.diags(A.diagonal().double().numpy())).tocsr()
    M.eliminate_zeros()
    return M


def sparsify_threshold(A, tau: float, symmetrise: str = "max"):
    """Zero every affinity ``<= tau`` (paper 2's dataset graph drops similarities <= 0.1).

    Returns a symmetric scipy.sparse.csr_matrix.
    """
    A = _as_tensor(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise GraphError(f"an affinity matrix must be square, got shape {tuple(A.shape)}")
    dense = A.double().numpy()
    M = sp.csr_matrix(np.where(dense > tau, dense, 0.0))
    return _symmetrise(M, symmetrise)
