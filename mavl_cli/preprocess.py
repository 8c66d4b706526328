"""The backbone's own eval preprocessing, split for speed.

Per image (in decoder threads): decode near the target size, resize the short
side to ``input / crop_pct`` and centre-crop, as timm's eval transform does,
giving a small uint8 array, ``[H, W]`` for gray (most radiographs: resizing one
channel instead of three) or ``[H, W, 3]`` for colour. Per batch (once,
vectorised): stack, move the uint8 batch to the device (4x fewer bytes than
float), then one fused scale-and-shift that also broadcasts gray to three
channels, giving an NCHW view of NHWC memory (channels-last).
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
    """PIL image (L or RGB) -> uint8 crop, ``[H, W]`` (gray) or ``[H, W, 3]``, ready for batching."""
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
    return np.asarray(img, dtype=np.uint8)


def load_and_prepare(path: str | Path, data_config: dict[str, Any]) -> np.ndarray:
    from mavl_cli.imageio import load_radiograph

    scale, _, _ = target_geometry(data_config)
    return prepare_image(load_radiograph(path, target_size=scale), data_config)


def stack_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """uint8 ``[B, H, W, 1]`` when every image is gray (expanded on the device), else ``[B, H, W, 3]``."""
    if not arrays:
        return np.zeros((0, 0, 0, 1), dtype=np.uint8)
    if all(a.ndim == 2 for a in arrays):
        return np.stack(arrays)[..., None]
    return np.stack([a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays])


def normalize_batch(batch: np.ndarray, data_config: dict[str, Any], device: Any = "cpu") -> Any:
    """uint8 ``[B, H, W, 1 or 3]`` -> float ``[B, 3, H, W]`` (channels-last memory), normalised.

    ``(x / 255 - mean) / std`` is computed as ``x * a - b`` in one pass.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    std = torch.tensor(data_config["std"], dtype=torch.float64)
    mean = torch.tensor(data_config["mean"], dtype=torch.float64)
    a = (1.0 / (255.0 * std)).float().to(x.device)
    b = (mean / std).float().to(x.device)
    return torch.addcmul(-b, x.float(), a).permute(0, 3, 1, 2)
