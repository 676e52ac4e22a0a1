"""The errors segbook raises for things a user must fetch or fix.

Each message says what is missing, where segbook looked, and what to run on a machine
that is online. They live in one module so that every part of the library (backbones,
datasets, the book runner) raises the same types and a chapter can catch them.
"""

from __future__ import annotations


class SegbookError(Exception):
    """Base class of every error segbook raises on purpose."""


class MissingWeightsError(SegbookError, FileNotFoundError):
    """Pretrained weights for a model id could not be found locally or downloaded."""

    def __init__(self, model_id: str, message: str):
        self.model_id = model_id
        super().__init__(message)


class MissingDatasetError(SegbookError, FileNotFoundError):
    """A dataset (or part of it) is not under the datasets root."""

    def __init__(self, name: str, message: str, missing: list[str] | None = None):
        self.name = name
        self.missing = list(missing or [])
        super().__init__(message)


class CorruptFileError(SegbookError, ValueError):
    """A file exists but cannot be read, or its checksum does not match."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(message)


class GraphError(SegbookError, ValueError):
    """An affinity matrix or transition matrix that the spectral code cannot use."""
