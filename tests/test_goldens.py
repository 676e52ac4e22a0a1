"""Every chapter has an nbval golden, and the golden's cells are the chapter's cells."""

import nbformat
import pytest

from segbook.book.paths import chapter_paths, repo_root
from segbook.book.runner import chapter_notebook

GOLDEN = repo_root() / "tests" / "golden"
CHAPTERS = sorted(chapter_paths())


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells
            if "injected-parameters" not in c.metadata.get("tags", [])]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_golden_exists_and_matches_its_chapter(chapter):
    path = GOLDEN / f"{chapter}.ipynb"
    assert path.is_file(), f"{path} is missing: run `make golden CHAPTERS={chapter}`"
    golden = nbformat.read(path, as_version=4)
    expected = _cells(chapter_notebook(chapter_paths()[chapter]))
    got = _cells(golden)
    assert got == expected, (f"{path.name} differs from book/{chapter}.md: "
                             f"run `make golden CHAPTERS={chapter}`")
    tags = [t for c in golden.cells for t in c.metadata.get("tags", [])]
    assert "injected-parameters" in tags, "golden was not executed by the runner"
    injected = next(c for c in golden.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'profile = "smoke"' in injected.source


def test_goldens_have_no_orphans():
    orphans = {p.stem for p in GOLDEN.glob("*.ipynb")} - set(CHAPTERS)
    assert not orphans, f"goldens without a chapter: {sorted(orphans)}"
