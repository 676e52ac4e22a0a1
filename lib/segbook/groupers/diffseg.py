"""DiffSeg: segmentation by merging self-attention maps (the baseline of paper 1).

Tian, Aggarwal, Colaco, Kira and Gonzalez-Franco, *Diffuse, Attend, and Segment:
Unsupervised Zero-Shot Segmentation using Stable Diffusion*, CVPR 2024. Given an aggregated
self-attention tensor ``P`` (``N x N`` with ``N = h * w``; row ``q`` is where query position
``q`` attends, a probability distribution over the ``h x w`` key positions), DiffSeg

1. *attention aggregation* -- done before this module, see
   :func:`segbook.graphs.aggregate_self_attention` (resolution weights proportional to
   resolution, 64:32:16:8);
2. *iterative attention merging*: anchors on a regular ``M x M`` grid of query
   positions; in the first iteration each anchor's attention map is compared, by a symmetric
   Kullback-Leibler distance, with the attention map of every position, and the maps closer
   than a threshold are averaged into a proposal; later iterations merge the proposals among
   themselves the same way, so duplicates collapse and the set shrinks;
3. *non-maximum suppression*: each pixel takes the proposal that attends to it most
   (argmax over proposals), after bilinear upsampling of the proposal maps to the image size
   (x8 from the 64 x 64 latent grid of a 512 px image).

The distance is ``D(p, q) = (KL(p || q) + KL(q || p)) / 2``. Paper 1 (Sec. 4.5) uses DiffSeg's
own settings: 16 x 16 anchors, threshold 1.1 on COCO-Stuff-27 and 0.9 on Cityscapes, 3
merging iterations. These details are taken from the authors' public code
(google/diffseg, see ``shared/reference/IMPLEMENTATION_NOTES.md``): the anchor positions
(1, 5, ..., 61 on 64 x 64), that the first iteration compares anchors with *all* positions,
the greedy order of the later merges, and the optional K-means refinement (``refine=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segbook.errors import GraphError
from segbook.graphs.attention import token_grid

__all__ = ["DiffSeg", "anchor_grid", "merge_attention", "proposals_to_labels", "symmetric_kl"]

# Attention probabilities are clamped here before the logarithm: softmax outputs are
# positive, but float16/float32 capture can round far tails to exactly 0.
_LOG_FLOOR = 1e-12
_SUBNORMAL_FLUSH = 1e-30


def anchor_grid(size: int, n_points: int) -> np.ndarray:
    """Anchor coordinates along one axis of length ``size`` (DiffSeg, "Iterative Attention Merging").

    The anchors are ``n_points`` positions with the largest integer stride that fits
    (``stride = (size - 1) // (n_points - 1)``), centred on the axis. For the 64 x 64 latent of
    SD 1.4 and 16 points this gives 1, 5, 9, ..., 61, the grid of the DiffSeg code.

    Returns
    -------
    numpy.ndarray of ``n_points`` increasing integer positions in ``[0, size)``.
    """
    size, n_points = int(size), int(n_points)
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    if n_points > size:
        raise ValueError(f"cannot place {n_points} anchors on an axis of {size} positions")
    if n_points == 1:
        return np.array([(size - 1) // 2])
    stride = (size - 1) // (n_points - 1)
    span = stride * (n_points - 1)
    start = (size - 1 - span) // 2
    return start + stride * np.arange(n_points)


def symmetric_kl(X: torch.Tensor, Y: torch.Tensor, log_X: torch.Tensor | None = None,
                 log_Y: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise symmetric KL distance between the rows of ``X`` (a x N) and ``Y`` (b x N).

    ``D(x, y) = (KL(x || y) + KL(y || x)) / 2 = sum_n (x_n - y_n)(log x_n - log y_n) / 2``,
    the distance DiffSeg merges by ("Iterative Attention Merging"). Computed as four matrix products instead of an
    ``a x b x N`` tensor, so 256 anchors against 4096 maps of 4096 entries is two GEMMs.

    Returns
    -------
    torch.Tensor ``(a, b)``, non-negative.
    """
    if log_X is None:
        log_X = X.clamp_min(_LOG_FLOOR).log()
    if log_Y is None:
        log_Y = Y.clamp_min(_LOG_FLOOR).log()
    self_x = (X * log_X).sum(1)
    self_y = (Y * log_Y).sum(1)
    cross = X @ log_Y.T + log_X @ Y.T
    return (0.5 * (self_x[:, None] + self_y[None, :] - cross)).clamp_min(0.0)


def _thresholds(kl_threshold, iterations: int) -> list[float]:
    if isinstance(kl_threshold, (int, float)):
        values = [float(kl_threshold)] * iterations
    else:
        values = [float(t) for t in kl_threshold]
        if len(values) != iterations:
            raise ValueError(f"{len(values)} KL thresholds given for {iterations} iterations")
    for t in values:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"KL thresholds must be positive and finite, got {t}")
    return values


