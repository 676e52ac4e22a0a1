"""The runner on a throw-away book: a chapter that works, one that raises."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEADER = textwrap.dedent("""\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
        format_version: 0.13
    kernelspec:
      display_name: Python 3
      language: python
      name: python3
    ---
    """)

PARAMS = textwrap.dedent("""\
    ```{code-cell} ipython3
    :tags: [parameters]

    profile = "cpu"
    ```
    """)


def _chapter(title, body):
    return HEADER + f"\n# {title}\n\n" + PARAMS + "\n" + body


OK_BODY = textwrap.dedent("""\
    ```{code-cell} ipython3
    import pandas as pd
    from segbook.book import Results, load_profile
    cfg = load_profile(profile, chapter="00_ok")
    res = Results("00_ok", profile, params=cfg)
    res.table("answer", pd.DataFrame({"x": [cfg["answer"]]}))
    ```
    """)

BAD_BODY = textwrap.dedent("""\
    ```{code-cell} ipython3
    x = 1
    ```

    Some text.

    ```{code-cell} ipython3
    y = x / 0
    ```
    """)


@pytest.fixture
def book(tmp_path):
    (tmp_path / "book" / "profiles").mkdir(parents=True)
    (tmp_path / "book" / "profiles" / "smoke.yaml").write_text(
        "seed: 0\ndevice: cpu\ndescription: t\nanswer: 41\nchapters:\n  00_ok:\n    answer: 42\n")
    (tmp_path / "book" / "00_ok.md").write_text(_chapter("OK", OK_BODY))
    (tmp_path / "book" / "01_bad.md").write_text(_chapter("Bad", BAD_BODY))
    return tmp_path


def _run(root, *args):
    env = {**os.environ, "SEGBOOK_ROOT": str(root)}
    env.pop("SEGBOOK_RESULTS_DIR", None)
    return subprocess.run([sys.executable, "-m", "segbook.book", "run", "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_good_chapter_writes_results_and_failing_one_is_named_with_its_cell(book):
    proc = _run(book, "--profile", "smoke", "--keep-going")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ok      00_ok" in out
    assert "chapter 01_bad failed at code cell 3 (`y = x / 0`)" in out
    assert "ZeroDivisionError" in out
    done = book / "results" / "smoke" / "00_ok"
    assert (done / "00_ok.ipynb").is_file()
    assert (done / "tables" / "answer.csv").read_text().strip().splitlines() == ["x", "42"]
    prov = json.loads((done / "provenance.json").read_text())
    assert prov["outputs"] and prov["parameters"]["answer"] == 42
    assert not (book / "results" / "smoke" / "01_bad").exists()
    assert (book / "results" / "smoke" / "01_bad.failed" / "01_bad.ipynb").is_file()
    assert not list((book / "results" / "smoke").glob(".staging-*"))
    # the chapter source was not executed in place
    assert not list((book / "book").glob("*.ipynb"))


def test_failure_keeps_the_previous_results(book):
    assert _run(book, "--profile", "smoke", "--chapters", "00").returncode == 0
    (book / "book" / "00_ok.md").write_text(_chapter("OK", OK_BODY + "\n" + BAD_BODY))
    proc = _run(book, "--profile", "smoke", "--chapters", "00_ok")
    assert proc.returncode == 1 and "chapter 00_ok failed" in proc.stdout
    assert (book / "results" / "smoke" / "00_ok" / "tables" / "answer.csv").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--profile", "gpu"], "error: unknown profile 'gpu'; valid profiles: smoke"),
    (["--profile", "smoke", "--chapters", "07"], "error: unknown chapter '07'; valid chapters: 00_ok, 01_bad"),
])
def test_unknown_names_get_a_one_line_error(book, args, expected):
    proc = _run(book, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == expected


OVERRIDE_PARAMS = textwrap.dedent("""\
    ```{code-cell} ipython3
    :tags: [parameters]

    profile = "cpu"
    overrides = {}
    ```
    """)

OVERRIDE_BODY = textwrap.dedent("""\
    ```{code-cell} ipython3
    import pandas as pd
    from segbook.book import Results, load_profile
    cfg = load_profile(profile, chapter="02_over", overrides=overrides)
    res = Results("02_over", profile, params=cfg)
    res.table("answer", pd.DataFrame({"x": [cfg["answer"]], "limit": [cfg["image_limit"]]}))
    ```
    """)


@pytest.fixture
def override_book(book):
    (book / "book" / "profiles" / "smoke.yaml").write_text(
        "seed: 0\ndevice: cpu\ndescription: t\nanswer: 41\nimage_limit: null\n")
    (book / "book" / "01_bad.md").unlink()
    (book / "book" / "02_over.md").write_text(
        HEADER + "\n# Over\n\n" + OVERRIDE_PARAMS + "\n" + OVERRIDE_BODY)
    return book


def test_overrides_reach_the_chapter_and_its_provenance(override_book):
    proc = _run(override_book, "--profile", "smoke", "--chapters", "02",
                "--set", "answer=7", "--limit", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overrides: answer=7, image_limit=3" in proc.stdout
    done = override_book / "results" / "smoke" / "02_over"
    assert (done / "tables" / "answer.csv").read_text().split() == ["x,limit", "7,3"]
    prov = json.loads((done / "provenance.json").read_text())
    assert prov["parameters"]["overrides"] == {"answer": 7, "image_limit": 3}


def test_an_override_no_chapter_has_is_a_one_line_error(override_book):
    proc = _run(override_book, "--profile", "smoke", "--chapters", "02", "--set", "answr=7")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown profile key 'answr'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_book_writes_under_out_root(override_book, tmp_path, monkeypatch):
    from segbook.book.runner import run_book

    monkeypatch.setenv("SEGBOOK_ROOT", str(override_book))
    out = tmp_path / "elsewhere"
    code = run_book("smoke", ["02"], progress=False, out_root=out, overrides={"answer": 5})
    assert code == 0
    assert (out / "02_over" / "tables" / "answer.csv").read_text().split()[1] == "5,"
    assert not (override_book / "results" / "smoke" / "02_over").exists()


def test_progress_bars_are_off_when_the_runner_says_so(monkeypatch):
    from segbook.book import progress

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress(range(3)).disable
    monkeypatch.delenv("TQDM_DISABLE")
    bar = progress(range(3), disable=False)
    assert not bar.disable
    bar.close()


def test_environment_sets_and_restores_even_unset_variables(monkeypatch):
    from segbook.book.runner import environment

    monkeypatch.setenv("SEGBOOK_TEST_A", "old")
    monkeypatch.delenv("SEGBOOK_TEST_B", raising=False)
    with pytest.raises(RuntimeError), environment({"SEGBOOK_TEST_A": "new", "SEGBOOK_TEST_B": "b"}):
        assert os.environ["SEGBOOK_TEST_A"] == "new" and os.environ["SEGBOOK_TEST_B"] == "b"
        raise RuntimeError
    assert os.environ["SEGBOOK_TEST_A"] == "old" and "SEGBOOK_TEST_B" not in os.environ
