"""CAFE stages 1 and 2: cross-resolution seeding and attention-guided grouping (paper 3, sec. 3.2).

EASe's training-free grouper (Singh et al., *Excite, Attend and Segment*, section 3.2; chapter
04) reads an upsampler's high-resolution features ``F_hr`` (``C x H x W``), the low-resolution
tokens ``F_lr`` (``C x h x w``) and the upsampler's attention ``A`` (``H W x h w``, rows sum to
one), which it never forms: only ``A.argmax()`` and ``A @ G`` (chunk by chunk) are used.

Stage 1, *Cue Discovery via Cross-Resolution Seeding* (:func:`cross_resolution_seeding`)
    Dictionary ``D``: for every token ``j`` the high-resolution feature most cosine-similar to
    it. Quantiser ``Q(.) = D[argmax(.)]``; attention clusters ``R = Q(A)`` (each pixel gets the
    prototype of its argmax token), semantic clusters ``S = Q(cos(F_hr, D))`` (each pixel its
    nearest prototype). The merge operator ``U(S, R, D, tau)`` (:func:`merge_operator`)
    cross-tabulates ``S`` against ``R``, gives each semantic cluster its dominant attention
    group, merges prototypes of one group whose cosine exceeds ``tau = 0.97`` (union-find, so
    merges are transitive) by averaging, and drops prototypes no pixel chose under ``S``.
    Iterated while the dictionary shrinks, at most ``T = 5`` times (supp. Table 1; the text's
    stopping rule "until |D'| > |D|" is garbled, we stop when ``|D'| >= |D|``).
Stage 2, *Attention-Guided Grouping* (:func:`attention_guided_grouping`)
    ``G`` one-hot token -> nearest prototype of ``D'``; ``A^G = A G`` (``H W x K'``); label
    ``y_i = argmin_k alpha (1 - f_i^T d_k) + beta (1 - A^G_ik)`` (eq. 3-4, ``alpha = 0.75``,
    ``beta = 0.25``), then edge refinement (:func:`edge_refinement`), whose constants the paper
    does not give (our defaults are named parameters).

Matrix products. The floor of both stages is the pixel-by-prototype cosine (``H W x K x C``
multiply-adds per pass). ``precision="auto"`` computes it in bfloat16 where that is fast (CUDA,
or a CPU with AMX) and recomputes in float32 every pixel whose best two bfloat16 scores are
closer than their bfloat16 errors allow to tell apart (:func:`bf16_error`),
so the labels are those of the float32 computation (up to float32 rounding, and except with
negligible probability); ``"float32"`` computes everything in
float32; ``"bfloat16_unchecked"`` skips the re-check (faster; labels may differ where two
prototypes are within about 0.01 in cosine).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segbook.errors import GraphError
from segbook.groupers import cafe_native

__all__ = [
    "AGGResult",
    "CRSResult",
    "PixelFeatures",
    "attention_guided_grouping",
    "cross_resolution_seeding",
    "edge_refinement",
    "feature_gradient",
    "kmeans_pp",
    "merge_operator",
    "nearest_prototype",
    "pooled_attention",
]

# Pixels per chunk of every pass over the features: a chunk's scores against 1200 prototypes
# (about 10 MB in bfloat16) are read once by the compiled reductions; products of 4096 rows run
# closer to the machine's matrix rate than 2048 (at 1024 channels, 2 threads, the three passes
# took 1.50 s instead of 1.71), while 8192 was no faster and made the torch fallback's
# float32 conversions 5x slower per pixel (benchmarks/cafe.py, primitives row).
CHUNK = 4096
# Fewer prototypes than this: float32 products (cheap) instead of bfloat16 + re-checks.
FAST_MIN_K = 64
# How far a bfloat16 score can be from the float32 one. bfloat16 keeps 8 significant bits (unit
# roundoff u = 2^-8). Rounding the product to bfloat16 moves a score s by at most u |s|,
# whatever the data. Rounding the inputs moves a product of vectors of norm <= 1 by at most
# 2u = 0.0078 only if all C rounding errors align; they are independent, so in practice by a
# sum of C small terms, standard deviation about u sqrt(2 / (3 C)) (1.6e-4 at C = 320, 0.9e-4
# at C = 1024; the benchmark's largest over 6.6 million pairs: 0.0011 and 0.0007). We take
# 13 standard deviations, and never more than 2u: e0 = min(2u, 13 u sqrt(2 / (3 C))) (0.0023 at
# C = 320, 0.0078 for C <= 30). So a swap of two scores goes unnoticed only with negligible
# probability at large C, never at small C.
_ROUNDOFF = 2.0 ** -8
# The passes' bfloat16 rows carry a column of ones that the prototypes meet with -OFFSET: the
# products come out as s - OFFSET, near zero for the close prototypes that decide a pixel, so
# their rounding (u |s - OFFSET|) is several times smaller than u |s| and far fewer pixels
# need a float32 re-check (18% instead of 38% in the benchmark).
OFFSET = 0.875                       # exact in bfloat16


def bf16_error(C: int) -> tuple[float, float]:
    """``(e0, e1)``: a bfloat16 product ``s`` of vectors of ``C`` channels and norm at most one
    is within ``e0 + e1 |s|`` of the float32 product (see the comment above)."""
    e0 = min(2 * _ROUNDOFF, 13 * _ROUNDOFF * (2 / (3 * max(int(C), 1))) ** 0.5)
    return e0, _ROUNDOFF


def fixed_margin(C: int) -> float:
    """Two scores of at most one in magnitude, not offset, computed in bfloat16 can swap only
    when closer than this: ``2 (e0 + e1)`` (0.0124 at ``C = 320``)."""
    e0, e1 = bf16_error(C)
    return 2 * (e0 + e1)


@functools.lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return "amx_bf16" in fh.read(1 << 16)
    except OSError:
        return False


PRECISIONS = ("auto", "float32", "bfloat16", "bfloat16_unchecked")


def _fast_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return torch.float32
    if precision.startswith("bfloat16"):
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" or _cpu_has_amx() else torch.float32


def _flat(features: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` -> ``(C, N)`` view."""
    if features.ndim != 3:
        raise GraphError(f"features must be (C, H, W), got {tuple(features.shape)}")
    return features.reshape(features.shape[0], -1)


