"""Report figure: ROC and precision-recall curves with the operating points, and a reliability diagram.

matplotlib is imported inside the function so the CLI starts fast; pyplot is
not used at all, so no GUI backend or global figure state is involved.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.calibration import N_BINS, reliability
from mavl_cli.evaluation.metrics import auroc_auprc, curve_counts, prepare
from mavl_cli.io.files import atomic_write_bytes, is_stdout

__all__ = ["plot_report"]


@dataclass(frozen=True)
class _LabelCurves:
    """One label's curve counts and operating point, ready to draw on every panel."""

    name: str
    color: Any
    tps: np.ndarray
    fps: np.ndarray
    n_pos: int
    n_neg: int
    tp: int  # true positives at the label's threshold
    fp: int  # false positives at the label's threshold


def _label_curves(name: str, color: Any, yj: np.ndarray, sj: np.ndarray, threshold: float) -> _LabelCurves | None:
    """Curve counts and operating point of one label's evaluated entries; None with a single class."""
    n_pos = int(yj.sum())
    n_neg = int(yj.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    _, tps, fps = curve_counts(yj, sj)
    pred = sj >= threshold
    tp = int(np.count_nonzero(pred & (yj == 1)))
    fp = int(np.count_nonzero(pred & (yj == 0)))
    return _LabelCurves(name, color, tps, fps, n_pos, n_neg, tp, fp)


def _plot_roc(ax: Any, c: _LabelCurves, auroc: float) -> None:
    """ROC curve of one label with a dot at its operating point."""
    fpr = np.concatenate(([0.0], c.fps / c.n_neg))
    tpr = np.concatenate(([0.0], c.tps / c.n_pos))
    ax.plot(fpr, tpr, color=c.color, lw=1.3, label=f"{c.name} (AUROC {auroc:.3f})")
    ax.plot(c.fp / c.n_neg, c.tp / c.n_pos, "o", color=c.color, ms=6, mec="black", mew=0.7)


def _plot_pr(ax: Any, c: _LabelCurves, ap: float) -> None:
    """Precision-recall curve of one label with a dot at its operating point (if it predicts any positive)."""
    recall = np.concatenate(([0.0], c.tps / c.n_pos))
    precision = np.concatenate(([1.0], c.tps / (c.tps + c.fps)))
    ax.step(recall, precision, where="pre", color=c.color, lw=1.3, label=f"{c.name} (AP {ap:.3f})")
    if c.tp + c.fp > 0:
        ax.plot(c.tp / c.n_pos, c.tp / (c.tp + c.fp), "o", color=c.color, ms=6, mec="black", mew=0.7)


def _plot_reliability(ax: Any, name: str, color: Any, yj: np.ndarray, sj: np.ndarray) -> None:
    """Reliability curve of one label over the non-empty bins."""
    rel = reliability(yj, sj, N_BINS)
    full = rel.counts > 0
    ax.plot(rel.mean_pred[full], rel.frac_pos[full], "o-", color=color, lw=1.1, ms=3.5,
            label=f"{name} (ECE {rel.ece:.3f})")


def _finish_axes(ax_roc: Any, ax_pr: Any, ax_rel: Any) -> None:
    """Diagonals, limits, axis labels, titles, grids and legends of the three panels."""
    ax_roc.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
               ylabel="True positive rate (sensitivity)", title="ROC curves")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision",
              title="Precision-recall curves")
    ax_rel.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
    ax_rel.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=f"Mean predicted probability ({N_BINS} equal-width bins)",
               ylabel="Observed positive rate", title="Reliability diagram")
    for ax in (ax_roc, ax_pr, ax_rel):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right" if ax is ax_pr else ("upper left" if ax is ax_rel else "lower right"),
                      framealpha=0.85)


def _write_png(fig: Any, path: Path) -> None:
    """Render ``fig`` and write it through the one atomic writer (`-` is standard output; mode follows the umask)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise MavlError(f"Cannot write the plot: {exc.strerror or exc}.", path=path) from exc


def plot_report(
    path: Path,
    y_true: Any,
    scores: Any,
    thresholds: Any,
    label_names: list[str],
    mask: Any = None,
) -> Path:
    """Write a PNG with ROC, PR and reliability panels, a curve per label.

    The dot on each curve is where that label's threshold operates, so the
    reader sees the sensitivity/precision trade-off actually in use. Labels
    with a single class cannot have curves and are listed as n/a. The file is
    written to a temporary name first and moved into place, so a crash never
    leaves a truncated image behind.
    """
    # Figure without pyplot: Agg rendering, no global state, no GUI backend.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    y, s, m, t = prepare(y_true, scores, mask, label_names, thresholds)

    path = Path(path) if not is_stdout(path) else path
    if not is_stdout(path):
        path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(19, 6.2))
    ax_roc, ax_pr, ax_rel = fig.subplots(1, 3)
    cmap = colormaps["tab20"]
    skipped: list[str] = []
    for j, name in enumerate(label_names):
        rows = m[:, j]
        yj, sj = y[rows, j], s[rows, j]
        curves = _label_curves(name, cmap(j % 20), yj, sj, t[j])
        if curves is None:
            skipped.append(name)
            continue
        auroc, ap = auroc_auprc(curves.tps, curves.fps)
        _plot_roc(ax_roc, curves, auroc)
        _plot_pr(ax_pr, curves, ap)
        _plot_reliability(ax_rel, name, curves.color, yj, sj)

    _finish_axes(ax_roc, ax_pr, ax_rel)
    caption = "Dots: operating point at each label's threshold (score >= t is positive)."
    if skipped:
        caption += f"  n/a (one class only): {', '.join(skipped)}."
    fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _write_png(fig, path)
    return path
