"""Every encoder family end to end through the CLI: embed-images -> train-lrf -> embed-text -> fuse ->
tune-threshold -> evaluate -> predict, on phantoms, with tiny models in each family's own on-disk format.

The model file records the encoder spec and its preprocessing; ``predict`` rebuilds the encoder from
it alone, so its probabilities must equal those computed from the embeddings ``embed-images`` wrote.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mavl_cli.synthetic.phantoms import FINDINGS


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_bert):
    """One tiny model per non-timm family, saved as that family's library saves it."""
    from tests.encoder_files import XRV_TINY_OPTIONS, write_tiny_family_models

    m = write_tiny_family_models(tmp_path_factory.mktemp("family_models"))
    return {
        "hf": (["--backbone", f"hf:{m['hf']}"], str(tiny_bert)),
        "open_clip": (["--backbone", f"open_clip:{m['open_clip']}"], f"open_clip:{m['open_clip']}"),  # its aligned text tower
        "xrv": (["--backbone", "xrv:densenet121-res224-all", "--weights", str(m["xrv"]),
                 "--model-args", json.dumps(XRV_TINY_OPTIONS)], str(tiny_bert)),
    }


@pytest.mark.parametrize("family", ["hf", "open_clip", "xrv"])
def test_family_end_to_end(cli, family, family_models, phantom_set, tmp_path):
    from mavl_cli.io.mavlfile import read_file

    backbone, text_model = family_models[family]
    root, sp, d = phantom_set.root, phantom_set.splits, tmp_path
    only = ",".join(FINDINGS)
    steps = [
        ["embed-images", root, "--labels", sp["train"], *backbone, "-o", d / "train.st"],
        ["embed-images", root, "--labels", sp["val"], *backbone, "-o", d / "val.st"],
        ["embed-images", root, "--labels", sp["test"], *backbone, "-o", d / "test.st"],
        ["train-lrf", d / "train.st", "--labels", sp["train"], "--only", only, "--rank", "8", "--keep", "4", "--epochs", "3",
         "--val", d / "val.st", "--val-labels", sp["val"], "-o", d / "lrf.st"],
        ["embed-text", d / "labels.txt", "--text-model", text_model, "-o", d / "text.st"],
        ["fuse", d / "train.st", d / "text.st", "--lrf", d / "lrf.st", "--labels", sp["train"], "--epochs", "3",
         "--dim", "16", "-o", d / "model.st"],
        ["tune-threshold", d / "model.st", d / "val.st", "--labels", sp["val"], "-o", d / "tuned.st"],
        ["evaluate", d / "tuned.st", d / "test.st", "--labels", sp["test"], "--json"],
    ]
    (d / "labels.txt").write_text("\n".join(FINDINGS) + "\n")
    for cmd in steps:
        r = cli([str(c) for c in cmd])
        assert r.exit_code == 0, f"{cmd[0]} failed: {r.stderr}"
    report = json.loads(r.stdout)
    assert len(report["labels"]) == len(FINDINGS) and "macro_auroc" in report["overall"]

    emb = read_file(d / "test.st")
    assert emb.meta["encoder"]["family"] == family and emb.meta["preprocessing"]["kind"] == family
    model = read_file(d / "tuned.st")
    assert model.meta["encoder"] == emb.meta["encoder"] and model.meta["preprocessing"] == emb.meta["preprocessing"]

    # predict rebuilds the encoder from the model file alone: same probabilities as from the embeddings
    from mavl_cli.models.modelfile import load_model

    ids = emb.meta["ids"][:3]
    r = cli(["predict", *[str(root / i) for i in ids], "--model", str(d / "tuned.st"), "--json"])
    assert r.exit_code == 0, r.stderr
    got = np.array([[f["probability"] for f in item["findings"]] for item in json.loads(r.stdout)["images"]])
    loaded = load_model(d / "tuned.st")
    want = loaded.score(loaded.to_fusion_input(emb))[:3]
    np.testing.assert_allclose(got, want, atol=1e-5)
