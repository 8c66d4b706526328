"""The broken inputs, built once per session from the session ``chain`` (see forge.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.bad_inputs.catalogue import E
from tests.bad_inputs.forge import (
    VIT,
    VIT32_ARGS,
    Payload,
    dicom_without_pixels,
    forge_issue15,
    forge_s3,
    png_header_only,
    rewrite_header,
    with_tensor,
)
from tests.conftest import build_tiny_bert, run_cli


@pytest.fixture(scope="session")
def bad(chain, tiny_vit: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every input the catalogue needs: the chain's good files plus forged bad ones."""
    import timm
    import torch

    from mavl_cli.encoders.timm import save_local_backbone

    c = chain["dir"]
    ps = chain["phantoms"]
    d = tmp_path_factory.mktemp("bad_inputs")
    f: dict[str, Path] = {name: c / f"{name}.st" for name in ("train", "val", "test", "lrf", "text", "model", "tuned")}
    f.update(labels_txt=c / "labels.txt", root=ps.root, train_csv=ps.splits["train"], val_csv=ps.splits["val"],
             test_csv=ps.splits["test"], vit=tiny_vit)

    # A second tiny ViT with 32-d features (the chain's is 48-d): stage dimension mismatches.
    torch.manual_seed(1)
    vit32 = save_local_backbone(timm.create_model(VIT, pretrained=False, **VIT32_ARGS), VIT, d / "vit32", VIT32_ARGS)
    f["vit32"] = vit32
    f["val32"] = d / "val32.st"
    r = run_cli(["embed-images", ps.root, "--labels", ps.splits["val"], "--backbone", VIT, "--weights", vit32, "-o", f["val32"]])
    assert r.exit_code == 0, r.stderr

    # Images that cannot be decoded.
    good_png = next(iter(sorted((ps.root / "images").glob("*.png"))))
    (d / "empty_dir").mkdir()
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good_png.read_bytes()[:120])
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    dicom_without_pixels(d / "nopixels.dcm")
    for k in ("empty_dir", "zero.png", "truncated.png", "text.jpg", "bomb.png", "nopixels.dcm"):
        f[k] = d / k

    # Label files.
    import pandas as pd

    df = pd.read_csv(ps.splits["train"])
    f["csv_nopath"] = d / "nopath.csv"
    df.drop(columns=["Path"]).to_csv(f["csv_nopath"], index=False)
    f["csv_nopneumo"] = d / "no_pneumothorax.csv"
    df.drop(columns=["Pneumothorax"]).to_csv(f["csv_nopneumo"], index=False)
    f["csv_badvalue"] = d / "bad_value.csv"
    bv = df.copy()
    bv["Edema"] = bv["Edema"].astype(object)
    bv.loc[3, "Edema"] = "yes"
    bv.to_csv(f["csv_badvalue"], index=False)
    f["csv_otherpaths"] = d / "other_paths.csv"
    op = df.copy()
    op["Path"] = [f"elsewhere/img{i}.png" for i in range(len(op))]
    op.to_csv(f["csv_otherpaths"], index=False)

    # Text files and descriptions.
    f["empty_txt"] = d / "empty_labels.txt"
    f["empty_txt"].write_text("# only a comment\n\n")
    f["notes_txt"] = d / "notes.txt"
    f["notes_txt"].write_text("just some notes, not a safetensors file\n")
    f["bert_notok"] = build_tiny_bert(d / "bert_no_tokenizer", with_tokenizer=False)

    # Broken safetensors files.
    data = f["train"].read_bytes()
    f["corrupt_header"] = d / "corrupt_header.st"
    f["corrupt_header"].write_bytes(data[:8] + b"#" + data[9:])
    f["truncated_st"] = d / "truncated.st"
    f["truncated_st"].write_bytes(data[: len(data) // 2])
    f["newer"] = d / "newer.st"
    f["newer"].write_bytes(rewrite_header(data, lambda h: h["__metadata__"].update(mavl_format="99")))
    f["nan"] = d / "nan.st"
    f["nan"].write_bytes(with_tensor(f["train"], "features", lambda a: a.__setitem__((0, 0), np.nan)))
    f["inf_model"] = d / "inf_model.st"
    f["inf_model"].write_bytes(with_tensor(f["tuned"], "text.embeddings", lambda a: a.__setitem__((0, 0, 0), np.inf)))
    from safetensors.numpy import save

    f["foreign"] = d / "foreign.safetensors"
    f["foreign"].write_bytes(save({"x": np.zeros((2, 2), np.float32)}))

    # Weights that would run code if unpickled.
    f["marker"] = d / "PAYLOAD_RAN"
    f["evil_pth"] = d / "evil.pth"
    torch.save({"cls_token": Payload(f["marker"])}, f["evil_pth"])

    # A scores file, so every kind of mavl file is at hand for the wrong-kind matrix.
    f["scores"] = d / "scores.st"
    r = run_cli(["predict", ps.root / "images", "--model", f["tuned"], "--weights", tiny_vit, "--out", f["scores"], "--json"])
    assert r.exit_code == 0, r.stderr

    # An existing output that a failed run must leave alone, and a regular file to put paths under.
    f["existing"] = d / "existing.st"
    f["existing"].write_bytes(f["tuned"].read_bytes())
    f["regular"] = d / "regular_file"
    f["regular"].write_text("x")
    forge_issue15(f, d)
    forge_s3(f, d)
    return f


@pytest.fixture(scope="module")
def killed_embed(bad, tmp_path_factory):
    """An embed-images run killed with SIGKILL mid-way (MAVL_THREADS=1): its checkpoint, and a reference run."""
    import signal

    from tests.models import test_embed as te

    d = tmp_path_factory.mktemp("killed")
    args = ["embed-images", bad["root"] / "images", "--batch-size", "2", "--workers", "1", *E, "--weights", bad["vit"]]
    ref = d / "ref.st"
    r = run_cli([*args, "-o", ref], env={"MAVL_THREADS": "1"})
    assert r.exit_code == 0, r.stderr
    out = d / "killed.st"
    partial = Path(str(out) + ".partial")
    env = {**__import__("os").environ, "MAVL_THREADS": "1"}
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mavl_cli", *map(str, args), "-o", out], cwd=te.REPO,
                            env={**env, "MAVL_CHECKPOINT_EVERY": "1", "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and te._records(partial) < 6:
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-400:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert partial.exists() and not out.exists()
    return {"args": args, "ref": ref, "partial": partial.read_bytes(), "n": len(list((bad["root"] / "images").glob("*.png")))}


