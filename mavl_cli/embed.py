"""`embed-images`: radiographs -> pooled backbone features, fast and resumable.

Decoding runs in a thread pool a few batches ahead of the forward pass (PIL
releases the GIL while decoding and resizing), so the CPU or GPU is never
waiting for JPEG decode. Finished batches are checkpointed to
``OUT.partial`` so ``--resume`` continues after a crash with an identical
result.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mavl_cli.errors import MavlError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


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

    @property
    def throughput(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("nan")


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
    the folder given. Returns (items, missing) where missing lists CSV rows
    whose file does not exist.
    """
    from mavl_cli.imageio import list_images
    from mavl_cli.labels import normalize_id, read_labels

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
        for raw, nid in zip(table.paths, table.ids):
            found = _resolve(base, raw, nid)
            if found is None:
                missing.append({"id": nid, "reason": "file not found"})
            else:
                items.append(ImageItem(nid, found))
        return items, missing
    if not inputs:
        raise MavlError("no images given: pass folders, files or globs, or --labels CSV with a path column")
    items = []
    for inp in inputs:
        p = Path(inp)
        base = p if p.is_dir() else None
        for f in list_images([inp]):
            items.append(ImageItem(_rel_id(f, base), f))
    seen: dict[str, Path] = {}
    for it in items:
        if it.id in seen and seen[it.id] != it.path:
            raise MavlError(f"two images share the id {it.id!r} ({seen[it.id]} and {it.path}); embed them separately")
        seen[it.id] = it.path
    unique = list({it.id: it for it in items}.values())
    return unique, []


def _resolve(base: Path, raw: str, nid: str) -> Path | None:
    cands = [base / raw, base / nid]
    parts = Path(nid).parts
    for k in range(1, min(3, len(parts))):
        cands.append(base / Path(*parts[k:]))
    p = Path(raw)
    if p.is_absolute():
        cands.insert(0, p)
    for c in cands:
        if c.is_file():
            return c
    return None


