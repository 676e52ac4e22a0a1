"""Paper 1's label upsampling now lives in :mod:`segbook.upsamplers.labels` (every way of going
from tokens to pixels is in :mod:`segbook.upsamplers`); this module only keeps
``from segbook.pipelines.upsample import cosine_upsample`` working for outside code. The
library imports :mod:`segbook.upsamplers.labels` directly."""

from segbook.upsamplers.labels import *
from segbook.upsamplers.labels import __all__  # noqa: F401
