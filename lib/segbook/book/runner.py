"""Execute chapters with papermill into ``results/<profile>/<chapter>/``.

For each chapter the runner

1. converts ``book/<chapter>.md`` (jupytext MyST) to a notebook in memory,
2. executes it with papermill, the profile injected as a parameter, into a *staging*
   directory ``results/<profile>/.staging-<chapter>/`` (``$SEGBOOK_RESULTS_DIR`` points the
   chapter's :class:`~segbook.book.Results` there),
3. on success replaces ``results/<profile>/<chapter>/`` with the staging directory; on
   failure keeps the previous results untouched, moves the partial run to
   ``results/<profile>/<chapter>.failed/`` for inspection, and reports the chapter and the
   cell that raised.

Chapters never execute in place: ``book/*.md`` is only read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from segbook.book.paths import RESULTS_DIR_ENV, book_dir, chapter_paths, results_root
from segbook.book.profiles import available_profiles, load_profile, override_applies


class ChapterFailed(RuntimeError):
    """A chapter raised while executing; the message names the chapter and the cell."""

    def __init__(self, chapter: str, cell: str | None, detail: str, notebook: Path | None):
        self.chapter, self.cell, self.detail, self.notebook = chapter, cell, detail, notebook
        where = cell if cell is not None else "before its first cell"
        msg = f"chapter {chapter} failed at {where}: {detail}"
        if notebook is not None:
            msg += f"\n  executed notebook with the traceback: {notebook}"
        super().__init__(msg)


@dataclass
class ChapterRun:
    chapter: str
    seconds: float
    directory: Path
    files: list[str] = field(default_factory=list)


def resolve_chapters(names: list[str] | None) -> list[str]:
    """Chapter stems for ``names`` (a stem, its number ``"01"`` or a unique prefix);
    all chapters when ``names`` is empty. Unknown names raise ``ValueError`` listing the
    valid ones."""
    known = chapter_paths()
    if not names:
        return list(known)
    picked = []
    for name in names:
        name = Path(name).stem  # accept "book/01_x.md"
        matches = [stem for stem in known if stem == name or stem.startswith(name)]
        if len(matches) != 1:
            raise ValueError(f"unknown chapter '{name}'; valid chapters: {', '.join(known)}")
        if matches[0] not in picked:
            picked.append(matches[0])
    return picked


def check_profile(profile: str) -> None:
    valid = available_profiles()
    if profile not in valid:
        raise ValueError(f"unknown profile '{profile}'; valid profiles: {', '.join(valid)}")


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for a block (a papermill kernel started inside inherits
    them) and restore the previous values, unset ones included, afterwards."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def chapter_notebook(path: Path):
    """The chapter as an nbformat notebook (jupytext conversion, python3 kernel)."""
    import jupytext

    nb = jupytext.read(path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def _failed_cell(nb) -> str | None:
    """Where the chapter raised: "code cell N (`first line of its source`)" for the cell that raised; code cells are
    counted from 1 in the chapter's own order (papermill's injected cell not counted)."""
    code_index = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "injected-parameters" in cell.metadata.get("tags", []):
            continue
        code_index += 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
                return f"code cell {code_index} (`{first.strip()[:60]}`)"
    return None


def chapter_overrides(chapter: str, profile: str, overrides: dict | None) -> dict:
    """The part of ``overrides`` whose keys exist in ``chapter``'s merged profile (a key
    such as ``photo_size`` belongs to one chapter; ``image_limit`` to all)."""
    if not overrides:
        return {}
    cfg = load_profile(profile, chapter=chapter)
    return {k: v for k, v in overrides.items() if override_applies(cfg, k)}


def check_overrides(profile: str, chapters: list[str], overrides: dict | None) -> None:
    """Raise ``ValueError`` for an override key that exists in none of ``chapters``."""
    for key in overrides or {}:
        if not any(key in chapter_overrides(c, profile, {key: None}) for c in chapters):
            cfg = load_profile(profile, chapter=chapters[0]) if chapters else {}
            valid = ", ".join(sorted(k for k in cfg if k != "overrides"))
            raise ValueError(f"unknown profile key '{key}' (no chosen chapter has it); "
                             f"keys of {chapters[0] if chapters else 'the profile'}: {valid}")


def run_chapter(chapter: str, profile: str, parameters: dict | None = None,
                progress: bool = True, timeout: int | None = None,
                overrides: dict | None = None, out_root: Path | None = None) -> ChapterRun:
    """Execute one chapter; returns what it wrote or raises :class:`ChapterFailed`.

    ``parameters`` are extra papermill parameters (e.g. ``{"device": "cpu"}``);
    ``overrides`` dotted profile keys (``{"image_limit": 2}``), passed to the chapter as its
    ``overrides`` parameter (keys the chapter's profile lacks are left out) and recorded in
    its provenance; ``out_root`` replaces ``results/<profile>/`` as the parent of the
    chapter's result directory (the rehearsal writes elsewhere)."""
    import nbformat
    import papermill as pm

    source = chapter_paths()[chapter]
    out_root = Path(out_root) if out_root is not None else results_root() / profile
    final = out_root / chapter
    staging = out_root / f".staging-{chapter}"
    failed = out_root / f"{chapter}.failed"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    input_nb = staging / f".{chapter}.input.ipynb"
    nbformat.write(chapter_notebook(source), input_nb)
    output_nb = staging / f"{chapter}.ipynb"

    params = {"profile": profile, **(parameters or {})}
    picked = chapter_overrides(chapter, profile, overrides)
    if picked:
        params["overrides"] = picked
    # The kernel inherits these: results go to the staging directory, and the chapters' own
    # progress bars stay out of the executed notebook (the runner shows its own, per cell).
    kernel_env = {RESULTS_DIR_ENV: str(staging), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    try:
        with environment(kernel_env):
            pm.execute_notebook(str(input_nb), str(output_nb), parameters=params,
                                kernel_name="python3", cwd=str(book_dir()),
                                progress_bar={"disable": not progress},
                                execution_timeout=timeout)
    except Exception as exc:  # papermill raises PapermillExecutionError, or kernel errors
        shutil.rmtree(failed, ignore_errors=True)
        input_nb.unlink(missing_ok=True)
        staging.rename(failed)
        nb_path = failed / output_nb.name
        cell = None
        if nb_path.is_file():
            cell = _failed_cell(nbformat.read(nb_path, as_version=4))
        ename = getattr(exc, "ename", type(exc).__name__)
        evalue = str(getattr(exc, "evalue", exc)).strip()
        detail = f"{ename}: {evalue.splitlines()[0] if evalue else ''}"
        raise ChapterFailed(chapter, cell, detail, nb_path if nb_path.is_file() else None) from None
    seconds = time.perf_counter() - start
    input_nb.unlink(missing_ok=True)
    # Swap the staging directory into place: the old results survive until the new ones exist.
    previous = out_root / f".previous-{chapter}"
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(failed, ignore_errors=True)
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    return ChapterRun(chapter, seconds, final, files)


def run_book(profile: str, chapters: list[str] | None = None, keep_going: bool = False,
             progress: bool = True, timeout: int | None = None, stream=sys.stdout,
             overrides: dict | None = None, out_root: Path | None = None,
             parameters: dict | None = None) -> int:
    """Run chapters in order; print a summary; return a process exit code.

    ``overrides``, ``out_root`` and ``parameters``: see :func:`run_chapter`."""
    from tqdm.auto import tqdm

    check_profile(profile)
    stems = resolve_chapters(chapters)
    check_overrides(profile, stems, overrides)
    runs: list[ChapterRun] = []
    failures: list[ChapterFailed] = []
    bar = tqdm(stems, desc=f"book [{profile}]", unit="chapter", disable=not progress, file=sys.stderr)
    for stem in bar:
        bar.set_postfix_str(stem)
        try:
            runs.append(run_chapter(stem, profile, parameters=parameters, progress=progress,
                                    timeout=timeout, overrides=overrides, out_root=out_root))
        except ChapterFailed as exc:
            failures.append(exc)
            if not keep_going:
                break
    bar.close()

    print(f"\nsegbook book run, profile '{profile}':", file=stream)
    if overrides:
        print("  overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()), file=stream)
    for run in runs:
        tables = [f for f in run.files if f.startswith("tables/") and f.endswith(".csv")]
        figures = [f for f in run.files if f.startswith("figures/")]
        print(f"  ok      {run.chapter:<32} {run.seconds:7.1f} s  {len(tables)} tables, "
              f"{len(figures)} figures -> {run.directory}", file=stream)
    for exc in failures:
        print(f"  FAILED  {exc}", file=stream)
    skipped = [s for s in stems if s not in {r.chapter for r in runs} | {f.chapter for f in failures}]
    for stem in skipped:
        print(f"  skipped {stem} (an earlier chapter failed; use --keep-going to run it)", file=stream)
    return 1 if failures else 0
