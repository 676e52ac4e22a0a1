"""CAFE stage 3: hierarchical merging, level scores and granularity (paper 3, supplement A).

Algorithm 1 of EASe's supplement, line by line:

1. Remap the stage-2 label map to compact ids; spatial gradient ``grad F`` of the features;
   prototype ``p_k`` = mean feature of segment ``k`` (line 1-2).
2. For ``tau`` from ``tau_start = 0.99`` down to ``tau_end = 0.30`` in steps of ``0.001``
   (691 thresholds; lines 4-10): 4-connected adjacency ``A(i, j)`` and boundary strength
   ``B(i, j)`` (mean gradient magnitude along the shared border, normalised to [0, 1]);
   ``S(i, j) = [cos(p_i, p_j) - beta_bnd B(i, j)] A(i, j)`` (supp. eq. 1); all pairs with
   ``S > tau`` merge at once (union-find), prototypes become area-weighted means; segments
   under ``m = 50`` pixels are absorbed into their most similar neighbour; a snapshot is
   recorded (identical consecutive snapshots are kept once: the paper does not say).
3. Score every snapshot (supp. eq. 3, :func:`level_scores`), keep the top ``N = 40``
   (line 11), merge non-adjacent pairs with ``cos > tau_i^conn`` in each (lines 12-14), and
   store ``G_scale``, ``G_sem`` (supp. eq. 4) for levels with ``K >= 2`` (line 15).

**Incremental sweep.** Merges only grow as the threshold falls, so :func:`merge_sweep` keeps a
region adjacency graph (per pair of segments: border length and summed border gradient; per
segment: area and feature sum) and updates it at each merge; a threshold at which no pair
exceeds ``tau`` changes nothing, so the sweep jumps to the next threshold below the largest
``S``. :func:`merge_sweep_naive` recomputes adjacency, borders and prototypes from the pixel
label map at every one of the 691 thresholds; a test checks both give the same snapshots.

**Cost.** The only pass over pixels is :func:`_segment_sums` (per initial segment: sums of raw
and unit features, their max and min), on the ``(C, H W)`` features in place: blocks of pixels
are transposed into small reused buffers, chunks of pixels go to ``torch.get_num_threads()``
Python threads, and the float32-within-a-chunk, float64-across-chunks rounding does not depend
on either. Everything after works on the ``K`` initial segments: the sweep computes the
similarities it needs in batches, levels group segment rows (CH, ``G``, non-adjacent merging).

Our readings of what the supplement leaves open (each a parameter):

* ``B`` is normalised by dividing each pixel's gradient magnitude by the image's largest, so a
  border's mean lies in [0, 1] and does not change as other segments merge.
* "Absorb into the most similar neighbour": the smallest segment under ``m`` first (ties: the
  lowest id), into the adjacent segment of highest prototype cosine; repeated until none is
  left. A segment without neighbours (the whole image) stays.
* Level cost ``c_i`` ("normalised next-merge cost", undefined): the threshold gap from level
  ``i`` to the next level (to ``tau_end`` for the last), min-max normalised over the levels.
* Persistence gap: the supplement's "inter-level cost" is "the effective similarity threshold
  at which level i was produced", but thresholds fall along the sweep, so that value can never
  exceed 3 times the running mean of the earlier ones. ``gap_cost="dissimilarity"`` (default)
  uses ``1 - tau_i``, which grows along the sweep; ``"threshold"`` is the literal reading
  (never fires); ``"step"`` uses the threshold drop since the previous level.
* ``tau_i^conn``: the smallest ``S`` among the merges that produced level ``i``; a level
  produced without merges (only by absorption, or the first snapshot) uses its ``tau_i``.
* CH (supp. eq. 2) over all pixels (the grouper has no background), in L2-normalised feature
  space; ``K = 1`` gets ``CH = 0``. ``level_score="supplement"`` is eq. 3; ``"ch"`` ranks by
  CH alone, as the main text (sec. 3.2) says.
* With every pixel in the foreground, ``G_scale = (1/K) sum_k a_k / sum_j a_j = 1/K`` exactly;
  pass ``foreground`` to exclude a background.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from segbook.groupers import cafe_native

__all__ = ["Level", "MergeHierarchy", "Snapshot", "SweepData", "granularity",
           "hierarchical_merging", "level_scores", "merge_sweep", "merge_sweep_naive",
           "sweep_data", "thresholds"]


def thresholds(tau_start: float = 0.99, tau_end: float = 0.30, step: float = 0.001) -> np.ndarray:
    """The sweep's thresholds, from ``tau_start`` down to ``tau_end`` inclusive (691 by default),
    computed from integers so that no rounding drift accumulates."""
    n = round((tau_start - tau_end) / step) + 1
    return np.array([round(tau_start - i * step, 12) for i in range(n)])


def _compact(labels: np.ndarray) -> np.ndarray:
    _, inv = np.unique(labels, return_inverse=True)
    return inv.reshape(labels.shape).astype(np.int64)


def _canonical(mapping: np.ndarray) -> np.ndarray:
    """Relabel so that labels appear in order of first occurrence (partition identity)."""
    _, first, inv = np.unique(mapping, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv.reshape(-1)].reshape(mapping.shape).astype(np.int64)


@dataclass
class SweepData:
    """Per initial segment statistics and border pairs, computed once from pixels."""

    labels: np.ndarray          # (H, W) compact ids 0..K0-1
    area: np.ndarray            # (K0,)
    fsum: np.ndarray            # (K0, C) float64 sums of raw features
    nsum: np.ndarray            # (K0, C) float64 sums of unit features (CH)
    nsq: np.ndarray             # (K0,) sums of squared norms of unit features
    fmax: np.ndarray            # (K0, C)
    fmin: np.ndarray            # (K0, C)
    pairs: np.ndarray           # (P, 2) a < b, adjacent initial segments
    border_count: np.ndarray    # (P,) pixel pairs on the border
    border_grad: np.ndarray     # (P,) summed normalised gradient along the border
    grad: np.ndarray            # (H, W) normalised gradient magnitude
    features: torch.Tensor | None = None   # kept only for the naive sweep


def _border_pairs(labels: np.ndarray, grad: np.ndarray):
    """4-connected pixel pairs with different labels: ``(a, b, g)`` with ``a < b`` and ``g``
    the mean of the two pixels' normalised gradient magnitudes."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    g = np.concatenate([(grad[:, :-1] + grad[:, 1:]).ravel() / 2,
                        (grad[:-1, :] + grad[1:, :]).ravel() / 2])
    diff = a != b
    a, b, g = a[diff], b[diff], g[diff]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return lo, hi, g


