"""Vision transformers (DINOv3, DINO, CLIP, MAE, and a random miniature) through timm.

What the papers read from a ViT, and how this module gets it:

* **Paper 2** (section 3.2, appendix B.1): every head of every self-attention layer of DINO
  ViT-S/16, CLIP ViT-B/16 and MAE ViT-B/16, as affinities; images resized to a short side
  of 448 px (learned position embeddings interpolated bicubically), MAE at 224 x 224 (the
  graphs then upsample its Q/K maps). Its public code drops the CLS token before the
  softmax: the maps here are over patch tokens only unless ``prefix="keep"``.
* **EASe** (section 4.2): DINOv3 ViT-L/16 patch features with the longest side resized to
  640 px, aspect ratio kept; DINOv3 has a CLS token and 4 register tokens and rotary
  position embeddings (RoPE), so any grid works without interpolation.

Capture uses timm's own modules and hook points: a forward pre-hook on each block's
attention module reads the rotary embedding the block passes in, a forward hook on its
``qkv`` projection reads the projections the model computed (then the module's own
``q_norm``/``k_norm`` and timm's ``apply_rot_embed_cat`` give exactly the queries and keys
the attention used), and forward hooks on the blocks and the final norm read features.
Models are built with ``dynamic_img_size=True``, timm's switch that resamples learned
position embeddings (bicubic) to the input's patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from segbook.backbones.base import Backbone, Capture, LayerCapture
from segbook.backbones.capture import (
    CaptureOptions,
    as_image_tensor,
    capture_memory_bytes,
    module_fingerprint,
    record_attention,
    select_layer_names,
    weights_fingerprint,
)
from segbook.backbones.weights import resolve_weights
from segbook.errors import MissingWeightsError

RESIZE_RULES = ("longest", "shortest", "exact")


@dataclass(frozen=True)
class ViTSpec:
    """How a registry name maps onto timm and the hub, and the paper's input rule.

    Attributes
    ----------
    timm_name : timm architecture with pretrained tag (``"vit_large_patch16_dinov3.lvd1689m"``).
    hub_id : the Hugging Face repository holding ``weight_file`` (timm's own copy).
    resize, size : the input rule: ``"longest"`` side = size (EASe, 640), ``"shortest"``
        side = size (paper 2, 448), or ``"exact"`` size x size (MAE, 224); each side is then
        rounded to a multiple of the patch size.
    weight_file : the file inside the repository.
    model_kwargs : extra timm arguments (the miniature's depth and width).
    """

    timm_name: str
    hub_id: str | None
    resize: str
    size: int
    weight_file: str = "model.safetensors"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


VIT_SPECS: dict[str, ViTSpec] = {
    "dinov3-vits16": ViTSpec("vit_small_patch16_dinov3.lvd1689m",
                             "timm/vit_small_patch16_dinov3.lvd1689m", "longest", 640),
    "dinov3-vitb16": ViTSpec("vit_base_patch16_dinov3.lvd1689m",
                             "timm/vit_base_patch16_dinov3.lvd1689m", "longest", 640),
    "dinov3-vitl16": ViTSpec("vit_large_patch16_dinov3.lvd1689m",
                             "timm/vit_large_patch16_dinov3.lvd1689m", "longest", 640),
    "dino-vits16": ViTSpec("vit_small_patch16_224.dino",
                           "timm/vit_small_patch16_224.dino", "shortest", 448),
    "clip-vitb16": ViTSpec("vit_base_patch16_clip_224.openai",
                           "timm/vit_base_patch16_clip_224.openai", "shortest", 448),
    "mae-vitb16": ViTSpec("vit_base_patch16_224.mae",
                          "timm/vit_base_patch16_224.mae", "exact", 224),
    # DINOv3's class (RoPE, CLS + 4 registers) at width 32, depth 3, 2 heads: 63 k parameters.
    "tiny-vit": ViTSpec("vit_small_patch16_dinov3", None, "longest", 128,
                        model_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2}),
    # CLIP's and MAE's ViT classes (CLIP: pre-norm, QuickGELU-free timm variant; MAE: the
    # plain ViT) at width 32, depth 3, 2 heads: paper 2's two backbones without public code
    # that runs, testable offline (paper 2's input rules: short side 448 / exact 224).
    "tiny-clip": ViTSpec("vit_base_patch16_clip_224", None, "shortest", 128,
                         model_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2}),
    "tiny-mae": ViTSpec("vit_base_patch16_224", None, "exact", 64,
                        model_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2}),
}


class _StopForward(Exception):
    """Raised by a hook once every selected layer has been read."""


class ViTBackbone(Backbone):
    """A timm ViT read through forward hooks.

    Build it with :func:`load_vit` (or ``load_backbone("dinov3-vitl16")``, ...).

    Attributes
    ----------
    model : the timm model (``dynamic_img_size=True``, no classifier head).
    patch_size, num_prefix_tokens : 16; 1 (CLS) or 5 (CLS + 4 registers, DINOv3).
    resize, size : the default input rule (see :class:`ViTSpec`).
    mean, std : the normalisation the weights were trained with (from timm's config).
    """

    family = "vit"

    def __init__(self, name: str, model: torch.nn.Module, *, device: torch.device,
                 dtype: torch.dtype, pretrained: bool, fingerprint: str, resize: str,
                 size: int):
        if resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {resize!r}")
        self.name = name
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pretrained = pretrained
        self.fingerprint = fingerprint
        self.resize = resize
        self.size = int(size)
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        for block in model.blocks:
            attn = block.attn
            if getattr(attn, "qkv", None) is None or getattr(attn, "q_bias", None) is not None:
                raise ValueError(f"{name}: only attention with one fused qkv projection "
                                 "(timm Attention / EvaAttention without q_bias) is supported")

    # ---- geometry --------------------------------------------------------------------

    def input_size(self, height: int, width: int, size: int | tuple[int, int] | None = None,
                   resize: str | None = None) -> tuple[int, int]:
        """Model input ``(h, w)`` for an image of ``height x width`` under the resize rule.

        ``size`` may be ``(h, w)`` for an exact size. Each side is rounded to the nearest
        multiple of the patch size (at least one patch).
        """
        resize = resize or self.resize
        size = self.size if size is None else size
        if resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {resize!r}")
        if isinstance(size, (tuple, list)):
            h, w = float(size[0]), float(size[1])
        elif resize == "exact":
            h = w = float(size)
        else:
            side = max(height, width) if resize == "longest" else min(height, width)
            h, w = height * size / side, width * size / side
        p = self.patch_size
        return max(p, round(h / p) * p), max(p, round(w / p) * p)

    def layers(self, image_size: tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
        """``blocks.i`` (self-attention + block output) and ``norm`` (final features) with
        their patch grids for a model input of ``image_size`` ``(h, w)`` pixels (default:
        the resize rule applied to a square image)."""
        if image_size is None:
            image_size = self.input_size(self.size, self.size)
        h, w = image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {image_size} is not a multiple of {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        table: dict[str, dict[str, Any]] = {}
        for i, block in enumerate(self.model.blocks):
            attn = block.attn
            table[f"blocks.{i}"] = {"kind": "self_attention", "grid": grid,
                                    "heads": attn.num_heads,
                                    "channels": attn.qkv.out_features // 3}
        table["norm"] = {"kind": "features", "grid": grid, "heads": 1,
                         "channels": self.model.num_features}
        return table

    def layer_groups(self) -> dict[str, list[str]]:
        """``"all"`` (every block), ``"last"`` (the last block)."""
        blocks = [f"blocks.{i}" for i in range(len(self.model.blocks))]
        return {"all": blocks, "last": blocks[-1:]}

    def preprocess(self, image, size=None, resize: str | None = None) -> torch.Tensor:
        """``(1, 3, h, w)`` normalised model input (bicubic, antialiased resize)."""
        x = as_image_tensor(image)
        h, w = self.input_size(x.shape[-2], x.shape[-1], size, resize)
        x = x[None]
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(device=self.device, dtype=self.dtype)

    # ---- capture -----------------------------------------------------------------------

    @torch.no_grad()
    def capture(self, image, layers=None, *, resolution=None, kind=None,
                size: int | tuple[int, int] | None = None, resize: str | None = None,
                prefix: str = "drop", options: CaptureOptions | None = None,
                **option_overrides) -> Capture:
        """Read self-attention, Q/K/V and features of the selected blocks for one image.

        Parameters
        ----------
        image : ``(H, W, 3)`` uint8 array, PIL image, tensor or path.
        layers : None (``"all"`` blocks), ``"last"``, ``"blocks.i"``, ``"norm"`` (the final
            normed patch features, kind ``"features"``) or a list of these.
        resolution, kind : further filters (the grid side; ``"self_attention"``/``"features"``).
        size, resize : the input rule (default: the spec's, e.g. longest side 640 for
            DINOv3, short side 448 for DINO/CLIP, 224 x 224 for MAE).
        prefix : ``"drop"`` (default) removes CLS and register tokens from queries and keys
            before the softmax, so maps are ``N x N`` over patches and rows sum to 1;
            ``"keep"`` keeps them in front (``LayerCapture.prefix_tokens`` says how many).
        options, option_overrides : see :class:`~segbook.backbones.capture.CaptureOptions`
            (``heads="none"``, ``logits=True``, ``qkv=True``, ``features=True``,
            ``dtype=torch.float32``, ...). A block's ``features`` are its output patch tokens
            (``(C, h, w)``; CLS and registers are never in ``features``).
            Cost for DINOv3 ViT-L/16 at 640 x 640 (1600 patches, 24 layers, 16 heads):
            4.9 MiB per head-reduced float16 map, 117 MiB for all layers; 1.8 GiB with
            heads kept.

        Returns
        -------
        Capture with ``meta`` holding the model input size, grid and prefix handling.
        """
        if prefix not in ("drop", "keep"):
            raise ValueError(f"prefix must be 'drop' or 'keep', got {prefix!r}")
        opts = CaptureOptions.build(options, **option_overrides)
        pixels = as_image_tensor(image)
        x = self.preprocess(pixels, size, resize)
        input_hw = tuple(x.shape[-2:])
        table = self.layers(input_hw)
        names = select_layer_names(table, layers, resolution, kind, self.layer_groups(),
                                   default="all")
        grid = table[names[0]]["grid"]
        npt = self.num_prefix_tokens
        keep_prefix = prefix == "keep"
        results: dict[str, LayerCapture] = {}
        pending_rope: dict[int, Any] = {}
        handles = []
        last_needed = max((int(n.split(".")[1]) for n in names if n.startswith("blocks.")),
                          default=None)
        modules = self.model

        def on_attention_call(index):
            def hook(_module, args, kwargs):
                pending_rope[index] = kwargs.get("rope")  # EvaBlock passes it by keyword
            return hook

        def on_qkv(index, name):
            attn = modules.blocks[index].attn

            def hook(_module, _inputs, out):
                batch, tokens, _ = out.shape
                qkv = out.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                q, k = attn.q_norm(q), attn.k_norm(k)
                rope = pending_rope.pop(index, None)
                if rope is not None:
                    from timm.layers import apply_rot_embed_cat
                    p = getattr(attn, "num_prefix_tokens", npt)
                    half = getattr(attn, "rotate_half", False)
                    q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)],
                                  dim=2).type_as(v)
                    k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)],
                                  dim=2).type_as(v)
                start = 0 if keep_prefix else npt
                results[name] = record_attention(
                    name, grid, q[0, :, start:], k[0, :, start:], v[0, :, start:], opts,
                    scale=getattr(attn, "scale", None), prefix_tokens=npt if keep_prefix else 0)
            return hook

        def on_block_output(index, name):
            def hook(_module, _inputs, out):
                if opts.features:
                    tokens = out[0]
                    results[name] = _with_features(results[name], tokens[npt:], grid, opts)
                if index == last_needed and "norm" not in names:
                    raise _StopForward
            return hook

        def on_norm(_module, _inputs, out):
            tokens = out[0][npt:]
            results["norm"] = LayerCapture(
                name="norm", kind="features", grid=grid, heads=1, reduction="none",
                features=_tokens_to_features(tokens, grid, opts))

        try:
            for name in names:
                if name == "norm":
                    handles.append(self.model.norm.register_forward_hook(on_norm))
                    continue
                index = int(name.split(".")[1])
                block = self.model.blocks[index]
                handles.append(block.attn.register_forward_pre_hook(
                    on_attention_call(index), with_kwargs=True))
                handles.append(block.attn.qkv.register_forward_hook(on_qkv(index, name)))
                handles.append(block.register_forward_hook(on_block_output(index, name)))
            try:
                self.model.forward_features(x)
            except _StopForward:
                pass
        finally:
            for handle in handles:
                handle.remove()

        return Capture(
            backbone=self.name, image_size=tuple(pixels.shape[-2:]),
            layers={n: results[n] for n in names},
            meta={"model_input_size": input_hw, "grid": grid, "prefix": prefix,
                  "num_prefix_tokens": npt, "resize": resize or self.resize,
                  "size": size if size is not None else self.size,
                  "model_dtype": str(self.dtype), "store_dtype": str(opts.dtype),
                  "heads": opts.heads, "fingerprint": self.fingerprint,
                  "options": {k: (str(v) if isinstance(v, torch.dtype) else v)
                              for k, v in opts.__dict__.items()}})

    def memory_estimate(self, layers=None, options: CaptureOptions | None = None,
                        image_size: tuple[int, int] | None = None, **overrides) -> int:
        """Bytes a capture of ``layers`` keeps at model input ``image_size``."""
        opts = CaptureOptions.build(options, **overrides)
        table = self.layers(image_size)
        names = select_layer_names(table, layers, groups=self.layer_groups(), default="all")
        return capture_memory_bytes([table[n] for n in names], opts)


def _tokens_to_features(tokens: torch.Tensor, grid, opts: CaptureOptions) -> torch.Tensor:
    h, w = grid
    device = tokens.device if opts.keep_on_device else torch.device("cpu")
    return tokens.detach().transpose(0, 1).reshape(-1, h, w).to(dtype=opts.dtype, device=device)


def _with_features(layer: LayerCapture, tokens: torch.Tensor, grid, opts) -> LayerCapture:
    layer.features = _tokens_to_features(tokens, grid, opts)
    return layer


# --------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------

def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_vit(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             spec: ViTSpec | None = None, seed: int = 0) -> ViTBackbone:
    """Load a registry ViT (or any :class:`ViTSpec`).

    Pretrained specs resolve ``spec.hub_id`` through
    :func:`segbook.backbones.weights.resolve_weights` (put timm's ``model.safetensors``
    under ``$SEGBOOK_WEIGHTS/<hub_id>/``) and load it with timm; a spec with
    ``hub_id=None`` is random-initialised with ``seed``.

    Raises
    ------
    ValueError : for an unknown name.
    MissingWeightsError : naming the hub id when the weights are absent or do not load.
    """
    import timm

    if spec is None:
        if name not in VIT_SPECS:
            raise ValueError(f"unknown ViT '{name}'; known: {', '.join(VIT_SPECS)}")
        spec = VIT_SPECS[name]
    kwargs = dict(spec.model_kwargs, dynamic_img_size=True, num_classes=0)
    if spec.hub_id is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        fingerprint = module_fingerprint(model)
        pretrained = False
    else:
        root = resolve_weights(spec.hub_id, allow_patterns=[spec.weight_file])
        weight_path = root / spec.weight_file
        try:
            model = timm.create_model(spec.timm_name, pretrained=True,
                                      pretrained_cfg_overlay={"file": str(weight_path),
                                                              "source": ""}, **kwargs)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise MissingWeightsError(spec.hub_id, f"Weights for '{spec.hub_id}' were found at "
                                      f"{weight_path} but do not load into timm's "
                                      f"'{spec.timm_name}' ({type(exc).__name__}: {exc}).") from exc
        fingerprint = weights_fingerprint(root, [spec.weight_file])
        pretrained = True
    return ViTBackbone(name, model, device=torch.device(device),
                       dtype=_default_dtype(device, dtype) if pretrained else (dtype or torch.float32),
                       pretrained=pretrained, fingerprint=fingerprint, resize=spec.resize,
                       size=spec.size)


def _loader(name: str):
    def load(device: torch.device | str = "cpu", dtype: torch.dtype | None = None, **kwargs):
        return load_vit(name, device=device, dtype=dtype, **kwargs)
    load.__name__ = "load_" + name.replace("-", "_")
    load.__doc__ = f"``{name}``: {VIT_SPECS[name].timm_name} (see :func:`load_vit`)."
    return load


load_dinov3_vits16 = _loader("dinov3-vits16")
load_dinov3_vitb16 = _loader("dinov3-vitb16")
load_dinov3_vitl16 = _loader("dinov3-vitl16")
load_dino_vits16 = _loader("dino-vits16")
load_clip_vitb16 = _loader("clip-vitb16")
load_mae_vitb16 = _loader("mae-vitb16")
load_tiny_vit = _loader("tiny-vit")
load_tiny_clip = _loader("tiny-clip")
load_tiny_mae = _loader("tiny-mae")
