"""`evaluate --by`: subgroup figures equal scikit-learn on each subgroup's rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.metrics import prepare
from mavl_cli.evaluation.subgroups import MISSING, analyse, bin_values, parse_by


def test_parse_and_bin():
    assert parse_by("sex").edges is None
    spec = parse_by("age:0,40,60,80")
    assert spec.column == "age" and spec.edges == [0, 40, 60, 80]
    assert bin_values(["12", 40, "59.5", "80", "-1", None, ""], spec.edges, "age") == [
        "[0, 40)", "[40, 60)", "[40, 60)", ">=80", "<0", MISSING, MISSING]
    for bad in ("age:40,20", "age:1", "age:a,b", ":1,2", ""):
        with pytest.raises(MavlError):
            parse_by(bad)
    with pytest.raises(MavlError, match="not a number"):
        bin_values(["old"], [0, 1], "age")


def test_subgroup_figures_match_sklearn():
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random((n, 3)) < [0.3, 0.1, 0.02]).astype(float)
    s = np.round(rng.random((n, 3)) * 0.7 + 0.3 * y, 2)
    mask = rng.random((n, 3)) > 0.1
    sex = rng.choice(["F", "M"], n).astype(object)
    sex[:7] = None
    groups = [str(g) for g in rng.integers(0, 200, n)]
    t = np.array([0.4, 0.5, 0.6])
    yp, sp, m, _ = prepare(y, s, mask)
    rep = analyse(parse_by("sex"), list(sex), "test", yp, sp, m, t, ["a", "b", "c"], groups, bootstrap=200, seed=0)
    assert [g["group"] for g in rep["groups"]] == ["F", "M", MISSING]
    for g in rep["groups"]:
        rows = np.array([v is None for v in sex]) if g["group"] == MISSING else np.array([v == g["group"] for v in sex])
        assert g["images"] == rows.sum()
        assert g["patients"] == len({groups[i] for i in np.flatnonzero(rows)})
        for j, lab in enumerate(g["labels"]):
            r = rows & mask[:, j]
            assert lab["n"] == r.sum() and lab["positives"] == y[r, j].sum()
            assert lab["f1"] == pytest.approx(f1_score(y[r, j], s[r, j] >= t[j], zero_division=0))
            if 0 < y[r, j].sum() < r.sum():
                assert lab["auroc"] == pytest.approx(roc_auc_score(y[r, j], s[r, j]))
                lo, hi = lab["auroc_ci"]
                assert lo <= lab["auroc"] <= hi
            else:
                assert lab["auroc"] is None
    for j, gap in enumerate(rep["gaps"]):
        vals = [g["labels"][j]["auroc"] for g in rep["groups"] if g["group"] != MISSING and g["labels"][j]["auroc"] is not None]
        if len(vals) >= 2:
            assert gap["auroc_gap"] == pytest.approx(max(vals) - min(vals))


def test_evaluate_by_cli_with_metadata(chain, cli, tmp_path):
    import pandas as pd

    from mavl_cli.io.mavlfile import read_file

    d, ph = chain["dir"], chain["phantoms"]
    test = ph.splits["test"]
    ids = read_file(d / "test.st").ids()
    meta = tmp_path / "meta.csv"
    rng = np.random.default_rng(1)
    pd.DataFrame({"path": ids, "age": rng.integers(20, 90, len(ids)), "sex": rng.choice(["F", "M"], len(ids))}).to_csv(meta, index=False)
    r = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {test} --metadata {meta} --by sex --by 'age:0,40,60' "
            "--bootstrap 50 --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    cols = doc["subgroups"]["columns"]
    assert [c["column"] for c in cols] == ["sex", "age"]
    assert sum(g["images"] for g in cols[0]["groups"]) == len(ids)
    assert {g["group"] for g in cols[1]["groups"]} <= {"[0, 40)", "[40, 60)", ">=60"}
    r = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {test} --metadata {meta} --by sex")
    assert r.exit_code == 0, r.stderr
    assert "Subgroups by sex" in r.stdout and "largest AUROC gap" in r.stdout
    r = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {test} --by nosuch")
    assert r.exit_code == 2 and "no such column" in r.stderr
