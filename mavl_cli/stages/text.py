"""The ``embed-text`` stage: label descriptions (one or many aspects) through a text encoder."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

from mavl_cli.core.options import RunOptions, TextSpec
from mavl_cli.encoders.text_embed import embed_descriptions
from mavl_cli.io.descriptions import read_descriptions
from mavl_cli.io.files import check_output_path, model_inputs
from mavl_cli.io.mavlfile import write_file
from mavl_cli.stages.result import StageResult


def embed_text_stage(
    descriptions: str, output: str, text: TextSpec | None = None, run: RunOptions | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> StageResult:
    text, run = text or TextSpec(), run or RunOptions()
    text_model, pooling, trust_remote_code = text.model, text.pooling, text.trust_remote_code
    device, batch_size = run.device, run.batch(32)

    check_output_path(output, [descriptions, *model_inputs(text_model)])
    desc = read_descriptions(descriptions)
    n = len(desc.flat())
    with (progress("embed-text", n, "text") if progress else nullcontext(None)) as advance:
        te = embed_descriptions(desc, text_model, pooling=pooling, device=device, batch_size=batch_size, advance=advance,
                                trust_remote_code=trust_remote_code)
    te.meta["descriptions_file"] = str(descriptions)
    write_file(output, "text-embeddings", {"embeddings": te.embeddings, "mask": te.mask}, te.meta)
    notes = [
        f"truncated: {t['label']} / {t['aspect']}: {t['tokens']} tokens, {t['lost']} lost beyond {t['kept']}"
        for t in te.truncated
    ]
    table = [{"label": lab, "aspects": int(te.mask[i].sum())} for i, lab in enumerate(desc.labels)]
    return StageResult(output, {"labels": len(desc.labels), "aspects": len(desc.aspects), "texts": n,
                                "dim": int(te.embeddings.shape[2]), "form": desc.form}, table, notes)
