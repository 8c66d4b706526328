"""Report figure: ROC and precision-recall curves with the operating points, and a reliability diagram.

matplotlib is imported inside the function so the CLI starts fast; pyplot is
not used at all, so no GUI backend or global figure state is involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.evaluation.calibration import N_BINS, reliability
from mavl_cli.evaluation.metrics import auroc_auprc, curve_counts, prepare
from mavl_cli.io.files import atomic_write_bytes, is_stdout

__all__ = ["plot_report"]


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
        n_pos = int(yj.sum())
        n_neg = int(yj.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            skipped.append(name)
            continue
        _, tps, fps = curve_counts(yj, sj)
        auroc, ap = auroc_auprc(tps, fps)
        color = cmap(j % 20)
        fpr = np.concatenate(([0.0], fps / n_neg))
        tpr = np.concatenate(([0.0], tps / n_pos))
        recall = np.concatenate(([0.0], tps / n_pos))
        precision = np.concatenate(([1.0], tps / (tps + fps)))
        ax_roc.plot(fpr, tpr, color=color, lw=1.3, label=f"{name} (AUROC {auroc:.3f})")
        ax_pr.step(recall, precision, where="pre", color=color, lw=1.3, label=f"{name} (AP {ap:.3f})")
        rel = reliability(yj, sj, N_BINS)
        full = rel.counts > 0
        ax_rel.plot(rel.mean_pred[full], rel.frac_pos[full], "o-", color=color, lw=1.1, ms=3.5,
                    label=f"{name} (ECE {rel.ece:.3f})")

        pred = sj >= t[j]
        tp = int(np.count_nonzero(pred & (yj == 1)))
        fp = int(np.count_nonzero(pred & (yj == 0)))
        op_tpr = tp / n_pos
        ax_roc.plot(fp / n_neg, op_tpr, "o", color=color, ms=6, mec="black", mew=0.7)
        if tp + fp > 0:
            ax_pr.plot(op_tpr, tp / (tp + fp), "o", color=color, ms=6, mec="black", mew=0.7)

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
    caption = "Dots: operating point at each label's threshold (score >= t is positive)."
    if skipped:
        caption += f"  n/a (one class only): {', '.join(skipped)}."
    fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))

    # through the one atomic writer: `-` is standard output (a PNG stream), the mode follows the umask
    import io


    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise MavlError(f"Cannot write the plot: {exc.strerror or exc}.", path=path) from exc
    return path
