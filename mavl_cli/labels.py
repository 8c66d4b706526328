"""Read CheXpert, NIH ChestX-ray14 and MIMIC-style label files into one table.

Users arrive with whichever label file their dataset ships. Rather than asking
them to convert, :func:`read_labels` detects the layout and returns a
:class:`LabelTable`: image ids, label names, a 0/1 matrix and a mask saying
which entries count. Everything downstream (training, evaluation, alignment
with embedding files) works on that one shape.

Two layouts are recognised:

* one column per label (CheXpert, MIMIC-CXR's CheXpert-labeler output, or any
  ``path,label1,label2,...`` file) with values 1, 0, -1 (uncertain) or blank;
* NIH ``Data_Entry_2017``: ``Image Index`` plus pipe-separated ``Finding Labels``.

Values are converted column-wise with numpy; only the image ids go through a
per-row Python loop, because string normalisation is cheaper there than in
pandas' object-dtype string methods.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.errors import MavlError

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# Only names that mean the same finding in both vocabularies. Atelectasis,
# Cardiomegaly, Consolidation, Edema, Pneumonia and Pneumothorax already share
# a name; Mass/Nodule vs "Lung Lesion" or Infiltration vs "Lung Opacity" are
# broader-or-narrower concepts, so they are left for the user to decide.
NIH_TO_CHEXPERT: dict[str, str] = {"Effusion": "Pleural Effusion"}

NO_FINDING = "No Finding"

# Column names are compared after _canon(): lower case, runs of space/_/- as one space.
_PATH_COLUMNS = ("path", "image index", "image", "filename", "file", "image path",
                 "file name", "filepath", "img")
_PATIENT_COLUMNS = ("patient", "patient id", "subject id", "patientid", "subject")
_FINDINGS_COLUMNS = ("finding labels",)
_METADATA_COLUMNS = frozenset({
    "sex", "gender", "age", "frontal/lateral", "ap/pa", "view", "view position",
    "viewposition", "projection", "study", "study id", "studyid", "dicom id", "split",
    "fold", "set", "follow up #", "follow up", "patient age", "patient gender",
    "patient sex", "width", "height", "orig width", "orig height",
    "originalimage[width", "height]", "originalimagepixelspacing[x", "y]",
    "rows", "columns", "performedprocedurestepdescription", "procedure",
    "studydate", "studytime", "study date", "study time", "finding labels",
})

_CHEXPERT_DIR = re.compile(r"(?:^|/)chexpert-v[0-9.]+(?:-small)?/", re.IGNORECASE)
_DOT_SEGMENT = re.compile(r"(?:^|(?<=/))\./")
_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")
_MIMIC_PATIENT = re.compile(r"(?:^|/)p\d{2}/(p\d+)/s\d+/")
_NIH_FILE = re.compile(r"(?:^|/)(\d{8})_\d{3}\.png$", re.IGNORECASE)


def _canon(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def normalize_id(p: str) -> str:
    """Return the canonical image id that label rows and embedding files share.

    Rules, in order: strip surrounding whitespace; backslashes become ``/``;
    repeated slashes collapse; ``./`` segments (including a leading ``./``) are
    removed; and if a CheXpert dataset folder (``CheXpert-v1.0`` or
    ``CheXpert-v1.0-small``, any case) appears, everything up to and including
    it is dropped, so ``CheXpert-v1.0-small/train/patient00001/study1/x.jpg``
    becomes ``train/patient00001/study1/x.jpg``. That way the label file's
    paths match images found under a separately passed images root, whichever
    copy of CheXpert the user downloaded. Case is kept: file systems differ.
    """
    p = str(p).strip()
    if "\\" in p:
        p = p.replace("\\", "/")
    while "//" in p:
        p = p.replace("//", "/")
    if "./" in p:
        p = _DOT_SEGMENT.sub("", p)
    m = _CHEXPERT_DIR.search(p)
    if m:
        p = p[m.end():]
    return p


def _normalize_many(paths: list[str]) -> list[str]:
    """``[normalize_id(p) for p in paths]``, with fast paths for the usual cases.

    Big label files are uniform: either already clean, or clean apart from one
    shared CheXpert prefix. One scan of the joined text detects that, which is
    several times faster than per-row regexes on 200k paths.
    """
    joined = "\n".join(paths)
    if (joined.count("\n") != len(paths) - 1 or "\\" in joined or "//" in joined
            or "./" in joined or _edge_space(joined)):
        return [normalize_id(p) for p in paths]
    if "chexpert-v" not in joined.lower():  # a substring scan beats a regex scan here
        return list(paths)
    m = _CHEXPERT_DIR.search(paths[0])
    if m is not None:
        prefix, k = paths[0][:m.end()], m.end()
        if all(p.startswith(prefix) for p in paths):
            return [p[k:] for p in paths]
    return [normalize_id(p) for p in paths]


def _edge_space(joined: str) -> bool:
    """Whether any line of ``joined`` starts or ends with whitespace (substring scans only)."""
    if joined[:1].isspace() or joined[-1:].isspace():
        return True
    present = [ws for ws in " \t\r\f\v\xa0" if ws in joined]  # usually none at all
    return any(ws + "\n" in joined or "\n" + ws in joined for ws in present)


@dataclass
class LabelTable:
    """Labels for N images and L findings, ready to line up with embeddings.

    ``y`` holds 0/1 (or the ``blank`` value) after the uncertain policy; ``mask``
    is False where an entry must not count (uncertain under ``ignore``).
    ``file`` is the label file the table came from, used in error messages.
    """

    ids: list[str]
    names: list[str]
    y: np.ndarray
    mask: np.ndarray
    paths: list[str]
    groups: list[str] | None
    source: str
    file: str | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, names: list[str]) -> "LabelTable":
        """Keep these label columns, in this order, matched by name (not position)."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise MavlError(
                f"label(s) {_quote_list(missing)} not found in {self.file or 'the label table'}; "
                f"available labels: {_quote_list(self.names)}",
                path=self.file,
            )
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        if dupes:
            raise MavlError(f"label(s) {_quote_list(dupes)} requested more than once", path=self.file)
        cols = [index[n] for n in names]
        return LabelTable(
            ids=list(self.ids), names=list(names), y=self.y[:, cols].copy(),
            mask=self.mask[:, cols].copy(), paths=list(self.paths),
            groups=None if self.groups is None else list(self.groups),
            source=self.source, file=self.file,
        )

    def align(self, ids: list[str]) -> "LabelTable":
        """Reorder rows to follow ``ids`` (e.g. the ids stored with embeddings).

        Each id is matched first on its normalised form, then on the longest
        common path suffix (so ids relative to another root, or bare file
        names, still match when that suffix is unique). The returned table's
        ``ids`` are the ``ids`` given, so rows zip with the embeddings.
        """
        rows = _match_rows(_normalize_many([str(i) for i in ids]), self.ids)
        missing = [ids[k] for k, r in enumerate(rows) if r < 0]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise MavlError(
                f"{len(missing)} of {len(ids)} image id(s) have no row in the label file "
                f"{self.file or ''}: {shown}{more}".replace("label file :", "label file:"),
                path=self.file,
            )
        r = np.asarray(rows, dtype=np.int64)
        if len(np.unique(r)) != len(r):
            taken: dict[int, str] = {}
            for k, row in enumerate(rows):
                if row in taken:
                    raise MavlError(
                        f"image ids {taken[row]!r} and {ids[k]!r} both match the label row "
                        f"{self.paths[row]!r}; use ids with more of their path",
                        path=self.file,
                    )
                taken[row] = ids[k]
        return LabelTable(
            ids=list(ids), names=list(self.names), y=self.y[r], mask=self.mask[r],
            paths=[self.paths[i] for i in rows],
            groups=None if self.groups is None else [self.groups[i] for i in rows],
            source=self.source, file=self.file,
        )


