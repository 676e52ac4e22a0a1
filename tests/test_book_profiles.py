import pytest
import yaml

from segbook.book import available_profiles, load_profile
from segbook.book.paths import chapter_paths


def test_the_three_profiles_exist_and_load_for_every_chapter():
    assert {"smoke", "cpu", "full"} <= set(available_profiles())
    for profile in ("smoke", "cpu", "full"):
        for chapter in chapter_paths():
            cfg = load_profile(profile, chapter=chapter)
            assert cfg["profile"] == profile and cfg["chapter"] == chapter
            assert "seed" in cfg and "device" in cfg and "description" in cfg


def test_chapter_section_overrides_and_extends_shared_keys(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "seed": 0, "nested": {"a": 1, "b": 2},
        "chapters": {"01_x": {"seed": 5, "nested": {"b": 3}, "extra": True}}}))
    cfg = load_profile("p", chapter="01_x", directory=tmp_path)
    assert cfg["seed"] == 5 and cfg["extra"] is True
    assert cfg["nested"] == {"a": 1, "b": 3}
    other = load_profile("p", chapter="02_y", directory=tmp_path)
    assert other["seed"] == 0 and "extra" not in other and "chapters" not in other


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'gpu'.*cpu.*full.*smoke"):
        load_profile("gpu")
