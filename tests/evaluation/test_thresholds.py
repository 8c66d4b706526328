"""Threshold tuning: brute-force optimality, grid comparison, sensitivity target, masks, fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.metrics import evaluate
from mavl_cli.evaluation.thresholds import (
    CLASSIC_GRID,
    ThresholdResult,
    fingerprint,
    tune,
    tune_global_sweep,
    tune_min_sensitivity,
    tune_per_label_f1,
    tune_youden,
)


def _data(seed: int, n: int = 60, n_labels: int = 4, decimals: int = 2):
    rng = np.random.default_rng(seed)
    prev = rng.uniform(0.1, 0.6, n_labels)
    y = (rng.random((n, n_labels)) < prev).astype(np.float64)
    s = np.round(np.clip(0.25 * y + 0.75 * rng.random((n, n_labels)), 0, 1), decimals)
    return y, s, rng


def _candidates(sj: np.ndarray) -> np.ndarray:
    """Every threshold that gives a distinct prediction, incl. 'predict nothing'."""
    return np.append(np.unique(sj), np.inf)


def _f1(yj, sj, t):
    """Plain-count F1 (sklearn's f1_score is too slow for thousands of brute-force calls)."""
    pred = sj >= t
    pos = yj == 1
    tp = np.sum(pred & pos)
    denom = 2 * tp + np.sum(pred & ~pos) + np.sum(~pred & pos)
    return 2 * tp / denom if denom else 0.0


def test_plain_f1_helper_matches_sklearn():
    y, s, _ = _data(9)
    for t in (0.0, 0.3, 0.5, 2.0):
        assert _f1(y[:, 0], s[:, 0], t) == pytest.approx(
            f1_score(y[:, 0], (s[:, 0] >= t).astype(int), zero_division=0)
        )


def _youden(yj, sj, t):
    pred = sj >= t
    return pred[yj == 1].mean() - pred[yj == 0].mean()


def test_classic_grid():
    assert CLASSIC_GRID[0] == 0.10 and CLASSIC_GRID[-1] == 0.90 and len(CLASSIC_GRID) == 17


@pytest.mark.parametrize("seed", range(8))
def test_per_label_f1_is_brute_force_optimum(seed):
    y, s, _ = _data(seed, decimals=1 if seed % 2 else 3)
    res = tune_per_label_f1(y, s)
    assert isinstance(res, ThresholdResult) and res.method == "per-label"
    for j in range(y.shape[1]):
        yj, sj = y[:, j], s[:, j]
        best = max(_f1(yj, sj, t) for t in _candidates(sj))
        assert _f1(yj, sj, res.thresholds[j]) == pytest.approx(best, abs=1e-12)
        assert res.thresholds[j] in sj  # placed at an observed score
        grid_best = max(_f1(yj, sj, t) for t in CLASSIC_GRID)
        assert _f1(yj, sj, res.thresholds[j]) >= grid_best - 1e-12
    ev = evaluate(y, s, res.thresholds, [f"L{j}" for j in range(y.shape[1])])
    assert res.objective == pytest.approx(ev.macro_f1, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_youden_is_brute_force_optimum(seed):
    y, s, _ = _data(seed, decimals=1)
    res = tune_youden(y, s)
    for j in range(y.shape[1]):
        yj, sj = y[:, j], s[:, j]
        best = max(_youden(yj, sj, t) for t in _candidates(sj))
        assert _youden(yj, sj, res.thresholds[j]) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_min_sensitivity_keeps_target_and_is_highest(seed, target):
    y, s, _ = _data(seed, n=80, decimals=2)
    res = tune_min_sensitivity(y, s, target)
    assert res.method == "sensitivity"
    for j in range(y.shape[1]):
        yj, sj = y[:, j], s[:, j]
        t = res.thresholds[j]
        assert recall_score(yj, (sj >= t).astype(int)) >= target
        higher = np.unique(sj[sj > t])
        if higher.size:
            # The next distinct score up already misses the target.
            assert recall_score(yj, (sj >= higher[0]).astype(int)) < target


def test_global_sweep_maximises_macro_f1_on_the_grid():
    y, s, _ = _data(3, n=200)
    res = tune_global_sweep(y, s)
    macro = [
        f1_score(y, (s >= g).astype(int), average="macro", zero_division=0) for g in CLASSIC_GRID
    ]
    assert res.method == "sweep"
    assert np.all(res.thresholds == res.thresholds[0]) and res.thresholds[0] in CLASSIC_GRID
    assert res.objective == pytest.approx(max(macro), abs=1e-12)
    assert res.thresholds[0] == CLASSIC_GRID[int(np.argmax(macro))]
    custom = tune_global_sweep(y, s, grid=np.array([0.33]))
    assert custom.thresholds[0] == 0.33


@pytest.mark.parametrize("method", ["per-label", "youden", "sensitivity"])
def test_masked_entries_are_ignored(method):
    y, s, rng = _data(5, n=100)
    mask = rng.random(y.shape) > 0.3
    y_bad = np.where(mask, y, np.nan)  # uncertain / missing
    s_bad = np.where(mask, s, 1.0)  # adversarial scores under the mask
    kw = {"min_sensitivity": 0.8} if method == "sensitivity" else {}
    got = tune(y_bad, s_bad, method, mask=mask, **kw)
    for j in range(y.shape[1]):
        rows = mask[:, j]
        ref = tune(y[rows, j : j + 1], s[rows, j : j + 1], method, **kw)
        assert got.thresholds[j] == ref.thresholds[0]


@pytest.mark.parametrize("method", ["per-label", "youden", "sensitivity"])
def test_one_class_labels_keep_default_with_note(method):
    y, s, _ = _data(2)
    y[:, 1] = 0
    y[:, 2] = 1
    kw = {"min_sensitivity": 0.9} if method == "sensitivity" else {}
    res = tune(y, s, method, default=0.42, label_names=["A", "Hernia", "C", "D"], **kw)
    assert res.thresholds[1] == 0.42 and res.thresholds[2] == 0.42
    assert any("Hernia: no positives" in n and "0.42" in n for n in res.notes)
    assert any("C: no negatives" in n for n in res.notes)
    assert res.thresholds[0] != 0.42 or res.thresholds[3] != 0.42
    sweep = tune(y, s, "sweep", label_names=["A", "Hernia", "C", "D"])
    assert any("Hernia" in n for n in sweep.notes)


def test_tune_dispatch_and_errors():
    y, s, _ = _data(0)
    assert tune(y, s, "per-label").method == "per-label"
    assert tune(y, s, "youden").method == "youden"
    assert tune(y, s, "sweep", default=0.5).method == "sweep"
    assert tune(y, s, "sensitivity", min_sensitivity=0.9).method == "sensitivity"
    with pytest.raises(MavlError, match="Unknown threshold method 'f2'"):
        tune(y, s, "f2")
    with pytest.raises(MavlError, match="minimum sensitivity"):
        tune(y, s, "sensitivity")
    with pytest.raises(MavlError, match="Minimum sensitivity"):
        tune_min_sensitivity(y, s, 1.5)
    with pytest.raises(MavlError, match="matching"):
        tune_per_label_f1(y, s[:, :2])


def test_fingerprint_identity():
    y, s, _ = _data(0, n=5)
    ids = [f"img{i}.png" for i in range(5)]
    fp = fingerprint(ids, y)
    assert fp == fingerprint(list(ids), y.copy()) and len(fp) == 16
    int(fp, 16)
    assert fingerprint(ids[::-1], y) != fp
    y2 = y.copy()
    y2[0, 0] = 1 - y2[0, 0]
    assert fingerprint(ids, y2) != fp
    assert fingerprint(ids, y, s) != fp and fingerprint(ids, y, s) == fingerprint(ids, y, s.copy())
    y_nan = y.copy()
    y_nan[1, 1] = np.nan
    assert fingerprint(ids, y_nan) == fingerprint(ids, y_nan.copy()) != fp
    with pytest.raises(MavlError, match="image ids"):
        fingerprint(ids[:3], y)
