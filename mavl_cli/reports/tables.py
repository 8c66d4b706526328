"""Rich tables and JSON for evaluation reports and predictions."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text

from mavl_cli.core.console import fmt_num, table


def _ci(report: Any, key: str) -> str:
    lo, hi = report.ci.get(key, (None, None))
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"[{lo:.3f}, {hi:.3f}]"


def report_tables(report: Any, subtitle: str = "") -> list[Table]:
    rows = []
    for m in report.labels:
        rows.append([m.name, m.support, m.n, m.prevalence, m.precision, m.recall, m.specificity, m.f1, m.auroc, m.auprc, m.threshold])
    per_label = table(f"Per-label metrics ({subtitle})" if subtitle else "Per-label metrics",
                      ["label", "support", "n", "prev.", "precision", "recall", "specif.", "F1", "AUROC", "AUPRC", "thresh."], rows)
    ci_level = "95% CI" if report.ci else ""
    overall_rows = [
        ["macro F1", report.macro_f1, _ci(report, "macro_f1")],
        ["micro F1", report.micro_f1, _ci(report, "micro_f1")],
        ["weighted F1", report.weighted_f1, ""],
        ["macro AUROC", report.macro_auroc, _ci(report, "macro_auroc")],
        ["macro AUPRC", report.macro_auprc, ""],
        ["Hamming loss", report.hamming_loss, ""],
        ["exact match", report.exact_match, ""],
    ]
    cal = getattr(report, "calibration", None) or {}
    if cal:
        overall_rows += [["macro ECE", cal.get("macro_ece"), ""], ["macro MCE", cal.get("macro_mce"), ""],
                         ["macro Brier", cal.get("macro_brier"), ""]]
    overall = table("Overall", ["metric", "value", ci_level], [[a, b, Text(c)] for a, b, c in overall_rows])
    out = [per_label, overall]
    if cal:
        out.insert(1, calibration_table(cal))
    return out


def calibration_table(cal: dict[str, Any]) -> Table:
    rows = [[d["name"], d["n"], d["prevalence"], d["mean_score"], d["ece"], d["mce"], d["brier"]] for d in cal["labels"]]
    how = f", calibrated with {cal['calibrated_with']}" if cal.get("calibrated_with") else ", uncalibrated scores"
    return table(f"Calibration ({cal['bins']} equal-width bins{how})",
                 ["label", "n", "prev.", "mean score", "ECE", "MCE", "Brier"], rows,
                 caption="ECE: bin-count-weighted mean |observed rate - mean score|; MCE: largest bin gap")


def prediction_json(pred: Any) -> list[dict[str, Any]]:
    out = []
    for i, image in enumerate(pred.ids):
        findings = []
        for j, name in enumerate(pred.names):
            p = float(pred.scores[i, j])
            item = {"label": name, "probability": round(p, 6), "threshold": float(pred.thresholds[j]),
                    "positive": bool(p >= pred.thresholds[j]), "zero_shot": name in pred.new_labels}
            if pred.aspect_cos is not None:
                item["aspects"] = {a: round(float(pred.aspect_cos[i, j, k]), 4)
                                   for k, a in enumerate(pred.aspects) if pred.aspect_mask[j, k]}
            peak = (getattr(pred, "peaks", None) or {}).get(image, {}).get(name)
            if peak is not None:
                item["peak"] = {"x": int(peak[0]), "y": int(peak[1])}
            findings.append(item)
        rec = {"image": image, "findings": findings, "positive": [f["label"] for f in findings if f["positive"]]}
        rec.update(_ood_fields(pred, i))
        out.append(rec)
    return out


def _ood_fields(pred: Any, i: int) -> dict[str, Any]:
    a = getattr(pred, "ood", None)
    if a is None:
        return {"ood": None, "ood_score": None}
    return {"ood": bool(a.flag[i]), "ood_score": round(float(a.score[i]), 2), "ood_distance": round(float(a.distance[i]), 4)}


OOD_MARK = "OOD"


def _ood_caption(pred: Any) -> str | None:
    a = getattr(pred, "ood", None)
    if a is None or not a.flag.any():
        return None
    return (f"{OOD_MARK}: unlike the model's training images (distance above the {a.percentile:g}th percentile "
            "of its reference images); its findings are not to be trusted")


def prediction_summary(pred: Any) -> Table:
    """Many images: one row per image, one column per finding, positives in red."""
    t = Table(title=f"{len(pred.ids)} images", header_style="bold cyan")
    t.add_column("image", justify="left")
    for name in pred.names:
        t.add_column(name + (" *" if name in pred.new_labels else ""), justify="right")
    t.add_column("positive findings", justify="left")
    has_ood = getattr(pred, "ood", None) is not None
    if has_ood:
        t.add_column("ood score", justify="right")
    for i, image in enumerate(pred.ids):
        cells = []
        for j in range(len(pred.names)):
            p = float(pred.scores[i, j])
            pos = p >= pred.thresholds[j]
            cells.append(Text(f"{p:.2f}", style="bold red" if pos else "dim"))
        positive = [n for j, n in enumerate(pred.names) if pred.scores[i, j] >= pred.thresholds[j]]
        extra = []
        if has_ood:
            flag = bool(pred.ood.flag[i])
            extra = [Text(f"{OOD_MARK} {pred.ood.score[i]:.1f}" if flag else f"{pred.ood.score[i]:.1f}",
                          style="bold yellow" if flag else "dim")]
        t.add_row(Text(image + (f" [{OOD_MARK}]" if has_ood and pred.ood.flag[i] else ""),
                       style="bold yellow" if has_ood and pred.ood.flag[i] else ""), *cells, ", ".join(positive) or "-", *extra)
    captions = []
    if pred.new_labels:
        captions.append("* scored from its text description alone (zero-shot, experimental)")
    if _ood_caption(pred):
        captions.append(_ood_caption(pred))
    if captions:
        t.caption = "\n".join(captions)
    return t


def prediction_tables(pred: Any) -> list[Table]:
    if len(pred.ids) > 1 and pred.aspect_cos is None:
        return [prediction_summary(pred)]
    tables = []
    for rec in prediction_json(pred):
        title: Any = rec["image"]
        if rec.get("ood"):
            title = Text.assemble(rec["image"], (f"  [{OOD_MARK}: unlike the training images, ood score {rec['ood_score']:.1f}]", "bold yellow"))
        elif rec.get("ood_score") is not None:
            title = f"{rec['image']}  (ood score {rec['ood_score']:.1f})"
        t = Table(title=title, header_style="bold cyan")
        if rec.get("ood"):
            t.caption = _ood_caption(pred)
        for c in ("finding", "probability", "threshold", "call"):
            t.add_column(c, justify="left" if c == "finding" else "right")
        if pred.aspect_cos is not None:
            t.add_column("best-matching aspects", justify="left")
        for f in sorted(rec["findings"], key=lambda f: -f["probability"]):
            call = Text("POSITIVE", style="bold red") if f["positive"] else Text("negative", style="dim")
            name = f["label"] + (" (text only)" if f["zero_shot"] else "")
            row = [name, fmt_num(f["probability"]), fmt_num(f["threshold"], 2), call]
            if pred.aspect_cos is not None:
                top = sorted(f.get("aspects", {}).items(), key=lambda kv: -kv[1])[:3] if f["positive"] else []
                row.append(", ".join(f"{a} {v:+.2f}" for a, v in top))
            t.add_row(*row)
        tables.append(t)
    return tables


def _ci_text(pair: Any) -> Text:
    if not pair or pair[0] is None or pair[1] is None or any(isinstance(x, float) and math.isnan(x) for x in pair):
        return Text("")
    return Text(f"[{pair[0]:.3f}, {pair[1]:.3f}]")


def subgroup_tables(sub: dict[str, Any]) -> list[Table]:
    """Per --by column: one row per subgroup, then per label the AUROC of each subgroup and the largest gap."""
    out = []
    for col in (sub or {}).get("columns", []):
        rows = [[g["group"], g["images"], g["patients"] if g["patients"] is not None else "", g["macro_auroc"],
                 _ci_text(g["macro_auroc_ci"]), g["macro_f1"]] for g in col["groups"]]
        boot = sub.get("bootstrap", 0)
        cap = f"from {col['source']}" + (f"; CIs: {boot} resamples of {sub.get('resampled')} within each subgroup" if boot else "")
        out.append(table(f"Subgroups by {col['spec']}", ["group", "images", "patients", "macro AUROC", "95% CI", "macro F1"],
                         rows, caption=cap))
        groups = [g["group"] for g in col["groups"]]
        rows = []
        for j, gap in enumerate(col["gaps"]):
            cells = []
            for g in col["groups"]:
                lab = g["labels"][j]
                cells.append(Text(f"{fmt_num(lab['auroc'])} ({lab['positives']}/{lab['n']})"))
            between = f"{gap['highest']['group']} vs {gap['lowest']['group']}" if gap.get("highest") else ""
            rows.append([gap["label"], *cells, gap["auroc_gap"], Text(between)])
        out.append(table(f"AUROC by {col['column']} (positives/n) and the largest AUROC gap per label",
                         ["label", *groups, "gap", "between"], rows))
    return out


def compare_tables(res: dict[str, Any]) -> list[Table]:
    """Per label and macro: AUROC of A and B, A - B with paired CI, DeLong p, F1 of each and the difference."""
    rows = []
    for r in [*res["labels"], {"label": "macro", **res["macro"]}]:
        rows.append([r["label"], r.get("positives", ""), r["auroc_a"], r["auroc_b"], r["diff"], _ci_text(r.get("diff_ci")),
                     Text(_p(r["p"])), r["f1_a"], r["f1_b"], r["f1_diff"], _ci_text(r.get("f1_diff_ci"))])
    boot = res.get("bootstrap", 0)
    cap = (f"A = {res['a']}, B = {res['b']}, {res['images']} images; CIs: {boot} paired bootstrap resamples of "
           f"{res['resampled']} (seed {res['seed']}); p: DeLong's test (images independent)")
    return [table("Paired comparison A - B", ["label", "pos.", "AUROC A", "AUROC B", "diff", "95% CI", "DeLong p",
                                              "F1 A", "F1 B", "F1 diff", "95% CI"], rows, caption=cap)]


def _p(p: Any) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"
