"""Benchmark: recursive NCut with the MAN-C stop, fast solver against the plain recipe.

Graphs built the way paper 1 builds them: a block-structured row-stochastic P (1024 = 32^2 and
4096 = 64^2 tokens, five blocks of unequal sizes) and A = P P^T. On each graph, in the same
process:

* ``plain``: DiffCut's recipe written directly (``segbook.groupers.plain_recursive_ncut``): a
  dense ``numpy.linalg.eigh`` per split, NCut of 100 thresholds one by one;
* ``fast``: ``segbook.groupers.recursive_ncut`` on the dense A (block Krylov Fiedler vectors,
  each part warm-started from its parent's Ritz vectors; exact threshold search from cumulative
  sums), best of ``--repeats`` runs;
* ``factored``: the same on ``FactoredAffinity(P)`` (A = P P^T never formed), best of repeats.

Writes ``results/cpu/bench/ncut.csv`` (or ``--out``) with the best wall and process CPU times,
the segment counts, whether each partition equals the plain one, the speed-up over plain, the
torch threads and the load average at the time (timings taken on a busy machine are
provisional). Issue 3's target: ``fast`` at 4096 nodes in at most 0.5 s.

    .venv/bin/python benchmarks/ncut.py [--sizes 1024 4096] [--repeats 3] [--device cpu]
        [--threads 1]
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
from tqdm import tqdm

from segbook.book.paths import results_root
from segbook.book.results import atomic_write_csv
from segbook.graphs import FactoredAffinity, planted_random_walk
from segbook.groupers import plain_recursive_ncut, recursive_ncut

BLOCKS = {1024: [96, 160, 224, 256, 288], 4096: [384, 640, 896, 1024, 1152]}


def blocks_for(n: int) -> list[int]:
    if n in BLOCKS:
        return BLOCKS[n]
    base = np.array([3, 5, 7, 8, 9], dtype=float)
    sizes = np.floor(base / base.sum() * n).astype(int)
    sizes[-1] += n - sizes.sum()
    return sizes.tolist()


def timed(fn, repeats: int):
    """Best wall time and best process CPU time (steadier on a shared machine) of ``repeats``."""
    best, best_cpu, out = np.inf, np.inf, None
    for _ in range(repeats):
        cpu = time.process_time()
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best, best_cpu, out


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--leak", type=float, default=0.05)
    parser.add_argument("--device", default="cpu")
    # Torch threads; NumPy's BLAS runs single-threaded inside recursive_ncut whatever this is.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-plain-above", type=int, default=8192,
                        help="do not run the plain recipe on larger graphs")
    parser.add_argument("--out", default=str(results_root() / "cpu" / "bench" / "ncut.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    steps = tqdm(total=3 * len(args.sizes), desc="ncut benchmark", unit="run")
    for n in args.sizes:
        P, truth = planted_random_walk(blocks_for(n), leak=args.leak, seed=0, dtype=np.float32)
        A = P @ P.T                                   # float32, (n, n)
        load = os.getloadavg()[0]

        steps.set_postfix_str(f"plain n={n}")
        if n <= args.skip_plain_above:
            t_plain, c_plain, plain = timed(
                lambda A=A: plain_recursive_ncut(A, stop="manc", min_size=2), 1)
        else:
            t_plain, c_plain, plain = float("nan"), float("nan"), None
        steps.update()

        steps.set_postfix_str(f"fast n={n}")
        t_fast, c_fast, fast = timed(
            lambda A=A: recursive_ncut(A, stop="manc", device=args.device), args.repeats)
        steps.update()

        steps.set_postfix_str(f"factored n={n}")
        F = FactoredAffinity(torch.from_numpy(P), device=args.device)
        t_fact, c_fact, fact = timed(lambda F=F: recursive_ncut(F, stop="manc"), args.repeats)
        steps.update()

        for method, seconds, cpu, labels in [("plain", t_plain, c_plain, plain),
                                             ("fast", t_fast, c_fast, np.asarray(fast)),
                                             ("factored", t_fact, c_fact, np.asarray(fact))]:
            rows.append({
                "nodes": n, "method": method, "stop": "manc",
                "seconds": round(seconds, 4),
                "cpu_seconds": round(cpu, 4),
                "segments": int(labels.max()) + 1 if labels is not None else None,
                "planted_segments": len(blocks_for(n)),
                "ari_vs_planted": (round(adjusted_rand_score(truth, labels), 4)
                                   if labels is not None else None),
                "same_partition_as_plain": (bool(np.array_equal(labels, plain))
                                            if plain is not None else None),
                "speedup_over_plain": round(t_plain / seconds, 2) if plain is not None else None,
                "repeats": 1 if method == "plain" else args.repeats,
                "target_seconds": 0.5 if (n == 4096 and method == "fast") else None,
                "device": args.device, "torch_threads": args.threads,
                "load_average_1min": round(load, 2),
                "cpu_count": os.cpu_count(), "machine": platform.machine(),
            })
    steps.close()
    df = pd.DataFrame(rows)
    atomic_write_csv(args.out, df)
    print(df.to_string(index=False))
    print(f"wrote {args.out}")
    return df


if __name__ == "__main__":
    main()
