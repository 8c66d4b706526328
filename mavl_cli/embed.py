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
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mavl_cli.checkpoint import CheckpointLog, CheckpointState, flush_batches, read_checkpoint_header
from mavl_cli.errors import MavlError
from mavl_cli.threads import ThreadTuner

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_GLOB_CHARS = "*?["


class Interrupted(MavlError):
    """Ctrl-C during a run: the checkpoint is kept, and the message says how to resume."""

    exit_code = 130


@dataclass
class ImageItem:
    id: str
    path: Path


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


# ----------------------------------------------------------------------------- inputs


def _rel_id(path: Path, base: Path | None) -> str:
    from mavl_cli.labels import normalize_id

    if base is not None:
        try:
            return normalize_id(path.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            pass
    try:
        return normalize_id(path.resolve().relative_to(Path.cwd().resolve()).as_posix())
    except ValueError:
        return normalize_id(path.as_posix())


def collect_inputs(
    inputs: list[str],
    labels_csv: str | Path | None = None,
    root: str | Path | None = None,
    path_column: str | None = None,
    stdin_lines: Iterable[str] | None = None,
) -> tuple[list[ImageItem], list[dict[str, str]]]:
    """Resolve what to embed: folders, globs, files, a labels CSV's path column, or stdin ids.

    With ``labels_csv`` the CSV's rows define the list (in file order) and a
    single folder argument (or ``root``) is where their paths are resolved;
    otherwise folders are walked recursively and ids are paths relative to
    the folder given. With ``root`` and no CSV, relative paths and ids (e.g.
    read from stdin) are looked up under ``root``, and entries not found there
    are returned as missing rather than stopping the run. Returns (items,
    missing) where missing lists entries whose file does not exist.
    """
    from mavl_cli.labels import read_labels

    if "-" in inputs:
        lines = [ln.strip() for ln in (stdin_lines if stdin_lines is not None else sys.stdin) if ln.strip()]
        inputs = [x for x in inputs if x != "-"] + lines
        if not inputs:
            raise MavlError("-: no image paths arrived on standard input")
    if labels_csv is not None:
        table = read_labels(labels_csv, path_column=path_column)
        if root is None:
            folders = [Path(x) for x in inputs if Path(x).is_dir()]
            if len(inputs) > 1 or (inputs and not folders):
                raise MavlError("with --labels, give at most one image folder (the root the CSV's paths are relative to)")
            root = folders[0] if folders else Path(labels_csv).parent
        base = Path(root)
        if not base.is_dir():
            raise MavlError(f"{base}: image root folder not found", path=base)
        items, missing = [], []
        unresolved: list[tuple[str, str]] = []
        for raw, nid in zip(table.paths, table.ids):
            found = _resolve(base, raw, nid)
            if found is None:
                unresolved.append((raw, nid))
            else:
                items.append(ImageItem(nid, found))
        if unresolved:
            # NIH ships its images in images_001/images/ ... images_012/images/ while its CSV names only
            # files: find such rows by file name anywhere under the root (only when the name is unique).
            index = _name_index(base)
            for raw, nid in unresolved:
                hit = index.get(Path(nid).name)
                if hit is None:
                    missing.append({"id": nid, "reason": "file not found"})
                elif hit == _AMBIGUOUS:
                    missing.append({"id": nid, "reason": "file name found more than once under the root; give its relative path"})
                else:
                    items.append(ImageItem(nid, hit))
            order = {nid: i for i, nid in enumerate(table.ids)}
            items.sort(key=lambda it: order[it.id])
        return items, missing
    if root is not None:
        return _collect_under_root(inputs, Path(root))
    if not inputs:
        raise MavlError("no images given: pass folders, files or globs, or --labels CSV with a path column")
    from mavl_cli.imageio import list_images

    items = []
    for inp in inputs:
        p = Path(inp)
        base = p if p.is_dir() else None
        for f in list_images([inp]):
            items.append(ImageItem(_rel_id(f, base), f))
    return _unique(items), []


def _collect_under_root(inputs: list[str], base: Path) -> tuple[list[ImageItem], list[dict[str, str]]]:
    """Inputs relative to an image root (``--root`` without ``--labels``); ids are relative to it."""
    from mavl_cli.imageio import list_images
    from mavl_cli.labels import normalize_id

    if not base.is_dir():
        raise MavlError(f"{base}: image root folder not found", path=base)
    items, missing = [], []
    for inp in inputs or [str(base)]:
        p = Path(inp)
        if any(ch in inp for ch in _GLOB_CHARS) and not p.exists():
            pattern = inp if p.is_absolute() else str(base / inp)
            items.extend(ImageItem(_rel_id(f, base), f) for f in list_images([pattern]))
            continue
        found = p if (p.is_absolute() and p.exists()) else _resolve_any(base, inp, normalize_id(inp))
        if found is None and p.exists():
            found = p
        if found is None:
            missing.append({"id": normalize_id(inp), "reason": "file not found"})
        elif found.is_dir():
            items.extend(ImageItem(_rel_id(f, base), f) for f in list_images([str(found)]))
        else:
            items.append(ImageItem(_rel_id(found, base), found))
    return _unique(items), missing


_AMBIGUOUS = Path("\0ambiguous")


def _name_index(base: Path) -> dict[str, Path]:
    """File name -> path for every image under ``base`` (names found twice map to a marker)."""
    import os

    from mavl_cli.imageio import IMAGE_SUFFIXES

    index: dict[str, Path] = {}
    for folder, _dirs, files in os.walk(base, followlinks=True):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                index[name] = _AMBIGUOUS if name in index else Path(folder) / name
    return index


def _unique(items: list[ImageItem]) -> list[ImageItem]:
    seen: dict[str, Path] = {}
    for it in items:
        if it.id in seen and seen[it.id] != it.path:
            raise MavlError(f"two images share the id {it.id!r} ({seen[it.id]} and {it.path}); embed them separately")
        seen[it.id] = it.path
    return list({it.id: it for it in items}.values())


def _candidates(base: Path, raw: str, nid: str) -> list[Path]:
    cands = [base / raw, base / nid]
    parts = Path(nid).parts
    for k in range(1, min(3, len(parts))):
        cands.append(base / Path(*parts[k:]))
    if Path(raw).is_absolute():
        cands.insert(0, Path(raw))
    return cands


def _resolve(base: Path, raw: str, nid: str) -> Path | None:
    return next((c for c in _candidates(base, raw, nid) if c.is_file()), None)


def _resolve_any(base: Path, raw: str, nid: str) -> Path | None:
    return next((c for c in _candidates(base, raw, nid) if c.exists()), None)


def inputs_fingerprint(items: list[ImageItem], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(it.id.encode() + b"\0" + str(it.path).encode() + b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- decoding pipeline


def _decode_batch(items: list[ImageItem], data_config: dict[str, Any]) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    from mavl_cli.preprocess import load_and_prepare, stack_batch

    arrays, ok, bad = [], [], []
    for i, it in enumerate(items):
        try:
            arrays.append(load_and_prepare(it.path, data_config))
            ok.append(i)
        except MavlError as exc:
            bad.append({"id": it.id, "path": str(it.path), "reason": _strip_path(str(exc), it.path)})
        except Exception as exc:  # decoder bugs on exotic files must not kill a long run silently
            bad.append({"id": it.id, "path": str(it.path), "reason": f"{type(exc).__name__}: {exc}"})
    return stack_batch(arrays), ok, bad


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    while message.startswith(prefix):
        message = message[len(prefix):]
    return message.rstrip(".")


def prefetch_batches(
    items: list[ImageItem], data_config: dict[str, Any], batch_size: int, workers: int, ahead: int = 2
) -> Iterator[tuple[list[ImageItem], np.ndarray, list[int], list[dict[str, str]]]]:
    """Decode batches in ``workers`` threads, ``workers + ahead`` batches in flight, yielded in order."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if workers <= 0:
        for ch in chunks:
            yield (ch, *_decode_batch(ch, data_config))
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mavl-decode")
    try:
        pending: list[tuple[list[ImageItem], Future]] = []
        it = iter(chunks)
        for ch in it:
            pending.append((ch, pool.submit(_decode_batch, ch, data_config)))
            if len(pending) >= ahead + workers:
                break
        while pending:
            ch, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode_batch, nxt, data_config)))
            yield (ch, *fut.result())
    finally:
        # on an error or Ctrl-C, drop queued batches instead of decoding them first
        pool.shutdown(wait=False, cancel_futures=True)


def default_workers(device_type: str = "cpu") -> int:
    """Decoder threads: half the cores (at most 4), leaving the rest to the forward pass."""
    n = os.cpu_count() or 1
    return max(1, min(4, n // 2)) if device_type == "cpu" else max(1, min(8, n - 1))


def default_batch_size(device_type: str) -> int:
    """16 on CPU (larger batches do not raise CPU throughput); 128 on GPUs."""
    return 16 if device_type == "cpu" else 128


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


# ----------------------------------------------------------------------------- the run


def embed_images(
    items: list[ImageItem],
    backbone: str,
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
) -> EmbedResult:
    """Embed ``items`` with a timm backbone; see the module docstring.

    ``lrf``: an ``lrf-head`` MavlFile; when given, features are projected to
    its r-dim low-rank space (what the fusion uses) instead of raw pooled features.
    ``checkpoint_every``: batches between checkpoint appends (default 1, or the
    ``MAVL_CHECKPOINT_EVERY`` environment variable); appends are O(batch).
    On resume the batch size of the interrupted run is kept, so results match.
    ``threads``: CPU threads for the forward pass (default: tuned while running,
    see :class:`ThreadTuner`; or the ``MAVL_THREADS`` environment variable).
    """
    import torch

    from mavl_cli.models.backbone import create_backbone, quantize_int8
    from mavl_cli.preprocess import normalize_batch
    from mavl_cli.runtime import resolve_device

    if precision not in PRECISIONS:
        check_precision(precision, "cpu")  # fail on a typo before touching the device
    if not items:
        raise MavlError("no images to embed")
    dev = resolve_device(device)
    check_precision(precision, dev.type)
    every = max(1, int(checkpoint_every or os.environ.get("MAVL_CHECKPOINT_EVERY") or 1))
    model, info = create_backbone(backbone, weights=weights, pretrained=pretrained, model_args=model_args)
    head = None
    if lrf is not None:
        from mavl_cli.models.lrf import head_from_tensors

        in_dim = int(lrf.tensors["proj.weight"].shape[1])
        if in_dim != info.dim:
            raise MavlError(f"{lrf.path}: LRF head expects {in_dim}-d features, but {info.name} gives {info.dim}-d")
        head = head_from_tensors(lrf.tensors).to(dev).eval()
    if precision == "int8":
        model = quantize_int8(model)
    model = model.to(dev)
    dc = info.data_config
    settings = {"backbone": info.name, "weights": info.weights, "args": info.model_args, "precision": precision,
                "lrf": lrf.meta.get("fingerprint") if lrf else None}
    fp = inputs_fingerprint(items, settings)
    bs = batch_size or default_batch_size(dev.type)

    log: CheckpointLog | None = None
    done = CheckpointState()
    if checkpoint is not None:
        if resume and checkpoint.exists():
            bs = int(read_checkpoint_header(checkpoint).get("batch_size") or bs)
        log = CheckpointLog(checkpoint, {"fingerprint": fp, "batch_size": bs, "total": len(items)}, resume)
        done = log.state
    start = done.position
    feats_parts, ids, skipped = list(done.features), list(done.ids), list(done.skipped)
    if on_start:
        on_start(start, len(items))

    autocast = None
    if precision in ("fp16", "bf16"):
        autocast = torch.autocast(dev.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    tuner = None
    if dev.type == "cpu":
        tuner = ThreadTuner(threads or int(os.environ.get("MAVL_THREADS") or 0) or None)
        with torch.inference_mode():
            model(torch.zeros(1, *dc["input_size"]))  # warm-up: allocator, thread pool, kernel selection
    t0 = time.perf_counter()
    position = start
    buf: tuple[list[np.ndarray], list[str], list[dict[str, str]]] = ([], [], [])
    since = 0
    try:
        with torch.inference_mode():
            for chunk, batch, ok, bad in prefetch_batches(items[start:], dc, bs, _workers(workers, dev.type)):
                if bad and not skip_bad:
                    first = bad[0]
                    kept = f"; add --resume to keep the {position} images already embedded" if log and position else ""
                    raise MavlError(f"{first['path']}: {first['reason']} (use --skip-bad to skip unreadable images{kept})",
                                    path=first["path"])
                f_np = np.zeros((0, 0), np.float32)
                if ok:
                    if tuner:
                        tuner.start()
                    x = normalize_batch(batch, dc, dev)
                    if autocast is not None:
                        with autocast:
                            f = model(x)
                    else:
                        f = model(x)
                    f = f.float()
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
    if feats.shape[0] == 0:
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
    }
    if lrf is not None:
        meta["lrf_fingerprint"] = lrf.meta.get("fingerprint")
        meta["labels"] = lrf.labels()
    return EmbedResult(features=feats.astype(np.float32, copy=False), ids=ids, skipped=skipped, meta=meta,
                       seconds=seconds, resumed_from=start, threads=tuner.best() if tuner else None)


def _workers(workers: int | None, device_type: str) -> int:
    return default_workers(device_type) if workers is None else workers
