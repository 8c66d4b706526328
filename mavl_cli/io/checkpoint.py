"""The append-only checkpoint log behind `embed-images --resume`.

Every finished batch is one record (ids, skipped images, float32 rows) with a
CRC32, appended and flushed: O(batch) per write, so a 224k-image run never
rewrites a growing file. A process killed mid-write leaves at most one torn
record, which :func:`read_checkpoint` detects by its checksum and drops.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_BATCH, max_threads
from mavl_cli.io.files import check_input_file

_MAGIC = b"MAVLPART1\n"
_REC = b"REC1"
_REC_HEAD = struct.Struct("<4sIQ")  # tag, meta length, data length


@dataclass
class CheckpointState:
    features: list[np.ndarray] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    position: int = 0
    header: dict[str, Any] = field(default_factory=dict)


class CheckpointLog:
    """Append-only log of finished batches (see the module docstring).

    ``append`` writes one record and flushes it to the OS (survives a killed
    process); ``fsync`` runs at most every ``sync_seconds`` (survives a power
    cut up to that many seconds back).
    """

    def __init__(self, path: Path, header: dict[str, Any], resume: bool, sync_seconds: float = 30.0) -> None:
        self.path = Path(path)
        self.sync_seconds = sync_seconds
        self.state = CheckpointState(header=header)
        if resume and self.path.exists():
            self.state, good_end = read_checkpoint(self.path)
            if self.state.header.get("fingerprint") != header.get("fingerprint"):
                raise MavlError(
                    f"{self.path}: this checkpoint is from a different image list, model or precision; "
                    "delete it or drop --resume", path=self.path)
            self._fh: BinaryIO = open(self.path, "r+b")
            self._fh.truncate(good_end)  # drop a torn last record
            self._fh.seek(good_end)
        else:
            blob = json.dumps(header, sort_keys=True).encode()
            self._fh = open(self.path, "wb")
            self._fh.write(_MAGIC + struct.pack("<I", len(blob)) + blob)
            self._fh.flush()
        self._last_sync = time.monotonic()

    def append(self, features: np.ndarray, ids: list[str], skipped: list[dict[str, str]], position: int) -> None:
        feats = np.ascontiguousarray(features, dtype="<f4")
        meta = json.dumps({"ids": ids, "skipped": skipped, "position": position, "shape": list(feats.shape)}).encode()
        data = feats.tobytes()
        crc = zlib.crc32(data, zlib.crc32(meta))
        self._fh.write(_REC_HEAD.pack(_REC, len(meta), len(data)) + meta + data + struct.pack("<I", crc))
        self._fh.flush()
        if time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self._fh.fileno())
        except OSError:
            pass
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


_MAX_HEADER = 1 << 20


def _read_header(fh: BinaryIO, path: Path) -> dict[str, Any]:
    bad = MavlError(f"{path}: not a mavl embed-images checkpoint (or damaged at the start); delete it and start again", path=path)
    head = fh.read(len(_MAGIC) + 4)
    if len(head) < len(_MAGIC) + 4 or not head.startswith(_MAGIC):
        raise bad
    (hlen,) = struct.unpack_from("<I", head, len(_MAGIC))
    if hlen > _MAX_HEADER:
        raise bad
    try:
        header = json.loads(fh.read(hlen))
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    bs, threads = header.get("batch_size"), header.get("threads")
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or not 1 <= bs <= MAX_BATCH):
        raise bad
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= max_threads()):
        raise MavlError(f"{path}: recorded {threads!r} CPU threads, but this machine has {max_threads()} cores; "
                        "delete the checkpoint or finish the run on the machine that started it", path=path)
    return header


def _open(path: Path) -> BinaryIO:
    check_input_file(path, "an embed-images checkpoint (OUTPUT.partial)")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise MavlError(f"{path}: cannot read checkpoint ({exc.strerror or exc})", path=path) from None


def read_checkpoint_header(path: Path) -> dict[str, Any]:
    """The run settings a checkpoint was written with (fingerprint, batch size, threads), without its records."""
    with _open(Path(path)) as fh:
        return _read_header(fh, Path(path))


def _record_meta(meta_b: bytes, dlen: int, path: Path) -> dict[str, Any]:
    """A record's metadata, checked: a record can be intact (its checksum holds) and still forged."""
    bad = MavlError(f"{path}: malformed checkpoint record; delete the checkpoint and start again", path=path)
    try:
        meta = json.loads(meta_b)
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(meta, dict):
        raise bad
    ids, skipped, shape, pos = meta.get("ids"), meta.get("skipped"), meta.get("shape"), meta.get("position")
    if (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
            or not isinstance(skipped, list) or not all(isinstance(x, dict) and isinstance(x.get("id"), str) for x in skipped)
            or not isinstance(pos, int) or isinstance(pos, bool) or pos < 0
            or not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and d >= 0 for d in shape)
            or shape[0] * shape[1] * 4 != dlen or (dlen and shape[0] != len(ids))):
        raise bad
    return meta


def read_checkpoint(path: Path) -> tuple[CheckpointState, int]:
    """Parse a checkpoint log: (state of all complete records, byte offset after the last good one).

    Reads record by record, so memory stays at one copy of the features.
    """
    path = Path(path)
    fh = _open(path)
    with fh:
        st = CheckpointState(header=_read_header(fh, path))
        good_end = fh.tell()
        while True:
            head = fh.read(_REC_HEAD.size)
            if len(head) < _REC_HEAD.size:
                break
            tag, mlen, dlen = _REC_HEAD.unpack(head)
            if tag != _REC:
                break
            body = fh.read(mlen + dlen + 4)
            if len(body) < mlen + dlen + 4:
                break
            meta_b, blob = body[:mlen], memoryview(body)[mlen : mlen + dlen]
            (crc,) = struct.unpack_from("<I", body, mlen + dlen)
            if zlib.crc32(blob, zlib.crc32(meta_b)) != crc:
                break
            meta = _record_meta(meta_b, dlen, path)
            if meta["position"] < st.position:
                raise MavlError(f"{path}: malformed checkpoint record (positions go back); delete the checkpoint", path=path)
            if dlen:
                st.features.append(np.frombuffer(blob, dtype="<f4").reshape(meta["shape"]))
            st.ids.extend(meta["ids"])
            st.skipped.extend(meta["skipped"])
            st.position = int(meta["position"])
            good_end = fh.tell()
    return st, good_end


def flush_batches(log: CheckpointLog, buf: tuple[list[np.ndarray], list[str], list[dict[str, str]]], position: int) -> None:
    feats, ids, bad = buf
    if not (feats or ids or bad) and position == log.state.position:
        return
    arr = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0), np.float32)
    log.append(arr, list(ids), list(bad), position)
    log.state.position = position
    feats.clear()
    ids.clear()
    bad.clear()
