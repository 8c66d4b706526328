"""Calibration figures against scikit-learn and a direct computation; `mavl calibrate` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation import calibration as C
from mavl_cli.evaluation.metrics import prepare
from mavl_cli.io.mavlfile import read_file


def _data(seed: int, n: int = 800, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    z = rng.normal(size=n) * 1.7 + 2.2 * y - 1.5
    p = 1 / (1 + np.exp(-z * 1.8))  # over-confident on purpose
    if decimals is not None:
        p = np.round(p, decimals)
    return y, p


def _direct_ece(y, p, n_bins=15):
    """Bin by hand: bin k holds (k/n, (k+1)/n], bin 0 also 0."""
    total, worst = 0.0, 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        inside = [(yi, pi) for yi, pi in zip(y, p) if (lo < pi <= hi) or (k == 0 and pi == 0.0)]
        if not inside:
            continue
        gap = abs(np.mean([a for a, _ in inside]) - np.mean([b for _, b in inside]))
        total += len(inside) * gap
        worst = max(worst, gap)
    return total / len(y), worst


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 2), (2, 1)])
def test_ece_mce_brier_match_sklearn_and_a_direct_count(seed, decimals):
    y, p = _data(seed, decimals=decimals)
    p[:3] = [0.0, 1.0, 1 / 15]  # edge values land where sklearn puts them
    r = C.reliability(y, p)
    true, pred = calibration_curve(y, p, n_bins=15, strategy="uniform")
    full = r.counts > 0
    np.testing.assert_allclose(r.frac_pos[full], true, rtol=1e-12)
    np.testing.assert_allclose(r.mean_pred[full], pred, rtol=1e-12)
    ece, mce = _direct_ece(y, p)
    assert r.ece == pytest.approx(ece, rel=1e-12)
    assert r.mce == pytest.approx(mce, rel=1e-12)
    rep = C.calibration_report(y[:, None].astype(np.int8), p[:, None], np.ones((y.size, 1), bool), ["a"])
    assert rep["labels"][0]["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    assert rep["macro_ece"] == pytest.approx(ece, rel=1e-12)


def test_calibration_report_leaves_masked_entries_out():
    y, p = _data(3)
    y2 = np.stack([y, y[::-1]], 1)
    s2 = np.stack([p, p[::-1]], 1)
    mask = np.random.default_rng(0).random(y2.shape) > 0.3
    yp, sp, m, _ = prepare(y2, s2, mask)
    rep = C.calibration_report(yp, sp, m, ["a", "b"])
    for j in range(2):
        ece, mce = _direct_ece(y2[mask[:, j], j], s2[mask[:, j], j])
        assert rep["labels"][j]["ece"] == pytest.approx(ece)
        assert rep["labels"][j]["brier"] == pytest.approx(brier_score_loss(y2[mask[:, j], j], s2[mask[:, j], j]))
    assert rep["macro_ece"] == pytest.approx(np.mean([d["ece"] for d in rep["labels"]]))


def test_platt_equals_unregularised_logistic_regression():
    y, p = _data(4)
    z = C.logit(p)
    a, b = C.fit_logistic_1d(z, y)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    assert a == pytest.approx(lr.coef_[0, 0], rel=1e-6)
    assert b == pytest.approx(lr.intercept_[0], rel=1e-6, abs=1e-8)


def test_temperature_minimises_the_log_loss():
    y, p = _data(5)
    a, _ = C.fit_logistic_1d(C.logit(p), y, slope_only=True)
    assert 0 < a < 1  # the data are over-confident, so T = 1/a > 1
    best = log_loss(y, C.sigmoid(a * C.logit(p)))
    for f in (0.98, 1.02):
        assert log_loss(y, C.sigmoid(a * f * C.logit(p))) > best
    # the derivative of the log loss in a is zero at the optimum
    z = C.logit(p)
    assert abs(np.sum((C.sigmoid(a * z) - y) * z)) < 1e-6 * len(y)


@pytest.mark.parametrize("decimals", [None, 2])
def test_isotonic_equals_sklearn(decimals):
    y, p = _data(6, decimals=decimals)
    x, v = C.fit_isotonic(p, y)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    probe = np.concatenate([p, np.linspace(-0.1, 1.1, 301)])
    np.testing.assert_allclose(np.interp(probe, x, v), iso.predict(probe), atol=1e-12)


def test_fit_apply_round_trip_through_tensors_and_improves_ece():
    ys, ps = zip(*(_data(s) for s in (8, 9, 10)))
    y = np.stack(ys, 1).astype(np.int8)
    p = np.stack(ps, 1)
    y[:, 2] = 0  # one class only: left alone with a note
    m = np.ones(y.shape, bool)
    for method in C.METHODS:
        cal = C.fit(y, p, m, method, ["a", "b", "c"])
        assert any("c: no positives" in n for n in cal.notes)
        back = C.Calibration.from_file(cal.to_tensors(), {"calibration": {"method": method}})
        q = back.apply(p.astype(np.float32))
        np.testing.assert_allclose(q, cal.apply(p), atol=1e-5)
        np.testing.assert_allclose(q[:, 2], p[:, 2], atol=1e-6)
        before = C.calibration_report(y, p, m, list("abc"))
        after = C.calibration_report(y, q.astype(np.float64), m, list("abc"))
        for j in range(2):
            assert after["labels"][j]["ece"] < before["labels"][j]["ece"]


def test_prior_shift_is_bayes_rule_on_the_odds():
    p = np.array([[0.2, 0.5], [0.9, 0.01]])
    src, tgt = np.array([0.3, 0.1]), np.array([0.1, 0.4])
    cal = C.Calibration.identity(2)
    cal.shift = C.prior_shift(src, tgt)
    got = cal.apply(p)
    odds = p / (1 - p) * (tgt / (1 - tgt)) / (src / (1 - src))
    np.testing.assert_allclose(got, odds / (1 + odds), rtol=1e-9)


def test_parse_prevalence_errors():
    assert C.parse_prevalence("a=0.1, b=0.5", ["a", "b"]) == {"a": 0.1, "b": 0.5}
    for bad, msg in (("a", "LABEL=VALUE"), ("z=0.1", "not one of"), ("a=x", "not a number"), ("a=1", "strictly")):
        with pytest.raises(MavlError, match=msg):
            C.parse_prevalence(bad, ["a", "b"])


def test_calibrate_cli_then_evaluate_and_tune(chain, cli, tmp_path):
    from mavl_cli.models.modelfile import load_model

    d, ph = chain["dir"], chain["phantoms"]
    val, test = ph.splits["val"], ph.splits["test"]
    out = tmp_path / "cal.st"
    r = cli(f"calibrate {d/'tuned.st'} {d/'val.st'} --labels {val} --method platt -o {out}")
    assert r.exit_code == 0, r.stderr
    assert "ECE before" in r.stdout
    f = read_file(out, expect="model")
    assert f.meta["calibration"]["method"] == "platt"
    assert f.meta["calibration"]["fitted_on"]["images"] == len(read_file(d / "val.st").ids())
    model, raw = load_model(out), load_model(d / "tuned.st")
    x = raw.to_fusion_input(read_file(d / "test.st"))
    import torch

    p_raw, p_cal = raw.score(x), model.score(x)
    with torch.no_grad():  # the raw logits themselves: logit(float32 probability) is ill-conditioned near 0 and 1
        z = raw.head(calibrated=False)(torch.from_numpy(np.ascontiguousarray(x))).double().numpy()
    cal = model.calibration
    np.testing.assert_allclose(p_cal, C.sigmoid(cal.a * z + cal.b), atol=1e-5)
    # temperature is strictly increasing: tuned thresholds move through the same map, decisions stay
    temp = tmp_path / "temp.st"
    assert cli(f"calibrate {d/'tuned.st'} {d/'val.st'} --labels {val} -o {temp}").exit_code == 0
    tm = load_model(temp)
    assert tm.meta["threshold"]["method"] == "sweep" and tm.meta["threshold"]["mapped_through_calibration"]
    assert np.all(tm.calibration.a > 0)
    p_t = tm.score(x)
    near = np.abs(p_t - tm.thresholds) < 1e-5  # float32 rounding at the boundary
    assert np.array_equal((p_raw >= raw.thresholds)[~near], (p_t >= tm.thresholds)[~near])
    # evaluate reports calibration of the calibrated scores, and alarms on the fitting data
    r = cli(f"evaluate {out} {d/'test.st'} --labels {test} --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["calibration"]["calibrated_with"] == "platt" and doc["calibration"]["bins"] == 15
    r = cli(f"evaluate {out} {d/'val.st'} --labels {val}")
    assert "calibration was fitted on this very data" in r.stderr
    # tune-threshold after calibrate keeps the calibration and tunes on calibrated scores
    r = cli(f"tune-threshold {out} {d/'val.st'} --labels {val} --method per-label -o {tmp_path/'cal_tuned.st'}")
    assert r.exit_code == 0, r.stderr
    t = read_file(tmp_path / "cal_tuned.st")
    assert t.meta["calibration"]["method"] == "platt" and "calibration.a" in t.tensors


def test_calibrate_prevalence_and_errors(chain, cli, tmp_path):
    from mavl_cli.models.modelfile import load_model
    from mavl_cli.synthetic.phantoms import FINDINGS

    d, ph = chain["dir"], chain["phantoms"]
    val = ph.splits["val"]
    lab = FINDINGS[0]
    iso = tmp_path / "iso.st"
    r = cli(f"calibrate {d/'tuned.st'} {d/'val.st'} --labels {val} --method isotonic -o {iso}")
    assert r.exit_code == 0, r.stderr
    assert "thresholds reset to 0.5" in r.stderr + r.stdout
    assert read_file(iso).meta["threshold"]["method"] == "default"
    # prior shift on top of the stored calibration, with the validation prevalence as source
    shifted = tmp_path / "shift.st"
    r = cli(f"calibrate {iso} --prevalence '{lab}=0.05' -o {shifted}")
    assert r.exit_code == 0, r.stderr
    meta = read_file(shifted).meta["calibration"]
    src = meta["prevalence_shift"][lab]["source"]
    assert meta["method"] == "isotonic" and 0 < src < 1
    x = load_model(iso).to_fusion_input(read_file(d / "test.st"))
    a, b = load_model(iso).score(x), load_model(shifted).score(x)
    a0 = np.clip(a[:, 0].astype(np.float64), 1e-7, 1 - 1e-7)
    odds = a0 / (1 - a0) * (0.05 / 0.95) / (src / (1 - src))
    np.testing.assert_allclose(b[:, 0], odds / (1 + odds), atol=1e-5)
    np.testing.assert_allclose(b[:, 1:], a[:, 1:], atol=1e-6)
    # no source prevalence known: a clear error, nothing written
    r = cli(f"calibrate {d/'tuned.st'} --prevalence '{lab}=0.05' -o {tmp_path/'x.st'}")
    assert r.exit_code == 2 and "source-prevalence" in r.stderr and not (tmp_path / "x.st").exists()
    r = cli(f"calibrate {d/'tuned.st'} --prevalence '{lab}=0.05' --source-prevalence '{lab}=0.2' -o {tmp_path/'y.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"calibrate {d/'tuned.st'} {d/'val.st'} --labels {val} --method bogus -o {tmp_path/'z.st'}")
    assert r.exit_code == 2 and "unknown --method" in r.stderr
    r = cli(f"calibrate {d/'tuned.st'} -o {tmp_path/'z.st'}")
    assert r.exit_code == 2 and "needs validation data" in r.stderr


def test_torch_calibrated_head_equals_numpy_map():
    import torch

    from mavl_cli.models.calibrated import CalibratedHead

    ys, ps = zip(*(_data(s, decimals=3) for s in (11, 12)))
    y = np.stack(ys, 1).astype(np.int8)
    p = np.clip(np.stack(ps, 1), 1e-4, 1 - 1e-4)
    m = np.ones(y.shape, bool)
    z = torch.from_numpy(C.logit(p).astype(np.float32))
    extra = torch.randn(len(p), 1)  # a label added from text: passes through
    for method in C.METHODS:
        cal = C.fit(y, p, m, method, ["a", "b"])
        cal.shift = np.array([0.3, -0.2])
        head = CalibratedHead(torch.nn.Identity(), cal)
        out = torch.sigmoid(head(torch.cat([z, extra], 1))).numpy()
        np.testing.assert_allclose(out[:, :2], cal.apply(torch.sigmoid(z).numpy()), atol=1e-5)  # float32 vs float64
        np.testing.assert_allclose(out[:, 2], torch.sigmoid(extra[:, 0]).numpy(), atol=1e-7)


def test_s3_platt_never_reverses_the_order_of_scores():
    """Scores anti-correlated with the labels on validation: the fitted Platt slope is negative, which would turn
    the ranking upside down (AUROC 1 - AUROC). The label is left uncalibrated, with a note."""
    from sklearn.metrics import roc_auc_score

    y, p = _data(5)
    p_bad = 1.0 - p  # anti-correlated
    ys, ps = np.stack([y, y], 1), np.stack([p, p_bad], 1)
    m = np.ones_like(ys, dtype=bool)
    assert C.fit_logistic_1d(C.logit(p_bad), y)[0] < 0  # what unregularised Platt fits
    cal = C.fit(ys, ps, m, "platt", ["good", "bad"])
    q = cal.apply(ps)
    assert cal.a[0] > 0 and (cal.a[1], cal.b[1]) == (1.0, 0.0)
    assert cal.invertible
    for j in range(2):
        assert roc_auc_score(ys[:, j], q[:, j]) == pytest.approx(roc_auc_score(ys[:, j], ps[:, j]))
    np.testing.assert_allclose(q[:, 1], ps[:, 1], rtol=1e-6, atol=1e-7)  # identity (up to the clip at 1e-7)
    assert any("bad" in n and "never reverse" in n for n in cal.notes), cal.notes
