"""The mavl file contract: safetensors files with a kind, a format version and JSON metadata;
writing them, reading them back and checking each kind's tensors and metadata against its schema.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load

from mavl_cli.core.errors import MavlError
from mavl_cli.core.invocation import command_line
from mavl_cli.core.version import __version__
from mavl_cli.io.files import atomic_write_bytes, read_bytes

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


def write_file(path: str | Path, kind: str, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """Validate and atomically write one mavl file."""
    data = to_bytes(kind, tensors, meta)
    atomic_write_bytes(path, data)


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


#: how fused-model aspect scores combine (the fusion head reads this one tuple)
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
    kind = f.kind
    sch = SCHEMAS.get("model/zeroshot" if kind == "model" and f.meta.get("scorer") == "zeroshot" else kind)
    what = describe_kind(kind)
    if sch is None:
        _check_ranks(f, what)
    else:
        wanted = _wanted_tensors(f, sch, what)
        sizes = _Sizes(f.path)
        _bind_tensors(f, sch, wanted, sizes)
        _bind_meta(f, sch, sizes)
        _check_nonzero(f, sch, sizes)
    _check_finite(f)
    if sch is not None:
        _check_ranges(f, sch)
    if kind == "maps":
        _check_maps(f)
    if kind == "model":
        _check_calibration(f)


class _Sizes:
    """The sizes bound so far to a schema's dimension symbols: symbol -> (size, where first seen)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[str, tuple[int, str]] = {}

    def bind(self, sym: Any, size: int, where: str) -> None:
        """Bind ``sym`` to ``size`` (an int symbol must equal it); refuse a size that disagrees with an earlier one."""
        name, sizes = self.name, self.seen
        if isinstance(sym, int):
            if size != sym:
                raise MavlError(f"{name}: {where} has size {size}, expected {sym}")
            return
        if sym in sizes and sizes[sym][0] != size:
            raise MavlError(f"{name}: {where} has {size} {NOUN.get(sym, sym)}, but {sizes[sym][1]} has {sizes[sym][0]}")
        sizes.setdefault(sym, (size, where))


def _check_ranks(f: MavlFile, what: str) -> None:
    """A kind without a :class:`Schema`: each tensor in :data:`KINDS` is there with its rank."""
    name, t = f.path, f.tensors
    for tname, rank in KINDS[f.kind][2].items():
        if tname not in t:
            raise MavlError(f"{name}: {what} file is missing tensor {tname!r}")
        if t[tname].ndim != rank:
            raise MavlError(f"{name}: tensor {tname!r} has {t[tname].ndim} dimensions, expected {rank}")


def _wanted_tensors(f: MavlFile, sch: Schema, what: str) -> dict[str, tuple[Any, ...]]:
    """The tensors the file must hold (optional ones all or none), each there; no stray tensor under an exact prefix."""
    name, t = f.path, f.tensors
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
    return wanted


def _bind_tensors(f: MavlFile, sch: Schema, wanted: dict[str, tuple[Any, ...]], sizes: _Sizes) -> None:
    """Each wanted tensor's rank and dtype, and its dimensions bound to the schema's symbols."""
    name, t = f.path, f.tensors
    for tname, shape in wanted.items():
        arr = t[tname]
        if arr.ndim != len(shape):
            raise MavlError(f"{name}: tensor {tname!r} has {arr.ndim} dimensions, expected {len(shape)}")
        if tname not in sch.integer and arr.dtype.kind != "f":
            raise MavlError(f"{name}: tensor {tname!r} holds {arr.dtype} values, expected floating point")
        for sym, size in zip(shape, arr.shape):
            sizes.bind(sym, int(size), f"tensor {tname!r}")


def _bind_meta(f: MavlFile, sch: Schema, sizes: _Sizes) -> None:
    """Each schema metadata entry well-formed, its lengths and dimensions bound to the schema's symbols."""
    for key, (form, spec) in sch.meta.items():
        value = f.meta.get(key)
        if form in ("labels", "ids"):
            _bind_name_list(f.path, key, form, spec, value, sizes)
        elif form == "dims":
            _bind_dims(f.path, key, spec, value, sizes)


def _bind_name_list(name: str, key: str, form: str, spec: Any, value: Any, sizes: _Sizes) -> None:
    """Metadata ``labels``/``ids``: a list of strings (labels: non-empty, distinct), its length bound to ``spec``."""
    noun = "label names" if form == "labels" else "image ids"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MavlError(f"{name}: metadata {key!r} must be a list of {noun} (strings)")
    if form == "labels" and (any(not v.strip() for v in value) or len(set(value)) != len(value)):
        raise MavlError(f"{name}: metadata {key!r} holds empty or repeated label names")
    sizes.bind(spec, len(value), f"metadata {key!r}")


def _bind_dims(name: str, key: str, spec: dict[str, Any], value: Any, sizes: _Sizes) -> None:
    """A metadata object of dimensions: whole numbers bound to symbols, or one of a tuple of choices."""
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
        sizes.bind(sym, v, f"metadata {key}.{sub}")


def _check_nonzero(f: MavlFile, sch: Schema, sizes: _Sizes) -> None:
    """No dimension in ``sch.nonzero`` is empty (a shard part may hold no images)."""
    for sym in sch.nonzero:
        if sym == "N" and isinstance(f.meta.get("shard"), dict):
            continue  # a shard part may be empty (more shards than batches); `mavl merge` checks the whole
        if sym in sizes.seen and sizes.seen[sym][0] < 1:
            raise MavlError(f"{f.path}: holds no {NOUN.get(sym, sym)} ({sizes.seen[sym][1]} is empty)")


def _check_finite(f: MavlFile) -> None:
    """No floating tensor holds NaN or Inf."""
    for tname, arr in f.tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise MavlError(f"{f.path}: tensor {tname!r} contains {bad} NaN or Inf value(s)")


def _check_ranges(f: MavlFile, sch: Schema) -> None:
    """Tensors with a range in ``sch.ranges`` lie inside it."""
    t = f.tensors
    for tname, (lo, hi) in sch.ranges.items():
        if tname in t and t[tname].size and ((t[tname] < lo) | (t[tname] > hi)).any():
            raise MavlError(f"{f.path}: tensor {tname!r} must lie in [{lo:g}, {hi:g}]")


CALIBRATION_METHODS = ("temperature", "platt", "isotonic", "none")  # evaluation.calibration.METHODS (the fitted ones) and none


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

    if f.meta.get("method") not in MAP_METHODS:
        raise MavlError(f"{name}: unknown map method {f.meta.get('method')!r}")


def read_file(path: str | Path, expect: str | tuple[str, ...] | None = None) -> MavlFile:
    """Read and validate one mavl file (``-`` = stdin)."""
    return loads(read_bytes(path), name=str(path), expect=expect)


MAP_METHODS = ("similarity", "gradcam", "hirescam", "similarity-hirescam")
