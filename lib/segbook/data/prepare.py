"""``prepare``: check a dataset that a user has fetched, and record what was found.

``python -m segbook.data prepare NAME [--root DIR]`` runs :func:`prepare`:

1. installs a split list the user supplies (``--curated-list``: IIC's 2175-image
   COCO-Stuff-27 list, which segbook cannot ship), after checking its ids and count;
2. checks the md5 / sha256 of downloaded archives the manifest publishes a checksum for,
   when the user points ``--archives`` at them;
3. enumerates the split (every listed file must exist; the count must match the manifest);
4. decodes every image and label map (corrupt files and label values outside the encoding
   are errors naming the file), counts the pixels of each class, and takes the sha256 of
   every file;
5. compares with the checksums recorded by an earlier ``prepare`` (a changed file is an
   error), then writes ``<dataset>/.segbook/<name>.<split>.sha256`` and ``.json`` (counts,
   class histogram, the manifest's sha256).

On a missing dataset it raises :class:`MissingDatasetError`, whose message says what to fetch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from segbook.data.datasets import list_samples, map_label, read_image, read_raw_label
from segbook.data.manifests import IGNORE_INDEX, load_manifest
from segbook.data.root import data_root
from segbook.errors import CorruptFileError

STAMP_DIR = ".segbook"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", progress: bool = False) -> str:
    """Hex digest of a file, read in 1 MiB blocks (with a byte progress bar if asked)."""
    digest = hashlib.new(algorithm)
    size = os.path.getsize(path)
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                      desc=f"{algorithm} {Path(path).name}") as bar:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def install_split_list(name: str, list_file: str | os.PathLike, root=None, split: str | None = None,
                       strict: bool = True) -> Path:
    """Check a user-supplied split list (ids, duplicates, count) and copy it to where the
    manifest expects it. Returns the installed path."""
    m = load_manifest(name)
    spec = m.split(split)
    if spec.list is None:
        raise ValueError(f"Dataset '{name}' split '{spec.name}' is not defined by a list file; "
                         "there is nothing to install.")
    src = Path(list_file).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"List file {src} does not exist.")
    pattern = re.compile(spec.id_regex)
    ids = [line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i for i in ids if not pattern.match(i)]
    if bad:
        raise CorruptFileError(src, f"{src}: {len(bad)} line(s) are not ids of the form "
                                    f"{spec.id_regex}, e.g. {bad[:3]}.")
    if len(set(ids)) != len(ids):
        raise CorruptFileError(src, f"{src}: some ids are listed more than once.")
    if spec.count is not None and len(ids) != spec.count:
        text = (f"{src} has {len(ids)} ids; the manifest expects {spec.count} "
                f"({spec.count_source}).")
        if strict and spec.count_exact:
            raise CorruptFileError(src, text + " Is it the right file (val2017 list, not train2017)?")
        warnings.warn(text, stacklevel=2)
    dest = data_root(root) / m.directory / spec.list
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def check_archives(name: str, archives: str | os.PathLike, out: TextIO = sys.stdout) -> dict[str, str]:
    """Verify the published md5 / sha256 of each source archive found in ``archives``.
    Returns {file: "ok" | "absent" | "no checksum published"}; a mismatch raises."""
    m = load_manifest(name)
    folder = Path(archives).expanduser()
    status = {}
    for src in m.data.get("sources", []):
        sums = {k: src[k] for k in ("sha256", "md5") if src.get(k)}
        path = folder / src["file"]
        if not sums:
            status[src["file"]] = "no checksum published"
            continue
        if not path.is_file():
            status[src["file"]] = "absent"
            print(f"  {src['file']}: not in {folder}, checksum not checked", file=out)
            continue
        for algorithm, expected in sums.items():
            got = file_digest(path, algorithm, progress=True)
            if got != expected:
                raise CorruptFileError(path, f"{path}: {algorithm} is {got}, the manifest says "
                                             f"{expected}. The download is damaged or a different file.")
        status[src["file"]] = "ok"
        print(f"  {src['file']}: {' and '.join(sums)} ok", file=out)
    return status


def _read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, rel = line.split(None, 1)
            sums[rel.strip()] = digest
    return sums


def prepare(name: str, root: str | os.PathLike | None = None, split: str | None = None,
            curated_list: str | os.PathLike | None = None, archives: str | os.PathLike | None = None,
            decode: bool = True, hash_files: bool = True, strict: bool = True,
            out: TextIO = sys.stdout) -> dict[str, Any]:
    """Verify (and where needed prepare) dataset ``name``; return a summary dict.

    Parameters
    ----------
    curated_list : a split list to install first (COCO-Stuff-27's IIC list).
    archives : folder holding the downloaded archives, to check their published checksums.
    decode : read every image and label map (False: only check that the files exist).
    hash_files : take the sha256 of every file and compare with an earlier ``prepare``.
    strict : a count different from the manifest's published count is an error (else a warning).
    """
    m = load_manifest(name)
    spec = m.split(split)
    base = data_root(root) / m.directory
    print(f"{m.title}\n  folder: {base}\n  manifest: {m.path}", file=out)
    if curated_list is not None:
        dest = install_split_list(name, curated_list, root=root, split=spec.name, strict=strict)
        print(f"  installed split list {dest}", file=out)
    if archives is not None:
        check_archives(name, archives, out=out)
    records = list_samples(name, spec.name, root, strict=strict)
    print(f"  split '{spec.name}': {len(records)} images with labels "
          f"(manifest: {spec.count}, {'published' if spec.count_exact else 'inferred'})", file=out)
    summary: dict[str, Any] = {
        "dataset": name, "split": spec.name, "folder": str(base), "images": len(records),
        "expected": spec.count, "manifest_sha256": file_digest(m.path),
        "prepared_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    groups: dict[str, dict[str, int]] = {}
    for rec in records:
        for key, value in rec.groups.items():
            if key not in ("id", "ext"):
                groups.setdefault(key, {}).setdefault(value, 0)
                groups[key][value] += 1
    if groups:
        summary["groups"] = groups
        for key, counts in groups.items():
            print(f"  per {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=out)
    if not (decode or hash_files):
        return summary

    lut = m.label_lut()
    pixels = np.zeros(m.num_classes + 1, dtype=np.int64)  # last slot: ignored pixels
    sums: dict[str, str] = {}
    for rec in tqdm(records, desc=f"checking {name}/{spec.name}", unit="img"):
        if decode:
            image = read_image(rec.image)
            label = map_label(read_raw_label(rec.label), lut, rec.label, name)
            if label.shape != image.shape[:2]:
                raise CorruptFileError(rec.label, f"Label map {rec.label} is {label.shape[1]} x "
                                                  f"{label.shape[0]}, its image {rec.image} is "
                                                  f"{image.shape[1]} x {image.shape[0]}.")
            pixels += np.bincount(np.where(label == IGNORE_INDEX, m.num_classes, label).ravel(),
                                  minlength=m.num_classes + 1)
        if hash_files:
            for path in (rec.image, rec.label):
                sums[path.relative_to(base).as_posix()] = file_digest(path)
    if decode:
        summary["class_pixels"] = {n: int(c) for n, c in zip(m.class_names, pixels[:-1])}
        summary["ignored_pixels"] = int(pixels[-1])
        absent = [n for n, c in summary["class_pixels"].items() if c == 0]
        print(f"  decoded {len(records)} images and label maps; {pixels[:-1].sum()} labelled and "
              f"{pixels[-1]} ignored pixels; classes never seen: {absent or 'none'}", file=out)

    stamp_dir = base / STAMP_DIR
    if hash_files:
        sums_path = stamp_dir / f"{name}.{spec.name}.sha256"
        if sums_path.is_file():
            before = _read_sums(sums_path)
            changed = sorted(p for p in sums if p in before and before[p] != sums[p])
            if changed:
                shown = "\n    ".join(changed[:10])
                raise CorruptFileError(base / changed[0], f"{len(changed)} file(s) changed since the last "
                                       f"prepare ({sums_path}):\n    {shown}\nRestore them, or delete "
                                       f"{sums_path} to accept the current files.")
            gone = sorted(set(before) - set(sums))
            if gone:
                print(f"  note: {len(gone)} file(s) recorded earlier are no longer part of the split "
                      f"(e.g. {gone[0]})", file=out)
        summary["sha256_listing"] = str(sums_path)
    try:
        stamp_dir.mkdir(exist_ok=True)
        if hash_files:
            text = "".join(f"{d}  {p}\n" for p, d in sorted(sums.items()))
            _atomic_write(stamp_dir / f"{name}.{spec.name}.sha256", text)
        _atomic_write(stamp_dir / f"{name}.{spec.name}.json", json.dumps(summary, indent=2) + "\n")
        print(f"  recorded in {stamp_dir}", file=out)
    except OSError as exc:
        print(f"  could not write {stamp_dir} ({exc}); the checks passed but nothing was recorded",
              file=out)
    return summary


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
