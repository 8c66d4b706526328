"""mavl_cli.stages.calibrate."""

from __future__ import annotations

from typing import Any

import numpy as np

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import LabelOptions
from mavl_cli.datasets.ids import data_fingerprint
from mavl_cli.evaluation import calibration as C
from mavl_cli.evaluation.metrics import prepare
from mavl_cli.io.files import check_output_path
from mavl_cli.io.mavlfile import write_file
from mavl_cli.models.modelfile import load_model
from mavl_cli.stages.evaluate import score_labelled
from mavl_cli.stages.result import StageResult


def _clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith("mavl_") and k != "command"}


def calibrate_stage(
    model_path: str, embeddings: str | None, labels: str | None, output: str, method: str | None = "temperature",
    prevalence: str | None = None, source_prevalence: str | None = None, label_opts: LabelOptions | None = None,
) -> StageResult:
    """Fit per-label calibration on validation data and/or a prior-shift; store both in the model."""

    read = label_opts or LabelOptions(uncertain="ignore")
    uncertain, label_map = read.uncertain, read.renames

    check_output_path(output, [p for p in (embeddings, labels) if p], may_replace=[model_path])  # MODEL may be the output
    if embeddings is not None and labels is None:
        raise MavlError("calibrate: VAL_EMB needs --labels (the validation labels)")
    if embeddings is None and prevalence is None:
        raise MavlError("calibrate needs validation data (VAL_EMB --labels) to fit on, or --prevalence for a prior shift")
    model = load_model(model_path)
    names = list(model.labels)
    old = model.calibration or C.Calibration.identity(len(names))
    notes: list[str] = []
    table: list[dict[str, Any]] = []
    if embeddings is not None:
        if method not in C.METHODS:
            raise MavlError(f"unknown --method {method!r}; use one of {', '.join(C.METHODS)}")
        target = C.parse_prevalence(prevalence, names) if prevalence else {}
        cal, source, info, table = _fit_on_validation(model_path, embeddings, labels, method, names, uncertain, label_map)
        notes += cal.notes
    else:
        target = C.parse_prevalence(prevalence, names)
        cal, source, info = _keep_fitted(old, model.meta, names, source_prevalence)
    if target:
        notes.append(_apply_prior_shift(cal, info, names, source, target))
    info["notes"] = list(cal.notes)

    tensors, meta = _calibrated_model(model, cal, old, info, notes)
    write_file(output, "model", tensors, meta)
    summary = {"method": info.get("method"), "labels": len(names)}
    if embeddings is not None:
        summary.update(images=info["fitted_on"]["images"], val_macro_ece_before=info["val_ece_before"],
                       val_macro_ece_after=info["val_ece_after"])
    if target:
        summary["prior_shift"] = ", ".join(target)
    return StageResult(output, summary, table, notes)


def _fit_on_validation(
    model_path: str, embeddings: str, labels: str | None, method: str | None, names: list[str], uncertain: str,
    label_map: dict[str, str] | None,
) -> tuple[Any, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """Fit ``method`` on the model's raw scores of the validation data.

    Returns (calibration, the validation prevalence per label (NaN where unknown), the calibration record, table rows)."""

    _, sc = score_labelled(model_path, embeddings, labels, uncertain, label_map, calibrated=False)
    y, p, m, _ = prepare(sc.y, sc.scores, sc.mask, sc.names)
    cal = C.fit(y, p, m, method, names)
    source = np.array([float(y[m[:, j], j].mean()) if m[:, j].any() else np.nan for j in range(len(names))])
    source[(source <= 0) | (source >= 1)] = np.nan  # no positives (or negatives): the prior is unknown
    before = C.calibration_report(y, p, m, names)
    after = C.calibration_report(y, cal.apply(p), m, names)
    info = {"method": method, "fitted_on": {"embeddings": str(embeddings), "labels": str(labels), "images": len(sc.ids),
                                            "fingerprint": data_fingerprint(sc.ids)},
            "source_prevalence": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, source)},
            "val_ece_before": before["macro_ece"], "val_ece_after": after["macro_ece"]}
    table = [{"label": n, "param": _param(cal, j), "val_ece_before": before["labels"][j]["ece"],
              "val_ece_after": after["labels"][j]["ece"], "val_prevalence": before["labels"][j]["prevalence"]}
             for j, n in enumerate(names)]
    return cal, source, info, table


