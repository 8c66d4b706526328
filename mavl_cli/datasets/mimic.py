"""MIMIC-CXR-JPG and MIMIC-CXR (DICOM): study-level labels joined with image metadata and the split.

Files (all gzipped CSVs, usually side by side):

* labels: ``mimic-cxr-2.0.0-chexpert.csv.gz`` or ``mimic-cxr-2.0.0-negbio.csv.gz``:
  ``subject_id, study_id`` then 14 CheXpert observations with 1.0, 0.0, -1.0 (uncertain) or blank;
* metadata: ``mimic-cxr-2.0.0-metadata.csv.gz``: ``dicom_id, subject_id, study_id, ..., ViewPosition, ...``;
* split: ``mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id, study_id, subject_id, split`` (train/validate/test).

Images: ``files/p{first two digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.jpg``
(``.dcm`` in the DICOM release; the listing tries both). Every image of a
study gets the study's labels. Patient: ``p{subject_id}``. View: the
metadata's ``ViewPosition`` (PA, AP, LATERAL, LL, ...). Uncertain: ``-1``.
Metadata images whose study has no label row are left out (a few exist in
the real release) and named as such if an embedding file holds one; a
labelled study without any image means the files do not belong together.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets import generic
from mavl_cli.datasets.options import DatasetOptions
from mavl_cli.datasets.rows import Rows
from mavl_cli.datasets.sniff import (
    PATH_COLUMNS,
    canon,
    find_column,
    is_metadata,
    quote_list,
    read_csv,
)

NAME = "mimic"
METADATA_NAMES = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
SPLIT_NAMES = ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")
SPLITS = ("train", "validate", "test")
SUFFIXES = (".jpg", ".dcm")  # MIMIC-CXR-JPG, MIMIC-CXR (DICOM)

_PATIENT = re.compile(r"(?:^|/)p\d{2}/(p\d+)/s\d+/")
_SUBJECT, _STUDY, _DICOM, _VIEW, _SPLIT = "subject id", "study id", "dicom id", "viewposition", "split"


def detect(canon_columns: set[str]) -> bool:
    """Study-level labels: subject and study ids, no image column."""
    return ({_SUBJECT, _STUDY} <= canon_columns and _DICOM not in canon_columns
            and not canon_columns & set(PATH_COLUMNS))


def patient(image_id: str) -> str | None:
    m = _PATIENT.search(image_id)
    return m.group(1) if m else None


def image_path(subject_id: int | str, study_id: int | str, dicom_id: str, suffix: str = ".jpg") -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}/{dicom_id}{suffix}"


def plan(columns: list[str]) -> tuple[list[str], set[str]]:
    ids = {c for c in columns if canon(c) in (_SUBJECT, _STUDY)}
    return [c for c in columns if c in ids or not is_metadata(c)], set()  # ids: numbers or text, see _ids


def side_file(label_file: Path, given: str | None, names: tuple[str, ...], what: str, option: str) -> Path:
    """``given``, else the first standard name found beside the label file."""
    if given is not None:
        return Path(given)
    for name in names:
        p = label_file.parent / name
        if p.is_file():
            return p
    raise MavlError(f"{label_file} holds MIMIC-CXR study labels, which need the {what} file; "
                    f"{names[0]} is not beside it: pass {option} FILE", path=label_file)


def read(df: pd.DataFrame, path: Path, opts: DatasetOptions):
    """Label rows (studies) x metadata rows (images) -> one row per labelled image."""

    subj_col, study_col = find_column(df, (_SUBJECT,)), find_column(df, (_STUDY,))
    subj, study = _ids(df[subj_col], path, subj_col), _ids(df[study_col], path, study_col)
    names, values = generic.label_values(df, {subj_col, study_col}, path)
    key = pd.Index(subj + "/" + study)
    if key.has_duplicates:
        k = int(np.flatnonzero(key.duplicated())[0])
        raise MavlError(f"{path} lists study s{study[k]} of patient p{subj[k]} more than once "
                        f"(row {k + 1})", path=path)

    meta_path = side_file(path, opts.metadata, METADATA_NAMES, "image metadata", "--metadata")
    meta = _read_side(meta_path, "metadata file", (_DICOM, _SUBJECT, _STUDY), (_VIEW,))
    m_dicom, m_subj, m_study = meta[_DICOM], meta[_SUBJECT], meta[_STUDY]
    if pd.Index(m_dicom).has_duplicates:
        d = m_dicom[pd.Index(m_dicom).duplicated()][0]
        raise MavlError(f"metadata file {meta_path} lists image {d} more than once", path=meta_path)
    pos = key.get_indexer(m_subj + "/" + m_study)
    seen = np.zeros(len(key), dtype=bool)
    seen[pos[pos >= 0]] = True
    if not seen.all():
        k = int(np.flatnonzero(~seen)[0])
        raise MavlError(f"{path}: study s{study[k]} (patient p{subj[k]}) has no image in {meta_path}; "
                        f"{int((~seen).sum())} labelled stud(ies) without images: the label and metadata files "
                        "are not from the same MIMIC-CXR release", path=path)
    paths = [f"files/p{s[:2]}/p{s}/s{st}/{d}{SUFFIXES[0]}" for s, st, d in zip(m_subj, m_study, m_dicom)]
    dropped = {paths[i]: f"its study s{m_study[i]} has no row in {path.name}" for i in np.flatnonzero(pos < 0)}

    splits = None
    if opts.split is not None:
        if opts.split not in SPLITS:
            raise MavlError(f"--split {opts.split!r}: MIMIC-CXR splits are {', '.join(SPLITS)}", path=path)
        splits = _splits(path, opts, meta_path, meta)
    keep = pos >= 0
    rows = np.flatnonzero(keep)
    view = meta[_VIEW] if _VIEW in meta else None
    return Rows(
        paths=[paths[i] for i in rows], names=names, values=values[pos[rows]],
        patients=["p" + s for s in m_subj[keep]],
        views=None if view is None else view[keep].tolist(),
        splits=None if splits is None else [splits[i] for i in rows],
        source=NAME, suffix_aliases={s: SUFFIXES[0] for s in SUFFIXES[1:]}, dropped=dropped,
        view_column=f"{meta_path.name}:ViewPosition",
    )


_ID_TEXT = re.compile(r"[0-9A-Za-z_-]+(?:\n[0-9A-Za-z_-]+)*")


def _ids(col: pd.Series, path: Path, name) -> np.ndarray:
    """Id cells as an object array of stripped strings (``10000032.0`` -> ``10000032``).

    Plain Python string ops and one regex over the joined column: pandas' string
    methods cost seconds on MIMIC's 377k rows.
    """
    if pd.api.types.is_integer_dtype(col.dtype):  # subject_id/study_id parsed as numbers: C-speed text
        return col.to_numpy().astype(str).astype(object)
    vals = [v.strip() if isinstance(v, str) else (str(int(v)) if isinstance(v, float) and v.is_integer() else v)
            for v in col.tolist()]
    if all(isinstance(v, str) for v in vals):
        joined = "\n".join(vals)
        if "." in joined:
            vals = [v[:-2] if v.endswith(".0") else v for v in vals]
            joined = "\n".join(vals)
        if _ID_TEXT.fullmatch(joined):
            return np.asarray(vals, dtype=object)
    k = next(i for i, v in enumerate(vals) if not isinstance(v, str) or not _ID_TEXT.fullmatch(v) or "\n" in v)
    raise MavlError(f"{path}: column {str(name)!r} is blank or not an id in row {k + 1}", path=path)


def _text(col: pd.Series) -> np.ndarray:
    return np.asarray([v.strip() if isinstance(v, str) else "" for v in col.tolist()], dtype=object)


def _read_side(path: Path, what: str, need: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, np.ndarray]:
    wanted = set(need) | set(optional)
    df = read_csv(path, lambda cols: ([c for c in cols if canon(c) in wanted],
                                      {c for c in cols if canon(c) in wanted - {_SUBJECT, _STUDY}}), what=what)
    cols = {canon(c): c for c in df.columns}
    missing = [n for n in need if n not in cols]
    if missing:
        seen = df.attrs.get("columns_seen", list(df.columns))
        raise MavlError(f"{what} {path} has no column {quote_list(n.replace(' ', '_') for n in missing)} "
                        f"(columns seen: {quote_list(seen)})", path=path)
    out = {n: _ids(df[cols[n]], path, cols[n]) for n in need if n != _SPLIT}
    if _SPLIT in need:
        out[_SPLIT] = np.asarray([v.lower() for v in _text(df[cols[_SPLIT]])], dtype=object)
    for n in optional:
        if n in cols:
            out[n] = _text(df[cols[n]])
    return out


def _splits(path: Path, opts: DatasetOptions, meta_path: Path, meta: dict[str, np.ndarray]) -> list[str]:
    """The official split of every metadata image; MavlError when the two files disagree."""
    split_path = side_file(path, opts.split_file, SPLIT_NAMES, "split", "--split-file")
    sp = _read_side(split_path, "split file", (_DICOM, _SUBJECT, _STUDY, _SPLIT), ())
    bad = np.asarray([v not in SPLITS for v in sp[_SPLIT]], dtype=bool)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise MavlError(f"split file {split_path} row {k + 1} has split {sp[_SPLIT][k]!r}; "
                        f"expected {', '.join(SPLITS)}", path=split_path)
    index = pd.Index(sp[_DICOM])
    if index.has_duplicates:
        d = sp[_DICOM][index.duplicated()][0]
        raise MavlError(f"split file {split_path} lists image {d} more than once", path=split_path)
    at = index.get_indexer(meta[_DICOM])
    if (at < 0).any():
        k = int(np.flatnonzero(at < 0)[0])
        raise MavlError(f"split file {split_path} has no row for image {meta[_DICOM][k]} of {meta_path}; "
                        f"{int((at < 0).sum())} image(s) missing: the split and metadata files disagree",
                        path=split_path)
    for col, what in ((_STUDY, "study s"), (_SUBJECT, "patient p")):
        theirs = sp[col][at]
        ours = meta[col]
        diff = np.flatnonzero(theirs != ours)
        if len(diff):
            k = int(diff[0])
            raise MavlError(f"split file {split_path} puts image {meta[_DICOM][k]} in {what}{theirs[k]}, "
                            f"{meta_path} in {what}{ours[k]}: the split and metadata files disagree",
                            path=split_path)
    return sp[_SPLIT][at].tolist()
