"""NIH ChestX-ray14 (112k images): ``Data_Entry_2017.csv`` with pipe-separated ``Finding Labels``.

Columns: ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
Patient Gender, View Position, OriginalImage[Width, Height], ...``. Images are
``00000001_000.png`` spread over ``images_001/images`` ... ``images_012/images``
(the listing finds them by unique file name). Patient: ``Patient ID``, or the
first eight digits of the file name. View: ``View Position`` (PA/AP). There is
no uncertain label: a finding absent from the list is negative, and
``No Finding`` is the absence of findings, not a label.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

NAME = "nih"

LABELS: tuple[str, ...] = (
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

NO_FINDING = "No Finding"
FINDINGS_COLUMNS = ("finding labels",)  # canonical names (see sniff.canon)
VIEW_COLUMNS = ("view position",)

_FILE = re.compile(r"(?:^|/)(\d{8})_\d{3}\.png$", re.IGNORECASE)


def detect(canon_columns: set[str]) -> bool:
    return bool(canon_columns & set(FINDINGS_COLUMNS))


def patient(image_id: str) -> str | None:
    """``00000001_000.png`` -> ``1``, matching NIH's ``Patient ID`` column."""
    m = _FILE.search(image_id)
    return str(int(m.group(1))) if m else None


def findings_values(findings: pd.Series) -> tuple[list[str], np.ndarray]:
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
    known = set(LABELS)
    for u in uniques:
        parts = [p.strip() for p in str(u).split("|")]
        parts = [p for p in parts if p and p.lower() != NO_FINDING.lower()]
        parsed.append(parts)
        extra.update(p for p in parts if p not in known)
    names = list(LABELS) + sorted(extra)
    col = {n: j for j, n in enumerate(names)}
    table = np.zeros((len(uniques) + 1, len(names)), dtype=np.float64)
    for k, parts in enumerate(parsed):
        for p in parts:
            table[k, col[p]] = 1.0
    blank_text = np.array([str(u).strip() == "" for u in uniques] + [True])
    table[blank_text] = np.nan  # missing or empty findings text: treat as blank
    return names, table[codes]  # code -1 (NaN) picks the last, all-blank row
