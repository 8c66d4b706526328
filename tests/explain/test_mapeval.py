"""`mavl evaluate-maps`: pointing game and top-k% IoU against masks and NIH boxes, with patient-bootstrap CIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import run_cli
from PIL import Image

from mavl_cli.explain.mapeval import score_map
from mavl_cli.explain.maps import maps_meta, mask_name, peak, write_maps


def _maps(folder: Path, stem: str, labels: list[str], maps: np.ndarray, method: str = "similarity") -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{stem}.maps.safetensors"
    write_maps(path, maps.astype(np.float32), maps_meta(labels, method, f"{stem}.png", (maps.shape[2], maps.shape[1]),
                                                        [peak(m) for m in maps]))
    return path


def _blob(h: int, w: int, x: float, y: float, s: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))


def test_score_map_against_sklearn_jaccard() -> None:
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    for k in (5.0, 10.0, 30.0):
        m = rng.random((40, 50)).astype(np.float32)
        region = np.zeros((40, 50), bool)
        region[5:20, 10:30] = True
        hit, iou = score_map(m, region, k)
        top = m >= np.sort(m.ravel())[::-1][int(np.ceil(m.size * k / 100)) - 1]
        assert iou == pytest.approx(jaccard_score(region.ravel(), top.ravel()))
        y, x = np.unravel_index(np.argmax(m), m.shape)
        assert hit == bool(region[y, x])


def test_oracle_and_wrong_maps_on_phantom_masks(tmp_path: Path) -> None:
    """Maps built from the phantom masks themselves score 1.0; maps pointing elsewhere score 0."""
    from scipy.ndimage import gaussian_filter

    r = run_cli(["phantoms", tmp_path / "ph", "-n", "12", "--seed", "4", "--size", "64", "--masks"])
    assert r.exit_code == 0, r.stderr
    masks = tmp_path / "ph" / "masks"
    labels = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Edema", "Atelectasis"]
    n_cases = 0
    for img in sorted((tmp_path / "ph" / "images").iterdir()):
        stem = img.stem
        good, bad = [], []
        for lab in labels:
            p = masks / mask_name(stem, lab)
            m = np.asarray(Image.open(p)) > 0 if p.exists() else np.zeros((64, 64), bool)
            n_cases += int(p.exists())
            good.append(gaussian_filter(m.astype(float), 1.0) + 1e-3 * _blob(64, 64, 32, 32))
            bad.append((~m).astype(float) * _blob(64, 64, 32, 32, 40))
        _maps(tmp_path / "good", stem, labels, np.stack(good))
        _maps(tmp_path / "bad", stem, labels, np.stack(bad))
    out = {}
    for name in ("good", "bad"):
        r = run_cli(["evaluate-maps", tmp_path / name, "--masks", masks, "--json", "--bootstrap", "200"])
        assert r.exit_code == 0, r.stderr
        out[name] = json.loads(r.stdout)
    assert out["good"]["overall"]["images"] == n_cases > 5
    assert out["good"]["overall"]["hit_rate"] == 1.0 and out["bad"]["overall"]["hit_rate"] == 0.0
    assert out["good"]["overall"]["iou"] > out["bad"]["overall"]["iou"]
    for lab, d in out["good"]["per_label"].items():
        assert d["hit_rate"] == 1.0 and lab in labels
    ci = out["good"]["overall"]["hit_rate_ci"]
    assert ci == [1.0, 1.0]
    table = run_cli(["evaluate-maps", tmp_path / "good", "--masks", masks, "--bootstrap", "50"])
    assert table.exit_code == 0 and "overall" in table.stdout and "hit rate" in table.stdout


def test_patient_bootstrap_ci_brackets_the_estimate_and_resamples_patients(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in range(8):
        for s in range(3):
            stem = f"{p:08d}_{s:03d}"
            region = np.zeros((32, 32), bool)
            region[8:24, 8:24] = True
            Image.fromarray(region.astype(np.uint8) * 255).save(masks / mask_name(stem, "Edema"))
            inside = rng.random() < (0.9 if p < 4 else 0.3)
            _maps(tmp_path / "maps", stem, ["Edema"], _blob(32, 32, 16 if inside else 2, 16 if inside else 2)[None])
    r = run_cli(["evaluate-maps", tmp_path / "maps", "--masks", masks, "--json", "--bootstrap", "500"])
    assert r.exit_code == 0, r.stderr
    o = json.loads(r.stdout)["overall"]
    assert o["images"] == 24 and o["patients"] == 8
    lo, hi = o["hit_rate_ci"]
    assert lo <= o["hit_rate"] <= hi and hi - lo > 0.05
    # every patient's images move together: a CI of per-image resampling would be narrower here
    r2 = run_cli(["evaluate-maps", tmp_path / "maps", "--masks", masks, "--json", "--bootstrap", "500",
                  "--patient-pattern", "^(.+)$"])
    o2 = json.loads(r2.stdout)["overall"]
    assert o2["patients"] == 24 and (o2["hit_rate_ci"][1] - o2["hit_rate_ci"][0]) < (hi - lo) + 1e-9


def test_nih_boxes(tmp_path: Path) -> None:
    h = w = 100
    _maps(tmp_path / "maps", "00000001_000", ["Pleural Effusion", "Cardiomegaly"],
          np.stack([_blob(h, w, 20, 70), _blob(h, w, 80, 10)]))
    _maps(tmp_path / "maps", "00000002_000", ["Pleural Effusion", "Cardiomegaly"],
          np.stack([_blob(h, w, 60, 60), _blob(h, w, 50, 50)]))
    boxes = tmp_path / "BBox_List.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                     "00000001_000.png,Effusion,10.0,60.0,20.0,20.0\n"  # peak (20, 70): inside
                     "00000001_000.png,Cardiomegaly,30.0,30.0,40.0,40.0\n"  # peak (80, 10): outside
                     "00000002_000.png,Cardiomegaly,30.0,30.0,40.0,40.0\n"  # peak (50, 50): inside
                     "00000002_000.png,Nodule,1,1,5,5\n"
                     "00009999_000.png,Effusion,1,1,5,5\n")
    r = run_cli(["evaluate-maps", tmp_path / "maps", "--boxes", boxes, "--json", "--bootstrap", "0"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["per_label"]["Pleural Effusion"]["hit_rate"] == 1.0 and rep["per_label"]["Pleural Effusion"]["images"] == 1
    assert rep["per_label"]["Cardiomegaly"]["hit_rate"] == 0.5 and rep["overall"]["images"] == 3
    assert "Nodule" in r.stderr  # box labels without a map are named, not silently dropped
    box = np.zeros((h, w), bool)
    box[60:80, 10:30] = True
    assert rep["per_label"]["Pleural Effusion"]["iou"] == pytest.approx(score_map(_blob(h, w, 20, 70), box, 10.0)[1])


def test_reads_nihs_real_box_file_header() -> None:
    txv = pytest.importorskip("torchxrayvision")
    from mavl_cli.explain.mapeval import read_boxes

    path = Path(txv.__file__).parent / "data" / "BBox_List_2017.csv.gz"
    if not path.exists():
        pytest.skip("torchxrayvision ships no BBox_List_2017.csv.gz")
    rows = read_boxes(path)
    assert len(rows) == 984 and rows[0][1] == "Atelectasis" and all(r[4] > 0 and r[5] > 0 for r in rows)
    assert {r[1] for r in rows} >= {"Effusion", "Cardiomegaly", "Pneumothorax", "Atelectasis"}


def _one_line(r, text: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr and text in r.stderr, r.stderr


def test_bad_inputs_one_clear_line_each(tmp_path: Path) -> None:
    _maps(tmp_path / "maps", "a_1", ["Edema"], _blob(32, 32, 16, 16)[None])
    masks = tmp_path / "masks"
    masks.mkdir()
    _one_line(run_cli(["evaluate-maps", tmp_path / "maps", "--masks", masks]), "has a region among the masks")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(masks / "a_1.Edema.png")
    _one_line(run_cli(["evaluate-maps", tmp_path / "maps", "--masks", masks]), "mask is 30x20 pixels, but the map")
    _one_line(run_cli(["evaluate-maps", tmp_path / "maps", "--masks", masks, "--labels", "Fracture"]),
              "--labels: no map for Fracture")
    _one_line(run_cli(["evaluate-maps", tmp_path / "nowhere", "--masks", masks]), "not a folder of maps")
    _one_line(run_cli(["evaluate-maps", masks, "--masks", masks]), "holds no *.maps.safetensors")
    _one_line(run_cli(["evaluate-maps", tmp_path / "maps"]), "exactly one of --masks DIR or --boxes FILE")
    bad = tmp_path / "b.csv"
    bad.write_text("path,label\nx.png,Edema\n")
    _one_line(run_cli(["evaluate-maps", tmp_path / "maps", "--boxes", bad]), "not an NIH box file")
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na_1.png,Edema,10,10,50,50\n")
    _one_line(run_cli(["evaluate-maps", tmp_path / "maps", "--boxes", bad]), "reaches outside the 32x32 map")


def test_s3_masks_saved_as_0_and_1_are_binary(tmp_path: Path) -> None:
    """A boolean array saved as a uint8 PNG holds 0 and 1, not 0 and 255: it is the same region (was: every
    mask read as empty, and the run refused with "none of its maps has a region")."""
    region = np.zeros((32, 32), bool)
    region[8:16, 4:12] = True
    maps = _blob(32, 32, 8, 12, 3)[None]
    _maps(tmp_path / "maps", "p1_a", ["Edema"], maps)
    out = {}
    for name, arr in (("m255", region.astype(np.uint8) * 255), ("m01", region.astype(np.uint8))):
        (tmp_path / name).mkdir()
        Image.fromarray(arr).save(tmp_path / name / mask_name("p1_a", "Edema"))
        r = run_cli(["evaluate-maps", tmp_path / "maps", "--masks", tmp_path / name, "--json", "--bootstrap", "0"])
        assert r.exit_code == 0, r.stderr
        out[name] = json.loads(r.stdout)["overall"]
    hit, iou = score_map(maps[0], region, 10.0)
    assert out["m01"] == out["m255"] and out["m01"]["hit_rate"] == float(hit) == 1.0
    assert out["m01"]["iou"] == pytest.approx(iou) and iou > 0


def test_s3_a_flat_map_points_nowhere(tmp_path: Path) -> None:
    """A map with one value everywhere (e.g. a Grad-CAM whose ReLU zeroed it) has no peak: its argmax is the first
    pixel, which a region in the top-left corner would count as a hit. It is a miss with IoU 0, and said so."""
    region = np.zeros((16, 16), bool)
    region[0:4, 0:4] = True
    assert score_map(np.zeros((16, 16), np.float32), region, 10.0) == (False, 0.0)
    _maps(tmp_path / "maps", "p1_a", ["Edema"], np.zeros((1, 16, 16)))
    (tmp_path / "masks").mkdir()
    Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / "masks" / mask_name("p1_a", "Edema"))
    r = run_cli(["evaluate-maps", tmp_path / "maps", "--masks", tmp_path / "masks", "--json", "--bootstrap", "0"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["overall"]["hit_rate"] == 0.0 and rep["overall"]["iou"] == 0.0
    assert any("flat map" in n for n in rep["notes"]), rep["notes"]


def test_s3_patient_pattern_with_an_optional_group(tmp_path: Path) -> None:
    """`--patient-pattern '(x)|(p\\d)'`: group 1 takes no part in a match and is None; the stem is then the
    patient (was: an internal TypeError sorting None)."""
    from mavl_cli.explain.mapeval import patient_of

    assert patient_of("p1_a", r"(zzz)|(p\d)") == "p1_a"
    assert patient_of("zzz_a", r"(zzz)|(p\d)") == "zzz"
    region = np.zeros((16, 16), bool)
    region[4:8, 4:8] = True
    (tmp_path / "masks").mkdir()
    for stem in ("p1_a", "p2_a"):
        _maps(tmp_path / "maps", stem, ["Edema"], _blob(16, 16, 6, 6, 2)[None])
        Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / "masks" / mask_name(stem, "Edema"))
    r = run_cli(["evaluate-maps", tmp_path / "maps", "--masks", tmp_path / "masks", "--json", "--bootstrap", "20",
                 "--patient-pattern", r"(zzz)|(p\d)"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["overall"]["patients"] == 2
