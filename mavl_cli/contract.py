"""The safetensors file contract shared by every mavl command.

Each stage reads and writes one safetensors file, so stages run alone, in
shell scripts, or piped through ``-``. Every file carries in its metadata:

- ``mavl_kind``: what it is (see :data:`KINDS`);
- ``mavl_format``: the format version (readers refuse newer versions);
- ``mavl_version`` and ``command``: provenance;
- kind-specific fields (label names, backbone, text model, rank, seed...),
  JSON-encoded because safetensors metadata is a flat ``str -> str`` map.

Reading checks the header before any tensor is touched, the kind, the format
version, the required tensors and their ranks, and refuses NaN/Inf. Writing is
atomic: bytes go to a temporary file in the target folder, are fsynced, and
renamed over the target, so an interrupted run never leaves a truncated file.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mavl_cli import __version__
from mavl_cli.errors import MavlError

FORMAT_VERSION = 1

#: kind -> (human name, command that makes it, {tensor name: rank})
KINDS: dict[str, tuple[str, str, dict[str, int]]] = {
    "image-embeddings": ("image embeddings", "mavl embed-images", {"features": 2}),
    "text-embeddings": ("text embeddings", "mavl embed-text", {"embeddings": 3, "mask": 2}),
    "lrf-head": ("a low-rank (LRF) head", "mavl train-lrf", {"proj.weight": 2, "classifier.weight": 2}),
    "model": ("a fused model", "mavl fuse", {"text.embeddings": 3, "text.mask": 2, "thresholds": 1}),
    "scores": ("prediction scores", "mavl predict --out", {"scores": 2}),
}

#: metadata keys whose values are JSON (lists, dicts, numbers); the rest stay strings.
_PLAIN_KEYS = {"mavl_kind", "mavl_format", "mavl_version", "command"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class MavlFile:
    """A loaded mavl file: numpy tensors plus decoded metadata."""

    kind: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = "?"

    def labels(self) -> list[str]:
        return list(self.meta.get("labels") or [])

    def ids(self) -> list[str]:
        return list(self.meta.get("ids") or [])


def describe_kind(kind: str) -> str:
    name, maker, _ = KINDS.get(kind, (kind, "?", {}))
    return f"{name} (from `{maker}`)"


_COMMAND: dict[str, str | None] = {"line": None}


def set_command(args: list[str]) -> None:
    """Record the mavl invocation being run (the CLI calls this; in-process runs too)."""
    import shlex

    _COMMAND["line"] = "mavl " + " ".join(shlex.quote(str(a)) for a in args)


def command_line() -> str:
    """The invoking command, recorded as provenance."""
    if _COMMAND["line"]:
        return _COMMAND["line"]
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)


def encode_metadata(kind: str, meta: dict[str, Any]) -> dict[str, str]:
    out = {
        "mavl_kind": kind,
        "mavl_format": str(FORMAT_VERSION),
        "mavl_version": __version__,
        "command": str(meta.pop("command", None) or command_line()),
    }
    for key, value in meta.items():
        if key in out:
            continue
        out[key] = json.dumps(value, sort_keys=True, allow_nan=False)
    return out


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _PLAIN_KEYS:
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError):
            meta[key] = value
    return meta


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    arr = np.ascontiguousarray(value)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr


_DTYPES = {
    "float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32", "int16": "I16",
    "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}


def to_bytes(kind: str, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> bytes:
    """Serialise tensors and metadata to safetensors bytes, byte-for-byte deterministic.

    The safetensors library orders metadata keys by hash, so identical runs
    would give different bytes; this writer sorts keys and tensors instead
    (the format allows any order) and pads the header to 8 bytes as the
    format requires.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    arrays = {name: _to_numpy(t) for name, t in sorted(tensors.items())}
    header: dict[str, Any] = {"__metadata__": dict(sorted(encode_metadata(kind, dict(meta or {})).items()))}
    offset = 0
    for name, arr in arrays.items():
        code = _DTYPES.get(arr.dtype.name)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    parts = [struct.pack("<Q", len(head)), head]
    parts += [np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays.values()]
    return b"".join(parts)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and rename; ``-`` is stdout."""
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    check_output_path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MavlError(f"cannot write {target}: {exc.strerror or exc}", path=target) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise MavlError(f"cannot write {target}: {exc.strerror or exc}", path=target) from None
        raise


def write_file(path: str | Path, kind: str, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """Validate and atomically write one mavl file."""
    data = to_bytes(kind, tensors, meta)
    atomic_write_bytes(path, data)


def read_bytes(path: str | Path) -> bytes:
    """Read a whole input file; ``-`` is stdin."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise MavlError("-: nothing arrived on standard input (expected a mavl safetensors file)")
        return data
    p = Path(path)
    if not p.exists():
        raise MavlError(f"{p}: file not found", path=p)
    if p.is_dir():
        raise MavlError(f"{p}: is a directory, expected a .safetensors file", path=p)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise MavlError(f"{p}: cannot read ({exc.strerror or exc})", path=p) from None


