"""Calibration: how far predicted probabilities are from observed frequencies, and fixing it.

Measuring (``evaluate`` reports these per label and as macro means):

* **ECE**, expected calibration error: 15 equal-width bins on [0, 1]; bin 0 is
  ``[0, 1/15]``, bin k is ``(k/15, (k+1)/15]`` (scikit-learn's
  ``calibration_curve(strategy="uniform")`` binning). ECE is the mean over
  bins of ``|observed positive rate - mean predicted probability|`` weighted
  by the share of entries in the bin; empty bins weigh nothing.
* **MCE**, maximum calibration error: the largest of those gaps over non-empty bins.
* **Brier score**: mean squared difference between probability and 0/1 label.

Masked entries (e.g. CheXpert's uncertain labels under ``--uncertain
ignore``) are left out, as everywhere in mavl.

Fixing (``mavl calibrate``), per label, fitted on validation data only:

* ``temperature``: ``sigmoid(logit(p) / T)``, one T > 0 per label minimising
  the log loss (order and AUROC unchanged);
* ``platt``: ``sigmoid(a * logit(p) + b)``, unregularised logistic regression
  on the logit (what scikit-learn's ``LogisticRegression(penalty=None)`` fits);
* ``isotonic``: the non-decreasing step-linear map minimising squared error
  (pool-adjacent-violators, interpolated and clipped like scikit-learn's
  ``IsotonicRegression(out_of_bounds="clip")``).

A prior-shift correction (``--prevalence``) then adds, in logit space,
``logit(target prevalence) - logit(source prevalence)`` per label: Bayes'
rule for a new site whose disease prevalence differs but whose images look
alike given the disease, usable without any local labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.io.mavlfile import CALIBRATION_METHODS

N_BINS = 15
METHODS = tuple(m for m in CALIBRATION_METHODS if m != "none")  # the methods fit() knows
_EPS = 1e-7


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def bin_index(p: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each probability: 0 for [0, 1/n], k for (k/n, (k+1)/n]."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.clip(p, 0.0, 1.0), side="left")


@dataclass
class Reliability:
    """Per-bin counts, mean predicted probability and observed positive rate (NaN when empty)."""

    counts: np.ndarray
    mean_pred: np.ndarray
    frac_pos: np.ndarray

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        if n == 0:
            return float("nan")
        full = self.counts > 0
        return float(np.sum(self.counts[full] * np.abs(self.frac_pos[full] - self.mean_pred[full])) / n)

    @property
    def mce(self) -> float:
        full = self.counts > 0
        return float(np.max(np.abs(self.frac_pos[full] - self.mean_pred[full]))) if full.any() else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> Reliability:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    k = bin_index(p, n_bins)
    counts = np.bincount(k, minlength=n_bins).astype(np.float64)
    sp = np.bincount(k, weights=p, minlength=n_bins)
    sy = np.bincount(k, weights=y, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_pred = np.where(counts > 0, sp / np.where(counts > 0, counts, 1), np.nan)
        frac_pos = np.where(counts > 0, sy / np.where(counts > 0, counts, 1), np.nan)
    return Reliability(counts, mean_pred, frac_pos)


def calibration_report(y: np.ndarray, s: np.ndarray, m: np.ndarray, names: list[str], n_bins: int = N_BINS) -> dict[str, Any]:
    """Per label ``ece``, ``mce``, ``brier``, ``mean_score``, ``prevalence`` and macro means (prepared inputs)."""
    labels = []
    for j, name in enumerate(names):
        rows = m[:, j]
        yj, sj = y[rows, j].astype(np.float64), s[rows, j]
        if yj.size == 0:
            labels.append({"name": name, "n": 0, "ece": None, "mce": None, "brier": None, "mean_score": None, "prevalence": None})
            continue
        r = reliability(yj, sj, n_bins)
        labels.append({
            "name": name, "n": int(yj.size), "ece": r.ece, "mce": r.mce,
            "brier": float(np.mean((sj - yj) ** 2)), "mean_score": float(sj.mean()), "prevalence": float(yj.mean()),
        })

    def macro(key: str) -> float | None:
        vals = [d[key] for d in labels if d[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"bins": n_bins, "binning": "equal-width on [0, 1], weighted by bin count",
            "labels": labels, "macro_ece": macro("ece"), "macro_mce": macro("mce"), "macro_brier": macro("brier")}


# --------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def fit_logistic_1d(z: np.ndarray, y: np.ndarray, slope_only: bool = False, iters: int = 100) -> tuple[float, float]:
    """Unregularised maximum-likelihood ``sigmoid(a z + b)`` by Newton's method (b = 0 if ``slope_only``).

    Perfectly separable data has no finite optimum; the iterations stop at a
    large slope, which is the limit the optimum approaches.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = np.stack([z, np.ones_like(z)], axis=1)
    if slope_only:
        x = x[:, :1]
    w = np.zeros(x.shape[1])
    w[0] = 1.0
    for _ in range(iters):
        p = sigmoid(x @ w)
        g = x.T @ (p - y)
        h = (x * (p * (1 - p))[:, None]).T @ x + 1e-12 * np.eye(x.shape[1])
        step = np.linalg.solve(h, g)
        # backtracking keeps the log loss decreasing when far from the optimum
        loss = _nll(x @ w, y)
        t = 1.0
        while t > 1e-6 and _nll(x @ (w - t * step), y) > loss + 1e-12:
            t *= 0.5
        w = w - t * step
        if np.max(np.abs(t * step)) < 1e-10 or abs(w[0]) > 1e6:
            break
    return float(w[0]), float(w[1]) if not slope_only else 0.0


