"""Time ``mavl_cli.evaluation.metrics.evaluate`` against the equivalent scikit-learn loop.

Run: ``python benchmarks/evaluate_speed.py [--images 200000] [--labels 14]``.
Both sides compute the same numbers (per-label precision/recall/F1, AUROC,
AP; macro/micro/weighted F1, Hamming loss, subset accuracy) and the script
checks they agree before printing the timings.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def sklearn_equivalent(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        hamming_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    pred = (s >= t).astype(int)
    p, r, f, _ = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    auroc = [roc_auc_score(y[:, j], s[:, j]) for j in range(y.shape[1])]
    ap = [average_precision_score(y[:, j], s[:, j]) for j in range(y.shape[1])]
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "auroc": np.array(auroc),
        "auprc": np.array(ap),
        "macro_f1": f1_score(y, pred, average="macro", zero_division=0),
        "micro_f1": f1_score(y, pred, average="micro", zero_division=0),
        "weighted_f1": f1_score(y, pred, average="weighted", zero_division=0),
        "hamming_loss": hamming_loss(y, pred),
        "exact_match": accuracy_score(y, pred),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from mavl_cli.evaluation.metrics import evaluate

    rng = np.random.default_rng(args.seed)
    n, n_labels = args.images, args.labels
    prevalence = rng.uniform(0.002, 0.2, n_labels)  # NIH-like: rare to common findings
    y = (rng.random((n, n_labels)) < prevalence).astype(np.float64)
    logits = rng.normal(size=(n, n_labels)) + 1.5 * y - 2.0
    s = np.round(1.0 / (1.0 + np.exp(-logits)), 4)  # rounded like saved CSVs: many ties
    t = np.full(n_labels, 0.3)
    names = [f"label_{j}" for j in range(n_labels)]

    evaluate(y[:1000], s[:1000], t, names)  # warm-up (imports, allocator)
    start = time.perf_counter()
    report = evaluate(y, s, t, names)
    ours = time.perf_counter() - start

    start = time.perf_counter()
    ref = sklearn_equivalent(y, s, t)
    theirs = time.perf_counter() - start

    worst = 0.0
    for key in ("precision", "recall", "f1", "auroc", "auprc"):
        got = np.array([getattr(m, key) for m in report.labels])
        worst = max(worst, float(np.max(np.abs(got - ref[key]))))
    for key in ("macro_f1", "micro_f1", "weighted_f1", "hamming_loss", "exact_match"):
        worst = max(worst, abs(getattr(report, key) - ref[key]))

    print(f"data: {n:,} images x {n_labels} labels")
    print(f"mavl evaluate (no bootstrap): {ours:.3f} s")
    print(f"scikit-learn loop:            {theirs:.3f} s")
    print(f"speed-up: {theirs / ours:.1f}x")
    print(f"max |difference| to scikit-learn: {worst:.2e}")


if __name__ == "__main__":
    main()
