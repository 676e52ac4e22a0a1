"""The real photographs that ship with scikit-image and work offline.

They are the bundled test images of ``skimage.data`` (installed with scikit-image, no
download). Their sources and licences are the ones scikit-image documents in
``skimage/data/_fetchers.py`` and its README; they are repeated here so that a figure made
from them can be credited.

>>> from segbook.data import samples, load_sample
>>> [s.name for s in samples()]                              # doctest: +SKIP
>>> image = load_sample("coffee", size=512)                  # (512, 512, 3) uint8
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplePhoto:
    """One bundled photo: its name, what it shows, where it comes from and its licence."""

    name: str
    description: str
    source: str
    licence: str
    loader: str = field(repr=False)  # the skimage.data function that reads it
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def load(self, size: int | None = None) -> np.ndarray:
        """The photo as (H, W, 3) uint8 RGB; with ``size``, centre-cropped to a square and
        resized to ``size x size``."""
        return load_sample(self.name, size=size)


# name -> (description, source, licence, skimage.data loader)
_CATALOGUE = {
    "astronaut": (
        ("Eileen Collins, NASA astronaut, in an orange flight suit with a flag and "
         "a shuttle model behind her."),
        ("NASA Great Images database (https://flic.kr/p/r9qvLn), via "
         "skimage.data.astronaut"),
        "public domain (no known copyright restrictions)",
        "astronaut"),
    "coffee": (
        "A cup of coffee on a saucer on a wooden table.",
        "photograph by Rachel Michetti, via skimage.data.coffee",
        "CC0",
        "coffee"),
    "chelsea": (
        "Chelsea the cat, a close-up of her face.",
        "photograph by Stefan van der Walt, via skimage.data.chelsea",
        "CC0",
        "chelsea"),
    "rocket": (
        "A Falcon 9 rocket on its launch pad at dusk.",
        ("SpaceX (https://www.flickr.com/photos/spacexphotos/16511594820), via "
         "skimage.data.rocket"),
        "public domain (released by SpaceX)",
        "rocket"),
    "motorcycle": (
        "A red motorcycle in a workshop (left view of a stereo pair).",
        ("Middlebury 2014 stereo benchmark (Scharstein et al., GCPR 2014), "
         "downsampled 4x, via skimage.data.stereo_motorcycle"),
        ("no licence stated by scikit-image; the Middlebury data are offered for "
         "research use, cite Scharstein et al. 2014"),
        "stereo_motorcycle"),
    "camera": (
        "A man with a film camera on a tripod, on a lawn (greyscale).",
        "photograph by Lav Varshney, via skimage.data.camera",
        "CC0",
        "camera"),
    "coins": (
        "Greek coins from Pompeii on a grey background (greyscale).",
        "Brooklyn Museum Collection, via skimage.data.coins",
        "no known copyright restrictions",
        "coins"),
    "immunohistochemistry": (
        "Colonic glands with IHC (DAB, brown) and hematoxylin (blue) staining.",
        ("Center for Microscopy And Molecular Imaging (CMMI), via "
         "skimage.data.immunohistochemistry"),
        "no known copyright restrictions",
        "immunohistochemistry"),
    "hubble_deep_field": (
        "The Hubble eXtreme Deep Field: galaxies on a black sky.",
        ("NASA (hubblesite.org release 2012-37), via "
         "skimage.data.hubble_deep_field"),
        "public domain (NASA)",
        "hubble_deep_field"),
    "retina": (
        "A fundus photograph of a normal left eye.",
        ("Wikimedia Commons (Fundus_photograph_of_normal_left_eye.jpg), via "
         "skimage.data.retina"),
        "CC0 1.0",
        "retina"),
    "brick": (
        "A brick wall, a seamless texture (greyscale).",
        "CC0Textures Bricks25, via skimage.data.brick",
        "CC0",
        "brick"),
    "grass": (
        "Grass, a texture (greyscale).",
        "DeviantArt user linolafett (Grass-01), via skimage.data.grass",
        "CC0",
        "grass"),
    "gravel": (
        "Gravel, a seamless texture (greyscale).",
        "CC0Textures Gravel04, via skimage.data.gravel",
        "CC0",
        "gravel"),
    "moon": (
        "The surface of the moon, low contrast (greyscale).",
        "skimage.data.moon (scikit-image documents no source)",
        "no licence stated by scikit-image",
        "moon"),
}

#: Names of the photos :func:`samples` knows, in catalogue order.
SAMPLE_NAMES = tuple(_CATALOGUE)


def _read(loader: str) -> np.ndarray:
    from skimage import data as skdata

    image = getattr(skdata, loader)()
    if loader == "stereo_motorcycle":
        image = image[0]
    return to_rgb_uint8(image)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grey -> three equal channels, RGBA -> RGB, bool/float in [0, 1] -> uint8."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0:
            image = image * 255.0
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"not an image: shape {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def _check_name(name: str) -> None:
    if name not in _CATALOGUE:
        raise ValueError(f"unknown sample photo {name!r}; available: {', '.join(SAMPLE_NAMES)}")


def load_sample(name: str, size: int | None = None) -> np.ndarray:
    """One bundled photo as (H, W, 3) uint8 RGB.

    With ``size``, the photo is centre-cropped to a square and resized (anti-aliased) to
    ``size x size``, the way DiffSeg prepares its inputs.
    """
    _check_name(name)
    image = _read(_CATALOGUE[name][3])
    if size is None:
        return image
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    from skimage.transform import resize

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    out = resize(square, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def samples(names=None, size: int | None = None, load: bool = True) -> list[SamplePhoto]:
    """The bundled real photos with their description, source and licence.

    Parameters
    ----------
    names : which photos (default: all of :data:`SAMPLE_NAMES`), e.g. a profile's ``images``.
    size : resize as in :func:`load_sample`.
    load : read the pixels into ``.image`` (False: metadata only).
    """
    names = list(SAMPLE_NAMES if names is None else names)
    if not names:
        raise ValueError("names is empty")
    out = []
    for name in names:
        _check_name(name)
        desc, source, licence, loader = _CATALOGUE[name]
        image = load_sample(name, size) if load else None
        out.append(SamplePhoto(name, desc, source, licence, loader, image))
    return out
