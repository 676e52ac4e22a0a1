"""Synthetic self-attention with planted regions: inputs with a known answer.

Attention rows of a diffusion U-Net concentrate on the query's own object and on its spatial
neighbourhood. :func:`planted_attention` imitates that on a label image: at every resolution
``r`` the row of token ``i`` is ``softmax_j(a [same region] + b exp(-d_ij^2 / (2 s^2)) + noise)``,
so that the aggregate of the maps is a row-stochastic ``P`` whose NCut segments are the planted
regions. Used by the tests and by ``benchmarks/walk_and_cut.py`` (a ``P`` of the size of a
512 px image's 64 x 64 latent, without Stable Diffusion).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["planted_attention", "planted_scene"]


def planted_scene(size: int = 64, n_regions: int = 6) -> np.ndarray:
    """A toy scene label map ``(size, size)``: sky, ground, and up to four shapes on them.

    Regions: 0 sky (top), 1 ground (bottom), 2 a disk, 3 a rectangle, 4 a triangle, 5 a small
    square; ``n_regions`` (2-6) keeps the first ones.
    """
    if not 2 <= n_regions <= 6:
        raise ValueError(f"n_regions must be in 2..6, got {n_regions}")
    y, x = np.mgrid[0:size, 0:size] / size
    labels = np.where(y < 0.45, 0, 1)
    shapes = [
        (x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.17 ** 2,                     # disk
        (x > 0.55) & (x < 0.9) & (y > 0.35) & (y < 0.75),                # rectangle
        (y > 0.7) & (y < 0.95) & (np.abs(x - 0.3) < (y - 0.7)),          # triangle
        (x > 0.08) & (x < 0.2) & (y > 0.6) & (y < 0.72),                 # small square
    ]
    for k, mask in enumerate(shapes[: n_regions - 2]):
        labels = np.where(mask, k + 2, labels)
    return labels.astype(np.int64)


def _downsample_labels(labels: np.ndarray, r: int) -> np.ndarray:
    R = labels.shape[0]
    centres = ((np.arange(r) + 0.5) * R / r).astype(int)
    return labels[np.ix_(centres, centres)]


def planted_attention(labels, resolutions=(16, 32, 64), same: float = 6.0, local: float = 3.0,
                      sigma: float = 0.08, noise: float = 1.0, layers: int = 1, seed: int = 0,
                      dtype=torch.float32) -> dict[int, list[torch.Tensor]]:
    """Row-stochastic attention maps with planted regions, per resolution.

    Parameters
    ----------
    labels : (S, S) integer label image (e.g. :func:`planted_scene`); sampled at each
        resolution's token centres.
    resolutions : grid sides ``r`` (each map is ``(r^2, r^2)``).
    same : logit bonus for keys in the query's region.
    local : logit bonus ``local * exp(-d^2 / (2 sigma^2))`` for nearby keys (``d`` in units of
        the image side).
    sigma : width of the locality term.
    noise : standard deviation of Gaussian logit noise.
    layers : maps per resolution (independent noise), as a capture returns several layers.
    seed : random seed.
    dtype : dtype of the maps.

    Returns
    -------
    ``{r: [map, ...]}``, the format of :meth:`Capture.attention_by_resolution`.
    """
    labels = np.asarray(labels)
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for r in sorted(int(r) for r in resolutions):
        lab = torch.from_numpy(_downsample_labels(labels, r).reshape(-1))
        yy, xx = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).float().add_(0.5).div_(r)
        d2 = torch.cdist(pos, pos).pow_(2)
        base = same * (lab[:, None] == lab[None, :]).float() \
            + local * torch.exp(-d2 / (2 * sigma ** 2))
        maps = []
        for _ in range(int(layers)):
            logits = base + noise * torch.randn(base.shape, generator=gen)
            maps.append(F.softmax(logits, dim=1).to(dtype))
        out[r] = maps
    return out
