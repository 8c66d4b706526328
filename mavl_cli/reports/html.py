"""`evaluate --html`: one self-contained HTML file a researcher can send.

Everything is inline: CSS in a ``<style>`` block, figures as inline SVG drawn
here (no matplotlib, no JavaScript, no fonts or images fetched). A Content
Security Policy of ``default-src 'none'`` makes any browser refuse network
access from the page, so the file shows the same everywhere, offline.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from mavl_cli.evaluation.calibration import N_BINS, reliability
from mavl_cli.evaluation.metrics import curve_counts

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
_MAX_POINTS = 400

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;font-size:14px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right} th{background:#f3f6fa;color:#234}
td:first-child,th:first-child{text-align:left} .na{color:#999}
.warn{background:#fff4e5;border-left:4px solid #f0a000;padding:6px 10px;margin:6px 0}
.alarm{background:#fdecea;border-left:4px solid #d32f2f;padding:6px 10px;margin:6px 0;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:12px} .note{color:#555} .prov td{text-align:left} code{background:#f5f5f5;padding:0 3px}
.legend{font-size:11px}
"""


_NICE = {"macro_f1": "macro F1", "micro_f1": "micro F1", "weighted_f1": "weighted F1", "macro_auroc": "macro AUROC",
         "macro_auprc": "macro AUPRC", "hamming_loss": "Hamming loss", "exact_match": "exact match",
         "macro_ece": "macro ECE", "macro_mce": "macro MCE", "macro_brier": "macro Brier"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return '<span class="na">n/a</span>'
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _ci(pair: Any) -> str:
    if not pair or pair[0] is None or pair[1] is None or not all(math.isfinite(float(x)) for x in pair):
        return ""
    return f"[{float(pair[0]):.3f}, {float(pair[1]):.3f}]"


def _table(columns: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# --------------------------------------------------------------------------
# SVG charts
# --------------------------------------------------------------------------


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= _MAX_POINTS:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, _MAX_POINTS).round().astype(int))
    return x[idx], y[idx]


