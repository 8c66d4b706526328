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
import re
import stat
import struct
import sys
import tempfile
import threading
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
    "maps": ("explanation maps", "mavl predict --heatmap", {"maps": 3}),
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


from mavl_cli.invocation import command_args, command_line, set_command  # noqa: E402,F401  (one home; re-exported)


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
        except RecursionError:
            raise MavlError(f"metadata field {key!r} is JSON nested too deeply to be real data") from None
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


_STDOUT_ALIASES = ("/dev/stdout", "/proc/self/fd/1", "/dev/fd/1")
_UMASK_LOCK = threading.Lock()


def is_stdout(path: str | Path | None) -> bool:
    """``-`` or a name for this process's standard output (``/dev/stdout``)."""
    return path is not None and (str(path) == "-" or str(path) in _STDOUT_ALIASES)


def _is_devnull(path: Path) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.stat(os.devnull))
    except OSError:
        return False


def write_stdout(data: bytes | str, what: str = "-") -> None:
    """Write all of ``data`` to standard output, or fail: a short write or a closed pipe is an error.

    ``os.write`` may write fewer bytes than asked (pipes, signals); the loop
    finishes the job or reports how much arrived, so no success summary
    follows an incomplete output.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    view, done = memoryview(data), 0
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stdout (tests, notebooks): no file descriptor
        buf = getattr(sys.stdout, "buffer", None)
        try:
            if buf is not None:
                buf.write(data)
                buf.flush()
            else:
                sys.stdout.write(data.decode("utf-8"))
                sys.stdout.flush()
        except (BrokenPipeError, OSError) as exc:
            raise _stdout_error(what, 0, len(data), exc) from None
        return
    while done < len(data):
        try:
            n = os.write(fd, view[done:])
        except InterruptedError:
            continue
        except OSError as exc:
            raise _stdout_error(what, done, len(data), exc) from None
        if n <= 0:
            raise _stdout_error(what, done, len(data), None)
        done += n


def _stdout_error(what: str, done: int, total: int, exc: BaseException | None) -> MavlError:
    if isinstance(exc, BrokenPipeError) or exc is None:
        why = "the reader closed the pipe"
    else:
        why = exc.strerror or str(exc)
    stdout_closed()
    return MavlError(f"{what}: standard output failed after {done:,} of {total:,} bytes ({why}); the output is incomplete")


def stdout_closed() -> None:
    """Point fd 1 at /dev/null so Python's own flush at exit does not report the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _file_mode(target: Path) -> int:
    """What ``open(target, 'w')`` would give: the existing file's mode, else 0666 & ~umask."""
    try:
        st = os.stat(target)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def temp_pattern(target: Path) -> re.Pattern[str]:
    """Names of the temporaries :func:`atomic_write_bytes` makes for ``target``: ``.NAME.XXXXXXXX.tmp``."""
    return re.compile(r"\." + re.escape(target.name) + r"\.[A-Za-z0-9_]{8}\.tmp")


