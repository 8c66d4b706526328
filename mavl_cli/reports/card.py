"""`mavl card`: a Hugging Face style model card written from what the model file records.

The YAML front matter (tags, ``model-index`` with evaluation metrics) follows
the Hub's model card metadata, so ``huggingface_hub.ModelCard`` reads it;
strings are written JSON-quoted, which YAML reads unchanged. The body says
what mavl knows: encoders, training data and its fingerprint, labels,
thresholds and how they were tuned, calibration, evaluation figures with
CIs, and the limitations it can detect (e.g. thresholds tuned, or
calibration fitted, on the very data the figures come from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mavl_cli.core.errors import MavlError


def _q(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def _fmt(v: Any, d: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{d}f}"
    return str(v)


def _ci(pair: Any) -> str:
    if not pair or pair[0] is None or pair[1] is None:
        return ""
    return f" [{pair[0]:.3f}, {pair[1]:.3f}]"


def read_eval(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MavlError(f"{path}: file not found (expected `mavl evaluate --json` output)", path=p)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise MavlError(f"{path}: not JSON; write it with `mavl evaluate ... --json > report.json`", path=p) from None
    if not isinstance(doc, dict) or "overall" not in doc or "labels" not in doc:
        raise MavlError(f"{path}: not an evaluate report (no 'overall' and 'labels'); write it with `mavl evaluate --json`", path=p)
    return doc


def limitations(meta: dict[str, Any], ev: dict[str, Any] | None) -> list[str]:
    """What mavl can tell from the records alone."""
    out = ["Research use only; not a medical device and not validated for clinical decisions."]
    th = meta.get("threshold") or {}
    cal = meta.get("calibration") or {}
    train = meta.get("train") or {}
    if th.get("method", "default") == "default":
        out.append("Decision thresholds are the untuned default 0.5; F1, precision and recall depend on them.")
    if not cal:
        out.append("Probabilities are not calibrated (`mavl calibrate`); read them as scores, not frequencies.")
    if cal.get("prevalence_shift"):
        out.append("Scores are adjusted to a stated deployment prevalence (prior shift); that assumes the images of each "
                   "finding look alike at both sites.")
    text = " ".join(str(v) for v in (train.get("embeddings"), train.get("labels"), meta.get("train_labels")) if v)
    if "phantom" in text.lower():
        out.append("Trained on synthetic phantoms: figures show the pipeline works, not clinical accuracy.")
    if ev is not None:
        data = ev.get("data") or {}
        fp = data.get("fingerprint")
        tuned = th.get("tuned_on") or {}
        fitted = cal.get("fitted_on") or {}
        if fp and fp == tuned.get("fingerprint"):
            out.append("The evaluation figures come from the same images the thresholds were tuned on: they are optimistic.")
        if fp and fp == fitted.get("fingerprint"):
            out.append("The evaluation figures come from the same images the calibration was fitted on: they are optimistic.")
        if fp and fp == train.get("fingerprint"):
            out.append("The evaluation figures come from the training images: they are optimistic.")
        rare = [lab["name"] for lab in ev.get("labels", []) if (lab.get("support") or 0) < 10]
        if rare:
            out.append(f"Fewer than 10 evaluated positives for {', '.join(rare)}: their figures are very uncertain.")
        for w in ev.get("warnings", []):
            out.append(f"evaluate warned: {w}")
    return out


_TAGS = ("mavl", "chest-x-ray", "radiology", "medical-imaging", "multi-label-classification", "vision-language")


def _index_metrics(ev: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(type, name, value) of each overall figure for ``model-index``, CIs in the name."""
    metrics = []
    ci = ev.get("ci") or {}
    for key, mtype, label in (("macro_auroc", "roc_auc", "macro AUROC"), ("macro_auprc", "average_precision", "macro AUPRC"),
                              ("macro_f1", "f1", "macro F1"), ("micro_f1", "f1", "micro F1")):
        v = ev["overall"].get(key)
        if v is not None:
            metrics.append((mtype, label + (_ci(ci.get(key)) and f" (95% CI{_ci(ci.get(key))})"), v))
    if (ev.get("calibration") or {}).get("macro_ece") is not None:
        metrics.append(("ece", "macro ECE (15 bins)", ev["calibration"]["macro_ece"]))
    return metrics


def _front_matter(meta: dict[str, Any], ev: dict[str, Any] | None, name: str) -> list[str]:
    """YAML front matter lines: Hub metadata, plus ``model-index`` when there is an evaluation."""
    fm = ["---", "library_name: mavl", "license: other", "pipeline_tag: image-classification",
          "tags:", *[f"- {t}" for t in _TAGS]]
    if meta.get("backbone"):
        fm.append(f"base_model_backbone: {_q(meta['backbone'])}")
    if ev is not None:
        data = ev.get("data") or {}
        fm += ["model-index:", f"- name: {_q(name)}", "  results:", "  - task:", "      type: image-classification",
               f"      name: {_q('Multi-label chest X-ray classification')}", "    dataset:",
               f"      name: {_q(data.get('labels') or 'evaluation set')}", f"      type: {_q(data.get('labels') or 'custom')}",
               "    metrics:"]
        for mtype, label, v in _index_metrics(ev):
            fm += [f"    - type: {mtype}", f"      name: {_q(label)}", f"      value: {float(v):.6g}"]
    fm.append("---")
    return fm


