"""Dataset manifests: ``data_manifests/<name>.yaml`` read into :class:`Manifest` objects.

A manifest is the single description of a dataset that segbook relies on: where the official
archives are, which files a split has under ``$SEGBOOK_DATA/<directory>/``, how many, and how
the label PNGs encode classes. :meth:`Manifest.label_lut` turns the encoding into a lookup
table from raw pixel values to class ids, with :data:`IGNORE_INDEX` (-1) for ignored pixels.
The schema is described in ``data_manifests/README.md``.

Conventions every reader follows (see the book's chapter on evaluation):

- classes are ``0 .. num_classes - 1``; ``IGNORE_INDEX = -1`` marks pixels that no metric counts;
- datasets with a background class (VOC, COCO-Object, PartImageNet, OmniCrack30k, RSDD) have
  it at class 0 (``Manifest.background``), for EASe's many-to-one background matching;
- a raw value that the manifest does not cover is an error, never silently ignored.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segbook.errors import SegbookError

DATASETS = ("coco-stuff-27", "coco-object", "cityscapes-27", "kitti", "ade20k", "voc2012",
            "partimagenet", "omnicrack30k", "rsdd")
IGNORE_INDEX = -1
UNMAPPED = -2  # marks raw values that no rule of the manifest covers (an error when read)
LABELS_DIR = Path(__file__).resolve().parent / "labels"
MANIFESTS_ENV = "SEGBOOK_MANIFESTS"


class ManifestError(SegbookError, ValueError):
    """A manifest file that is missing, malformed or inconsistent with its class table."""


def manifests_dir() -> Path:
    """``$SEGBOOK_MANIFESTS`` if set, else ``data_manifests/`` of the repository."""
    env = os.environ.get(MANIFESTS_ENV)
    if env:
        return Path(env).expanduser()
    from segbook.book.paths import manifests_dir as repo_manifests_dir
    return repo_manifests_dir()


def manifest_path(name: str) -> Path:
    return manifests_dir() / f"{name}.yaml"


@dataclass(frozen=True)
class SplitSpec:
    """How to enumerate the samples of one split (paths relative to the dataset folder).

    Either ``list`` (a text file of ids, each matching ``id_regex``) or ``images`` (a glob
    whose matches must fit ``image_regex``). ``image`` and ``label`` are templates filled
    with the regex's named groups."""

    name: str
    image: str
    label: str
    list: str | None = None
    id_regex: str | None = None
    images: str | None = None
    image_regex: str | None = None
    count: int | None = None
    count_exact: bool = False
    count_source: str = ""


@dataclass(frozen=True)
class Manifest:
    """One dataset's manifest. ``data`` keeps the whole parsed YAML."""

    name: str
    path: Path
    data: dict

    @property
    def title(self) -> str:
        return self.data.get("title", self.name)

    @property
    def directory(self) -> str:
        """Folder under the datasets root (both COCO datasets share ``cocostuff``)."""
        return self.data.get("directory") or self.name

    @property
    def default_split(self) -> str:
        return self.data["default_split"]

    @property
    def splits(self) -> dict[str, SplitSpec]:
        return {k: SplitSpec(name=k, **v) for k, v in self.data["splits"].items()}

    def split(self, split: str | None = None) -> SplitSpec:
        split = split or self.default_split
        splits = self.splits
        if split not in splits:
            raise ManifestError(f"Dataset '{self.name}' has no split '{split}' "
                                f"(manifest {self.path} lists {sorted(splits)}).")
        return splits[split]

    @property
    def num_classes(self) -> int:
        return int(self.data["labels"]["num_classes"])

    @property
    def background(self) -> int | None:
        """Class id of the background class, or None for datasets without one."""
        return self.data["labels"].get("background")

    @property
    def classes(self) -> list[dict]:
        """Rows of the class table (``id`` and ``name`` columns at least), ordered by id."""
        rows = read_table(self.data["labels"]["classes"])
        return sorted(rows, key=lambda r: int(r["id"]))

    @property
    def class_names(self) -> list[str]:
        """Unique display names (the ``label`` column where a table has one)."""
        return [r.get("label") or r["name"] for r in self.classes]

    @property
    def preprocessing(self) -> list[str]:
        return list(self.data.get("preprocessing", []))

    def instructions(self) -> str:
        """What to fetch and how to lay it out: the sources, then the preparation steps."""
        lines = [f"{self.title}", f"Licence: {' '.join(str(self.data.get('licence', '?')).split())}",
                 "Sources:"]
        for src in self.data.get("sources", []):
            check = ", ".join(f"{k} {src[k]}" for k in ("md5", "sha256") if src.get(k))
            lines.append(f"  - {src['file']}: {src.get('url') or 'no public URL'}"
                         + (f" ({check})" if check else ""))
            if src.get("note"):
                lines.append("      " + " ".join(str(src["note"]).split()))
        lines.append("Preparation:")
        lines.extend("  " + line for line in str(self.data.get("preparation", "")).rstrip().splitlines())
        return "\n".join(lines)

    def label_lut(self) -> np.ndarray:
        """Lookup table (256 entries, int64): raw PNG value -> class id, ``IGNORE_INDEX`` for
        ignored values, ``UNMAPPED`` for values that the encoding does not allow."""
        return _label_lut(self.name, str(self.path), self.path.stat().st_mtime_ns)


