"""Dataset readers on miniature fake trees in each dataset's real layout and encoding."""

import warnings

import numpy as np
import pytest
from PIL import Image

from segbook.data import DATASETS, IGNORE_INDEX, Preprocess, load
from segbook.data.datasets import resize_label
from segbook.data.fake_trees import FAKE_RAW_VALUES, FAKE_SIZE, write_fake_dataset
from segbook.errors import CorruptFileError, MissingDatasetError

# What FAKE_RAW_VALUES must become, by the published rules (written out by hand).
EXPECTED_CLASSES = {
    "coco-stuff-27": [9, 17, 23, 24, -1, 11],     # person, textile, sky, solid, ignore, vehicle
    "coco-object": [1, 12, 80, 0, -1, 0],         # person, stop sign, toothbrush, bg, ignore, bg
    "cityscapes-27": [0, 19, 26, -1, -1, -1],     # road, car, bicycle, void, void, plate
    "kitti": [0, 19, 26, -1, -1, -1],
    "ade20k": [0, 149, -1, 12, 2],                # wall, flag, other, person, sky
    "voc2012": [0, 1, 20, -1, 15],
    "partimagenet": [0, 1, 40, -1, 14],           # background, quadruped head, bottle body, ignore, bird head
    "omnicrack30k": [0, 1, 1, 0],
    "rsdd": [0, 1, 7, -1, 5],
}
EXTRA_META = {"cityscapes-27": "city", "partimagenet": "synset", "omnicrack30k": "domain"}


