"""Synthetic frontal chest films with known findings.

The demo and the test suite need chest radiographs whose labels are true by
construction, without shipping or downloading patient data. Each film is drawn
analytically (numpy on precomputed coordinate grids, Pillow for thin lines and
the final blur) so 600 images render in seconds on one core.

Every random choice comes from generators seeded in a fixed order, whether a
finding is present or not, so the same ``rng`` state renders the same patient
with and without a finding: the tests rely on that to check signs on pixels.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_PHANTOM_SIZE
from mavl_cli.explain.maps import mask_name
from mavl_cli.io.files import check_folder, write_csv
from mavl_cli.trust.provenance import write_marker

FINDINGS: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Atelectasis",
)

#: Severities below this are rendered faintly and labelled -1.0 (uncertain).
UNCERTAIN_BELOW = 0.15
#: Chance that each finding is present in a study.
FINDING_PROB = 0.3
#: Chance that an absent finding is left blank in the CSV instead of 0.0.
BLANK_PROB = 0.05

_SIDES = (-1.0, 1.0)  # -1: image left (patient's right lung), +1: image right


@dataclass
class PhantomSet:
    """Where a generated phantom data set lives."""

    root: Path
    labels_csv: Path
    splits: dict[str, Path]
    n_images: int


# --------------------------------------------------------------------------- grids


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalised film coordinates (-1..1, y pointing down)."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    u, v = np.meshgrid(t, t)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def _ramp(z: np.ndarray, soft: float) -> np.ndarray:
    """Soft indicator of ``z < 0`` with an edge ``soft`` wide (normalised units)."""
    r = np.float32(0.5) - z * np.float32(1.0 / soft)
    np.minimum(r, np.float32(1.0), out=r)
    np.maximum(r, np.float32(0.0), out=r)
    return r


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise: a coarse random grid resized bicubically."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


# ------------------------------------------------------------------------ anatomy


def _vessel_tree(rng: np.random.Generator, hx: float, hy: float, side: float) -> list[tuple]:
    """Branching pulmonary vessels fanning out laterally from a hilum."""
    segs: list[tuple] = []

    def grow(x: float, y: float, ang: float, length: float, width: float, depth: int) -> None:
        x1 = x + side * np.cos(ang) * length
        y1 = y + np.sin(ang) * length
        segs.append((x, y, x1, y1, width))
        if depth == 0:
            return
        spread = rng.uniform(0.30, 0.55)
        for a in (ang - spread, ang + spread):
            grow(x1, y1, a + rng.normal(0, 0.12), length * rng.uniform(0.62, 0.8), width * 0.62, depth - 1)

    for ang in np.linspace(-1.15, 1.2, 5) + rng.normal(0, 0.1, 5):
        grow(hx, hy, float(ang), rng.uniform(0.16, 0.22), 0.022, 3)
    return segs


def sample_anatomy(rng: np.random.Generator) -> dict:
    """Draw one patient's body habitus; all studies of a patient reuse it."""
    w = rng.uniform(0.60, 0.72)  # half the inner thorax width
    xc = rng.normal(0.0, 0.02)
    med = rng.uniform(0.09, 0.12)  # upper mediastinum half-width
    hy = rng.uniform(-0.16, -0.06)  # hilum level
    anat = {
        "scale": rng.uniform(0.93, 1.03),
        "xc": xc,
        "w": w,
        "apex": rng.uniform(-0.74, -0.64),
        "cp": rng.uniform(0.42, 0.56),  # costophrenic angle level
        "dome_r": rng.uniform(0.15, 0.21),  # dome heights above the costophrenic angles
        "dome_l": rng.uniform(0.10, 0.15),
        "med": med,
        "knob": rng.uniform(0.035, 0.06),
        "ctr": rng.uniform(0.38, 0.48),  # normal cardiothoracic ratio
        "heart_h": rng.uniform(0.20, 0.25),
        "heart_tilt": rng.uniform(0.25, 0.5),
        "lung_b": rng.uniform(0.58, 0.66),
        "rib_spacing": rng.uniform(0.105, 0.125),
        "rib_curve": rng.uniform(0.38, 0.5),
        "rib_phase": rng.uniform(0.0, 1.0),
        "body_margin": rng.uniform(0.12, 0.2),
        "soft": rng.uniform(0.62, 0.70),
        "air": rng.uniform(0.38, 0.44),
        "hilum_y": hy,
        "tex_seed": int(rng.integers(0, 2**31 - 1)),
    }
    anat["vessels"] = [_vessel_tree(rng, xc + s * (med + 0.04), hy, s) for s in _SIDES]
    return anat


def _lung_shape(anat: dict, side: float) -> tuple[float, float, float, float]:
    """Centre and half-axes of one lung's superellipse (before the diaphragm cut)."""
    w, xc = anat["w"], anat["xc"]
    a = w * 0.51
    cx = xc + side * (w - a)
    b = (anat["cp"] - anat["apex"]) * anat["lung_b"]
    cy = anat["apex"] + b
    return cx, cy, a, b


# ------------------------------------------------------------------------ drawing


