"""mavl_cli.stages.evaluate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.core.invocation import command_line
from mavl_cli.core.options import EvalOptions, LabelOptions
from mavl_cli.core.version import __version__
from mavl_cli.datasets.ids import data_fingerprint
from mavl_cli.datasets.inputs import collect_inputs
from mavl_cli.datasets.join import load_labelled
from mavl_cli.datasets.labelmap import known_renames, rename_note
from mavl_cli.datasets.reader import read_labels
from mavl_cli.datasets.table import rename
from mavl_cli.evaluation.calibration import calibration_report
from mavl_cli.evaluation.metrics import evaluate, prepare
from mavl_cli.evaluation.subgroups import subgroup_report
from mavl_cli.io.files import atomic_write_bytes, check_outputs
from mavl_cli.io.mavlfile import MavlFile, read_file
from mavl_cli.models.mavlmodel import score_images
from mavl_cli.models.modelfile import check_model_backbone, load_model
from mavl_cli.reports.html import curve_figures, render
from mavl_cli.reports.plots import plot_report
from mavl_cli.stages.scores import load_score_set
from mavl_cli.trust.ood import check_percentile, evaluate_split
from mavl_cli.trust.provenance import SYNTHETIC_WARNING


@dataclass
class Scored:
    ids: list[str]
    names: list[str]
    scores: np.ndarray
    y: np.ndarray | None = None
    mask: np.ndarray | None = None
    groups: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    x: np.ndarray | None = None  # the fusion input the scores came from
    ood: dict[str, Any] | None = None  # evaluate: share flagged, metrics without them


def score_labelled(model_path: str, embeddings: str, labels: str, uncertain: str, label_map: dict[str, str] | None,
                   calibrated: bool = True) -> tuple[Any, Scored]:

    model = load_model(model_path)
    if Path(embeddings).is_dir():
        return model, _score_image_folder(model, embeddings, labels, uncertain, label_map, calibrated)
    emb = read_file(embeddings, expect="image-embeddings")
    check_model_backbone(model, emb)
    x = model.to_fusion_input(emb)
    data = load_labelled(emb, labels, names=model.labels, uncertain=uncertain, label_map=label_map, x=x)
    return model, Scored(data.ids, data.names, model.score(x, calibrated=calibrated), data.y, data.mask, data.groups, data.notes, x=x)


def _score_image_folder(model: Any, root: str, labels: str, uncertain: str, label_map: dict[str, str] | None,
                        calibrated: bool = True) -> Scored:
    """Images under ``root`` listed by ``labels``, scored through the whole model (no embeddings file)."""

    items, missing = collect_inputs([root], labels)
    if missing:
        shown = ", ".join(m["id"] for m in missing[:3])
        raise MavlError(f"{labels}: {len(missing)} image(s) it lists were not found under {root} (e.g. {shown})")
    module = model.module()
    if not calibrated:  # `mavl calibrate` fits on the raw head
        module.head = model.head(calibrated=False)
    res = score_images(module, items)
    emb = MavlFile("image-embeddings", {"features": res.probabilities}, {"ids": res.ids}, str(root))
    data = load_labelled(emb, labels, names=model.labels, uncertain=uncertain, label_map=label_map)
    return Scored(data.ids, data.names, data.x, data.y, data.mask, data.groups, data.notes, x=res.head_inputs)  # rows in res.ids order


@dataclass(frozen=True)
class _Source:
    """What `evaluate` measures: labelled scores, their thresholds, and the file they came from."""

    sc: Scored
    thresholds: np.ndarray
    tuned: dict[str, Any] | None  # the thresholds' ``tuned_on`` record
    meta: dict[str, Any]  # the model's (or the scores file's) metadata
    model: Any = None  # None for --scores


def evaluate_stage(
    model_path: str | None, embeddings: str | None, labels: str, opts: EvalOptions | None = None,
    label_opts: LabelOptions | None = None, extras: Any = None,
) -> tuple[Any, list[str], Scored]:
    """Returns (Report, warnings, scored data); ``sc.ood`` holds the OOD share and metrics without flagged images;
    ``extras`` is a :class:`mavl_cli.stages.evaluate.EvalExtras`."""

    o, read = opts or EvalOptions(), label_opts or LabelOptions()
    scores_file, bootstrap, seed, threshold = o.scores, o.bootstrap, o.seed, o.threshold
    plot, csv_out, json_out, ood_threshold = o.plot, o.csv_out, o.json_out, o.ood_threshold
    warnings: list[str] = []
    html = getattr(extras, "html", None)
    check_outputs({"--json": json_out, "--csv": csv_out, "--plot": plot, "--html": html},
                           [model_path, embeddings, labels, scores_file, getattr(extras, "metadata", None)],
                           create_folders=("--plot",))
    if scores_file is not None:
        src = _scores_source(scores_file, labels, read, warnings)
    else:
        src = _model_source(model_path, embeddings, labels, read, o, warnings)
    sc = src.sc
    th = _final_thresholds(src, threshold, warnings)
    warnings.extend(sc.notes)
    groups = np.asarray(sc.groups) if sc.groups is not None else None
    report = evaluate(sc.y, sc.scores, th, sc.names, mask=sc.mask, bootstrap=bootstrap, seed=seed, groups=groups)
    if scores_file is None:
        sc.ood = evaluate_split(src.model, sc, th, ood_threshold, bootstrap=bootstrap, seed=seed)
    evaluation_extras(report, sc, th, warnings, src.meta, extras, bootstrap=bootstrap, seed=seed)
    if plot:
        plot_report(Path(plot), sc.y, sc.scores, th, sc.names, mask=sc.mask)
    return report, warnings, sc


def _scores_source(scores_file: str, labels: str, read: LabelOptions, warnings: list[str]) -> _Source:
    """``--scores``: saved scores joined to the labels by image id."""

    ss = load_score_set(scores_file, allow_model=False)  # a `predict --out` file or a CSV from another tool
    sf = ss.as_file()
    names = sf.labels()
    table = read_labels(labels, uncertain=read.uncertain, label_map=read.renames)
    renames = known_renames(names, table.names)
    if renames:
        table = rename(table, renames)
        warnings.append(rename_note(renames, labels))
    missing = [n for n in names if n not in table.names]
    if missing and ss.source == "csv" and len(missing) < len(names):
        warnings.append(f"{scores_file}: column(s) {', '.join(missing)} are not labels of {labels}; left out")
        names = [n for n in names if n in table.names]
    elif missing:
        raise MavlError(f"{labels}: label(s) {', '.join(map(repr, missing))} of {scores_file} are not in this label file")
    cols = [sf.labels().index(n) for n in names]
    table = table.select(names).align(sf.ids())
    sc = Scored(table.ids, names, sf.tensors["scores"][:, cols].astype(np.float32), table.y, table.mask, table.groups)
    th = np.asarray(sf.tensors["thresholds"], np.float32)[cols]
    tuned = (sf.meta.get("threshold") or {}).get("tuned_on")
    warnings.extend(trust_warnings(sf))
    return _Source(sc, th, tuned, sf.meta)


def _model_source(model_path: str | None, embeddings: str | None, labels: str, read: LabelOptions, o: EvalOptions,
                  warnings: list[str]) -> _Source:
    """MODEL and EMBEDDINGS (or an image folder): the labelled images scored by the model."""

    if model_path is None or embeddings is None:
        raise MavlError("evaluate needs MODEL and EMBEDDINGS, or --scores FILE")
    check_percentile(o.ood_threshold)
    model, sc = score_labelled(model_path, embeddings, labels, read.uncertain, read.renames)
    th = model.thresholds
    warnings.extend(trust_warnings(model))
    tuned = (model.meta.get("threshold") or {}).get("tuned_on")
    if (model.meta.get("threshold") or {}).get("method", "default") == "default" and o.threshold is None:
        warnings.append(f"thresholds are the untuned default {DEFAULT_THRESHOLD}; run `mavl tune-threshold` on validation data first")
    return _Source(sc, th, tuned, model.meta, model)


def _final_thresholds(src: _Source, threshold: float | None, warnings: list[str]) -> np.ndarray:
    """``--threshold`` for every label, else the source's; alarms when they were tuned on this very data."""

    if threshold is not None:
        return np.full(len(src.sc.names), threshold, np.float32)
    tuned = src.tuned
    if tuned and tuned.get("fingerprint") == data_fingerprint(src.sc.ids):
        warnings.append(
            f"ALARM: thresholds were tuned on this very data ({tuned.get('embeddings')}, {tuned.get('images')} images): "
            "these figures are optimistic; tune on validation data and report on a separate test set"
        )
    return src.thresholds


