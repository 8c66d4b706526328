"""`mavl phantoms --masks`: where each drawn finding is, without changing a byte of the films."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import run_cli
from PIL import Image

from mavl_cli.explain.maps import mask_name
from mavl_cli.synthetic.phantoms import FINDINGS, render_phantom


def _digest(folder: Path, skip: str = "masks") -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and skip not in p.parts}


def test_masks_leave_films_and_csvs_byte_identical_and_follow_the_labels(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["phantoms", a, "-n", "14", "--seed", "2", "--size", "64"]).exit_code == 0
    r = run_cli(["phantoms", b, "-n", "14", "--seed", "2", "--size", "64", "--masks"])
    assert r.exit_code == 0, r.stderr
    assert not (a / "masks").exists()
    assert _digest(a) == _digest(b)
    with open(b / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_masks = 0
    for row in rows:
        stem = Path(row["Path"]).stem
        for f in FINDINGS:
            p = b / "masks" / mask_name(stem, f)
            assert p.exists() == (row[f] in ("1.0", "-1.0")), (stem, f, row[f])
            if p.exists():
                m = np.asarray(Image.open(p))
                assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
                n_masks += 1
    assert n_masks > 5
    assert sorted(p.name for p in (b / "masks").iterdir()) == sorted(
        mask_name(Path(r["Path"]).stem, f) for r in rows for f in FINDINGS if r[f] in ("1.0", "-1.0"))


@pytest.mark.parametrize("finding", FINDINGS)
@pytest.mark.parametrize("seed", [0, 7])
def test_mask_covers_where_the_sign_changed_the_pixels(finding: str, seed: int) -> None:
    base, _ = render_phantom(np.random.default_rng(seed), {}, 128)
    sick, geom = render_phantom(np.random.default_rng(seed), {finding: 0.8}, 128, masks=True)
    same, g0 = render_phantom(np.random.default_rng(seed), {finding: 0.8}, 128)
    assert np.array_equal(sick, same) and "masks" not in g0  # masks draw nothing from the generator
    m = geom["masks"][finding]
    assert set(geom["masks"]) == {finding} and 0.002 < m.mean() < 0.3
    diff = np.abs(sick.astype(float) - base.astype(float))
    inside, outside = diff[m].mean(), diff[~m].mean()
    assert inside > 2.5 * outside, (finding, inside, outside)
    if finding in ("Edema", "Atelectasis", "Cardiomegaly"):
        return  # edema: a faint haze over both lungs too; atelectasis and cardiomegaly: shifted mediastinum, dome
    # focal signs: most of the strong change lies within 4 px of the mask
    from scipy.ndimage import binary_dilation

    near = binary_dilation(m, iterations=4)
    big = diff > 12
    assert big.any() and big[near].sum() / big.sum() > 0.8, (finding, big[near].sum() / big.sum())
