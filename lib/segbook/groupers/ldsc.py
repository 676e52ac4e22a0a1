"""Layer-distributed spectral clustering of one image (paper 2, sections 3.1-3.4).

*Deciphering 'What' and 'Where' Visual Pathways from Spectral Clustering of Layer-Distributed
Neural Representations* (Zhang, Yunis and Maire, CVPR 2024; paper 2) solves one spectral objective over the
attention of every head of every layer at once. Channels ``Z`` (``K`` maps on the finest token
grid) are resampled to each layer's grid, L2-normalised per channel, and pushed to be
eigenvectors of every affinity while staying orthogonal:

.. math::

    L(Z) = w_e \\operatorname{mean}_{l,h,i} \\left| z_i^{(l)\\top} P_{l,h}\\, z_i^{(l)} - 1 \\right|
         + w_o \\operatorname{mean}_{l,\\, i \\ne j} \\left( z_i^{(l)\\top} z_j^{(l)} \\right)^2

with ``w_e = w_o = 2``: :func:`ldsc_loss`, exactly as the authors' code computes it
(``L/single_img/train_utils.py``): post-softmax row-stochastic ``P`` (the paper's eq. 6 names
the pre-softmax ``Q K^T / sqrt(d)``: ``affinity="pre_softmax"``), adaptive average pooling of
``Z`` to each grid (the paper says bilinear: ``pool="bilinear"``), the two-sided ``|e - 1|``
(the paper's "objective <= 1"), the eigen term averaged over layers x heads x channels and the
orthogonality term over layers x ``K(K-1)`` pairs.

Two solvers reach it:

* ``solver="adam"`` -- the authors' recipe (``L/single_img``): ``Z`` is the channel softmax of
  a 3-layer conv net (128 channels, BatchNorm in train mode, ReLU) over a learned ``randn``
  tensor; Adam, lr ``2e-3``; ``passes`` backward passes (2000) with an optimiser step every
  ``accumulate`` (20) passes, gradients **summed**, so 100 updates. For Stable Diffusion each
  pass sees fresh affinities (noise timestep ``t ~ U{0..250}``) through
  :class:`AttentionBuffer` (size 7, reuse 0.75). With fixed affinities (ViTs, CNN stand-ins,
  synthetic maps) the ``accumulate`` passes between two updates are identical, so the solver
  computes one and multiplies its gradient by their number: the same summed gradient at a
  twentieth of the cost (``repeat_fixed_passes=True`` runs them all).
* ``solver="eigen"`` -- this project's fast solver. Every head and layer on one grid is
  averaged into one map (:func:`grouped_affinities`; for Stable Diffusion also over
  ``noise_draws`` captures); the top ``K`` eigenvectors of the pooled, symmetrised operator
  ``M = sum_g w_g R_g^T (P_g + P_g^T)/2 R_g`` (``R_g`` the pooling to grid ``g``, ``w_g`` its
  share of the (layer, head) pairs times its pooling factor) come from block Krylov with
  Rayleigh-Ritz (:func:`eigen_warm_start`); K-means on the eigenvectors (scaled by their
  eigenvalues) rounds them to a partition into ``K`` channels, the soft partition the recipe's
  softmax channels converge to; ``refine_steps`` (100) Adam steps on ``Z = softmax(L)`` then
  minimise :func:`grouped_loss`, which equals the loss whenever every ``z^T P z <= 1`` (a
  lower bound otherwise). The eigenvectors alone decode badly (``eigen_only`` in
  ``results/cpu/bench/ldsc.csv``); the reported objective is always the exact loss over every
  head of every layer.

Then :func:`orthogonalise` (eq. 9: SVD of the ``N x K`` channel matrix, ``X_ortho = U S``),
:func:`decode` (K-means for ``K = 2..10`` chosen by the silhouette score, or a fixed ``K``)
and :func:`eigenvector_images` (consecutive triples of ``U``'s columns as RGB).

:class:`LayerDistributedSpectralClustering` is the estimator (``fit_predict(source, out_size,
image, device)`` like the chapter 02 groupers). Default solver: ``"eigen"``. Measured in
``results/cpu/bench/ldsc.csv`` (one CPU thread, planted attention with 64 affinities on
32/16/8 grids, two seeds): ARI 1.00 and objective 0.376-0.379 in 1.2-1.3 s, against the
recipe's ARI 0.99-1.00 and objective 0.396-0.408 in 132-138 s run pass by pass (2001 passes)
or 7.7-9.3 s with the summed-gradient shortcut; on 4 texture mosaics with the EfficientNet
stand-in, oracle mIoU 0.328 against the recipe's 0.258. ``solver="adam"`` is the paper's
recipe.

Memory: a solver holds the image's affinities (``sum_l H_l N_l^2`` values; Stable Diffusion
1.4 at 512 px, 16 layers, heads kept: 2.7 GiB in float32, 1.3 GiB with ``dtype=torch.float16``,
which stores them in half precision and multiplies in float32 one layer at a time). A full
per-image recipe run (``solver="adam"``, heads kept, the buffer of 7 keeping the code's 10
decoder layers, 1.6 GiB each in float32) peaks at about the first draw (kept for the final
loss, 2.7 GiB) + 7 buffer entries (11.2 GiB) + one fresh draw in flight (2.7 GiB) + its
float16 capture (1.3 GiB): **about 18 GiB in float32, 9.5 GiB in float16**
(``buffer_keep="all"``: 25.6 / 13 GiB). The eigen solver holds the first draw, one further
draw at a time and one float32 map per grid and draw (85 MiB at 512 px): about 7 GiB in
float32, 4 GiB in float16.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segbook.errors import GraphError
from segbook.groupers.kmeans import kmeans_silhouette

__all__ = [
    "AttentionBuffer",
    "LDSCResult",
    "LayerAffinity",
    "LayerDistributedSpectralClustering",
    "average_grouped",
    "capture_all_heads",
    "check_affinities",
    "cnn_layer_affinities",
    "decode",
    "eigen_warm_start",
    "eigenvector_images",
    "grouped_affinities",
    "grouped_loss",
    "layer_affinities",
    "ldsc_loss",
    "orthogonalise",
    "planted_layer_affinities",
    "pool_matrices",
    "qk_resized_affinities",
    "sd_affinity_sampler",
]

AFFINITIES = ("post_softmax", "pre_softmax")
POOLS = ("adaptive_avg", "bilinear")
SOLVERS = ("eigen", "adam")
BUFFER_KEEPS = ("decoder", "all")
DECODER_PREFIXES = ("mid_block", "up_blocks")


# -- affinities -----------------------------------------------------------------------------
@dataclass
class LayerAffinity:
    """One layer's affinities: ``P`` is ``(H, N, N)`` (every head) on an ``(h, w)`` grid."""

    name: str
    grid: tuple[int, int]
    P: torch.Tensor

    @property
    def heads(self) -> int:
        return int(self.P.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.P.shape[-1])


