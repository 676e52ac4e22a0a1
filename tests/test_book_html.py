"""The HTML book (``python -m segbook.book html``): Sphinx + MyST-NB over executed notebooks.

A strict build fails on an unknown citation key, a link to a chapter that does not exist and a
missing image (tiny synthetic notebooks); the smoke book has every chapter, its figures on disk,
working internal links and the works it cites in its bibliography.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from segbook.book.__main__ import main
from segbook.book.html import HtmlBuildError, NoExecutedChapters, build_html, executed_chapters
from segbook.book.paths import book_dir, chapter_paths, repo_root, results_root
from segbook.book.runner import chapter_notebook

CHAPTERS = sorted(chapter_paths())
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00"
       b"\x00\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe"
       b"\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82")


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells
            if "injected-parameters" not in c.metadata.get("tags", [])]


def _is_current(path: Path, stem: str) -> bool:
    """Is ``path`` the chapter executed from its current text?"""
    if not path.is_file():
        return False
    executed = nbformat.read(path, as_version=4)
    return _cells(executed) == _cells(chapter_notebook(chapter_paths()[stem]))


def _smoke_results(tmp_path_factory) -> Path:
    """A results root whose ``smoke/`` has every chapter executed from its current text:
    results/ itself when results/smoke/ is current; else the goldens (the runner's smoke
    executions, which tests/test_goldens.py keeps identical to the chapters) when no chapter
    shows an image file from Markdown; else a fresh run of the chapters (about a minute)."""
    if all(_is_current(results_root() / "smoke" / s / f"{s}.ipynb", s) for s in CHAPTERS):
        return results_root()
    root = tmp_path_factory.mktemp("results")
    golden = repo_root() / "tests" / "golden"
    md_images = any(re.search(r"!\[[^\]]*\]\((?!https?:)", p.read_text())
                    for p in chapter_paths().values())
    if not md_images and all(_is_current(golden / f"{s}.ipynb", s) for s in CHAPTERS):
        for stem in CHAPTERS:
            (root / "smoke" / stem).mkdir(parents=True)
            shutil.copy2(golden / f"{stem}.ipynb", root / "smoke" / stem / f"{stem}.ipynb")
        return root
    from segbook.book.runner import run_book

    assert run_book("smoke", None, progress=False, out_root=root / "smoke") == 0
    return root


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """The smoke book, built once per session (see :func:`_smoke_results`)."""
    root = _smoke_results(tmp_path_factory)
    out = tmp_path_factory.mktemp("html") / "html"
    index = build_html("smoke", out, source_root=root, progress=False)
    return root, index


def _hrefs(html: str) -> list[str]:
    return re.findall(r'\bhref="([^"]+)"', html)


def _internal_targets_exist(page: Path) -> list[str]:
    """Links and images of one page that point at nothing (files or anchors)."""
    html = page.read_text()
    broken = []
    for target in _hrefs(html) + re.findall(r'<img [^>]*\bsrc="([^"]+)"', html):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        path = path.split("?")[0]  # _static/x.css?v=hash
        file = page.parent / path if path else page
        stale_anchor = anchor and file.suffix == ".html" and file.is_file() \
            and f'id="{anchor}"' not in file.read_text()
        if not file.is_file() or stale_anchor:
            broken.append(target)
    return broken


def _notebook(root: Path, profile: str, stem: str, markdown: str) -> Path:
    folder = root / profile / stem
    folder.mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    cell = nbformat.v4.new_code_cell("1 + 1", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"},
                                           execution_count=1)]
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), cell]
    nbformat.write(nb, folder / f"{stem}.ipynb")
    return folder


# ---------------------------------------------------------------------- the bibliography file

def test_every_cited_key_is_in_references_bib():
    from pybtex.database import parse_file

    bib = parse_file(book_dir() / "references.bib")
    for key, entry in bib.entries.items():
        assert {"title", "year"} <= set(entry.fields), key
        assert entry.persons.get("author"), key
    cited = {key.strip() for path in chapter_paths().values()
             for keys in CITE.findall(path.read_text()) for key in keys.split(",")}
    missing = cited - set(bib.entries)
    assert not missing, f"cited but not in book/references.bib: {sorted(missing)}"


# ---------------------------------------------------------------------- the smoke book

def test_index_lists_every_chapter_and_each_page_exists(smoke_book):
    _, index = smoke_book
    html = index.read_text()
    for stem in CHAPTERS:
        assert f'href="{stem}.html"' in html, f"index.html does not link to {stem}"
        assert (index.parent / f"{stem}.html").is_file()
    assert 'href="bibliography.html"' in html


def test_pages_have_their_figures_and_no_broken_internal_links(smoke_book):
    root, index = smoke_book
    for page in sorted(index.parent.glob("*.html")):
        assert not _internal_targets_exist(page), page.name
    for stem in CHAPTERS:
        nb = nbformat.read(root / "smoke" / stem / f"{stem}.ipynb", as_version=4)
        pngs = sum("image/png" in out.get("data", {}) for cell in nb.cells
                   if cell.cell_type == "code" for out in cell.outputs)
        images = re.findall(r'<img [^>]*\bsrc="(_images/[^"]+)"',
                            (index.parent / f"{stem}.html").read_text())
        assert len(images) >= pngs, f"{stem}: {pngs} figures executed, {len(images)} rendered"
        assert all((index.parent / src).stat().st_size > 0 for src in images)


def test_bibliography_lists_the_cited_works(smoke_book):
    from pybtex.database import parse_file

    root, index = smoke_book
    bib = parse_file(book_dir() / "references.bib")
    bibliography = (index.parent / "bibliography.html").read_text()
    pages = {stem: (index.parent / f"{stem}.html").read_text() for stem in CHAPTERS}
    for stem in CHAPTERS:
        nb = nbformat.read(root / "smoke" / stem / f"{stem}.ipynb", as_version=4)
        keys = {key.strip() for cell in nb.cells if cell.cell_type == "markdown"
                for keys in CITE.findall(cell.source) for key in keys.split(",")}
        for key in keys:
            year = bib.entries[key].fields["year"]
            surname = bib.entries[key].persons["author"][0].last_names[0]
            surname = re.sub(r"[{}\\]|\\.", "", surname)[:4]
            assert re.search(rf"{re.escape(surname)}.*{year}", bibliography), key
        assert len(re.findall('href="bibliography.html#', pages[stem])) >= len(keys)


def test_cli_swaps_the_book_into_results_and_leaves_the_runner_outputs(
        smoke_book, tmp_path, monkeypatch, capsys):
    root, _ = smoke_book
    copy = tmp_path / "results"
    shutil.copytree(root / "smoke", copy / "smoke",
                    ignore=shutil.ignore_patterns("html", ".staging-*", "*.failed"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    (copy / "smoke" / "html").mkdir()
    (copy / "smoke" / "html" / "stale.txt").write_text("previous build")
    monkeypatch.setattr("segbook.book.html.results_root", lambda: copy)

    assert main(["html", "--profile", "smoke", "--no-progress"]) == 0
    html = copy / "smoke" / "html"
    assert (html / "index.html").is_file() and not (html / "stale.txt").exists()
    after = sorted(p.relative_to(copy) for p in copy.rglob("*") if "html" not in p.parts)
    assert after == before, "the html build changed the runner's outputs"
    assert not list((copy / "smoke").glob(".staging-*"))

    assert main(["html", "--profile", "nothing-here", "--no-progress"]) == 2
    _notebook(copy, "broken", "01_a", "# A\n\nAs {cite}`nobody1999unknown` showed.\n")
    capsys.readouterr()
    assert main(["html", "--profile", "broken", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nobody1999unknown" in err and "\n" not in err


def test_committed_cpu_results_render(tmp_path):
    if not executed_chapters("cpu"):
        pytest.skip("no committed cpu results")
    index = build_html("cpu", tmp_path / "html", progress=False)
    for stem in executed_chapters("cpu"):
        assert f'href="{stem}.html"' in index.read_text()


# ---------------------------------------------------------------------- synthetic notebooks

def test_citations_links_equations_and_images_resolve(tmp_path):
    a = _notebook(tmp_path, "p", "01_a",
                  "# A\n\nAs {cite}`shi2000normalized` showed; see [chapter B](02_b.md), "
                  "[its section](02_b.md#a-section) and [the evaluation](05_evaluation.md).\n\n"
                  "$$ x = 1 $$\n\n$$ y = 2 $$ (eq-y)\n\nBy {eq}`eq-y` and {eq}`eq-z`.\n\n"
                  "![a figure](figures/f.png)\n")
    (a / "figures").mkdir()
    (a / "figures" / "f.png").write_bytes(PNG)
    _notebook(tmp_path, "p", "02_b", "# B\n\n## A section\n\n$$ z = 3 $$ (eq-z)\n\n"
                                     "{cite:t}`meila2001random` read it as a walk.\n")
    index = build_html("p", source_root=tmp_path, progress=False)
    page = (index.parent / "01_a.html").read_text()
    assert 'href="02_b.html"' in page and 'href="02_b.html#a-section"' in page
    # 05_evaluation exists in book/ but was not executed here: its link becomes text
    assert "the evaluation" in page and "05_evaluation.html" not in page
    assert re.findall(r'<span class="eqno">\((\d+)\)', page) == ["1", "2"]
    assert 'href="#equation-eq-y">(2)</a>' in page
    assert 'href="02_b.html#equation-eq-z">(1)</a>' in page
    assert "Shi and Malik, 2000" in page and 'href="bibliography.html#' in page
    bibliography = (index.parent / "bibliography.html").read_text()
    assert "Normalized cuts and image segmentation" in bibliography
    assert "random walks view of spectral segmentation" in bibliography
    for html in index.parent.glob("*.html"):
        assert not _internal_targets_exist(html), html.name


@pytest.mark.parametrize("markdown, problem", [
    ("# A\n\nAs {cite}`nobody1999unknown` showed.\n", "nobody1999unknown"),
    ("# A\n\nSee [chapter 07](07_no_such_chapter.md).\n", "07_no_such_chapter"),
    ("# A\n\n![a figure](figures/missing.png)\n", "missing.png"),
], ids=["unknown-cite-key", "link-to-missing-chapter", "missing-image"])
def test_strict_build_fails_and_keeps_the_previous_book(tmp_path, markdown, problem):
    _notebook(tmp_path, "p", "01_a", markdown)
    out = tmp_path / "p" / "html"
    out.mkdir()
    (out / "index.html").write_text("the previous book")
    with pytest.raises(HtmlBuildError, match=re.escape(problem)) as err:
        build_html("p", source_root=tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert (out / "index.html").read_text() == "the previous book"
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["01_a", "html"]
    # not strict: the same problem is a warning and the book is written
    index = build_html("p", source_root=tmp_path, strict=False, progress=False)
    assert "01_a.html" in index.read_text()


def test_no_executed_chapters(tmp_path):
    with pytest.raises(NoExecutedChapters, match="no executed chapters"):
        build_html("p", source_root=tmp_path, progress=False)