def _match_rows(wanted: list[str], have: list[str]) -> list[int]:
    """Row index in ``have`` for each of ``wanted`` (both normalised), -1 if none.

    Exact matches first; the remaining ids fall back to the longest common
    path suffix, counted in whole path components. A suffix shared by two
    label rows is ambiguous and never used.
    """
    exact = {h: i for i, h in enumerate(have)}
    rows = [exact.get(w, -1) for w in wanted]
    if all(r >= 0 for r in rows):
        return rows
    # suffix -> row, or -2 when two rows share it. Built only when needed.
    suffixes: dict[str, int] = {}
    for i, h in enumerate(have):
        parts = h.split("/")
        for k in range(len(parts)):
            s = "/".join(parts[k:])
            suffixes[s] = -2 if s in suffixes and suffixes[s] != i else i
    for j, w in enumerate(wanted):
        if rows[j] >= 0:
            continue
        parts = w.split("/")
        for k in range(len(parts)):  # longest suffix first
            hit = suffixes.get("/".join(parts[k:]))
            if hit is not None:
                rows[j] = hit if hit >= 0 else -1
                break
    return rows


def _quote_list(names) -> str:
    return ", ".join(repr(str(n)) for n in names)


def match_label_names(csv_names, other_names, csv_path, other_path) -> None:
    """Raise MavlError when two sources disagree on which labels exist.

    Order is not compared (``LabelTable.select`` reorders by name); presence is.
    """
    a, b = list(csv_names), list(other_names)
    only_a = [n for n in a if n not in set(b)]
    only_b = [n for n in b if n not in set(a)]
    if not only_a and not only_b:
        return
    parts = []
    if only_a:
        parts.append(f"{_quote_list(only_a)} in {csv_path} but not in {other_path}")
    if only_b:
        parts.append(f"{_quote_list(only_b)} in {other_path} but not in {csv_path}")
    raise MavlError("label names differ: " + "; ".join(parts), path=csv_path)


