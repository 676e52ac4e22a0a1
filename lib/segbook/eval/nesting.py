"""Is one segmentation a refinement of another? (hierarchies: NCut thresholds, power walks)."""

from __future__ import annotations

import numpy as np

__all__ = ["is_refinement"]


def is_refinement(fine, coarse) -> bool:
    """True when every segment of ``fine`` lies inside a single segment of ``coarse``, i.e.
    each coarse segment is a union of fine ones (two label maps of the same shape; label
    values are arbitrary). Recursive NCut with a larger threshold on the same graph refines
    the segmentation by construction; across different graphs (``P^k`` for several ``k``) it
    need not."""
    fine = np.asarray(fine).ravel()
    coarse = np.asarray(coarse).ravel()
    if fine.shape != coarse.shape:
        raise ValueError(f"label maps differ in size: {fine.size} and {coarse.size}")
    pairs = np.unique(np.stack([fine, coarse]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1]
