"""MavlModel and the Python API: one model object, the same figures as the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from mavl_cli.io.mavlfile import MavlFile, read_file


def _test_images(chain, k=5):
    ph = chain["phantoms"]
    import csv

    with open(ph.splits["test"]) as fh:
        rows = list(csv.DictReader(fh))[:k]
    return [ph.root / r["Path"] for r in rows]


def test_mavlmodel_on_images_equals_embed_then_score(chain):
    """The whole nn.Module on images gives the probabilities of embed-images -> score on the file."""
    import mavl_cli as mavl
    from mavl_cli.datasets.inputs import collect_inputs
    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.models.embed import embed_images
    from mavl_cli.models.modelfile import load_model

    model_path = chain["dir"] / "tuned.st"
    paths = _test_images(chain)
    loaded = load_model(model_path)
    items, _ = collect_inputs([str(p) for p in paths])
    meta = loaded.meta
    res = embed_images(items, EncoderSpec.parse(meta["backbone"], meta["backbone_weights"], options=meta.get("backbone_args") or {}))
    emb = MavlFile("image-embeddings", {"features": res.features}, {"ids": res.ids, "space": "backbone"}, "x")
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
    from mavl_cli.io.imageio import load_radiograph

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
    assert m.labels == read_file(model_path).labels()
    np.testing.assert_array_equal(m.thresholds, read_file(model_path).tensors["thresholds"])
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
    from mavl_cli.core.errors import MavlError

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
    want = read_file(d / "tuned.st").tensors["thresholds"]
    np.testing.assert_allclose(read_file(tmp_path / "t.st").tensors["thresholds"], want, atol=1e-6)


def test_s3_a_pil_image_scores_as_its_file_does(chain, tmp_path):
    """`m.probabilities(PIL image)` went straight to the encoder's resize: a 16-bit image was clipped to white, an
    RGBA one lost its alpha over white instead of black. It now decodes like the file (`as_radiograph`)."""
    from PIL import Image

    import mavl_cli as mavl

    m = mavl.load(chain["dir"] / "tuned.st")
    gray = np.asarray(Image.open(_test_images(chain, 1)[0]).convert("L"))
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:, : gray.shape[1] // 3] = 0
    files = {"sixteen.png": Image.fromarray(gray.astype(np.uint16) * 200 + 900),
             "rgba.png": Image.fromarray(np.dstack([gray, gray, gray, alpha]), "RGBA"),
             "palette.png": Image.fromarray(gray).convert("P")}
    for name, im in files.items():
        im.save(tmp_path / name)
        from_file = m.probabilities(str(tmp_path / name))
        with Image.open(tmp_path / name) as opened:
            opened.load()
            in_memory = opened.copy()  # no filename: the in-memory path
        np.testing.assert_allclose(m.probabilities(in_memory), from_file, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("bad,expect", [(np.zeros((8, 8), np.uint8), "got ndarray"), (None, "got NoneType"),
                                        ("", "is empty"), ("IMAGE0x0", "empty (0x0")])
def test_s3_api_misuse_is_one_clear_error(chain, bad, expect):
    """Arrays, None, an empty path (which meant "walk the whole working folder") and a 0x0 image: a MavlError
    that says what was expected, not an AttributeError or ZeroDivisionError from deep inside."""
    from PIL import Image

    import mavl_cli as mavl
    from mavl_cli.core.errors import MavlError

    m = mavl.load(chain["dir"] / "tuned.st")
    arg = Image.new("L", (0, 0)) if isinstance(bad, str) and bad == "IMAGE0x0" else bad
    with pytest.raises(MavlError, match=re.escape(expect)):
        m.predict(arg)
    with pytest.raises(MavlError, match="batch size"):
        m.predict(_test_images(chain, 1), batch_size=-3)
