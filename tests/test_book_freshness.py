"""The staleness check: committed results must be what the committed inputs produce."""

import json
import shutil
import subprocess
import sys

import pytest

from segbook.book.freshness import (
    input_files,
    inputs_digest,
    regenerate_command,
    stale_chapters,
)
from segbook.book.paths import repo_root


@pytest.fixture
def repo(tmp_path):
    """A copy of the inputs of two chapters with fresh results for both."""
    src = repo_root()
    shutil.copytree(src / "lib" / "segbook", tmp_path / "lib" / "segbook",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src / "data_manifests", tmp_path / "data_manifests")
    (tmp_path / "book" / "profiles").mkdir(parents=True)
    shutil.copy(src / "book" / "profiles" / "cpu.yaml", tmp_path / "book" / "profiles")
    shutil.copy(src / "pyproject.toml", tmp_path)
    for chapter in ["00_preface", "01_spectral_clustering"]:
        shutil.copy(src / "book" / f"{chapter}.md", tmp_path / "book")
        out = tmp_path / "results" / "cpu" / chapter
        out.mkdir(parents=True)
        prov = {"chapter": chapter, "parameters": {"overrides": {}},
                "inputs": inputs_digest(chapter, "cpu", tmp_path)}
        (out / "provenance.json").write_text(json.dumps(prov))
    return tmp_path


def test_fresh_results_pass(repo):
    assert stale_chapters("cpu", repo) == []


def test_a_library_change_makes_every_chapter_stale_and_names_the_file(repo):
    path = repo / "lib" / "segbook" / "graphs" / "operators.py"
    path.write_text(path.read_text() + "\n# changed\n")
    stale = stale_chapters("cpu", repo)
    assert [s.chapter for s in stale] == ["00_preface", "01_spectral_clustering"]
    assert all(s.changed == ["lib/segbook/graphs/operators.py"] for s in stale)
    assert "lib/segbook/graphs/operators.py" in stale[0].describe()


def test_a_chapter_or_profile_change_is_seen(repo):
    chapter = repo / "book" / "01_spectral_clustering.md"
    chapter.write_text(chapter.read_text().replace("Fiedler", "Fiedler's", 1))
    assert [s.chapter for s in stale_chapters("cpu", repo)] == ["01_spectral_clustering"]
    profile = repo / "book" / "profiles" / "cpu.yaml"
    profile.write_text(profile.read_text() + "\n# a comment is a change too\n")
    assert len(stale_chapters("cpu", repo)) == 2


def test_new_library_file_and_manifest_change_are_seen(repo):
    (repo / "lib" / "segbook" / "graphs" / "new_module.py").write_text("X = 1\n")
    assert stale_chapters("cpu", repo)[0].changed == ["lib/segbook/graphs/new_module.py"]


def test_caches_do_not_count(repo):
    cache = repo / "lib" / "segbook" / "graphs" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "operators.cpython-311.pyc").write_bytes(b"\0")
    assert stale_chapters("cpu", repo) == []


def test_missing_results_overrides_and_rehearsals_are_stale(repo):
    shutil.rmtree(repo / "results" / "cpu" / "00_preface")
    prov_path = repo / "results" / "cpu" / "01_spectral_clustering" / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["parameters"]["overrides"] = {"image_limit": 2}
    prov_path.write_text(json.dumps(prov))
    reasons = {s.chapter: s.reason for s in stale_chapters("cpu", repo)}
    assert reasons["00_preface"] == "no results"
    assert reasons["01_spectral_clustering"].startswith("made with overrides")
    prov["parameters"]["overrides"] = {}
    prov["rehearsal"] = "REHEARSAL"
    prov_path.write_text(json.dumps(prov))
    assert stale_chapters("cpu", repo)[1].reason == "made by a rehearsal"


def test_regenerate_command():
    assert regenerate_command("cpu", ["01_a", "02_b"]) == 'make book CHAPTERS="01 02"'
    assert regenerate_command("full", ["02_b"]) == "python -m segbook.book run --profile full --chapters 02"


def test_check_command_prints_one_line_naming_chapters_and_command(repo):
    path = repo / "lib" / "segbook" / "eval" / "protocols.py"
    path.write_text(path.read_text() + "\n")
    proc = subprocess.run([sys.executable, "-m", "segbook.book", "check", "--profile", "cpu"], check=False,
                          env={"SEGBOOK_ROOT": str(repo), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: stale results/cpu: 00_preface (changed since: "
                               "lib/segbook/eval/protocols.py)")
    assert lines[0].endswith('make book CHAPTERS="00 01"')


def test_the_tools_left_out_of_the_inputs_are_imported_by_no_chapter():
    import re

    from segbook.book.freshness import NOT_INPUTS
    from segbook.book.paths import chapter_paths

    modules = {path.split("/")[-1][:-3] for path in NOT_INPUTS}
    pattern = re.compile(r"segbook\.book\.(%s)\b|from segbook\.book import .*\b(%s)\b"
                         % ("|".join(modules), "|".join(modules)))
    for chapter, path in chapter_paths().items():
        assert not pattern.search(path.read_text()), f"{chapter} imports one of {sorted(modules)}"
    names = {p.as_posix() for p in input_files("01_spectral_clustering", "cpu")}
    assert not names & NOT_INPUTS and "lib/segbook/book/results.py" in names


def test_a_tool_change_leaves_results_fresh(repo):
    path = repo / "lib" / "segbook" / "book" / "html.py"
    path.write_text(path.read_text() + "\n# a renderer change\n")
    assert stale_chapters("cpu", repo) == []
