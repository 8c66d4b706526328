"""Decision-threshold tuning on validation scores.

Convention (shared with metrics.py): predict positive iff ``score >= t``.
Per-label searches scan every distinct score after one sort, so they find the
true optimum rather than the best point of a coarse grid, and place the
threshold at an observed score so the same prediction is reproduced exactly.
Labels whose tuning data has only one class keep the default and get a note:
any "optimum" there would be an artefact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.metrics import curve_counts, macro_f1_at, prepare

__all__ = [
    "CLASSIC_GRID",
    "ThresholdResult",
    "METHODS",
    "tune_global_sweep",
    "tune_per_label_f1",
    "tune_youden",
    "tune_min_sensitivity",
    "tune",
    "fingerprint",
]

CLASSIC_GRID = np.round(np.arange(0.10, 0.90 + 1e-9, 0.05), 2)


@dataclass
class ThresholdResult:
    """Chosen thresholds plus how they were found."""

    thresholds: np.ndarray
    method: str
    objective: float  # macro F1 on the tuning data at these thresholds
    notes: list[str] = field(default_factory=list)


def _names(n_labels: int, label_names: list[str] | None) -> list[str]:
    return list(label_names) if label_names is not None else [f"label {j}" for j in range(n_labels)]


def _per_label(
    y: Any,
    s: Any,
    mask: Any,
    default: float,
    method: str,
    pick: Callable[[np.ndarray, np.ndarray, int, int], int],
    label_names: list[str] | None,
) -> ThresholdResult:
    """Shared loop: ``pick(tps, fps, n_pos, n_neg)`` returns the index of the chosen step."""
    yp, sp, m, _ = prepare(y, s, mask, label_names)
    n_labels = yp.shape[1]
    names = _names(n_labels, label_names)
    thresholds = np.full(n_labels, float(default))
    notes: list[str] = []
    for j in range(n_labels):
        rows = m[:, j]
        yj, sj = yp[rows, j], sp[rows, j]
        n_pos = int(yj.sum())
        n_neg = int(yj.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            which = "no positives" if n_pos == 0 else "no negatives"
            notes.append(f"{names[j]}: {which} in tuning data, kept default {default:g}")
            continue
        cand, tps, fps = curve_counts(yj, sj)
        thresholds[j] = float(cand[pick(tps, fps, n_pos, n_neg)])
    objective = macro_f1_at(yp, sp, m, thresholds)
    return ThresholdResult(thresholds=thresholds, method=method, objective=objective, notes=notes)


def tune_global_sweep(
    y: Any,
    s: Any,
    mask: Any = None,
    grid: np.ndarray = CLASSIC_GRID,
    label_names: list[str] | None = None,
) -> ThresholdResult:
    """One threshold for all labels: the grid value with the highest macro F1.

    Ties go to the lowest grid value. Labels with one class only are noted but
    share the global threshold, since the method is one number by definition.
    """
    yp, sp, m, _ = prepare(y, s, mask, label_names)
    grid = np.asarray(grid, dtype=np.float64).ravel()
    if grid.size == 0:
        raise MavlError("The threshold grid is empty.")
    n_labels = yp.shape[1]
    scores = [macro_f1_at(yp, sp, m, np.full(n_labels, g)) for g in grid]
    best = int(np.argmax(scores))
    notes = []
    names = _names(n_labels, label_names)
    n_pos = (yp.astype(bool) & m).sum(axis=0)
    n_eval = m.sum(axis=0)
    for j in range(n_labels):
        if n_pos[j] == 0 or n_pos[j] == n_eval[j]:
            which = "no positives" if n_pos[j] == 0 else "no negatives"
            notes.append(f"{names[j]}: {which} in tuning data, did not inform the global threshold")
    return ThresholdResult(
        thresholds=np.full(n_labels, float(grid[best])),
        method="sweep",
        objective=float(scores[best]),
        notes=notes,
    )


def _pick_f1(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> int:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); first max = highest threshold.
    return int(np.argmax(2.0 * tps / (tps + fps + n_pos)))


def _pick_youden(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> int:
    return int(np.argmax(tps / n_pos - fps / n_neg))


def tune_per_label_f1(
    y: Any,
    s: Any,
    mask: Any = None,
    default: float = DEFAULT_THRESHOLD,
    label_names: list[str] | None = None,
) -> ThresholdResult:
    """Per label, the F1-optimal threshold over all distinct scores (highest on ties)."""
    return _per_label(y, s, mask, default, "per-label", _pick_f1, label_names)


def tune_youden(
    y: Any,
    s: Any,
    mask: Any = None,
    default: float = DEFAULT_THRESHOLD,
    label_names: list[str] | None = None,
) -> ThresholdResult:
    """Per label, the threshold maximising Youden's J = sensitivity + specificity - 1."""
    return _per_label(y, s, mask, default, "youden", _pick_youden, label_names)


