"""`embed-images`: radiographs -> pooled backbone features, fast and resumable.

Speed: decoding runs in a thread pool a few batches ahead of the forward pass
(PIL releases the GIL while decoding and resizing; huge JPEGs are decoded at
reduced scale), the per-batch work is one vectorised normalisation, and the
forward runs under ``torch.inference_mode``. On a small CPU the forward pass is
the ceiling; ``benchmarks/embed_images.py`` measures how close we get.

Resumability: every finished batch is appended to ``OUT.partial``, a small
append-only log (one record per batch with its ids, skipped images and raw
float32 rows, each record checksummed). Appending costs O(batch), so a 224k
image run never rewrites a growing file. A process killed mid-write leaves at
most one torn record, which ``--resume`` detects by its checksum and drops.
Resuming replays exactly the same batches (same composition, same batch size),
so the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.core.invocation import command_args
from mavl_cli.core.limits import max_threads
from mavl_cli.core.runtime import resolve_device
from mavl_cli.core.threads import ThreadTuner
from mavl_cli.datasets.inputs import ImageItem
from mavl_cli.encoders import build_image_encoder
from mavl_cli.encoders.base import ImageEncoder
from mavl_cli.encoders.common import quantize_int8
from mavl_cli.encoders.fastpath import choose_pipeline, device_batches, maybe_compile
from mavl_cli.encoders.loader import (
    default_batch_size,
    default_workers,
    prefetch_batches,
)
from mavl_cli.encoders.preprocess import normalize_batch
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.io.checkpoint import (
    CheckpointLog,
    CheckpointState,
    flush_batches,
    read_checkpoint_header,
)
from mavl_cli.io.shards import shard_meta, shard_range
from mavl_cli.models.lrf import head_from_tensors

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class Interrupted(MavlError):
    """Ctrl-C during a run: the checkpoint is kept, and the message says how to resume."""

    exit_code = 130


@dataclass
class EmbedResult:
    features: np.ndarray
    ids: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: int = 0
    threads: int | None = None  # CPU forward threads finally preferred (None on GPU)

    @property
    def throughput(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("nan")


def inputs_fingerprint(items: list[ImageItem], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        # surrogateescape: file names need not be UTF-8 (their raw bytes are hashed)
        h.update(it.id.encode("utf-8", "surrogateescape") + b"\0" + os.fsencode(str(it.path)) + b"\n")
    return h.hexdigest()[:16]


def check_precision(precision: str, device_type: str) -> None:
    """Refuse precisions that do not make sense on the device instead of silently running fp32."""
    if precision not in PRECISIONS:
        raise MavlError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device_type != "cpu":
        raise MavlError("--precision int8 is for CPU inference (dynamic quantisation); on a GPU use fp16 or bf16")
    if precision in ("fp16", "bf16") and device_type == "cpu":
        raise MavlError(
            f"--precision {precision} needs a GPU: on CPUs without native half-precision units it is far slower "
            "than fp32 (bf16 about 250x here); use fp32, or int8 for faster CPU inference"
        )


def embed_images(
    items: list[ImageItem],
    backbone: Any,
    weights: str | None = None,
    pretrained: bool = True,
    model_args: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    skip_bad: bool = False,
    lrf: Any = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    advance: Callable[..., None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    pooling: str | None = None,
    preprocessing: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    shard: Any = None,
    pipeline: str = "auto",
    compile_model: bool = False,
) -> EmbedResult:
    """Embed ``items`` with an image encoder; see the module docstring.

    ``backbone``: an :class:`~mavl_cli.encoders.EncoderSpec`, a ``FAMILY:ID``
    string (with ``weights``/``pretrained``/``model_args``/``pooling``), or an
    already built :class:`~mavl_cli.encoders.base.ImageEncoder`.
    ``preprocessing``: a recorded recipe to use instead of the encoder's own
    (a model file rebuilding its encoder exactly).

    ``shard`` (:class:`mavl_cli.io.shards.Shard`): embed only that slice of
    ``items`` (whole batches, see :mod:`mavl_cli.io.shards`); the fingerprint
    stays the full list's and ``meta["shard"]`` says which slice this is.

    ``lrf``: an ``lrf-head`` MavlFile; when given, features are projected to
    its r-dim low-rank space (what the fusion uses) instead of raw pooled features.
    ``checkpoint_every``: batches between checkpoint appends (default 1, or the
    ``MAVL_CHECKPOINT_EVERY`` environment variable); appends are O(batch).
    On resume the batch size of the interrupted run is kept, so results match.
    ``threads``: CPU threads for the forward pass (default: tuned while running,
    see :class:`ThreadTuner`; or the ``MAVL_THREADS`` environment variable).
    ``pipeline`` (auto | threads | device) and ``compile_model``: see
    :mod:`mavl_cli.encoders.fastpath`; what was used is recorded in ``meta["pipeline"]``.
    """
    import torch


    if precision not in PRECISIONS:
        check_precision(precision, "cpu")  # fail on a typo before touching the device
    if not items:
        raise MavlError("no images to embed")
    dev = resolve_device(device)
    check_precision(precision, dev.type)
    env_threads = _env_threads()  # a bad MAVL_THREADS fails before the model is built
    every = max(1, int(checkpoint_every or os.environ.get("MAVL_CHECKPOINT_EVERY") or 1))
    if isinstance(backbone, ImageEncoder):
        model = backbone
    else:
        spec = backbone if isinstance(backbone, EncoderSpec) else EncoderSpec.parse(
            backbone, weights, pretrained=pretrained, pooling=pooling, options=model_args,
            trust_remote_code=trust_remote_code)
        model = build_image_encoder(spec)
    if preprocessing:
        model.preprocessing = dict(preprocessing)
    info = model.info
    head = None
    if lrf is not None:

        in_dim = int(lrf.tensors["proj.weight"].shape[1])
        if in_dim != info.dim:
            raise MavlError(f"{lrf.path}: LRF head expects {in_dim}-d features, but {info.name} gives {info.dim}-d")
        head = head_from_tensors(lrf.tensors).to(dev).eval()
    if precision == "int8":
        model = quantize_int8(model)
    model = model.to(dev)

    pipe = choose_pipeline(pipeline, dev, model, compile_model, info.data_config)
    if pipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    eager = model
    model = maybe_compile(model, pipe)
    dc = info.data_config
    settings = {"backbone": info.name, "weights": info.weights, "args": info.model_args, "precision": precision,
                "lrf": lrf.meta.get("fingerprint") if lrf else None, "preprocessing": info.data_config}
    if eager.spec.family != "timm" or eager.pooling != "default":  # timm-default runs keep their old fingerprints
        settings["encoder"] = {"spec": eager.spec.name, "pooling": eager.pooling, "preprocessing": dc}
    if pipe.kind != "threads":
        settings["pipeline"] = pipe.kind
    fp = inputs_fingerprint(items, settings)
    bs = batch_size or default_batch_size(dev.type)
    total = len(items)

    log: CheckpointLog | None = None
    done = CheckpointState()
    recorded: dict[str, Any] = {}
    if checkpoint is not None and resume and checkpoint.exists():
        recorded = read_checkpoint_header(checkpoint)
        bs = int(recorded.get("batch_size") or bs)
    autocast = None
    if precision in ("fp16", "bf16"):
        autocast = torch.autocast(dev.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    def forward(x: Any) -> Any:
        nonlocal model
        try:
            if autocast is not None:
                with autocast:
                    return model(x)
            return model(x)
        except Exception as exc:
            if model is eager:
                raise
            model = eager  # torch.compile failed on the first batch: run eager, and say so in the metadata
            pipe.compile = False
            pipe.notes.append(f"--compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); ran eager")
            return forward(x)

    tuner = None
    if dev.type == "cpu":
        tuner = ThreadTuner(threads or env_threads)
        with torch.inference_mode():
            forward(torch.zeros(1, *dc["input_size"]))  # warm-up: allocator, thread pool, kernel selection
            if recorded.get("threads"):
                tuner.fix(int(recorded["threads"]))  # the interrupted run's setting: identical features
            else:
                probe = torch.zeros(min(bs, 4), *dc["input_size"])
                tuner.calibrate(lambda: forward(probe))
    if shard is not None:

        lo, hi = shard_range(total, bs, shard)
        items = items[lo:hi]
    if checkpoint is not None:
        log_fp = fp if shard is None else f"{fp}:{shard}"
        log = CheckpointLog(checkpoint, {"fingerprint": log_fp, "batch_size": bs, "total": len(items),
                                         "threads": tuner.current if tuner else None}, resume)
        done = log.state
        check_resumed(done, items, head.proj.out_features if head is not None else info.dim, checkpoint)
    start = done.position
    feats_parts, ids, skipped = list(done.features), list(done.ids), list(done.skipped)
    if on_start:
        on_start(start, len(items))

    t0 = time.perf_counter()
    position = start
    buf: tuple[list[np.ndarray], list[str], list[dict[str, str]]] = ([], [], [])
    since = 0
    try:
        rest = items[start:]
        if pipe.kind == "device":
            source = device_batches([rest[i : i + bs] for i in range(0, len(rest), bs)], dc, _workers(workers, dev.type),
                                    dev, pipe)
        else:
            source = prefetch_batches(rest, dc, bs, _workers(workers, dev.type))

        with torch.inference_mode():
            for chunk, batch, ok, bad in source:
                if bad and not skip_bad:
                    first = bad[0]
                    kept = f"; add --resume to keep the {position} images already embedded" if log and position else ""
                    raise MavlError(f"{first['path']}: {first['reason']} (use --skip-bad to skip unreadable images{kept})",
                                    path=first["path"])
                f_np = np.zeros((0, 0), np.float32)
                if ok:
                    if tuner:
                        tuner.start()
                    x = batch if torch.is_tensor(batch) else normalize_batch(batch, dc, dev)
                    f = forward(x).float()
                    if head is not None:
                        f = head.embed(f)
                    f_np = f.cpu().numpy()
                    if tuner:
                        tuner.stop(len(ok))
                    feats_parts.append(f_np)
                new_ids = [chunk[i].id for i in ok]
                ids.extend(new_ids)
                skipped.extend(bad)
                position += len(chunk)
                if advance:
                    advance(len(chunk), skipped=len(skipped))
                if log is not None:
                    if len(f_np):
                        buf[0].append(f_np)
                    buf[1].extend(new_ids)
                    buf[2].extend(bad)
                    since += 1
                    if since >= every:
                        flush_batches(log, buf, position)
                        since = 0
    except KeyboardInterrupt:
        if log is not None:
            flush_batches(log, buf, position)
            log.close()
            if log.state.position == 0:
                checkpoint.unlink(missing_ok=True)
                raise
            raise Interrupted(f"interrupted after {position} of {len(items)} images; run the same command with --resume "
                              f"to continue from {checkpoint}") from None
        raise
    except BaseException:
        if log is not None:
            flush_batches(log, buf, position)
            log.close()
            if log.state.position == 0:  # nothing finished: no checkpoint to resume from
                checkpoint.unlink(missing_ok=True)
        raise
    finally:
        if tuner:
            tuner.restore()
    if log is not None:
        log.close()
    seconds = time.perf_counter() - t0
    dim = head.proj.out_features if head is not None else info.dim
    feats_parts = [p for p in feats_parts if len(p)]
    feats = np.concatenate(feats_parts, axis=0) if feats_parts else np.zeros((0, dim), np.float32)
    if feats.shape[0] == 0 and shard is None:
        raise MavlError("no image could be embedded (all skipped as unreadable)")
    meta = {
        **info.to_meta(),
        "ids": ids,
        "skipped": skipped,
        "precision": precision,
        "space": "lrf" if head is not None else "backbone",
        "feature_dim": int(feats.shape[1]),
        "inputs_fingerprint": fp,
        "batch_size": bs,
        "threads": tuner.current if tuner else None,  # features depend on it in the last bits; --resume reuses it
        "pipeline": pipe.to_meta(),
    }
    if lrf is not None:
        meta["lrf_fingerprint"] = lrf.meta.get("fingerprint")
        meta["labels"] = lrf.labels()
    if shard is not None:

        meta["shard"] = shard_meta(shard, lo, hi, total, fp, len(skipped), command_args())
    return EmbedResult(features=feats.astype(np.float32, copy=False), ids=ids, skipped=skipped, meta=meta,
                       seconds=seconds, resumed_from=start, threads=tuner.current if tuner else None)


def _env_threads() -> int | None:
    raw = os.environ.get("MAVL_THREADS") or ""
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= max_threads():
        raise MavlError(f"MAVL_THREADS={raw!r}: must be a whole number from 1 to {max_threads()} (the cores)")
    return int(raw)


def check_resumed(done: CheckpointState, items: list[ImageItem], dim: int, checkpoint: Path) -> None:
    """A checkpoint's records must be exactly this run's first images, batch by batch: the ids of
    ``items[:position]`` in order (embedded or skipped), one feature row per embedded id, this
    backbone's width. Checksums only prove a record is intact, not that it belongs to this run."""
    if not done.position and not done.ids and not done.skipped:
        return
    bad = lambda why: MavlError(f"{checkpoint}: {why}; this checkpoint does not belong to this run: delete it or drop --resume",  # noqa: E731
                                path=checkpoint)
    if not 0 < done.position <= len(items):
        raise bad(f"it records {done.position} images done of {len(items)}")
    expected = [it.id for it in items[: done.position]]
    skipped = [s.get("id") if isinstance(s, dict) else None for s in done.skipped]
    if sorted(map(str, done.ids + skipped)) != sorted(expected) or len(done.ids) + len(skipped) != len(expected):
        raise bad("its records name other images than this run's first ones")
    pos = {i: k for k, i in enumerate(expected)}
    order = [pos[i] for i in done.ids]
    if order != sorted(order):
        raise bad("its records are not in this run's order")
    rows = sum(int(f.shape[0]) for f in done.features)
    if rows != len(done.ids) or any(f.ndim != 2 or (f.shape[0] and f.shape[1] != dim) for f in done.features):
        raise bad(f"its feature rows do not match its {len(done.ids)} ids of {dim}-d features")


def _workers(workers: int | None, device_type: str) -> int:
    return default_workers(device_type) if workers is None else workers
