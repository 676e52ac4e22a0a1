"""Readers for the papers' evaluation datasets: ``load(name)`` -> (image, label map, meta).

Every dataset is read from its own published layout under ``$SEGBOOK_DATA/<directory>/``
(described by ``data_manifests/<name>.yaml``); nothing is converted on disk. Label PNGs are
mapped through the manifest's lookup table, so a label map always holds class ids
``0 .. num_classes - 1`` and ``IGNORE_INDEX = -1``. Example::

    from segbook.data import load
    ds = load("cityscapes-27", preprocess="stego320")
    for image, label, meta in ds:         # uint8 H x W x 3, int64 H x W, dict
        ...

Before anything is read, the split is checked: a missing list, image or label raises
:class:`~segbook.errors.MissingDatasetError` with every missing path and the manifest's
instructions; a split with fewer images than the manifest's published count is incomplete
and raises too. A file that cannot be decoded, has the wrong size, or holds label values
outside the encoding raises :class:`~segbook.errors.CorruptFileError` naming it.

Preprocessing follows the papers (``PRESETS``): STEGO / PiCIE's short side 320 + centre crop
(``stego320``), Stable Diffusion's 512 x 512 (``square512``), EASe's 640 px longest side
(``long640``). The geometry is that of ``segbook.backbones.images`` (imported when the first
image is read, since it brings torch); label maps are only ever resized by nearest neighbour.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from segbook.data.manifests import IGNORE_INDEX, UNMAPPED, Manifest, load_manifest
from segbook.data.root import data_root, require_files
from segbook.errors import CorruptFileError, MissingDatasetError


class Sample(NamedTuple):
    """One evaluation sample: ``image`` (uint8, H x W x 3, RGB), ``label`` (int64, H x W,
    classes and ``IGNORE_INDEX``) and ``meta`` (dataset, split, id, paths, sizes, ...)."""

    image: np.ndarray
    label: np.ndarray
    meta: dict[str, Any]


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample's files are: ids and paths, before anything is decoded."""

    id: str
    image: Path
    label: Path
    groups: dict[str, str]


# --------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """A resize (and optional centre crop) applied to image and label alike.

    The geometry is that of :func:`segbook.backbones.images.resize_and_crop`, the library's
    one image loader, so ``load(name, preprocess="stego320")`` gives the same pixels as
    ``load_image(path, rule="stego320")`` (up to the image filter, see ``PRESETS``).

    mode : ``"short_side"`` (short side to ``size``, aspect kept), ``"longest_side"`` (long
        side to ``size``, aspect kept) or ``"square"`` (``size`` x ``size``).
    crop : None or ``"center"`` (the centre ``size`` x ``size`` after resizing).
    image_resample : the image filter (``"nearest"``, ``"bilinear"``, ``"bicubic"``, ...);
        label maps are always resized by nearest neighbour.
    """

    mode: str
    size: int
    crop: str | None = None
    image_resample: str = "bilinear"

    def __post_init__(self):
        if self.mode not in ("short_side", "longest_side", "square"):
            raise ValueError(f"Preprocess mode must be short_side, longest_side or square, "
                             f"not {self.mode!r}.")
        if self.crop not in (None, "center"):
            raise ValueError(f"Preprocess crop must be None or 'center', not {self.crop!r}.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"Preprocess size must be a positive int, not {self.size!r}.")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, before any crop."""
        from segbook.backbones.images import target_size
        return target_size(height, width, self.mode, self.size)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from segbook.backbones.images import resize_and_crop
        image = resize_and_crop(image, self.mode, self.size, self.crop, resample=self.image_resample)
        label = resize_and_crop(label, self.mode, self.size, self.crop, resample="nearest")
        return image, label


