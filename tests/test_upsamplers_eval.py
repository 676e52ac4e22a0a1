"""Reconstruction and linear probing on planted answers; low-res tokens; the label-upsampling move."""

import numpy as np
import pytest
import torch

from segbook.backbones import load_backbone
from segbook.upsamplers import BilinearUpsampler, Upsampled, backbone_features, lowres_tokens
from segbook.upsamplers.evaluation import linear_probe, probe_crop, reconstruction

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_vit():
    return load_backbone("tiny-vit")


def test_lowres_tokens_are_the_features_of_the_shrunk_image(tiny_vit):
    image = torch.rand(3, 128, 96)
    tokens = lowres_tokens(tiny_vit, image, scale=0.5)
    assert tokens.shape == (32, 4, 3)
    small = torch.nn.functional.interpolate(image[None], size=(64, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(tokens, backbone_features(tiny_vit, small)[0], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch"):
        backbone_features(tiny_vit, torch.rand(1, 3, 60, 64))


def test_reconstruction_scores_a_perfect_upsampler_as_perfect(tiny_vit):
    class Oracle:   # returns the full image's own tokens: MSE 0, cosine 1
        def __call__(self, image, lowres, out_size):
            return Upsampled(backbone_features(tiny_vit, image[None])[0])

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(2)]
    table = reconstruction({"bilinear": BilinearUpsampler(), "oracle": Oracle()}, tiny_vit, images,
                           scale=0.5, size=64)
    oracle = table.set_index("upsampler").loc["oracle"]
    assert oracle["mse"] == pytest.approx(0, abs=1e-10) and oracle["cosine"] == pytest.approx(1, abs=1e-6)
    bilinear = table.set_index("upsampler").loc["bilinear"]
    assert bilinear["mse"] > 0 and bilinear["cosine"] < 1 and int(bilinear["images"]) == 2


def test_linear_probe_learns_a_planted_colour_code(tiny_vit):
    class Colour:   # the features are the image itself: the class is its colour
        def __call__(self, image, lowres, out_size):
            return Upsampled(image * 4 - 2)

    rng = np.random.default_rng(1)
    data = []
    for _ in range(4):
        lab = np.zeros((64, 64), int)
        lab[:, rng.integers(16, 48):] = 1
        lab[rng.integers(16, 48):, :20] = 2
        img = np.stack([(lab == 0), (lab == 1), (lab == 2)], -1).astype(np.uint8) * 255
        lab[:3] = -1   # unlabelled rows are ignored
        data.append((img, lab))
    out = linear_probe(Colour(), tiny_vit, data[:3], data[3:], num_classes=3, size=64, epochs=30,
                       lr=0.1, batch_size=2, seed=0)
    assert out["miou"] > 0.95 and out["pixel_accuracy"] > 0.95
    assert list(out["history"]["epoch"]) == list(range(1, 31))
    per_batch = linear_probe(Colour(), tiny_vit, data[:3], data[3:], num_classes=3, size=64,
                             epochs=3, lr=0.1, scheduler="batch", seed=0)
    per_epoch = linear_probe(Colour(), tiny_vit, data[:3], data[3:], num_classes=3, size=64,
                             epochs=3, lr=0.1, scheduler="epoch", seed=0)
    # JAFAR's bug: the cosine schedule advances per batch (2 per epoch here), so it is further on
    assert per_batch["history"]["lr"].iloc[0] < per_epoch["history"]["lr"].iloc[0]
    with pytest.raises(ValueError, match="scheduler"):
        linear_probe(Colour(), tiny_vit, data[:1], data[1:2], 3, size=64, scheduler="step")


def test_probe_crop_is_square_and_stride_aligned():
    x = probe_crop(np.zeros((50, 90, 3), np.uint8), 44, 16)
    assert x.shape == (3, 48, 48)


def test_label_upsampling_moved_and_old_imports_still_work():
    import segbook.pipelines.upsample as old
    import segbook.upsamplers.labels as new

    assert old.cosine_upsample is new.cosine_upsample
    assert old.nearest_upsample is new.nearest_upsample
    from segbook.upsamplers import cosine_upsample

    assert cosine_upsample is new.cosine_upsample
