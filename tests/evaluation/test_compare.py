"""`mavl compare`: DeLong against a direct O(n^2) computation, paired bootstrap, scores CSVs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from mavl_cli.evaluation.compare import (
    Side,
    compare,
    delong_macro,
    delong_paired,
    midranks,
    structural_components,
)


def _psi(x, y):
    return (x > y) + 0.5 * (x == y)


def _direct_components(pos, neg):
    k = _psi(pos[:, None], neg[None, :])
    return k.mean(axis=1), k.mean(axis=0)


def _direct_delong(y, a, b):
    """Textbook DeLong with explicit pairwise kernels."""
    y = y.astype(bool)
    m, n = y.sum(), (~y).sum()
    va10, va01 = _direct_components(a[y], a[~y])
    vb10, vb01 = _direct_components(b[y], b[~y])
    s10 = np.cov(np.stack([va10, vb10]))
    s01 = np.cov(np.stack([va01, vb01]))
    var = s10[0, 0] / m + s01[0, 0] / n + s10[1, 1] / m + s01[1, 1] / n - 2 * (s10[0, 1] / m + s01[0, 1] / n)
    z = (va10.mean() - vb10.mean()) / math.sqrt(var)
    return va10.mean(), vb10.mean(), math.erfc(abs(z) / math.sqrt(2))


def _pair(seed, n=300, decimals=2):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    a = np.round(rng.random(n) * 0.6 + 0.4 * y, decimals)
    b = np.round(0.7 * a + 0.3 * rng.random(n) + 0.05 * y, decimals)
    return y, a, b


def test_midranks():
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


@pytest.mark.parametrize("seed, decimals", [(0, 2), (1, 1), (2, 6)])
def test_delong_equals_direct_quadratic_computation(seed, decimals):
    y, a, b = _pair(seed, decimals=decimals)
    v10, v01 = structural_components(a[y == 1], a[y == 0])
    d10, d01 = _direct_components(a[y == 1], a[y == 0])
    np.testing.assert_allclose(v10, d10, atol=1e-12)
    np.testing.assert_allclose(v01, d01, atol=1e-12)
    got = delong_paired(y, a, b)
    auc_a, auc_b, p = _direct_delong(y, a, b)
    assert got["auroc_a"] == pytest.approx(roc_auc_score(y, a)) == pytest.approx(auc_a)
    assert got["auroc_b"] == pytest.approx(auc_b)
    assert got["p"] == pytest.approx(p, rel=1e-9)
    # one label: the macro test is DeLong's test
    mac = delong_macro(y[:, None], a[:, None], b[:, None], np.ones((y.size, 1), bool), [0])
    assert mac["p"] == pytest.approx(p, rel=1e-9)


def test_delong_macro_equals_direct_influence_sum():
    rng = np.random.default_rng(3)
    n, L = 250, 3
    y = (rng.random((n, L)) < [0.2, 0.4, 0.1]).astype(int)
    a = np.round(rng.random((n, L)) * 0.7 + 0.3 * y, 2)
    b = np.round(rng.random((n, L)) * 0.8 + 0.2 * y, 2)
    m = rng.random((n, L)) > 0.1
    psi = np.zeros(n)
    diffs = []
    for j in range(L):
        rows = np.flatnonzero(m[:, j])
        pos, neg = rows[y[rows, j] == 1], rows[y[rows, j] == 0]
        a10, a01 = _direct_components(a[pos, j], a[neg, j])
        b10, b01 = _direct_components(b[pos, j], b[neg, j])
        d10, d01 = a10 - b10, a01 - b01
        diffs.append(d10.mean())
        for idx, d, k in ((pos, d10, pos.size), (neg, d01, neg.size)):
            for i, v in zip(idx, d):
                psi[i] += math.sqrt(k / (k - 1)) * (v - d.mean()) / k / L
    z = np.mean(diffs) / math.sqrt(np.sum(psi**2))
    got = delong_macro(y, a.astype(float), b.astype(float), m, list(range(L)))
    assert got["diff"] == pytest.approx(np.mean(diffs))
    assert got["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)


def test_paired_compare_figures():
    rng = np.random.default_rng(4)
    n, L = 500, 2
    y = (rng.random((n, L)) < 0.3).astype(np.int8)
    a = np.round(rng.random((n, L)) * 0.6 + 0.4 * y, 2)
    b = np.round(rng.random((n, L)), 2)
    m = np.ones((n, L), bool)
    groups = [str(g) for g in rng.integers(0, 150, n)]
    t = np.array([0.5, 0.6])
    res = compare(y, m, Side("A", a, t), Side("B", b, t), ["x", "z"], groups, bootstrap=300, seed=0)
    for j, row in enumerate(res["labels"]):
        assert row["auroc_a"] == pytest.approx(roc_auc_score(y[:, j], a[:, j]))
        assert row["auroc_b"] == pytest.approx(roc_auc_score(y[:, j], b[:, j]))
        assert row["f1_a"] == pytest.approx(f1_score(y[:, j], a[:, j] >= t[j]))
        lo, hi = row["diff_ci"]
        assert lo <= row["diff"] <= hi and lo > 0  # A is clearly better than random B
        assert row["p"] < 1e-6
    mac = res["macro"]
    assert mac["diff"] == pytest.approx(np.mean([r["diff"] for r in res["labels"]]))
    assert mac["diff_ci"][0] <= mac["diff"] <= mac["diff_ci"][1]
    same = compare(y, m, Side("A", a, t), Side("A2", a.copy(), t), ["x", "z"], groups, bootstrap=50)
    assert same["macro"]["diff"] == 0 and same["macro"]["p"] == 1.0 and same["macro"]["diff_ci"] == [0.0, 0.0]


def test_compare_cli_scores_files_and_csv(chain, cli, tmp_path):
    import pandas as pd

    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.modelfile import load_model

    d, ph = chain["dir"], chain["phantoms"]
    test = ph.splits["test"]
    emb = read_file(d / "test.st")
    r = cli(f"compare {d/'tuned.st'} {d/'model.st'} --embeddings {d/'test.st'} --labels {test} --bootstrap 100 --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    model = load_model(d / "tuned.st")
    s = model.score(model.to_fusion_input(emb))
    # the same scores as a CSV from "another tool": identical figures
    csv = tmp_path / "other.csv"
    pd.DataFrame({"path": emb.ids(), **{n: s[:, j] for j, n in enumerate(model.labels)}}).to_csv(csv, index=False)
    r2 = cli(f"compare {csv} {d/'model.st'} --embeddings {d/'test.st'} --labels {test} --bootstrap 100 --json")
    assert r2.exit_code == 0, r2.stderr
    doc2 = json.loads(r2.stdout)
    for x, z in zip(doc["labels"], doc2["labels"]):
        assert x["auroc_a"] == pytest.approx(z["auroc_a"], abs=1e-6) or x["auroc_a"] is None
    r3 = cli(f"compare {d/'tuned.st'} {d/'model.st'} --embeddings {d/'test.st'} --labels {test} --bootstrap 50")
    assert r3.exit_code == 0 and "DeLong" in r3.stdout
    # evaluate --scores takes the CSV too, with the same AUROC as the model itself
    r4 = cli(f"evaluate --scores {csv} --labels {test} --json")
    assert r4.exit_code == 0, r4.stderr
    r5 = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {test} --json")
    for x, z in zip(json.loads(r4.stdout)["labels"], json.loads(r5.stdout)["labels"]):
        assert (x["auroc"] is None and z["auroc"] is None) or x["auroc"] == pytest.approx(z["auroc"], abs=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,a\nx.png,1.5\n")
    r6 = cli(f"evaluate --scores {bad} --labels {test}")
    assert r6.exit_code == 2 and "probabilities" in r6.stderr


def test_scores_fifo_is_refused_not_sniffed(tmp_path):
    """`--scores` naming a FIFO: the CSV sniffer must not open it (that blocks without a writer)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fifo, labels = tmp_path / "scores.fifo", tmp_path / "labels.csv"
    os.mkfifo(fifo)
    labels.write_text("path,Edema\na.png,1\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "MAVL_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "mavl_cli", "evaluate", "--scores", str(fifo), "--labels", str(labels)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "not a regular file" in out.stderr and str(fifo) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
