"""Time `evaluate` with calibration and patient-bootstrap CIs, and `compare`, at 200,000 x 14.

Run: ``python benchmarks/evaluate_calibration.py [--images 200000] [--labels 14] [--bootstrap 1000]``.

Synthetic NIH-like data: prevalences 0.2 %-20 %, about 3.3 images per patient,
scores rounded to 4 decimals (many ties, as in saved CSVs). Prints:

1. ``metrics.evaluate`` with ``--bootstrap`` patient resamples plus the
   calibration report (ECE, MCE, Brier per label) - what `mavl evaluate
   --bootstrap 1000` computes;
2. ``compare.compare`` of two correlated score sets: DeLong per label and
   macro, paired patient bootstrap of AUROC and F1 differences - what `mavl
   compare` computes;
3. the scikit-learn equivalents that exist (``calibration_curve`` +
   ``brier_score_loss`` per label) and a check that they give the same ECE
   and Brier;
4. for reference, the bootstrap loop mavl used before (one weighted rank pass
   per resample and label), timed on a few resamples and scaled to the same
   count.

Threads are limited to 2 (the target machine) unless OMP_NUM_THREADS is set.
Each line gives wall-clock seconds and the process's CPU seconds: on a shared,
overloaded machine the wall clock measures the queue, the CPU time the work
(with 2 threads, an idle 2-core machine needs between CPU/2 and CPU seconds).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np  # noqa: E402


def make_data(n: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.002, 0.2, n_labels)
    y = (rng.random((n, n_labels)) < prevalence).astype(np.float64)
    base = rng.normal(size=(n, n_labels))
    a = np.round(1 / (1 + np.exp(-(1.3 * (base + 1.5 * y) - 2.0))), 4)
    b = np.round(1 / (1 + np.exp(-(1.3 * (0.8 * base + 0.6 * rng.normal(size=(n, n_labels)) + 1.3 * y) - 2.0))), 4)
    groups = np.sort(rng.integers(0, max(1, int(n / 3.3)), n))
    return y, a, b, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-draws", type=int, default=10, help="resamples to time the previous bootstrap loop on")
    args = parser.parse_args()

    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    from mavl_cli.evaluation.calibration import calibration_report
    from mavl_cli.evaluation.compare import Side, compare
    from mavl_cli.evaluation.metrics import (
        evaluate,
        prepare,
        resample_weights,
        weighted_auroc_sorted,
    )

    n, L, B = args.images, args.labels, args.bootstrap
    y, a, b, groups = make_data(n, L, args.seed)
    names = [f"label{j}" for j in range(L)]
    t = np.full(L, 0.3)
    print(f"{n} images x {L} labels, {len(np.unique(groups))} patients, {B} patient-bootstrap resamples, "
          f"threads {os.environ['OMP_NUM_THREADS']}")

    t0, c0 = time.perf_counter(), time.process_time()
    rep = evaluate(y, a, t, names, bootstrap=B, seed=0, groups=groups)
    yp, sp, m, _ = prepare(y, a)
    cal = calibration_report(yp, sp, m, names)
    t_eval, c_eval = time.perf_counter() - t0, time.process_time() - c0
    print(f"evaluate + calibration + {B} bootstraps: {t_eval:6.1f} s wall, {c_eval:6.1f} s CPU  (macro AUROC {rep.macro_auroc:.4f} "
          f"{rep.ci['macro_auroc'][0]:.4f}-{rep.ci['macro_auroc'][1]:.4f}, macro ECE {cal['macro_ece']:.4f})")

    t0, c0 = time.perf_counter(), time.process_time()
    res = compare(yp, m, Side("A", a, t), Side("B", b, t), names, list(groups), bootstrap=B, seed=0)
    t_cmp, c_cmp = time.perf_counter() - t0, time.process_time() - c0
    mac = res["macro"]
    print(f"compare (DeLong + {B} paired bootstraps):  {t_cmp:6.1f} s wall, {c_cmp:6.1f} s CPU  (macro AUROC diff {mac['diff']:+.4f} "
          f"[{mac['diff_ci'][0]:+.4f}, {mac['diff_ci'][1]:+.4f}], DeLong p {mac['p']:.2g})")

    t0, c0 = time.perf_counter(), time.process_time()
    sk_ece, sk_brier = [], []
    for j in range(L):
        true, pred = calibration_curve(y[:, j], a[:, j], n_bins=15, strategy="uniform")
        counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], a[:, j]), minlength=15)
        counts = counts[counts > 0]
        sk_ece.append(np.sum(counts * np.abs(true - pred)) / n)
        sk_brier.append(brier_score_loss(y[:, j], a[:, j]))
    t_sk, c_sk = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    calibration_report(yp, sp, m, names)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    ok = np.allclose(sk_ece, [d["ece"] for d in cal["labels"]]) and np.allclose(sk_brier, [d["brier"] for d in cal["labels"]])
    print(f"calibration only: mavl {t_ours:.2f} s wall / {c_ours:.2f} s CPU, scikit-learn calibration_curve + "
          f"brier_score_loss {t_sk:.2f} s wall / {c_sk:.2f} s CPU "
          f"(same ECE and Brier: {ok})")

    # the previous bootstrap: one weighted rank pass over all images per resample and label
    _, inverse = np.unique(groups, return_inverse=True)
    k = args.old_draws
    t0, c0 = time.perf_counter(), time.process_time()
    w = resample_weights(np.random.default_rng(0), k, inverse, int(inverse.max()) + 1)
    for j in range(L):
        order = np.argsort(a[:, j], kind="stable")
        starts = np.concatenate(([0], np.flatnonzero(np.diff(a[order, j])) + 1))
        weighted_auroc_sorted(w[:, order], y[order, j].astype(bool), starts)
    t_old, c_old = (time.perf_counter() - t0) / k * B, (time.process_time() - c0) / k * B
    print(f"previous bootstrap loop, AUROC only, scaled from {k} to {B} resamples: {t_old:6.1f} s wall, {c_old:6.1f} s CPU "
          f"(x{c_old / c_eval:.1f} the CPU of the whole evaluate above)")


if __name__ == "__main__":
    main()
