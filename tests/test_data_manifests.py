"""The dataset manifests and the label tables they point to."""

import pytest
import yaml

from segbook.data import DATASETS, IGNORE_INDEX, load_manifest
from segbook.data.manifests import UNMAPPED, manifests_dir, read_table

# STEGO's and IIC's 27 COCO-Stuff coarse classes, in their order.
STEGO_COCOSTUFF27 = [
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture",
    "rawmaterial", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid",
    "structural", "water"]

CITYSCAPES27 = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle"]


def test_every_dataset_has_a_manifest_named_after_it():
    files = sorted(p.stem for p in manifests_dir().glob("*.yaml"))
    assert files == sorted(DATASETS)
    for name in DATASETS:
        m = load_manifest(name)
        assert m.name == name
        assert m.data["licence"] and m.data["preparation"].strip()
        assert m.data["sources"], name
        for src in m.data["sources"]:
            # a source either has a URL or says why not
            assert src.get("url") or "URL" in src.get("note", ""), (name, src)
        spec = m.split()
        assert spec.count_source


@pytest.mark.parametrize("name,num_classes,background,split,count", [
    ("coco-stuff-27", 27, None, "val", 2175), ("coco-object", 81, 0, "val", 5000),
    ("cityscapes-27", 27, None, "val", 500), ("kitti", 27, None, "training", 200),
    ("ade20k", 150, None, "validation", 2000), ("voc2012", 21, 0, "val", 1449),
    ("partimagenet", 41, 0, "val", 2957), ("omnicrack30k", 2, 0, "validation", 3277),
    ("rsdd", 8, 0, "val", 514)])
def test_papers_splits_class_counts_and_background(name, num_classes, background, split, count):
    m = load_manifest(name)
    assert m.num_classes == num_classes == len(m.class_names) == len(set(m.class_names))
    assert m.background == background
    if background is not None:
        assert m.class_names[background] == "background"
    assert m.default_split == split and m.split().count == count


def test_cocostuff_fine_to_coarse_table():
    rows = read_table("cocostuff_fine.csv")
    assert [int(r["raw"]) for r in rows] == list(range(182))
    assert sum(int(r["used"]) for r in rows) == 171
    assert sum(r["kind"] == "thing" and r["used"] == "1" for r in rows) == 80
    # one coarse class per supercategory, things and stuff kept apart
    by_super = {}
    for r in rows:
        by_super.setdefault((r["kind"], r["supercategory"]), set()).add(int(r["coarse27"]))
    assert len(by_super) == 27 and all(len(v) == 1 for v in by_super.values())
    m = load_manifest("coco-stuff-27")
    assert [r["name"] for r in m.classes] == STEGO_COCOSTUFF27
    lut = m.label_lut()
    # entries of the published fine_to_coarse table
    published = {0: 9, 1: 11, 9: 8, 15: 7, 25: 6, 33: 10, 43: 5, 51: 2, 61: 3, 71: 0, 77: 1, 83: 4,
                 91: 17, 93: 22, 94: 20, 97: 15, 100: 13, 101: 12, 105: 23, 119: 26, 120: 14,
                 131: 16, 156: 23, 170: 18, 179: 19, 181: 24}
    for raw, coarse in published.items():
        assert lut[raw] == coarse, raw
    assert lut[255] == IGNORE_INDEX
    assert (lut[182:255] == UNMAPPED).all()


def test_coco_object_rule_matches_groupvit():
    lut = load_manifest("coco-object").label_lut()
    assert lut[0] == 1 and lut[12] == 12 and lut[89] == 80  # person, stop sign, toothbrush
    assert lut[11] == IGNORE_INDEX  # unused thing id (street sign)
    assert (lut[91:182] == 0).all() and lut[255] == IGNORE_INDEX
    things = lut[:91][lut[:91] > 0]
    assert sorted(things.tolist()) == list(range(1, 81))


def test_cityscapes_rule_labelid_minus_7():
    m = load_manifest("cityscapes-27")
    assert m.class_names == CITYSCAPES27
    rows = m.classes
    assert [int(r["label_id"]) for r in rows] == list(range(7, 34))
    lut = m.label_lut()
    assert lut[7] == 0 and lut[26] == 19 and lut[33] == 26
    assert (lut[:7] == IGNORE_INDEX).all() and lut[255] == IGNORE_INDEX
    assert (lut[34:255] == UNMAPPED).all()
    assert (load_manifest("kitti").label_lut() == lut).all()


def test_other_encodings():
    ade = load_manifest("ade20k").label_lut()
    assert ade[0] == IGNORE_INDEX and ade[1] == 0 and ade[150] == 149 and ade[151] == UNMAPPED
    voc = load_manifest("voc2012").label_lut()
    assert voc[0] == 0 and voc[20] == 20 and voc[255] == IGNORE_INDEX and voc[21] == UNMAPPED
    pin = load_manifest("partimagenet")
    lut = pin.label_lut()
    assert lut[40] == 0 and lut[0] == 1 and lut[39] == 40 and lut[41] == UNMAPPED
    assert pin.class_names[1] == "Quadruped Head" and pin.class_names[40] == "Bottle Body"
    crack = load_manifest("omnicrack30k").label_lut()
    assert crack[0] == 0 and crack[1] == 1 and crack[255] == 1 and crack[2] == UNMAPPED
    rsdd = load_manifest("rsdd")
    assert rsdd.class_names[7] == "exposed interior" and rsdd.label_lut()[8] == UNMAPPED


def test_manifest_that_never_produces_a_class_is_rejected(tmp_path, monkeypatch):
    from segbook.data.manifests import ManifestError
    data = yaml.safe_load((manifests_dir() / "rsdd.yaml").read_text())
    data["labels"]["mapping"]["valid_raw"] = [0, 6]  # class 7 unreachable
    (tmp_path / "rsdd.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SEGBOOK_MANIFESTS", str(tmp_path))
    with pytest.raises(ManifestError, match=r"never produces class\(es\) \[7\]"):
        load_manifest("rsdd")


def test_unknown_dataset_names_the_known_ones():
    from segbook.data.manifests import ManifestError
    with pytest.raises(ManifestError, match="coco-stuff-27"):
        load_manifest("cocostuff")
