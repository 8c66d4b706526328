"""Scheduler-agnostic shards: `--shard K/N` and `mavl merge`.

A shard is a deterministic slice of the very list an unsharded run would
embed (folders and globs: sorted paths; a label CSV: its row order), cut at
batch boundaries: the list is split into batches of the run's batch size and
shard K (0-based, ``0 <= K < N``) takes the K-th of N contiguous runs of
whole batches. Every image therefore goes through the model in exactly the
batch it would have been in without sharding, so the parts concatenated in
shard order are byte for byte the unsharded file (tested), whatever the
scheduler: a SLURM array, N machines, or the ranks of one torchrun job.

Each part records ``shard`` in its metadata: its index and count, its slice
of the full list (``start``/``stop`` of ``total``), the full list's
fingerprint, how many of its inputs were skipped, and the command that would
have produced the whole file in one run (the same command without
``--shard``, its output left open). :func:`merge_parts` checks that the parts
come from one run (same kind, encoder, preprocessing, precision, batch size,
input fingerprint, label set...), that every shard is there exactly once,
that no id repeats, and that each part holds exactly its slice; then it
writes the file the unsharded run would have written.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from typing import Any

import numpy as np

from mavl_cli.core.errors import MavlError

#: kind -> (row tensors concatenated along axis 0, row metadata lists concatenated)
MERGEABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "image-embeddings": (("features",), ("ids", "skipped")),
    "scores": (("scores",), ("ids",)),
}


_OUTPUT_FLAGS = ("-o", "--output", "--out")


_WORDS = {
    "backbone": "encoder", "backbone_weights": "encoder weights", "backbone_args": "encoder arguments",
    "preprocessing": "preprocessing", "precision": "precision", "batch_size": "batch size",
    "inputs_fingerprint": "input list", "space": "feature space", "lrf_fingerprint": "LRF head",
    "labels": "labels", "model": "model", "threshold": "thresholds", "feature_dim": "feature size",
    "threads": "the CPU forward threads (features depend on them in the last bits: pin --threads N on every shard)",
    "pipeline": "input pipeline",
}


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str | None) -> Shard | None:
    """``"K/N"`` -> Shard(K, N) with ``0 <= K < N`` (0-based, like torchrun's RANK and SLURM arrays from 0)."""
    if spec is None or spec == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise MavlError(f"--shard must look like K/N (e.g. 0/8), got {spec!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise MavlError(f"--shard {spec}: K counts from 0, so 0 <= K < N (e.g. 0/{max(n, 2)} ... {max(n, 2) - 1}/{max(n, 2)})")
    return Shard(k, n)


def shard_range(total: int, batch_size: int, shard: Shard | None) -> tuple[int, int]:
    """The ``[start, stop)`` slice of a ``total``-long list that ``shard`` embeds (whole batches)."""
    if shard is None or shard.count == 1:
        return 0, total
    n_batches = -(-total // batch_size)
    first = shard.index * n_batches // shard.count
    last = (shard.index + 1) * n_batches // shard.count
    return min(total, first * batch_size), min(total, last * batch_size)


def unsharded_command(args: list[str] | None) -> dict[str, Any] | None:
    """The argument list without ``--shard``, and where its output path goes (for the merged file's ``command``)."""
    if args is None:
        return None
    out: list[str] = []
    at = None
    i = 0
    while i < len(args):
        a = str(args[i])
        if a == "--shard":
            i += 2
            continue
        if a.startswith("--shard="):
            i += 1
            continue
        flag, eq, val = a.partition("=")
        if eq and flag in _OUTPUT_FLAGS[1:]:
            out.append(flag)
            at = len(out)
            out.append(val)
        elif a in _OUTPUT_FLAGS and i + 1 < len(args):
            out.append(a)
            at = len(out)
            out.append(str(args[i + 1]))
            i += 1
        else:
            out.append(a)
        i += 1
    return {"args": out, "output_at": at}


def shard_meta(shard: Shard, start: int, stop: int, total: int, fingerprint: str, skipped: int,
               args: list[str] | None) -> dict[str, Any]:
    return {"index": shard.index, "count": shard.count, "start": start, "stop": stop, "total": total,
            "fingerprint": fingerprint, "skipped": skipped, "command": unsharded_command(args)}


@dataclass
class Merged:
    kind: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    parts: int
    rows: int


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_shard_meta(p: Any) -> None:
    """A part's ``shard`` record (see :func:`shard_meta`) holds what it says: whole numbers with
    ``0 <= index < count`` and ``0 <= start <= stop <= total``, ``0 <= skipped <= stop - start``, and a
    command whose output slot lies in its argument list. Metadata never drives a loop or an index unchecked."""
    s = p.meta["shard"]
    keys = ("index", "count", "start", "stop", "total", "skipped")
    bad = [k for k in keys if not _whole(s.get(k))]
    if bad:
        raise MavlError(f"{p.path}: damaged shard record ({bad[0]} is {s.get(bad[0])!r}, expected a whole number)")
    if not (0 <= s["index"] < s["count"] and 0 <= s["start"] <= s["stop"] <= s["total"]
            and 0 <= s["skipped"] <= s["stop"] - s["start"]):
        raise MavlError(f"{p.path}: damaged shard record (shard {s['index']}/{s['count']}, inputs {s['start']}..{s['stop']} "
                        f"of {s['total']}, {s['skipped']} skipped)")
    cmd = s.get("command")
    if cmd is not None:
        args, at = cmd.get("args") if isinstance(cmd, dict) else None, cmd.get("output_at") if isinstance(cmd, dict) else None
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)
                and (at is None or (_whole(at) and 0 <= at < len(args)))):
            raise MavlError(f"{p.path}: damaged shard record (its command is not an argument list with the output in it)")


def merge_parts(parts: list[Any], output: str | None = None) -> Merged:
    """Check and join loaded parts (:class:`mavl_cli.io.mavlfile.MavlFile`) into the unsharded file's content."""
    _check_parts(parts)
    first = parts[0]
    row_tensors, row_meta = MERGEABLE[first.kind]
    s0 = first.meta["shard"]
    count, total = s0.get("count"), s0.get("total")
    by_index = _index_parts(parts, row_tensors, row_meta)
    if len(by_index) != count:  # every index lies in 0..count-1, so some are missing (count may be large: no range())
        missing = list(itertools.islice((k for k in range(count) if k not in by_index), 9))
        shown = ", ".join(f"{k}/{count}" for k in missing[:8]) + (" ..." if count - len(by_index) > 8 else "")
        raise MavlError(f"shard(s) {shown} missing: {len(by_index)} of {count} parts of {first.path}'s run given, nothing written")
    ordered = [by_index[k] for k in range(count)]
    seen = _check_coverage(ordered, row_tensors[0], total)
    tensors = {k: np.ascontiguousarray(v) for k, v in first.tensors.items()}
    for name in row_tensors:
        tensors[name] = np.concatenate([p.tensors[name] for p in ordered], axis=0)
    meta = {k: v for k, v in first.meta.items() if not k.startswith("mavl_") and k not in ("command", "shard")}
    for key in row_meta:
        meta[key] = [x for p in ordered for x in (p.meta.get(key) or [])]
    if not seen:
        raise MavlError("no image was embedded in any part (all skipped as unreadable); nothing written")
    meta["command"] = _merged_command(first, output)
    return Merged(first.kind, tensors, meta, len(ordered), len(seen))


def _check_parts(parts: list[Any]) -> None:
    """At least one part, of a mergeable kind, every one a shard with a sound record and of the first's kind."""
    if not parts:
        raise MavlError("merge needs at least one part file")
    first = parts[0]
    if first.kind not in MERGEABLE:
        raise MavlError(f"{first.path}: {first.kind} files cannot be merged (only image embeddings and prediction scores)")
    for p in parts:
        if not isinstance(p.meta.get("shard"), dict):
            raise MavlError(f"{p.path}: not a shard (written without --shard); nothing to merge")
        check_shard_meta(p)
        if p.kind != first.kind:
            raise MavlError(f"{p.path}: holds {p.kind}, but {first.path} holds {first.kind}")


def _index_parts(parts: list[Any], row_tensors: tuple[str, ...], row_meta: tuple[str, ...]) -> dict[int, Any]:
    """``{shard index: part}`` for parts of the first part's run (same count, total, settings, inputs), each once."""
    first = parts[0]
    s0 = first.meta["shard"]
    count, total, fp = s0.get("count"), s0.get("total"), s0.get("fingerprint")
    by_index: dict[int, Any] = {}
    for p in parts:
        s = p.meta["shard"]
        if s.get("count") != count or s.get("total") != total:
            raise MavlError(f"{p.path}: shard {s.get('index')}/{s.get('count')} of {s.get('total')} inputs, but {first.path} is "
                            f"{s0.get('index')}/{count} of {total}: parts of different runs")
        _same_run(first, p, row_tensors, row_meta)
        if s.get("fingerprint") != fp:
            raise MavlError(f"{p.path}: made from a different input list than {first.path} "
                            f"(input fingerprint {s.get('fingerprint')} vs {fp})")
        k = s.get("index")
        if k in by_index:
            raise MavlError(f"{p.path} and {by_index[k].path} are both shard {k}/{count}; give each part once")
        by_index[k] = p
    return by_index


def _check_coverage(ordered: list[Any], row_tensor: str, total: int) -> dict[str, str]:
    """The parts, in shard order, cover the ``total`` inputs end to end, each holding its slice's rows,
    and no id repeats; returns ``{id: part path}``."""
    pos = 0
    seen: dict[str, str] = {}
    for p in ordered:
        s = p.meta["shard"]
        if s.get("start") != pos:
            raise MavlError(f"{p.path}: covers inputs {s.get('start')}..{s.get('stop')}, expected from {pos} "
                            "(parts written with different batch sizes?)")
        n_rows = p.tensors[row_tensor].shape[0]
        if len(p.ids()) != n_rows or n_rows + int(s.get("skipped") or 0) != s.get("stop") - s.get("start"):
            raise MavlError(f"{p.path}: holds {n_rows} rows and {s.get('skipped')} skipped images for "
                            f"{s.get('stop') - s.get('start')} inputs; the part is damaged")
        for i in p.ids():
            if i in seen:
                raise MavlError(f"id {i!r} is in both {seen[i]} and {p.path}")
            seen[i] = p.path
        pos = s.get("stop")
    if pos != total:
        raise MavlError(f"the parts cover {pos} of {total} inputs; nothing written")
    return seen


def _merged_command(first: Any, output: str | None) -> Any:
    """The merged file's ``command``: the unsharded command line (its output set to ``output`` when given),
    else the first part's own."""
    cmd = first.meta["shard"].get("command")
    if cmd and cmd.get("args") is not None:
        args = list(cmd["args"])
        if cmd.get("output_at") is not None and output is not None:
            args[cmd["output_at"]] = str(output)
        return "mavl " + " ".join(shlex.quote(a) for a in args)
    return first.meta.get("command")


def _same_run(a: Any, b: Any, row_tensors: tuple[str, ...], row_meta: tuple[str, ...]) -> None:
    """Everything but the rows must be identical between two parts of one run."""
    skip = {"command", "shard", "mavl_version", *row_meta}
    # named settings first, the input list (whose fingerprint also covers them) last
    keys = sorted((set(a.meta) | set(b.meta)) - skip, key=lambda k: (k == "inputs_fingerprint", k not in _WORDS, k))
    for k in keys:
        if a.meta.get(k) != b.meta.get(k):
            what = _WORDS.get(k, k)
            va, vb = _short(a.meta.get(k)), _short(b.meta.get(k))
            raise MavlError(f"{b.path}: {what} differs from {a.path} ({vb} vs {va}); parts of different runs cannot be merged")
    if a.meta.get("mavl_version") != b.meta.get("mavl_version"):
        raise MavlError(f"{b.path}: written by mavl {b.meta.get('mavl_version')}, {a.path} by {a.meta.get('mavl_version')}")
    for name in set(a.tensors) | set(b.tensors):
        ta, tb = a.tensors.get(name), b.tensors.get(name)
        if ta is None or tb is None:
            raise MavlError(f"{b.path}: tensors differ from {a.path} ({name!r} only in one)")
        if name in row_tensors:
            if ta.shape[1:] != tb.shape[1:] or ta.dtype != tb.dtype:
                raise MavlError(f"{b.path}: {name} rows are {list(tb.shape[1:])} {tb.dtype}, in {a.path} {list(ta.shape[1:])} {ta.dtype}")
        elif ta.shape != tb.shape or ta.dtype != tb.dtype or ta.tobytes() != tb.tobytes():
            raise MavlError(f"{b.path}: {name!r} differs from {a.path}; parts of different runs cannot be merged")


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."
