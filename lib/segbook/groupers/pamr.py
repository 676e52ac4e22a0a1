"""PAMR: pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020, Sec. 3.3).

*Single-Stage Semantic Segmentation from Image Labels* refines coarse masks by repeatedly
replacing each pixel's mask value with an average of its neighbours' values, weighted by how
similar their colours are. For pixel ``i`` and a neighbour ``j`` among the 8 neighbours of
the 3 x 3 window at each dilation ``d`` (so ``8 * len(dilations)`` neighbours):

* a colour kernel per channel, normalised by the local spread of that channel:
  ``k_ij = - mean_c |I_c(i) - I_c(j)| / (eps + lambda * sigma_c(i))``, where ``sigma_c(i)`` is
  the standard deviation of channel ``c`` over the 3 x 3 windows of all dilations around
  ``i`` (centre included);
* affinities ``alpha_ij = softmax_j(k_ij)`` (they sum to 1 over the neighbours of ``i``);
* ``iterations`` rounds of ``m(i) <- sum_j alpha_ij m(j)`` on every mask channel.

In flat regions all neighbours weigh the same (plain smoothing); across an edge the other
side's pixels get exponentially small weights, so masks snap to image edges. The values not
fixed by the paper follow the authors' public code (see IMPLEMENTATION_NOTES, DiffCut):
``lambda = 0.1``, unbiased standard deviation, replicate padding at the border. DiffCut and
paper 1 (Table 5) run it with 10 iterations and dilations 1, 2, 4, 8 on one-hot masks, then
take the argmax and a 3 x 3 median filter; :func:`refine_labels` does exactly that.

It lives with the groupers because it post-processes a grouper's labels at a fixed
resolution; the upsamplers in :mod:`segbook.upsamplers` produce features, not labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

__all__ = ["pamr", "pamr_affinities", "refine_labels"]

# The 8 neighbours of a 3 x 3 window, as (row, column) steps.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _check_dilations(dilations) -> tuple[int, ...]:
    dil = tuple(int(d) for d in dilations)
    if not dil or any(d < 1 for d in dil) or any(d != float(x) for d, x in zip(dil, dilations)):
        raise ValueError(f"dilations must be a non-empty sequence of positive integers, "
                         f"got {dilations!r}")
    return dil


def _shifts(x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """``x`` (C, H, W) seen from each offset: ``out[k][:, y, x] = x[:, y + dy, x + dx]`` with the
    border replicated (one padding by the largest offset serves every dilation)."""
    _, H, W = x.shape
    m = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x[None], [m, m, m, m], mode="replicate")[0]
    return [padded[:, m + dy:m + dy + H, m + dx:m + dx + W] for dy, dx in offsets]


def _as_image(image) -> torch.Tensor:
    """(C, H, W) float32: numpy images are (H, W[, C]) like PIL / skimage; torch tensors are
    (C, H, W) or (H, W) like torchvision."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"a numpy image must be (H, W) or (H, W, C), got {image.shape}")
        array = np.ascontiguousarray(image)
        if not array.flags.writeable:   # torch warns on read-only memory (e.g. a cached image)
            array = array.copy()
        image = torch.from_numpy(array).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"a torch image must be (C, H, W) or (H, W), got {tuple(image.shape)}")
    else:
        raise TypeError(f"image must be a numpy array or torch tensor, got {type(image)!r}")
    image = image.detach().to(torch.float32)
    if not torch.isfinite(image).all():
        raise ValueError("the image contains NaN or infinite values")
    return image


