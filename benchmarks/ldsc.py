"""Benchmark: layer-distributed spectral clustering, the authors' recipe against the fast solver.

Paper 2's per-image objective (``segbook.groupers.ldsc``) on the same affinities, in one process:

* ``recipe_literal``: the authors' recipe as their code runs it: the conv-net channels, Adam
  (lr 2e-3), ``--passes`` backward passes (2000) with a step every 20, every pass computed
  (``repeat_fixed_passes=True``);
* ``recipe``: the same recipe with the 20 identical passes between two updates computed once
  and their gradient multiplied by 20 (affinities are fixed here, so the summed gradient is the
  same; 100 updates, 101 loss evaluations);
* ``eigen_only``: the fast solver's eigensolver warm start without refinement (the issue's
  "an eigensolver alone is not enough");
* ``eigen``: the fast solver (block Krylov warm start, K-means rounding, 100 refinement steps
  of the same loss on per-grid averaged maps), the library default.

Planted multi-layer attention: a toy scene with ``--regions`` regions planted in 3 layers at
32 x 32, 3 at 16 x 16 and 2 at 8 x 8 tokens, 8 heads each (64 affinities: the issue's
orientation case), ``--seeds`` scenes. Then the texture-mosaic benchmark (``--mosaic N``
images at 256 px) with EfficientNet-Lite0's per-block feature-similarity stand-in (13 blocks,
32/16/8 grids) scored with the ``oracle_merged`` protocol (paper 2's per-image majority rule);
the literal recipe is not run there (it would be 20 times the ``recipe`` row).

Each row: the final objective (the exact loss over every head of every layer), ARI or oracle
mIoU, seconds (solve, decode and upsampling), peak resident memory, the speed-up over the
recipe rows, torch threads and the load average (timings on a shared machine are provisional).
Writes ``results/cpu/bench/ldsc.csv`` (or ``--out``).

    .venv/bin/python benchmarks/ldsc.py [--passes 2000] [--seeds 0 1] [--mosaic 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import adjusted_rand_score

from segbook.book.paths import results_root
from segbook.book.results import atomic_write_csv
from segbook.groupers.ldsc import (
    LayerDistributedSpectralClustering,
    cnn_layer_affinities,
    planted_layer_affinities,
)
from segbook.pipelines.synthetic import _downsample_labels, planted_scene


def methods(passes: int) -> dict:
    return {
        "recipe_literal": {"solver": "adam", "passes": passes, "repeat_fixed_passes": True},
        "recipe": {"solver": "adam", "passes": passes},
        "eigen_only": {"solver": "eigen", "refine_steps": 0},
        "eigen": {"solver": "eigen"},
    }


def run(params: dict, source, out_size=None):
    g = LayerDistributedSpectralClustering(device="cpu", **params)
    cpu = time.process_time()
    start = time.perf_counter()
    res = g.fit_predict(source, out_size=out_size)
    return res, g.last, time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2000)
    parser.add_argument("--regions", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--mosaic", type=int, default=4, help="mosaic images (0: skip)")
    parser.add_argument("--skip-literal", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(results_root() / "cpu" / "bench" / "ldsc.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    common = {"torch_threads": args.threads, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "device": "cpu"}
    table = methods(args.passes)
    if args.skip_literal:
        table.pop("recipe_literal")

    # warm-up (imports, allocator) so that the first timed row is not charged for them
    scene = planted_scene(64, 3)
    run({"solver": "eigen", "n_channels": 4}, planted_layer_affinities(scene, {8: 1}, heads=1))

    for seed in args.seeds:
        scene = planted_scene(128, args.regions)
        affs = planted_layer_affinities(scene, seed=seed)
        truth = _downsample_labels(scene, 32).ravel()
        for name, params in table.items():
            load = os.getloadavg()[0]
            res, last, wall, cpu = run(params, affs)
            print(f"planted seed {seed} {name}: {wall:.2f} s, objective {last.objective:.4f}",
                  flush=True)
            rows.append({"case": "planted_32x32_64_affinities", "seed": seed, "images": 1,
                         "method": name, "solver": params["solver"],
                         "passes": last.passes, "updates": last.updates,
                         "objective": round(last.objective, 4),
                         "ari": round(adjusted_rand_score(truth, res.token_labels.ravel()), 4),
                         "oracle_miou": None, "segments": res.n_segments,
                         "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                         "solve_seconds": round(res.timings["solve"], 3),
                         "peak_rss_mib": round(res.peak_memory_bytes / 2 ** 20, 1),
                         "load_average_1min": round(load, 2), **common})

    if args.mosaic:
        from segbook.backbones import load_backbone
        from segbook.data import mosaic_benchmark
        from segbook.eval import evaluate
        bench = mosaic_benchmark("v1", n=args.mosaic, size=256)
        eff = load_backbone("effnet-lite0", device="cpu")
        sources = [cnn_layer_affinities(eff, img, size=256) for img in bench.images]
        for name in ("recipe", "eigen"):
            params = table[name]
            preds, objs, secs, cpus, peaks = [], [], [], [], []
            load = os.getloadavg()[0]
            for affs, lab in zip(sources, bench.labels):
                res, last, wall, cpu = run(params, affs, out_size=lab.shape)
                preds.append(res.labels)
                objs.append(last.objective)
                secs.append(wall)
                cpus.append(cpu)
                peaks.append(res.peak_memory_bytes)
            score = evaluate(preds, bench.labels, "oracle_merged", num_classes=bench.num_classes)
            print(f"mosaic {name}: {np.mean(secs):.2f} s/image, oracle mIoU {score.miou:.4f}",
                  flush=True)
            rows.append({"case": "mosaic_v1_256px_effnet_stand_in", "seed": None,
                         "images": len(preds), "method": name, "solver": params["solver"],
                         "passes": last.passes, "updates": last.updates,
                         "objective": round(float(np.mean(objs)), 4), "ari": None,
                         "oracle_miou": round(score.miou, 4),
                         "segments": round(float(np.mean([p.max() + 1 for p in preds])), 2),
                         "seconds": round(float(np.mean(secs)), 3),
                         "cpu_seconds": round(float(np.mean(cpus)), 3),
                         "solve_seconds": None,
                         "peak_rss_mib": round(max(peaks) / 2 ** 20, 1),
                         "load_average_1min": round(load, 2), **common})

    df = pd.DataFrame(rows)
    for ref in ("recipe_literal", "recipe"):
        keys = [(c, -1 if pd.isna(s) else int(s)) for c, s in zip(df.case, df.seed)]
        base = {key: t for key, t, m in zip(keys, df.seconds, df.method) if m == ref}
        df[f"speedup_over_{ref}"] = [round(base[key] / t, 2) if key in base else None
                                     for key, t in zip(keys, df.seconds)]
    atomic_write_csv(args.out, df)
    print(df.to_string(index=False))
    print(f"wrote {args.out}")
    return df


if __name__ == "__main__":
    main()
