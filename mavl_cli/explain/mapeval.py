"""`mavl evaluate-maps`: explanation maps scored against where the findings really are.

Ground truth is either a folder of binary masks named ``<stem>.<label>.png``
(as `mavl phantoms --masks` writes them) or a bounding-box CSV in the NIH
format (``Image Index, Finding Label, Bbox [x, y, w, h]``, as in NIH's
``BBox_List_2017.csv``). Maps and ground truth must share the original
image's pixel grid. For every (image, finding) pair with both a map and a
region:

- pointing game: a hit when the map's peak pixel lies inside the region;
- IoU of the top-k%: the ``k`` percent of pixels with the highest map values
  against the region.

Per finding and overall (every pair pooled), with percentile bootstrap CIs
that resample patients (images of one patient enter or leave together).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mavl_cli.core.console import fmt_num, table
from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_BOOTSTRAP, MAX_SEED
from mavl_cli.datasets.labelmap import NIH_TO_CHEXPERT
from mavl_cli.evaluation.metrics import resample_weights
from mavl_cli.explain.maps import peak, read_maps_dir, split_mask_name, stem_of

DEFAULT_PATIENT_PATTERN = r"^(.+?)_"


@dataclass
class MapEvalOptions:
    masks: Path | None = None
    boxes: Path | None = None
    top_k: float = 10.0  # percent of the image's pixels
    bootstrap: int = 1000
    seed: int = 0
    labels: list[str] | None = None
    patient_pattern: str = DEFAULT_PATIENT_PATTERN
    confidence: float = 0.95


@dataclass
class Case:
    stem: str
    label: str
    patient: str
    hit: bool
    iou: float


@dataclass
class MapReport:
    method: str
    source: str
    top_k: float
    cases: list[Case]
    per_label: dict[str, dict[str, Any]] = field(default_factory=dict)
    overall: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "ground_truth": self.source, "top_k_percent": self.top_k,
                "per_label": self.per_label, "overall": self.overall, "notes": self.notes}


def score_map(m: np.ndarray, region: np.ndarray, top_k: float) -> tuple[bool, float]:
    """(pointing-game hit, IoU of the top-k% pixels) for one map and one boolean region."""

    flat = m.ravel()
    if flat.size == 0 or float(flat.max()) == float(flat.min()):
        return False, 0.0  # a flat map points nowhere: its "peak" would be the first pixel, its top-k arbitrary
    x, y = peak(m)
    n = max(1, int(math.ceil(flat.size * top_k / 100.0)))
    top = np.zeros(flat.size, bool)
    top[np.argpartition(-flat, n - 1)[:n]] = True
    r = region.ravel()
    union = int((top | r).sum())
    return bool(region[y, x]), (float((top & r).sum()) / union if union else 0.0)


def patient_of(stem: str, pattern: str) -> str:
    m = re.search(pattern, stem)
    if not m:
        return stem
    got = m.group(1) if m.groups() else m.group(0)
    return stem if got is None else got  # an optional group that took no part: the stem is the patient


# ------------------------------------------------------------------ ground truth


def _mask_regions(folder: Path, stems: set[str], labels: list[str]) -> tuple[dict[tuple[str, str], Path], list[str]]:
    if not folder.is_dir():
        raise MavlError(f"{folder}: --masks needs a folder of <stem>.<label>.png masks", path=folder)
    found: dict[tuple[str, str], Path] = {}
    unmatched: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".png":
            continue
        split = split_mask_name(p.name, labels)
        if split is None or split[0] not in stems:
            unmatched.append(p.name)
            continue
        found[split] = p
    return found, unmatched


def _read_mask(p: Path, shape: tuple[int, int], map_name: str) -> np.ndarray:

    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("L"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise MavlError(f"{p}: cannot read mask ({str(exc).splitlines()[0][:100]})", path=p) from None
    if arr.shape != shape:
        raise MavlError(f"{p}: mask is {arr.shape[1]}x{arr.shape[0]} pixels, but the map in {map_name} is "
                        f"{shape[1]}x{shape[0]} (masks and maps must both be in the original image's pixels)", path=p)
    # 0/255 masks (and mode "1") or 0/1 masks (a boolean array saved as uint8): both are binary
    return arr > (0 if arr.max(initial=0) <= 1 else 127)


def read_boxes(path: Path) -> list[tuple[str, str, float, float, float, float]]:
    """NIH box rows: (image stem, label, x, y, w, h)."""
    if not path.is_file():
        raise MavlError(f"{path}: box file not found", path=path)
    opener = __import__("gzip").open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise MavlError(f"{path}: cannot read box file ({str(exc)[:120]})", path=path) from None
    if not rows or len(rows[0]) < 3 or rows[0][0].strip().lower() != "image index" or "bbox" not in rows[0][2].lower():
        raise MavlError(f"{path}: not an NIH box file (expected the header 'Image Index,Finding Label,Bbox [x,y,w,h],,,')",
                        path=path)
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except (ValueError, TypeError):
            raise MavlError(f"{path}: line {n}: expected x, y, w, h numbers after the label, got {row[2:6]}", path=path) from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise MavlError(f"{path}: line {n}: box {x, y, w, h} is empty or not finite", path=path)
        out.append((Path(row[0].strip()).stem, row[1].strip(), x, y, w, h))
    if not out:
        raise MavlError(f"{path}: holds no boxes", path=path)
    return out


def _box_label(raw: str, labels: list[str]) -> str | None:
    if raw in labels:
        return raw
    mapped = NIH_TO_CHEXPERT.get(raw)
    return mapped if mapped in labels else None


def _box_region(boxes: list[tuple[float, float, float, float]], shape: tuple[int, int], where: str) -> np.ndarray:
    h, w = shape
    region = np.zeros(shape, bool)
    for x, y, bw, bh in boxes:
        if x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5:
            raise MavlError(f"{where}: box [{x:.6g}, {y:.6g}, {bw:.6g}, {bh:.6g}] reaches outside the {w}x{h} map "
                            "(boxes and maps must both be in the original image's pixels)")
        c0, c1 = int(np.ceil(x - 0.5)), int(np.floor(x + bw - 0.5))
        r0, r1 = int(np.ceil(y - 0.5)), int(np.floor(y + bh - 0.5))
        region[max(r0, 0) : min(r1, h - 1) + 1, max(c0, 0) : min(c1, w - 1) + 1] = True
    return region


# ------------------------------------------------------------------ evaluation


def evaluate_maps(maps_dir: str | Path, opts: MapEvalOptions) -> MapReport:
    """Score the maps in ``maps_dir`` against ``opts``' masks or boxes: per finding and overall, with CIs."""
    _check_options(opts)
    files = read_maps_dir(maps_dir)
    methods = sorted({str(f.meta.get("method")) for f in files})
    if len(methods) > 1:
        raise MavlError(f"{maps_dir}: holds maps of several methods ({', '.join(methods)}); keep one method per folder")
    by_stem = {stem_of(f): f for f in files}
    all_labels = _chosen_labels(files, opts, maps_dir)
    notes: list[str] = []
    if opts.masks is not None:
        regions, source = _mask_ground_truth(opts, by_stem, all_labels, notes)
    else:
        regions, source = _box_ground_truth(opts, by_stem, all_labels, notes)
    cases, flat = _score_cases(regions, by_stem, opts, notes)
    if not cases:
        what = f"masks in {opts.masks}" if opts.masks is not None else f"boxes in {opts.boxes}"
        raise MavlError(f"{maps_dir}: none of its {len(files)} maps files has a region among the {what} "
                        f"(expected <stem>.<label>.png / Image Index rows for stems like {next(iter(by_stem))!r} "
                        f"and labels {', '.join(all_labels)})")
    if flat:
        notes.append(f"{len(flat)} flat map(s) (one value everywhere, e.g. {flat[0]}) counted as misses with IoU 0")
    rep = MapReport(methods[0], source, opts.top_k, cases, notes=notes)
    rng = np.random.default_rng(opts.seed)
    for lab in all_labels:
        sub = [c for c in cases if c.label == lab]
        if sub:
            rep.per_label[lab] = _summary(sub, opts, rng)
    rep.overall = _summary(cases, opts, rng)
    return rep


