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

__all__ = ["DATA_ENV", "data_root", "require_files", "MissingDatasetError"]
__all__ += ["DATASETS", "IGNORE_INDEX", "load", "load_manifest", "class_names", "list_samples",
            "dataset_dir", "Manifest", "ManifestError", "SegmentationDataset", "Sample", "Preprocess",
            "PRESETS"]
__all__ += ["samples", "load_sample", "SamplePhoto", "SAMPLE_NAMES", "make_mosaic",
            "mosaic_benchmark", "MosaicBenchmark", "MOSAIC_CLASSES"]
