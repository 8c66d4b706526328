"""metrics.py against scikit-learn, plus masks, edge cases, bootstrap and the report plot."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.metrics import (
    binary_auprc,
    binary_auroc,
    evaluate,
    resample_weights,
    weighted_auroc_sorted,
)

TOL = dict(rel=1e-12, abs=1e-12)


def _data(seed: int, n: int = 300, n_labels: int = 6, decimals: int = 1):
    """Random labels with varied prevalence and heavily tied, informative scores."""
    rng = np.random.default_rng(seed)
    prev = rng.uniform(0.05, 0.6, n_labels)
    y = (rng.random((n, n_labels)) < prev).astype(np.float64)
    s = np.clip(0.3 * y + rng.random((n, n_labels)) * 0.8, 0, 1)
    return y, np.round(s, decimals), rng


def _names(n_labels: int) -> list[str]:
    return [f"L{j}" for j in range(n_labels)]


@pytest.mark.parametrize("seed", range(30))
def test_binary_ranking_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    y = rng.integers(0, 2, n)
    if y.min() == y.max():
        y[0] = 1 - y[0]
    s = np.round(rng.random(n), int(rng.integers(0, 3)))  # decimals 0 -> almost all tied
    assert binary_auroc(y, s) == pytest.approx(roc_auc_score(y, s), **TOL)
    assert binary_auprc(y, s) == pytest.approx(average_precision_score(y, s), **TOL)


def test_binary_ranking_metrics_one_class_is_nan_not_half():
    assert math.isnan(binary_auroc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(binary_auprc([0, 0], [0.2, 0.5]))
    assert math.isnan(binary_auroc([], []))


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_unmasked_matches_sklearn(seed):
    y, s, rng = _data(seed)
    n_labels = y.shape[1]
    t = rng.uniform(0.2, 0.8, n_labels)
    pred = (s >= t).astype(int)
    rep = evaluate(y, s, t, _names(n_labels))

    p, r, f, sup = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, lm in enumerate(rep.labels):
        assert lm.name == f"L{j}"
        assert lm.support == sup[j] and lm.n == y.shape[0]
        assert lm.prevalence == pytest.approx(y[:, j].mean(), **TOL)
        assert lm.precision == pytest.approx(p[j], **TOL)
        assert lm.recall == pytest.approx(r[j], **TOL)
        assert lm.f1 == pytest.approx(f[j], **TOL)
        neg = y[:, j] == 0
        assert lm.specificity == pytest.approx(np.mean(pred[neg, j] == 0), **TOL)
        assert lm.auroc == pytest.approx(roc_auc_score(y[:, j], s[:, j]), **TOL)
        assert lm.auprc == pytest.approx(average_precision_score(y[:, j], s[:, j]), **TOL)
        assert lm.threshold == t[j]
    kw = dict(zero_division=0)
    assert rep.macro_f1 == pytest.approx(f1_score(y, pred, average="macro", **kw), **TOL)
    assert rep.micro_f1 == pytest.approx(f1_score(y, pred, average="micro", **kw), **TOL)
    assert rep.weighted_f1 == pytest.approx(f1_score(y, pred, average="weighted", **kw), **TOL)
    assert rep.macro_auroc == pytest.approx(roc_auc_score(y, s, average="macro"), **TOL)
    assert rep.macro_auprc == pytest.approx(average_precision_score(y, s, average="macro"), **TOL)
    assert rep.hamming_loss == pytest.approx(hamming_loss(y, pred), **TOL)
    assert rep.exact_match == pytest.approx(accuracy_score(y, pred), **TOL)
    assert rep.n_images == y.shape[0]
    assert rep.ci == {} and rep.notes == []


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_masked_matches_sklearn_on_unmasked_subset(seed):
    y, s, rng = _data(seed, n=400)
    n_labels = y.shape[1]
    mask = rng.random(y.shape) > 0.3
    # Masked entries hold garbage (CheXpert "uncertain" = -1, missing = NaN); it must be ignored.
    y_garbage = np.where(mask, y, rng.choice([-1.0, np.nan], size=y.shape))
    s_garbage = np.where(mask, s, np.nan)
    t = np.full(n_labels, 0.5)
    rep = evaluate(y_garbage, s_garbage, t, _names(n_labels), mask=mask)

    f1s = []
    for j, lm in enumerate(rep.labels):
        rows = mask[:, j]
        yj, sj = y[rows, j], s[rows, j]
        pj = (sj >= 0.5).astype(int)
        p, r, f, _ = precision_recall_fscore_support(
            yj, pj, average="binary", zero_division=0
        )
        f1s.append(f)
        assert lm.n == rows.sum() and lm.support == yj.sum()
        assert (lm.precision, lm.recall, lm.f1) == pytest.approx((p, r, f), **TOL)
        assert lm.auroc == pytest.approx(roc_auc_score(yj, sj), **TOL)
        assert lm.auprc == pytest.approx(average_precision_score(yj, sj), **TOL)
    assert rep.macro_f1 == pytest.approx(np.mean(f1s), **TOL)

    pred = s >= 0.5
    flat_y, flat_p = y[mask], pred[mask]
    assert rep.micro_f1 == pytest.approx(f1_score(flat_y, flat_p, zero_division=0), **TOL)
    assert rep.hamming_loss == pytest.approx(np.mean(flat_y != flat_p), **TOL)
    right = np.all((pred == y.astype(bool)) | ~mask, axis=1)
    assert rep.exact_match == pytest.approx(right.mean(), **TOL)


def test_one_class_label_gives_nan_and_note_and_is_excluded_from_macro():
    y, s, _ = _data(7, n=200, n_labels=4)
    y[:, 2] = 0  # e.g. Hernia absent from a small split
    y[:, 3] = 1
    names = ["Atelectasis", "Effusion", "Hernia", "AllPositive"]
    rep = evaluate(y, s, np.full(4, 0.5), names)
    for lm in rep.labels[2:]:
        assert math.isnan(lm.auroc) and math.isnan(lm.auprc)
    assert math.isnan(rep.labels[3].specificity)
    assert any("Hernia" in n and "only one class" in n for n in rep.notes)
    assert any("excluded: Hernia, AllPositive" in n for n in rep.notes)
    expected = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in (0, 1)])
    assert rep.macro_auroc == pytest.approx(expected, **TOL)
    # sklearn zero_division=0: a label with no positives has F1 0 and counts in macro F1.
    pred = (s >= 0.5).astype(int)
    assert rep.macro_f1 == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), **TOL)


def test_all_zero_predictions_follow_zero_division_zero():
    y, s, _ = _data(3, n_labels=3)
    t = np.full(3, 1.01)  # nothing reaches the threshold
    rep = evaluate(y, s, t, _names(3))
    pred = np.zeros_like(y, dtype=int)
    for lm in rep.labels:
        assert lm.precision == 0.0 and lm.recall == 0.0 and lm.f1 == 0.0
        assert lm.specificity == 1.0
    assert rep.macro_f1 == 0.0 and rep.micro_f1 == 0.0 and rep.weighted_f1 == 0.0
    assert rep.hamming_loss == pytest.approx(hamming_loss(y, pred), **TOL)
    assert rep.exact_match == pytest.approx(accuracy_score(y, pred), **TOL)


def test_no_positives_anywhere_matches_sklearn_weighted_f1():
    rng = np.random.default_rng(0)
    y = np.zeros((50, 3))
    s = rng.random((50, 3))
    pred = (s >= 0.5).astype(int)
    rep = evaluate(y, s, np.full(3, 0.5), _names(3))
    kw = dict(zero_division=0)
    assert rep.weighted_f1 == pytest.approx(f1_score(y, pred, average="weighted", **kw))
    assert rep.macro_f1 == pytest.approx(f1_score(y, pred, average="macro", **kw))
    assert math.isnan(rep.macro_auroc)


def test_fully_masked_label_does_not_crash():
    y, s, _ = _data(1, n_labels=3)
    mask = np.ones_like(y, dtype=bool)
    mask[:, 1] = False
    rep = evaluate(y, s, np.full(3, 0.5), _names(3), mask=mask)
    lm = rep.labels[1]
    assert lm.n == 0 and lm.support == 0 and math.isnan(lm.prevalence) and math.isnan(lm.auroc)
    assert any("L1" in n and "masked" in n for n in rep.notes)


def test_to_dict_is_strict_json_and_to_rows_is_csv_ready():
    y, s, _ = _data(2, n_labels=3)
    y[:, 0] = 0
    rep = evaluate(y, s, np.full(3, 0.5), _names(3), bootstrap=20, seed=1)
    d = rep.to_dict()
    text = json.dumps(d, allow_nan=False)  # NaN must have become None
    assert set(d) == {"n_images", "overall", "ci", "labels", "notes"}
    assert d["labels"][0]["auroc"] is None and d["labels"][1]["auroc"] is not None
    assert set(d["overall"]) == {
        "macro_f1", "micro_f1", "weighted_f1", "macro_auroc", "macro_auprc",
        "hamming_loss", "exact_match",
    }
    assert set(d["ci"]) == {"macro_auroc", "macro_f1", "micro_f1"}
    assert json.loads(text)["n_images"] == y.shape[0]

    rows = rep.to_rows()
    assert len({tuple(r) for r in rows}) == 1  # one shared column set
    assert [r["kind"] for r in rows].count("label") == 3
    overall = {r["name"]: r for r in rows if r["kind"] == "overall"}
    assert overall["macro_f1"]["value"] == pytest.approx(rep.macro_f1)
    assert overall["macro_auroc"]["ci_low"] == pytest.approx(rep.ci["macro_auroc"][0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    assert buf.getvalue().count("\n") == len(rows) + 1


def test_weighted_auroc_matches_sklearn_sample_weight():
    rng = np.random.default_rng(5)
    n = 120
    y = rng.integers(0, 2, n).astype(bool)
    s = np.round(rng.random(n), 1)
    order = np.argsort(s, kind="stable")
    starts = np.concatenate(([0], np.flatnonzero(np.diff(s[order])) + 1))
    w = resample_weights(rng, 4, np.arange(n), n)
    got = weighted_auroc_sorted(w[:, order], y[order], starts)
    for b in range(4):
        assert got[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), **TOL)


def test_patient_resampling_keeps_patients_together():
    rng = np.random.default_rng(0)
    inverse = np.repeat(np.arange(10), 3)  # 10 patients, 3 images each
    w = resample_weights(rng, 50, inverse, 10)
    assert w.shape == (50, 30)
    per_patient = w.reshape(50, 10, 3)
    assert np.all(per_patient == per_patient[:, :, :1])
    assert np.all(per_patient[:, :, 0].sum(axis=1) == 10)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y, s, rng = _data(11, n=600, n_labels=4, decimals=2)
    t = np.full(4, 0.5)
    groups = rng.integers(0, 150, y.shape[0])
    a = evaluate(y, s, t, _names(4), bootstrap=300, seed=3, groups=groups)
    b = evaluate(y, s, t, _names(4), bootstrap=300, seed=3, groups=groups)
    c = evaluate(y, s, t, _names(4), bootstrap=300, seed=4)
    assert a.ci == b.ci and a.ci != c.ci
    for key in ("macro_auroc", "macro_f1", "micro_f1"):
        lo, hi = a.ci[key]
        assert lo < getattr(a, key) < hi
        assert hi - lo < 0.2
    assert any("patients" in n for n in a.notes)
    narrow = evaluate(y, s, t, _names(4), bootstrap=300, seed=3, groups=groups, confidence=0.5)
    assert narrow.ci["macro_auroc"][1] - narrow.ci["macro_auroc"][0] < (
        a.ci["macro_auroc"][1] - a.ci["macro_auroc"][0]
    )


def test_bootstrap_with_masks_and_rare_label():
    y, s, rng = _data(12, n=300, n_labels=3)
    y[:, 2] = 0
    y[:3, 2] = 1  # so rare that some resamples lack positives
    mask = rng.random(y.shape) > 0.2
    mask[:3, 2] = True
    rep = evaluate(y, s, np.full(3, 0.5), _names(3), mask=mask, bootstrap=200)
    lo, hi = rep.ci["macro_auroc"]
    assert 0.0 <= lo <= hi <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores=np.zeros((5, 3))), "matching"),
        (dict(thresholds=np.zeros(3)), "thresholds"),
        (dict(label_names=["a"]), "label names"),
        (dict(mask=np.ones((4, 3), bool)), "Mask"),
        (dict(y_true=np.full((4, 2), 2.0)), "0 or 1"),
        (dict(groups=np.arange(3), bootstrap=5), "patient ids"),
        (dict(confidence=1.5), "Confidence"),
        (dict(bootstrap=-1), "Bootstrap"),
    ],
)
def test_bad_inputs_raise_mavl_error(kwargs, match):
    args = dict(
        y_true=np.zeros((4, 2)), scores=np.zeros((4, 2)), thresholds=np.full(2, 0.5),
        label_names=["a", "b"],
    )
    args.update(kwargs)
    with pytest.raises(MavlError, match=match):
        evaluate(**args)


def test_report_plot_is_a_valid_png(tmp_path):
    from PIL import Image

    from mavl_cli.reports.plots import plot_report

    y, s, rng = _data(4, n=300, n_labels=5, decimals=2)
    y[:, 4] = 0  # one-class label is listed as n/a, not plotted
    mask = rng.random(y.shape) > 0.1
    out = plot_report(tmp_path / "sub" / "report.png", y, s, np.full(5, 0.4), _names(5), mask=mask)
    assert out == tmp_path / "sub" / "report.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.png"]  # no temp file left
