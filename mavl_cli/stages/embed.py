"""mavl_cli.stages.embed."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mavl_cli.core.defaults import DEFAULT_IMAGE_ENCODER
from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import ImageList, RunOptions
from mavl_cli.core.runtime import resolve_device
from mavl_cli.datasets.inputs import ImageItem, collect_inputs
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.io.files import check_output_path, model_inputs
from mavl_cli.io.mavlfile import MavlFile, read_file, write_file
from mavl_cli.io.shards import Shard, merge_parts, parse_shard
from mavl_cli.models.embed import (
    CheckpointOptions,
    EmbedHooks,
    EmbedResult,
    check_precision,
    embed_images,
)
from mavl_cli.stages.result import StageResult
from mavl_cli.training import distributed
from mavl_cli.trust.provenance import synthetic_source


def embed_images_stage(
    images: ImageList | list[str],
    output: str,
    encoder: EncoderSpec | str | None = None,
    run: RunOptions | None = None,
    *,
    lrf: str | None = None,
    resume: bool = False,
    shard: str | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> StageResult:
    """Embed images into one file; with ``shard`` one part of it; under torchrun every rank
    embeds its shard on its own device and rank 0 merges the parts (see :mod:`mavl_cli.io.shards`).

    ``encoder``: an :class:`EncoderSpec` or ``FAMILY:ID`` (default: the default image encoder)."""

    src = images if isinstance(images, ImageList) else ImageList(list(images))
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.parse(encoder or DEFAULT_IMAGE_ENCODER)
    r = run or RunOptions()
    part = parse_shard(shard)
    dist = distributed.setup(r.device)
    part, r, progress = _torchrun_split(dist, part, output, r, progress)
    check_output_path(output, [lrf, src.labels, *model_inputs(spec, spec.weights)])
    check_precision(r.precision, resolve_device(r.device).type)
    head = read_file(lrf, expect="lrf-head") if lrf else None
    items, missing = _collect_items(src, output, r.skip_bad)
    checkpoint = None
    if output != "-":
        checkpoint = Path(f"{output}.partial" + (f".rank{dist.rank}-of-{dist.world}" if dist.active else ""))
    state = {"start": 0}
    error = None
    try:
        if checkpoint is not None and checkpoint.exists() and not resume:
            raise MavlError(f"{checkpoint}: a checkpoint of an interrupted run exists; add --resume to continue it, or delete it")
        res = _embed_with_progress(items, spec, r, head, part, CheckpointOptions(checkpoint, resume), progress, state)
    except MavlError as exc:
        if not dist.active:
            raise
        error = f"rank {dist.rank}: {exc}"
    distributed.agree(dist, error)  # one failed rank stops them all, with its message, before anything is merged
    if part is not None and part.index > 0:
        missing = []  # label-file rows without an image are listed once, by shard 0
    _annotate(res, missing, src.labels, items)
    rows = len(res.ids)
    if dist.active:
        rows = _merge_ranks(dist, output, res)
    else:
        write_file(output, "image-embeddings", {"features": res.features}, res.meta)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    summary = _summary(res, rows, r, state, len(items), part, dist)
    return StageResult(output, summary, [{"id": s["id"], "reason": s["reason"]} for s in res.skipped])


def _torchrun_split(dist: Any, part: Shard | None, output: str, run: RunOptions,
                    progress: Callable[[str, int, str], Any] | None) -> tuple[Shard | None, RunOptions, Any]:
    """Under torchrun each rank takes its own shard on its own device, with one progress bar (rank 0's)."""
    if not dist.active:
        return part, run, progress
    if part is not None:
        raise MavlError("--shard and torchrun both split the images; use one (under torchrun each rank takes its own shard)")
    if output == "-":
        raise MavlError("under torchrun, write the embeddings to a file (-o FILE), not to stdout")
    return Shard(dist.rank, dist.world), replace(run, device=dist.device), progress if dist.main else None


def _collect_items(src: ImageList, output: str, skip_bad: bool) -> tuple[list[ImageItem], list[dict[str, str]]]:
    """The images to embed, and the label-file rows whose image is missing (an error unless ``skip_bad``)."""
    labels = src.labels
    items, missing = collect_inputs(list(src.inputs), labels, src.root, src.path_column)
    check_output_path(output, [it.path for it in items])  # `-o DIR/a.png` must not replace an input image
    if missing and not skip_bad:
        shown = ", ".join(m["id"] for m in missing[:3])
        raise MavlError(f"{labels}: {len(missing)} image(s) listed in the label file were not found under the image root (e.g. {shown}); use --skip-bad to skip them")
    return items, missing


def _embed_with_progress(items: list[ImageItem], spec: EncoderSpec, run: RunOptions, head: Any, part: Shard | None,
                         ck: CheckpointOptions, progress: Callable[[str, int, str], Any] | None,
                         state: dict[str, int]) -> EmbedResult:
    """Run :func:`embed_images` under a progress bar; ``state`` learns where it started and how many it had."""
    with (progress("embed-images", len(items), "img") if progress else nullcontext(None)) as advance:
        def on_start(start: int, total: int) -> None:
            state["start"] = start
            state["total"] = total
            if advance and part is not None and hasattr(advance, "set_total"):
                advance.set_total(total)
            if advance and start:
                advance.resume_at(start)

        return embed_images(items, spec, run, lrf=head, shard=part, checkpoint=ck,
                            hooks=EmbedHooks(advance=advance, on_start=on_start))


def _annotate(res: EmbedResult, missing: list[dict[str, str]], labels: Any, items: list[ImageItem]) -> None:
    """Add the missing label-file rows to the skipped images, and the label file and provenance to the metadata."""
    res.skipped = [*({"id": m["id"], "path": "", "reason": m["reason"]} for m in missing), *res.skipped]
    res.meta["skipped"] = res.skipped
    res.meta["labels_file"] = str(labels) if labels else None

    res.meta["synthetic"] = synthetic_source(labels, [it.path for it in items])


def _summary(res: EmbedResult, rows: int, run: RunOptions, state: dict[str, int], n_items: int,
             part: Shard | None, dist: Any) -> dict[str, Any]:
    summary = {"images": rows, "skipped": len(res.skipped), "dim": int(res.features.shape[1]), "backbone": res.meta["backbone"],
               "precision": run.precision, "seconds": round(res.seconds, 2),
               "images_per_s": round((state.get("total", n_items) - state["start"]) / res.seconds, 2) if res.seconds else None,
               "resumed_from": state["start"], "threads": res.threads}
    if part is not None:
        sh = res.meta["shard"]
        summary["shard"] = f"{part} (inputs {sh['start']}..{sh['stop']} of {sh['total']})"
    if dist.active:
        summary["ranks"] = dist.world
        summary["device"] = str(run.device)
    return summary


def _merge_ranks(dist: Any, output: str, res: Any) -> int:
    """Rank 0 gathers every rank's part and writes the merged file; every rank learns whether it worked."""

    parts = distributed.gather_to_main(dist, (res.features, res.meta))
    rows, error = 0, None
    if dist.main:
        try:
            files = [MavlFile("image-embeddings", {"features": f}, dict(m), f"rank {r}")
                     for r, (f, m) in enumerate(parts or [])]
            merged = merge_parts(files, output)
            write_file(output, merged.kind, merged.tensors, merged.meta)
            rows = merged.rows
        except MavlError as exc:
            error = f"rank 0: {exc}"
    distributed.agree(dist, error)
    return rows if dist.main else len(res.ids)
