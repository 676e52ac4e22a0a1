"""An on-disk cache of captures, so that a chapter run twice does not run the backbone twice.

A cached capture is one ``.safetensors`` file (its tensors, with the capture's structure in
the header's metadata) and a small ``.json`` beside it that a person can read (key, backbone,
parameters, layers). The key is the sha256 of

* the backbone's name and weights fingerprint,
* the sha256 of the image's pixels (after decoding: :func:`~segbook.backbones.images.image_sha256`),
* the capture parameters, canonicalised (sorted keys; tuples, dtypes and devices spelled out),

so a hit is exact and a change of any of them computes anew. Files are written atomically
(temporary file + rename); a file that cannot be read back is recomputed with a warning.

>>> cache = FeatureCache()                                            # doctest: +SKIP
>>> cap = cache.get_or_compute(backbone, image, {"temperature": 0.1})  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segbook.backbones.base import Capture, LayerCapture
from segbook.backbones.images import image_sha256, load_image
from segbook.book.results import atomic_write_bytes, atomic_write_text

CACHE_ENV = "SEGBOOK_CACHE"
FORMAT_VERSION = 1
_TENSOR_FIELDS = ("attn", "logits", "q", "k", "v", "features")
_SCALAR_FIELDS = {f.name for f in dataclasses.fields(LayerCapture)} - set(_TENSOR_FIELDS)
_FIELDS = ("attn", "logits", "q", "k", "v", "features")


class CacheWarning(UserWarning):
    """A cache file was unreadable and has been recomputed."""


def default_cache_dir() -> Path:
    """``$SEGBOOK_CACHE`` when set, else ``~/.cache/segbook``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "segbook"


# -- canonical JSON (keys and metadata that survive a round trip) -------------------------

def _encode(value: Any) -> Any:
    """Plain JSON with tagged tuples, dtypes and devices, so that decoding restores them."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cache metadata keys must be strings, got {list(value)}")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        if not np.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, np.generic):
        return _encode(value.item())
    raise TypeError(f"cannot use a {type(value).__name__} ({value!r}) in a cache key or "
                    "capture metadata; use str, int, float, bool, None, lists, tuples, dicts, "
                    "torch dtypes or devices")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__dtype__"}:
            return getattr(torch, value["__dtype__"])
        if set(value) == {"__device__"}:
            return torch.device(value["__device__"])
        if set(value) == {"__path__"}:
            return Path(value["__path__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def canonical_json(value: Any) -> str:
    """The canonical text of ``value``: sorted keys, no spaces, tagged tuples/dtypes."""
    return json.dumps(_encode(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def capture_key(backbone_name: str, fingerprint: str, image_hash: str, params: dict) -> str:
    """The cache key: sha256 over backbone name, weights fingerprint, image hash, params."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    text = canonical_json({"backbone": backbone_name, "fingerprint": fingerprint,
                           "image": image_hash, "params": params, "version": FORMAT_VERSION})
    return hashlib.sha256(text.encode()).hexdigest()


# -- (de)serialising a Capture -------------------------------------------------------------

def capture_to_safetensors(capture: Capture, extra: dict | None = None) -> bytes:
    """A :class:`Capture` as safetensors bytes (tensors + structure in the header)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    layers = []
    for index, layer in enumerate(capture.layers.values()):
        fields = []
        for name, tensor in layer.tensors().items():
            t = tensor.detach().to("cpu").contiguous()
            storage = t.untyped_storage()
            # safetensors refuses tensors that share storage (q and k may be one tensor) and
            # would write a partial view's whole storage: give such tensors their own copy
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[f"{index}.{name}"] = t
            fields.append(name)
        # every non-tensor field of the dataclass (name, kind, grid, heads, reduction,
        # prefix_tokens, ...), so that a field added to LayerCapture round-trips too
        spec = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
                if f.name not in _TENSOR_FIELDS}
        spec["grid"] = tuple(spec["grid"])
        spec["fields"] = fields
        layers.append(spec)
    structure = {"version": FORMAT_VERSION, "backbone": capture.backbone,
                 "image_size": tuple(capture.image_size), "meta": capture.meta,
                 "layers": layers, "extra": extra or {}}
    return save(tensors, metadata={"segbook": canonical_json(structure)})


def capture_from_safetensors(data: bytes) -> tuple[Capture, dict]:
    """The inverse of :func:`capture_to_safetensors`: ``(capture, extra)``.

    Raises
    ------
    ValueError : the bytes are not a segbook capture (or are damaged).
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        structure = _decode(json.loads(header["__metadata__"]["segbook"]))
    except Exception as exc:  # any parse failure means "not a valid file"
        raise ValueError(f"not a readable segbook capture: {exc}") from exc
    if structure.get("version") != FORMAT_VERSION:
        raise ValueError(f"capture format version {structure.get('version')} != {FORMAT_VERSION}")
    capture = Capture(backbone=structure["backbone"], image_size=tuple(structure["image_size"]),
                      meta=structure["meta"])
    for index, spec in enumerate(structure["layers"]):
        values = {}
        for name in spec["fields"]:
            key = f"{index}.{name}"
            if key not in tensors:
                raise ValueError(f"tensor {key} ({spec['name']}.{name}) is missing")
            values[name] = tensors[key]
        scalars = {k: v for k, v in spec.items() if k != "fields" and k in _SCALAR_FIELDS}
        scalars["grid"] = tuple(scalars["grid"])
        capture.layers[spec["name"]] = LayerCapture(**scalars, **values)
    return capture, structure.get("extra", {})


