"""The image loader: conversions, EXIF, the papers' resize rules, and errors naming the path."""

import numpy as np
import pytest
import torch
from PIL import Image

from segbook.backbones.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAPER_RULES,
    image_sha256,
    load_image,
    resize_and_crop,
    target_size,
    to_tensor,
)
from segbook.errors import CorruptFileError


def _check_rgb(image, shape):
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint8 and image.shape == shape and image.flags.c_contiguous


def test_grey_png_becomes_three_equal_channels(tmp_path):
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (7, 1))
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    _check_rgb(out, (7, 25, 3))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_one_bit_and_cmyk_images_become_rgb(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    np.testing.assert_array_equal(load_image(bits)[..., 0], [[0, 255], [255, 0]])
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))   # pure red in CMYK
    np.testing.assert_array_equal(load_image(cmyk)[0, 0], [255, 0, 0])


def test_rgba_is_composited_on_white_by_default_and_options_apply(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200               # red channel
    rgba[0, 0, 3] = 255              # opaque
    rgba[0, 1, 3] = 0                # transparent
    rgba[1, :, 3] = 128              # half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    white = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(white[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(white[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(white[1, 0], [round(200 * 128 / 255 + 255 * 127 / 255),
                                                round(255 * 127 / 255), round(255 * 127 / 255)])
    black = load_image(tmp_path / "a.png", alpha="black")
    np.testing.assert_array_equal(black[0, 1], [0, 0, 0])
    dropped = load_image(rgba, alpha="drop")
    np.testing.assert_array_equal(dropped[..., 0], 200)
    with pytest.raises(ValueError, match="alpha"):
        load_image(rgba, alpha="grey")


def test_palette_images_with_and_without_transparency(tmp_path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [200, 100, 50])
    pal.save(tmp_path / "pt.png", transparency=0)       # colour 0 transparent
    out = load_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [200, 100, 50])


def test_sixteen_bit_images_scale_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 257 * 128], [65535, 257 * 255, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "w.png")
    out = load_image(tmp_path / "w.png")
    np.testing.assert_array_equal(out[..., 1], [[0, 1, 128], [255, 255, round(1000 / 257)]])
    np.testing.assert_array_equal(load_image(values)[..., 2], out[..., 2])


def test_float_arrays_in_unit_range_are_scaled_and_others_rejected():
    ramp = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(load_image(ramp)[..., 0], np.round(ramp * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(ramp * 255)
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    np.testing.assert_array_equal(load_image(np.eye(2, dtype=bool))[..., 0], [[255, 0], [0, 255]])


def test_bad_arrays_and_sources_get_clear_errors():
    with pytest.raises(ValueError, match="channels first"):
        load_image(np.zeros((3, 8, 9), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="8 bits"):
        load_image(np.full((2, 2), 300, np.int32))
    with pytest.raises(TypeError, match="torch tensor"):
        load_image(torch.zeros(4, 4, 3))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        load_image(12)


def test_exif_orientation_is_honoured(tmp_path):
    # 40 x 80 (h x w): left half red, right half blue; orientation 6 = rotate 90 deg clockwise
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = (255, 0, 0)
    image[:, 40:] = (0, 0, 255)
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape == (80, 40, 3)
    # after a clockwise quarter turn the left (red) half is on top
    assert out[10, 20, 0] > 200 and out[10, 20, 2] < 60
    assert out[70, 20, 2] > 200 and out[70, 20, 0] < 60
    assert load_image(tmp_path / "o.jpg", exif=False).shape == (40, 80, 3)


def test_missing_empty_garbage_truncated_and_directory_paths_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty.jpg") as info:
        load_image(empty)
    assert info.value.path == str(empty)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(CorruptFileError, match="garbage.png"):
        load_image(str(garbage))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(CorruptFileError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("shape, rule, expected", [
    ((480, 640), "stego320", (320, 320)),
    ((640, 480), "stego320", (320, 320)),
    ((300, 600), "short448", (448, 896)),
    ((480, 1280), "ease640", (240, 640)),
    ((1280, 480), "ease640", (640, 240)),
    ((333, 777), "square512", (512, 512)),
])
def test_paper_rules_give_the_papers_sizes(shape, rule, expected):
    image = np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8)
    out = load_image(image, rule=rule)
    assert out.shape == (*expected, 3)
    assert set(PAPER_RULES) >= {"stego320", "square512", "ease640", "short448"}


def test_centre_crop_takes_the_middle():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 5:15] = 255
    out = load_image(image, crop=(10, 10))
    assert out.shape == (10, 10, 3) and out.min() == 255
    out = load_image(image, mode="short_side", size=10, crop="center")
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_inconsistent_geometry_options_are_rejected():
    image = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="not both"):
        load_image(image, rule="stego320", size=100)
    with pytest.raises(ValueError, match="without a mode"):
        load_image(image, size=100)
    with pytest.raises(ValueError, match="unknown rule"):
        load_image(image, rule="stego")
    with pytest.raises(ValueError, match="centre-crop"):
        load_image(image, crop=30)
    with pytest.raises(ValueError, match="mode"):
        target_size(10, 10, "fit", 5)
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        target_size(10, 10, "exact", 5)
    assert target_size(10, 20, "exact", (3, 4)) == (3, 4)


def test_label_maps_resize_with_nearest_and_keep_their_values():
    labels = np.repeat(np.repeat(np.arange(6, dtype=np.int64).reshape(2, 3), 4, 0), 4, 1)  # 8 x 12
    out = resize_and_crop(labels, mode="short_side", size=16, resample="nearest")
    assert out.shape == (16, 24) and out.dtype == np.int64
    assert set(np.unique(out)) == set(range(6))
    np.testing.assert_array_equal(out[::8, ::8], np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="nearest"):
        resize_and_crop(labels, mode="square", size=5, resample="bilinear")


def test_the_result_is_writable_and_never_the_callers_array(tmp_path):
    image = np.zeros((4, 5, 3), np.uint8)
    out = load_image(image)
    out[0, 0] = 7
    assert image[0, 0, 0] == 0
    Image.fromarray(image).save(tmp_path / "z.png")
    assert load_image(tmp_path / "z.png").flags.writeable


def test_to_tensor_normalises_with_imagenet_statistics():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = 255
    x = to_tensor(image)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 1, 1], -mean / std)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - mean) / std)
    raw = to_tensor(image, mean=None, std=None)
    assert raw.max() == 1.0 and raw.min() == 0.0


def test_pixel_hash_ignores_the_file_and_sees_one_pixel(tmp_path):
    image = np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert image_sha256(load_image(tmp_path / "x.png")) == image_sha256(image)
    changed = image.copy()
    changed[3, 3, 1] ^= 1
    assert image_sha256(changed) != image_sha256(image)
