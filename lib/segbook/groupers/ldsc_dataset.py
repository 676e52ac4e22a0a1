"""Layer-distributed spectral clustering across a dataset (paper 2, sections 3.3 and 4.2).

The per-image method (:mod:`segbook.groupers.ldsc`) finds channels that are near-eigenvectors
of every attention map of one image. Section 3.3 of paper 2 does the same **across images**:
per layer, one sparse graph over all tokens of a mini-batch of images
(:func:`segbook.graphs.knn.dataset_knn_graph`: top-50 neighbours in the same image and top-50
in the others), built from the layer's values (**V-V**) or from its queries against its keys
(**Q-K**), and one table of channels per image. Section 4.2 finds that V-V graphs cluster by
*what* a token is (Tables 2-3) and Q-K graphs by *where* it is (Table 4).

What this module implements, following the authors' code (``L/main_cls.py``,
``L/model_seg.py``, ``L/train_utils.py``; see ``shared/reference/PAPER2_JAFAR_EASE_FACTS.md``
section 2) where the paper's text is silent:

* **Layers** (:func:`decoder_token_layers`): Stable Diffusion's mid block and ``up_blocks[1..2]``
  self-attention, the finest (64 x 64) decoder layers skipped, heads concatenated (vectors of
  1280 and 640 dims for SD 1.4), one graph per layer. Each mini-batch reads one fresh noised
  U-Net pass per image, ``t ~ U{0..299}``.
* **Variables**: a free table ``randn(K, G, G)`` per dataset image (``K = 100``, ``G = 32``),
  softmax over the ``K`` channels (the paper: "a learnable feature map initialised from a
  normal distribution").
* **Objective** (:func:`dataset_loss`, paper 2 eq. 5 applied to the dataset graphs): per layer,
  the batch's tables are average-pooled to the layer's grid, flattened image-major to
  ``(B n, K)``, and every channel L2-normalised over **all** nodes of the mini-batch;
  ``e_i = z_i^T A z_i`` with ``A = D^-1 A``; per-layer weight ``w = G / side`` (4, 2, 1 for
  8, 16, 32) inside both terms::

      L = mean_{l,i} | w_l (e_i - 1) | + mean_{l, i != j} w_l (z_i^T z_j)^2

  (eig and ortho weights 1, not the per-image 2).
* **Optimisation** (:class:`DatasetSpectralClustering`): AdamW (lr ``1e-2``, weight decay 0),
  ``inner_steps`` (5) steps per mini-batch on the same graphs, an EMA copy of the tables
  (momentum 0.99) updated once per mini-batch; the EMA tables are what is evaluated. Batch 40
  per process, shuffled, last incomplete batch dropped. Seeded: each image's table is drawn
  from its own generator (seed, image index), each epoch's order from (seed, epoch), each
  U-Net pass from (seed, iteration, image), so a run is reproducible and resumable exactly.
* **Checkpoints**: every ``checkpoint_every`` mini-batches and at the end, one file written
  atomically (temporary file, then rename) by rank 0 with every image's table, EMA and
  AdamW state; ``fit(..., checkpoint=path)`` resumes from it and ends with the same tables
  as an uninterrupted run.
* **torchrun** (``torch.distributed``, gloo on CPU, NCCL on GPUs): images are sharded by rank
  (``images[rank::world]``), each rank builds its graphs from its own mini-batch of
  ``batch_size`` images (as the authors' 4-GPU run did: a graph never spans two GPUs) and
  owns its images' tables. Because no parameter is shared between ranks, there is no gradient
  to all-reduce: DDP would only add zero gradients (and divide by the world size, which Adam
  cancels), so the ranks synchronise only to write checkpoints and to evaluate. Hence a run
  on ``w`` processes gives exactly the tables of ``w`` one-process runs on the shards
  (``shard=(rank, world)`` runs one shard in one process; the gloo test checks this).

Evaluation (:func:`evaluate_tables`, the code's ``L/eval_utils.py``; paper Tables 2-3): EMA
tables softmaxed, no per-channel normalisation, the ``(pixels, K)`` matrix over all images
decomposed (``X = U S V^T``, here exactly through the ``K x K`` Gram matrix, which under
torchrun is one all-reduce; the code uses ``torch.svd_lowrank``), the first ``dims`` (27)
columns of ``U S`` kept, K-means (``n_clusters``, ``random_state=0``) over all pixels of all
images, labels upsampled (nearest) to the ground truth, then **greedy many-to-one** matching
(the paper's Table 2; protocol ``"dataset_majority"`` of :mod:`segbook.eval`) **and Hungarian**
(``"dataset"``), counts accumulated over the dataset (all-reduced under torchrun).

The 'where' probes of Table 4: :func:`coordinate_regression` (least squares with bias from
per-pixel features to the (x, y) cell of a 32 x 32 grid, random 80/20 split, mean of the x and
y MSE; predicting the mean gives ``(32^2 - 1)/12 = 85.25``) and :func:`spatial_split_labels`
(every class split into left and right copies by connected component).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segbook.book.results import atomic_torch_save
from segbook.errors import GraphError
from segbook.graphs.knn import KnnGraph, dataset_knn_graph

__all__ = [
    "DatasetFit", "DatasetSpectralClustering", "GraphLayer", "TokenLayer", "TokenSource",
    "build_graphs", "cluster_pixels", "cnn_token_source", "coordinate_regression",
    "dataset_eigenvector_images", "dataset_loss", "decoder_token_layers", "evaluate_tables",
    "kmeans_feature_labels", "planted_token_source", "score_clusters", "sd_token_source",
    "spatial_split_labels",
    "table_features",
]

GRAPHS = ("vv", "qk")
PAPER2_DATASET_MAX_T = 300          # the code draws t = (rand * 300).long(): 0..299


# -- tokens and graphs -------------------------------------------------------------------------
@dataclass
class TokenLayer:
    """One layer's per-token vectors for one image: ``v`` ``(n, d)`` (values, or a CNN's
    features), ``q``/``k`` ``(n, d)`` (None for a CNN), on grid ``(h, w)``."""

    name: str
    grid: tuple[int, int]
    v: torch.Tensor
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None


@dataclass
class GraphLayer:
    """One layer's dataset-level graph over a mini-batch."""

    name: str
    grid: tuple[int, int]
    graph: KnnGraph


