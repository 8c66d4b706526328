"""The image loader that embed-images and predict share: decoding batches on worker threads ahead of
the forward pass, and the default worker count and batch size per device.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.inputs import ImageItem
from mavl_cli.encoders.preprocess import load_and_prepare, stack_batch


def _decode_batch(items: list[ImageItem], data_config: dict[str, Any]) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    arrays, ok, bad = [], [], []
    for i, it in enumerate(items):
        try:
            arrays.append(load_and_prepare(it.path, data_config))
            ok.append(i)
        except MavlError as exc:
            bad.append({"id": it.id, "path": str(it.path), "reason": strip_path(str(exc), it.path)})
        except Exception as exc:  # decoder bugs on exotic files must not kill a long run silently
            bad.append({"id": it.id, "path": str(it.path), "reason": f"{type(exc).__name__}: {exc}"})
    return stack_batch(arrays), ok, bad


def strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    while message.startswith(prefix):
        message = message[len(prefix):]
    return message.rstrip(".")


def prefetch_batches(
    items: list[ImageItem], data_config: dict[str, Any], batch_size: int, workers: int, ahead: int = 2
) -> Iterator[tuple[list[ImageItem], np.ndarray, list[int], list[dict[str, str]]]]:
    """Decode batches in ``workers`` threads, ``workers + ahead`` batches in flight, yielded in order."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    yield from prefetch_chunks(chunks, data_config, workers, ahead)


def prefetch_chunks(
    chunks: list[list[ImageItem]], data_config: dict[str, Any], workers: int, ahead: int = 2
) -> Iterator[tuple[list[ImageItem], np.ndarray, list[int], list[dict[str, str]]]]:
    """:func:`prefetch_batches` for batches already cut (of any sizes, e.g. one rank's slices)."""
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
