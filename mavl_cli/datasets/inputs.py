"""What to embed: folders, globs, files, a label file's rows, or ids on stdin -> ``ImageItem`` list.

This is the whole image-path journey before decoding: each input becomes an
``ImageItem(id, path)``, where the id comes from :mod:`mavl_cli.datasets.ids`
and label-file rows are resolved under the image root. ``embed.py`` only
decodes and embeds what this module hands it.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.ids import normalize_id, rel_id
from mavl_cli.datasets.reader import read_labels
from mavl_cli.io.imageio import IMAGE_SUFFIXES, is_dicom, is_regular, may_be_dicom_name

GLOB_CHARS = "*?["


@dataclass
class ImageItem:
    id: str
    path: Path


# ----------------------------------------------------------------------------- files, folders, globs


def list_images(inputs: list[str], recursive: bool = True) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated image list.

    Folders are searched by suffix; only files without one (or with a numeric
    one, as UID-named archives have) are sniffed for DICOM content, so large
    image folders cost no extra reads. Hidden files such as macOS ``._x.png``
    are skipped.
    An explicitly named file is accepted when it has a known suffix or the
    DICOM magic.
    """
    seen: set[Path] = set()
    result: list[Path] = []

    def add(paths: list[Path]) -> None:
        for p in paths:
            if p not in seen:
                seen.add(p)
                result.append(p)

    for item in inputs:
        item = str(item)
        path = Path(item).expanduser()
        if path.exists():
            add(_expand_existing(path, recursive, item))
        elif any(ch in item for ch in GLOB_CHARS):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise MavlError(f"no files match the pattern '{item}'.", path=item)
            found: list[Path] = []
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    found.extend(_scan_folder(mp, recursive))
                elif not mp.name.startswith(".") and (_has_image_suffix(mp) or _dicom_by_content(mp)):
                    found.append(mp)
            if not found:
                raise MavlError(
                    f"the pattern '{item}' matches no image files ({_suffix_list()}).", path=item
                )
            add(sorted(found))
        else:
            raise MavlError(f"{item}: no such file or folder.", path=item)
    return result


def _has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _dicom_by_content(path: Path) -> bool:
    """DICOM stored without an extension (or under a UID-like numeric one), recognised by content."""
    return may_be_dicom_name(path.name) and is_dicom(path)


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def _expand_existing(path: Path, recursive: bool, shown: str) -> list[Path]:
    if path.is_dir():
        found = _scan_folder(path, recursive)
        if not found:
            where = "or its subfolders " if recursive else ""
            raise MavlError(
                f"folder {shown} {where}contains no images (looked for {_suffix_list()}).",
                path=shown,
            )
        return found
    if _has_image_suffix(path) or is_dicom(path):
        return [path]
    raise MavlError(
        f"{shown} is not a supported image file (expected one of {_suffix_list()} or DICOM).",
        path=shown,
    )


