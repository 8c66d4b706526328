"""The sparse bootstrap engine equals scikit-learn's weighted AUROC on every resample."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mavl_cli.evaluation.bootstrap import AurocEngine, Resampler, per_unit, units_of
from mavl_cli.evaluation.metrics import prepare, resample_weights


@pytest.mark.parametrize("decimals, grouped", [(1, True), (3, False), (None, True)])
def test_engine_matches_sklearn_sample_weight(decimals, grouped):
    rng = np.random.default_rng(1)
    n, L = 400, 4
    y = (rng.random((n, L)) < [0.05, 0.2, 0.5, 0.01]).astype(float)
    s = rng.random((n, L)) + 0.3 * y
    if decimals is not None:
        s = np.round(s, decimals)
    mask = rng.random((n, L)) > 0.15
    groups = rng.integers(0, 120, n) if grouped else None
    yp, sp, m, _ = prepare(y, s, mask)
    inverse, n_units = units_of(n, groups)
    engine = AurocEngine(yp, sp, m, inverse, n_units)
    counts = np.concatenate(list(Resampler(n_units, seed=4).chunks(30, chunk=7)))
    got = engine.auroc(counts)
    w_img = counts[:, inverse]
    # the draws are those of metrics.resample_weights for the same seed
    np.testing.assert_array_equal(w_img, resample_weights(np.random.default_rng(4), 30, inverse, n_units))
    for b in range(30):
        for j in range(L):
            rows = m[:, j] & (w_img[b] > 0)
            yy = y[rows, j]
            if yy.min() == yy.max():
                assert np.isnan(got[b, j])
            else:
                assert got[b, j] == pytest.approx(roc_auc_score(yy, s[rows, j], sample_weight=w_img[b, rows]), abs=1e-12)
    ones = engine.auroc(np.ones((1, n_units), np.float32))[0]
    for j in range(L):
        assert ones[j] == pytest.approx(roc_auc_score(y[m[:, j], j], s[m[:, j], j]), abs=1e-12)


def test_per_unit_sums():
    inv = np.array([0, 2, 2, 1, 0])
    v = np.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(per_unit(inv, 3, v), [[8, 10], [6, 7], [6, 8]])
