"""Self-attention as a random walk: aggregation over resolutions and power walks.

Paper 1 (section 3.1) sums the heads of every self-attention map, upsamples the maps of the four
Stable Diffusion resolutions (8^2, 16^2, 32^2, 64^2 tokens) to 64^2 x 64^2 and adds them with
DiffSeg's weights, proportional to resolution. Each map is row-stochastic (a softmax per query)
and the weights sum to one, so the aggregate ``P`` is a transition matrix (section 3.2), and
``P^k`` is the ``k``-step walk (section 3.3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from segbook.errors import GraphError
from segbook.graphs.operators import _empty

__all__ = ["aggregate_self_attention", "check_row_stochastic", "diffseg_weights", "power_walk"]


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def check_row_stochastic(P, atol: float = 1e-3) -> None:
    """Raise :class:`GraphError` unless ``P`` is square, finite, non-negative, rows summing to 1.

    Two passes over ``P`` (row sums and minimum): a NaN or an infinity makes its row's sum
    non-finite, and ``min`` propagates NaN. Row sums of float32 input are accumulated in
    float32 (4096 terms: error ~1e-6, far below ``atol``).
    """
    P = _as_tensor(P)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise GraphError(f"a transition matrix must be square, got shape {tuple(P.shape)}")
    if not P.numel():
        return
    rows = P.sum(1).double()
    if not torch.isfinite(rows).all():
        raise GraphError("the transition matrix contains NaN or Inf")
    low = P.min()
    if not low >= 0:
        raise GraphError("the transition matrix has negative entries" if torch.isfinite(low)
                         else "the transition matrix contains NaN or Inf")
    if float((rows - 1).abs().max()) > atol:
        raise GraphError(f"the transition matrix is not row-stochastic (row sums in "
                         f"[{float(rows.min()):.4g}, {float(rows.max()):.4g}])")


def diffseg_weights(resolutions) -> dict[int, float]:
    """DiffSeg's resolution weights: proportional to the resolution, normalised to sum 1.

    For (8, 16, 32, 64) that is 1/15, 2/15, 4/15, 8/15 (0.067, 0.133, 0.267, 0.533).
    """
    resolutions = [int(r) for r in resolutions]
    total = float(sum(resolutions))
    return {r: r / total for r in resolutions}


def _mean_map(value, r: int, dtype, device=None) -> torch.Tensor:
    """One resolution's map: the average of its leading axes (heads, layers) or of a list.

    Accumulated in ``dtype`` one ``r^2 x r^2`` map at a time (no stacked copy of float16
    captures); a single map already in ``dtype`` (and on ``device``) is used without a copy.
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise GraphError(f"no attention maps for resolution {r}")
    total, count = None, 0
    for item in items:
        t = _as_tensor(item)
        if t.shape[-2:] != (r * r, r * r):
            raise GraphError(f"attention map for resolution {r} must end in ({r * r}, {r * r}), "
                             f"got {tuple(t.shape)}")
        if device is not None:
            t = t.to(device)
        if len(items) == 1 and t.dim() == 2 and t.dtype == dtype:
            return t                                              # nothing to average
        for layer in t.reshape(-1, r * r, r * r):
            if total is None:
                total = layer.to(dtype, copy=True)
            else:
                total.add_(layer)
            count += 1
    return total.div_(count)


