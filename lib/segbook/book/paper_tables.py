"""The papers' own tables, transcribed as tidy CSVs under ``results/paper/<chapter>/``.

Each chapter that reproduces a paper puts its numbers beside the paper's::

    paper = load_paper_table("02_diffusing_walking_cutting", "table3")
    side_by_side = compare_with_paper(ours, paper, on=["method", "resolutions", "metric"])

The CSVs are long ("tidy"): one printed number per row in a ``value`` column, the row and
column headers of the printed table as explicit columns. Each chapter folder has a README
saying which table and page every CSV comes from, its columns, units and what could not be
read in the source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segbook.book.paths import results_root

__all__ = ["compare_with_paper", "list_paper_tables", "load_paper_table", "paper_tables_dir"]

# Columns read as text even when every entry looks numeric: they name a setting and are
# joined on, and "64" (a resolution) must not become the integer 64 in one table and a
# string in another.
_TEXT_COLUMNS = ("dataset", "method", "variant", "adjacency", "backbone", "resolutions",
                 "metric", "unit", "protocol", "training", "emphasis")
_BOOL_COLUMNS = ("reported", "pamr", "ddim_inversion")


def paper_tables_dir(chapter: str) -> Path:
    """The folder holding a chapter's transcribed paper tables: ``results/paper/<chapter>``."""
    return results_root() / "paper" / chapter


def list_paper_tables(chapter: str) -> list[str]:
    """Stems of the CSVs transcribed for ``chapter`` (e.g. ``"table1_adjacency_dot_vs_cosine"``)."""
    folder = paper_tables_dir(chapter)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No transcribed paper tables for chapter {chapter!r}: {folder} does not exist.")
    return sorted(p.stem for p in folder.glob("*.csv"))


def _resolve(chapter: str, name: str) -> Path:
    stems = list_paper_tables(chapter)
    if name in stems:
        return paper_tables_dir(chapter) / f"{name}.csv"
    # "table3" -> "table3_automatic_thresholds_resolutions"; never "table1" -> "table10_...".
    matches = [s for s in stems if s.startswith(f"{name}_")]
    if len(matches) == 1:
        return paper_tables_dir(chapter) / f"{matches[0]}.csv"
    if not matches:
        raise KeyError(f"No paper table {name!r} for chapter {chapter!r}; "
                       f"available: {', '.join(stems)}")
    raise KeyError(f"Paper table name {name!r} is ambiguous in {chapter!r}: {matches}")


def load_paper_table(chapter: str, name: str) -> pd.DataFrame:
    """Load one transcribed paper table as a tidy DataFrame.

    Parameters
    ----------
    chapter : str
        Chapter stem, e.g. ``"02_diffusing_walking_cutting"``.
    name : str
        The CSV's stem (``"table3_automatic_thresholds_resolutions"``) or its unique prefix
        before the first underscore (``"table3"``).

    Returns
    -------
    pandas.DataFrame
        One row per printed number. ``value`` is float (NaN where the paper prints ``-``,
        marked ``reported == False``); setting columns such as ``resolutions`` or ``metric``
        are strings; ``reported``, ``pamr`` and ``ddim_inversion`` are booleans; numeric
        settings (``k``, ``ncut_threshold``, ``step``) are numbers, NaN where they do not apply.
    """
    path = _resolve(chapter, name)
    header = pd.read_csv(path, nrows=0).columns
    dtypes = {c: "string" for c in _TEXT_COLUMNS if c in header}
    df = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])
    for col in _BOOL_COLUMNS:
        if col in df.columns:
            mapped = df[col].map({"true": True, "false": False, True: True, False: False})
            if mapped.isna().any():
                raise ValueError(f"{path}: column {col!r} must hold true/false only")
            df[col] = mapped.astype(bool)
    if "value" not in df.columns:
        raise ValueError(f"{path} has no 'value' column")
    df["value"] = pd.to_numeric(df["value"], errors="raise").astype(float)
    df.attrs["source"] = str(path)
    return df


def compare_with_paper(ours: pd.DataFrame, paper: pd.DataFrame, on: list[str],
                       value: str = "value") -> pd.DataFrame:
    """Put our numbers beside the paper's.

    An outer join on the key columns ``on``: rows only one side has are kept, with NaN for
    the other side, so a missing experiment stays visible.

    Parameters
    ----------
    ours, paper : pandas.DataFrame
        Long tables, each with the key columns ``on`` and a numeric column ``value``.
        Keys must be unique on each side.
    on : list of str
        The columns that identify a number (e.g. ``["method", "resolutions", "metric"]``).
    value : str, default "value"
        The numeric column in both frames.

    Returns
    -------
    pandas.DataFrame
        The key columns (values as each side had them), then ``paper``, ``ours`` and
        ``difference`` (= ours - paper), in the paper's row order followed by the rows only
        ``ours`` has. Keys are matched as text, so ``0.4`` meets ``"0.4"`` and ``64`` meets
        ``"64"``; a missing key (NaN) matches a missing key.
    """
    on = list(on)
    if not on:
        raise ValueError("compare_with_paper needs at least one key column in `on`")
    for label, df in (("ours", ours), ("paper", paper)):
        missing = [c for c in [*on, value] if c not in df.columns]
        if missing:
            raise KeyError(f"{label} lacks column(s) {missing}; it has {list(df.columns)}")
        dup = df.duplicated(subset=on, keep=False)
        if dup.any():
            raise ValueError(f"{label} has {int(dup.sum())} rows with repeated keys {on}; "
                             "add key columns until each row is one number")

    def keyed(df: pd.DataFrame, name: str, index_name: str) -> pd.DataFrame:
        out = df[on].copy()
        # Join on text so that 0.4 (float) meets "0.4" and 64 meets "64".
        for c in on:
            out[c] = out[c].map(_key_text).astype(object)
        out[name] = pd.to_numeric(df[value], errors="coerce").astype(float).to_numpy()
        out[index_name] = range(len(df))
        return out

    left = keyed(paper, "paper", "_paper_row")
    right = keyed(ours, "ours", "_ours_row")
    # A left join keeps the paper's row order; rows only we have are appended after it.
    both = left.merge(right, on=on, how="left", sort=False)
    extra = right[~right["_ours_row"].isin(both["_ours_row"].dropna())]
    keys = pd.concat([paper[on].reset_index(drop=True),
                      ours[on].iloc[extra["_ours_row"].to_numpy()].reset_index(drop=True)],
                     ignore_index=True)
    result = keys.copy()
    result["paper"] = np.concatenate([both["paper"].to_numpy(float),
                                      np.full(len(extra), np.nan)])
    result["ours"] = np.concatenate([both["ours"].to_numpy(float),
                                     extra["ours"].to_numpy(float)])
    result["difference"] = result["ours"] - result["paper"]
    return result


def _key_text(x) -> str | None:
    if x is None or (isinstance(x, float) and pd.isna(x)) or x is pd.NA:
        return None
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (float, np.floating)):
        return str(int(x)) if float(x).is_integer() else repr(float(x))
    return str(x)