def _heads_concatenated(t: torch.Tensor) -> torch.Tensor:
    """``(H, n, d)`` -> ``(n, H d)`` (the code reads to_q/to_k/to_v without splitting heads)."""
    if t.dim() == 2:
        return t
    H, n, d = t.shape
    return t.permute(1, 0, 2).reshape(n, H * d)


def decoder_token_layers(capture, skip_finest: bool = True) -> list[TokenLayer]:
    """Q/K/V of the decoder's self-attention layers of a Stable Diffusion capture (made with
    ``qkv=True``), heads concatenated; the finest decoder grid skipped (the code skips
    sequence length 4096, i.e. 64 x 64 at 512 px, leaving the mid block and ``up_blocks[1..2]``).
    """
    layers = [layer for layer in capture if layer.kind == "self_attention"
              and layer.name.startswith(("mid_block", "up_blocks"))]
    if not layers:
        raise GraphError("the capture has no decoder self-attention layer")
    if any(layer.q is None or layer.k is None or layer.v is None for layer in layers):
        raise GraphError("capture Q/K/V with qkv=True for dataset-level graphs")
    finest = max(layer.grid[0] * layer.grid[1] for layer in layers)
    out = [TokenLayer(layer.name, tuple(layer.grid), _heads_concatenated(layer.v),
                      _heads_concatenated(layer.q), _heads_concatenated(layer.k))
           for layer in layers if not (skip_finest and layer.grid[0] * layer.grid[1] == finest)]
    if not out:
        raise GraphError("no decoder layer is left once the finest grid is skipped")
    return out


class TokenSource:
    """What the trainer reads: ``source(image_index, draw)`` -> list of :class:`TokenLayer`.

    ``deterministic``: the tokens do not depend on ``draw`` (a CNN), so a mini-batch seen
    twice gives the same graphs and the trainer may reuse them."""

    deterministic = False

    def __init__(self, fn: Callable[[int, int], list[TokenLayer]], n_images: int,
                 deterministic: bool = False, label: str = ""):
        self.fn, self.n_images, self.deterministic, self.label = fn, int(n_images), deterministic, label

    def __call__(self, index: int, draw: int) -> list[TokenLayer]:
        return self.fn(int(index), int(draw))

    def __len__(self) -> int:
        return self.n_images


def sd_token_source(backbone, images: Sequence, size: int = 512, seed: int = 0,
                    skip_finest: bool = True) -> TokenSource:
    """Fresh noised U-Net passes (the code: one ``t ~ U{0..299}`` and fresh noise per image and
    mini-batch, the empty prompt), decoder Q/K/V via :func:`decoder_token_layers`. Draw
    ``d`` of image ``i`` is seeded by ``(seed, d, i)``."""

    def fn(i, draw):
        g = np.random.default_rng([int(seed), int(draw), int(i)])
        t = int(g.integers(0, PAPER2_DATASET_MAX_T))
        cap = backbone.capture(images[i], layers="decoder", mode="noised", t=t,
                               seed=int(g.integers(0, 2**31 - 1)), size=size, qkv=True,
                               progress=False)
        return decoder_token_layers(cap, skip_finest)

    return TokenSource(fn, len(images), deterministic=False, label=backbone.name)


