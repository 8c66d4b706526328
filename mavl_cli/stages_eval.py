"""Stages of the evaluation commands: calibrate, compare, card, and evaluate's extras.

Same shape as :mod:`mavl_cli.stages`: files in, files out, a summary back;
the math lives in :mod:`mavl_cli.calibration`, :mod:`mavl_cli.subgroups`,
:mod:`mavl_cli.compare` and :mod:`mavl_cli.bootstrap`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mavl_cli import contract
from mavl_cli.defaults import DEFAULT_THRESHOLD
from mavl_cli.errors import MavlError
from mavl_cli.options import EvalOptions, LabelOptions
from mavl_cli.stages import StageResult, data_fingerprint, score_labelled


def _clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith("mavl_") and k != "command"}


# ---------------------------------------------------------------- calibrate


def calibrate_stage(
    model_path: str, embeddings: str | None, labels: str | None, output: str, method: str | None = "temperature",
    prevalence: str | None = None, source_prevalence: str | None = None, label_opts: LabelOptions | None = None,
) -> StageResult:
    """Fit per-label calibration on validation data and/or a prior-shift; store both in the model."""
    from mavl_cli import calibration as C
    from mavl_cli.metrics import prepare
    from mavl_cli.modelfile import load_model

    read = label_opts or LabelOptions(uncertain="ignore")
    uncertain, label_map = read.uncertain, read.renames

    contract.check_output_path(output, [p for p in (embeddings, labels) if p], may_replace=[model_path])  # MODEL may be the output
    if embeddings is not None and labels is None:
        raise MavlError("calibrate: VAL_EMB needs --labels (the validation labels)")
    if embeddings is None and prevalence is None:
        raise MavlError("calibrate needs validation data (VAL_EMB --labels) to fit on, or --prevalence for a prior shift")
    model = load_model(model_path)
    names = list(model.labels)
    old = model.calibration or C.Calibration.identity(len(names))
    old_info = dict(model.meta.get("calibration") or {})
    notes: list[str] = []
    table: list[dict[str, Any]] = []
    info: dict[str, Any]
    if embeddings is not None:
        if method not in C.METHODS:
            raise MavlError(f"unknown --method {method!r}; use one of {', '.join(C.METHODS)}")
        target = C.parse_prevalence(prevalence, names) if prevalence else {}
        _, sc = score_labelled(model_path, embeddings, labels, uncertain, label_map, calibrated=False)
        y, p, m, _ = prepare(sc.y, sc.scores, sc.mask, sc.names)
        cal = C.fit(y, p, m, method, names)
        notes += cal.notes
        source = np.array([float(y[m[:, j], j].mean()) if m[:, j].any() else np.nan for j in range(len(names))])
        source[(source <= 0) | (source >= 1)] = np.nan  # no positives (or negatives): the prior is unknown
        before = C.calibration_report(y, p, m, names)
        after = C.calibration_report(y, cal.apply(p), m, names)
        info = {"method": method, "fitted_on": {"embeddings": str(embeddings), "labels": str(labels), "images": len(sc.ids),
                                                "fingerprint": data_fingerprint(sc.ids)},
                "source_prevalence": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, source)},
                "val_ece_before": before["macro_ece"], "val_ece_after": after["macro_ece"]}
        for j, n in enumerate(names):
            table.append({"label": n, "param": _param(cal, j), "val_ece_before": before["labels"][j]["ece"],
                          "val_ece_after": after["labels"][j]["ece"], "val_prevalence": before["labels"][j]["prevalence"]})
    else:
        target = C.parse_prevalence(prevalence, names)
        cal = C.Calibration(old.method, old.a.copy(), old.b.copy(), np.zeros(len(names)), old.iso_x, old.iso_y, old.iso_n)
        info = {k: v for k, v in old_info.items() if k != "prevalence_shift"}
        info.setdefault("method", "none")
        src = dict(info.get("source_prevalence") or {})
        if source_prevalence:
            src.update(C.parse_prevalence(source_prevalence, names))
        info["source_prevalence"] = src
        source = np.array([np.nan if src.get(n) is None else float(src[n]) for n in names])
    if target:
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
        notes.append("prior shift: " + ", ".join(f"{n} {source[names.index(n)]:.3f} -> {v:.3f}" for n, v in target.items()))
    info["notes"] = list(cal.notes)

    tensors = {k: v for k, v in model.file.tensors.items() if not k.startswith("calibration.")}
    tensors.update(cal.to_tensors())
    meta = _clean_meta(model.meta)
    meta["calibration"] = info
    th_info = dict(meta.get("threshold") or {})
    if th_info.get("method", "default") != "default":
        if cal.invertible and old.invertible:
            new_t = cal.map_thresholds(model.thresholds.astype(np.float64), old)
            tensors["thresholds"] = np.clip(new_t, 0.0, 1.0).astype(np.float32)
            th_info["mapped_through_calibration"] = True
            notes.append("tuned thresholds carried over through the (monotone) calibration map: same decisions as before")
        else:
            tensors["thresholds"] = np.full(len(names), DEFAULT_THRESHOLD, np.float32)
            th_info = {"method": "default", "value": DEFAULT_THRESHOLD, "tuned_on": None,
                       "reset_by": f"calibrate --method {cal.method} (not invertible; re-run tune-threshold)"}
            notes.append(f"thresholds reset to {DEFAULT_THRESHOLD}: isotonic calibration is not invertible; run `mavl tune-threshold` again")
        meta["threshold"] = th_info
    contract.write_file(output, "model", tensors, meta)
    summary = {"method": info.get("method"), "labels": len(names)}
    if embeddings is not None:
        summary.update(images=info["fitted_on"]["images"], val_macro_ece_before=info["val_ece_before"],
                       val_macro_ece_after=info["val_ece_after"])
    if target:
        summary["prior_shift"] = ", ".join(target)
    return StageResult(output, summary, table, notes)


def _param(cal: Any, j: int) -> str:
    if cal.method == "temperature":
        return f"T={1.0 / cal.a[j]:.3f}"
    if cal.method == "platt":
        return f"a={cal.a[j]:.3f} b={cal.b[j]:+.3f}"
    if cal.method == "isotonic":
        return f"{int(cal.iso_n[j])} knots"
    return ""


# ---------------------------------------------------------------- evaluate extras


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
    from mavl_cli.calibration import calibration_report
    from mavl_cli.metrics import prepare

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
        from mavl_cli.subgroups import subgroup_report

        report.subgroups = subgroup_report(extras.by, sc.ids, sc.groups, extras.labels_file, extras.metadata,
                                           y, s, m, t, sc.names, bootstrap, seed)
        if not bootstrap:
            report.notes.append("subgroup AUROCs without CIs: add --bootstrap 1000 for patient-bootstrap intervals")
    if extras.html:
        write_html(extras.html, report, warnings, y, s, m, t, sc.names, source_meta)


def write_html(path: str, report: Any, warnings: list[str], y: np.ndarray, s: np.ndarray, m: np.ndarray,
               t: np.ndarray, names: list[str], source_meta: dict[str, Any]) -> None:
    from mavl_cli import __version__
    from mavl_cli.htmlreport import curve_figures, render

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
        "report written by": f"mavl {__version__}: {contract.command_line()}",
    }
    text = render(doc, curve_figures(y, s, m, t, names), prov)
    contract.atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- compare


def compare_stage(a_path: str, b_path: str, labels: str, embeddings: str | None = None, embeddings_b: str | None = None,
                  opts: EvalOptions | None = None, label_opts: LabelOptions | None = None) -> tuple[dict[str, Any], list[str]]:
    """Paired comparison of two score sets on the images and labels they share with the label file
    (``opts``: bootstrap, seed, threshold; default 1000 paired resamples)."""
    from mavl_cli.compare import Side, compare
    from mavl_cli.datasets import read_labels
    from mavl_cli.datasets.ids import normalize_many
    from mavl_cli.metrics import prepare
    from mavl_cli.scores_io import load_score_set

    o, read = opts or EvalOptions(bootstrap=1000), label_opts or LabelOptions(uncertain="ignore")
    bootstrap, seed, threshold = o.bootstrap, o.seed, o.threshold
    uncertain, label_map = read.uncertain, read.renames
    a = load_score_set(a_path, embeddings)
    b = load_score_set(b_path, embeddings_b or embeddings)
    table = read_labels(labels, uncertain=uncertain, label_map=label_map)
    notes: list[str] = []
    names = [n for n in a.names if n in b.names and n in table.names]
    if not names:
        raise MavlError(f"{a_path}, {b_path} and {labels} share no label name (A: {', '.join(a.names[:6])}; "
                        f"B: {', '.join(b.names[:6])}; labels: {', '.join(table.names[:6])})")
    dropped = sorted((set(a.names) | set(b.names)) - set(names))
    if dropped:
        notes.append(f"compared on {len(names)} shared labels; left out: {', '.join(dropped)}")
    from mavl_cli.datasets.table import match_rows

    na, nb = normalize_many(a.ids), normalize_many(b.ids)
    in_b = {i: k for k, i in enumerate(nb)}
    # ids written from another root (`predict data/` vs a tool's `data/images/x.png`) pair through the label row
    # both match, as evaluate matches them; an id both name exactly is paired as before
    ra, rb = match_rows(na, table.ids, table.suffix_aliases), match_rows(nb, table.ids, table.suffix_aliases)
    b_at_row: dict[int, int] = {}
    for k, r in enumerate(rb):
        if r >= 0:
            b_at_row.setdefault(r, k)
    pairs = [(k, in_b[i]) if i in in_b else (k, b_at_row[ra[k]]) for k, i in enumerate(na)
             if i in in_b or (ra[k] >= 0 and ra[k] in b_at_row)]
    common = [k for k, _ in pairs]
    if not common:
        raise MavlError(f"{a_path} and {b_path} share no image")
    if len(common) != len(na) or len(common) != len(nb):
        notes.append(f"compared on the {len(common)} images both score ({len(na)} in A, {len(nb)} in B)")
    ids = [a.ids[k] for k in common]
    rows_b = [kb for _, kb in pairs]
    table = table.select(names).align(ids)
    ja = [a.names.index(n) for n in names]
    jb = [b.names.index(n) for n in names]
    sa, sb = a.scores[np.ix_(common, ja)], b.scores[np.ix_(rows_b, jb)]
    ta, tb = a.thresholds[ja], b.thresholds[jb]
    if threshold is not None:
        ta = tb = np.full(len(names), threshold, np.float32)
    else:
        for side, path in ((a, a_path), (b, b_path)):
            if not side.tuned:
                notes.append(f"{path}: thresholds are the default {DEFAULT_THRESHOLD} (untuned); F1 differences compare at {DEFAULT_THRESHOLD}")
    y, _, m, _ = prepare(table.y, sa, table.mask, names)
    res = compare(y, m, Side(str(a_path), sa, ta), Side(str(b_path), sb, tb), names, table.groups, bootstrap, seed)
    res["notes"] = notes
    return res, notes


# ---------------------------------------------------------------- card


def card_stage(model_path: str, eval_json: str | None, output: str, name: str | None = None) -> StageResult:
    from mavl_cli.card import read_eval, render_card

    contract.check_output_path(output, [p for p in (model_path, eval_json) if p])
    f = contract.read_file(model_path, expect="model")
    ev = read_eval(eval_json) if eval_json else None
    if ev is not None:
        have = list(f.meta.get("labels") or [])
        other = [lab.get("name") for lab in ev.get("labels", [])]
        if not set(other) <= set(have):
            raise MavlError(f"{eval_json}: its labels ({', '.join(map(str, other[:5]))}...) are not this model's ({', '.join(have[:5])}...)")
    text = render_card(f.meta, model_path, ev, name)
    contract.atomic_write_bytes(output, text.encode("utf-8"))
    return StageResult(output, {"labels": len(f.meta.get("labels") or []), "evaluation": eval_json or "none",
                                "bytes": len(text.encode("utf-8"))})