def clean_stale_temps(target: Path, min_age: float = 2.0) -> list[Path]:
    """Remove ``.NAME.XXXXXXXX.tmp`` files a killed run left next to ``target``.

    A temporary is stale when no process holds its lock (the writer locks it
    for as long as it writes, and the lock dies with the process) and it is
    older than ``min_age`` seconds; a concurrent writer's file is never touched.
    """
    import fcntl
    import time

    folder = target.parent if str(target.parent) else Path(".")
    pat = temp_pattern(target)
    removed: list[Path] = []
    try:
        names = [n for n in os.listdir(folder) if pat.fullmatch(n)]
    except OSError:
        return removed
    for name in names:
        p = folder / name
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < min_age:
                continue
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            os.unlink(p)
            removed.append(p)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and rename; ``-`` is stdout.

    The file gets the mode a plain ``open`` would give it (an existing file's
    mode, else ``0666 & ~umask``). ``/dev/null`` takes the bytes and drops
    them; any other path that exists but is not a regular file is refused
    (never replaced). Stale temporaries of this target from a killed run are
    removed first.
    """
    if is_stdout(path):
        write_stdout(data, str(path))
        return
    target = Path(path)
    if _is_devnull(target):
        return
    folder = target.parent if str(target.parent) else Path(".")
    check_output_path(target, may_replace=[target])  # the stage's guard compared it with its inputs already
    clean_stale_temps(target)
    import fcntl

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MavlError(f"cannot write {target}: {exc.strerror or exc}", path=target) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks the temporary as live (see clean_stale_temps)
        os.fchmod(fd, _file_mode(target))
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


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(rows: list[dict[str, Any]] | list[list[Any]], header: list[str] | None = None, lineterminator: str = "\r\n") -> str:
    """CSV for spreadsheets: text cells that would run as formulas get a leading ``'``
    (:func:`mavl_cli.sanitize.csv_cell`), the header included."""
    import csv
    import io

    from mavl_cli.sanitize import csv_cell

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=lineterminator)
    if rows and isinstance(rows[0], dict):
        header = header or list(rows[0].keys())
        body = [[r.get(k) for k in header] for r in rows]  # type: ignore[union-attr]
    else:
        body = [list(r) for r in rows]
    if header is not None:
        w.writerow([csv_cell(h) for h in header])
    w.writerows([[csv_cell(v) for v in r] for r in body])
    return buf.getvalue()


def write_csv(path: str | Path, rows: list[dict[str, Any]] | list[list[Any]], header: list[str] | None = None,
              lineterminator: str = "\r\n") -> None:
    """Write a CSV atomically (``-`` = stdout), formulas neutralised (see :func:`csv_text`)."""
    atomic_write_text(path, csv_text(rows, header, lineterminator))


def write_file(path: str | Path, kind: str, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """Validate and atomically write one mavl file."""
    data = to_bytes(kind, tensors, meta)
    atomic_write_bytes(path, data)


_STDIN: dict[str, Any] = {"stream": None, "data": b""}


def read_bytes(path: str | Path) -> bytes:
    """Read a whole input file; ``-`` is stdin, read once per process (a stage that reads its
    ``-`` input twice, e.g. `calibrate - VAL`, gets the same bytes again, not an empty stream)."""
    if str(path) == "-":
        stream = sys.stdin.buffer
        if _STDIN["stream"] is stream:
            data = _STDIN["data"]
        else:
            data = stream.read()
            _STDIN.update(stream=stream, data=data)
        if not data:
            raise MavlError("-: nothing arrived on standard input (expected a mavl safetensors file)")
        return data
    p = Path(path)
    check_input_file(p, "a .safetensors file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise MavlError(f"{p}: cannot read ({exc.strerror or exc})", path=p) from None


def check_input_file(p: str | Path, expected: str = "a file") -> Path:
    """An input must be an existing, readable regular file: never open a FIFO (it blocks) or a device.

    Process substitution (``<(cmd)``, ``/dev/fd/N``) has a writer, so those pipes are allowed.
    """
    p = Path(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MavlError(f"{p}: file not found", path=p) from None
    except PermissionError:
        raise MavlError(f"{p}: permission denied", path=p) from None
    except OSError as exc:
        raise MavlError(f"{p}: cannot read ({exc.strerror or exc})", path=p) from None
    if stat.S_ISDIR(st.st_mode):
        raise MavlError(f"{p}: is a directory, expected {expected}", path=p)
    piped = stat.S_ISFIFO(st.st_mode) and str(p).startswith(("/dev/fd/", "/proc/self/fd/"))
    if not stat.S_ISREG(st.st_mode) and not piped:
        raise MavlError(f"{p}: not a regular file (a device, FIFO or socket), expected {expected}", path=p)
    if not os.access(p, os.R_OK):
        raise MavlError(f"{p}: permission denied", path=p)
    return p


def loads_json(text: str | bytes, name: str, what: str = "JSON") -> Any:
    """``json.loads`` for untrusted text: invalid or absurdly nested JSON is a user error, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MavlError(f"{name}: {what} is nested too deeply to be real data") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MavlError(f"{name}: {what} is not valid JSON ({str(exc).splitlines()[0][:80]})") from None


