""":func:`read_labels`: whichever label file a data set ships -> one :class:`LabelTable`.

The file's header picks the adapter (see the package docstring); the adapter
turns the file (and its side files) into :class:`Rows`, and the steps every
data set shares (image ids, duplicates, uncertain and blank policies, patient
groups, ``--split``/``--views`` filters, renames) run here once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets import chexpert, generic, mimic, nih, padchest, vindr
from mavl_cli.datasets.ids import normalize_many
from mavl_cli.datasets.options import DatasetOptions, unpack
from mavl_cli.datasets.rows import Rows
from mavl_cli.datasets.sniff import (
    PATH_COLUMNS,
    PATIENT_COLUMNS,
    canon,
    check_duplicates,
    find_column,
    find_path_column,
    read_csv,
)
from mavl_cli.datasets.table import (
    UNCERTAIN_POLICIES,
    LabelTable,
    apply_policies,
    rename,
)

# Path-derived patient ids, tried in this order; the first rule that fits every id wins.
PATIENT_RULES = (chexpert.patient, mimic.patient, nih.patient)


# View columns of path-column files, in order of preference per row (first non-blank wins).
VIEW_COLUMNS = (*chexpert.VIEW_COLUMNS, *nih.VIEW_COLUMNS, *generic.VIEW_COLUMNS, *padchest.VIEW_COLUMNS)


SPLIT_COLUMNS = ("split",)


def read_labels(
    path,
    uncertain: str = "zeros",
    blank: float = 0.0,
    label_map: dict[str, str] | None = None,
    path_column: str | None = None,
    labels: list[str] | None = None,
    options: DatasetOptions | None = None,
) -> LabelTable:
    """Read a CheXpert-style, NIH ``Data_Entry``, MIMIC-CXR or generic label CSV (``.csv.gz`` too).

    ``uncertain`` decides what -1 becomes: ``ones`` -> 1, ``zeros`` -> 0,
    ``ignore`` -> masked out. Blank cells become ``blank`` (NaN masks them out).
    ``label_map`` renames labels after reading; ``labels`` then keeps only
    those names, in that order. Non-label columns (demographics, view, split,
    study ids) are skipped when their name is known; any other column must
    hold only label values, so a typo'd value is reported rather than guessed.
    ``options`` (or those of a :class:`~mavl_cli.datasets.options.LabelSource`
    passed as ``path``) give side files and keep only some splits or views.
    """
    path, opts = unpack(path, options)
    where = str(path)
    if uncertain not in UNCERTAIN_POLICIES:
        raise MavlError(
            f"unknown uncertain policy {uncertain!r} for {where}; choose one of "
            f"{', '.join(UNCERTAIN_POLICIES)}",
            path=path,
        )
    picked: dict[str, object] = {}
    df = read_csv(path, lambda columns: _plan(columns, path_column, opts, picked))
    adapter = picked["adapter"]
    if opts.vote is not None and adapter is not vindr:
        raise MavlError(f"--vote: {path} has one reader per image (--vote is for VinDr-CXR's several readers)",
                        path=path)
    if adapter is mimic:
        rows = mimic.read(df, path, opts)
    elif adapter is vindr:
        rows = vindr.read(df, path, opts)
    elif adapter is padchest:
        rows = padchest.read(df, path)
    else:
        rows = _path_rows(df, path, path_column, opts)

    ids = rows.ids
    if ids is None:
        ids = normalize_many(rows.paths)
        check_duplicates(ids, rows.paths, path)
    y, mask = apply_policies(rows.values, uncertain, blank)
    groups = rows.patients if rows.patients is not None else derive_groups(ids)
    table = LabelTable(ids=ids, names=rows.names, y=y, mask=mask, paths=rows.paths, groups=groups,
                       source=rows.source, file=where, dropped=dict(rows.dropped),
                       suffix_aliases=dict(rows.suffix_aliases))
    table = _filter(table, rows, opts, path)
    if label_map:
        table = rename(table, label_map)
    if labels is not None:
        table = table.select(list(labels))
    return table


def _plan(columns: list[str], path_column: str | None, opts: DatasetOptions,
          picked: dict[str, object]) -> tuple[list[str], set[str]]:
    """Pick the adapter from the header, and the columns it needs parsed."""
    canon_cols = {canon(c) for c in columns}
    extra = set(VIEW_COLUMNS if opts.views is not None else ()) | set(SPLIT_COLUMNS if opts.split is not None else ())
    if path_column is None:
        for adapter in (mimic, vindr):
            if adapter.detect(canon_cols):
                picked["adapter"] = adapter
                return adapter.plan(columns)
        if padchest.detect(canon_cols):
            picked["adapter"] = padchest
            return padchest.plan(columns, extra)
    if nih.detect(canon_cols):
        picked["adapter"] = nih
        keep = set(PATH_COLUMNS + PATIENT_COLUMNS)
        usecols = [c for c in columns if canon(c) in keep or canon(c) in nih.FINDINGS_COLUMNS
                   or canon(c) in extra or c == path_column]
        return usecols, {c for c in usecols if canon(c) in keep or canon(c) in extra or c == path_column}
    picked["adapter"] = generic
    usecols, text = generic.plan(columns, path_column)
    more = [c for c in columns if canon(c) in extra and c not in usecols]
    return usecols + more, text | set(more) | {c for c in usecols if canon(c) in extra}


def _path_rows(df: pd.DataFrame, path: Path, path_column: str | None, opts: DatasetOptions) -> Rows:
    """Files with an image path column: CheXpert, NIH, generic."""
    where = str(path)
    path_col = find_path_column(df, path, path_column)
    findings_col = find_column(df, nih.FINDINGS_COLUMNS)
    patient_col = find_column(df, PATIENT_COLUMNS, exclude=(path_col,))
    raw_paths = df[path_col]
    if raw_paths.isna().any():
        row = int(np.flatnonzero(raw_paths.isna().to_numpy())[0]) + 1
        raise MavlError(f"{where}: column {path_col!r} is blank in row {row}; every row needs an image path",
                        path=path)
    paths = [str(p) for p in raw_paths.tolist()]
    ids = normalize_many(paths)
    check_duplicates(ids, paths, path)  # before the values, so a repeated row is named as such
    skip = {path_col, patient_col}
    skip |= {c for c in df.columns if canon(c) in VIEW_COLUMNS + SPLIT_COLUMNS}
    if findings_col is not None:
        names, values = nih.findings_values(df[findings_col])
        source = nih.NAME
    else:
        names, values = generic.label_values(df, skip, path)
        source = chexpert.NAME if chexpert.claims(names) else generic.NAME
    views, view_column = _views(df)
    split_col = find_column(df, SPLIT_COLUMNS)
    splits = None if split_col is None else _stripped(df[split_col])
    return Rows(paths=paths, names=names, values=values, patients=_groups(df, patient_col, ids),
                views=views, splits=splits, source=source, view_column=view_column, ids=ids)


def _views(df: pd.DataFrame) -> tuple[list[str] | None, str | None]:
    cols = [c for name in VIEW_COLUMNS for c in df.columns if canon(c) == name]
    if not cols:
        return None, None
    first = _stripped(df[cols[0]])
    for c in cols[1:]:  # CheXpert: AP/PA, and Frontal/Lateral where AP/PA is blank (laterals)
        first = [v or w for v, w in zip(first, _stripped(df[c]))]
    return first, "/".join(str(c) for c in cols)


def _stripped(col: pd.Series) -> list[str]:
    return [v.strip() if isinstance(v, str) else "" for v in col.tolist()]


def _filter(table: LabelTable, rows: Rows, opts: DatasetOptions, path: Path) -> LabelTable:
    """Keep the rows ``--split`` and ``--views`` ask for; remember why the others went.

    Work is per distinct value (a handful of views and splits), not per row.
    """
    if opts.split is None and opts.views is None:
        return table
    keep = np.ones(len(table), dtype=bool)
    why = np.full(len(table), None, dtype=object)
    if opts.views is not None:
        if rows.views is None:
            raise MavlError(f"--views: {path} has no view column (looked for AP/PA, Frontal/Lateral, "
                            "View Position, ViewPosition, Projection)", path=path)
        wanted = {v.upper() for v in opts.views}
        codes, uniques = pd.factorize(pd.Series(rows.views, dtype=object))
        out = np.array([u.upper() not in wanted for u in uniques], dtype=bool)[codes]
        reason = np.array([f"its view {u or '(blank)'} is not one of --views {','.join(opts.views)}"
                           for u in uniques], dtype=object)[codes]
        keep &= ~out
        why[out] = reason[out]
    if opts.split is not None:
        if rows.splits is None:
            raise MavlError(f"--split: {path} has no split column", path=path)
        codes, uniques = pd.factorize(pd.Series(rows.splits, dtype=object))
        out = np.array([u.lower() != opts.split.lower() for u in uniques], dtype=bool)[codes]
        reason = np.array([f"it is in split {u or '(blank)'}, not {opts.split}" for u in uniques], dtype=object)[codes]
        first = out & keep  # a row left out by its view keeps that reason
        why[first] = reason[first]
        keep &= ~out
    if not keep.any():
        raise MavlError(f"{path}: no image is left after {opts.describe()}", path=path)
    gone = np.flatnonzero(~keep)
    table.dropped.update(zip([table.ids[k] for k in gone], why[gone].tolist()))
    return table.take(np.flatnonzero(keep))


def _groups(df: pd.DataFrame, patient_col, ids: list[str]) -> list[str] | None:
    """Patient ids for grouped splits: a patient column, else derived from the path.

    Derivation covers CheXpert (``patient00001/``), MIMIC-CXR (``p10/p10000032/s.../``)
    and NIH file names (``00000001_000.png`` -> ``1``, matching NIH's ``Patient ID``).
    A row whose patient cell is blank falls back to the derived id, else its image id.
    """
    if patient_col is None:
        return derive_groups(ids)
    values = [None if pd.isna(v) else str(v).strip() for v in df[patient_col].tolist()]
    if all(values):
        return values
    derived = derive_groups(ids)
    return [
        v if v else (derived[k] if derived is not None else ids[k])
        for k, v in enumerate(values)
    ]


def derive_groups(ids: list[str]) -> list[str] | None:
    """Patient ids from image ids by the first data-set rule that fits all of them, else None."""
    for rule in PATIENT_RULES:
        out = []
        for i in ids:
            g = rule(i)
            if g is None:
                break
            out.append(g)
        else:
            return out
    return None
