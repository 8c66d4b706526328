"""Where a model came from, stated where it is used.

Two concerns live here:

* **Synthetic data.** ``mavl phantoms`` leaves a marker file,
  :data:`MARKER` (``mavl-synthetic.json``), in the folder it writes, naming
  the label files it made. The marker is a sidecar: the label CSVs and images
  stay byte-identical to what they were, so every reader keeps working.
  :func:`synthetic_source` finds the marker for a label file or for image
  paths; embed-images, train-lrf and fuse record what it says in their
  outputs (``synthetic``), and fuse sets ``synthetic_training_data`` in the
  model when any input in the chain was synthetic.
* **Provenance at the point of use.** :func:`model_provenance` turns a model
  file's metadata into one record (which file and why, encoders, training
  data, thresholds, calibration, OOD statistics) that `predict`, `evaluate`
  and `mavl info` show the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from mavl_cli.datasets.ids import data_fingerprint
from mavl_cli.trust.ood import describe as ood_describe

MARKER = "mavl-synthetic.json"
SYNTHETIC_WARNING = (
    "this model was trained on synthetic mavl phantoms, not on radiographs of people: "
    "its calls on real radiographs mean nothing"
)
RESEARCH_NOTICE = "mavl is for research use only; it is not a diagnostic device and its output is not a diagnosis."
#: at most this many distinct image folders are checked for a marker (and this many levels up each)
_MAX_FOLDERS = 4096
_LEVELS = 3
_MAX_MARKER_BYTES = 64 * 1024


# ------------------------------------------------------------------ synthetic marker


def write_marker(folder: Path, files: list[str], info: dict[str, Any]) -> Path:
    """Write the phantom generator's marker into ``folder`` (deterministic bytes)."""
    doc = {
        "synthetic": True,
        "generator": "mavl phantoms",
        "what": "synthetic chest-film phantoms drawn by mavl; not radiographs of people",
        "files": sorted(files),
        **info,
    }
    path = Path(folder) / MARKER
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _read_marker(folder: Path) -> dict[str, Any] | None:
    p = folder / MARKER
    try:
        if not p.is_file() or p.stat().st_size > _MAX_MARKER_BYTES:
            return None
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("synthetic") is not True:
        return None
    return doc


def _summary(doc: dict[str, Any], folder: Path, via: str) -> dict[str, Any]:
    return {"generator": str(doc.get("generator", "?")), "folder": str(folder), "via": via,
            **{k: doc[k] for k in ("seed", "n", "size") if isinstance(doc.get(k), (int, float))}}


def synthetic_source(labels: str | Path | None = None, images: Iterable[str | Path] = ()) -> dict[str, Any] | None:
    """The marker that makes these inputs synthetic, or None.

    A label file counts when a marker in its folder names it; images count
    when a marker lies in their folder or up to two folders above it.
    """
    if labels is not None and str(labels) != "-":
        lp = Path(labels)
        doc = _read_marker(lp.parent if str(lp.parent) else Path("."))
        if doc is not None and lp.name in (doc.get("files") or []):
            return _summary(doc, lp.parent, f"label file {lp.name}")
    seen: set[Path] = set()
    for img in images:
        folder = Path(img).parent
        if folder in seen:
            continue
        if len(seen) >= _MAX_FOLDERS:
            break
        seen.add(folder)
        f = folder
        for _ in range(_LEVELS):
            doc = _read_marker(f if str(f) else Path("."))
            if doc is not None:
                return _summary(doc, f, f"images under {f}")
            if f.parent == f:
                break
            f = f.parent
    return None


def chain_synthetic(*sources: Any) -> dict[str, Any] | None:
    """The first synthetic record among ``sources`` (markers or mavl file metadata dicts)."""
    for s in sources:
        if not s:
            continue
        if isinstance(s, dict) and ("generator" in s or "via" in s):
            return s
        if isinstance(s, dict) and s.get("synthetic"):
            return s["synthetic"] if isinstance(s["synthetic"], dict) else {"generator": "?", "via": "upstream file"}
        if isinstance(s, dict) and s.get("synthetic_training_data"):
            return s.get("synthetic_source") or {"generator": "?", "via": "upstream model"}
    return None


def file_sha256(path: str | Path) -> str | None:
    """Short content hash of a (label) file, None when it cannot be read."""
    if str(path) == "-":
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()[:16]


def training_record(ids: list[str], labels: str | Path, embeddings: str | Path, synthetic: dict[str, Any] | None) -> dict[str, Any]:
    """What fuse records about its training data (the ``training_data`` key of a model)."""

    return {
        "images": len(ids),
        "labels_file": Path(str(labels)).name,
        "labels_sha256": file_sha256(labels),
        "embeddings_file": Path(str(embeddings)).name,
        "fingerprint": data_fingerprint(ids),
        "synthetic": bool(synthetic),
    }


# ------------------------------------------------------------------ which model, and why


def model_choice(explicit: str | None) -> str:
    """Why this model file: ``--model``, ``$MAVL_MODEL`` or the default (same order as modelfile.find_model)."""
    if explicit:
        return "--model"
    if os.environ.get("MAVL_MODEL"):
        return "$MAVL_MODEL"
    return "default"


