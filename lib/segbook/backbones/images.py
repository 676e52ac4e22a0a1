"""The one image loader of the library, the papers' resize/crop rules, and the tensor helper.

Every backbone, dataset reader and chapter goes through :func:`load_image`, so an image is
decoded the same way everywhere: ``(H, W, 3)`` ``uint8`` RGB, whatever came in.

What it does to odd inputs (and why):

* **grey**, **1-bit**, **CMYK**, **YCbCr**, **LAB**, **HSV**: converted to RGB (grey is
  repeated over the three channels).
* **alpha** (RGBA, LA, PA, palette images with a transparent colour): composited on white by
  default (``alpha="white"``), because the backbones were trained on opaque photos and a
  transparent background is usually "nothing", which white shows best; ``alpha="black"``
  composites on black; ``alpha="drop"`` ignores the alpha channel and keeps the stored colours.
* **16-bit** images (PIL modes ``I;16*`` and ``I``, numpy ``uint16``): scaled to 8 bits by
  ``round(v / 257)``, so 65535 -> 255 and 0 -> 0.
* **float** images (numpy arrays, PIL mode ``F``) must lie in ``[0, 1]``; they are scaled by
  255 and rounded. Anything else raises (a float image in ``[0, 255]`` or in a normalised
  range is ambiguous; convert it yourself).
* **EXIF orientation** of files and PIL images is applied (a photo taken in portrait comes out
  in portrait).

The papers' geometric rules are the ``mode``/``size``/``crop`` options; the named presets in
:data:`PAPER_RULES` bundle them (``load_image(path, rule="stego320")``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segbook.errors import CorruptFileError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Named resize/crop rules used by the papers and the book.
PAPER_RULES: dict[str, dict[str, Any]] = {
    # STEGO / PiCIE evaluation protocol (COCO-Stuff-27, Cityscapes-27): short side 320, centre crop.
    "stego320": {"mode": "short_side", "size": 320, "crop": "center"},
    # Stable Diffusion papers (DiffSeg, DiffCut with SD 1.4, paper 1): a 512 x 512 resize.
    "square512": {"mode": "square", "size": 512},
    # EASe (SAUCE/CAFE): the longest side resized to 640 px, aspect kept.
    "ease640": {"mode": "longest_side", "size": 640},
    # Layer-distributed spectral clustering, dataset level (paper 2): short side 448.
    "short448": {"mode": "short_side", "size": 448},
}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

_MODES = (None, "short_side", "longest_side", "square", "exact")
_ALPHA = ("white", "black", "drop")


# -- decoding -----------------------------------------------------------------------------

def _open_file(path: Path) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise CorruptFileError(path, f"expected an image file but found a directory: {path}")
    if path.stat().st_size == 0:
        raise CorruptFileError(path, f"image file is empty (0 bytes): {path}")
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not later
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptFileError(path, f"cannot read image file {path}: {exc}") from exc
    if image.width == 0 or image.height == 0:
        raise CorruptFileError(path, f"image file has zero size ({image.width} x {image.height}): {path}")
    return image


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)


def _from_float(values: np.ndarray, where: str) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where}: float image contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{where}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "divide by 255 (or undo the normalisation) first")
    return np.round(values * 255.0).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray, how: str) -> np.ndarray:
    if how == "drop":
        return rgb
    background = 255.0 if how == "white" else 0.0
    a = alpha.astype(np.float64)[..., None] / 255.0
    out = rgb.astype(np.float64) * a + background * (1.0 - a)
    return np.round(out).clip(0, 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image, alpha: str, where: str) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        grey = _scale_16bit(np.asarray(image).astype(np.int64).clip(0, 65535))
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = _from_float(np.asarray(image), where)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3], alpha)
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray, alpha: str) -> np.ndarray:
    where = f"array of shape {array.shape} and dtype {array.dtype}"
    if array.size == 0:
        raise ValueError(f"{where}: the image is empty")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim != 3 or array.shape[2] not in (3, 4):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = " (channels first? transpose to (H, W, C))"
        raise ValueError(f"{where}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4){hint}")

    if array.dtype == np.bool_:
        values = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        values = array
    elif array.dtype == np.uint16:
        values = _scale_16bit(array)
    elif np.issubdtype(array.dtype, np.floating):
        values = _from_float(array, where)
    elif np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer values in [{lo}, {hi}] do not fit 8 bits; "
                             "pass uint8, uint16 (scaled from 16 bits) or floats in [0, 1]")
        values = array.astype(np.uint8)
    else:
        raise ValueError(f"{where}: unsupported dtype")

    if values.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(values, 3, axis=2))
    if values.shape[2] == 4:
        return np.ascontiguousarray(_composite(values[..., :3], values[..., 3], alpha))
    return np.ascontiguousarray(values)


def decode_image(source, alpha: str = "white", exif: bool = True) -> np.ndarray:
    """Any supported image source as ``(H, W, 3)`` uint8 RGB, without resizing.

    Parameters
    ----------
    source : a path (``str`` or :class:`pathlib.Path`), a :class:`PIL.Image.Image` or a numpy
        array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``.
    alpha : ``"white"`` (composite on white, default), ``"black"`` or ``"drop"`` (keep the
        stored colours, ignore alpha).
    exif : apply the EXIF orientation tag of files and PIL images.

    Raises
    ------
    FileNotFoundError : the path does not exist (the message names it).
    CorruptFileError : the file is empty, a directory, not an image, truncated or zero-size.
    ValueError : an array of an unusable shape, dtype or range.
    TypeError : any other kind of source.
    """
    if alpha not in _ALPHA:
        raise ValueError(f"alpha must be one of {_ALPHA}, got {alpha!r}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        image = _open_file(path)
        if exif:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as exc:  # a broken EXIF block is a broken file
                raise CorruptFileError(path, f"cannot apply the EXIF orientation of {path}: {exc}") from exc
        return np.ascontiguousarray(_pil_to_rgb(image, alpha, str(path)))
    if isinstance(source, Image.Image):
        if source.width == 0 or source.height == 0:
            raise ValueError(f"PIL image has zero size ({source.width} x {source.height})")
        image = ImageOps.exif_transpose(source) if exif else source
        return np.ascontiguousarray(_pil_to_rgb(image, alpha, f"PIL image ({source.mode})"))
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, alpha)
    if hasattr(source, "detach") and hasattr(source, "numpy"):
        raise TypeError("got a torch tensor; pass image.permute(1, 2, 0).cpu().numpy() "
                        "(an (H, W, C) array) instead")
    raise TypeError(f"cannot load an image from {type(source).__name__}; "
                    "pass a path, a PIL image or a numpy array")


# -- geometry -----------------------------------------------------------------------------

def target_size(height: int, width: int, mode: str | None, size) -> tuple[int, int]:
    """The ``(height, width)`` that ``mode`` and ``size`` give for an input of this size.

    Parameters
    ----------
    mode : None (keep), ``"short_side"`` (short side = ``size``, aspect kept),
        ``"longest_side"`` (long side = ``size``, aspect kept), ``"square"``
        (``size x size``, aspect not kept) or ``"exact"`` (``size = (h, w)``).
    size : an int, or ``(h, w)`` for ``"exact"``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode is None:
        return height, width
    if mode == "exact":
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise ValueError(f"mode 'exact' needs size=(h, w), got {size!r}")
        h, w = int(size[0]), int(size[1])
    else:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise ValueError(f"mode {mode!r} needs an integer size, got {size!r}")
        s = int(size)
        if mode == "square":
            h, w = s, s
        else:
            ref = min(height, width) if mode == "short_side" else max(height, width)
            scale = s / ref
            h, w = (max(1, round(height * scale)), max(1, round(width * scale)))
            if mode == "short_side":
                h, w = (s, w) if height <= width else (h, s)
            else:
                h, w = (s, w) if height >= width else (h, s)
    if h <= 0 or w <= 0:
        raise ValueError(f"target size must be positive, got {(h, w)}")
    return h, w


