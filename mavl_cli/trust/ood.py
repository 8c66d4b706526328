"""Out-of-distribution flag: is this image unlike the images the model was trained on?

At training time (``fuse``; any trainer may call :func:`fit`) the model file
gets the statistics of its training features *in the space the fusion
reads* (LRF space when the model has an LRF head, else backbone space):

* ``ood.mean`` ``[D]``: the training mean;
* ``ood.whiten`` ``[D, D]``: ``Sigma^(-1/2)`` of the Ledoit-Wolf shrunk covariance;
* ``ood.ref_dist`` ``[K]``: sorted Mahalanobis distances of reference images
  (the validation set when given, else 5-fold cross-fitted training distances:
  each training image measured against statistics fitted without it, so the
  reference is not optimistically tight), at most :data:`MAX_REF` order statistics.

Why Ledoit-Wolf and not a low-rank whitening: the fusion input has tens to
about a thousand dimensions and training sets of a few hundred images, often
fewer images than dimensions. The Ledoit-Wolf estimate is well-conditioned in
that regime, has a closed form with no rank or threshold to choose, and keeps
every direction. A low-rank whitening would have to drop (or model with one
shared variance) the directions training barely varied in, and images unlike
the training data (an inverted film, a photo) differ most in exactly those
directions: full shrunk Mahalanobis weighs them strongly but boundedly.

An image's ``ood_score`` is the percentile of its distance among the reference
distances (0-100); it is flagged when its distance exceeds the reference
distances' ``--ood-threshold`` percentile (default 99).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_DIM
from mavl_cli.evaluation.metrics import evaluate

METHOD = "mahalanobis, Ledoit-Wolf shrunk covariance"
DEFAULT_PERCENTILE = 99.0
MAX_REF = 4096
OLD_MODEL_NOTE = ("note: this model file has no OOD statistics (made before they were stored); images are not checked "
                  "for being unlike the training data; refit it with `mavl fuse` to get the ood flag")


# ------------------------------------------------------------------ fitting


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrunk covariance of ``x`` [N, D] (biased, centred) and the shrinkage.

    Target: ``mu * I`` with ``mu = trace(S) / D``; the same estimator as
    ``sklearn.covariance.ledoit_wolf`` (tested against it).
    """
    x = np.asarray(x, np.float64)
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    x2 = xc**2
    beta_ = ((x2.T @ x2).sum() / n - (s**2).sum()) / n  # sum_i ||x_i x_i^T - S||_F^2 / n^2
    delta_ = (s**2).sum() - 2 * mu * np.trace(s) + d * mu**2  # ||S - mu I||_F^2
    beta = min(beta_, delta_)
    shrink = 0.0 if delta_ == 0 else beta / delta_
    cov = (1 - shrink) * s
    cov[np.diag_indices(d)] += shrink * mu
    return cov, float(shrink)


def _whitening(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    mean = x.mean(0)
    cov, shrink = ledoit_wolf(x)
    w, v = np.linalg.eigh(cov)
    floor = max(float(w.max()), 1e-12) * 1e-9
    w = np.maximum(w, floor)
    return mean, (v / np.sqrt(w)) @ v.T, shrink


def _dist(x: np.ndarray, mean: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64) - mean) @ whiten
    return np.sqrt((z**2).sum(1))


def _order_stats(d: np.ndarray) -> np.ndarray:
    d = np.sort(np.asarray(d, np.float64))
    if len(d) > MAX_REF:
        d = np.quantile(d, np.linspace(0, 1, MAX_REF))
    return d.astype(np.float32)


