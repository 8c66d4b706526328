""":func:`read_labels`: whichever label file a data set ships -> one :class:`LabelTable`.

The file's header picks the adapter (see the package docstring); the adapter
says which columns to parse and how its cells become label values, and the
steps every data set shares (image ids, duplicates, uncertain and blank
policies, patient groups, renames) run here once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.datasets import chexpert, generic, mimic, nih
from mavl_cli.datasets.ids import normalize_many
from mavl_cli.datasets.sniff import (
    PATH_COLUMNS, PATIENT_COLUMNS, canon, check_duplicates, find_column, find_path_column, read_csv,
)
from mavl_cli.datasets.table import UNCERTAIN_POLICIES, LabelTable, apply_policies, rename
from mavl_cli.errors import MavlError

# Path-derived patient ids, tried in this order; the first rule that fits every id wins.
PATIENT_RULES = (chexpert.patient, mimic.patient, nih.patient)


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
    df = read_csv(path, lambda columns: _plan(columns, path_column))

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
    check_duplicates(ids, paths, path)

    if findings_col is not None:
        names, values = nih.findings_values(df[findings_col])
        source = nih.NAME
    else:
        names, values = generic.label_values(df, {path_col, patient_col}, path)
        source = chexpert.NAME if chexpert.claims(names) else generic.NAME

    y, mask = apply_policies(values, uncertain, blank)
    groups = _groups(df, patient_col, ids)
    table = LabelTable(ids=ids, names=names, y=y, mask=mask, paths=paths, groups=groups,
                       source=source, file=where)
    if label_map:
        table = rename(table, label_map)
    if labels is not None:
        table = table.select(list(labels))
    return table


def _plan(columns: list[str], path_column: str | None) -> tuple[list[str], set[str]]:
    """Which columns to parse: NIH needs only path, findings and patient; per-column files all labels."""
    if nih.detect({canon(c) for c in columns}):
        keep = set(PATH_COLUMNS + PATIENT_COLUMNS)
        usecols = [c for c in columns if canon(c) in keep or canon(c) in nih.FINDINGS_COLUMNS or c == path_column]
        return usecols, {c for c in usecols if canon(c) in keep or c == path_column}
    return generic.plan(columns, path_column)


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