def parse_header(data: bytes, name: str) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without trusting it."""
    if len(data) < 8:
        raise MavlError(f"{name}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise MavlError(f"{name}: not a safetensors file or truncated (corrupt header length)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except RecursionError:
        raise MavlError(f"{name}: corrupt safetensors header (JSON nested too deeply)") from None
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
    try:
        meta = decode_metadata(raw_meta)
    except MavlError as exc:
        raise MavlError(f"{name}: {exc}") from None
    f = MavlFile(kind=kind, tensors=tensors, meta=meta, path=name)
    check_schema(f)
    return f


# ---------------------------------------------------------------------------- the schema

#: how fused-model aspect scores combine (``mavl_cli.models.fusion.AGGREGATES``; a test keeps the two equal)
AGGREGATES = ("none", "mean", "max", "learned")


@dataclass(frozen=True)
class Schema:
    """What a kind's file must hold. Shapes are tuples of sizes or symbols: one symbol is one size
    across every tensor and metadata field of a file, so no later stage meets a mismatch, and no
    metadata number ever sizes an allocation that the tensors do not already prove.

    ``tensors``: required; ``optional``: all or none of them; ``exact``: tensor-name prefixes under
    which nothing else may appear; ``meta``: field -> ("labels" | "ids", symbol) or ("dims", {key: symbol
    or tuple of allowed strings}); ``ranges``: tensor -> (low, high) for every value; ``nonzero``:
    symbols that must be at least 1 (no empty files).
    """

    tensors: dict[str, tuple[Any, ...]]
    meta: dict[str, tuple[str, Any]] = field(default_factory=dict)
    optional: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    exact: tuple[str, ...] = ()
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    nonzero: str = ""
    integer: tuple[str, ...] = ()  # tensors that may hold integers/bools (masks); all others are floating


_LRF = {"norm.weight": ("D",), "norm.bias": ("D",), "proj.weight": ("R", "D"), "classifier.weight": ("K", "R"),
        "classifier.bias": ("K",)}
_MLP = lambda p, i: {f"{p}.0.weight": ("H", i), f"{p}.0.bias": ("H",), f"{p}.2.weight": ("H", "H"), f"{p}.2.bias": ("H",)}  # noqa: E731
NOUN = {"N": "images", "D": "feature dimensions", "L": "labels", "A": "aspects", "T": "text dimensions",
        "R": "rank", "K": "labels", "H": "fusion dimensions", "I": "fusion input dimensions",
        "Y": "map rows", "X": "map columns"}

SCHEMAS: dict[str, Schema] = {
    "image-embeddings": Schema({"features": ("N", "D")}, meta={"ids": ("ids", "N")}, nonzero="ND"),
    "text-embeddings": Schema({"embeddings": ("L", "A", "T"), "mask": ("L", "A")}, meta={"labels": ("labels", "L")},
                              nonzero="LAT", integer=("mask",)),
    "lrf-head": Schema({**_LRF, "classifier.weight": ("L", "R"), "classifier.bias": ("L",)},
                       meta={"labels": ("labels", "L")}, exact=("",), nonzero="DRL"),
    "model": Schema(
        {"text.embeddings": ("L", "A", "T"), "text.mask": ("L", "A"), "thresholds": ("L",),
         **_MLP("fusion.img_proj", "I"), **_MLP("fusion.txt_proj", "T"),
         "fusion.log_scale": (1,), "fusion.bias": ("L",), "fusion.aspect_logits": ("L", "A")},
        optional={f"lrf.{k}": tuple("I" if d == "R" else d for d in v) for k, v in _LRF.items()},
        meta={"labels": ("labels", "L"),
              "fusion": ("dims", {"img_dim": "I", "txt_dim": "T", "dim": "H", "n_aspects": "A", "aggregate": AGGREGATES})},
        exact=("fusion.", "lrf."), ranges={"thresholds": (0.0, 1.0)}, nonzero="LATHI", integer=("text.mask",)),
    # `mavl zero-shot`: aligned towers, no fusion trained (kind "model" with meta scorer "zeroshot")
    "model/zeroshot": Schema(
        {"text.embeddings": ("L", "A", "T"), "text.mask": ("L", "A"), "thresholds": ("L",),
         "zeroshot.negative": ("L", "T"), "zeroshot.logit_scale": (1,)},
        meta={"labels": ("labels", "L")}, exact=("fusion.", "lrf.", "zeroshot."), ranges={"thresholds": (0.0, 1.0)},
        nonzero="LAT", integer=("text.mask",)),
    "maps": Schema({"maps": ("L", "Y", "X")}, meta={"labels": ("labels", "L")}, nonzero="LYX"),
    "scores": Schema({"scores": ("N", "L")}, optional={"thresholds": ("L",)},
                     meta={"ids": ("ids", "N"), "labels": ("labels", "L")},
                     ranges={"scores": (0.0, 1.0), "thresholds": (0.0, 1.0)}, nonzero="NL"),
}


def check_schema(f: MavlFile) -> None:
    """Check a file's tensors and metadata against its kind's :class:`Schema` (or, for a kind
    without one, the ranks in :data:`KINDS`); then refuse NaN/Inf. Raises one clear MavlError."""
    name, t, kind = f.path, f.tensors, f.kind
    sch = SCHEMAS.get("model/zeroshot" if kind == "model" and f.meta.get("scorer") == "zeroshot" else kind)
    what = describe_kind(kind)
    if sch is None:
        for tname, rank in KINDS[kind][2].items():
            if tname not in t:
                raise MavlError(f"{name}: {what} file is missing tensor {tname!r}")
            if t[tname].ndim != rank:
                raise MavlError(f"{name}: tensor {tname!r} has {t[tname].ndim} dimensions, expected {rank}")
    else:
        wanted = dict(sch.tensors)
        present_opt = [k for k in sch.optional if k in t]
        if present_opt and len(present_opt) != len(sch.optional):
            gone = sorted(set(sch.optional) - set(present_opt))
            raise MavlError(f"{name}: {what} file is missing tensor {gone[0]!r}")
        wanted.update({k: sch.optional[k] for k in present_opt})
        for tname in wanted:
            if tname not in t:
                raise MavlError(f"{name}: {what} file is missing tensor {tname!r}")
        for tname in t:
            if tname not in wanted and any(tname.startswith(p) for p in sch.exact):
                raise MavlError(f"{name}: unexpected tensor {tname!r} in {what} file")
        sizes: dict[str, tuple[int, str]] = {}

        def bind(sym: Any, size: int, where: str) -> None:
            if isinstance(sym, int):
                if size != sym:
                    raise MavlError(f"{name}: {where} has size {size}, expected {sym}")
                return
            if sym in sizes and sizes[sym][0] != size:
                raise MavlError(f"{name}: {where} has {size} {NOUN.get(sym, sym)}, but {sizes[sym][1]} has {sizes[sym][0]}")
            sizes.setdefault(sym, (size, where))

        for tname, shape in wanted.items():
            arr = t[tname]
            if arr.ndim != len(shape):
                raise MavlError(f"{name}: tensor {tname!r} has {arr.ndim} dimensions, expected {len(shape)}")
            if tname not in sch.integer and arr.dtype.kind != "f":
                raise MavlError(f"{name}: tensor {tname!r} holds {arr.dtype} values, expected floating point")
            for sym, size in zip(shape, arr.shape):
                bind(sym, int(size), f"tensor {tname!r}")
        for key, (form, spec) in sch.meta.items():
            value = f.meta.get(key)
            if form in ("labels", "ids"):
                noun = "label names" if form == "labels" else "image ids"
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise MavlError(f"{name}: metadata {key!r} must be a list of {noun} (strings)")
                if form == "labels" and (any(not v.strip() for v in value) or len(set(value)) != len(value)):
                    raise MavlError(f"{name}: metadata {key!r} holds empty or repeated label names")
                bind(spec, len(value), f"metadata {key!r}")
            elif form == "dims":
                if not isinstance(value, dict):
                    raise MavlError(f"{name}: metadata {key!r} is missing or not a JSON object")
                for sub, sym in spec.items():
                    v = value.get(sub)
                    if isinstance(sym, tuple):
                        if v not in sym:
                            raise MavlError(f"{name}: metadata {key}.{sub} is {v!r}, expected one of {', '.join(sym)}")
                        continue
                    if not isinstance(v, int) or isinstance(v, bool):
                        raise MavlError(f"{name}: metadata {key}.{sub} must be a whole number, got {v!r}")
                    bind(sym, v, f"metadata {key}.{sub}")
        for sym in sch.nonzero:
            if sym == "N" and isinstance(f.meta.get("shard"), dict):
                continue  # a shard part may be empty (more shards than batches); `mavl merge` checks the whole
            if sym in sizes and sizes[sym][0] < 1:
                raise MavlError(f"{name}: holds no {NOUN.get(sym, sym)} ({sizes[sym][1]} is empty)")
    for tname, arr in t.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise MavlError(f"{name}: tensor {tname!r} contains {bad} NaN or Inf value(s)")
    if sch is not None:
        for tname, (lo, hi) in sch.ranges.items():
            if tname in t and t[tname].size and ((t[tname] < lo) | (t[tname] > hi)).any():
                raise MavlError(f"{name}: tensor {tname!r} must lie in [{lo:g}, {hi:g}]")
    if kind == "maps":
        _check_maps(f)
    if kind == "model":
        _check_calibration(f)


CALIBRATION_METHODS = ("temperature", "platt", "isotonic", "none")  # ``mavl_cli.calibration.METHODS`` + none


def _check_calibration(f: MavlFile) -> None:
    """``calibration.*`` (from `mavl calibrate`): all of a, b, shift ``[L]`` (isotonic: knots ``[L, K]`` and
    counts in 1..K, non-decreasing) with the metadata saying so, and a slope > 0 for every label, so a
    stored calibration can never reverse (or erase) the order of a label's scores."""
    name, t, info = f.path, f.tensors, f.meta.get("calibration")
    have = sorted(k for k in t if k.startswith("calibration."))
    if not have:
        if isinstance(info, dict) and info.get("method") not in (None, "none"):
            raise MavlError(f"{name}: metadata says the model is {info.get('method')}-calibrated, but it holds no "
                            "calibration tensors")
        return
    if not isinstance(info, dict) or info.get("method") not in CALIBRATION_METHODS:
        method = info.get("method") if isinstance(info, dict) else info
        raise MavlError(f"{name}: calibration tensors, but metadata 'calibration' method is {method!r}, expected one of "
                        f"{', '.join(CALIBRATION_METHODS)}")
    iso = info["method"] == "isotonic"
    want = {"calibration.a", "calibration.b", "calibration.shift",
            *(("calibration.iso_x", "calibration.iso_y", "calibration.iso_n") if iso else ())}
    if set(have) != want:
        odd = sorted(set(have) ^ want)[0]
        raise MavlError(f"{name}: {'unexpected' if odd in have else 'missing'} tensor {odd!r} for a "
                        f"{info['method']} calibration")
    n = t["thresholds"].shape[0]
    for k in ("calibration.a", "calibration.b", "calibration.shift"):
        if t[k].shape != (n,) or t[k].dtype.kind != "f":
            raise MavlError(f"{name}: tensor {k!r} must be {n} floating-point values (one per label), got "
                            f"{list(t[k].shape)} {t[k].dtype}")
    if not (t["calibration.a"] > 0).all():
        raise MavlError(f"{name}: calibration slope 'calibration.a' must be > 0 for every label (a slope <= 0 reverses "
                        "the order of the scores); re-run `mavl calibrate`")
    if iso:
        x, y, cnt = t["calibration.iso_x"], t["calibration.iso_y"], t["calibration.iso_n"]
        if x.ndim != 2 or x.shape[0] != n or y.shape != x.shape or cnt.shape != (n,) or x.dtype.kind != "f" \
                or y.dtype.kind != "f" or cnt.dtype.kind not in "iu":
            raise MavlError(f"{name}: isotonic knots must be [labels, K] floats with [labels] integer counts")
        k = x.shape[1]
        if ((cnt < 1) | (cnt > k)).any():
            raise MavlError(f"{name}: isotonic knot counts must lie in 1..{k}")
        if ((y < 0) | (y > 1)).any() or (np.diff(x, axis=1) < 0).any() or (np.diff(y, axis=1) < 0).any():
            raise MavlError(f"{name}: isotonic knots must be non-decreasing, with values in [0, 1]")