def fit(train_x: np.ndarray, ref_x: np.ndarray | None = None, seed: int = 0, folds: int = 5) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Statistics of ``train_x`` and reference distances: (tensors to store, ``ood`` metadata).

    Returns ({}, {reason}) when the statistics cannot be fitted (too few
    images, too many dimensions).
    """
    train_x = np.asarray(train_x, np.float64)
    n, d = train_x.shape
    if d > MAX_DIM:
        return {}, {"skipped": f"{d}-d fusion input is above {MAX_DIM} dimensions"}
    if n < 4:
        return {}, {"skipped": f"only {n} training images"}
    mean, whiten, shrink = _whitening(train_x)
    if ref_x is not None and len(ref_x) >= 1:
        ref = _dist(ref_x, mean, whiten)
        reference = "validation"
    else:
        k = min(folds, n)
        fold = np.random.default_rng(seed).permutation(n) % k
        ref = np.empty(n)
        for f in range(k):
            held = fold == f
            m_, w_, _ = _whitening(train_x[~held])
            ref[held] = _dist(train_x[held], m_, w_)
        reference = f"training ({k}-fold cross-fitted)"
    tensors = {"ood.mean": mean.astype(np.float32), "ood.whiten": whiten.astype(np.float32), "ood.ref_dist": _order_stats(ref)}
    meta = {"method": METHOD, "space": "fusion input", "dim": int(d), "n_train": int(n), "shrinkage": round(shrink, 6),
            "reference": reference, "n_reference": int(len(ref)), "default_percentile": DEFAULT_PERCENTILE}
    return tensors, meta


# ------------------------------------------------------------------ using


@dataclass
class Stats:
    mean: np.ndarray
    whiten: np.ndarray
    ref: np.ndarray
    meta: dict[str, Any]


def load_stats(model: Any) -> Stats | None:
    """The model's OOD statistics, checked against its fusion input size; None if it has none.

    Shapes are checked against the fusion's ``img_dim`` (bounded by
    :data:`MAX_DIM`) before any arithmetic, so a forged file can at most
    refuse, never make mavl allocate beyond what the file itself holds.
    """
    t = model.file.tensors
    keys = ("ood.mean", "ood.whiten", "ood.ref_dist")
    if not any(k in t for k in keys):
        return None
    where = model.file.path
    if not all(k in t for k in keys):
        raise MavlError(f"{where}: incomplete OOD statistics (has {', '.join(k for k in keys if k in t)})")
    meta = model.meta.get("ood") if isinstance(model.meta.get("ood"), dict) else {}
    d = (model.meta.get("fusion") or {}).get("img_dim")
    mean, whiten, ref = t["ood.mean"], t["ood.whiten"], t["ood.ref_dist"]
    if not isinstance(d, int) or not 1 <= d <= MAX_DIM or mean.shape != (d,) or whiten.shape != (d, d):
        raise MavlError(f"{where}: OOD statistics of shape {list(mean.shape)}/{list(whiten.shape)} do not fit its {d}-d fusion input")
    if ref.ndim != 1 or not 1 <= ref.shape[0] <= MAX_REF or (ref < 0).any() or (np.diff(ref) < 0).any():
        raise MavlError(f"{where}: OOD reference distances must be 1 to {MAX_REF} sorted non-negative values")
    return Stats(mean.astype(np.float64), whiten.astype(np.float64), ref.astype(np.float64), meta)


def describe(model: Any) -> dict[str, Any] | None:
    """Summary for provenance (None when the file has no statistics)."""
    t = model.file.tensors
    if "ood.ref_dist" not in t:
        return None
    meta = model.meta.get("ood") if isinstance(model.meta.get("ood"), dict) else {}
    return {"method": meta.get("method", METHOD), "space": meta.get("space", "fusion input"),
            "reference": meta.get("reference", "?"), "n_reference": int(t["ood.ref_dist"].shape[0]) if t["ood.ref_dist"].ndim == 1 else None,
            "default_percentile": float(meta.get("default_percentile", DEFAULT_PERCENTILE))}


@dataclass
class Assessment:
    distance: np.ndarray  # [N]
    score: np.ndarray  # [N] percentile among the reference distances, 0..100
    flag: np.ndarray  # [N] bool
    percentile: float
    cutoff: float  # the distance above which an image is flagged


def check_percentile(p: float | None) -> float:
    p = DEFAULT_PERCENTILE if p is None else float(p)
    if not 0 < p <= 100:
        raise MavlError(f"--ood-threshold is a percentile of the reference distances, in (0, 100]; got {p}")
    return p


def assess(stats: Stats, x: np.ndarray, percentile: float | None = None) -> Assessment:
    """Distances, percentile scores and flags for fusion-input features ``x`` [N, D]."""
    p = check_percentile(percentile)
    dist = _dist(x, stats.mean, stats.whiten)
    ref = stats.ref
    below = np.searchsorted(ref, dist, side="left")
    upto = np.searchsorted(ref, dist, side="right")
    score = 100.0 * (below + upto) / (2.0 * len(ref))
    cutoff = float(np.quantile(ref, p / 100.0))
    return Assessment(dist, score, dist > cutoff, p, cutoff)


def assess_model(model: Any, x: np.ndarray, percentile: float | None = None) -> Assessment | None:
    stats = load_stats(model)
    return None if stats is None else assess(stats, x, percentile)


# ------------------------------------------------------------------ evaluate


@dataclass
class Evaluation:
    """`mavl evaluate`'s OOD part: how many test images were flagged, and the metrics without them."""

    available: bool
    images: int = 0
    flagged: int = 0
    percentile: float = DEFAULT_PERCENTILE
    cutoff: float | None = None
    flagged_ids: list[str] | None = None
    without_flagged: Any = None  # metrics.Report on the images not flagged (None if none is left)
    note: str | None = None

    @property
    def share(self) -> float | None:
        return self.flagged / self.images if self.images else None

    def to_dict(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "note": self.note}
        return {"available": True, "images": self.images, "flagged": self.flagged, "share_flagged": self.share,
                "percentile": self.percentile, "cutoff_distance": self.cutoff, "flagged_ids": self.flagged_ids,
                "without_flagged": self.without_flagged.to_dict() if self.without_flagged is not None else None,
                "note": self.note}


def evaluate_split(model: Any, sc: Any, thresholds: np.ndarray, percentile: float | None = None,
                   bootstrap: int = 0, seed: int = 0) -> Evaluation:
    """Flag ``sc``'s images (``sc.x``: fusion input) and evaluate the ones not flagged."""

    a = assess_model(model, sc.x, percentile) if sc.x is not None else None
    if a is None:
        return Evaluation(False, note=OLD_MODEL_NOTE)
    keep = ~a.flag
    ids = [i for i, f in zip(sc.ids, a.flag) if f]
    ev = Evaluation(True, len(sc.ids), int(a.flag.sum()), a.percentile, a.cutoff, ids[:100])
    if ev.flagged and keep.any():
        groups = np.asarray(sc.groups)[keep] if sc.groups is not None else None
        ev.without_flagged = evaluate(sc.y[keep], sc.scores[keep], thresholds, sc.names, mask=sc.mask[keep],
                                      bootstrap=bootstrap, seed=seed, groups=groups)
    elif ev.flagged:
        ev.note = "every image was flagged: no metrics without them"
    return ev