def merge_attention(P: torch.Tensor, anchors: np.ndarray, kl_threshold, iterations: int = 3
                    ) -> torch.Tensor:
    """Iterative attention merging (DiffSeg, Sec. 3, "Iterative Attention Merging").

    Parameters
    ----------
    P : torch.Tensor ``(N, N)``, row-stochastic; row ``q`` is the attention map of query ``q``.
    anchors : integer array of anchor query indices (flattened positions).
    kl_threshold : float or sequence of ``iterations`` floats; maps closer than this (strictly)
        are averaged.
    iterations : int, number of merging passes, the first one included.

    Returns
    -------
    torch.Tensor ``(K, N)``: the merged proposals, each an average of rows of ``P`` (so each
    still sums to 1).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    thresholds = _thresholds(kl_threshold, iterations)
    anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.long, device=P.device)
    log_P = P.clamp_min(_LOG_FLOOR).log()

    # Iteration 1: every anchor gathers all positions whose map is within the threshold.
    D = symmetric_kl(P[anchors], P, log_P[anchors], log_P)
    # An anchor is always within distance 0 of itself; set it exactly (rounding in the
    # expanded formula can leave ~1e-6 there).
    D[torch.arange(len(anchors), device=P.device), anchors] = 0.0
    close = (D < thresholds[0]).to(P.dtype)
    proposals = (close @ P) / close.sum(1, keepdim=True)

    # Later iterations: greedy merging among the proposals, in order. A proposal already
    # absorbed is not used as a seed again, but may still join a later seed's average.
    for threshold in thresholds[1:]:
        D = symmetric_kl(proposals, proposals)
        D.fill_diagonal_(0.0)
        close = (D < threshold).cpu().numpy()
        absorbed = np.zeros(len(proposals), dtype=bool)
        merged = []
        for i in range(len(proposals)):
            if absorbed[i]:
                continue
            members = close[i]
            absorbed |= members
            merged.append(proposals[torch.from_numpy(members).to(P.device)].mean(0))
        proposals = torch.stack(merged)
    return proposals


def proposals_to_labels(proposals: torch.Tensor, shape: tuple[int, int],
                        out_size: tuple[int, int] | None = None, chunk: int = 16) -> np.ndarray:
    """Non-maximum suppression (DiffSeg, Sec. 3, "Non-Maximum Suppression"): each pixel takes
    the proposal with the largest value there.

    Parameters
    ----------
    proposals : ``(K, h * w)`` proposal maps.
    shape : ``(h, w)``, the attention grid.
    out_size : ``(H, W)`` or None. If given, the proposal maps are bilinearly upsampled to it
        first (DiffSeg: x8, 64 -> 512, half-pixel centres) and the argmax is taken there; the
        maps are processed ``chunk`` at a time so 256 proposals at 512 x 512 stay small.

    Returns
    -------
    numpy.ndarray int64 ``(h, w)`` or ``(H, W)``: the winning proposal's index, renumbered to
    ``0..K'-1`` in proposal order over the proposals that win at least one pixel.
    """
    h, w = shape
    maps = proposals.reshape(-1, h, w)
    if out_size is None:
        winner = maps.argmax(0)
    else:
        H, W = (int(s) for s in out_size)
        if H < 1 or W < 1:
            raise ValueError(f"out_size must be positive, got {out_size}")
        best = torch.full((H, W), -math.inf, dtype=maps.dtype, device=maps.device)
        winner = torch.zeros((H, W), dtype=torch.long, device=maps.device)
        for start in range(0, maps.shape[0], chunk):
            block = F.interpolate(maps[start:start + chunk, None], size=(H, W), mode="bilinear",
                                  align_corners=False)[:, 0]
            value, index = block.max(0)
            better = value > best  # strict: ties keep the earlier proposal, like argmax
            best = torch.where(better, value, best)
            winner = torch.where(better, index + start, winner)
    _, labels = np.unique(winner.cpu().numpy(), return_inverse=True)
    return labels.reshape(winner.shape).astype(np.int64)


def _as_attention(attn, spatial_shape, atol: float) -> tuple[torch.Tensor, tuple[int, int]]:
    if isinstance(attn, np.ndarray):
        attn = torch.from_numpy(attn)
    if not isinstance(attn, torch.Tensor):
        raise GraphError(f"attention must be a torch tensor or numpy array, got {type(attn)!r}")
    if attn.ndim == 4:
        h, w, h2, w2 = attn.shape
        if (h, w) != (h2, w2):
            raise GraphError(f"a 4-d attention tensor must be (h, w, h, w), got {tuple(attn.shape)}")
        if spatial_shape is not None and tuple(spatial_shape) != (h, w):
            raise GraphError(f"spatial_shape {tuple(spatial_shape)} contradicts the tensor's {(h, w)}")
        attn = attn.reshape(h * w, h * w)
        spatial_shape = (h, w)
    if attn.ndim != 2 or attn.shape[0] != attn.shape[1]:
        raise GraphError("DiffSeg needs a square N x N self-attention matrix (or h x w x h x w), "
                         f"got shape {tuple(attn.shape)}")
    n = attn.shape[0]
    h, w = token_grid(n, spatial_shape)
    if not attn.is_floating_point():
        raise GraphError(f"attention must be floating point, got {attn.dtype}")
    P = attn.to(torch.float32) if attn.dtype != torch.float64 else attn
    # One pass for finiteness: a NaN or infinity anywhere makes its row sum non-finite.
    row_sums = P.sum(1)
    if not torch.isfinite(row_sums).all():
        raise GraphError("the attention matrix contains NaN or infinite values")
    if P.min().item() < 0:
        raise GraphError("the attention matrix has negative entries; DiffSeg needs probabilities "
                         "(post-softmax attention)")
    worst = (row_sums - 1).abs().max().item()
    if worst > atol:
        raise GraphError("every row of the attention matrix must sum to 1 (row-stochastic, as "
                         f"softmax attention is); the worst row is off by {worst:.3g}")
    # Far softmax tails can be subnormal floats, which make every CPU product 10-100x slower;
    # they weigh nothing next to the 1e-12 floor of the logarithm.
    P = torch.where(P < _SUBNORMAL_FLUSH, torch.zeros((), dtype=P.dtype), P)
    return P, (h, w)


class DiffSeg:
    """DiffSeg grouper: anchors, iterative KL merging, non-maximum suppression.

    Tian et al., *Diffuse, Attend, and Segment*, CVPR 2024, Sec. 3 (the three steps
    named in the module docstring). Input: an aggregated
    self-attention tensor (paper 1, Sec. 3.1 builds the same one).

    Parameters
    ----------
    kl_threshold : float or sequence of floats, default 1.1
        Symmetric KL distance below which maps are merged, one value for all iterations or one
        per iteration. DiffSeg uses 1.1 on COCO-Stuff-27 and 0.9 on Cityscapes. Lower values
        keep more, smaller segments.
    iterations : int, default 3
        Merging passes, the anchor pass included: 3 is the anchor pass and two merges of the
        proposals (the authors' code runs one pass per entry of a 3-entry threshold list).
    grid : int, default 16
        Anchors per axis: ``grid x grid`` anchors placed by :func:`anchor_grid`.
    refine : bool, default False
        Not in the paper; an option of the authors' code: K-means over all attention maps,
        initialised at the proposals, each proposal then replaced by its cluster's mean map.
    atol : float, default 1e-3
        Tolerance on the row sums of the input.

    Attributes
    ----------
    proposals_ : torch.Tensor ``(K, h, w)``, the merged attention maps.
    anchors_ : numpy.ndarray ``(grid * grid, 2)``, anchor (row, column) positions.
    labels_ : numpy.ndarray ``(h, w)``, the segmentation at the attention resolution.
    n_segments_ : int, segments in ``labels_``.

    Examples
    --------
    >>> labels = DiffSeg(kl_threshold=1.1).fit_predict(P, out_size=(512, 512))  # doctest: +SKIP
    """

    def __init__(self, kl_threshold: float | Sequence[float] = 1.1, iterations: int = 3,
                 grid: int = 16, refine: bool = False, atol: float = 1e-3):
        self.kl_threshold = kl_threshold
        self.iterations = int(iterations)
        self.grid = int(grid)
        self.refine = bool(refine)
        self.atol = float(atol)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        _thresholds(kl_threshold, self.iterations)  # fail early on bad thresholds
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")

    def fit(self, attn, spatial_shape: tuple[int, int] | None = None) -> DiffSeg:
        """Merge the attention maps into proposals.

        Parameters
        ----------
        attn : torch.Tensor or numpy.ndarray, ``(N, N)`` with ``N = h * w`` or ``(h, w, h, w)``
            Row-stochastic self-attention: row ``q`` is query ``q``'s distribution over keys.
        spatial_shape : ``(h, w)``, needed only when ``N`` is not a perfect square.

        Raises
        ------
        GraphError for a non-square, non-finite, negative or non-row-stochastic input.
        """
        P, (h, w) = _as_attention(attn, spatial_shape, self.atol)
        if self.grid > min(h, w):
            raise GraphError(f"a {self.grid} x {self.grid} anchor grid does not fit on {h} x {w}")
        rows, cols = anchor_grid(h, self.grid), anchor_grid(w, self.grid)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        self.anchors_ = np.stack([rr.ravel(), cc.ravel()], axis=1)
        anchor_index = self.anchors_[:, 0] * w + self.anchors_[:, 1]
        with torch.no_grad():
            proposals = merge_attention(P, anchor_index, self.kl_threshold, self.iterations)
            if self.refine:
                proposals = _kmeans_refine(P, proposals)
        self.shape_ = (h, w)
        self.proposals_ = proposals.reshape(-1, h, w)
        self.labels_ = proposals_to_labels(proposals, (h, w))
        self.n_segments_ = int(self.labels_.max()) + 1
        return self

    def predict(self, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """The label map of the fitted proposals, at ``out_size`` (bilinear upsampling of the
        proposals, then argmax) or at the attention resolution when ``out_size`` is None."""
        if not hasattr(self, "proposals_"):
            raise RuntimeError("call fit() first")
        if out_size is None:
            return self.labels_
        return proposals_to_labels(self.proposals_.reshape(len(self.proposals_), -1),
                                   self.shape_, out_size)

    def fit_predict(self, attn, out_size: tuple[int, int] | None = None,
                    spatial_shape: tuple[int, int] | None = None) -> np.ndarray:
        """:meth:`fit` then :meth:`predict`: an int64 label map of shape ``out_size`` (or
        ``(h, w)``), labels ``0..K-1``."""
        return self.fit(attn, spatial_shape=spatial_shape).predict(out_size)


def _kmeans_refine(P: torch.Tensor, proposals: torch.Tensor, max_iter: int = 100,
                   tol: float = 1e-4) -> torch.Tensor:
    """Lloyd's K-means over the rows of ``P`` started at ``proposals``; returns the non-empty
    clusters' mean maps (the authors' optional refinement)."""
    centres = proposals.clone()
    sq_rows = (P * P).sum(1, keepdim=True)
    assign = None
    for _ in range(max_iter):
        dist = sq_rows - 2 * P @ centres.T + (centres * centres).sum(1)[None, :]
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=len(centres)).to(P.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, P)
        keep = counts > 0
        new = torch.where(keep[:, None], sums / counts.clamp_min(1)[:, None], centres)
        shift = (new - centres).pow(2).sum()
        centres = new
        if shift <= tol * tol:
            break
    used = torch.unique(assign)
    return centres[used]
