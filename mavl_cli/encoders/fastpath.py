"""The GPU fast path of `embed-images`, and how the pipeline is chosen and recorded.

Two input pipelines feed the same forward loop (:func:`mavl_cli.models.embed.embed_images`):

- ``threads`` (the CPU default): decoder threads run the backbone's own eval
  preprocessing with PIL (:mod:`mavl_cli.encoders.preprocess`) a few batches ahead.
- ``device`` (the CUDA default): DataLoader worker *processes* read JPEG
  bytes and fully decode everything else (PNG, DICOM, TIFF: PIL/pydicom and
  the same eval preprocessing as ``threads``), handing pinned uint8 batches
  over; JPEGs are then decoded in one batched call on the GPU
  (``torchvision.io.decode_jpeg(..., device="cuda")``, nvJPEG), resized
  (antialiased bicubic) and centre-cropped on the GPU, and the whole batch is
  normalised there. A JPEG nvJPEG refuses (CMYK, lossless, damaged) goes
  through the CPU decoder instead, so it still gets PIL's clear error or
  decode.

Each choice falls back cleanly: no CUDA (CPU, MPS) -> ``threads``; nvJPEG
unavailable -> ``device`` with CPU decoding of JPEGs in the workers;
``--compile`` failing -> eager. Channels-last memory is used on CUDA for
convolutional backbones (where cuDNN is faster with it), not for ViTs. What
was chosen is written into the output's ``pipeline`` metadata.

The ``device`` pipeline runs on CPU too (``--pipeline device --device cpu``:
torchvision's CPU JPEG decoder, the same resize code): that is how the tests
exercise it without a GPU. For PNG/DICOM it gives exactly the ``threads``
features; for JPEG the GPU resampler differs from PIL's in the last grey
levels (tested: feature cosine >= 0.999).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.loader import strip_path
from mavl_cli.encoders.preprocess import kind as recipe
from mavl_cli.encoders.preprocess import (
    load_and_prepare,
    normalize_batch,
    target_geometry,
)
from mavl_cli.io.imageio import is_dicom

PIPELINES = ("auto", "threads", "device")
_JPEG = (".jpg", ".jpeg")


@dataclass
class Pipeline:
    kind: str = "threads"  # threads | device
    jpeg_decode: str = "cpu"  # cpu | nvjpeg
    resize: str = "cpu"  # cpu (PIL) | device (JPEGs on the device)
    channels_last: bool = False
    compile: bool = False
    notes: list[str] = field(default_factory=list)

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


def _has_convs(model: Any) -> bool:

    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1  # a ViT has one: its patch embedding


def nvjpeg_available(dev: Any) -> tuple[bool, str]:
    """Whether torchvision decodes JPEGs on ``dev`` (a tiny probe image)."""
    if dev.type != "cuda":
        return False, "not a CUDA device"
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        probe = encode_jpeg(torch.zeros(1, 8, 8, dtype=torch.uint8))
        decode_jpeg([probe], device=dev)
        return True, ""
    except Exception as exc:  # no nvJPEG in this torchvision build, old driver...
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def choose_pipeline(requested: str, dev: Any, model: Any, compile_model: bool = False,
                    data_config: dict[str, Any] | None = None) -> Pipeline:
    """The input pipeline for ``dev``; ``requested``: auto | threads | device.

    The device pipeline implements timm's eval recipe; encoder families with
    their own transform (hf, open_clip, xrv) keep it, in the thread pipeline.
    """

    if requested not in PIPELINES:
        raise MavlError(f"unknown --pipeline {requested!r}; use one of {', '.join(PIPELINES)}")
    kind = requested if requested != "auto" else ("device" if dev.type == "cuda" else "threads")
    p = Pipeline(kind=kind)
    family = recipe(data_config or {})
    if kind == "device" and family != "timm":
        if requested == "device":
            raise MavlError(f"--pipeline device implements timm's preprocessing; this encoder's ({family}) runs with "
                            "--pipeline threads")
        p.kind = kind = "threads"
        p.notes.append(f"the {family} family's own preprocessing runs in decoder threads")
    if kind == "device":
        p.resize = "device"
        if dev.type == "cuda":
            ok, why = nvjpeg_available(dev)
            p.jpeg_decode = "nvjpeg" if ok else "cpu"
            if not ok:
                p.notes.append(f"nvJPEG unavailable ({why}): JPEGs are decoded on the CPU")
        else:
            p.jpeg_decode = "cpu"
    p.channels_last = dev.type == "cuda" and _has_convs(model)
    p.compile = bool(compile_model)
    return p


# ----------------------------------------------------------------------------- the device pipeline


class _Chunks:
    """A map-style dataset of whole batches, for DataLoader worker processes."""

    def __init__(self, chunks: list[list[Any]], data_config: dict[str, Any], read_jpeg_bytes: bool) -> None:
        self.chunks, self.dc, self.read_jpeg_bytes = chunks, data_config, read_jpeg_bytes

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict[str, Any]:


        jpeg: list[tuple[int, Any]] = []
        crops: list[tuple[int, np.ndarray]] = []
        bad: list[dict[str, str]] = []
        for i, it in enumerate(self.chunks[k]):
            path = Path(it.path)
            try:
                if self.read_jpeg_bytes and path.suffix.lower() in _JPEG and not is_dicom(path):
                    jpeg.append((i, torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)))
                else:
                    crops.append((i, load_and_prepare(path, self.dc)))
            except MavlError as exc:
                bad.append({"i": i, "id": it.id, "path": str(it.path), "reason": strip_path(str(exc), it.path)})
            except Exception as exc:
                bad.append({"i": i, "id": it.id, "path": str(it.path), "reason": f"{type(exc).__name__}: {exc}"})
        gray = [(i, a) for i, a in crops if a.ndim == 2]
        colour = [(i, a) for i, a in crops if a.ndim == 3]
        out: dict[str, Any] = {"k": k, "jpeg": jpeg, "bad": bad,
                               "gray_idx": [i for i, _ in gray], "colour_idx": [i for i, _ in colour]}
        out["gray"] = torch.from_numpy(np.stack([a for _, a in gray])) if gray else None
        out["colour"] = torch.from_numpy(np.stack([a for _, a in colour])) if colour else None
        return out


def _identity(x: Any) -> Any:
    return x


def resize_crop(img: Any, data_config: dict[str, Any]) -> Any:
    """``[C, H, W]`` (or a batch ``[B, C, H, W]`` of one size) uint8 on any device -> the eval crop
    ``[C, h, w]`` (``[B, C, h, w]``), float in 0..255 rounded like a uint8 image.

    The geometry is exactly :func:`mavl_cli.encoders.preprocess.prepare_image`'s
    (torchvision's resize and centre crop, or squash); the resampler is
    torch's antialiased bicubic (PIL's is bicubic too, its kernel support and
    rounding differ slightly).
    """

    scale, h, w = target_geometry(data_config)
    single = img.ndim == 3
    x = img.float().unsqueeze(0) if single else img.float()
    ih, iw = x.shape[-2:]
    if data_config.get("crop_mode") == "squash":
        crop_pct = float(data_config.get("crop_pct", 1.0) or 1.0)
        nw, nh = int(math.floor(w / crop_pct)), int(math.floor(h / crop_pct))
    elif iw <= ih:  # torchvision's rule, as preprocess.prepare_image: the long side truncated
        nw, nh = scale, int(scale * ih / iw)
    else:
        nw, nh = int(scale * iw / ih), scale
    if (nw, nh) != (iw, ih):
        mode = {"bilinear": "bilinear", "nearest": "nearest"}.get(str(data_config.get("interpolation")), "bicubic")
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest",
                          align_corners=False if mode != "nearest" else None)
        x = x.round().clamp_(0, 255)
    if w > nw or h > nh:  # torchvision's CenterCrop pads with zeros
        pw, ph = max(0, w - nw), max(0, h - nh)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        nh, nw = x.shape[-2:]
    top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
    x = x[:, :, top : top + h, left : left + w]
    return x[0] if single else x


def _normalise(x: Any, data_config: dict[str, Any]) -> Any:
    """float ``[B, 3, H, W]`` in 0..255 -> normalised, as :func:`mavl_cli.encoders.preprocess.normalize_batch` computes it."""

    std = torch.tensor(data_config["std"], dtype=torch.float64)
    mean = torch.tensor(data_config["mean"], dtype=torch.float64)
    a = (1.0 / (255.0 * std)).float().to(x.device).view(1, -1, 1, 1)
    b = (mean / std).float().to(x.device).view(1, -1, 1, 1)
    return torch.addcmul(-b, x, a)


def device_batches(
    chunks: list[list[Any]], data_config: dict[str, Any], workers: int, dev: Any, pipeline: Pipeline,
) -> Iterator[tuple[list[Any], Any, list[int], list[dict[str, str]]]]:
    """Yield ``(chunk, x, ok, bad)`` with ``x`` the normalised float batch ``[len(ok), 3, H, W]`` on ``dev``."""

    read_bytes = pipeline.resize == "device"
    loader = DataLoader(_Chunks(chunks, data_config, read_bytes), batch_size=None, shuffle=False,
                        num_workers=max(0, workers), collate_fn=_identity, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
    for got in loader:
        chunk = chunks[got["k"]]
        images: dict[int, Any] = {}
        bad = [{k: v for k, v in b.items() if k != "i"} for b in got["bad"]]
        for key, idx in (("gray", got["gray_idx"]), ("colour", got["colour_idx"])):
            if got[key] is not None:
                x = normalize_batch(got[key], data_config, dev)
                for j, i in enumerate(idx):
                    images[i] = x[j]
        if got["jpeg"]:
            decoded = _decode_jpegs([t for _, t in got["jpeg"]], dev, pipeline)
            same_size: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
            for (i, _), img in zip(got["jpeg"], decoded):
                it = chunk[i]
                if img is None:  # nvJPEG/torchvision refused it: the CPU decoder decides (and explains)
                    try:
                        images[i] = normalize_batch(load_and_prepare(it.path, data_config)[None], data_config, dev)[0]
                    except MavlError as exc:
                        bad.append({"id": it.id, "path": str(it.path), "reason": strip_path(str(exc), it.path)})
                    continue
                same_size.setdefault(tuple(img.shape), []).append((i, img))
            for group in same_size.values():  # one resize per image size (a data set has few), not per image
                crops = resize_crop(torch.stack([img for _, img in group]), data_config)
                crops = _normalise(crops.expand(-1, 3, -1, -1) if crops.shape[1] == 1 else crops, data_config)
                for (i, _), crop in zip(group, crops):
                    images[i] = crop
        ok = sorted(images)
        bad.sort(key=lambda b: next(i for i, it in enumerate(chunk) if it.id == b["id"]))
        if ok:  # the memory layout of the threads pipeline's batches (an NCHW view of NHWC memory)
            x = torch.stack([images[i].expand(3, -1, -1) for i in ok]).contiguous(memory_format=torch.channels_last)
        else:
            x = torch.zeros(0, *data_config["input_size"], device=dev)
        yield chunk, x, ok, bad


def _decode_jpegs(blobs: list[Any], dev: Any, pipeline: Pipeline) -> list[Any]:
    """Decode on ``dev`` (nvJPEG) or on the CPU with torchvision; None for each image it refuses."""

    from torchvision.io import ImageReadMode, decode_jpeg

    where = dev if pipeline.jpeg_decode == "nvjpeg" else "cpu"
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")
    try:
        out = decode_jpeg(blobs, device=where, mode=ImageReadMode.UNCHANGED)
        out = [o.to(dev, non_blocking=True) for o in out]
    except Exception:
        out = []
        for b in blobs:  # one bad file must not fail its neighbours
            try:
                out.append(decode_jpeg(b, device=where, mode=ImageReadMode.UNCHANGED).to(dev))
            except Exception:
                out.append(None)
    return [o if o is None or o.shape[0] in (1, 3) else None for o in out]


def maybe_compile(model: Any, pipeline: Pipeline) -> Any:
    if not pipeline.compile:
        return model

    try:
        return torch.compile(model)
    except Exception as exc:
        pipeline.compile = False
        pipeline.notes.append(f"--compile failed ({type(exc).__name__}); running eager")
        return model