def _crop_box(height: int, width: int, crop, size) -> tuple[int, int, int, int] | None:
    if crop is None:
        return None
    if crop in ("center", "centre"):
        if isinstance(size, (tuple, list)):
            ch, cw = int(size[0]), int(size[1])
        elif size is None:
            raise ValueError("crop='center' needs a size (or pass crop=(h, w))")
        else:
            ch = cw = int(size)
    elif isinstance(crop, (int, np.integer)) and not isinstance(crop, bool):
        ch = cw = int(crop)
    elif isinstance(crop, (tuple, list)) and len(crop) == 2:
        ch, cw = int(crop[0]), int(crop[1])
    else:
        raise ValueError(f"crop must be None, 'center', an int or (h, w), got {crop!r}")
    if ch <= 0 or cw <= 0 or ch > height or cw > width:
        raise ValueError(f"cannot centre-crop {ch} x {cw} from a {height} x {width} image")
    top, left = (height - ch) // 2, (width - cw) // 2
    return top, left, ch, cw


def _nearest(array: np.ndarray, h: int, w: int) -> np.ndarray:
    # pixel centres mapped back into the source grid, as PIL's NEAREST does
    rows = np.minimum(((np.arange(h) + 0.5) * array.shape[0] / h).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * array.shape[1] / w).astype(np.int64), array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