def _bilinear_matrix(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D bilinear resizing with half-pixel centres (the
    ``align_corners=False`` rule of ``torch.nn.functional.interpolate``)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(0, n_in - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    W[torch.arange(n_out), lo] += 1 - frac
    W[torch.arange(n_out), hi] += frac
    return W.to(dtype=dtype, device=device)


def _upsampled_keys(S: torch.Tensor, r: int, R: int) -> torch.Tensor:
    """Each row of ``S`` (an ``r x r`` key image) bilinearly upsampled to ``R x R`` and
    renormalised: ``(r^2, R^2)``.

    Separable: two small GEMMs with the 1-D interpolation matrix ``U`` (``R x r``), rows
    ``U K U^T``; the same numbers as ``F.interpolate(..., mode="bilinear")`` and 5-6 times
    faster on a CPU for a 32^2 map.
    """
    U = _bilinear_matrix(r, R, S.dtype, S.device)
    keys = (S.reshape(r * r * r, r) @ U.T).view(r * r, r, R)          # key columns resized
    keys = torch.matmul(U, keys).reshape(r * r, R * R)                # key rows resized
    return keys.div_(keys.sum(1, keepdim=True))


def _broadcast_rows(M: torch.Tensor, r: int) -> torch.Tensor:
    """View of ``M`` (rows on the ``r``-grid, ``(r^2, C)``) broadcastable against the rows of an
    ``(R^2, C)`` matrix viewed as ``(r, R/r, r, R/r, C)``: query ``(qy, qx)`` on the ``r``-grid
    is every query ``(qy f + a, qx f + b)`` on the ``R``-grid."""
    return M.view(r, 1, r, 1, M.shape[-1])


def aggregate_self_attention(maps: Mapping, weights="diffseg", resolutions=None,
                             output_resolution: int | None = None,
                             dtype=torch.float32, device=None) -> torch.Tensor:
    """Aggregate self-attention maps of several resolutions into one transition matrix.

    DiffSeg's aggregation, used by paper 1 (section 3.1): a map ``S`` of resolution ``r``
    (``r^2`` query tokens by ``r^2`` key tokens) is brought to the output resolution ``R`` by

    * the key dimensions, viewed as an ``r x r`` image per query, upsampled bilinearly to
      ``R x R`` and each row renormalised to sum 1;
    * the query dimensions repeated (nearest neighbour): each of the ``(R/r)^2`` output queries
      that fall in one input query's cell inherits its row;

    and the maps are added with weights ``w_r`` that sum to one, so the result stays
    row-stochastic: ``P = sum_r w_r up(S^(r))``.

    The one implementation in segbook (the pipelines call it): maps
    are averaged in ``dtype`` one at a time, the key upsampling is two small GEMMs, the lower
    resolutions are folded into each other on their own grids (a ``16^2`` map's rows broadcast
    into the ``32^2`` map's), and the result is written in one pass over the ``R^2 x R^2``
    output, adding the folded rows through broadcast views (no repeated copies). At ``R = 64``
    (4096 tokens) that is ~0.1 s on one CPU thread.

    Parameters
    ----------
    maps : mapping ``resolution -> tensor``. A tensor is ``(r^2, r^2)`` or has leading axes
        (heads, layers, ...) that are averaged. Averaging row-stochastic heads is the same as
        paper 1's sum followed by the row normalisation. A list of tensors is averaged too
        (several layers of one resolution, as DiffSeg does).
    weights : ``"diffseg"`` (proportional to resolution), ``"uniform"``, or a mapping
        ``resolution -> weight``; renormalised over the resolutions used.
    resolutions : the subset of ``maps`` to use (default: all), e.g. ``(32, 64)`` for paper 1's
        ablation of resolution levels.
    output_resolution : ``R`` (default: the largest resolution used). Must be a multiple of each
        ``r``.
    dtype : dtype of the result and of the arithmetic (float32 by default; float64 for exact
        comparisons).
    device : where to aggregate (default: where the maps are; CPU for arrays).

    Returns
    -------
    torch.Tensor of shape ``(R^2, R^2)``, rows summing to 1.

    Raises
    ------
    GraphError for a map that is not row-stochastic, a missing resolution, or an output
    resolution that is not a multiple of an input one.
    """
    if not isinstance(maps, Mapping) or not maps:
        raise GraphError("no attention maps to aggregate (expected {resolution: maps})")
    lookup = {int(k): v for k, v in maps.items()}
    resolutions = sorted(int(r) for r in (resolutions if resolutions is not None else lookup))
    missing = [r for r in resolutions if r not in lookup]
    if missing:
        raise GraphError(f"no attention maps for resolutions {missing}; have {sorted(lookup)}")
    R = int(output_resolution or max(resolutions))
    bad = [r for r in resolutions if R % r]
    if bad:
        raise GraphError(f"output resolution {R} is not a multiple of resolution {bad[0]}")
    if isinstance(weights, str):
        if weights == "diffseg":
            w = diffseg_weights(resolutions)
        elif weights == "uniform":
            w = {r: 1.0 / len(resolutions) for r in resolutions}
        else:
            raise ValueError(f"weights must be 'diffseg', 'uniform' or a mapping, got {weights!r}")
    else:
        w = {int(r): float(weights[r]) for r in resolutions}
    total = sum(w[r] for r in resolutions)
    if total <= 0 or any(w[r] < 0 for r in resolutions):
        raise GraphError(f"resolution weights must be non-negative and not all 0, got {w}")
    # Lower resolutions, ascending: each one's weighted keys absorb the previous ones' rows
    # (broadcast on its own, smaller grid) whenever its grid refines theirs.
    folded: list[tuple[int, torch.Tensor]] = []
    top = None
    for r in resolutions:
        S = _mean_map(lookup[r], r, dtype, device)
        check_row_stochastic(S)
        if r == R:
            top = S
            continue
        keys = _upsampled_keys(S, r, R).mul_(w[r] / total)
        if folded and r % folded[-1][0] == 0:
            lower, rows = folded.pop()
            f = r // lower
            keys.view(lower, f, lower, f, R * R).add_(_broadcast_rows(rows, lower))
        folded.append((r, keys))
        del S
    if top is not None:
        out = _empty((R * R, R * R), dtype, top.device)
        if folded:        # w_R S_R plus the finest folded rows, in one pass over the output
            r, rows = folded.pop()
            f = R // r
            torch.add(_broadcast_rows(rows, r), top.view(r, f, r, f, R * R),
                      alpha=w[R] / total, out=out.view(r, f, r, f, R * R))
        else:
            torch.mul(top, w[R] / total, out=out)
    else:
        device_ = folded[-1][1].device
        out = torch.zeros((R * R, R * R), dtype=dtype, device=device_)
    for r, rows in folded:
        f = R // r
        out.view(r, f, r, f, R * R).add_(_broadcast_rows(rows, r))
    return out


def power_walk(P, k: int, validate: bool = True) -> torch.Tensor:
    """The ``k``-step transition matrix ``P^k`` (paper 1, section 3.3).

    ``(P^k)_ij`` is the probability of reaching ``j`` from ``i`` in exactly ``k`` steps; it
    stays row-stochastic. Computed by repeated squaring (``~2 log2 k`` products).

    Parameters
    ----------
    P : (n, n) row-stochastic matrix (array or tensor).
    k : number of steps, ``k >= 0`` (``P^0 = I``).
    validate : check that ``P`` is row-stochastic.

    Returns
    -------
    torch.Tensor (same dtype as ``P``; float32 for NumPy float32 input, float64 otherwise).
    """
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k}")
    P = _as_tensor(P)
    if not P.is_floating_point():
        P = P.double()
    if validate:
        check_row_stochastic(P)
    return torch.linalg.matrix_power(P, int(k))


def token_grid(n: int, grid=None, what: str = "the attention") -> tuple[int, int]:
    """``(h, w)`` of the token grid of ``n`` tokens: ``grid`` checked against ``n``, or the
    square grid when ``grid`` is None. Raises :class:`GraphError` naming the mismatch."""
    n = int(n)
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise GraphError(f"N = {n} tokens are not a perfect square grid; pass the grid (h, w)")
        return side, side
    h, w = (int(s) for s in grid)
    if h * w != n:
        raise GraphError(f"grid {h} x {w} has {h * w} positions, {what} has {n}")
    return h, w


def grid_side(n: int) -> int:
    """The side of a square token grid of ``n`` tokens (raises if ``n`` is not a square)."""
    side = math.isqrt(int(n))
    if side * side != n:
        raise GraphError(f"{n} tokens do not form a square grid")
    return side
