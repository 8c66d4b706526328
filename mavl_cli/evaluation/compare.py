"""Paired comparison of two score sets on the same images: is model B really better than A?

Per label and macro:

* AUROC of each, the difference A - B with a **paired patient-bootstrap**
  percentile CI (the same resampled patients score both models, so their
  correlation is kept and clustering of films within a patient is respected);
* **DeLong's test** p-value for the AUROC difference (DeLong, DeLong and
  Clarke-Pearson 1988, with the midrank algorithm of Sun and Xu 2014:
  O(n log n) per label). The macro p-value uses the same structural
  components summed over labels per image, so correlations between labels
  sharing images are counted. DeLong treats images as independent; with
  several films per patient prefer the bootstrap CI;
* F1 of each at its own thresholds and the difference, with a paired CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mavl_cli.evaluation.bootstrap import (
    AurocEngine,
    Resampler,
    nanmean_rows,
    per_unit,
    percentile_ci,
    units_of,
)
from mavl_cli.evaluation.metrics import confusion_counts, f1_from_counts

# --------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = xs.size
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1..end
    r = np.repeat(avg, ends - starts)
    out = np.empty(n)
    out[order] = r
    return out


def structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's V10 (one per positive) and V01 (one per negative) for a score vector.

    ``V10_i`` = share of negatives scored below positive i (ties 1/2);
    ``V01_j`` = share of positives scored above negative j (ties 1/2).
    """
    m, n = pos.size, neg.size
    tz = midranks(np.concatenate([pos, neg]))
    tx, ty = midranks(pos), midranks(neg)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return v10, v01


