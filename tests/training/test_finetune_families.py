"""finetune-lrf for every encoder family (hf, open_clip, xrv) on the tiny models in each family's own format.

Fine-tuning trains the registry's encoder module (the family's own preprocessing, mavl's laterality-safe
augmentation) with the LRF head; the fine-tuned weights are written as the state dict the family's loader
takes with ``--weights``, and the chain embed-images -> fuse -> predict rebuilds the encoder from the model
file: its probabilities must equal the in-memory fine-tuned encoder's.
"""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from mavl_cli.synthetic.phantoms import FINDINGS


@pytest.fixture(scope="module")
def family_specs(tmp_path_factory, tiny_bert):
    """(EncoderSpec, text model for embed-text) per family: a tiny random model saved by the family's library."""
    from tests.encoder_files import XRV_TINY_OPTIONS, write_tiny_family_models

    from mavl_cli.encoders.spec import EncoderSpec

    m = write_tiny_family_models(tmp_path_factory.mktemp("ft_family_models"))
    return {
        "hf": (EncoderSpec.parse(f"hf:{m['hf']}"), str(tiny_bert)),
        "open_clip": (EncoderSpec.parse(f"open_clip:{m['open_clip']}"), f"open_clip:{m['open_clip']}"),
        "xrv": (EncoderSpec.parse("xrv:densenet121-res224-all", m["xrv"], options=dict(XRV_TINY_OPTIONS)), str(tiny_bert)),
    }


@pytest.mark.parametrize("family", ["hf", "open_clip", "xrv"])
def test_finetune_family_then_predict_equals_the_in_memory_model(family, family_specs, phantom_set, cli, tmp_path,
                                                                 monkeypatch):
    from mavl_cli.core.options import FinetuneOptions, RunOptions
    from mavl_cli.encoders import build_image_encoder
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.mavlmodel import score_images
    from mavl_cli.models.modelfile import load_model
    from mavl_cli.stages.finetune import labelled_items
    from mavl_cli.training.finetune import (
        cli_encoder_args,
        finetune_lrf,
        save_finetuned,
    )
    from mavl_cli.training.train import LRFConfig

    spec, text_model = family_specs[family]
    root, sp = phantom_set.root, phantom_set.splits
    items, table = labelled_items(str(root), str(sp["train"]), list(FINDINGS))
    res = finetune_lrf(items, table.y, table.mask, table.names, spec, LRFConfig(rank=4, keep=2, epochs=1, lr=1e-2),
                       groups=table.groups, val_split=0, tune=FinetuneOptions(backbone_lr=1e-2),
                       run=RunOptions(device="cpu", batch_size=8, workers=0))
    assert res.encoder is not None and res.encoder.spec.family == family and res.epochs_run == 1
    # the encoder's own weights changed (most trainable tensors), through its family's module
    start = dict(build_image_encoder(spec).named_parameters())
    tuned = dict(res.encoder.named_parameters())
    assert set(start) == set(tuned)
    changed = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert len(changed) > len(start) // 2, f"{len(changed)} of {len(start)} tensors changed"
    assert all(torch.equal(tuned[k], res.backbone_state[k]) for k in tuned)

    lrf, bb = tmp_path / "lrf.st", tmp_path / "bb"
    ft = save_finetuned(res, str(lrf), bb, {"uncertain": "zeros"})
    assert sorted(p.name for p in bb.iterdir()) == ["model.safetensors"]
    head = read_file(lrf, expect="lrf-head")
    assert head.meta["finetuned"] is True and head.meta["encoder"]["family"] == family
    assert head.meta["backbone_weights"] == str(bb / "model.safetensors") == ft.weights
    assert head.meta["preprocessing"] == res.encoder.preprocessing

    d = tmp_path
    (d / "labels.txt").write_text("\n".join(FINDINGS) + "\n")
    steps = [
        ["embed-images", root, "--labels", sp["train"], *shlex.split(cli_encoder_args(ft)), "-o", d / "train.st"],
        ["embed-text", d / "labels.txt", "--text-model", text_model, "-o", d / "text.st"],
        ["fuse", d / "train.st", d / "text.st", "--lrf", lrf, "--labels", sp["train"], "--epochs", "2", "--dim", "16",
         "-o", d / "model.st"],
    ]
    for cmd in steps:
        r = cli([str(c) for c in cmd])
        assert r.exit_code == 0, f"{cmd[0]} failed: {r.stderr}"
    # the model file carries the fine-tuned weights: predict needs no --backbone-out folder any more
    m = read_file(d / "model.st", expect="model")
    carried = {k[len("encoder."):] for k in m.tensors if k.startswith("encoder.")}
    from safetensors.numpy import load_file

    on_disk = load_file(str(bb / "model.safetensors"))
    assert carried == set(on_disk)  # the same values (the file format keeps a scalar as shape [1])
    assert all(np.array_equal(np.ravel(m.tensors["encoder." + k]), np.ravel(v)) for k, v in on_disk.items())
    assert m.meta["encoder_weights"]["embedded"] is True
    r = cli(["info", str(d / "model.st")])
    assert r.exit_code == 0 and f"{len(on_disk)} tensors" in r.stdout and "tensor encoder." not in r.stdout
    import shutil

    shutil.rmtree(bb)
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))  # where predict caches the carried weights as a file
    few = items[:4]
    r = cli(["predict", *[str(it.path) for it in few], "--model", str(d / "model.st"), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    got = np.array([[f["probability"] for f in item["findings"]] for item in json.loads(r.stdout)["images"]])

    # the in-memory model: the model file's heads on the fine-tuned encoder object finetune_lrf returned
    module = load_model(d / "model.st").module()
    module.encoder = res.encoder
    want = score_images(module, few, device="cpu").probabilities
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert json.loads(r.stdout)["model"]["image_encoder"]["weights"].startswith("in the model file, fine-tuned")
    module.encoder = build_image_encoder(spec)  # the encoder before fine-tuning scores otherwise: the match is the weights'
    before = score_images(module, few, device="cpu").probabilities
    assert np.abs(before - got).max() > 1e-4
    # and the features embed-images wrote are the in-memory encoder's (same preprocessing, same weights)
    emb = read_file(d / "train.st")
    assert emb.meta["encoder"]["family"] == family and emb.meta["backbone_weights"] == ft.weights


def test_finetune_command_takes_a_family_spec(family_specs, phantom_set, cli, tmp_path):
    """`mavl finetune-lrf --backbone hf:FOLDER`: the command path, its notes name the options that rebuild it."""
    spec, _ = family_specs["hf"]
    ph, bb = phantom_set, tmp_path / "bb"
    r = cli(f"finetune-lrf {ph.root} --labels {ph.splits['train']} --backbone {spec.name} --backbone-out {bb} "
            f"--rank 4 --keep 2 --epochs 1 --batch-size 8 --val-split 0 --device cpu -o {tmp_path / 'lrf.st'}")
    assert r.exit_code == 0, r.stderr
    assert (bb / "model.safetensors").exists()
    assert f"--backbone {spec.name} --weights {bb / 'model.safetensors'}" in " ".join(r.stderr.split() + r.stdout.split())
