"""Stable Diffusion 1.4 (and a random miniature of it) as a backbone: self-attention, Q/K/V, features.

What the papers read from the U-Net, and how this module gets it:

* **Paper 1** (section 3.1): DDIM-invert the image for 10 of 50 steps, run one denoising
  step, sum the heads of the self-attention (``attn1``) maps of the *decoder*, whose four
  resolutions are 8, 16, 32 and 64 (the 8 x 8 map lives in the mid block: SD 1.4's
  lowest up block has no attention). ``capture(image, mode="inverted")``.
* **DiffSeg** (the aggregation paper 1 reuses): one pass at t = 300 on the clean latent,
  all 16 ``attn1`` layers. ``capture(image, layers="all", mode="clean", t=300)``.
* **Paper 2** (sections 3.2-3.3, appendix B): every head of every ``attn1`` layer, with the
  image noised at a random t in {0..250} per forward pass; the pre-softmax ``Q K^T /
  sqrt(d)`` on request; Q, K, V for the dataset-level graphs (mid and first up blocks).
  ``capture(image, layers="all", mode="noised", heads="none")``.
* **DiffCut** on SD 1.4: the ``attn1`` output of the last transformer of
  ``down_blocks[-2]`` at t = 50 with fixed-seed noise:
  ``capture(image, layers="down_blocks.2.attentions.1", mode="noised", t=50, features=True)``.

Every ``attn1`` module gets a :class:`RecordingAttnProcessor` (``unet.set_attn_processor``)
that wraps the processor the model had: the wrapped processor computes the layer exactly
as before, while forward hooks on ``to_q``/``to_k``/``to_v`` hand the projections it used
to the recorder. The original processors are put back after every capture. Block outputs
(``down_blocks.i``, ``mid_block``, ``up_blocks.i``; kind ``"features"``) come from forward
hooks. Memory: see :class:`segbook.backbones.capture.CaptureOptions` and
:func:`sd14_memory_table`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from segbook.backbones.base import Backbone, Capture, LayerCapture
from segbook.backbones.capture import (
    CaptureOptions,
    as_image_tensor,
    capture_memory_bytes,
    format_bytes,
    module_fingerprint,
    record_attention,
    select_layer_names,
    weights_fingerprint,
)
from segbook.backbones.ddim import ddim_invert, ddim_sample
from segbook.backbones.weights import resolve_weights
from segbook.errors import MissingWeightsError

SD14_HUB_ID = "CompVis/stable-diffusion-v1-4"

#: The files of the hub repository that a capture needs (safetensors only; about 2.2 GB in
#: float16 on disk, 4.3 GB in float32). The tokenizer is not among them: a capture only
#: ever encodes the empty prompt, whose ids the loader builds without it (see
#: :meth:`StableDiffusionBackbone.empty_prompt_embedding`).
SD_WEIGHT_FILES = [
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "scheduler/scheduler_config.json",
]

#: Files that are used when present and not needed otherwise: CLIP's tokenizer.
SD_OPTIONAL_FILES = ["tokenizer/vocab.json", "tokenizer/merges.txt"]

#: CLIP's BPE vocabulary size and the ids of its ``<|startoftext|>`` and ``<|endoftext|>``
#: tokens. SD 1.x's ``text_encoder/config.json`` says ``bos_token_id: 0, eos_token_id: 2``
#: (a transformers default of 2022, see transformers PR #24773), not the ids its tokenizer
#: emits, so the empty prompt cannot be built from the config alone.
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407

#: SD 1.4's U-Net differs from diffusers' ``UNet2DConditionModel`` defaults only here.
SD14_UNET_CONFIG = {"sample_size": 64, "cross_attention_dim": 768}

MODES = ("clean", "noised", "inverted")
DIFFSEG_TIMESTEP = 300          # DiffSeg: one pass at t = 300 on the clean latent
PAPER2_MAX_TIMESTEP = 250       # paper 2: t ~ U{0..250} per forward pass
DIFFCUT_TIMESTEP = 50           # DiffCut: one pass at t = 50 on the noised latent
DIFFCUT_SEED = 42               # DiffCut's fixed noise seed (its generator is on the GPU, ours
                                # on the CPU: the same rule, not the same numbers)


def table7_timestep(step: int, num_inference_steps: int = 50, scheduler=None) -> int:
    """The U-Net timestep at which paper 1's supplement Table 7 reads attention for "step s".

    Paper 1 (section 3.1) DDIM-inverts the image for 10 of 50 steps and reads the attention
    at the timestep reached, i.e. at step 40 of the 50-step denoising schedule (timestep 181
    with SD 1.4's DDIM schedule 981, 961, ..., 1). Its supplement's Table 7 varies "the step"
    without saying how a step becomes a timestep. We read step ``s`` as index ``s`` of the
    ``num_inference_steps``-step DDIM denoising schedule (``scheduler.timesteps[s]``), so
    step 40 -> 181 as in the main text, reached by ``num_inference_steps - s`` inversion steps
    (:func:`table7_capture_kwargs`). Other readings (``s`` inversion steps; a 1000-step index)
    are possible; this one is the only one that reproduces the main text's setting.

    Parameters
    ----------
    step : ``0 <= step < num_inference_steps``.
    num_inference_steps : length of the DDIM schedule (50 in paper 1).
    scheduler : a diffusers scheduler (default: :func:`sd_scheduler`, SD 1.4's DDIM).

    >>> table7_timestep(40), table7_timestep(0), table7_timestep(49)
    (181, 981, 1)
    """
    if isinstance(step, bool) or int(step) != step or not 0 <= step < num_inference_steps:
        raise ValueError(f"step must be an integer in [0, {num_inference_steps}), got {step!r}")
    scheduler = scheduler or sd_scheduler()
    scheduler.set_timesteps(int(num_inference_steps))
    return int(scheduler.timesteps[int(step)])


def table7_capture_kwargs(step: int, inversion: bool = True,
                          num_inference_steps: int = 50) -> dict[str, Any]:
    """``capture`` keyword arguments for one row of paper 1's supplement Table 7.

    With ``inversion``: DDIM inversion for ``num_inference_steps - step`` steps (the U-Net is
    then called at :func:`table7_timestep`); without: the clean latent at that timestep
    (DiffSeg's way; the paper does not say how its "no inversion" rows were made).
    """
    t = table7_timestep(step, num_inference_steps)
    if inversion:
        if step == 0:
            raise ValueError("step 0 needs num_inference_steps inversion steps and no denoising "
                             "is left; use step >= 1")
        return {"mode": "inverted", "inversion_steps": num_inference_steps - int(step),
                "num_inference_steps": num_inference_steps}
    return {"mode": "clean", "t": t}


# --------------------------------------------------------------------------------------
# recording through diffusers attention processors
# --------------------------------------------------------------------------------------

class _Recorder:
    """Collects :class:`LayerCapture` objects from the processors and block hooks."""

    def __init__(self, grids: dict[str, tuple[int, int]], options: CaptureOptions):
        self.grids = grids
        self.options = options
        self.layers: dict[str, LayerCapture] = {}

    def wants(self, name: str) -> bool:
        return name in self.grids

    def record_attention(self, name: str, attn, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor) -> None:
        heads = attn.heads
        batch, tokens, inner = q.shape
        if batch != 1:
            raise ValueError("capture reads one image at a time (batch of 1)")
        d = inner // heads
        q = q.view(batch, tokens, heads, d).transpose(1, 2)
        k = k.view(batch, tokens, heads, d).transpose(1, 2)
        v = v.view(batch, tokens, heads, d).transpose(1, 2)
        # the model's own normalisations, when the layer has them (SD 1.4's have none)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        grid = self.grids[name]
        features = out[0] if out.ndim == 3 else out[0].flatten(1).transpose(0, 1)
        self.layers[name] = record_attention(
            name, grid, q[0], k[0], v[0], self.options, scale=attn.scale,
            features=features if self.options.features else None)

    def record_features(self, name: str, output: torch.Tensor) -> None:
        fmap = output[0].detach()
        store = {"dtype": self.options.dtype,
                 "device": fmap.device if self.options.keep_on_device else "cpu"}
        self.layers[name] = LayerCapture(name=name, kind="features",
                                         grid=(int(fmap.shape[-2]), int(fmap.shape[-1])),
                                         features=fmap.to(**store), heads=1, reduction="none")


class RecordingAttnProcessor:
    """A diffusers attention processor that runs ``inner`` unchanged and records its Q, K, V.

    ``inner`` is the processor the layer had (``AttnProcessor2_0`` for SD 1.4); the layer's
    output is exactly what ``inner`` returns. While ``inner`` runs, forward hooks on the
    layer's ``to_q``, ``to_k`` and ``to_v`` keep the projections it computed; after it
    returns, the recorder turns them into maps (one head at a time) and drops them.
    """

    def __init__(self, inner, name: str, recorder: _Recorder):
        self.inner = inner
        self.name = name
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if not self.recorder.wants(self.name):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              *args, **kwargs)
        seen: dict[str, torch.Tensor] = {}
        handles = [getattr(attn, proj).register_forward_hook(
            lambda _m, _i, out, key=proj: seen.__setitem__(key, out.detach()))
            for proj in ("to_q", "to_k", "to_v")]
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                             *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        self.recorder.record_attention(self.name, attn, seen["to_q"], seen["to_k"],
                                       seen["to_v"], out.detach())
        return out


# --------------------------------------------------------------------------------------
# the backbone
# --------------------------------------------------------------------------------------

class StableDiffusionBackbone(Backbone):
    """Stable Diffusion's U-Net, VAE and text encoder, read through attention processors.

    Build it with :func:`load_sd14` / :func:`load_tiny_sd` (or ``load_backbone("sd14")``).

    Attributes
    ----------
    unet, vae, text_encoder, scheduler : the diffusers / transformers components.
    image_size : the default model input side in pixels (512 for SD 1.4, as in DiffSeg,
        paper 1 and paper 2; 256 for ``tiny-sd``).
    """

    family = "diffusion"

    def __init__(self, name: str, unet, vae, text_encoder, scheduler, tokenizer=None, *,
                 device: torch.device, dtype: torch.dtype, pretrained: bool, fingerprint: str,
                 image_size: int = 512):
        self.name = name
        self.unet = _place(unet, device, dtype)
        self.vae = _place(vae, device, dtype)
        self.text_encoder = _place(text_encoder, device, dtype)
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.pretrained = pretrained
        self.fingerprint = fingerprint
        self.image_size = int(image_size)
        self._empty_prompt: torch.Tensor | None = None
        self._attn_names = [n[: -len(".processor")] for n in self.unet.attn_processors
                            if n.endswith("attn1.processor")]
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)

    # ---- geometry --------------------------------------------------------------------

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 for SD 1.4)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_factor(self) -> int:
        """How much the U-Net shrinks its latent at the bottom (8 for SD 1.4: 64 -> 8)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _scale_of(self, name: str) -> int:
        """Downsampling factor, relative to the latent, at which a layer works."""
        levels = len(self.unet.config.block_out_channels)
        parts = name.split(".")
        if parts[0] == "mid_block":
            return 2 ** (levels - 1)
        index = int(parts[1])
        if parts[0] == "down_blocks":
            return 2 ** index
        return 2 ** (levels - 1 - index)  # up_blocks

    def _block_output_scale(self, name: str) -> int:
        levels = len(self.unet.config.block_out_channels)
        if name == "mid_block":
            return 2 ** (levels - 1)
        kind, index = name.split(".")
        index = int(index)
        if kind == "down_blocks":
            return 2 ** min(index + 1, levels - 1)
        return 2 ** max(levels - 2 - index, 0)  # up_blocks upsample except the last

    def layers(self, image_size: int | tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
        """Layer name -> ``{"kind", "grid", "heads", "channels"}`` at ``image_size`` pixels
        (default: :attr:`image_size`). ``attn1`` layers come first, in the U-Net's order
        (down, up, mid, as diffusers lists them), then the block outputs."""
        h, w = self._input_hw(image_size)
        lh, lw = h // self.vae_factor, w // self.vae_factor
        modules = dict(self.unet.named_modules())
        table: dict[str, dict[str, Any]] = {}
        for name in self._attn_names:
            s = self._scale_of(name)
            attn = modules[name]
            table[name] = {"kind": "self_attention", "grid": (lh // s, lw // s),
                           "heads": attn.heads, "channels": attn.to_q.out_features}
        for name in self._block_names():
            s = self._block_output_scale(name)
            block = modules[name]
            channels = _block_out_channels(block)
            table[name] = {"kind": "features", "grid": (lh // s, lw // s), "heads": 1,
                           "channels": channels}
        return table

    def _block_names(self) -> list[str]:
        names = [f"down_blocks.{i}" for i in range(len(self.unet.down_blocks))]
        names.append("mid_block")
        names += [f"up_blocks.{i}" for i in range(len(self.unet.up_blocks))]
        return names

    def layer_groups(self) -> dict[str, list[str]]:
        """Named selections: ``"decoder"`` (mid + up ``attn1``, paper 1), ``"all"`` (all
        ``attn1``, DiffSeg and paper 2), ``"encoder"``, ``"mid"``, ``"blocks"`` (outputs)."""
        attn = self._attn_names
        return {
            "decoder": [n for n in attn if n.startswith(("mid_block", "up_blocks"))],
            "all": list(attn),
            "encoder": [n for n in attn if n.startswith("down_blocks")],
            "mid": [n for n in attn if n.startswith("mid_block")],
            "blocks": self._block_names(),
        }

    def diffcut_layer(self) -> str:
        """DiffCut's layer for SD 1.x: the ``attn1`` of the last transformer of
        ``down_blocks[-2]`` (``PaulCouairon/DiffCut``, ``tools/ldm.py``; SSD-1B uses
        ``down_blocks[-1]``). Its grid is 16 x 16 at 512 px and 32 x 32 at 1024 px, the size
        DiffCut's code resizes every image to."""
        prefix = f"down_blocks.{len(self.unet.down_blocks) - 2}."
        names = [n for n in self._attn_names if n.startswith(prefix)]
        if not names:
            raise ValueError(f"{self.name}: {prefix[:-1]} has no self-attention layer for "
                             "DiffCut's features")
        return names[-1]

    def _diffcut_layer_or_none(self) -> str | None:
        try:
            return self.diffcut_layer()
        except ValueError:
            return None

    def diffcut_capture_kwargs(self, size: int | tuple[int, int] | None = None) -> dict[str, Any]:
        """``capture`` keyword arguments for DiffCut's features (Couairon et al., NeurIPS 2024):
        :meth:`diffcut_layer`'s output, one U-Net pass at t = 50 on the latent noised with a
        fixed seed. ``size``: model input (None: :attr:`image_size`)."""
        out = {"layers": self.diffcut_layer(), "mode": "noised", "t": DIFFCUT_TIMESTEP,
               "seed": DIFFCUT_SEED, "features": True}
        if size is not None:
            out["size"] = size
        return out

    def _input_hw(self, size) -> tuple[int, int]:
        if size is None:
            size = self.image_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        multiple = self.vae_factor * self.unet_factor
        if h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"{self.name}: the input size must be a positive multiple of "
                             f"{multiple} px on both sides (VAE x{self.vae_factor}, U-Net "
                             f"x{self.unet_factor}), got {h} x {w}")
        return h, w

    # ---- the pieces of the pipeline --------------------------------------------------

    def preprocess(self, image, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """An image as the VAE's input: ``(1, 3, h, w)`` in ``[-1, 1]`` at ``size`` pixels
        (bicubic, antialiased; the aspect ratio is not kept, as in DiffSeg and paper 2)."""
        h, w = self._input_hw(size)
        x = as_image_tensor(image)[None]
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
        return (x * 2 - 1).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, image, size: int | tuple[int, int] | None = None,
               sample_posterior: bool = False, seed: int = 0) -> torch.Tensor:
        """The clean latent ``z0 = scaling_factor * E(x)``, ``(1, 4, h/8, w/8)``.

        ``sample_posterior=False`` takes the mean of the VAE's posterior (deterministic);
        True draws from it with ``seed``.
        """
        x = self.preprocess(image, size)
        dist = self.vae.encode(x).latent_dist
        if sample_posterior:
            g = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn(dist.mean.shape, generator=g).to(dist.mean)
            z = dist.mean + dist.std * noise
        else:
            z = dist.mean
        z = z * self.vae.config.scaling_factor
        if not torch.isfinite(z).all():
            raise FloatingPointError(f"{self.name}: the VAE produced non-finite latents "
                                     f"(dtype {self.dtype}); try dtype=torch.float32")
        return z

    @torch.no_grad()
    def empty_prompt_embedding(self) -> torch.Tensor:
        """The text encoder's output for the empty prompt, ``(1, 77, D)`` (cached).

        With a tokenizer this is ``tokenizer("")`` padded to its maximum length. Without
        one the same ids are built by hand: begin-of-text, then end-of-text up to the
        maximum length (SD 1.x's tokenizer pads with end-of-text). For CLIP's vocabulary
        (:data:`CLIP_VOCAB_SIZE`, SD 1.4) the ids are CLIP's own (:data:`CLIP_BOS_ID`,
        :data:`CLIP_EOS_ID`), since SD 1.4's text-encoder config carries other ones; for
        any other vocabulary (``tiny-sd``) they are the config's.
        """
        if self._empty_prompt is None:
            cfg = self.text_encoder.config
            if self.tokenizer is not None:
                ids = self.tokenizer("", padding="max_length", truncation=True,
                                     max_length=self.tokenizer.model_max_length,
                                     return_tensors="pt").input_ids
            else:
                bos, eos = ((CLIP_BOS_ID, CLIP_EOS_ID) if cfg.vocab_size == CLIP_VOCAB_SIZE
                            else (cfg.bos_token_id, cfg.eos_token_id))
                length = cfg.max_position_embeddings
                ids = torch.full((1, length), eos, dtype=torch.long)
                ids[0, 0] = bos
            self._empty_prompt = self.text_encoder(ids.to(self.device))[0].to(self.dtype)
        return self._empty_prompt

    def predict_noise(self, latent: torch.Tensor, t: int) -> torch.Tensor:
        """One U-Net call with the empty prompt: ``eps(latent, t)``."""
        cond = self.empty_prompt_embedding()
        timestep = torch.tensor([int(t)], device=self.device)
        return self.unet(latent.to(self.dtype), timestep, encoder_hidden_states=cond).sample

    def invert(self, latent: torch.Tensor, num_inference_steps: int = 50, num_steps: int = 10,
               progress: bool = True) -> tuple[torch.Tensor, list[int]]:
        """DDIM inversion (see :func:`segbook.backbones.ddim.ddim_invert`)."""
        return ddim_invert(self.predict_noise, self.scheduler, latent, num_inference_steps,
                           num_steps, progress)

    def sample(self, latent: torch.Tensor, timesteps: list[int], progress: bool = True
               ) -> torch.Tensor:
        """DDIM sampling down ``timesteps`` (see :func:`segbook.backbones.ddim.ddim_sample`)."""
        return ddim_sample(self.predict_noise, self.scheduler, latent, timesteps, progress)

    # ---- capture -----------------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self, recorder: _Recorder):
        """Install recording processors and block hooks for the duration of the block."""
        original = self.unet.attn_processors
        wrapped = {}
        for key, processor in original.items():
            name = key[: -len(".processor")]
            wrapped[key] = (RecordingAttnProcessor(processor, name, recorder)
                            if name in recorder.grids else processor)
        modules = dict(self.unet.named_modules())
        handles = []
        for name in self._block_names():
            if recorder.wants(name):
                handles.append(modules[name].register_forward_hook(
                    lambda _m, _i, out, key=name: recorder.record_features(
                        key, out[0] if isinstance(out, tuple) else out)))
        self.unet.set_attn_processor(wrapped)
        try:
            yield recorder
        finally:
            self.unet.set_attn_processor(original)
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def capture(self, image, layers=None, *, resolution=None, kind=None, mode: str = "clean",
                t: int | None = None, num_inference_steps: int = 50, inversion_steps: int = 10,
                seed: int = 0, size: int | tuple[int, int] | None = None,
                options: CaptureOptions | None = None, progress: bool = True,
                **option_overrides) -> Capture:
        """Read self-attention (and Q/K/V, features) of the selected U-Net layers for one image.

        Parameters
        ----------
        image : ``(H, W, 3)`` uint8 array, PIL image, tensor or path (see
            :func:`segbook.backbones.capture.as_image_tensor`); resized to ``size``.
        layers : None (``"decoder"``: mid + up ``attn1``, paper 1), a group (``"all"``,
            ``"encoder"``, ``"mid"``, ``"blocks"``), a layer name, a prefix
            (``"up_blocks.1."`` for the ``attn1`` layers inside a block; ``"up_blocks.1"``
            alone is the block's output) or a list of these; see :meth:`layers`.
        resolution : keep only layers whose grid side is in this set (e.g. ``{32, 64}``).
        kind : ``"self_attention"`` or ``"features"``.
        mode : how the U-Net input is made from the clean latent ``z0``:
            ``"clean"`` (DiffSeg): ``z0`` itself at timestep ``t`` (default 300);
            ``"noised"`` (paper 2, DiffCut): ``sqrt(a_t) z0 + sqrt(1 - a_t) eps`` with
            ``eps ~ N(0, I)`` drawn with ``seed``; ``t`` defaults to a draw from
            ``U{0..250}`` with ``seed`` (paper 2 draws a new t and new noise for every
            forward pass: call again with a new seed);
            ``"inverted"`` (paper 1): DDIM inversion for ``inversion_steps`` of
            ``num_inference_steps`` steps, then one U-Net call at the timestep reached
            (181 for 10 of 50); ``t`` must be None.
        seed : seeds the noise and the random timestep (a CPU generator: the same on any device).
        size : model input in pixels (int or ``(h, w)``), multiples of 64 for SD 1.4;
            default :attr:`image_size` (512 for SD 1.4).
        options : :class:`~segbook.backbones.capture.CaptureOptions`; keyword overrides
            (``heads="none"``, ``logits=True``, ``qkv=True``, ``features=True``,
            ``dtype=torch.float32``, ``keep_on_device=True``, ``head_chunk=8``) replace
            its fields. Defaults keep only head-averaged float16 probabilities:
            171 MiB for all 16 layers of SD 1.4 at 512 px, 102 MiB for the decoder.
        progress : show the DDIM progress bar.

        Returns
        -------
        Capture : one :class:`LayerCapture` per selected layer, in the U-Net's order, and
        ``meta`` with the mode, timestep, inversion timesteps, seed, sizes and options.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        opts = CaptureOptions.build(options, **option_overrides)
        input_hw = self._input_hw(size)
        table = self.layers(input_hw)
        names = select_layer_names(table, layers, resolution, kind, self.layer_groups(),
                                   default="decoder")
        pixels = as_image_tensor(image)
        z0 = self.encode(pixels, input_hw)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        inversion_timesteps: list[int] = []
        if mode == "clean":
            t = DIFFSEG_TIMESTEP if t is None else int(t)
            latent = z0
        elif mode == "noised":
            if t is None:
                t = int(torch.randint(0, PAPER2_MAX_TIMESTEP + 1, (1,), generator=generator))
            t = int(t)
            _check_timestep(t, self.scheduler)
            eps = torch.randn(z0.shape, generator=generator).to(z0)
            a = float(self.scheduler.alphas_cumprod[t])
            latent = (a ** 0.5) * z0 + ((1 - a) ** 0.5) * eps
        else:  # inverted
            if t is not None:
                raise ValueError("mode='inverted' picks its timestep from inversion_steps; "
                                 "leave t=None")
            latent, inversion_timesteps = self.invert(z0, num_inference_steps, inversion_steps,
                                                      progress)
            if not inversion_timesteps:
                raise ValueError("inversion_steps must be >= 1 for mode='inverted' "
                                 "(use mode='clean' for no inversion)")
            t = inversion_timesteps[-1]
        _check_timestep(t, self.scheduler)

        recorder = _Recorder({n: table[n]["grid"] for n in names}, opts)
        with self.recording(recorder):
            self.predict_noise(latent, t)
        missing = [n for n in names if n not in recorder.layers]
        if missing:  # pragma: no cover - would mean diffusers changed its call structure
            raise RuntimeError(f"{self.name}: layers were selected but never ran: {missing}")
        for n in names:
            got = recorder.layers[n].grid
            if got != tuple(table[n]["grid"]):  # pragma: no cover - geometry bookkeeping bug
                raise RuntimeError(f"layer {n}: grid {got} != expected {table[n]['grid']}")
        return Capture(
            backbone=self.name, image_size=tuple(pixels.shape[-2:]),
            layers={n: recorder.layers[n] for n in names},
            meta={"mode": mode, "timestep": int(t), "seed": int(seed),
                  "inversion_timesteps": inversion_timesteps,
                  "num_inference_steps": num_inference_steps if mode == "inverted" else None,
                  "model_input_size": input_hw, "latent_size": tuple(z0.shape[-2:]),
                  "model_dtype": str(self.dtype), "store_dtype": str(opts.dtype),
                  "heads": opts.heads, "fingerprint": self.fingerprint,
                  "diffcut_layer": self._diffcut_layer_or_none(),
                  "options": {k: (str(v) if isinstance(v, torch.dtype) else v)
                              for k, v in opts.__dict__.items()}})

    def memory_estimate(self, layers=None, options: CaptureOptions | None = None,
                        size: int | tuple[int, int] | None = None, **overrides) -> int:
        """Bytes that ``capture(..., layers=layers, size=size, **overrides)`` would keep."""
        opts = CaptureOptions.build(options, **overrides)
        table = self.layers(size)
        names = select_layer_names(table, layers, groups=self.layer_groups(), default="decoder")
        return capture_memory_bytes([table[n] for n in names], opts)


def _place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device``; cast only when the weights are not already in ``dtype``."""
    current = next(module.parameters()).dtype
    module = module.to(device=device) if current == dtype else module.to(device=device,
                                                                          dtype=dtype)
    return module.eval()


def _check_timestep(t: int, scheduler) -> None:
    n = int(scheduler.config.num_train_timesteps)
    if not 0 <= int(t) < n:
        raise ValueError(f"timestep must be in 0..{n - 1}, got {t}")


def _block_out_channels(block) -> int:
    if getattr(block, "upsamplers", None):
        return block.upsamplers[0].channels
    if getattr(block, "downsamplers", None):
        return block.downsamplers[0].out_channels
    return block.resnets[-1].out_channels


# --------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------

def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_stable_diffusion(hub_id: str = SD14_HUB_ID, *, name: str = "sd14",
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                          image_size: int = 512,
                          files: list[str] | None = None) -> StableDiffusionBackbone:
    """Load a Stable Diffusion 1.x repository laid out as on the hub, offline.

    Parameters
    ----------
    hub_id : the hub id, resolved by :func:`segbook.backbones.weights.resolve_weights`
        (``$SEGBOOK_WEIGHTS/<hub_id>/``, then the Hugging Face cache, then the hub unless
        offline).
    device, dtype : dtype defaults to float16 on CUDA, float32 on the CPU. The U-Net holds
        860 M parameters: 1.7 GB in float16.
    files : the files that must be present (default :data:`SD_WEIGHT_FILES`: U-Net, VAE,
        text encoder, scheduler). The tokenizer is optional: when ``tokenizer/vocab.json``
        and ``tokenizer/merges.txt`` are both there it encodes the empty prompt, otherwise
        the loader builds the same ids itself
        (:meth:`StableDiffusionBackbone.empty_prompt_embedding`).

    Raises
    ------
    MissingWeightsError : naming ``hub_id`` when the files are not on this machine or do
        not load.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    files = list(SD_WEIGHT_FILES if files is None else files)
    root = resolve_weights(hub_id, allow_patterns=files)
    dtype = _default_dtype(device, dtype)
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype,
                                                    local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype,
                                            local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder",
                                                     torch_dtype=dtype, local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler",
                                                  local_files_only=True)
        tokenizer = (CLIPTokenizer.from_pretrained(root, subfolder="tokenizer",
                                                   local_files_only=True)
                     if all((root / f).is_file() for f in SD_OPTIONAL_FILES) else None)
    except (OSError, ValueError, KeyError) as exc:
        raise MissingWeightsError(hub_id, f"Weights for '{hub_id}' were found at {root} but "
                                  f"do not load ({type(exc).__name__}: {exc}). Download the "
                                  f"repository again (files: {', '.join(files)}).") from exc
    weight_files = [f for f in files if f.endswith((".safetensors", ".bin"))]
    return StableDiffusionBackbone(name, unet, vae, text_encoder, scheduler, tokenizer,
                                   device=torch.device(device), dtype=dtype, pretrained=True,
                                   fingerprint=weights_fingerprint(root, weight_files),
                                   image_size=image_size)


def load_sd14(device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
              **kwargs) -> StableDiffusionBackbone:
    """``sd14``: CompVis/stable-diffusion-v1-4 through diffusers (see :func:`load_stable_diffusion`)."""
    return load_stable_diffusion(SD14_HUB_ID, name="sd14", device=device, dtype=dtype, **kwargs)


def sd_scheduler():
    """The DDIM scheduler with Stable Diffusion 1.x's noise schedule (its ``scheduler_config.json``)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd_components(seed: int = 0):
    """Random-initialised miniatures of SD 1.4's U-Net, VAE and CLIP text encoder.

    Same block structure as SD 1.4: four down blocks (three with cross-attention
    transformers), a mid block with one, four up blocks (the lowest without attention),
    two layers per block, so 16 ``attn1`` layers (5 + 5 + 5 at the three upper
    resolutions, 1 in the mid block) and the VAE downsamples by 8. Widths are tiny
    (U-Net channels 16/16/32/32, 2 heads: 0.63 M parameters; 0.75 M with the VAE and
    the text encoder).

    Returns
    -------
    (unet, vae, text_encoder, scheduler)
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=256,
            # SD's 0.18215 gives its VAE's latents unit variance; 7.0 does that for this one
            # (its raw latents of photos have std ~0.14), so the noise schedule means the same
            scaling_factor=7.0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
            eos_token_id=2, pad_token_id=1))
    return unet, vae, text_encoder, sd_scheduler()


def load_tiny_sd(device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0, image_size: int = 256) -> StableDiffusionBackbone:
    """``tiny-sd``: :func:`build_tiny_sd_components` with a fixed seed (float32 by default).

    At the default 256 px the latent is 32 x 32 and the attention grids are 32, 16, 8, 4
    (SD 1.4's 64, 32, 16, 8 halved).
    """
    unet, vae, text_encoder, scheduler = build_tiny_sd_components(seed)
    return StableDiffusionBackbone("tiny-sd", unet, vae, text_encoder, scheduler, None,
                                   device=torch.device(device), dtype=dtype or torch.float32,
                                   pretrained=False,
                                   fingerprint=module_fingerprint(unet, vae, text_encoder),
                                   image_size=image_size)


# --------------------------------------------------------------------------------------
# memory of a full SD 1.4 capture
# --------------------------------------------------------------------------------------

def sd14_layer_table(image_size: int = 512) -> dict[str, dict[str, Any]]:
    """SD 1.4's layer table (names, grids, heads, channels) without its weights.

    The U-Net is built on the ``meta`` device from diffusers' defaults (which are SD 1.x's)
    plus :data:`SD14_UNET_CONFIG`, so this needs neither weights nor memory.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), latent_channels=4)
    shell = StableDiffusionBackbone.__new__(StableDiffusionBackbone)
    shell.name, shell.unet, shell.vae = "sd14", unet, vae
    shell.image_size = image_size
    shell._attn_names = [n[: -len(".processor")] for n in unet.attn_processors
                         if n.endswith("attn1.processor")]
    return StableDiffusionBackbone.layers(shell, image_size)


def sd14_memory_table(image_size: int = 512) -> list[dict[str, Any]]:
    """Stored bytes of an SD 1.4 capture at ``image_size`` px, per option.

    Rows: layers ``"all"`` (16 ``attn1``) and ``"decoder"`` (10), heads reduced or kept,
    float16 or float32, probabilities only; plus the cost of adding logits, Q/K/V and
    features. Formula: ``sum over layers of N^2 * b * (H if heads kept else 1)``, with
    ``N`` the layer's tokens, ``H = 8`` and ``b`` bytes per value.
    """
    table = sd14_layer_table(image_size)
    attn_names = [n for n, i in table.items() if i["kind"] == "self_attention"]
    decoder = [n for n in attn_names if n.startswith(("mid_block", "up_blocks"))]
    rows = []
    for label, names in (("all", attn_names), ("decoder", decoder)):
        infos = [table[n] for n in names]
        for heads in ("mean", "none"):
            for dtype in (torch.float16, torch.float32):
                opts = CaptureOptions(heads=heads, dtype=dtype)
                size = capture_memory_bytes(infos, opts)
                rows.append({"layers": label, "n_layers": len(names),
                             "heads": "reduced" if heads == "mean" else "kept",
                             "dtype": str(dtype).replace("torch.", ""),
                             "bytes": size, "human": format_bytes(size)})
        for extra in ("logits", "qkv", "features"):
            opts = CaptureOptions(attn=False, **{extra: True})
            size = capture_memory_bytes(infos, opts)
            rows.append({"layers": label, "n_layers": len(names), "heads": f"+{extra}",
                         "dtype": "float16", "bytes": size, "human": format_bytes(size)})
    return rows
