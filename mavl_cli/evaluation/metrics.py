"""Multi-label evaluation metrics in plain, vectorised numpy.

Why not scikit-learn: its per-label loop is slow on 200k images and it has no
notion of masked (ignored) entries, which CheXpert's uncertain labels need.
Values are defined to match scikit-learn exactly (``zero_division=0``, ties
grouped the same way); the tests check this. Convention everywhere: an entry
is predicted positive iff ``score >= threshold``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.bootstrap import (
    AurocEngine,
    Resampler,
    nanmean_rows,
    per_unit,
    percentile_ci,
    units_of,
)

__all__ = [
    "LabelMetrics",
    "Report",
    "binary_auroc",
    "binary_auprc",
    "evaluate",
]

OVERALL_KEYS = (
    "macro_f1",
    "micro_f1",
    "weighted_f1",
    "macro_auroc",
    "macro_auprc",
    "hamming_loss",
    "exact_match",
)
LABEL_KEYS = (
    "support",
    "n",
    "prevalence",
    "precision",
    "recall",
    "specificity",
    "f1",
    "auroc",
    "auprc",
    "threshold",
)


def _clean(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so json.dump never fails."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else value
    return value


def clean_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): clean_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_tree(v) for v in value]
    if isinstance(value, np.ndarray):
        return [clean_tree(v) for v in value.tolist()]
    return _clean(value)


@dataclass
class LabelMetrics:
    """Per-label metrics; anything undefined is ``float('nan')``."""

    name: str
    support: int  # positives among evaluated (unmasked) entries
    n: int  # evaluated (unmasked) entries
    prevalence: float
    precision: float
    recall: float
    specificity: float
    f1: float
    auroc: float
    auprc: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


@dataclass
class Report:
    """Everything ``mavl evaluate`` prints or writes."""

    labels: list[LabelMetrics]
    macro_f1: float
    micro_f1: float
    weighted_f1: float
    macro_auroc: float
    macro_auprc: float
    hamming_loss: float
    exact_match: float
    n_images: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)  # from mavl_cli.evaluation.calibration.calibration_report
    subgroups: dict[str, Any] = field(default_factory=dict)  # from mavl_cli.evaluation.subgroups
    label_auroc_ci: list[tuple[float, float]] = field(default_factory=list)  # per label, with --bootstrap
    data: dict[str, Any] = field(default_factory=dict)  # what was evaluated: files, fingerprint

    def to_dict(self) -> dict[str, Any]:
        """Stable, JSON-able structure (NaN becomes ``None``)."""
        out = {
            "n_images": int(self.n_images),
            "overall": {k: _clean(getattr(self, k)) for k in OVERALL_KEYS},
            "ci": {k: [_clean(lo), _clean(hi)] for k, (lo, hi) in self.ci.items()},
            "labels": [m.to_dict() for m in self.labels],
            "notes": list(self.notes),
        }
        if self.label_auroc_ci:
            for d, (lo, hi) in zip(out["labels"], self.label_auroc_ci):
                d["auroc_ci"] = [_clean(lo), _clean(hi)]
        if self.data:
            out["data"] = clean_tree(self.data)
        if self.calibration:
            out["calibration"] = clean_tree(self.calibration)
        if self.subgroups:
            out["subgroups"] = clean_tree(self.subgroups)
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat rows with one shared column set, ready for ``csv.DictWriter``.

        One row per label (``kind="label"``) then one per overall metric
        (``kind="overall"``, value in ``value``, CI bounds when bootstrapped).
        """
        columns = ("kind", "name", *LABEL_KEYS, "ece", "mce", "brier", "value", "ci_low", "ci_high")
        cal = {d["name"]: d for d in self.calibration.get("labels", [])}
        rows: list[dict[str, Any]] = []
        for m in self.labels:
            row = dict.fromkeys(columns)
            row.update(kind="label", **m.to_dict())
            row.update({k: _clean(cal.get(m.name, {}).get(k)) for k in ("ece", "mce", "brier")})
            rows.append(row)
        for key in OVERALL_KEYS:
            row = dict.fromkeys(columns)
            lo, hi = self.ci.get(key, (None, None))
            row.update(
                kind="overall",
                name=key,
                value=_clean(getattr(self, key)),
                ci_low=_clean(lo),
                ci_high=_clean(hi),
            )
            rows.append(row)
        for key in ("macro_ece", "macro_mce", "macro_brier"):
            if key in self.calibration:
                row = dict.fromkeys(columns)
                row.update(kind="overall", name=key, value=_clean(self.calibration[key]))
                rows.append(row)
        return rows


