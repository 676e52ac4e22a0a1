"""Profiles: the parameters a chapter runs with (``book/profiles/{smoke,cpu,full}.yaml``).

A profile file has top-level keys shared by every chapter (``device``, ``seed``,
``image_limit``, ...) and a ``chapters:`` mapping whose entries override or extend them for
one chapter. :func:`load_profile` returns the merged view for one chapter, with a run's
overrides (``python -m segbook.book run --set key=value --limit N``) applied last and
recorded under ``cfg["overrides"]``, so that they reach ``provenance.json``.

Two shared keys exist for running on part of a dataset: ``image_limit`` (null: every image;
N: the first N images of each dataset a chapter reads) and ``strict_datasets`` (false: a
split with fewer images than the manifest publishes is read with a warning instead of an
error).
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


def parse_override(text: str) -> tuple[str, Any]:
    """``"key.sub=value"`` -> ``("key.sub", value)``; the value is read as YAML
    (``2`` -> int, ``false`` -> bool, ``null`` -> None, ``[1, 2]`` -> list, else a string)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"an override must look like key=value (e.g. image_limit=2), got '{text}'")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def override_applies(cfg: dict, key: str) -> bool:
    """Whether the dotted ``key`` names an entry that exists in ``cfg``."""
    try:
        _locate(cfg, key)
        return True
    except (KeyError, IndexError, ValueError):
        return False


def _locate(cfg: dict, key: str):
    """(container, last part) of a dotted key; list items by index (``datasets.0.limit``)."""
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                raise KeyError(part)
            if last:
                return node, part
            node = node[part]
        elif isinstance(node, list):
            index = int(part)
            node[index]  # IndexError when absent
            if last:
                return node, index
            node = node[index]
        else:
            raise KeyError(part)
    raise KeyError(key)


def apply_overrides(cfg: dict, overrides: dict[str, Any] | None) -> dict:
    """A copy of ``cfg`` with each dotted ``key: value`` of ``overrides`` set.

    Raises ``ValueError`` naming the key and the valid top-level keys when a key does not
    exist in ``cfg`` (a typo must not run a whole chapter with the default)."""
    out = copy.deepcopy(cfg)
    for key, value in (overrides or {}).items():
        try:
            container, part = _locate(out, key)
        except (KeyError, IndexError, ValueError):
            valid = ", ".join(sorted(k for k in out if k not in ("overrides",)))
            raise ValueError(f"unknown profile key '{key}' for chapter {cfg.get('chapter')}; "
                             f"valid keys: {valid}") from None
        container[part] = copy.deepcopy(value)
    out["overrides"] = dict(overrides or {})
    return out


def load_profile(profile: str, chapter: str | None = None, directory: Path | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters of ``profile``, merged with its ``chapters[chapter]`` section, then
    ``overrides`` (dotted keys, see :func:`apply_overrides`), recorded as ``cfg["overrides"]``.

    Raises ``ValueError`` naming the valid profiles when ``profile`` is unknown, and naming
    the valid keys when an override's key does not exist.
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
    return apply_overrides(merged, overrides)


def limited(n: int | None, image_limit: int | None) -> int | None:
    """The smaller of a dataset's own limit ``n`` and the run's ``image_limit`` (None: no
    limit)."""
    if image_limit is None:
        return n
    return image_limit if n is None else min(n, image_limit)
