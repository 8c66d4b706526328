"""CheXpert (Stanford, 224k images): one column per finding, 1 / 0 / -1 (uncertain) / blank.

Files: ``train.csv`` / ``valid.csv`` with ``Path,Sex,Age,Frontal/Lateral,AP/PA,<14 findings>``.
Paths start with the release folder (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``),
which ids drop so either download matches images under a separately given root.
Patient: the ``patientNNNNN`` folder. View: ``Frontal/Lateral`` and ``AP/PA``.
Uncertain convention: ``-1`` (resolved by ``--uncertain``). Reading goes through
the per-column reader in :mod:`mavl_cli.datasets.reader`; a file is called
CheXpert when at least half of its label columns carry CheXpert names.
"""

from __future__ import annotations

import re

NAME = "chexpert"

LABELS: tuple[str, ...] = (
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

NO_FINDING = "No Finding"
UNCERTAIN_VALUE = -1.0
# canonical (see sniff.canon) names of the view columns
VIEW_COLUMNS = ("ap/pa", "frontal/lateral")

_RELEASE_DIR = re.compile(r"(?:^|/)chexpert-v[0-9.]+(?:-small)?/", re.IGNORECASE)
_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")


def strip_release_dir(p: str) -> str:
    """Drop everything up to and including a ``CheXpert-v1.0[-small]/`` folder."""
    m = _RELEASE_DIR.search(p)
    return p[m.end():] if m else p


def may_hold_release_dir(text: str) -> bool:
    return "chexpert-v" in text.lower()  # a substring scan beats a regex scan on 200k paths


def release_prefix(p: str) -> str | None:
    """The part of ``p`` that :func:`strip_release_dir` would drop, or None."""
    m = _RELEASE_DIR.search(p)
    return p[:m.end()] if m else None


def patient(image_id: str) -> str | None:
    m = _PATIENT.search(image_id)
    return m.group(1) if m else None


def claims(names: list[str]) -> bool:
    """Whether per-column label names look like CheXpert's vocabulary."""
    known = sum(n in LABELS for n in names)
    return known * 2 >= len(names)