class _Canvas:
    """Maps canonical anatomy coordinates to pixels for one study (pose + zoom).

    Canonical x runs left to right on the film (so the patient's right lung is
    at negative x), y runs downwards; both span about -1..1.
    """

    def __init__(self, size: int, tx: float, ty: float, rot: float, scale: float, grids: bool = True) -> None:
        self.size = size
        self.tx, self.ty, self.scale = tx, ty, scale
        self.c, self.s = float(np.cos(rot)), float(np.sin(rot))
        self.px = 2.0 / (size * scale)  # one pixel in canonical units
        if grids:
            u, v = _grid(size)
            du, dv = u - np.float32(tx), v - np.float32(ty)
            k = np.float32(1.0 / scale)
            self.x = (np.float32(self.c) * du + np.float32(self.s) * dv) * k
            self.y = (np.float32(-self.s) * du + np.float32(self.c) * dv) * k

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        u = self.tx + self.scale * (self.c * x - self.s * y)
        v = self.ty + self.scale * (self.s * x + self.c * y)
        return (u + 1.0) * 0.5 * self.size, (v + 1.0) * 0.5 * self.size

    def _layer(self, img: Image.Image, blur: float) -> np.ndarray:
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)

    def lines(self, segs: list[tuple], blur: float = 0.0) -> np.ndarray:
        """Rasterise (x0, y0, x1, y1, width) segments into a 0..1 layer."""
        img = Image.new("L", (self.size, self.size), 0)
        if segs:
            draw = ImageDraw.Draw(img)
            arr = np.asarray(segs, dtype=np.float64)
            u0, v0 = self.to_px(arr[:, 0], arr[:, 1])
            u1, v1 = self.to_px(arr[:, 2], arr[:, 3])
            widths = np.maximum(1, np.round(arr[:, 4] * (self.size * self.scale * 0.5))).astype(int)
            for seg, wd in zip(np.stack([u0, v0, u1, v1], axis=1).tolist(), widths.tolist()):
                draw.line(seg, fill=255, width=wd)
        return self._layer(img, blur)

    def polygon(self, pts: list[tuple[float, float]], blur: float = 0.0) -> np.ndarray:
        """Rasterise a filled polygon (canonical points) into a 0..1 layer."""
        img = Image.new("L", (self.size, self.size), 0)
        ImageDraw.Draw(img).polygon([self.to_px(x, y) for x, y in pts], fill=255)
        return self._layer(img, blur)


def _segment_band(x: np.ndarray, y: np.ndarray, p0: tuple, p1: tuple, half: float) -> np.ndarray:
    """Soft band of half-width ``half`` around the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ln2 = dx * dx + dy * dy
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) * (1.0 / ln2), 0.0, 1.0)
    ex = x - (p0[0] + t * dx)
    ey = y - (p0[1] + t * dy)
    return np.exp((ex * ex + ey * ey) * (-1.0 / (half * half)))


@lru_cache(maxsize=4)
def _grain_tile(size: int) -> np.ndarray:
    """A fixed, slightly correlated noise tile; films take random windows of it (cheaper than fresh noise)."""
    n = np.random.default_rng(20240601).standard_normal((2 * size, 2 * size)).astype(np.float32)
    n = n + 0.5 * (np.roll(n, 1, 0) + np.roll(n, 1, 1))
    n *= np.float32(1.0 / n.std())
    n.setflags(write=False)
    return n


def _add_grain(img: np.ndarray, rng: np.random.Generator, sd: float) -> np.ndarray:
    """Quantum mottle: a random window of the grain tile, randomly flipped, scaled to ``sd`` of full range."""
    size = img.shape[0]
    oy, ox, flip = (int(v) for v in rng.integers(0, size, 3))
    patch = _grain_tile(size)[oy : oy + size, ox : ox + size]
    if flip % 2:
        patch = patch[::-1]
    if (flip // 2) % 2:
        patch = patch[:, ::-1]
    out = img.astype(np.float32) + patch * np.float32(sd * 255.0)
    return (np.clip(out, 0.0, 255.0) + 0.5).astype(np.uint8)


def _lung_dist(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to a p=3 superellipse (negative inside)."""
    ax = np.abs(x - cx) * (1.0 / a)
    ay = np.abs(y - cy) * (1.0 / b)
    f = ax * ax * ax + ay * ay * ay
    return (f - 1.0) * (min(a, b) / 3.0)


