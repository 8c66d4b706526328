"""Bad inputs, what commands write: outputs, temporaries, modes, kills and pipes."""

from __future__ import annotations

import json

import pytest

from tests.bad_inputs.catalogue import EV, FU, OVERWRITE, PH, E
from tests.bad_inputs.forge import forge_first_record, one_error, tune_args
from tests.conftest import run_cli


def test_i15_02_outputs_never_replace_the_default_model(bad, tmp_path, monkeypatch) -> None:
    """`predict --out ~/.mavl/model.safetensors` with no --model, or any output that is the default model
    under another name (a hard link: same device and inode), is refused and the model stays byte-identical."""
    import os

    home = tmp_path / "home"
    home.mkdir()
    model = home / "model.safetensors"
    model.write_bytes(bad["tuned"].read_bytes())
    before = model.read_bytes()
    monkeypatch.setenv("MAVL_HOME", str(home))
    line = one_error(run_cli(["predict", bad["img0"], "--weights", bad["vit"], "--out", model]))
    assert OVERWRITE in line and "model.safetensors" in line
    alias = tmp_path / "alias.st"
    os.link(model, alias)
    line = one_error(run_cli(tune_args(bad, alias)))
    assert "default model" in line and "alias.st" in line
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["alias.st", "home"]


def test_i15_04_device_nodes_are_never_replaced(bad, tmp_path) -> None:
    """A device node is refused (never replaced by a regular file); /dev/null and /dev/stdout just work."""
    import os
    import stat

    from mavl_cli.io.mavlfile import loads

    node = tmp_path / "null_copy"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        node = None
    if node is not None:
        line = one_error(run_cli(tune_args(bad, node)))
        assert "not a regular file" in line and "null_copy" in line
        assert stat.S_ISCHR(os.stat(node).st_mode)
    r = run_cli(tune_args(bad, "/dev/null"))
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    r = run_cli(tune_args(bad, "/dev/stdout"))
    assert r.exit_code == 0, r.stderr
    assert loads(r.stdout_bytes).kind == "model"
    assert [p.name for p in tmp_path.iterdir()] == (["null_copy"] if node else [])


def test_i15_05_phantoms_and_weights_are_written_atomically(tmp_path, monkeypatch) -> None:
    """A failure while `phantoms` writes its CSVs leaves no half-made folder; `import-weights` writes each file
    atomically and config.json last, so a folder with a config.json is complete."""
    import os

    import timm
    from safetensors.torch import save_file

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        line = one_error(run_cli(["phantoms", tmp_path / "ph", "-n", "3", "--size", "64"]))
        assert "no space left" in line.lower()
        assert not (tmp_path / "ph").exists()
        src = tmp_path / "r18.safetensors"
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(src))
        line = one_error(run_cli(["import-weights", src, "--backbone", "resnet18", "-o", tmp_path / "w"]))
        assert not (tmp_path / "w" / "config.json").exists()
        assert not [p for p in tmp_path.rglob(".*.tmp")]
    r = run_cli(["import-weights", src, "--backbone", "resnet18", "-o", tmp_path / "w"])
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "w" / "config.json").read_text())["architecture"] == "resnet18"


def test_i15_06_outputs_get_the_umask_mode(bad, tmp_path) -> None:
    """New outputs are 0666 & ~umask (readable by colleagues on a shared disk); a replaced file keeps its mode."""
    import os
    import stat

    for mask in (0o022, 0o002, 0o077):
        old = os.umask(mask)
        try:
            out = tmp_path / f"m{mask:o}.st"
            r = run_cli(tune_args(bad, out))
            assert r.exit_code == 0, r.stderr
            assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~mask
        finally:
            os.umask(old)
    out = tmp_path / "m22.st"
    os.chmod(out, 0o640)
    assert run_cli(tune_args(bad, out)).exit_code == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640


def test_i15_07_the_next_run_removes_its_stale_temporaries(bad, tmp_path) -> None:
    """A kill at the rename leaves `.NAME.XXXXXXXX.tmp`; the next run writing NAME removes it, but never a
    temporary that a live writer holds (its lock) nor another output's."""
    import fcntl
    import os
    import time

    out = tmp_path / "out.st"
    stale, live, other = (tmp_path / n for n in (".out.st.k9x2_abc.tmp", ".out.st.live5678.tmp", ".other.st.abcd1234.tmp"))
    for p in (stale, live, other):
        p.write_bytes(b"half a model")
        os.utime(p, (time.time() - 60, time.time() - 60))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = run_cli(tune_args(bad, out))
    assert r.exit_code == 0, r.stderr
    assert not stale.exists() and live.exists() and other.exists() and out.exists()


def test_i15_14_link_cycles_are_walked_once(tmp_path) -> None:
    """Two self-links (`l1 -> .`, `l2 -> .`) made the NIH file-name index walk exponential; each real folder
    is now entered once, and every image is found once."""
    import os
    import time

    from PIL import Image

    from mavl_cli.datasets.inputs import collect_inputs

    sub = tmp_path / "images_001" / "images"
    sub.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 50 * i).save(sub / f"0000000{i}_000.png")
    for k in range(1, 6):
        os.symlink(".", tmp_path / f"l{k}")
        os.symlink("..", sub / f"up{k}")
    csv = tmp_path / "Data_Entry.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID\n" + "".join(f"0000000{i}_000.png,Edema,{i}\n" for i in range(3)))
    t = time.monotonic()
    items, missing = collect_inputs([str(tmp_path)], csv)
    assert time.monotonic() - t < 10
    assert [it.id for it in items] == [f"0000000{i}_000.png" for i in range(3)] and not missing


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads and writes everything: permissions cannot be tested")
def test_i15_20_permissions_are_reported_as_such(bad, tmp_path, monkeypatch) -> None:
    """An unwritable $MAVL_HOME is found before the work; an unreadable weights file says 'permission denied'."""
    import os

    home = tmp_path / "home"
    home.mkdir(mode=0o500)
    monkeypatch.setenv("MAVL_HOME", str(home))
    line = one_error(run_cli(FU(bad, tmp_path / "m.st", bad["text"]) + ["--set-default"]))
    assert "not writable" in line and not (tmp_path / "m.st").exists()
    w = tmp_path / "w.safetensors"
    w.write_bytes((bad["vit"] / "model.safetensors").read_bytes())
    os.chmod(w, 0)
    line = one_error(run_cli(["embed-images", bad["img0"], *E, "--weights", w, "-o", tmp_path / "o.st"]))
    assert "permission denied" in line.lower()


