"""Miniature fake copies of the datasets, in each dataset's real layout and label encoding.

The paths below are written out per dataset on purpose (not taken from the manifests), so
that a reader test checks the manifests against an independent statement of each official
layout. Used by the tests and by the book to show ``prepare`` and ``load`` without the data::

    samples = write_fake_dataset("cityscapes-27", tmp_root, n=3)
    ds = load("cityscapes-27", root=tmp_root, strict=False)   # 3 of 500 images: a warning

Each label map holds vertical stripes of the raw values in ``FAKE_RAW_VALUES[name]`` (rolled
by one per sample), which include ignore values and the extremes of each encoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Raw label values written into the fake label PNGs (the dataset's own encoding).
FAKE_RAW_VALUES: dict[str, list[int]] = {
    "coco-stuff-27": [0, 91, 156, 181, 255, 2],       # person, banner, sky-other, wood, unlabelled, car
    "coco-object": [0, 12, 89, 91, 255, 181],           # person, stop sign, toothbrush, banner, unlabelled, wood
    "cityscapes-27": [7, 26, 33, 0, 6, 255],          # road, car, bicycle, void, void, licence plate
    "kitti": [7, 26, 33, 0, 6, 255],
    "ade20k": [1, 150, 0, 13, 3],                     # wall, flag, other, person, sky
    "voc2012": [0, 1, 20, 255, 15],                   # background, aeroplane, tvmonitor, void, person
    "partimagenet": [40, 0, 39, 255, 13],             # background, quadruped head, bottle body, ignore, bird head
    "omnicrack30k": [0, 255, 1, 0],                   # background, crack (255), crack (1), background
    "rsdd": [0, 1, 7, 255, 5],                        # background, undamaged roof, exposed interior, ignore, tarp
}

# (height, width) of the fake images: not square, so that preprocessing has work to do.
FAKE_SIZE = (24, 36)


@dataclass(frozen=True)
class FakeSample:
    id: str
    image: Path
    label: Path
    raw: np.ndarray  # the stored label values


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 RGB triples flattened."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _layout(name: str, i: int) -> tuple[str, str, str, dict]:
    """(id, image path, label path, extra) of fake sample ``i``, relative to the dataset folder,
    as the official releases lay them out."""
    if name in ("coco-stuff-27", "coco-object"):
        sid = f"{139 + 1000 * i:012d}"
        return sid, f"images/val2017/{sid}.jpg", f"annotations/val2017/{sid}.png", {}
    if name == "cityscapes-27":
        city = ("frankfurt", "lindau", "munster")[i % 3]
        sid = f"{city}_{i:06d}_{19 + i:06d}"
        return (sid, f"leftImg8bit/val/{city}/{sid}_leftImg8bit.png",
                f"gtFine/val/{city}/{sid}_gtFine_labelIds.png", {"city": city})
    if name == "kitti":
        sid = f"{i:06d}_10"
        return sid, f"training/image_2/{sid}.png", f"training/semantic/{sid}.png", {}
    if name == "ade20k":
        sid = f"ADE_val_{i + 1:08d}"
        return (sid, f"ADEChallengeData2016/images/validation/{sid}.jpg",
                f"ADEChallengeData2016/annotations/validation/{sid}.png", {})
    if name == "voc2012":
        sid = f"2007_{i + 33:06d}"
        return (sid, f"VOCdevkit/VOC2012/JPEGImages/{sid}.jpg",
                f"VOCdevkit/VOC2012/SegmentationClass/{sid}.png", {})
    if name == "partimagenet":
        synset = ("n01440764", "n02085620")[i % 2]
        sid = f"{synset}_{1000 + i}"
        return (sid, f"PartImageNet/images/val/{sid}.JPEG", f"PartImageNet/annotations/val/{sid}.png",
                {"synset": synset})
    if name == "omnicrack30k":
        domain = ("BCL", "Ceramic", "CFD")[i % 3]
        sid = f"{domain}_img{i:03d}"
        return sid, f"images/validation/{sid}.png", f"annotations/validation/{sid}.png", {"domain": domain}
    if name == "rsdd":
        sid = f"roof_{i:04d}"
        return sid, f"images/val/{sid}.jpg", f"masks/val/{sid}.png", {}
    raise ValueError(f"No fake layout for dataset {name!r}.")


_LISTS = {
    "coco-stuff-27": "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
    "voc2012": "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
}
_DIRECTORY = {"coco-stuff-27": "cocostuff", "coco-object": "cocostuff", "cityscapes-27": "cityscapes"}


def fake_raw_label(name: str, i: int, size: tuple[int, int] = FAKE_SIZE) -> np.ndarray:
    """Vertical stripes of ``FAKE_RAW_VALUES[name]`` rolled by ``i`` (uint8, H x W)."""
    values = np.roll(np.array(FAKE_RAW_VALUES[name], dtype=np.uint8), i)
    h, w = size
    columns = (np.arange(w) * len(values)) // w
    return np.repeat(values[columns][None, :], h, axis=0)


def write_fake_dataset(name: str, root: str | os.PathLike, n: int = 3, seed: int = 0,
                       size: tuple[int, int] = FAKE_SIZE, write_list: bool = True) -> list[FakeSample]:
    """Write ``n`` fake samples of dataset ``name`` under ``<root>/<its folder>/``.

    ``write_list=False`` leaves out the split list file (the COCO-Stuff curated list, VOC's
    val.txt), as a user who has the images but not the list would have it."""
    base = Path(root) / _DIRECTORY.get(name, name)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        sid, image_rel, label_rel, _ = _layout(name, i)
        image_path, label_path = base / image_rel, base / label_rel
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        fmt = "JPEG" if image_path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        Image.fromarray(pixels).save(image_path, format=fmt)
        raw = fake_raw_label(name, i, size)
        if name == "voc2012":
            img = Image.fromarray(raw, mode="P")
            img.putpalette(_voc_palette())
        else:
            img = Image.fromarray(raw, mode="L")
        img.save(label_path, format="PNG")
        samples.append(FakeSample(sid, image_path, label_path, raw))
    if write_list and name in _LISTS:
        list_path = base / _LISTS[name]
        list_path.parent.mkdir(parents=True, exist_ok=True)
        list_path.write_text("".join(f"{s.id}\n" for s in samples))
    return samples
