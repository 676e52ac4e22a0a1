"""The book machinery: profiles, the results writer and the papermill runner.

In a chapter::

    from segbook.book import load_profile, Results
    cfg = load_profile(profile, chapter="01_spectral_clustering")
    res = Results("01_spectral_clustering", profile, params=cfg, seeds={"seed": seed})
    res.table("threshold_sweep", df)
    res.figure("eigenvectors", fig)

From a shell: ``python -m segbook.book run --profile cpu [--chapters 00 01]``.
"""

from segbook.book.paths import chapter_paths, repo_root, results_root
from segbook.book.profiles import available_profiles, limited, load_profile
from segbook.book.progress import progress
from segbook.book.results import Results, atomic_write_bytes, atomic_write_text

__all__ = [
    "Results", "load_profile", "limited", "progress", "available_profiles", "chapter_paths", "repo_root",
    "results_root", "atomic_write_bytes", "atomic_write_text",
]