def _stripes(values, i, size=FAKE_SIZE):
    values = np.roll(np.array(values), i)
    h, w = size
    return np.repeat(values[(np.arange(w) * len(values)) // w][None, :], h, axis=0)


def _load(name, root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 fake images instead of the published count
        return load(name, root=root, strict=False, **kw)


@pytest.mark.parametrize("name", DATASETS)
def test_fake_tree_reads_back_with_the_published_label_rule(name, tmp_path):
    fakes = write_fake_dataset(name, tmp_path, n=3)
    with pytest.warns(UserWarning, match="3 images"):
        ds = load(name, root=tmp_path, strict=False)
    assert len(ds) == 3
    assert sorted(s.id for s in fakes) == sorted(r.id for r in ds.records)
    by_id = {s.id: i for i, s in enumerate(fakes)}
    for image, label, meta in ds:
        i = by_id[meta["id"]]
        assert image.dtype == np.uint8 and image.shape == (*FAKE_SIZE, 3)
        assert label.dtype == np.int64 and label.shape == FAKE_SIZE
        np.testing.assert_array_equal(label, _stripes(EXPECTED_CLASSES[name], i))
        assert meta["dataset"] == name and meta["ignore_index"] == IGNORE_INDEX == -1
        assert meta["num_classes"] == ds.num_classes and meta["original_size"] == FAKE_SIZE
        assert meta["image_path"] == str(fakes[i].image) and meta["label_path"] == str(fakes[i].label)
        if name in EXTRA_META:
            assert meta[EXTRA_META[name]] in meta["id"]
    assert len(EXPECTED_CLASSES[name]) == len(FAKE_RAW_VALUES[name])


def test_strict_load_refuses_an_incomplete_split(tmp_path):
    write_fake_dataset("cityscapes-27", tmp_path, n=2)
    with pytest.raises(MissingDatasetError) as info:
        load("cityscapes-27", root=tmp_path)
    msg = str(info.value)
    assert "2 images" in msg and "expects 500" in msg and "leftImg8bit_trainvaltest.zip" in msg
    # and how to use the part that is there, in code and in the book
    assert "strict=False" in msg and "--set strict_datasets=false" in msg and "--limit N" in msg


def test_missing_dataset_says_what_to_fetch(tmp_path):
    with pytest.raises(MissingDatasetError) as info:
        load("ade20k", root=tmp_path)
    msg = str(info.value)
    assert info.value.name == "ade20k"
    assert "ADEChallengeData2016.zip" in msg and "http://data.csail.mit.edu" in msg
    assert "python -m segbook.data prepare ade20k" in msg


def test_missing_curated_list_is_named(tmp_path):
    write_fake_dataset("coco-stuff-27", tmp_path, n=2, write_list=False)
    with pytest.raises(MissingDatasetError) as info:
        load("coco-stuff-27", root=tmp_path)
    assert info.value.missing == ["curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"]
    assert "--curated-list" in str(info.value)


def test_missing_label_and_image_are_listed(tmp_path):
    fakes = write_fake_dataset("voc2012", tmp_path, n=3)
    fakes[1].label.unlink()
    fakes[2].image.unlink()
    with pytest.raises(MissingDatasetError) as info:
        _load("voc2012", tmp_path)
    missing = info.value.missing
    assert f"VOCdevkit/VOC2012/SegmentationClass/{fakes[1].id}.png" in missing
    assert f"VOCdevkit/VOC2012/JPEGImages/{fakes[2].id}.jpg" in missing
    assert len(missing) == 2


def test_label_without_image_in_a_globbed_split_is_caught(tmp_path):
    fakes = write_fake_dataset("ade20k", tmp_path, n=3)
    fakes[0].label.unlink()
    with pytest.raises(MissingDatasetError) as info:
        _load("ade20k", tmp_path)
    assert info.value.missing == [f"ADEChallengeData2016/annotations/validation/{fakes[0].id}.png"]


def test_corrupt_files_name_their_path(tmp_path):
    fakes = write_fake_dataset("kitti", tmp_path, n=3)
    fakes[0].label.write_bytes(fakes[0].label.read_bytes()[:40])  # truncated PNG
    ds = _load("kitti", tmp_path)
    with pytest.raises(CorruptFileError) as info:
        ds[0]
    assert info.value.path == str(fakes[0].label)
    ds[1]  # the others still read
    fakes[1].image.write_bytes(b"not an image")
    with pytest.raises(CorruptFileError, match=fakes[1].image.name):
        ds[1]


def test_values_outside_the_encoding_are_errors(tmp_path):
    fakes = write_fake_dataset("cityscapes-27", tmp_path, n=1)
    raw = np.full(FAKE_SIZE, 7, np.uint8)
    raw[0, 0] = 34  # no Cityscapes labelId
    Image.fromarray(raw, mode="L").save(fakes[0].label)
    with pytest.raises(CorruptFileError, match=r"value\(s\) 34 \(1 pixels\)"):
        _load("cityscapes-27", tmp_path)[0]


def test_label_of_another_size_and_colour_labels_are_errors(tmp_path):
    fakes = write_fake_dataset("rsdd", tmp_path, n=2)
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(fakes[0].label)
    ds = _load("rsdd", tmp_path)
    with pytest.raises(CorruptFileError, match="10 x 10"):
        ds[0]
    colours = np.zeros((*FAKE_SIZE, 3), np.uint8)
    colours[..., 0] = 5
    Image.fromarray(colours).save(fakes[1].label)
    with pytest.raises(CorruptFileError, match="colour image"):
        ds[1]


def test_unexpected_file_names_are_not_skipped(tmp_path):
    fakes = write_fake_dataset("partimagenet", tmp_path, n=2)
    stray = fakes[0].image.parent / "notes.JPEG"
    stray.write_bytes(fakes[0].image.read_bytes())
    with pytest.raises(CorruptFileError, match="notes.JPEG"):
        _load("partimagenet", tmp_path)


def test_root_defaults_to_segbook_data(tmp_path, monkeypatch):
    write_fake_dataset("omnicrack30k", tmp_path, n=2)
    monkeypatch.setenv("SEGBOOK_DATA", str(tmp_path))
    with pytest.warns(UserWarning, match="not published"):
        ds = load("omnicrack30k")  # the count is inferred, so a mismatch only warns
    assert len(ds) == 2 and ds.root == tmp_path / "omnicrack30k"


# ----------------------------------------------------------------------------- preprocessing

def test_stego320_short_side_and_centre_crop(tmp_path):
    write_fake_dataset("cityscapes-27", tmp_path, n=1)
    image, label, meta = _load("cityscapes-27", tmp_path, preprocess="stego320")[0]
    assert image.shape == (320, 320, 3) and label.shape == (320, 320)
    assert meta["size"] == (320, 320) and meta["original_size"] == FAKE_SIZE
    # 24 x 36 -> 320 x 480 (nearest), then columns 80..399: stripes of 80 px each
    expected = np.repeat(np.repeat(np.array(EXPECTED_CLASSES["cityscapes-27"]), 80)[None, 80:400], 320, 0)
    np.testing.assert_array_equal(label, expected)


def test_long640_and_square512_keep_labels_exact(tmp_path):
    write_fake_dataset("voc2012", tmp_path, n=1)
    image, label, _ = _load("voc2012", tmp_path, preprocess="long640")[0]
    assert image.shape == (427, 640, 3) and label.shape == (427, 640)
    assert set(np.unique(label)) == set(EXPECTED_CLASSES["voc2012"])
    image, label, _ = _load("voc2012", tmp_path, preprocess="square512")[0]
    assert image.shape == (512, 512, 3)
    source = _stripes(EXPECTED_CLASSES["voc2012"], 0)[0]  # the 36 source columns
    for c in range(FAKE_SIZE[1]):  # the centre of each source column lands on its class
        assert (label[:, int((c + 0.5) * 512 / FAKE_SIZE[1])] == source[c]).all()


def test_resize_label_is_nearest_and_crop_matches_torchvision():
    label = np.arange(6, dtype=np.int64).reshape(2, 3) - 1
    up = resize_label(label, (4, 6))
    np.testing.assert_array_equal(up, np.kron(label, np.ones((2, 2), dtype=np.int64)))
    assert up.dtype == np.int64 and set(np.unique(up)) == set(np.unique(label))
    p = Preprocess("short_side", 320, crop="center")
    assert p.resized_shape(480, 640) == (320, 427) and p.resized_shape(640, 480) == (427, 320)
    assert Preprocess("longest_side", 640).resized_shape(375, 1242) == (193, 640)
    with pytest.raises(ValueError):
        Preprocess("fit", 10)
    with pytest.raises(ValueError):
        Preprocess("square", 10, crop="top")
    with pytest.raises(ValueError, match="stego320"):
        load("voc2012", preprocess="stego")


def test_shards_partition_the_split_and_keep_global_indices(tmp_path):
    write_fake_dataset("omnicrack30k", tmp_path, n=5)
    ds = _load("omnicrack30k", tmp_path)
    parts = [ds.shard(r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 2]
    seen = sorted((meta["index"], meta["id"]) for p in parts for _, _, meta in p)
    assert seen == [(i, r.id) for i, r in enumerate(ds.records)]
    with pytest.raises(ValueError):
        ds.shard(2, 2)
