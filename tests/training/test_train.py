"""Training helpers: best-epoch selection, validation splits by patient, LRF early stopping."""

from __future__ import annotations

import numpy as np

from mavl_cli.datasets.join import Split
from mavl_cli.training.loop import BestEpoch, split_validation
from mavl_cli.training.train import LRFConfig, train_lrf


def test_best_epoch_prefers_auroc_then_lower_bce_and_stops_on_patience():
    t = BestEpoch(patience=2)
    assert t.update(1, {"bce": 0.5, "val_auroc": 0.70})
    assert not t.update(2, {"bce": 0.4, "val_auroc": 0.69})
    assert t.update(3, {"bce": 0.3, "val_auroc": 0.70})  # same AUROC, lower BCE
    assert not t.update(4, {"bce": 0.2, "val_auroc": float("nan")})  # undefined ranks below defined
    assert not t.stop()
    assert not t.update(5, {"bce": 0.1, "val_auroc": 0.60})
    assert t.stop() and t.epoch == 3
    no_val = BestEpoch()
    no_val.update(1, {"bce": 0.5})
    no_val.update(2, {"bce": 0.6})
    assert no_val.epoch == 1 and not no_val.stop()


def test_validation_split_keeps_patients_whole():
    groups = [f"p{i // 3}" for i in range(60)]
    tr, va = split_validation(60, 0.2, seed=0, groups=groups)
    assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va})
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(60))


def test_lrf_learns_a_separable_signal_and_stops_early():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 32)).astype(np.float32)
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0)], 1).astype(np.float32)
    m = np.ones_like(y, bool)
    res = train_lrf(Split(x[:150], y[:150], m[:150]), Split(x[150:], y[150:], m[150:]),
                    LRFConfig(rank=8, keep=2, epochs=60, patience=5, batch_size=32, lr=1e-2))
    assert res.val_auroc > 0.9
    assert res.epochs_run <= 60 and res.best_epoch <= res.epochs_run
    assert set(res.state) == {"norm.weight", "norm.bias", "proj.weight", "classifier.weight", "classifier.bias"}
