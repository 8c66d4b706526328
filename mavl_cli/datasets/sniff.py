"""Reading label CSVs robustly: compression, separator, encoding, and which columns matter.

Column names are compared after :func:`canon` (lower case, runs of space/_/-
as one space). Only columns that can matter are parsed, which keeps 200k-row
files well under a second to read; which ones matter is the adapter's call,
passed in as ``plan``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.io.imageio import is_regular

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

    if not is_regular(path):  # a FIFO would block the read forever
        raise MavlError(f"{what} {where} is not a regular file (a device, FIFO or socket)", path=path)
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
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text" export
            raise MavlError(f"{what} {where} is UTF-16 text; save it as CSV UTF-8 (comma delimited)", path=path)
        if b"\x00" in head:
            raise MavlError(f"{what} {where} is not a CSV (it holds binary data)", path=path)
        if not head.strip():
            raise MavlError(f"{what} {where} is empty", path=path)
        first = head.lstrip().splitlines()[0].decode("utf-8", errors="replace")
        if "," not in first:  # tolerate tab- or semicolon-separated exports
            sep = "\t" if "\t" in first else (";" if ";" in first else ",")
    return compression, sep


#: what a label file may expand to (bytes after decompression, rows): far beyond MIMIC-CXR's 377k rows
#: (~40 MB), far below what would exhaust memory (pandas needs several times the text's size)
MAX_LABEL_MB = 1024
MAX_LABEL_ROWS = 10_000_000


def label_limits() -> tuple[int, int]:
    """(bytes, rows) a label file may hold; ``MAVL_MAX_LABEL_MB`` / ``MAVL_MAX_LABEL_ROWS`` raise them."""

    out = []
    for var, default, scale in (("MAVL_MAX_LABEL_MB", MAX_LABEL_MB, 1 << 20), ("MAVL_MAX_LABEL_ROWS", MAX_LABEL_ROWS, 1)):
        raw = os.environ.get(var, "")
        if raw and not raw.isdigit():
            raise MavlError(f"{var}={raw!r}: must be a whole number")
        out.append((int(raw) if raw else default) * scale)
    return out[0], out[1]


class _TooBig(MavlError):
    pass


class _Capped(io.RawIOBase):
    """A file (decompressed on the fly) that refuses to yield more than ``limit`` bytes."""

    def __init__(self, fh, limit: int, error: MavlError) -> None:
        self.fh, self.limit, self.error, self.total = fh, limit, error, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self.fh.readinto(b)
        self.total += n or 0
        if self.total > self.limit:
            raise self.error
        return n

    def close(self) -> None:
        self.fh.close()
        super().close()


def _open_capped(path: Path, compression: str, limit: int, what: str) -> io.BufferedReader:

    suffix = path.suffix.lower()
    opener = (gzip.open if compression == "gzip" or suffix == ".gz" else bz2.open if suffix == ".bz2"
              else lzma.open if suffix in (".xz", ".lzma") else open)
    err = _TooBig(f"{what} {path} holds more than {limit >> 20:,} MB of text (after decompression): refusing to read it "
                  "(a decompression bomb?); set MAVL_MAX_LABEL_MB to read larger label files", path=path)
    return io.BufferedReader(_Capped(opener(path, "rb"), limit, err))


def read_csv(path: Path, plan: Plan, what: str = "label file") -> pd.DataFrame:
    """Load the CSV with the columns ``plan`` picks from its header, turning every failure into MavlError.

    ``df.attrs["columns_seen"]`` keeps the full header for error messages. Only an empty cell is
    blank: ``nan``, ``N/A``, ``None``, ``NULL`` stay text (and are refused as label values, with
    their row and column), never silently read as missing. What is read is bounded (see
    :func:`label_limits`): a small gzip that expands to gigabytes is refused as it streams.
    """
    where = str(path)
    compression, sep = sniff_format(path, what)
    max_bytes, max_rows = label_limits()
    direct = compression != "gzip" and path.suffix.lower() in (".zip", ".zst")  # pandas decompresses these itself

    def source():
        return path if direct else _open_capped(path, compression, max_bytes, what)

    def load(encoding: str) -> pd.DataFrame:
        kw = {"compression": compression} if direct else {}
        with (nullcontext(path) if direct else source()) as fh:
            header = pd.read_csv(fh, sep=sep, nrows=0, encoding=encoding, **kw)
        columns = [str(c) for c in header.columns]
        usecols, text_cols = plan(columns)
        text = {c: str for c in usecols if c in text_cols}
        with (nullcontext(path) if direct else source()) as fh:
            df = pd.read_csv(fh, sep=sep, encoding=encoding, low_memory=False, usecols=usecols, dtype=text,
                             keep_default_na=False, na_values=[""], nrows=max_rows + 1, **kw)
        if len(df) > max_rows:
            raise MavlError(f"{what} {where} has more than {max_rows:,} rows: refusing to read it; "
                            "set MAVL_MAX_LABEL_ROWS to read larger label files", path=path)
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
