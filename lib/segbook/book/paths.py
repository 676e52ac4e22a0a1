"""Where the book lives: the repository root, chapters, profiles and results."""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "SEGBOOK_ROOT"
RESULTS_DIR_ENV = "SEGBOOK_RESULTS_DIR"


def repo_root() -> Path:
    """The repository root: ``$SEGBOOK_ROOT``, else the checkout this package was installed
    from (``lib/segbook`` -> two levels up), else the first parent of the working
    directory that has ``book/profiles``."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[3]
    if (here / "book" / "profiles").is_dir():
        return here
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "book" / "profiles").is_dir():
            return candidate
    raise FileNotFoundError(
        "Cannot find the segbook repository (a directory with book/profiles/). "
        f"Set {ROOT_ENV} to the checkout's root.")


def book_dir() -> Path:
    return repo_root() / "book"


def profiles_dir() -> Path:
    return book_dir() / "profiles"


def results_root() -> Path:
    return repo_root() / "results"


def manifests_dir() -> Path:
    return repo_root() / "data_manifests"


def chapter_paths() -> dict[str, Path]:
    """Chapter stem (``"00_preface"``) -> its jupytext source, in book order."""
    return {p.stem: p for p in sorted(book_dir().glob("[0-9][0-9]_*.md"))}
