"""Data-set adapters: every label file and image layout users hold, read into one shape.

One module per data set owns its quirks: file detection, label vocabulary,
id and path rules, patient id, view column and uncertain-label convention.

* :mod:`~mavl_cli.datasets.chexpert` -- CheXpert ``train.csv``/``valid.csv``
* :mod:`~mavl_cli.datasets.nih` -- NIH ChestX-ray14 ``Data_Entry_2017.csv``
* :mod:`~mavl_cli.datasets.mimic` -- MIMIC-CXR(-JPG) label, metadata and split files
* :mod:`~mavl_cli.datasets.generic` -- any ``path,label1,label2,...`` CSV

Shared modules: :mod:`~.table` (:class:`LabelTable`), :mod:`~.sniff` (reading
CSVs, column names), :mod:`~.labelmap` (label names across data sets),
:mod:`~.ids` (path -> image id), :mod:`~.inputs` (what to embed), and
:mod:`~.reader` (:func:`read_labels`, which picks the adapter).

Names below are imported on first use, so ``import mavl_cli.datasets`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_labels": "reader",
    "derive_groups": "reader",
    "LabelTable": "table",
    "UNCERTAIN_POLICIES": "table",
    "normalize_id": "ids",
    "rel_id": "ids",
    "read_label_map": "labelmap",
    "match_label_names": "labelmap",
    "NIH_TO_CHEXPERT": "labelmap",
    "ImageItem": "inputs",
    "collect_inputs": "inputs",
    "list_images": "inputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mavl_cli.datasets' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mavl_cli.datasets.{module}"), name)
