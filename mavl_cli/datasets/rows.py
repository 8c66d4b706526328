"""The rows a data-set adapter returns: image ids, label values, and the optional patient/view columns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mavl_cli.datasets import generic


@dataclass
class Rows:
    """What an adapter hands back: one row per image, label values still raw (1, 0, -1, NaN)."""

    paths: list[str]
    names: list[str]
    values: np.ndarray
    patients: list[str] | None = None
    views: list[str] | None = None
    splits: list[str] | None = None
    source: str = generic.NAME
    suffix_aliases: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # image id -> why it has no row
    view_column: str | None = None
    ids: list[str] | None = None  # normalised and checked for duplicates already, when set
