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
import torch.nn.functional as F

from segbook.errors import GraphError

__all__ = ["aggregate_self_attention", "check_row_stochastic", "diffseg_weights", "power_walk"]


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def check_row_stochastic(P, atol: float = 1e-3) -> None:
    """Raise :class:`GraphError` unless ``P`` is square, finite, non-negative, rows summing to 1."""
    P = _as_tensor(P)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise GraphError(f"a transition matrix must be square, got shape {tuple(P.shape)}")
    if not torch.isfinite(P).all():
        raise GraphError("the transition matrix contains NaN or Inf")
    if P.numel() and P.min() < 0:
        raise GraphError("the transition matrix has negative entries")
    rows = P.sum(1, dtype=torch.float64)
    if P.numel() and (rows - 1).abs().max() > atol:
        raise GraphError(f"the transition matrix is not row-stochastic (row sums in "
                         f"[{float(rows.min()):.4g}, {float(rows.max()):.4g}])")


def diffseg_weights(resolutions) -> dict[int, float]:
    """DiffSeg's resolution weights: proportional to the resolution, normalised to sum 1.

    For (8, 16, 32, 64) that is 1/15, 2/15, 4/15, 8/15 (0.067, 0.133, 0.267, 0.533).
    """
    resolutions = [int(r) for r in resolutions]
    total = float(sum(resolutions))
    return {r: r / total for r in resolutions}


def _reduce_heads(S: torch.Tensor, r: int) -> torch.Tensor:
    """(..., r^2, r^2) -> (r^2, r^2) by averaging the leading axes (heads, layers)."""
    if S.shape[-2:] != (r * r, r * r):
        raise GraphError(f"attention map for resolution {r} must end in ({r * r}, {r * r}), "
                         f"got {tuple(S.shape)}")
    return S.reshape(-1, r * r, r * r).mean(0)


def aggregate_self_attention(maps: Mapping, weights="diffseg", resolutions=None,
                             output_resolution: int | None = None,
                             dtype=torch.float32) -> torch.Tensor:
    """Aggregate self-attention maps of several resolutions into one transition matrix.

    DiffSeg's aggregation, used by paper 1 (section 3.1): a map ``S`` of resolution ``r``
    (``r^2`` query tokens by ``r^2`` key tokens) is brought to the output resolution ``R`` by

    * the key dimensions, viewed as an ``r x r`` image per query, upsampled bilinearly to
      ``R x R`` and each row renormalised to sum 1;
    * the query dimensions repeated (nearest neighbour): each of the ``(R/r)^2`` output queries
      that fall in one input query's cell inherits its row;

    and the maps are added with weights ``w_r`` that sum to one, so the result stays
    row-stochastic: ``P = sum_r w_r up(S^(r))``.

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
    dtype : dtype of the result.

    Returns
    -------
    torch.Tensor of shape ``(R^2, R^2)``, rows summing to 1.

    Raises
    ------
    GraphError for a map that is not row-stochastic, a missing resolution, or an output
    resolution that is not a multiple of an input one.
    """
    if not maps:
        raise GraphError("no attention maps to aggregate")
    resolutions = sorted(int(r) for r in (resolutions if resolutions is not None else maps))
    missing = [r for r in resolutions if r not in {int(k) for k in maps}]
    if missing:
        raise GraphError(f"no attention maps for resolutions {missing}; have {sorted(maps)}")
    R = int(output_resolution or max(resolutions))
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
    lookup = {int(k): v for k, v in maps.items()}
    out = torch.zeros(R * R, R * R, dtype=dtype)
    for r in resolutions:
        if R % r:
            raise GraphError(f"output resolution {R} is not a multiple of resolution {r}")
        value = lookup[r]
        if isinstance(value, (list, tuple)):
            S = torch.stack([_reduce_heads(_as_tensor(v, torch.float64), r) for v in value]).mean(0)
        else:
            S = _reduce_heads(_as_tensor(value, torch.float64), r)
        check_row_stochastic(S)
        if r != R:
            keys = S.reshape(r * r, 1, r, r)
            keys = F.interpolate(keys, size=(R, R), mode="bilinear", align_corners=False)
            keys = keys.reshape(r * r, R * R)
            keys = keys / keys.sum(1, keepdim=True)
            # Query (row) index (qy, qx) on the r-grid -> rows (qy*f + a, qx*f + b) on the R-grid.
            f = R // r
            rows = keys.reshape(r, 1, r, 1, R * R).expand(r, f, r, f, R * R)
            S = rows.reshape(R * R, R * R)
        out += (w[r] / total) * S.to(dtype)
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


def grid_side(n: int) -> int:
    """The side of a square token grid of ``n`` tokens (raises if ``n`` is not a square)."""
    side = math.isqrt(int(n))
    if side * side != n:
        raise GraphError(f"{n} tokens do not form a square grid")
    return side
