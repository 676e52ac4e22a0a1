"""JAFAR: an attention upsampler whose queries come from the image (chapter 04, part 1).

JAFAR {cite}`couairon2025jafar` turns ``h x w`` backbone tokens into features at any output size
``H x W``. Everything here follows JAFAR's *code* (PaulCouairon/JAFAR @ 94d4d54), which differs
from its paper in several places (see ``PAPER2_JAFAR_EASE_FACTS.md`` section 4):

1. ``E = image_encoder(image)`` at the guidance image's resolution (a 1x1 conv 3 -> ``d_qk``
   and two pre-activation ResBlocks: GroupNorm(8) -> SiLU -> 1x1 conv, twice, identity
   shortcut; all convs bias-free).
2. A *learned* 2-D Fourier modulation ("RoPE") on ``E`` with coordinates in ``[0, 1]``
   (:class:`RoPE2d`: channel ``c`` is paired with ``c + d/2``; the first half sees row angles,
   the second half column angles, so it is not a rotation; the frequencies are parameters).
3. Queries: ``query_encoder(E)`` -> adaptive average pooling to ``(H, W)`` -> GroupNorm(8)
   without affine -> 3x3 conv (zero padding) -> RMSNorm.
4. Keys: ``key_encoder(E)`` -> adaptive average pooling to ``(h, w)`` -> SFT modulation
   ``gamma(c) * GroupNorm(keys) + beta(c)`` with ``c = key_features_encoder(normalise(F_lr))``
   -> RMSNorm.
5. Multi-head attention scores (4 heads, in-projections with bias, scale ``1/sqrt(d_head)``),
   softmax over keys per head, **heads averaged**: ``A`` (``H W x h w``, rows sum to one).
6. Output ``A @ F_lr`` with the *raw* low-resolution tokens as values: every output pixel is a
   convex combination of the input tokens. JAFAR's code also runs ``nn.MultiheadAttention``'s
   value/output projections and an RMSNorm of the values, then throws their result away;
   those parameters are "dead" and are not built here (:data:`DEAD_KEYS`).

Two ways to run the same weights:

* ``model(images (B, 3, H0, W0), feats (B, C, h, w), (H, W))`` -> ``(B, C, H, W)``, differentiable,
  materialising every head's attention (JAFAR's own way; training and the tests' reference).
* ``model(image (3, H0, W0), lowres (C, h, w), (H, W))`` -> :class:`~segbook.upsamplers.base.Upsampled`
  (the :class:`~segbook.upsamplers.base.Upsampler` protocol), memory-bounded: no gradient, the
  encoders run in place over row chunks (GroupNorm statistics accumulated in a first pass),
  the queries are made and used one chunk of output pixels at a time, and ``A`` is returned as
  a :class:`~segbook.upsamplers.base.LazyAttention` that recomputes its rows on demand. Peak
  memory beyond the output is one ``d_qk x H0 x W0`` map plus one chunk.

Images are given in ``[0, 1]``; the model applies ImageNet's normalisation itself (JAFAR was
trained on ImageNet-normalised images).

Official checkpoints (:func:`official_to_segbook`): JAFAR's module names are kept, except the
attention's, which map as follows (``X = cross_decode.cross_attn``)::

    X.norm_q.weight                      -> cross_decode.norm_q.weight
    X.norm_k.weight                      -> cross_decode.norm_k.weight
    X.attention.q_proj_weight            -> cross_decode.q_proj.weight
    X.attention.k_proj_weight            -> cross_decode.k_proj.weight
    X.attention.in_proj_weight[:d], [d:2d] (when v_dim == d_qk) -> q_proj / k_proj weights
    X.attention.in_proj_bias[:d], [d:2d] -> cross_decode.q_proj.bias, cross_decode.k_proj.bias
    X.norm_v.weight, X.attention.v_proj_weight, in_proj_bias[2d:], X.attention.out_proj.*  (dead: ignored)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segbook.errors import CorruptFileError, SegbookError
from segbook.upsamplers.base import LazyAttention, Upsampled

__all__ = [
    "DEAD_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JAFAR",
    "ResBlock",
    "RoPE2d",
    "UpsamplerInputError",
    "WidthMismatchError",
    "load_checkpoint",
    "make_encoder",
    "official_to_segbook",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Query rows x heads x keys per attention chunk, in elements: 4 Mi floats = 16 MiB of logits
# (and as much for the softmax); a chunk is at least one row of output pixels.
_CHUNK_ELEMENTS = 1 << 22
# Pixels processed at once by the in-place encoders (16 Ki x 128 channels = 8 MiB a temporary).
_ENCODER_CHUNK_PIXELS = 1 << 14
_GN_EPS = 1e-5
# Two image-sized maps (the encoding and a copy for the keys) are kept when they fit in this;
# beyond it the image is encoded twice (slower, half the memory).
_SPARE_BYTES = 200 << 20
# An image map up to this size is encoded with the plain modules (as the reference does).
_SMALL_BYTES = 32 << 20

_ATTN = "cross_decode.cross_attn."
DEAD_KEYS = (_ATTN + "norm_v.weight", _ATTN + "attention.v_proj_weight",
             _ATTN + "attention.out_proj.weight", _ATTN + "attention.out_proj.bias")


class UpsamplerInputError(SegbookError, ValueError):
    """Inputs an upsampler cannot use (grid vs image aspect, output size, NaN features)."""


class WidthMismatchError(SegbookError, ValueError):
    """A checkpoint made for another backbone width."""


# ------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """Pre-activation residual block of JAFAR's encoders (GroupNorm(8) -> SiLU -> 1x1 conv,
    twice; identity shortcut; bias-free convs)."""

    def __init__(self, dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, dim)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def make_encoder(in_dim: int, dim: int, kernel_size: int = 1, blocks: int = 2) -> nn.Sequential:
    """JAFAR's encoder: conv ``in_dim -> dim`` (reflect padding, no bias) + ``blocks`` ResBlocks."""
    conv = nn.Conv2d(in_dim, dim, kernel_size, padding=kernel_size // 2, padding_mode="reflect",
                     bias=False)
    return nn.Sequential(conv, *[ResBlock(dim) for _ in range(blocks)])


