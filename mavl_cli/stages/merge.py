"""The ``merge`` stage: shards of one embed-images or predict run joined into the unsharded file."""

from __future__ import annotations

from typing import Any

from mavl_cli.core.errors import MavlError
from mavl_cli.io.files import check_output_path
from mavl_cli.io.mavlfile import read_file, write_file
from mavl_cli.io.shards import merge_parts
from mavl_cli.stages.result import StageResult


def merge_stage(parts: list[str], output: str) -> Any:
    """``mavl merge``: read, check and join shard files; write atomically (nothing on any error)."""

    if not parts:
        raise MavlError("merge needs part files: mavl merge part_*.safetensors -o all.safetensors")
    check_output_path(output, parts)
    loaded = [read_file(p) for p in parts]
    m = merge_parts(loaded, output)
    meta = dict(m.meta)
    write_file(output, m.kind, m.tensors, meta)
    return StageResult(output, {"kind": m.kind, "parts": m.parts, "rows": m.rows,
                                "skipped": len(m.meta.get("skipped") or []) if m.kind == "image-embeddings" else None})