def _model_section(meta: dict[str, Any]) -> list[str]:
    lrf = meta.get("lrf") or {}
    fusion = meta.get("fusion") or {}
    return ["## Model", "",
            f"- Image backbone: `{meta.get('backbone')}` (weights: `{meta.get('backbone_weights')}`)",
            f"- Preprocessing: `{json.dumps(meta.get('preprocessing'))}`",
            f"- Text encoder: `{meta.get('text_model')}` ({meta.get('pooling')} pooling), aspects: {', '.join(meta.get('aspects') or []) or 'label names'}",
            f"- LRF head: rank {lrf.get('rank')}, keep {lrf.get('keep')}, eta {lrf.get('eta')}" if lrf else "- LRF head: none (backbone features go straight to the fusion)",
            f"- Fusion: dim {fusion.get('dim')}, aggregate `{fusion.get('aggregate')}`"]


def _training_section(meta: dict[str, Any]) -> list[str]:
    train = meta.get("train") or {}
    return ["## Training data", "",
            f"- Embeddings: `{train.get('embeddings')}`; labels: `{train.get('labels')}`",
            f"- Images: {train.get('images', 'not recorded')}; fingerprint: `{train.get('fingerprint', 'not recorded')}`",
            f"- Validation (model selection): `{train.get('val')}`; uncertain labels: {meta.get('uncertain')}"]


def _thresholds_section(th: dict[str, Any]) -> list[str]:
    b = ["## Thresholds", ""]
    tuned = th.get("tuned_on") or {}
    if th.get("method", "default") == "default":
        b.append("Default 0.5 for every label (not tuned).")
    else:
        b.append(f"Method `{th.get('method')}`" + (f" (min sensitivity {th['min_sensitivity']})" if th.get("min_sensitivity") else "")
                 + f", tuned on `{tuned.get('embeddings')}` ({tuned.get('images')} images, fingerprint `{tuned.get('fingerprint')}`).")
    return b


def _calibration_section(cal: dict[str, Any]) -> list[str]:
    b = ["## Calibration", ""]
    if cal:
        fitted = cal.get("fitted_on") or {}
        if fitted:
            b.append(f"Method `{cal.get('method')}` fitted on `{fitted.get('embeddings')}` ({fitted.get('images')} images, "
                     f"fingerprint `{fitted.get('fingerprint')}`); validation macro ECE {_fmt(cal.get('val_ece_before'))} -> "
                     f"{_fmt(cal.get('val_ece_after'))}.")
        for n, v in (cal.get("prevalence_shift") or {}).items():
            b.append(f"- prior shift for {n}: prevalence {v['source']:.3f} -> {v['target']:.3f}")
    else:
        b.append("None.")
    return b


def _evaluation_section(ev: dict[str, Any]) -> list[str]:
    """What was evaluated, the overall table and the per-label table."""
    data = ev.get("data") or {}
    ci = ev.get("ci") or {}
    calrep = ev.get("calibration") or {}
    cal_by = {d["name"]: d for d in calrep.get("labels", [])}
    b = ["## Evaluation", "",
         f"On `{data.get('embeddings') or data.get('scores')}` with labels `{data.get('labels')}` "
         f"({ev.get('n_images')} images, fingerprint `{data.get('fingerprint')}`).", "",
         "| metric | value | 95% CI |", "|---|---|---|"]
    for k, v in ev["overall"].items():
        b.append(f"| {k.replace('_', ' ')} | {_fmt(v)} | {_ci(ci.get(k)).strip()} |")
    for k in ("macro_ece", "macro_brier"):
        if calrep.get(k) is not None:
            b.append(f"| {k.replace('_', ' ')} | {_fmt(calrep[k])} | |")
    b += ["", "| label | support | n | AUROC | 95% CI | F1 | ECE | threshold |", "|---|---|---|---|---|---|---|---|"]
    for lab in ev["labels"]:
        c = cal_by.get(lab["name"], {})
        b.append(f"| {lab['name']} | {lab['support']} | {lab['n']} | {_fmt(lab['auroc'])} | {_ci(lab.get('auroc_ci')).strip()} "
                 f"| {_fmt(lab['f1'])} | {_fmt(c.get('ece'))} | {_fmt(lab['threshold'], 2)} |")
    return b


def render_card(meta: dict[str, Any], model_path: str, ev: dict[str, Any] | None = None, name: str | None = None) -> str:
    """The model card: front matter, then one Markdown section per topic (evaluation only with ``ev``)."""
    labels = list(meta.get("labels") or [])
    name = name or Path(model_path).stem
    lrf = meta.get("lrf") or {}
    fm = _front_matter(meta, ev, name)
    sections = [
        _model_section(meta),
        _training_section(meta),
        ["## Labels", "", ", ".join(labels)],
        _thresholds_section(meta.get("threshold") or {}),
        _calibration_section(meta.get("calibration") or {}),
    ]
    if ev is not None:
        sections.append(_evaluation_section(ev))
    sections += [
        ["## Limitations", "", *[f"- {x}" for x in limitations(meta, ev)]],
        ["## Provenance", "", f"- mavl {meta.get('mavl_version')}; last command: `{meta.get('command')}`"],
    ]
    b = [f"# {name}", "",
         f"A multi-label chest X-ray classifier built with mavl: image backbone features, "
         f"{'a low-rank (LRF) head, ' if lrf else ''}and a vision-language fusion that scores each finding against its "
         "text description. Written by `mavl card` from the model file's own records."]
    for section in sections:
        b += ["", *section]
    b.append("")
    return "\n".join(fm) + "\n\n" + "\n".join(b)
