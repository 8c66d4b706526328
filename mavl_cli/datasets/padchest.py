"""PadChest (BIMCV, 160k images): findings as a text list per image.

File: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz`` with
``ImageID, ImageDir, StudyID, PatientID, ..., Projection, ..., Labels, ...``;
``Labels`` holds a Python-style list, ``['pleural effusion', 'cardiomegaly']``.
Images: ``{ImageDir}/{ImageID}`` (16-bit PNGs; the listing also finds them by
unique file name). Patient: ``PatientID``. View: ``Projection`` (PA, L, AP,
AP_horizontal, COSTAL, ...). No uncertain labels: a finding absent from the
list is negative; a blank or empty list is unlabelled (blank).

PadChest's lower-case findings are renamed where a CheXpert or NIH label
means the same finding (:data:`TO_STANDARD`); every other finding keeps its
PadChest name, so nothing is lost.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.rows import Rows
from mavl_cli.datasets.sniff import PATIENT_COLUMNS, canon, find_column

NAME = "padchest"
VIEW_COLUMNS = ("projection",)

# PadChest finding -> the CheXpert name (else the NIH name) of the same finding.
TO_STANDARD: dict[str, str] = {
    "normal": "No Finding",
    "pleural effusion": "Pleural Effusion",
    "cardiomegaly": "Cardiomegaly",
    "atelectasis": "Atelectasis",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "pulmonary edema": "Edema",
    "emphysema": "Emphysema",
    "pulmonary fibrosis": "Fibrosis",
    "hiatal hernia": "Hernia",
    "infiltrates": "Infiltration",
    "nodule": "Nodule",
    "pulmonary mass": "Mass",
    "pleural thickening": "Pleural_Thickening",
}

_ID, _DIR, _LABELS = "imageid", "imagedir", "labels"


def detect(canon_columns: set[str]) -> bool:
    return {_ID, _LABELS} <= canon_columns


def plan(columns: list[str], extra: set[str]) -> tuple[list[str], set[str]]:
    keep = {_ID, _DIR, _LABELS, *PATIENT_COLUMNS, *extra}
    use = [c for c in columns if canon(c) in keep]
    return use, set(use)


def parse_list(text) -> list[str] | None:
    """``"['a', 'b']"`` -> ``['a', 'b']``; None for blank or empty lists (unlabelled)."""
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return None
    s = str(text).strip()
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        value = s.strip("[]").split(",")
    if isinstance(value, str):
        value = [value]
    items = [str(v).strip().strip("'\"").strip() for v in value]
    items = [v for v in items if v]
    return items or None


def read(df: pd.DataFrame, path: Path):
    id_col, dir_col, lab_col = find_column(df, (_ID,)), find_column(df, (_DIR,)), find_column(df, (_LABELS,))
    image = df[id_col].astype("string").str.strip()
    if image.isna().any() or (image == "").any():
        k = int(np.flatnonzero((image.isna() | (image == "")).to_numpy())[0])
        raise MavlError(f"{path}: column {id_col!r} is blank in row {k + 1}; every row needs an image id", path=path)
    paths = image.astype(object)
    if dir_col is not None:
        d = df[dir_col].astype("string").str.strip().str.replace(r"\.0$", "", regex=True).fillna("")
        paths = (d + "/" + image).where(d != "", image).astype(object)
    codes, uniques = pd.factorize(df[lab_col], use_na_sentinel=True)
    parsed = [parse_list(u) for u in uniques]
    names: list[str] = []
    for items in parsed:
        for v in items or ():
            n = TO_STANDARD.get(v.lower(), v)
            if n not in names:
                names.append(n)
    standard = [n for n in TO_STANDARD.values() if n in names]
    names = standard + sorted(n for n in names if n not in standard)
    col = {n: j for j, n in enumerate(names)}
    table = np.zeros((len(uniques) + 1, len(names)), dtype=np.float64)
    for k, items in enumerate(parsed):
        if items is None:
            table[k] = np.nan
        for v in items or ():
            table[k, col[TO_STANDARD.get(v.lower(), v)]] = 1.0
    table[-1] = np.nan  # blank Labels cell
    if not names:
        raise MavlError(f"{path}: column {lab_col!r} names no finding in any row", path=path)
    patient_col = find_column(df, PATIENT_COLUMNS)
    patients = None
    if patient_col is not None:
        pid = df[patient_col].astype("string").str.strip().fillna("")
        patients = pid.where(pid != "", image).astype(object).tolist()
    view_col = find_column(df, VIEW_COLUMNS)
    views = None if view_col is None else df[view_col].astype("string").str.strip().fillna("").tolist()
    return Rows(paths=paths.tolist(), names=names, values=table[codes], patients=patients, views=views,
                source=NAME, view_column=None if view_col is None else str(view_col))