def _work_size(size: int) -> int:
    """Resolution of the analytic fields: large films are drawn at half size and upsampled."""
    return size if size <= 160 else max(128, size // 2)


@dataclass(frozen=True)
class _Study:
    """One study's draws from ``rng``: pose, breath, exposure, film noise and each finding's own choices."""

    tx: float
    ty: float
    rot: float
    zoom: float
    breath: float
    black: float
    white: float
    gamma: float
    noise_sd: float
    blur: float
    noise_seed: int
    frng: dict[str, np.random.Generator]  # one generator per finding, for its own later draws
    eff_side: float  # -1 or +1: one side; 0: both sides
    ptx_side: float
    con_side: float
    atl_side: float
    atl_wedge: bool  # lobar collapse (wedge) rather than a plate-like band


def _draw_study(rng: np.random.Generator, anat: dict) -> _Study:
    """Study-level draws, always in the same order and whatever the findings."""
    tx, ty = (float(v) for v in rng.normal(0.0, 0.025, 2))
    rot = float(np.clip(rng.normal(0.0, 0.025), -0.06, 0.06))
    zoom = anat["scale"] * rng.uniform(0.97, 1.03)
    breath = rng.normal(0.0, 0.015)
    black, white = rng.uniform(0.02, 0.10), rng.uniform(0.92, 1.05)
    gamma = rng.uniform(0.8, 1.2)
    noise_sd = rng.uniform(0.012, 0.03)
    blur = rng.uniform(0.5, 0.9)
    noise_seed, *fseeds = (int(s) for s in rng.integers(0, 2**31 - 1, 1 + len(FINDINGS)))
    frng = {f: np.random.default_rng(s) for f, s in zip(FINDINGS, fseeds)}
    # Each finding's own choices, drawn even when the finding is absent.
    eff_side = float(frng["Pleural Effusion"].choice([-1.0, 1.0, 0.0], p=[0.4, 0.4, 0.2]))
    ptx_side = float(frng["Pneumothorax"].choice(_SIDES))
    con_side = float(frng["Consolidation"].choice(_SIDES))
    atl_side = float(frng["Atelectasis"].choice(_SIDES))
    atl_wedge = bool(frng["Atelectasis"].random() < 0.5)
    return _Study(tx, ty, rot, zoom, breath, black, white, gamma, noise_sd, blur, noise_seed, frng,
                  eff_side, ptx_side, con_side, atl_side, atl_wedge)


@dataclass(frozen=True)
class _Heart:
    """The heart's size and place (canonical units) and its soft 0..1 silhouette at work size."""

    ctr: float
    thorax_w: float
    heart_w: float
    h_left: float
    h_right: float
    hcx: float
    hcy: float
    hb: float
    field: np.ndarray


@dataclass(frozen=True)
class _Thorax:
    """One study's normal chest at work size: landmarks and the layers the findings draw over."""

    cv: _Canvas
    x: np.ndarray
    y: np.ndarray
    soft: float  # edge width of the anatomy, 1.5 work pixels
    air: float
    apex: float
    cp: float  # costophrenic level after the breath
    hyl: float
    xc: float  # midline after any mediastinal shift
    hx: list[float]  # hila
    dome_raise: dict[float, float]
    shapes: list[tuple[float, float, float, float]]  # each lung's superellipse
    lungs: list[np.ndarray]  # each lung below its apex and above its dome
    lung: np.ndarray  # both lungs, less the mediastinum and heart
    notc: np.ndarray  # 1 - central
    central: np.ndarray  # mediastinum or heart
    medias: np.ndarray
    trachea: np.ndarray
    body: np.ndarray
    below: np.ndarray  # abdomen below the domes
    ribs: np.ndarray
    clav: np.ndarray
    spine: np.ndarray
    stomach: np.ndarray
    tex: np.ndarray
    fine: np.ndarray
    heart: _Heart


@dataclass
class _Signs:
    """What the findings change on the normal film, at work size (updated in place, finding by finding)."""

    extra: np.ndarray  # density added (or removed)
    markings: np.ndarray  # lung markings, faded where a finding hides them
    masks: bool
    fields: dict[str, np.ndarray]  # finding -> soft 0..1 region of its sign (only with masks)


def _atelectasis_volume_loss(xc0: float, s: float, side: float) -> tuple[float, dict[float, float]]:
    """Volume loss from atelectasis pulls the mediastinum across (the new midline) and raises a dome."""
    xc = xc0 + (side * (0.02 + 0.06 * s) if s > 0 else 0.0)
    dome_raise = {sd: 0.0 for sd in _SIDES}
    if s > 0:
        dome_raise[side] = 0.07 + 0.15 * s
    return xc, dome_raise


def _body(anat: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Torso widening into shoulders above the lung apices."""
    w, apex = anat["w"], anat["apex"]
    bm = anat["body_margin"]
    yb = y - 0.1
    half_w = (w + bm) * (1.0 - 0.08 * yb * yb) + 0.4 * np.clip((apex + 0.15 - y) * 1.6, 0.0, 1.0) ** 2
    return _ramp(np.abs(x - anat["xc"]) - half_w, 0.02)


def _lungs(anat: dict, x: np.ndarray, y: np.ndarray, cp: float, xc: float, dome_raise: dict[float, float],
           soft: float) -> tuple[np.ndarray, list[np.ndarray], list[tuple[float, float, float, float]]]:
    """Lungs cut by the diaphragm domes; returns the abdomen below the domes, each lung and its shape."""
    below = np.zeros_like(x)
    lungs, shapes = [], []
    for sd in _SIDES:
        cx, cy, a, b = _lung_shape(anat, sd)
        h = anat["dome_r"] if sd < 0 else anat["dome_l"]
        q = (x - (cx - sd * 0.05)) * (1.0 / (a * 1.05))
        dome_y = cp + 0.03 - h * np.clip(1.0 - q * q, 0.0, 1.0) - dome_raise[sd]
        half = (x - xc) * sd > 0
        below = np.where(half, _ramp(dome_y - y, soft), below)
        dist = _lung_dist(x, y, cx, cy, a, b)
        lungs.append(_ramp(dist, soft) * _ramp(y - dome_y, soft))
        shapes.append((cx, cy, a, b))
    return below, lungs, shapes


def _mediastinum(anat: dict, x: np.ndarray, y: np.ndarray, xc: float, soft: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper mediastinum with the aortic knob, and the trachea down to the carina."""
    med = anat["med"]
    knob = anat["knob"] * np.exp(((y + 0.3) * (1.0 / 0.07)) ** 2 * -1.0)
    medias = _ramp(np.abs(x - xc) - (knob * (x > xc) + np.float32(med)), soft) * _ramp(anat["apex"] + 0.05 - y, 0.08)
    carina = anat["hilum_y"] - 0.08
    trachea = _ramp(np.abs(x - xc) - 0.03, soft) * _ramp(y - carina, 0.05)
    return medias, trachea


def _heart(anat: dict, x: np.ndarray, y: np.ndarray, xc: float, cp: float, soft: float, s_cm: float) -> _Heart:
    """A tilted heart sitting on the diaphragm; cardiomegaly (``s_cm`` > 0) widens and heightens it."""
    ctr = anat["ctr"]
    if s_cm > 0:
        ctr = 0.505 + 0.2 * s_cm
    thorax_w = 2.0 * anat["w"]
    heart_w = ctr * thorax_w
    h_left, h_right = xc - 0.36 * heart_w, xc + 0.64 * heart_w
    hcx = 0.5 * (h_left + h_right)
    hb = anat["heart_h"] * (1.0 + 0.25 * s_cm)
    tilt = anat["heart_tilt"]
    ct, st = float(np.cos(tilt)), float(np.sin(tilt))
    ha = float(np.sqrt(max((0.5 * heart_w) ** 2 - (hb * st) ** 2, 1e-4)) / ct)
    hcy = cp - 0.13 - 0.5 * hb
    hu = (x - hcx) * ct + (y - hcy) * st
    hv = (y - hcy) * ct - (x - hcx) * st
    heart_e = (hu * (1.0 / ha)) ** 2 + (hv * (1.0 / hb)) ** 2
    field = _ramp((heart_e - 1.0) * (0.5 * min(ha, hb)), soft)
    return _Heart(ctr, thorax_w, heart_w, h_left, h_right, hcx, hcy, hb, field)


def _ribs(anat: dict, x: np.ndarray, y: np.ndarray, below: np.ndarray, central: np.ndarray) -> np.ndarray:
    """Ribs: posterior arcs as a periodic band in a curved coordinate, anterior ends fainter."""
    w, apex = anat["w"], anat["apex"]
    lat = np.abs(x - anat["xc"]) * (1.0 / w)
    t = (y - apex - anat["rib_curve"] * lat * lat + 0.1 * lat) * (1.0 / anat["rib_spacing"]) + anat["rib_phase"]
    wave = 0.5 + 0.5 * np.cos(t * (2.0 * np.pi))
    cage = _ramp(lat - 1.03, 0.04) * (lat > 0.12)
    ribs = wave * wave * wave * cage * (t > 0.2) * (t < 10.5)
    t2 = (y - apex - 0.12 + 0.3 * lat) * (1.0 / (anat["rib_spacing"] * 1.3))
    wave2 = 0.5 + 0.5 * np.cos(t2 * (2.0 * np.pi))
    ribs += 0.25 * wave2 * wave2 * cage * (t2 > 0.3) * (t2 < 5.5) * (lat > 0.3)
    ribs *= (1.0 - 0.6 * below) * (1.0 - 0.6 * central)
    return ribs


def _clavicles(anat: dict, cv: _Canvas) -> np.ndarray:
    """Both clavicles as three tapering segments each."""
    xc0, w, apex = anat["xc"], anat["w"], anat["apex"]
    cl = []
    for sd in _SIDES:
        p0 = (xc0 + sd * 0.08, apex + 0.2)
        p1 = (xc0 + sd * 0.35 * w, apex + 0.15)
        p2 = (xc0 + sd * 0.75 * w, apex + 0.07)
        p3 = (xc0 + sd * 1.05 * w, apex + 0.02)
        cl += [(*p0, *p1, 0.055), (*p1, *p2, 0.05), (*p2, *p3, 0.045)]
    return cv.lines(cl, blur=0.8)


def _spine_and_stomach(anat: dict, x: np.ndarray, y: np.ndarray, cp: float, soft: float, below: np.ndarray,
                       notc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The spine behind the mediastinum and the gastric air bubble under the left dome."""
    xc0, w = anat["xc"], anat["w"]
    spine = _ramp(np.abs(x - xc0) - 0.07, soft) * (0.75 + 0.25 * np.cos((y - anat["apex"]) * 20.0))
    sx0, sy0 = xc0 + 0.45 * w, cp - anat["dome_l"] + 0.12
    stomach = _ramp(((x - sx0) * (1.0 / 0.12)) ** 2 + ((y - sy0) * (1.0 / 0.06)) ** 2 - 1.0, 0.3) * below * notc
    return spine, stomach


def _lung_markings(anat: dict, cv: _Canvas, lung: np.ndarray, hx: list[float], tex: np.ndarray,
                   fine: np.ndarray) -> np.ndarray:
    """Vessels, hila and parenchymal texture inside the lungs."""
    x, y, hyl = cv.x, cv.y, anat["hilum_y"]
    vessels = cv.lines(anat["vessels"][0] + anat["vessels"][1], blur=0.9)
    hilum = sum(np.exp(((x - hxi) * (1.0 / 0.07)) ** 2 * -1.0 - ((y - hyl) * (1.0 / 0.11)) ** 2) for hxi in hx)
    return lung * (0.9 * vessels + 0.3 * hilum + 0.06 * tex + 0.04 * fine)


def _normal_thorax(anat: dict, cv: _Canvas, study: _Study, sev: dict[str, float]) -> tuple[_Thorax, np.ndarray]:
    """The patient's chest for one study before the lung findings, and its lung markings.

    Atelectatic volume loss (the shifted midline, a raised dome) and the heart's
    size (cardiomegaly) are drawn here, since the rest of the anatomy follows them.
    """
    x, y = cv.x, cv.y
    soft = 1.5 * cv.px
    xc0 = anat["xc"]
    cp = anat["cp"] + study.breath
    texr = np.random.default_rng(anat["tex_seed"])
    tex = _smooth_noise(texr, cv.size, 9)
    fine = _smooth_noise(texr, cv.size, 36)
    xc, dome_raise = _atelectasis_volume_loss(xc0, sev["Atelectasis"], study.atl_side)
    body = _body(anat, x, y)
    below, lungs, shapes = _lungs(anat, x, y, cp, xc, dome_raise, soft)
    medias, trachea = _mediastinum(anat, x, y, xc, soft)
    heart = _heart(anat, x, y, xc, cp, soft, sev["Cardiomegaly"])
    central = np.maximum(medias, heart.field)
    notc = 1.0 - central
    lung = np.maximum(lungs[0], lungs[1]) * notc
    ribs = _ribs(anat, x, y, below, central)
    clav = _clavicles(anat, cv)
    hx = [xc0 + sd * (anat["med"] + 0.05) for sd in _SIDES]
    spine, stomach = _spine_and_stomach(anat, x, y, cp, soft, below, notc)
    markings = _lung_markings(anat, cv, lung, hx, tex, fine)
    thorax = _Thorax(
        cv=cv, x=x, y=y, soft=soft, air=anat["air"], apex=anat["apex"], cp=cp, hyl=anat["hilum_y"], xc=xc, hx=hx,
        dome_raise=dome_raise, shapes=shapes, lungs=lungs, lung=lung, notc=notc, central=central, medias=medias,
        trachea=trachea, body=body, below=below, ribs=ribs, clav=clav, spine=spine, stomach=stomach, tex=tex,
        fine=fine, heart=heart,
    )
    return thorax, markings


# ----------------------------------------------------------------------- findings


def _pneumothorax(th: _Thorax, sg: _Signs, s: float, k: np.random.Generator, side: float) -> dict:
    """Pneumothorax: the lung falls towards the medial base, leaving a dark rim without markings and a pleural line."""
    x, y = th.x, th.y
    i = _SIDES.index(side)
    cx, cy, a, b = th.shapes[i]
    shrink = 0.8 - 0.3 * s + k.uniform(-0.03, 0.03)
    ax_, ay_ = cx - side * a * 0.9, th.cp  # the lung falls towards the medial base
    dist = _lung_dist(ax_ + (x - ax_) * (1.0 / shrink), ay_ + (y - ay_) * (1.0 / shrink), cx, cy, a, b) * shrink
    inside = th.lungs[i] * th.notc * _ramp((ax_ - x) * side + 0.1 * a, 0.1)
    collapsed = _ramp(dist, th.soft)
    rim = inside * (1.0 - collapsed)
    sg.markings *= 1.0 - rim
    pleura = np.exp((dist * (1.0 / (1.1 * th.cv.px))) ** 2 * -1.0) * inside
    sg.extra += -(0.1 + 0.08 * s) * rim + (0.14 + 0.1 * s) * pleura + 0.04 * s * collapsed * inside
    if sg.masks:
        sg.fields["Pneumothorax"] = np.maximum(rim, pleura)
    return {"side": "left" if side < 0 else "right", "shrink": shrink}


def _pleural_effusion(th: _Thorax, sg: _Signs, s: float, k: np.random.Generator, side: float) -> None:
    """Pleural effusion: basal fluid with a meniscus rising laterally, on one ``side`` or both (``side`` 0)."""
    x, y = th.x, th.y
    for i, sd in enumerate(_SIDES):
        if side != 0.0 and sd != side:
            continue
        cx, _, a, _ = th.shapes[i]
        h = (0.07 + 0.33 * s) * (th.cp - th.apex) * k.uniform(0.85, 1.1)
        latf = np.clip((x - cx) * (sd / a) + 0.6, 0.0, 1.6) * (1.0 / 1.6)
        top = th.cp + 0.03 - h - 0.35 * h * latf * latf
        fluid = _ramp(top - y, 0.04) * np.clip(0.75 + (y - top) * 2.5, 0.0, 1.0) * th.lungs[i] * th.notc
        sg.extra += fluid * (th.air + 0.1)
        sg.markings *= 1.0 - fluid
        if sg.masks:
            sg.fields["Pleural Effusion"] = np.maximum(sg.fields.get("Pleural Effusion", 0.0), fluid)


def _air_bronchogram(k: np.random.Generator, side: float, x0: float, y0: float, ang0: float,
                     ln0: float) -> list[tuple]:
    """Air-filled bronchi branching twice from (x0, y0) into a consolidated patch, as line segments."""
    segs: list[tuple] = []

    def bronchus(px_: float, py_: float, ang: float, ln: float, depth: int) -> None:
        x1, y1 = px_ + side * np.cos(ang) * ln, py_ + np.sin(ang) * ln
        segs.append((px_, py_, x1, y1, 0.016 * (0.7 + 0.3 * depth)))
        if depth:
            for dang in (-0.45, 0.45):
                bronchus(x1, y1, ang + dang + k.normal(0, 0.12), ln * 0.7, depth - 1)

    bronchus(x0, y0, ang0, ln0, 2)
    return segs


def _consolidation(th: _Thorax, sg: _Signs, s: float, k: np.random.Generator, side: float) -> None:
    """Consolidation: a mottled airspace patch with an air bronchogram, hiding the markings under it."""
    x, y = th.x, th.y
    i = _SIDES.index(side)
    cx, cy, a, b = th.shapes[i]
    bx = cx + side * k.uniform(0.0, 0.4) * a
    by = cy + k.uniform(-0.2, 0.45) * b
    r = 0.16 + 0.14 * s
    d2 = ((x - bx) * (1.0 / (r * 1.2))) ** 2 + ((y - by) * (1.0 / r)) ** 2
    patch = np.exp(-d2) * (1.0 + 0.8 * _smooth_noise(k, th.cv.size, 16))
    opac = np.clip((patch - 0.3) * 3.0, 0.0, 1.0) * th.lungs[i] * th.notc
    ang0 = float(np.arctan2(by - th.hyl, (bx - th.hx[i]) * side))
    segs = _air_bronchogram(k, side, bx - side * np.cos(ang0) * r * 0.9, by - np.sin(ang0) * r * 0.9, ang0, r * 0.75)
    bronch = th.cv.lines(segs, blur=0.4)
    strength = 0.6 + 0.4 * s
    sg.extra += strength * opac * ((th.air + 0.05) - 0.3 * bronch)
    sg.markings *= 1.0 - 0.8 * opac
    if sg.masks:
        sg.fields["Consolidation"] = opac


def _kerley_lines(shapes: list[tuple[float, float, float, float]], s: float, k: np.random.Generator) -> list[tuple]:
    """Kerley B lines: short horizontal septal lines running in from each lung's lateral edge."""
    kerley: list[tuple] = []
    for i, sd in enumerate(_SIDES):
        cx, cy, a, b = shapes[i]
        for _ in range(int(6 + 10 * s)):
            ly = cy + k.uniform(0.15, 0.7) * b
            edge = cx + sd * a * max(1.0 - abs((ly - cy) / b) ** 3, 0.0) ** (1.0 / 3.0)
            x0 = edge - sd * k.uniform(0.01, 0.03)
            kerley.append((x0, ly, x0 - sd * k.uniform(0.05, 0.09), ly + k.normal(0, 0.006), 0.014))
    return kerley


def _edema(th: _Thorax, sg: _Signs, s: float, k: np.random.Generator) -> None:
    """Edema: perihilar bat-wing haze over both lungs, plus Kerley B lines."""
    x, y, hyl = th.x, th.y, th.hyl
    strength = 0.4 + 0.6 * s
    wing = sum(
        np.exp(((x - hxi) * (1.0 / 0.3)) ** 2 * -1.0 - ((y - hyl - 0.05) * (1.0 / 0.33)) ** 2) for hxi in th.hx
    )
    haze = (0.7 * wing + 0.15 * (1.0 + 0.5 * th.tex)) * th.lung
    kl = th.cv.lines(_kerley_lines(th.shapes, s, k)) * th.lung
    sg.extra += strength * (th.air * 0.8 * haze + 0.3 * kl)
    if sg.masks:  # the perihilar bat-wing haze, where the oedema is densest
        sg.fields["Edema"] = np.clip(wing, 0.0, 1.0) * th.lung


def _atelectasis(th: _Thorax, sg: _Signs, s: float, k: np.random.Generator, side: float, wedge: bool) -> None:
    """Atelectasis opacity: a collapsed lower lobe (``wedge``) or a plate-like band (its volume loss is drawn earlier)."""
    i = _SIDES.index(side)
    cx, cy, a, b = th.shapes[i]
    strength = 0.55 + 0.45 * s
    if wedge:  # collapsed lower lobe: a triangle from the hilum down to the base
        base_y = th.cp + 0.03 - th.dome_raise[side]
        tip = (th.hx[i] + side * 0.04, th.hyl + 0.02)
        inner = cx + side * a * k.uniform(-0.3, -0.1)
        outer = cx + side * a * (0.35 + 0.45 * s)
        layer = th.cv.polygon([tip, (inner, base_y), (outer, base_y)], blur=1.5)
    else:  # plate-like (discoid) band in the lower zone
        y0 = cy + k.uniform(0.25, 0.5) * b
        p0 = (th.hx[i] + side * 0.05, y0 + k.uniform(-0.03, 0.03))
        p1 = (cx + side * a * 0.85, y0 - k.uniform(0.02, 0.1))
        layer = _segment_band(th.x, th.y, p0, p1, 0.025 + 0.03 * s)
    opac = layer * th.lungs[i] * th.notc
    sg.extra += strength * opac * (th.air + 0.05)
    sg.markings *= 1.0 - 0.7 * opac
    if sg.masks:
        sg.fields["Atelectasis"] = opac


def _draw_findings(th: _Thorax, sg: _Signs, study: _Study, sev: dict[str, float]) -> dict | None:
    """Draw each present lung finding over the normal film; returns the pneumothorax facts (None without one)."""
    k = study.frng
    geo_ptx = None
    if sev["Pneumothorax"] > 0:
        geo_ptx = _pneumothorax(th, sg, sev["Pneumothorax"], k["Pneumothorax"], study.ptx_side)
    if sev["Pleural Effusion"] > 0:
        _pleural_effusion(th, sg, sev["Pleural Effusion"], k["Pleural Effusion"], study.eff_side)
    if sev["Consolidation"] > 0:
        _consolidation(th, sg, sev["Consolidation"], k["Consolidation"], study.con_side)
    if sev["Edema"] > 0:
        _edema(th, sg, sev["Edema"], k["Edema"])
    if sev["Atelectasis"] > 0:
        _atelectasis(th, sg, sev["Atelectasis"], k["Atelectasis"], study.atl_side, study.atl_wedge)
    return geo_ptx


# ------------------------------------------------------------------------- film


def _expose(anat: dict, th: _Thorax, sg: _Signs, study: _Study, size: int) -> np.ndarray:
    """Compose the density, expose it, blur, upsample to ``size`` and add quantum noise (uint8)."""
    air = th.air
    extra = np.minimum(sg.extra, air + 0.12)  # overlapping opacities cannot exceed solid tissue
    dens = (
        anat["soft"] * th.body
        - air * th.lung
        + 0.14 * th.central
        - 0.16 * th.trachea * th.medias
        + 0.08 * th.below * th.body * th.notc
        - 0.12 * th.stomach
        + 0.04 * th.spine * th.body
        + 0.08 * th.ribs * th.body
        + 0.16 * th.clav
        + air * sg.markings
        + extra
        + 0.015 * th.fine
    )
    black, white = study.black, study.white
    img = np.clip((dens - black) * (1.0 / (white - black)), 0.0, 1.0) ** study.gamma
    work = th.cv.size
    pil = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8), mode="L")
    pil = pil.filter(ImageFilter.GaussianBlur(study.blur * work / 256.0))
    if work != size:
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return _add_grain(np.asarray(pil), np.random.default_rng(study.noise_seed), study.noise_sd)


def _geometry(size: int, study: _Study, th: _Thorax, geo_ptx: dict | None) -> dict:
    """Geometry facts in output pixels: heart and thorax widths, heart place, midline, lung boxes."""
    out = _Canvas(size, study.tx, study.ty, study.rot, study.zoom, grids=False)
    pxu = size * study.zoom * 0.5
    h = th.heart
    geom = {
        "size": size,
        "ctr": h.ctr,
        "heart_width": h.heart_w * pxu,
        "thorax_width": h.thorax_w * pxu,
        "heart_left": out.to_px(h.h_left, h.hcy)[0],
        "heart_right": out.to_px(h.h_right, h.hcy)[0],
        "heart_row": out.to_px(h.hcx, h.hcy)[1],
        "heart_height": 2.0 * h.hb * pxu,
        "midline_x": out.to_px(th.xc, h.hcy)[0],
        "lungs": [],
        "pneumothorax": geo_ptx,
        "rotation": study.rot,
    }
    for cx, cy, a, b in th.shapes:
        (l, t_), (r, bt) = out.to_px(cx - a, cy - b), out.to_px(cx + a, th.cp + 0.03)
        geom["lungs"].append((min(l, r), t_, max(l, r), bt))
    return geom


def render_phantom(
    rng: np.random.Generator,
    findings: dict[str, float],
    size: int = 256,
    anatomy: dict | None = None,
    masks: bool = False,
) -> tuple[np.ndarray, dict]:
    """Render one film; ``findings`` maps finding names to severities in (0, 1].

    Absent findings have severity 0 (or are missing). ``anatomy`` (from
    :func:`sample_anatomy`) lets several studies share one patient; when it is
    None the anatomy is drawn from ``rng`` first. The number of draws from
    ``rng`` does not depend on ``findings``. Returns a uint8 [size, size] image
    and geometry facts in output pixels (heart and thorax widths, lung boxes).
    With ``masks`` the geometry also holds ``"masks"``: for each finding drawn,
    a boolean ``[size, size]`` array of where its sign is (see :data:`MASK_SIGNS`).
    Masks draw nothing from ``rng``, so the film is the same either way.
    """
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings: {sorted(unknown)}")
    sev = {f: float(np.clip(findings.get(f, 0.0), 0.0, 1.0)) for f in FINDINGS}
    anat = sample_anatomy(rng) if anatomy is None else anatomy
    study = _draw_study(rng, anat)
    cv = _Canvas(_work_size(size), study.tx, study.ty, study.rot, study.zoom)
    th, markings = _normal_thorax(anat, cv, study, sev)
    sg = _Signs(extra=np.zeros_like(cv.x), markings=markings, masks=masks, fields={})
    geo_ptx = _draw_findings(th, sg, study, sev)
    arr = _expose(anat, th, sg, study, size)
    if masks and sev["Cardiomegaly"] > 0:
        sg.fields["Cardiomegaly"] = th.heart.field  # the enlarged heart's silhouette
    geom = _geometry(size, study, th, geo_ptx)
    if masks:
        geom["masks"] = {f: _binary_mask(sg.fields[f], size) for f in FINDINGS if f in sg.fields}
    return arr, geom


#: What each finding's mask covers (``mavl phantoms --masks``).
MASK_SIGNS: dict[str, str] = {
    "Cardiomegaly": "the enlarged heart's silhouette",
    "Pleural Effusion": "the fluid below the meniscus",
    "Pneumothorax": "the air rim between the collapsed lung's pleural line and the chest wall",
    "Consolidation": "the airspace opacity patch",
    "Edema": "the perihilar (bat-wing) haze",
    "Atelectasis": "the collapsed wedge or plate-like band",
}


def _binary_mask(field: np.ndarray, size: int) -> np.ndarray:
    """A soft work-size field -> boolean ``[size, size]``: where the sign is at least half drawn."""
    f = np.asarray(field, dtype=np.float32)
    if f.shape[0] != size:
        f = np.asarray(Image.fromarray(f, mode="F").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return f >= 0.5


# ---------------------------------------------------------------------- data set


def draw_findings(rng: np.random.Generator) -> dict[str, float]:
    """Independent findings, each present with FINDING_PROB at a uniform severity."""
    present = rng.random(len(FINDINGS)) < FINDING_PROB
    sev = rng.uniform(0.0, 1.0, len(FINDINGS))
    return {f: float(s) for f, p, s in zip(FINDINGS, present, sev) if p}


def _label(findings: dict[str, float], name: str, blank: bool) -> str:
    if name in findings:
        return "-1.0" if findings[name] < UNCERTAIN_BELOW else "1.0"
    return "" if blank else "0.0"


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    write_csv(path, rows, header=["Path", "Patient", *FINDINGS], lineterminator="\n")  # atomic: never a torn CSV


def _split_patients(rng: np.random.Generator, patients: list[str], split: tuple[float, float, float]) -> dict[str, str]:
    """Assign whole patients to train/val/test so no patient leaks across splits."""
    fr = np.asarray(split, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {split}")
    fr = fr / fr.sum()
    order = [patients[i] for i in rng.permutation(len(patients))]
    n = len(order)
    counts = np.floor(fr * n).astype(int)
    for i in np.argsort(-(fr * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    # Give every split asked for at least one patient when there are enough.
    for i in range(3):
        if fr[i] > 0 and counts[i] == 0 and n >= 3:
            j = int(np.argmax(counts))
            counts[j] -= 1
            counts[i] += 1
    names = ("train", "val", "test")
    out: dict[str, str] = {}
    start = 0
    for name, c in zip(names, counts):
        for p in order[start : start + c]:
            out[p] = name
        start += c
    return out


def generate_phantoms(
    out_dir: Path,
    n: int = 600,
    seed: int = 0,
    size: int = 256,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    progress: Callable[[int], None] | None = None,
    masks: bool = False,
) -> PhantomSet:
    """Write ``n`` phantom films, labels.csv and per-patient train/val/test CSVs.

    With ``masks`` also ``masks/<stem>.<label>.png`` (0/255, the film's size) for
    every finding drawn in a film, uncertain ones included; the films, CSVs and
    their bytes are the same with and without masks.

    Patients get 1-3 studies sharing one anatomy; findings are drawn per study.
    The output is byte-identical for a given seed. ``progress`` is called after
    each image with the number of images written so far.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")

    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if size > MAX_PHANTOM_SIZE:
        raise MavlError(f"--size {size}: at most {MAX_PHANTOM_SIZE} pixels (drawing one film needs ~25 floats per pixel)")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"

    check_folder(out_dir, create=True, what="phantoms folder")
    made = [d for d in (out_dir, img_dir) if not d.exists()]
    written: list[Path] = []
    try:
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MavlError(f"{out_dir}: cannot create folder ({exc.strerror or exc})", path=out_dir) from None
    try:
        return _generate(out_dir, n, seed, size, split, progress, written, masks)
    except BaseException:
        # a failed or interrupted run leaves no half-made folder: remove what this run wrote
        for p in written:
            p.unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def _write_image(path: Path, data: bytes) -> None:
    """Temp file and rename (no fsync: phantoms are cheap to redo), so a kill never leaves a torn PNG."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _generate(out_dir: Path, n: int, seed: int, size: int, split: tuple[float, float, float],
              progress: Callable[[int], None] | None, written: list[Path], masks: bool = False) -> PhantomSet:
    mask_dir = out_dir / "masks"
    if masks:
        mask_dir.mkdir(exist_ok=True)
    master = np.random.default_rng(seed)
    rows: list[list[str]] = []
    row_patient: list[str] = []
    pid = 0
    while len(rows) < n:
        pid += 1
        patient = f"patient{pid:05d}"
        prng = np.random.default_rng(master.integers(0, 2**63 - 1))
        anat = sample_anatomy(prng)
        n_studies = min(int(prng.integers(1, 4)), n - len(rows))
        for study in range(1, n_studies + 1):
            srng = np.random.default_rng(prng.integers(0, 2**63 - 1))
            findings = draw_findings(srng)
            blanks = srng.random(len(FINDINGS)) < BLANK_PROB
            arr, geom = render_phantom(srng, findings, size=size, anatomy=anat, masks=masks)
            rel = f"images/{patient}_study{study}.png"
            buf = io.BytesIO()
            Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
            if not (out_dir / rel).exists():
                written.append(out_dir / rel)
            _write_image(out_dir / rel, buf.getvalue())
            for finding, region in geom.get("masks", {}).items():
                mpath = mask_dir / mask_name(f"{patient}_study{study}", finding)
                mbuf = io.BytesIO()
                Image.fromarray(region.astype(np.uint8) * 255, mode="L").save(mbuf, format="PNG", compress_level=1)
                if not mpath.exists():
                    written.append(mpath)
                _write_image(mpath, mbuf.getvalue())
            rows.append([rel, patient, *(_label(findings, f, b) for f, b in zip(FINDINGS, blanks))])
            row_patient.append(patient)
            if progress is not None:
                progress(len(rows))
    assign = _split_patients(master, sorted(set(row_patient)), split)
    labels_csv = out_dir / "labels.csv"
    written.extend(p for p in [labels_csv, *(out_dir / f"{k}.csv" for k in ("train", "val", "test"))] if not p.exists())
    _write_csv(labels_csv, rows)
    splits: dict[str, Path] = {}
    for name in ("train", "val", "test"):
        splits[name] = out_dir / f"{name}.csv"
        _write_csv(splits[name], [r for r, p in zip(rows, row_patient) if assign[p] == name])

    write_marker(out_dir, [labels_csv.name, *(p.name for p in splits.values())], {"seed": seed, "n": n, "size": size})
    return PhantomSet(root=out_dir, labels_csv=labels_csv, splits=splits, n_images=len(rows))