def _encoder(meta: dict[str, Any]) -> dict[str, Any]:
    img = {"backbone": meta.get("backbone"), "weights": meta.get("backbone_weights")}
    if meta.get("image_encoder"):  # registry spec (FAMILY:ID), when the model records one
        img["spec"] = meta.get("image_encoder")
    carried = meta.get("encoder_weights") or {}
    if carried.get("embedded"):  # a fine-tuned encoder carried inside the model file
        img["weights"] = f"in the model file, fine-tuned ({carried.get('source')}, {carried.get('fingerprint')})"
    return img


def _training(meta: dict[str, Any]) -> dict[str, Any]:
    td = meta.get("training_data")
    tr = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    if isinstance(td, dict):
        return dict(td)
    # model files from before `training_data`: what `train` says
    return {"images": tr.get("images"), "labels_file": Path(str(tr["labels"])).name if tr.get("labels") else None,
            "labels_sha256": None, "embeddings_file": Path(str(tr["embeddings"])).name if tr.get("embeddings") else None,
            "fingerprint": None, "synthetic": bool(meta.get("synthetic_training_data"))}


def _thresholds(meta: dict[str, Any]) -> dict[str, Any]:
    th = meta.get("threshold") if isinstance(meta.get("threshold"), dict) else {}
    tuned = th.get("tuned_on") if isinstance(th.get("tuned_on"), dict) else None
    out: dict[str, Any] = {"method": th.get("method", "default")}
    if th.get("min_sensitivity") is not None:
        out["min_sensitivity"] = th["min_sensitivity"]
    if tuned:
        out["tuned_on"] = {"labels_file": Path(str(tuned.get("labels"))).name if tuned.get("labels") else None,
                           "embeddings_file": Path(str(tuned.get("embeddings"))).name if tuned.get("embeddings") else None,
                           "images": tuned.get("images"), "fingerprint": tuned.get("fingerprint")}
    else:
        out["tuned_on"] = None
    return out


def _calibration(meta: dict[str, Any]) -> dict[str, Any] | None:
    cal = meta.get("calibration")
    if not cal:
        return None
    if not isinstance(cal, dict):
        return {"method": str(cal)}
    keep = {}
    for k, v in cal.items():  # summary only: scalars and short strings, never per-label arrays
        if isinstance(v, (str, int, float, bool)) or v is None:
            keep[k] = v
        elif isinstance(v, dict):
            keep[k] = {kk: vv for kk, vv in v.items() if isinstance(vv, (str, int, float, bool)) or vv is None}
    return keep


def model_provenance(model: Any, path: str, chosen_by: str) -> dict[str, Any]:
    """One record of where this model came from (the ``model`` object of predict --json)."""

    meta = model.meta
    synthetic = bool(meta.get("synthetic_training_data"))
    return {
        "file": str(path),
        "chosen_by": chosen_by,
        "labels": list(model.labels),
        "image_encoder": _encoder(meta),
        "text_encoder": {"model": meta.get("text_model"), "pooling": meta.get("pooling")},
        "training_data": _training(meta),
        "synthetic_training_data": synthetic,
        "synthetic_source": meta.get("synthetic_source") if synthetic else None,
        "thresholds": _thresholds(meta),
        "calibration": _calibration(meta),
        "ood": ood_describe(model),
        "made_by": meta.get("command"),
        "mavl_version": meta.get("mavl_version"),
    }


def provenance_lines(prov: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) pairs for people: the same record as lines."""
    def short(v: Any, n: int = 100) -> str:
        s = v if isinstance(v, str) else json.dumps(v)
        return s if len(s) <= n else s[: n - 3] + "..."

    why = {"--model": "given with --model", "$MAVL_MODEL": "from $MAVL_MODEL", "default": "the default model"}
    td, th = prov["training_data"], prov["thresholds"]
    ie, te = prov["image_encoder"], prov["text_encoder"]
    lines = [
        ("model", f"{prov['file']} ({why.get(prov['chosen_by'], prov['chosen_by'])})"),
        ("image encoder", f"{ie.get('spec') or ie.get('backbone')} (weights: {ie.get('weights') or 'hub'})"),
        ("text encoder", f"{te.get('model')} ({te.get('pooling') or 'mean'} pooling)"),
        ("trained on", f"{td.get('images', '?')} images, labels {td.get('labels_file') or '?'}"
                       + (f", data fingerprint {td['fingerprint']}" if td.get("fingerprint") else "")
                       + (" [SYNTHETIC phantoms]" if prov["synthetic_training_data"] else "")),
    ]
    tuned = th.get("tuned_on")
    if tuned:
        lines.append(("thresholds", f"{th['method']}, tuned on {tuned.get('images', '?')} images "
                                    f"({tuned.get('labels_file') or tuned.get('embeddings_file') or '?'}, fingerprint {tuned.get('fingerprint')})"))
    else:
        lines.append(("thresholds", f"{th['method']} (untuned)" if th["method"] == "default" else th["method"]))
    cal = prov.get("calibration")
    lines.append(("calibration", short(cal) if cal else "none"))
    od = prov.get("ood")
    lines.append(("OOD statistics", f"{od['method']}, reference: {od['reference']} ({od['n_reference']} images), "
                                    f"flag above the {od['default_percentile']:g}th percentile" if od else
                  "none (model file made before OOD statistics; no out-of-distribution flag)"))
    return lines
