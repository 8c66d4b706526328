"""Each encoder family's own eval preprocessing, split for speed.

The recipe is a JSON dict (``encoder.preprocessing``, recorded in every file)
whose ``kind`` names the family that defined it; a dict without ``kind``
(files written before encoder families) is timm's.

timm (``kind: timm``, mavl's own uint8 path, equal to timm's eval transform):
per image (in decoder threads) decode near the target size, resize the short
side to ``floor(input / crop_pct)`` with the long side truncated (torchvision's
rule) and centre-crop with rounded offsets, giving a small uint8 array,
``[H, W]`` for gray (most radiographs: resizing one channel instead of three)
or ``[H, W, 3]``; per batch (once, vectorised) stack, move the uint8 batch to
the device (4x fewer bytes than float), then one fused scale-and-shift that
also broadcasts gray to three channels (an NCHW view of channels-last memory).

Other kinds (``hf``, ``open_clip``, ``xrv``): the family module's
``prepare(img, cfg)`` runs the family's own transform on the decoded image
and returns float32 ``[C, H, W]``; batches are stacked and moved as they are.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mavl_cli.encoders import family_module
from mavl_cli.encoders.geometry import CropGeometry, centre_offset
from mavl_cli.io.imageio import load_radiograph

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}
_LOCK = threading.Lock()


def kind(data_config: dict[str, Any]) -> str:
    return str(data_config.get("kind") or "timm")


def _family(data_config: dict[str, Any]) -> Any:
    with _LOCK:  # first imports of a family library from several decoder threads at once
        return family_module(kind(data_config))


def target_geometry(data_config: dict[str, Any]) -> tuple[int, int, int]:
    """(resize short side, crop height, crop width) from a timm data config."""
    _, h, w = data_config["input_size"]
    crop_pct = float(data_config.get("crop_pct", 1.0) or 1.0)
    scale = int(math.floor(min(h, w) / crop_pct))
    return scale, h, w


def decode_size(data_config: dict[str, Any]) -> int:
    """Shortest side the decoder may downscale to before the family's transform runs."""
    if kind(data_config) == "timm":
        scale = target_geometry(data_config)[0]
        # the decoder downscales with PIL bicubic (box-reducing only beyond 4x): the very resize timm's
        # transform would do, so only bicubic models may let it go all the way to the target size
        return scale if str(data_config.get("interpolation", "bicubic")) == "bicubic" and \
            data_config.get("crop_mode") != "squash" else 4 * scale
    return int(_family(data_config).decode_size(data_config))


def resized_size(data_config: dict[str, Any], iw: int, ih: int) -> tuple[int, int]:
    """The (width, height) a timm-style image of size (iw, ih) is resized to before the centre crop."""
    scale, h, w = target_geometry(data_config)
    if data_config.get("crop_mode") == "squash":
        crop_pct = float(data_config.get("crop_pct", 1.0) or 1.0)
        return int(math.floor(w / crop_pct)), int(math.floor(h / crop_pct))
    if iw <= ih:
        return scale, int(scale * ih / iw)
    return int(scale * iw / ih), scale


def input_geometry(data_config: dict[str, Any], size: tuple[int, int]) -> Any:
    """How a decoded image of ``size`` (width, height) becomes the model input, as a
    :class:`mavl_cli.explain.maps.CropGeometry` (in that image's pixels).

    Declared from the same recipe :func:`prepare_image` runs: timm's here (the
    rule above), every other family's by its module's ``geometry(cfg, w, h)``.
    """

    iw, ih = int(size[0]), int(size[1])
    if kind(data_config) != "timm":
        return _family(data_config).geometry(data_config, iw, ih)
    _, h, w = target_geometry(data_config)
    nw, nh = resized_size(data_config, iw, ih)
    # center_crop below: torchvision's rounded offsets; a crop larger than the image pads it, centred
    squash = data_config.get("crop_mode") == "squash"
    rule = (f"{'squash' if squash else 'shortest edge'} to {nw}x{nh} "
            f"(crop_pct {float(data_config.get('crop_pct', 1.0) or 1.0):g}), centre crop {w}x{h}")
    return CropGeometry(iw, ih, nw, nh, centre_offset(nw, w), centre_offset(nh, h), w, h, f"timm: {rule}")


def prepare_image(img: Any, data_config: dict[str, Any]) -> np.ndarray:
    """PIL image (L or RGB) -> one image's array ready for batching (see the module docstring)."""
    if kind(data_config) != "timm":
        return _family(data_config).prepare(img, data_config)
    scale, h, w = target_geometry(data_config)
    resample = _RESAMPLE.get(str(data_config.get("interpolation", "bicubic")), 3)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    iw, ih = img.size
    nw, nh = resized_size(data_config, iw, ih)
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), resample=resample)
    return np.asarray(center_crop(img, h, w), dtype=np.uint8)


def center_crop(img: Any, h: int, w: int) -> Any:
    """torchvision's CenterCrop on a PIL image (offsets rounded, zero padding when too small)."""
    iw, ih = img.size
    if w > iw or h > ih:
        padded = Image.new(img.mode, (max(w, iw), max(h, ih)), 0)
        padded.paste(img, ((w - iw) // 2 if w > iw else 0, (h - ih) // 2 if h > ih else 0))
        img, (iw, ih) = padded, padded.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def load_and_prepare(path: str | Path, data_config: dict[str, Any]) -> np.ndarray:
    return prepare_image(load_radiograph(path, target_size=decode_size(data_config)), data_config)


def stack_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """uint8 ``[B, H, W, 1]`` when every image is gray (expanded on the device), else ``[B, H, W, 3]``;
    float32 ``[B, C, H, W]`` for families whose transform already normalised."""
    if not arrays:
        return np.zeros((0, 0, 0, 1), dtype=np.uint8)
    if arrays[0].dtype != np.uint8:
        return np.stack(arrays).astype(np.float32, copy=False)
    if all(a.ndim == 2 for a in arrays):
        return np.stack(arrays)[..., None]
    return np.stack([a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays])


def normalize_batch(batch: np.ndarray, data_config: dict[str, Any], device: Any = "cpu") -> Any:
    """A stacked batch -> float ``[B, C, H, W]`` on ``device``, normalised as the family wants.

    uint8 (timm): ``(x / 255 - mean) / std`` computed as ``x * a - b`` in one pass.
    """

    x = batch if torch.is_tensor(batch) else torch.from_numpy(np.ascontiguousarray(batch))  # tensors: pinned by a DataLoader
    x = x.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x.float()
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    std = torch.tensor(data_config["std"], dtype=torch.float64)
    mean = torch.tensor(data_config["mean"], dtype=torch.float64)
    a = (1.0 / (255.0 * std)).float().to(x.device)
    b = (mean / std).float().to(x.device)
    return torch.addcmul(-b, x.float(), a).permute(0, 3, 1, 2)


def preprocess_images(images: list[Any], data_config: dict[str, Any], device: Any = "cpu") -> Any:
    """Decoded PIL images -> the encoder's input batch (the whole path, for APIs and tests)."""
    return normalize_batch(stack_batch([prepare_image(im, data_config) for im in images]), data_config, device)
