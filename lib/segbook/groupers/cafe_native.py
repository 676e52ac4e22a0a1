"""CAFE's per-pixel reductions, compiled (``cafe_kernels.cpp``) with a torch fallback.

Stages 1 and 2 of CAFE (:mod:`segbook.groupers.cafe_stages`) score every pixel against ``K``
prototypes with a matrix product and then reduce each row of scores: the best column, whether
the runner-up is close enough to need a float32 re-check, and in stage 2 the pooled attention
``A G`` added first. As separate torch operations these reductions cost several times the
product (``benchmarks/cafe.py``, ``primitives`` row); :func:`best_rows` does them in one pass
per row.

The C++ source is compiled on first use with the machine's C++ compiler (``$CXX``, else
``g++`` or ``c++``; ``-O3 -march=native``) into ``$SEGBOOK_CACHE/native`` (default
``~/.cache/segbook/native``), keyed by the source, the flags and the CPU, and loaded with
:mod:`ctypes` (which releases the GIL during a call). The kernels' OpenMP loops run in the
libgomp that torch has loaded (same soname), i.e. on torch's threads, as many as
``torch.get_num_threads()``. Without a compiler, or with ``SEGBOOK_NATIVE=0``, :func:`available` is false and the
callers use their torch code, which gives the same labels up to float32 rounding (tests
compare both).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["PoolPlan", "attention_rows", "available", "best_rows", "block_col_max",
           "feature_gradient_sq", "gather_rows", "recheck_rows", "segment_stats",
           "unit_rows"]

SOURCE = Path(__file__).with_name("cafe_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC")

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_f = ctypes.c_float


class _Pool(ctypes.Structure):
    _fields_ = [("src", _p), ("w", _p), ("n_rest", _i64), ("rest_tok", _p), ("rest_grp", _p),
                ("identity", _i64)]


class PoolPlan:
    """How :func:`best_rows` pools a row's ``T`` attention columns into ``K`` prototype columns
    (``A G`` with ``G`` the one-hot map ``groups`` ``(T,)`` -> ``0..K-1``): each column gets
    its lowest token by a gather, the other tokens of shared columns are added after, in token
    order (the same sums as a scatter-add in token order); when token ``k`` goes to column
    ``k`` for every ``k`` (no prototype merged or dropped), the row is used as it is."""

    def __init__(self, groups: torch.Tensor, K: int):
        g = torch.as_tensor(groups).to(torch.int64).cpu().reshape(-1)
        T = g.numel()
        if T and (int(g.min()) < 0 or int(g.max()) >= K):
            raise ValueError(f"groups must lie in 0..{K - 1}")
        self.T, self.K = T, int(K)
        tokens = torch.arange(T)
        first = torch.full((K,), T, dtype=torch.int64).scatter_reduce_(0, g, tokens, "amin")
        has = first < T
        self.src = torch.where(has, first, 0).to(torch.int32).contiguous()
        self.w = has.to(torch.float32).contiguous()
        rest = tokens[first[g] != tokens]
        self.rest_tok = rest.to(torch.int32).contiguous()
        self.rest_grp = g[rest].to(torch.int32).contiguous()
        # token k -> column k for all k: the pooled attention is the row itself
        self.identity = T == K and bool(torch.equal(g, tokens))
        self.struct = _Pool(self.src.data_ptr(), self.w.data_ptr(), len(rest),
                            self.rest_tok.data_ptr() if len(rest) else None,
                            self.rest_grp.data_ptr() if len(rest) else None, int(self.identity))


_SIGNATURES = {
    "cafe_best_rows_bf16": (_i64, [_p, _i64, _i64, _p, _i64, _p, _f, _f, _p, _f, _f, _p, _p]),
    "cafe_best_rows_f32": (_i64, [_p, _i64, _i64, _p, _i64, _p, _f, _f, _p, _f, _f, _p, _p]),
    "cafe_recheck_rows_bf16": (None, [_p, _i64, _p, _i64, _p, _f, _f, _p, _f, _f, _p, _i64,
                                      _p, _p, _i64, _p, _p]),
    "cafe_unit_rows_bf16": (None, [_p, _i64, _i64, _i64, _p, _p, _i64]),
    "cafe_gather_rows": (None, [_p, _i64, _i64, _i64, _p, _i64, _p]),
    "cafe_block_col_max_bf16": (None, [_p, _i64, _i64, _i64, _p]),
    "cafe_attention_rows": (None, [_p, _i64, _i64, _p, _p, _p]),
    "cafe_feature_gradient": (None, [_p, _i64, _i64, _i64, _p]),
    "cafe_segment_stats": (None, [_p, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p]),
}


def _enabled() -> bool:
    return os.environ.get("SEGBOOK_NATIVE", "1").strip().lower() not in ("0", "false", "no",
                                                                          "off")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read(1 << 16).splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        keep = []
    return platform.machine() + "|" + "|".join(keep)


def _cache_dir() -> Path:
    from segbook.backbones.cache import default_cache_dir
    return default_cache_dir() / "native"


def _compile(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)          # atomic: concurrent processes never load a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _library():
    if not _enabled():
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        warnings.warn("CAFE: no C++ compiler found (set $CXX or install g++); using the slower "
                      "torch reductions", RuntimeWarning, stacklevel=3)
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + compiler.encode()
                         + _cpu_key().encode()).hexdigest()[:16]
    path = _cache_dir() / f"cafe_kernels-{key}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        warnings.warn(f"CAFE: compiling {SOURCE.name} with {compiler} failed ({detail.strip()[:300]}); "
                      "using the slower torch reductions", RuntimeWarning, stacklevel=3)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    """Whether the compiled kernels can be used (compiled here, or found in the cache)."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(t: torch.Tensor, dtype, name: str, ndim: int) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or t.ndim != ndim or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {ndim}-d CPU {dtype} tensor, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _common(scores, attention, groups, bias):
    if scores.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"scores must be bfloat16 or float32, got {scores.dtype}")
    _check(scores, scores.dtype, "scores", 2)
    R, K = scores.shape
    T = 0
    if attention is not None:
        _check(attention, torch.float32, "attention", 2)
        T = attention.shape[1]
        if not isinstance(groups, PoolPlan):
            groups = PoolPlan(groups, K)
        if attention.shape[0] != R or groups.T != T or groups.K != K:
            raise ValueError(f"attention {tuple(attention.shape)} and groups ({groups.T} "
                             f"tokens -> {groups.K}) do not match scores {tuple(scores.shape)}")
    if bias is not None:
        _check(bias, torch.float32, "bias", 1)
        if bias.shape[0] != K:
            raise ValueError(f"bias has {bias.shape[0]} entries for {K} columns")
    return R, K, T, groups