def _check_maps(f: MavlFile) -> None:
    """``maps``: float32 ``[L, H, W]`` in the original image's pixels, its size and method recorded."""
    name, m, size = f.path, f.tensors["maps"], f.meta.get("image_size")
    if m.dtype != np.float32:
        raise MavlError(f"{name}: maps must be float32, got {m.dtype}")
    if not isinstance(size, list) or len(size) != 2 or [v for v in size] != [m.shape[2], m.shape[1]]:
        raise MavlError(f"{name}: image_size {size} does not match the maps' {m.shape[2]}x{m.shape[1]} pixels")
    from mavl_cli.maps import METHODS

    if f.meta.get("method") not in METHODS:
        raise MavlError(f"{name}: unknown map method {f.meta.get('method')!r}")


def read_file(path: str | Path, expect: str | tuple[str, ...] | None = None) -> MavlFile:
    """Read and validate one mavl file (``-`` = stdin)."""
    return loads(read_bytes(path), name=str(path), expect=expect)


def _stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths are one file (same device and inode: links and ``..`` tricks included)."""
    sa, sb = _stat(a), _stat(b)
    return sa is not None and sb is not None and os.path.samestat(sa, sb)


def _default_model() -> Path | None:
    try:
        from mavl_cli.modelfile import default_model_path

        return default_model_path()
    except Exception:  # noqa: BLE001 - no home folder at all: nothing to protect
        return None


def model_inputs(*paths: Any, limit: int = 2000) -> list[Path]:
    """The files that model paths (``--weights``, ``--text-model``, an encoder's local ID) stand for:
    a file is itself; a folder (a hub-layout model folder) is every regular file in it, so an output
    path compared with :func:`check_output_path` can never replace a model's weights, config or
    tokenizer. Hub ids and missing paths stand for nothing local."""
    out: list[Path] = []
    for p in paths:
        if p is None or not str(p) or is_stdout(p):
            continue
        text = str(getattr(p, "id", p))  # an EncoderSpec stands for its ID
        q = Path(text).expanduser()
        while not q.exists() and ":" in text:  # FAMILY:ID, open_clip's local-dir:PATH
            text = text.split(":", 1)[1]
            q = Path(text).expanduser()
        try:
            if q.is_file():
                out.append(q)
            elif q.is_dir():
                for root, _dirs, files in os.walk(q):
                    out.extend(Path(root) / name for name in files)
                    if len(out) > limit:
                        break
        except OSError:
            continue
    return out


def check_folder(folder: str | Path, create: bool = False, what: str = "output folder") -> None:
    """An output folder must be a writable folder; with ``create`` it may be missing as long as the
    nearest existing ancestor is a writable folder (``mkdir -p`` will then work)."""
    folder = Path(folder) if str(folder) else Path(".")
    probe = folder
    while create and not probe.exists() and probe != probe.parent and str(probe):
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MavlError(f"{folder}: {probe} is a file, not a folder", path=folder)
    if not probe.is_dir():
        raise MavlError(f"{what} {folder} does not exist", path=folder)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MavlError(f"{what} {probe} is not writable (permission denied)", path=folder)


def check_output_path(path: str | Path, inputs: Any = (), *, may_replace: Any = (), create_folder: bool = False) -> None:
    """Fail early (before any work) if the output cannot be written or would clobber something.

    The one guard every written path goes through. Refused: a missing or
    unwritable folder, a directory, an existing path that is not a regular
    file (a device node, FIFO or socket is never replaced; ``/dev/null`` and
    ``-``/``/dev/stdout`` are accepted and handled by the writer), and any
    path that is the same file (by device and inode, not by name) as one of
    ``inputs`` or as the installed default model, unless it is listed in
    ``may_replace`` (``tune-threshold -o MODEL``, the default-model installer).
    """
    if is_stdout(path):
        return
    target = Path(path)
    if _is_devnull(target):
        return
    folder = target.parent if str(target.parent) else Path(".")
    probe = folder
    while create_folder and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MavlError(f"{target}: {probe} is a file, not a folder", path=target)
    if not probe.is_dir():
        raise MavlError(f"{target}: output folder {folder} does not exist", path=target)
    if not os.access(probe, os.W_OK):
        raise MavlError(f"{target}: output folder {probe} is not writable", path=target)
    st = _stat(target)
    if target.is_dir():
        raise MavlError(f"{target}: output path is a directory", path=target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise MavlError(
            f"{target}: exists and is not a regular file (a device, FIFO or socket); mavl never replaces those: "
            "choose another path, or '-' for standard output", path=target)
    if st is None:
        return  # a new file cannot be any existing input
    allowed = [p for p in (may_replace if isinstance(may_replace, (list, tuple, set)) else [may_replace]) if p]
    for inp in inputs or ():
        if inp is None or is_stdout(inp):
            continue
        other = _stat(inp)
        if other is not None and os.path.samestat(st, other) and not any(same_file(target, a) for a in allowed):
            raise MavlError(f"{target}: output would overwrite the input file {inp}; choose another output path", path=target)
    home = _default_model()
    if home is not None and not any(same_file(home, a) for a in allowed):
        other = _stat(home)
        if other is not None and os.path.samestat(st, other):
            raise MavlError(
                f"{target}: this is the installed default model ({home}); writing here would replace it "
                "(use `fuse --set-default` to install a model)", path=target)


def check_outputs(outputs: Any, inputs: Any = (), *, may_replace: Any = (), create_folders: Any = ()) -> None:
    """:func:`check_output_path` for every output of one command, plus: at most one goes to
    standard output, and no two outputs are the same file."""
    outs = [(flag, p) for flag, p in (outputs.items() if isinstance(outputs, dict) else enumerate(outputs)) if p is not None]
    to_stdout = [str(flag) for flag, p in outs if is_stdout(p)]
    if len(to_stdout) > 1:
        raise MavlError(f"{' and '.join(to_stdout)} would both write to standard output; send at most one output there")
    for i, (flag, p) in enumerate(outs):
        check_output_path(p, list(inputs or ()), may_replace=may_replace, create_folder=flag in create_folders)
        for flag2, q in outs[i + 1 :]:
            if is_stdout(p) or is_stdout(q):
                continue
            if str(p) == str(q) or same_file(p, q) or Path(p).absolute() == Path(q).absolute():
                raise MavlError(f"{p}: given as two outputs ({flag} and {flag2}); choose different paths", path=p)
