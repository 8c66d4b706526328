"""Joining embedding files with label files, by image id and by label name.

Labels are always matched by *name* (never by column position) and rows by
image id, so a reordered CSV or a shuffled folder gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.labelmap import known_renames, rename_note
from mavl_cli.datasets.reader import read_labels
from mavl_cli.datasets.table import rename
from mavl_cli.io.mavlfile import MavlFile


@dataclass
class Labelled:
    x: np.ndarray  # [N, D] features
    y: np.ndarray  # [N, L]
    mask: np.ndarray  # [N, L] bool
    ids: list[str]
    names: list[str]
    groups: list[str] | None
    labels_file: str
    notes: list[str] = field(default_factory=list)  # e.g. label names mapped across data sets

    def split(self) -> Any:
        return Split(self.x, self.y, self.mask)

    def subset(self, rows: np.ndarray) -> "Labelled":
        return Labelled(
            self.x[rows], self.y[rows], self.mask[rows], [self.ids[i] for i in rows], self.names,
            None if self.groups is None else [self.groups[i] for i in rows], self.labels_file,
        )


def load_labelled(
    emb: MavlFile,
    labels_csv: str | Path,
    names: list[str] | None = None,
    uncertain: str = "zeros",
    label_map: dict[str, str] | None = None,
    path_column: str | None = None,
    x: np.ndarray | None = None,
) -> Labelled:
    """Rows of ``labels_csv`` aligned to ``emb``'s image ids; columns selected by ``names``.

    Names missing from the label file that another data set spells differently
    (``Effusion`` for ``Pleural Effusion``) are read under ``names``, with a note.
    """

    if names is not None and not names:
        raise MavlError(f"{labels_csv}: no label names were selected (the label list is empty)", path=labels_csv)
    table = read_labels(labels_csv, uncertain=uncertain, label_map=label_map, path_column=path_column)
    notes: list[str] = []
    if names is not None:
        renames = known_renames(names, table.names)
        if renames:
            table = rename(table, renames)
            notes.append(rename_note(renames, labels_csv))
        missing = [n for n in names if n not in table.names]
        if missing:
            raise MavlError(
                f"{labels_csv}: label(s) {', '.join(repr(m) for m in missing)} are not columns of this label file "
                f"(it has {', '.join(repr(n) for n in table.names)}); use --label-map to rename",
                path=labels_csv,
            )
        table = table.select(names)
    table = table.align(emb.ids())
    feats = emb.tensors["features"].astype(np.float32) if x is None else x
    return Labelled(feats, table.y.astype(np.float32), table.mask.astype(bool), table.ids, table.names, table.groups,
                    str(labels_csv), notes)


@dataclass
class Split:
    """Features, 0/1 targets and the known-label mask of one training or validation split."""

    x: np.ndarray  # [N, D]
    y: np.ndarray  # [N, L] float 0/1
    mask: np.ndarray  # [N, L] bool
