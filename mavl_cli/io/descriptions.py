"""Label description files: what text stands for each label.

Three forms are accepted (see ``examples/descriptions/README.md``):

1. ``labels.txt``: one label name per line (``#`` comments allowed); the name
   itself is the only text (aspect ``name``).
2. JSON ``{label: "sentence"}`` or ``{label: ["sentence", ...]}``: each
   sentence is one slot (aspects ``s1``, ``s2``...).
3. JSON ``{label: {aspect: "sentence" or [sentences]}}``: named visual aspects
   (definition, opacity, location, shape, border, texture, fluid, pattern);
   a list under an aspect is several slots ``aspect``, ``aspect#2``...

All forms become a ragged ``labels x aspects`` grid; missing slots are masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mavl_cli.core.errors import MavlError
from mavl_cli.io.files import check_input_file, loads_json

ASPECT_ORDER = ("name", "definition", "opacity", "location", "shape", "border", "texture", "fluid", "pattern")


@dataclass
class Descriptions:
    labels: list[str]
    aspects: list[str]
    texts: list[list[str | None]]  # [L][A], None where the label lacks that aspect
    form: str  # "names" | "sentences" | "aspects"

    def flat(self) -> list[tuple[int, int, str]]:
        return [(li, ai, t) for li, row in enumerate(self.texts) for ai, t in enumerate(row) if t]

    def subset(self, names: list[str]) -> "Descriptions":
        idx = {n: i for i, n in enumerate(self.labels)}
        missing = [n for n in names if n not in idx]
        if missing:
            raise MavlError(f"labels not described: {', '.join(missing)}")
        return Descriptions(names, self.aspects, [self.texts[idx[n]] for n in names], self.form)


def _aspect_key(a: str) -> tuple[int, str]:
    base = a.split("#")[0]
    return (ASPECT_ORDER.index(base) if base in ASPECT_ORDER else len(ASPECT_ORDER), a)


def parse_descriptions(text: str, name: str, fmt: str | None = None) -> Descriptions:
    """Parse a descriptions file's text; ``fmt`` is 'txt' or 'json' (guessed from content if None)."""
    stripped = text.strip()
    if fmt is None:
        fmt = "json" if stripped.startswith(("{", "[")) else "txt"
    if fmt == "txt":
        labels = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not labels:
            raise MavlError(f"{name}: no label names in this file (expected one label per line)")
        _no_duplicates(labels, name)
        return Descriptions(labels, ["name"], [[lab] for lab in labels], "names")

    data = loads_json(text, name, "this descriptions file")
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return parse_descriptions("\n".join(data), name, "txt")
    if not isinstance(data, dict) or not data:
        raise MavlError(f"{name}: expected a JSON object mapping label names to descriptions")
    slots: dict[str, dict[str, str]] = {}
    form = "sentences"
    for label, value in data.items():
        label = str(label).strip()
        if not label:
            raise MavlError(f"{name}: an empty label name")
        row: dict[str, str] = {}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            for i, s in enumerate(value):
                _check_text(s, name, label)
                row[f"s{i + 1}"] = s.strip()
        elif isinstance(value, dict):
            form = "aspects"
            for aspect, s in value.items():
                items = s if isinstance(s, list) else [s]
                for j, t in enumerate(items):
                    _check_text(t, name, f"{label}/{aspect}")
                    row[str(aspect) if j == 0 else f"{aspect}#{j + 1}"] = t.strip()
        else:
            raise MavlError(f"{name}: description of {label!r} must be a string, a list of strings or an object of aspects")
        if not row:
            raise MavlError(f"{name}: label {label!r} has no description")
        slots[label] = row
    if form == "aspects" and any(k.startswith("s") and k[1:].isdigit() for r in slots.values() for k in r):
        raise MavlError(f"{name}: mixes plain sentence lists and aspect objects; use one form for all labels")
    aspects = sorted({a for r in slots.values() for a in r}, key=_aspect_key if form == "aspects" else lambda a: (int(a[1:]), a))
    labels = list(slots)
    texts = [[slots[lab].get(a) for a in aspects] for lab in labels]
    return Descriptions(labels, aspects, texts, form)


def _check_text(s: object, name: str, where: str) -> None:
    if not isinstance(s, str) or not s.strip():
        raise MavlError(f"{name}: description of {where!r} must be a non-empty string")


def _no_duplicates(labels: list[str], name: str) -> None:
    seen: set[str] = set()
    for lab in labels:
        if lab in seen:
            raise MavlError(f"{name}: label {lab!r} is listed twice")
        seen.add(lab)


def read_descriptions(path: str | Path) -> Descriptions:
    p = check_input_file(path, "a labels .txt or descriptions .json file")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first label
    except (UnicodeDecodeError, OSError) as exc:
        raise MavlError(f"{p}: cannot read as UTF-8 text ({exc})", path=p) from None
    fmt = "json" if p.suffix.lower() == ".json" else None
    return parse_descriptions(text, str(p), fmt)
