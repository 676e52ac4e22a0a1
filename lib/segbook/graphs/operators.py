"""Affinity matrices as operators: what the Normalised Cut solver needs from a graph.

The spectral code (``segbook.groupers.ncut``) never indexes an affinity matrix directly. It asks
an *affinity operator* for a handful of things, each of which has a cheap form for every storage:

=====================  =============================  ======================  =====================
need                   :class:`DenseAffinity`         :class:`SparseAffinity`  :class:`FactoredAffinity`
=====================  =============================  ======================  =====================
products ``A X``       one GEMM                       sparse product          ``F (F^T X)``
degrees ``A 1``        row sums                       row sums                ``F (F^T 1)``
subgraph on ``S``      ``A[S][:, S]`` (block copy)    ``A[S][:, S]``          ``F[S]`` (no N x N)
prefix cuts            one masked pass over ``A``     permuted lower triangle  cumulative sums of F
=====================  =============================  ======================  =====================

``FactoredAffinity(F)`` stands for ``A = F F^T`` without forming it: paper 1 (section 3.3) builds
``A = P^k (P^k)^T`` from a row-stochastic ``P`` of 4096 x 4096, and every quantity the recursive
NCut needs is available from ``F`` alone.

*Prefix cuts* make the threshold search of Shi and Malik exact and cheap: order the nodes by the
Fiedler vector; when the ``j``-th node joins the set ``S_j`` of the ``j - 1`` before it, the cut
grows by its degree minus its self-loop minus twice its weight to ``S_j``. So every candidate
threshold's NCut follows from cumulative sums of ``earlier_weights(order)``.

Graphs are validated once, on construction (:func:`as_affinity`): square, finite, non-negative,
symmetric. Violations raise :class:`segbook.errors.GraphError`.
"""

from __future__ import annotations

import sys

import numpy as np
import scipy.sparse as sp
import torch

from segbook.errors import GraphError

# Rows processed per block in passes over a dense matrix: bounds the temporary memory to
# _ROW_BLOCK x N instead of N x N.
_ROW_BLOCK = 512
# Rows per block of the factored prefix weights (batched 32 x 32 Gram matrices).
_GRAM_BLOCK = 32
# Rows gathered at a time (in Fiedler order) for the factored prefix weights.
_PREFIX_CHUNK = 256
# Dense float64 inputs up to this size are kept in float64.
_DOUBLE_UP_TO = 1024
# Dense matrices up to this size are checked for symmetry entry by entry.
_EXACT_SYMMETRY_CHECK_UP_TO = 1024


_MADV_HUGEPAGE = 14            # Linux <sys/mman.h>
_HUGE_PAGE_MIN_BYTES = 8 << 20
_LIBC = {}


def _empty(shape, dtype, device=None) -> torch.Tensor:
    """``torch.empty`` that asks Linux for transparent huge pages for a large CPU buffer.

    The first touch of freshly mapped memory costs a page fault per 4 KiB page: for the 64 MiB of
    a 4096 x 4096 float32 matrix, ~0.045 s on this project's CPU machine, against ~0.011 s with
    2 MiB pages (``madvise(MADV_HUGEPAGE)``; the system default here is "madvise"). Elsewhere,
    or when the call fails, a plain ``torch.empty``.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if out.device.type != "cpu" or nbytes < _HUGE_PAGE_MIN_BYTES or not sys.platform.startswith(
            "linux"):
        return out
    try:
        if "madvise" not in _LIBC:
            import ctypes
            import ctypes.util
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC["madvise"] = libc.madvise
        page = 4096
        start = -(-out.data_ptr() // page) * page
        length = (out.data_ptr() + nbytes - start) // page * page
        if length > 0:
            _LIBC["madvise"](start, length, _MADV_HUGEPAGE)
    except (OSError, AttributeError, TypeError):
        _LIBC["madvise"] = lambda *args: -1
    return out


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` and ``b``; on the CPU through NumPy's BLAS on views of the tensors.

    For the thin products of the NCut solver (blocks of 8-32 columns against a 4096-wide
    factor) OpenBLAS is 1.3-4x faster than torch's CPU GEMM on this project's 2-core machine
    (torch takes a slow path below 16 columns). The caller keeps OpenBLAS single-threaded
    (:func:`segbook.groupers.recursive_ncut` does, for its whole run).
    """
    if a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype \
            and a.dim() == 2 and b.dim() == 2 and not (a.requires_grad or b.requires_grad):
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return a @ b


