"""`mavl embed-images` end to end: every input format and list source, precision, bad files,
and crash-safe resume (a real subprocess killed with SIGKILL, then resumed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.encoder_files import write_dicom
from PIL import Image

from mavl_cli.io.checkpoint import CheckpointLog, read_checkpoint
from mavl_cli.io.mavlfile import read_file

VIT = "vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[2]


def _gray(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 50, w))
    return np.clip(base + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)


def _run(cli, args: list, **kw):
    r = cli([str(a) for a in args], **kw)
    return r


def _embed_args(tiny_vit: Path, out: Path, *extra) -> list:
    return ["--backbone", VIT, "--weights", tiny_vit, "-o", out, *extra]


# --------------------------------------------------------------------------- formats and inputs


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """One file per format radiology data ships in, some in a subfolder."""
    d = tmp_path_factory.mktemp("mixed")
    (d / "sub" / "deeper").mkdir(parents=True)
    g = _gray(1)
    Image.fromarray(g).save(d / "gray8.png")
    Image.fromarray((g.astype(np.uint16) * 16 + 7)).save(d / "gray16.png")  # 12-bit data in a 16-bit PNG
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    Image.fromarray(rgba, "RGBA").save(d / "sub" / "opaque_rgba.png")  # same pixels as gray8.png
    Image.fromarray(g).convert("P").save(d / "sub" / "palette.png")
    Image.fromarray(_gray(2)).save(d / "sub" / "deeper" / "photo.jpg", quality=90)
    colour = np.dstack([_gray(3), _gray(4), _gray(5)])
    Image.fromarray(colour, "RGB").save(d / "colour.png")
    stored = (_gray(6).astype(np.uint16) * 16) | np.uint16(0xF000)  # junk above BitsStored
    mono1 = write_dicom(d / "sub" / "mono1.dcm", stored, "MONOCHROME1", 12,
                        RescaleSlope="1", RescaleIntercept="-100", WindowCenter="1900", WindowWidth="3600")
    import pydicom

    assert pydicom.dcmread(mono1).pixel_array.shape == stored.shape
    return d


def test_mixed_folder_every_format(cli, tiny_vit, mixed_folder, tmp_path):
    out = tmp_path / "mixed.st"
    r = _run(cli, ["embed-images", mixed_folder, *_embed_args(tiny_vit, out)])
    assert r.exit_code == 0, r.stderr
    f = read_file(out, expect="image-embeddings")
    expected = {"gray8.png", "gray16.png", "colour.png", "sub/opaque_rgba.png", "sub/palette.png",
                "sub/deeper/photo.jpg", "sub/mono1.dcm"}
    assert set(f.ids()) == expected and f.meta["skipped"] == []
    x = f.tensors["features"]
    assert x.shape == (7, 48) and x.dtype == np.float32 and np.isfinite(x).all()
    assert f.meta["precision"] == "fp32" and f.meta["backbone"] == VIT
    row = {i: x[k] for k, i in enumerate(f.ids())}
    # an opaque RGBA and a palette copy of a gray image are that gray image
    assert np.array_equal(row["sub/opaque_rgba.png"], row["gray8.png"])
    assert np.allclose(row["sub/palette.png"], row["gray8.png"], atol=1e-5)
    # every other file is a different picture
    others = [row[k] for k in sorted(expected - {"sub/opaque_rgba.png", "sub/palette.png"})]
    assert len({v.tobytes() for v in others}) == len(others)
    assert "images" in r.stdout and "7" in r.stdout


def test_chexpert_csv_with_prefix_and_root(cli, tiny_vit, tmp_path):
    root = tmp_path / "data" / "CheXpert-v1.0-small"
    rows = []
    for k, (patient, study, view) in enumerate([("patient00001", "study1", "view1_frontal"),
                                               ("patient00002", "study1", "view1_frontal"),
                                               ("patient00002", "study2", "view2_lateral")]):
        p = root / "train" / patient / study / f"{view}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_gray(10 + k)).save(p, quality=92)
        rows.append(f"CheXpert-v1.0-small/train/{patient}/{study}/{view}.jpg,Female,68,Frontal,AP,,1.0,-1.0,0.0")
    rows.reverse()  # the CSV's order, not the folder's, is the output order
    csv = tmp_path / "train.csv"
    csv.write_text("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pneumothorax\n" + "\n".join(rows) + "\n")
    want = [r.split(",")[0].removeprefix("CheXpert-v1.0-small/") for r in rows]
    for root_arg in (root, root.parent):  # the dataset folder or the folder holding it
        out = tmp_path / f"cx_{root_arg.name}.st"
        r = _run(cli, ["embed-images", "--labels", csv, "--root", root_arg, *_embed_args(tiny_vit, out)])
        assert r.exit_code == 0, r.stderr
        f = read_file(out)
        assert f.ids() == want and f.tensors["features"].shape == (3, 48)


def test_paths_and_ids_from_stdin(cli, tiny_vit, mixed_folder, tmp_path):
    names = ["gray8.png", "sub/palette.png", "sub/mono1.dcm"]
    out1 = tmp_path / "stdin_paths.st"
    paths = "".join(f"{mixed_folder / n}\n" for n in names).encode()
    r = _run(cli, ["embed-images", "-", *_embed_args(tiny_vit, out1)], input=paths)
    assert r.exit_code == 0, r.stderr
    f1 = read_file(out1)
    assert len(f1.ids()) == 3
    # ids relative to --root, one per line (blank lines ignored)
    out2 = tmp_path / "stdin_ids.st"
    r = _run(cli, ["embed-images", "-", "--root", mixed_folder, *_embed_args(tiny_vit, out2)],
             input=("\n".join(names) + "\n\n").encode())
    assert r.exit_code == 0, r.stderr
    f2 = read_file(out2)
    assert f2.ids() == names
    assert np.array_equal(f2.tensors["features"], f1.tensors["features"])
    # an id that is not under the root: stop, or skip and record it with --skip-bad
    bad = ("\n".join([*names, "sub/missing.png"]) + "\n").encode()
    r = _run(cli, ["embed-images", "-", "--root", mixed_folder, *_embed_args(tiny_vit, tmp_path / "x.st")], input=bad)
    assert r.exit_code == 2 and "missing.png" in r.stderr
    r = _run(cli, ["embed-images", "-", "--root", mixed_folder, "--skip-bad", *_embed_args(tiny_vit, tmp_path / "y.st")], input=bad)
    assert r.exit_code == 0, r.stderr
    assert [s["id"] for s in read_file(tmp_path / "y.st").meta["skipped"]] == ["sub/missing.png"]


def test_glob_input(cli, tiny_vit, mixed_folder, tmp_path):
    out = tmp_path / "glob.st"
    r = _run(cli, ["embed-images", f"{mixed_folder}/**/*.png", *_embed_args(tiny_vit, out)])
    assert r.exit_code == 0, r.stderr
    assert len(read_file(out).ids()) == 5


# --------------------------------------------------------------------------- bad files


def test_unreadable_image_stops_or_is_skipped_and_listed(cli, tiny_vit, mixed_folder, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for k in range(3):
        Image.fromarray(_gray(20 + k)).save(d / f"ok{k}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "bad.st"
    r = _run(cli, ["embed-images", d, *_embed_args(tiny_vit, out)])
    assert r.exit_code == 2
    assert "broken.jpg" in r.stderr and "--skip-bad" in r.stderr
    assert not out.exists() and not (tmp_path / "bad.st.partial").exists()  # nothing finished: no checkpoint left
    r = _run(cli, ["embed-images", d, "--skip-bad", *_embed_args(tiny_vit, out)])
    assert r.exit_code == 0, r.stderr
    f = read_file(out)
    assert f.ids() == ["ok0.png", "ok1.png", "ok2.png"]
    (skip,) = f.meta["skipped"]
    assert skip["id"] == "broken.jpg" and skip["path"].endswith("broken.jpg") and skip["reason"]
    assert "skipped" in r.stdout and "broken.jpg" in r.stderr  # summary row and warning line
    assert not (tmp_path / "bad.st.partial").exists()


# --------------------------------------------------------------------------- precision


def test_precision_int8_and_refusals(cli, tiny_vit, mixed_folder, tmp_path):
    out32, out8 = tmp_path / "fp32.st", tmp_path / "int8.st"
    assert _run(cli, ["embed-images", mixed_folder, *_embed_args(tiny_vit, out32)]).exit_code == 0
    r = _run(cli, ["embed-images", mixed_folder, "--precision", "int8", *_embed_args(tiny_vit, out8)])
    assert r.exit_code == 0, r.stderr
    a, b = read_file(out32), read_file(out8)
    assert b.meta["precision"] == "int8" and a.ids() == b.ids()
    x, y = a.tensors["features"], b.tensors["features"]
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.mean() > 0.95
    for prec, msg in (("bf16", "needs a GPU"), ("fp16", "needs a GPU"), ("fp8", "unknown precision")):
        r = _run(cli, ["embed-images", mixed_folder, "--precision", prec, "--device", "cpu", *_embed_args(tiny_vit, tmp_path / "p.st")])
        assert r.exit_code == 2 and msg in r.stderr, r.stderr


# --------------------------------------------------------------------------- checkpoint and resume


def test_checkpoint_log_roundtrip_and_torn_tail(tmp_path):
    p = tmp_path / "x.partial"
    log = CheckpointLog(p, {"fingerprint": "abc", "batch_size": 2}, resume=False)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    log.append(rows[:2], ["a", "b"], [], 2)
    log.append(rows[2:], ["c", "d"], [{"id": "e", "path": "e", "reason": "bad"}], 5)
    log.close()
    st, end = read_checkpoint(p)
    assert st.ids == list("abcd") and st.position == 5 and [s["id"] for s in st.skipped] == ["e"]
    assert np.array_equal(np.concatenate(st.features), rows) and end == p.stat().st_size
    size_two = p.stat().st_size
    log = CheckpointLog(p, {"fingerprint": "abc", "batch_size": 2}, resume=True)
    log.append(rows[:1], ["f"], [], 6)
    log.close()
    with open(p, "r+b") as fh:  # a kill in the middle of a write leaves a torn record
        fh.truncate(p.stat().st_size - 3)
    st, end = read_checkpoint(p)
    assert st.ids == list("abcd") and end == size_two
    from mavl_cli.core.errors import MavlError

    with pytest.raises(MavlError, match="different image list"):
        CheckpointLog(p, {"fingerprint": "other"}, resume=True)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for k in range(400):
        sub = d / f"p{k // 100}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(sub / f"img{k:04d}.png")
    return d


def _spawn(args: list, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "MAVL_CHECKPOINT_EVERY": "1", "COLUMNS": "200", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "mavl_cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _records(partial: Path) -> int:
    try:
        return len(read_checkpoint(partial)[0].ids)
    except Exception:
        return 0


def _kill_mid_run(args: list, partial: Path, sig: int, at_least: int = 8) -> tuple[subprocess.Popen, str]:
    proc = _spawn(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and _records(partial) >= at_least:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"run finished before it could be interrupted: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err.decode(errors="replace")


def test_sigkill_then_resume_gives_identical_file(cli, tiny_vit, many_images, tmp_path):
    ref = tmp_path / "ref.st"
    args = ["embed-images", many_images, "--batch-size", "2", "--workers", "1", "--backbone", VIT, "--weights", tiny_vit]
    r = _run(cli, [*args, "-o", ref])
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "out.st"
    partial = Path(str(out) + ".partial")
    proc, _ = _kill_mid_run([*args, "-o", out], partial, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not out.exists() and partial.exists()
    done = _records(partial)
    assert 0 < done < 400
    r = _run(cli, [*args, "-o", out])  # without --resume: refuse, keep the checkpoint
    assert r.exit_code == 2 and "--resume" in r.stderr and partial.exists()
    r = _run(cli, [*args, "-o", out, "--resume"])
    assert r.exit_code == 0, r.stderr
    assert not partial.exists()
    a, b = read_file(ref), read_file(out)
    assert a.ids() == b.ids() and len(a.ids()) == 400
    assert a.tensors["features"].tobytes() == b.tensors["features"].tobytes()
    assert a.meta["skipped"] == b.meta["skipped"] == []


def test_ctrl_c_keeps_checkpoint_and_says_how_to_resume(tiny_vit, many_images, tmp_path):
    out = tmp_path / "out.st"
    partial = Path(str(out) + ".partial")
    args = ["embed-images", many_images, "--batch-size", "2", "--backbone", VIT, "--weights", tiny_vit, "-o", out]
    proc, err = _kill_mid_run(args, partial, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "--resume" in err and "interrupted after" in err
    assert partial.exists() and _records(partial) > 0 and not out.exists()


def test_resume_with_a_different_list_is_refused(cli, tiny_vit, mixed_folder, many_images, tmp_path):
    out = tmp_path / "o.st"
    partial = Path(str(out) + ".partial")
    CheckpointLog(partial, {"fingerprint": "0" * 16, "batch_size": 2}, resume=False).close()
    r = _run(cli, ["embed-images", mixed_folder, "--resume", *_embed_args(tiny_vit, out)])
    assert r.exit_code == 2 and "different image list" in r.stderr


def test_nih_style_nested_folders_are_found_by_file_name(tmp_path):
    """NIH ships images_001/images/*.png ... while its CSV names bare files: rows are found by unique file name."""
    from PIL import Image

    from mavl_cli.datasets.inputs import collect_inputs

    for i, sub in enumerate(("images_001/images", "images_002/images")):
        (tmp_path / sub).mkdir(parents=True)
        Image.new("L", (8, 8), 40 * i).save(tmp_path / sub / f"0000000{i}_000.png")
    (tmp_path / "dup").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "dup" / "00000001_000.png")  # the same name twice: ambiguous
    Image.new("L", (8, 8)).save(tmp_path / "images_001" / "images" / "00000009_000.png")
    csv = tmp_path / "Data_Entry.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID\n00000009_000.png,Effusion,9\n00000000_000.png,No Finding,0\n"
                   "00000001_000.png,Cardiomegaly,1\n00000005_000.png,Edema,5\n")
    items, missing = collect_inputs([str(tmp_path)], csv)
    assert [it.id for it in items] == ["00000009_000.png", "00000000_000.png"]  # CSV order kept
    assert items[1].path == tmp_path / "images_001" / "images" / "00000000_000.png"
    reasons = {m["id"]: m["reason"] for m in missing}
    assert "more than once" in reasons["00000001_000.png"] and reasons["00000005_000.png"] == "file not found"
