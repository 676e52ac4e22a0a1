"""segbook: unsupervised segmentation by spectral methods on foundation-model features."""
__version__ = "0.1.0"