def svg_chart(title: str, xlabel: str, ylabel: str, series: list[dict[str, Any]], diagonal: bool = True,
              size: tuple[int, int] = (370, 370)) -> str:
    """Line chart on [0, 1] x [0, 1]; each series: label, color, x, y, optional markers and dot."""
    w, h = size
    left, right, top, bottom = 46, 10, 26, 40
    pw, ph = w - left - right, h - top - bottom

    def px(x: float) -> float:
        return left + x * pw

    def py(y: float) -> float:
        return top + (1 - y) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 16 * ((len(series) + 1) // 2)}" '
           f'role="img" aria-label="{_e(title)}" font-family="Helvetica,Arial,sans-serif">',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{_e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for t in np.linspace(0, 1, 6):
        out.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{t:.1f}</text>')
        out.append(f'<text x="{left - 5}" y="{py(t) + 3:.1f}" text-anchor="end" font-size="10">{t:.1f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 30}" text-anchor="middle" font-size="11">{_e(xlabel)}</text>')
    out.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" font-size="11" transform="rotate(-90 12 {top + ph / 2})">{_e(ylabel)}</text>')
    if diagonal:
        out.append(f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#aaa" stroke-dasharray="4 3"/>')
    for s in series:
        x, y = _thin(np.asarray(s["x"], float), np.asarray(s["y"], float))
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
        out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="1.5" points="{pts}"/>')
        if s.get("markers"):
            out += [f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{s["color"]}"/>' for a, b in zip(x, y)]
        if s.get("dot") is not None:
            a, b = s["dot"]
            out.append(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="4" fill="{s["color"]}" stroke="#000" stroke-width="0.8"/>')
    for k, s in enumerate(series):
        lx, ly = left + (k % 2) * (pw / 2), h + 4 + 16 * (k // 2)
        out.append(f'<rect x="{lx:.1f}" y="{ly:.1f}" width="10" height="3" fill="{s["color"]}"/>'
                   f'<text x="{lx + 14:.1f}" y="{ly + 5:.1f}" font-size="10" class="legend">{_e(s["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def curve_figures(y: np.ndarray, s: np.ndarray, m: np.ndarray, t: np.ndarray, names: list[str]) -> list[str]:
    """ROC, precision-recall and reliability charts as SVG strings (prepared inputs)."""
    roc, pr, rel = [], [], []
    for j, name in enumerate(names):
        rows = m[:, j]
        yj, sj = y[rows, j], s[rows, j]
        n_pos = int(yj.sum())
        n_neg = int(yj.size - n_pos)
        color = PALETTE[j % len(PALETTE)]
        if yj.size:
            r = reliability(yj, sj, N_BINS)
            full = r.counts > 0
            rel.append({"label": f"{name} (ECE {r.ece:.3f})", "color": color, "x": r.mean_pred[full],
                        "y": r.frac_pos[full], "markers": True})
        if n_pos == 0 or n_neg == 0:
            continue
        _, tps, fps = curve_counts(yj, sj)
        pred = sj >= t[j]
        tp = int(np.count_nonzero(pred & (yj == 1)))
        fp = int(np.count_nonzero(pred & (yj == 0)))
        roc.append({"label": name, "color": color, "x": np.r_[0, fps / n_neg], "y": np.r_[0, tps / n_pos],
                    "dot": (fp / n_neg, tp / n_pos)})
        pr.append({"label": name, "color": color, "x": np.r_[0, tps / n_pos], "y": np.r_[1, tps / (tps + fps)],
                   "dot": (tp / n_pos, tp / (tp + fp)) if tp + fp else None})
    return [svg_chart("ROC curves", "false positive rate", "true positive rate", roc),
            svg_chart("Precision-recall curves", "recall", "precision", pr, diagonal=False),
            svg_chart(f"Reliability diagram ({N_BINS} bins)", "mean predicted probability", "observed positive rate", rel)]


# --------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------


def render(doc: dict[str, Any], figures: list[str], provenance: dict[str, Any], title: str = "mavl evaluation report") -> str:
    """HTML text for a report dict (``Report.to_dict()`` plus ``warnings``)."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
             f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f'<p class="note">{doc["n_images"]} images, {len(doc["labels"])} labels. '
             "Research use only: not a medical device.</p>"]
    for w in doc.get("warnings", []):
        cls = "alarm" if w.startswith("ALARM") else "warn"
        parts.append(f'<div class="{cls}">{_e(w.replace("ALARM: ", ""))}</div>')

    parts.append("<h2>Overall</h2>")
    ci = doc.get("ci", {})
    cal = doc.get("calibration") or {}
    rows = [[_e(_NICE.get(k, k)), _num(v), _ci(ci.get(k))] for k, v in doc["overall"].items()]
    for k in ("macro_ece", "macro_mce", "macro_brier"):
        if k in cal:
            rows.append([_e(_NICE.get(k, k)), _num(cal[k]), ""])
    parts.append(_table(["metric", "value", "95% CI" if ci else ""], rows))

    parts.append("<h2>Per label</h2>")
    cal_by = {d["name"]: d for d in cal.get("labels", [])}
    rows = []
    for lab in doc["labels"]:
        c = cal_by.get(lab["name"], {})
        rows.append([_e(lab["name"]), _num(lab["support"]), _num(lab["n"]), _num(lab["prevalence"]), _num(lab["precision"]),
                     _num(lab["recall"]), _num(lab["specificity"]), _num(lab["f1"]), _num(lab["auroc"]),
                     _ci(lab.get("auroc_ci")), _num(lab["auprc"]), _num(c.get("ece")), _num(c.get("brier")),
                     _num(lab["threshold"])])
    parts.append(_table(["label", "support", "n", "prev.", "precision", "recall", "specif.", "F1", "AUROC", "AUROC 95% CI",
                         "AUPRC", "ECE", "Brier", "thresh."], rows))

    parts.append('<h2>Curves</h2><div class="figs">' + "".join(figures) + "</div>")
    parts.append('<p class="note">Dots: operating point at each label\'s threshold (score &ge; t is positive). '
                 f"Reliability: {N_BINS} equal-width bins on [0, 1]; ECE weights each bin by its count.</p>")

    sub = doc.get("subgroups") or {}
    for col in sub.get("columns", []):
        parts.append(f"<h2>Subgroups by {_e(col['spec'])}</h2><p class=\"note\">from {_e(col['source'])}; "
                     f"CIs: {sub.get('bootstrap', 0)} bootstrap resamples of {_e(sub.get('resampled', ''))} within each subgroup</p>")
        rows = [[_e(g["group"]), _num(g["images"]), _num(g["patients"]), _num(g["macro_auroc"]), _ci(g["macro_auroc_ci"]),
                 _num(g["macro_f1"])] for g in col["groups"]]
        parts.append(_table(["group", "images", "patients", "macro AUROC", "95% CI", "macro F1"], rows))
        rows = []
        for j, gap in enumerate(col["gaps"]):
            per = [f"{_num(g['labels'][j]['auroc'])} {_ci(g['labels'][j]['auroc_ci'])}".strip() for g in col["groups"]]
            rows.append([_e(gap["label"]), *per, _num(gap["auroc_gap"]),
                         _e(f"{gap['highest']['group']} vs {gap['lowest']['group']}") if gap["highest"] else ""])
        parts.append(_table(["AUROC by label", *[g["group"] for g in col["groups"]], "largest gap", "between"], rows))

    if doc.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in doc["notes"]) + "</ul>")
    parts.append("<h2>Provenance</h2>")
    parts.append(_table(["field", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in provenance.items() if v not in (None, "")],
                        cls="prov"))
    parts.append("</body></html>\n")
    return "".join(parts)
