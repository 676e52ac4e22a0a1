"""``python -m segbook.book.golden``: regenerate ``tests/golden/<chapter>.ipynb``.

A golden is the chapter executed in the ``smoke`` profile. ``make test`` re-executes it with
nbval (``--nbval-lax``: only cells tagged ``nbval-check-output`` have their outputs
compared) and a unit test checks that its cells still match the chapter's source.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from segbook.book.paths import repo_root
from segbook.book.runner import ChapterFailed, resolve_chapters, run_chapter

GOLDEN_PROFILE = "smoke"


def golden_dir():
    return repo_root() / "tests" / "golden"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segbook.book.golden")
    parser.add_argument("--chapters", nargs="*", default=None)
    args = parser.parse_args(argv)
    try:
        stems = resolve_chapters(args.chapters)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = golden_dir()
    target.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        try:
            run = run_chapter(stem, GOLDEN_PROFILE, progress=False)
        except ChapterFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        shutil.copyfile(run.directory / f"{stem}.ipynb", target / f"{stem}.ipynb")
        print(f"golden {stem}: {run.seconds:.1f} s -> tests/golden/{stem}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