# --------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------


def curve_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP/FP counts at each distinct score, scanning from the top.

    Returns ``(thresholds, tps, fps)`` with thresholds in decreasing order;
    entry k counts everything with ``score >= thresholds[k]``. Tied scores
    form one step, which is how scikit-learn treats ties.
    """
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    ends = np.flatnonzero(np.diff(s_sorted)) if s_sorted.size > 1 else np.empty(0, np.intp)
    ends = np.append(ends, s_sorted.size - 1)
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return s_sorted[ends], tps, fps


def auroc_auprc(tps: np.ndarray, fps: np.ndarray) -> tuple[float, float]:
    """AUROC (trapezoid == Mann-Whitney with ties as 1/2) and average precision."""
    n_pos = int(tps[-1]) if tps.size else 0
    n_neg = int(fps[-1]) if fps.size else 0
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    prev_tps = np.concatenate(([0], tps[:-1]))
    prev_fps = np.concatenate(([0], fps[:-1]))
    # Twice the trapezoid area in count units is an exact integer.
    twice_area = np.sum((fps - prev_fps) * (tps + prev_tps), dtype=np.int64)
    auroc = float(twice_area) / (2.0 * n_pos * n_neg)
    precision = tps / (tps + fps)
    auprc = float(np.sum((tps - prev_tps) / n_pos * precision))
    return auroc, auprc


def _as_binary_pair(y: Any, s: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MavlError(f"Labels and scores differ in length ({y.size} vs {s.size}).")
    if not np.all((y == 0) | (y == 1)):
        raise MavlError("Labels must be 0 or 1.")
    return y.astype(np.int64), s


def binary_auroc(y: Any, s: Any) -> float:
    """ROC AUC equal to ``sklearn.metrics.roc_auc_score``; NaN if one class only."""
    y_i, s_f = _as_binary_pair(y, s)
    if y_i.size == 0:
        return float("nan")
    _, tps, fps = curve_counts(y_i, s_f)
    return auroc_auprc(tps, fps)[0]


def binary_auprc(y: Any, s: Any) -> float:
    """Average precision equal to ``sklearn.metrics.average_precision_score``.

    NaN when only one class is present (scikit-learn returns an arbitrary
    value with a warning there; a NaN cannot be mistaken for a result).
    """
    y_i, s_f = _as_binary_pair(y, s)
    if y_i.size == 0:
        return float("nan")
    _, tps, fps = curve_counts(y_i, s_f)
    return auroc_auprc(tps, fps)[1]


# --------------------------------------------------------------------------
# Input checks shared with thresholds.py and plots.py
# --------------------------------------------------------------------------


def prepare(
    y_true: Any,
    scores: Any,
    mask: Any = None,
    label_names: list[str] | None = None,
    thresholds: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate shapes/values and return ``(y int8, scores, mask bool, thresholds)``.

    Values under a False mask may be anything (NaN, -1 for "uncertain"); they
    are zeroed so later arithmetic never sees them.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim != 2 or y.shape != s.shape:
        raise MavlError(
            f"Labels and scores must be matching [images, labels] arrays, got {y.shape} and {s.shape}."
        )
    if mask is None:
        m = np.ones(y.shape, dtype=bool)
    else:
        m = np.asarray(mask, dtype=bool)
        if m.ndim == 1:
            m = m[:, None]
        if m.shape != y.shape:
            raise MavlError(f"Mask shape {m.shape} does not match labels shape {y.shape}.")
    n_labels = y.shape[1]
    if label_names is not None and len(label_names) != n_labels:
        raise MavlError(f"Got {len(label_names)} label names for {n_labels} label columns.")
    y_ok = (y == 0) | (y == 1)
    if not np.all(y_ok | ~m):
        raise MavlError("Labels must be 0 or 1 wherever they are not masked out.")
    if not np.all(np.isfinite(s) | ~m):
        raise MavlError("Scores contain NaN or infinite values in evaluated entries.")
    y = np.where(m, y, 0.0).astype(np.int8)
    s = np.where(m, s, 0.0)
    t = None
    if thresholds is not None:
        t = np.asarray(thresholds, dtype=np.float64).ravel()
        if t.size == 1 and n_labels != 1:
            t = np.full(n_labels, float(t[0]))
        if t.shape != (n_labels,):
            raise MavlError(f"Got {t.size} thresholds for {n_labels} labels.")
        if not np.all(np.isfinite(t)):
            raise MavlError("Thresholds must be finite numbers.")
    return y, s, m, t


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), 0 when the denominator is 0 (sklearn's zero_division=0)."""
    tp = np.asarray(tp, dtype=np.float64)
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def confusion_counts(
    y: np.ndarray, s: np.ndarray, m: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-label TP, FP, FN, TN over unmasked entries (inputs from :func:`prepare`)."""
    pred = s >= thresholds[None, :]
    pos = y.astype(bool)
    tp = np.count_nonzero(pred & pos & m, axis=0)
    fp = np.count_nonzero(pred & ~pos & m, axis=0)
    fn = np.count_nonzero(~pred & pos & m, axis=0)
    tn = np.count_nonzero(~pred & ~pos & m, axis=0)
    return tp, fp, fn, tn


def macro_f1_at(y: np.ndarray, s: np.ndarray, m: np.ndarray, thresholds: np.ndarray) -> float:
    """Macro F1 over all labels at the given thresholds (prepared inputs)."""
    tp, fp, fn, _ = confusion_counts(y, s, m, thresholds)
    return float(np.mean(f1_from_counts(tp, fp, fn)))


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _safe_div(a: float, b: float, zero: float) -> float:
    return float(a) / float(b) if b > 0 else zero


def _ranking_metrics(
    y: np.ndarray, s: np.ndarray, m: np.ndarray, j: int, name: str, support: int, n_eval: int, notes: list[str]
) -> tuple[float, float]:
    """AUROC and AUPRC of label ``j`` over its unmasked rows; NaN plus a note when undefined."""
    if n_eval == 0:
        notes.append(f"{name}: every entry is masked out, nothing to evaluate (n/a)")
        return float("nan"), float("nan")
    if support == 0 or support == n_eval:
        which = "no positives" if support == 0 else "no negatives"
        notes.append(f"AUROC/AUPRC undefined for {name}: only one class present, {which} (n/a)")
        return float("nan"), float("nan")
    rows = m[:, j]
    yj = y[rows, j] if not rows.all() else y[:, j]
    sj = s[rows, j] if not rows.all() else s[:, j]
    _, tps, fps = curve_counts(yj, sj)
    return auroc_auprc(tps, fps)


def _label_metrics(
    y: np.ndarray,
    s: np.ndarray,
    m: np.ndarray,
    t: np.ndarray,
    label_names: list[str],
    counts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    notes: list[str],
) -> list[LabelMetrics]:
    """One :class:`LabelMetrics` per label from the confusion ``counts`` (TP, FP, FN, TN)."""
    tp, fp, fn, tn = counts
    support = tp + fn
    n_eval = m.sum(axis=0)
    labels: list[LabelMetrics] = []
    for j, name in enumerate(label_names):
        auroc, auprc = _ranking_metrics(y, s, m, j, name, support[j], n_eval[j], notes)
        labels.append(
            LabelMetrics(
                name=name,
                support=int(support[j]),
                n=int(n_eval[j]),
                prevalence=_safe_div(support[j], n_eval[j], float("nan")),
                precision=_safe_div(tp[j], tp[j] + fp[j], 0.0),
                recall=_safe_div(tp[j], support[j], 0.0),
                specificity=_safe_div(tn[j], tn[j] + fp[j], float("nan")),
                f1=float(f1_from_counts(tp[j], fp[j], fn[j])),
                auroc=auroc,
                auprc=auprc,
                threshold=float(t[j]),
            )
        )
    return labels


def _f1_summary(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[float, float, float]:
    """(macro, micro, support-weighted) F1 from per-label counts."""
    support = tp + fn
    f1s = f1_from_counts(tp, fp, fn)
    macro_f1 = float(np.mean(f1s)) if tp.size else float("nan")
    micro_f1 = float(f1_from_counts(tp.sum(), fp.sum(), fn.sum()))
    weighted_f1 = _safe_div(float(np.sum(f1s * support)), float(support.sum()), 0.0)
    return macro_f1, micro_f1, weighted_f1


def _macro_ranking(labels: list[LabelMetrics], notes: list[str]) -> tuple[float, float]:
    """(macro AUROC, macro AUPRC) over the labels where AUROC is defined; notes any excluded."""
    aurocs = np.array([lm.auroc for lm in labels], dtype=np.float64)
    auprcs = np.array([lm.auprc for lm in labels], dtype=np.float64)
    defined = np.isfinite(aurocs)
    macro_auroc = float(aurocs[defined].mean()) if defined.any() else float("nan")
    macro_auprc = float(auprcs[defined].mean()) if defined.any() else float("nan")
    if not defined.all():
        excluded = ", ".join(lm.name for lm, d in zip(labels, defined) if not d)
        notes.append(
            f"Macro AUROC/AUPRC average {int(defined.sum())} of {len(labels)} labels; excluded: {excluded}"
        )
    return macro_auroc, macro_auprc


def _error_rates(y: np.ndarray, s: np.ndarray, m: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """(Hamming loss over unmasked entries, exact-match ratio over images)."""
    wrong = (s >= t[None, :]) != y.astype(bool)
    wrong &= m
    total = int(m.sum())
    hamming = _safe_div(int(wrong.sum()), total, float("nan"))
    exact = _safe_div(int(np.count_nonzero(~wrong.any(axis=1))), y.shape[0], float("nan"))
    return hamming, exact


def _add_bootstrap(
    report: Report,
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    bootstrap: int,
    seed: int,
    groups: np.ndarray | None,
    confidence: float,
) -> None:
    """Fill ``report``'s overall and per-label AUROC CIs from ``bootstrap`` resamples, with a note."""
    y, s, m, t = prepared
    per_label: list[tuple[float, float]] = []
    report.ci = bootstrap_ci(y, s, m, t, bootstrap, seed, groups, confidence, label_auroc_ci=per_label)
    report.label_auroc_ci = [ci if np.isfinite(lm.auroc) else (float("nan"), float("nan"))
                             for ci, lm in zip(per_label, report.labels)]
    report.notes.append(
        f"{int(confidence * 100)}% percentile CIs from {bootstrap} bootstrap resamples of "
        + ("patients" if groups is not None else "images")
        + f" (seed {seed})"
    )


def evaluate(
    y_true: np.ndarray,
    scores: np.ndarray,
    thresholds: np.ndarray,
    label_names: list[str],
    mask: np.ndarray | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    groups: np.ndarray | None = None,
    confidence: float = 0.95,
) -> Report:
    """Per-label and overall metrics, optionally with bootstrap percentile CIs.

    Masked (False) entries are left out of everything, not counted as
    negatives. With ``groups`` (patient ids) the bootstrap resamples patients,
    because images of one patient are correlated and resampling them
    independently gives intervals that are too narrow.
    """
    if bootstrap < 0:
        raise MavlError(f"Bootstrap resamples must be 0 or more, got {bootstrap}.")
    if not 0.0 < confidence < 1.0:
        raise MavlError(f"Confidence must be between 0 and 1, got {confidence}.")
    y, s, m, t = prepare(y_true, scores, mask, label_names, thresholds)
    if t is None:
        raise MavlError("Thresholds are required for evaluation.")
    notes: list[str] = []
    tp, fp, fn, tn = confusion_counts(y, s, m, t)
    labels = _label_metrics(y, s, m, t, label_names, (tp, fp, fn, tn), notes)
    macro_f1, micro_f1, weighted_f1 = _f1_summary(tp, fp, fn)
    macro_auroc, macro_auprc = _macro_ranking(labels, notes)
    hamming, exact = _error_rates(y, s, m, t)
    report = Report(
        labels=labels,
        macro_f1=macro_f1,
        micro_f1=micro_f1,
        weighted_f1=weighted_f1,
        macro_auroc=macro_auroc,
        macro_auprc=macro_auprc,
        hamming_loss=hamming,
        exact_match=exact,
        n_images=int(y.shape[0]),
        notes=notes,
    )
    if bootstrap:
        _add_bootstrap(report, (y, s, m, t), bootstrap, seed, groups, confidence)
    return report


# --------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------


def resample_weights(
    rng: np.random.Generator, n_draws: int, inverse: np.ndarray, n_units: int
) -> np.ndarray:
    """[n_draws, n_images] multiplicities: each draw picks units with replacement.

    A unit is an image or a patient; an image's weight is how often its
    patient was drawn, so whole patients enter or leave a resample together.
    """
    picks = rng.integers(0, n_units, size=(n_draws, n_units))
    flat = picks + (np.arange(n_draws) * n_units)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_draws * n_units).reshape(n_draws, n_units)
    return counts[:, inverse].astype(np.float64)