def tune_min_sensitivity(
    y: Any,
    s: Any,
    min_sensitivity: float,
    mask: Any = None,
    default: float = DEFAULT_THRESHOLD,
    label_names: list[str] | None = None,
) -> ThresholdResult:
    """Per label, the highest threshold whose recall is still >= ``min_sensitivity``.

    Screening use: fix how many positives may be missed, then flag as few
    images as possible.
    """
    target = float(min_sensitivity)
    if not 0.0 < target <= 1.0:
        raise MavlError(f"Minimum sensitivity must be in (0, 1], got {min_sensitivity}.")

    def pick(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> int:
        # Recall grows as the threshold falls; the first step meeting the
        # target is the highest threshold. The last step has recall 1.
        return int(np.argmax(tps / n_pos >= target))

    return _per_label(y, s, mask, default, "sensitivity", pick, label_names)


METHODS = ("sweep", "per-label", "youden", "sensitivity")


def tune(y: Any, s: Any, method: str, mask: Any = None, **kw: Any) -> ThresholdResult:
    """Dispatch by method name: ``sweep``, ``per-label``, ``youden``, ``sensitivity``."""
    if method == "sweep":
        kw.pop("default", None)
        return tune_global_sweep(y, s, mask=mask, **kw)
    if method == "per-label":
        return tune_per_label_f1(y, s, mask=mask, **kw)
    if method == "youden":
        return tune_youden(y, s, mask=mask, **kw)
    if method == "sensitivity":
        if kw.get("min_sensitivity") is None:
            raise MavlError("Threshold method 'sensitivity' needs a minimum sensitivity (e.g. 0.9).")
        target = kw.pop("min_sensitivity")
        return tune_min_sensitivity(y, s, target, mask=mask, **kw)
    raise MavlError(f"Unknown threshold method '{method}'; choose one of {', '.join(METHODS)}.")


def fingerprint(ids: list[str], y: np.ndarray, scores: np.ndarray | None = None) -> str:
    """Short sha256 of the evaluation data's identity (image ids + labels [+ scores]).

    Stored next to tuned thresholds so evaluate can warn when they are applied
    to the very data they were tuned on (optimistic numbers).
    """
    y_arr = np.asarray(y, dtype=np.float64)
    ids = [str(i) for i in ids]
    if y_arr.shape[0] != len(ids):
        raise MavlError(f"Got {len(ids)} image ids for {y_arr.shape[0]} label rows.")
    h = hashlib.sha256()
    h.update("\n".join(ids).encode("utf-8"))
    h.update(str(y_arr.shape).encode())
    nan = np.isnan(y_arr)
    h.update(np.ascontiguousarray(nan).tobytes())
    h.update(np.ascontiguousarray(np.where(nan, 0.0, y_arr) + 0.0).tobytes())
    if scores is not None:
        s_arr = np.ascontiguousarray(np.asarray(scores, dtype=np.float64) + 0.0)
        h.update(b"scores")
        h.update(str(s_arr.shape).encode())
        h.update(s_arr.tobytes())
    return h.hexdigest()[:16]