def _as_index(idx) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    return idx.astype(np.int64, copy=False)


def _check_finite_nonneg(values, what: str) -> None:
    # Row blocks: the temporaries stay _ROW_BLOCK x n instead of a second n x n array.
    for start in range(0, max(values.shape[0], 1), _ROW_BLOCK):
        block = values[start:start + _ROW_BLOCK]
        # Fast path, two reductions: NaN makes the minimum NaN, an infinity makes the sum
        # infinite; only a block that fails it is examined entry by entry for the message.
        if not block.numel() or (bool(block.min() >= 0) and bool(torch.isfinite(block.sum()))):
            continue
        if not torch.isfinite(block).all():
            raise GraphError(f"{what} contains NaN or Inf; clean the features or the attention "
                             "first")
        if block.numel() and block.min() < 0:
            raise GraphError(f"{what} has negative weights (min {float(block.min()):.3g}); the "
                             "Normalised Cut needs non-negative affinities: clip them, shift them "
                             "or use an exponentiated similarity")


class Affinity:
    """Interface of an affinity operator (a symmetric, non-negative ``n x n`` matrix ``A``).

    Vectors passed in and returned are NumPy ``float64`` arrays; the matrix itself stays in
    whatever storage (and, for torch storages, on whatever device) the subclass keeps it.
    """

    n: int

    def matmat(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """``A @ X`` for ``X`` of shape ``(n, b)``."""
        raise NotImplementedError

    def degrees(self) -> np.ndarray:
        """Row sums ``A 1`` (self-loops included)."""
        return self.matmat(np.ones((self.n, 1)))[:, 0]

    def diagonal(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def subgraph(self, idx) -> Affinity:  # pragma: no cover - interface
        """The induced subgraph on the nodes ``idx`` (an index array or boolean mask)."""
        raise NotImplementedError

    def working_subgraph(self, idx) -> Affinity:
        """:meth:`subgraph` for a loop that uses one subgraph at a time (the NCut recursion).

        The result may live in a buffer that this operator reuses: it is valid only until the
        next ``working_subgraph`` call on the same operator (or :meth:`release_buffers`).
        Storage that has nothing to reuse returns :meth:`subgraph`.
        """
        return self.subgraph(idx)

    def release_buffers(self) -> None:
        """Free the buffer of :meth:`working_subgraph` (its last result becomes invalid)."""

    def earlier_weights(self, order: np.ndarray) -> np.ndarray:  # pragma: no cover
        """``w[j] = sum_{i < j} A[order[j], order[i]]``: weight to the nodes placed before."""
        raise NotImplementedError

    def n_edges(self) -> int:
        """Number of unordered pairs ``i != j`` with ``A_ij > 0``."""
        raise NotImplementedError  # pragma: no cover

    def is_constant(self) -> bool:
        """True when every off-diagonal weight is the same (no cut is better than another).

        False for graphs of fewer than 3 nodes, whose single pair has nothing to be compared with.
        """
        raise NotImplementedError  # pragma: no cover

    def to_dense(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    # -- derived quantities -------------------------------------------------------------
    def total_weight(self) -> float:
        """``T``: total weight of the undirected edges, ``sum_{i < j} A_ij`` (no self-loops)."""
        return float(self.degrees().sum() - self.diagonal().sum()) / 2.0

    def cut(self, mask) -> float:
        """``cut(S, V \\ S) = sum_{i in S, j not in S} A_ij`` for a boolean mask of ``S``."""
        x = np.asarray(mask, dtype=np.float64).reshape(-1, 1)
        return float((x[:, 0] * self.matmat(1.0 - x)[:, 0]).sum())


class DenseAffinity(Affinity):
    """A dense affinity stored as a torch tensor (float32 by default, on any device).

    Parameters
    ----------
    A : array-like or torch.Tensor of shape (n, n)
    dtype : torch dtype of the working copy. A float32 CPU tensor (or a float32 NumPy array)
        is used without a copy.
    device : where to keep the matrix; ``None`` keeps a tensor's device (CPU for arrays).
    validate : check squareness, finiteness, non-negativity and symmetry (one pass).
    atol : absolute tolerance of the symmetry check, relative to ``max |A|``.
    """

    def __init__(self, A, dtype=torch.float32, device=None, validate: bool = True,
                 atol: float = 1e-5):
        if not isinstance(A, torch.Tensor):
            A = torch.from_numpy(np.ascontiguousarray(np.asarray(A)))
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise GraphError(f"an affinity matrix must be square, got shape {tuple(A.shape)}")
        self.A = A.to(dtype=dtype, device=device).contiguous()
        self.n = int(self.A.shape[0])
        self._deg = None
        self._work = None           # buffers of working_subgraph
        if validate:
            self._validate(atol)

    def _validate(self, atol: float) -> None:
        _check_finite_nonneg(self.A, "the affinity matrix")
        if self.n == 0:
            return
        scale = max(float(self.A.max()), 1e-30)   # A >= 0 was checked above
        if self.n <= _EXACT_SYMMETRY_CHECK_UP_TO:
            asym = float((self.A - self.A.T).abs().max())
        else:
            # Two products with random vectors instead of an N x N temporary: A r and A^T r
            # differ for any non-negligible asymmetry (and cost two passes over A).
            gen = torch.Generator().manual_seed(0)
            r = torch.rand(self.n, 2, generator=gen, dtype=torch.float64).to(self.A.device,
                                                                              self.A.dtype)
            asym = float((self.A @ r - (r.T @ self.A).T).abs().max()) / float(r.abs().sum(0).max())
        if asym > atol * scale:
            raise GraphError("the affinity matrix is not symmetric; symmetrise it "
                             "((A + A.T) / 2) or use random_walk_ncut for a row-stochastic "
                             "transition matrix")

    def _t(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(X)).to(self.A.device, self.A.dtype)

    def matmat(self, X):
        return _gemm(self.A, self._t(X)).double().cpu().numpy()

    def degrees(self):
        if self._deg is None:
            self._deg = self.A.sum(1).double().cpu().numpy()
        return self._deg

    def diagonal(self):
        return self.A.diagonal().double().cpu().numpy()

    def _gather(self, idx: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> None:
        # Row blocks keep the temporary at _ROW_BLOCK x n rather than |S| x n.
        for start in range(0, len(idx), _ROW_BLOCK):
            sel = idx[start:start + _ROW_BLOCK]
            block = rows[:len(sel)]
            torch.index_select(self.A, 0, sel, out=block)
            torch.index_select(block, 1, idx, out=out[start:start + len(sel)])

    def subgraph(self, idx):
        idx = torch.from_numpy(_as_index(idx)).to(self.A.device)
        out = torch.empty((len(idx), len(idx)), dtype=self.A.dtype, device=self.A.device)
        rows = torch.empty((min(_ROW_BLOCK, len(idx)), self.n), dtype=self.A.dtype,
                           device=self.A.device)
        self._gather(idx, out, rows)
        return DenseAffinity(out, dtype=self.A.dtype, validate=False)

    def working_subgraph(self, idx):
        """``A[S][:, S]`` written into one ``n^2`` buffer reused from call to call (fresh memory
        costs page faults on first touch, more than the copy)."""
        idx = torch.from_numpy(_as_index(idx)).to(self.A.device)
        m = len(idx)
        if self._work is None:
            self._work = (_empty(self.n * self.n, self.A.dtype, self.A.device),
                          torch.empty((min(_ROW_BLOCK, self.n), self.n), dtype=self.A.dtype,
                                      device=self.A.device))
        flat, rows = self._work
        out = flat[:m * m].view(m, m)
        self._gather(idx, out, rows)
        return DenseAffinity(out, dtype=self.A.dtype, validate=False)

    def release_buffers(self):
        self._work = None

    def earlier_weights(self, order):
        order_t = torch.from_numpy(_as_index(order)).to(self.A.device)
        rank = torch.empty_like(order_t)
        rank[order_t] = torch.arange(self.n, device=self.A.device)
        out = torch.empty(self.n, dtype=torch.float64, device=self.A.device)
        rows = min(_ROW_BLOCK, self.n)
        earlier = torch.empty((rows, self.n), dtype=torch.bool, device=self.A.device)
        masked = torch.empty((rows, self.n), dtype=self.A.dtype, device=self.A.device)
        zero = torch.zeros((), dtype=self.A.dtype, device=self.A.device)
        # Natural row blocks: no permuted copy of A, only a rank comparison mask per block,
        # written into the same two buffers every time (fresh memory costs page faults).
        for start in range(0, self.n, _ROW_BLOCK):
            block = self.A[start:start + _ROW_BLOCK]
            m = block.shape[0]
            torch.lt(rank[None, :], rank[start:start + m, None], out=earlier[:m])
            torch.where(earlier[:m], block, zero, out=masked[:m])
            out[start:start + m] = masked[:m].sum(1)
        return out.cpu().numpy()[_as_index(order)]

    def n_edges(self):
        nnz = int(torch.count_nonzero(self.A)) - int(torch.count_nonzero(self.A.diagonal()))
        return nnz // 2

    def is_constant(self):
        if self.n < 3:  # one pair (or none): nothing to compare
            return False
        # Necessary condition first (O(n)): equal off-diagonal weights give equal d_i - A_ii.
        off_deg = self.degrees() - self.diagonal()
        if np.ptp(off_deg) > 1e-7 * max(np.abs(off_deg).max(), 1e-30):
            return False
        off = ~torch.eye(self.n, dtype=torch.bool, device=self.A.device)
        values = self.A[off]
        return bool(values.max() - values.min() <= 1e-7 * max(float(values.abs().max()), 1e-30))

    def to_dense(self):
        return self.A.double().cpu().numpy()


class SparseAffinity(Affinity):
    """A sparse affinity (SciPy CSR, float64), e.g. pixel affinities within a radius."""

    def __init__(self, A, validate: bool = True, atol: float = 1e-8):
        A = sp.csr_matrix(A, dtype=np.float64)
        if A.shape[0] != A.shape[1]:
            raise GraphError(f"an affinity matrix must be square, got shape {A.shape}")
        A.eliminate_zeros()
        self.A = A
        self.n = int(A.shape[0])
        if validate:
            _check_finite_nonneg(torch.from_numpy(A.data), "the affinity matrix")
            diff = abs(A - A.T)
            if diff.nnz and diff.max() > atol * max(abs(A).max(), 1e-30):
                raise GraphError("the sparse affinity matrix is not symmetric; symmetrise it "
                                 "(A.maximum(A.T) or (A + A.T) / 2)")

    def matmat(self, X):
        return np.asarray(self.A @ X)

    def degrees(self):
        return np.asarray(self.A.sum(1)).ravel()

    def diagonal(self):
        return self.A.diagonal()

    def subgraph(self, idx):
        idx = _as_index(idx)
        return SparseAffinity(self.A[idx][:, idx], validate=False)

    def earlier_weights(self, order):
        order = _as_index(order)
        lower = sp.tril(self.A[order][:, order], k=-1)
        return np.asarray(lower.sum(1)).ravel()

    def n_edges(self):
        return int(self.A.nnz - np.count_nonzero(self.A.diagonal())) // 2

    def is_constant(self):
        if self.n < 3:  # one pair (or none): nothing to compare
            return False
        off = sp.triu(self.A, k=1)
        n_pairs = self.n * (self.n - 1) // 2
        if off.nnz < n_pairs:  # some pairs are 0 and others are not
            return off.nnz == 0
        return bool(np.ptp(off.data) <= 1e-7 * max(np.abs(off.data).max(), 1e-30))

    def to_dense(self):
        return self.A.toarray()


class FactoredAffinity(Affinity):
    """The affinity ``A = F F^T`` kept as its factor ``F`` (shape ``(n, r)``, non-negative).

    Paper 1 (section 3.3) builds ``A = P P^T`` ("dot") or the cosine version from the rows of
    a row-stochastic ``P`` (or of ``P^k``). With the factor, a product costs ``2 n r`` instead
    of ``n^2`` memory reads, the subgraph on ``S`` is ``F[S]`` (no ``|S| x |S|`` copy), the
    degrees are ``F (F^T 1)`` and the prefix cuts are cumulative sums of ``F``'s rows.

    Parameters
    ----------
    F : array-like or torch.Tensor of shape (n, r), entries >= 0 (so that ``A >= 0``).
    dtype, device : storage of ``F``.
    validate : check finiteness and non-negativity.
    diagonal : the self-loops ``|f_i|^2`` when already known (a subgraph's are its parent's);
        computed on first use otherwise.

    Notes
    -----
    The graph is treated as complete when MAN-C counts its edges (``m = n (n - 1) / 2``):
    counting the zero entries of ``F F^T`` would mean forming it, and the self-attention graphs
    the factored form is meant for are dense (paper 1, section 3.5).
    """

    def __init__(self, F, dtype=torch.float32, device=None, validate: bool = True,
                 diagonal=None):
        if not isinstance(F, torch.Tensor):
            F = torch.from_numpy(np.ascontiguousarray(np.asarray(F)))
        if F.ndim != 2:
            raise GraphError(f"FactoredAffinity needs a 2-D factor F (n, r), got {tuple(F.shape)}")
        self.F = F.to(dtype=dtype, device=device).contiguous()
        self.n = int(self.F.shape[0])
        self._deg = None
        self._diag = None if diagonal is None else np.asarray(diagonal, dtype=np.float64)
        self._rows = None           # the buffer working_subgraph gathers rows into
        self._scratch = {}          # earlier_weights' chunk buffer, shared with subgraphs
        if validate:
            _check_finite_nonneg(self.F, "the factor F of A = F F^T")

    def _derived(self, F: torch.Tensor, diagonal) -> FactoredAffinity:
        """An operator of the same class on the factor ``F`` (already checked) and known
        self-loops, without going through ``__init__`` (subclasses keep their type)."""
        out = object.__new__(type(self))
        out.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k not in ("F", "n", "_deg", "_diag", "_rows")})
        out.F, out.n, out._deg, out._rows = F, int(F.shape[0]), None, None
        out._diag = diagonal
        return out

    def _t(self, X):
        return torch.from_numpy(np.ascontiguousarray(X)).to(self.F.device, self.F.dtype)

    def matmat(self, X):
        # (X^T F)^T rather than F^T X: the same product, several times faster on CPU because
        # it streams F by rows.
        X = self._t(X)
        return _gemm(self.F, _gemm(X.T, self.F).T).double().cpu().numpy()

    def degrees(self):
        if self._deg is None:
            # F (F^T 1) as two thin GEMMs (a column sum by reduction is several times slower).
            ones = torch.ones((1, self.n), dtype=self.F.dtype, device=self.F.device)
            self._deg = _gemm(self.F, _gemm(ones, self.F).T)[:, 0].double().cpu().numpy()
        return self._deg

    def diagonal(self):
        if self._diag is None:
            # Row norms without an n x r temporary (F * F would be one).
            self._diag = torch.linalg.vector_norm(self.F, dim=1).double().cpu().numpy() ** 2
        return self._diag

    def subgraph(self, idx):
        idx = _as_index(idx)
        rows = self.F.index_select(0, torch.from_numpy(idx).to(self.F.device))
        # A subgraph's self-loops |f_i|^2 are its parent's: no pass over F[S] for them.
        return self._derived(rows, self.diagonal()[idx])

    def working_subgraph(self, idx):
        """``F[S]`` gathered into one buffer of this operator's size, reused from call to call.

        A fresh ``|S| x r`` tensor per subgraph costs more in page faults (first touch of
        newly mapped memory) than the copy itself; the recursion needs one subgraph at a time.
        """
        idx = _as_index(idx)
        if self._rows is None:
            self._rows = _empty(self.F.shape, self.F.dtype, self.F.device)
        rows = self._rows[:len(idx)]
        torch.index_select(self.F, 0, torch.from_numpy(idx).to(self.F.device), out=rows)
        return self._derived(rows, self.diagonal()[idx])

    def release_buffers(self):
        self._rows = None
        self._scratch.clear()

    def earlier_weights(self, order):
        order_t = torch.from_numpy(_as_index(order)).to(self.F.device)
        n, b = self.n, _GRAM_BLOCK
        out = torch.empty(n, dtype=torch.float64, device=self.F.device)
        carry = torch.zeros(self.F.shape[1], dtype=torch.float64, device=self.F.device)
        # w_j = f_{o_j} . (sum of the factors of the earlier nodes). With the rows in Fiedler
        # order cut into blocks of b: the earlier blocks contribute through an exclusive
        # cumulative sum of the block sums, the same block through the strictly lower triangle
        # of its b x b Gram matrix. Batched GEMMs instead of a sequential cumulative sum over
        # n x r numbers. Rows are gathered in Fiedler order _PREFIX_CHUNK at a time into one
        # reused buffer: the chunk stays in cache for the Gram products, no permuted copy of F
        # is made, and no fresh memory is touched per chunk.
        r = self.F.shape[1]
        # One chunk buffer per family of operators (a subgraph shares its parent's): fresh
        # memory would cost page faults on every call.
        buf = self._scratch.get("chunk")
        if buf is None or buf.shape[1] != r or buf.dtype != self.F.dtype \
                or buf.device != self.F.device:
            buf = self._scratch["chunk"] = torch.empty((_PREFIX_CHUNK, r), dtype=self.F.dtype,
                                                       device=self.F.device)
        ones = torch.ones((1, b), dtype=self.F.dtype, device=self.F.device)
        for start in range(0, n, _PREFIX_CHUNK):
            sel = order_t[start:start + _PREFIX_CHUNK]
            chunk = buf[:len(sel)]
            torch.index_select(self.F, 0, sel, out=chunk)
            m = chunk.shape[0]
            full = m // b
            if full:
                blocks = chunk[:full * b].view(full, b, r)
                sums = torch.matmul(ones, blocks)[:, 0].double()            # (full, r), GEMM
                before = torch.cumsum(sums, 0) - sums + carry
                # Products of every row with every block's "before" sum in one thin GEMM
                # (full * b, full); row i of block k needs column k (a batched matrix-vector
                # product is several times slower than this GEMM plus a diagonal).
                cross = _gemm(chunk[:full * b], before.to(chunk.dtype).T).view(full, b, full)
                cross = torch.diagonal(cross, dim1=0, dim2=2).T                # (full, b)
                within = torch.tril(torch.bmm(blocks, blocks.transpose(1, 2)), -1).sum(2)
                out[start:start + full * b] = (cross.double() + within.double()).reshape(-1)
                carry = before[-1] + sums[-1]
            if full * b < m:
                tail = chunk[full * b:]
                within = torch.tril(tail @ tail.T, -1).sum(1)
                out[start + full * b:start + m] = ((tail @ carry.to(chunk.dtype)).double()
                                                   + within.double())
                carry = carry + tail.sum(0, dtype=torch.float64)
        return out.cpu().numpy()

    def n_edges(self):
        return self.n * (self.n - 1) // 2

    def is_constant(self):
        if self.n < 3:  # one pair (or none): nothing to compare
            return False
        off_deg = self.degrees() - self.diagonal()
        if np.ptp(off_deg) > 1e-7 * max(np.abs(off_deg).max(), 1e-30):
            return False
        # Equal rows of F give a constant F F^T; other constant Gram matrices are not detected
        # (the spectral split then finds no better cut than any other and the stop rule decides).
        return bool((self.F - self.F[:1]).abs().max() <= 1e-7 * max(float(self.F.abs().max()),
                                                                     1e-30))

    def to_dense(self):
        F = self.F.double()
        return (F @ F.T).cpu().numpy()


def as_affinity(A, device=None, validate: bool = True) -> Affinity:
    """Wrap a matrix as an affinity operator, validating it once.

    Parameters
    ----------
    A : numpy array, torch tensor, SciPy sparse matrix, or an :class:`Affinity` (returned as is).
    device : torch device for dense storage (default: the tensor's device, CPU for arrays);
        ``"auto"`` picks CUDA when it is available.
    validate : run the checks (square, finite, non-negative, symmetric).

    Raises
    ------
    GraphError
        For a non-square, non-finite, negative or asymmetric matrix.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(A, Affinity):
        return A
    if sp.issparse(A):
        return SparseAffinity(A, validate=validate)
    if not isinstance(A, torch.Tensor):
        A = np.asarray(A)
        if A.dtype == object or not np.issubdtype(A.dtype, np.number):
            raise GraphError(f"cannot read an affinity matrix from dtype {A.dtype}")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise GraphError(f"an affinity matrix must be square, got shape {tuple(A.shape)}")
    # float64 where it is cheap (small graphs: exact known answers), float32 where memory
    # traffic dominates (the products with a 4096 x 4096 matrix).
    double = A.dtype == torch.float64 if isinstance(A, torch.Tensor) \
        else A.dtype == np.float64
    dtype = torch.float64 if double and A.shape[0] <= _DOUBLE_UP_TO else torch.float32
    return DenseAffinity(A, dtype=dtype, device=device, validate=validate)
