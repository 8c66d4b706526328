"""The one training skeleton: validation choice, rank/keep bounds and the epoch loop's keep/stop rules."""

from __future__ import annotations

import numpy as np
import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.training.loop import check_rank_keep, choose_validation, fit


def _epochs(bces, aucs=None):
    it = iter(bces)
    av = iter(aucs or [])
    state = {"epoch": 0}

    def run_epoch(epoch):
        state["epoch"] = epoch
        return {"bce": next(it)}

    return run_epoch, (lambda: next(av)) if aucs else None, (lambda: state["epoch"])


def test_fit_keeps_the_best_validation_epoch_and_stops_on_patience():
    run, val, snap = _epochs([0.9, 0.8, 0.7, 0.6, 0.5], [0.6, 0.8, 0.7, 0.75, 0.9])
    res = fit(5, run, snap, val, patience=2)
    assert res.best_epoch == 2 and res.best_state == 2 and res.epochs_run == 4 and res.val_auroc == 0.8


def test_fit_without_validation_keeps_the_lowest_bce_or_the_last_epoch():
    run, _, snap = _epochs([0.9, 0.5, 0.7])
    res = fit(3, run, snap)
    assert (res.best_epoch, res.best_state, res.epochs_run) == (2, 2, 3) and np.isnan(res.val_auroc)
    run, _, snap = _epochs([0.9, 0.5, 0.7])
    res = fit(3, run, snap, without_val="last")
    assert (res.best_epoch, res.best_state) == (3, 3)


def test_one_validation_rule_and_one_rank_check():
    given = choose_validation(10, "val.st", 0.3, 0)
    assert given.val is None and given.description == "val.st" and list(given.train) == list(range(10))
    held = choose_validation(10, None, 0.3, 0, groups=[f"p{i // 2}" for i in range(10)])
    assert "by patient" in held.description and len(held.val) + len(held.train) == 10
    patients = {i // 2 for i in held.val}
    assert not patients & {i // 2 for i in held.train}
    assert choose_validation(10, None, 0.0, 0).description == "none"
    check_rank_keep(8, 8, 8)
    for rank, keep in ((0, 0), (9, 2), (4, 5), (4, -1)):
        with pytest.raises(MavlError):
            check_rank_keep(rank, keep, 8, "x.st")
