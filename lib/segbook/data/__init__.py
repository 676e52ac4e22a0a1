"""Datasets: manifests, readers, bundled sample photos and synthetic benchmarks."""

from segbook.data.datasets import (
                                   PRESETS,
                                   Preprocess,
                                   Sample,
                                   SegmentationDataset,
                                   dataset_dir,
                                   list_samples,
                                   load,
)
from segbook.data.manifests import (
                                   DATASETS,
                                   IGNORE_INDEX,
                                   Manifest,
                                   ManifestError,
                                   class_names,
                                   load_manifest,
)
from segbook.data.mosaic import MOSAIC_CLASSES, MosaicBenchmark, make_mosaic, mosaic_benchmark
from segbook.data.root import DATA_ENV, data_root, require_files
from segbook.data.samples import SAMPLE_NAMES, SamplePhoto, load_sample, samples
from segbook.errors import MissingDatasetError

__all__ = ["DATA_ENV", "MissingDatasetError", "data_root", "require_files"]
__all__ += [
                                   "DATASETS",
                                   "IGNORE_INDEX",
                                   "PRESETS",
                                   "Manifest",
                                   "ManifestError",
                                   "Preprocess",
                                   "Sample",
                                   "SegmentationDataset",
                                   "class_names",
                                   "dataset_dir",
                                   "list_samples",
                                   "load",
                                   "load_manifest",
]
__all__ += [
                                   "MOSAIC_CLASSES",
                                   "SAMPLE_NAMES",
                                   "MosaicBenchmark",
                                   "SamplePhoto",
                                   "load_sample",
                                   "make_mosaic",
                                   "mosaic_benchmark",
                                   "samples",
]
