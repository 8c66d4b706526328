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
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import TINY_VIT_ARGS, build_tiny_bert, run_cli

VIT = "vit_tiny_patch16_224"
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # any control character but the newline
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


def edit_tensors(path: Path, change: Callable[[dict, dict], None]) -> bytes:
    """The file at ``path`` re-saved after ``change(tensors, metadata)`` (both dicts edited in place)."""
    from safetensors.numpy import load, save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = dict(load(data))
    change(tensors, meta)
    return save(tensors, metadata=meta)


def set_meta(key: str, value) -> Callable[[dict], None]:
    return lambda h: h["__metadata__"].__setitem__(key, value if isinstance(value, str) else json.dumps(value))


def dicom_with_pixels(path: Path, syntax=None, pixel_bytes: bytes | None = None, **attrs) -> Path:
    """A small 12-bit MONOCHROME2 DICOM (uncompressed, or ``syntax`` with the given encapsulated bytes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4) % 4096
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixel_bytes if pixel_bytes is not None else arr.tobytes()
    if pixel_bytes is not None:
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


DEEP = "[" * 200_000 + "]" * 200_000  # JSON nested 200k levels: RecursionError in json.loads


def forge_issue15(f: dict[str, Path], d: Path) -> None:
    """The inputs of issue 15's attack campaign (cases numbered as in the issue)."""
    import os

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGExtended12Bit

    f["img0"] = next(iter(sorted((f["root"] / "images").glob("*.png"))))
    # 4, 14: a FIFO as an output, and as inputs with and without an image suffix (no writer: opening it blocks)
    for k in ("fifo_out", "fifo_probe", "fifo.png"):
        f[k] = d / k
        os.mkfifo(f[k])
    # 8: 1 x 70000 px in 149 bytes
    f["wide.png"] = d / "wide.png"
    f["wide.png"].write_bytes(png_header_only(70_000, 1))
    # 10, 16: forged fused-model metadata
    tuned = f["tuned"].read_bytes()
    fusion = contract_meta(f["tuned"])["fusion"]
    for k, edit in {"no_fusion": lambda h: h["__metadata__"].pop("fusion"),
                    "fusion_str": set_meta("fusion", "not a config"),
                    "fusion_dim": set_meta("fusion", {**fusion, "dim": 100_000_000}),
                    "fusion_aspects": set_meta("fusion", {**fusion, "n_aspects": 1_000_000_000})}.items():
        f[k] = d / f"{k}.st"
        f[k].write_bytes(rewrite_header(tuned, edit))
    labels = contract_meta(f["text"])["labels"]
    f["int_labels"] = d / "int_labels.st"
    f["int_labels"].write_bytes(rewrite_header(f["text"].read_bytes(), set_meta("labels", list(range(len(labels))))))
    f["list_labels"] = d / "list_labels.st"
    f["list_labels"].write_bytes(rewrite_header(f["text"].read_bytes(), set_meta("labels", [[x] for x in labels])))
    # 16: LRF heads with a missing norm, an extra tensor, a classifier wider than the rank
    f["lrf_nonorm"] = d / "lrf_nonorm.st"
    f["lrf_nonorm"].write_bytes(edit_tensors(f["lrf"], lambda t, m: t.pop("norm.weight")))
    f["lrf_extra"] = d / "lrf_extra.st"
    f["lrf_extra"].write_bytes(edit_tensors(f["lrf"], lambda t, m: t.__setitem__("sneaky.weight", np.ones(3, np.float32))))
    f["lrf_wide"] = d / "lrf_wide.st"

    def widen(t, m):
        w = t["classifier.weight"]
        t["classifier.weight"] = np.concatenate([w, w[:, :1]], axis=1)

    f["lrf_wide"].write_bytes(edit_tensors(f["lrf"], widen))
    # 17, 30: embeddings with 0 images, and with 0-dimensional features
    f["empty_emb"] = d / "empty_emb.st"

    def no_rows(t, m):
        t["features"] = t["features"][:0]
        m["ids"] = "[]"

    f["empty_emb"].write_bytes(edit_tensors(f["train"], no_rows))
    f["zero_dim"] = d / "zero_dim.st"
    f["zero_dim"].write_bytes(edit_tensors(f["train"], lambda t, m: t.__setitem__("features", t["features"][:, :0].copy())))
    # 15: 200k levels of nesting in a safetensors header, in metadata, in a descriptions file
    head = json.dumps({"__metadata__": {"mavl_kind": "image-embeddings", "mavl_format": "1"}})[:-1] + ',"x":' + DEEP + "}"
    raw = head.encode() + b" " * (-len(head) % 8)
    f["deep_header"] = d / "deep_header.st"
    f["deep_header"].write_bytes(struct.pack("<Q", len(raw)) + raw)
    f["deep_meta"] = d / "deep_meta.st"
    f["deep_meta"].write_bytes(rewrite_header(f["train"].read_bytes(), set_meta("ids", DEEP)))
    f["deep_desc"] = d / "deep_desc.json"
    f["deep_desc"].write_text('{"Edema": ' + DEEP + "}")
    # 29: scores files with no labels, no images, thresholds beyond 1
    def drop_labels(t, m):
        t["scores"], t["thresholds"] = t["scores"][:, :0].copy(), t["thresholds"][:0].copy()
        m["labels"] = "[]"

    def drop_images(t, m):
        t["scores"] = t["scores"][:0].copy()
        m["ids"] = "[]"

    for k, change in {"scores_nolabels": drop_labels, "scores_noimages": drop_images,
                      "scores_bad_th": lambda t, m: t.__setitem__("thresholds", np.full_like(t["thresholds"], 5.0))}.items():
        f[k] = d / f"{k}.st"
        f[k].write_bytes(edit_tensors(f["scores"], change))
    # 21: a resume checkpoint that is a directory, and one whose only record is intact but malformed
    f["resume_dir_out"] = d / "resume_dir.st"
    Path(str(f["resume_dir_out"]) + ".partial").mkdir()
    f["malformed_out"] = d / "malformed.st"
    meta_b = b'{"ids": 5}'
    head_b = json.dumps({"fingerprint": "0" * 16, "batch_size": 2}).encode()
    record = struct.pack("<4sIQ", b"REC1", len(meta_b), 0) + meta_b + struct.pack("<I", zlib.crc32(b"", zlib.crc32(meta_b)))
    Path(str(f["malformed_out"]) + ".partial").write_bytes(b"MAVLPART1\n" + struct.pack("<I", len(head_b)) + head_b + record)
    # 9: a gzip label file that expands far beyond its size (the test lowers the limit to 1 MB)
    import gzip

    f["bomb.csv.gz"] = d / "bomb.csv.gz"
    header, first = f["train_csv"].read_text().splitlines()[:2]
    with gzip.open(f["bomb.csv.gz"], "wt", compresslevel=9) as fh:
        fh.write(header + "\n" + (first + "\n") * 60_000)
    # 15: a label map nested 200k levels
    f["deep_map.json"] = d / "deep_map.json"
    f["deep_map.json"].write_text('{"Edema": ' + DEEP + "}")
    # 28: nan, N/A, None as label values (pandas read them as blank = negative)
    import pandas as pd

    df = pd.read_csv(f["train_csv"])
    for word in ("nan", "N/A", "None"):
        k = f"csv_{word.replace('/', '')}"
        f[k] = d / f"{k}.csv"
        v = df.copy()
        v["Edema"] = v["Edema"].astype(object)
        v.loc[4, "Edema"] = word
        v.to_csv(f[k], index=False, na_rep="")
    # 31: RescaleSlope 1e999 (infinite); 33: JPEG Extended 12-bit that no installed decoder reads
    f["slope.dcm"] = dicom_with_pixels(d / "slope.dcm", RescaleSlope="1e999", RescaleIntercept="0")
    f["jpeg12.dcm"] = dicom_with_pixels(d / "jpeg12.dcm", JPEGExtended12Bit,
                                        encapsulate([b"\xff\xd8\xff\xc1" + b"\x00\x11\x0c" + b"junk" * 50]))


