"""What every feature upsampler returns, and the attention it exposes without materialising it.

An attention upsampler (JAFAR, SAUCE; chapter 04) computes, for every output pixel ``p``, a
softmax over the low-resolution tokens ``j`` and mixes the tokens' values with it. CAFE (paper 3,
section 3.2) reads that attention ``A`` (``H W x h w``, rows sum to one) three ways: the argmax
token of each pixel (attention clusters ``R = Q(A)``), products ``A G`` with a one-hot
token-to-prototype matrix, and a few rows for figures. At EASe's setting (640 x 480 output,
40 x 30 tokens) ``A`` is 307200 x 1200 floats, 1.4 GiB; at 1024 x 1024 from 64 x 64 tokens it is
16 GiB. :class:`LazyAttention` answers the three questions in chunks of query rows, each chunk
computed on demand by the upsampler (``rows_fn``) and thrown away, so peak memory is one chunk.

:class:`Upsampled` is the common return value: the high-resolution features ``(C, H, W)`` and the
attention. :class:`BilinearUpsampler` is the baseline of every upsampler table (bilinear features)
with a distance-based attention (a softmax over negative squared distances from the pixel to the
token centres), so that CAFE also runs on a plain backbone without a learned upsampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["BilinearUpsampler", "LazyAttention", "Upsampled", "Upsampler", "distance_attention",
           "token_centres"]

# Query rows per chunk: 4096 rows x 1200 keys x 4 bytes = 19 MiB.
DEFAULT_CHUNK = 4096
# dense() refuses beyond this many entries (1 GiB of float32) unless told otherwise.
_DENSE_LIMIT = 1 << 28


class LazyAttention:
    """``A`` (``n_queries x n_keys``, row-stochastic) computed ``chunk`` rows at a time.

    ``rows_fn(start, stop)`` returns rows ``start:stop`` as a ``(stop - start, n_keys)`` tensor.
    Queries are output pixels in row-major order over ``out_size = (H, W)``; keys are tokens in
    row-major order over ``grid = (h, w)``.
    """

    def __init__(self, rows_fn: Callable[[int, int], torch.Tensor], out_size: tuple[int, int],
                 grid: tuple[int, int], chunk: int = DEFAULT_CHUNK):
        self._rows_fn = rows_fn
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.grid = (int(grid[0]), int(grid[1]))
        self.chunk = max(1, int(chunk))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_size[0] * self.out_size[1], self.grid[0] * self.grid[1])

    def chunks(self):
        """Yield ``(start, stop, rows)`` over all query rows."""
        n = self.shape[0]
        for start in range(0, n, self.chunk):
            stop = min(n, start + self.chunk)
            yield start, stop, self._rows_fn(start, stop)

    def rows(self, index) -> torch.Tensor:
        """The rows of the given query indices (flat, row-major), ``(len(index), n_keys)``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        out = []
        for i in index.tolist():
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"query {i} outside 0..{self.shape[0] - 1}")
            out.append(self._rows_fn(i, i + 1))
        return torch.cat(out) if out else torch.zeros(0, self.shape[1])

    def argmax(self) -> torch.Tensor:
        """Token of highest attention for every pixel, ``(H, W)`` long."""
        out = torch.empty(self.shape[0], dtype=torch.long)
        for start, stop, a in self.chunks():
            out[start:stop] = a.max(dim=1).indices.cpu()   # first maximum, faster than argmax
        return out.reshape(self.out_size)

    def matmul(self, G: torch.Tensor) -> torch.Tensor:
        """``A @ G`` for ``G`` of shape ``(n_keys, K)``: ``(H W, K)``, without forming ``A``."""
        if G.ndim != 2 or G.shape[0] != self.shape[1]:
            raise ValueError(f"G must be (n_keys={self.shape[1]}, K), got {tuple(G.shape)}")
        out = None
        for start, stop, a in self.chunks():
            block = a @ G.to(device=a.device, dtype=a.dtype)
            if out is None:
                out = torch.empty(self.shape[0], G.shape[1], dtype=block.dtype)
            out[start:stop] = block.cpu()
        return out

    __matmul__ = matmul

    def dense(self, limit: int = _DENSE_LIMIT) -> torch.Tensor:
        """The whole matrix (tests and small figures only; refuses beyond ``limit`` entries)."""
        n, m = self.shape
        if n * m > limit:
            raise MemoryError(f"dense attention would hold {n} x {m} = {n * m} entries (limit "
                              f"{limit}); use argmax(), matmul() or rows() instead")
        return torch.cat([a.cpu() for _, _, a in self.chunks()])