def _nll(zw: np.ndarray, y: np.ndarray) -> float:
    # log(1 + exp(z)) - y z, stably
    return float(np.sum(np.logaddexp(0.0, zw) - y * zw))


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on p; returns the interpolation knots (x, y).

    Tied p are merged first (mean y, weighted by count), as scikit-learn does,
    then pool-adjacent-violators; only each block's end points are kept.
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    xu, inv = np.unique(p, return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    v = np.bincount(inv, weights=y) / w
    # PAV with a stack of blocks (value, weight, length)
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for vi, wi in zip(v.tolist(), w.tolist()):
        vals.append(vi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            v2, w2, l2 = vals.pop(), wts.pop(), lens.pop()
            tot = wts[-1] + w2
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / tot
            wts[-1] = tot
            lens[-1] += l2
    fitted = np.repeat(np.asarray(vals), lens)
    fitted = np.clip(fitted, 0.0, 1.0)
    # keep first and last knot of each constant run (interpolation is unchanged)
    keep = np.ones(xu.size, dtype=bool)
    if xu.size > 2:
        same_prev = np.r_[False, fitted[1:] == fitted[:-1]]
        same_next = np.r_[fitted[:-1] == fitted[1:], False]
        keep = ~(same_prev & same_next)
    return xu[keep], fitted[keep]


@dataclass
class Calibration:
    """Per-label calibration map from raw model probabilities, plus a logit shift.

    ``a``, ``b``: affine map in logit space (temperature: ``a = 1/T, b = 0``;
    platt: fitted; ``none``/``isotonic``: ``a = 1, b = 0``). Isotonic knots are
    padded to one ``[L, K]`` array with ``iso_n`` valid knots per label.
    """

    method: str  # temperature | platt | isotonic | none
    a: np.ndarray
    b: np.ndarray
    shift: np.ndarray
    iso_x: np.ndarray | None = None
    iso_y: np.ndarray | None = None
    iso_n: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def identity(cls, n_labels: int) -> "Calibration":
        return cls("none", np.ones(n_labels), np.zeros(n_labels), np.zeros(n_labels))

    @property
    def n_labels(self) -> int:
        return int(self.a.shape[0])

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw probabilities ``p`` [N, L] (extra columns untouched)."""
        p = np.asarray(p)
        dtype = p.dtype if p.dtype.kind == "f" else np.float64
        L = self.n_labels
        out = np.array(p, dtype=np.float64, copy=True)
        q = out[:, :L]
        if self.method == "isotonic":
            for j in range(L):
                k = int(self.iso_n[j])
                q[:, j] = np.interp(q[:, j], self.iso_x[j, :k], self.iso_y[j, :k])
            if np.any(self.shift != 0):
                q[:] = sigmoid(logit(q) + self.shift[None, :])
        elif self.method != "none" or np.any(self.shift != 0):
            q[:] = sigmoid(self.a[None, :] * logit(q) + self.b[None, :] + self.shift[None, :])
        return out.astype(dtype)

    @property
    def invertible(self) -> bool:
        """Strictly increasing and invertible (so thresholds can be carried over exactly)."""
        return self.method != "isotonic" and bool(np.all(self.a > 0))

    def map_thresholds(self, t_old_scale: np.ndarray, old: "Calibration") -> np.ndarray:
        """Thresholds set on ``old``'s calibrated scale, moved to this calibration's scale."""
        z = logit(t_old_scale)
        raw = (z - old.b - old.shift) / old.a
        return sigmoid(self.a * raw + self.b + self.shift)

    def to_tensors(self) -> dict[str, np.ndarray]:
        t = {"calibration.a": self.a.astype(np.float32), "calibration.b": self.b.astype(np.float32),
             "calibration.shift": self.shift.astype(np.float32)}
        if self.method == "isotonic":
            t.update({"calibration.iso_x": self.iso_x.astype(np.float32), "calibration.iso_y": self.iso_y.astype(np.float32),
                      "calibration.iso_n": self.iso_n.astype(np.int32)})
        return t

    @classmethod
    def from_file(cls, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> "Calibration | None":
        info = meta.get("calibration")
        if not info or "calibration.a" not in tensors:
            return None
        method = info.get("method", "none")
        f64 = lambda k: np.asarray(tensors[k], dtype=np.float64)  # noqa: E731
        if method == "isotonic":
            if "calibration.iso_x" not in tensors:
                raise MavlError("the model says it is isotonic-calibrated but holds no isotonic knots")
            return cls(method, f64("calibration.a"), f64("calibration.b"), f64("calibration.shift"),
                       f64("calibration.iso_x"), f64("calibration.iso_y"), np.asarray(tensors["calibration.iso_n"]).astype(int))
        return cls(method, f64("calibration.a"), f64("calibration.b"), f64("calibration.shift"))


def fit(y: np.ndarray, p: np.ndarray, m: np.ndarray, method: str, names: list[str]) -> Calibration:
    """Fit one calibration map per label on (prepared) validation labels and raw probabilities."""
    if method not in METHODS:
        raise MavlError(f"unknown calibration --method {method!r}; use one of {', '.join(METHODS)}")
    L = y.shape[1]
    cal = Calibration.identity(L)
    cal.method = method
    knots: list[tuple[np.ndarray, np.ndarray]] = []
    for j, name in enumerate(names):
        rows = m[:, j]
        yj, pj = y[rows, j].astype(np.float64), p[rows, j].astype(np.float64)
        n_pos = int(yj.sum())
        if n_pos == 0 or n_pos == yj.size:
            which = "no validation entries" if yj.size == 0 else ("no positives" if n_pos == 0 else "no negatives")
            cal.notes.append(f"{name}: {which} in the calibration data; left uncalibrated")
            knots.append((np.array([0.0, 1.0]), np.array([0.0, 1.0])))
            continue
        if method == "temperature":
            a, _ = fit_logistic_1d(logit(pj), yj, slope_only=True)
            if a <= 0:
                cal.notes.append(f"{name}: scores are anti-correlated with the labels on validation; temperature left at 1")
                a = 1.0
            cal.a[j] = a
        elif method == "platt":
            a, b = fit_logistic_1d(logit(pj), yj)
            if not a > 0:  # a map with slope <= 0 would reverse (or erase) the ranking: never
                cal.notes.append(f"{name}: Platt slope {a:.3g} <= 0 (scores anti-correlated with the labels on "
                                 "validation); left uncalibrated, since calibration must never reverse the order of scores")
                a, b = 1.0, 0.0
            cal.a[j], cal.b[j] = a, b
        else:
            knots.append(fit_isotonic(pj, yj))
    if method == "isotonic":
        k = max(x.size for x, _ in knots)
        cal.iso_x = np.zeros((L, k))
        cal.iso_y = np.zeros((L, k))
        cal.iso_n = np.array([x.size for x, _ in knots])
        for j, (x, v) in enumerate(knots):
            cal.iso_x[j, : x.size], cal.iso_x[j, x.size :] = x, x[-1]
            cal.iso_y[j, : v.size], cal.iso_y[j, v.size :] = v, v[-1]
    return cal


def parse_prevalence(spec: str, names: list[str]) -> dict[str, float]:
    """``'Cardiomegaly=0.12,Effusion=0.3'`` -> {label: prevalence}, every name a model label, 0 < p < 1."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise MavlError(f"--prevalence: {part.strip()!r} is not LABEL=VALUE (e.g. 'Cardiomegaly=0.12')")
        k, v = (x.strip() for x in part.rsplit("=", 1))
        if k not in names:
            raise MavlError(f"--prevalence: {k!r} is not one of the model's labels ({', '.join(names)})")
        if k in out:
            raise MavlError(f"--prevalence: {k} is given twice ({out[k]:g} and {v}); give each label once")
        try:
            val = float(v)
        except ValueError:
            raise MavlError(f"--prevalence: {k}={v!r} is not a number") from None
        if not 0.0 < val < 1.0:
            raise MavlError(f"--prevalence: {k}={v} must lie strictly between 0 and 1")
        out[k] = val
    if not out:
        raise MavlError("--prevalence is empty; give e.g. 'Cardiomegaly=0.12,Effusion=0.3'")
    return out


def prior_shift(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Logit offset turning probabilities calibrated at prevalence ``source`` into ones at ``target``."""
    return logit(target) - logit(source)
