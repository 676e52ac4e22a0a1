"""The bundled real photos: readable offline, RGB uint8, credited."""

import numpy as np
import pytest

from segbook.data import SAMPLE_NAMES, load_sample, samples


def test_every_photo_loads_offline_as_rgb_uint8_with_credits():
    photos = samples()
    assert [p.name for p in photos] == list(SAMPLE_NAMES)
    for p in photos:
        assert p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.shape[2] == 3
        assert min(p.image.shape[:2]) >= 256
        assert p.description and p.source and p.licence
        assert "skimage.data" in p.source


def test_profile_images_are_all_available():
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle"):
        assert name in SAMPLE_NAMES


def test_resize_centre_crops_to_a_square():
    image = load_sample("coffee", size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    grey = load_sample("camera")
    assert np.array_equal(grey[..., 0], grey[..., 1])
    meta = samples(["rocket"], load=False)[0]
    assert meta.image is None and meta.load(size=32).shape == (32, 32, 3)


def test_unknown_names_and_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="available"):
        load_sample("lena")
    with pytest.raises(ValueError, match="size"):
        load_sample("coffee", size=2)
    with pytest.raises(ValueError, match="empty"):
        samples([])
