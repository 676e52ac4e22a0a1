"""Profiles: the parameters a chapter runs with (``book/profiles/{smoke,cpu,full}.yaml``).

A profile file has top-level keys shared by every chapter (``device``, ``seed``,
``images``, ...) and a ``chapters:`` mapping whose entries override or extend them for one
chapter. :func:`load_profile` returns the merged view for one chapter.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from segbook.book.paths import profiles_dir

PROFILES = ("smoke", "cpu", "full")


def available_profiles(directory: Path | None = None) -> list[str]:
    directory = directory or profiles_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_profile(profile: str, chapter: str | None = None, directory: Path | None = None) -> dict[str, Any]:
    """The parameters of ``profile``, merged with its ``chapters[chapter]`` section.

    Raises ``ValueError`` naming the valid profiles when ``profile`` is unknown.
    """
    directory = directory or profiles_dir()
    path = directory / f"{profile}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile '{profile}'; valid profiles: "
                         f"{', '.join(available_profiles(directory))}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    chapters = data.pop("chapters", {}) or {}
    merged = _merge(data, chapters.get(chapter, {}) if chapter else {})
    merged["profile"] = profile
    if chapter:
        merged["chapter"] = chapter
    return merged
