"""Benchmark: paper 1's pipeline after capture, fast against the plain dense recipe.

Everything after capture for one image: aggregation of three attention resolutions (DiffSeg
weights), ``P^k``, the dot-product adjacency ``A = P^k (P^k)^T``, recursive NCut with the MAN-C
stop, and section 3.6's upsampling to 512 x 512. The input is a synthetic row-stochastic
attention of the right size (:func:`segbook.pipelines.planted_attention` on a six-region scene:
maps at 16^2, 32^2 and 64^2 tokens, so ``P`` is 4096 x 4096 as for a 512 px image in SD 1.4), so
no Stable Diffusion weights are needed.

* ``fast``: :func:`segbook.pipelines.segment_attention` (A never formed: the NCut solver only
  multiplies by ``P^k`` and its transpose; the upsampling never forms the 262144 x N matrix of
  upsampled rows), for k = 1..5, best of ``--repeats`` runs;
* ``plain``: the same algorithm written directly: the aggregation in float64 with torch's own
  bilinear resize and expanded copies of the repeated rows (:func:`plain_aggregate`),
  ``torch.linalg.matrix_power``, ``A = P^k (P^k)^T`` formed, one dense ``eigh`` per split with 100
  thresholds (:func:`segbook.groupers.plain_recursive_ncut`), and every upsampled row formed
  (in bands of output rows, so that it fits in memory). Run at 1024 tokens (32^2 grid,
  resolutions 8/16/32) and at 4096 when it finishes within ``--plain-timeout`` seconds
  (in a child process).

Writes ``results/cpu/bench/walk_and_cut.csv`` (or ``--out``) with the per-step wall times (and
the process CPU time of the whole call, steadier on a shared machine), the
segment counts, the agreement with the planted regions and with the plain partition, the
speed-up, the peak memory and the 1-minute load average (timings taken on a busy machine are
provisional).

    .venv/bin/python benchmarks/walk_and_cut.py [--ks 1 2 3 4 5] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from tqdm import tqdm

from segbook.book.paths import results_root
from segbook.book.results import atomic_write_csv
from segbook.graphs import diffseg_weights
from segbook.groupers import plain_recursive_ncut
from segbook.pipelines import (
    WalkAndCutConfig,
    peak_memory,
    planted_attention,
    planted_scene,
    segment_attention,
)
from segbook.pipelines.synthetic import _downsample_labels

OUT_SIZE = (512, 512)
SETUPS = {4096: (64, (16, 32, 64)), 1024: (32, (8, 16, 32))}
STEPS = ("aggregate", "power_walk", "adjacency", "ncut", "upsample")


def synthetic(nodes: int, seed: int = 0):
    side, resolutions = SETUPS[nodes]
    scene = planted_scene(64, n_regions=6)
    maps = planted_attention(scene, resolutions=resolutions, seed=seed)
    return maps, _downsample_labels(scene, side), side, resolutions


def plain_aggregate(maps, resolutions=None) -> torch.Tensor:
    """DiffSeg's aggregation written directly (float64, ``F.interpolate``, expanded rows): the
    recipe that :func:`segbook.graphs.aggregate_self_attention` computes faster."""
    resolutions = sorted(resolutions or maps)
    R = max(resolutions)
    w = diffseg_weights(resolutions)
    out = torch.zeros(R * R, R * R, dtype=torch.float64)
    for r in resolutions:
        value = maps[r]
        S = torch.stack([torch.as_tensor(v).double().reshape(-1, r * r, r * r).mean(0)
                         for v in (value if isinstance(value, (list, tuple)) else [value])]).mean(0)
        if r != R:
            keys = F.interpolate(S.reshape(r * r, 1, r, r), size=(R, R), mode="bilinear",
                                 align_corners=False).reshape(r * r, R * R)
            keys = keys / keys.sum(1, keepdim=True)
            f = R // r
            S = keys.reshape(r, 1, r, 1, R * R).expand(r, f, r, f, R * R).reshape(R * R, R * R)
        out += w[r] * S
    return out.float()


def plain_upsample(Pk: torch.Tensor, token_labels: np.ndarray, side: int, out_size,
                   band: int = 8) -> np.ndarray:
    """Section 3.6 written directly: every upsampled row formed, ``band`` output rows at a time."""
    labels = torch.from_numpy(token_labels.reshape(-1))
    K = int(labels.max()) + 1
    means = torch.stack([Pk[labels == k].mean(0) for k in range(K)])
    means = means / means.norm(dim=1, keepdim=True)
    H, W = out_size
    maps = Pk.T.reshape(1, -1, side, side)                    # (1, N, h, w): row i -> channel i
    out = np.empty((H, W), dtype=np.int64)
    for y0 in range(0, H, band):
        rows = _bilinear_band(maps, side, H, W, y0, band)            # (1, N, band, W)
        feats = rows[0].reshape(rows.shape[1], -1).T                  # (band * W, N)
        cos = (feats @ means.T) / feats.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out[y0:y0 + band] = cos.argmax(1).reshape(-1, W).numpy()
    return out


def _bilinear_band(maps, side, H, W, y0, band):
    """Output rows ``y0 .. y0 + band`` of ``F.interpolate(maps, (H, W), "bilinear")``: the
    vertical taps (half-pixel centres) by hand, then the horizontal pass."""
    ys = np.arange(y0, min(y0 + band, H))
    src = np.maximum((ys + 0.5) * side / H - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), side - 1)
    i1 = np.where(i0 < side - 1, i0 + 1, i0)
    lam = torch.from_numpy(src - i0).to(maps.dtype)[None, None, :, None]
    rows = (1 - lam) * maps[:, :, i0] + lam * maps[:, :, i1]              # (1, N, band, side)
    return F.interpolate(rows, size=(len(ys), W), mode="bilinear", align_corners=False)


def run_plain(maps, k: int, side: int) -> dict:
    times = {}
    c0 = time.process_time()
    with peak_memory() as peak:
        t = time.perf_counter()
        P = plain_aggregate(maps)
        times["aggregate"] = time.perf_counter() - t
        t = time.perf_counter()
        Pk = torch.linalg.matrix_power(P, k)
        times["power_walk"] = time.perf_counter() - t
        t = time.perf_counter()
        A = (Pk @ Pk.T).numpy()
        times["adjacency"] = time.perf_counter() - t
        t = time.perf_counter()
        token_labels = plain_recursive_ncut(A, stop="manc", min_size=2)
        times["ncut"] = time.perf_counter() - t
        t = time.perf_counter()
        labels = plain_upsample(Pk, token_labels, side, OUT_SIZE)
        times["upsample"] = time.perf_counter() - t
    times["total"] = sum(times[s] for s in STEPS)
    return {"cpu": time.process_time() - c0, "times": times, "token_labels": token_labels, "labels": labels,
            "peak": peak["bytes"], "added": peak["bytes"] - peak["start"]}


def _plain_child(results, nodes, k, threads):
    torch.set_num_threads(threads)
    maps, _, side, _ = synthetic(nodes)
    results.put(run_plain(maps, k, side))


def run_plain_with_timeout(nodes: int, k: int, threads: int, timeout: float):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_plain_child, args=(results, nodes, k, threads))
    proc.start()
    try:
        return results.get(timeout=timeout)
    except queue.Empty:        # too slow
        return None
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join()


def run_fast(maps, k: int, resolutions, repeats: int):
    config = WalkAndCutConfig(method="adjacency", adjacency="dot", k=k, stop="manc",
                              resolutions=resolutions)
    best, added, cpu = None, 0, np.inf
    for _ in range(repeats):
        with peak_memory() as peak:
            c0 = time.process_time()
            res = segment_attention(maps, config, out_size=OUT_SIZE)
            cpu = min(cpu, time.process_time() - c0)
        added = max(added, peak["bytes"] - peak["start"])
        if best is None or res.timings["total"] < best.timings["total"]:
            best = res
    return best, added, cpu


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on this 2-core machine shared with other jobs, two torch threads
    # made the same run 2-6x slower (oversubscription: k=1 took 3.1 s wall / 1.9 s CPU with 2
    # threads against 0.6-0.8 s with 1 at load ~2.5); try --threads 2 on a quiet machine.
    # NumPy's BLAS runs single-threaded inside the NCut whatever this is.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plain-timeout", type=float, default=60.0,
                        help="give up on the plain recipe at 4096 tokens after this many seconds")
    parser.add_argument("--out", default=str(results_root() / "cpu" / "bench" / "walk_and_cut.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    jobs = [("fast", 4096, k) for k in args.ks] + [("fast", 1024, 1), ("plain", 1024, 1),
                                                      ("plain", 4096, 1)]
    bar = tqdm(jobs, desc="walk_and_cut benchmark", unit="run")
    data = {n: synthetic(n) for n in (1024, 4096)}
    fast_labels = {}
    for method, nodes, k in bar:
        bar.set_postfix_str(f"{method} n={nodes} k={k}")
        maps, truth, side, resolutions = data[nodes]
        load = os.getloadavg()[0]
        row = {"nodes": nodes, "grid": f"{side}x{side}", "method": method, "graph": "dot",
               "stop": "manc", "k": k, "resolutions": "/".join(map(str, resolutions)),
               "out_size": f"{OUT_SIZE[0]}x{OUT_SIZE[1]}"}
        if method == "fast":
            res, added, cpu = run_fast(maps, k, resolutions, args.repeats)
            times, token_labels, peak = res.timings, res.token_labels, res.peak_memory_bytes
            fast_labels[(nodes, k)] = (token_labels, res.labels)
            repeats = args.repeats
        else:
            if nodes == 4096:
                out = run_plain_with_timeout(nodes, k, args.threads, args.plain_timeout)
            else:
                out = run_plain(maps, k, side)
            repeats = 1
            if out is None:
                row.update({"total": np.nan, "note": f"did not finish in {args.plain_timeout:.0f} s",
                            "repeats": 1, "load_average_1min": round(load, 2)})
                rows.append(row)
                continue
            times, token_labels, peak = out["times"], out["token_labels"], out["peak"]
            added, cpu = out["added"], out["cpu"]
            fast_tokens, fast_pixels = fast_labels[(nodes, k)]
            row["same_partition_as_fast"] = bool(adjusted_rand_score(
                np.ravel(token_labels), np.ravel(fast_tokens)) == 1.0)
            row["pixel_agreement_with_fast"] = round(float(adjusted_rand_score(
                out["labels"].ravel(), fast_pixels.ravel())), 4)
        row.update({s: round(float(times[s]), 4) for s in STEPS})
        row["total"] = round(float(times["total"]), 4)
        # process CPU time: less sensitive than wall time to other jobs on a shared machine
        row["total_cpu_seconds"] = round(float(cpu), 4)
        row["segments"] = int(np.max(token_labels)) + 1
        row["planted_segments"] = len(np.unique(truth))
        row["ari_vs_planted"] = round(float(adjusted_rand_score(truth.ravel(),
                                                                np.ravel(token_labels))), 4)
        row["peak_rss_mib"] = round(peak / 2 ** 20, 1)
        row["peak_added_mib"] = round(added / 2 ** 20, 1)
        row["repeats"] = repeats
        row["load_average_1min"] = round(load, 2)
        rows.append(row)

    df = pd.DataFrame(rows)
    for nodes in (1024, 4096):
        fast = df[(df.method == "fast") & (df.nodes == nodes) & (df.k == 1)]["total"]
        plain = df[(df.method == "plain") & (df.nodes == nodes)]["total"]
        if len(fast) and len(plain) and np.isfinite(plain.iloc[0]):
            df.loc[(df.method == "plain") & (df.nodes == nodes), "speedup_of_fast"] = \
                round(float(plain.iloc[0] / fast.iloc[0]), 2)
    df["target_seconds"] = np.where((df.method == "fast") & (df.nodes == 4096) & (df.k == 1),
                                    1.0, np.nan)
    df["device"] = "cpu"
    df["torch_threads"] = args.threads
    df["cpu_count"] = os.cpu_count()
    df["machine"] = platform.machine()
    path = atomic_write_csv(args.out, df)
    print(df.drop(columns=["device", "machine", "out_size", "graph", "stop"]).to_string(
        index=False))
    print(f"wrote {path}")
    return df


if __name__ == "__main__":
    main()
