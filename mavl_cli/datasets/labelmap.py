"""Label names across data sets: the known correspondences and user rename maps.

:data:`NIH_TO_CHEXPERT` lists only names that mean the same finding in both
vocabularies. Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia and
Pneumothorax already share a name; Mass/Nodule vs "Lung Lesion" or
Infiltration vs "Lung Opacity" are broader-or-narrower concepts, so they are
left for the user to decide (``--label-map``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import LabelOptions, check_uncertain
from mavl_cli.datasets.sniff import quote_list

NIH_TO_CHEXPERT: dict[str, str] = {"Effusion": "Pleural Effusion"}

# Names that mean the same finding in different data sets' vocabularies, in the
# order CheXpert/MIMIC-CXR/PadChest (after its mapping), NIH, VinDr-CXR. Only exact
# correspondences: a model trained on one vocabulary is scored on another's labels
# through these, with a note, instead of asking for --label-map.
SAME_FINDING: tuple[tuple[str, ...], ...] = (
    ("Pleural Effusion", "Effusion", "Pleural effusion"),
    ("Pleural Thickening", "Pleural_Thickening", "Pleural thickening"),
    ("No Finding", "No finding"),
    ("Fibrosis", "Pulmonary fibrosis"),
)


def known_renames(wanted, have) -> dict[str, str]:
    """``{name in have: name in wanted}`` for each wanted name missing from ``have`` whose
    same-finding name (:data:`SAME_FINDING`, :data:`NIH_TO_CHEXPERT`) ``have`` holds exactly once."""
    have_set, wanted_set = set(have), set(wanted)
    groups = [set(g) for g in SAME_FINDING] + [{a, b} for a, b in NIH_TO_CHEXPERT.items()]
    out: dict[str, str] = {}
    for w in wanted:
        if w in have_set:
            continue
        hits = {h for g in groups if w in g for h in g if h in have_set and h not in wanted_set and h not in out}
        if len(hits) == 1:
            out[hits.pop()] = w
    return out


def rename_note(renames: dict[str, str], where) -> str:
    pairs = ", ".join(f"{a!r} -> {b!r}" for a, b in renames.items())
    return f"{where}: labels read under the model's names (same finding in another data set's vocabulary): {pairs}"


def match_label_names(csv_names, other_names, csv_path, other_path) -> None:
    """Raise MavlError when two sources disagree on which labels exist.

    Order is not compared (``LabelTable.select`` reorders by name); presence is.
    """
    a, b = list(csv_names), list(other_names)
    only_a = [n for n in a if n not in set(b)]
    only_b = [n for n in b if n not in set(a)]
    if not only_a and not only_b:
        return
    parts = []
    if only_a:
        parts.append(f"{quote_list(only_a)} in {csv_path} but not in {other_path}")
    if only_b:
        parts.append(f"{quote_list(only_b)} in {other_path} but not in {csv_path}")
    raise MavlError("label names differ: " + "; ".join(parts), path=csv_path)


def read_label_map(spec: str | Path) -> dict[str, str]:
    """Parse a label rename map from a file or an inline ``from=to,...`` string.

    Files: ``.json`` holds ``{"from": "to"}``; anything else holds ``from,to``
    lines (an optional ``from,to`` header, blank lines and ``#`` comments are
    skipped). Inline: ``"Effusion=Pleural Effusion,Pleural_Thickening=Pleural Other"``.
    """
    path = Path(str(spec))
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a very long inline spec
        is_file = False
    if not is_file:
        return _inline_label_map(spec)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MavlError(f"cannot read label map file {path}: {exc}", path=path) from exc
    if path.suffix.lower() == ".json":
        return _json_label_map(path, text)
    return _csv_label_map(path, text)


def _inline_label_map(spec: str | Path) -> dict[str, str]:
    """An inline ``from=to,...`` label map."""
    if "=" not in str(spec):
        raise MavlError(
            f"label map {str(spec)!r} is neither an existing file nor 'from=to,...' pairs",
            path=None,
        )
    mapping: dict[str, str] = {}
    for item in str(spec).split(","):
        if not item.strip():
            continue
        if item.count("=") != 1 or not all(x.strip() for x in item.split("=")):
            raise MavlError(f"label map entry {item.strip()!r} must look like 'from=to'")
        src, dst = (x.strip() for x in item.split("="))
        _add_mapping(mapping, src, dst, "the inline label map")
    return mapping


def _json_label_map(path: Path, text: str) -> dict[str, str]:
    """A ``.json`` label map file's text: one object of ``"from": "to"`` strings."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MavlError(f"label map file {path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                        path=path) from exc
    except RecursionError:
        raise MavlError(f"label map file {path}: JSON nested too deeply to be real data", path=path) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise MavlError(f"label map file {path} must hold one JSON object of "
                        '"from": "to" strings', path=path)
    mapping: dict[str, str] = {}
    for src, dst in data.items():
        _add_mapping(mapping, src.strip(), dst.strip(), str(path))
    return mapping


def _csv_label_map(path: Path, text: str) -> dict[str, str]:
    """A label map file's ``from,to`` lines (optional header, blank lines and ``#`` comments skipped); not empty."""
    mapping: dict[str, str] = {}
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in row]
        if lineno == 1 and [c.lower() for c in cells] == ["from", "to"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise MavlError(f"label map file {path} line {lineno} must be 'from,to', got {','.join(row)!r}",
                            path=path)
        _add_mapping(mapping, cells[0], cells[1], str(path))
    if not mapping:
        raise MavlError(f"label map file {path} has no 'from,to' entries", path=path)
    return mapping


def _add_mapping(mapping: dict[str, str], src: str, dst: str, where: str) -> None:
    if src in mapping and mapping[src] != dst:
        raise MavlError(f"{where} maps {src!r} twice ({mapping[src]!r} and {dst!r})")
    mapping[src] = dst


def parse_label_options(uncertain: str = "zeros", label_map: str | None = None, only: str | None = None) -> LabelOptions:
    """:class:`LabelOptions` from the command line's text: ``--label-map`` a file or 'A=B,...', ``--only`` 'A,B'."""
    check_uncertain(uncertain)
    mapping = read_label_map(label_map) if label_map else None
    names = [s.strip() for s in only.split(",") if s.strip()] if only else None
    return LabelOptions(uncertain, mapping, names)