def cnn_token_source(backbone, images: Sequence, size: int = 256,
                     layers: Sequence[str] | None = None, stride_max: int = 32) -> TokenSource:
    """The CNN stand-in: each block's features act as its "values" (V-V graphs only; a CNN
    has no queries and keys). Default blocks: the last one at each stride 8..``stride_max``
    (three grids, like SD's 32/16/8 at 512 px). Features are computed once per image."""
    if layers is None:
        table = backbone.layers(size)
        last_at = {}
        for name, info in table.items():
            if name.startswith("blocks.") and 8 <= info["stride"] <= stride_max:
                last_at[info["stride"]] = name
        layers = [last_at[s] for s in sorted(last_at)]
    layers = list(layers)
    cache: dict[int, list[TokenLayer]] = {}

    def fn(i, draw):
        if i not in cache:
            maps = backbone.feature_maps(images[i], layers, size=size)
            cache[i] = [TokenLayer(n, tuple(maps[n].shape[1:]),
                                   maps[n].float().cpu().reshape(maps[n].shape[0], -1).T.contiguous())
                        for n in layers]
        return cache[i]

    return TokenSource(fn, len(images), deterministic=True, label=backbone.name)


def planted_token_source(labels: Sequence[np.ndarray], grids=(8, 4), dim: int = 16,
                         noise: float = 0.5, qk: bool = True, seed: int = 0) -> TokenSource:
    """Tokens with a known answer: image ``i``'s tokens on each grid carry the embedding of
    their class in ``labels[i]`` (one random unit vector per class, **shared by every image**,
    as a semantic class is) plus Gaussian noise. Queries and keys carry the token's position
    instead (a 2-D sin/cos code of its cell), so V-V graphs link same-class tokens across
    images and Q-K graphs link same-place tokens: the 'what' and 'where' of paper 2's
    section 4.2, planted. Labels are ``(H, W)`` ints; each grid takes the majority label."""
    from segbook.pipelines.synthetic import _downsample_labels
    labels = [np.asarray(lab) for lab in labels]
    n_classes = int(max(lab.max() for lab in labels)) + 1
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n_classes, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    def position(h, w):
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        f = np.arange(1, dim // 4 + 1)[None, :]
        code = [np.sin(np.pi * xs.reshape(-1, 1) * f), np.cos(np.pi * xs.reshape(-1, 1) * f),
                np.sin(np.pi * ys.reshape(-1, 1) * f), np.cos(np.pi * ys.reshape(-1, 1) * f)]
        return np.concatenate(code, 1)

    def fn(i, draw):
        g = np.random.default_rng([int(seed), int(i)])
        out = []
        for j, side in enumerate(grids):
            lab = _downsample_labels(labels[i], side).reshape(-1)
            v = emb[lab] + noise * g.standard_normal((lab.size, dim)) / math.sqrt(dim)
            q = k = None
            if qk:
                pos = position(side, side)
                q = pos + noise * g.standard_normal(pos.shape) / math.sqrt(dim)
                k = pos + noise * g.standard_normal(pos.shape) / math.sqrt(dim)
                q, k = torch.from_numpy(q).float(), torch.from_numpy(k).float()
            out.append(TokenLayer(f"planted.{j}", (side, side), torch.from_numpy(v).float(), q, k))
        return out

    return TokenSource(fn, len(labels), deterministic=True, label="planted")


def build_graphs(tokens: Sequence[list[TokenLayer]], graph: str = "vv", k_intra: int = 50,
                 k_inter: int = 50, threshold: float = 0.1, chunk: int = 512) -> list[GraphLayer]:
    """One :func:`~segbook.graphs.knn.dataset_knn_graph` per layer over a mini-batch
    (``tokens[b]`` = image ``b``'s layers, all images with the same layers)."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    out = []
    for j, first in enumerate(tokens[0]):
        per = [t[j] for t in tokens]
        if any(p.name != first.name or p.grid != first.grid for p in per):
            raise GraphError(f"layer {first.name}: images of the mini-batch differ in layers or grids")
        if graph == "vv":
            x, y = torch.cat([p.v.cpu() for p in per]), None
        else:
            if first.q is None or first.k is None:
                raise GraphError(f"layer {first.name}: a Q-K graph needs queries and keys; a "
                                 "CNN stand-in has neither (use graph='vv')")
            x, y = torch.cat([p.q.cpu() for p in per]), torch.cat([p.k.cpu() for p in per])
        n = first.grid[0] * first.grid[1]
        try:
            g = dataset_knn_graph(x, y, n, k_intra, k_inter, threshold, chunk)
        except GraphError as e:
            raise GraphError(f"layer {first.name}: {e}") from None
        out.append(GraphLayer(first.name, first.grid, g))
    return out


# -- the objective -----------------------------------------------------------------------------
@dataclass
class LossTerms:
    loss: torch.Tensor
    eig: torch.Tensor
    ortho: torch.Tensor


def dataset_loss(Z: torch.Tensor, layers: Sequence[GraphLayer]) -> LossTerms:
    """Paper 2's objective over dataset graphs (the code's ``subsample_feat_and_solve_ncut_semantic``).

    ``Z``: ``(B, K, G, G)`` channels of the mini-batch (already softmaxed). Per layer with grid
    ``(h, w)``: adaptive average pooling to ``(h, w)``, image-major ``(B h w, K)``, each channel
    L2-normalised over all ``B h w`` nodes, ``e = diag(Z^T A Z)``, weight ``w = G / h``::

        eig   = mean_{l,i} |w_l (e_{l,i} - 1)|
        ortho = mean_{l, i != j} w_l (Z_l^T Z_l)_{ij}^2
        loss  = eig + ortho
    """
    B, K, G, _ = Z.shape
    eig, ortho = [], []
    off = ~torch.eye(K, dtype=torch.bool, device=Z.device)
    for layer in layers:
        h, w = layer.grid
        if B * h * w != layer.graph.n_nodes:
            raise GraphError(f"layer {layer.name}: graph has {layer.graph.n_nodes} nodes, the "
                             f"mini-batch {B} x {h} x {w}")
        pooled = Z if (h, w) == (G, G) else F.adaptive_avg_pool2d(Z, (h, w))
        X = pooled.permute(0, 2, 3, 1).reshape(B * h * w, K)
        X = X / X.norm(dim=0, keepdim=True).clamp_min(1e-12)
        e = (X * layer.graph.matmul(X)).sum(0)
        weight = G / h
        eig.append((weight * (e - 1)).abs())
        gram = X.T @ X
        ortho.append(weight * gram[off] ** 2)
    eig_t, ortho_t = torch.cat(eig).mean(), torch.cat(ortho).mean()
    return LossTerms(eig_t + ortho_t, eig_t, ortho_t)


# -- the trainer -------------------------------------------------------------------------------
@dataclass
class DatasetFit:
    """What :meth:`DatasetSpectralClustering.fit` returns (this rank's shard)."""

    images: list[int]                     # global indices of this rank's images
    tables: torch.Tensor                  # (M, K, G, G) raw tables (before softmax)
    ema: torch.Tensor                     # (M, K, G, G) EMA tables (what is evaluated)
    history: list[dict] = field(default_factory=list)
    iterations: int = 0
    resumed_from: int = 0
    seconds: dict = field(default_factory=dict)


def _dist():
    import torch.distributed as dist
    return dist if (dist.is_available() and dist.is_initialized()) else None



class DatasetSpectralClustering:
    """Paper 2's dataset-level spectral clustering (section 3.3), trained over a dataset.

    Parameters
    ----------
    graph : ``"vv"`` (values, 'what') or ``"qk"`` (queries against keys, 'where').
    n_channels : ``K`` channels per table (the code's 100).
    table_size : ``G``; None: the finest graph grid (32 for SD 1.4 at 512 px).
    batch_size : images per mini-batch and process (the code's 40).
    iterations : mini-batches to train (the paper: 2100 at batch 160 on 4 GPUs).
    inner_steps : AdamW steps per mini-batch on the same graphs (5).
    lr, weight_decay : AdamW (``1e-2``, 0).
    ema : EMA momentum of the evaluated tables (0.99).
    k_intra, k_inter, threshold, chunk : the graphs (:func:`~segbook.graphs.knn.dataset_knn_graph`).
    checkpoint_every : mini-batches between checkpoints (0: only at the end).
    seed : tables, order, noise.
    device : where the tables and the optimisation live (``"auto"``: CUDA when available);
        graphs are built on the CPU (chunked top-k) and moved there.
    progress : a tqdm bar on rank 0.

    Bad input: a source whose images disagree in layers, NaN features (``GraphError`` naming the
    layer), a batch larger than a rank's shard (``ValueError``), a checkpoint from other
    settings (``ValueError`` naming the difference).
    """

    def __init__(self, graph: str = "vv", n_channels: int = 100, table_size: int | None = None,
                 batch_size: int = 40, iterations: int = 2100, inner_steps: int = 5,
                 lr: float = 1e-2, weight_decay: float = 0.0, ema: float = 0.99,
                 k_intra: int = 50, k_inter: int = 50, threshold: float = 0.1, chunk: int = 512,
                 checkpoint_every: int = 50, seed: int = 12345, progress: bool = True,
                 device="cpu"):
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        if int(batch_size) < 1 or int(inner_steps) < 1 or int(iterations) < 0:
            raise ValueError("batch_size and inner_steps must be >= 1, iterations >= 0")
        self.graph, self.n_channels, self.table_size = graph, int(n_channels), table_size
        self.batch_size, self.iterations, self.inner_steps = int(batch_size), int(iterations), int(inner_steps)
        self.lr, self.weight_decay, self.ema = float(lr), float(weight_decay), float(ema)
        self.k_intra, self.k_inter, self.threshold, self.chunk = int(k_intra), int(k_inter), float(threshold), int(chunk)
        self.checkpoint_every, self.seed, self.progress = int(checkpoint_every), int(seed), bool(progress)
        self.device = device

    def params(self) -> dict:
        keys = ("graph", "n_channels", "table_size", "batch_size", "iterations", "inner_steps",
                "lr", "weight_decay", "ema", "k_intra", "k_inter", "threshold", "chunk", "seed")
        return {**{k: getattr(self, k) for k in keys}, "device": str(self.device)}

    # the parts of params() a checkpoint must agree with
    _RESUME_KEYS = ("graph", "n_channels", "batch_size", "inner_steps", "lr", "weight_decay",
                    "ema", "k_intra", "k_inter", "threshold", "seed")

    def _init_table(self, index: int, K: int, G: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        return torch.randn(K, G, G, generator=g)

    def _order(self, shard: list[int], epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + int(epoch))
        return [shard[i] for i in torch.randperm(len(shard), generator=g).tolist()]

    def fit(self, source: TokenSource, checkpoint=None, resume: bool = True,
            shard: tuple[int, int] | None = None, stop_after: int | None = None) -> DatasetFit:
        """Train the tables of this rank's images.

        ``shard``: ``(rank, world)`` (default: the torch.distributed group's, or ``(0, 1)``).
        ``checkpoint``: a path; with ``resume`` an existing file is loaded first.
        ``stop_after``: stop after this many mini-batches of the present call (to simulate
        an interruption; the checkpoint is written).
        """
        dist = _dist()
        if shard is None:
            shard = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
        rank, world = int(shard[0]), int(shard[1])
        images = list(range(len(source)))[rank::world]
        # every rank must run the same number of mini-batches per epoch (collectives)
        per_epoch = (len(source) // world) // self.batch_size
        if per_epoch < 1:
            raise ValueError(f"batch_size {self.batch_size} is larger than a shard "
                             f"({len(source) // world} of {len(source)} images on {world} "
                             "process(es))")
        first = source(images[0], 0)
        G = int(self.table_size or max(t.grid[0] for t in first))
        K = self.n_channels
        from segbook.backbones.base import resolve_device
        dev = resolve_device(self.device)
        tables = [torch.nn.Parameter(self._init_table(i, K, G).to(dev)) for i in images]
        ema = torch.stack([t.detach().clone() for t in tables])
        opt = torch.optim.AdamW(tables, lr=self.lr, weight_decay=self.weight_decay)
        start, history = 0, []
        if checkpoint is not None and resume and os.path.exists(checkpoint):
            start, history = self._load(checkpoint, images, tables, ema, opt, K, G, len(source))
        pos = {img: j for j, img in enumerate(images)}
        seconds = {"graphs": 0.0, "steps": 0.0}
        bar = None
        if self.progress and rank == 0:
            from segbook.book.progress import progress as _progress
            bar = _progress(total=self.iterations, initial=start, desc=f"{self.graph} tables")
        cache_key, cache_graphs = None, None
        it = start
        done_now = 0
        while it < self.iterations:
            epoch, step = divmod(it, per_epoch)
            order = self._order(images, epoch)
            # the loss does not depend on the order of images inside a mini-batch: a sorted
            # batch lets a deterministic source reuse the graphs of a batch seen before
            batch = sorted(order[step * self.batch_size:(step + 1) * self.batch_size])
            t0 = time.perf_counter()
            if source.deterministic and cache_key == tuple(batch):
                graphs = cache_graphs
            else:
                tokens = [source(i, it) for i in batch]
                graphs = [GraphLayer(g.name, g.grid, g.graph.to(dev)) for g in
                          build_graphs(tokens, self.graph, self.k_intra, self.k_inter,
                                       self.threshold, self.chunk)]
                if source.deterministic:
                    cache_key, cache_graphs = tuple(batch), graphs
            seconds["graphs"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            params = [tables[pos[i]] for i in batch]
            for _ in range(self.inner_steps):
                opt.zero_grad(set_to_none=True)
                terms = dataset_loss(torch.softmax(torch.stack(params), 1), graphs)
                if not torch.isfinite(terms.loss):
                    raise GraphError(f"the loss is not finite at mini-batch {it}")
                terms.loss.backward()
                opt.step()
            with torch.no_grad():
                ema.mul_(self.ema).add_(torch.stack([t.detach() for t in tables]), alpha=1 - self.ema)
            seconds["steps"] += time.perf_counter() - t0
            history.append({"iteration": it, "loss": float(terms.loss.detach()),
                            "eig": float(terms.eig.detach()), "ortho": float(terms.ortho.detach())})
            it += 1
            done_now += 1
            if bar is not None:
                bar.update(1)
            interrupted = stop_after is not None and done_now >= stop_after and it < self.iterations
            if checkpoint is not None and (it == self.iterations or interrupted or (
                    self.checkpoint_every and it % self.checkpoint_every == 0)):
                self._save(checkpoint, images, tables, ema, opt, it, history, len(source), G)
            if interrupted:
                break
        if bar is not None:
            bar.close()
        return DatasetFit(images, torch.stack([t.detach() for t in tables]).cpu(), ema.cpu(),
                          history, it, start, seconds)

    # -- checkpoints ----------------------------------------------------------------------
    def _state(self, images, tables, ema, opt):
        states = [opt.state.get(t, {}) for t in tables]
        has = torch.tensor([bool(s) for s in states])
        zeros = torch.zeros_like(tables[0])

        def pick(key):
            return torch.stack([s[key].detach() if s else zeros for s in states])
        step = torch.tensor([float(s["step"]) if s else 0.0 for s in states])
        return {"images": torch.tensor(images),
                "tables": torch.stack([t.detach() for t in tables]).cpu(),
                "ema": ema.cpu(), "exp_avg": pick("exp_avg").cpu(),
                "exp_avg_sq": pick("exp_avg_sq").cpu(), "step": step, "has_state": has}

    def _save(self, path, images, tables, ema, opt, it, history, n_images, G):
        state = self._state(images, tables, ema, opt)
        dist = _dist()
        if dist is not None:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, state)
            if dist.get_rank() != 0:
                dist.barrier()
                return
            order = torch.cat([p["images"] for p in parts]).argsort()
            state = {k: torch.cat([p[k] for p in parts])[order] for k in state}
        atomic_torch_save({"format": "segbook.ldsc_dataset/1", "params": self.params(),
                      "iteration": it, "history": history, "n_images": n_images,
                      "table_size": G, **state}, path)
        if dist is not None:
            dist.barrier()

    def _load(self, path, images, tables, ema, opt, K, G, n_images):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if int(ck["n_images"]) != int(n_images):
            raise ValueError(f"checkpoint {path} holds {ck['n_images']} images, this dataset "
                             f"has {n_images}: remove it or point checkpoint elsewhere")
        mine = self.params()
        diff = {k: (ck["params"].get(k), mine[k]) for k in self._RESUME_KEYS
                if ck["params"].get(k) != mine[k]}
        if diff:
            raise ValueError(f"checkpoint {path} was written with other settings: {diff}")
        if ck["tables"].shape[1:] != (K, G, G):
            raise ValueError(f"checkpoint {path} holds tables {tuple(ck['tables'].shape[1:])}, "
                             f"this run needs {(K, G, G)}")
        row = {int(i): j for j, i in enumerate(ck["images"].tolist())}
        with torch.no_grad():
            for j, img in enumerate(images):
                r = row[img]
                tables[j].copy_(ck["tables"][r])
                ema[j].copy_(ck["ema"][r])
                if bool(ck["has_state"][r]):
                    opt.state[tables[j]] = {"step": torch.tensor(float(ck["step"][r])),
                                            "exp_avg": ck["exp_avg"][r].to(tables[j].device),
                                            "exp_avg_sq": ck["exp_avg_sq"][r].to(tables[j].device)}
        return int(ck["iteration"]), list(ck["history"])


# -- evaluation --------------------------------------------------------------------------------
def table_features(ema: torch.Tensor, dims: int = 27, distributed: bool = False):
    """Per-pixel features of the EMA tables for evaluation (``L/eval_utils.py``): softmax over
    the ``K`` channels, no per-channel normalisation, ``X = U S V^T`` over all pixels of all
    images, the first ``dims`` columns of ``U S``. Returns ``(M, dims, G, G)`` float64 and the
    singular values. ``U S = X V`` is computed through the ``K x K`` Gram matrix ``X^T X``
    (float64; under ``distributed`` one all-reduce), an exact SVD where the code uses the
    randomised ``torch.svd_lowrank``."""
    M, K, G, _ = ema.shape
    X = torch.softmax(ema.double(), 1).permute(0, 2, 3, 1).reshape(-1, K)
    gram = X.T @ X
    if distributed:
        dist = _dist()
        if dist is None:
            raise RuntimeError("distributed=True needs an initialised torch.distributed group")
        if dist.get_backend() == "nccl":            # NCCL reduces CUDA tensors only
            gram = gram.cuda()
            dist.all_reduce(gram)
            gram = gram.cpu()
        else:
            dist.all_reduce(gram)
    vals, vecs = torch.linalg.eigh(gram)
    order = vals.argsort(descending=True)
    vals, vecs = vals[order].clamp_min(0), vecs[:, order]
    # a deterministic sign: the largest entry of each vector positive
    sign = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
    vecs = vecs * torch.where(sign == 0, torch.ones(()), sign)
    d = min(int(dims), K)
    US = X @ vecs[:, :d]
    return US.reshape(M, G, G, d).permute(0, 3, 1, 2).contiguous(), vals.sqrt()


def cluster_pixels(features: torch.Tensor, n_clusters: int, seed: int = 0,
                   distributed: bool = False, n_init="auto", images=None) -> torch.Tensor:
    """K-means (scikit-learn, ``random_state=seed``; ``n_init="auto"``, scikit-learn's default
    that the code relies on, is one k-means++ start) over every pixel of every image:
    ``features`` ``(M, D, h, w)`` -> labels ``(M, h, w)``. Under ``distributed`` every rank's
    pixels are gathered in the order of the global image indices ``images`` (this rank's),
    so that every rank fits the K-means one process would, and keeps its own labels."""
    from sklearn.cluster import KMeans
    M, D, h, w = features.shape
    local = features.permute(0, 2, 3, 1).reshape(M, h * w, D).double()
    if distributed:
        ids = torch.as_tensor(list(range(M)) if images is None else list(images))
        parts = [None] * _dist().get_world_size()
        _dist().all_gather_object(parts, (ids, local))
        all_ids = torch.cat([p[0] for p in parts])
        allx = torch.cat([p[1] for p in parts])[all_ids.argsort()].reshape(-1, D)
    else:
        allx = local.reshape(-1, D)
    k = min(int(n_clusters), allx.shape[0])
    km = KMeans(k, random_state=int(seed), n_init=n_init).fit(allx.numpy())
    labels = km.predict(local.reshape(-1, D).numpy())
    return torch.from_numpy(labels.astype(np.int64)).reshape(M, h, w)


def _upsample_nearest(labels: torch.Tensor, size) -> np.ndarray:
    t = labels.float()[None, None]
    return F.interpolate(t, size=tuple(size), mode="nearest")[0, 0].long().numpy()


def score_clusters(cluster_maps: torch.Tensor, gts: Sequence[np.ndarray], num_classes: int,
                   ignore_index: int = -1, distributed: bool = False) -> dict:
    """Greedy many-to-one (``"dataset_majority"``, paper 2's Table 2) and Hungarian
    (``"dataset"``) scores of dataset-level cluster maps against ground truth (global
    protocol; under ``distributed`` each rank passes its own images, counts all-reduced)."""
    from segbook.eval import Evaluator
    evs = {p: Evaluator(p, num_classes, ignore_index=ignore_index)
           for p in ("dataset_majority", "dataset")}
    for lab, gt in zip(cluster_maps, gts):
        up = _upsample_nearest(lab, np.asarray(gt).shape)
        for ev in evs.values():
            ev.update(up, gt)
    res = {p: ev.result(distributed=distributed) for p, ev in evs.items()}
    return {"greedy": res["dataset_majority"], "hungarian": res["dataset"]}


def evaluate_tables(ema: torch.Tensor, gts: Sequence[np.ndarray], num_classes: int,
                    n_clusters: int | None = None, dims: int = 27, seed: int = 0,
                    ignore_index: int = -1, distributed: bool = False, n_init="auto",
                    images=None) -> dict:
    """Paper 2's dataset-level evaluation (``L/eval_utils.py``, Tables 2-3): EMA tables ->
    :func:`table_features` (first ``dims`` columns of ``U S``) -> :func:`cluster_pixels`
    (``n_clusters``, default ``num_classes``) -> :func:`score_clusters`. Returns
    ``{"greedy": Scores, "hungarian": Scores, "clusters": (M, G, G) labels}``; under
    ``distributed`` pass ``images`` (this rank's global indices, :attr:`DatasetFit.images`)."""
    feats, _ = table_features(ema, dims, distributed)
    clusters = cluster_pixels(feats, n_clusters or num_classes, seed, distributed, n_init, images)
    out = score_clusters(clusters, gts, num_classes, ignore_index, distributed)
    out["clusters"] = clusters
    return out


def kmeans_feature_labels(features: Sequence[torch.Tensor], n_clusters: int, grid=None,
                          seed: int = 0, distributed: bool = False, n_init="auto",
                          images=None) -> torch.Tensor:
    """The K-means baselines of Table 3: K-means directly on per-pixel features (each image's
    ``(C, h, w)``, bilinearly resized to ``grid`` when given) over every pixel of every image."""
    maps = []
    for f in features:
        f = torch.as_tensor(f).float()
        if grid is not None and tuple(f.shape[1:]) != tuple(grid):
            f = F.interpolate(f[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]
        maps.append(f)
    return cluster_pixels(torch.stack(maps), n_clusters, seed, distributed, n_init, images)


# -- 'where': Table 4 --------------------------------------------------------------------------
def coordinate_regression(features: torch.Tensor, train_fraction: float = 0.8,
                          seed: int = 0) -> dict:
    """Table 4's coordinate regression: least squares with a bias from each pixel's feature
    vector to its (x, y) cell on the ``G x G`` grid (``features`` ``(M, D, G, G)``; resize
    other grids bilinearly first), a random ``train_fraction`` of all pixels to fit and the
    rest to test; returns ``{"mse": mean of the x and y test MSE, "mse_x", "mse_y",
    "mean_predictor": the same for predicting the training mean}``. In grid cells squared:
    predicting the mean of a uniform coordinate on 32 cells gives ``(32^2 - 1)/12 = 85.25``.
    (The paper states no code; the unit is inferred from its numbers.)"""
    M, D, h, w = features.shape
    X = features.double().permute(0, 2, 3, 1).reshape(-1, D)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    Y = torch.stack([xs, ys], -1).reshape(1, h * w, 2).expand(M, -1, -1).reshape(-1, 2)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(X.shape[0], generator=g)
    n_train = round(train_fraction * X.shape[0])
    tr, te = perm[:n_train], perm[n_train:]
    Xb = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    coef = torch.linalg.lstsq(Xb[tr], Y[tr], driver="gelsd").solution
    err = ((Xb[te] @ coef - Y[te]) ** 2).mean(0)
    base = ((Y[tr].mean(0) - Y[te]) ** 2).mean(0)
    return {"mse": float(err.mean()), "mse_x": float(err[0]), "mse_y": float(err[1]),
            "mean_predictor": float(base.mean()), "train_pixels": int(n_train),
            "test_pixels": int(te.numel())}


def spatial_split_labels(label: np.ndarray, num_classes: int, min_size: int = 50,
                         ignore_index: int = -1, connectivity: int = 2) -> np.ndarray:
    """Table 4's spatial semantic labels: each class's connected components (8-connectivity
    by default) become a **left** copy (class ``c``) when they lie entirely in the left half
    of the image and a **right** copy (``c + num_classes``) when entirely in the right half;
    components that straddle the vertical centre line, and components under ``min_size``
    pixels, become ``ignore_index``. ``2 * num_classes`` classes. (The paper gives no
    threshold; these are this project's choices.)"""
    from skimage.measure import label as cc_label
    from skimage.measure import regionprops
    label = np.asarray(label)
    W = label.shape[1]
    out = np.full(label.shape, ignore_index, dtype=np.int64)
    half = W / 2.0
    for c in np.unique(label):
        if c == ignore_index or c < 0:
            continue
        comps = cc_label(label == c, connectivity=connectivity)
        for region in regionprops(comps):
            if region.area < min_size:
                continue
            _, c0, _, c1 = region.bbox              # columns [c0, c1)
            if c1 <= half:
                out[comps == region.label] = c
            elif c0 >= half:
                out[comps == region.label] = c + num_classes
    return out


# -- figures -----------------------------------------------------------------------------------
def dataset_eigenvector_images(ema: torch.Tensor, n_triples: int = 5, upsample: int = 2):
    """Figures 5, 6, 8 and 9 of paper 2 (the code's ``visualize_eigenvector``): EMA tables
    softmaxed, bilinearly upsampled (antialiased) by ``upsample``, each pixel's ``K``-vector
    L2-normalised, one SVD over all pixels of all images, consecutive triples of ``U``'s
    columns as RGB with each channel min-max scaled **over the whole set**. Returns
    ``(M, n_triples, H, W, 3)`` in ``[0, 1]``."""
    from segbook.groupers.ldsc import eigenvector_images
    M, K = ema.shape[:2]
    Z = torch.softmax(ema.double(), 1)
    if upsample != 1:
        Z = F.interpolate(Z, scale_factor=upsample, mode="bilinear", antialias=True,
                          align_corners=False)
    H = Z.shape[-1]
    X = F.normalize(Z.permute(0, 2, 3, 1).reshape(-1, K), dim=1)
    U, _, _ = torch.linalg.svd(X, full_matrices=False)
    n_triples = min(int(n_triples), U.shape[1] // 3)
    # the whole set as one tall image: eigenvector_images scales each channel over all of it
    tiles = eigenvector_images(U.numpy(), (M * H, H), n_triples)
    return np.stack([t.reshape(M, H, H, 3) for t in tiles], 1)
