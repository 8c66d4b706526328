"""The ``card`` stage: a model card from a model file's provenance and an evaluation's JSON."""

from __future__ import annotations

from mavl_cli.core.errors import MavlError
from mavl_cli.io.files import atomic_write_bytes, check_output_path
from mavl_cli.io.mavlfile import read_file
from mavl_cli.reports.card import read_eval, render_card
from mavl_cli.stages.result import StageResult


def card_stage(model_path: str, eval_json: str | None, output: str, name: str | None = None) -> StageResult:
    check_output_path(output, [p for p in (model_path, eval_json) if p])
    f = read_file(model_path, expect="model")
    ev = read_eval(eval_json) if eval_json else None
    if ev is not None:
        have = list(f.meta.get("labels") or [])
        other = [lab.get("name") for lab in ev.get("labels", [])]
        if not set(other) <= set(have):
            raise MavlError(f"{eval_json}: its labels ({', '.join(map(str, other[:5]))}...) are not this model's ({', '.join(have[:5])}...)")
    text = render_card(f.meta, model_path, ev, name)
    atomic_write_bytes(output, text.encode("utf-8"))
    return StageResult(output, {"labels": len(f.meta.get("labels") or []), "evaluation": eval_json or "none",
                                "bytes": len(text.encode("utf-8"))})
