"""Sparse k-nearest-neighbour graphs over the tokens of many images (paper 2, section 3.3).

Paper 2's dataset-level clustering (section 3.3, eqs. 7-8; Tables 2-4) builds, per layer, one graph
over every token of every image of a mini-batch: nodes are the ``B x n`` tokens (image-major),
edge weights are cosine similarities of the layer's values (**V-V**: ``cos(v_a, v_b)``) or
of its queries against its keys (**Q-K**: ``cos(q_a, k_b)``, rows are queries, so the raw
graph is not symmetric). The paper keeps, per location, the top intra-image and the top
inter-image connections and zeroes values below a threshold (its numbers are lost from the
text); the authors' code (``L/model_seg.py``) keeps the ``k_intra`` (50) most similar tokens
of the **same** image and the ``k_inter`` (50) most similar tokens of **other** images, never
the token itself, drops similarities ``<= 0.1``, symmetrises ``A <- (A + A^T) / 2`` and
normalises rows, ``A <- D^-1 A``.

:func:`dataset_knn_graph` does this **without ever forming the dense N x N similarity or a
same-image mask** (the authors' code builds a 1.7 GB boolean mask at N = 40,960): query rows
are processed ``chunk`` at a time; one ``(chunk, N)`` block of similarities is all the dense
memory there is (``chunk * N * 4`` bytes: 80 MiB for 512 rows at N = 40,960), the same-image
columns of each row are read with one ``gather`` and then masked in place with one
``scatter`` before the inter-image top-k; features are never copied (cosines are products
divided by the norms, chunk by chunk). The edges are kept in CSR form (scipy's int32
arithmetic for the symmetrisation, then a ``torch.sparse_csr_tensor``): 8 bytes per edge;
:meth:`KnnGraph.matmul` is ``A @ X``, differentiable in ``X``, which is what the objective
needs.

Departures from the authors' code, all documented choices:

* similarities ``<= threshold`` are removed, not stored as explicit zeros (same matrix);
* ``D^-1`` is exactly ``1 / d``; the code computes ``1/d + 1e-6``, which turns a row with no
  edge left into ``inf`` and then NaN. Here such an **isolated** row simply stays empty and
  is counted in :attr:`KnnGraph.info` (``"isolated"``);
* ties (e.g. duplicate images, whose tokens have several neighbours at exactly the same
  similarity) are broken by ``torch.topk``; which of the tied neighbours is kept is not
  specified, the kept *values* are.

:func:`dense_knn_graph` is the plain dense reference (tests only: it forms N x N).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from segbook.errors import GraphError

__all__ = ["KnnGraph", "dataset_knn_graph", "dense_knn_graph", "knn_neighbours",
           "sparse_from_neighbours"]


@dataclass
class KnnGraph:
    """A row-normalised sparse graph over ``n_nodes`` tokens of ``n_images`` images.

    Attributes
    ----------
    csr : ``(N, N)`` ``torch.sparse_csr_tensor`` (float32 values, int32 indices up to 2^31
        edges), ``D^-1 A`` (or ``A`` when built with ``normalise=False``); 8 bytes per edge.
    n_images, tokens_per_image : the image-major layout of the nodes.
    info : counts: ``intra_edges``/``inter_edges`` (kept after the threshold, before
        symmetrisation), ``dropped`` (neighbours at or below the threshold), ``edges``
        (stored entries after symmetrisation), ``isolated`` (rows with no edge),
        ``k_intra``/``k_inter`` (the k actually used after clamping).
    """

    csr: torch.Tensor
    n_images: int
    tokens_per_image: int
    info: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return int(self.csr.shape[0])

    @property
    def matrix(self) -> torch.Tensor:
        """The same matrix as a coalesced ``torch.sparse_coo_tensor`` (made on demand: its
        int64 indices take 16 bytes per edge)."""
        return self.csr.to_sparse_coo().coalesce()

    def to_dense(self) -> torch.Tensor:
        return self.csr.to_dense()

    def to_scipy(self):
        """The same matrix as a ``scipy.sparse.csr_matrix`` (shares no memory)."""
        import scipy.sparse as sp
        m = self.csr.cpu()
        return sp.csr_matrix((m.values().numpy().copy(), m.col_indices().numpy().copy(),
                              m.crow_indices().numpy().copy()), shape=tuple(m.shape))

    def to(self, device) -> KnnGraph:
        """The graph on ``device`` (the CSR tensors moved; built on the CPU)."""
        out = KnnGraph(self.csr.to(device), self.n_images, self.tokens_per_image, dict(self.info))
        if getattr(self, "_transpose", None) is not None:
            out._transpose = self._transpose.to(device)
        return out

    def _csr(self):
        if getattr(self, "_transpose", None) is None:
            cpu = KnnGraph(self.csr.cpu(), self.n_images, self.tokens_per_image)
            self._transpose = _torch_csr(cpu.to_scipy().T.tocsr()).to(self.csr.device)
        return self.csr, self._transpose

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X``, differentiable in ``X``. A CSR copy of ``A^T`` is made once and reused:
        3-6x faster on the CPU than ``torch.sparse.mm`` on a COO matrix, whose backward
        transposes and re-sorts ``A`` at every call."""
        return _SparseMatmul.apply(X, self)


