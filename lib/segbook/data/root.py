"""The datasets root (``$SEGBOOK_DATA``) and the check that a dataset's files are there."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from segbook.errors import MissingDatasetError

DATA_ENV = "SEGBOOK_DATA"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$SEGBOOK_DATA``, else ``~/segbook-data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / "segbook-data"


def require_files(name: str, files: Iterable[str], root: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None, instructions: str | None = None,
                  show: int = 10, directory: str | None = None) -> Path:
    """Return the dataset directory ``<root>/<directory>`` (``directory`` defaults to
    ``name``; two datasets may share one folder) when every file in ``files`` (paths
    relative to it) exists; otherwise raise :class:`MissingDatasetError` listing the
    missing files (the first ``show`` of them and a count), the manifest and its
    instructions."""
    directory = directory or name
    base = data_root(root) / directory
    missing = [f for f in files if not (base / f).exists()]
    if not missing:
        return base
    listed = "\n".join(f"    {m}" for m in missing[:show])
    more = f"\n    ... and {len(missing) - show} more" if len(missing) > show else ""
    lines = [f"Dataset '{name}' is missing {len(missing)} file(s) under {base}:", listed + more]
    if manifest:
        lines.append(f"Manifest: {manifest}")
    if instructions:
        lines.append("To get it:\n" + instructions.rstrip())
    lines.append(f"Set {DATA_ENV} to the directory that holds '{directory}/' "
                 f"(currently {os.environ.get(DATA_ENV, 'unset')}), then run "
                 f"`python -m segbook.data prepare {name}`.")
    raise MissingDatasetError(name, "\n".join(lines), missing)
