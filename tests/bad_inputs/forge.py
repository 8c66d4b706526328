"""Forging broken inputs for the bad-input catalogue, and the checks every case shares."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from tests.conftest import TINY_VIT_ARGS

VIT = "vit_tiny_patch16_224"
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # any control character but the newline
VIT32_ARGS = {**TINY_VIT_ARGS, "embed_dim": 32, "depth": 1}

DEEP = "[" * 200_000 + "]" * 200_000  # JSON nested 200k levels: RecursionError in json.loads


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


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


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


def tune_args(bad: dict[str, Path], out) -> list:
    """A cheap command that writes one model file (the output under test)."""
    return ["tune-threshold", bad["tuned"], bad["val"], "--labels", bad["val_csv"], "-o", out]


def one_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and not CONTROL.search(r.stderr), r.stderr
    return lines[0]


def forge_first_record(data: bytes, edit: Callable[[dict], None]) -> bytes:
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