def weighted_auroc_sorted(ws: np.ndarray, pos: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """AUROC for each row of weights ``ws`` [B, n] over rows sorted by ascending score.

    ``starts`` marks where each group of tied scores begins. Weighted
    Mann-Whitney: every (positive, negative) pair counts w_pos * w_neg, ties
    count half. NaN where a resample lacks a class.
    """
    pw = np.add.reduceat(ws * pos, starts, axis=1)
    nw = np.add.reduceat(ws * ~pos, starts, axis=1)
    below = np.cumsum(nw, axis=1) - nw
    u = np.sum(pw * (below + 0.5 * nw), axis=1)
    denom = pw.sum(axis=1) * nw.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, u / np.where(denom > 0, denom, 1), np.nan)


def bootstrap_ci(
    y: np.ndarray,
    s: np.ndarray,
    m: np.ndarray,
    t: np.ndarray,
    n_boot: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
    confidence: float = 0.95,
    label_auroc_ci: list[tuple[float, float]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs for macro AUROC, macro F1 and micro F1 (prepared inputs).

    Pass a list as ``label_auroc_ci`` to also get each label's AUROC CI (appended, in label order).

    Each resample is a vector of patient (or image) multiplicities, so F1
    counts become one matrix product and AUROC a weighted rank statistic
    computed from one sort per label (:mod:`mavl_cli.evaluation.bootstrap`).
    """
    if n_boot < 0:
        raise MavlError(f"Bootstrap resamples must be 0 or more, got {n_boot}.")
    if not 0.0 < confidence < 1.0:
        raise MavlError(f"Confidence must be between 0 and 1, got {confidence}.")

    n_images, n_labels = y.shape
    inverse, n_units = units_of(n_images, groups)
    if n_images == 0:
        return {}

    pred = s >= t[None, :]
    pos = y.astype(bool)
    # F1 counts are linear in the unit multiplicities: aggregate per unit once.
    tp_u = per_unit(inverse, n_units, pred & pos & m)
    fp_u = per_unit(inverse, n_units, pred & ~pos & m)
    fn_u = per_unit(inverse, n_units, ~pred & pos & m)
    engine = AurocEngine(y, s, m, inverse, n_units)

    macro_auroc, macro_f1, micro_f1, label_aucs = [], [], [], []
    for counts in Resampler(n_units, seed).chunks(n_boot, engine.chunk_size(n_boot)):
        c = counts.astype(np.float64)
        tp, fp, fn = c @ tp_u, c @ fp_u, c @ fn_u
        macro_f1.append(f1_from_counts(tp, fp, fn).mean(axis=1))
        micro_f1.append(f1_from_counts(tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)))
        aucs = engine.auroc(counts)
        macro_auroc.append(nanmean_rows(aucs))
        label_aucs.append(aucs)
    if label_auroc_ci is not None:
        draws = np.concatenate(label_aucs)
        label_auroc_ci.extend(percentile_ci(draws[:, j], confidence) for j in range(n_labels))

    return {
        key: percentile_ci(np.concatenate(vals), confidence)
        for key, vals in (("macro_auroc", macro_auroc), ("macro_f1", macro_f1), ("micro_f1", micro_f1))
    }
