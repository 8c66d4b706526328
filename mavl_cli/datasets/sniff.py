"""Reading label CSVs robustly: compression, separator, encoding, and which columns matter.

Column names are compared after :func:`canon` (lower case, runs of space/_/-
as one space). Only columns that can matter are parsed, which keeps 200k-row
files well under a second to read; which ones matter is the adapter's call,
passed in as ``plan``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from mavl_cli.errors import MavlError

PATH_COLUMNS = ("path", "image index", "image", "filename", "file", "image path",
                "file name", "filepath", "img")
PATIENT_COLUMNS = ("patient", "patient id", "subject id", "patientid", "subject")
METADATA_COLUMNS = frozenset({
    "sex", "gender", "age", "frontal/lateral", "ap/pa", "view", "view position",
    "viewposition", "projection", "study", "study id", "studyid", "dicom id", "split",
    "fold", "set", "follow up #", "follow up", "patient age", "patient gender",
    "patient sex", "width", "height", "orig width", "orig height",
    "originalimage[width", "height]", "originalimagepixelspacing[x", "y]",
    "rows", "columns", "performedprocedurestepdescription", "procedure",
    "studydate", "studytime", "study date", "study time", "finding labels",
})

# plan(columns) -> (columns to parse, columns to parse as text)
Plan = Callable[[list[str]], tuple[list[str], set[str]]]


def canon(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def quote_list(names) -> str:
    return ", ".join(repr(str(n)) for n in names)


def is_metadata(col) -> bool:
    c = canon(col)
    return c in METADATA_COLUMNS or c in PATIENT_COLUMNS or c.startswith("unnamed:")


def sniff_format(path: Path, what: str = "label file") -> tuple[str, str]:
    """(compression, separator) of a CSV, after checking it exists and holds text."""
    where = str(path)
    if not path.exists():
        raise MavlError(f"{what} {where} does not exist", path=path)
    if path.is_dir():
        raise MavlError(f"{what} {where} is a directory, not a CSV file", path=path)
    if path.stat().st_size == 0:
        raise MavlError(f"{what} {where} is empty", path=path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    compression = "gzip" if magic == b"\x1f\x8b" else "infer"
    sep = ","
    if compression == "gzip" or path.suffix.lower() not in (".zip", ".bz2", ".xz", ".zst"):
        try:
            with (gzip.open if compression == "gzip" else open)(path, "rb") as fh:
                head = fh.read(65536)
        except (OSError, EOFError) as exc:
            raise MavlError(f"{what} {where} cannot be read ({exc})", path=path) from exc
        if b"\x00" in head:
            raise MavlError(f"{what} {where} is not a CSV (it holds binary data)", path=path)
        if not head.strip():
            raise MavlError(f"{what} {where} is empty", path=path)
        first = head.lstrip().splitlines()[0].decode("utf-8", errors="replace")
        if "," not in first:  # tolerate tab- or semicolon-separated exports
            sep = "\t" if "\t" in first else (";" if ";" in first else ",")
    return compression, sep


def read_csv(path: Path, plan: Plan, what: str = "label file") -> pd.DataFrame:
    """Load the CSV with the columns ``plan`` picks from its header, turning every failure into MavlError.

    ``df.attrs["columns_seen"]`` keeps the full header for error messages.
    """
    where = str(path)
    compression, sep = sniff_format(path, what)

    def load(encoding: str) -> pd.DataFrame:
        header = pd.read_csv(path, sep=sep, nrows=0, compression=compression, encoding=encoding)
        columns = [str(c) for c in header.columns]
        usecols, text_cols = plan(columns)
        text = {c: str for c in usecols if c in text_cols}
        df = pd.read_csv(path, sep=sep, compression=compression, encoding=encoding,
                         low_memory=False, usecols=usecols, dtype=text)
        df.attrs["columns_seen"] = columns
        return df

    try:
        try:
            df = load("utf-8-sig")
        except UnicodeDecodeError:
            df = load("latin-1")  # old exports from spreadsheet tools
    except pd.errors.EmptyDataError as exc:
        raise MavlError(f"{what} {where} is empty", path=path) from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, EOFError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MavlError(f"{what} {where} is not a readable CSV ({detail})", path=path) from exc
    if len(df) == 0:
        raise MavlError(f"{what} {where} has a header but no rows", path=path)
    for c in df.columns:
        base = str(c).rsplit(".", 1)[0]
        if re.fullmatch(r".+\.\d+", str(c)) and base in df.columns:  # pandas renames repeats to X.1
            raise MavlError(f"{what} {where} has the column {base!r} more than once", path=path)
    return df


def find_path_column(df: pd.DataFrame, path: Path, path_column: str | None) -> str:
    seen = df.attrs.get("columns_seen", list(df.columns))
    if path_column is not None:
        if path_column in df.columns:
            return path_column
        raise MavlError(
            f"{path} has no column {path_column!r} (columns seen: {quote_list(seen)})",
            path=path,
        )
    cols = {canon(c): c for c in df.columns}
    for c in PATH_COLUMNS:
        if c in cols:
            return cols[c]
    raise MavlError(
        f"{path} has no image path column (columns seen: {quote_list(seen)}); "
        "name it Path, path, Image Index, image, filename or file, or pass the path column",
        path=path,
    )


def find_column(df: pd.DataFrame, names, exclude=()) -> str | None:
    """The first column whose canonical name is in ``names`` (in that order), else None."""
    cols = {canon(c): c for c in df.columns}
    return next((cols[c] for c in names if c in cols and cols[c] not in exclude), None)


def check_duplicates(ids: list[str], paths: list[str], path: Path) -> None:
    index = pd.Index(ids)
    if not index.has_duplicates:
        return
    dup = index[index.duplicated(keep=False)]
    first = dup[0]
    rows = [k + 1 for k, i in enumerate(ids) if i == first][:3]
    n = int(index.duplicated().sum())
    raise MavlError(
        f"{path} lists image {paths[rows[0] - 1]!r} more than once (rows {', '.join(map(str, rows))}); "
        f"{n} duplicate id(s) in total",
        path=path,
    )
