"""Explanation maps as files: names, coordinates, peaks, overlays, the ``maps`` kind.

Light on purpose (numpy and Pillow, no torch): `mavl evaluate-maps` and
`mavl info` use it without loading a model.

Coordinates. The model sees a box cut from a rescaled film, as the encoder
family's own preprocessing makes it (each family declares that geometry,
:func:`mavl_cli.encoders.preprocess.input_geometry`). A map computed on that input, on a grid of
``h x w`` cells covering the crop, is taken back to the original film by
:func:`to_original`: each original pixel centre is carried forward through
the resize and the crop into the grid's coordinates and the map is sampled
there bilinearly. Pixels the crop cut away were never seen by the model; they
get the map's minimum, so a peak always lies inside the seen area.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.geometry import CropGeometry
from mavl_cli.encoders.preprocess import input_geometry
from mavl_cli.io.mavlfile import read_file, write_file

MAPS_SUFFIX = ".maps.safetensors"


def label_slug(label: str) -> str:
    """A label as it appears in file names: ``Pleural Effusion`` -> ``Pleural_Effusion``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label.strip()).strip("_") or "label"


def mask_name(stem: str, label: str) -> str:
    """``<stem>.<label>.png``: the name of a mask or an overlay."""
    return f"{stem}.{label_slug(label)}.png"


def split_mask_name(name: str, labels: list[str]) -> tuple[str, str] | None:
    """(stem, label) for a ``<stem>.<label>.png`` name whose label is one of ``labels``; None otherwise."""
    for lab in sorted(labels, key=len, reverse=True):
        tail = f".{label_slug(lab)}.png"
        if name.endswith(tail) and len(name) > len(tail):
            return name[: -len(tail)], lab
    return None


def crop_geometry(orig_size: tuple[int, int], decoded_size: tuple[int, int], data_config: dict[str, Any]) -> CropGeometry:
    """The geometry the family's own eval preprocessing applies to this film.

    ``orig_size``: (width, height) of the film at full resolution;
    ``decoded_size``: the size the decoder handed to the preprocessing (it may
    have downscaled already; both are rescalings of the whole frame). The
    family declares the geometry from the same recipe its preprocessing runs
    (:func:`mavl_cli.encoders.preprocess.input_geometry`); a family that cannot is one
    clear error.
    """

    g = input_geometry(data_config, (int(decoded_size[0]), int(decoded_size[1])))
    return replace(g, orig_w=int(orig_size[0]), orig_h=int(orig_size[1]))


def _axis_weights(n_out: int, n_grid: int, scale: float, offset: float, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sampling matrix ``[n_out, n_grid]`` for one axis, and which outputs fall inside the crop."""
    c = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - offset  # crop pixel units, edges at 0 and extent
    inside = (c >= 0.0) & (c <= extent)
    f = np.clip(c * (n_grid / extent) - 0.5, 0.0, n_grid - 1.0)
    i0 = np.minimum(np.floor(f).astype(int), max(n_grid - 2, 0))
    frac = f - i0
    m = np.zeros((n_out, n_grid), np.float64)
    rows = np.arange(n_out)
    m[rows, i0] += 1.0 - frac
    if n_grid > 1:
        m[rows, i0 + 1] += frac
    else:
        m[rows, 0] = 1.0
    return m, inside


def to_original(maps: np.ndarray, geom: CropGeometry) -> np.ndarray:
    """``[L, h, w]`` maps on the input crop's grid -> ``[L, orig_h, orig_w]`` float32 on the original film."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    _, gh, gw = maps.shape
    my, in_y = _axis_weights(geom.orig_h, gh, geom.resized_h / geom.orig_h, geom.top, geom.crop_h)
    mx, in_x = _axis_weights(geom.orig_w, gw, geom.resized_w / geom.orig_w, geom.left, geom.crop_w)
    # One label at a time into a float32 result: a 3000 px film x 14 labels stays one float32 copy
    # (~0.4 GB) instead of several float64 ones.
    out = np.empty((maps.shape[0], geom.orig_h, geom.orig_w), np.float32)
    seen = in_y[:, None] & in_x[None, :]
    cut = None if seen.all() else ~seen
    for k in range(maps.shape[0]):
        out[k] = (my @ maps[k]) @ mx.T
        if cut is not None:
            out[k][cut] = maps[k].min()
    return out


def peak(m: np.ndarray) -> tuple[int, int]:
    """(x, y) pixel of a 2-D map's maximum (first one on ties)."""
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(x), int(y)


_CMAP = np.array([  # dark blue -> cyan -> yellow -> red: cold areas stay readable under it
    [0.0, 0.05, 0.05, 0.45], [0.35, 0.0, 0.75, 0.95], [0.65, 1.0, 0.9, 0.1], [1.0, 0.9, 0.05, 0.0]])


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB floats ``[..., 3]``."""
    v = np.clip(v, 0.0, 1.0)
    return np.stack([np.interp(v, _CMAP[:, 0], _CMAP[:, k]) for k in (1, 2, 3)], axis=-1)


def normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(m)), float(np.max(m))
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m, dtype=np.float32)


def overlay(film: Any, m: np.ndarray, alpha: float = 0.55, mark_peak: bool = True) -> Any:
    """The film (PIL, as displayed) with the map blended over it; the peak marked by a small ring."""

    base = np.asarray(film.convert("RGB"), dtype=np.float32) / 255.0
    if base.shape[:2] != m.shape:
        raise MavlError(f"a {m.shape[1]}x{m.shape[0]} map does not fit a {base.shape[1]}x{base.shape[0]} film")
    v = normalise(np.asarray(m, dtype=np.float32))
    a = (alpha * np.clip(v * 1.4 - 0.2, 0.0, 1.0))[..., None]
    rgb = base * (1.0 - a) + colormap(v) * a
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    if mark_peak:
        x, y = peak(m)
        r = max(3, round(min(m.shape) / 40))
        d = ImageDraw.Draw(img)
        d.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=max(1, r // 3))
    return img


def maps_meta(labels: list[str], method: str, image: str, size: tuple[int, int], peaks: list[tuple[int, int]],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"labels": list(labels), "method": method, "image": image, "image_size": [int(size[0]), int(size[1])],
            "peaks": [[int(x), int(y)] for x, y in peaks], **(extra or {})}


def write_maps(path: str | Path, maps: np.ndarray, meta: dict[str, Any]) -> None:
    write_file(path, "maps", {"maps": np.ascontiguousarray(maps, dtype=np.float32)}, dict(meta))


def read_maps_dir(folder: str | Path) -> list[Any]:
    """Every ``*.maps.safetensors`` in a folder (sorted), read and checked."""

    d = Path(folder)
    if not d.is_dir():
        raise MavlError(f"{d}: not a folder of maps (expected *{MAPS_SUFFIX} files from `mavl predict --heatmap`)", path=d)
    files = sorted(p for p in d.iterdir() if p.name.endswith(MAPS_SUFFIX))
    if not files:
        raise MavlError(f"{d}: holds no *{MAPS_SUFFIX} files (write them with `mavl predict IMAGE... --heatmap {d}`)", path=d)
    return [read_file(p, expect="maps") for p in files]


def stem_of(f: Any) -> str:
    name = Path(str(f.path)).name
    return name[: -len(MAPS_SUFFIX)] if name.endswith(MAPS_SUFFIX) else Path(name).stem
