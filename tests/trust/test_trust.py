"""Trust at the point of use: provenance, the synthetic-data warning, the OOD flag, the research notice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mavl_cli.io.mavlfile import read_file, write_file
from mavl_cli.trust.provenance import (
    MARKER,
    RESEARCH_NOTICE,
    SYNTHETIC_WARNING,
    synthetic_source,
)


def _test_images(chain) -> list[Path]:
    import csv

    ph = chain["phantoms"]
    with open(ph.splits["test"]) as fh:
        return [ph.root / r["Path"] for r in csv.DictReader(fh)]


def _write_variants(images: list[Path], folder: Path, fn) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in images:
        Image.fromarray(fn(np.asarray(Image.open(p).convert("L")))).save(folder / p.name)
    return folder


# ------------------------------------------------------------------ Ledoit-Wolf


def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf as sk_lw

    from mavl_cli.trust.ood import ledoit_wolf

    rng = np.random.default_rng(0)
    for n, d in ((200, 8), (30, 64)):  # n > d and n < d (where shrinkage matters)
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
        cov, shrink = ledoit_wolf(x)
        ref_cov, ref_shrink = sk_lw(x)
        assert shrink == pytest.approx(ref_shrink, rel=1e-9)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_distances_are_mahalanobis_under_the_shrunk_covariance():
    from sklearn.covariance import LedoitWolf

    from mavl_cli.trust import ood

    rng = np.random.default_rng(1)
    tr, va = rng.standard_normal((300, 5)), rng.standard_normal((50, 5))
    tensors, meta = ood.fit(tr, va)
    lw = LedoitWolf().fit(tr)
    expect = np.sqrt(lw.mahalanobis(va))
    stats = ood.Stats(tensors["ood.mean"].astype(np.float64), tensors["ood.whiten"].astype(np.float64),
                      tensors["ood.ref_dist"].astype(np.float64), meta)
    np.testing.assert_allclose(np.sort(ood._dist(va, stats.mean, stats.whiten)), tensors["ood.ref_dist"], rtol=1e-5)
    np.testing.assert_allclose(np.sort(expect), tensors["ood.ref_dist"], rtol=1e-4)
    new = rng.standard_normal((20, 5))
    a = ood.assess(stats, np.vstack([new, 10 + new[:5]]))
    assert a.flag[20:].all() and a.flag[:20].mean() < 0.2
    ref = tensors["ood.ref_dist"].astype(np.float64)
    np.testing.assert_allclose(a.score, [100 * np.mean(ref < x) for x in a.distance])  # the percentile, no ties here
    assert a.cutoff == pytest.approx(np.quantile(ref, 0.99))
    assert meta["reference"] == "validation" and meta["n_reference"] == 50
    _, meta2 = ood.fit(tr)  # no validation: cross-fitted training distances
    assert meta2["reference"].startswith("training")


# ------------------------------------------------------------------ synthetic marker


def test_phantom_marker_is_a_sidecar_and_only_marks_phantom_files(phantom_set, tmp_path):
    root = phantom_set.root
    doc = json.loads((root / MARKER).read_text())
    assert doc["synthetic"] is True and set(doc["files"]) == {"labels.csv", "train.csv", "val.csv", "test.csv"}
    assert synthetic_source(phantom_set.splits["train"])["via"] == "label file train.csv"
    copied = tmp_path / "train.csv"
    shutil.copy(phantom_set.splits["train"], copied)
    assert synthetic_source(copied) is None  # a label file elsewhere is not marked by the phantoms' marker
    img = next((root / "images").iterdir())
    assert synthetic_source(None, [img]) is not None  # images under the phantom folder are
    other = tmp_path / "x.png"
    shutil.copy(img, other)
    assert synthetic_source(None, [other]) is None


def test_chain_carries_the_synthetic_mark_into_the_model(chain):
    d = chain["dir"]
    for name in ("train.st", "lrf.st"):
        assert read_file(d / name).meta["synthetic"]["generator"] == "mavl phantoms"
    for name in ("model.st", "tuned.st"):
        meta = read_file(d / name).meta
        assert meta["synthetic_training_data"] is True
        td = meta["training_data"]
        assert td["labels_file"] == "train.csv" and td["images"] > 0 and len(td["fingerprint"]) == 16
        assert td["synthetic"] is True and meta["ood"]["reference"] == "validation"


def test_phantom_model_on_a_real_looking_film_warns_every_run(chain, cli, tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    film = (120 + 60 * np.sin(np.pi * xx) * np.cos(np.pi * (yy - 0.5)) + rng.normal(0, 8, (64, 64))).clip(0, 255)
    img = tmp_path / "00000001_000.png"  # an NIH-style name, outside any phantom folder
    Image.fromarray(film.astype(np.uint8)).save(img)
    model = chain["dir"] / "tuned.st"
    r = cli(f"predict {img} --model {model}")
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and "synthetic" in r.stderr and "mean nothing" in r.stderr
    assert "model used" in r.stderr and "SYNTHETIC" in r.stderr  # the provenance block, on stderr
    assert "given with --model" in r.stderr and "train.csv" in r.stderr
    assert r.stdout.strip().splitlines()[-1].strip() == RESEARCH_NOTICE  # the table ends with the notice
    r = cli(f"predict {img} --model {model} --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["synthetic_training_data"] is True and SYNTHETIC_WARNING in doc["warnings"]
    m = doc["model"]
    assert m["chosen_by"] == "--model" and m["file"] == str(model)
    assert m["training_data"]["labels_file"] == "train.csv" and m["thresholds"]["tuned_on"]["labels_file"] == "val.csv"
    assert m["image_encoder"]["backbone"] == "vit_tiny_patch16_224" and m["text_encoder"]["model"]
    assert "calibration" in m and m["ood"]["method"].startswith("mahalanobis")
    (rec,) = doc["images"]
    assert isinstance(rec["ood"], bool) and 0 <= rec["ood_score"] <= 100
    assert "warning:" in r.stderr and "synthetic" in r.stderr
    r = cli(f"predict {img}", env={"MAVL_MODEL": str(model)})
    assert r.exit_code == 0 and "from $MAVL_MODEL" in r.stderr


def test_inverted_films_are_flagged_by_a_model_trained_on_upright_ones(chain, cli, tmp_path):
    images = _test_images(chain)
    model = chain["dir"] / "tuned.st"
    inv = _write_variants(images, tmp_path / "inverted", lambda a: 255 - a)
    r = cli(f"predict {inv} --model {model} --json")
    assert r.exit_code == 0, r.stderr
    recs = json.loads(r.stdout)["images"]
    # a tiny random ViT and 13 validation films (the 99th percentile is about their maximum): many, not all
    assert np.mean([rec["ood"] for rec in recs]) >= 0.5, [rec["ood_score"] for rec in recs]
    assert np.median([rec["ood_score"] for rec in recs]) == 100
    r = cli(f"predict {images[0].parent} --model {model} --json")  # the upright phantoms, train included
    upright = json.loads(r.stdout)["images"]
    assert np.mean([rec["ood"] for rec in upright]) <= 0.15
    assert np.mean([rec["ood_score"] for rec in recs]) > np.mean([rec["ood_score"] for rec in upright]) + 30
    r = cli(f"predict {inv} --model {model}")  # the table marks them
    assert r.exit_code == 0 and "[OOD]" in r.stdout and "unlike the model's training images" in r.stdout
    r = cli(f"predict {inv} --model {model} --json --ood-threshold 100")
    assert all(rec["ood"] is (rec["ood_score"] >= 100) for rec in json.loads(r.stdout)["images"])
    r = cli(f"predict {inv} --model {model} --ood-threshold 0")
    assert r.exit_code == 2 and "--ood-threshold" in r.stderr


def test_evaluate_reports_share_flagged_and_metrics_without_them(chain, cli, tmp_path, tiny_vit):
    d, ph = chain["dir"], chain["phantoms"]
    r = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {ph.splits['test']} --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["synthetic_training_data"] is True and any("synthetic" in w for w in doc["warnings"])
    ood = doc["ood"]
    assert ood["available"] and ood["images"] == doc["n_images"] and 0 <= ood["share_flagged"] <= 1
    assert "synthetic" in r.stderr
    # half the test films inverted: the flagged share rises and the metrics without them are on the upright ones
    mixed = tmp_path / "mixed"
    images = _test_images(chain)
    shutil.copytree(ph.root / "images", mixed / "images")
    for p in images[::2]:
        Image.fromarray(255 - np.asarray(Image.open(p).convert("L"))).save(mixed / "images" / p.name)
    shutil.copy(ph.splits["test"], mixed / "test.csv")
    r = cli(f"embed-images {mixed} --labels {mixed/'test.csv'} --backbone vit_tiny_patch16_224 --weights {tiny_vit} -o {tmp_path/'m.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"evaluate {d/'tuned.st'} {tmp_path/'m.st'} --labels {mixed/'test.csv'} --json")
    doc = json.loads(r.stdout)["ood"]
    assert doc["flagged"] >= max(ood["flagged"] + 2, 0.6 * len(images[::2]))
    assert doc["without_flagged"]["n_images"] == doc["images"] - doc["flagged"]
    r = cli(f"evaluate {d/'tuned.st'} {tmp_path/'m.st'} --labels {mixed/'test.csv'}")
    assert r.exit_code == 0 and "out-of-distribution" in r.stdout and "without flagged" in r.stdout


def _strip_ood(src: Path, dst: Path) -> None:
    f = read_file(src)
    tensors = {k: v for k, v in f.tensors.items() if not k.startswith("ood.")}
    meta = {k: v for k, v in f.meta.items() if k not in ("ood", "training_data", "synthetic_training_data",
                                                          "synthetic_source") and not k.startswith("mavl_")}
    write_file(dst, "model", tensors, meta)


def test_old_model_file_without_statistics_still_predicts_with_a_note(chain, cli, tmp_path):
    old = tmp_path / "old.st"
    _strip_ood(chain["dir"] / "tuned.st", old)
    img = _test_images(chain)[0]
    r = cli(f"predict {img} --model {old} --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "no OOD statistics" in r.stderr and doc["ood"]["available"] is False
    assert doc["images"][0]["ood"] is None and doc["images"][0]["ood_score"] is None
    assert doc["model"]["training_data"]["labels_file"] == "train.csv"  # from the older `train` record
    r = cli(f"predict {img} --model {old}")
    assert r.exit_code == 0 and "no OOD statistics" in r.stderr
    d, ph = chain["dir"], chain["phantoms"]
    r = cli(f"evaluate {old} {d/'test.st'} --labels {ph.splits['test']} --json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ood"]["available"] is False


def test_forged_statistics_are_refused_in_one_line(chain, cli, tmp_path):
    f = read_file(chain["dir"] / "tuned.st")
    meta = {k: v for k, v in f.meta.items() if not k.startswith("mavl_")}
    bad = dict(f.tensors)
    bad["ood.whiten"] = np.eye(3, dtype=np.float32)
    write_file(tmp_path / "bad.st", "model", bad, meta)
    r = cli(f"predict {_test_images(chain)[0]} --model {tmp_path/'bad.st'}")
    assert r.exit_code == 2 and "OOD statistics" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_info_shows_the_provenance(chain, cli):
    r = cli(f"info {chain['dir']/'tuned.st'}")
    assert r.exit_code == 0, r.stderr
    for s in ("provenance", "trained on", "SYNTHETIC", "thresholds", "OOD statistics", "calibration"):
        assert s in r.stdout, s
