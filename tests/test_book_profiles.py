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


def test_overrides_set_dotted_keys_and_are_recorded(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "seed": 0, "image_limit": None,
        "chapters": {"01_x": {"datasets": [{"name": "a", "limit": None}], "opt": {"k": 1}}}}))
    cfg = load_profile("p", chapter="01_x", directory=tmp_path,
                       overrides={"image_limit": 2, "datasets.0.limit": 5, "opt.k": 3})
    assert cfg["image_limit"] == 2 and cfg["datasets"][0]["limit"] == 5 and cfg["opt"]["k"] == 3
    assert cfg["overrides"] == {"image_limit": 2, "datasets.0.limit": 5, "opt.k": 3}
    assert load_profile("p", chapter="01_x", directory=tmp_path)["overrides"] == {}


@pytest.mark.parametrize("key", ["imgae_limit", "datasets.3.limit", "opt.k.deeper", "opt.j"])
def test_an_override_of_a_missing_key_names_the_valid_ones(tmp_path, key):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "seed": 0, "image_limit": None,
        "chapters": {"01_x": {"datasets": [{"name": "a"}], "opt": {"k": 1}}}}))
    with pytest.raises(ValueError, match=rf"unknown profile key '{key}'.*valid keys: .*image_limit"):
        load_profile("p", chapter="01_x", directory=tmp_path, overrides={key: 1})


@pytest.mark.parametrize("text, expected", [
    ("image_limit=2", ("image_limit", 2)), ("strict_datasets=false", ("strict_datasets", False)),
    ("photos=[coffee, chelsea]", ("photos", ["coffee", "chelsea"])),
    ("backbone_label=a b", ("backbone_label", "a b")), ("image_limit=null", ("image_limit", None)),
])
def test_parse_override_reads_values_as_yaml(text, expected):
    from segbook.book.profiles import parse_override

    assert parse_override(text) == expected


def test_parse_override_rejects_text_without_a_key():
    from segbook.book.profiles import parse_override

    with pytest.raises(ValueError, match="key=value"):
        parse_override("image_limit")


def test_every_profile_has_the_partial_run_keys():
    for profile in ("smoke", "cpu", "full"):
        cfg = load_profile(profile)
        assert cfg["image_limit"] is None and cfg["strict_datasets"] is True


def test_limited_takes_the_smaller_limit():
    from segbook.book import limited

    assert limited(None, None) is None and limited(5, None) == 5
    assert limited(None, 2) == 2 and limited(5, 2) == 2 and limited(1, 2) == 1
