"""Fast (patient-)bootstrap engine shared by evaluate, subgroups and compare.

A bootstrap resample is a vector of multiplicities over *units* (patients, or
images when no patient is known): how often each unit was drawn. Every
statistic here is computed from those unit counts directly:

* F1 counts are linear in the counts: ``counts @ per_unit_TP`` (one dense
  matrix product for all resamples and labels);
* AUROC is a weighted Mann-Whitney statistic. Sorting each label once, the
  positives' distinct scores ``G_0 < ... < G_{m-1}`` cut the negatives into
  "gaps" (strictly between two of them) and "ties" (equal to one). The
  statistic only needs, per resample, the weight of positives at each ``G_k``
  and of negatives in each gap and tie, and all of those are one sparse
  matrix product ``slots x units @ units x resamples``. Then
  ``U = sum_k pos_k * (neg strictly below G_k + tie_k / 2)`` is a cumulative
  sum over at most ``n_pos`` slots instead of a pass over all images.

Values equal the direct weighted computation (tests compare with
scikit-learn's ``roc_auc_score(sample_weight=...)``), and the draws are the
same as :func:`mavl_cli.evaluation.metrics.resample_weights` for a given seed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy import sparse

from mavl_cli.core.errors import MavlError

#: numbers held at once per chunk of resamples (bounds memory to ~100 MB)
_CHUNK_BUDGET = 12_000_000


def units_of(n_images: int, groups: np.ndarray | list | None) -> tuple[np.ndarray, int]:
    """(unit index per image, number of units): patients when ``groups`` is given, else images."""
    if groups is None:
        return np.arange(n_images), n_images
    g = np.asarray(groups)
    if g.shape[0] != n_images:
        raise MavlError(f"Got {g.shape[0]} patient ids for {n_images} images.")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.ravel()
    return inverse, (int(inverse.max()) + 1 if n_images else 0)


@dataclass
class Resampler:
    """Seeded draws of unit multiplicities, in chunks of ``[b, n_units]``."""

    n_units: int
    seed: int = 0

    def chunks(self, n_boot: int, chunk: int | None = None) -> Iterator[np.ndarray]:
        if n_boot < 0:
            raise MavlError(f"Bootstrap resamples must be 0 or more, got {n_boot}.")
        rng = np.random.default_rng(self.seed)
        p = self.n_units
        step = chunk or max(1, min(n_boot, 4_000_000 // max(p, 1)))
        done = 0
        while done < n_boot:
            b = min(step, n_boot - done)
            picks = rng.integers(0, p, size=(b, p))
            flat = picks + (np.arange(b) * p)[:, None]
            yield np.bincount(flat.ravel(), minlength=b * p).reshape(b, p).astype(np.float32)
            done += b


def per_unit(inverse: np.ndarray, n_units: int, values: np.ndarray) -> np.ndarray:
    """Sum per unit of ``values`` [n_images, k] -> [n_units, k] (float64)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    out = np.empty((n_units, values.shape[1]))
    for k in range(values.shape[1]):
        out[:, k] = np.bincount(inverse, weights=values[:, k], minlength=n_units)
    return out


class AurocEngine:
    """Weighted AUROC of every label for many unit-count vectors at once.

    ``y``, ``s``, ``m`` are prepared ``[n_images, n_labels]`` arrays (see
    :func:`mavl_cli.evaluation.metrics.prepare`); ``inverse`` maps images to units.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray, m: np.ndarray, inverse: np.ndarray, n_units: int):

        self.n_labels = y.shape[1]
        self.n_units = n_units
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        self.slices: list[tuple[int, int] | None] = []  # (start, m) per label
        start = 0
        for j in range(self.n_labels):
            keep = m[:, j]
            pos = keep & (y[:, j] == 1)
            neg = keep & (y[:, j] == 0)
            if not pos.any() or not neg.any():
                self.slices.append(None)
                continue
            g = np.unique(s[pos, j])
            k_pos = np.searchsorted(g, s[pos, j])
            sn = s[neg, j]
            k_neg = np.searchsorted(g, sn)
            tie = (k_neg < g.size) & (g[np.minimum(k_neg, g.size - 1)] == sn)
            mm = g.size
            # slot layout per label: [pos_0..pos_{m-1}, tie_0..tie_{m-1}, gap_0..gap_m]
            slot_neg = np.where(tie, mm + k_neg, 2 * mm + k_neg)
            rows += [start + k_pos, start + slot_neg]
            cols += [inverse[pos], inverse[neg]]
            self.slices.append((start, mm))
            start += 3 * mm + 1
        self.n_slots = start
        if start:
            r = np.concatenate(rows)
            c = np.concatenate(cols)
            self.matrix = sparse.csr_matrix(
                (np.ones(r.size, np.float32), (r, c)), shape=(start, n_units), dtype=np.float32
            )
        else:
            self.matrix = None

    def auroc(self, counts: np.ndarray) -> np.ndarray:
        """``counts`` [b, n_units] -> AUROC [b, n_labels] (NaN where a resample lacks a class)."""
        b = counts.shape[0]
        out = np.full((b, self.n_labels), np.nan)
        if self.matrix is None:
            return out
        x = np.asarray(self.matrix @ np.ascontiguousarray(counts.T, dtype=np.float32), dtype=np.float64)
        for j, sl in enumerate(self.slices):
            if sl is None:
                continue
            st, mm = sl
            pos = x[st : st + mm]
            tie = x[st + mm : st + 2 * mm]
            gap = x[st + 2 * mm : st + 3 * mm + 1]
            step = gap[:mm].copy()
            step[1:] += tie[:-1]
            below = np.cumsum(step, axis=0)
            u = np.sum(pos * (below + 0.5 * tie), axis=0)
            denom = pos.sum(axis=0) * (tie.sum(axis=0) + gap.sum(axis=0))
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, j] = np.where(denom > 0, u / np.where(denom > 0, denom, 1), np.nan)
        return out

    def chunk_size(self, n_boot: int) -> int:
        """Resamples per chunk so that the dense ``slots x b`` block stays in budget."""
        return max(1, min(n_boot, 256, _CHUNK_BUDGET // max(self.n_slots + self.n_units, 1)))


def percentile_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval over the finite values (NaN, NaN if none)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(arr, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN, NaN for an all-NaN row, without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=1)
