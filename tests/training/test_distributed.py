"""torch.distributed on CPU (gloo), launched by the real torchrun, as CI runs it.

- embed-images under `torchrun --nproc-per-node 2` writes the single-process file byte for byte;
- a rank killed mid-run: the job fails, no merged file, each rank's checkpoint kept, and the same
  command with --resume finishes the job with the single-process file again;
- a rank that hits an unreadable image stops the job with that rank's one-line error, no file;
- finetune-lrf with DDP over 2 ranks: the loss falls, and it matches one process with the same
  global batch: head within 1e-4, backbone within 1e-3 (measured: 6e-7 and 2e-5 after 3 epochs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mavl_cli.io.mavlfile import read_file

VIT = "vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[2]


def _torchrun(args: list, cwd: Path, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "MAVL_CHECKPOINT_EVERY": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mavl_cli", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def _in(cli, folder: Path, argv: list, monkeypatch) -> None:
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    r = cli([str(a) for a in argv])
    assert r.exit_code == 0, r.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist_images")
    rng = np.random.default_rng(3)
    for k in range(90):
        Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(d / f"img{k:03d}.png")
    return d


def _embed_args(images: Path, tiny_vit: Path) -> list:
    # one forward thread everywhere: torchrun gives each rank one (OMP_NUM_THREADS=1)
    return ["embed-images", images, "--backbone", VIT, "--weights", tiny_vit, "--batch-size", "2", "--workers", "1",
            "--threads", "1", "--device", "cpu"]


def test_torchrun_embed_images_is_byte_identical_to_one_process(cli, images, tiny_vit, tmp_path, monkeypatch):
    args = _embed_args(images, tiny_vit)
    _in(cli, tmp_path / "one", [*args, "-o", "out.st"], monkeypatch)
    (tmp_path / "two").mkdir()
    rc, err = _finish(_torchrun([*args, "-o", "out.st"], tmp_path / "two"))
    assert rc == 0, err[-2000:]
    assert (tmp_path / "two" / "out.st").read_bytes() == (tmp_path / "one" / "out.st").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["out.st"]  # rank checkpoints removed


def _rank_pid(parent: int, rank: int) -> int | None:
    """The worker process torchrun started for ``rank`` (found by its RANK variable)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the rank's process")
def test_killed_rank_fails_the_job_without_a_file_and_resume_finishes_it(cli, images, tiny_vit, tmp_path, monkeypatch):
    args = _embed_args(images, tiny_vit)
    _in(cli, tmp_path / "one", [*args, "-o", "out.st"], monkeypatch)
    work = tmp_path / "two"
    work.mkdir()
    proc = _torchrun([*args, "-o", "out.st"], work)
    partial = work / "out.st.partial.rank1-of-2"
    deadline = time.monotonic() + 240
    pid = None
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.stat().st_size > 2000:
            pid = _rank_pid(proc.pid, 1)
            if pid:
                break
        time.sleep(0.01)
    assert pid, "rank 1 finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    rc, err = _finish(proc)
    assert rc != 0
    assert not (work / "out.st").exists()
    assert "rank: 1" in err or "rank 1" in err, err[-2000:]  # torchrun names the failed rank
    assert partial.exists()
    rc, err = _finish(_torchrun([*args, "-o", "out.st", "--resume"], work))
    assert rc == 0, err[-2000:]
    a, b = read_file(tmp_path / "one" / "out.st"), read_file(work / "out.st")
    assert a.ids() == b.ids() and len(a.ids()) == 90 and b.meta["skipped"] == []
    assert a.tensors["features"].tobytes() == b.tensors["features"].tobytes()  # only `command` differs: it has --resume
    assert not partial.exists()


def test_a_failing_rank_stops_every_rank_with_its_message(images, tiny_vit, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(images.iterdir())[:8]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorts last: rank 1's shard
    rc, err = _finish(_torchrun([*_embed_args(folder, tiny_vit), "-o", "out.st"], tmp_path))
    assert rc != 0
    assert "error: rank 1:" in err and "zz_broken.png" in err and "--skip-bad" in err, err[-2000:]
    assert not (tmp_path / "out.st").exists()


def test_ddp_finetune_matches_one_process_and_the_loss_falls(phantom_set, tiny_vit, tmp_path, monkeypatch):
    from tests.conftest import run_cli
    from safetensors.numpy import load_file

    args = ["finetune-lrf", phantom_set.root, "--labels", phantom_set.splits["train"], "--val-labels", phantom_set.splits["val"],
            "-o", "head.st", "--backbone-out", "bb", "--backbone", VIT, "--weights", tiny_vit, "--rank", "16", "--keep", "4",
            "--epochs", "3", "--batch-size", "8", "--dropout", "0", "--device", "cpu", "--workers", "1", "--lr", "1e-2",
            "--backbone-lr", "1e-3", "--eta", "0.05"]
    (tmp_path / "one").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    r = run_cli([str(a) for a in args])
    assert r.exit_code == 0, r.stderr
    (tmp_path / "two").mkdir()
    rc, err = _finish(_torchrun(args, tmp_path / "two"))
    assert rc == 0, err[-2000:]
    one, two = read_file(tmp_path / "one" / "head.st"), read_file(tmp_path / "two" / "head.st")
    assert two.meta["ranks"] == 2 and "ranks" not in one.meta
    hist = two.meta["history"]
    assert hist[-1]["bce"] < hist[0]["bce"]
    assert [h["bce"] for h in hist] == pytest.approx([h["bce"] for h in one.meta["history"]], rel=1e-4)
    for k in one.tensors:
        assert np.abs(one.tensors[k] - two.tensors[k]).max() < 1e-4, k
    a, b = load_file(str(tmp_path / "one" / "bb" / "model.safetensors")), load_file(str(tmp_path / "two" / "bb" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-3
    assert not any((tmp_path / "two").glob("*.tmp"))


def test_launch_variables_of_torchrun_and_slurm():
    from mavl_cli.core.errors import MavlError
    from mavl_cli.training.distributed import launch_env

    assert launch_env({}) is None
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one process: no process group
    assert launch_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}) == (5, 8, 1)
    assert launch_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}) is None  # srun alone: no rendezvous
    assert launch_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "n1"}) == (2, 4, 0)
    for bad in ({"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}):
        with pytest.raises(MavlError):
            launch_env(bad)
