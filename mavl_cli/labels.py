"""Compatibility names for code written before :mod:`mavl_cli.datasets`.

Label reading now lives in the data-set adapters; import from
``mavl_cli.datasets`` (or its modules) in new code.
"""

from __future__ import annotations

from mavl_cli.datasets.chexpert import LABELS as CHEXPERT_LABELS
from mavl_cli.datasets.chexpert import NO_FINDING
from mavl_cli.datasets.ids import normalize_id
from mavl_cli.datasets.ids import normalize_many as _normalize_many
from mavl_cli.datasets.labelmap import NIH_TO_CHEXPERT, match_label_names, read_label_map
from mavl_cli.datasets.nih import LABELS as NIH_LABELS
from mavl_cli.datasets.reader import read_labels
from mavl_cli.datasets.table import UNCERTAIN_POLICIES, LabelTable

__all__ = [
    "CHEXPERT_LABELS", "NIH_LABELS", "NIH_TO_CHEXPERT", "NO_FINDING", "UNCERTAIN_POLICIES", "LabelTable",
    "_normalize_many", "match_label_names", "normalize_id", "read_label_map", "read_labels",
]
