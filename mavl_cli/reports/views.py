"""How each stage's result is shown (tables, notes, the --json/--csv documents).

Shared by the command line (:mod:`mavl_cli.cli`) and ``mavl demo``
(:mod:`mavl_cli.stages.demo`), so a stage run by the demo prints exactly what the
command prints. Torch-free; heavy modules are imported inside the functions.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mavl_cli.core import console as render
from mavl_cli.evaluation.metrics import clean_tree
from mavl_cli.io.files import is_stdout, write_csv, write_stdout
from mavl_cli.reports import trust as trust_view
from mavl_cli.reports.tables import (
    compare_tables,
    prediction_json,
    prediction_tables,
    report_tables,
    subgroup_tables,
)
from mavl_cli.reports.trust import ood_eval_table
from mavl_cli.trust.ood import OLD_MODEL_NOTE
from mavl_cli.trust.provenance import SYNTHETIC_WARNING


def summary(title: str, values: dict[str, Any]) -> None:
    render.show(render.table(title, ["", "value"], [[k, v] for k, v in values.items()]))


def stage(command: str, res: Any, notes: str = "info") -> None:
    """The usual ending of a file-writing stage: ``COMMAND -> OUTPUT`` summary, then its notes."""
    summary(f"{command} -> {res.output}", res.summary)
    show = render.warn if notes == "warn" else render.info
    for n in res.notes:
        show(n)


def phantoms(res: Any) -> None:
    summary(f"phantoms -> {res.output}", res.summary)


def embed_images(res: Any) -> None:
    summary(f"embed-images -> {res.output}", res.summary)
    if res.table:
        render.warn(f"{len(res.table)} image(s) skipped: " + "; ".join(f"{r['id']}: {r['reason']}" for r in res.table[:5]))


def tune(res: Any) -> None:
    rows = [[r["label"], r["threshold"], r["f1"], r["recall"], r["support"]] for r in res.table]
    render.show(render.table(f"thresholds ({res.summary['method']}) on {res.summary['images']} validation images",
                             ["label", "threshold", "F1", "recall", "support"], rows,
                             caption=f"macro F1 on the tuning data: {res.summary['macro_f1']:.4f} (optimistic: report on test)"))
    for n in res.notes:
        render.info(n)


def evaluate(report: Any, warnings: list[str], sc: Any, *, as_json: bool = False, csv_out: str | None = None,
             plot: str | None = None, html_out: str | None = None) -> None:
    """Warnings, the --json document, the --csv file, then the report's tables."""
    for w in warnings:
        (render.alarm if w.startswith("ALARM") else render.warn)(w.replace("ALARM: ", ""))

    if as_json:
        render.claim_stdout()
        doc = report.to_dict()
        doc["warnings"] = [w.replace("ALARM: ", "") for w in warnings]

        doc["synthetic_training_data"] = SYNTHETIC_WARNING in warnings
        doc["ood"] = sc.ood.to_dict() if sc.ood is not None else None
        write_stdout(json.dumps(doc, indent=2, allow_nan=False) + "\n", "--json")
    if csv_out:
        if is_stdout(csv_out):  # the CSV goes to stdout, so the tables go to stderr
            render.claim_stdout()
        write_csv(csv_out, report.to_rows())

    for t in report_tables(report, f"{len(sc.ids)} images, {len(sc.names)} labels"):
        render.show(t)
    if sc.ood is not None:
        t = ood_eval_table(sc.ood, report)
        render.show(t) if t is not None else render.info(sc.ood.note or "")
    for t in subgroup_tables(report.subgroups):
        render.show(t)
    for n in report.notes:
        render.info(n)
    if plot:
        render.info(f"plot written: {plot}")
    if html_out:
        render.info(f"HTML report written: {html_out}")


def compare(res: dict[str, Any], notes: list[str], as_json: bool = False) -> None:
    if as_json:
        render.claim_stdout()
        sys.stdout.write(json.dumps(clean_tree(res), indent=2, allow_nan=False) + "\n")
    else:
        for t in compare_tables(res):
            render.show(t)
    for n in notes:
        render.info(n)


def prediction(pred: Any, skipped: list[dict[str, str]], *, as_json: bool = False, heatmap: Any = None,
               heatmap_method: str = "similarity") -> None:

    trust_view.show_trust_warnings(pred.warnings)
    if pred.ood is None:
        render.info(OLD_MODEL_NOTE)
    if as_json:
        render.claim_stdout()
        write_stdout(json.dumps(trust_view.prediction_document(pred, prediction_json(pred)), indent=2) + "\n", "--json")
    else:
        trust_view.show_provenance(pred.model_info)
        for t in prediction_tables(pred):
            render.show(t)
        trust_view.show_notice()
    for s in skipped:
        render.warn(f"skipped {s['path']}: {s['reason']}")
    if heatmap is not None and not as_json:
        n = sum(len(v) for v in (pred.peaks or {}).values())
        render.info(f"{n} {heatmap_method} map(s) -> {heatmap}")