def _check_options(opts: MapEvalOptions) -> None:
    """Refuse options that make no sense before any file is read."""
    if (opts.masks is None) == (opts.boxes is None):
        raise MavlError("evaluate-maps needs exactly one of --masks DIR or --boxes FILE")
    if not 0 < opts.top_k <= 100:
        raise MavlError(f"--top-k is a percentage in (0, 100], got {opts.top_k}")
    if not 0 <= opts.bootstrap <= MAX_BOOTSTRAP:
        raise MavlError(f"--bootstrap must lie in 0..{MAX_BOOTSTRAP:,}, got {opts.bootstrap}")
    if not 0 <= opts.seed <= MAX_SEED:
        raise MavlError(f"--seed must lie in 0..{MAX_SEED}, got {opts.seed}")
    try:
        re.compile(opts.patient_pattern)
    except re.error as exc:
        raise MavlError(f"--patient-pattern: not a regular expression ({exc})") from None


def _chosen_labels(files: list[Any], opts: MapEvalOptions, maps_dir: str | Path) -> list[str]:
    """The maps' labels, sorted; only those in ``--labels`` when given (each must have a map)."""
    all_labels = sorted({lab for f in files for lab in f.labels()})
    if opts.labels:
        unknown = [lab for lab in opts.labels if lab not in all_labels]
        if unknown:
            raise MavlError(f"--labels: no map for {', '.join(unknown)}; the maps in {maps_dir} cover {', '.join(all_labels)}")
        all_labels = [lab for lab in all_labels if lab in opts.labels]
    return all_labels


