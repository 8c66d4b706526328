"""Which rows of a data set a command works on: ``--split``, ``--views``, ``--vote`` and the side files.

:class:`LabelSource` is a label file path plus these options. It behaves like
the path it wraps (``str()``, ``os.fspath()``, ``Path()``), so every command
that takes ``--labels FILE`` passes it through unchanged to
:func:`~mavl_cli.datasets.reader.read_labels`, which applies the options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from mavl_cli.core.errors import MavlError

VOTES = ("any", "majority")


@dataclass(frozen=True)
class DatasetOptions:
    metadata: str | None = None  # MIMIC-CXR image metadata (dicom_id, study_id, ViewPosition)
    split_file: str | None = None  # MIMIC-CXR official split (dicom_id, split)
    split: str | None = None  # keep rows of this split
    views: tuple[str, ...] | None = None  # keep rows whose view column is one of these (case-insensitive)
    vote: str | None = None  # VinDr-CXR: several readers per image -> any | majority

    def __post_init__(self) -> None:
        if self.vote is not None and self.vote not in VOTES:
            raise MavlError(f"--vote must be one of {', '.join(VOTES)}, not {self.vote!r}")
        if self.views is not None and not self.views:
            raise MavlError("--views needs at least one view name, e.g. --views PA,AP")

    def given(self) -> bool:
        return any(v is not None for v in (self.metadata, self.split_file, self.split, self.views, self.vote))

    def without_split(self) -> "DatasetOptions":
        return replace(self, split=None)

    def describe(self) -> str:
        """The row filters as they were asked for, for messages: ``split train, views PA,AP``."""
        parts = []
        if self.split is not None:
            parts.append(f"split {self.split}")
        if self.views is not None:
            parts.append(f"views {','.join(self.views)}")
        return ", ".join(parts)


def parse_views(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    views = tuple(v.strip() for v in text.split(",") if v.strip())
    if not views:
        raise MavlError(f"--views {text!r} names no view; use e.g. --views PA,AP")
    return views


class LabelSource(os.PathLike):
    """A label file and the dataset options to read it with."""

    def __init__(self, path: str | os.PathLike, options: DatasetOptions | None = None) -> None:
        self.path = str(path)
        self.options = options or DatasetOptions()

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"LabelSource({self.path!r}, {self.options!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LabelSource):
            return (self.path, self.options) == (other.path, other.options)
        return isinstance(other, (str, Path)) and not self.options.given() and str(other) == self.path

    def __hash__(self) -> int:
        return hash((self.path, self.options))


def unpack(source: "str | os.PathLike | LabelSource", options: DatasetOptions | None) -> tuple[Path, DatasetOptions]:
    """(path, options) of a label argument; explicit ``options`` win over the source's own."""
    if isinstance(source, LabelSource):
        return Path(source.path), options or source.options
    return Path(source), options or DatasetOptions()


def source(path: str | None, options: DatasetOptions) -> "str | LabelSource | None":
    """``path`` as given when no dataset option is set (so nothing changes), else a LabelSource."""
    if path is None or str(path) == "-" or not options.given():
        return path
    return LabelSource(path, options)