def _plan_ptr(plan):
    return ctypes.addressof(plan.struct) if plan is not None else None


def best_rows(scores: torch.Tensor, attention: torch.Tensor | None = None, groups=None,
              alpha: float = 1.0, beta: float = 0.0, bias: torch.Tensor | None = None,
              error: tuple[float, float] | None = None):
    """Per row of ``scores`` ``(R, K)`` (bfloat16 or float32): the best column of
    ``v = alpha * scores + beta * (attention G) + bias`` (``attention`` ``(R, T)`` float32 with
    ``G`` the one-hot map ``groups`` ``(T,)`` -> column, or its :class:`PoolPlan`; terms left
    out when ``None``), ties to the lowest column. Returns ``(best (R,) int64, ambiguous)``:
    with ``error = (e0, e1)`` (each score within ``e0 + e1 |score|`` of the exact one),
    ``ambiguous`` ``(R,)`` bool marks rows whose two best values are closer than their errors
    allow to tell apart, else ``None``."""
    lib = _library()
    R, K, T, plan = _common(scores, attention, groups, bias)
    best = torch.empty(R, dtype=torch.int64)
    amb = torch.zeros(R, dtype=torch.uint8) if error is not None else None
    fn = lib.cafe_best_rows_bf16 if scores.dtype == torch.bfloat16 else lib.cafe_best_rows_f32
    e0, e1 = error if error is not None else (0.0, 0.0)
    if R:
        fn(_ptr(scores), R, K, _ptr(attention), T, _plan_ptr(plan), alpha, beta, _ptr(bias),
           float(e0), float(e1), _ptr(best), _ptr(amb))
    return best, (amb.bool() if amb is not None else None)