def _mask_ground_truth(opts: MapEvalOptions, by_stem: dict[str, Any], labels: list[str],
                       notes: list[str]) -> tuple[dict[tuple[str, str], Any], str]:
    """``{(stem, label): ("mask", path)}`` and the source name; notes the masks that match no map."""
    found, unmatched = _mask_regions(Path(opts.masks), set(by_stem), labels)
    regions = {k: ("mask", p) for k, p in found.items()}
    if unmatched:
        notes.append(f"{len(unmatched)} mask file(s) match no map (e.g. {unmatched[0]})")
    return regions, str(opts.masks)


def _box_ground_truth(opts: MapEvalOptions, by_stem: dict[str, Any], labels: list[str],
                      notes: list[str]) -> tuple[dict[tuple[str, str], Any], str]:
    """``{(stem, label): ("boxes", [(x, y, w, h), ...])}`` and the source name; notes box labels with no map."""
    boxes = read_boxes(Path(opts.boxes))
    grouped: dict[tuple[str, str], list] = {}
    unknown_labels: set[str] = set()
    for stem, raw, x, y, w, h in boxes:
        if stem not in by_stem:
            continue
        lab = _box_label(raw, labels)
        if lab is None:
            unknown_labels.add(raw)
            continue
        grouped.setdefault((stem, lab), []).append((x, y, w, h))
    regions = {k: ("boxes", v) for k, v in grouped.items()}
    if unknown_labels:
        notes.append(f"box labels with no map skipped: {', '.join(sorted(unknown_labels))}")
    return regions, str(opts.boxes)


def _score_cases(regions: dict[tuple[str, str], Any], by_stem: dict[str, Any], opts: MapEvalOptions,
                 notes: list[str]) -> tuple[list[Case], list[str]]:
    """One :class:`Case` per (image, finding) with a map and a non-empty region, and the flat maps among them."""
    cases: list[Case] = []
    flat: list[str] = []
    for (stem, lab), (kind, spec) in sorted(regions.items()):
        f = by_stem[stem]
        if lab not in f.labels():
            continue
        m = f.tensors["maps"][f.labels().index(lab)]
        region = (_read_mask(spec, m.shape, str(f.path)) if kind == "mask"
                  else _box_region(spec, m.shape, f"{opts.boxes}: {stem} {lab}"))
        if not region.any():
            notes.append(f"empty region skipped: {stem} {lab}")
            continue
        hit, iou = score_map(m, region, opts.top_k)
        if float(m.max()) == float(m.min()):
            flat.append(f"{stem} {lab}")
        cases.append(Case(stem, lab, patient_of(stem, opts.patient_pattern), hit, iou))
    return cases, flat


def _summary(cases: list[Case], opts: MapEvalOptions, rng: np.random.Generator) -> dict[str, Any]:
    hits = np.array([c.hit for c in cases], np.float64)
    ious = np.array([c.iou for c in cases], np.float64)
    _, inverse = np.unique([c.patient for c in cases], return_inverse=True)
    inverse = inverse.ravel()
    n_pat = int(inverse.max()) + 1
    out: dict[str, Any] = {"images": len(cases), "patients": n_pat, "hit_rate": float(hits.mean()),
                           "iou": float(ious.mean())}
    if opts.bootstrap > 0 and n_pat > 1:
        w = resample_weights(rng, opts.bootstrap, inverse, n_pat)
        tot = w.sum(1)
        lo, hi = (1 - opts.confidence) / 2 * 100, (1 + opts.confidence) / 2 * 100
        for key, v in (("hit_rate", hits), ("iou", ious)):
            stats = (w @ v) / tot
            out[f"{key}_ci"] = [float(np.percentile(stats, lo)), float(np.percentile(stats, hi))]
    return out


def report_table(rep: MapReport) -> Any:
    """One rich table: per finding, then overall."""

    def ci(d: dict[str, Any], key: str) -> str:
        c = d.get(f"{key}_ci")
        return f"[{fmt_num(c[0])}, {fmt_num(c[1])}]" if c else "-"

    rows = [[lab, d["images"], d["patients"], fmt_num(d["hit_rate"]), ci(d, "hit_rate"), fmt_num(d["iou"]), ci(d, "iou")]
            for lab, d in rep.per_label.items()]
    o = rep.overall
    rows.append(["overall", o["images"], o["patients"], fmt_num(o["hit_rate"]), ci(o, "hit_rate"), fmt_num(o["iou"]), ci(o, "iou")])
    cap = f"pointing game: the map's peak inside the region; IoU of the top {rep.top_k:g}% pixels. CIs: patient bootstrap."
    return table(f"{rep.method} maps vs {rep.source}", ["finding", "images", "patients", "hit rate", "95% CI",
                                                       f"IoU top-{rep.top_k:g}%", "95% CI"], rows, caption=cap)