def resize_label(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``shape`` = (height, width); values and
    dtype are kept."""
    from segbook.backbones.images import resize_and_crop
    return resize_and_crop(label, "exact", tuple(shape), resample="nearest")


PRESETS: dict[str, Preprocess] = {
    # STEGO / PiCIE evaluation (paper 2, COCO-Stuff-27 and Cityscapes): short side 320, then
    # the centre 320 x 320. STEGO resizes the image with nearest neighbour too.
    "stego320": Preprocess("short_side", 320, crop="center", image_resample="nearest"),
    # Stable Diffusion inputs (paper 1, DiffSeg, DiffCut): 512 x 512.
    "square512": Preprocess("square", 512),
    # EASe: longest side 640 px, aspect ratio kept ("ease640" in segbook.backbones.images).
    "long640": Preprocess("longest_side", 640),
    "ease640": Preprocess("longest_side", 640),
    # Layer-distributed spectral clustering, dataset level: short side 448.
    "short448": Preprocess("short_side", 448),
}


def resolve_preprocess(preprocess: str | Preprocess | None) -> Preprocess | None:
    if preprocess is None or preprocess == "none":
        return None
    if isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess in PRESETS:
        return PRESETS[preprocess]
    raise ValueError(f"Unknown preprocess {preprocess!r}; use one of {sorted(PRESETS)}, "
                     "None, or a segbook.data.Preprocess.")


# --------------------------------------------------------------------------- file readers

def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB (H x W x 3), decoded by the library's one loader
    (:func:`segbook.backbones.images.load_image`). EXIF orientation is not applied: the label
    maps are aligned with the stored pixels."""
    from segbook.backbones.images import load_image
    return load_image(path, exif=False)


def read_raw_label(path: str | os.PathLike) -> np.ndarray:
    """A label PNG's stored values as uint8 (H x W): mode L, P (palette index), 1, I/I;16
    with values <= 255, or RGB whose three channels are equal."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptFileError(path, f"Cannot decode label map {path}: {exc}") from exc
    if mode in ("L", "P"):
        return arr.astype(np.uint8, copy=False)
    if mode == "1":
        return arr.astype(np.uint8)
    if mode.startswith("I"):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise CorruptFileError(path, f"Label map {path} (mode {mode}) has values outside 0..255 "
                                         f"({int(arr.min())}..{int(arr.max())}).")
        return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
        raise CorruptFileError(path, f"Label map {path} is a colour image (mode {mode}); expected "
                                     "one channel of class values (a colour-coded visualisation?).")
    raise CorruptFileError(path, f"Label map {path} has unsupported mode {mode}.")


def map_label(raw: np.ndarray, lut: np.ndarray, path: str | os.PathLike = "<array>",
              dataset: str = "") -> np.ndarray:
    """Raw values -> class ids (int64) through ``lut``; values outside the encoding raise
    :class:`CorruptFileError` naming ``path``."""
    label = lut[raw]
    bad = label == UNMAPPED
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(int(v)) for v in values[:12]) + (" ..." if len(values) > 12 else "")
        raise CorruptFileError(path, f"Label map {path} holds value(s) {shown} ({int(bad.sum())} "
                                     f"pixels) that the {dataset or 'dataset'} encoding does not allow.")
    return label


# --------------------------------------------------------------------------- enumeration

def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<directory>`` for a dataset (root: argument, ``$SEGBOOK_DATA``, ~/segbook-data)."""
    return data_root(root) / load_manifest(name).directory


def _fill(template: str, groups: dict[str, str], where: str) -> str:
    try:
        return template.format(**groups)
    except KeyError as exc:
        raise CorruptFileError(where, f"Template {template!r} needs {exc} which {where} does not give.") from exc


def _count_problem(m: Manifest, split: str, found: int, strict: bool, base: Path, what: str) -> None:
    spec = m.split(split)
    if spec.count is None or found == spec.count:
        return
    text = (f"Dataset '{m.name}' split '{split}': {what} has {found} images, the manifest "
            f"expects {spec.count} ({spec.count_source}).")
    if not (spec.count_exact and strict):
        warnings.warn(text + ("" if spec.count_exact else " The expected count is not published, "
                              "so this is a warning.") + " Reading the images found.", stacklevel=3)
        return
    if found < spec.count:
        raise MissingDatasetError(
            m.name, text + f" The split is incomplete under {base}.\nTo use the images that are "
            "there: load(..., strict=False); in the book, run with "
            "`python -m segbook.book run --profile full --chapters NN --set strict_datasets=false` "
            "(add `--limit N` for the first N images).\n"
            f"Manifest: {m.path}\nTo get it:\n"
            + m.instructions(), [f"{spec.count - found} image(s) of split '{split}'"])
    raise CorruptFileError(base, text + " Remove the extra files or check the folder.")


def list_samples(name: str, split: str | None = None, root: str | os.PathLike | None = None,
                 strict: bool = True) -> list[SampleRecord]:
    """Every sample of a split, after checking that all its files exist.

    ``strict=False`` turns a count that differs from the manifest's published count into a
    warning (for subsets and the miniature trees of the tests); missing or unreadable files
    are errors either way."""
    m = load_manifest(name)
    spec = m.split(split)
    base = data_root(root) / m.directory
    where = {"root": root, "manifest": str(m.path), "instructions": m.instructions(),
             "directory": m.directory}
    records: list[SampleRecord] = []
    if spec.list is not None:
        require_files(name, [spec.list], **where)
        list_path = base / spec.list
        pattern = re.compile(spec.id_regex)
        seen: set[str] = set()
        lines = list_path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            match = pattern.match(line.strip())
            if not match:
                raise CorruptFileError(list_path, f"{list_path}, line {number}: {line.strip()!r} is not "
                                                  f"an id of the form {spec.id_regex}.")
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            if groups["id"] in seen:
                raise CorruptFileError(list_path, f"{list_path}: id {groups['id']} is listed twice.")
            seen.add(groups["id"])
            records.append(SampleRecord(groups["id"], base / _fill(spec.image, groups, str(list_path)),
                                        base / _fill(spec.label, groups, str(list_path)), groups))
        _count_problem(m, spec.name, len(records), strict, base, f"the list {list_path}")
    else:
        pattern = re.compile(spec.image_regex)
        found = sorted(base.glob(spec.images)) if base.is_dir() else []
        if not found:
            require_files(name, [spec.images], **where)  # names the glob as what is missing
            raise MissingDatasetError(name, f"No image matches {base / spec.images}.\n" + m.instructions(),
                                      [spec.images])
        for path in found:
            rel = path.relative_to(base).as_posix()
            match = pattern.match(rel)
            if not match:
                raise CorruptFileError(path, f"{path} matches {spec.images} but not the expected name "
                                             f"pattern {spec.image_regex} (manifest {m.path}).")
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            records.append(SampleRecord(groups["id"], path, base / _fill(spec.label, groups, str(path)),
                                        groups))
        _count_problem(m, spec.name, len(records), strict, base, f"the folder {base / spec.images}")
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise CorruptFileError(base, f"Dataset '{name}': image ids {dup} occur more than once.")
    files = [r.image.relative_to(base).as_posix() for r in records]
    files += [r.label.relative_to(base).as_posix() for r in records]
    require_files(name, files, **where)
    return records


# --------------------------------------------------------------------------- the dataset

class SegmentationDataset(Sequence):
    """A verified split of one dataset; ``ds[i]`` and iteration give :class:`Sample`.

    Parameters
    ----------
    name : dataset name (``segbook.data.DATASETS``).
    root : datasets root; default ``$SEGBOOK_DATA``, else ``~/segbook-data``.
    split : default the manifest's ``default_split`` (the split the papers evaluate).
    preprocess : a ``PRESETS`` name (``"stego320"``, ``"square512"``, ``"long640"``), a
        :class:`Preprocess`, or None for the original resolution.
    limit : read only the first ``limit`` samples (after the whole split was checked).
    strict : see :func:`list_samples`.
    """

    def __init__(self, name: str, root: str | os.PathLike | None = None, split: str | None = None,
                 preprocess: str | Preprocess | None = None, limit: int | None = None,
                 strict: bool = True):
        self.manifest = load_manifest(name)
        self.name = name
        self.split = self.manifest.split(split).name
        self.root = dataset_dir(name, root)
        self.preprocess = resolve_preprocess(preprocess)
        self.preprocess_name = preprocess if isinstance(preprocess, str) else (
            None if preprocess is None else repr(preprocess))
        self.records = list_samples(name, self.split, root, strict=strict)
        if limit is not None:
            self.records = self.records[:int(limit)]
        self.positions = list(range(len(self.records)))  # index of each record in the split
        self._lut = self.manifest.label_lut()

    num_classes = property(lambda self: self.manifest.num_classes)
    class_names = property(lambda self: self.manifest.class_names)
    background = property(lambda self: self.manifest.background)
    ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.records)

    def shard(self, rank: int, world_size: int) -> SegmentationDataset:
        """The part of the split that rank ``rank`` of ``world_size`` reads under torchrun:
        every ``world_size``-th sample from ``rank``. ``meta["index"]`` stays the position in
        the whole split, so per-rank outputs can be merged."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, not {rank}.")
        part = copy.copy(self)
        part.records = self.records[rank::world_size]
        part.positions = self.positions[rank::world_size]
        return part

    def __getitem__(self, index: int) -> Sample:
        if isinstance(index, slice):
            raise TypeError("Index a SegmentationDataset with integers; use limit= for a prefix.")
        rec = self.records[index]
        image = read_image(rec.image)
        label = map_label(read_raw_label(rec.label), self._lut, rec.label, self.name)
        if label.shape != image.shape[:2]:
            raise CorruptFileError(rec.label, f"Label map {rec.label} is {label.shape[1]} x "
                                              f"{label.shape[0]} but its image {rec.image} is "
                                              f"{image.shape[1]} x {image.shape[0]}.")
        original = image.shape[:2]
        if self.preprocess is not None:
            image, label = self.preprocess(image, label)
        meta = {"dataset": self.name, "split": self.split, "id": rec.id,
                "index": self.positions[index],
                "image_path": str(rec.image), "label_path": str(rec.label),
                "original_size": tuple(original), "size": tuple(image.shape[:2]),
                "preprocess": self.preprocess_name, "num_classes": self.num_classes,
                "background": self.background, "ignore_index": IGNORE_INDEX}
        meta.update({k: v for k, v in rec.groups.items() if k != "id"})
        return Sample(image, label, meta)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"preprocess={self.preprocess_name!r}, root={str(self.root)!r})")


def load(name: str, root: str | os.PathLike | None = None, split: str | None = None,
         preprocess: str | Preprocess | None = None, limit: int | None = None,
         strict: bool = True) -> SegmentationDataset:
    """The verified split ``split`` of dataset ``name``; iterate it for (image, label, meta).

    See :class:`SegmentationDataset` for the parameters. Raises ``MissingDatasetError``
    (with what to fetch) when files are missing, ``CorruptFileError`` for unreadable ones."""
    return SegmentationDataset(name, root=root, split=split, preprocess=preprocess, limit=limit,
                               strict=strict)