def trust_warnings(model: Any) -> list[str]:
    """Warnings every run with this model must show (synthetic training data)."""

    return [SYNTHETIC_WARNING] if model.meta.get("synthetic_training_data") else []


@dataclass
class EvalExtras:
    """What `evaluate` adds to the basic report: subgroups, an HTML report, and what was evaluated."""

    by: list[str] = field(default_factory=list)
    metadata: str | None = None
    html: str | None = None
    labels_file: str | None = None
    embeddings: str | None = None
    scores: str | None = None
    model: str | None = None


def evaluation_extras(report: Any, sc: Any, th: np.ndarray, warnings: list[str], source_meta: dict[str, Any],
                      extras: EvalExtras | None, bootstrap: int = 0, seed: int = 0) -> None:
    """Calibration figures (always), the calibrated-on-this-data alarm, subgroups and the HTML report when asked."""

    extras = extras or EvalExtras()  # evaluate_stage has checked the --html path with its other outputs
    y, s, m, t = prepare(sc.y, sc.scores, sc.mask, sc.names, th)
    report.calibration = calibration_report(y, s, m, sc.names)
    cal = source_meta.get("calibration") or {}
    report.calibration["calibrated_with"] = cal.get("method")
    fitted = cal.get("fitted_on") or {}
    if fitted and fitted.get("fingerprint") == data_fingerprint(sc.ids):
        warnings.append(
            f"ALARM: calibration was fitted on this very data ({fitted.get('embeddings')}, {fitted.get('images')} images): "
            "the calibration figures are optimistic; calibrate on validation data and report on a separate test set"
        )
    report.data = {"labels": extras.labels_file, "embeddings": extras.embeddings, "scores": extras.scores,
                   "model": extras.model, "images": len(sc.ids), "fingerprint": data_fingerprint(sc.ids)}
    if extras.by:
        report.subgroups = subgroup_report(extras.by, sc.ids, sc.groups, extras.labels_file, extras.metadata,
                                           y, s, m, t, sc.names, bootstrap, seed)
        if not bootstrap:
            report.notes.append("subgroup AUROCs without CIs: add --bootstrap 1000 for patient-bootstrap intervals")
    if extras.html:
        write_html(extras.html, report, warnings, y, s, m, t, sc.names, source_meta)


