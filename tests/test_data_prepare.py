"""``python -m segbook.data prepare``: missing data, curated lists, checksums, corruption."""

import hashlib
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from segbook.data import load
from segbook.data.__main__ import EXIT_CORRUPT, EXIT_MISSING, main
from segbook.data.fake_trees import write_fake_dataset
from segbook.data.prepare import check_archives, install_split_list, prepare
from segbook.errors import CorruptFileError, MissingDatasetError


def test_cli_on_a_missing_dataset_prints_what_to_fetch(tmp_path):
    env = dict(os.environ, SEGBOOK_DATA=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "segbook.data", "prepare", "voc2012"],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert run.returncode == EXIT_MISSING
    assert "VOCtrainval_11-May-2012.tar" in run.stderr
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar" in run.stderr
    assert "6cd6e144f989b92b3379bac3b3de84fd" in run.stderr
    assert "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt" in run.stderr


def test_cli_list_and_info(tmp_path, capsys):
    write_fake_dataset("kitti", tmp_path, n=1)
    assert main(["list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kitti" in out and "present, not prepared" in out and "rsdd" in out and "missing" in out
    assert main(["info", "coco-stuff-27"]) == 0
    out = capsys.readouterr().out
    assert "Coco164kFull_Stuff_Coarse_7.txt" in out and "2175" in out and "-1" in out


def test_prepare_checks_decodes_and_records_checksums(tmp_path):
    fakes = write_fake_dataset("cityscapes-27", tmp_path, n=3)
    out = io.StringIO()
    with pytest.warns(UserWarning):
        summary = prepare("cityscapes-27", root=tmp_path, strict=False, out=out)
    assert summary["images"] == 3 and summary["expected"] == 500
    assert summary["groups"]["city"] == {"frankfurt": 1, "lindau": 1, "munster": 1}
    # each fake label: 36 columns in 6 stripes of 6 px -> road, car, bicycle 6 x 24 px each
    assert summary["class_pixels"]["road"] == summary["class_pixels"]["car"] == 3 * 6 * 24
    assert summary["ignored_pixels"] == 3 * 3 * 6 * 24
    stamp = tmp_path / "cityscapes" / ".segbook"
    listing = (stamp / "cityscapes-27.val.sha256").read_text().splitlines()
    assert len(listing) == 6
    digest, rel = listing[0].split(None, 1)
    assert hashlib.sha256((tmp_path / "cityscapes" / rel).read_bytes()).hexdigest() == digest
    assert json.loads((stamp / "cityscapes-27.val.json").read_text())["images"] == 3
    # a file that changes afterwards is caught by the next prepare, by name
    Image.fromarray(np.full((24, 36), 7, np.uint8), mode="L").save(fakes[1].label)
    with pytest.raises(CorruptFileError, match=fakes[1].label.name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare("cityscapes-27", root=tmp_path, strict=False, out=io.StringIO())


@pytest.mark.filterwarnings("ignore:Dataset 'ade20k'")
def test_prepare_finds_a_bad_label_value_in_the_middle(tmp_path, capsys):
    fakes = write_fake_dataset("ade20k", tmp_path, n=3)
    raw = np.array(Image.open(fakes[2].label))
    raw[3, 3] = 151
    Image.fromarray(raw, mode="L").save(fakes[2].label)
    code = main(["prepare", "ade20k", "--root", str(tmp_path), "--allow-count-mismatch", "--no-hash"])
    assert code == EXIT_CORRUPT
    assert str(fakes[2].label) in capsys.readouterr().err


def test_curated_list_is_checked_then_installed(tmp_path):
    fakes = write_fake_dataset("coco-stuff-27", tmp_path, n=3, write_list=False)
    wrong = tmp_path / "short.txt"
    wrong.write_text("".join(f"{s.id}\n" for s in fakes))
    with pytest.raises(CorruptFileError, match="has 3 ids; the manifest expects 2175"):
        install_split_list("coco-stuff-27", wrong, root=tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("000000000139\nCOCO_val2014_000000000139\n")
    with pytest.raises(CorruptFileError, match="line"):
        install_split_list("coco-stuff-27", bad, root=tmp_path)
    full = tmp_path / "Coco164kFull_Stuff_Coarse_7.txt"
    ids = [s.id for s in fakes] + [f"{900000 + i:012d}" for i in range(2172)]
    full.write_text("\n".join(ids) + "\n")
    dest = install_split_list("coco-stuff-27", full, root=tmp_path)
    assert dest == tmp_path / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    assert dest.read_text().split() == ids
    # the list now names 2172 images that are not there: all of them are reported missing
    with pytest.raises(MissingDatasetError) as info:
        load("coco-stuff-27", root=tmp_path)
    assert len(info.value.missing) == 2 * 2172 and "... and 4334 more" in str(info.value)
    assert "images/val2017/000000900000.jpg" in info.value.missing


def test_archive_checksums(tmp_path):
    archives = tmp_path / "downloads"
    archives.mkdir()
    out = io.StringIO()
    assert check_archives("voc2012", archives, out=out) == {"VOCtrainval_11-May-2012.tar": "absent"}
    assert "checksum not checked" in out.getvalue()
    (archives / "VOCtrainval_11-May-2012.tar").write_bytes(b"not the VOC archive")
    with pytest.raises(CorruptFileError, match="md5"):
        check_archives("voc2012", archives, out=out)
    status = check_archives("cityscapes-27", archives, out=out)
    assert set(status.values()) == {"no checksum published"}
