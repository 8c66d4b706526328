"""Rendering for trust information: model provenance, synthetic-data warning, OOD results, the notice."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from mavl_cli.core import console as render
from mavl_cli.trust.ood import OLD_MODEL_NOTE
from mavl_cli.trust.provenance import RESEARCH_NOTICE, provenance_lines


def provenance_table(prov: dict[str, Any], title: str = "model") -> Table:
    t = Table(title=title, show_header=False, title_style="bold", box=None, padding=(0, 1))
    t.add_column("field", style="cyan", justify="left")
    t.add_column("value", justify="left")
    for k, v in provenance_lines(prov):
        t.add_row(k, Text(v, style="bold yellow") if "SYNTHETIC" in v else Text(v))
    return t


def show_provenance(prov: dict[str, Any]) -> None:
    """The provenance block, once per run, on stderr (stdout stays the results')."""
    render.err().print(provenance_table(prov, f"model used: {prov['file']}"))


def show_trust_warnings(warnings: list[str]) -> None:
    for w in warnings:
        render.warn(w)


def show_notice() -> None:
    render.out().print(Text(RESEARCH_NOTICE, style="dim"))


def ood_eval_table(ev: Any, report: Any) -> Table | None:
    """Share flagged and the headline metrics with and without the flagged images."""
    if not ev.available:
        return None
    rows = [["images", ev.images, ev.images - ev.flagged]]
    wo = ev.without_flagged if ev.without_flagged is not None else (report if not ev.flagged else None)
    for key, name in (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC"), ("macro_f1", "macro F1"),
                      ("micro_f1", "micro F1")):
        rows.append([name, getattr(report, key), getattr(wo, key) if wo is not None else None])
    share = f"{100 * ev.share:.1f}%" if ev.share is not None else "n/a"
    return render.table(f"out-of-distribution: {ev.flagged} of {ev.images} images flagged ({share}; distance above "
                        f"the {ev.percentile:g}th reference percentile)", ["", "all images", "without flagged"], rows)


def prediction_document(pred: Any, images: list[dict[str, Any]]) -> dict[str, Any]:
    """`predict --json`: the model's provenance once, then one record per image."""

    a = pred.ood
    ood = ({"available": True, "percentile": a.percentile, "cutoff_distance": a.cutoff, "flagged": int(a.flag.sum())}
           if a is not None else {"available": False, "note": OLD_MODEL_NOTE})
    return {"model": pred.model_info, "synthetic_training_data": bool(pred.model_info.get("synthetic_training_data")),
            "warnings": list(pred.warnings), "ood": ood, "notice": RESEARCH_NOTICE, "images": images}