def recheck_rows(scores: torch.Tensor, rows: torch.Tensor, X: torch.Tensor,
                 inv_norm: torch.Tensor, D: torch.Tensor, best: torch.Tensor,
                 attention: torch.Tensor | None = None, groups=None, alpha: float = 1.0,
                 beta: float = 0.0, bias: torch.Tensor | None = None,
                 error: tuple[float, float] = (0.0, 0.0)) -> None:
    """Float32 re-check of ``rows`` ``(m,)`` of a chunk of bfloat16 ``scores`` ``(R, K)``,
    whose pixels' features are the rows of ``X`` ``(m, C)`` float32 (unnormalised, row ``j``
    for ``rows[j]``) with inverse norms ``inv_norm`` ``(m,)``: every column whose bfloat16 value
    could exceed the best's (``error`` as in :func:`best_rows`) is rescored as ``alpha cos(x, D_k) + beta (A G)_k +
    bias_k`` (``D`` ``(K, C)`` float32) and ``best[r]`` set to the best of them (ties to the
    lowest column)."""
    lib = _library()
    R, K, T, plan = _common(scores, attention, groups, bias)
    if scores.dtype != torch.bfloat16:
        raise ValueError("only bfloat16 scores need a re-check")
    _check(X, torch.float32, "X", 2)
    _check(inv_norm, torch.float32, "inv_norm", 1)
    _check(D, torch.float32, "D", 2)
    _check(best, torch.int64, "best", 1)
    _check(rows, torch.int64, "rows", 1)
    m, C = X.shape
    if D.shape != (K, C) or inv_norm.shape[0] != m or rows.shape[0] != m or best.shape[0] != R:
        raise ValueError(f"shapes do not match: scores {tuple(scores.shape)}, rows "
                         f"{tuple(rows.shape)}, X {tuple(X.shape)}, D {tuple(D.shape)}")
    if m and (int(rows.min()) < 0 or int(rows.max()) >= R):
        raise ValueError(f"rows must lie in 0..{R - 1}")

    if m:
        lib.cafe_recheck_rows_bf16(
            _ptr(scores), K, _ptr(attention), T, _plan_ptr(plan), alpha, beta, _ptr(bias),
            float(error[0]), float(error[1]), _ptr(rows), m, _ptr(X), _ptr(inv_norm), C,
            _ptr(D), _ptr(best))


def attention_rows(A: torch.Tensor):
    """One pass over attention rows ``A`` ``(R, T)`` float32: ``(argmax (R,) int64, row sums
    (R,), row minima (R,))`` (float32; a NaN in a row makes its sum NaN; subnormal weights are
    read as zero)."""
    lib = _library()
    _check(A, torch.float32, "attention", 2)
    R, T = A.shape
    best = torch.empty(R, dtype=torch.int64)
    sums = torch.empty(R, dtype=torch.float32)
    mins = torch.empty(R, dtype=torch.float32)
    if R and T:
        lib.cafe_attention_rows(_ptr(A), R, T, _ptr(best), _ptr(sums), _ptr(mins))
    elif R:
        best.zero_(), sums.zero_(), mins.fill_(float("inf"))
    return best, sums, mins


def feature_gradient_sq(features: torch.Tensor) -> torch.Tensor:
    """Sum over channels of the squared spatial differences of ``features`` ``(C, H, W)``
    float32 (``numpy.gradient``'s: central inside, one-sided at the border): ``(H, W)``
    float32, one pass over the features."""
    lib = _library()
    _check(features, torch.float32, "features", 3)
    C, H, W = features.shape
    out = torch.zeros(H, W, dtype=torch.float32)
    if C and H and W:
        lib.cafe_feature_gradient(_ptr(features), C, H, W, _ptr(out))
    return out