def _pair_stats(labels: np.ndarray, grad: np.ndarray, K: int):
    lo, hi, g = _border_pairs(labels, grad)
    key = lo.astype(np.int64) * K + hi
    uniq, inv = np.unique(key, return_inverse=True)
    count = np.bincount(inv, minlength=len(uniq)).astype(np.int64)
    gsum = np.bincount(inv, weights=g, minlength=len(uniq))
    pairs = np.stack([uniq // K, uniq % K], axis=1) if len(uniq) else np.zeros((0, 2), np.int64)
    return pairs, count, gsum


_CHUNK = 16384      # pixels summed in float32 before the float64 total (fixes the rounding)
_BLOCK = 2048       # pixels transposed and processed at a time (a few MB: stays in cache)
_CHANNEL_BLOCK = 64  # channels per transposing copy


def _pixel_rows(X: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
    """Copy pixels ``start .. start + len(out)`` of the ``(C, N)`` feature matrix into ``out``
    as float32 rows ``(n, C)``.

    A single transposing copy reads one element from each of the ``C`` channel rows in turn,
    ``N`` elements apart: at ``C = 1024`` every element is on another memory page and the copy
    runs about ten times slower than a copy of ``_CHANNEL_BLOCK`` channels at a time, which
    reads from few pages."""
    n = out.shape[0]
    for c in range(0, X.shape[0], _CHANNEL_BLOCK):
        out[:, c:c + _CHANNEL_BLOCK].copy_(X[c:c + _CHANNEL_BLOCK, start:start + n].T)
    return out


def _chunk_stats(X: torch.Tensor, lab: torch.Tensor, start: int, stop: int):
    """Float32 statistics of pixels ``start .. stop`` (one chunk) of the ``(C, N)`` features:
    the segment ids present ``ids`` and, per id, the sums of raw and of unit features (in
    pixel order, ``index_add_``), the per-channel max and min; per pixel, the squared norm of
    its unit feature.

    The pixels are processed in blocks of ``_BLOCK`` rows (:func:`_pixel_rows`) in reused
    buffers that stay in cache; continuing the same accumulators block after block adds the
    same numbers in the same order as one pass over the chunk. Accumulators cover only the
    ids present (tens, not the image's ``K``)."""
    C, n = X.shape[0], stop - start
    ids, local = torch.unique(lab[start:stop], return_inverse=True)
    k = len(ids)
    fsum = torch.zeros(k, C)
    nsum = torch.zeros(k, C)
    fmax = torch.full((k, C), -np.inf)
    fmin = torch.full((k, C), np.inf)
    sq = torch.empty(n)
    x_buf = torch.empty(min(_BLOCK, n), C)
    xn_buf = torch.empty(min(_BLOCK, n), C)
    norm_buf = torch.empty(min(_BLOCK, n), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)           # index_reduce_ is "beta"
        for b in range(0, n, _BLOCK):
            m = min(_BLOCK, n - b)
            lb = local[b:b + m]
            x = _pixel_rows(X, start + b, x_buf[:m])
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, out=norm_buf[:m])
            xn = torch.div(x, norm.clamp_min_(1e-12), out=xn_buf[:m])
            fsum.index_add_(0, lb, x)
            nsum.index_add_(0, lb, xn)
            fmax.index_reduce_(0, lb, x, "amax")
            fmin.index_reduce_(0, lb, x, "amin")
            torch.sum(xn.square_(), 1, out=sq[b:b + m])
    return ids, fsum, nsum, fmax, fmin, sq


def _segment_sums(labels: np.ndarray, features: torch.Tensor, K: int,
                  native: bool | None = None, inv_norm: torch.Tensor | None = None):
    """Per-segment sums of raw features ``fsum`` and of unit features ``nsum``, sums of the
    squared norms of unit features ``nsq``, and per-channel ``fmax`` and ``fmin``.

    With the compiled kernels (``native`` None: when available, for float32 contiguous CPU
    features): one pass, channels over threads, float64 sums in pixel order
    (:func:`segbook.groupers.cafe_native.segment_stats`; ``inv_norm``, the pixels' inverse
    norms if already computed, e.g. by stages 1-2); ``nsq`` counts the pixels whose
    feature has a norm (1 each, 0 for a norm under 1e-12). Equal to the torch code below up to
    float32 rounding. Otherwise:

    Sums are accumulated in float32 over each chunk of ``_CHUNK`` pixels (:func:`_chunk_stats`)
    and in float64 across chunks, in chunk order; ``nsq`` in float64 over pixels, in pixel
    order. The chunk fixes the rounding, so the result does not depend on the number of
    threads: chunks are spread over ``torch.get_num_threads()`` Python threads, and their
    results are added up in chunk order as they come. The reductions into segments
    (``index_add_``, ``index_reduce_``) run on one thread whatever torch's setting, so
    threads over chunks are what makes a second core useful; while they run, torch is set to
    one thread (restored after) so that they do not each start a team of torch threads.

    The ``(C, H W)`` features are read in place, a block of pixels at a time: peak added
    memory is a few ``(_BLOCK, C)`` buffers and chunk results besides the ``(K, C)`` ones."""
    C = features.shape[0]
    X = features.reshape(C, -1)
    N = X.shape[1]
    lab = torch.from_numpy(np.ascontiguousarray(labels.reshape(-1), dtype=np.int64))
    if native is not False and cafe_native.available() and X.device.type == "cpu" \
            and X.dtype == torch.float32 and X.is_contiguous():
        inv = inv_norm if inv_norm is not None else cafe_native.unit_rows(X, bf16=False)[0]
        fsum, nsum, fmax, fmin = cafe_native.segment_stats(X, lab, K, inv)
        nsq = torch.zeros(K, dtype=torch.float64).index_add_(0, lab, (inv < 1e12).double())
        return (fsum.contiguous().numpy(), nsum.contiguous().numpy(), nsq.numpy(),
                fmax.double().contiguous().numpy(), fmin.double().contiguous().numpy())
    fsum = torch.zeros(K, C, dtype=torch.float64)
    nsum = torch.zeros(K, C, dtype=torch.float64)
    fmax = torch.full((K, C), -np.inf, dtype=torch.float32)
    fmin = torch.full((K, C), np.inf, dtype=torch.float32)
    sq = torch.empty(N)
    starts = range(0, N, _CHUNK)
    workers = max(1, min(torch.get_num_threads(), len(starts)))

    def chunk(s):
        return _chunk_stats(X, lab, s, min(s + _CHUNK, N))

    def add(s, stats):
        ids, fs, ns, mx, mn, q = stats
        fsum.index_add_(0, ids, fs.double())        # ids are distinct: one addition each
        nsum.index_add_(0, ids, ns.double())
        fmax[ids] = torch.maximum(fmax[ids], mx)
        fmin[ids] = torch.minimum(fmin[ids], mn)
        sq[s:s + len(q)] = q

    if workers == 1:
        for s in starts:
            add(s, chunk(s))
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                for s, stats in zip(starts, pool.map(chunk, starts)):
                    add(s, stats)
        finally:
            torch.set_num_threads(threads)
    nsq = torch.zeros(K, dtype=torch.float64).index_add_(0, lab, sq.double())
    return (fsum.numpy(), nsum.numpy(), nsq.numpy(), fmax.double().numpy(),
            fmin.double().numpy())


def sweep_data(labels: np.ndarray, features: torch.Tensor, gradient: np.ndarray | None = None,
               keep_features: bool = False,
               inv_norm: torch.Tensor | None = None) -> SweepData:
    """Compact the label map and gather what the sweep and the scores need (one pass)."""
    from segbook.groupers.cafe_stages import feature_gradient
    labels = _compact(np.asarray(labels))
    if tuple(labels.shape) != tuple(features.shape[1:]):
        raise ValueError(f"labels {labels.shape} and features {tuple(features.shape)} differ")
    K = int(labels.max()) + 1 if labels.size else 0
    grad = feature_gradient(features) if gradient is None else np.asarray(gradient, np.float64)
    gmax = float(grad.max()) if grad.size else 0.0
    grad = grad / gmax if gmax > 0 else np.zeros_like(grad)
    area = np.bincount(labels.ravel(), minlength=K).astype(np.int64)
    fsum, nsum, nsq, fmax, fmin = _segment_sums(labels, features, K, inv_norm=inv_norm)
    pairs, count, gsum = _pair_stats(labels, grad, K)
    return SweepData(labels, area, fsum, nsum, nsq, fmax, fmin, pairs, count, gsum, grad,
                     features if keep_features else None)


@dataclass
class Snapshot:
    """One level of the sweep: ``mapping`` initial segment -> label (canonical order),
    the threshold ``tau`` that produced it, the smallest ``S`` among its merges
    (``tau_conn``, NaN when no pair merged) and its number of segments ``k``."""

    mapping: np.ndarray
    tau: float
    tau_conn: float
    k: int


def _cos_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    num = (p * q).sum(-1)
    den = np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _find(parent: np.ndarray, a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def _roots(parent: np.ndarray) -> np.ndarray:
    """The root of every element of a union-find forest (what :func:`_find` returns for each),
    by pointer jumping over the whole array; ``parent`` is compressed to point at the roots."""
    roots = parent.copy()
    while True:
        up = roots[roots]
        if np.array_equal(up, roots):
            parent[:] = roots
            return roots
        roots = up


def merge_sweep(data: SweepData, taus: np.ndarray, beta_bnd: float = 0.0,
                min_size: int = 50) -> list[Snapshot]:
    """Lines 3-10 of Algorithm 1, incrementally (see the module docstring)."""
    K0 = len(data.area)
    parent = np.arange(K0)
    area = data.area.astype(np.float64).copy()
    fsum = data.fsum.copy()
    # adjacency of current roots: {root: {root: [count, gsum]}}
    adj: dict[int, dict[int, list]] = {k: {} for k in range(K0)}
    for (a, b), c, g in zip(data.pairs.tolist(), data.border_count.tolist(),
                            data.border_grad.tolist()):
        adj[a][b] = [c, g]
        adj[b][a] = [c, g]

    def sims(keys):
        """``S`` of each root pair ``(a, b)`` in ``keys``, as a list. One batched
        :func:`_cos_rows` call: numpy reduces each row as it reduces a single vector, so the
        values are those of a call per pair, bit for bit (merge order and ``tau_conn`` depend
        on them)."""
        if not keys:
            return []
        ab = np.array(keys, dtype=np.int64)
        cg = np.array([adj[a][b] for a, b in keys], dtype=np.float64)
        cos = _cos_rows(fsum[ab[:, 0]], fsum[ab[:, 1]])
        return (cos - beta_bnd * (cg[:, 1] / cg[:, 0])).tolist()

    touched: set[int] = set()

    def join(a, b):
        """Merge root b into root a (a < b), updating areas, sums and adjacency."""
        touched.add(a)
        touched.add(b)
        parent[b] = a
        area[a] += area[b]
        fsum[a] += fsum[b]
        for nb, (c, g) in adj.pop(b).items():
            del adj[nb][b]
            if nb == a:
                continue
            if nb in adj[a]:
                adj[a][nb][0] += c
                adj[a][nb][1] += g
            else:
                adj[a][nb] = [c, g]
            adj[nb][a] = adj[a][nb]

    def absorb():
        changed = False
        while True:
            small = [r for r in adj if area[r] < min_size and adj[r]]
            if not small:
                return changed
            r = min(small, key=lambda s: (area[s], s))
            nbs = list(adj[r])
            cos = _cos_rows(fsum[r][None], fsum[nbs]).tolist()
            best = max(zip(cos, nbs), key=lambda cn: (cn[0], -cn[1]))[1]
            a, b = min(r, best), max(r, best)
            join(a, b)
            changed = True

    snaps: list[Snapshot] = []
    keys = [(a, b) for a in adj for b in adj[a] if a < b]
    edge_sims = dict(zip(keys, sims(keys)))
    t = 0
    n = len(taus)
    while t < n:
        tau = float(taus[t])
        if touched:
            # only the pairs of segments that merged or grew change their similarity
            # (deleted and re-inserted in this order: the dict's order is the merge order)
            for key in [k for k in edge_sims if k[0] in touched or k[1] in touched]:
                del edge_sims[key]
            keys = [(min(a, b), max(a, b)) for a in touched if a in adj for b in adj[a]]
            edge_sims.update(zip(keys, sims(keys)))
            touched.clear()
        pairs = [(a, b, s) for (a, b), s in edge_sims.items() if s > tau]
        conn = min((s for _, _, s in pairs), default=np.nan)
        merged = bool(pairs)
        if merged:
            # simultaneous merges: union-find on the pairs above tau, smallest id as root
            for a, b, _ in pairs:
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    lo, hi = min(ra, rb), max(ra, rb)
                    # join() also keeps parent consistent
                    join(lo, hi)
        absorbed = absorb()
        if merged or absorbed or not snaps:
            mapping = _canonical(_roots(parent))
            snaps.append(Snapshot(mapping, tau, float(conn), int(mapping.max()) + 1 if K0 else 0))
            t += 1
            continue
        # nothing above tau and nothing to absorb: jump to the first threshold below max S
        smax = max(edge_sims.values(), default=-np.inf)
        below = np.nonzero(taus[t + 1:] < smax)[0]
        if not len(below):
            break
        t = t + 1 + int(below[0])
    return snaps


def merge_sweep_naive(data: SweepData, taus: np.ndarray, beta_bnd: float = 0.0,
                      min_size: int = 50) -> list[Snapshot]:
    """Lines 3-10 of Algorithm 1 as written: every threshold rebuilds adjacency, borders and
    prototypes from the pixel label map (the reference for :func:`merge_sweep`; slow)."""
    if data.features is None:
        raise ValueError("merge_sweep_naive needs sweep_data(..., keep_features=True)")
    feats = data.features
    C = feats.shape[0]
    X = feats.reshape(C, -1).T.double().numpy()
    L = data.labels.copy()
    K0 = len(data.area)
    # which initial segment each current label holds (for snapshots as mappings)
    snaps: list[Snapshot] = []
    prev = None

    def stats(L):
        ids = np.unique(L)
        flat = L.ravel()
        protos = {int(i): X[flat == i].mean(0) for i in ids}
        areas = {int(i): int((flat == i).sum()) for i in ids}
        lo, hi, g = _border_pairs(L, data.grad)
        edges = {}
        for a, b, gg in zip(lo.tolist(), hi.tolist(), g.tolist()):
            e = edges.setdefault((a, b), [0, 0.0])
            e[0] += 1
            e[1] += gg
        return protos, areas, edges

    for tau in taus.tolist():
        protos, areas, edges = stats(L)
        S = {(a, b): float(_cos_rows(protos[a], protos[b])) - beta_bnd * g / c
             for (a, b), (c, g) in edges.items()}
        merge = [(a, b, s) for (a, b), s in S.items() if s > tau]
        conn = min((s for _, _, s in merge), default=np.nan)
        parent = {i: i for i in protos}

        def find(a, parent=parent):
            while parent[a] != a:
                a = parent[a]
            return a
        for a, b, _ in merge:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        L = np.vectorize(lambda v: find(int(v)), otypes=[np.int64])(L) if merge else L
        # absorb small segments, recomputing from pixels after each absorption
        while True:
            protos, areas, edges = stats(L)
            nbrs: dict[int, set] = {}
            for a, b in edges:
                nbrs.setdefault(a, set()).add(b)
                nbrs.setdefault(b, set()).add(a)
            small = [r for r in areas if areas[r] < min_size and nbrs.get(r)]
            if not small:
                break
            r = min(small, key=lambda s: (areas[s], s))
            best = max(nbrs[r], key=lambda nb: (float(_cos_rows(protos[r], protos[nb])), -nb))
            lo, hi = min(r, best), max(r, best)
            L = np.where(L == hi, lo, L)
        # the label of each initial segment (initial segments are never split)
        mapping = np.zeros(K0, dtype=np.int64)
        mapping[data.labels.ravel()] = L.ravel()
        mapping = _canonical(mapping)
        if prev is None or not np.array_equal(mapping, prev):
            snaps.append(Snapshot(mapping, float(tau), float(conn), int(mapping.max()) + 1))
            prev = mapping
    return snaps


def _group_rows(values: np.ndarray, mapping: np.ndarray, K: int) -> np.ndarray:
    """Sum the rows of ``values`` by group ``mapping`` (``np.add.at``, but fast)."""
    out = torch.zeros(K, values.shape[1], dtype=torch.float64)
    out.index_add_(0, torch.from_numpy(np.ascontiguousarray(mapping)),
                   torch.from_numpy(values))
    return out.numpy()


def _level_sums(data: SweepData, mapping: np.ndarray):
    K = int(mapping.max()) + 1
    area = np.bincount(mapping, weights=data.area, minlength=K)
    return K, area, _group_rows(data.nsum, mapping, K)


def calinski_harabasz(data: SweepData, mapping: np.ndarray) -> float:
    """CH (supp. eq. 2) of a level in L2-normalised feature space, from per-segment sums:
    ``[B / (K - 1)] / [W / (n - K)]`` with ``B = sum_k |S_k|^2 / n_k - |S|^2 / n`` and
    ``W = sum_x |x|^2 - sum_k |S_k|^2 / n_k``. 0 when ``K < 2`` or ``K >= n``."""
    K, area, nsum = _level_sums(data, mapping)
    n = float(data.area.sum())
    if K < 2 or K >= n:
        return 0.0
    between_k = (np.square(nsum).sum(1) / np.maximum(area, 1)).sum()
    total = np.square(nsum.sum(0)).sum() / n
    B = max(between_k - total, 0.0)
    W = max(float(data.nsq.sum()) - between_k, 1e-12 * n)
    return float((B / (K - 1)) / (W / (n - K)))


def level_scores(snaps: list[Snapshot], data: SweepData, tau_end: float = 0.30,
                 lam: float = 0.25, gap_bonus: float = 0.2, gap_factor: float = 3.0,
                 gap_cost: str = "dissimilarity", score: str = "supplement"):
    """Score every snapshot (supp. eq. 3): ``s_i = (1 - lambda) c^_i + lambda CH^_i + gamma_i``.

    Returns ``(scores, ch, cost, gaps)`` arrays. ``score="ch"`` returns CH alone (sec. 3.2's
    ranking). See the module docstring for ``c_i``, the gap rule and ``gap_cost``.
    """
    if score not in ("supplement", "ch"):
        raise ValueError(f"score must be 'supplement' or 'ch', got {score!r}")
    if gap_cost not in ("dissimilarity", "threshold", "step"):
        raise ValueError(f"gap_cost must be 'dissimilarity', 'threshold' or 'step', got "
                         f"{gap_cost!r}")
    M = len(snaps)
    ch = np.array([calinski_harabasz(data, s.mapping) for s in snaps])
    taus = np.array([s.tau for s in snaps])
    nxt = np.append(taus[1:], tau_end)
    cost = taus - nxt
    span = cost.max() - cost.min() if M else 0.0
    c_hat = (cost - cost.min()) / span if span > 0 else np.zeros(M)
    ch_hat = ch / ch.max() if M and ch.max() > 0 else np.zeros(M)
    if gap_cost == "dissimilarity":
        inter = 1.0 - taus
    elif gap_cost == "threshold":
        inter = taus.copy()
    else:
        inter = np.append(0.0, taus[:-1] - taus[1:]) if M else taus
    gaps = np.zeros(M, dtype=bool)
    for i in range(1, M):
        gaps[i] = inter[i] > gap_factor * inter[:i].mean()
    if score == "ch":
        return ch.copy(), ch, cost, gaps
    return (1 - lam) * c_hat + lam * ch_hat + gap_bonus * gaps, ch, cost, gaps


def granularity(data: SweepData, mapping: np.ndarray, foreground: np.ndarray | None = None):
    """``(G_scale, G_sem)`` of a level (supp. eq. 4), over ``foreground`` initial segments (all
    by default, in which case ``G_scale = 1/K``). ``psi_k`` = mean over channels of the
    feature range (max - min) within segment ``k``; ``psi`` the same over the foreground.

    The per-level maxima and minima are grouped from the initial segments' (``data.fmax``,
    ``data.fmin``); ``psi``'s extremes are the maxima and minima of the grouped ones (the same
    numbers: max and min round nothing), and without ``foreground`` nothing is copied."""
    if foreground is None:
        m, area0, fmax0, fmin0 = mapping, data.area, data.fmax, data.fmin
    else:
        keep = np.asarray(foreground, bool)
        m, area0, fmax0, fmin0 = mapping[keep], data.area[keep], data.fmax[keep], data.fmin[keep]
    ids, m = np.unique(m, return_inverse=True)
    K = len(ids)
    if K == 0:
        return float("nan"), float("nan")
    area = np.bincount(m, weights=area0, minlength=K)
    g_scale = float(np.mean(area / area.sum()))
    C = fmax0.shape[1]
    idx = torch.from_numpy(np.ascontiguousarray(m))[:, None].expand(-1, C)
    fmax = torch.full((K, C), -np.inf, dtype=torch.float64).scatter_reduce_(
        0, idx, torch.from_numpy(fmax0), "amax").numpy()
    fmin = torch.full((K, C), np.inf, dtype=torch.float64).scatter_reduce_(
        0, idx, torch.from_numpy(fmin0), "amin").numpy()
    psi_k = (fmax - fmin).mean(1)
    psi = float((fmax.max(0) - fmin.min(0)).mean())
    g_sem = float(np.mean(np.minimum(psi_k / psi, 1.0))) if psi > 0 else 1.0
    return g_scale, g_sem


def non_adjacent_merge(data: SweepData, mapping: np.ndarray, tau_conn: float) -> np.ndarray:
    """Lines 12-14 of Algorithm 1: merge non-adjacent segments of a level whose prototype
    cosine exceeds ``tau_conn`` (all at once: the connected components of the graph of such
    pairs, whatever the order in which they are joined)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components
    K = int(mapping.max()) + 1
    fsum = _group_rows(data.fsum, mapping, K)
    norm = np.linalg.norm(fsum, axis=1, keepdims=True)
    P = torch.from_numpy(fsum / np.where(norm > 0, norm, 1.0))
    # torch's product, not numpy's: with two threads, numpy's BLAS threads and torch's (which
    # group the rows here and in granularity) would keep taking the cores from each other
    link = np.triu((P @ P.T).numpy() > tau_conn, 1)
    la, lb = mapping[data.pairs[:, 0]], mapping[data.pairs[:, 1]]
    link[la, lb] = False                       # adjacent segments are not this step's
    link[lb, la] = False
    _, comp = connected_components(csr_matrix(link), directed=False)
    return _canonical(comp[mapping])


@dataclass
class Level:
    """A retained level: ``mapping`` initial segment -> label, its pixel ``labels`` (via
    :meth:`MergeHierarchy.labels`), ``k``, the sweep threshold ``tau``, ``tau_conn``, its score
    and ``(g_scale, g_sem)`` (NaN for ``K < 2``)."""

    mapping: np.ndarray
    k: int
    tau: float
    tau_conn: float
    score: float
    ch: float
    gap: bool
    g_scale: float
    g_sem: float
    snapshot: int


@dataclass
class MergeHierarchy:
    """Stage 3's output: the retained levels in sweep order (fine to coarse before each
    level's non-adjacent merge), all snapshots, and the initial (compact) label map they
    index."""

    levels: list[Level]
    snapshots: list[Snapshot]
    initial: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def labels(self, i: int) -> np.ndarray:
        """Pixel labels ``(H, W)`` of retained level ``i``."""
        return self.levels[i].mapping[self.initial]

    def granularities(self) -> np.ndarray:
        return np.array([[lv.g_scale, lv.g_sem] for lv in self.levels])

    def nearest_level(self, target) -> int:
        """Index of the level whose ``(G_scale, G_sem)`` is nearest ``target`` (Euclidean;
        levels with ``K < 2`` have no scores and are skipped unless no other level exists)."""
        g = self.granularities()
        t = np.asarray(target, dtype=np.float64)
        d = np.sqrt(np.square(g - t).sum(1))
        d = np.where(np.isfinite(d), d, np.inf)
        return int(np.argmin(d)) if np.isfinite(d).any() else 0


def hierarchical_merging(labels: np.ndarray, features: torch.Tensor, tau_start: float = 0.99,
                         tau_end: float = 0.30, step: float = 0.001, beta_bnd: float = 0.0,
                         min_size: int = 50, top_n: int = 40, lam: float = 0.25,
                         gap_bonus: float = 0.2, gap_factor: float = 3.0,
                         gap_cost: str = "dissimilarity", score: str = "supplement",
                         non_adjacent: bool = True, gradient: np.ndarray | None = None,
                         naive: bool = False, foreground=None,
                         inv_norm: torch.Tensor | None = None) -> MergeHierarchy:
    """Algorithm 1 of EASe's supplement (CAFE stage 3) on a label map and its features.

    Parameters are the supplement's (Table 1): ``tau_start`` 0.99, ``tau_end`` 0.30, ``step``
    0.001, ``beta_bnd`` 0, ``min_size`` ``m`` = 50, ``top_n`` ``N`` = 40, ``lam`` 0.25,
    ``gap_bonus`` 0.2 at a gap of ``gap_factor`` 3; ``score`` ``"supplement"`` (eq. 3) or
    ``"ch"`` (main text); ``non_adjacent`` runs lines 12-14; ``naive`` uses
    :func:`merge_sweep_naive`. ``foreground``: ``(H, W)`` bool pixels scored by ``G`` (None:
    all). ``inv_norm``: the pixels' inverse feature norms ``(H W,)`` if already computed
    (:class:`~segbook.groupers.cafe_stages.PixelFeatures` has them), so that they are not
    computed again.
    """
    data = sweep_data(labels, features, gradient, keep_features=naive, inv_norm=inv_norm)
    taus = thresholds(tau_start, tau_end, step)
    sweep = merge_sweep_naive if naive else merge_sweep
    snaps = sweep(data, taus, beta_bnd, min_size)
    scores, ch, _cost, gaps = level_scores(snaps, data, tau_end, lam, gap_bonus, gap_factor,
                                          gap_cost, score)
    order = np.argsort(-scores, kind="stable")[:top_n]
    keep = sorted(order.tolist())             # fine to coarse (sweep order)
    fg = None
    if foreground is not None:
        fgpix = np.asarray(foreground, bool)
        K0 = len(data.area)
        frac = np.bincount(data.labels.ravel(), weights=fgpix.ravel(), minlength=K0)
        fg = frac > data.area / 2
    levels = []
    for i in keep:
        s = snaps[i]
        mapping = s.mapping
        if non_adjacent:
            conn = s.tau_conn if np.isfinite(s.tau_conn) else s.tau
            mapping = non_adjacent_merge(data, mapping, conn)
        k = int(mapping.max()) + 1
        gs = granularity(data, mapping, fg) if k >= 2 else (float("nan"), float("nan"))
        levels.append(Level(mapping, k, s.tau, s.tau_conn, float(scores[i]), float(ch[i]),
                            bool(gaps[i]), gs[0], gs[1], i))
    return MergeHierarchy(levels=levels, snapshots=snaps, initial=data.labels, scores=scores)
