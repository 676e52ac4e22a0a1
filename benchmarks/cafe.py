"""Benchmark: CAFE's three stages at EASe's size (640 x 480 pixels from a 40 x 30 token grid).

Input: a texture-mosaic layout (``make_mosaic``, 6 Voronoi regions) turned into features with
a known answer: a random unit embedding per region, tokens average-pooled to 40 x 30 plus
token noise (so that neighbouring tokens of one region are not identical: about 0.92 cosine,
under CAFE's 0.97, the hard case where the dictionary does not shrink), high-resolution
features = the tokens upsampled bilinearly plus pixel noise; the attention is the bilinear
upsampler's distance attention (``segbook.upsamplers.distance_attention``, cheap to compute:
the upsampler's attention is SAUCE's cost, not CAFE's; its time per pass is a column of its
own).

Rows, per channel count ``C`` (``--channels``, default 320 = the stand-in's width, and 1024 =
DINOv3-L's):

* ``cafe``: all three stages (``CAFE().hierarchy``), for each ``--precision`` (``auto``, the
  default: bfloat16 products, near ties re-checked in float32, so that the labels and the
  seeds are float32's; ``bfloat16_unchecked``, no float32 re-check of near ties): seconds per
  stage, the pixel-by-prototype
  multiply-adds performed (seeding ``n N C``, every stage-1 pass ``N K_i C``, stage 2
  ``N K' C``), the rate they ran at, and the machine's bfloat16 and float32 matrix-product
  rates measured in the same run on the same shapes (``(8192 x C) @ (C x n)``); peak added
  resident memory against the feature map's size. ``cafe_minus_attention_s`` subtracts the
  time the attention itself took to compute its chunks during the run (``attention_in_run_s``,
  both passes, clocked inside its generator by :class:`TimedAttention`: SAUCE's cost, which
  the targets exclude; CAFE's reading of the chunks stays in); the rate
  ``achieved_gflops_stage12`` uses the same subtraction. ``attention_pass_s`` is one separate
  pass (the fastest of three), for reference.
* ``sweep``: stage 3's sweep, incremental (``merge_sweep``) against the naive per-threshold
  recomputation (``merge_sweep_naive``), on the stage-2 labels of a ``--naive-size`` image
  (the naive sweep recomputes adjacency from pixels 691 times, too slow at full size), and
  whether both give the same snapshots.

Writes ``results/cpu/bench/cafe.csv`` (or ``--out``).

* ``primitives``: milliseconds per whole-image pass of the operations stages 1-2 are made of
  (:func:`primitive_row`): the product, torch's reductions over ``K`` (what the torch fallback
  runs) and the compiled reductions of :mod:`segbook.groupers.cafe_native` (what runs when a
  C++ compiler is found: argmax + runner-up margin in one pass, and with the pooled attention
  ``A G`` added).

The ``cafe`` rows run with the compiled reductions (column ``native``); ``--fallback`` adds
rows with the torch code (``SEGBOOK_NATIVE=0``) for comparison.

Every row is run at each ``--threads`` value (default 1 and 2, this machine's cores); each
``cafe`` row is the median of ``--repeat`` runs (default 3), with the range beside it.

    nice .venv/bin/python benchmarks/cafe.py [--channels 320 1024] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from segbook.book.paths import results_root
from segbook.book.results import atomic_write_csv
from segbook.data.mosaic import make_mosaic
from segbook.groupers import cafe_native
from segbook.groupers.cafe import CAFE
from segbook.groupers.cafe_merge import merge_sweep, merge_sweep_naive, sweep_data, thresholds
from segbook.groupers.cafe_stages import CHUNK, bf16_error
from segbook.pipelines.walk_and_cut import peak_memory
from segbook.upsamplers.base import distance_attention


def bench_inputs(C, size=(480, 640), grid=(30, 40), seed=0, token_noise=0.3, pixel_noise=0.2):
    _, lab = make_mosaic(3 + seed, size=size, n_regions=6, layout="voronoi")
    lab = np.unique(lab, return_inverse=True)[1].reshape(lab.shape)
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(int(lab.max()) + 1, C, generator=g), dim=1)
    f0 = emb[torch.from_numpy(lab)].permute(2, 0, 1)
    low = F.adaptive_avg_pool2d(f0[None], grid)[0]
    low = low + token_noise * torch.randn(C, *grid, generator=g) / C ** 0.5
    feats = F.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0]
    feats = feats + pixel_noise * torch.randn(C, *size, generator=g) / C ** 0.5
    att = distance_attention(size, grid)
    return feats, low, att, lab


def matmul_rate(C, n, dtype, seconds=1.0):
    a = torch.randn(8192, C).to(dtype)
    b = torch.randn(n, C).to(dtype)
    a @ b.T
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b.T
        reps += 1
    return 2 * 8192 * C * n * reps / (time.perf_counter() - t0) / 1e9


def attention_pass(att, repeats: int = 3) -> float:
    """Seconds to compute the attention once, chunk by chunk: the fastest of ``repeats``
    passes, so that a slow pass never inflates what is subtracted from CAFE's time."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in att.chunks():
            pass
        best = min(best, time.perf_counter() - t0)
    return best