def read_table(filename: str) -> list[dict[str, str]]:
    """Rows of a CSV in ``segbook/data/labels/``."""
    path = LABELS_DIR / filename
    if not path.is_file():
        raise ManifestError(f"Class table {path} does not exist.")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@functools.cache
def _load(name: str, path: str, mtime_ns: int) -> Manifest:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ManifestError(f"Manifest {path} is not valid YAML: {exc}") from exc
    manifest = Manifest(name=name, path=Path(path), data=data)
    _validate(manifest)
    return manifest


def load_manifest(name: str) -> Manifest:
    """Read and check ``data_manifests/<name>.yaml``."""
    path = manifest_path(name)
    if not path.is_file():
        known = ", ".join(DATASETS)
        raise ManifestError(f"No manifest for dataset '{name}' at {path}. Known datasets: {known}.")
    return _load(name, str(path), path.stat().st_mtime_ns)


_REQUIRED = ("name", "title", "directory", "licence", "sources", "splits", "default_split",
             "labels", "preparation")


def _validate(m: Manifest) -> None:
    d = m.data
    if not isinstance(d, dict):
        raise ManifestError(f"Manifest {m.path} is not a mapping.")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ManifestError(f"Manifest {m.path} lacks the field(s) {missing}.")
    if d["name"] != m.name:
        raise ManifestError(f"Manifest {m.path} names itself '{d['name']}', not '{m.name}'.")
    if d["default_split"] not in d["splits"]:
        raise ManifestError(f"Manifest {m.path}: default_split '{d['default_split']}' is not a split.")
    for split, spec in d["splits"].items():
        try:
            s = SplitSpec(name=split, **spec)
        except TypeError as exc:
            raise ManifestError(f"Manifest {m.path}, split '{split}': {exc}") from exc
        if (s.list is None) == (s.images is None):
            raise ManifestError(f"Manifest {m.path}, split '{split}': give exactly one of "
                                "'list' and 'images'.")
        if s.list is not None and not s.id_regex:
            raise ManifestError(f"Manifest {m.path}, split '{split}': 'list' needs 'id_regex'.")
        if s.images is not None and not s.image_regex:
            raise ManifestError(f"Manifest {m.path}, split '{split}': 'images' needs 'image_regex'.")
    rows = m.classes
    if [int(r["id"]) for r in rows] != list(range(m.num_classes)):
        raise ManifestError(f"Manifest {m.path}: class table {d['labels']['classes']} must list ids "
                            f"0..{m.num_classes - 1} exactly once.")
    lut = m.label_lut()
    produced = {int(v) for v in np.unique(lut) if v >= 0}
    if produced != set(range(m.num_classes)):
        never = sorted(set(range(m.num_classes)) - produced)
        raise ManifestError(f"Manifest {m.path}: the label mapping never produces class(es) {never}.")


def _int(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: '{value}' is not an integer.") from exc


@functools.cache
def _label_lut(name: str, path: str, mtime_ns: int) -> np.ndarray:
    with open(path, encoding="utf-8") as fh:
        labels: dict[str, Any] = yaml.safe_load(fh)["labels"]
    mapping = labels["mapping"]
    where = f"Manifest {path}, labels.mapping"
    lut = np.full(256, UNMAPPED, dtype=np.int64)
    rule = mapping.get("rule")
    if rule == "offset":
        lo, hi = (_int(v, where) for v in mapping["valid_raw"])
        raw = np.arange(lo, hi + 1)
        lut[raw] = raw + _int(mapping["offset"], where)
    elif rule == "table":
        for row in read_table(mapping["table"]):
            value = row[mapping["raw_column"]].strip()
            if value == "":  # a class without a raw value of its own (e.g. COCO-Object background)
                continue
            lut[_int(value, where)] = _int(row[mapping["class_column"]], where)
    else:
        raise ManifestError(f"{where}: unknown rule '{rule}' (use 'offset' or 'table').")
    for item in mapping.get("extra_ranges", []) or []:
        lo, hi = (_int(v, where) for v in item["raw"])
        lut[lo:hi + 1] = _int(item["class"], where)
    for raw, cls in (mapping.get("extra") or {}).items():
        lut[_int(raw, where)] = _int(cls, where)
    for raw in mapping.get("ignore_raw", []) or []:
        lut[_int(raw, where)] = IGNORE_INDEX
    num_classes = int(labels["num_classes"])
    if ((lut >= num_classes) | ((lut < 0) & (lut != IGNORE_INDEX) & (lut != UNMAPPED))).any():
        raise ManifestError(f"{where}: maps a raw value outside 0..{num_classes - 1}.")
    lut.setflags(write=False)
    return lut


def class_names(name: str) -> list[str]:
    """The class names of a dataset, indexed by class id."""
    return load_manifest(name).class_names


def all_manifests() -> dict[str, Manifest]:
    return {name: load_manifest(name) for name in DATASETS}
