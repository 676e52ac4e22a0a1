"""From token segments to image-resolution labels (paper 1, section 3.6; DiffCut's recipe).

(Formerly ``segbook.pipelines.upsample``, which re-exports this module.)

Paper 1 (section 3.6) averages the attention rows of each segment into ``K`` mean rows
``m_k``, upsamples the per-token rows bilinearly to the image (every pixel ``p`` gets a row
``u_p``, a mix of the rows of its four nearest tokens) and gives each pixel the segment of
highest cosine similarity ``u_p . m_k / (|u_p| |m_k|)``. Written directly, that is a
``(H W) x N`` matrix: 262144 x 4096 floats (4 GiB) at 512 x 512 with N = 4096 tokens.

Two facts make it cheap (:func:`cosine_upsample`):

* bilinear interpolation is linear, so ``u_p . m_k`` is the bilinear interpolation of the
  token-level scores ``G = R M^T`` (``N x K``): upsample ``K`` score maps, not ``N`` rows;
* ``|u_p|`` is the same for every ``k`` and so never changes the argmax; when the cosine values
  themselves are asked for, ``|u_p|^2 = sum_{a, b} w_a w_b r_a . r_b`` over the four bilinear
  neighbours ``a, b`` of ``p`` needs only the Gram entries ``r_a . r_b`` of neighbouring tokens
  (nine offsets, ``9 N`` numbers instead of ``N^2``).

:func:`dot_upsample` is DiffCut's variant (mean features, bilinear upsampling, argmax of the dot
product, no normalisation), by the same linearity. :func:`cosine_upsample_bruteforce` is the
direct version, for tests on small grids.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from segbook.errors import GraphError

__all__ = ["bilinear_taps", "cosine_upsample", "cosine_upsample_bruteforce", "dot_upsample",
           "nearest_upsample", "segment_means", "upsampled_row_norms"]

# Score maps upsampled together: K x 512 x 512 float32 is 1 MiB per segment.
_SEGMENT_CHUNK = 16
# Grid rows per chunk when Gram entries of neighbouring tokens are computed.
_ROW_CHUNK = 8


def _as_rows(rows) -> torch.Tensor:
    R = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
    if R.ndim != 2:
        raise GraphError(f"the token rows must be 2-D (tokens x dims), got {tuple(R.shape)}")
    if not R.is_floating_point():
        R = R.float()
    return R


def _check_grid(n: int, grid) -> tuple[int, int]:
    h, w = (int(s) for s in grid)
    if h * w != n:
        raise GraphError(f"grid {h} x {w} has {h * w} tokens, the rows have {n}")
    return h, w


def _check_labels(labels, n: int) -> torch.Tensor:
    lab = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    lab = lab.reshape(-1).long()
    if lab.numel() != n:
        raise GraphError(f"{lab.numel()} token labels for {n} tokens")
    if n and lab.min() < 0:
        raise GraphError("token labels must be non-negative")
    return lab


def segment_means(rows, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean row of each segment (paper 1, section 3.6: "the average feature vector").

    Parameters
    ----------
    rows : (N, d) token rows (attention rows, or features).
    labels : (N,) or (h, w) integer labels ``0..K-1``; every label must be used.

    Returns
    -------
    means : (K, d) tensor, same dtype as ``rows``; counts : (K,) tokens per segment.
    """
    R = _as_rows(rows)
    lab = _check_labels(labels, R.shape[0]).to(R.device)
    K = int(lab.max()) + 1 if lab.numel() else 0
    counts = torch.bincount(lab, minlength=K)
    if (counts == 0).any():
        raise GraphError("token labels must be 0..K-1 with every label used")
    sums = torch.zeros(K, R.shape[1], dtype=R.dtype, device=R.device).index_add_(0, lab, R)
    return sums / counts[:, None].to(R.dtype), counts


def bilinear_taps(n_in: int, n_out: int):
    """Source indices and weights of ``F.interpolate(mode="bilinear", align_corners=False)``.

    Output position ``o`` reads ``(1 - lam) x[i0] + lam x[i1]`` with
    ``s = max((o + 0.5) n_in / n_out - 0.5, 0)``, ``i0 = floor(s)``, ``i1 = min(i0 + 1, n_in - 1)``
    and ``lam = s - i0`` (PyTorch's half-pixel convention).

    Returns
    -------
    i0, i1 : (n_out,) int64; lam : (n_out,) float64.
    """
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    lam = src - i0
    return i0, i1, lam