def _torch_csr(m) -> torch.Tensor:
    """A ``scipy.sparse.csr_matrix`` as a torch CSR tensor (int32 indices when they fit)."""
    itype = np.int32 if m.nnz < 2**31 - 1 else np.int64
    with warnings.catch_warnings():          # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(itype)),
                                       torch.from_numpy(m.indices.astype(itype)),
                                       torch.from_numpy(m.data.astype(np.float32)),
                                       size=m.shape)


class _SparseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, graph):
        A, At = graph._csr()
        ctx.At = At
        return A @ X

    @staticmethod
    def backward(ctx, grad):
        return ctx.At @ grad, None


def _check_features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 2:
        raise GraphError(f"{name}: features must be (N, d) with N = images x tokens, got "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise GraphError(f"{name}: features must be floating point, got {x.dtype}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:5, 0].tolist()
        raise GraphError(f"{name}: features contain NaN or Inf (rows {rows}"
                         f"{'...' if int(bad.sum()) > 5 else ''})")
    return x


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_neighbours(x, y=None, tokens_per_image: int = 1024, k_intra: int = 50,
                   k_inter: int = 50, chunk: int = 512):
    """Per-row top-k neighbours by cosine similarity, within and across images, chunked.

    Parameters
    ----------
    x : ``(N, d)`` row features (values for V-V, queries for Q-K), image-major:
        rows ``b*n .. b*n + n - 1`` are image ``b``'s tokens.
    y : ``(N, d)`` column features (keys for Q-K); None: ``x`` (V-V).
    tokens_per_image : ``n``; ``N`` must be a multiple of it.
    k_intra, k_inter : neighbours kept per row in the same image (the row itself excluded)
        and in the other images; clamped to ``n - 1`` and ``N - n``.
    chunk : rows per block of similarities (the dense memory is ``chunk x N`` floats).

    Returns
    -------
    ``(intra_idx, intra_val, inter_idx, inter_val)``: ``(N, k)`` column indices (int64) and
    cosine similarities (float32), best first.
    """
    x = _check_features(x, "rows")
    y = x if y is None else _check_features(y, "columns")
    N = x.shape[0]
    n = int(tokens_per_image)
    if y.shape != x.shape:
        raise GraphError(f"row and column features differ in shape: {tuple(x.shape)} vs "
                         f"{tuple(y.shape)}")
    if n < 1 or N % n:
        raise GraphError(f"{N} nodes is not a whole number of images of {n} tokens")
    ki = max(0, min(int(k_intra), n - 1))
    ke = max(0, min(int(k_inter), N - n))
    # no normalised copy of the features: divide each block of products by the norms
    xf = x if x.dtype == torch.float32 else x.float()
    yf = xf if y is x else (y if y.dtype == torch.float32 else y.float())
    inv_x = 1.0 / xf.norm(dim=1).clamp_min(1e-12)
    inv_y = inv_x if yf is xf else 1.0 / yf.norm(dim=1).clamp_min(1e-12)
    intra_idx = torch.empty(N, ki, dtype=torch.long)
    intra_val = torch.empty(N, ki)
    inter_idx = torch.empty(N, ke, dtype=torch.long)
    inter_val = torch.empty(N, ke)
    local = torch.arange(n)
    chunk = max(1, int(chunk))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        rows = torch.arange(r0, r1)
        S = xf[r0:r1] @ yf.T                                     # (c, N): the only dense block
        S.mul_(inv_y[None, :]).mul_(inv_x[r0:r1, None])
        same = (rows // n)[:, None] * n + local[None, :]         # (c, n) same-image columns
        if ki:
            block = S.gather(1, same)
            block[torch.arange(r1 - r0), rows % n] = -math.inf   # the row itself
            v, i = block.topk(ki, dim=1)
            intra_val[r0:r1], intra_idx[r0:r1] = v, same.gather(1, i)
        if ke:
            S.scatter_(1, same, -math.inf)
            v, i = S.topk(ke, dim=1)
            inter_val[r0:r1], inter_idx[r0:r1] = v, i
        del S
    return intra_idx, intra_val, inter_idx, inter_val


def sparse_from_neighbours(idx: torch.Tensor, val: torch.Tensor, n_nodes: int,
                           threshold: float = 0.1, symmetrise: bool = True,
                           normalise: bool = True):
    """``(csr, dropped, isolated)`` from per-row neighbour lists ``idx``/``val``
    (``(N, k)``): entries ``<= threshold`` removed, ``(A + A^T)/2``, then ``D^-1 A``.
    Built with scipy's int32 CSR arithmetic (no int64 COO copies, no global sort)."""
    import scipy.sparse as sp
    N = int(n_nodes)
    k = idx.shape[1]
    vals = val.reshape(-1).numpy()
    keep = vals > threshold
    dropped = int(keep.size - keep.sum())
    itype = np.int32 if N < 2**31 - 1 else np.int64
    rows = np.repeat(np.arange(N, dtype=itype), k)[keep]
    cols = idx.reshape(-1).numpy()[keep].astype(itype)
    A = sp.csr_matrix((vals[keep].astype(np.float32), (rows, cols)), shape=(N, N))
    del rows, cols
    if symmetrise:
        A = (A + A.T.tocsr()) * np.float32(0.5)
    A.sum_duplicates()
    A.sort_indices()
    deg = np.asarray(A.sum(axis=1)).ravel()
    isolated = int((deg <= 0).sum())
    if normalise:
        inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1e-30), 0.0).astype(np.float32)
        A.data *= np.repeat(inv, np.diff(A.indptr))
    return _torch_csr(A), dropped, isolated


def dataset_knn_graph(x, y=None, tokens_per_image: int = 1024, k_intra: int = 50,
                      k_inter: int = 50, threshold: float = 0.1, chunk: int = 512,
                      normalise: bool = True) -> KnnGraph:
    """Paper 2's dataset-level graph over the tokens of a mini-batch of images (section 3.3;
    the authors' code ``L/model_seg.py build_knn_graph`` with its intra/inter split).

    Parameters
    ----------
    x : ``(B n, d)`` values (V-V) or queries (Q-K), image-major; heads concatenated.
    y : ``(B n, d)`` keys for a Q-K graph; None for V-V.
    tokens_per_image : ``n``.
    k_intra, k_inter : top-k within the same image and across the other images (50 and 50).
    threshold : similarities ``<= threshold`` are dropped (0.1).
    chunk : query rows per block: peak dense memory ``chunk x B n x 4`` bytes.
    normalise : ``D^-1 A`` (random-walk normalisation, as the code); False keeps ``A``.

    Returns
    -------
    :class:`KnnGraph`.

    Bad input (documented results, or :class:`~segbook.errors.GraphError`):
    NaN/Inf features, non-2-D features, mismatched query/key shapes or ``N`` not a multiple
    of ``tokens_per_image`` raise. A mini-batch of **one image** has no inter-image
    neighbours (``info["k_inter"] == 0``: an intra-image graph); an image with fewer tokens
    than ``k_intra + 1`` keeps all its ``n - 1`` other tokens (``k`` is clamped, recorded in
    ``info``); rows left without any edge after the threshold are empty (``isolated``),
    never NaN. Ties (duplicate images) keep tied neighbours in ``torch.topk``'s order.
    """
    xi, xv, ei, ev = knn_neighbours(x, y, tokens_per_image, k_intra, k_inter, chunk)
    N = xi.shape[0]
    idx = torch.cat([xi, ei], dim=1)
    val = torch.cat([xv, ev], dim=1)
    info = {"k_intra": int(xi.shape[1]), "k_inter": int(ei.shape[1]),
            "intra_edges": int((xv > threshold).sum()), "inter_edges": int((ev > threshold).sum())}
    del xi, xv, ei, ev
    A, dropped, isolated = sparse_from_neighbours(idx, val, N, threshold, True, normalise)
    del idx, val
    info.update(dropped=dropped, edges=int(A.values().numel()), isolated=isolated)
    return KnnGraph(A, N // int(tokens_per_image), int(tokens_per_image), info)


def dense_knn_graph(x, y=None, tokens_per_image: int = 1024, k_intra: int = 50,
                    k_inter: int = 50, threshold: float = 0.1,
                    normalise: bool = True) -> torch.Tensor:
    """The dense reference of :func:`dataset_knn_graph` (forms N x N and the same-image
    mask, like the authors' code; tests only). Returns the dense ``(N, N)`` matrix."""
    x = _check_features(x, "rows")
    y = x if y is None else _check_features(y, "columns")
    N, n = x.shape[0], int(tokens_per_image)
    S = _unit_rows(x).double() @ _unit_rows(y).double().T
    img = torch.arange(N) // n
    same = img[:, None] == img[None, :]
    S.fill_diagonal_(-math.inf)
    A = torch.zeros(N, N, dtype=torch.float64)
    ki, ke = min(k_intra, n - 1), min(k_inter, N - n)
    for mask, k in ((same, ki), (~same, ke)):
        if k <= 0:
            continue
        v, i = S.masked_fill(~mask, -math.inf).topk(k, dim=1)
        A.scatter_(1, i, v)
    A = torch.where(A > threshold, A, torch.zeros(()))
    A = 0.5 * (A + A.T)
    if normalise:
        d = A.sum(1, keepdim=True)
        A = torch.where(d > 0, A / d.clamp_min(1e-300), torch.zeros(()))
    return A.float()