def _keep_fitted(
    old: Any, model_meta: dict[str, Any], names: list[str], source_prevalence: str | None,
) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """No validation data: keep the model's fitted calibration, drop its prior shift.

    Returns (calibration, the prevalence the scores reflect (recorded, or ``--source-prevalence``), the record)."""

    cal = C.Calibration(old.method, old.a.copy(), old.b.copy(), np.zeros(len(names)), old.iso_x, old.iso_y, old.iso_n)
    old_info = dict(model_meta.get("calibration") or {})
    info = {k: v for k, v in old_info.items() if k != "prevalence_shift"}
    info.setdefault("method", "none")
    src = dict(info.get("source_prevalence") or {})
    if source_prevalence:
        src.update(C.parse_prevalence(source_prevalence, names))
    info["source_prevalence"] = src
    source = np.array([np.nan if src.get(n) is None else float(src[n]) for n in names])
    return cal, source, info


def _apply_prior_shift(cal: Any, info: dict[str, Any], names: list[str], source: np.ndarray,
                       target: dict[str, float]) -> str:
    """Set ``cal``'s shift from ``source`` to the ``target`` prevalences, record it in ``info``; returns the note."""

    missing = [n for n in target if not np.isfinite(source[names.index(n)])]
    if missing:
        raise MavlError(
            f"--prevalence: the prevalence the scores reflect is unknown for {', '.join(missing)}; "
            "give VAL_EMB --labels (its prevalence is used) or --source-prevalence 'LABEL=VALUE,...'"
        )
    for n, v in target.items():
        j = names.index(n)
        cal.shift[j] = float(C.prior_shift(np.array(source[j]), np.array(v)))
    info["prevalence_shift"] = {n: {"source": float(source[names.index(n)]), "target": v} for n, v in target.items()}
    return "prior shift: " + ", ".join(f"{n} {source[names.index(n)]:.3f} -> {v:.3f}" for n, v in target.items())


def _calibrated_model(model: Any, cal: Any, old: Any, info: dict[str, Any],
                      notes: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The model's tensors and metadata with ``cal`` in place of ``old`` (tuned thresholds mapped or reset)."""

    tensors = {k: v for k, v in model.file.tensors.items() if not k.startswith("calibration.")}
    tensors.update(cal.to_tensors())
    meta = _clean_meta(model.meta)
    meta["calibration"] = info
    th_info = dict(meta.get("threshold") or {})
    if th_info.get("method", "default") != "default":
        meta["threshold"] = _carry_thresholds(model, cal, old, th_info, tensors, notes)
    return tensors, meta


def _carry_thresholds(model: Any, cal: Any, old: Any, th_info: dict[str, Any], tensors: dict[str, np.ndarray],
                      notes: list[str]) -> dict[str, Any]:
    """Tuned thresholds through a new calibration: mapped when both maps are invertible, else reset to the default.

    Sets ``tensors["thresholds"]``, adds a note; returns the new threshold record."""

    n = len(model.labels)
    if cal.invertible and old.invertible:
        new_t = cal.map_thresholds(model.thresholds.astype(np.float64), old)
        tensors["thresholds"] = np.clip(new_t, 0.0, 1.0).astype(np.float32)
        th_info["mapped_through_calibration"] = True
        notes.append("tuned thresholds carried over through the (monotone) calibration map: same decisions as before")
    else:
        tensors["thresholds"] = np.full(n, DEFAULT_THRESHOLD, np.float32)
        th_info = {"method": "default", "value": DEFAULT_THRESHOLD, "tuned_on": None,
                   "reset_by": f"calibrate --method {cal.method} (not invertible; re-run tune-threshold)"}
        notes.append(f"thresholds reset to {DEFAULT_THRESHOLD}: isotonic calibration is not invertible; run `mavl tune-threshold` again")
    return th_info


def _param(cal: Any, j: int) -> str:
    if cal.method == "temperature":
        return f"T={1.0 / cal.a[j]:.3f}"
    if cal.method == "platt":
        return f"a={cal.a[j]:.3f} b={cal.b[j]:+.3f}"
    if cal.method == "isotonic":
        return f"{int(cal.iso_n[j])} knots"
    return ""