def _neighbour_gram(R: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``NG[dy + 1, dx + 1, y, x] = r(y, x) . r(y + dy, x + dx)`` (0 outside the grid), float64."""
    V = R.reshape(h, w, -1)
    NG = torch.zeros(3, 3, h, w, dtype=torch.float64, device=R.device)

    def dots(a, b):
        return (a.double() * b.double()).sum(-1) if R.dtype != torch.float64 else (a * b).sum(-1)

    for y0 in range(0, h, _ROW_CHUNK):
        y1 = min(y0 + _ROW_CHUNK, h)
        band = V[y0:y1]
        NG[1, 1, y0:y1] = dots(band, band)
        NG[1, 2, y0:y1, :-1] = dots(band[:, :-1], band[:, 1:])
        below = V[y0 + 1:y1 + 1]                  # rows y + 1 (one fewer at the last band)
        m = below.shape[0]
        if m:
            NG[2, 1, y0:y0 + m] = dots(band[:m], below)
            NG[2, 2, y0:y0 + m, :-1] = dots(band[:m, :-1], below[:, 1:])
            NG[2, 0, y0:y0 + m, 1:] = dots(band[:m, 1:], below[:, :-1])
    # The other four offsets by symmetry: r(y, x) . r(y - dy, x - dx) = NG[dy, dx] at (y-dy, x-dx).
    NG[1, 0, :, 1:] = NG[1, 2, :, :-1]
    NG[0, 1, 1:, :] = NG[2, 1, :-1, :]
    NG[0, 0, 1:, 1:] = NG[2, 2, :-1, :-1]
    NG[0, 2, 1:, :-1] = NG[2, 0, :-1, 1:]
    return NG


def upsampled_row_norms(rows, grid, out_size) -> torch.Tensor:
    """``|u_p|`` for every pixel ``p`` of the bilinearly upsampled rows, without forming them.

    ``u_p = sum_a w_a r_a`` over the (up to) four tokens ``a`` that bilinear interpolation
    mixes at ``p``, so ``|u_p|^2 = sum_{a, b} w_a w_b (r_a . r_b)``: only Gram entries of
    tokens at most one step apart (in each axis) are needed.

    Returns
    -------
    (H, W) float64 tensor.
    """
    R = _as_rows(rows)
    h, w = _check_grid(R.shape[0], grid)
    H, W = (int(s) for s in out_size)
    NG = _neighbour_gram(R, h, w)
    y0, y1, ly = bilinear_taps(h, H)
    x0, x1, lx = bilinear_taps(w, W)
    dev = R.device
    ys = [torch.from_numpy(y0).to(dev), torch.from_numpy(y1).to(dev)]
    xs = [torch.from_numpy(x0).to(dev), torch.from_numpy(x1).to(dev)]
    wy = [torch.from_numpy(1 - ly).to(dev), torch.from_numpy(ly).to(dev)]
    wx = [torch.from_numpy(1 - lx).to(dev), torch.from_numpy(lx).to(dev)]
    sq = torch.zeros(H, W, dtype=torch.float64, device=dev)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                for d in range(2):
                    # corner (ys[a], xs[b]) with corner (ys[c], xs[d])
                    dy = (ys[c] - ys[a])[:, None]
                    dx = (xs[d] - xs[b])[None, :]
                    g = NG[dy + 1, dx + 1, ys[a][:, None], xs[b][None, :]]
                    sq += (wy[a] * wy[c])[:, None] * (wx[b] * wx[d])[None, :] * g
    return sq.clamp_min(0).sqrt()


def _upsampled_scores_argmax(G: torch.Tensor, h: int, w: int, out_size, scale=None,
                             keep_scores: bool = False):
    """Argmax over ``k`` of ``scale_k * up(G[:, k])`` with the maps upsampled in chunks."""
    H, W = out_size
    K = G.shape[1]
    maps = G.T.reshape(K, 1, h, w).float() if G.dtype == torch.float16 else G.T.reshape(K, 1, h, w)
    best = torch.full((H, W), -math.inf, dtype=maps.dtype, device=maps.device)
    winner = torch.zeros((H, W), dtype=torch.long, device=maps.device)
    scores = torch.empty((K, H, W), dtype=maps.dtype, device=maps.device) if keep_scores else None
    for start in range(0, K, _SEGMENT_CHUNK):
        block = F.interpolate(maps[start:start + _SEGMENT_CHUNK], size=(H, W), mode="bilinear",
                              align_corners=False)[:, 0]
        if scale is not None:
            block = block * scale[start:start + _SEGMENT_CHUNK, None, None].to(block.dtype)
        if keep_scores:
            scores[start:start + block.shape[0]] = block
        value, index = block.max(0)
        better = value > best          # strict: ties keep the lower segment index
        best = torch.where(better, value, best)
        winner = torch.where(better, index + start, winner)
    return winner, scores


def _check_out_size(out_size) -> tuple[int, int]:
    H, W = (int(s) for s in out_size)
    if H < 1 or W < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    return H, W


def cosine_upsample(rows, token_labels, grid, out_size, return_similarity: bool = False):
    """Paper 1's upsampling (section 3.6), without the ``(H W) x N`` matrix of upsampled rows.

    Each pixel takes the segment whose mean row has the highest cosine similarity with the
    pixel's bilinearly upsampled row. Computed as the argmax over ``k`` of
    ``up(R m_k) / |m_k|`` (``up`` = bilinear upsampling of an ``h x w`` map, ``R`` the token
    rows): by linearity ``up(R m_k)_p = u_p . m_k``, and ``|u_p|`` does not depend on ``k``.

    Parameters
    ----------
    rows : (N, d) token rows, ``N = h * w`` in row-major grid order (rows of ``P`` or ``P^k``).
    token_labels : (N,) or (h, w) labels ``0..K-1``.
    grid : ``(h, w)``.
    out_size : ``(H, W)``.
    return_similarity : also return the cosine similarities ``(K, H, W)``, with the exact
        ``|u_p|`` from the Gram entries of neighbouring tokens (:func:`upsampled_row_norms`).

    Returns
    -------
    labels : (H, W) int64 tensor (on ``rows``' device); similarity : (K, H, W) float, only
    with ``return_similarity``.

    Memory: ``G`` (``N x K``), ``K`` maps of ``H x W`` at most 16 at a time, and, for the
    similarities, ``9 N`` Gram entries and ``K H W`` outputs.
    """
    R = _as_rows(rows)
    h, w = _check_grid(R.shape[0], grid)
    H, W = _check_out_size(out_size)
    means, _ = segment_means(R, token_labels)
    G = R @ means.T                                          # (N, K): r_i . m_k
    inv_norm = 1.0 / means.double().norm(dim=1).clamp_min(1e-300)
    labels, scores = _upsampled_scores_argmax(G, h, w, (H, W), scale=inv_norm,
                                              keep_scores=return_similarity)
    if not return_similarity:
        return labels
    norms = upsampled_row_norms(R, (h, w), (H, W))
    similarity = scores.double() / norms.clamp_min(1e-300)[None]
    return labels, similarity


def dot_upsample(features, token_labels, grid, out_size):
    """DiffCut's upsampling: per-segment mean features, features upsampled bilinearly, argmax
    of the dot product with each mean.

    By linearity, ``up(f)_p . m_k = up(F m_k)_p``: ``K`` score maps are upsampled, never the
    ``C``-channel feature map.

    Parameters
    ----------
    features : (N, C) token features (row-major grid order).
    token_labels : (N,) or (h, w) labels ``0..K-1``.
    grid, out_size : ``(h, w)`` and ``(H, W)``.

    Returns
    -------
    (H, W) int64 tensor.
    """
    X = _as_rows(features)
    h, w = _check_grid(X.shape[0], grid)
    H, W = _check_out_size(out_size)
    means, _ = segment_means(X, token_labels)
    labels, _ = _upsampled_scores_argmax(X @ means.T, h, w, (H, W))
    return labels


def nearest_upsample(token_labels, grid, out_size) -> torch.Tensor:
    """Token labels repeated to ``out_size`` (nearest neighbour): the plain alternative."""
    h, w = (int(s) for s in grid)
    H, W = _check_out_size(out_size)
    lab = _check_labels(token_labels, h * w).reshape(1, 1, h, w).float()
    return F.interpolate(lab, size=(H, W), mode="nearest")[0, 0].long()


def cosine_upsample_bruteforce(rows, token_labels, grid, out_size):
    """The direct version of :func:`cosine_upsample` (forms every upsampled row): for tests.

    Returns
    -------
    labels : (H, W) int64; similarity : (K, H, W) float64.
    """
    R = _as_rows(rows).double()
    h, w = _check_grid(R.shape[0], grid)
    H, W = _check_out_size(out_size)
    means, _ = segment_means(R, token_labels)
    up = F.interpolate(R.T.reshape(1, -1, h, w), size=(H, W), mode="bilinear",
                       align_corners=False)[0].reshape(R.shape[1], H * W).T   # (HW, d)
    cos = (up @ means.T) / (up.norm(dim=1, keepdim=True) * means.norm(dim=1)[None])
    similarity = cos.T.reshape(-1, H, W)
    return similarity.argmax(0), similarity
