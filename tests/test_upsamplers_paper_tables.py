"""EASe's upsampler tables as transcribed (Tables 2, 3, supplement Table 2): spot checks re-read
from shared/papers/ease_excite_attend_segment.txt."""

import pytest

from segbook.book.paper_tables import load_paper_table, paper_tables_dir

CHAPTER = "04_excite_attend_segment"
OURS = {"table2_linear_probing": 18, "table3_reconstruction": 24, "supp_table2_sauce_ablation": 24}


def _one(df, **where):
    mask = True
    for col, val in where.items():
        mask = mask & (df[col] == val)
    assert int(mask.sum()) == 1, where
    return float(df.loc[mask, "value"].iloc[0])


@pytest.mark.parametrize("stem,rows", sorted(OURS.items()))
def test_row_counts_and_readme(stem, rows):
    assert len(load_paper_table(CHAPTER, stem)) == rows
    assert f"{stem}.csv" in (paper_tables_dir(CHAPTER) / "README.md").read_text()


def test_spot_checks():
    t2 = load_paper_table(CHAPTER, "table2")
    assert _one(t2, encoder="ViT-L", method="SAUCE", se="trainable", dataset="VOC") == 87.60
    assert _one(t2, encoder="ViT-S", method="JAFAR", se="-", dataset="COCO-Stuff") == 59.61
    t3 = load_paper_table(CHAPTER, "table3")
    assert _one(t3, encoder="ViT-S", method="SAUCE", dataset="ADE20K", metric="MSE") == 2.11
    assert _one(t3, encoder="ViT-L", method="JAFAR", dataset="ADE20K", metric="cosine") == 0.824
    lost = t3[(t3["encoder"] == "ViT-L") & (t3["dataset"] == "ADE20K") & (t3["metric"] == "MSE")]
    assert len(lost) == 2 and not lost["reported"].any() and lost["value"].isna().all()
    s2 = load_paper_table(CHAPTER, "supp_table2")
    assert _one(s2, ablation="d_qk", d_qk=384, dataset="RSDD", metric="mIoU") == 58.71
    assert _one(s2, ablation="d_qk", d_qk=256, dataset="ADE20K", metric="Acc") == 77.93