def initial_rope_frequencies(dim: int, theta: float = 100.0) -> torch.Tensor:
    """JAFAR's initial frequencies ``(2, dim)``: ``2 pi theta^linspace(0, -1, dim/4)``,
    duplicated, on channels ``0..dim/2`` (row coordinate) and ``dim/2..dim`` (column)."""
    f = theta ** torch.linspace(0, -1, dim // 4)
    f = torch.cat([f, f])
    out = torch.zeros(2, dim)
    out[0, : dim // 2] = f
    out[1, dim - dim // 2:] = f
    return out * 2 * math.pi


class RoPE2d(nn.Module):
    """JAFAR's "RoPE" on the image encoding: ``x cos(a) + rot(x) sin(a)`` with ``a = coords @ freqs``
    and ``rot(x) = [-x2, x1]`` (halves of the channels). The frequencies are learned.

    Coordinates are ``linspace(0, 1)`` per axis (``"ij"``: first coordinate = row), made on the
    input's device; angles are computed in float32 and cast to the input's dtype, so float16
    and bfloat16 inputs work (JAFAR's code made float32 CUDA coordinates: its issue #7).
    """

    def __init__(self, dim: int, theta: float = 100.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"d_qk must be a multiple of 4 for the RoPE, got {dim}")
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(initial_rope_frequencies(dim, theta))

    def angles(self, H: int, W: int, rows: slice | None = None, device=None) -> torch.Tensor:
        """``(n, dim)`` float32 angles of the pixels of ``rows`` (default all) of an ``H x W`` map."""
        device = device or self.freqs.device
        ys = torch.linspace(0, 1, H, device=device, dtype=torch.float32)
        xs = torch.linspace(0, 1, W, device=device, dtype=torch.float32)
        if rows is not None:
            ys = ys[rows]
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
        return coords @ self.freqs.float()

    def apply(self, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, dim, n)`` (channels first), ``angle`` ``(n, dim)``."""
        a = angle.T.to(x.dtype)[None]
        x1, x2 = x.chunk(2, dim=1)
        return x * a.cos() + torch.cat([-x2, x1], dim=1) * a.sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        return self.apply(x.reshape(B, C, H * W), self.angles(H, W, device=x.device)).reshape(B, C, H, W)


class SFTModulation(nn.Module):
    """``gamma(c) * GroupNorm(x) + beta(c)`` with bias-free 1x1 convs (spatial feature transform)."""

    def __init__(self, dim: int, groups: int = 8):
        super().__init__()
        self.gamma = nn.Conv2d(dim, dim, 1, bias=False)
        self.beta = nn.Conv2d(dim, dim, 1, bias=False)
        self.groups = groups

    def forward(self, x, condition):
        return self.gamma(condition) * F.group_norm(x, self.groups, eps=_GN_EPS) + self.beta(condition)


class CrossAttentionScores(nn.Module):
    """The live half of JAFAR's cross-attention block: 3x3 conv on the queries, RMSNorm of
    queries and keys, per-head in-projections and the heads-averaged softmax."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_qk={dim} is not divisible by {heads} heads")
        self.heads = heads
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm_q = nn.RMSNorm(dim)
        self.norm_k = nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)

    def project_q(self, q_tokens: torch.Tensor) -> torch.Tensor:
        """``(..., n, d)`` conv'd query tokens -> ``(..., heads, n, d_head)`` scaled by ``1/sqrt(d_head)``."""
        q = self.q_proj(self.norm_q(q_tokens))
        *lead, n, d = q.shape
        dh = d // self.heads
        q = q.reshape(*lead, n, self.heads, dh).transpose(-3, -2)
        return q * (1.0 / math.sqrt(dh))

    def project_k(self, k_tokens: torch.Tensor) -> torch.Tensor:
        k = self.k_proj(self.norm_k(k_tokens))
        *lead, n, d = k.shape
        return k.reshape(*lead, n, self.heads, d // self.heads).transpose(-3, -2)

    @staticmethod
    def averaged_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``(.., heads, n, dh)`` x ``(.., heads, m, dh)`` -> ``(.., n, m)`` heads-averaged softmax."""
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1).mean(dim=-3)


# ------------------------------------------------------------------------------------------
# in-place, chunked encoders (inference)
# ------------------------------------------------------------------------------------------

def _group_stats(sum_, sumsq, count):
    mean = sum_ / count
    var = (sumsq / count - mean * mean).clamp_min(0)
    return mean, torch.rsqrt(var + _GN_EPS)


def _apply_group_norm(x, mean, rstd, groups, weight=None, bias=None):
    """``x`` ``(C, n)``; ``mean``/``rstd`` ``(groups,)`` float64; one fused affine per channel."""
    C = x.shape[0]
    scale = rstd.repeat_interleave(C // groups)
    shift = -mean.repeat_interleave(C // groups) * scale
    if weight is not None:
        scale = scale * weight.double()
        shift = shift * weight.double() + bias.double()
    return torch.addcmul(shift.to(x.dtype)[:, None], x, scale.to(x.dtype)[:, None])


def _accumulate(acc, x, groups):
    g = x.reshape(groups, x.shape[0] // groups, x.shape[1])   # a view, even of a column slice
    acc[0] += g.sum(dim=(1, 2), dtype=torch.float64)
    acc[1] += torch.linalg.vector_norm(g, dim=(1, 2), dtype=torch.float64) ** 2


def _pointwise(conv: nn.Conv2d, x):
    """A bias-free 1x1 conv on ``(C, n)`` tokens."""
    return conv.weight[:, :, 0, 0].to(x.dtype) @ x


def _full_stats(x, groups, step):
    C, n = x.shape
    acc = [torch.zeros(groups, dtype=torch.float64, device=x.device) for _ in range(2)]
    for s in range(0, n, step):
        _accumulate(acc, x[:, s:s + step], groups)
    return _group_stats(acc[0], acc[1], (C // groups) * n)


@torch.no_grad()
def _resblock_inplace(block: ResBlock, x: torch.Tensor, step: int) -> None:
    """``x <- block(x)`` for ``x`` ``(C, n)``, one chunk of ``step`` tokens at a time: the first
    norm's statistics from ``x``, the second's accumulated over a pass that recomputes the
    branch, then the residual added in place (peak: ``x`` + a chunk)."""
    groups = block.norm1.num_groups
    C, n = x.shape
    m1, r1 = _full_stats(x, groups, step)

    def branch(chunk):
        return _pointwise(block.conv1, F.silu(_apply_group_norm(
            chunk, m1, r1, groups, block.norm1.weight, block.norm1.bias), inplace=True))

    acc = [torch.zeros(groups, dtype=torch.float64, device=x.device) for _ in range(2)]
    for s in range(0, n, step):
        _accumulate(acc, branch(x[:, s:s + step]), groups)
    m2, r2 = _group_stats(acc[0], acc[1], (C // groups) * n)
    for s in range(0, n, step):
        h = branch(x[:, s:s + step])
        x[:, s:s + step] += _pointwise(block.conv2, F.silu(_apply_group_norm(
            h, m2, r2, groups, block.norm2.weight, block.norm2.bias), inplace=True))


@torch.no_grad()
def _encoder_tail_inplace(encoder: nn.Sequential, x: torch.Tensor, step: int) -> None:
    for block in list(encoder)[1:]:
        _resblock_inplace(block, x, step)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------

class JAFAR(nn.Module):
    """JAFAR's upsampler (JAFAR's code; see the module docstring).

    Parameters
    ----------
    v_dim : channels of the backbone's tokens (384 ViT-S, 768 ViT-B, 1024 ViT-L).
    qk_dim : width of queries and keys (128; EASe supp. Table 1 ``d_qk``).
    num_heads : attention heads (4).
    kernel_size : the image encoder's first conv (1 in JAFAR's config).
    theta : RoPE base (100).
    chunk_elements : query rows x heads x keys per attention chunk of the lazy path.
    """

    def __init__(self, v_dim: int = 384, qk_dim: int = 128, num_heads: int = 4,
                 kernel_size: int = 1, theta: float = 100.0,
                 chunk_elements: int = _CHUNK_ELEMENTS):
        super().__init__()
        self.v_dim, self.qk_dim, self.num_heads = int(v_dim), int(qk_dim), int(num_heads)
        self.kernel_size = int(kernel_size)
        self.chunk_elements = int(chunk_elements)
        self.image_encoder = make_encoder(3, qk_dim, kernel_size)
        self.key_encoder = make_encoder(qk_dim, qk_dim)
        self.query_encoder = make_encoder(qk_dim, qk_dim)
        self.key_features_encoder = make_encoder(v_dim, qk_dim)
        self.cross_decode = CrossAttentionScores(qk_dim, num_heads)
        self.sft_key = SFTModulation(qk_dim)
        self.rope = RoPE2d(qk_dim, theta)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- hooks SAUCE overrides -------------------------------------------------------------
    def gate(self, feats: torch.Tensor) -> torch.Tensor | None:
        """Per-channel gates ``(B, C)`` for the tokens, or None (JAFAR has none)."""
        return None

    def values_and_condition(self, feats: torch.Tensor):
        """``(values, key condition)`` from the raw tokens ``(B, C, h, w)``."""
        return feats, feats

    # -- shared pieces -----------------------------------------------------------------------
    def _normalise(self, images):
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _keys(self, pooled_keys, condition):
        """Pooled key map ``(B, d, h, w)`` and the tokens ``(B, C, h, w)`` -> ``(B, heads, hw, dh)``."""
        c = self.key_features_encoder(F.normalize(condition, dim=1))
        k = self.sft_key(pooled_keys, c)
        return self.cross_decode.project_k(k.flatten(2).transpose(1, 2))

    def _check(self, images, feats, out_size):
        if feats.shape[1] != self.v_dim:
            raise UpsamplerInputError(f"this upsampler was built for {self.v_dim}-channel tokens, "
                                      f"got {feats.shape[1]} channels")
        H, W = int(out_size[0]), int(out_size[1])
        h, w = feats.shape[-2:]
        H0, W0 = images.shape[-2:]
        if H < h or W < w:
            raise UpsamplerInputError(f"output {H} x {W} is smaller than the token grid {h} x {w}; "
                                      "an upsampler only goes up (pool the tokens instead)")
        if H0 < h or W0 < w:
            raise UpsamplerInputError(f"guidance image {H0} x {W0} is smaller than the token grid {h} x {w}")
        # the grid must have the image's aspect up to rounding to whole tokens
        if abs(h - H0 * w / W0) > 1 + 0.05 * h and abs(w - W0 * h / H0) > 1 + 0.05 * w:
            raise UpsamplerInputError(
                f"token grid {h} x {w} (aspect w/h {w / h:.3f}) does not match the image "
                f"{H0} x {W0} (aspect {W0 / H0:.3f}); resize the image or the grid consistently")
        if abs(H - H0 * W / W0) > 1 + 0.02 * H:
            raise UpsamplerInputError(f"output {H} x {W} does not have the image's aspect ({H0} x {W0})")
        if not torch.isfinite(feats).all():
            raise UpsamplerInputError("the low-resolution features contain NaN or inf values")
        return H, W

    # -- batched, differentiable (training; the reference that materialises every head) -------
    def forward_batch(self, images: torch.Tensor, feats: torch.Tensor, out_size,
                      return_attention: bool = False):
        """``images`` ``(B, 3, H0, W0)`` in ``[0, 1]``, ``feats`` ``(B, C, h, w)`` -> ``(B, C, H, W)``
        (and ``A`` ``(B, H W, h w)`` with ``return_attention``), all heads materialised."""
        H, W = self._check(images, feats, out_size)
        h, w = feats.shape[-2:]
        E = self.rope(self.image_encoder(self._normalise(images)))
        q = F.group_norm(F.adaptive_avg_pool2d(self.query_encoder(E), (H, W)), 8, eps=_GN_EPS)
        q = self.cross_decode.conv2d(q).flatten(2).transpose(1, 2)
        keys = F.adaptive_avg_pool2d(self.key_encoder(E), (h, w))
        values, condition = self.values_and_condition(feats)
        k = self._keys(keys, condition)
        A = self.cross_decode.averaged_softmax(self.cross_decode.project_q(q), k)
        out = (A @ values.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(
            feats.shape[0], -1, H, W)
        return (out, A) if return_attention else out

    def forward(self, image, lowres, out_size):
        """Batched ``(B, 3, H0, W0)`` input -> tensor (:meth:`forward_batch`); a single ``(3, H0, W0)``
        image -> :class:`Upsampled` through the memory-bounded path (:meth:`upsample`)."""
        if image.ndim == 4:
            return self.forward_batch(image, lowres, out_size)
        return self.upsample(image, lowres, out_size)

    def reference(self, image, lowres, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        """The straightforward version for one image: ``(features (C, H, W), A (H W, h w))``,
        every head's attention for every pixel in memory at once (JAFAR's way)."""
        with torch.no_grad():
            out, A = self.forward_batch(image[None], lowres[None], out_size, return_attention=True)
        return out[0], A[0]

    # -- memory-bounded ---------------------------------------------------------------------
    @torch.no_grad()
    def _image_encoding(self, image: torch.Tensor) -> torch.Tensor:
        """``rope(image_encoder(image))`` as ``(d, H0 W0)``, the residual blocks run in place."""
        x = self._normalise(image[None].to(self.mean.device, self.rope.freqs.dtype))
        E = self.image_encoder[0](x)[0]  # the first conv may be k x k: run it whole
        d, H0, W0 = E.shape
        x = E.reshape(d, H0 * W0)
        step = max(W0, _ENCODER_CHUNK_PIXELS // W0 * W0)
        _encoder_tail_inplace(self.image_encoder, x, step)
        rows = max(1, step // W0)
        for r in range(0, H0, rows):
            sl = slice(r, min(H0, r + rows))
            part = x[:, sl.start * W0: sl.stop * W0]
            part.copy_(self.rope.apply(part[None], self.rope.angles(H0, W0, sl, device=x.device))[0])
        return x

    @staticmethod
    def _encode_inplace(encoder: nn.Sequential, x: torch.Tensor, W0: int) -> torch.Tensor:
        """``encoder(x)`` for ``x`` ``(d, H0 W0)``, overwriting ``x`` (1x1 first conv only)."""
        if encoder[0].weight.shape[-1] != 1:
            raise ValueError("the key/query encoders' first conv must be 1x1")
        step = max(W0, _ENCODER_CHUNK_PIXELS // W0 * W0)
        for s in range(0, x.shape[1], step):   # a 1x1 conv: each chunk depends on itself only
            x[:, s:s + step] = _pointwise(encoder[0], x[:, s:s + step])
        _encoder_tail_inplace(encoder, x, step)
        return x

    @torch.no_grad()
    def _queries_and_keys_inplace(self, image, condition, out_size, grid):
        """The large-image path: conv'd queries ``(d, H W)`` and projected keys, built in place
        (at most two ``d x H0 x W0`` maps, one when they would not fit in ``_SPARE_BYTES``)."""
        model = self
        (H, W), (h, w) = out_size, grid
        H0, W0 = image.shape[-2:]
        E = model._image_encoding(image)
        if 2 * E.numel() * E.element_size() <= _SPARE_BYTES:
            keymap = model._encode_inplace(model.key_encoder, E.clone(), W0)  # time over memory
        else:   # one map at a time: keys first, then the image encoded again
            keymap, E = model._encode_inplace(model.key_encoder, E, W0), None
        keys = F.adaptive_avg_pool2d(keymap.reshape(1, -1, H0, W0), (h, w))
        del keymap
        k = model._keys(keys, condition)[0]                       # (heads, hw, dh)
        if E is None:
            E = model._image_encoding(image)
        qmap = model._encode_inplace(model.query_encoder, E, W0).reshape(-1, H0, W0)
        del E
        if qmap.shape[-2:] != (H, W):
            qmap = F.adaptive_avg_pool2d(qmap[None], (H, W))[0]
        d = qmap.shape[0]
        flat = qmap.reshape(d, H * W)
        mean, rstd = _full_stats(flat, 8, max(W, _ENCODER_CHUNK_PIXELS))
        for s in range(0, H * W, _ENCODER_CHUNK_PIXELS):
            flat[:, s:s + _ENCODER_CHUNK_PIXELS] = _apply_group_norm(
                flat[:, s:s + _ENCODER_CHUNK_PIXELS], mean, rstd, 8)
        _conv3x3_inplace(qmap, model.cross_decode.conv2d.weight, max(1, _ENCODER_CHUNK_PIXELS // W))
        return qmap.reshape(d, H * W), k

    @torch.no_grad()
    def upsample(self, image: torch.Tensor, lowres: torch.Tensor, out_size,
                 dtype: torch.dtype | None = None) -> Upsampled:
        """The :class:`~segbook.upsamplers.base.Upsampler` protocol, memory-bounded.

        Parameters
        ----------
        image : ``(3, H0, W0)`` in ``[0, 1]`` (the guidance).
        lowres : ``(C, h, w)`` tokens.
        out_size : ``(H, W)``.
        dtype : working dtype (default: the model's); float16/bfloat16 work.

        Returns
        -------
        Upsampled : features ``(C, H, W)`` (on the CPU) and ``A`` as a LazyAttention.
        """
        if image.ndim != 3 or lowres.ndim != 3:
            raise UpsamplerInputError(f"expected image (3, H0, W0) and lowres (C, h, w), got "
                                      f"{tuple(image.shape)} and {tuple(lowres.shape)}")
        H, W = self._check(image[None], lowres[None], out_size)
        device = self.rope.freqs.device
        work = dtype or self.rope.freqs.dtype
        model = self if work == self.rope.freqs.dtype else _cast_copy(self, work)
        feats = lowres[None].to(device=device, dtype=work)
        h, w = feats.shape[-2:]
        values, condition = model.values_and_condition(feats)
        H0, W0 = image.shape[-2:]
        cd = model.cross_decode
        if model.qk_dim * H0 * W0 * torch.finfo(work).bits // 8 <= _SMALL_BYTES:
            # a small image: the plain modules (the same arithmetic as the reference)
            E = model.rope(model.image_encoder(model._normalise(image[None].to(device, work))))
            keys = F.adaptive_avg_pool2d(model.key_encoder(E), (h, w))
            k = model._keys(keys, condition)[0]
            q = F.group_norm(F.adaptive_avg_pool2d(model.query_encoder(E), (H, W)), 8, eps=_GN_EPS)
            flat = cd.conv2d(q)[0].reshape(model.qk_dim, H * W)
            del E, q
        else:
            flat, k = model._queries_and_keys_inplace(image.to(work), condition, (H, W), (h, w))
        V = values[0].flatten(1).T.contiguous()                  # (hw, C)
        n_keys = h * w
        chunk_rows = min(H * W, max(1, self.chunk_elements // (self.num_heads * n_keys * 2) // W) * W)

        @torch.no_grad()
        def rows_fn(start, stop):
            q = flat[:, start:stop].T
            return cd.averaged_softmax(cd.project_q(q), k)

        att = LazyAttention(rows_fn, (H, W), (h, w), chunk=chunk_rows)
        C = V.shape[1]
        out = torch.empty(H * W, C, dtype=work)
        for start, stop, a in att.chunks():
            out[start:stop] = (a @ V).cpu()
        return Upsampled(out.T.reshape(C, H, W), att)

    # -- checkpoints --------------------------------------------------------------------------
    def load_official(self, state: dict, strict: bool = True) -> list[str]:
        """Load a state dict in JAFAR's official key layout (or this module's). Returns the
        ignored dead keys. Raises :class:`WidthMismatchError` for another backbone width."""
        mapped, ignored = official_to_segbook(state, self.qk_dim)
        key = "key_features_encoder.0.weight"
        if key in mapped and mapped[key].shape[1] != self.v_dim:
            raise WidthMismatchError(
                f"the checkpoint is for {mapped[key].shape[1]}-channel backbone tokens, this "
                f"upsampler expects {self.v_dim} (load it with v_dim={mapped[key].shape[1]} and "
                "the backbone it was trained on)")
        extra = {k for k in mapped if k not in self.state_dict()}
        missing = {k for k in self.state_dict() if k not in mapped}
        if strict and (extra or missing):
            raise CorruptFileError("<state dict>", f"checkpoint keys do not fit: missing "
                                   f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        self.load_state_dict(mapped, strict=strict)
        return ignored

    def num_live_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def _conv3x3_inplace(x: torch.Tensor, weight: torch.Tensor, rows: int) -> None:
    """``x <- conv3x3(x)`` (zero padding, no bias) for ``x`` ``(d, H, W)``, ``rows`` rows at a
    time, keeping only the input row above the block and the one below it."""
    d, H, W = x.shape
    above = x.new_zeros(d, 1, W)
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        below = x[:, r1:r1 + 1].clone() if r1 < H else x.new_zeros(d, 1, W)
        src = torch.cat([above, x[:, r0:r1], below], 1)
        above = x[:, r1 - 1:r1].clone()
        x[:, r0:r1] = F.conv2d(F.pad(src[None], (1, 1, 0, 0)), weight)[0]


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def official_to_segbook(state: dict, qk_dim: int = 128) -> tuple[dict, list[str]]:
    """Map JAFAR's official keys to this module's (see the module docstring); dead keys dropped.

    Returns ``(state dict, ignored keys)``. Keys already in segbook's layout pass through.
    """
    out, ignored = {}, []
    d = qk_dim
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in DEAD_KEYS:
            ignored.append(key)
        elif key.startswith(_ATTN + "norm_"):
            out["cross_decode." + key[len(_ATTN):]] = value
        elif key == _ATTN + "attention.q_proj_weight":
            out["cross_decode.q_proj.weight"] = value
        elif key == _ATTN + "attention.k_proj_weight":
            out["cross_decode.k_proj.weight"] = value
        elif key == _ATTN + "attention.in_proj_weight":
            out["cross_decode.q_proj.weight"] = value[:d]
            out["cross_decode.k_proj.weight"] = value[d:2 * d]
            ignored.append(key + "[2d:]")
        elif key == _ATTN + "attention.in_proj_bias":
            out["cross_decode.q_proj.bias"] = value[:d]
            out["cross_decode.k_proj.bias"] = value[d:2 * d]
            ignored.append(key + "[2d:]")
        elif key.startswith("cross_decode.conv2d") or not key.startswith(_ATTN):
            out[key] = value
        else:
            ignored.append(key)
    return out, ignored


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file (JAFAR's ``{"jafar": state}`` dict, segbook's training checkpoint
    ``{"model": state, ...}``, or a bare state dict). A truncated or unreadable file raises
    :class:`~segbook.errors.CorruptFileError` naming it."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/pickle errors of a damaged file
        raise CorruptFileError(path, f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); "
                               "the file is truncated or not a torch checkpoint - fetch or "
                               "train it again") from None
    if isinstance(obj, dict):
        for key in ("jafar", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    if not isinstance(obj, dict):
        raise CorruptFileError(path, f"{path} does not hold a state dict")
    return obj