def delong_paired(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """AUROC of a and b, their difference, its DeLong standard error, z and two-sided p."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 1 or n < 1:
        nan = float("nan")
        return {"auroc_a": nan, "auroc_b": nan, "diff": nan, "se": nan, "z": nan, "p": nan}
    va10, va01 = structural_components(a[y], a[~y])
    vb10, vb01 = structural_components(b[y], b[~y])
    auc_a, auc_b = float(va10.mean()), float(vb10.mean())
    s10 = np.cov(np.stack([va10, vb10])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack([va01, vb01])) if n > 1 else np.zeros((2, 2))
    c = np.array([1.0, -1.0])
    var = float(c @ (s10 / m + s01 / n) @ c)
    return _z(auc_a, auc_b, var)


def _z(auc_a: float, auc_b: float, var: float) -> dict[str, float]:
    diff = auc_a - auc_b
    se = math.sqrt(var) if var > 0 else 0.0
    if se > 0:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0 else 0.0
    return {"auroc_a": auc_a, "auroc_b": auc_b, "diff": diff, "se": se, "z": z, "p": p}


def delong_macro(y: np.ndarray, a: np.ndarray, b: np.ndarray, m: np.ndarray, labels: list[int]) -> dict[str, float]:
    """DeLong test of the difference in macro AUROC over ``labels`` (columns), correlated via shared images.

    Each image's influence on the macro difference is the mean over labels of
    its centred structural-component difference over the label's class size,
    scaled by ``sqrt(k / (k - 1))`` so that one label gives DeLong's variance
    exactly; the variance is the sum of squared influences.
    """
    n_img = y.shape[0]
    psi = np.zeros(n_img)
    aucs_a, aucs_b = [], []
    L = len(labels)
    if L == 0:
        return _z(float("nan"), float("nan"), 0.0) | {"p": float("nan")}
    for j in labels:
        rows = np.flatnonzero(m[:, j])
        yy = y[rows, j].astype(bool)
        pos, neg = rows[yy], rows[~yy]
        va10, va01 = structural_components(a[pos, j], a[neg, j])
        vb10, vb01 = structural_components(b[pos, j], b[neg, j])
        d10, d01 = va10 - vb10, va01 - vb01
        k_pos, k_neg = pos.size, neg.size
        f_pos = math.sqrt(k_pos / (k_pos - 1)) if k_pos > 1 else 0.0
        f_neg = math.sqrt(k_neg / (k_neg - 1)) if k_neg > 1 else 0.0
        np.add.at(psi, pos, f_pos * (d10 - d10.mean()) / k_pos / L)
        np.add.at(psi, neg, f_neg * (d01 - d01.mean()) / k_neg / L)
        aucs_a.append(va10.mean())
        aucs_b.append(vb10.mean())
    # for a single label this is S10/m + S01/n: positives and negatives are different images
    var = float(np.sum(psi**2))
    return _z(float(np.mean(aucs_a)), float(np.mean(aucs_b)), var)


# --------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    scores: np.ndarray  # [N, L] aligned to the shared images and labels
    thresholds: np.ndarray  # [L]


def compare(y: np.ndarray, m: np.ndarray, a: Side, b: Side, names: list[str], groups: list[str] | None,
            bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Per-label and macro comparison of ``a`` and ``b`` (prepared y/m; see module doc)."""

    n, L = y.shape
    sa, sb = a.scores.astype(np.float64), b.scores.astype(np.float64)
    ta, tb = a.thresholds.astype(np.float64), b.thresholds.astype(np.float64)
    rows_out = []
    defined = []
    for j, name in enumerate(names):
        r = m[:, j]
        d = delong_paired(y[r, j], sa[r, j], sb[r, j])
        if np.isfinite(d["diff"]):
            defined.append(j)
        rows_out.append({"label": name, "n": int(r.sum()), "positives": int(y[r, j].sum()), **d})
    fa = f1_from_counts(*confusion_counts(y, sa, m, ta)[:3])
    fb = f1_from_counts(*confusion_counts(y, sb, m, tb)[:3])
    for j, row in enumerate(rows_out):
        row.update(f1_a=float(fa[j]), f1_b=float(fb[j]), f1_diff=float(fa[j] - fb[j]))
    macro = delong_macro(y, sa, sb, m, defined)
    macro.update(f1_a=float(fa.mean()), f1_b=float(fb.mean()), f1_diff=float(fa.mean() - fb.mean()), labels=len(defined))

    if bootstrap:
        inverse, n_units = units_of(n, groups)
        ea = AurocEngine(y, sa, m, inverse, n_units)
        eb = AurocEngine(y, sb, m, inverse, n_units)
        pos = y.astype(bool)
        units = {}
        for key, s_, t_ in (("a", sa, ta), ("b", sb, tb)):
            pred = s_ >= t_[None, :]
            units[key] = tuple(per_unit(inverse, n_units, x) for x in (pred & pos & m, pred & ~pos & m, ~pred & pos & m))
        d_auc, d_macro, d_f1, d_mf1 = [], [], [], []
        chunk = max(1, min(ea.chunk_size(bootstrap), eb.chunk_size(bootstrap)))
        for counts in Resampler(n_units, seed).chunks(bootstrap, chunk):
            diff = ea.auroc(counts) - eb.auroc(counts)
            d_auc.append(diff)
            d_macro.append(nanmean_rows(diff[:, defined]) if defined else np.full(counts.shape[0], np.nan))
            c = counts.astype(np.float64)
            f = {k: f1_from_counts(c @ u[0], c @ u[1], c @ u[2]) for k, u in units.items()}
            d_f1.append(f["a"] - f["b"])
            d_mf1.append(f["a"].mean(axis=1) - f["b"].mean(axis=1))
        d_auc_all, d_f1_all = np.concatenate(d_auc), np.concatenate(d_f1)
        for j, row in enumerate(rows_out):
            row["diff_ci"] = list(percentile_ci(d_auc_all[:, j], confidence)) if j in defined else [None, None]
            row["f1_diff_ci"] = list(percentile_ci(d_f1_all[:, j], confidence))
        macro["diff_ci"] = list(percentile_ci(np.concatenate(d_macro), confidence))
        macro["f1_diff_ci"] = list(percentile_ci(np.concatenate(d_mf1), confidence))
    return {"a": a.name, "b": b.name, "images": int(n), "bootstrap": int(bootstrap), "seed": int(seed),
            "resampled": "patients" if groups is not None else "images", "labels": rows_out, "macro": macro}
