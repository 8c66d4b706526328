"""The whole chain through the real CLI, on phantoms and tiny models loaded from local folders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mavl_cli.io.mavlfile import loads, read_file
from mavl_cli.synthetic.phantoms import FINDINGS


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom mavl_cli.cli.app import app\n"
        "r = CliRunner().invoke(app, ['--help'])\nprint(r.stdout)\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n"
        "print('NUMPY_LOADED' if 'numpy' in sys.modules else 'NO_NUMPY')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for cmd in ("embed-images", "train-lrf", "embed-text", "fuse", "tune-threshold", "evaluate", "predict", "demo"):
        assert cmd in out
    assert "NO_TORCH" in out
    assert "NO_NUMPY" in out  # numpy alone costs ~0.1 s of a 0.2 s --help


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "mavl_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "mavl" in r.stdout


def test_chain_files_follow_the_contract(chain):
    d = chain["dir"]
    img = read_file(d / "train.st", expect="image-embeddings")
    assert img.tensors["features"].shape == (len(img.ids()), 48)
    assert img.meta["backbone"] == "vit_tiny_patch16_224" and img.meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert img.meta["mavl_format"] == "1" and "embed-images" in img.meta["command"]
    lrf = read_file(d / "lrf.st", expect="lrf-head")
    assert lrf.tensors["proj.weight"].shape == (16, 48)
    assert lrf.labels() == list(FINDINGS) and lrf.meta["rank"] == 16 and lrf.meta["keep"] == 4
    text = read_file(d / "text.st", expect="text-embeddings")
    assert text.tensors["embeddings"].shape[:2] == (6, 1) and text.meta["pooling"] == "mean"
    model = read_file(d / "tuned.st", expect="model")
    assert model.labels() == list(FINDINGS)
    assert any(k.startswith("lrf.") for k in model.tensors) and any(k.startswith("fusion.") for k in model.tensors)
    assert model.meta["threshold"]["method"] == "sweep"
    assert model.meta["threshold"]["tuned_on"]["images"] == len(read_file(d / "val.st").ids())
    th = model.tensors["thresholds"]
    assert np.all((th >= 0.1 - 1e-6) & (th <= 0.9 + 1e-6))


def test_evaluate_json_matches_sklearn(chain, cli):
    from sklearn.metrics import (
        f1_score,
        hamming_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    from mavl_cli.datasets.reader import read_labels
    from mavl_cli.models.modelfile import load_model

    d, ph = chain["dir"], chain["phantoms"]
    r = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {ph.splits['test']} --json --uncertain zeros")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    model = load_model(d / "tuned.st")
    emb = read_file(d / "test.st")
    scores = model.score(model.to_fusion_input(emb))
    y = read_labels(ph.splits["test"], uncertain="zeros").select(list(FINDINGS)).align(emb.ids()).y
    pred = (scores >= model.thresholds).astype(int)
    assert rep["overall"]["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert rep["overall"]["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert rep["overall"]["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    for j, lab in enumerate(rep["labels"]):
        assert lab["name"] == FINDINGS[j]
        assert lab["precision"] == pytest.approx(precision_score(y[:, j], pred[:, j], zero_division=0))
        assert lab["recall"] == pytest.approx(recall_score(y[:, j], pred[:, j], zero_division=0))
        if 0 < y[:, j].sum() < len(y):
            assert lab["auroc"] == pytest.approx(roc_auc_score(y[:, j], scores[:, j]))
        else:
            assert lab["auroc"] is None


def test_evaluate_table_and_untuned_warning(chain, cli):
    d, ph = chain["dir"], chain["phantoms"]
    r = cli(f"evaluate {d/'model.st'} {d/'test.st'} --labels {ph.splits['test']}")
    assert r.exit_code == 0
    assert "Per-label metrics" in r.stdout and "macro F1" in r.stdout and "AUROC" in r.stdout
    assert "untuned" in r.stderr


def test_evaluate_warns_when_tuned_on_the_evaluated_data(chain, cli):
    d, ph = chain["dir"], chain["phantoms"]
    r = cli(f"evaluate {d/'tuned.st'} {d/'val.st'} --labels {ph.splits['val']}")
    assert r.exit_code == 0
    assert "tuned on this very data" in r.stderr
    r2 = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {ph.splits['test']}")
    assert "tuned on this very data" not in r2.stderr


def test_label_column_order_changes_nothing(chain, cli, tmp_path):
    """Labels are matched by name: a CSV with shuffled columns trains the identical model."""
    import pandas as pd

    d, ph = chain["dir"], chain["phantoms"]
    df = pd.read_csv(ph.splits["train"], dtype=str, keep_default_na=False)
    cols = ["Path", "Patient", *reversed(FINDINGS)]
    shuffled = tmp_path / "train_shuffled.csv"
    df[cols].sample(frac=1.0, random_state=3).to_csv(shuffled, index=False)
    for name, csv in (("a", ph.splits["train"]), ("b", shuffled)):
        r = cli(f"fuse {d/'train.st'} {d/'text.st'} --lrf {d/'lrf.st'} --labels {csv} --epochs 2 -o {tmp_path/name}.st")
        assert r.exit_code == 0, r.stderr
    a, b = read_file(tmp_path / "a.st"), read_file(tmp_path / "b.st")
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k])


def test_text_labels_missing_from_csv_are_named(chain, cli, tiny_bert, tmp_path):
    d, ph = chain["dir"], chain["phantoms"]
    (tmp_path / "labels.txt").write_text("Cardiomegaly\nHernia\n")
    r = cli(f"embed-text {tmp_path/'labels.txt'} --text-model {tiny_bert} -o {tmp_path/'t.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"fuse {d/'train.st'} {tmp_path/'t.st'} --labels {ph.splits['train']} --epochs 1 -o {tmp_path/'m.st'}")
    assert r.exit_code == 2
    assert "Hernia" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.st").exists()


def test_predict_table_json_and_scores_file(chain, cli, tmp_path):
    d, ph = chain["dir"], chain["phantoms"]
    img = ph.root / "images" / sorted(p.name for p in (ph.root / "images").iterdir())[0]
    r = cli(f"predict {img} --model {d/'tuned.st'}")
    assert r.exit_code == 0, r.stderr
    assert "finding" in r.stdout and "POSITIVE" in r.stdout or "negative" in r.stdout
    r = cli(f"predict {img.parent} --model {d/'tuned.st'} --json --out {tmp_path/'scores.st'}")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)["images"]
    assert len(out) == ph.n_images
    f0 = out[0]["findings"]
    assert [f["label"] for f in f0] == list(FINDINGS)
    assert all(0.0 <= f["probability"] <= 1.0 and f["positive"] == (f["probability"] >= f["threshold"]) for f in f0)
    sc = read_file(tmp_path / "scores.st", expect="scores")
    assert sc.tensors["scores"].shape == (ph.n_images, 6)
    # a scores file evaluates like the model it came from
    r = cli(f"evaluate --scores {tmp_path/'scores.st'} --labels {ph.labels_csv} --json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_images"] == ph.n_images


def test_predict_finds_default_model_or_says_how(chain, cli, tmp_path, monkeypatch):
    d, ph = chain["dir"], chain["phantoms"]
    img = next((ph.root / "images").iterdir())
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAVL_MODEL", raising=False)
    r = cli(f"predict {img}")
    assert r.exit_code == 2
    assert "mavl demo" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli(f"predict {img}", env={"MAVL_MODEL": str(d / "tuned.st")})
    assert r.exit_code == 0, r.stderr


def test_pipe_text_embeddings_through_stdout(chain, cli, tiny_bert, tmp_path):
    d, ph = chain["dir"], chain["phantoms"]
    r = cli(f"embed-text {d/'labels.txt'} --text-model {tiny_bert} -o -")
    assert r.exit_code == 0
    assert r.stdout_bytes[:8] and "embed-text" in r.stderr  # the table went to stderr
    f = loads(r.stdout_bytes, "-", expect="text-embeddings")
    assert f.labels() == list(FINDINGS)
    r2 = cli(f"fuse {d/'train.st'} - --labels {ph.splits['train']} --epochs 1 -o {tmp_path/'m.st'}", input=r.stdout_bytes)
    assert r2.exit_code == 0, r2.stderr
    assert read_file(tmp_path / "m.st").kind == "model"


def test_embed_images_lrf_space_feeds_fuse(chain, cli, tiny_vit, tmp_path):
    d, ph = chain["dir"], chain["phantoms"]
    out = tmp_path / "train_lrf.st"
    r = cli(f"embed-images {ph.root} --labels {ph.splits['train']} --backbone vit_tiny_patch16_224 --weights {tiny_vit} --lrf {d/'lrf.st'} -o {out}")
    assert r.exit_code == 0, r.stderr
    z = read_file(out)
    assert z.meta["space"] == "lrf" and z.tensors["features"].shape[1] == 16
    # the same as projecting cached features with the head
    from mavl_cli.models.lrf import lrf_embed

    ref = lrf_embed(read_file(d / "lrf.st").tensors, read_file(d / "train.st").tensors["features"])
    np.testing.assert_allclose(z.tensors["features"], ref, rtol=1e-4, atol=1e-5)
    r = cli(f"fuse {out} {d/'text.st'} --lrf {d/'lrf.st'} --labels {ph.splits['train']} --epochs 1 -o {tmp_path/'m.st'}")
    assert r.exit_code == 0, r.stderr


def test_tune_methods_write_thresholds(chain, cli, tmp_path):
    d, ph = chain["dir"], chain["phantoms"]
    for extra in ("--per-label", "--method youden", "--min-sensitivity 0.9"):
        r = cli(f"tune-threshold {d/'model.st'} {d/'val.st'} --labels {ph.splits['val']} {extra} -o {tmp_path/'t.st'}")
        assert r.exit_code == 0, r.stderr
        m = read_file(tmp_path / "t.st")
        assert m.meta["threshold"]["method"] in ("per-label", "youden", "sensitivity")


def test_info_shows_kind(chain, cli):
    r = cli(f"info {chain['dir']/'tuned.st'}")
    assert r.exit_code == 0 and "model" in r.stdout and "thresholds" in r.stdout


def test_fuse_set_default_installs_the_same_bytes(chain, cli, tmp_path, monkeypatch):
    d, ph = chain["dir"], chain["phantoms"]
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    r = cli(f"fuse {d/'train.st'} {d/'text.st'} --lrf {d/'lrf.st'} --labels {ph.splits['train']} --epochs 1 --set-default -o {tmp_path/'m.st'}")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "home" / "model.safetensors").read_bytes() == (tmp_path / "m.st").read_bytes()
