"""Atomic writes: a run killed at any moment leaves the output complete or absent.

A real ``python -m mavl_cli fuse`` is killed with SIGKILL at several moments
(during start-up, training and around the final write). Afterwards the output
path holds nothing, the previous file byte for byte, or a complete file that
``contract.read_file`` accepts. SIGKILL cannot be caught, so a kill inside the
write itself may leave the hidden temp file ``.NAME.<random>.tmp`` next to the
output; it is never at the output path and never mistaken for the output.
A child stopped exactly inside the write makes that worst moment certain.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.io.mavlfile import read_file, to_bytes, write_file

REPO = Path(__file__).resolve().parents[2]
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MAVL_HOME": str(tmp / "home"),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _fuse_argv(chain: dict, out: Path, epochs: int) -> list[str]:
    d, ps = chain["dir"], chain["phantoms"]
    return ["fuse", str(d / "train.st"), str(d / "text.st"), "--lrf", str(d / "lrf.st"), "--labels", str(ps.splits["train"]),
            "--epochs", str(epochs), "--batch-size", "8", "-o", str(out)]


def _run(argv: list[str], tmp: Path, kill_after: float | None = None) -> tuple[int, float]:
    """Run mavl in a child process; SIGKILL it after ``kill_after`` seconds. Returns (exit status, seconds)."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "mavl_cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=_env(tmp), cwd=tmp)
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    p.stderr.close()
    return p.returncode, time.monotonic() - t0


def _check_folder(folder: Path, out: Path, previous: bytes | None) -> str:
    """The invariant after any kill; returns what was found ('absent', 'previous', 'complete')."""
    leftovers = [p.name for p in folder.iterdir() if p.name != out.name and p.name != "home"]
    for name in leftovers:
        m = TEMP_NAME.match(name)
        assert m and m["target"] == out.name, f"stray file after a kill: {name}"
    if not out.exists():
        assert previous is None, "the previous output vanished"
        return "absent"
    data = out.read_bytes()
    if previous is not None and data == previous:
        return "previous"
    f = read_file(out, expect="model")  # raises MavlError if half-written
    assert f.tensors["thresholds"].shape[0] == len(f.labels())
    return "complete"


def test_sigkill_at_random_moments(chain, tmp_path: Path) -> None:
    epochs = 150
    # One undisturbed run gives the time scale (and a valid file to overwrite later).
    ref = tmp_path / "ref"
    ref.mkdir()
    code, full = _run(_fuse_argv(chain, ref / "model.st", epochs), ref)
    assert code == 0
    previous = (ref / "model.st").read_bytes()

    rng = random.Random(7)
    delays = sorted([0.3, rng.uniform(0.4, 0.8) * full, rng.uniform(0.85, 1.02) * full])
    seen = []
    for i, delay in enumerate(delays):
        for overwrite in (False, True):
            d = tmp_path / f"kill{i}_{int(overwrite)}"
            d.mkdir()
            out = d / "model.st"
            if overwrite:
                out.write_bytes(previous[:-1] + b" ")  # a distinct previous file (still valid safetensors)
                prev = out.read_bytes()
            else:
                prev = None
            code, _ = _run(_fuse_argv(chain, out, epochs), d, kill_after=delay)
            seen.append((round(delay, 2), code, _check_folder(d, out, prev)))
    # Early kills must have left nothing (or the previous file); the record helps when this fails.
    print("full run", round(full, 2), "s; kills:", seen)
    assert seen[0][2] in ("absent", "previous"), seen


def test_sigkill_inside_the_write(tmp_path: Path) -> None:
    """Freeze a child between writing the temp file and renaming it, then SIGKILL it."""
    out = tmp_path / "emb.st"
    out.write_bytes(to_bytes("image-embeddings", {"features": [[1.0, 2.0]]}, {"ids": ["old.png"]}))
    previous = out.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, sys, time
        import numpy as np
        from mavl_cli.io import mavlfile
        def frozen_replace(src, dst):
            print("in-write", flush=True)
            time.sleep(600)
        os.replace = frozen_replace
        mavlfile.write_file({str(out)!r}, "image-embeddings", {{"features": np.ones((1000, 64), np.float32)}},
                            {{"ids": [f"{{i}}.png" for i in range(1000)]}})
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=_env(tmp_path), cwd=tmp_path)
    assert p.stdout.readline().strip() == b"in-write"
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert out.read_bytes() == previous  # the output path never saw a partial file
    temps = [q for q in tmp_path.iterdir() if q != out and q.name != "home"]
    assert len(temps) == 1 and TEMP_NAME.match(temps[0].name)["target"] == out.name  # the documented leftover
    # The leftover is itself complete (fsynced before the rename) but is hidden and never read as the output.
    assert read_file(temps[0]).tensors["features"].shape == (1000, 64)


@pytest.mark.parametrize("failure", ["fsync", "replace", "interrupt"])
def test_failed_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """An error or Ctrl-C during the write leaves the old file and no temp file."""
    out = tmp_path / "x.st"
    out.write_bytes(b"previous")

    def fail(*_a, **_k):
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync" if failure == "fsync" else "replace", fail)
    exc = KeyboardInterrupt if failure == "interrupt" else MavlError
    with pytest.raises(exc):
        write_file(out, "scores", {"scores": [[0.5]]}, {"ids": ["a"], "labels": ["Edema"]})
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x.st"]


def _wait_until_torch_loaded(pid: int, limit: float = 120.0) -> None:
    """Wait until the child has mapped libtorch (its imports are then well under way)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.2)


def test_ctrl_c_exits_130_and_writes_nothing(chain, tmp_path: Path) -> None:
    out = tmp_path / "model.st"
    p = subprocess.Popen([sys.executable, "-m", "mavl_cli", *_fuse_argv(chain, out, 100_000)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=_env(tmp_path), cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_until_torch_loaded(p.pid)
    time.sleep(3)  # past the imports: a Ctrl-C there is Python's, not mavl's, to handle
    p.send_signal(signal.SIGINT)
    try:  # one Ctrl-C only: a second one, arriving while the first is handled, is Python's own (exit -2)
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    # 130 is mavl's own exit; within a full suite the child was seen, rarely, to end by the signal itself
    # (-SIGINT, which a shell also reports as 130) after printing its message. Either way nothing may be left.
    assert p.returncode in (130, -signal.SIGINT), err.decode()[-300:]
    assert "interrupted" in err.decode()
    assert [q.name for q in tmp_path.iterdir() if q.name != "home"] == []
