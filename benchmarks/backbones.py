"""Time and peak memory of one capture per image, per backbone and input size, on this CPU.

Writes ``results/cpu/bench/backbones.csv`` (and a ``.md`` beside it)::

    python benchmarks/backbones.py                       # embedded CNNs + tiny models
    python benchmarks/backbones.py --backbones effnet-lite0 --sizes 512 --images 5

How it measures, per (backbone, size):

* one warm-up capture (the first call pays for kernel selection and allocator growth);
* then one timed capture per image (wall clock, ``time.perf_counter``);
* memory, in a second capture of the same image: before it the C heap is trimmed (``malloc_trim``) so freed pages go back
  to the system, then a thread samples the process RSS every 2 ms; the figure is the
  peak RSS during the capture minus the RSS just before it. It counts what torch allocates
  outside Python (tracemalloc would not) and it is an estimate (2 ms sampling);
* ``capture_mib``: the bytes of the tensors the Capture returns.

The machine's other work shows in these numbers: they are provisional unless the run was
alone on the machine (the ``note`` column says which).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from segbook.backbones import load_backbone
from segbook.book.paths import results_root
from segbook.book.results import atomic_write_csv, atomic_write_text, dataframe_markdown

# the input sizes the chapters use: cpu profile 512, smoke 128, the mosaic benchmark 256
DEFAULT_SIZES = {"effnet-lite0": (128, 256, 512), "hed-vgg16": (128, 256, 512),
                 "tiny-sd": (128, 256), "tiny-vit": (128, 256)}
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea")


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is then less tight
        pass


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak - start`` in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.process = psutil.Process(os.getpid())

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.start


def _images(names, size):
    from segbook.data import load_sample

    return {name: load_sample(name, size=size) for name in names}


def _capture(backbone, image, size):
    if backbone.family == "cnn":
        return backbone.capture(image, size=size)
    if backbone.family == "diffusion":
        return backbone.capture(image, size=size, progress=False)
    return backbone.capture(image, size=size)


def _capture_bytes(capture) -> int:
    return sum(t.numel() * t.element_size() for layer in capture for t in layer.tensors().values())


def bench(names, sizes, image_names, note) -> list[dict]:
    rows = []
    plan = [(name, size) for name in names for size in sizes.get(name, DEFAULT_SIZES.get(name, (512,)))]
    progress = tqdm(total=len(plan) * (len(image_names) + 1), desc="capture", unit="img")
    loaded = {}
    for name, size in plan:
        if name not in loaded:
            try:
                loaded[name] = load_backbone(name, device="cpu")
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                print(f"skipping {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                loaded[name] = None
        backbone = loaded[name]
        if backbone is None:
            progress.update(len(image_names) + 1)
            continue
        images = _images(image_names, size)
        progress.set_postfix_str(f"{name} @ {size}")
        warm = _capture(backbone, images[image_names[0]], size)  # warm-up, not timed
        progress.update(1)
        seconds, peaks = [], []
        for image in images.values():
            # two passes: the RSS sampler thread would slow the timed one
            t0 = time.perf_counter()
            capture = _capture(backbone, image, size)
            seconds.append(time.perf_counter() - t0)
            del capture
            _trim_heap()
            with PeakRSS() as rss:
                capture = _capture(backbone, image, size)
            peaks.append(rss.delta / 2**20)
            progress.update(1)
        attn = [layer.attn.shape[-1] for layer in capture if layer.attn is not None]
        rows.append({
            "backbone": name, "family": backbone.family, "pretrained": backbone.pretrained,
            "stand_in": bool(getattr(backbone, "stand_in", False)), "input_px": size,
            "layers": len(capture), "max_tokens": max(attn) if attn else 0,
            "images": len(seconds),
            "sec_per_image_median": round(statistics.median(seconds), 4),
            "sec_per_image_min": round(min(seconds), 4),
            "peak_rss_delta_mib_median": round(statistics.median(peaks), 1),
            "peak_rss_delta_mib_max": round(max(peaks), 1),
            "capture_mib": round(_capture_bytes(capture) / 2**20, 2),
            "torch_threads": torch.get_num_threads(), "device": "cpu", "note": note,
        })
        del warm, capture
    progress.close()
    return rows


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="input sizes for every backbone (default: the chapters' sizes)")
    parser.add_argument("--images", type=int, default=len(DEFAULT_IMAGES),
                        help="how many bundled photos to time (astronaut, coffee, chelsea, rocket, ...)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--note", default="provisional: measured while other jobs shared the 2 cores")
    parser.add_argument("--out", type=Path, default=results_root() / "cpu" / "bench" / "backbones.csv")
    args = parser.parse_args(argv)

    import pandas as pd

    if args.threads:
        torch.set_num_threads(args.threads)

    names = list(DEFAULT_IMAGES) + ["rocket", "motorcycle"]
    image_names = names[: max(1, args.images)]
    sizes = {b: tuple(args.sizes) for b in args.backbones} if args.sizes else DEFAULT_SIZES
    rows = bench(args.backbones, sizes, image_names, args.note)
    frame = pd.DataFrame(rows)
    atomic_write_csv(args.out, frame)
    caption = (f"Capture time and peak memory per image on this CPU ({os.cpu_count()} cores), "
               f"{len(image_names)} bundled photos; written by benchmarks/backbones.py.")
    atomic_write_text(args.out.with_suffix(".md"), dataframe_markdown(frame, caption))
    print(frame.to_string(index=False))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
