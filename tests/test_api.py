"""MavlModel and the Python API: one model object, the same figures as the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mavl_cli import contract


def _test_images(chain, k=5):
    ph = chain["phantoms"]
    import csv

    with open(ph.splits["test"]) as fh:
        rows = list(csv.DictReader(fh))[:k]
    return [ph.root / r["Path"] for r in rows]


def test_mavlmodel_on_images_equals_embed_then_score(chain):
    """The whole nn.Module on images gives the probabilities of embed-images -> score on the file."""
    import mavl_cli as mavl
    from mavl_cli.datasets import collect_inputs
    from mavl_cli.embed import embed_images
    from mavl_cli.modelfile import load_model

    model_path = chain["dir"] / "tuned.st"
    paths = _test_images(chain)
    loaded = load_model(model_path)
    items, _ = collect_inputs([str(p) for p in paths])
    meta = loaded.meta
    res = embed_images(items, meta["backbone"], weights=meta["backbone_weights"], model_args=meta.get("backbone_args") or {})
    emb = contract.MavlFile("image-embeddings", {"features": res.features}, {"ids": res.ids, "space": "backbone"}, "x")
    want = loaded.score(loaded.to_fusion_input(emb))

    m = mavl.load(model_path)
    got = m.probabilities(paths)
    assert got.shape == want.shape == (len(paths), len(m.labels))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # the module itself: preprocess -> forward -> sigmoid
    import torch

    x = torch.stack([m.preprocess(p) for p in paths])
    with torch.no_grad():
        direct = torch.sigmoid(m.module(x)).numpy()
    np.testing.assert_allclose(direct, want, rtol=0, atol=2e-6)
    # PIL input goes through the same recipe
    from mavl_cli.imageio import load_radiograph

    pil = load_radiograph(paths[0])
    np.testing.assert_allclose(m.probabilities([pil])[0], want[0], rtol=0, atol=2e-6)


def test_api_predict_equals_cli_predict_json(chain, cli):
    import mavl_cli as mavl

    model_path = chain["dir"] / "tuned.st"
    paths = _test_images(chain, 3)
    r = cli(["predict", *map(str, paths), "--model", str(model_path), "--json"])
    assert r.exit_code == 0, r.stderr
    want = json.loads(r.stdout)["images"]
    m = mavl.load(model_path)
    got = m.predict(paths)
    assert got == want
    assert m.labels == contract.read_file(model_path).labels()
    np.testing.assert_array_equal(m.thresholds, contract.read_file(model_path).tensors["thresholds"])
    assert m.module.thresholds.shape == (len(m.labels),)  # a buffer of the nn.Module
    assert "thresholds" in dict(m.module.named_buffers())
    assert any(k.startswith("head.text") for k, _ in m.module.named_buffers())


def test_predict_explain_and_descriptions_still_work(chain, cli, tmp_path):
    model_path = chain["dir"] / "tuned.st"
    img = _test_images(chain, 1)[0]
    extra = tmp_path / "extra.txt"
    extra.write_text("Pneumonia\n")
    r = cli(["predict", str(img), "--model", str(model_path), "--json", "--descriptions", str(extra)])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)["images"][0]
    assert [f["label"] for f in doc["findings"]][-1] == "Pneumonia" and doc["findings"][-1]["zero_shot"]
    r = cli(["predict", str(img), "--model", str(model_path), "--explain"])
    assert r.exit_code == 0, r.stderr


def test_import_mavl_cli_is_light():
    code = "import sys, mavl_cli; assert callable(mavl_cli.load); print(sorted(m for m in ('torch', 'timm', 'transformers', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_errors_are_one_line(tmp_path):
    import mavl_cli as mavl
    from mavl_cli.errors import MavlError

    with pytest.raises(MavlError, match="not found|No such"):
        mavl.load(tmp_path / "missing.safetensors")


def test_evaluate_and_tune_from_an_image_folder_equal_the_embeddings_path(chain, cli, tmp_path):
    """EMBEDDINGS may be the image folder: scored through the whole model, same report as from the file."""
    d, ph = chain["dir"], chain["phantoms"]
    base = ["evaluate", str(d / "tuned.st")]
    r1 = cli([*base, str(d / "test.st"), "--labels", str(ph.splits["test"]), "--json"])
    r2 = cli([*base, str(ph.root), "--labels", str(ph.splits["test"]), "--json"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.stderr + r2.stderr
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert a["n_images"] == b["n_images"] > 0
    for la, lb in zip(a["labels"], b["labels"]):
        assert la["name"] == lb["name"]
        for k in ("auroc", "f1", "precision", "recall"):
            assert la[k] == pytest.approx(lb[k], abs=1e-6) or (la[k] is None and lb[k] is None)
    r = cli(["tune-threshold", str(d / "model.st"), str(ph.root), "--labels", str(ph.splits["val"]), "-o", str(tmp_path / "t.st")])
    assert r.exit_code == 0, r.stderr
    want = contract.read_file(d / "tuned.st").tensors["thresholds"]
    np.testing.assert_allclose(contract.read_file(tmp_path / "t.st").tensors["thresholds"], want, atol=1e-6)
