"""Backbone features as an upsampler sees them: batched, from images in ``[0, 1]``.

An upsampler is trained and evaluated on pairs made from one image (EASe eq. 2; JAFAR's code):
the *low-resolution tokens* are the backbone's features of the image shrunk by a factor
``s`` (``U(0.25, 0.5)`` in training), the *target* is the backbone's features of the image at full
size. :func:`backbone_features` runs a ViT (patch tokens after the final norm, prefix tokens
dropped: JAFAR's ``forward_intermediates(norm=True)``) or a CNN (one block's output, through a
forward hook) on a batch; :func:`lowres_tokens` makes the low-resolution tokens of one image.

Sizes are rounded to multiples of the backbone's stride (the patch size of a ViT, 16 for
EfficientNet-Lite0's ``blocks.10``) so that a grid covers its image exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_LAYERS", "backbone_features", "feature_stride", "feature_width",
           "image_tensor", "lowres_tokens", "round_to_stride"]

# The CNN layer whose output is "the tokens": stride 16 like a ViT/16 (EfficientNet-Lite0's
# blocks.10 has 112 channels).
DEFAULT_LAYERS = {"effnet-lite0": "blocks.10"}


class _Stop(Exception):
    pass


def _layer(backbone, layer):
    if getattr(backbone, "family", None) == "vit":
        return "norm"
    layer = layer or DEFAULT_LAYERS.get(backbone.name)
    if layer is None:
        raise ValueError(f"name the feature layer of {backbone.name} (layer=...)")
    return layer


def feature_stride(backbone, layer: str | None = None) -> int:
    """Pixels per token side."""
    if getattr(backbone, "family", None) == "vit":
        return int(backbone.patch_size)
    return int(backbone._modules_by_name[_layer(backbone, layer)][1])


def feature_width(backbone, layer: str | None = None) -> int:
    """Channels of a token (the upsampler's ``v_dim``)."""
    if getattr(backbone, "family", None) == "vit":
        return int(backbone.model.num_features)
    return int(backbone._modules_by_name[_layer(backbone, layer)][2])


def round_to_stride(size: float, stride: int) -> int:
    """``round(size / stride) * stride``, at least one stride (JAFAR's rounding of the low-res size)."""
    return max(stride, round(size / stride) * stride)


def image_tensor(image) -> torch.Tensor:
    """``(3, H, W)`` float32 in ``[0, 1]`` from a tensor, an ``(H, W, 3)`` uint8/float array, a
    path or a PIL image."""
    if isinstance(image, torch.Tensor):
        t = image.float()
        if t.ndim == 3 and t.shape[0] != 3 and t.shape[-1] == 3:
            t = t.permute(2, 0, 1)
        return t / 255.0 if image.dtype == torch.uint8 else t
    if not isinstance(image, np.ndarray):
        from segbook.backbones.images import load_image

        image = load_image(image)
    arr = np.asarray(image)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    return t / 255.0 if arr.dtype == np.uint8 else t


@torch.no_grad()
def backbone_features(backbone, images: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """``(B, 3, H, W)`` in ``[0, 1]`` (sides multiples of the stride) -> ``(B, C, H/s, W/s)``
    float32 on the images' device."""
    if images.ndim == 3:
        images = images[None]
    B, _, H, W = images.shape
    s = feature_stride(backbone, layer)
    if getattr(backbone, "family", None) == "vit":
        if H % s or W % s:
            raise ValueError(f"image {H} x {W} is not a multiple of the patch size {s}")
        mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std).view(1, 3, 1, 1)
        x = ((images.cpu().float() - mean) / std).to(backbone.device, backbone.dtype)
        tokens = backbone.model.forward_features(x)[:, backbone.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(B, -1, H // s, W // s).float().to(images.device)
    from segbook.backbones.images import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = ((images.cpu().float() - mean) / std).to(backbone.device, backbone.dtype)
    module = backbone._modules_by_name[_layer(backbone, layer)][0]
    out = {}

    def hook(_m, _i, o):
        out["x"] = o.detach().float()
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        backbone._run(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return out["x"].to(images.device)


def lowres_tokens(backbone, image, scale: float = 0.5, layer: str | None = None,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """The low-resolution tokens of one image: the backbone's features of the image resized to
    ``scale`` of its size (or to ``size``), each side rounded to the stride. ``(C, h, w)``.

    This is how chapter 04 defines "low-res" for every upsampler (JAFAR's training pairs: the
    image bilinearly resized to ``U(0.25, 0.5)`` of its size, JAFAR's code).
    """
    x = image_tensor(image)
    s = feature_stride(backbone, layer)
    H, W = x.shape[-2:]
    if size is None:
        size = (round_to_stride(H * scale, s), round_to_stride(W * scale, s))
    small = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)
    return backbone_features(backbone, small.clamp(0, 1), layer)[0]