def inputs_fingerprint(items: list[ImageItem], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(it.id.encode() + b"\0" + str(it.path).encode() + b"\n")
    return h.hexdigest()[:16]


def _decode_batch(items: list[ImageItem], data_config: dict[str, Any]) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    from mavl_cli.preprocess import load_and_prepare

    arrays, ok, bad = [], [], []
    for i, it in enumerate(items):
        try:
            arrays.append(load_and_prepare(it.path, data_config))
            ok.append(i)
        except MavlError as exc:
            bad.append({"id": it.id, "path": str(it.path), "reason": str(exc)})
        except Exception as exc:  # decoder bugs on exotic files must not kill a long run silently
            bad.append({"id": it.id, "path": str(it.path), "reason": f"{type(exc).__name__}: {exc}"})
    batch = np.stack(arrays) if arrays else np.zeros((0,), dtype=np.uint8)
    return batch, ok, bad


def prefetch_batches(
    items: list[ImageItem], data_config: dict[str, Any], batch_size: int, workers: int, ahead: int = 3
) -> Iterator[tuple[list[ImageItem], np.ndarray, list[int], list[dict[str, str]]]]:
    """Decode batches in ``workers`` threads, ``ahead`` batches in flight, yielded in order."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if workers <= 0:
        for ch in chunks:
            yield (ch, *_decode_batch(ch, data_config))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
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


def _threads_split(workers: int | None) -> int:
    import os

    n = os.cpu_count() or 1
    return max(1, min(4, n // 2)) if workers is None else workers


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
    checkpoint_every: int = 20,
    advance: Callable[..., None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> EmbedResult:
    """Embed ``items`` with a timm backbone; see the module docstring.

    ``lrf``: an ``lrf-head`` MavlFile; when given, features are projected to
    its r-dim low-rank space (what the fusion uses) instead of raw pooled features.
    """
    import torch

    from mavl_cli import contract
    from mavl_cli.models.backbone import create_backbone, quantize_int8
    from mavl_cli.preprocess import normalize_batch
    from mavl_cli.runtime import resolve_device

    if precision not in PRECISIONS:
        raise MavlError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if not items:
        raise MavlError("no images to embed")
    dev = resolve_device(device)
    if precision == "int8" and dev.type != "cpu":
        raise MavlError("--precision int8 is for CPU inference; on GPU use fp16 or bf16")
    model, info = create_backbone(backbone, weights=weights, pretrained=pretrained, model_args=model_args)
    head = None
    if lrf is not None:
        from mavl_cli.models.lrf import head_from_tensors

        in_dim = int(lrf.tensors["proj.weight"].shape[1])
        if in_dim != info.dim:
            raise MavlError(f"{lrf.path}: LRF head expects {in_dim}-d features, but {info.name} gives {info.dim}-d")
        head = head_from_tensors(lrf.tensors).to(dev)
    if precision == "int8":
        model = quantize_int8(model)
    model = model.to(dev)
    if dev.type == "cpu" and precision == "fp32":
        model = model.to(memory_format=torch.channels_last)
    bs = batch_size or (64 if dev.type == "cuda" else 16)
    dc = info.data_config
    settings = {"backbone": info.name, "weights": info.weights, "precision": precision, "lrf": lrf.meta.get("fingerprint") if lrf else None}
    fp = inputs_fingerprint(items, settings)

    done_feats: list[np.ndarray] = []
    done_ids: list[str] = []
    skipped: list[dict[str, str]] = []
    start = 0
    if checkpoint is not None and resume and checkpoint.exists():
        ck = contract.read_file(checkpoint, expect="image-embeddings")
        if ck.meta.get("inputs_fingerprint") != fp:
            raise MavlError(f"{checkpoint}: checkpoint is from a different image list or settings; delete it or drop --resume")
        done_feats = [ck.tensors["features"]]
        done_ids = ck.ids()
        skipped = list(ck.meta.get("skipped") or [])
        start = int(ck.meta.get("position", 0))
    if on_start:
        on_start(start, len(items))

    autocast = None
    if precision in ("fp16", "bf16") and dev.type != "cpu":
        autocast = torch.autocast(dev.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    t0 = time.perf_counter()
    position = start
    since_ck = 0
    with torch.inference_mode():
        for chunk, batch, ok, bad in prefetch_batches(items[start:], dc, bs, _threads_split(workers)):
            if bad and not skip_bad:
                first = bad[0]
                raise MavlError(f"{first['path']}: {first['reason'].split(': ', 1)[-1]} (use --skip-bad to skip unreadable images)", path=first["path"])
            skipped.extend(bad)
            if len(ok):
                x = normalize_batch(batch, dc, dev)
                if autocast is not None:
                    with autocast:
                        f = model(x)
                else:
                    f = model(x.contiguous(memory_format=torch.channels_last) if dev.type == "cpu" else x)
                f = f.float()
                if head is not None:
                    f = head.embed(f)
                done_feats.append(f.cpu().numpy())
                done_ids.extend(chunk[i].id for i in ok)
            position += len(chunk)
            since_ck += 1
            if advance:
                advance(len(chunk), skipped=len(skipped))
            if checkpoint is not None and since_ck >= checkpoint_every and position < len(items):
                _write_checkpoint(checkpoint, done_feats, done_ids, skipped, position, fp)
                since_ck = 0
    seconds = time.perf_counter() - t0
    dim = (head.proj.out_features if head is not None else info.dim)
    feats = np.concatenate(done_feats, axis=0) if done_feats else np.zeros((0, dim), np.float32)
    if feats.shape[0] == 0:
        raise MavlError("no image could be embedded (all skipped as unreadable)")
    meta = {
        **info.to_meta(),
        "ids": done_ids,
        "skipped": skipped,
        "precision": precision,
        "space": "lrf" if head is not None else "backbone",
        "feature_dim": int(feats.shape[1]),
        "inputs_fingerprint": fp,
    }
    if lrf is not None:
        meta["lrf_fingerprint"] = lrf.meta.get("fingerprint")
        meta["labels"] = lrf.labels()
    return EmbedResult(features=feats.astype(np.float32), ids=done_ids, skipped=skipped, meta=meta, seconds=seconds)


def _write_checkpoint(path: Path, feats: list[np.ndarray], ids: list[str], skipped: list[dict[str, str]], position: int, fp: str) -> None:
    from mavl_cli import contract

    arr = np.concatenate(feats, axis=0) if feats else np.zeros((0, 1), np.float32)
    feats[:] = [arr]
    contract.write_file(
        path,
        "image-embeddings",
        {"features": arr},
        {"ids": list(ids), "skipped": skipped, "position": position, "inputs_fingerprint": fp, "partial": True},
    )
