"""Paper 1's label upsampling now lives in :mod:`segbook.upsamplers.labels` (every way of going
from tokens to pixels is in :mod:`segbook.upsamplers`); this module re-exports it so that
``from segbook.pipelines.upsample import cosine_upsample`` keeps working."""

from segbook.upsamplers.labels import (
    _ROW_CHUNK,  # noqa: F401  (private constants some callers tune)
    _SEGMENT_CHUNK,  # noqa: F401
    bilinear_taps,
    cosine_upsample,
    cosine_upsample_bruteforce,
    dot_upsample,
    nearest_upsample,
    segment_means,
    upsampled_row_norms,
)

__all__ = ["bilinear_taps", "cosine_upsample", "cosine_upsample_bruteforce", "dot_upsample",
           "nearest_upsample", "segment_means", "upsampled_row_norms"]