def read_label_map(spec: str | Path) -> dict[str, str]:
    """Parse a label rename map from a file or an inline ``from=to,...`` string.

    Files: ``.json`` holds ``{"from": "to"}``; anything else holds ``from,to``
    lines (an optional ``from,to`` header, blank lines and ``#`` comments are
    skipped). Inline: ``"Effusion=Pleural Effusion,Pleural_Thickening=Pleural Other"``.
    """
    path = Path(str(spec))
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a very long inline spec
        is_file = False
    if not is_file:
        if "=" not in str(spec):
            raise MavlError(
                f"label map {str(spec)!r} is neither an existing file nor 'from=to,...' pairs",
                path=None,
            )
        mapping: dict[str, str] = {}
        for item in str(spec).split(","):
            if not item.strip():
                continue
            if item.count("=") != 1 or not all(x.strip() for x in item.split("=")):
                raise MavlError(f"label map entry {item.strip()!r} must look like 'from=to'")
            src, dst = (x.strip() for x in item.split("="))
            _add_mapping(mapping, src, dst, "the inline label map")
        return mapping

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MavlError(f"cannot read label map file {path}: {exc}", path=path) from exc
    mapping = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MavlError(f"label map file {path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                            path=path) from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise MavlError(f"label map file {path} must hold one JSON object of "
                            '"from": "to" strings', path=path)
        for src, dst in data.items():
            _add_mapping(mapping, src.strip(), dst.strip(), str(path))
        return mapping
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in row]
        if lineno == 1 and [c.lower() for c in cells] == ["from", "to"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise MavlError(f"label map file {path} line {lineno} must be 'from,to', got {','.join(row)!r}",
                            path=path)
        _add_mapping(mapping, cells[0], cells[1], str(path))
    if not mapping:
        raise MavlError(f"label map file {path} has no 'from,to' entries", path=path)
    return mapping


def _add_mapping(mapping: dict[str, str], src: str, dst: str, where: str) -> None:
    if src in mapping and mapping[src] != dst:
        raise MavlError(f"{where} maps {src!r} twice ({mapping[src]!r} and {dst!r})")
    mapping[src] = dst


# --------------------------------------------------------------------------- reading


def read_labels(
    path: Path | str,
    uncertain: str = "zeros",
    blank: float = 0.0,
    label_map: dict[str, str] | None = None,
    path_column: str | None = None,
    labels: list[str] | None = None,
) -> LabelTable:
    """Read a CheXpert-style, NIH ``Data_Entry`` or generic label CSV (``.csv.gz`` too).

    ``uncertain`` decides what -1 becomes: ``ones`` -> 1, ``zeros`` -> 0,
    ``ignore`` -> masked out. Blank cells become ``blank`` (NaN masks them out).
    ``label_map`` renames labels after reading; ``labels`` then keeps only
    those names, in that order. Non-label columns (demographics, view, split,
    study ids) are skipped when their name is known; any other column must
    hold only label values, so a typo'd value is reported rather than guessed.
    """
    path = Path(path)
    where = str(path)
    if uncertain not in UNCERTAIN_POLICIES:
        raise MavlError(
            f"unknown uncertain policy {uncertain!r} for {where}; choose one of "
            f"{', '.join(UNCERTAIN_POLICIES)}",
            path=path,
        )
    df = _read_csv(path, path_column)
    cols = {_canon(c): c for c in df.columns}

    path_col = _find_path_column(df, path, path_column)
    findings_col = next((cols[c] for c in _FINDINGS_COLUMNS if c in cols), None)
    patient_col = next((cols[c] for c in _PATIENT_COLUMNS if c in cols and cols[c] != path_col), None)

    raw_paths = df[path_col]
    if raw_paths.isna().any():
        row = int(np.flatnonzero(raw_paths.isna().to_numpy())[0]) + 1
        raise MavlError(f"{where}: column {path_col!r} is blank in row {row}; every row needs an image path",
                        path=path)
    paths = [str(p) for p in raw_paths.tolist()]
    ids = _normalize_many(paths)
    _check_duplicates(ids, paths, path)

    if findings_col is not None:
        names, values = _nih_values(df[findings_col])
        source = "nih"
    else:
        skip = {path_col, patient_col}
        label_cols = [c for c in df.columns
                      if c not in skip and not _is_metadata(c) and _canon(c) not in _PATH_COLUMNS]
        if not label_cols:
            raise MavlError(
                f"{where} has no label columns (columns seen: "
                f"{_quote_list(df.attrs.get('columns_seen', df.columns))}); "
                "expected one column per label with 1, 0, -1 or blank",
                path=path,
            )
        values = np.empty((len(df), len(label_cols)), dtype=np.float64)
        for j, c in enumerate(label_cols):
            values[:, j] = _label_column(df[c], c, path)
        names = [str(c).strip() for c in label_cols]
        known = sum(n in CHEXPERT_LABELS for n in names)
        source = "chexpert" if known * 2 >= len(names) else "generic"

    y, mask = _apply_policies(values, uncertain, blank)
    groups = _groups(df, patient_col, ids)
    table = LabelTable(ids=ids, names=names, y=y, mask=mask, paths=paths, groups=groups,
                       source=source, file=where)
    if label_map:
        table = _rename(table, label_map)
    if labels is not None:
        table = table.select(list(labels))
    return table


def _read_csv(path: Path, path_column: str | None) -> pd.DataFrame:
    """Load the CSV with label-friendly dtypes, turning every failure into MavlError.

    Only the columns that can matter are parsed (metadata such as age or view
    is skipped), which keeps 200k-row files well under a second to read.
    """
    where = str(path)
    if not path.exists():
        raise MavlError(f"label file {where} does not exist", path=path)
    if path.is_dir():
        raise MavlError(f"label file {where} is a directory, not a CSV file", path=path)
    if path.stat().st_size == 0:
        raise MavlError(f"label file {where} is empty", path=path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    compression = "gzip" if magic == b"\x1f\x8b" else "infer"
    sep = ","
    if compression == "gzip" or path.suffix.lower() not in (".zip", ".bz2", ".xz", ".zst"):
        try:
            with (gzip.open if compression == "gzip" else open)(path, "rb") as fh:
                head = fh.read(65536)
        except (OSError, EOFError) as exc:
            raise MavlError(f"label file {where} cannot be read ({exc})", path=path) from exc
        if b"\x00" in head:
            raise MavlError(f"label file {where} is not a CSV (it holds binary data)", path=path)
        if not head.strip():
            raise MavlError(f"label file {where} is empty", path=path)
        first = head.lstrip().splitlines()[0].decode("utf-8", errors="replace")
        if "," not in first:  # tolerate tab- or semicolon-separated exports
            sep = "\t" if "\t" in first else (";" if ";" in first else ",")

    def load(encoding: str) -> pd.DataFrame:
        header = pd.read_csv(path, sep=sep, nrows=0, compression=compression, encoding=encoding)
        columns = [str(c) for c in header.columns]
        canon = {_canon(c) for c in columns}
        keep = set(_PATH_COLUMNS + _PATIENT_COLUMNS)
        if canon & set(_FINDINGS_COLUMNS):
            # NIH layout: only the path, findings and patient columns are needed.
            keep |= set(_FINDINGS_COLUMNS)
            usecols = [c for c in columns if _canon(c) in keep or c == path_column]
        else:
            usecols = [c for c in columns
                       if not _is_metadata(c) or _canon(c) in keep or c == path_column]
        text = {c: str for c in usecols
                if _canon(c) in keep and _canon(c) not in _FINDINGS_COLUMNS or c == path_column}
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
        raise MavlError(f"label file {where} is empty", path=path) from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, EOFError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MavlError(f"label file {where} is not a readable CSV ({detail})", path=path) from exc
    if len(df) == 0:
        raise MavlError(f"label file {where} has a header but no rows", path=path)
    for c in df.columns:
        base = str(c).rsplit(".", 1)[0]
        if re.fullmatch(r".+\.\d+", str(c)) and base in df.columns:  # pandas renames repeats to X.1
            raise MavlError(f"label file {where} has the column {base!r} more than once", path=path)
    return df


def _is_metadata(col) -> bool:
    c = _canon(col)
    return c in _METADATA_COLUMNS or c in _PATIENT_COLUMNS or c.startswith("unnamed:")


def _find_path_column(df: pd.DataFrame, path: Path, path_column: str | None) -> str:
    seen = df.attrs.get("columns_seen", list(df.columns))
    if path_column is not None:
        if path_column in df.columns:
            return path_column
        raise MavlError(
            f"{path} has no column {path_column!r} (columns seen: {_quote_list(seen)})",
            path=path,
        )
    cols = {_canon(c): c for c in df.columns}
    for c in _PATH_COLUMNS:
        if c in cols:
            return cols[c]
    raise MavlError(
        f"{path} has no image path column (columns seen: {_quote_list(seen)}); "
        "name it Path, path, Image Index, image, filename or file, or pass the path column",
        path=path,
    )


def _check_duplicates(ids: list[str], paths: list[str], path: Path) -> None:
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


def _label_column(col: pd.Series, name, path: Path) -> np.ndarray:
    """One column as float64 with NaN for blank; MavlError on any other value."""
    if pd.api.types.is_bool_dtype(col):  # pandas reads True/False as bool
        raise _bad_value(path, name, str(col.iloc[0]), 0)
    if pd.api.types.is_numeric_dtype(col):
        vals = col.to_numpy(dtype=np.float64, na_value=np.nan)
        ok = np.isnan(vals) | (vals == 1.0) | (vals == 0.0) | (vals == -1.0)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            v = vals[i]
            raise _bad_value(path, name, f"{v:g}", i)
        return vals
    text = col.astype("string").str.strip()
    blank = (text.fillna("") == "").to_numpy(dtype=bool)
    nums = pd.to_numeric(text.mask(blank), errors="coerce")
    nums = nums.to_numpy(dtype=np.float64, na_value=np.nan)
    ok = blank | (nums == 1.0) | (nums == 0.0) | (nums == -1.0)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise _bad_value(path, name, str(text.iloc[i]), i)
    nums[blank] = np.nan
    return nums


def _bad_value(path: Path, name, value: str, i: int) -> MavlError:
    return MavlError(
        f"{path}: column {str(name)!r} has value {value!r} (row {i + 1}); "
        "label values must be 1, 0, -1 or blank",
        path=path,
    )


def _nih_values(findings: pd.Series) -> tuple[list[str], np.ndarray]:
    """Split ``Finding Labels`` into 0/1 columns (NaN for rows with no findings text).

    The column has a few hundred distinct strings over 100k rows, so the split
    is done once per distinct string and broadcast back with integer indexing.
    All 14 NIH findings always get a column (absence means negative in this
    format, and train/test files then share one label set); unknown names
    follow, sorted. ``No Finding`` is the absence of labels, not a label.
    """
    codes, uniques = pd.factorize(findings, use_na_sentinel=True)
    parsed = []
    extra: set[str] = set()
    known = set(NIH_LABELS)
    for u in uniques:
        parts = [p.strip() for p in str(u).split("|")]
        parts = [p for p in parts if p and p.lower() != NO_FINDING.lower()]
        parsed.append(parts)
        extra.update(p for p in parts if p not in known)
    names = list(NIH_LABELS) + sorted(extra)
    col = {n: j for j, n in enumerate(names)}
    table = np.zeros((len(uniques) + 1, len(names)), dtype=np.float64)
    for k, parts in enumerate(parsed):
        for p in parts:
            table[k, col[p]] = 1.0
    blank_text = np.array([str(u).strip() == "" for u in uniques] + [True])
    table[blank_text] = np.nan  # missing or empty findings text: treat as blank
    return names, table[codes]  # code -1 (NaN) picks the last, all-blank row


def _apply_policies(values: np.ndarray, uncertain: str, blank: float) -> tuple[np.ndarray, np.ndarray]:
    blank_cells = np.isnan(values)
    unc = values == -1.0
    y = values.copy()
    mask = np.ones(values.shape, dtype=bool)
    if uncertain == "ones":
        y[unc] = 1.0
    else:
        y[unc] = 0.0
        if uncertain == "ignore":
            mask[unc] = False
    if blank is None or np.isnan(blank):
        y[blank_cells] = 0.0
        mask[blank_cells] = False
    else:
        y[blank_cells] = float(blank)
    return y.astype(np.float32), mask


def _groups(df: pd.DataFrame, patient_col, ids: list[str]) -> list[str] | None:
    """Patient ids for grouped splits: a patient column, else derived from the path.

    Derivation covers CheXpert (``patient00001/``), MIMIC-CXR (``p10/p10000032/s.../``)
    and NIH file names (``00000001_000.png`` -> ``1``, matching NIH's ``Patient ID``).
    A row whose patient cell is blank falls back to the derived id, else its image id.
    """
    if patient_col is None:
        return _derive_groups(ids)
    values = [None if pd.isna(v) else str(v).strip() for v in df[patient_col].tolist()]
    if all(values):
        return values
    derived = _derive_groups(ids)
    return [
        v if v else (derived[k] if derived is not None else ids[k])
        for k, v in enumerate(values)
    ]


def _derive_groups(ids: list[str]) -> list[str] | None:
    for pattern, fix in ((_CHEXPERT_PATIENT, str), (_MIMIC_PATIENT, str),
                         (_NIH_FILE, lambda s: str(int(s)))):
        out = []
        for i in ids:
            m = pattern.search(i)
            if m is None:
                break
            out.append(fix(m.group(1)))
        else:
            return out
    return None


def _rename(table: LabelTable, label_map: dict[str, str]) -> LabelTable:
    new = [label_map.get(n, n) for n in table.names]
    seen: dict[str, str] = {}
    for old, n in zip(table.names, new):
        if n in seen:
            raise MavlError(
                f"label map turns both {seen[n]!r} and {old!r} of {table.file} into {n!r}; "
                "map at most one column to each name",
                path=table.file,
            )
        seen[n] = old
    table.names = new
    return table
