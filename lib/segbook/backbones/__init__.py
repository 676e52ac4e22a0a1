"""Backbones: load a pretrained model and capture what the papers read from it."""

from segbook.backbones.base import Backbone, Capture, LayerCapture, resolve_device
from segbook.backbones.cache import FeatureCache
from segbook.backbones.capture import CaptureOptions
from segbook.backbones.cnn import similarity_attention
from segbook.backbones.images import load_image
from segbook.backbones.registry import available_backbones, load_backbone, register_backbone
from segbook.backbones.weights import resolve_weights
from segbook.errors import MissingWeightsError

__all__ = [
           "Backbone",
           "Capture",
           "CaptureOptions",
           "FeatureCache",
           "LayerCapture",
           "MissingWeightsError",
           "available_backbones",
           "load_backbone",
           "load_image",
           "register_backbone",
           "resolve_device",
           "resolve_weights",
           "similarity_attention",
]

from segbook.backbones import catalog as _catalog  # noqa: F401  (registers the entries)
