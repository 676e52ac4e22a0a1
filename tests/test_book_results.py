import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from segbook.book.results import Results, atomic_write_text, sha256_file


def _figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.arange(16).reshape(4, 4))
    ax.set_title("x")
    return fig


def test_table_figure_and_provenance(tmp_path):
    res = Results("99_test", "smoke", params={"k": 2}, seeds={"seed": 1}, device="cpu",
                  manifests=["coco-stuff-27", "no-such-dataset"], directory=tmp_path)
    df = pd.DataFrame({"method": ["a", "b"], "miou": [0.5, 0.25]})
    csv = res.table("scores", df, caption="Scores.")
    assert pd.read_csv(csv).equals(df)
    md = (tmp_path / "tables" / "scores.md").read_text()
    assert md.startswith("Scores.") and "| method | miou |" in md and "| b | 0.25 |" in md
    png = res.figure("grid", _figure(), close=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["chapter"] == "99_test" and prov["profile"] == "smoke"
    assert prov["parameters"] == {"k": 2} and prov["seeds"] == {"seed": 1}
    assert set(prov["git"]) == {"sha", "dirty"}
    assert prov["packages"]["torch"] is not None and prov["packages"]["pandas"] is not None
    assert prov["manifests"]["no-such-dataset"] is None
    assert prov["outputs"]["tables/scores.csv"] == sha256_file(csv)
    assert prov["outputs"]["figures/grid.png"] == sha256_file(png)
    assert "device" in prov and prov["device"]["requested"] == "cpu"


def test_figures_are_byte_identical_across_writes(tmp_path):
    a = Results("c", "smoke", directory=tmp_path / "a").figure("f", _figure())
    b = Results("c", "smoke", directory=tmp_path / "b").figure("f", _figure())
    assert a.read_bytes() == b.read_bytes()
    assert b"Software" not in a.read_bytes() and b"Creation" not in a.read_bytes()


def test_results_dir_follows_the_runner_staging_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_RESULTS_DIR", str(tmp_path / "staging"))
    res = Results("c", "smoke")
    assert res.dir == tmp_path / "staging"
    assert (tmp_path / "staging" / "provenance.json").is_file()


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")

    class Boom(str):
        def encode(self, *a, **k):
            raise RuntimeError("boom")

    try:
        atomic_write_text(target, Boom("new"))
    except RuntimeError:
        pass
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_git_state_ignores_the_books_own_results(tmp_path):
    import subprocess

    from segbook.book.results import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.csv").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_state(tmp_path)
    assert len(clean["sha"]) == 40 and clean["dirty"] is False
    (tmp_path / "results" / "t.csv").write_text("b\n")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True


def test_a_chapters_provenance_records_the_digest_of_its_inputs(tmp_path):
    from segbook.book.freshness import inputs_digest

    res = Results("01_spectral_clustering", "cpu", directory=tmp_path)
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["inputs"] == inputs_digest("01_spectral_clustering", "cpu")
    assert "book/01_spectral_clustering.md" in prov["inputs"]["files"]
    assert "lib/segbook/book/results.py" in prov["inputs"]["files"]
    assert prov["rehearsal"] is None
    assert res.inputs["sha256"] == prov["inputs"]["sha256"]


def test_a_rehearsal_labels_every_table_figure_and_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_REHEARSAL", "1")
    res = Results("c", "full", directory=tmp_path)
    df = pd.DataFrame({"method": ["a"], "miou": [0.5]})
    csv = res.table("scores", df, caption="Scores.")
    back = pd.read_csv(csv)
    assert list(back.columns) == ["REHEARSAL", "method", "miou"]
    assert (back["REHEARSAL"] == "meaningless").all()
    md = (tmp_path / "tables" / "scores.md").read_text()
    assert md.startswith("**REHEARSAL") and "meaningless" in md.splitlines()[0]
    plain = Results("c", "full", directory=tmp_path / "plain")
    monkeypatch.delenv("SEGBOOK_REHEARSAL")
    unlabelled = Results("c", "full", directory=tmp_path / "real")
    assert unlabelled.figure("f", _figure()).read_bytes() != plain.figure("f", _figure()).read_bytes()
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert "meaningless" in prov["rehearsal"]


def test_atomic_write_csv_round_trips(tmp_path):
    from segbook.book.results import atomic_write_csv

    df = pd.DataFrame({"n": [1024, 4096], "seconds": [0.05, 0.34]})
    path = atomic_write_csv(tmp_path / "bench" / "x.csv", df)
    assert pd.read_csv(path).equals(df) and not list(path.parent.glob(".*.tmp"))


def test_atomic_torch_save_keeps_the_old_file_when_saving_fails(tmp_path):
    import pytest
    import torch

    from segbook.book.results import atomic_torch_save

    path = tmp_path / "ck" / "state.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]   # no temporary left
