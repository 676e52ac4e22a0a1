"""The Normalised Cut family: NCut value, Fiedler vector, recursive NCut, MAN-C, random walks.

Theory in chapter 01 (``book/01_spectral_clustering.md``); the equations cited below are those of
paper 1, *Unsupervised Segmentation by Diffusing, Walking and Cutting* (section 2.2 and 3.2-3.5),
which restates Shi and Malik (2000) and Meila and Shi (2001).

For an undirected graph with symmetric, non-negative affinity ``A``, degrees ``d = A 1`` and a
bipartition ``(S, S')`` of its nodes:

* ``cut(S, S') = sum_{i in S, j in S'} A_ij``                                       (eq. 1)
* ``NCut(S, S') = cut / assoc(S, V) + cut / assoc(S', V)``, ``assoc(S, V) = sum_{i in S} d_i``
                                                                                   (eq. 2)
* relaxed, minimising NCut is the generalised eigenproblem ``(D - A) x = lambda D x`` (eq. 3),
  whose second-smallest solution (the *Fiedler vector*) is thresholded.

Every function here accepts a dense NumPy array or torch tensor, a SciPy sparse matrix, or an
operator from :mod:`segbook.graphs.operators` (notably :class:`FactoredAffinity` for
``A = F F^T`` without forming it).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import ThreadpoolController

from segbook.errors import GraphError
from segbook.graphs.attention import check_row_stochastic
from segbook.graphs.operators import Affinity, DenseAffinity, as_affinity

__all__ = [
    "STOP_RULES",
    "NCutResult",
    "SplitNode",
    "best_threshold_split",
    "fiedler_vector",
    "manc_threshold",
    "ncut_eigenvectors",
    "ncut_value",
    "random_walk_ncut",
    "recursive_ncut",
]

STOP_RULES = ("threshold", "manc", "scaled_mincut")

# Graphs up to this many nodes are solved with a dense eigendecomposition.
DENSE_SOLVER_MAX_NODES = 128
# A node whose degree is below this fraction of the largest degree counts as isolated.
_ISOLATED_RTOL = 1e-12
# Block size and steps per restart cycle of the block Krylov solver. A block product reads F
# (or A) once whatever the block's width, and a wider block costs little more per pass (on this
# CPU, 16 columns ~1.3x the time of 8), so the widest block that converges in few steps wins.
_KRYLOV_BLOCK = 8
_KRYLOV_STEPS = 6
# Leading Ritz vectors a part inherits from its parent (warm start).
_N_RITZ = 6


# NumPy/SciPy's BLAS (OpenBLAS) runs the solver's thin products and n x 48 blocks; its own
# threads fight torch's (OpenMP threads spin after each torch op) and slow everything down
# several times on a busy machine (on the 2-core machine with another job running, a pipeline
# run with OpenBLAS on 2 threads took up to 2.4x the wall time of one with OpenBLAS on 1). So
# OpenBLAS runs single-threaded. The controller is built once (threadpool_limits scans the
# process's libraries on every entry) and nested entries do nothing.
_BLAS_LIMIT = {"controller": None, "depth": 0}


@contextmanager
def _one_blas_thread():
    if _BLAS_LIMIT["depth"]:
        _BLAS_LIMIT["depth"] += 1
        try:
            yield
        finally:
            _BLAS_LIMIT["depth"] -= 1
        return
    if _BLAS_LIMIT["controller"] is None:
        _BLAS_LIMIT["controller"] = ThreadpoolController()
    with _BLAS_LIMIT["controller"].limit(limits=1, user_api="blas"):
        _BLAS_LIMIT["depth"] += 1
        try:
            yield
        finally:
            _BLAS_LIMIT["depth"] -= 1


# -- the cut and its value ------------------------------------------------------------------
def ncut_value(A, mask) -> float:
    """Shi and Malik's normalised cut of the bipartition ``(mask, ~mask)`` (paper 1, eq. 2).

    ``NCut(S, S') = cut(S, S') / assoc(S, V) + cut(S, S') / assoc(S', V)``, where ``assoc(S, V)``
    is the sum of the degrees in ``S`` (self-loops included) and ``cut`` sums the weights
    between the two sides. It lies in ``[0, 2]``.

    Parameters
    ----------
    A : affinity (dense, sparse or :class:`~segbook.graphs.operators.Affinity`), ``n x n``.
    mask : boolean array of length ``n``: membership of ``S``.

    Returns
    -------
    float. A side whose association is 0 (it has no edges at all) contributes 0: its cut is 0
    too, and 0/0 is read as "nothing is lost by separating it".

    Raises
    ------
    GraphError if ``mask`` has the wrong length or one side is empty.
    """
    op = as_affinity(A)
    mask = np.asarray(mask, dtype=bool).ravel()
    if mask.shape[0] != op.n:
        raise GraphError(f"mask has {mask.shape[0]} entries for a graph of {op.n} nodes")
    if mask.all() or not mask.any():
        raise GraphError("a bipartition needs two non-empty sides")
    d = op.degrees()
    cut = max(op.cut(mask), 0.0)
    return _ratio(cut, d[mask].sum()) + _ratio(cut, d[~mask].sum())


def _ratio(cut: float, vol: float) -> float:
    return 0.0 if vol <= 0 else cut / vol


# -- the Fiedler vector ---------------------------------------------------------------------
def _fix_sign(x: np.ndarray) -> np.ndarray:
    """Deterministic sign: the entry of largest magnitude is positive."""
    return x if x[np.argmax(np.abs(x))] >= 0 else -x


def _orthonormal_columns(X: np.ndarray, rtol: float = 1e-8) -> np.ndarray:
    """An orthonormal basis of range(X), dropping numerically dependent directions.

    Cholesky QR twice (two small Gram matrices: cheaper than Householder QR on a tall block);
    a rank-deficient block falls back to an SVD that drops the dependent directions.
    """
    if X.shape[1] == 0:
        return X
    try:
        Q = X
        for _ in range(2):
            G = Q.T @ Q
            L = np.linalg.cholesky(G)
            Q = Q @ np.linalg.inv(L).T
        if np.linalg.cond(L) < 1e6:
            return Q
    except np.linalg.LinAlgError:
        pass
    U, sv, _ = np.linalg.svd(X, full_matrices=False)
    return U[:, sv > rtol * max(sv[0], 1e-300)]


def _top_eigpair_block_krylov(apply, n, deflate, block, steps, tol, max_cycles, rng,
                              start=None, n_ritz=0):
    """Largest eigenpair of a symmetric operator on the complement of ``deflate``.

    Block Krylov with Rayleigh-Ritz after every block step and thick restarts. One block
    product ``A X`` with ``X`` of ``block`` columns reads the matrix once, the same memory
    traffic as a single matrix-vector product, so a block method needs far fewer passes over a
    dense ``A`` than single-vector Lanczos. Converged when the residual ``||M u - theta u||`` of
    the top Ritz pair is below ``tol``: with clustered eigenvalues (several well-separated
    groups) any vector of the cluster has a small residual, and any of them splits along a group
    boundary.

    ``start`` (``n x q``, ``q <= block``) replaces the first columns of the random start block
    (a warm start: a parent graph's Ritz vectors restricted to a part). Returns
    ``(theta, u, ritz)`` with ``ritz`` the ``n_ritz`` leading Ritz vectors (``n x n_ritz``,
    best first) or ``None``.
    """
    def project(X):
        X = X - np.outer(deflate, deflate @ X)
        return X - np.outer(deflate, deflate @ X)

    X = rng.standard_normal((n, block))
    if start is not None and start.shape[1]:
        q = min(start.shape[1], block)
        X[:, :q] = start[:, :q]
    theta, u, vals, vecs, basis = None, None, None, None, None
    for _ in range(max_cycles):
        basis = np.empty((n, 0))
        images = np.empty((n, 0))
        Q = _orthonormal_columns(project(X))
        for _step in range(steps):
            if Q.shape[1] == 0:
                break
            W = apply(Q)
            basis = np.hstack([basis, Q])
            images = np.hstack([images, W])
            H = basis.T @ images
            vals, vecs = np.linalg.eigh((H + H.T) / 2)
            theta = vals[-1]
            u = basis @ vecs[:, -1]
            residual = np.linalg.norm(images @ vecs[:, -1] - theta * u)
            if residual <= tol or basis.shape[1] >= n - 1:
                return theta, u, _leading(basis, vecs, n_ritz)
            R = W - basis @ (basis.T @ W)
            R = R - basis @ (basis.T @ R)  # twice is enough (Kahan-Parlett)
            Q = _orthonormal_columns(project(R))
        if vals is None:          # the start block vanished after deflation: start afresh
            X = rng.standard_normal((n, block))
            continue
        keep = min(block, len(vals))
        X = basis @ vecs[:, -keep:]
    return theta, u, (None if basis is None else _leading(basis, vecs, n_ritz))


def _leading(basis, vecs, k):
    if not k or vecs is None:
        return None
    k = min(k, vecs.shape[1])
    return basis @ vecs[:, ::-1][:, :k]


def fiedler_vector(A, solver: str = "auto", tol: float = 1e-4, seed: int = 0,
                   return_value: bool = False, start=None):
    """The Fiedler vector: second-smallest solution of ``(D - A) x = lambda D x`` (eq. 3).

    Solved through the symmetric normalisation ``M = D^-1/2 A D^-1/2``: if ``M v = mu v`` then
    ``x = D^-1/2 v`` solves eq. 3 with ``lambda = 1 - mu``. The top eigenvector of ``M`` is
    known (``D^1/2 1``, ``mu = 1``), so it is deflated and the largest remaining eigenpair
    is sought.

    Parameters
    ----------
    A : affinity with every degree > 0 (isolated nodes have no Fiedler value; see
        :func:`recursive_ncut`, which sets them apart first).
    solver : ``"dense"`` (full symmetric eigendecomposition, float64), ``"krylov"`` (block
        Krylov with Rayleigh-Ritz on products with ``A``; works for dense, sparse and factored
        affinities, on GPU when the matrix lives there) or ``"auto"`` (dense up to
        ``DENSE_SOLVER_MAX_NODES`` nodes).
    tol : residual tolerance of the iterative solver (eigenvalues of ``M`` lie in [-1, 1]).
    seed : seed of the iterative solver's start block (results are deterministic).
    return_value : also return ``lambda_2``.
    start : optional ``(n, q)`` guesses of the leading solutions of eq. 3 (for instance a
        parent graph's, restricted to this part) that seed the Krylov solver's start block
        (a warm start: fewer products with ``A``; the answer is the same to within ``tol``).

    Returns
    -------
    x : ndarray (n,), scaled so that ``x^T D x = 1``; sign fixed so that the entry of largest
        magnitude is positive.
    lambda_2 : float, only with ``return_value=True``.
    """
    x, lam, _ = _fiedler(as_affinity(A), solver, tol, seed, start=start)
    return (x, lam) if return_value else x


def _fiedler(op, solver, tol, seed, start=None, n_ritz=0):
    """:func:`fiedler_vector` on an operator; also returns the ``n_ritz`` leading Ritz vectors
    of eq. 3 (``x``-space, ``n x n_ritz``; ``None`` from the dense solver) for warm starts."""
    n = op.n
    if n < 2:
        raise GraphError(f"a Fiedler vector needs at least 2 nodes, got {n}")
    d = op.degrees()
    if (d <= _ISOLATED_RTOL * max(d.max(), 0)).any() or d.max() <= 0:
        raise GraphError("the graph has isolated nodes (degree 0); the generalised eigenproblem "
                         "(D - A) x = lambda D x is singular for them: remove them first")
    sqrt_d = np.sqrt(d)
    inv_sqrt = 1.0 / sqrt_d
    top = sqrt_d / np.linalg.norm(sqrt_d)
    if solver == "auto":
        solver = "dense" if n <= DENSE_SOLVER_MAX_NODES else "krylov"
    if start is not None:
        start = np.asarray(start, dtype=np.float64).reshape(n, -1) * sqrt_d[:, None]
    with _one_blas_thread():
        mu, v, ritz = _solve_top(op, solver, n, inv_sqrt, top, tol, seed, start, n_ritz)
    x = _fix_sign(inv_sqrt * v)
    x = x / math.sqrt(max(float((x * x * d).sum()), 1e-300))
    return x, float(1.0 - mu), (None if ritz is None else inv_sqrt[:, None] * ritz)


def _solve_top(op, solver, n, inv_sqrt, top, tol, seed, start=None, n_ritz=0):
    """Second-largest eigenpair of ``M = D^-1/2 A D^-1/2`` (the largest after deflating ``top``),
    and the leading Ritz vectors of the iterative solver (``None`` for the dense one)."""
    if solver == "dense":
        M = op.to_dense() * inv_sqrt[:, None] * inv_sqrt[None, :]
        M = (M + M.T) / 2
        vals, vecs = scipy.linalg.eigh(M, subset_by_index=[n - 2, n - 1])
        return vals[0], vecs[:, 0], None
    if solver == "krylov":
        def apply(X):
            return inv_sqrt[:, None] * op.matmat(inv_sqrt[:, None] * X)
        block = min(_KRYLOV_BLOCK, max(1, n - 2))
        steps = max(2, min(_KRYLOV_STEPS, (n - 1) // block))
        return _top_eigpair_block_krylov(apply, n, top, block, steps, tol, max_cycles=30,
                                         rng=np.random.default_rng(seed), start=start,
                                         n_ritz=n_ritz)
    raise ValueError(f"solver must be 'auto', 'dense' or 'krylov', got {solver!r}")


def ncut_eigenvectors(A, k: int = 4, dense_max_nodes: int = 2048):
    """The ``k`` smallest solutions of ``(D - A) x = lambda D x`` (for figures and embeddings).

    The first is constant (``lambda = 0``), the second is the Fiedler vector; the next ones
    split the graph further (Shi and Malik show them as images). Dense ``eigh`` of the
    normalised matrix up to ``dense_max_nodes`` nodes, SciPy's Lanczos (``eigsh``) on products
    with ``A`` above.

    Returns
    -------
    values : (k,) ascending ``lambda``; vectors : (n, k), each scaled to ``x^T D x = 1``, signs
    fixed as in :func:`fiedler_vector`.
    """
    op = as_affinity(A)
    n = op.n
    k = int(min(k, n))
    d = op.degrees()
    if (d <= _ISOLATED_RTOL * max(d.max(), 0)).any() or d.max() <= 0:
        raise GraphError("the graph has isolated nodes (degree 0): remove them first")
    inv_sqrt = 1.0 / np.sqrt(d)
    if n <= dense_max_nodes:
        M = op.to_dense() * inv_sqrt[:, None] * inv_sqrt[None, :]
        mu, V = scipy.linalg.eigh((M + M.T) / 2, subset_by_index=[n - k, n - 1])
    else:
        from scipy.sparse.linalg import LinearOperator, eigsh

        def matvec(x):
            x = np.asarray(x, dtype=np.float64).reshape(n, -1)
            return inv_sqrt[:, None] * op.matmat(inv_sqrt[:, None] * x)
        M = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(n)
        mu, V = eigsh(M, k=k, which="LA", v0=v0, tol=1e-6)
    order = np.argsort(-mu)
    values = 1.0 - mu[order]
    X = inv_sqrt[:, None] * V[:, order]
    X = np.column_stack([_fix_sign(x) / np.sqrt((x * x * d).sum()) for x in X.T])
    return values, X


# -- the threshold search -------------------------------------------------------------------
@dataclass
class Bipartition:
    """The best threshold of a Fiedler vector: ``mask`` is the side above the threshold."""

    mask: np.ndarray
    ncut: float
    cut: float
    threshold: float


def best_threshold_split(A, x, n_thresholds: int | None = None,
                         min_size: int = 1) -> Bipartition | None:
    """Threshold ``x`` where the NCut is smallest (paper 1, section 3.4, step 2).

    Sort the nodes by ``x``; the candidate sets are the prefixes ``S_j`` (the ``j`` smallest
    values). When node ``o_j`` joins, the cut grows by ``d(o_j) - A(o_j, o_j) - 2 w_j``, with
    ``w_j`` its weight to the nodes already in, so the cut and the associations of every
    candidate follow from cumulative sums: one pass over ``A`` for all thresholds.

    Parameters
    ----------
    A : affinity operator or matrix.
    x : values to threshold (the Fiedler vector).
    n_thresholds : ``None`` tries every split point between distinct values (exact search);
        an integer tries that many evenly spaced thresholds over ``[0.99 min x, 0.99 max x]``
        (DiffCut's recipe, 100).
    min_size : smallest side allowed.

    Returns
    -------
    :class:`Bipartition` or ``None`` when no threshold separates two sides of ``min_size``.
    """
    op = as_affinity(A)
    x = np.asarray(x, dtype=np.float64)
    n = op.n
    if n < 2:
        return None
    order = np.argsort(x, kind="stable")
    xs = x[order]
    d = op.degrees()
    step = d[order] - op.diagonal()[order] - 2.0 * op.earlier_weights(order)
    cut = np.maximum(np.cumsum(step)[:-1], 0.0)     # cut of prefix j = 1 .. n-1
    vol_in = np.cumsum(d[order])[:-1]
    vol_out = d.sum() - vol_in
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (np.where(vol_in > 0, cut / vol_in, 0.0)
                 + np.where(vol_out > 0, cut / vol_out, 0.0))
    sizes = np.arange(1, n)
    if n_thresholds is None:
        valid = xs[1:] > xs[:-1]                      # a threshold can fall between them
    else:
        grid = np.linspace(0.99 * xs[0], 0.99 * xs[-1], int(n_thresholds))
        prefix = np.searchsorted(xs, grid, side="right")   # nodes with x <= t
        valid = np.zeros(n - 1, dtype=bool)
        inside = (prefix >= 1) & (prefix <= n - 1)
        valid[prefix[inside] - 1] = True
    valid &= (sizes >= min_size) & (n - sizes >= min_size)
    if not valid.any():
        return None
    j = int(np.flatnonzero(valid)[np.argmin(value[valid])])
    mask = np.zeros(n, dtype=bool)
    mask[order[j + 1:]] = True
    threshold = 0.5 * (xs[j] + xs[j + 1])
    return Bipartition(mask=mask, ncut=float(value[j]), cut=float(cut[j]), threshold=threshold)


# -- the stop rules -------------------------------------------------------------------------
def manc_threshold(A) -> float:
    """The MAN-C threshold ``n T / (2 m)`` of a graph (paper 1, section 2.2).

    ``n`` is the number of nodes, ``T = sum_{i < j} A_ij`` the total weight of the undirected
    edges and ``m`` the number of edges (pairs ``i < j`` with ``A_ij > 0``). Self-loops are not
    edges: they can never be cut, and leaving them out is what makes the threshold of a complete
    graph ``T / (n - 1)``, the form paper 1 (section 3.5) gives for dense self-attention graphs.

    Unlike NCut, the threshold scales with ``A``: multiplying ``A`` by ``c`` multiplies it by
    ``c``. On ``A = P P^T`` with ``P`` row-stochastic, ``sum A = ||P^T 1||^2 >= n`` so the
    threshold is about half the mean degree, ``>= ~0.5`` (see chapter 01 for other scales).
    Returns 0 for a graph without edges.
    """
    op = as_affinity(A)
    m = op.n_edges()
    return 0.0 if m == 0 else op.n * op.total_weight() / (2.0 * m)


def _stop_value(stop: str, op: Affinity, split: Bipartition, threshold):
    """(value, limit) of a stop rule: the split is accepted when value < limit."""
    if stop == "threshold":
        return split.ncut, float(threshold)
    limit = manc_threshold(op)
    if stop == "manc":
        return split.ncut, limit
    total = op.total_weight()
    return (split.cut / total if total > 0 else math.inf), limit


# -- the recursion --------------------------------------------------------------------------
@dataclass
class SplitNode:
    """One node of the split tree.

    ``indices`` are the graph nodes it holds; ``value`` and ``limit`` the stop rule's two sides
    (accepted when ``value < limit``); ``reason`` says why a leaf is a leaf: ``"stop"`` (the rule
    refused the split), ``"min_size"``, ``"max_depth"``, ``"constant"`` (all affinities equal, no
    cut is better than another), ``"no_edges"``, ``"no_threshold"`` (the Fiedler vector takes a
    single value) or ``"isolated"`` (nodes without any edge in their parent, set apart).
    """

    id: int
    parent: int | None
    depth: int
    indices: np.ndarray
    ncut: float = math.nan
    value: float = math.nan
    limit: float = math.nan
    children: tuple = ()
    reason: str = ""
    label: int | None = None

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass
class NCutResult:
    """Labels (``0 .. K-1``, ordered by each segment's smallest node index) and the split tree.

    ``np.asarray(result)`` gives the labels.
    """

    labels: np.ndarray
    tree: list = field(default_factory=list)
    stop: str = "threshold"

    @property
    def n_segments(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def __array__(self, dtype=None, copy=None):
        return self.labels if dtype is None else self.labels.astype(dtype)

    def __len__(self) -> int:
        return len(self.labels)

    def leaves(self) -> list:
        return [node for node in self.tree if node.is_leaf]

    def labels_at_depth(self, depth: int) -> np.ndarray:
        """The partition after ``depth`` levels of splitting (the hierarchy, level by level).

        Nodes at ``depth`` and leaves above it are the segments, labelled ``0..K-1`` by their
        smallest node index; ``depth = 0`` gives one segment, a large depth gives ``labels``.
        """
        parts = [nd for nd in self.tree
                 if nd.depth == depth or (nd.depth < depth and nd.is_leaf)]
        labels = np.zeros(len(self.labels), dtype=np.int64)
        for k, node in enumerate(sorted(parts, key=lambda nd: nd.indices.min())):
            labels[node.indices] = k
        return labels


def _labels_from_leaves(n: int, tree: list) -> np.ndarray:
    labels = np.full(n, -1, dtype=np.int64)
    leaves = sorted((node for node in tree if node.is_leaf), key=lambda nd: nd.indices.min())
    for k, node in enumerate(leaves):
        labels[node.indices] = k
        node.label = k
    if (labels < 0).any():  # pragma: no cover - guards the invariant
        raise RuntimeError("recursive NCut left nodes unlabelled")
    return labels


def _check_stop(stop: str, threshold) -> None:
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if stop == "threshold" and (threshold is None or not np.isfinite(threshold)):
        raise ValueError("stop='threshold' needs a finite NCut threshold (e.g. 0.3)")


def _run_recursion(n, root_graph, split_fn, accept_fn, min_size, max_depth, stop,
                   warm_start=False):
    """Depth-first recursion with an explicit stack (no Python recursion limit).

    ``split_fn(graph) -> (Bipartition | None, reason, isolated_mask | None)``;
    ``accept_fn(graph, split) -> (value, limit)``; ``root_graph.working_subgraph(idx)`` (else
    ``subgraph``) makes the graph of a node (for a walk, the restriction renormalised, which
    composes across levels). With ``warm_start``, ``split_fn(graph, start)`` also returns a
    block of vectors on the graph's nodes (or None); each child's rows of it are passed as the
    child's ``start``. Terminates: every accepted split makes two non-empty, strictly smaller
    children.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    tree: list[SplitNode] = []
    if n == 0:
        return NCutResult(labels=np.zeros(0, dtype=np.int64), tree=tree, stop=stop)
    root = SplitNode(id=0, parent=None, depth=0, indices=np.arange(n))
    tree.append(root)
    # Only index sets wait on the stack; a node's subgraph is cut out of the root when the node
    # is processed, so at most one working subgraph (at most n x n) is alive besides the root.
    stack = [root]
    starts: dict[int, np.ndarray] = {}
    take = getattr(root_graph, "working_subgraph", root_graph.subgraph)
    while stack:
        node = stack.pop()
        start = starts.pop(node.id, None)
        graph = root_graph if node.parent is None else take(node.indices)
        if node.size < 2 * min_size or node.size < 2:
            node.reason = "min_size"
            continue
        if max_depth is not None and node.depth >= max_depth:
            node.reason = "max_depth"
            continue
        if warm_start:
            split, reason, isolated, block = split_fn(graph, start)
        else:
            (split, reason, isolated), block = split_fn(graph), None
        if isolated is not None:
            # Nodes without edges here: their NCut is 0/0; they become one segment.
            parts = [(isolated, "isolated", False), (~isolated, "", True)]
        elif split is None:
            node.reason = reason
            continue
        else:
            value, limit = accept_fn(graph, split)
            node.ncut, node.value, node.limit = split.ncut, value, limit
            if not value < limit:
                node.reason = "stop"
                continue
            parts = [(~split.mask, "", True), (split.mask, "", True)]
        children = []
        for part, child_reason, grow in parts:
            child = SplitNode(id=len(tree), parent=node.id, depth=node.depth + 1,
                              indices=node.indices[part], reason=child_reason)
            tree.append(child)
            children.append(child)
            if grow:
                stack.append(child)
                if block is not None:
                    starts[child.id] = block[part]
        node.children = tuple(c.id for c in children)
        del graph
    return NCutResult(labels=_labels_from_leaves(n, tree), tree=tree, stop=stop)


def _isolated_mask(off_degree: np.ndarray) -> np.ndarray | None:
    """Nodes without edges to the rest (``None`` if there are none); called when some edge exists."""
    isolated = off_degree <= _ISOLATED_RTOL * off_degree.max()
    return isolated if isolated.any() else None


def recursive_ncut(A, stop: str = "threshold", threshold: float | None = None,
                   min_size: int = 2, max_depth: int | None = None, solver: str = "auto",
                   n_thresholds: int | None = None, tol: float = 1e-4, seed: int = 0,
                   device=None, validate: bool = True, warm_start: bool = True) -> NCutResult:
    """Recursive two-way Normalised Cut (Shi and Malik; paper 1, section 3.4).

    (1) Solve eq. 3 for the Fiedler vector; (2) threshold it where the NCut is smallest;
    (3) stop when the stop rule refuses the split; (4) otherwise recurse into both sides.

    Stop rules (a split is accepted when ``value < limit``):

    ``"threshold"``
        ``NCut(S, S') < threshold`` (DiffCut's tau, paper 1's fixed NCut threshold).
    ``"manc"``
        MAN-C compared with the NCut (paper 1, section 3.5, adjustment 1):
        ``NCut(S, S') < n T / (2 m)``, with ``n``, ``T``, ``m`` the node count, total edge
        weight and edge count of the graph being split (:func:`manc_threshold`).
    ``"scaled_mincut"``
        The scaled minimum cut (section 3.5, adjustment 2): ``cut(S, S') / T < n T / (2 m)``,
        where ``cut(S, S')`` is the cut of the proposed NCut bipartition (the "min-cut" of the
        partition MAN-C checks, section 2.2).

    Both MAN-C limits scale linearly with ``A`` while NCut and ``cut / T`` do not: the rules
    are calibrated for ``A = P^k (P^k)^T`` with ``P`` row-stochastic (limit ~ half the mean
    degree, ~0.5); see chapter 01 for what they do on graphs of other scales.

    Parameters
    ----------
    A : symmetric non-negative affinity: dense array/tensor, SciPy sparse matrix, or an
        :class:`~segbook.graphs.operators.Affinity` such as ``FactoredAffinity(F)`` (``A = F F^T``).
    stop : ``"threshold"``, ``"manc"`` or ``"scaled_mincut"``.
    threshold : the NCut threshold for ``stop="threshold"``.
    min_size : a split is made only if both sides keep at least ``min_size`` nodes.
    max_depth : maximum depth of the split tree (``None``: no limit; the recursion ends anyway
        because every accepted split makes two non-empty, smaller parts).
    solver : eigen-solver of :func:`fiedler_vector`.
    n_thresholds : ``None`` for the exact threshold search, or DiffCut's evenly spaced grid.
    tol, seed : iterative solver's tolerance and start-block seed.
    device : torch device for dense storage (``"cuda"`` to run the products on a GPU,
        ``"auto"`` for CUDA when available; default: where the input lives, CPU for arrays).
    validate : check the input once (square, finite, non-negative, symmetric).
    warm_start : start each part's Krylov solve from its parent's leading Ritz vectors
        restricted to the part (plus random columns) rather than from random vectors alone.
        A part of a near block-diagonal graph inherits good approximations of its own leading
        eigenvectors, so its solve needs fewer products with ``A``; the stop rule and the
        tolerance are unchanged.

    Returns
    -------
    :class:`NCutResult` with ``labels`` (int64, ``0..K-1``) and ``tree`` (list of
    :class:`SplitNode`, root first).

    Notes
    -----
    Degenerate graphs give documented results, never NaN labels: 0 nodes -> empty labels;
    1 node -> ``[0]``; a graph without edges (self-loops do not count) or whose off-diagonal
    affinities are all equal is kept whole; nodes with no edge inside the subgraph being split
    (self-loops do not count) are set apart as one segment (their NCut is 0/0); disconnected components are found by the spectral
    split itself (NCut 0). Memory: besides the input, one working subgraph at a time, cut out of
    the input when its node is processed into one buffer reused for every node
    (:meth:`~segbook.graphs.operators.Affinity.working_subgraph`: ``N x N`` for a dense
    affinity, ``N x r`` for a factored one, whose subgraph is ``F[S]``; freed on return), plus
    ``512 x N`` temporaries. A float32 dense or tensor input is used without a copy; other
    inputs are converted once (one ``N x N`` float32 copy).
    """
    _check_stop(stop, threshold)
    op = as_affinity(A, device=device, validate=validate)

    def split_fn(graph, start=None):
        # Edges only: a node with nothing but a self-loop cannot be cut from anything.
        off = graph.degrees() - graph.diagonal()
        if off.max() <= 0:
            return None, "no_edges", None, None
        isolated = _isolated_mask(off)
        if isolated is not None:
            return None, "", isolated, None
        if graph.is_constant():
            return None, "constant", None, None
        x, _, ritz = _fiedler(graph, solver, tol, seed, start=start,
                              n_ritz=_N_RITZ if warm_start else 0)
        split = best_threshold_split(graph, x, n_thresholds=n_thresholds, min_size=min_size)
        return split, "no_threshold", None, ritz

    def accept_fn(graph, split):
        return _stop_value(stop, graph, split, threshold)

    try:
        with _one_blas_thread():
            return _run_recursion(op.n, op, split_fn, accept_fn, min_size, max_depth, stop,
                                  warm_start=True)
    finally:
        op.release_buffers()


# -- the random-walk view -------------------------------------------------------------------
class _Walk:
    """A (sub-)random walk: ``P`` restricted to a node set, rows renormalised."""

    def __init__(self, P: torch.Tensor):
        self.P = P
        self.n = int(P.shape[0])

    def subgraph(self, idx):
        idx_t = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.P.device)
        sub = self.P.index_select(0, idx_t).index_select(1, idx_t)
        mass = sub.sum(1, keepdim=True)
        return _Walk(torch.where(mass > 0, sub / mass.clamp_min(1e-300), sub))


def _stationary(P: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Stationary distribution ``pi P = pi``.

    A direct solve of ``(I - P^T) pi = 0`` with ``sum pi = 1`` (power iteration mixes slowly on
    the nearly decomposable walks that segmentation is about); when the chain has several closed
    classes the system is singular and the lazy power iteration from the uniform distribution
    gives the mixture of their stationary distributions.
    """
    n = P.shape[0]
    system = torch.eye(n, dtype=torch.float64, device=P.device) - P.T.double()
    system[-1] = 1.0
    rhs = torch.zeros(n, dtype=torch.float64, device=P.device)
    rhs[-1] = 1.0
    try:
        pi = torch.linalg.solve(system, rhs)
        if torch.isfinite(pi).all() and pi.min() > -1e-9 and (pi @ P.double() - pi).abs().max() \
                < 1e-8:
            return pi.clamp_min(0).to(P.dtype) / pi.clamp_min(0).sum().to(P.dtype)
    except RuntimeError:  # singular: several closed classes
        pass
    pi = torch.full((P.shape[0],), 1.0 / P.shape[0], dtype=P.dtype, device=P.device)
    for _ in range(max_iter):
        new = 0.5 * (pi + pi @ P)
        new = new / new.sum()
        if (new - pi).abs().sum() < tol:
            return new
        pi = new
    return pi


def _second_right_eigvec(P: torch.Tensor, pi: torch.Tensor, tol: float, max_iter: int, seed: int):
    """Second right eigenvector of P by power iteration with one deflation (paper 1, sec. 3.2).

    Iterates the lazy walk ``Q = (I + P) / 2`` (same eigenvectors, eigenvalues moved into the
    disc of centre 1/2 and radius 1/2, so no eigenvalue near -1 can dominate) deflated by its
    known top pair: right eigenvector ``1`` and left eigenvector ``pi`` (``Q' = Q - 1 pi^T``).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(P.shape[0], generator=gen, dtype=torch.float64).to(P.device, P.dtype)
    x = x - (pi @ x)
    x = x / x.norm()
    for _ in range(max_iter):
        new = 0.5 * (x + P @ x)
        new = new - (pi @ new)          # deflation: remove the component along 1
        norm = new.norm()
        if norm <= 0:
            break
        new = new / norm
        if (new - x).norm() < tol:
            x = new
            break
        x = new
    return x


def random_walk_ncut(P, threshold: float, min_size: int = 2, max_depth: int | None = None,
                     tol: float = 1e-9, max_iter: int = 2000, seed: int = 0,
                     device=None) -> NCutResult:
    """Recursive NCut on a row-stochastic, not necessarily symmetric ``P`` (paper 1, sec. 3.2).

    Meila and Shi: for ``P = D^-1 A`` the right eigenvectors of ``P`` are the solutions of
    eq. 3 (``P x = (1 - lambda) x``), so the second eigenvector of ``P`` is the Fiedler vector.
    Paper 1 applies this to aggregated self-attention, which is row-stochastic but has no
    ``A`` behind it; the second eigenvector is found by power iteration with one deflation.

    The NCut of a bipartition is the random-walk one,
    ``NCut(S, S') = Pr(S -> S' | S) + Pr(S' -> S | S')`` at the stationary distribution ``pi``,
    which equals Shi and Malik's NCut on the flow graph ``(Pi P + P^T Pi) / 2`` and, for a
    reversible ``P = D^-1 A``, the NCut on ``A`` itself. A part ``S`` is split further with the
    walk restricted to it (``P[S, S]``, rows renormalised), which for ``P = D^-1 A`` is the walk
    of the subgraph ``A[S, S]``.

    Parameters
    ----------
    P : (n, n) row-stochastic matrix (rows sum to 1 within 1e-3), non-negative.
    threshold : NCut stop threshold (paper 1 uses 0.3 for its random-walk baseline).
    min_size, max_depth : as in :func:`recursive_ncut`.
    tol, max_iter : power-iteration tolerance (change of the normalised iterate) and cap.
    seed : seed of the power iteration's start vector.
    device : torch device.

    Returns
    -------
    :class:`NCutResult`.
    """
    _check_stop("threshold", threshold)
    if not isinstance(P, torch.Tensor):
        P = torch.from_numpy(np.ascontiguousarray(np.asarray(P, dtype=np.float64)))
    check_row_stochastic(P)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    P = P.to(device=device, dtype=torch.float64 if P.shape[0] <= 2048 else torch.float32)

    def split_fn(walk):
        # Mass that moves to another state of this part; 0 for states that only stay put
        # (P_ii = 1) or whose every step leaves the part.
        moves = (walk.P.sum(1) - walk.P.diagonal()).cpu().numpy()
        if moves.max() <= 0:
            return None, "no_edges", None
        isolated = _isolated_mask(moves)
        if isolated is not None:
            return None, "", isolated
        pi = _stationary(walk.P, tol=tol, max_iter=max_iter)
        flow = pi[:, None] * walk.P
        flow = DenseAffinity(0.5 * (flow + flow.T), dtype=walk.P.dtype, validate=False)
        if flow.is_constant():
            return None, "constant", None
        if (flow.degrees() <= 0).any():
            # States the stationary walk never visits (transient): no NCut is defined there.
            return None, "no_edges", None
        x = _second_right_eigvec(walk.P, pi, tol=tol, max_iter=max_iter, seed=seed)
        x = _fix_sign(x.double().cpu().numpy())
        return best_threshold_split(flow, x, min_size=min_size), "no_threshold", None

    def accept_fn(walk, split):
        return split.ncut, float(threshold)

    with _one_blas_thread():
        return _run_recursion(P.shape[0], _Walk(P), split_fn, accept_fn, min_size, max_depth,
                              "threshold")