def test_i15_24_resume_after_a_kill_is_identical(killed_embed, tmp_path, monkeypatch) -> None:
    """The thread setting is recorded in the checkpoint and reused on --resume (whatever the tuner would pick
    now), so the resumed file's features are byte-identical to an uninterrupted run's."""
    from mavl_cli.io.checkpoint import read_checkpoint_header
    from mavl_cli.io.mavlfile import read_file

    partial = tmp_path / "out.st.partial"
    partial.write_bytes(killed_embed["partial"])
    assert read_checkpoint_header(partial)["threads"] == 1
    monkeypatch.delenv("MAVL_THREADS", raising=False)
    r = run_cli([*killed_embed["args"], "-o", tmp_path / "out.st", "--resume"])
    assert r.exit_code == 0, r.stderr
    a, b = read_file(killed_embed["ref"]), read_file(tmp_path / "out.st")
    assert b.meta["threads"] == a.meta["threads"] == 1
    assert a.ids() == b.ids() and len(a.ids()) == killed_embed["n"]
    assert a.tensors["features"].tobytes() == b.tensors["features"].tobytes()
    assert not partial.exists()


@pytest.mark.parametrize("forgery", ["other-ids", "reordered-ids", "position-beyond-the-list"])
def test_i15_25_forged_checkpoint_records_are_refused(forgery, killed_embed, tmp_path) -> None:
    """A .partial whose records are intact (valid CRCs) but not this run's first images is refused."""
    def edit(meta):
        if forgery == "other-ids":
            meta["ids"] = ["images/not_in_this_run.png"] * len(meta["ids"])
        elif forgery == "reordered-ids":
            meta["ids"] = meta["ids"][::-1]
        else:
            meta["position"] = 10**9

    partial = tmp_path / "out.st.partial"
    partial.write_bytes(forge_first_record(killed_embed["partial"], edit))
    before = partial.read_bytes()
    line = one_error(run_cli([*killed_embed["args"], "-o", tmp_path / "out.st", "--resume"]))
    assert "out.st.partial" in line and ("does not belong" in line or "malformed" in line), line
    assert not (tmp_path / "out.st").exists() and partial.read_bytes() == before


def test_i15_26_a_closed_stdout_is_an_error(bad) -> None:
    """`mavl ... -o - | head -c 10`: the reader goes away after 10 bytes; mavl must fail (no success table)."""
    import subprocess
    import sys

    from tests.models import test_embed as te

    for argv in (tune_args(bad, "-"),):  # the model is ~0.5 MB: far beyond a pipe's 64 KiB buffer
        proc = subprocess.Popen([sys.executable, "-m", "mavl_cli", *map(str, argv)], cwd=te.REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**__import__("os").environ, "COLUMNS": "200"})
        head = proc.stdout.read(10)
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=120)
        assert len(head) == 10
        assert proc.returncode != 0, err
        lines = [ln for ln in err.splitlines() if ln.strip() and "error:" in ln]
        assert len(lines) == 1 and "standard output" in lines[0], err
        assert "thresholds (" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_s3_24_html_and_plot_to_stdout_are_documents(bad, tmp_path, monkeypatch) -> None:
    """`evaluate --html -` printed the report's tables after the HTML on stdout; `--plot -` wrote a file named
    '-' (mode 0600). Now `-` is standard output for both (tables to stderr), and a plot file gets the umask's mode."""
    import os

    monkeypatch.chdir(tmp_path)
    r = run_cli([*EV(bad), "--html", "-"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.lstrip().startswith("<!DOCTYPE html>") and r.stdout.rstrip().endswith("</html>"), r.stdout[-200:]
    assert "macro F1" in r.stderr
    r = run_cli([*EV(bad), "--plot", "-"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes.startswith(b"\x89PNG\r\n\x1a\n") and not (tmp_path / "-").exists()
    old = os.umask(0o022)
    try:
        r = run_cli([*EV(bad), "--plot", tmp_path / "p.png"])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o644


def test_s3_28_stages_read_stdin_once_and_pipe_cleanly(bad, tmp_path) -> None:
    """`cat model | mavl calibrate - VAL ...` read MODEL twice from stdin and failed on the empty second read;
    `mavl predict ... --out - | mavl evaluate --scores -` got the scores followed by the prediction tables."""
    from mavl_cli.io.mavlfile import loads, read_file

    out = tmp_path / "cal.st"
    r = run_cli(["calibrate", "-", bad["val"], "--labels", bad["val_csv"], "-o", out], input=bad["tuned"].read_bytes())
    assert r.exit_code == 0, r.stderr
    assert "calibration.a" in read_file(out).tensors
    r = run_cli([*PH(bad, bad["img0"]), "--out", "-"])
    assert r.exit_code == 0, r.stderr
    scores = loads(r.stdout_bytes, "-")  # the whole stream is one scores file: nothing printed after it
    assert scores.kind == "scores" and len(scores.ids()) == 1
