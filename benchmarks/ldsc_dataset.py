"""Benchmark: paper 2's dataset-level kNN graph and one optimisation step, one and two processes.

Rows (``results/cpu/bench/ldsc_dataset.csv`` or ``--out``):

* ``bare_matmul``: the floor, the chunked similarity product alone (``--images`` x
  ``--tokens`` unit vectors of ``--dim`` dims against all of them, ``--chunk`` rows at a
  time: ``N^2 d`` multiply-adds; 2.1 TFLOP at the issue's 40 x 1024 x 640);
* ``knn_graph``: :func:`segbook.graphs.knn.dataset_knn_graph` on the same vectors (V-V,
  top-50 within + top-50 across images, threshold 0.1, symmetrised, ``D^-1 A``), with its
  ratio to the bare product measured in the same run and the peak memory it added (resident
  set, ``VmHWM`` reset at entry) against the dense N x N similarity it never forms;
* ``step``: one mini-batch of :class:`segbook.groupers.ldsc_dataset.DatasetSpectralClustering`
  (5 AdamW steps on ``K = 100`` channels of 32 x 32 tables over the graph of one 32 x 32 layer);
* ``fit_1proc`` / ``fit_2proc``: a small fit (planted tokens, ``--fit-images`` images, batch 4,
  ``--fit-iterations`` mini-batches in all) in one process and under ``torchrun`` with 2 gloo
  processes (each rank half the images and half the mini-batches: the same work split in two;
  on a 2-core machine shared with other jobs the speed-up is bounded by the free cores).

Timings on the shared 2-core machine are provisional; the load average is recorded.

    .venv/bin/python benchmarks/ldsc_dataset.py [--images 40] [--tokens 1024] [--dim 640]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import pandas as pd
import torch

from segbook.book.results import atomic_write_csv
from segbook.graphs.knn import dataset_knn_graph
from segbook.pipelines.walk_and_cut import peak_memory

FIT = '''
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from segbook.groupers.ldsc_dataset import DatasetSpectralClustering, planted_token_source
n, iters = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
labels = [rng.integers(0, 6, (4, 4)).repeat(8, 0).repeat(8, 1) for _ in range(n)]
src = planted_token_source(labels, grids=(32, 16), dim=64)
import torch.distributed as dist
if "RANK" in __import__("os").environ:
    dist.init_process_group("gloo")
t = time.perf_counter()
fit = DatasetSpectralClustering(n_channels=100, batch_size=4, iterations=iters, progress=False).fit(src)
print("SECONDS", time.perf_counter() - t)
if dist.is_initialized():
    dist.destroy_process_group()
'''


def _run_fit(nproc: int, images: int, iterations: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "fit.py")
        with open(script, "w") as fh:
            fh.write(FIT)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, script, str(images), str(iterations)] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", script, str(images), str(iterations)]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
        wall = time.perf_counter() - t
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
    fit = max(float(line.split()[1]) for line in out.stdout.splitlines()
              if line.startswith("SECONDS"))
    return fit, wall


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit-images", type=int, default=8)
    parser.add_argument("--fit-iterations", type=int, default=8)
    parser.add_argument("--out", default="results/cpu/bench/ldsc_dataset.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    N = args.images * args.tokens
    g = torch.Generator().manual_seed(0)
    # image-like tokens: a shared class structure plus noise, so the threshold keeps edges
    centres = torch.randn(20, args.dim, generator=g)
    x = centres[torch.randint(0, 20, (N,), generator=g)] + 0.8 * torch.randn(N, args.dim, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    rows = []
    common = {"images": args.images, "tokens": args.tokens, "nodes": N, "dim": args.dim,
              "chunk": args.chunk, "threads": torch.get_num_threads()}

    def record(name, seconds, cpu, peak=None, **extra):
        rows.append({"case": name, **common, "seconds": round(seconds, 3),
                     "cpu_seconds": round(cpu, 3),
                     "peak_added_mib": None if peak is None else round(peak / 2**20, 1),
                     "load_avg_1min": round(os.getloadavg()[0], 2), **extra})
        print(rows[-1], flush=True)

    with peak_memory() as peak:
        t, c = time.perf_counter(), time.process_time()
        for r0 in range(0, N, args.chunk):
            S = x[r0:r0 + args.chunk] @ x.T
            del S
        bare, bare_cpu = time.perf_counter() - t, time.process_time() - c
    record("bare_matmul", bare, bare_cpu, peak["bytes"] - peak["start"],
           tflop=round(2 * N * N * args.dim / 1e12, 3))
    with peak_memory() as peak:
        t, c = time.perf_counter(), time.process_time()
        graph = dataset_knn_graph(x, tokens_per_image=args.tokens, k_intra=50, k_inter=50,
                                  threshold=0.1, chunk=args.chunk)
        knn, knn_cpu = time.perf_counter() - t, time.process_time() - c
    record("knn_graph", knn, knn_cpu, peak["bytes"] - peak["start"],
           ratio_to_bare=round(knn / bare, 3), cpu_ratio_to_bare=round(knn_cpu / bare_cpu, 3), edges=graph.info["edges"],
           dense_similarity_mib=round(N * N * 4 / 2**20, 1),
           authors_mask_mib=round(N * N / 2**20, 1))
    from segbook.groupers.ldsc_dataset import GraphLayer, dataset_loss
    side = round(args.tokens ** 0.5)
    layers = [GraphLayer("bench", (side, side), graph)]
    tables = torch.randn(args.images, 100, side, side, requires_grad=True)
    opt = torch.optim.AdamW([tables], lr=1e-2, weight_decay=0)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(5):
        opt.zero_grad()
        dataset_loss(torch.softmax(tables, 1), layers).loss.backward()
        opt.step()
    record("step", time.perf_counter() - t, time.process_time() - c, None,
           note="one mini-batch: 5 AdamW steps, K = 100 channels, over the graph above")
    for nproc in (1, 2):
        # the same total work: --fit-iterations mini-batches of 4 images, split over the ranks
        iters = args.fit_iterations // nproc
        fit, wall = _run_fit(nproc, args.fit_images, iters)
        record(f"fit_{nproc}proc", fit, 0.0, None,
               note=f"{args.fit_images} planted images (32 x 32 and 16 x 16 layers, K = 100), "
                    f"{iters} mini-batches of 4 per rank; seconds = slowest rank's fit",
               nproc=nproc, wall_with_startup=round(wall, 1))
    df = pd.DataFrame(rows)
    df["machine"] = platform.machine()
    atomic_write_csv(args.out, df)
    print(df.to_string(index=False))
    return df


if __name__ == "__main__":
    main()
