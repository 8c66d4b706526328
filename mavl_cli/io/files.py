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

import csv
import io
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mavl_cli.core.errors import MavlError
from mavl_cli.core.home import default_model_path
from mavl_cli.core.sanitize import csv_cell

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
    (:func:`mavl_cli.core.sanitize.csv_cell`), the header included."""

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
