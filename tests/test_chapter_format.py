"""Chapters are committed in the exact form jupytext (and so JupyterLab) writes them, so that a
reader who opens and saves a chapter without editing it gets no diff."""

import json
import pathlib

import jupytext
import pytest

from segbook.book.paths import book_dir, chapter_paths

CHAPTERS = sorted(chapter_paths())


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_a_jupytext_round_trip_leaves_the_chapter_byte_identical(chapter):
    path = chapter_paths()[chapter]
    text = path.read_text()
    assert jupytext.writes(jupytext.reads(text, fmt="md:myst"), fmt="md:myst") == text, (
        f"{path.name} is not in the form jupytext writes: rewrite it with "
        f"jupytext.writes(jupytext.reads(text, fmt='md:myst'), fmt='md:myst')")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_kernelspec_is_the_one_jupyterlab_saves(chapter):
    meta = jupytext.reads(chapter_paths()[chapter].read_text(), fmt="md:myst").metadata
    assert meta["kernelspec"] == {"display_name": "Python 3 (ipykernel)", "language": "python",
                                  "name": "python3"}


def test_lab_overrides_open_chapters_as_notebooks_and_fetch_no_news():
    overrides = json.loads((book_dir() / "lab" / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers["markdown"] == viewers["myst"] == "Jupytext Notebook"
    news = overrides["@jupyterlab/apputils-extension:notification"]
    assert news["fetchNews"] == "false" and news["checkForUpdates"] is False


def test_no_generated_notebooks_beside_the_chapters():
    assert not list(pathlib.Path(book_dir()).glob("*.ipynb"))
