"""The backbone's own eval preprocessing, split for speed.

Per image (in decoder threads): decode near the target size, resize the short
side to ``input / crop_pct`` and centre-crop, as timm's eval transform does,
giving a small uint8 array. Per batch (once, vectorised): to float, gray to
three channels, normalise with the model's mean/std, NCHW view of NHWC memory
(i.e. channels-last, which convolutional backbones prefer on CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def target_geometry(data_config: dict[str, Any]) -> tuple[int, int, int]:
    """(resize short side, crop height, crop width) from a timm data config."""
    _, h, w = data_config["input_size"]
    crop_pct = float(data_config.get("crop_pct", 1.0) or 1.0)
    scale = int(math.floor(min(h, w) / crop_pct))
    return scale, h, w


def prepare_image(img: Any, data_config: dict[str, Any]) -> np.ndarray:
    """PIL image (L or RGB) -> uint8 ``[H, W, 3]`` crop ready for batching."""
    from PIL import Image

    scale, h, w = target_geometry(data_config)
    resample = _RESAMPLE.get(str(data_config.get("interpolation", "bicubic")), 3)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    iw, ih = img.size
    r = scale / min(iw, ih)
    nw, nh = max(w, round(iw * r)), max(h, round(ih * r))
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), resample=resample, reducing_gap=3.0 if r < 0.5 else None)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def load_and_prepare(path: str | Path, data_config: dict[str, Any]) -> np.ndarray:
    from mavl_cli.imageio import load_radiograph

    scale, _, _ = target_geometry(data_config)
    return prepare_image(load_radiograph(path, target_size=scale), data_config)


def normalize_batch(batch: np.ndarray, data_config: dict[str, Any], device: Any = "cpu") -> Any:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` (channels-last memory), normalised."""
    import torch

    x = torch.from_numpy(batch).to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(data_config["mean"], device=x.device, dtype=x.dtype)
    std = torch.tensor(data_config["std"], device=x.device, dtype=x.dtype)
    x = (x - mean).div_(std)
    return x.permute(0, 3, 1, 2)