def _square_grid(n: int, name: str) -> tuple[int, int]:
    r = round(math.sqrt(n))
    if r * r != n:
        raise GraphError(f"layer {name}: {n} tokens is not a square grid; give its (h, w)")
    return r, r


def _as_heads(x, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        raise GraphError(f"layer {name}: affinities must be floating point, got {t.dtype}")
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[-1] != t.shape[-2]:
        raise GraphError(f"layer {name}: affinities must be (N, N) or (H, N, N), got "
                         f"{tuple(t.shape)}")
    return t


def layer_affinities(source, affinity: str = "post_softmax", layers=None,
                     validate: bool = True, tol: float = 1e-2) -> list[LayerAffinity]:
    """Every head of every layer of ``source`` as a list of :class:`LayerAffinity`.

    Parameters
    ----------
    source : a :class:`~segbook.backbones.base.Capture` (layers with ``attn``, or ``logits``
        for ``affinity="pre_softmax"``; heads kept with ``heads="none"`` or reduced), a
        ``{resolution: [map, ...]}`` dictionary (what :func:`segbook.pipelines.synthetic.planted_attention`
        and ``Capture.attention_by_resolution`` return; square grids), a list of
        :class:`LayerAffinity` or of ``(grid, maps)`` pairs, or one ``(N, N)``/``(H, N, N)``
        tensor on a square grid.
    affinity : ``"post_softmax"`` (the authors' code; rows must be probabilities) or
        ``"pre_softmax"`` (paper 2, eq. 6: ``Q K^T / sqrt(d)``, read from ``logits``).
    layers : names to keep (None: all); an empty selection is an error.
    validate : check finiteness, grids and (post-softmax) row sums.
    tol : largest accepted deviation of a row sum from 1.

    Raises
    ------
    GraphError : naming the layer, for NaN/Inf, negative or non-row-stochastic
        post-softmax maps, a grid that does not hold the map's tokens, grids whose aspect
        ratios disagree, no layer at all, or a ViT capture that kept its CLS tokens.
    """
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    from segbook.backbones.base import Capture
    out: list[LayerAffinity] = []
    if isinstance(source, Capture):
        field_name = "attn" if affinity == "post_softmax" else "logits"
        for layer in source:
            if layer.kind != "self_attention":
                continue
            value = getattr(layer, field_name)
            if value is None:
                if affinity == "pre_softmax" and layer.attn is not None:
                    raise GraphError(f"layer {layer.name}: affinity='pre_softmax' needs the "
                                     "capture's logits (capture with logits=True)")
                continue
            if layer.prefix_tokens:
                raise GraphError(f"layer {layer.name}: keeps {layer.prefix_tokens} CLS/register "
                                 "tokens; capture with prefix='drop' (paper 2's code)")
            out.append(LayerAffinity(layer.name, tuple(layer.grid), _as_heads(value, layer.name)))
    elif isinstance(source, Mapping):
        for r in sorted(source):
            maps = source[r]
            maps = [maps] if isinstance(maps, torch.Tensor) else list(maps)
            for i, m in enumerate(maps):
                name = f"r{r}.{i}"
                t = _as_heads(m, name)
                grid = tuple(r) if isinstance(r, tuple) else _square_grid(t.shape[-1], name)
                out.append(LayerAffinity(name, grid, t))
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        t = _as_heads(source, "P")
        out.append(LayerAffinity("P", _square_grid(t.shape[-1], "P"), t))
    elif isinstance(source, Sequence):
        for i, item in enumerate(source):
            if isinstance(item, LayerAffinity):
                out.append(LayerAffinity(item.name, tuple(item.grid), _as_heads(item.P, item.name)))
            else:
                grid, maps = item
                name = f"layer{i}"
                out.append(LayerAffinity(name, (int(grid[0]), int(grid[1])), _as_heads(maps, name)))
    else:
        raise TypeError("source must be a Capture, a {resolution: maps} dict, a list of "
                        f"LayerAffinity or (grid, maps) pairs, or a tensor; got {type(source).__name__}")
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        out = [a for a in out if any(a.name == w or a.name.startswith(w.rstrip(".") + ".")
                                     for w in wanted)]
    if not out:
        raise GraphError("empty layer selection: no self-attention affinity to cluster "
                         f"(affinity={affinity!r}, layers={layers!r})")
    if validate:
        check_affinities(out, affinity, tol)
    return out


def check_affinities(affs: Sequence[LayerAffinity], affinity: str = "post_softmax",
                     tol: float = 1e-2) -> None:
    """The checks of :func:`layer_affinities` (raises :class:`GraphError` naming the layer)."""
    finest = max(affs, key=lambda a: a.tokens)
    h0, w0 = finest.grid
    for a in affs:
        h, w = a.grid
        if h * w != a.tokens:
            raise GraphError(f"layer {a.name}: grid {h}x{w} holds {h * w} tokens but its "
                             f"affinity is {a.tokens} x {a.tokens}")
        if abs(h * w0 - w * h0) > max(h, w, h0, w0) and a is not finest:
            raise GraphError(f"layer {a.name}: grid {h}x{w} disagrees in aspect ratio with the "
                             f"finest grid {h0}x{w0} ({finest.name})")
        P = a.P
        finite = torch.isfinite(P).all() if P.dtype != torch.float16 else \
            torch.isfinite(P.float()).all()
        if not bool(finite):
            raise GraphError(f"layer {a.name}: affinity contains NaN or Inf")
        if affinity == "post_softmax":
            if bool((P < 0).any()):
                raise GraphError(f"layer {a.name}: post-softmax affinity has negative entries")
            dev = float((P.float().sum(-1) - 1).abs().max())
            if dev > tol:
                raise GraphError(f"layer {a.name}: rows are not probabilities (largest |row sum "
                                 f"- 1| = {dev:.3g} > {tol}); pass affinity='pre_softmax' for "
                                 "logits, or row-normalise")


# -- pooling --------------------------------------------------------------------------------
def _pool_1d(n_from: int, n_to: int, pool: str) -> torch.Tensor:
    eye = torch.eye(n_from, dtype=torch.float64)[:, None, :]          # (n_from, 1, n_from)
    if n_to == n_from:
        return torch.eye(n_from, dtype=torch.float64)
    if pool == "adaptive_avg":
        m = F.adaptive_avg_pool1d(eye, n_to)
    else:
        m = F.interpolate(eye, size=n_to, mode="linear", align_corners=False)
    return m[:, 0, :].T.contiguous()                                    # (n_to, n_from)


def pool_matrices(src: tuple[int, int], dst: tuple[int, int], pool: str = "adaptive_avg"):
    """``(R_h, R_w)`` with ``pool(Z) = R_h Z R_w^T`` per channel: the resampling of ``Z`` from
    grid ``src`` to ``dst`` as two small matrices. ``"adaptive_avg"`` equals
    ``F.adaptive_avg_pool2d`` (the authors' code) and ``"bilinear"`` equals
    ``F.interpolate(mode="bilinear", align_corners=False)`` (the paper), both being separable."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return _pool_1d(src[0], dst[0], pool), _pool_1d(src[1], dst[1], pool)


class _Pooler:
    """Caches the pooling matrices of every grid, in one dtype and device."""

    def __init__(self, finest: tuple[int, int], pool: str, dtype, device):
        self.finest, self.pool, self.dtype, self.device = tuple(finest), pool, dtype, device
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def mats(self, grid):
        grid = tuple(grid)
        if grid not in self.cache:
            rh, rw = pool_matrices(self.finest, grid, self.pool)
            self.cache[grid] = (rh.to(self.dtype).to(self.device), rw.to(self.dtype).to(self.device))
        return self.cache[grid]

    def down(self, Z: torch.Tensor, grid) -> torch.Tensor:
        """``(K, h0, w0)`` -> ``(K, h, w)``."""
        if tuple(grid) == self.finest:
            return Z
        rh, rw = self.mats(grid)
        return rh @ Z @ rw.T

    def up(self, Y: torch.Tensor, grid) -> torch.Tensor:
        """The adjoint: ``(K, h, w)`` -> ``(K, h0, w0)``."""
        if tuple(grid) == self.finest:
            return Y
        rh, rw = self.mats(grid)
        return rh.T @ Y @ rw


# -- the objective --------------------------------------------------------------------------
@dataclass
class LossTerms:
    """``loss = w_eig * eig + w_ortho * ortho``; ``e`` holds every ``z_i^T P z_i`` (layers x
    heads x channels, concatenated in layer order)."""

    loss: torch.Tensor
    eig: torch.Tensor
    ortho: torch.Tensor
    e: torch.Tensor


def ldsc_loss(Z: torch.Tensor, affinities: Sequence[LayerAffinity], pool: str = "adaptive_avg",
              w_eig: float = 2.0, w_ortho: float = 2.0, pooler: _Pooler | None = None) -> LossTerms:
    """Paper 2's objective (eq. 5) as the authors' code computes it.

    Parameters
    ----------
    Z : ``(K, h0, w0)`` channels on the finest grid (any sign; the recipe's are a softmax).
    affinities : :class:`LayerAffinity` list; each ``P`` is ``(H, N, N)``.
    pool : ``"adaptive_avg"`` (code) or ``"bilinear"`` (paper).
    w_eig, w_ortho : the weights (2 and 2 in the code).

    Returns
    -------
    :class:`LossTerms`: ``eig = mean |z_i^T P z_i - 1|`` over layers x heads x channels (``P z``
    left-multiplied, as the code), ``ortho = mean (z_i^T z_j)^2`` over layers x ordered pairs
    ``i != j``, channels pooled to each grid and L2-normalised over its tokens.
    """
    K = Z.shape[0]
    pooler = pooler or _Pooler(Z.shape[-2:], pool, Z.dtype, Z.device)
    off = ~torch.eye(K, dtype=torch.bool, device=Z.device)
    es, offs = [], []
    for a in affinities:
        z = pooler.down(Z, a.grid).reshape(K, -1)
        z = F.normalize(z, dim=1, eps=1e-12)
        Pz = torch.matmul(a.P.to(z.dtype), z.T)                      # (H, N, K)
        es.append((z.T[None] * Pz).sum(1).reshape(-1))                # (H * K,)
        offs.append((z @ z.T)[off])
    e = torch.cat(es)
    eig = (e - 1).abs().mean()
    ortho = torch.cat(offs).pow(2).mean() if K > 1 else Z.new_zeros(())
    return LossTerms(loss=w_eig * eig + w_ortho * ortho, eig=eig, ortho=ortho, e=e)


def grouped_affinities(affs: Sequence[LayerAffinity]) -> list[tuple[LayerAffinity, float, float]]:
    """Every head and layer on one grid averaged into one map, with its weights in the loss.

    Returns ``(LayerAffinity with one head, eig weight, ortho weight)`` per grid: the share of
    the (layer, head) pairs and of the layers on that grid. Pooled channels are the same for
    every layer on a grid, so the orthogonality term is exact, and ``mean_h |e_h - 1|`` equals
    ``|mean_h e_h - 1|`` whenever every ``e_h <= 1``: :func:`grouped_loss` is then the loss
    itself (in general a lower bound: a non-symmetric row-stochastic map can give ``e``
    slightly above 1), at the cost of one ``N x N`` product per grid instead of one per head
    and layer.
    """
    groups: dict[tuple[int, int], list[LayerAffinity]] = {}
    for a in affs:
        groups.setdefault(tuple(a.grid), []).append(a)
    n_pairs = sum(a.heads for a in affs)
    out = []
    for grid, items in groups.items():
        heads = sum(a.heads for a in items)
        P = sum(a.P.float().sum(0) for a in items) / heads
        out.append((LayerAffinity(f"grid{grid[0]}x{grid[1]}", grid, P[None]),
                    heads / n_pairs, len(items) / len(affs)))
    return out


def grouped_loss(Z: torch.Tensor, grouped, w_eig: float = 2.0, w_ortho: float = 2.0,
                 pooler: _Pooler | None = None, pool: str = "adaptive_avg") -> torch.Tensor:
    """:func:`ldsc_loss` on :func:`grouped_affinities` (equal to it when every ``e <= 1``)."""
    K = Z.shape[0]
    pooler = pooler or _Pooler(Z.shape[-2:], pool, Z.dtype, Z.device)
    off = ~torch.eye(K, dtype=torch.bool, device=Z.device)
    eig = Z.new_zeros(())
    ortho = Z.new_zeros(())
    for a, we, wo in grouped:
        z = F.normalize(pooler.down(Z, a.grid).reshape(K, -1), dim=1, eps=1e-12)
        e = (z.T * (a.P[0].to(z.dtype) @ z.T)).sum(0)
        eig = eig + we * (e - 1).abs().mean()
        if K > 1:
            ortho = ortho + wo * (z @ z.T)[off].pow(2).mean()
    return w_eig * eig + w_ortho * ortho


# -- the authors' Z generator ---------------------------------------------------------------
class ToyCNN(torch.nn.Module):
    """The code's ``ToyCNN``: a learned ``(1, width, h, w)`` randn tensor -> conv3x3 -> BN ->
    ReLU -> conv3x3 -> BN -> ReLU -> conv3x3 to ``K`` channels; ``Z`` = softmax over channels
    (facts 1.4). BatchNorm stays in train mode (statistics over the one map), as in the code."""

    def __init__(self, k: int, grid: tuple[int, int], width: int = 128):
        super().__init__()
        self.input = torch.nn.Parameter(torch.randn(1, width, *grid))
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, k, 3, padding=1))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.net(self.input), dim=1)[0]


# -- fresh affinities (Stable Diffusion) ----------------------------------------------------
class AttentionBuffer:
    """The code's attention buffer: once full (``size``), a draw reuses a uniformly chosen
    stored set with probability ``reuse``; otherwise it captures a fresh set (all layers) and
    pushes it, dropping the oldest.

    ``keep="decoder"`` stores only the mid and up-block layers, the code's quirk
    (``attns[6:]``: buffered passes then lose the 6 down-block layers); ``"all"`` stores
    every layer (the paper's description). Layer sets without decoder names store everything.
    """

    def __init__(self, sample: Callable[[int], list[LayerAffinity]], size: int = 7,
                 reuse: float = 0.75, keep: str = "decoder", seed: int = 0):
        if keep not in BUFFER_KEEPS:
            raise ValueError(f"keep must be one of {BUFFER_KEEPS}, got {keep!r}")
        if int(size) < 1 or not 0 <= reuse <= 1:
            raise ValueError(f"buffer size must be >= 1 and reuse in [0, 1], got {size}, {reuse}")
        self.sample, self.size, self.reuse, self.keep = sample, int(size), float(reuse), keep
        self.rng = np.random.default_rng(seed)
        self.entries: list[list[LayerAffinity]] = []
        self.fresh = 0
        self.draws = 0

    def _kept(self, affs):
        if self.keep == "all":
            return affs
        dec = [a for a in affs if a.name.startswith(DECODER_PREFIXES)]
        return dec or affs

    def __call__(self) -> list[LayerAffinity]:
        self.draws += 1
        if len(self.entries) == self.size and self.rng.random() < self.reuse:
            return self.entries[int(self.rng.integers(len(self.entries)))]
        affs = self.sample(self.fresh)
        self.fresh += 1
        self.entries.append(self._kept(affs))
        if len(self.entries) > self.size:
            self.entries.pop(0)
        return affs


class AffinitySampler:
    """A source of fresh affinities per pass: ``sampler(i)`` returns draw ``i``'s
    :class:`LayerAffinity` list (e.g. Stable Diffusion with new noise and timestep)."""

    def __init__(self, draw: Callable[[int], Any], affinity: str = "post_softmax",
                 backbone: str | None = None, grid: tuple[int, int] | None = None):
        self.draw, self.affinity, self.backbone, self.grid = draw, affinity, backbone, grid

    def __call__(self, i: int) -> list[LayerAffinity]:
        return layer_affinities(self.draw(i), self.affinity)


def capture_all_heads(backbone, image, affinity: str = "post_softmax",
                      qk_grid: tuple[int, int] | None = None, **capture_kwargs):
    """Every head of every self-attention layer of ``backbone`` for ``image`` (paper 2, 3.2).

    Stable Diffusion: the 16 ``attn1`` layers (``layers="all"``), noised latent with ``t`` drawn
    from ``U{0..250}`` by ``seed`` (``mode="noised"``). ViTs: every block, CLS/registers dropped
    and the rows re-softmaxed (the capture's default, the authors' DINO code). CNN stand-ins:
    :func:`cnn_layer_affinities`. ``heads="none"`` keeps the heads; pre-softmax adds
    ``logits=True``. Keyword arguments override these (e.g. ``size``, ``seed``, ``dtype``).
    ``qk_grid`` (ViTs; MAE in paper 2): capture Q and K instead and return
    :func:`qk_resized_affinities` at that grid (a list of :class:`LayerAffinity`).
    """
    family = getattr(backbone, "family", None)
    if family == "cnn":
        return cnn_layer_affinities(backbone, image, **capture_kwargs)
    kwargs = {"layers": "all", "heads": "none"}
    if family == "diffusion":
        kwargs.update(mode="noised", progress=False)
    if qk_grid is not None:
        if family != "vit":
            raise ValueError("qk_grid resizes a ViT's queries and keys (paper 2's MAE)")
        kwargs.update(attn=False, qkv=True, dtype=torch.float32)
        kwargs.update(capture_kwargs)
        return qk_resized_affinities(backbone.capture(image, **kwargs), qk_grid, affinity)
    if affinity == "pre_softmax":
        kwargs["logits"] = True
    kwargs.update(capture_kwargs)
    return backbone.capture(image, **kwargs)


def _resize_tokens(t: torch.Tensor, src, dst, mode: str) -> torch.Tensor:
    """``(H, h*w, d)`` token vectors on grid ``src`` resized to grid ``dst``."""
    H, _, d = t.shape
    t = t.float().reshape(H, src[0], src[1], d).permute(0, 3, 1, 2)
    if tuple(src) != tuple(dst):
        t = F.interpolate(t, size=tuple(dst), mode=mode, align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(H, -1, d)


def qk_resized_affinities(capture, grid: tuple[int, int], affinity: str = "post_softmax",
                          mode: str = "bicubic") -> list[LayerAffinity]:
    """Every head of every layer of a ViT capture with queries and keys resized to ``grid``.

    Paper 2 (appendix B.1) runs MAE ViT-B/16 at 224 x 224 and upsamples its query and key
    maps to the DINO/CLIP token grid (the authors' unused helper resizes them bicubically).
    Per layer: ``q, k`` (``(H, N, d)``, from a capture with ``qkv=True`` and
    ``prefix="drop"``) are reshaped to the layer's grid, resized to ``grid`` (``mode``), and
    the affinity is ``softmax(q k^T / sqrt(d))`` over the resized patch tokens
    (``"pre_softmax"``: the scores themselves). At the capture's own grid this is the
    captured attention.
    """
    out = []
    for layer in capture:
        if layer.kind != "self_attention":
            continue
        if layer.q is None or layer.k is None:
            raise GraphError(f"layer {layer.name}: resizing queries and keys needs a capture "
                             "with qkv=True")
        if layer.prefix_tokens:
            raise GraphError(f"layer {layer.name}: keeps {layer.prefix_tokens} CLS/register "
                             "tokens; capture with prefix='drop'")
        q = _resize_tokens(layer.q, layer.grid, grid, mode)
        k = _resize_tokens(layer.k, layer.grid, grid, mode)
        scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
        P = scores if affinity == "pre_softmax" else torch.softmax(scores, dim=-1)
        out.append(LayerAffinity(layer.name, tuple(grid), P))
    if not out:
        raise GraphError("empty layer selection: the capture has no self-attention layer")
    return out


def sd_affinity_sampler(backbone, image, seed: int = 0, affinity: str = "post_softmax",
                        **capture_kwargs) -> AffinitySampler:
    """Fresh Stable Diffusion affinities per draw: draw ``i`` captures every head of the 16
    ``attn1`` layers with new noise and a new ``t ~ U{0..250}`` (seed ``seed * 100003 + i``)."""

    def draw(i):
        return capture_all_heads(backbone, image, affinity, seed=int(seed) * 100003 + int(i),
                                 **capture_kwargs)
    return AffinitySampler(draw, affinity, backbone=getattr(backbone, "name", None))


def cnn_layer_affinities(backbone, image, layers: Sequence[str] | None = None,
                         temperature: float | None = None, size: int | None = None,
                         stride_max: int = 32) -> list[LayerAffinity]:
    """The CNN stand-in for "every head of every layer": one feature-similarity affinity
    ``softmax_j(cos(x_i, x_j) / T)`` per block, each at its own grid (chapter 03, ``cpu``).

    ``layers``: block names (None: every block whose stride is 8 to ``stride_max``, so that
    grids stay small); ``temperature``: the stand-in's ``T`` (None: the backbone's).
    """
    from segbook.backbones.cnn import similarity_attention
    if layers is None:
        table = backbone.layers(size or backbone.input_size)
        layers = [n for n, info in table.items()
                  if n.startswith("blocks.") and 8 <= info["stride"] <= stride_max]
    if not layers:
        raise GraphError("empty layer selection for the CNN stand-in")
    maps = backbone.feature_maps(image, list(layers), size=size)
    T = float(backbone.temperature if temperature is None else temperature)
    out = []
    for name in layers:
        f = maps[name].cpu()
        out.append(LayerAffinity(name, tuple(f.shape[1:]), similarity_attention(f, T)[None]))
    return out


# -- solvers --------------------------------------------------------------------------------
def _finest_grid(affs: Sequence[LayerAffinity]) -> tuple[int, int]:
    return tuple(max(affs, key=lambda a: a.tokens).grid)


def _to_device(affs, device, dtype):
    return [LayerAffinity(a.name, a.grid, a.P.to(device=device, dtype=dtype)) for a in affs]


def average_grouped(groups: Sequence[list]) -> list[tuple[LayerAffinity, float, float]]:
    """The mean of several :func:`grouped_affinities` results on the same grids (noise draws)."""
    if len(groups) == 1:
        return list(groups[0])
    by_grid: dict[tuple, list] = {}
    for g in groups:
        for a, we, wo in g:
            by_grid.setdefault(tuple(a.grid), []).append((a, we, wo))
    out = []
    for grid, items in by_grid.items():
        P = sum(a.P.float() for a, _, _ in items) / len(items)
        out.append((LayerAffinity(items[0][0].name, grid, P),
                    sum(we for _, we, _ in items) / len(groups),
                    sum(wo for _, _, wo in items) / len(groups)))
    return out


def eigen_warm_start(grouped, k: int, finest: tuple[int, int], pool: str = "adaptive_avg",
                     seed: int = 0, iterations: int = 2, depth: int = 6, extra: int = 8,
                     dense_below: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvectors of ``M = sum_g w_g R_g^T S_g R_g`` on the finest grid.

    ``grouped`` is :func:`grouped_affinities` (optionally :func:`average_grouped` over noise
    draws): per grid ``g``, the mean ``P_g`` over its layers and heads. ``S_g = (P_g +
    P_g^T)/2``, ``R_g`` the pooling to ``g`` and ``w_g`` the grid's share of (layer, head)
    pairs times ``N_0 / N_g`` (so that a pooled unit vector keeps about unit norm, as the loss
    normalises it); the top eigenvalue is then about 1. Block Krylov: ``iterations`` restarts
    of a basis ``[X, M X, ..., M^depth X]`` (``k + extra`` seeded random columns) with
    Rayleigh-Ritz; dense ``eigh`` below ``dense_below`` tokens.

    Returns ``(vectors (N_0, k'), values (k',))``, largest first, ``k' = min(k, N_0)``.
    """
    finest = tuple(finest)
    dev = grouped[0][0].P.device
    pooler = _Pooler(finest, pool, torch.float32, dev)
    n0 = finest[0] * finest[1]
    ops = []
    for a, we, _ in grouped:
        S = a.P[0].float()
        ops.append((tuple(a.grid), 0.5 * (S + S.T), we * n0 / a.tokens))
    total = sum(we for _, we, _ in grouped)

    def matvec(X):                                    # X: (n0, b)
        b = X.shape[1]
        Zc = X.T.reshape(b, *finest)
        out = torch.zeros_like(Zc)
        for grid, S, w in ops:
            y = pooler.down(Zc, grid).reshape(b, -1)
            y = (S @ y.T).T.reshape(b, *grid)
            out += (w / total) * pooler.up(y, grid)
        return out.reshape(b, n0).T

    k = min(int(k), n0)
    if n0 <= dense_below:
        M = matvec(torch.eye(n0, device=dev))
        vals, vecs = torch.linalg.eigh(0.5 * (M + M.T))
        order = torch.argsort(vals, descending=True)[:k]
        return vecs[:, order].contiguous(), vals[order]
    b = min(n0, k + extra)
    gen = torch.Generator().manual_seed(int(seed))
    X = torch.linalg.qr(torch.randn(n0, b, generator=gen).to(dev))[0]
    for _ in range(max(1, int(iterations))):
        blocks = [X]
        for _ in range(int(depth)):
            blocks.append(torch.linalg.qr(matvec(blocks[-1]))[0])
        Q = torch.linalg.qr(torch.cat(blocks, 1))[0]
        T = Q.T @ matvec(Q)
        vals, vecs = torch.linalg.eigh(0.5 * (T + T.T))
        order = torch.argsort(vals, descending=True)
        X = Q @ vecs[:, order[:b]]
    vals = (X * matvec(X)).sum(0)
    return X[:, :k].contiguous(), vals[:k]


# -- orthogonalisation, decoding, figures ---------------------------------------------------
def orthogonalise(Z: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 9: channels L2-normalised over pixels, ``(N, K)`` matrix, SVD; returns
    ``(X_ortho = U S, U, S)`` as float64 arrays, columns by decreasing singular value."""
    K = Z.shape[0]
    M = F.normalize(Z.detach().double().reshape(K, -1), dim=1).T.cpu().numpy()
    U, S, _ = np.linalg.svd(M, full_matrices=False)
    return U * S, U, S


def decode(X: np.ndarray, k: int | None = None, k_range=range(2, 11), seed: int = 0,
           n_init: int = 10):
    """K-means on ``X_ortho``: a fixed ``k`` or the best silhouette over ``k_range`` (paper 2,
    section 4.1; the code refits at the chosen K, which with a fixed seed is the same fit).
    ``k`` larger than the number of points is an error; a constant ``X`` gives one region."""
    n = X.shape[0]
    if k is not None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer or None, got {k!r}")
        if k > n:
            raise GraphError(f"k = {k} is larger than the number of tokens ({n})")
        if k == 1:
            from segbook.groupers.kmeans import KMeansSelection
            return KMeansSelection(labels=np.zeros(n, dtype=np.int64), k=1, scores={})
        return kmeans_silhouette(X, k_range=(int(k),), seed=seed, n_init=n_init, sample_size=None)
    return kmeans_silhouette(X, k_range=k_range, seed=seed, n_init=n_init, sample_size=None)


def eigenvector_images(U: np.ndarray, grid: tuple[int, int], n_triples: int | None = None,
                       skip_first: bool = False) -> list[np.ndarray]:
    """Consecutive triples of ``U``'s columns (0-2, 3-5, ...) as ``(h, w, 3)`` RGB images in
    ``[0, 1]``, each channel min-max scaled (paper 2, Figures 3 and 5-9; the dataset code does
    not skip the first triple)."""
    h, w = grid
    cols = U.shape[1]
    starts = list(range(3 if skip_first else 0, cols - 2, 3))
    if n_triples is not None:
        starts = starts[: int(n_triples)]
    out = []
    for s in starts:
        img = U[:, s:s + 3].reshape(h, w, 3).astype(np.float64)
        lo, hi = img.min((0, 1)), img.max((0, 1))
        out.append((img - lo) / np.where(hi > lo, hi - lo, 1.0))
    return out


# -- the estimator --------------------------------------------------------------------------
@dataclass
class LDSCResult:
    """What the solver found besides the labels (``LayerDistributedSpectralClustering.last``)."""

    Z: np.ndarray                       # (K, h0, w0) channels
    x_ortho: np.ndarray                 # (N0, K) = U S
    U: np.ndarray
    S: np.ndarray
    grid: tuple[int, int]
    objective: float                    # final loss on the affinities solved (first draw for SD)
    eig_term: float
    ortho_term: float
    k: int
    k_scores: dict
    history: list = field(default_factory=list)
    solver: str = "eigen"
    seconds: dict = field(default_factory=dict)
    updates: int = 0
    passes: int = 0
    fresh_captures: int = 0
    layers: int = 0
    affinities: int = 0
    constant: bool = False              # every row of every map uniform: one region


def _grouper_base():
    from segbook.pipelines.groupers import _TimedGrouper
    return _TimedGrouper


class LayerDistributedSpectralClustering(_grouper_base()):
    """Paper 2's per-image method as a grouper: ``fit_predict(source, out_size=None,
    image=None, device=None) -> SegmentationResult`` (chapter 02's interface); the solver's
    channels, ``X_ortho``, singular values and loss are in :attr:`last` (:class:`LDSCResult`).

    Parameters
    ----------
    solver : ``"eigen"`` (default: block-Krylov warm start + ``refine_steps`` of the same loss;
        on planted multi-layer attention it reaches the recipe's ARI and a lower objective in
        about 1/100 of the recipe's time run pass by pass, 1/6 with the summed-gradient
        shortcut; see the module docstring and ``results/cpu/bench/ldsc.csv``) or ``"adam"``
        (the authors' recipe).
    n_channels : ``K`` channels of ``Z`` (the code's recipe: 20).
    affinity : ``"post_softmax"`` (code) or ``"pre_softmax"`` (eq. 6).
    pool : ``"adaptive_avg"`` (code) or ``"bilinear"`` (paper).
    w_eig, w_ortho : loss weights (2, 2).
    lr, passes, accumulate : the recipe's Adam lr (2e-3), backward passes (2000) and passes
        per update (20); gradients are summed over a group, as the code.
    width : the conv net's width (128).
    repeat_fixed_passes : with fixed affinities, run every pass instead of scaling one
        gradient by the group size (same result, ``accumulate`` times the cost).
    buffer_size, buffer_reuse, buffer_keep : Stable Diffusion's attention buffer (7, 0.75,
        ``"decoder"`` = the code's quirk, or ``"all"``); ``buffer_size=0`` turns it off (every
        pass captures anew: the paper's "without buffer" row).
    refine_steps, refine_lr, init_scale : the eigen solver's refinement: Adam on free logits
        ``L`` with ``Z = softmax(L)`` over channels, ``L`` started at ``init_scale`` times the
        eigenvectors scaled to unit standard deviation.
    krylov_iterations, krylov_depth : the warm start's block Krylov restarts and depth.
    noise_draws : captures averaged into the eigen solver's operator for a sampler source.
    k, k_range : decoding (fixed ``k``, or silhouette over ``k_range``, 2..10).
    n_init : K-means restarts.
    upsample : ``"features"`` (``X_ortho`` bilinearly upsampled, each pixel to the nearest
        K-means centre) or ``"nearest"`` (token labels repeated).
    dtype : storage dtype of the affinities during the solve (float32; float16 halves it).
    seed : seeds ``Z``'s initialisation, the Krylov start, the buffer and K-means.
    device : where the solve runs (``"auto"``: CUDA when available).

    Bad input: maps with NaN/Inf, negative entries or rows that are not probabilities
    (post-softmax), a grid that does not hold its map's tokens, grids whose aspect ratios
    disagree, an empty layer selection, a ViT capture that kept CLS tokens and a fixed ``k``
    larger than the number of tokens raise :class:`~segbook.errors.GraphError` naming the
    layer. ``n_channels`` above the number of tokens is clamped by the eigen solver. Maps
    whose every row is uniform (a constant image) give one region (``last.constant``). A
    diverging solve raises instead of returning NaN labels.
    """

    name = "ldsc"

    def __init__(self, solver: str = "eigen", n_channels: int = 20, affinity: str = "post_softmax",
                 pool: str = "adaptive_avg", w_eig: float = 2.0, w_ortho: float = 2.0,
                 lr: float = 2e-3, passes: int = 2000, accumulate: int = 20, width: int = 128,
                 repeat_fixed_passes: bool = False, buffer_size: int = 7,
                 buffer_reuse: float = 0.75, buffer_keep: str = "decoder",
                 refine_steps: int = 100, refine_lr: float = 0.1, init_scale: float = 4.0,
                 krylov_iterations: int = 2, krylov_depth: int = 6, noise_draws: int = 4,
                 k: int | None = None, k_range=range(2, 11), n_init: int = 10,
                 upsample: str = "features", dtype: torch.dtype = torch.float32,
                 seed: int = 0, device="auto"):
        from segbook.pipelines.groupers import resolve_device
        resolve_device(device)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if buffer_keep not in BUFFER_KEEPS:
            raise ValueError(f"buffer_keep must be one of {BUFFER_KEEPS}, got {buffer_keep!r}")
        if upsample not in ("features", "nearest"):
            raise ValueError(f"upsample must be 'features' or 'nearest', got {upsample!r}")
        if int(n_channels) < 1 or int(passes) < 0 or int(accumulate) < 1:
            raise ValueError("n_channels and accumulate must be >= 1 and passes >= 0")
        if k is not None and (int(k) != k or k < 1):
            raise ValueError(f"k must be a positive integer or None, got {k!r}")
        self.solver, self.n_channels, self.affinity, self.pool = solver, int(n_channels), affinity, pool
        self.w_eig, self.w_ortho, self.lr = float(w_eig), float(w_ortho), float(lr)
        self.passes, self.accumulate, self.width = int(passes), int(accumulate), int(width)
        self.repeat_fixed_passes = bool(repeat_fixed_passes)
        self.buffer_size, self.buffer_reuse, self.buffer_keep = int(buffer_size), float(buffer_reuse), buffer_keep
        self.refine_steps, self.refine_lr, self.init_scale = int(refine_steps), float(refine_lr), float(init_scale)
        self.krylov_iterations, self.krylov_depth = int(krylov_iterations), int(krylov_depth)
        self.noise_draws = int(noise_draws)
        self.k, self.k_range, self.n_init = k, tuple(k_range), int(n_init)
        self.upsample, self.dtype, self.seed, self.device = upsample, dtype, int(seed), device
        self.last: LDSCResult | None = None

    def params(self) -> dict:
        keys = ("solver", "n_channels", "affinity", "pool", "w_eig", "w_ortho", "lr", "passes",
                "accumulate", "width", "repeat_fixed_passes", "buffer_size", "buffer_reuse",
                "buffer_keep", "refine_steps", "refine_lr", "init_scale", "krylov_iterations",
                "krylov_depth", "noise_draws", "k", "k_range", "n_init", "upsample", "seed")
        out = {key: getattr(self, key) for key in keys}
        out.update(dtype=str(self.dtype), device=str(self.device))
        return out

    # -- solving --------------------------------------------------------------------------
    def solve(self, source, device=None) -> LDSCResult:
        """Channels ``Z``, ``X_ortho`` and the loss for ``source`` (no decoding)."""
        from segbook.pipelines.groupers import resolve_device
        dev = resolve_device(self.device if device is None else device)
        sampler = source if isinstance(source, AffinitySampler) else None
        seconds = {}
        t0 = time.perf_counter()
        if sampler is not None:
            affs = sampler(0)
        else:
            affs = layer_affinities(source, self.affinity)
        affs = _to_device(affs, dev, self.dtype)
        seconds["affinities"] = time.perf_counter() - t0
        finest = _finest_grid(affs)
        pooler = _Pooler(finest, self.pool, torch.float32, dev)
        # a constant image: every row of every map uniform, so no channel can separate
        # anything; decoding then returns one region (documented, never NaN)
        constant = all(float((a.P.amax(-1) - a.P.amin(-1)).abs().max()) < 1e-6 for a in affs)
        t0 = time.perf_counter()
        with torch.enable_grad():
            if self.solver == "adam":
                Z, history, info = self._solve_adam(affs, sampler, finest, pooler, dev)
            else:
                Z, history, info = self._solve_eigen(affs, sampler, finest, pooler, dev)
        seconds["solve"] = time.perf_counter() - t0
        with torch.no_grad():
            terms = ldsc_loss(Z, affs, self.pool, self.w_eig, self.w_ortho, pooler)
        if not torch.isfinite(Z).all():
            raise GraphError("the solver diverged: Z holds NaN or Inf")
        t0 = time.perf_counter()
        X, U, S = orthogonalise(Z)
        seconds["orthogonalise"] = time.perf_counter() - t0
        return LDSCResult(Z=Z.detach().cpu().numpy(), x_ortho=X, U=U, S=S, grid=finest,
                          objective=float(terms.loss), eig_term=float(terms.eig),
                          ortho_term=float(terms.ortho), k=0, k_scores={}, history=history,
                          solver=self.solver, seconds=seconds, layers=len(affs),
                          affinities=sum(a.heads for a in affs), constant=constant, **info)

    def _solve_adam(self, affs, sampler, finest, pooler, dev):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = ToyCNN(self.n_channels, finest, self.width)
        net = net.to(dev).train()
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        history = []
        buffer = None
        fresh = 1
        if sampler is not None and self.buffer_size > 0:
            first = [affs]                  # the draw already made fills the first slot

            def sample(i):
                if first:
                    return first.pop()
                return _to_device(sampler(i), dev, self.dtype)
            buffer = AttentionBuffer(sample, self.buffer_size, self.buffer_reuse,
                                     self.buffer_keep, seed=self.seed)
        fixed = sampler is None and not self.repeat_fixed_passes
        updates = 0
        i = 0
        opt.zero_grad()
        # The code's loop: i = 0..passes, backward every pass, step when i % accumulate == 0
        # and i != 0 (the first group has accumulate + 1 passes).
        while i <= self.passes:
            if fixed:
                group = self.accumulate + 1 if i == 0 else self.accumulate
                group = min(group, self.passes + 1 - i)
                terms = ldsc_loss(net(), affs, self.pool, self.w_eig, self.w_ortho, pooler)
                (terms.loss * group).backward()
                i += group
            else:
                if buffer is not None:
                    cur = buffer()
                elif sampler is not None and i > 0:
                    cur = _to_device(sampler(i), dev, self.dtype)
                    fresh += 1
                else:
                    cur = affs
                terms = ldsc_loss(net(), cur, self.pool, self.w_eig, self.w_ortho, pooler)
                terms.loss.backward()
                i += 1
            if (i - 1) % self.accumulate == 0 and i - 1 != 0:
                opt.step()
                opt.zero_grad()
                updates += 1
                history.append(float(terms.loss.detach()))
        if buffer is not None:
            fresh = buffer.fresh
        with torch.no_grad():
            Z = net().detach()
        return Z, history, {"updates": updates, "passes": self.passes + 1,
                            "fresh_captures": fresh if sampler is not None else 0}

    def _solve_eigen(self, affs, sampler, finest, pooler, dev):
        groups = [grouped_affinities(affs)]
        fresh = 1 if sampler is not None else 0
        if sampler is not None:
            for d in range(1, self.noise_draws):
                groups.append(grouped_affinities(_to_device(sampler(d), dev, self.dtype)))
                fresh += 1
        grouped = average_grouped(groups)
        del groups
        with torch.no_grad():
            vecs, vals = eigen_warm_start(grouped, self.n_channels, finest, self.pool,
                                          seed=self.seed, iterations=self.krylov_iterations,
                                          depth=self.krylov_depth)
        # Round the spectral embedding to a partition into K channels (K-means on the
        # eigenvectors scaled by their eigenvalues), the soft partition the recipe's softmax
        # channels converge to; then a short refinement of the loss from there.
        K = min(self.n_channels, finest[0] * finest[1])
        emb = (vecs * vals.clamp_min(0)).double().cpu().numpy()
        from sklearn.cluster import KMeans
        n_distinct = len(np.unique(np.round(emb, 12), axis=0))
        if n_distinct >= K:
            lab = KMeans(K, n_init=3, random_state=self.seed).fit_predict(emb)
        else:                                           # a constant image: nothing to round
            lab = np.arange(emb.shape[0]) % K
        onehot = F.one_hot(torch.from_numpy(lab).long(), K).T.float().reshape(K, *finest)
        logits = (self.init_scale * onehot).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=self.refine_lr)
        history = []
        for _ in range(self.refine_steps):
            opt.zero_grad()
            loss = grouped_loss(torch.softmax(logits, 0), grouped, self.w_eig, self.w_ortho,
                                pooler)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        Z = torch.softmax(logits.detach(), 0)
        return Z, history, {"updates": self.refine_steps, "passes": self.refine_steps,
                            "fresh_captures": fresh}

    # -- the grouper interface --------------------------------------------------------------
    def fit_predict(self, source, out_size=None, image=None, device=None):
        """Segment ``source`` (a Capture, ``{resolution: maps}``, a list of
        :class:`LayerAffinity`, or an :class:`AffinitySampler` for fresh SD affinities);
        returns a :class:`~segbook.pipelines.walk_and_cut.SegmentationResult` (timings
        ``solve``, ``decode``, ``upsample``, ``total``) and keeps the solver's
        :class:`LDSCResult` in :attr:`last`."""
        return super().fit_predict(source, out_size, image, device)

    def _segment(self, source, out_size, image, dev, clock):
        from segbook.pipelines.groupers import _out_size
        from segbook.upsamplers.labels import nearest_upsample
        clock.times.setdefault("solve", 0.0)
        clock.times.setdefault("decode", 0.0)
        with clock.step("solve"):
            result = self.solve(source, device=dev)
        with clock.step("decode"):
            if result.constant:
                from segbook.groupers.kmeans import KMeansSelection
                n = result.x_ortho.shape[0]
                sel = KMeansSelection(labels=np.zeros(n, dtype=np.int64), k=1, scores={})
            else:
                sel = decode(result.x_ortho, self.k, self.k_range, self.seed, self.n_init)
        result.k, result.k_scores = sel.k, dict(sel.scores)
        hw = result.grid
        token_labels = sel.labels.reshape(hw)
        size = _out_size(out_size, image, hw)
        with clock.step("upsample"):
            if tuple(size) == tuple(hw):
                labels = token_labels
            elif self.upsample == "nearest" or sel.k == 1:
                labels = nearest_upsample(sel.labels, hw, size).cpu().numpy()
            else:
                labels = _feature_upsample(result.x_ortho, sel.labels, hw, size)
        self.last = result
        return labels, token_labels, None


def _feature_upsample(X: np.ndarray, labels: np.ndarray, grid, size) -> np.ndarray:
    """``X_ortho`` bilinearly upsampled to ``size``; each pixel to the nearest K-means centre."""
    k = int(labels.max()) + 1
    centres = np.stack([X[labels == c].mean(0) for c in range(k)])
    h, w = grid
    Xt = torch.from_numpy(X.T.reshape(1, -1, h, w)).float()
    up = F.interpolate(Xt, size=tuple(size), mode="bilinear", align_corners=False)[0]
    flat = up.reshape(up.shape[0], -1).T                                   # (HW, K)
    d = torch.cdist(flat, torch.from_numpy(centres).float())
    return d.argmin(1).reshape(tuple(size)).numpy().astype(np.int64)


def planted_layer_affinities(labels, layers_per_resolution: Mapping[int, int] | None = None,
                             heads: int = 8, seed: int = 0, **planted) -> list[LayerAffinity]:
    """Planted multi-layer attention: regions of ``labels`` planted consistently in every head
    of every layer (:func:`segbook.pipelines.synthetic.planted_attention`, independent noise per
    head). Default: 3 layers at 32 x 32, 3 at 16 x 16 and 2 at 8 x 8 tokens, 8 heads each
    (64 affinities, the issue's orientation case)."""
    from segbook.pipelines.synthetic import planted_attention
    spec = dict(layers_per_resolution or {32: 3, 16: 3, 8: 2})
    out = []
    for j, (r, n) in enumerate(sorted(spec.items(), reverse=True)):
        maps = planted_attention(labels, resolutions=(r,), layers=n * heads,
                                 seed=int(seed) * 1009 + j, **planted)[r]
        for i in range(n):
            out.append(LayerAffinity(f"r{r}.{i}", (r, r), torch.stack(maps[i * heads:(i + 1) * heads])))
    return out