def parse_header(data: bytes, name: str) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without trusting it."""
    if len(data) < 8:
        raise MavlError(f"{name}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise MavlError(f"{name}: not a safetensors file or truncated (corrupt header length)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MavlError(f"{name}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise MavlError(f"{name}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MavlError(f"{name}: corrupt safetensors metadata")
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
            or not isinstance(info.get("shape"), list)
        ):
            raise MavlError(f"{name}: corrupt safetensors file (tensor {key!r} lies outside the file; truncated?)")
    return header


def loads(data: bytes, name: str = "-", expect: str | tuple[str, ...] | None = None) -> MavlFile:
    """Decode and validate mavl file bytes; ``expect`` restricts the kind."""
    from safetensors.numpy import load

    header = parse_header(data, name)
    raw_meta = header.get("__metadata__") or {}
    kind = raw_meta.get("mavl_kind")
    if kind is None:
        raise MavlError(f"{name}: a safetensors file, but not one written by mavl (no 'mavl_kind' in its metadata)")
    if kind not in KINDS:
        raise MavlError(f"{name}: unknown mavl file kind {kind!r}")
    try:
        version = int(raw_meta.get("mavl_format", "0"))
    except ValueError:
        raise MavlError(f"{name}: corrupt mavl format version {raw_meta.get('mavl_format')!r}") from None
    if version > FORMAT_VERSION:
        raise MavlError(
            f"{name}: written by a newer mavl (file format {version}; this mavl {__version__} reads up to "
            f"{FORMAT_VERSION}); upgrade mavl"
        )
    if expect is not None:
        wanted = (expect,) if isinstance(expect, str) else tuple(expect)
        if kind not in wanted:
            want = " or ".join(describe_kind(k) for k in wanted)
            raise MavlError(f"{name}: this is {describe_kind(kind)}, but {want} is expected here")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise MavlError(f"{name}: corrupt safetensors file ({str(exc).splitlines()[0][:120]})") from None
    meta = decode_metadata(raw_meta)
    for tname, rank in KINDS[kind][2].items():
        if tname not in tensors:
            raise MavlError(f"{name}: {describe_kind(kind)} file is missing tensor {tname!r}")
        if tensors[tname].ndim != rank:
            raise MavlError(
                f"{name}: tensor {tname!r} has {tensors[tname].ndim} dimensions, expected {rank}"
            )
    for tname, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise MavlError(f"{name}: tensor {tname!r} contains {bad} NaN or Inf value(s)")
    f = MavlFile(kind=kind, tensors=tensors, meta=meta, path=name)
    _check_consistency(f)
    return f


def _check_consistency(f: MavlFile) -> None:
    """Cross-check metadata against tensor shapes so later stages can trust them."""
    t, name = f.tensors, f.path
    if f.kind == "image-embeddings":
        ids = f.meta.get("ids")
        if not isinstance(ids, list) or len(ids) != t["features"].shape[0]:
            raise MavlError(f"{name}: image ids in the metadata do not match the {t['features'].shape[0]} feature rows")
    if f.kind in ("text-embeddings", "model"):
        emb = t["embeddings" if f.kind == "text-embeddings" else "text.embeddings"]
        labels = f.meta.get("labels")
        if not isinstance(labels, list) or len(labels) != emb.shape[0]:
            raise MavlError(f"{name}: label names in the metadata do not match the {emb.shape[0]} embedding rows")
        if len(labels) == 0:
            raise MavlError(f"{name}: holds no labels")
    if f.kind == "lrf-head":
        labels = f.meta.get("labels")
        if not isinstance(labels, list) or len(labels) != t["classifier.weight"].shape[0]:
            raise MavlError(f"{name}: label names do not match the classifier's outputs")
    if f.kind == "model":
        th = t["thresholds"]
        if th.shape[0] != len(f.meta.get("labels", [])):
            raise MavlError(f"{name}: {th.shape[0]} thresholds for {len(f.meta.get('labels', []))} labels")
        if ((th < 0) | (th > 1)).any():
            raise MavlError(f"{name}: thresholds must lie in [0, 1]")
    if f.kind == "scores":
        ids, labels = f.meta.get("ids"), f.meta.get("labels")
        if not isinstance(ids, list) or not isinstance(labels, list) or t["scores"].shape != (len(ids), len(labels)):
            raise MavlError(f"{name}: scores shape does not match its ids and labels")


def read_file(path: str | Path, expect: str | tuple[str, ...] | None = None) -> MavlFile:
    """Read and validate one mavl file (``-`` = stdin)."""
    return loads(read_bytes(path), name=str(path), expect=expect)


def check_output_path(path: str | Path, inputs: list[str | Path] = ()) -> None:
    """Fail early (before any work) if the output cannot be written or would clobber an input."""
    if str(path) == "-":
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise MavlError(f"{target}: {folder} is a file, not a folder", path=target)
    if not folder.is_dir():
        raise MavlError(f"{target}: output folder {folder} does not exist", path=target)
    if target.is_dir():
        raise MavlError(f"{target}: output path is a directory", path=target)
    if not os.access(folder, os.W_OK):
        raise MavlError(f"{target}: output folder {folder} is not writable", path=target)
    for inp in inputs:
        if str(inp) != "-" and Path(inp).exists() and target.exists() and target.resolve() == Path(inp).resolve():
            raise MavlError(f"{target}: output would overwrite the input file; choose another -o", path=target)
