"""Test images in the formats radiographs arrive in, and feature comparison helpers (for test_encoders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def film(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured float image in [0, 1] (lungs, mediastinum, ribs, noise), ``h x w``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / h, x / w
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2) ** 2)
    lungs = np.exp(-(((np.abs(x - 0.5) - 0.2) / 0.13) ** 2 + ((y - 0.45) / 0.28) ** 2))
    ribs = 0.08 * np.sin(40 * y + 6 * np.abs(x - 0.5))
    img = 0.75 * body - 0.45 * lungs + ribs + 0.04 * rng.standard_normal((h, w))
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def write_images(folder: Path) -> dict[str, Path]:
    """8-bit PNG, 16-bit PNG, MONOCHROME1 DICOM and a large JPEG (all gray, non-square)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    out["png8"] = folder / "film8.png"
    Image.fromarray((film(83, 71, 1) * 255).round().astype(np.uint8)).save(out["png8"])
    out["png16"] = folder / "film16.png"
    Image.fromarray((film(90, 77, 2) * 50000 + 3000).round().astype(np.uint16)).save(out["png16"])
    out["dicom_m1"] = folder / "film_m1.dcm"
    write_dicom(out["dicom_m1"], (4095 - film(96, 80, 3) * 4095).round().astype(np.uint16), "MONOCHROME1")
    out["jpeg_large"] = folder / "film_large.jpg"
    Image.fromarray((film(1400, 1150, 4) * 255).round().astype(np.uint8)).save(out["jpeg_large"], quality=92)
    return out


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, **attrs) -> Path:
    """A 16-bit-allocated DX DICOM of ``arr`` (stored values) written with pydicom; ``attrs`` set further
    data elements (RescaleSlope, WindowCenter, ...) by keyword. HighBit follows BitsStored."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, bits, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.HighBit = int(ds.BitsStored) - 1
    ds.PixelData = arr.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def compare(a, b) -> tuple[float, float]:
    """(min cosine over rows, max abs difference) between two ``[N, D]`` feature arrays."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    assert a.shape == b.shape, (a.shape, b.shape)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cos.min()), float(np.abs(a - b).max())


def mavl_features(enc, images) -> np.ndarray:
    """mavl's whole image path (family preprocessing, batching, encoder) on decoded PIL images."""
    import torch

    from mavl_cli.encoders.preprocess import preprocess_images

    with torch.inference_mode():
        return enc(preprocess_images(images, enc.preprocessing)).numpy()


def mavl_file_features(enc, paths) -> np.ndarray:
    """mavl's path from files: decoding (with its downscaling), family preprocessing, encoder."""
    import torch

    from mavl_cli.encoders.preprocess import (
        load_and_prepare,
        normalize_batch,
        stack_batch,
    )

    with torch.inference_mode():
        batch = stack_batch([load_and_prepare(p, enc.preprocessing) for p in paths])
        return enc(normalize_batch(batch, enc.preprocessing)).numpy()


def report(family: str, case: str, cos: float, diff: float) -> None:
    print(f"[exactness] {family:9s} {case:28s} cosine {cos:.7f}  max|diff| {diff:.3e}")


XRV_TINY_OPTIONS = {"growth_rate": 8, "block_config": [1, 1], "num_init_features": 8}


def write_tiny_family_models(root: Path) -> dict[str, Path]:
    """One tiny random model per non-timm family, saved as that family's own library saves it:
    ``hf`` a DINOv2 folder (save_pretrained + its image processor), ``open_clip`` a hub-layout folder
    (open_clip_config.json + safetensors weights), ``xrv`` a torchxrayvision DenseNet state dict
    (load it with ``--model-args XRV_TINY_OPTIONS``)."""
    import json

    import torch
    import torchxrayvision as xrv
    import transformers as T
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dino = root / "tiny-dinov2"
    T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=28, patch_size=7)).save_pretrained(dino)
    T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    clip_dir = root / "tiny-clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
    o = XRV_TINY_OPTIONS
    torch.save(xrv.models.DenseNet(num_classes=18, growth_rate=o["growth_rate"], block_config=tuple(o["block_config"]),
                                   num_init_features=o["num_init_features"]).state_dict(), root / "densenet.pt")
    return {"hf": dino, "open_clip": clip_dir, "xrv": root / "densenet.pt"}
