"""Are the committed results what the committed code produces?

A chapter's outputs are determined by the library (``lib/segbook/``), the chapter
(``book/<chapter>.md``), its profile (``book/profiles/<profile>.yaml``), the data manifests
(``data_manifests/*.yaml``) and the dependency pins (``pyproject.toml``). :func:`inputs_digest`
hashes those files; :class:`~segbook.book.Results` records the digest in ``provenance.json``
under ``inputs``, and :func:`stale_chapters` compares the recorded digest of each chapter's
results with the current files. ``python -m segbook.book check --profile cpu`` (the first
step of ``make test``) fails with one line naming the stale chapters and the command that
regenerates them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from segbook.book.paths import repo_root

SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}
SKIP_SUFFIXES = {".pyc", ".pyo"}

#: Tools around the chapters that no chapter imports (a test checks it): the command line,
#: the rehearsal, the HTML renderer, the golden maker and this check. Changing them cannot
#: change a chapter's outputs, so they are not inputs.
NOT_INPUTS = {f"lib/segbook/book/{name}.py"
              for name in ("__main__", "rehearse", "html", "golden", "freshness")}


def input_files(chapter: str, profile: str, root: Path | None = None) -> list[Path]:
    """The files that determine ``chapter``'s outputs in ``profile`` (relative to ``root``)."""
    root = Path(root) if root is not None else repo_root()
    lib = root / "lib" / "segbook"
    files = [p for p in lib.rglob("*") if p.is_file()
             and not SKIP_DIRS & set(p.relative_to(lib).parts)
             and p.suffix not in SKIP_SUFFIXES and not p.name.startswith(".")]
    files += [root / "book" / f"{chapter}.md", root / "book" / "profiles" / f"{profile}.yaml",
              root / "pyproject.toml"]
    files += list((root / "data_manifests").glob("*.yaml"))
    return sorted({p.relative_to(root) for p in files
                   if p.is_file() and p.relative_to(root).as_posix() not in NOT_INPUTS}, key=str)


def inputs_digest(chapter: str, profile: str, root: Path | None = None) -> dict:
    """``{"sha256": digest of everything, "files": {path: sha256}}`` for :func:`input_files`."""
    root = Path(root) if root is not None else repo_root()
    files = {}
    for rel in input_files(chapter, profile, root):
        files[rel.as_posix()] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    total = hashlib.sha256()
    for name, digest in files.items():
        total.update(f"{name}\0{digest}\n".encode())
    return {"sha256": total.hexdigest(), "files": files}


@dataclass
class Staleness:
    chapter: str
    reason: str
    changed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.changed:
            return f"{self.chapter} ({self.reason})"
        shown = ", ".join(self.changed[:3]) + (f" and {len(self.changed) - 3} more"
                                               if len(self.changed) > 3 else "")
        return f"{self.chapter} ({self.reason}: {shown})"


def stale_chapters(profile: str = "cpu", root: Path | None = None) -> list[Staleness]:
    """Chapters whose ``results/<profile>/<chapter>/provenance.json`` is missing, records no
    input digest, was made with overrides or as a rehearsal, or whose inputs changed since."""
    from segbook.book.paths import chapter_paths

    root = Path(root) if root is not None else repo_root()
    chapters = sorted(p.stem for p in (root / "book").glob("[0-9][0-9]_*.md")) \
        if root != repo_root() else list(chapter_paths())
    out = []
    for chapter in chapters:
        prov_path = root / "results" / profile / chapter / "provenance.json"
        if not prov_path.is_file():
            out.append(Staleness(chapter, "no results"))
            continue
        try:
            prov = json.loads(prov_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            out.append(Staleness(chapter, f"unreadable provenance.json: {exc}"))
            continue
        recorded = prov.get("inputs") or {}
        if prov.get("rehearsal"):
            out.append(Staleness(chapter, "made by a rehearsal"))
            continue
        if (prov.get("parameters") or {}).get("overrides"):
            out.append(Staleness(chapter, "made with overrides "
                                 f"{prov['parameters']['overrides']}"))
            continue
        if not recorded.get("sha256"):
            out.append(Staleness(chapter, "provenance records no input digest"))
            continue
        now = inputs_digest(chapter, profile, root)
        if now["sha256"] != recorded["sha256"]:
            old = recorded.get("files", {})
            changed = sorted(name for name in set(old) | set(now["files"])
                             if old.get(name) != now["files"].get(name))
            out.append(Staleness(chapter, "changed since", changed))
    return out


def regenerate_command(profile: str, chapters: list[str]) -> str:
    numbers = " ".join(c.split("_")[0] for c in chapters)
    if profile == "cpu":
        return f'make book CHAPTERS="{numbers}"'
    return f"python -m segbook.book run --profile {profile} --chapters {numbers}"


def main_check(profile: str = "cpu", stream=sys.stderr) -> int:
    """Print one line and return 1 when results are stale; 0 (and a short line) otherwise."""
    stale = stale_chapters(profile)
    if not stale:
        print(f"results/{profile}: every chapter matches its code, chapter, profile and "
              "manifests", file=sys.stdout)
        return 0
    print(f"error: stale results/{profile}: " + "; ".join(s.describe() for s in stale)
          + f". Regenerate and commit them: {regenerate_command(profile, [s.chapter for s in stale])}",
          file=stream)
    return 1