def pamr_affinities(image, dilations: Sequence[int] = (1, 2, 4, 8), std_scale: float = 0.1,
                    eps: float = 1e-8) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The PAMR neighbour weights of an image.

    Parameters
    ----------
    image : numpy (H, W[, C]) or torch (C, H, W) / (H, W); any range (the kernel divides by the
        local standard deviation, so scaling the image changes little).
    dilations : the 3 x 3 ring is taken at each of these dilations.
    std_scale : ``lambda`` in ``|dI| / (eps + lambda * sigma)`` (0.1 in the authors' code).

    Returns
    -------
    (alpha, offsets): ``alpha`` is a float32 tensor ``(8 * len(dilations), H, W)`` summing to 1
    over its first axis; ``offsets[j]`` is the ``(dy, dx)`` step of neighbour ``j``.
    """
    dil = _check_dilations(dilations)
    x = _as_image(image)
    offsets = [(dy * d, dx * d) for d in dil for dy, dx in _RING]
    windows = [(dy * d, dx * d) for d in dil for dy, dx in ((0, 0), *_RING)]
    sigma = torch.stack(_shifts(x, windows)).std(0, unbiased=True)  # (C, H, W)
    denom = eps + std_scale * sigma
    logits = torch.stack([-((x - nb).abs() / denom).mean(0) for nb in _shifts(x, offsets)])
    return torch.softmax(logits, dim=0), offsets


def _one_hot(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = torch.unique(labels, return_inverse=True)
    masks = F.one_hot(index, num_classes=len(values)).permute(2, 0, 1).to(torch.float32)
    return masks, values


def pamr(image, masks, iterations: int = 10, dilations: Sequence[int] = (1, 2, 4, 8),
         std_scale: float = 0.1):
    """Refine masks along image edges (Araslanov and Roth 2020, Sec. 3.3).

    Parameters
    ----------
    image : numpy (H, W[, C]) or torch (C, H, W) / (H, W).
    masks : soft masks ``(K, H, W)`` (float), or a label map ``(H, W)`` (integer), which is
        turned into one one-hot channel per distinct label, in increasing label order.
        Must have the image's height and width.
    iterations : rounds of ``m <- sum_j alpha_j m_j`` (DiffCut and paper 1: 10).
    dilations : the neighbourhood's dilations (DiffCut and paper 1: 1, 2, 4, 8).
    std_scale : ``lambda`` of the colour kernel.

    Returns
    -------
    Refined soft masks ``(K, H, W)``, float32: a numpy array if ``masks`` was one, else a
    tensor. Each output pixel is a convex combination of input pixels, so masks that sum to 1
    over ``K`` still do.
    """
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    as_numpy = isinstance(masks, np.ndarray)
    m = torch.from_numpy(np.ascontiguousarray(masks)) if as_numpy else masks
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"masks must be a numpy array or torch tensor, got {type(masks)!r}")
    if m.ndim == 2:
        if m.is_floating_point():
            raise ValueError("a 2-d `masks` is read as a label map and must be integer; "
                             "pass soft masks as (K, H, W)")
        m, _ = _one_hot(m)
    elif m.ndim != 3:
        raise ValueError(f"masks must be (K, H, W) soft masks or an (H, W) label map, "
                         f"got shape {tuple(m.shape)}")
    m = m.detach().to(torch.float32)
    if not torch.isfinite(m).all():
        raise ValueError("the masks contain NaN or infinite values")
    alpha, offsets = pamr_affinities(image, dilations, std_scale)
    if alpha.shape[1:] != m.shape[1:]:
        raise ValueError(f"image is {tuple(alpha.shape[1:])} but masks are {tuple(m.shape[1:])}; "
                         "resize one to the other first")
    for _ in range(int(iterations)):
        out = torch.zeros_like(m)
        for a, nb in zip(alpha, _shifts(m, offsets)):
            out.addcmul_(a[None], nb)
        m = out
    return m.numpy() if as_numpy else m


def refine_labels(image, labels, iterations: int = 10, dilations: Sequence[int] = (1, 2, 4, 8),
                  median_size: int | None = 3, std_scale: float = 0.1):
    """DiffCut's refinement of a label map: one-hot, :func:`pamr`, argmax, median filter.

    Parameters
    ----------
    image : numpy (H, W[, C]) or torch (C, H, W) / (H, W).
    labels : integer label map ``(H, W)`` at the image's size (any label values).
    iterations, dilations, std_scale : passed to :func:`pamr`.
    median_size : side of the median filter applied to the argmax (DiffCut: 3); None or 1
        skips it. The median is taken over the rank of each label, so every output value is
        one of the input labels.

    Returns
    -------
    Integer label map ``(H, W)`` with values from ``labels``: numpy (int64) for numpy input,
    a tensor of ``labels``' dtype for a tensor.
    """
    as_numpy = isinstance(labels, np.ndarray)
    lab = torch.from_numpy(np.ascontiguousarray(labels)) if as_numpy else labels
    if not isinstance(lab, torch.Tensor) or lab.ndim != 2 or lab.is_floating_point() \
            or lab.dtype == torch.bool:
        raise ValueError("labels must be an integer (H, W) label map")
    masks, values = _one_hot(lab)
    refined = pamr(image, masks, iterations=iterations, dilations=dilations,
                   std_scale=std_scale)
    rank = refined.argmax(0).numpy()
    if median_size is not None and median_size > 1:
        rank = scipy.ndimage.median_filter(rank, size=int(median_size), mode="reflect")
    out = values[torch.from_numpy(rank)]
    return out.numpy().astype(np.int64) if as_numpy else out
