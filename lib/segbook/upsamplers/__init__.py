"""segbook.upsamplers: every way of going from tokens to pixels.

* :mod:`segbook.upsamplers.base` - :class:`Upsampled` (features + lazy attention), the
  :class:`LazyAttention` that CAFE reads without materialising it, and the bilinear baseline.
* :mod:`segbook.upsamplers.jafar` / :mod:`segbook.upsamplers.sauce` - the learned attention
  upsamplers JAFAR and SAUCE (EASe section 3.1), memory-bounded; :func:`load_upsampler`.
* :mod:`segbook.upsamplers.features` - backbone tokens from images (:func:`lowres_tokens`).
* :mod:`segbook.upsamplers.train` - self-supervised training (EASe eq. 2), torchrun-ready.
* :mod:`segbook.upsamplers.evaluation` - reconstruction and linear probing (EASe Tables 2-3).
* :mod:`segbook.upsamplers.labels` - paper 1's attention-cosine label upsampling (section 3.6)
  and DiffCut's dot-product variant.
"""

from segbook.upsamplers.base import (
    BilinearUpsampler,
    LazyAttention,
    Upsampled,
    Upsampler,
    distance_attention,
    token_centres,
)
from segbook.upsamplers.features import (
    backbone_features,
    feature_stride,
    feature_width,
    lowres_tokens,
)
from segbook.upsamplers.jafar import JAFAR, UpsamplerInputError, WidthMismatchError
from segbook.upsamplers.labels import (
    cosine_upsample,
    cosine_upsample_bruteforce,
    dot_upsample,
    nearest_upsample,
    segment_means,
    upsampled_row_norms,
)
from segbook.upsamplers.registry import book_checkpoint, checkpoint_info, load_upsampler
from segbook.upsamplers.sauce import SAUCE

__all__ = [
    "JAFAR",
    "SAUCE",
    "BilinearUpsampler",
    "LazyAttention",
    "Upsampled",
    "Upsampler",
    "UpsamplerInputError",
    "WidthMismatchError",
    "backbone_features",
    "book_checkpoint",
    "checkpoint_info",
    "cosine_upsample",
    "cosine_upsample_bruteforce",
    "distance_attention",
    "dot_upsample",
    "feature_stride",
    "feature_width",
    "load_upsampler",
    "lowres_tokens",
    "nearest_upsample",
    "segment_means",
    "token_centres",
    "upsampled_row_norms",
]