def check_finite(x: torch.Tensor, what: str) -> None:
    # a NaN or Inf makes the sum non-finite; a finite sum of finite values is the common case
    # and costs one reduction (an overflowing sum falls back to the elementwise test)
    if bool(torch.isfinite(x.sum())):
        return
    if not torch.isfinite(x).all():
        raise GraphError(f"{what} contain NaN or Inf: CAFE needs finite features (check the "
                         "backbone and the upsampler's output)")


def native_available(native: bool | None = None) -> bool:
    """Whether CAFE's passes use the compiled reductions: ``native`` True/False forces the
    choice (True raises when they cannot be built), None uses them when available."""
    if native is False:
        return False
    ok = cafe_native.available()
    if native and not ok:
        raise RuntimeError("CAFE's compiled kernels are unavailable (no C++ compiler, or "
                           "SEGBOOK_NATIVE=0); pass native=None to fall back to torch")
    return ok


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # a zero feature vector has no direction: it stays zero (cosine 0 with everything)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class PixelFeatures:
    """The flat features ``(C, N)`` prepared once for the repeated pixel-by-prototype passes:
    the pixels' inverse norms ``inv_norm`` ``(N,)`` and, with a bfloat16 ``precision``, a
    contiguous ``(N, C)`` bfloat16 copy of the unit rows (half the size of the float32 feature
    map); float32 unit rows are recomputed from ``features`` chunk by chunk (and for the few
    pixels re-checked).

    ``native``: the compiled reductions of :mod:`segbook.groupers.cafe_native` are used
    (a CPU, float32 contiguous features and a working compiler); ``native=False`` forces the
    torch code (same labels up to float32 rounding)."""

    def __init__(self, features: torch.Tensor, precision: str = "auto", device=None,
                 chunk: int = CHUNK, native: bool | None = None):
        if isinstance(features, PixelFeatures):
            raise TypeError("already prepared")
        self.X = _flat(features)
        self.shape = tuple(features.shape)
        self.device = torch.device(device) if device is not None else self.X.device
        self.dt = _fast_dtype(precision, self.device)
        self.check = precision != "bfloat16_unchecked"
        self.chunk = int(chunk)
        self.N = self.X.shape[1]
        can = (self.device.type == "cpu" and self.X.device.type == "cpu"
               and self.X.dtype == torch.float32 and self.X.is_contiguous())
        if native and not can:
            raise ValueError("native=True needs float32 contiguous features on the CPU")
        self.native = can and native_available(native)
        self.fast = None
        self._chunk_key, self._chunk_rows = None, None
        C = self.X.shape[0]
        # the compiled passes' rows carry the offset column (see OFFSET), padded to 32 columns
        self.width = -(-(C + 1) // 32) * 32 if self.native and self.dt != torch.float32 else C
        self.margin = fixed_margin(C)
        if self.native:
            self.inv_norm, self.fast = cafe_native.unit_rows(
                self.X, self.dt == torch.bfloat16, self.width)
            return
        self.inv_norm = torch.empty(self.N, dtype=torch.float32, device=self.device)
        step = 16384
        for s in range(0, self.N, step):
            x = self.X[:, s:s + step].to(device=self.device, dtype=torch.float32)
            self.inv_norm[s:s + step] = x.square().sum(0)
        self.inv_norm.sqrt_().clamp_min_(1e-12).reciprocal_()
        if self.dt != torch.float32:
            self.fast = torch.empty(self.N, self.X.shape[0], dtype=self.dt, device=self.device)
            # narrow chunks: a transposed copy of a wide one thrashes the cache
            for s in range(0, self.N, 256):
                e = min(self.N, s + 256)
                x = self.X[:, s:e].to(device=self.device, dtype=torch.float32)
                self.fast[s:e] = (x * self.inv_norm[s:e]).T

    def exact(self, s: int, e: int) -> torch.Tensor:
        """float32 unit rows ``s:e`` ``(e - s, C)``."""
        return _unit_rows(self.X[:, s:e].T.to(device=self.device, dtype=torch.float32))

    def exact_index(self, idx: torch.Tensor) -> torch.Tensor:
        return _unit_rows(self.X[:, idx.cpu()].T.to(device=self.device, dtype=torch.float32))

    def exact_in_chunk(self, s: int, e: int, i: torch.Tensor) -> torch.Tensor:
        """float32 unit rows ``s + i`` of chunk ``s:e``: the chunk's rows are made once (a
        contiguous slice of ``features``) and kept until another chunk is asked for, which is
        cheaper than gathering scattered columns when many rows of a chunk are re-checked."""
        if self._chunk_key != (s, e):
            self._chunk_key, self._chunk_rows = (s, e), self.exact(s, e)
        return self._chunk_rows[i.to(self._chunk_rows.device)]

    def use_fast(self, K: int) -> bool:
        """bfloat16 products against ``K`` prototypes: only when there is a bfloat16 copy and
        ``K`` is large enough (``FAST_MIN_K``) for the products, not the float32 re-checks,
        to dominate."""
        return self.fast is not None and K >= FAST_MIN_K

    def lowp(self, D: torch.Tensor) -> torch.Tensor:
        """Prototypes ``D`` ``(K, C)`` as the bfloat16 operand of a pass over ``fast``: with
        the offset column, ``-OFFSET`` there (zeros in the padding), so that the products come
        out as ``<x, d> - OFFSET``."""
        C = self.shape[0]
        out = torch.zeros(D.shape[0], self.width, dtype=self.dt, device=self.device)
        out[:, :C] = D.to(self.device, self.dt)
        if self.width > C:
            out[:, C] = -OFFSET
        return out

    def chunks(self, fast: bool = True, rows: bool = True):
        """Yield ``(start, stop, rows)``: bfloat16 rows from the copy (``fast`` and a copy
        exists), else float32 rows (``rows=False``: None, only the bounds)."""
        for s in range(0, self.N, self.chunk):
            e = min(self.N, s + self.chunk)
            if not rows:
                yield s, e, None
            else:
                yield s, e, (self.fast[s:e] if fast and self.fast is not None
                             else self.exact(s, e))


def _prepare(features, precision, device) -> PixelFeatures:
    return features if isinstance(features, PixelFeatures) else PixelFeatures(
        features, precision, device)


def _best_with_check(fast: torch.Tensor, exact_fn, exact_cols_fn=None,
                     check: bool = True, margin: float = fixed_margin(320)) -> torch.Tensor:
    """Argmax of the rows of ``fast`` (bfloat16 scores, or float32 ones made from bfloat16
    products). With ``check``, rows whose two best scores are within ``margin`` are
    recomputed in float32: against their 4 best candidates (``exact_cols_fn(rows, cols) ->
    (rows, 4)``) when the 5th is clearly worse, else against every column (``exact_fn(rows) ->
    (rows, K)``). ``fast`` may be overwritten.

    The two best scores come from a float32 row maximum, the winner masked out in place and a
    second maximum (cheaper here than ``topk(2)``, benchmarks/cafe.py)."""
    K = fast.shape[1]
    if K == 1:
        return torch.zeros(fast.shape[0], dtype=torch.long, device=fast.device)
    if not check:
        return fast.max(dim=1).indices
    scores = fast if fast.dtype == torch.float32 else fast.float()
    first, best = scores.max(dim=1)
    scores.scatter_(1, best[:, None], float("-inf"))
    amb = (first - scores.amax(dim=1)) < margin
    if amb.any():
        idx = amb.nonzero().squeeze(1)
        i_all = idx
        if exact_cols_fn is not None and K >= 5:
            # the winner plus the 4 best of the rest (the winner is masked in ``scores``)
            rest = scores[idx].topk(4, dim=1)
            few = (first[idx] - rest.values[:, 3]) >= margin
            i_few, i_all = idx[few], idx[~few]
            if len(i_few):
                cols = torch.cat([best[i_few, None], rest.indices[few, :3]], dim=1)
                best[i_few] = cols.gather(1, exact_cols_fn(i_few, cols).argmax(dim=1,
                                                                              keepdim=True))[:, 0]
        if len(i_all):
            best[i_all] = exact_fn(i_all).argmax(dim=1)
    return best


def _native_best(P: PixelFeatures, s: int, scores: torch.Tensor, D: torch.Tensor,
                 attention=None, plan=None, alpha: float = 1.0, beta: float = 0.0,
                 bias=None, check: bool = True) -> torch.Tensor:
    """The compiled counterpart of :func:`_best_with_check` for pixels ``s:s + len(scores)``:
    the best column of ``alpha scores + beta A G + bias`` per row, and with bfloat16 scores
    (and ``check``), in rows where the two best are closer than their errors
    (:func:`bf16_error`), every column that could be the best rescored in float32 against
    ``D`` (float32 ``(K, C)``)."""
    check = check and P.check and scores.dtype == torch.bfloat16
    error = bf16_error(P.shape[0])
    best, amb = cafe_native.best_rows(scores, attention, plan, alpha, beta, bias,
                                      error if check else None)
    if check and bool(amb.any()):
        rows = amb.nonzero().squeeze(1)
        x = cafe_native.gather_rows(P.X, s, rows)
        cafe_native.recheck_rows(scores, rows, x, P.inv_norm[s + rows], D, best, attention,
                                 plan, alpha, beta, bias, error)
    return best


def nearest_prototype(features, D: torch.Tensor, precision: str = "auto",
                      device=None) -> torch.Tensor:
    """``S = argmax_k cos(f_i, d_k)`` for every pixel: ``(N,)`` long (the semantic clusters of
    stage 1). ``features`` ``(C, H, W)`` (or prepared :class:`PixelFeatures`); ``D``
    ``(K, C)``."""
    P = _prepare(features, precision, device)
    Dn = _unit_rows(D.to(P.device, torch.float32)).contiguous()
    Df = P.lowp(Dn)
    K = Dn.shape[0]
    out = torch.empty(P.N, dtype=torch.long)
    for s, e, x in P.chunks(fast=P.use_fast(K)):
        if P.native:
            out[s:e] = _native_best(P, s, x @ (Df if P.use_fast(K) else Dn).T, Dn)
            continue
        if not P.use_fast(K):
            out[s:e] = (x @ Dn.T).max(dim=1).indices.cpu()
            continue
        out[s:e] = _best_with_check(
            x @ Df.T, lambda i, s=s, e=e: P.exact_in_chunk(s, e, i) @ Dn.T,
            lambda i, c, s=s, e=e: torch.einsum("rc,rkc->rk", P.exact_in_chunk(s, e, i), Dn[c]),
            P.check, P.margin).cpu()
    return out


# Rows per block of the seeding's bfloat16 column maxima: the float32 rescoring reads only the
# blocks whose maximum is close enough to a token's best (within two bfloat16 errors).
SEED_BLOCK = 256


def _token_nearest_pixel(features, tokens: torch.Tensor, precision: str,
                         device) -> torch.Tensor:
    """For every token (row of ``tokens`` ``(n, C)``) the index of the most cosine-similar
    pixel in float32 (the lowest index on a tie), whatever the chunking.

    With bfloat16 products, one pass keeps the best bfloat16 score per token in each block of
    ``SEED_BLOCK`` pixels; a pixel whose float32 score is the best lies within the errors of
    two bfloat16 scores (:func:`bf16_error`) of the token's best bfloat16 score, so only the
    blocks whose best is that close are rescored in float32, and only for the tokens concerned (a few blocks per token
    on smooth features; every block on a constant image, which costs one float32 pass).
    Float32 scores are ``<t, x> / |x|`` for unit tokens ``t``, from the channel-first features
    as they are."""
    P = _prepare(features, precision, device)
    T = _unit_rows(tokens.to(P.device, torch.float32))
    n = T.shape[0]
    block = SEED_BLOCK if P.fast is not None else P.chunk
    # blocks of each chunk (as the column maxima are taken)
    ranges = [(i, min(e, i + block)) for s, e, _ in P.chunks(fast=False, rows=False)
              for i in range(s, e, block)]
    if P.fast is not None:
        Tf = P.lowp(T)
        top = []
        for s, e, x in P.chunks():
            scores = x @ Tf.T
            if P.native:
                top.append(cafe_native.block_col_max(scores, block))
            else:
                top += [scores[i:i + block].amax(dim=0).float()[None]
                        for i in range(0, e - s, block)]
        top = torch.cat(top)
        best = top.amax(dim=0)
        # the best pixel's score b and the best score M: b >= M - e(M) - e(b), with
        # |b| <= |M| + margin; 1% covers that second-order term
        e0, e1 = bf16_error(P.shape[0])
        cand = top >= best - 1.01 * (2 * e0 + 2 * e1 * best.abs())
    else:
        cand = torch.ones(len(ranges), n, dtype=torch.bool, device=P.device)
    best_val = torch.full((n,), -np.inf, device=P.device)
    best_idx = torch.zeros(n, dtype=torch.long, device=P.device)
    for (s, e), c in zip(ranges, cand):
        J = c.nonzero().squeeze(1)
        if len(J) == 0:
            continue
        x = P.X[:, s:e].to(device=P.device, dtype=torch.float32)
        v, i = (T[J] @ x).mul_(P.inv_norm[s:e]).max(dim=1)
        better = v > best_val[J]
        best_val[J] = torch.where(better, v, best_val[J])
        best_idx[J] = torch.where(better, i + s, best_idx[J])
    return best_idx.cpu()


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller id is the root: results do not depend on the order of unions
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def merge_operator(S: torch.Tensor, R: torch.Tensor, D: torch.Tensor, tau: float = 0.97,
                   average: str = "mean"):
    """``U(S, R, D, tau)`` of stage 1 (sec. 3.2): returns ``(D', old -> new map)``.

    ``S``, ``R``: ``(N,)`` prototype ids (semantic and attention clusters) in ``0..K-1``;
    ``D``: ``(K, C)`` unit prototypes. Each semantic cluster goes to its dominant attention
    group (the ``R`` value most of its pixels have; ties to the lowest id); inside a group,
    prototypes with cosine ``> tau`` are merged (union-find, transitive); prototypes no pixel
    chose under ``S`` are dropped (map value -1). ``average``: ``"mean"`` (default, the text's
    "by averaging") or ``"weighted"`` (by pixel counts under ``S``; unstated in the paper).
    Merged prototypes are renormalised to unit length. New ids follow the smallest old id.
    """
    K = D.shape[0]
    T = torch.bincount(S * K + R, minlength=K * K).reshape(K, K)
    count = T.sum(dim=1)
    alive = count > 0
    group = T.argmax(dim=1)
    Dn = _unit_rows(D.double())
    # cosines only for the pairs that could merge (one group, both alive): a few, not K^2
    same = (group[:, None] == group[None, :]) & alive[:, None] & alive[None, :]
    i, j = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    cos = (Dn[i] * Dn[j]).sum(dim=1)
    uf = _UnionFind(K)
    for a, b in zip(i[cos > tau].tolist(), j[cos > tau].tolist()):
        uf.union(a, b)
    roots = torch.tensor([uf.find(k) for k in range(K)])
    keep = sorted({int(r) for r, a in zip(roots.tolist(), alive.tolist()) if a})
    new_id = {r: i for i, r in enumerate(keep)}
    mapping = torch.tensor([new_id[int(r)] if bool(alive[k]) else -1
                            for k, r in enumerate(roots.tolist())], dtype=torch.long)
    if average not in ("mean", "weighted"):
        raise ValueError(f"average must be 'mean' or 'weighted', got {average!r}")
    w = torch.where(alive, count.double() if average == "weighted" else torch.ones(K,
                    dtype=torch.float64), torch.zeros(K, dtype=torch.float64))
    Dnew = torch.zeros(len(keep), D.shape[1], dtype=torch.float64)
    sel = mapping >= 0
    Dnew.index_add_(0, mapping[sel], Dn[sel] * w[sel, None])
    return _unit_rows(Dnew).to(D.dtype), mapping


@dataclass
class CRSResult:
    """Stage 1's output: unit prototypes ``D`` ``(K', C)``, the token -> prototype map kept
    through the merges, the dictionary size after each application of ``U`` and the index of
    the pixel each initial prototype was taken from."""

    D: torch.Tensor
    token_to_prototype: torch.Tensor
    sizes: list
    seed_pixels: torch.Tensor


def cross_resolution_seeding(features, lowres: torch.Tensor, attention,
                             tau: float = 0.97, iterations: int = 5, average: str = "mean",
                             precision: str = "auto", device=None,
                             token_argmax: torch.Tensor | None = None) -> CRSResult:
    """Stage 1 of CAFE (sec. 3.2, "Cue Discovery via Cross-Resolution Seeding").

    Parameters
    ----------
    features : ``F_hr`` ``(C, H, W)``.
    lowres : ``F_lr`` ``(C, h, w)`` (the tokens the upsampler mixed; which of ``F_lr`` and the
        SE-gated tokens the paper compares is unstated, pass either).
    attention : a :class:`~segbook.upsamplers.LazyAttention` (only ``argmax()`` is read here).
    tau : prototype merge threshold (0.97, supp. Table 1).
    iterations : at most ``T`` applications of the merge operator (5); stops earlier when the
        dictionary stops shrinking.
    average : how merged prototypes are averaged (:func:`merge_operator`).
    token_argmax : ``(H, W)`` argmax tokens if already computed.

    Returns
    -------
    :class:`CRSResult`. Tokens keep the prototype they seeded; when prototypes merge the
    tokens follow (the paper does not say how ``R`` is defined after merges); a token whose
    prototype is dropped goes to the surviving prototype most similar to the dropped one.
    """
    shape = features.shape
    C = shape[0]
    if lowres.ndim != 3 or lowres.shape[0] != C:
        raise GraphError(f"lowres must be (C={C}, h, w), got {tuple(lowres.shape)}")
    tokens = lowres.reshape(C, -1).T
    n = tokens.shape[0]
    if attention.shape != (shape[1] * shape[2], n):
        raise GraphError(f"attention is {attention.shape}, expected (H W, h w) = "
                         f"({shape[1] * shape[2]}, {n})")
    P = _prepare(features, precision, device)
    seed_pix = _token_nearest_pixel(P, tokens, precision, device)
    D = P.exact_index(seed_pix).cpu()
    tok2proto = torch.arange(n)
    arg = (attention.argmax() if token_argmax is None else token_argmax).reshape(-1)
    sizes = [D.shape[0]]
    for _ in range(int(iterations)):
        S = nearest_prototype(P, D, precision, device)
        R = tok2proto[arg]
        Dnew, mapping = merge_operator(S, R, D, tau, average)
        new_tok = mapping[tok2proto]
        dropped = new_tok < 0
        if dropped.any():
            nearest = (_unit_rows(D[tok2proto[dropped]]) @ Dnew.T).argmax(dim=1)
            new_tok[dropped] = nearest
        shrunk = Dnew.shape[0] < D.shape[0]
        D, tok2proto = Dnew, new_tok
        sizes.append(D.shape[0])
        if not shrunk:
            break
    return CRSResult(D=D, token_to_prototype=tok2proto, sizes=sizes, seed_pixels=seed_pix)


def pooled_attention(attention, token_to_group: torch.Tensor, K: int,
                     how: str = "chunks"):
    """``A^G = A G`` with ``G`` the one-hot ``(n_tokens, K)`` matrix of ``token_to_group``.

    ``how="chunks"`` (default) yields ``(start, stop, A^G rows)`` chunk by chunk, each chunk a
    column scatter-add of the attention rows (``n`` additions per pixel instead of ``n K``
    multiply-adds, same values up to summation order); ``"matmul"`` calls
    ``attention.matmul(G)`` once (``H W x K`` floats held at once) and yields it as one chunk.
    The full ``A`` is never formed either way.
    """
    idx = token_to_group.long()
    if how == "matmul" or not hasattr(attention, "chunks"):
        G = F.one_hot(idx, K).float()
        yield 0, attention.shape[0], attention.matmul(G)
        return
    if how != "chunks":
        raise ValueError(f"how must be 'chunks' or 'matmul', got {how!r}")
    for s, e, a in attention.chunks():
        out = torch.zeros(e - s, K, dtype=a.dtype, device=a.device)
        out.index_add_(1, idx.to(a.device), a)
        yield s, e, out


def check_attention_rows(attention, renormalise: bool, atol: float = 1e-3):
    """Wrap ``attention`` so that every chunk read is checked (finite, non-negative, rows sum
    to one within ``atol``) or, with ``renormalise=True``, divided by its row sums (rows that
    sum to zero become uniform)."""
    return _CheckedAttention(attention, renormalise, atol)


class _CheckedAttention:
    def __init__(self, inner, renormalise, atol):
        self.inner, self.renormalise, self.atol = inner, bool(renormalise), float(atol)
        self._checked = False
        self.shape = inner.shape
        self.out_size, self.grid = inner.out_size, inner.grid

    def _validate(self, sums: torch.Tensor, minimum: float) -> None:
        # a NaN or Inf anywhere in a row makes its sum non-finite: one reduction checks both
        if not bool(torch.isfinite(sums).all()):
            raise GraphError("the attention contains NaN or Inf")
        if minimum < 0:
            raise GraphError("the attention has negative entries; CAFE needs row-stochastic "
                             "attention (a softmax over tokens)")
        if self.renormalise:
            return
        bad = (sums - 1).abs() > self.atol
        if bool(bad.any()):
            worst = float(sums[bad].sub(1).abs().max())
            raise GraphError(f"attention rows must sum to one (a softmax over tokens); "
                             f"{int(bad.sum())} rows of a chunk are off by up to {worst:.3g}. "
                             "Pass renormalise_attention=True to divide rows by their sums")

    def _fix(self, a: torch.Tensor) -> torch.Tensor:
        sums = a.sum(dim=1, keepdim=True)
        self._validate(sums, float(a.amin()))
        if self.renormalise:
            if bool((sums > 0).all()):
                return a / sums
            uniform = torch.full_like(a, 1.0 / a.shape[1])
            return torch.where(sums > 0, a / sums.clamp_min(1e-30), uniform)
        return a

    def chunks(self):
        # rows are recomputed the same way on every pass: once a whole pass has been checked,
        # later passes are not checked again (renormalising still divides every pass)
        if self._checked and not self.renormalise:
            yield from self.inner.chunks()
            return
        for s, e, a in self.inner.chunks():
            yield s, e, self._fix(a)
        self._checked = True

    def argmax(self):
        """The argmax token of every pixel ``(H, W)``. Renormalising rows does not move their
        argmax (a zero row's is token 0 either way), so the compiled pass reads the raw rows,
        checking them on the first pass as :meth:`chunks` does."""
        out = torch.empty(self.shape[0], dtype=torch.long)
        fast, check = native_available(), not self._checked
        for s, e, a in self.inner.chunks():
            if fast and a.device.type == "cpu" and a.dtype == torch.float32:
                best, sums, mins = cafe_native.attention_rows(a.contiguous())
                if check:
                    self._validate(sums[:, None], float(mins.min()) if len(mins) else 0.0)
                out[s:e] = best
            else:
                if check or self.renormalise:
                    a = self._fix(a)
                out[s:e] = a.max(dim=1).indices.cpu()      # first maximum, as argmax; faster
        self._checked = True
        return out.reshape(self.out_size)

    def matmul(self, G):
        out = torch.empty(self.shape[0], G.shape[1])
        for s, e, a in self.chunks():
            out[s:e] = (a @ G.to(a.device, a.dtype)).cpu()
        return out


@dataclass
class AGGResult:
    """Stage 2's output: ``labels`` ``(H, W)`` (prototype ids, before edge refinement) and the
    token -> prototype one-hot map ``G`` as indices."""

    labels: np.ndarray
    token_to_prototype: torch.Tensor


def attention_guided_grouping(features, lowres: torch.Tensor, attention,
                              D: torch.Tensor, alpha: float = 0.75, beta: float = 0.25,
                              precision: str = "auto", device=None, pool: str = "chunks",
                              token_to_prototype: torch.Tensor | None = None) -> AGGResult:
    """Stage 2 of CAFE (sec. 3.2, eq. 3-4): ``y_i = argmin_k alpha (1 - f_i^T d_k) +
    beta (1 - (A G)_ik)``, i.e. ``argmax_k alpha cos + beta A^G``.

    ``G`` maps each low-resolution token to its nearest prototype in ``D`` (cosine of the
    token's feature), unless ``token_to_prototype`` is given. ``A G`` is read through
    :func:`pooled_attention` (``pool``), one chunk of pixels at a time, never forming ``A``.
    """
    P = _prepare(features, precision, device)
    C = P.shape[0]
    Dn = _unit_rows(D.to(P.device, torch.float32)).contiguous()
    K = Dn.shape[0]
    if token_to_prototype is None:
        tokens = _unit_rows(lowres.reshape(C, -1).T.to(P.device, torch.float32))
        token_to_prototype = (tokens @ Dn.T).argmax(dim=1).cpu()
    Df = P.lowp(Dn)
    labels = torch.empty(P.N, dtype=torch.long)
    if P.native and pool == "chunks" and hasattr(attention, "chunks"):
        # fused: A G is pooled row by row inside the compiled reduction, never as a matrix
        plan = cafe_native.PoolPlan(token_to_prototype, K)
        fast = P.use_fast(K)
        for s, e, a in attention.chunks():
            a = a.to(device="cpu", dtype=torch.float32).contiguous()
            for s2 in range(s, e, P.chunk):
                e2 = min(e, s2 + P.chunk)
                x = P.fast[s2:e2] @ Df.T if fast else P.exact(s2, e2) @ Dn.T
                labels[s2:e2] = _native_best(P, s2, x, Dn, a[s2 - s:e2 - s], plan, alpha, beta)
        return AGGResult(labels=labels.reshape(P.shape[1:]).numpy(),
                         token_to_prototype=token_to_prototype)
    for s, e, ag in pooled_attention(attention, token_to_prototype, K, pool):
        for s2 in range(s, e, P.chunk):
            e2 = min(e, s2 + P.chunk)
            agc = ag[s2 - s:e2 - s].to(P.device, torch.float32)
            if not P.use_fast(K):
                x = P.exact(s2, e2)
                labels[s2:e2] = (alpha * (x @ Dn.T) + beta * agc).argmax(dim=1).cpu()
                continue
            fast = (P.fast[s2:e2] @ Df.T).float().mul_(alpha).add_(agc, alpha=beta)
            labels[s2:e2] = _best_with_check(
                fast, lambda i, s2=s2, e2=e2, agc=agc: alpha * (P.exact_in_chunk(s2, e2, i) @ Dn.T)
                + beta * agc[i],
                lambda i, c, s2=s2, e2=e2, agc=agc: alpha * torch.einsum(
                    "rc,rkc->rk", P.exact_in_chunk(s2, e2, i), Dn[c]) + beta * agc[i].gather(1, c),
                P.check, P.margin).cpu()
    return AGGResult(labels=labels.reshape(P.shape[1:]).numpy(),
                     token_to_prototype=token_to_prototype)


def feature_gradient(features: torch.Tensor, channel_chunk: int = 16) -> np.ndarray:
    """Spatial gradient magnitude ``|grad F|`` ``(H, W)`` float64: the differences of
    ``numpy.gradient`` (central inside, one-sided at the border), squares summed over
    channels, ``channel_chunk`` channels at a time so that no copy of the feature map is held
    (with the compiled kernels: one pass over float32 contiguous CPU features)."""
    C, H, W = features.shape
    if (native_available() and features.device.type == "cpu"
            and features.dtype == torch.float32 and features.is_contiguous()):
        return cafe_native.feature_gradient_sq(features).double().sqrt().numpy()
    g2 = torch.zeros(H, W, dtype=torch.float32)
    for c in range(0, C, channel_chunk):
        x = features[c:c + channel_chunk].to(torch.float32)
        if W > 2:
            d = x[:, :, 2:] - x[:, :, :-2]
            g2[:, 1:-1] += (d * d).sum(0) * 0.25
        if W > 1:
            for col, (i, j) in ((0, (1, 0)), (W - 1, (W - 1, W - 2))):
                d = x[:, :, i] - x[:, :, j]
                g2[:, col] += (d * d).sum(0)
        if H > 2:
            d = x[:, 2:] - x[:, :-2]
            g2[1:-1] += (d * d).sum(0) * 0.25
        if H > 1:
            for row, (i, j) in ((0, (1, 0)), (H - 1, (H - 1, H - 2))):
                d = x[:, i] - x[:, j]
                g2[row] += (d * d).sum(0)
    return g2.double().sqrt().numpy()


_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def edge_refinement(labels: np.ndarray, gradient: np.ndarray, majority: int = 5,
                    gradient_quantile: float = 0.9, passes: int = 1) -> np.ndarray:
    """Stage 2's edge-aware boundary smoothing (sec. 3.2: "pixels surrounded by a majority of a
    neighbouring label are reassigned unless they lie on a strong feature gradient").

    The paper gives no constants; ours: a pixel whose 8 neighbours (3 x 3 window; border pixels
    have fewer) hold at least ``majority`` (5, i.e. more than half of 8) copies of one other
    label takes that label, unless its feature gradient magnitude is at or above the
    ``gradient_quantile`` (0.9) of the image's; ``passes`` (1) simultaneous passes.
    """
    lab = np.asarray(labels).copy()
    H, W = lab.shape
    if H * W == 0 or passes < 1:
        return lab
    strong = gradient >= np.quantile(gradient, gradient_quantile)
    for _ in range(int(passes)):
        pad = np.pad(lab, 1, constant_values=-1)
        nb = np.stack([pad[1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy, dx in _NEIGHBOURS])
        best_count = np.zeros((H, W), dtype=np.int64)
        best_label = lab.copy()
        for k in range(8):
            cnt = (nb == nb[k]).sum(0)
            upd = (cnt > best_count) & (nb[k] >= 0)
            best_count = np.where(upd, cnt, best_count)
            best_label = np.where(upd, nb[k], best_label)
        change = (best_count >= majority) & (best_label != lab) & ~strong
        if not change.any():
            break
        lab = np.where(change, best_label, lab)
    return lab


def kmeans_pp(features: torch.Tensor, k: int = 200, iterations: int = 20, seed: int = 0,
              precision: str = "auto", device=None, init_sample: int = 20000):
    """K-means++ (Arthur and Vassilvitskii, 2007) on the L2-normalised pixel features, the
    baseline of EASe's Table 4 (``K' = 200``, 20 iterations).

    The ``k`` initial centres are drawn by D^2 sampling from ``init_sample`` pixels (a seeded
    uniform subsample; all pixels when fewer); then Lloyd iterations over all pixels (empty
    clusters keep their centre). Returns ``(labels (H, W) np.int64, centres (k', C))`` with
    ``k' = min(k, distinct pixels)``.
    """
    PF = _prepare(features, precision, device)
    N, dev = PF.N, PF.device
    gen = torch.Generator().manual_seed(int(seed))
    sample = torch.randperm(N, generator=gen)[:min(N, int(init_sample))]
    P = PF.exact_index(sample)
    k = int(min(k, len(torch.unique(P, dim=0))))
    first = int(torch.randint(len(P), (1,), generator=gen))
    centres = [P[first]]
    # |p - c|^2 = 2 - 2 p.c for unit rows (zero rows: 1 + |c|^2 - 2 p.c, same formula below)
    sq = P.square().sum(1)
    d2 = (sq + sq[first] - 2 * (P @ P[first])).clamp_min(0)
    for _ in range(1, k):
        probs = d2.cpu().double()
        if probs.sum() <= 0:
            break
        j = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        centres.append(P[j])
        d2 = torch.minimum(d2, (sq + sq[j] - 2 * (P @ P[j])).clamp_min(0))
    Cm = torch.stack(centres)
    labels = torch.empty(N, dtype=torch.long)
    for it in range(int(iterations) + 1):
        # argmin ||x - c||^2 = argmax (x.c - |c|^2 / 2); Lloyd's passes take the bfloat16
        # argmax as it comes, the last pass (the returned labels) is re-checked
        last = it == int(iterations)
        half = 0.5 * Cm.square().sum(1)
        neg_half = (-half).contiguous()
        Cf = PF.lowp(Cm)
        sums = torch.zeros_like(Cm, dtype=torch.float64)
        counts = torch.zeros(len(Cm), dtype=torch.float64, device=dev)
        fast = PF.use_fast(len(Cm))
        for s, e, x in PF.chunks(fast=fast):
            if PF.native:
                lab = _native_best(PF, s, x @ (Cf if fast else Cm).T, Cm,
                                   bias=neg_half, check=last)
            elif not fast:
                lab = (x @ Cm.T - half).max(dim=1).indices
            else:
                lab = _best_with_check((x @ Cf.T).float() - half,
                                       lambda i, s=s, Cm=Cm, half=half:
                                       PF.exact_index(i + s) @ Cm.T - half, None,
                                       PF.check and last, PF.margin)
            labels[s:e] = lab.cpu()
            if last:
                continue
            sums.index_add_(0, lab, x[:, :Cm.shape[1]].double())
            counts += torch.bincount(lab, minlength=len(Cm)).double()
        if last:
            break
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], Cm.double())
        Cm = new.float()
    return labels.reshape(PF.shape[1:]).numpy(), Cm.cpu()