def contract_meta(path: Path) -> dict:
    from mavl_cli.io.mavlfile import read_file

    return read_file(path).meta


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


def forge_s3(f: dict[str, Path], d: Path) -> None:
    """The inputs of session 3's attack campaign (new surfaces: heatmaps, zero-shot, evaluate-maps, calibration)."""
    import shutil

    from mavl_cli.explain.maps import maps_meta, write_maps

    # s3-01: an input image in the heatmap folder, named like one of the overlays
    f["hm_dir"] = d / "hm_in"
    f["hm_dir"].mkdir()
    f["hm_a"] = f["hm_dir"] / "a.png"
    f["hm_a"].write_bytes(f["img0"].read_bytes())
    f["hm_a_edema"] = f["hm_dir"] / "a.Edema.png"
    f["hm_a_edema"].write_bytes(f["img0"].read_bytes())
    # s3-03..06: model folders whose files an output path names
    f["vit_copy"] = d / "vit_copy"
    shutil.copytree(f["vit"], f["vit_copy"])
    f["vit_copy_weights"] = f["vit_copy"] / "model.safetensors"
    f["bert_copy_config"] = f["bert_notok"] / "config.json"
    f["clip_dir"] = d / "clip_dir"
    f["clip_dir"].mkdir()
    (f["clip_dir"] / "open_clip_config.json").write_text("{}")
    f["clip_weights"] = f["clip_dir"] / "open_clip_model.safetensors"
    f["clip_weights"].write_bytes(f["foreign"].read_bytes())
    # s3-07: an open_clip architecture given as a config file, with weights that do not fit it
    f["clip_cfg"] = d / "tinyclip.json"
    f["clip_cfg"].write_text(json.dumps({
        "embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}))
    # s3-08: labels that share an overlay name
    labels = contract_meta(f["tuned"])["labels"]
    f["slug_twins"] = d / "slug_twins.st"
    f["slug_twins"].write_bytes(rewrite_header(f["tuned"].read_bytes(), set_meta("labels", [
        "Pleural_Effusion" if x == "Pneumothorax" else x for x in labels])))
    # s3-09..11: a folder of maps, and box files that are not
    f["maps_dir"] = d / "maps_dir"
    f["maps_dir"].mkdir()
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 2, 3] = 1.0
    write_maps(f["maps_dir"] / "p1_a.maps.safetensors", m, maps_meta(["Edema"], "similarity", "p1_a.png", (8, 8), [(3, 2)]))
    f["boxes_bigfield"] = d / "boxes_bigfield.csv"
    f["boxes_bigfield"].write_text('Image Index,Finding Label,Bbox [x,y,w,h],,,\n"' + "a" * 200_000 + '",Edema,1,1,1,1\n')
    # s3-16..18: shard records that drive a loop or an index
    n_train = len(contract_meta(f["train"])["ids"])
    record = {"index": 0, "count": 2, "start": 0, "stop": n_train, "total": 2 * n_train, "skipped": 0,
              "fingerprint": "x", "command": {"args": ["embed-images", "x", "-o", "y"], "output_at": 3}}
    for key, change in {"shard_count_1e12": {"count": 10**12, "total": n_train},
                        "shard_skipped_text": {"skipped": "x"},
                        "shard_output_at_99": {"command": {"args": ["embed-images"], "output_at": 99}}}.items():
        f[key] = d / f"{key}.st"
        f[key].write_bytes(rewrite_header(f["train"].read_bytes(), set_meta("shard", {**record, **change})))
    # s3-20..23: subgroup metadata, prevalences, label file encodings
    import csv as _csv

    with open(f["test_csv"], newline="") as fh:
        test_rows = list(_csv.DictReader(fh))
    f["meta_conflict"] = d / "meta_conflict.csv"
    f["meta_conflict"].write_text("Path,sex\n" + "".join(f"{r['Path']},M\n" for r in test_rows) + f"{test_rows[0]['Path']},F\n")
    f["utf16_csv"] = d / "utf16_labels.csv"
    f["utf16_csv"].write_bytes(f["train_csv"].read_text().encode("utf-16"))
    # s3-12, 13: stored calibrations that would reverse the order of the scores, or that are not there
    n = len(labels)
    cal_meta = json.dumps({"method": "platt"})
    f["cal_negative"] = d / "cal_negative.st"
    f["cal_negative"].write_bytes(edit_tensors(f["tuned"], lambda t, mm: (
        t.update({"calibration.a": np.full(n, -2.0, np.float32), "calibration.b": np.zeros(n, np.float32),
                  "calibration.shift": np.zeros(n, np.float32)}), mm.__setitem__("calibration", cal_meta))))
    f["cal_missing"] = d / "cal_missing.st"
    f["cal_missing"].write_bytes(edit_tensors(f["tuned"], lambda t, mm: mm.__setitem__("calibration", cal_meta)))
    f["cal_short"] = d / "cal_short.st"
    f["cal_short"].write_bytes(edit_tensors(f["tuned"], lambda t, mm: (
        t.update({"calibration.a": np.ones(n - 1, np.float32), "calibration.b": np.zeros(n, np.float32),
                  "calibration.shift": np.zeros(n, np.float32)}), mm.__setitem__("calibration", cal_meta))))


# ------------------------------------------------------------------ the catalogue


@dataclass
class Case:
    id: str
    argv: Callable[[dict[str, Path], Path], list]  # (files, output path) -> arguments
    expect: str  # substring of the error line (case-insensitive)
    names: str | None = None  # key of the file the message must name (its basename)
    output: str = "new"  # "new": out must not appear; "existing": bad["existing"] must stay byte-identical
    env: dict[str, Callable[[dict[str, Path], Path], object]] | None = None  # extra environment (values from files)
    max_len: int | None = None  # the error line must be at most this long


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

# ------------------------------------------------------------------ issue 15: the outside attack campaign, case by case
# (ids start with the issue's case number; cases that need a pipe, a kill or a success check are test functions below)

OVERWRITE = "overwrite the input"
EV = lambda f: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"]]  # noqa: E731
FU = lambda f, o, *x: ["fuse", f["train"], *x, "--labels", f["train_csv"], "--epochs", "1", "-o", o]  # noqa: E731
EI = lambda f, o, *x: ["embed-images", *x, *E, "--weights", f["vit"], "-o", o]  # noqa: E731

CASES += [
    # 1-4: outputs that would overwrite inputs or special files (one guard: device + inode)
    Case("i15-01-evaluate-csv-onto-its-labels", lambda f, o: [*EV(f), "--csv", f["test_csv"]], OVERWRITE, "test_csv"),
    Case("i15-01-evaluate-csv-onto-the-model", lambda f, o: [*EV(f), "--csv", f["tuned"]], OVERWRITE, "tuned"),
    Case("i15-01-evaluate-plot-onto-the-embeddings", lambda f, o: [*EV(f), "--plot", f["test"]], OVERWRITE, "test"),
    Case("i15-02-predict-out-onto-its-image", lambda f, o: ["predict", f["img0"], "--model", f["tuned"], "--weights", f["vit"], "--out", f["img0"]], OVERWRITE, "img0"),
    Case("i15-03-train-lrf-embed-out-onto-val", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--val", f["val"], "--val-labels", f["val_csv"], *R, "-o", o, "--embed-out", f["val"]], OVERWRITE, "val"),
    Case("i15-03-embed-images-output-onto-an-input-image", lambda f, o: EI(f, f["img0"], f["root"] / "images"), OVERWRITE, "img0"),
    Case("i15-04-output-is-a-fifo", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["vit"], "-o", f["fifo_out"]], "not a regular file", "fifo_out"),
    # 8, 10-13: memory and time bombs
    Case("i15-08-png-1x70000-pixels", lambda f, o: EI(f, o, f["wide.png"]), "sides differ", "wide.png"),
    Case("i15-10-fuse-dim-30000", lambda f, o: [*FU(f, o, f["text"]), "--dim", "30000"], "--dim"),
    Case("i15-10-model-forged-fusion-dim", lambda f, o: [*EV(f)[:1], f["fusion_dim"], *EV(f)[2:]], "fusion.dim", "fusion_dim"),
    Case("i15-10-model-forged-n-aspects", lambda f, o: [*EV(f)[:1], f["fusion_aspects"], *EV(f)[2:]], "fusion.n_aspects", "fusion_aspects"),
    Case("i15-11-phantoms-size-100000", lambda f, o: ["phantoms", o.parent / "ph", "-n", "3", "--size", "100000"], "--size"),
    Case("i15-12-bootstrap-1e9", lambda f, o: [*EV(f), "--bootstrap", "1000000000"], "--bootstrap"),
    Case("i15-13-threads-1000", lambda f, o: [*EI(f, o, f["root"]), "--threads", "1000"], "--threads"),
    # 14: never open a FIFO (it blocks without a writer)
    Case("i15-14-fifo-probed-for-dicom-magic", lambda f, o: EI(f, o, f["fifo_probe"]), "not a supported image", "fifo_probe"),
    Case("i15-14-fifo-named-png", lambda f, o: EI(f, o, f["fifo.png"]), "not a regular file", "fifo.png"),
    # 15: 200k levels of JSON nesting
    Case("i15-15-nested-safetensors-header", lambda f, o: ["info", f["deep_header"]], "nested too deeply", "deep_header"),
    Case("i15-15-nested-metadata", lambda f, o: ["train-lrf", f["deep_meta"], "--labels", f["train_csv"], *R, "-o", o], "nested too deeply", "deep_meta"),
    Case("i15-15-nested-descriptions", lambda f, o: ["embed-text", f["deep_desc"], "--text-model", f["vit"], "-o", o], "nested too deeply", "deep_desc"),
    # 16: one schema for metadata and tensors, checked on read
    Case("i15-16-model-without-fusion-metadata", lambda f, o: ["predict", f["img0"], "--model", f["no_fusion"], "--out", o], "fusion", "no_fusion"),
    Case("i15-16-model-fusion-metadata-not-an-object", lambda f, o: ["tune-threshold", f["fusion_str"], f["val"], "--labels", f["val_csv"], "-o", o], "fusion", "fusion_str"),
    Case("i15-16-label-names-are-integers", lambda f, o: FU(f, o, f["int_labels"]), "label names", "int_labels"),
    Case("i15-16-label-names-are-lists", lambda f, o: ["info", f["list_labels"]], "label names", "list_labels"),
    Case("i15-16-lrf-missing-norm", lambda f, o: [*FU(f, o, f["text"]), "--lrf", f["lrf_nonorm"]], "norm.weight", "lrf_nonorm"),
    Case("i15-16-lrf-extra-tensor", lambda f, o: EI(f, o, f["root"], "--lrf", f["lrf_extra"]), "unexpected tensor", "lrf_extra"),
    Case("i15-16-lrf-classifier-wider-than-rank", lambda f, o: [*FU(f, o, f["text"]), "--lrf", f["lrf_wide"]], "rank", "lrf_wide"),
    # 17, 29, 30: empty files
    Case("i15-17-train-lrf-zero-images", lambda f, o: ["train-lrf", f["empty_emb"], "--labels", f["train_csv"], *R, "-o", o], "holds no images", "empty_emb"),
    Case("i15-17-evaluate-zero-images", lambda f, o: ["evaluate", f["tuned"], f["empty_emb"], "--labels", f["test_csv"]], "holds no images", "empty_emb"),
    Case("i15-17-tune-zero-images", lambda f, o: ["tune-threshold", f["tuned"], f["empty_emb"], "--labels", f["val_csv"], "-o", o], "holds no images", "empty_emb"),
    Case("i15-17-fuse-zero-images", lambda f, o: ["fuse", f["empty_emb"], f["text"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "holds no images", "empty_emb"),
    Case("i15-29-scores-with-no-labels", lambda f, o: ["evaluate", "--scores", f["scores_nolabels"], "--labels", f["test_csv"]], "holds no labels", "scores_nolabels"),
    Case("i15-29-scores-with-no-images", lambda f, o: ["evaluate", "--scores", f["scores_noimages"], "--labels", f["test_csv"]], "holds no images", "scores_noimages"),
    Case("i15-29-scores-thresholds-beyond-one", lambda f, o: ["evaluate", "--scores", f["scores_bad_th"], "--labels", f["test_csv"]], "[0, 1]", "scores_bad_th"),
    Case("i15-30-zero-dimensional-features", lambda f, o: ["train-lrf", f["zero_dim"], "--labels", f["train_csv"], *R, "-o", o], "holds no feature dimensions", "zero_dim"),
    # 20: mavl's home folder and other output folders checked before the work
    Case("i15-20-mavl-home-under-a-file", lambda f, o: [*FU(f, o, f["text"]), "--set-default"], "is a file", "regular",
         env={"MAVL_HOME": lambda f, o: f["regular"] / "home"}),
    Case("i15-20-demo-workdir-under-a-file", lambda f, o: ["demo", "--workdir", f["regular"] / "w", "-n", "30"], "is a file", "regular"),
    Case("i15-20-import-weights-output-under-a-file", lambda f, o: ["import-weights", f["vit"] / "model.safetensors", "--backbone", VIT, "-o", f["regular"] / "w"], "is a file", "regular"),
    # 21: user errors that surfaced as internal errors
    Case("i15-21-eta-infinite", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "--eta", "inf", "-o", o], "--eta"),
    Case("i15-21-seed-beyond-64-bits", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "--seed", "99999999999999999999999", "-o", o], "--seed"),
    Case("i15-21-model-args-img-size-0", lambda f, o: [*EI(f, o, f["root"]), "--model-args", '{"img_size": 0}'], "cannot build"),
    Case("i15-21-model-args-checkpoint-path", lambda f, o: [*EI(f, o, f["root"]), "--model-args", json.dumps({"checkpoint_path": str(f["evil_pth"])})], "checkpoint_path"),
    Case("i15-21-import-weights-unknown-model", lambda f, o: ["import-weights", f["vit"] / "model.safetensors", "--backbone", "no_such_net_xyz", "-o", o.parent / "w"], "no_such_net_xyz"),
    Case("i15-21-import-weights-other-architecture", lambda f, o: ["import-weights", f["vit"] / "model.safetensors", "--backbone", "resnet18", "-o", o.parent / "w"], "do not belong", "vit"),
    Case("i15-21-resume-file-is-a-directory", lambda f, o: [*EI(f, f["resume_dir_out"], f["root"] / "images"), "--resume"], "is a directory", "resume_dir_out"),
    Case("i15-21-resume-record-malformed", lambda f, o: [*EI(f, f["malformed_out"], f["root"] / "images"), "--resume"], "malformed", "malformed_out"),
    # 22: control characters never reach the terminal raw (the test also checks stderr for any)
    Case("i15-22-newline-in-a-file-name", lambda f, o: ["info", o.parent / "x\nerror: a forged second line.st"], "x\\nerror: a forged"),
    Case("i15-22-escape-sequences-in-a-file-name", lambda f, o: ["info", o.parent / "t\x1b]0;pwned\x07\x1b[2J.st"], "t\\x1b]0;pwned\\x07\\x1b[2j.st"),
    # 9, 15, 28: label files
    Case("i15-09-gzip-label-file-expands-beyond-the-limit", lambda f, o: ["train-lrf", f["train"], "--labels", f["bomb.csv.gz"], *R, "-o", o], "decompression bomb", "bomb.csv.gz",
         env={"MAVL_MAX_LABEL_MB": lambda f, o: 1}),
    Case("i15-09-label-file-beyond-the-row-limit", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "-o", o], "MAVL_MAX_LABEL_ROWS", "train_csv",
         env={"MAVL_MAX_LABEL_ROWS": lambda f, o: 5}),
    Case("i15-15-nested-label-map", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--label-map", f["deep_map.json"], *R, "-o", o], "nested too deeply", "deep_map.json"),
    Case("i15-28-label-value-nan", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_nan"], *R, "-o", o], "'nan' (row 5)", "csv_nan"),
    Case("i15-28-label-value-N/A", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_NA"], *R, "-o", o], "'n/a' (row 5)", "csv_NA"),
    Case("i15-28-label-value-None", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_None"], *R, "-o", o], "'none' (row 5)", "csv_None"),
    # 27: one stdout
    Case("i15-27-train-lrf-two-outputs-to-stdout", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "-o", "-", "--embed-out", "-"], "standard output"),
    Case("i15-27-evaluate-json-and-csv-to-stdout", lambda f, o: [*EV(f), "--json", "--csv", "-"], "standard output"),
    # 31, 33: DICOM values and decoders
    Case("i15-31-dicom-rescale-slope-1e999", lambda f, o: EI(f, o, f["slope.dcm"]), "infinite", "slope.dcm"),
    Case("i15-33-jpeg12-dicom-no-decoder-reads", lambda f, o: EI(f, o, f["jpeg12.dcm"]), "installed decoders", "jpeg12.dcm", max_len=400),
]

# Session 3's attack campaign on the newer surfaces (numbered as in /work/notes/s3/s3-attack.md).
PH = lambda f, *x: ["predict", *x, "--model", f["tuned"], "--weights", f["vit"]]  # noqa: E731
EM = lambda f, *x: ["evaluate-maps", f["maps_dir"], *x]  # noqa: E731
CASES += [
    # 01-02: heatmap outputs go through the output guard
    Case("s3-01-heatmap-overlay-onto-an-input-image", lambda f, o: [*PH(f, f["hm_a"], f["hm_a_edema"]), "--heatmap", f["hm_dir"], "--heatmap-labels", "all"], OVERWRITE, "hm_a_edema"),
    Case("s3-02-heatmap-folder-is-stdout", lambda f, o: [*PH(f, f["img0"]), "--heatmap", "-"], "standard output"),
    # 03-06: an output path inside a model folder (weights, config, tokenizer) is an input too
    Case("s3-03-embed-images-output-onto-its-weights", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit_copy"], "-o", f["vit_copy_weights"]], OVERWRITE, "vit_copy_weights"),
    Case("s3-04-predict-out-onto-the-encoder-weights", lambda f, o: ["predict", f["img0"], "--model", f["tuned"], "--weights", f["vit_copy"], "--out", f["vit_copy_weights"]], OVERWRITE, "vit_copy_weights"),
    Case("s3-05-embed-text-output-onto-the-text-model", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["bert_notok"], "-o", f["bert_copy_config"]], OVERWRITE, "bert_copy_config"),
    Case("s3-06-zero-shot-output-onto-the-clip-weights", lambda f, o: ["zero-shot", "--encoder", f"open_clip:{f['clip_dir']}", "--descriptions", f["labels_txt"], "-o", f["clip_weights"]], OVERWRITE, "clip_weights"),
    # 08: two labels, one overlay name
    Case("s3-08-heatmap-labels-share-an-overlay-name", lambda f, o: [*PH(f, f["img0"])[:-4], "--model", f["slug_twins"], "--weights", f["vit"], "--heatmap", o.parent / "hm"], "share the overlay name"),
    # 09-11: evaluate-maps bounds and box files
    Case("s3-09-evaluate-maps-bootstrap-1e9", lambda f, o: EM(f, "--boxes", f["boxes_bigfield"], "--bootstrap", "1000000000"), "--bootstrap"),
    Case("s3-10-evaluate-maps-seed-negative", lambda f, o: EM(f, "--boxes", f["boxes_bigfield"], "--seed", "-1"), "--seed"),
    Case("s3-11-evaluate-maps-box-field-too-large", lambda f, o: EM(f, "--boxes", f["boxes_bigfield"]), "cannot read box file", "boxes_bigfield"),
    # 19: an empty image argument (an unset shell variable) walked the whole working folder
    Case("s3-19-embed-images-empty-argument", lambda f, o: ["embed-images", "", *E, "--weights", f["vit"], "-o", o], "image argument is empty"),
    Case("s3-19-predict-empty-argument", lambda f, o: [*PH(f, ""), "--out", o], "image argument is empty"),
    # 20-23: subgroup bins and metadata, prevalences, label encodings
    Case("s3-20-evaluate-by-nan-bin-edge", lambda f, o: [*EV(f), "--by", "Patient:nan,20"], "finite numbers"),
    Case("s3-21-evaluate-metadata-image-twice-with-two-values", lambda f, o: [*EV(f), "--by", "sex", "--metadata", f["meta_conflict"]], "listed twice", "meta_conflict"),
    Case("s3-22-calibrate-prevalence-given-twice", lambda f, o: ["calibrate", f["tuned"], "--prevalence", "Edema=0.3,Edema=0.5", "--source-prevalence", "Edema=0.2", "-o", o], "given twice"),
    Case("s3-23-label-file-in-utf16", lambda f, o: ["train-lrf", f["train"], "--labels", f["utf16_csv"], *R, "-o", o], "UTF-16", "utf16_csv"),
    # 25-27: --model-args that would allocate gigabytes, and a text file as weights
    Case("s3-25-model-args-img-size-100000", lambda f, o: ["embed-images", f["root"], "--backbone", VIT, "--random-init", "--model-args", '{"img_size": 100000}', "-o", o], "in 1..2048"),
    Case("s3-26-model-args-a-quadrillion-parameters", lambda f, o: ["embed-images", f["root"], "--backbone", VIT, "--random-init", "--model-args", '{"embed_dim": 999999, "num_heads": 3, "depth": 100}', "-o", o], "parameters"),
    Case("s3-27-weights-file-is-text", lambda f, o: EI(f, o, f["root"])[:-4] + ["--weights", f["labels_txt"], "-o", o], "not a weights file", "labels_txt"),
    # 30: a map method that fails on the first image leaves no empty heatmap folder behind
    Case("s3-30-heatmap-method-fails-leaves-no-folder", lambda f, o: [*PH(f, f["img0"]), "--heatmap", o.parent / "hm", "--heatmap-method", "hirescam", "--heatmap-labels", "all"], "HiResCAM"),
    # 16-18: `mavl merge` checks each part's shard record before using it
    Case("s3-16-merge-shard-count-1e12", lambda f, o: ["merge", f["shard_count_1e12"], "-o", o], "missing", "shard_count_1e12"),
    Case("s3-17-merge-shard-skipped-not-a-number", lambda f, o: ["merge", f["shard_skipped_text"], "-o", o], "damaged shard record", "shard_skipped_text"),
    Case("s3-18-merge-shard-command-output-slot-outside", lambda f, o: ["merge", f["shard_output_at_99"], "-o", o], "damaged shard record", "shard_output_at_99"),
    # 12-14: a stored calibration is checked on read
    Case("s3-12-model-calibration-slope-negative", lambda f, o: [*EV(f)[:1], f["cal_negative"], *EV(f)[2:]], "must be > 0", "cal_negative"),
    Case("s3-13-model-says-calibrated-without-tensors", lambda f, o: ["info", f["cal_missing"]], "no calibration tensors", "cal_missing"),
    Case("s3-14-model-calibration-wrong-length", lambda f, o: ["predict", f["img0"], "--model", f["cal_short"], "--out", o], "one per label", "cal_short"),
]


@pytest.mark.parametrize("case", CASES, ids=[(c.values[0] if hasattr(c, "values") else c).id for c in CASES])
def test_bad_input(case: Case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mavl_cli.cli import app as cli

    monkeypatch.setitem(cli._DEBUG, "on", False)
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    inputs_dir = bad["existing"].parent
    watched = [inputs_dir, bad["train"].parent, bad["root"]]
    before = [_digest(w) for w in watched]
    out = tmp_path / "out.st"
    argv = [str(a) for a in case.argv(bad, out)]
    env = {k: str(v(bad, out)) for k, v in (case.env or {}).items()}

    r = run_cli(argv, env=env)

    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert not CONTROL.search(r.stderr), f"raw control characters reached the terminal: {r.stderr!r}"
    assert r.exit_code == 2, f"exit {r.exit_code}, stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    assert case.expect.lower() in line.lower(), line
    if case.names:
        assert bad[case.names].name in line, f"{bad[case.names].name!r} not named in: {line}"
    if case.max_len:
        assert len(line) <= case.max_len, f"{len(line)} characters: {line}"
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
    from mavl_cli.cli import app as cli
    from mavl_cli.io.mavlfile import KINDS

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

    from mavl_cli.core.errors import MavlError
    from mavl_cli.encoders.common import load_state_dict

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


# ------------------------------------------------------------------ issue 15: cases that need more than one failing run


def _tune(bad: dict[str, Path], out) -> list:
    """A cheap command that writes one model file (the output under test)."""
    return ["tune-threshold", bad["tuned"], bad["val"], "--labels", bad["val_csv"], "-o", out]


def _one_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and not CONTROL.search(r.stderr), r.stderr
    return lines[0]


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
    line = _one_error(run_cli(["predict", bad["img0"], "--weights", bad["vit"], "--out", model]))
    assert OVERWRITE in line and "model.safetensors" in line
    alias = tmp_path / "alias.st"
    os.link(model, alias)
    line = _one_error(run_cli(_tune(bad, alias)))
    assert "default model" in line and "alias.st" in line
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["alias.st", "home"]


def test_i15_04_device_nodes_are_never_replaced(bad, tmp_path) -> None:
    """A device node is refused (never replaced by a regular file); /dev/null and /dev/stdout just work."""
    import os
    import stat

    from mavl_cli.io.mavlfile import loads, read_file

    node = tmp_path / "null_copy"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        node = None
    if node is not None:
        line = _one_error(run_cli(_tune(bad, node)))
        assert "not a regular file" in line and "null_copy" in line
        assert stat.S_ISCHR(os.stat(node).st_mode)
    r = run_cli(_tune(bad, "/dev/null"))
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    r = run_cli(_tune(bad, "/dev/stdout"))
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
        line = _one_error(run_cli(["phantoms", tmp_path / "ph", "-n", "3", "--size", "64"]))
        assert "no space left" in line.lower()
        assert not (tmp_path / "ph").exists()
        src = tmp_path / "r18.safetensors"
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(src))
        line = _one_error(run_cli(["import-weights", src, "--backbone", "resnet18", "-o", tmp_path / "w"]))
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
            r = run_cli(_tune(bad, out))
            assert r.exit_code == 0, r.stderr
            assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~mask
        finally:
            os.umask(old)
    out = tmp_path / "m22.st"
    os.chmod(out, 0o640)
    assert run_cli(_tune(bad, out)).exit_code == 0
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
        r = run_cli(_tune(bad, out))
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


def test_i15_18_rich_markup_in_names_is_plain_text(bad, tmp_path) -> None:
    """Paths and labels with rich markup (`a[/b].st`, `Cardiomegaly[/]`, `[link=...]`) are shown as they are:
    no MarkupError, no live hyperlink even with colour forced, and the output is written."""
    import shutil

    labels = contract_meta(bad["text"])["labels"]
    forged = ["Cardiomegaly[/]", "[link=https://example.com/x]click[/link]", "[bold red]loud", *labels[3:]]
    for folder in ("a[", "o["):  # `a[/b].st` is the file `b].st` in the folder `a[`
        (tmp_path / folder).mkdir()
    f = tmp_path / "a[/b].st"
    f.write_bytes(rewrite_header(bad["text"].read_bytes(), set_meta("labels", forged)))
    r = run_cli(["info", f])
    assert r.exit_code == 0, r.stderr
    assert "a[/b].st" in r.stdout and "Cardiomegaly[/]" in r.stdout and "[link=https://example.com/x]" in r.stdout
    r = run_cli(["info", f], env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert r.exit_code == 0, r.stderr
    assert "\x1b]8;" not in r.stdout and "example.com" in r.stdout  # no OSC 8 hyperlink, the text is there
    img = tmp_path / "a[/b].png"
    shutil.copy(bad["img0"], img)
    out = tmp_path / "o[/b].st"
    r = run_cli(["embed-images", img, *E, "--weights", bad["vit"], "-o", out])
    assert r.exit_code == 0, r.stderr
    assert out.exists() and "o[/b].st" in r.stdout


def test_i15_19_file_names_that_are_not_utf8(bad, tmp_path) -> None:
    """Non-UTF-8 bytes in a file name: embedded fine, and shown escaped (\\xe9) in an error line."""
    import os
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(bad["img0"], folder / name)
    out = tmp_path / "out.st"
    r = run_cli(["embed-images", folder, *E, "--weights", bad["vit"], "-o", out])
    assert r.exit_code == 0, r.stderr
    from mavl_cli.io.mavlfile import read_file

    assert read_file(out).ids() == [name]
    (folder / name).write_bytes(b"")
    line = _one_error(run_cli(["embed-images", folder / name, *E, "--weights", bad["vit"], "-o", tmp_path / "o2.st"]))
    assert "caf\\xe9.png" in line


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads and writes everything: permissions cannot be tested")
def test_i15_20_permissions_are_reported_as_such(bad, tmp_path, monkeypatch) -> None:
    """An unwritable $MAVL_HOME is found before the work; an unreadable weights file says 'permission denied'."""
    import os

    home = tmp_path / "home"
    home.mkdir(mode=0o500)
    monkeypatch.setenv("MAVL_HOME", str(home))
    line = _one_error(run_cli(FU(bad, tmp_path / "m.st", bad["text"]) + ["--set-default"]))
    assert "not writable" in line and not (tmp_path / "m.st").exists()
    w = tmp_path / "w.safetensors"
    w.write_bytes((bad["vit"] / "model.safetensors").read_bytes())
    os.chmod(w, 0)
    line = _one_error(run_cli(["embed-images", bad["img0"], *E, "--weights", w, "-o", tmp_path / "o.st"]))
    assert "permission denied" in line.lower()


def test_i15_22_control_characters_in_labels_are_shown_escaped(bad, tmp_path) -> None:
    """ESC]0;title / ESC[2J in label names or metadata reach the terminal escaped, in tables too."""
    labels = contract_meta(bad["text"])["labels"]
    f = tmp_path / "esc.st"
    edit = lambda h: (set_meta("labels", ["Edema\x1b]0;pwned\x07", "x\x1b[2Jy", *labels[2:]])(h),  # noqa: E731
                      h["__metadata__"].__setitem__("command", "mavl \x1b[31mred\nerror: fake"))
    f.write_bytes(rewrite_header(bad["text"].read_bytes(), edit))
    r = run_cli(["info", f])
    assert r.exit_code == 0, r.stderr
    assert not CONTROL.search(r.stdout) and "\x1b" not in r.stdout
    assert "pwned" in r.stdout and "mavl \\x1b[31mred\\nerror: fake" in r.stdout
    # a label name from a CSV header in the per-label table of `evaluate`
    import pandas as pd

    sc = contract_meta(bad["scores"])["labels"]
    names = ["Edema\x1b]0;pwned\x07", *sc[1:]]
    scores = tmp_path / "s.st"
    scores.write_bytes(rewrite_header(bad["scores"].read_bytes(), set_meta("labels", names)))
    labels_csv = tmp_path / "l.csv"
    pd.read_csv(bad["root"] / "labels.csv").rename(columns={sc[0]: names[0]}).to_csv(labels_csv, index=False)
    r = run_cli(["evaluate", "--scores", scores, "--labels", labels_csv])
    assert r.exit_code == 0, r.stderr
    assert "Edema\\x1b]0;pwned\\x07" in r.stdout and not CONTROL.search(r.stdout + r.stderr)


def test_i15_23_csv_cells_are_not_spreadsheet_formulas(bad, tmp_path) -> None:
    """Label names like =HYPERLINK(...), +cmd|' /C calc'!A0, @SUM(1+1) are written with a leading ' to CSVs."""
    import csv

    import pandas as pd

    evil = ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3"]
    sc = contract_meta(bad["scores"])["labels"]
    names = evil + sc[len(evil):]
    scores = tmp_path / "s.st"
    scores.write_bytes(rewrite_header(bad["scores"].read_bytes(), set_meta("labels", names)))
    df = pd.read_csv(bad["root"] / "labels.csv").rename(columns=dict(zip(sc, names)))  # all images scored
    labels = tmp_path / "l.csv"
    df.to_csv(labels, index=False)
    out = tmp_path / "r.csv"
    r = run_cli(["evaluate", "--scores", scores, "--labels", labels, "--csv", out])
    assert r.exit_code == 0, r.stderr
    cells = [c for row in csv.reader(out.open()) for c in row]
    for name in evil:
        assert "'" + name in cells and name not in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not c.replace(".", "").lstrip("-").isdigit() and c != "")]


@pytest.fixture(scope="module")
def killed_embed(bad, tmp_path_factory):
    """An embed-images run killed with SIGKILL mid-way (MAVL_THREADS=1): its checkpoint, and a reference run."""
    import signal

    import test_embed as te

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


def _forge_first_record(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """The checkpoint with its first record's metadata edited and its CRC recomputed (intact, but forged)."""
    (hlen,) = struct.unpack_from("<I", data, 10)
    at = 14 + hlen
    tag, mlen, dlen = struct.unpack_from("<4sIQ", data, at)
    meta = json.loads(data[at + 16 : at + 16 + mlen])
    edit(meta)
    mb = json.dumps(meta).encode()
    blob = data[at + 16 + mlen : at + 16 + mlen + dlen]
    rec = struct.pack("<4sIQ", tag, len(mb), dlen) + mb + blob + struct.pack("<I", zlib.crc32(blob, zlib.crc32(mb)))
    return data[:at] + rec + data[at + 16 + mlen + dlen + 4 :]


def test_i15_24_resume_after_a_kill_is_identical(killed_embed, tmp_path, monkeypatch) -> None:
    """The thread setting is recorded in the checkpoint and reused on --resume (whatever the tuner would pick
    now), so the resumed file's features are byte-identical to an uninterrupted run's."""
    from mavl_cli.io.mavlfile import loads, read_file
    from mavl_cli.io.checkpoint import read_checkpoint_header

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
    partial.write_bytes(_forge_first_record(killed_embed["partial"], edit))
    before = partial.read_bytes()
    line = _one_error(run_cli([*killed_embed["args"], "-o", tmp_path / "out.st", "--resume"]))
    assert "out.st.partial" in line and ("does not belong" in line or "malformed" in line), line
    assert not (tmp_path / "out.st").exists() and partial.read_bytes() == before


def test_i15_26_a_closed_stdout_is_an_error(bad) -> None:
    """`mavl ... -o - | head -c 10`: the reader goes away after 10 bytes; mavl must fail (no success table)."""
    import subprocess
    import sys

    import test_embed as te

    for argv in (_tune(bad, "-"),):  # the model is ~0.5 MB: far beyond a pipe's 64 KiB buffer
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


def test_i15_32_a_byte_order_mark_is_not_part_of_a_label(bad, tiny_bert, tmp_path) -> None:
    """A UTF-8 BOM at the start of labels.txt is not part of the first label's name."""
    from mavl_cli.io.mavlfile import read_file

    txt = tmp_path / "labels.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + bad["labels_txt"].read_bytes())
    r = run_cli(["embed-text", txt, "--text-model", tiny_bert, "-o", tmp_path / "t.st"])
    assert r.exit_code == 0, r.stderr
    assert read_file(tmp_path / "t.st").labels() == [ln for ln in bad["labels_txt"].read_text().splitlines() if ln]


def test_s3_07_open_clip_logs_nothing_beside_the_error_line(bad, tmp_path) -> None:
    """open_clip logs "No pretrained weights loaded" on the root logger when mavl builds an architecture empty to
    load a weights file itself; in a real process (no pytest log capture) that made two stderr lines."""
    import subprocess
    import sys

    import test_embed as te

    argv = ["zero-shot", "--encoder", f"open_clip:{bad['clip_cfg']}", "--weights", bad["foreign"],
            "--descriptions", bad["labels_txt"], "-o", tmp_path / "z.st"]
    r = subprocess.run([sys.executable, "-m", "mavl_cli", *map(str, argv)], cwd=te.REPO, capture_output=True, text=True,
                       env={**__import__("os").environ, "COLUMNS": "200"}, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and bad["foreign"].name in lines[0] and "do not fit" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_s3_15_heatmap_of_a_label_added_from_text(bad, tmp_path) -> None:
    """`predict --descriptions extra.json --heatmap-labels Pneumonia`: a label the descriptions add can be mapped
    (was: refused as unknown, since --heatmap-labels was checked against the model's labels only)."""
    from mavl_cli.io.mavlfile import read_file

    desc = tmp_path / "extra.json"
    desc.write_text(json.dumps({"Pneumonia": ["patchy airspace consolidation"]}))
    r = run_cli([*PH(bad, bad["img0"]), "--descriptions", desc, "--heatmap", tmp_path / "hm", "--heatmap-labels", "Pneumonia"])
    assert r.exit_code == 0, r.stderr
    maps = read_file(tmp_path / "hm" / f"{bad['img0'].stem}.maps.safetensors")
    assert maps.labels() == ["Pneumonia"] and (tmp_path / "hm" / f"{bad['img0'].stem}.Pneumonia.png").is_file()


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


def test_s3_29_compare_pairs_ids_written_from_another_root(bad, tmp_path) -> None:
    """`compare` paired A and B by exact id, so `predict data/images` ids against a tool's `data/images/x.png` ids
    "shared no image" although `evaluate` matched both to the label file. They now pair through the label row."""
    r = run_cli(["compare", bad["scores"], bad["scores"], "--labels", bad["root"] / "labels.csv", "--bootstrap", "20", "--json"])
    assert r.exit_code == 0, r.stderr
    same = json.loads(r.stdout)
    moved = tmp_path / "moved.st"
    ids = contract_meta(bad["scores"])["ids"]
    moved.write_bytes(rewrite_header(bad["scores"].read_bytes(), set_meta("ids", [f"elsewhere/images/{i}" for i in ids])))
    r = run_cli(["compare", bad["scores"], moved, "--labels", bad["root"] / "labels.csv", "--bootstrap", "20", "--json"])
    assert r.exit_code == 0, r.stderr
    other = json.loads(r.stdout)
    assert other.pop("b") == str(moved) and same.pop("b") == str(bad["scores"])
    assert other == same and other["images"] == len(ids)