def segment_stats(X: torch.Tensor, labels: torch.Tensor, K: int, inv_norm: torch.Tensor):
    """Per segment (``labels`` ``(N,)`` int64 in ``0..K-1``) of the pixels of ``X`` ``(C, N)``
    float32: sums of the features and of the unit features (``X * inv_norm``) ``(K, C)``
    float64, in pixel order, and per-channel max and min ``(K, C)`` float32, in one pass."""
    lib = _library()
    _check(X, torch.float32, "X", 2)
    _check(labels, torch.int64, "labels", 1)
    _check(inv_norm, torch.float32, "inv_norm", 1)
    C, N = X.shape
    if labels.shape[0] != N or inv_norm.shape[0] != N:
        raise ValueError(f"labels and inv_norm need {N} entries")
    if N and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"labels must lie in 0..{K - 1}")
    fsum = torch.empty(C, K, dtype=torch.float64)
    nsum = torch.empty(C, K, dtype=torch.float64)
    fmax = torch.empty(C, K, dtype=torch.float32)
    fmin = torch.empty(C, K, dtype=torch.float32)
    lib.cafe_segment_stats(_ptr(X), C, N, _ptr(labels), K, _ptr(inv_norm), _ptr(fsum),
                           _ptr(nsum), _ptr(fmax), _ptr(fmin))
    return fsum.T, nsum.T, fmax.T, fmin.T


def block_col_max(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Column maxima of each block of ``block`` rows of bfloat16 ``scores`` ``(R, K)``:
    ``(ceil(R / block), K)`` float32."""
    lib = _library()
    _check(scores, torch.bfloat16, "scores", 2)
    R, K = scores.shape
    nb = -(-R // block)
    out = torch.empty(nb, K, dtype=torch.float32)

    if R:
        lib.cafe_block_col_max_bf16(_ptr(scores), R, K, int(block), _ptr(out))
    return out


def gather_rows(X: torch.Tensor, start: int, rows: torch.Tensor) -> torch.Tensor:
    """``X[:, start + rows].T`` as a contiguous ``(m, C)`` tensor (``X`` ``(C, N)`` float32,
    ``rows`` ascending), read in cache-friendly channel blocks."""
    lib = _library()
    _check(X, torch.float32, "X", 2)
    _check(rows, torch.int64, "rows", 1)
    C, N = X.shape
    m = rows.shape[0]
    if m and (int(rows.min()) < 0 or start + int(rows.max()) >= N or start < 0):
        raise ValueError(f"rows {start} + 0..{int(rows.max())} outside 0..{N - 1}")
    out = torch.empty(m, C, dtype=torch.float32)

    if m:
        lib.cafe_gather_rows(_ptr(X), C, N, start, _ptr(rows), m, _ptr(out))
    return out


def unit_rows(X: torch.Tensor, bf16: bool = True, width: int | None = None):
    """The pixels' inverse norms ``1 / max(|X[:, p]|, 1e-12)`` ``(N,)`` of the channel-first
    features ``X`` ``(C, N)`` float32 and, with ``bf16``, the unit pixel rows
    ``X[:, p] * inv_norm[p]`` as a ``(N, width)`` bfloat16 tensor (else None), made in one pass
    over cache-sized blocks. ``width`` (default ``C``) ``> C`` appends a column of ones and
    zeros (the offset column of :class:`~segbook.groupers.cafe_stages.PixelFeatures`)."""
    lib = _library()
    _check(X, torch.float32, "X", 2)
    C, N = X.shape
    width = C if width is None else int(width)
    if width < C:
        raise ValueError(f"width {width} < {C} channels")
    inv = torch.empty(N, dtype=torch.float32)
    out = torch.empty(N, width, dtype=torch.bfloat16) if bf16 else None
    if N:
        lib.cafe_unit_rows_bf16(_ptr(X), C, N, N, _ptr(inv), _ptr(out), width)
    return inv, out
