"""Phantom films: deterministic, labelled consistently with what the pixels show, split by patient."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mavl_cli.synthetic.phantoms import (
    FINDINGS,
    PhantomSet,
    generate_phantoms,
    render_phantom,
)

SIZE = 128


def _pair(finding: str, seed: int, severity: float = 0.8) -> tuple[np.ndarray, np.ndarray, dict]:
    """The same patient and exposure rendered without and with one finding."""
    base, _ = render_phantom(np.random.default_rng(seed), {}, SIZE)
    sick, geom = render_phantom(np.random.default_rng(seed), {finding: severity}, SIZE)
    return base.astype(np.float64), sick.astype(np.float64), geom


def _heart_width(img: np.ndarray, rows: range) -> float:
    """Median width of the bright central run (mediastinum + heart) over ``rows``, from the pixels alone."""
    size = img.shape[1]
    k = np.ones(5) / 5.0
    c = size // 2
    widths = []
    for row in rows:
        prof = np.convolve(img[row].astype(np.float64), k, mode="same")
        lung_level = np.percentile(prof[int(0.12 * size) : int(0.88 * size)], 10)
        thr = 0.5 * (prof[c] + lung_level)
        left, right = c, c
        while left > 0 and prof[left - 1] >= thr:
            left -= 1
        while right < size - 1 and prof[right + 1] >= thr:
            right += 1
        widths.append(right - left)
    return float(np.median(widths))


def _heart_rows(geom: dict) -> range:
    """Rows through the upper heart, above the diaphragm domes."""
    top = geom["heart_row"] - 0.35 * geom["heart_height"]
    return range(int(top), int(geom["heart_row"] + 0.1 * geom["heart_height"]) + 1)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> PhantomSet:
    return generate_phantoms(tmp_path_factory.mktemp("ph") / "set", n=60, seed=3, size=SIZE)


def test_render_returns_uint8_image_and_geometry() -> None:
    img, geom = render_phantom(np.random.default_rng(0), {"Edema": 0.5}, 96)
    assert img.shape == (96, 96) and img.dtype == np.uint8
    assert 0.3 < geom["heart_width"] / geom["thorax_width"] < 0.5
    assert img.std() > 20  # a film, not a flat field


def test_rng_draws_do_not_depend_on_findings() -> None:
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    render_phantom(a, {}, 64)
    render_phantom(b, {f: 0.7 for f in FINDINGS}, 64)
    assert a.integers(1 << 30) == b.integers(1 << 30)


def test_unknown_finding_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        render_phantom(np.random.default_rng(0), {"Fracture": 1.0}, 64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cardiomegaly_widens_the_heart_on_the_pixels(seed: int) -> None:
    base, sick, geom = _pair("Cardiomegaly", seed)
    assert geom["ctr"] > 0.5
    rows = _heart_rows(geom)
    w0, w1 = _heart_width(base, rows), _heart_width(sick, rows)
    assert w0 > 0.15 * SIZE  # the measurement found a heart at all
    assert w1 > w0 + 0.06 * SIZE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effusion_whitens_a_lower_lateral_lung_zone(seed: int) -> None:
    base, sick, geom = _pair("Pleural Effusion", seed)
    gains = []
    for side, (l, t, r, b) in enumerate(geom["lungs"]):
        h, w = b - t, r - l
        rows = slice(int(b - 0.3 * h), int(b - 0.05 * h))
        cols = slice(int(l + 0.05 * w), int(l + 0.4 * w)) if side == 0 else slice(int(r - 0.4 * w), int(r - 0.05 * w))
        gains.append(sick[rows, cols].mean() - base[rows, cols].mean())
    assert max(gains) > 20
    assert min(gains) > -2  # never darker


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pneumothorax_rim_is_darker_and_featureless(seed: int) -> None:
    base, sick, geom = _pair("Pneumothorax", seed)
    side = 0 if geom["pneumothorax"]["side"] == "left" else 1
    l, t, r, b = geom["lungs"][side]
    h, w = b - t, r - l
    rows = slice(int(t + 0.25 * h), int(t + 0.6 * h))
    cols = slice(int(l + 0.06 * w), int(l + 0.2 * w)) if side == 0 else slice(int(r - 0.2 * w), int(r - 0.06 * w))
    assert sick[rows, cols].mean() < base[rows, cols].mean() - 10
    assert sick[rows, cols].std() < base[rows, cols].std()


@pytest.mark.parametrize("finding", ["Consolidation", "Edema", "Atelectasis"])
def test_parenchymal_findings_add_lung_opacity(finding: str) -> None:
    for seed in range(3):
        base, sick, geom = _pair(finding, seed)
        l0, t0, r0, b0 = geom["lungs"][0]
        l1, t1, r1, b1 = geom["lungs"][1]
        box = (slice(int(min(t0, t1)), int(max(b0, b1))), slice(int(l0), int(r1)))
        diff = sick[box] - base[box]
        assert (diff > 25).mean() > 0.01, f"{finding} seed {seed} left the lungs unchanged"


def test_faint_findings_are_subtler_than_severe_ones() -> None:
    for finding in FINDINGS:
        base, _ = render_phantom(np.random.default_rng(9), {}, SIZE)
        faint, _ = render_phantom(np.random.default_rng(9), {finding: 0.05}, SIZE)
        severe, _ = render_phantom(np.random.default_rng(9), {finding: 0.95}, SIZE)
        d_faint = np.abs(faint.astype(int) - base).mean()
        d_severe = np.abs(severe.astype(int) - base).mean()
        assert 0 < d_faint < d_severe, finding


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = generate_phantoms(tmp_path / "a", n=40, seed=11, size=64)
    b = generate_phantoms(tmp_path / "b", n=40, seed=11, size=64)
    c = generate_phantoms(tmp_path / "c", n=40, seed=12, size=64)
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 40 + 4 + 1  # images, 4 CSVs, the synthetic-data marker
    for rel in files_a:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    assert a.labels_csv.read_bytes() != c.labels_csv.read_bytes()
    first = sorted((a.root / "images").iterdir())[0].name
    assert (a.root / "images" / first).read_bytes() != (c.root / "images" / first).read_bytes()


def test_csv_columns_values_and_images(phantom_set: PhantomSet) -> None:
    rows = _read(phantom_set.labels_csv)
    assert phantom_set.n_images == len(rows) == 60
    with open(phantom_set.labels_csv, encoding="utf-8") as fh:
        assert fh.readline().strip().split(",") == ["Path", "Patient", *FINDINGS]
    seen = set()
    for row in rows:
        assert row["Path"].startswith("images/") and row["Path"].endswith(".png")
        assert Path(row["Path"]).name.startswith(row["Patient"] + "_study")
        seen.update(row[f] for f in FINDINGS)
        with Image.open(phantom_set.root / row["Path"]) as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
    assert seen <= {"1.0", "0.0", "-1.0", ""}
    assert {"1.0", "0.0", "-1.0", ""} <= seen  # uncertain and blank labels both occur
    for f in FINDINGS:
        prevalence = np.mean([row[f] == "1.0" for row in rows])
        assert 0.05 < prevalence < 0.6, f


def test_split_is_grouped_by_patient_and_complete(phantom_set: PhantomSet) -> None:
    rows = _read(phantom_set.labels_csv)
    assert set(phantom_set.splits) == {"train", "val", "test"}
    parts = {name: _read(path) for name, path in phantom_set.splits.items()}
    assert all(parts.values())
    paths = [r["Path"] for part in parts.values() for r in part]
    assert sorted(paths) == sorted(r["Path"] for r in rows)
    patients = {name: {r["Patient"] for r in part} for name, part in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert len(parts["train"]) > len(parts["val"])
    by_path = {r["Path"]: r for r in rows}
    for part in parts.values():
        for r in part:
            assert r == by_path[r["Path"]]
    studies: dict[str, int] = {}
    for r in rows:
        studies[r["Patient"]] = studies.get(r["Patient"], 0) + 1
    assert max(studies.values()) <= 3 and max(studies.values()) > 1


def test_labelled_cardiomegaly_has_wider_hearts_on_the_pixels(phantom_set: PhantomSet) -> None:
    rows = _read(phantom_set.labels_csv)
    widths: dict[str, list[float]] = {"1.0": [], "0.0": []}
    for row in rows:
        if row["Cardiomegaly"] in widths:
            img = np.asarray(Image.open(phantom_set.root / row["Path"]))
            widths[row["Cardiomegaly"]].append(_heart_width(img, range(int(0.52 * SIZE), int(0.64 * SIZE))))
    assert len(widths["1.0"]) >= 5 and len(widths["0.0"]) >= 5
    assert np.mean(widths["1.0"]) > np.mean(widths["0.0"]) + 0.05 * SIZE


def test_progress_reports_every_image(tmp_path: Path) -> None:
    seen: list[int] = []
    generate_phantoms(tmp_path / "p", n=7, seed=0, size=48, progress=seen.append)
    assert seen == list(range(1, 8))
