"""Every encoder family end to end through the CLI: embed-images -> train-lrf -> embed-text -> fuse ->
tune-threshold -> evaluate -> predict, on phantoms, with tiny models in each family's own on-disk format.

The model file records the encoder spec and its preprocessing; ``predict`` rebuilds the encoder from
it alone, so its probabilities must equal those computed from the embeddings ``embed-images`` wrote.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mavl_cli.phantoms import FINDINGS


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_bert):
    """One tiny model per non-timm family, saved as that family's library saves it."""
    import torch

    root = tmp_path_factory.mktemp("family_models")
    out = {}
    import transformers as T

    torch.manual_seed(0)
    dino = root / "tiny-dinov2"
    T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=28, patch_size=7)).save_pretrained(dino)
    T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    out["hf"] = ["--backbone", f"hf:{dino}"], str(tiny_bert)

    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    clip_dir = root / "tiny-clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
    out["open_clip"] = ["--backbone", f"open_clip:{clip_dir}"], f"open_clip:{clip_dir}"  # its own aligned text tower

    import torchxrayvision as xrv

    opts = {"growth_rate": 8, "block_config": [1, 1], "num_init_features": 8}
    torch.save(xrv.models.DenseNet(num_classes=18, growth_rate=8, block_config=(1, 1), num_init_features=8).state_dict(),
               root / "densenet.pt")
    out["xrv"] = (["--backbone", "xrv:densenet121-res224-all", "--weights", str(root / "densenet.pt"),
                   "--model-args", json.dumps(opts)], str(tiny_bert))
    return out


@pytest.mark.parametrize("family", ["hf", "open_clip", "xrv"])
def test_family_end_to_end(cli, family, family_models, phantom_set, tmp_path):
    from mavl_cli import contract

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

    emb = contract.read_file(d / "test.st")
    assert emb.meta["encoder"]["family"] == family and emb.meta["preprocessing"]["kind"] == family
    model = contract.read_file(d / "tuned.st")
    assert model.meta["encoder"] == emb.meta["encoder"] and model.meta["preprocessing"] == emb.meta["preprocessing"]

    # predict rebuilds the encoder from the model file alone: same probabilities as from the embeddings
    from mavl_cli.modelfile import load_model

    ids = emb.meta["ids"][:3]
    r = cli(["predict", *[str(root / i) for i in ids], "--model", str(d / "tuned.st"), "--json"])
    assert r.exit_code == 0, r.stderr
    got = np.array([[f["probability"] for f in item["findings"]] for item in json.loads(r.stdout)["images"]])
    loaded = load_model(d / "tuned.st")
    want = loaded.score(loaded.to_fusion_input(emb))[:3]
    np.testing.assert_allclose(got, want, atol=1e-5)