def walk_files(folder: Path | str, recursive: bool = True) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` under ``folder``, following symlinked folders but entering each real
    folder once (by device and inode): links to ``.`` or ``..`` cannot make the walk exponential or
    endless. Hidden folders are skipped; only regular files are listed (a FIFO is never opened)."""
    visited: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            dirs[:] = []
            continue
        visited.add(key)
        keep = []
        for d in (dirs if recursive else []):
            if d.startswith("."):
                continue
            try:
                sd = os.stat(os.path.join(root, d))
            except OSError:
                continue
            if (sd.st_dev, sd.st_ino) not in visited:
                keep.append(d)
        dirs[:] = keep
        yield root, [f for f in files if is_regular(Path(root) / f)]


def _scan_folder(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder``, sorted; follows symlinked folders but never loops."""
    found: list[Path] = []
    for root, files in walk_files(folder, recursive):
        for name in files:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES or _dicom_by_content(Path(root) / name):
                found.append(Path(root) / name)
    found.sort()
    return found


# ----------------------------------------------------------------------------- what to embed


def collect_inputs(
    inputs: list[str],
    labels_csv: str | Path | None = None,
    root: str | Path | None = None,
    path_column: str | None = None,
    stdin_lines: Iterable[str] | None = None,
) -> tuple[list[ImageItem], list[dict[str, str]]]:
    """Resolve what to embed: folders, globs, files, a labels CSV's path column, or stdin ids.

    With ``labels_csv`` the CSV's rows define the list (in file order) and a
    single folder argument (or ``root``) is where their paths are resolved;
    otherwise folders are walked recursively and ids are paths relative to
    the folder given. With ``root`` and no CSV, relative paths and ids (e.g.
    read from stdin) are looked up under ``root``, and entries not found there
    are returned as missing rather than stopping the run. Returns (items,
    missing) where missing lists entries whose file does not exist.
    """
    blank = [x for x in inputs if not str(x).strip()]
    if blank:  # Path("") is ".": an unset shell variable (`mavl predict "$IMG"`) would walk the whole working folder
        raise MavlError("an image argument is empty (an unset variable?); give a file, folder or glob, or '.' for this folder")
    if "-" in inputs:
        lines = [ln.strip() for ln in (stdin_lines if stdin_lines is not None else sys.stdin) if ln.strip()]
        inputs = [x for x in inputs if x != "-"] + lines
        if not inputs:
            raise MavlError("-: no image paths arrived on standard input")
    if labels_csv is not None:
        return _collect_from_labels(inputs, labels_csv, root, path_column)
    if root is not None:
        return _collect_under_root(inputs, Path(root))
    if not inputs:
        raise MavlError("no images given: pass folders, files or globs, or --labels CSV with a path column")
    items = []
    for inp in inputs:
        p = Path(inp)
        base = p if p.is_dir() else None
        for f in list_images([inp]):
            items.append(ImageItem(rel_id(f, base), f))
    return _unique(items), []


def _collect_from_labels(inputs: list[str], labels_csv: str | Path, root: str | Path | None,
                         path_column: str | None) -> tuple[list[ImageItem], list[dict[str, str]]]:
    """The label file's rows, in file order, found under the image root."""

    table = read_labels(labels_csv, path_column=path_column)
    if root is None:
        folders = [Path(x) for x in inputs if Path(x).is_dir()]
        if len(inputs) > 1 or (inputs and not folders):
            raise MavlError("with --labels, give at most one image folder (the root the CSV's paths are relative to)")
        root = folders[0] if folders else Path(labels_csv).parent
    base = Path(root)
    if not base.is_dir():
        raise MavlError(f"{base}: image root folder not found", path=base)
    items, missing = [], []
    unresolved: list[tuple[str, str]] = []
    order = {nid: i for i, nid in enumerate(table.ids)}
    for raw, nid in zip(table.paths, table.ids):
        found = _resolve(base, raw, nid)
        if found is None and table.suffix_aliases:
            # MIMIC-CXR: the same layout with .dcm files (DICOM release) instead of .jpg; the id follows the file
            for alias, own in table.suffix_aliases.items():
                if nid.endswith(own) and (base / (nid[: -len(own)] + alias)).is_file():
                    found = base / (nid[: -len(own)] + alias)
                    order[nid[: -len(own)] + alias] = order[nid]
                    nid = nid[: -len(own)] + alias
                    break
        if found is None:
            unresolved.append((raw, nid))
        else:
            items.append(ImageItem(nid, found))
    if unresolved:
        # NIH ships its images in images_001/images/ ... images_012/images/ while its CSV names only
        # files: find such rows by file name anywhere under the root (only when the name is unique).
        index = _name_index(base)
        for raw, nid in unresolved:
            hit = index.get(Path(nid).name)
            if hit is None:
                missing.append({"id": nid, "reason": "file not found"})
            elif hit == _AMBIGUOUS:
                missing.append({"id": nid, "reason": "file name found more than once under the root; give its relative path"})
            else:
                items.append(ImageItem(nid, hit))
        items.sort(key=lambda it: order[it.id])
    return items, missing


def _collect_under_root(inputs: list[str], base: Path) -> tuple[list[ImageItem], list[dict[str, str]]]:
    """Inputs relative to an image root (``--root`` without ``--labels``); ids are relative to it."""
    if not base.is_dir():
        raise MavlError(f"{base}: image root folder not found", path=base)
    items, missing = [], []
    for inp in inputs or [str(base)]:
        p = Path(inp)
        if any(ch in inp for ch in GLOB_CHARS) and not p.exists():
            pattern = inp if p.is_absolute() else str(base / inp)
            items.extend(ImageItem(rel_id(f, base), f) for f in list_images([pattern]))
            continue
        found = p if (p.is_absolute() and p.exists()) else _resolve_any(base, inp, normalize_id(inp))
        if found is None and p.exists():
            found = p
        if found is None:
            missing.append({"id": normalize_id(inp), "reason": "file not found"})
        elif found.is_dir():
            items.extend(ImageItem(rel_id(f, base), f) for f in list_images([str(found)]))
        else:
            items.append(ImageItem(rel_id(found, base), found))
    return _unique(items), missing


_AMBIGUOUS = Path("\0ambiguous")


def _name_index(base: Path) -> dict[str, Path]:
    """File name -> path for every image under ``base`` (names found twice map to a marker)."""
    index: dict[str, Path] = {}
    for folder, files in walk_files(base):  # link cycles (l1 -> ., l2 -> .) are entered once
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                index[name] = _AMBIGUOUS if name in index else Path(folder) / name
    return index


def _unique(items: list[ImageItem]) -> list[ImageItem]:
    seen: dict[str, Path] = {}
    for it in items:
        if it.id in seen and seen[it.id] != it.path:
            raise MavlError(f"two images share the id {it.id!r} ({seen[it.id]} and {it.path}); embed them separately")
        seen[it.id] = it.path
    return list({it.id: it for it in items}.values())


def _candidates(base: Path, raw: str, nid: str) -> list[Path]:
    cands = [base / raw, base / nid]
    parts = Path(nid).parts
    for k in range(1, min(3, len(parts))):
        cands.append(base / Path(*parts[k:]))
    if Path(raw).is_absolute():
        cands.insert(0, Path(raw))
    return cands


def _resolve(base: Path, raw: str, nid: str) -> Path | None:
    return next((c for c in _candidates(base, raw, nid) if c.is_file()), None)


def _resolve_any(base: Path, raw: str, nid: str) -> Path | None:
    return next((c for c in _candidates(base, raw, nid) if c.exists()), None)
