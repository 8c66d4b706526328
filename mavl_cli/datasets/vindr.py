"""VinDr-CXR (Vingroup, 18k images): 0/1 per finding, several radiologists per training image.

Files: ``annotations/image_labels_train.csv`` (``image_id, rad_id, <28 findings>``,
three readers per image) and ``annotations/image_labels_test.csv`` (one
consensus row per image). Images: ``train/{image_id}.dicom`` and
``test/{image_id}.dicom`` beside ``annotations/`` (the listing also finds
them by unique file name). Readers are combined per image by ``--vote``:
``any`` (default: positive when any reader marks it) or ``majority`` (more
than half of the image's readers). Patient: not released; each image is its
own group. No view column (all frontal), no uncertain labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets import generic
from mavl_cli.datasets.options import DatasetOptions
from mavl_cli.datasets.rows import Rows
from mavl_cli.datasets.sniff import PATH_COLUMNS, canon, find_column, is_metadata

NAME = "vindr"
SUFFIX = ".dicom"
_ID, _RAD = "image id", "rad id"


def detect(canon_columns: set[str]) -> bool:
    return _ID in canon_columns and "labels" not in canon_columns and not canon_columns & set(PATH_COLUMNS)


def plan(columns: list[str]) -> tuple[list[str], set[str]]:
    text = {c for c in columns if canon(c) in (_ID, _RAD)}
    return [c for c in columns if c in text or not is_metadata(c)], text


def read(df: pd.DataFrame, path: Path, opts: DatasetOptions):
    id_col, rad_col = find_column(df, (_ID,)), find_column(df, (_RAD,))
    image = df[id_col].astype("string").str.strip()
    if image.isna().any() or (image == "").any():
        k = int(np.flatnonzero((image.isna() | (image == "")).to_numpy())[0])
        raise MavlError(f"{path}: column {id_col!r} is blank in row {k + 1}; every row needs an image id", path=path)
    names, values = generic.label_values(df, {id_col, rad_col}, path)
    if (values == -1.0).any():
        j = int(np.flatnonzero((values == -1.0).any(axis=0))[0])
        raise MavlError(f"{path}: column {names[j]!r} has value -1; VinDr-CXR labels are 0 or 1", path=path)
    codes, uniques = pd.factorize(image)
    n = len(uniques)
    readers = np.bincount(codes, minlength=n)
    if opts.vote is None and readers.max() > 1 and rad_col is None:
        k = int(np.flatnonzero(readers > 1)[0])
        raise MavlError(f"{path} lists image {uniques[k]} more than once and has no rad_id column", path=path)
    votes = np.zeros((n, len(names)))
    np.add.at(votes, codes, np.nan_to_num(values, nan=0.0))
    rated = np.zeros((n, len(names)))
    np.add.at(rated, codes, ~np.isnan(values))
    if (opts.vote or "any") == "any":
        y = (votes > 0).astype(np.float64)
    else:
        y = (votes * 2 > rated).astype(np.float64)
    y[rated == 0] = np.nan
    folder = "train/" if "train" in path.name.lower() else ("test/" if "test" in path.name.lower() else "")
    ids = [f"{folder}{u}{SUFFIX}" for u in uniques]
    return Rows(paths=ids, names=names, values=y, source=NAME)