@dataclass
class Upsampled:
    """An upsampler's output: ``features`` ``(C, H, W)`` and its ``attention`` (or None)."""

    features: torch.Tensor
    attention: LazyAttention | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.features.shape[-2:])


class Upsampler(Protocol):
    """``upsampler(image, lowres, out_size) -> Upsampled``.

    ``image``: ``(3, H0, W0)`` float in [0, 1] (the guidance); ``lowres``: ``(C, h, w)`` tokens;
    ``out_size``: ``(H, W)`` of the result.
    """

    def __call__(self, image: torch.Tensor, lowres: torch.Tensor,
                 out_size: tuple[int, int]) -> Upsampled: ...


def token_centres(size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Centres of a ``grid`` of cells covering ``size``, in the units of ``size``: ``(h w, 2)``."""
    H, W = size
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (H / h)
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (W / w)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def distance_attention(out_size: tuple[int, int], grid: tuple[int, int], sigma: float = 0.5,
                       chunk: int = DEFAULT_CHUNK, dtype=torch.float32) -> LazyAttention:
    """Softmax over tokens of ``-d^2 / (2 sigma^2)``, ``d`` the distance (in token cells) from
    the pixel centre to the token centre: the attention of a plain (non-learned) upsampler.

    Computed separably: ``exp(-(dy^2 + dx^2) s)`` is ``exp(-dy^2 s) exp(-dx^2 s)`` and the sum
    over the token grid factorises the same way, so a row is the outer product of a softmax over
    the ``h`` token rows and one over the ``w`` token columns (``h + w`` exponentials per pixel
    instead of ``h w``; equal to the direct softmax up to rounding, see the tests)."""
    H, W = out_size
    h, w = grid
    scale = 1.0 / (2.0 * float(sigma) ** 2)
    # pixel centres in token units, as token_centres((h, w), (H, W)) gives them, one axis each
    py = (torch.arange(H, dtype=torch.float64) + 0.5) * (h / H)
    px = (torch.arange(W, dtype=torch.float64) + 0.5) * (w / W)
    ty = torch.arange(h, dtype=torch.float64) + 0.5
    tx = torch.arange(w, dtype=torch.float64) + 0.5
    ay = torch.softmax(-scale * (py[:, None] - ty[None]).square(), dim=1).to(dtype)   # (H, h)
    ax = torch.softmax(-scale * (px[:, None] - tx[None]).square(), dim=1).to(dtype)   # (W, w)

    def rows_fn(start, stop):
        idx = torch.arange(start, stop)
        return (ay[idx // W][:, :, None] * ax[idx % W][:, None, :]).reshape(stop - start, h * w)

    return LazyAttention(rows_fn, (H, W), (h, w), chunk=chunk)


class BilinearUpsampler:
    """Bilinear features (``align_corners=False``) and :func:`distance_attention`: the baseline."""

    def __init__(self, sigma: float = 0.5, chunk: int = DEFAULT_CHUNK):
        self.sigma = float(sigma)
        self.chunk = int(chunk)

    def __call__(self, image, lowres: torch.Tensor, out_size) -> Upsampled:
        if lowres.ndim != 3:
            raise ValueError(f"lowres must be (C, h, w), got {tuple(lowres.shape)}")
        H, W = int(out_size[0]), int(out_size[1])
        feats = F.interpolate(lowres[None].float(), size=(H, W), mode="bilinear",
                              align_corners=False)[0]
        att = distance_attention((H, W), tuple(lowres.shape[-2:]), self.sigma, self.chunk)
        return Upsampled(feats, att)
