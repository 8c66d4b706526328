"""A catalogue of bad inputs across every command: each must fail as a user error.

For every case the contract is the same: exit code 2, exactly one line on
stderr that starts with ``error:``, names the offending file (or option) and
the problem, no traceback, no output file created (or the previous one left
byte-identical), no stray temp or ``.partial`` file, and the inputs unchanged.
The valid inputs come from the session ``chain``; the broken ones are built
once per module from it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import TINY_VIT_ARGS, build_tiny_bert, run_cli

VIT = "vit_tiny_patch16_224"
VIT32_ARGS = {**TINY_VIT_ARGS, "embed_dim": 32, "depth": 1}


# ------------------------------------------------------------------ helpers to forge broken files


def rewrite_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """Return safetensors bytes whose JSON header was changed by ``edit`` (tensor bytes kept)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def with_tensor(path: Path, name: str, change: Callable[[np.ndarray], None]) -> bytes:
    """The file at ``path`` with one tensor modified and its metadata kept verbatim."""
    from safetensors.numpy import load, save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = load(data)
    change(tensors[name])
    return save(tensors, metadata=meta)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: a decompression bomb as far as the header goes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dicom_without_pixels(path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "anon"
    ds.Modality = "DX"
    ds.save_as(path, enforce_file_format=True)
    return path


class Payload:
    """Unpickling this object would create a marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------ the broken inputs, built once


@pytest.fixture(scope="module")
def bad(chain, tiny_vit: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every input the catalogue needs: the chain's good files plus forged bad ones."""
    import timm
    import torch

    from mavl_cli.models.backbone import save_local_backbone

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
    return f


# ------------------------------------------------------------------ the catalogue


@dataclass
class Case:
    id: str
    argv: Callable[[dict[str, Path], Path], list]  # (files, output path) -> arguments
    expect: str  # substring of the error line (case-insensitive)
    names: str | None = None  # key of the file the message must name (its basename)
    output: str = "new"  # "new": out must not appear; "existing": bad["existing"] must stay byte-identical


E = ["--backbone", VIT]
R = ["--rank", "8", "--keep", "4", "--epochs", "1"]  # so train-lrf gets as far as the fault under test


CASES = [
    # ---- embed-images
    Case("embed-missing-file", lambda f, o: ["embed-images", f["root"] / "nope.png", *E, "--weights", f["vit"], "-o", o], "no such file", None),
    Case("embed-empty-dir", lambda f, o: ["embed-images", f["empty_dir"], *E, "--weights", f["vit"], "-o", o], "no image", "empty_dir"),
    Case("embed-zero-byte-png", lambda f, o: ["embed-images", f["zero.png"], *E, "--weights", f["vit"], "-o", o], "empty", "zero.png"),
    Case("embed-truncated-png", lambda f, o: ["embed-images", f["truncated.png"], *E, "--weights", f["vit"], "-o", o], "", "truncated.png"),
    Case("embed-text-as-jpg", lambda f, o: ["embed-images", f["text.jpg"], *E, "--weights", f["vit"], "-o", o], "cannot decode", "text.jpg"),
    Case("embed-decompression-bomb", lambda f, o: ["embed-images", f["bomb.png"], *E, "--weights", f["vit"], "-o", o], "decompression bomb", "bomb.png"),
    Case("embed-dicom-no-pixels", lambda f, o: ["embed-images", f["nopixels.dcm"], *E, "--weights", f["vit"], "-o", o], "no pixel data", "nopixels.dcm"),
    Case("embed-csv-no-path-column", lambda f, o: ["embed-images", f["root"], "--labels", f["csv_nopath"], *E, "--weights", f["vit"], "-o", o], "path", "csv_nopath"),
    Case("embed-csv-paths-not-found", lambda f, o: ["embed-images", f["root"], "--labels", f["csv_otherpaths"], *E, "--weights", f["vit"], "-o", o], "not found", "csv_otherpaths"),
    Case("embed-unknown-timm-model", lambda f, o: ["embed-images", f["root"], "--backbone", "no_such_model_xyz", "--random-init", "-o", o], "unknown timm model", None),
    Case("embed-lrf-is-text-file", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "--lrf", f["text"], "-o", o], "text embeddings", "text"),
    Case("embed-lrf-dim-mismatch", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit32"], "--lrf", f["lrf"], "-o", o], "48-d", "lrf"),
    Case("embed-pickle-weights", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["evil_pth"], "-o", o], "refusing to load", "evil_pth"),
    Case("embed-output-under-regular-file", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "-o", f["regular"] / "out.st"], "is a file", "regular"),
    Case("embed-output-folder-missing", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "-o", o.parent / "no" / "such" / "out.st"], "does not exist", None),
    # ---- train-lrf
    Case("lrf-text-as-image-embeddings", lambda f, o: ["train-lrf", f["text"], "--labels", f["train_csv"], *R, "-o", o], "text embeddings", "text"),
    Case("lrf-model-as-image-embeddings", lambda f, o: ["train-lrf", f["model"], "--labels", f["train_csv"], *R, "-o", o], "fused model", "model"),
    Case("lrf-plain-text-file", lambda f, o: ["train-lrf", f["notes_txt"], "--labels", f["train_csv"], *R, "-o", o], "not a safetensors", "notes_txt"),
    Case("lrf-foreign-safetensors", lambda f, o: ["train-lrf", f["foreign"], "--labels", f["train_csv"], *R, "-o", o], "not one written by mavl", "foreign"),
    Case("lrf-corrupt-header", lambda f, o: ["train-lrf", f["corrupt_header"], "--labels", f["train_csv"], *R, "-o", o], "corrupt", "corrupt_header"),
    Case("lrf-truncated-safetensors", lambda f, o: ["train-lrf", f["truncated_st"], "--labels", f["train_csv"], *R, "-o", o], "truncated", "truncated_st"),
    Case("lrf-newer-format", lambda f, o: ["train-lrf", f["newer"], "--labels", f["train_csv"], *R, "-o", o], "newer mavl", "newer"),
    Case("lrf-nan-in-features", lambda f, o: ["train-lrf", f["nan"], "--labels", f["train_csv"], *R, "-o", o], "nan or inf", "nan"),
    Case("lrf-missing-labels-csv", lambda f, o: ["train-lrf", f["train"], "--labels", o.parent / "absent.csv", *R, "-o", o], "does not exist", None),
    Case("lrf-unknown-label", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--only", "Cardiomegaly,Nodule", *R, "-o", o], "nodule", "train_csv"),
    Case("lrf-empty-label-list", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--only", " , ", *R, "-o", o], "label list is empty", "train_csv"),
    Case("lrf-bad-label-value", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_badvalue"], *R, "-o", o], "yes", "csv_badvalue"),
    Case("lrf-paths-not-in-embeddings", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_otherpaths"], *R, "-o", o], "", "csv_otherpaths"),
    Case("lrf-rank-too-large", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--rank", "4096", "-o", o], "--rank", "train"),
    Case("lrf-val-dim-mismatch", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--val", f["val32"], "--val-labels", f["val_csv"], *R, "-o", o], "32-d", "val32"),
    Case("lrf-output-is-input", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "-o", f["train"]], "overwrite the input", "train"),
    # ---- embed-text
    Case("text-missing-file", lambda f, o: ["embed-text", o.parent / "absent.txt", "--text-model", f["vit"], "-o", o], "not found", None),
    Case("text-empty-label-list", lambda f, o: ["embed-text", f["empty_txt"], "--text-model", f["vit"], "-o", o], "no label names", "empty_txt"),
    Case("text-binary-descriptions", lambda f, o: ["embed-text", f["zero.png"].parent / "bomb.png", "--text-model", f["vit"], "-o", o], "utf-8", "bomb.png"),
    Case("text-model-without-tokenizer", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["bert_notok"], "-o", o], "tokenizer", "bert_notok"),
    Case("text-model-is-image-backbone", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["vit"], "-o", o], "", "vit"),
    Case("text-model-folder-missing", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", o.parent / "no_model", "-o", o], "not found", None),
    # ---- fuse
    Case("fuse-csv-lacks-text-label", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["csv_nopneumo"], "--epochs", "1", "-o", o], "pneumothorax", "csv_nopneumo"),
    Case("fuse-swapped-arguments", lambda f, o: ["fuse", f["text"], f["train"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "text embeddings", "text"),
    Case("fuse-image-as-text", lambda f, o: ["fuse", f["train"], f["val"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "image embeddings", "val"),
    Case("fuse-lrf-is-model", lambda f, o: ["fuse", f["train"], f["text"], "--lrf", f["model"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "fused model", "model"),
    Case("fuse-dim-mismatch-with-lrf", lambda f, o: ["fuse", f["val32"], f["text"], "--lrf", f["lrf"], "--labels", f["val_csv"], "--epochs", "1", "-o", o], "32-d", "val32"),
    Case("fuse-val-dim-mismatch", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["train_csv"], "--val", f["val32"], "--val-labels", f["val_csv"], "--epochs", "1", "-o", o], "32-d", "val32"),
    Case("fuse-unknown-aggregate", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["train_csv"], "--aggregate", "median", "-o", o], "aggregate", None),
    Case("fuse-overwrite-fails-cleanly", lambda f, o: ["fuse", f["train"], f["notes_txt"], "--labels", f["train_csv"], "--epochs", "1", "-o", f["existing"]], "not a safetensors", "notes_txt", "existing"),
    # ---- tune-threshold
    Case("tune-embeddings-as-model", lambda f, o: ["tune-threshold", f["val"], f["val"], "--labels", f["val_csv"], "-o", o], "fused model", "val"),
    Case("tune-dim-mismatch", lambda f, o: ["tune-threshold", f["model"], f["val32"], "--labels", f["val_csv"], "-o", o], "32-d", "val32"),
    Case("tune-min-sensitivity-out-of-range", lambda f, o: ["tune-threshold", f["model"], f["val"], "--labels", f["val_csv"], "--min-sensitivity", "1.5", "-o", o], "min-sensitivity", None),
    Case("tune-labels-not-in-embeddings", lambda f, o: ["tune-threshold", f["model"], f["val"], "--labels", f["csv_otherpaths"], "-o", f["existing"]], "", "csv_otherpaths", "existing"),
    Case("tune-inf-in-model", lambda f, o: ["tune-threshold", f["inf_model"], f["val"], "--labels", f["val_csv"], "-o", o], "nan or inf", "inf_model"),
    # ---- evaluate
    Case("evaluate-threshold-above-one", lambda f, o: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"], "--threshold", "1.5", "--csv", o], "[0, 1]", None),
    Case("evaluate-scores-is-model", lambda f, o: ["evaluate", "--scores", f["tuned"], "--labels", f["test_csv"], "--csv", o], "prediction scores", "tuned"),
    Case("evaluate-lacks-model-label", lambda f, o: ["evaluate", f["tuned"], f["train"], "--labels", f["csv_nopneumo"], "--csv", o], "pneumothorax", "csv_nopneumo"),
    Case("evaluate-nan-embeddings", lambda f, o: ["evaluate", f["tuned"], f["nan"], "--labels", f["train_csv"], "--csv", o], "nan or inf", "nan"),
    Case("evaluate-csv-folder-missing", lambda f, o: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"], "--csv", o.parent / "missing" / "r.csv"], "does not exist", None),
    Case("evaluate-plot-under-regular-file", lambda f, o: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"], "--plot", f["regular"] / "p.png"], "is a file", "regular"),
    # ---- predict
    Case("predict-model-is-text", lambda f, o: ["predict", f["root"] / "images", "--model", f["text"], "--out", o], "text embeddings", "text"),
    Case("predict-model-missing", lambda f, o: ["predict", f["root"] / "images", "--model", o.parent / "absent.st", "--out", o], "not found", None),
    Case("predict-zero-byte-image", lambda f, o: ["predict", f["zero.png"], "--model", f["tuned"], "--weights", f["vit"], "--out", o], "empty", "zero.png"),
    Case("predict-threshold-negative", lambda f, o: ["predict", f["root"] / "images", "--model", f["tuned"], "--threshold", "-0.1", "--out", o], "[0, 1]", None),
    Case("predict-wrong-backbone-weights", lambda f, o: ["predict", f["root"] / "images", "--model", f["tuned"], "--weights", f["vit32"], "--out", o], "", "vit32"),
    Case("predict-out-under-regular-file", lambda f, o: ["predict", f["root"] / "images", "--model", f["tuned"], "--weights", f["vit"], "--out", f["regular"] / "s.st"], "is a file", "regular"),
    # ---- info
    Case("info-missing-file", lambda f, o: ["info", o.parent / "absent.st"], "not found", None),
    Case("info-directory", lambda f, o: ["info", f["empty_dir"]], "directory", "empty_dir"),
    Case("info-plain-text", lambda f, o: ["info", f["notes_txt"]], "not a safetensors", "notes_txt"),
    Case("info-corrupt-header", lambda f, o: ["info", f["corrupt_header"]], "corrupt", "corrupt_header"),
    Case("info-newer-format", lambda f, o: ["info", f["newer"]], "upgrade", "newer"),
    # ---- phantoms
    # ---- usage errors found by the option parser (cli.py must catch typer's own click exceptions)
    Case("usage-missing-option", lambda f, o: ["fuse", f["train"], f["text"], "-o", o], "--labels"),
    Case("usage-out-of-range", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["train_csv"], "--epochs", "0", "-o", o], "--epochs"),
    Case("usage-missing-argument", lambda f, o: ["info"], "file"),
    Case("usage-unknown-command", lambda f, o: ["embed-image", f["root"], "-o", o], "no such command"),
    Case("usage-not-a-number", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--rank", "big", "-o", o], "--rank"),
    Case("phantoms-under-regular-file", lambda f, o: ["phantoms", f["regular"] / "ph", "-n", "3", "--size", "64"], "", "regular"),
]


@pytest.mark.parametrize("case", CASES, ids=[(c.values[0] if hasattr(c, "values") else c).id for c in CASES])
def test_bad_input(case: Case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mavl_cli import cli

    monkeypatch.setitem(cli._DEBUG, "on", False)
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    inputs_dir = bad["existing"].parent
    watched = [inputs_dir, bad["train"].parent, bad["root"]]
    before = [_digest(w) for w in watched]
    out = tmp_path / "out.st"
    argv = [str(a) for a in case.argv(bad, out)]

    r = run_cli(argv)

    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, f"exit {r.exit_code}, stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    assert case.expect.lower() in line.lower(), line
    if case.names:
        assert bad[case.names].name in line, f"{bad[case.names].name!r} not named in: {line}"
    assert not bad["marker"].exists(), "a pickled payload ran"
    # Nothing created: the test's own folder stays empty (no output, no temp, no .partial).
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    # Inputs (and the pre-existing output) are byte-identical.
    assert [_digest(w) for w in watched] == before


# ------------------------------------------------------------------ every wrong-kind pairing

KIND_FILES = {"image-embeddings": "train", "text-embeddings": "text", "lrf-head": "lrf", "model": "tuned", "scores": "scores"}
# (slot id, expected kind, argv builder given the file to put in that slot)
SLOTS = [
    ("train-lrf.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["train-lrf", x, "--labels", f["train_csv"], *R, "-o", o]),
    ("fuse.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["fuse", x, f["text"], "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("fuse.TEXT", "text-embeddings", lambda f, x, o: ["fuse", f["train"], x, "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("fuse.--lrf", "lrf-head", lambda f, x, o: ["fuse", f["train"], f["text"], "--lrf", x, "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("fuse.--val", "image-embeddings", lambda f, x, o: ["fuse", f["train"], f["text"], "--val", x, "--val-labels", f["val_csv"], "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("tune.MODEL", "model", lambda f, x, o: ["tune-threshold", x, f["val"], "--labels", f["val_csv"], "-o", o]),
    ("tune.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["tune-threshold", f["tuned"], x, "--labels", f["val_csv"], "-o", o]),
    ("evaluate.MODEL", "model", lambda f, x, o: ["evaluate", x, f["test"], "--labels", f["test_csv"], "--csv", o]),
    ("evaluate.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["evaluate", f["tuned"], x, "--labels", f["test_csv"], "--csv", o]),
    ("evaluate.--scores", "scores", lambda f, x, o: ["evaluate", "--scores", x, "--labels", f["test_csv"], "--csv", o]),
    ("predict.--model", "model", lambda f, x, o: ["predict", f["root"] / "images", "--model", x, "--out", o]),
    ("embed-images.--lrf", "lrf-head", lambda f, x, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "--lrf", x, "-o", o]),
]
PAIRS = [(slot, want, build, kind) for slot, want, build in SLOTS for kind in KIND_FILES if kind != want]


@pytest.mark.parametrize("slot,want,build,kind", PAIRS, ids=[f"{p[0]}<-{p[3]}" for p in PAIRS])
def test_wrong_kind(slot, want, build, kind, bad, tmp_path, monkeypatch) -> None:
    """Any mavl file in a slot meant for another kind: one line naming the file, its kind and the wanted kind."""
    from mavl_cli import cli
    from mavl_cli.contract import KINDS

    monkeypatch.setitem(cli._DEBUG, "on", False)
    x = bad[KIND_FILES[kind]]
    r = run_cli([str(a) for a in build(bad, x, tmp_path / "out.st")])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert x.name in lines[0] and KINDS[kind][0] in lines[0] and KINDS[want][0] in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ no unpickling of untrusted weights


def test_pickled_weights_are_refused_and_never_run(bad, tmp_path, monkeypatch) -> None:
    """`.pth` files go through torch.load(weights_only=True): a __reduce__ payload is refused, not run."""
    import torch

    from mavl_cli.errors import MavlError
    from mavl_cli.models.backbone import load_state_dict

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(MavlError, match="refusing to load"):
        load_state_dict(bad["evil_pth"])
    assert calls == [True]
    assert not bad["marker"].exists()
    # Plain tensors in a .pth still load (weights_only allows them).
    good = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert load_state_dict(good)["w"].tolist() == [1.0, 1.0]
    assert calls == [True, True]
