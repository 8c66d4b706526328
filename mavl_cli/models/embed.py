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
import torch

from mavl_cli.core.errors import MavlError
from mavl_cli.core.invocation import command_args
from mavl_cli.core.limits import max_threads
from mavl_cli.core.options import RunOptions
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


@dataclass(frozen=True)
class CheckpointOptions:
    """The resumable log of a run: its file (None: no checkpoint), whether to resume it, and the
    batches between appends (None: 1, or the ``MAVL_CHECKPOINT_EVERY`` environment variable)."""

    path: Path | None = None
    resume: bool = False
    every: int | None = None


@dataclass(frozen=True)
class EmbedHooks:
    """Progress callbacks: ``on_start(done, total)`` once before the first batch (``done`` > 0 when
    resuming), then ``advance(n, skipped=...)`` after every batch of ``n`` images."""

    advance: Callable[..., None] | None = None
    on_start: Callable[[int, int], None] | None = None


def embed_images(
    items: list[ImageItem],
    encoder: EncoderSpec | str | ImageEncoder,
    run: RunOptions | None = None,
    *,
    lrf: Any = None,
    shard: Any = None,
    checkpoint: CheckpointOptions | None = None,
    hooks: EmbedHooks | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> EmbedResult:
    """Embed ``items`` with an image encoder; see the module docstring.

    ``encoder``: an :class:`~mavl_cli.encoders.EncoderSpec`, a ``FAMILY:ID`` string, or an already
    built :class:`~mavl_cli.encoders.base.ImageEncoder`. ``run``: device, batch size, workers,
    precision, ``skip_bad``; ``threads`` for the CPU forward pass (default: tuned while running, see
    :class:`ThreadTuner`; or ``MAVL_THREADS``); ``pipeline``/``compile_model``: see
    :mod:`mavl_cli.encoders.fastpath` (what was used is recorded in ``meta["pipeline"]``).
    ``lrf``: an ``lrf-head`` MavlFile; features are projected to its r-dim low-rank space.
    ``shard`` (:class:`mavl_cli.io.shards.Shard`): embed only that slice of ``items`` (whole batches);
    the fingerprint stays the full list's and ``meta["shard"]`` says which slice this is.
    ``checkpoint``: see :class:`CheckpointOptions`; on resume the interrupted run's batch size and
    threads are kept, so results match. ``hooks``: see :class:`EmbedHooks`. ``preprocessing``: a
    recorded recipe to use instead of the encoder's own (a model file rebuilding its encoder exactly).
    """
    r, ck, hooks = run or RunOptions(), checkpoint or CheckpointOptions(), hooks or EmbedHooks()
    dev, env_threads = _check_run(items, r)
    every = max(1, int(ck.every or os.environ.get("MAVL_CHECKPOINT_EVERY") or 1))
    enc = _load_encoder(encoder, r, dev, lrf, preprocessing)
    fp = inputs_fingerprint(items, _fingerprint_settings(enc, r.precision, lrf))
    bs, recorded = _batch_size(r, ck, dev)
    forward = _Forward(enc, _autocast(r.precision, dev))
    tuner = _thread_tuner(forward, dev, enc.info.data_config["input_size"], bs, recorded, r.threads or env_threads)
    total = len(items)
    if shard is not None:
        lo, hi = shard_range(total, bs, shard)
        items = items[lo:hi]
    log = _open_log(ck, fp, shard, bs, items, tuner, enc.dim)
    loop = _BatchLoop(forward, enc, tuner, dev, log, every, r.skip_bad, hooks.advance)
    start = loop.position
    if hooks.on_start:
        hooks.on_start(start, len(items))
    t0 = time.perf_counter()
    _run_loop(loop, items[start:], bs, r.workers, len(items), ck.path)
    if log is not None:
        log.close()
    seconds = time.perf_counter() - t0
    feats = _stack(loop.features, enc.dim)
    if feats.shape[0] == 0 and shard is None:
        raise MavlError("no image could be embedded (all skipped as unreadable)")
    meta = _meta(enc, loop, r.precision, lrf, fp, bs, int(feats.shape[1]))
    if shard is not None:
        meta["shard"] = shard_meta(shard, lo, hi, total, fp, len(loop.skipped), command_args())
    return EmbedResult(features=feats.astype(np.float32, copy=False), ids=loop.ids, skipped=loop.skipped, meta=meta,
                       seconds=seconds, resumed_from=start, threads=tuner.current if tuner else None)


def _check_run(items: list[ImageItem], run: RunOptions) -> tuple[Any, int | None]:
    """Fail on a bad precision, no images or a bad ``MAVL_THREADS`` before any model is built; return
    the device and the ``MAVL_THREADS`` setting."""
    if run.precision not in PRECISIONS:
        check_precision(run.precision, "cpu")  # fail on a typo before touching the device
    if not items:
        raise MavlError("no images to embed")
    dev = resolve_device(run.device)
    check_precision(run.precision, dev.type)
    return dev, _env_threads()  # a bad MAVL_THREADS fails before the model is built


def _batch_size(run: RunOptions, ck: CheckpointOptions, dev: Any) -> tuple[int, dict[str, Any]]:
    """The batch size and, resuming, the interrupted run's checkpoint header (whose batch size is kept)."""
    bs = run.batch_size or default_batch_size(dev.type)
    recorded: dict[str, Any] = {}
    if ck.path is not None and ck.resume and ck.path.exists():
        recorded = read_checkpoint_header(ck.path)
        bs = int(recorded.get("batch_size") or bs)
    return bs, recorded


@dataclass
class _Encoder:
    """The encoder ready to run: the (maybe compiled) model, its eager original, the input pipeline,
    the encoder's info (taken before quantisation) and the LRF head, if any."""

    model: Any
    eager: Any
    pipe: Any
    info: Any
    head: Any = None

    @property
    def dim(self) -> int:
        """The width of the features this run writes (the LRF space's, or the backbone's)."""
        return self.head.proj.out_features if self.head is not None else self.info.dim


def _load_encoder(encoder: EncoderSpec | str | ImageEncoder, run: RunOptions, dev: Any, lrf: Any,
                  preprocessing: dict[str, Any] | None) -> _Encoder:
    """Build (or take) the encoder, check the LRF head fits it, then quantise, move and compile it for ``dev``."""

    if isinstance(encoder, ImageEncoder):
        model = encoder
    else:
        model = build_image_encoder(encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.parse(encoder))
    if preprocessing:
        model.preprocessing = dict(preprocessing)
    info = model.info
    head = None
    if lrf is not None:
        in_dim = int(lrf.tensors["proj.weight"].shape[1])
        if in_dim != info.dim:
            raise MavlError(f"{lrf.path}: LRF head expects {in_dim}-d features, but {info.name} gives {info.dim}-d")
        head = head_from_tensors(lrf.tensors).to(dev).eval()
    if run.precision == "int8":
        model = quantize_int8(model)
    model = model.to(dev)
    pipe = choose_pipeline(run.pipeline, dev, model, run.compile_model, info.data_config)
    if pipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return _Encoder(maybe_compile(model, pipe), model, pipe, info, head)


def _fingerprint_settings(enc: _Encoder, precision: str, lrf: Any) -> dict[str, Any]:
    """What the features depend on besides the images: hashed into the inputs fingerprint."""
    info, eager, dc = enc.info, enc.eager, enc.info.data_config
    settings = {"backbone": info.name, "weights": info.weights, "args": info.model_args, "precision": precision,
                "lrf": lrf.meta.get("fingerprint") if lrf else None, "preprocessing": info.data_config}
    if eager.spec.family != "timm" or eager.pooling != "default":  # timm-default runs keep their old fingerprints
        settings["encoder"] = {"spec": eager.spec.name, "pooling": eager.pooling, "preprocessing": dc}
    if enc.pipe.kind != "threads":
        settings["pipeline"] = enc.pipe.kind
    return settings


def _autocast(precision: str, dev: Any) -> Any:

    if precision in ("fp16", "bf16"):
        return torch.autocast(dev.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return None


class _Forward:
    """The encoder's forward pass under the run's autocast; if torch.compile fails on the first
    batch it runs eager from then on, and says so in the pipeline's metadata."""

    def __init__(self, enc: _Encoder, autocast: Any) -> None:
        self.model, self.eager, self.pipe, self.autocast = enc.model, enc.eager, enc.pipe, autocast

    def __call__(self, x: Any) -> Any:
        try:
            if self.autocast is not None:
                with self.autocast:
                    return self.model(x)
            return self.model(x)
        except Exception as exc:
            if self.model is self.eager:
                raise
            self.model = self.eager
            self.pipe.compile = False
            self.pipe.notes.append(f"--compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); ran eager")
            return self(x)


def _thread_tuner(forward: _Forward, dev: Any, input_size: Any, bs: int, recorded: dict[str, Any],
                  threads: int | None) -> ThreadTuner | None:
    """On a CPU: warm up, then keep the interrupted run's thread count or calibrate one (None on a GPU)."""

    if dev.type != "cpu":
        return None
    tuner = ThreadTuner(threads)
    with torch.inference_mode():
        forward(torch.zeros(1, *input_size))  # warm-up: allocator, thread pool, kernel selection
        if recorded.get("threads"):
            tuner.fix(int(recorded["threads"]))  # the interrupted run's setting: identical features
        else:
            probe = torch.zeros(min(bs, 4), *input_size)
            tuner.calibrate(lambda: forward(probe))
    return tuner


def _open_log(ck: CheckpointOptions, fp: str, shard: Any, bs: int, items: list[ImageItem],
              tuner: ThreadTuner | None, dim: int) -> CheckpointLog | None:
    """Open (or, resuming, reopen and check) the checkpoint log of this run's ``items``; None without one."""
    if ck.path is None:
        return None
    log_fp = fp if shard is None else f"{fp}:{shard}"
    log = CheckpointLog(ck.path, {"fingerprint": log_fp, "batch_size": bs, "total": len(items),
                                  "threads": tuner.current if tuner else None}, ck.resume)
    check_resumed(log.state, items, dim, ck.path)
    return log


class _BatchLoop:
    """The forward pass over decoded batches: gathers features, ids and skipped images (after those
    a resumed checkpoint holds), reports progress and appends to the log every ``every`` batches."""

    def __init__(self, forward: _Forward, enc: _Encoder, tuner: ThreadTuner | None, dev: Any,
                 log: CheckpointLog | None, every: int, skip_bad: bool, advance: Callable[..., None] | None) -> None:
        self.forward, self.head, self.pipe, self.dc, self.dev = forward, enc.head, enc.pipe, enc.info.data_config, dev
        self.tuner, self.log, self.every, self.skip_bad, self.advance = tuner, log, every, skip_bad, advance
        done = log.state if log is not None else CheckpointState()
        self.position = done.position
        self.features, self.ids, self.skipped = list(done.features), list(done.ids), list(done.skipped)
        self.buf: tuple[list[np.ndarray], list[str], list[dict[str, str]]] = ([], [], [])
        self.since = 0

    def run(self, source: Any) -> None:

        with torch.inference_mode():
            for chunk, batch, ok, bad in source:
                if bad and not self.skip_bad:
                    first = bad[0]
                    kept = f"; add --resume to keep the {self.position} images already embedded" if self.log and self.position else ""
                    raise MavlError(f"{first['path']}: {first['reason']} (use --skip-bad to skip unreadable images{kept})",
                                    path=first["path"])
                f_np = np.zeros((0, 0), np.float32)
                if ok:
                    f_np = self._embed(batch, len(ok))
                    self.features.append(f_np)
                new_ids = [chunk[i].id for i in ok]
                self.ids.extend(new_ids)
                self.skipped.extend(bad)
                self.position += len(chunk)
                if self.advance:
                    self.advance(len(chunk), skipped=len(self.skipped))
                if self.log is not None:
                    self._record(f_np, new_ids, bad)

    def _embed(self, batch: Any, n: int) -> np.ndarray:

        if self.tuner:
            self.tuner.start()
        x = batch if torch.is_tensor(batch) else normalize_batch(batch, self.dc, self.dev)
        f = self.forward(x).float()
        if self.head is not None:
            f = self.head.embed(f)
        f_np = f.cpu().numpy()
        if self.tuner:
            self.tuner.stop(n)
        return f_np

    def _record(self, f_np: np.ndarray, new_ids: list[str], bad: list[dict[str, str]]) -> None:
        if len(f_np):
            self.buf[0].append(f_np)
        self.buf[1].extend(new_ids)
        self.buf[2].extend(bad)
        self.since += 1
        if self.since >= self.every:
            flush_batches(self.log, self.buf, self.position)
            self.since = 0

    def abandon(self, checkpoint: Path) -> bool:
        """Flush what finished and close the log; True when nothing had (its file is removed)."""
        flush_batches(self.log, self.buf, self.position)
        self.log.close()
        if self.log.state.position == 0:  # nothing finished: no checkpoint to resume from
            checkpoint.unlink(missing_ok=True)
            return True
        return False


def _run_loop(loop: _BatchLoop, rest: list[ImageItem], bs: int, workers: int | None, n_items: int,
              checkpoint: Path | None) -> None:
    """Run ``loop`` over ``rest``; on any failure keep what finished in the checkpoint (an empty one is
    removed), and turn Ctrl-C into :class:`Interrupted` saying how to resume."""
    try:
        if loop.pipe.kind == "device":
            source = device_batches([rest[i : i + bs] for i in range(0, len(rest), bs)], loop.dc,
                                    _workers(workers, loop.dev.type), loop.dev, loop.pipe)
        else:
            source = prefetch_batches(rest, loop.dc, bs, _workers(workers, loop.dev.type))
        loop.run(source)
    except KeyboardInterrupt:
        if loop.log is not None and not loop.abandon(checkpoint):
            raise Interrupted(f"interrupted after {loop.position} of {n_items} images; run the same command with --resume "
                              f"to continue from {checkpoint}") from None
        raise
    except BaseException:
        if loop.log is not None:
            loop.abandon(checkpoint)
        raise
    finally:
        if loop.tuner:
            loop.tuner.restore()


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), np.float32)


def _meta(enc: _Encoder, loop: _BatchLoop, precision: str, lrf: Any, fp: str, bs: int, feature_dim: int) -> dict[str, Any]:
    """The embeddings file's metadata (``meta["shard"]`` is added by the caller for a shard)."""
    meta = {
        **enc.info.to_meta(),
        "ids": loop.ids,
        "skipped": loop.skipped,
        "precision": precision,
        "space": "lrf" if enc.head is not None else "backbone",
        "feature_dim": feature_dim,
        "inputs_fingerprint": fp,
        "batch_size": bs,
        "threads": loop.tuner.current if loop.tuner else None,  # features depend on it in the last bits; --resume reuses it
        "pipeline": enc.pipe.to_meta(),
    }
    if lrf is not None:
        meta["lrf_fingerprint"] = lrf.meta.get("fingerprint")
        meta["labels"] = lrf.labels()
    return meta


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