def set_native(on: bool) -> None:
    """Use the compiled reductions (``on``) or the torch fallback from now on."""
    if on:
        os.environ.pop("SEGBOOK_NATIVE", None)
    else:
        os.environ["SEGBOOK_NATIVE"] = "0"
    cafe_native._library.cache_clear()


class TimedAttention:
    """The attention as CAFE sees it, with a clock on its own work: ``seconds`` adds up the
    time spent computing chunks (inside the generator), i.e. the upsampler's cost during the
    run, which the issue's targets exclude."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0
        self.shape, self.out_size, self.grid = inner.shape, inner.out_size, inner.grid

    def chunks(self):
        it = self.inner.chunks()
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield item


def run_cafe(C, size, grid, precision="auto"):
    feats, low, att, lab = bench_inputs(C, size, grid)
    t_att = attention_pass(att)
    rate_bf16 = matmul_rate(C, grid[0] * grid[1], torch.bfloat16)
    rate_f32 = matmul_rate(C, grid[0] * grid[1], torch.float32, seconds=0.5)
    cafe = CAFE(precision=precision)
    timed = TimedAttention(att)
    cpu0 = time.process_time()
    with peak_memory() as peak:
        t0 = time.perf_counter()
        res = cafe.hierarchy(feats, low, timed)
        total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    t_in = timed.seconds            # the attention's own time during the run (both passes)
    N, n = size[0] * size[1], grid[0] * grid[1]
    sizes = res.dictionary_sizes
    # seeding (n tokens against N pixels), one pass per application of U (the dictionary
    # size before it), stage 2 against the final dictionary
    passes = [n] + sizes[:-1]
    macs = sum(N * k * C for k in passes) + N * sizes[-1] * C
    matmul_s = res.timings.get("stage1", 0) + res.timings.get("stage2", 0) - t_in
    from sklearn.metrics import adjusted_rand_score
    best_ari = max(adjusted_rand_score(lab.ravel(), res.hierarchy.labels(i).ravel())
                   for i in range(len(res.hierarchy.levels)))
    return {
        "row": "cafe", "precision": precision, "channels": C, "height": size[0], "width": size[1],
        "grid": f"{grid[0]}x{grid[1]}", "seconds": round(total, 3),
        "cafe_minus_attention_s": round(total - t_in, 3),
        "attention_in_run_s": round(t_in, 3), "attention_pass_s": round(t_att, 3),
        "prepare_s": round(res.timings.get("prepare", 0), 3),
        "gradient_s": round(res.timings["gradient"], 3),
        "stage1_s": round(res.timings["stage1"], 3), "stage2_s": round(res.timings["stage2"], 3),
        "edge_refinement_s": round(res.timings["edge_refinement"], 3),
        "stage3_s": round(res.timings["stage3"], 3),
        "dictionary_sizes": "/".join(map(str, sizes)), "feature_passes": len(passes) + 1,
        "stage2_segments": int(res.stage2_labels.max()) + 1,
        "snapshots": len(res.hierarchy.snapshots), "levels": len(res.hierarchy.levels),
        "best_level_ari": round(best_ari, 3),
        "gmacs": round(macs / 1e9, 1),
        "achieved_gflops_stage12": round(2 * macs / max(matmul_s, 1e-9) / 1e9, 1),
        "matmul_gflops_bf16": round(rate_bf16, 1), "matmul_gflops_f32": round(rate_f32, 1),
        "peak_added_mib": round((peak["bytes"] - peak["start"]) / 2 ** 20, 1),
        "feature_map_mib": round(feats.numel() * 4 / 2 ** 20, 1),
        "cpu_s": round(cpu, 3), "native": cafe_native.available(),
    }


def median_run(C, size, grid, precision, repeats):
    """:func:`run_cafe` ``repeats`` times; the median run's row (by ``cafe_minus_attention_s``)
    with the range of that time and of the stage 1+2 rate over the runs (this machine's timings
    vary by about 10% from run to run)."""
    runs = sorted((run_cafe(C, size, grid, precision) for _ in range(max(1, repeats))),
                  key=lambda r: r["cafe_minus_attention_s"])
    row = dict(runs[len(runs) // 2])
    rates = [r["achieved_gflops_stage12"] / r["matmul_gflops_bf16"] for r in runs]
    row.update(repeats=len(runs), cafe_minus_attention_min_s=runs[0]["cafe_minus_attention_s"],
               cafe_minus_attention_max_s=runs[-1]["cafe_minus_attention_s"],
               stage12_share_of_matmul_min=round(min(rates), 3),
               stage12_share_of_matmul_max=round(max(rates), 3))
    return row


def primitive_row(C, size, grid, chunk=CHUNK, reps=3):
    """Milliseconds per whole-image pass (``N = H W`` pixels against ``K = h w`` prototypes,
    ``chunk`` pixels at a time) of the primitives CAFE's stages 1-2 are made of: the bfloat16
    product, the row argmax, the top-2 used by the float32 re-check, the column scatter-add of
    ``A G`` and the bfloat16 -> float32 conversion of the scores (torch's, the fallback's), and
    the compiled reductions that replace them (``pass_native_*``: argmax and runner-up margin
    in one pass, with and without the pooled attention added). It shows where the time goes
    beside the product itself."""
    N, K = size[0] * size[1], grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(chunk, C, generator=g), dim=1).bfloat16()
    D = F.normalize(torch.randn(K, C, generator=g), dim=1).bfloat16()
    a = torch.rand(chunk, K, generator=g)
    a /= a.sum(dim=1, keepdim=True)
    idx = torch.randint(0, K, (K,), generator=g)
    s = x @ D.T
    native = {}
    if cafe_native.available():
        plan = cafe_native.PoolPlan(idx, K)
        err = bf16_error(C)
        native = {"pass_native_best_margin_ms": lambda: cafe_native.best_rows(s, error=err),
                  "pass_native_best_margin_AG_ms": lambda: cafe_native.best_rows(
                      s, a, plan, 0.75, 0.25, error=err)}

    def ms(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return round((time.perf_counter() - t0) / reps * N / chunk * 1e3, 1)

    return {"row": "primitives", "channels": C, "height": size[0], "width": size[1],
            "grid": f"{grid[0]}x{grid[1]}", "pass_matmul_bf16_ms": ms(lambda: x @ D.T),
            "pass_row_argmax_ms": ms(lambda: s.max(dim=1)),
            "pass_top2_ms": ms(lambda: s.topk(2, dim=1)),
            "pass_scatter_add_AG_ms": ms(lambda: torch.zeros(chunk, K).index_add_(1, idx, a)),
            "pass_to_float32_ms": ms(lambda: s.float()),
            **{k: ms(fn) for k, fn in native.items()}}


def run_sweep(C, size, grid):
    feats, low, att, _ = bench_inputs(C, size, grid)
    res = CAFE().hierarchy(feats, low, att)
    data = sweep_data(res.stage2_labels, feats, keep_features=True)
    taus = thresholds()
    t0 = time.perf_counter()
    fast = merge_sweep(data, taus, 0.0, 50)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = merge_sweep_naive(data, taus, 0.0, 50)
    t_slow = time.perf_counter() - t0
    same = len(fast) == len(slow) and all(
        np.array_equal(a.mapping, b.mapping) and a.tau == b.tau for a, b in zip(fast, slow))
    return {"row": "sweep", "channels": C, "height": size[0], "width": size[1],
            "grid": f"{grid[0]}x{grid[1]}", "stage2_segments": len(data.area),
            "snapshots": len(fast), "incremental_s": round(t_fast, 4),
            "naive_s": round(t_slow, 3), "speedup": round(t_slow / max(t_fast, 1e-9), 1),
            "same_snapshots": bool(same)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[320, 1024])
    ap.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    ap.add_argument("--grid", type=int, nargs=2, default=[30, 40], metavar=("h", "w"))
    ap.add_argument("--naive-size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    ap.add_argument("--precision", nargs="+", default=["auto", "bfloat16_unchecked"],
                    help="CAFE(precision=...) values to run (auto: bfloat16 products with "
                         "float32 re-checks, the library default)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per cafe row; the row reported is the median run (by time "
                         "without the attention), with the fastest and slowest beside it")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads; every row is run at each (2 = all cores here)")
    ap.add_argument("--fallback", action="store_true",
                    help="also run the cafe rows with the torch reductions (SEGBOOK_NATIVE=0)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        new = []
        for C in args.channels:
            for native in ([True, False] if args.fallback else [True]):
                set_native(native)
                for precision in args.precision:
                    new.append(median_run(C, tuple(args.size), tuple(args.grid), precision,
                                          args.repeat))
                    print(new[-1], flush=True)
            set_native(True)
            new.append(primitive_row(C, tuple(args.size), tuple(args.grid)))
            print(new[-1], flush=True)
        if threads == args.threads[0]:
            new.append(run_sweep(args.channels[0], tuple(args.naive_size), (12, 16)))
            print(new[-1], flush=True)
        load = os.getloadavg()[0]
        for r in new:
            r.update(threads=threads, load_avg_1min=round(load, 2),
                     cpu=platform.processor() or platform.machine())
        rows += new
    out = args.out or results_root() / "cpu" / "bench" / "cafe.csv"
    atomic_write_csv(out, pd.DataFrame(rows))
    print("wrote", out)


if __name__ == "__main__":
    main()
