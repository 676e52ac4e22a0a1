"""The texture-mosaic benchmark: exact labels, determinism, and pinned checksums."""

import hashlib

import numpy as np
import pytest

from segbook.data import MOSAIC_CLASSES, make_mosaic, mosaic_benchmark
from segbook.data.mosaic import LAYOUTS, benchmark_seed, texture_digest

# If one of these changes, the v1 benchmark changed: bump MOSAIC_VERSIONS instead.
TEXTURES_SHA256 = "f9a8d201ad6ec5cf4cc781cbefb7b0c84450e226d03c97f287064cf8ff24cc22"
IMAGE_SHA256 = "59b436c3aa4d2e0bc4cc43f0bd42db23fcf6a6f4dfe013acc04c4c13ddcfd39b"
LABELS_SHA256 = "cf2c121cbcf45af98c45ff8f5751ddf275610981bc9fcc1ac469e95e2ba4f4cf"
V1_FIRST3_SHA256 = "b75cc033f101086553916c7aea28963692c2437082457eaabe8dead47b5859e5"


def test_seeds_are_derived_from_version_and_index():
    digest = hashlib.sha256(b"segbook-mosaic:v1:0").digest()
    assert benchmark_seed("v1", 0) == int.from_bytes(digest[:8], "little") == 4601228620973346277
    assert benchmark_seed("v1", 1) != benchmark_seed("v2", 1)


def test_checksums_of_textures_one_mosaic_and_the_benchmark_head():
    assert texture_digest() == TEXTURES_SHA256
    image, labels = make_mosaic(12345, size=64, n_regions=4, layout="polygons")
    assert hashlib.sha256(image.tobytes()).hexdigest() == IMAGE_SHA256
    assert hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest() == LABELS_SHA256
    assert mosaic_benchmark("v1", n=3).digest() == V1_FIRST3_SHA256


@pytest.mark.parametrize("layout", LAYOUTS)
def test_labels_are_exact_and_each_region_has_its_own_texture(layout):
    for seed in (0, 1, 2):
        n = 2 + (seed * 3) % 7
        image, labels, regions = make_mosaic(seed, size=(48, 80), n_regions=n, layout=layout,
                                             return_regions=True)
        assert image.shape == (48, 80, 3) and image.dtype == np.uint8
        assert labels.shape == regions.shape == (48, 80)
        assert sorted(np.unique(regions)) == list(range(n))  # every region visible
        classes = [np.unique(labels[regions == r]) for r in range(n)]
        assert all(c.size == 1 for c in classes)  # one texture per region
        assert len({int(c[0]) for c in classes}) == n  # all different
        assert labels.min() >= 0 and labels.max() < len(MOSAIC_CLASSES)
        # the pixels of a region are the texture's pixels: regions differ in appearance
        means = [image[regions == r].mean() for r in range(n)]
        assert np.ptp(means) > 0


def test_same_seed_same_bytes_and_different_seeds_differ():
    a = make_mosaic(7, size=64, layout="cracks")
    b = make_mosaic(7, size=64, layout="cracks")
    c = make_mosaic(8, size=64, layout="cracks")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_cracks_are_thin_bands_on_a_background():
    _, _, regions = make_mosaic(3, size=128, n_regions=3, layout="cracks", return_regions=True)
    assert (regions == 0).mean() > 0.75  # the background dominates
    assert 0 < (regions == 1).sum() < 128 * 10  # a band at most ~7 px wide


def test_benchmark_is_fixed_and_prefix_stable():
    small = mosaic_benchmark("v1", n=4, size=64)
    large = mosaic_benchmark("v1", n=6, size=64)
    assert len(small) == 4 and small.num_classes == len(MOSAIC_CLASSES) == 10
    assert small.layouts == ["voronoi", "polygons", "cracks", "voronoi"]
    for i in range(4):
        assert np.array_equal(small[i][0], large[i][0])
        assert np.array_equal(small[i][1], large[i][1])
    assert all(2 <= n <= 8 for n in large.n_regions)


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed"),
    ({"seed": 0, "layout": "stripes"}, "layout"),
    ({"seed": 0, "n_regions": 1}, "n_regions"),
    ({"seed": 0, "n_regions": 9}, "n_regions"),
    ({"seed": 0, "size": 16}, "at least 32"),
    ({"seed": 0, "size": "big"}, "size"),
])
def test_make_mosaic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mosaic(**kwargs)


def test_unknown_version_is_named():
    with pytest.raises(ValueError, match="v1"):
        mosaic_benchmark("v0")
    with pytest.raises(ValueError, match="positive"):
        mosaic_benchmark("v1", n=0)
