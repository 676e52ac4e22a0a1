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
  (the :class:`~segbook.upsamplers.base.Upsampler` protocol), memory-bounded: no gradient;
  for a large image every GroupNorm's statistics are computed once, in sequential passes over
  bands of guidance rows, and the pooled key map is accumulated band by band; then the queries
  of each band of output rows are *recomputed from the image* when needed (the guidance rows
  of their pooling windows through the encoders, plus the 3x3 conv's halo rows), and ``A`` is
  returned as a :class:`~segbook.upsamplers.base.LazyAttention` that recomputes its rows on
  demand the same way. No ``d_qk x H0 x W0`` or ``d_qk x H x W`` map is held: peak memory
  beyond the output is one chunk (an attention chunk or one band's encoder temporaries).

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
# Query pixels x heads x keys per attention chunk, in elements: 4 Mi floats = 16 MiB of logits
# (and as much for the softmax); a chunk is whole output rows when one row fits, else part of one.
_CHUNK_ELEMENTS = 1 << 22
# Pixels per band of the streamed encoders (16 Ki x 128 channels = 8 MiB a temporary).
_ENCODER_CHUNK_PIXELS = 1 << 14
_GN_EPS = 1e-5
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
# streamed encoders (inference): any band of rows recomputed from the image
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


def _pool_weights(out_rows: range, in_rows: range, n_in: int, n_out: int, like: torch.Tensor):
    """Weights ``(len(out_rows), len(in_rows))`` of adaptive average pooling ``n_in -> n_out``
    along one axis: output ``i`` averages inputs ``floor(i n_in / n_out) .. ceil((i+1) n_in / n_out)``."""
    i = torch.arange(out_rows.start, out_rows.stop, device=like.device)
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    g = torch.arange(in_rows.start, in_rows.stop, device=like.device)
    inside = (g[None] >= lo[:, None]) & (g[None] < hi[:, None])
    return inside.to(like.dtype) / (hi - lo)[:, None].to(like.dtype)


def _window(rows: range, n_in: int, n_out: int) -> range:
    """The input rows that adaptive pooling ``n_in -> n_out`` reads for the output ``rows``."""
    return range(rows.start * n_in // n_out, -((-rows.stop * n_in) // n_out))


class _StreamedEncoders:
    """JAFAR's encoders recomputed from the image for any band of rows (no gradient).

    Everything in the query/key path is per pixel except (a) the GroupNorms, which need
    whole-image statistics, (b) the adaptive average pooling, whose output rows read windows of
    guidance rows, (c) the image encoder's first conv (``k x k``, reflect padding) and the
    queries' 3x3 conv (one halo row each side). So the statistics of every GroupNorm are
    computed once here, layer after layer, in sequential passes over bands of guidance rows
    (a pass recomputes the encoders up to the first layer whose statistics are still unknown),
    and stored: two floats per group and layer. The pooled key map ``(d, h, w)`` is accumulated
    band by band in the last pass. After that :meth:`query_rows` makes the conv'd queries of any
    band of output rows from the image alone, so no ``d x H0 x W0`` (or ``d x H x W``) map is
    ever held: peak memory is one band's temporaries (about ``_ENCODER_CHUNK_PIXELS`` pixels x
    ``d`` channels each).
    """

    def __init__(self, model: JAFAR, image: torch.Tensor, out_size, grid):
        for enc in (model.key_encoder, model.query_encoder):
            if enc[0].weight.shape[-1] != 1:
                raise ValueError("the key/query encoders' first conv must be 1x1")
        self.model = model
        self.H0, self.W0 = image.shape[-2:]
        (self.H, self.W), (self.h, self.w) = out_size, grid
        x = model._normalise(image[None].to(model.mean.device, model.rope.freqs.dtype))
        self.pad = model.image_encoder[0].kernel_size[0] // 2
        # the first conv's reflect padding, done once on the (3-channel) image
        self.image = F.pad(x, (self.pad,) * 4, mode="reflect") if self.pad else x
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        names = [f"{p}.{i}.{j}" for p, enc in (("image", model.image_encoder),
                                               ("query", model.query_encoder),
                                               ("key", model.key_encoder))
                 for i in range(len(enc) - 1) for j in (1, 2)]
        band = max(1, _ENCODER_CHUNK_PIXELS // self.W0)   # guidance rows per band
        while not self.stats.keys() >= set(names):        # one pass per layer depth
            acc: dict = {}
            for g0 in range(0, self.H0, band):
                E = self._trunk(range(g0, min(self.H0, g0 + band)), acc)
                if E is not None:
                    self._branch("query", model.query_encoder, E, acc)
                    self._branch("key", model.key_encoder, E, acc)
            self.stats.update({k: _group_stats(*v) for k, v in acc.items()})
        self.keys = self._final_pass()

    # -- one band of rows through the encoders ------------------------------------------------
    def _norm(self, name, x, gn: nn.GroupNorm | None, acc, groups=8):
        """GroupNorm ``name`` of ``x`` ``(C, n)`` with the stored statistics; while they are
        unknown, accumulate ``x`` into ``acc`` and return None (the pass stops there)."""
        if name in self.stats:
            mean, rstd = self.stats[name]
            return _apply_group_norm(x, mean, rstd, groups, *((gn.weight, gn.bias) if gn else ()))
        if acc is not None:
            if name not in acc:
                acc[name] = [torch.zeros(groups, dtype=torch.float64, device=x.device),
                             torch.zeros(groups, dtype=torch.float64, device=x.device), 0]
            _accumulate(acc[name], x, groups)
            acc[name][2] += (x.shape[0] // groups) * x.shape[1]
        return None

    def _blocks(self, prefix, encoder, x, acc):
        for i, block in enumerate(list(encoder)[1:]):
            a = self._norm(f"{prefix}.{i}.1", x, block.norm1, acc, block.norm1.num_groups)
            if a is None:
                return None
            h = _pointwise(block.conv1, F.silu(a, inplace=True))
            b = self._norm(f"{prefix}.{i}.2", h, block.norm2, acc, block.norm2.num_groups)
            if b is None:
                return None
            x = x + _pointwise(block.conv2, F.silu(b, inplace=True))
        return x

    def _trunk(self, rows: range, acc=None):
        """``rope(image_encoder(image))`` of guidance ``rows`` as ``(d, n rows x W0)``."""
        m = self.model
        src = self.image[:, :, rows.start: rows.stop + 2 * self.pad]
        x = F.conv2d(src, m.image_encoder[0].weight.to(src.dtype))[0].flatten(1)
        x = self._blocks("image", m.image_encoder, x, acc)
        if x is None:
            return None
        return m.rope.apply(x[None], m.rope.angles(self.H0, self.W0, slice(rows.start, rows.stop),
                                                   device=x.device))[0]

    def _branch(self, prefix, encoder, E, acc=None):
        return self._blocks(prefix, encoder, _pointwise(encoder[0], E), acc)

    def _pooled_queries(self, rows: range):
        """``adaptive_avg_pool(query_encoder(E), (H, W))`` of output ``rows`` ``(d, n, W)``: the
        guidance rows of their pooling windows are recomputed; also returns ``E`` of them."""
        g = _window(rows, self.H0, self.H)
        E = self._trunk(g)
        q = self._branch("query", self.model.query_encoder, E).reshape(-1, len(g), self.W0)
        q = F.adaptive_avg_pool2d(q[None], (len(g), self.W))[0]          # columns
        return torch.einsum("ig,dgw->diw", _pool_weights(rows, g, self.H0, self.H, q), q), E, g

    def _final_pass(self):
        """Statistics of the pooled queries' GroupNorm and the pooled key map, band by band."""
        m, W0 = self.model, self.W0
        band = max(1, _ENCODER_CHUNK_PIXELS // max(self.W, self.W0 * -(-self.H0 // self.H)))
        acc: dict = {}
        keys = None
        for r0 in range(0, self.H, band):
            rows = range(r0, min(self.H, r0 + band))
            q, E, g = self._pooled_queries(rows)
            self._norm("pooled", q.reshape(q.shape[0], -1), None, acc)
            # each guidance row goes to the keys once: the band's own rows
            own = range(rows.start * self.H0 // self.H,
                        self.H0 if rows.stop == self.H else rows.stop * self.H0 // self.H)
            if not len(own):
                continue
            E = E[:, (own.start - g.start) * W0: (own.stop - g.start) * W0]
            k = self._branch("key", m.key_encoder, E).reshape(-1, len(own), W0)
            k = F.adaptive_avg_pool2d(k[None], (len(own), self.w))[0]     # columns
            part = torch.einsum("ig,dgw->diw", _pool_weights(range(self.h), own, self.H0, self.h, k), k)
            keys = part if keys is None else keys.add_(part)
        self.stats.update({k: _group_stats(*v) for k, v in acc.items()})
        return keys

    def query_rows(self, rows: range) -> torch.Tensor:
        """The conv'd queries ``(d, len(rows) W)`` of output ``rows``: pooled queries of the rows
        and one halo row each side, GroupNorm (stored statistics), 3x3 conv (zero padding)."""
        halo = range(max(0, rows.start - 1), min(self.H, rows.stop + 1))
        q, _, _ = self._pooled_queries(halo)
        d = q.shape[0]
        q = self._norm("pooled", q.reshape(d, -1), None, None).reshape(d, len(halo), self.W)
        q = F.pad(q, (1, 1, int(halo.start == rows.start), int(halo.stop == rows.stop)))
        return F.conv2d(q[None], self.model.cross_decode.conv2d.weight.to(q.dtype))[0].reshape(d, -1)


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

            def queries(start, stop):
                return flat[:, start:stop].T
        else:
            # a large image: nothing image-sized is kept; the queries of each band of output
            # rows are recomputed from the image when asked for (see _StreamedEncoders)
            stream = _StreamedEncoders(model, image.to(work), (H, W), (h, w))
            k = model._keys(stream.keys[None], condition)[0]
            band = max(1, _ENCODER_CHUNK_PIXELS // W)     # output rows of queries made at once
            cache = {"rows": range(0), "q": None}

            def queries(start, stop):
                """Conv'd query tokens ``(stop - start, d)``; the band of output rows holding
                them is recomputed unless it is the last one made (chunks come in order)."""
                need = range(start // W, (stop - 1) // W + 1)
                have = cache["rows"]
                if not (have.start <= need.start and need.stop <= have.stop):
                    have = range(need.start, min(H, max(need.stop, need.start + band)))
                    cache["rows"], cache["q"] = have, None     # drop the old band first
                    cache["q"] = stream.query_rows(have)
                off = have.start * W
                return cache["q"][:, start - off:stop - off].T
        V = values[0].flatten(1).T.contiguous()                  # (hw, C)
        n_keys = h * w
        # query pixels per attention chunk: whole output rows when a row fits in chunk_elements,
        # else part of a row (at 64 x 64 keys one row's logits alone would be 64 MiB)
        chunk_rows = max(1, self.chunk_elements // (self.num_heads * n_keys * 2))
        chunk_rows = min(H * W, chunk_rows // W * W if chunk_rows >= W else chunk_rows)

        @torch.no_grad()
        def rows_fn(start, stop):
            return cd.averaged_softmax(cd.project_q(queries(start, stop)), k)

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
