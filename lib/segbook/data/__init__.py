"""Datasets: manifests, readers, bundled sample photos and synthetic benchmarks."""

from segbook.data.root import DATA_ENV, data_root, require_files
from segbook.errors import MissingDatasetError

__all__ = ["DATA_ENV", "data_root", "require_files", "MissingDatasetError"]