def resize_and_crop(array: np.ndarray, mode: str | None = None, size=None, crop=None,
                    resample: str = "bilinear") -> np.ndarray:
    """Apply a resize rule, then an optional centre crop, to an image or a label map.

    Parameters
    ----------
    array : ``(H, W, 3)`` uint8 (any ``resample``), or any ``(H, W)`` / ``(H, W, C)`` array
        with ``resample="nearest"`` (label maps keep their dtype and values).
    mode, size : see :func:`target_size`.
    crop : None, ``"center"`` (a ``size x size`` centre crop, or ``size = (h, w)``), an int,
        or ``(h, w)``; applied after the resize.
    resample : ``"bilinear"`` (default; PIL antialiases when shrinking), ``"bicubic"``,
        ``"lanczos"``, ``"box"`` or ``"nearest"``.

    Returns
    -------
    The resized and cropped array (a new array).
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {tuple(_RESAMPLE)}, got {resample!r}")
    array = np.asarray(array)
    if array.ndim < 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"cannot resize an array of shape {array.shape}")
    h, w = target_size(array.shape[0], array.shape[1], mode, size)
    if (h, w) != array.shape[:2]:
        if resample == "nearest":
            array = _nearest(array, h, w)
        elif array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
            array = np.asarray(Image.fromarray(array).resize((w, h), _RESAMPLE[resample]))
        else:
            raise ValueError(f"resample={resample!r} needs an (H, W, 3) uint8 image; "
                             f"got {array.shape} {array.dtype} (use resample='nearest' for labels)")
    box = _crop_box(array.shape[0], array.shape[1], crop, size)
    if box is not None:
        top, left, ch, cw = box
        array = array[top:top + ch, left:left + cw]
    return np.ascontiguousarray(array)


def load_image(source, mode: str | None = None, size=None, crop=None, *, rule: str | None = None,
               alpha: str = "white", resample: str = "bilinear", exif: bool = True) -> np.ndarray:
    """Load an image as ``(H, W, 3)`` uint8 RGB, optionally resized and cropped.

    Parameters
    ----------
    source : a path, a :class:`PIL.Image.Image` or a numpy array (see :func:`decode_image`).
    mode : None (keep the size), ``"short_side"``, ``"longest_side"``, ``"square"`` or
        ``"exact"`` (see :func:`target_size`).
    size : the target size for ``mode`` (an int, or ``(h, w)`` for ``"exact"``).
    crop : None, ``"center"``, an int or ``(h, w)``: a centre crop after the resize.
    rule : a name from :data:`PAPER_RULES` (``"stego320"``, ``"square512"``, ``"ease640"``,
        ``"short448"``); it sets ``mode``/``size``/``crop`` and cannot be combined with them.
    alpha : how transparency is removed: ``"white"`` (default), ``"black"`` or ``"drop"``.
    resample : the resize filter (default ``"bilinear"``).
    exif : apply the EXIF orientation (default True).

    Returns
    -------
    numpy.ndarray : ``(H, W, 3)`` uint8, C-contiguous.

    Raises
    ------
    FileNotFoundError, CorruptFileError, ValueError, TypeError : see :func:`decode_image`.

    Examples
    --------
    >>> load_image("photo.jpg", rule="stego320").shape        # doctest: +SKIP
    (320, 320, 3)
    """
    if rule is not None:
        if rule not in PAPER_RULES:
            raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(PAPER_RULES)}")
        if mode is not None or size is not None or crop is not None:
            raise ValueError("pass either rule=... or mode/size/crop, not both")
        spec = PAPER_RULES[rule]
        mode, size, crop = spec.get("mode"), spec.get("size"), spec.get("crop")
    if mode is None and size is not None:
        raise ValueError("size was given without a mode; use mode='square', 'short_side', ...")
    rgb = decode_image(source, alpha=alpha, exif=exif)
    out = resize_and_crop(rgb, mode=mode, size=size, crop=crop, resample=resample)
    # arrays viewed from PIL are read-only, and an array passed in unchanged would be the
    # caller's own: return a writable array of our own in both cases
    if not out.flags.writeable or (isinstance(source, np.ndarray) and np.shares_memory(out, source)):
        out = out.copy()
    return out


# -- tensors and hashes ---------------------------------------------------------------------

def to_tensor(image, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None, dtype=None):
    """An ``(H, W, 3)`` uint8 image as a normalised ``(1, 3, H, W)`` tensor.

    Parameters
    ----------
    image : anything :func:`load_image` accepts (no resizing is done here).
    mean, std : per-channel statistics applied to values in ``[0, 1]``; ImageNet's by
        default. ``mean=None, std=None`` leaves the values in ``[0, 1]``.
    device, dtype : of the result (default CPU, float32).

    Returns
    -------
    torch.Tensor : ``(1, 3, H, W)``.
    """
    import torch

    rgb = image if (isinstance(image, np.ndarray) and image.dtype == np.uint8
                    and image.ndim == 3 and image.shape[2] == 3) else load_image(image)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(3, 1, 1)
        s = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(3, 1, 1)
        x = (x - m) / s
    x = x.unsqueeze(0)
    return x.to(device=device or "cpu", dtype=dtype or torch.float32)


def image_sha256(image: np.ndarray) -> str:
    """sha256 of an image's pixels, shape and dtype (not of its file: two files that decode
    to the same pixels hash alike)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
