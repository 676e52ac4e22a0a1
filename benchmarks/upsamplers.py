"""Time and peak memory of JAFAR's upsampling (memory-bounded vs materialising), and training speed.

Writes ``results/cpu/bench/upsamplers.csv`` (and a ``.md`` beside it)::

    python benchmarks/upsamplers.py                          # ease + jafar sizes, training 1 vs 2 procs
    python benchmarks/upsamplers.py --sizes ease jafar huge  # + 64 x 64 -> 1024 x 1024
    python benchmarks/upsamplers.py --no-train

Upsampling (random-initialised JAFAR at the paper's widths, ``d_qk`` 128, 4 heads; the weights do
not change the cost), per size:

* ``ease``: a 40 x 30 grid of 1024-channel tokens (ViT-L/16 on 640 x 480) to 640 x 480, the
  guidance image 640 x 480 (EASe's setting);
* ``jafar``: 28 x 28 tokens (1024 channels) to 448 x 448 (JAFAR's probe setting with /16 patches);
* ``huge``: 64 x 64 tokens (384 channels) to 1024 x 1024 (the memory-bounded path only).

``lazy`` is :meth:`JAFAR.upsample` (what the chapters use); ``reference`` is
:meth:`JAFAR.reference`, which holds every head's attention for every pixel (JAFAR's way). The
reference runs only when its estimated peak (three ``heads x HW x hw`` float32 arrays) fits under
``--reference-limit-gib`` and in the memory available now; otherwise the row says how much it
would need. ``max_abs_diff`` compares the two outputs. Memory is the peak resident set during the
call minus the resident set before it (sampled every 2 ms after trimming the C heap; it counts
the returned features). The target of issue 13: peak added memory at most the output's size plus
256 MiB.

Training: seconds per step of :func:`segbook.upsamplers.train.train` on the embedded
EfficientNet-Lite0 (224 crops, batch 2, 0.5 guidance), one process against two under
``torchrun`` (gloo, one thread each): images per second is the number to compare.

The machine's other work shows in these numbers (the ``note`` column says whether the run was
alone).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbones import PeakRSS, _trim_heap

from segbook.book.paths import results_root
from segbook.book.results import atomic_write_csv, atomic_write_text, dataframe_markdown
from segbook.upsamplers import JAFAR

SIZES = {
    "ease": {"grid": (30, 40), "channels": 1024, "out": (480, 640)},
    "jafar": {"grid": (28, 28), "channels": 1024, "out": (448, 448)},
    "huge": {"grid": (64, 64), "channels": 384, "out": (1024, 1024)},
}


def upsampling_rows(names, reference_limit_gib: float, note: str) -> list[dict]:
    rows = []
    for name in names:
        spec = SIZES[name]
        (h, w), C, (H, W) = spec["grid"], spec["channels"], spec["out"]
        torch.manual_seed(0)
        model = JAFAR(v_dim=C, qk_dim=128, num_heads=4).eval()
        image = torch.rand(3, H, W)
        tokens = torch.randn(C, h, w)
        out_mib = C * H * W * 4 / 2**20
        base = {"size": name, "grid": f"{h}x{w}", "channels": C, "output": f"{H}x{W}",
                "output_mib": round(out_mib, 1), "target_mib": round(out_mib + 256, 1)}
        _trim_heap()
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            lazy = model(image, tokens, (H, W))
        seconds = time.perf_counter() - t0
        rows.append({**base, "method": "lazy", "seconds": round(seconds, 2),
                     "peak_added_mib": round(rss.delta / 2**20, 1),
                     "within_target": rss.delta / 2**20 <= out_mib + 256,
                     "chunk_rows": lazy.attention.chunk, "max_abs_diff": None, "note": note})
        print(rows[-1], flush=True)
        need = 3 * 4 * H * W * h * w * 4 / 2**30
        avail = psutil.virtual_memory().available / 2**30
        if name == "huge" or need > reference_limit_gib or need + 2 > avail:
            rows.append({**base, "method": "reference", "seconds": None, "peak_added_mib": None,
                         "within_target": None, "chunk_rows": None, "max_abs_diff": None,
                         "note": f"not run: needs about {need:.1f} GiB (limit {reference_limit_gib} "
                                 f"GiB, {avail:.1f} GiB available)"})
            print(rows[-1], flush=True)
            del lazy
            continue
        feats = lazy.features.clone()
        del lazy
        _trim_heap()
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            ref, A = model.reference(image, tokens, (H, W))
        seconds = time.perf_counter() - t0
        diff = float((ref - feats).abs().max())
        rows.append({**base, "method": "reference", "seconds": round(seconds, 2),
                     "peak_added_mib": round(rss.delta / 2**20, 1),
                     "within_target": rss.delta / 2**20 <= out_mib + 256, "chunk_rows": None,
                     "max_abs_diff": diff, "note": note})
        print(rows[-1], flush=True)
        del ref, A, feats
        gc.collect()
    return rows


def training_rows(steps: int, qk_dims, note: str) -> list[dict]:
    from PIL import Image

    from segbook.data import load_sample

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle"):
            Image.fromarray(load_sample(name, size=256)).save(Path(tmp) / f"{name}.png")
        for qk in qk_dims:
            for procs in (1, 2):
                out = Path(tmp) / f"run_{qk}_{procs}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={procs}", "-m", "segbook.upsamplers.train",
                       "--images", tmp, "--out", str(out), "--model", "sauce",
                       "--backbone", "effnet-lite0", "--image-size", "224", "--batch-size", "2",
                       "--guidance-scale", "0.5", "--random-crop", "true", "--qk-dim", str(qk),
                       "--steps", str(steps), "--checkpoint-every", str(10**9)]
                env = dict(os.environ, OMP_NUM_THREADS="1")
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                wall = time.perf_counter() - t0
                m = re.search(r"(\d+) steps in ([\d.]+) s", proc.stdout)
                if proc.returncode or not m:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    continue
                secs = float(m.group(2))
                rows.append({"size": "train", "grid": "effnet-lite0 blocks.10", "channels": 112,
                             "output": "224 crops, batch 2/proc", "method": f"{procs} proc(s), d_qk {qk}",
                             "seconds": round(secs, 1), "seconds_per_step": round(secs / steps, 3),
                             "images_per_second": round(steps * 2 * procs / secs, 2),
                             "wall_seconds_with_startup": round(wall, 1), "note": note})
                print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["ease", "jafar"], choices=sorted(SIZES))
    p.add_argument("--reference-limit-gib", type=float, default=8.0)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--qk-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--note", default="provisional: shared 2-core machine")
    p.add_argument("--out", default=str(results_root() / "cpu" / "bench" / "upsamplers.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = upsampling_rows(args.sizes, args.reference_limit_gib, args.note)
    if not args.no_train:
        rows += training_rows(args.train_steps, args.qk_dims, args.note)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    atomic_write_csv(out, df)
    atomic_write_text(out.with_suffix(".md"), dataframe_markdown(df) + "\n")
    print(df.to_string(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