# -- the cache -----------------------------------------------------------------------------

class FeatureCache:
    """Captures on disk, keyed by backbone, weights, image and parameters.

    Parameters
    ----------
    directory : where the files go (default :func:`default_cache_dir`); captures are stored
        as ``<directory>/captures/<key[:2]>/<key>.safetensors`` plus ``<key>.json``.
    enabled : False turns the cache into a pass-through (always computes, never writes).

    Attributes
    ----------
    hits, misses : counters since construction (a recomputed corrupt file is a miss).
    """

    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"

    # -- keys and paths -------------------------------------------------------------------
    def key(self, backbone, image, params: dict | None = None) -> str:
        """The key of ``backbone`` (an object with ``name`` and ``fingerprint``), ``image``
        (anything :func:`load_image` accepts; its decoded pixels are hashed) and ``params``."""
        rgb = image if isinstance(image, np.ndarray) else load_image(image)
        return capture_key(backbone.name, getattr(backbone, "fingerprint", ""),
                           image_sha256(rgb), dict(params or {}))

    def path(self, key: str) -> Path:
        """The ``.safetensors`` path of ``key`` (the ``.json`` lies beside it)."""
        return self.directory / "captures" / key[:2] / f"{key}.safetensors"

    # -- reading and writing ----------------------------------------------------------------
    def get(self, key: str) -> Capture | None:
        """The cached capture of ``key``, None when absent.

        Raises
        ------
        ValueError : the file exists but cannot be read (see :meth:`get_or_compute`).
        """
        path = self.path(key)
        if not path.is_file():
            return None
        capture, extra = capture_from_safetensors(path.read_bytes())
        if extra.get("key") not in (None, key):
            raise ValueError(f"{path} holds the capture of key {extra.get('key')}, not {key}")
        return capture

    def put(self, key: str, capture: Capture, params: dict | None = None) -> Path:
        """Store ``capture`` under ``key`` (atomically); returns the ``.safetensors`` path."""
        path = self.path(key)
        info = {"key": key, "backbone": capture.backbone, "params": dict(params or {})}
        atomic_write_bytes(path, capture_to_safetensors(capture, extra=info))
        summary = {
            "key": key, "backbone": capture.backbone, "image_size": list(capture.image_size),
            "params": json.loads(canonical_json(dict(params or {}))),
            "layers": [{"name": l.name, "kind": l.kind, "grid": list(l.grid),
                        "tensors": {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
                                    for k, v in l.tensors().items()}}
                       for l in capture.layers.values()],
        }
        atomic_write_text(path.with_suffix(".json"), json.dumps(summary, indent=1, sort_keys=True) + "\n")
        return path

    def get_or_compute(self, backbone, image, params: dict | None = None,
                       fn: Callable[[], Capture] | None = None) -> Capture:
        """The cached capture, or compute it, store it and return it.

        Parameters
        ----------
        backbone : the backbone (its ``name`` and ``fingerprint`` enter the key).
        image : a path, PIL image or array; its decoded pixels enter the key.
        params : every parameter that changes the capture (layers, size, temperature, ...).
        fn : computes the capture on a miss; default ``backbone.capture(image, **params)``.
            When given, it must honour ``params`` (they are the key, not its arguments).

        Returns
        -------
        Capture : bit-identical tensors, names, grids and metadata on a hit.

        Warns
        -----
        CacheWarning : a cache file could not be read; it is recomputed and overwritten.
        """
        params = dict(params or {})
        rgb = image if isinstance(image, np.ndarray) else load_image(image)
        if fn is None:
            def fn():
                return backbone.capture(rgb, **params)
        if not self.enabled:
            self.misses += 1
            return fn()
        key = self.key(backbone, rgb, params)
        try:
            cached = self.get(key)
        except (ValueError, OSError) as exc:
            warnings.warn(f"feature cache file {self.path(key)} is unreadable ({exc}); "
                          "recomputing it", CacheWarning, stacklevel=2)
            cached = None
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        capture = fn()
        if not isinstance(capture, Capture):
            raise TypeError(f"fn must return a Capture, got {type(capture).__name__}")
        self.put(key, capture, params)
        return capture

    def clear(self) -> int:
        """Delete every cached capture; returns how many were removed."""
        root = self.directory / "captures"
        count = 0
        if root.is_dir():
            for path in root.glob("*/*.safetensors"):
                path.unlink()
                path.with_suffix(".json").unlink(missing_ok=True)
                count += 1
        return count