def write_html(path: str, report: Any, warnings: list[str], y: np.ndarray, s: np.ndarray, m: np.ndarray,
               t: np.ndarray, names: list[str], source_meta: dict[str, Any]) -> None:

    doc = report.to_dict()
    doc["warnings"] = list(warnings)
    th = source_meta.get("threshold") or {}
    cal = source_meta.get("calibration") or {}
    data = doc.get("data", {})
    prov = {
        "model": data.get("model"), "scores": data.get("scores"), "embeddings": data.get("embeddings"),
        "labels": data.get("labels"), "images evaluated": data.get("images"), "data fingerprint": data.get("fingerprint"),
        "backbone": source_meta.get("backbone"), "backbone weights": source_meta.get("backbone_weights"),
        "text model": source_meta.get("text_model"),
        "thresholds": th.get("method") and f"{th.get('method')}" + (f", tuned on {th['tuned_on'].get('embeddings')} "
                                                                      f"({th['tuned_on'].get('images')} images)" if th.get("tuned_on") else ""),
        "calibration": cal.get("method") and f"{cal.get('method')}" + (f", fitted on {cal['fitted_on'].get('embeddings')}"
                                                                         if cal.get("fitted_on") else ""),
        "model trained on": (source_meta.get("train") or {}).get("embeddings"),
        "model written by": source_meta.get("command"),
        "report written by": f"mavl {__version__}: {command_line()}",
    }
    text = render(doc, curve_figures(y, s, m, t, names), prov)
    atomic_write_bytes(path, text.encode("utf-8"))
