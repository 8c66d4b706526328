"""The one shape every data set's labels become: :class:`LabelTable`.

Image ids, label names, a 0/1 matrix and a mask saying which entries count.
Everything downstream (training, evaluation, alignment with embedding files)
works on that one shape; the adapters only decide how a file becomes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.ids import normalize_many
from mavl_cli.datasets.sniff import quote_list

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


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
    # image id -> why the data set holds that image but this table has no row for it
    # (a MIMIC study without labels, a view or split left out by --views/--split)
    dropped: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # other file suffixes the same images may carry, e.g. {".dcm": ".jpg"} for MIMIC-CXR's DICOM release
    suffix_aliases: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows) -> "LabelTable":
        """These rows (indices), in this order."""
        r = np.asarray(rows, dtype=np.int64)
        return replace(self, ids=[self.ids[i] for i in r], y=self.y[r], mask=self.mask[r],
                       paths=[self.paths[i] for i in r],
                       groups=None if self.groups is None else [self.groups[i] for i in r])

    def select(self, names: list[str]) -> "LabelTable":
        """Keep these label columns, in this order, matched by name (not position)."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise MavlError(
                f"label(s) {quote_list(missing)} not found in {self.file or 'the label table'}; "
                f"available labels: {quote_list(self.names)}",
                path=self.file,
            )
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        if dupes:
            raise MavlError(f"label(s) {quote_list(dupes)} requested more than once", path=self.file)
        cols = [index[n] for n in names]
        return replace(
            self, ids=list(self.ids), names=list(names), y=self.y[:, cols].copy(),
            mask=self.mask[:, cols].copy(), paths=list(self.paths),
            groups=None if self.groups is None else list(self.groups),
        )

    def align(self, ids: list[str]) -> "LabelTable":
        """Reorder rows to follow ``ids`` (e.g. the ids stored with embeddings).

        Each id is matched first on its normalised form, then on the longest
        common path suffix (so ids relative to another root, or bare file
        names, still match when that suffix is unique). The returned table's
        ``ids`` are the ``ids`` given, so rows zip with the embeddings.
        """
        wanted = normalize_many([str(i) for i in ids])
        rows = match_rows(wanted, self.ids, self.suffix_aliases)
        missing = [k for k, r in enumerate(rows) if r < 0]
        if missing:
            shown = ", ".join(repr(ids[k]) for k in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            reason = next(((ids[k], self.dropped[w]) for k in missing
                           for w in _aliases(wanted[k], self.suffix_aliases) if w in self.dropped), None)
            why = f"; {reason[0]!r}: {reason[1]}" if reason else ""
            raise MavlError(
                f"{len(missing)} of {len(ids)} image id(s) have no row in the label file "
                f"{self.file or ''}: {shown}{more}{why}".replace("label file :", "label file:"),
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
        return replace(
            self, ids=list(ids), y=self.y[r], mask=self.mask[r],
            paths=[self.paths[i] for i in rows],
            groups=None if self.groups is None else [self.groups[i] for i in rows],
        )


def _aliases(image_id: str, suffix_aliases: dict[str, str]) -> list[str]:
    """``image_id`` and, if its suffix is an alias, the id with the table's own suffix."""
    out = [image_id]
    for alias, own in suffix_aliases.items():
        if image_id.lower().endswith(alias):
            out.append(image_id[: -len(alias)] + own)
    return out


def match_rows(wanted: list[str], have: list[str], suffix_aliases: dict[str, str] | None = None) -> list[int]:
    """Row index in ``have`` for each of ``wanted`` (both normalised), -1 if none.

    Exact matches first; the remaining ids fall back to the longest common
    path suffix, counted in whole path components. A suffix shared by two
    label rows is ambiguous and never used. Ids ending in a ``suffix_aliases``
    key (``.dcm``) that match nothing are tried again with the table's suffix.
    """
    exact = {h: i for i, h in enumerate(have)}
    rows = [exact.get(w, -1) for w in wanted]
    if all(r >= 0 for r in rows):
        return rows
    if suffix_aliases:
        todo = [k for k, r in enumerate(rows) if r < 0 and len(_aliases(wanted[k], suffix_aliases)) > 1]
        if todo:
            again = match_rows([_aliases(wanted[k], suffix_aliases)[1] for k in todo], have)
            for k, r in zip(todo, again):
                rows[k] = r
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


def apply_policies(values: np.ndarray, uncertain: str, blank: float) -> tuple[np.ndarray, np.ndarray]:
    """-1 -> 1 (``ones``), 0 (``zeros``) or masked (``ignore``); NaN -> ``blank`` (NaN: masked)."""
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


def rename(table: LabelTable, label_map: dict[str, str]) -> LabelTable:
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
