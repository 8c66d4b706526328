"""Any ``path,label1,label2,...`` CSV: one column per label with 1, 0, -1 (uncertain) or blank.

This is also how CheXpert and MIMIC-CXR's labeler output are laid out, so
their adapters reuse :func:`label_values`. Non-label columns (demographics,
view, split, study ids) are skipped when their name is known; any other column
must hold only label values, so a typo'd value is reported rather than guessed.
Patient: a ``patient``/``subject`` column, else derived from the path by the
data-set rules. View: a ``view``/``projection`` column when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.sniff import (
    PATH_COLUMNS,
    PATIENT_COLUMNS,
    canon,
    is_metadata,
    quote_list,
)

NAME = "generic"
VIEW_COLUMNS = ("view", "view position", "viewposition", "projection")


def plan(columns: list[str], path_column: str | None) -> tuple[list[str], set[str]]:
    """Parse label columns plus path/patient columns (as text); skip known metadata."""
    keep = set(PATH_COLUMNS + PATIENT_COLUMNS)
    usecols = [c for c in columns if not is_metadata(c) or canon(c) in keep or c == path_column]
    text = {c for c in usecols if canon(c) in keep or c == path_column}
    return usecols, text


def label_columns(df: pd.DataFrame, skip: set) -> list:
    return [c for c in df.columns if c not in skip and not is_metadata(c) and canon(c) not in PATH_COLUMNS]


def label_values(df: pd.DataFrame, skip: set, path: Path) -> tuple[list[str], np.ndarray]:
    """(names, float64 values with NaN for blank) of every label column of ``df``."""
    label_cols = label_columns(df, skip)
    if not label_cols:
        raise MavlError(
            f"{path} has no label columns (columns seen: "
            f"{quote_list(df.attrs.get('columns_seen', df.columns))}); "
            "expected one column per label with 1, 0, -1 or blank",
            path=path,
        )
    values = np.empty((len(df), len(label_cols)), dtype=np.float64)
    for j, c in enumerate(label_cols):
        values[:, j] = label_column(df[c], c, path)
    return [str(c).strip() for c in label_cols], values


def label_column(col: pd.Series, name, path: Path) -> np.ndarray:
    """One column as float64 with NaN for blank; MavlError on any other value."""
    if pd.api.types.is_bool_dtype(col):  # pandas reads True/False as bool
        raise bad_value(path, name, str(col.iloc[0]), 0)
    if pd.api.types.is_numeric_dtype(col):
        vals = col.to_numpy(dtype=np.float64, na_value=np.nan)
        ok = np.isnan(vals) | (vals == 1.0) | (vals == 0.0) | (vals == -1.0)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            v = vals[i]
            raise bad_value(path, name, f"{v:g}", i)
        return vals
    text = col.astype("string").str.strip()
    blank = (text.fillna("") == "").to_numpy(dtype=bool)
    nums = pd.to_numeric(text.mask(blank), errors="coerce")
    nums = nums.to_numpy(dtype=np.float64, na_value=np.nan)
    ok = blank | (nums == 1.0) | (nums == 0.0) | (nums == -1.0)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise bad_value(path, name, str(text.iloc[i]), i)
    nums[blank] = np.nan
    return nums


def bad_value(path: Path, name, value: str, i: int) -> MavlError:
    return MavlError(
        f"{path}: column {str(name)!r} has value {value!r} (row {i + 1}); "
        "label values must be 1, 0, -1 or blank",
        path=path,
    )
