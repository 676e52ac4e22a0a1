"""The transcribed tables of paper 1 (Diffusing, Walking and Cutting) and their loader.

Spot checks were re-read from shared/papers/diffusing_walking_cutting.md (Tables 1-5) and
diffusing_walking_cutting_with_supplement.txt (Tables 6-7), independently of the CSVs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segbook.book.paper_tables import (
    compare_with_paper,
    list_paper_tables,
    load_paper_table,
    paper_tables_dir,
)

CHAPTER = "02_diffusing_walking_cutting"
EXPECTED = {
    "table1_adjacency_dot_vs_cosine": 18,
    "table2_power_walk_steps": 15,
    "table3_automatic_thresholds_resolutions": 33,
    "table4_state_of_the_art": 30,
    "table5_diffcut_pamr": 8,
    "table6_evaluation_protocols": 36,
    "table7_noising_step": 6,
}
SETTING_COLUMNS = {"adjacency", "method", "backbone", "protocol", "resolutions", "training"}


def _one(df: pd.DataFrame, **where) -> float:
    mask = np.ones(len(df), dtype=bool)
    for col, val in where.items():
        mask &= (df[col] == val).to_numpy()
    assert mask.sum() == 1, f"{where} matched {mask.sum()} rows"
    return float(df.loc[mask, "value"].iloc[0])


def test_every_table_is_listed_with_its_row_count():
    assert list_paper_tables(CHAPTER) == sorted(EXPECTED)
    for stem, n in EXPECTED.items():
        assert len(load_paper_table(CHAPTER, stem)) == n, stem


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_tables_parse_and_have_a_number_wherever_one_is_reported(stem):
    df = load_paper_table(CHAPTER, stem)
    assert {"dataset", "metric", "value", "unit"} <= set(df.columns)
    assert (df["unit"] == "percent").all()
    assert set(df["metric"]) <= {"Acc", "F1", "mIoU"}
    reported = df["reported"] if "reported" in df.columns else pd.Series(True, index=df.index)
    assert df.loc[reported, "value"].notna().all()
    assert df.loc[~reported, "value"].isna().all()
    values = df.loc[reported, "value"]
    assert ((values >= 0) & (values <= 100)).all()
    # Every printed number has one decimal.
    assert np.allclose(values * 10, np.round(values * 10))
    for col in SETTING_COLUMNS & set(df.columns):
        assert df[col].notna().all(), f"{stem}: empty {col}"
    key = [c for c in df.columns if c not in {"value", "unit", "reported", "emphasis"}]
    assert not df.duplicated(subset=key).any(), f"{stem}: two numbers for one setting"


def test_table1_spot_checks():
    df = load_paper_table(CHAPTER, "table1")
    assert _one(df, adjacency="Dot Product", ncut_threshold=0.4, metric="Acc") == 74.0
    assert _one(df, adjacency="Dot Product", ncut_threshold=0.6, metric="F1") == 45.2
    assert _one(df, adjacency="Cosine Similarity", ncut_threshold=0.5, metric="mIoU") == 42.2


def test_table2_spot_checks():
    df = load_paper_table(CHAPTER, "table2")
    assert _one(df, k=1, metric="Acc") == 45.9
    assert _one(df, k=3, metric="mIoU") == 42.4
    assert _one(df, k=5, metric="F1") == 54.2


def test_table3_spot_checks_and_resolution_marks():
    df = load_paper_table(CHAPTER, "table3")
    assert _one(df, method="Random Walk", metric="mIoU") == 43.3
    assert _one(df, method="MAN-C w/ NCut", resolutions="16+32+64", metric="F1") == 60.8
    assert _one(df, method="MAN-C w/ Scaled MinCut", resolutions="32+64", metric="Acc") == 37.2
    assert _one(df, method="DiffCut", resolutions="32", metric="mIoU") == 31.3
    assert df.loc[df["method"] == "Random Walk", "ncut_threshold"].eq(0.3).all()
    # Table 2's k = 1 column is Table 3's Scaled MinCut row on all resolutions.
    t2 = load_paper_table(CHAPTER, "table2")
    for metric in ("Acc", "F1", "mIoU"):
        assert _one(t2, k=1, metric=metric) == _one(
            df, method="MAN-C w/ Scaled MinCut", resolutions="8+16+32+64", metric=metric)


def test_table4_spot_checks_and_dashes():
    df = load_paper_table(CHAPTER, "table4")
    assert _one(df, dataset="COCO-Stuff-27", method="Ours") == 46.6
    assert _one(df, dataset="Cityscapes", method="CUPS") == 26.8
    assert _one(df, dataset="ADE20K", method="DiffCut") == 40.1
    assert int((~df["reported"]).sum()) == 8
    assert not df.loc[(df.dataset == "COCO-Stuff-27") & (df.method == "CUPS"), "reported"].item()


def test_table5_spot_checks():
    df = load_paper_table(CHAPTER, "table5")
    assert _one(df, backbone="SSD 1B", method="DiffCut", pamr=True) == 49.1
    assert _one(df, backbone="SD 1.4", method="DiffCut", pamr=False) == 31.3
    assert _one(df, backbone="SD 1.4", method="Ours", pamr=True) == 47.1


def test_table6_spot_checks():
    df = load_paper_table(CHAPTER, "table6")
    assert _one(df, method="STEGO", protocol="per_image", metric="Acc") == 73.3
    assert _one(df, method="DiffSeg", protocol="oracle_merged_per_image", metric="mIoU") == 60.6
    assert _one(df, method="Ours", protocol="per_image", metric="F1") == 73.3
    assert int((~df["reported"]).sum()) == 5


def test_table7_spot_checks():
    df = load_paper_table(CHAPTER, "table7")
    assert _one(df, step=25, ddim_inversion=True) == 43.1
    assert _one(df, step=45, ddim_inversion=True) == 45.3
    assert _one(df, step=40, ddim_inversion=False) == 46.6


def test_readme_names_every_csv():
    readme = (paper_tables_dir(CHAPTER) / "README.md").read_text()
    for stem in EXPECTED:
        assert f"{stem}.csv" in readme


def test_load_by_prefix_and_bad_names():
    assert load_paper_table(CHAPTER, "table5").equals(
        load_paper_table(CHAPTER, "table5_diffcut_pamr"))
    with pytest.raises(KeyError, match="available"):
        load_paper_table(CHAPTER, "table9")
    with pytest.raises(FileNotFoundError):
        load_paper_table("99_no_such_chapter", "table1")


def test_compare_with_paper_joins_and_keeps_one_sided_rows():
    paper = load_paper_table(CHAPTER, "table1")
    ours = pd.DataFrame({
        "adjacency": ["Dot Product", "Dot Product", "Gaussian"],
        "ncut_threshold": ["0.4", 0.5, 0.4],   # text and float keys both meet the paper's floats
        "metric": ["mIoU", "Acc", "mIoU"],
        "value": [40.0, 71.6, 12.5],
    })
    out = compare_with_paper(ours, paper, on=["adjacency", "ncut_threshold", "metric"])
    assert list(out.columns) == ["adjacency", "ncut_threshold", "metric",
                                 "paper", "ours", "difference"]
    assert len(out) == len(paper) + 1
    row = out[(out.adjacency == "Dot Product") & (out.metric == "mIoU")
              & (out.ncut_threshold == 0.4)].iloc[0]
    assert row["paper"] == 44.0 and row["ours"] == 40.0
    assert row["difference"] == pytest.approx(-4.0)
    row = out[(out.adjacency == "Dot Product") & (out.metric == "Acc")
              & (out.ncut_threshold == 0.5)].iloc[0]
    assert row["difference"] == pytest.approx(0.0)
    extra = out.iloc[-1]
    assert extra["adjacency"] == "Gaussian" and np.isnan(extra["paper"])
    assert extra["ours"] == 12.5 and np.isnan(extra["difference"])
    # Paper rows keep the paper's order; those we did not run have NaN for ours.
    assert out["paper"].iloc[: len(paper)].tolist() == paper["value"].tolist()
    assert out["ours"].isna().sum() == len(paper) - 2


def test_compare_with_paper_rejects_bad_keys():
    paper = load_paper_table(CHAPTER, "table1")
    ours = pd.DataFrame({"adjacency": ["Dot Product"], "metric": ["Acc"], "value": [1.0]})
    with pytest.raises(KeyError, match="ncut_threshold"):
        compare_with_paper(ours, paper, on=["adjacency", "ncut_threshold", "metric"])
    with pytest.raises(ValueError, match="repeated keys"):
        compare_with_paper(ours, paper, on=["metric"])
