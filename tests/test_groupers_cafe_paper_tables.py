"""EASe's CAFE-half tables (results/paper/04_excite_attend_segment): they load, spot checks
re-read from shared/papers/ease_excite_attend_segment.txt, and the printed deltas they must
reproduce."""

import numpy as np
import pandas as pd
import pytest

from segbook.book.paper_tables import list_paper_tables, load_paper_table, paper_tables_dir
from segbook.groupers.cafe import PAPER_TARGETS, TABLE4_VARIANTS

CHAPTER = "04_excite_attend_segment"
OURS = {
    "table1_unsupervised_segmentation": 72,
    "table4_cafe_ablation": 10,
    "table5_rsdd_per_class": 45,
    "table6_omnicrack_per_domain": 85,
    "cafe_supp_table3_granularity_calibration": 107,
    "cafe_supp_table4_omnicrack_calibration": 61,
    "cafe_supp_table5_boundary_penalty": 10,
    "cafe_supp_table6_backbone_calibration": 8,
    "cafe_supp_table7_sauce_vs_jafar": 10,
}


def one(df, **where):
    mask = np.ones(len(df), bool)
    for col, val in where.items():
        mask &= (df[col].astype(str) == str(val)).to_numpy()
    assert mask.sum() == 1, where
    return float(df.loc[mask, "value"].iloc[0])


@pytest.mark.parametrize("stem", sorted(OURS))
def test_tables_load_with_their_row_counts(stem):
    assert stem in list_paper_tables(CHAPTER)
    df = load_paper_table(CHAPTER, stem)
    assert len(df) == OURS[stem]
    rep = df["reported"]
    assert df.loc[rep, "value"].notna().all() and df.loc[~rep, "value"].isna().all()
    pct = df["unit"] == "percent"
    assert df.loc[pct & rep, "value"].between(-10, 100).all()


def test_readme_names_every_csv():
    text = (paper_tables_dir(CHAPTER) / "cafe_tables_README.md").read_text()
    for stem in OURS:
        assert f"`{stem}.csv`" in text or stem in text


def test_table1_spot_checks_and_deltas():
    t = load_paper_table(CHAPTER, "table1")
    assert one(t, method="EASe", dataset="RSDD") == 58.4
    assert one(t, method="DiffCut", dataset="VOC") == 65.2
    assert np.isnan(one(t, method="STEGO", dataset="VOC"))
    # the printed "Δ prev. SOTA" row: EASe minus the best other method
    delta = {"VOC": -1.6, "COCO-Object": 9.1, "COCO-Stuff": 1.8, "Cityscapes": 2.2, "ADE20K": 5.1,
             "PartImageNet": 7.4, "KITTI": 2.0, "OmniCrack30k": 9.2, "RSDD": 30.3}
    for d, want in delta.items():
        others = t[(t.dataset == d) & (t.method != "EASe")]["value"].max()
        assert one(t, method="EASe", dataset=d) - others == pytest.approx(want, abs=0.05), d


def test_table4_variants_match_the_library_and_the_printed_deltas():
    t = load_paper_table(CHAPTER, "table4")
    assert set(t["variant"]) == set(TABLE4_VARIANTS)
    assert one(t, variant="cafe", dataset="ADE20K") - one(t, variant="kmeans", dataset="ADE20K") \
        == pytest.approx(15.9)
    assert one(t, variant="cafe", dataset="RSDD") - one(t, variant="kmeans", dataset="RSDD") \
        == pytest.approx(19.9)


def test_table5_and_table6_means():
    t5 = load_paper_table(CHAPTER, "table5")
    cls = t5[(t5["class"] != "mIoU") & (t5.method == "EASe")]
    assert cls["value"].mean() == pytest.approx(one(t5, method="EASe", **{"class": "mIoU"}), abs=0.05)
    t6 = load_paper_table(CHAPTER, "table6")
    assert one(t6, method="EASe", domain="all") == 11.3
    assert set(t6["metric"]) == {"clIoU"}


def test_supp_table3_default_rows_are_the_library_targets():
    t = load_paper_table(CHAPTER, "cafe_supp_table3")
    names = {"ADE20K": "ade20k", "Cityscapes": "cityscapes", "COCO-Object": "coco_object",
             "COCO-Stuff": "coco_stuff", "KITTI": "kitti", "RSDD": "rsdd",
             "PartImageNet": "partimagenet", "VOC": "voc"}
    default = t[t["row"] == "default"]
    for d, key in names.items():
        rows = default[default.dataset == d].set_index("metric")["value"]
        assert tuple(rows[["mIoU", "G_scale", "G_sem"]]) == PAPER_TARGETS[key], d


def test_supp_table7_ease_row_is_the_calibrated_row_not_table1():
    t7 = load_paper_table(CHAPTER, "cafe_supp_table7")
    t5 = load_paper_table(CHAPTER, "cafe_supp_table5")
    t1 = load_paper_table(CHAPTER, "table1")
    ease7 = t7[t7.method == "EASe"].set_index("dataset")["value"]
    cal = t5[t5.variant == "calibrated"].set_index("dataset")["value"]
    pd.testing.assert_series_equal(ease7.sort_index(), cal.sort_index(), check_names=False)
    assert one(t1, method="EASe", dataset="Cityscapes") != ease7["Cityscapes"]
    jafar = t7[t7.method == "JAFAR w/ CAFE"].set_index("dataset")["value"]
    assert (ease7 - jafar).mean() == pytest.approx(1.1, abs=0.05)
