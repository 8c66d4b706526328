"""End-to-end fine-tuning (backbone + LRF head) on phantoms with the tiny ViT, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mavl_cli.core.errors import MavlError

BACKBONE = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def data(phantom_set):
    from mavl_cli.stages.finetune import labelled_items

    items, table = labelled_items(str(phantom_set.root), str(phantom_set.splits["train"]))
    v_items, v_table = labelled_items(str(phantom_set.root), str(phantom_set.splits["val"]), table.names)
    return items, table, (v_items, v_table.y, v_table.mask)


def _config(**kw):
    from mavl_cli.training.train import LRFConfig

    return LRFConfig(**{"rank": 16, "keep": 4, "epochs": 2, "lr": 1e-2, **kw})


def _spec(tiny_vit):
    from mavl_cli.encoders.spec import EncoderSpec

    return EncoderSpec.parse(BACKBONE, str(tiny_vit))


def _opts(backbone_lr=1e-5, **run):
    from mavl_cli.core.options import FinetuneOptions, RunOptions

    return {"tune": FinetuneOptions(backbone_lr=backbone_lr), "run": RunOptions(**{"device": "cpu", "batch_size": 8, "workers": 1, **run})}


def _run(data, tiny_vit, backbone_lr=1e-5, precision="fp32", **kw):
    from mavl_cli.training.finetune import finetune_lrf

    items, table, val = data
    config = kw.pop("config", None) or _config()
    kw.setdefault("val", val)
    return finetune_lrf(items, table.y, table.mask, table.names, _spec(tiny_vit), config, groups=table.groups,
                        **_opts(backbone_lr, precision=precision), **kw)


@pytest.fixture(scope="module")
def trained(data, tiny_vit):
    return _run(data, tiny_vit, backbone_lr=1e-3)


def _initial_head(tiny_vit, n_labels: int):
    """The head finetune_lrf starts from: same seed, same RNG use before it (building the backbone)."""
    from mavl_cli.core.runtime import set_seed
    from mavl_cli.encoders.timm import create_backbone
    from mavl_cli.models.lrf import LRFHead

    set_seed(0)
    _, info = create_backbone(BACKBONE, str(tiny_vit))
    return LRFHead(info.dim, 16, n_labels, 0.1).state_dict()


def test_two_epochs_change_backbone_and_head(trained, data, tiny_vit):
    import torch

    from mavl_cli.encoders.common import load_state_dict
    from mavl_cli.models.lrf import LRFHead

    start = load_state_dict(tiny_vit / "model.safetensors")  # the fixture keeps its 1000-class head
    assert set(trained.backbone_state) == {k for k in start if not k.startswith("head.")}
    start = {k: start[k] for k in trained.backbone_state}
    changed = [k for k in start if not torch.equal(start[k], trained.backbone_state[k])]
    assert len(changed) > len(start) // 2
    assert set(trained.head_state) == set(LRFHead(48, 16, 6).state_dict())
    init = _initial_head(tiny_vit, len(data[1].names))
    assert not torch.equal(init["proj.weight"], trained.head_state["proj.weight"])
    assert trained.epochs_run == 2 and trained.best_epoch in (1, 2)
    assert [r["epoch"] for r in trained.history] == [1, 2]
    assert all(np.isfinite(r["bce"]) and 0 <= r["val_auroc"] <= 1 for r in trained.history)
    assert trained.val_auroc == trained.history[trained.best_epoch - 1]["val_auroc"]
    assert trained.info.name == BACKBONE and trained.info.dim == 48


def test_backbone_lr_zero_freezes_the_backbone(data, tiny_vit):
    import torch

    from mavl_cli.encoders.common import load_state_dict

    res = _run(data, tiny_vit, backbone_lr=0.0, config=_config(epochs=1))
    start = load_state_dict(tiny_vit / "model.safetensors")
    assert all(torch.equal(start[k], res.backbone_state[k]) for k in res.backbone_state)


def test_same_seed_same_weights_other_seed_differs(data, tiny_vit):
    import torch

    a = _run(data, tiny_vit, backbone_lr=1e-3, config=_config(epochs=1))
    b = _run(data, tiny_vit, backbone_lr=1e-3, config=_config(epochs=1))
    c = _run(data, tiny_vit, backbone_lr=1e-3, config=_config(epochs=1, seed=3))
    for k in a.backbone_state:
        assert torch.equal(a.backbone_state[k], b.backbone_state[k]), k
    for k in a.head_state:
        assert torch.equal(a.head_state[k], b.head_state[k]), k
    assert a.history == b.history
    assert not torch.equal(a.head_state["proj.weight"], c.head_state["proj.weight"])


def test_eta_changes_the_loss_history(data, tiny_vit):
    off = _run(data, tiny_vit, backbone_lr=1e-3, config=_config(eta=0.0))
    on = _run(data, tiny_vit, backbone_lr=1e-3, config=_config(eta=0.5))
    assert all(r["tnn"] == 0.0 for r in off.history)
    # The penalty is active from the first epoch and shrinks the tail; it may reach exactly 0 once the
    # tail's ReLU units are switched off (see docs/results/lrfl.md), so only the start is > 0.
    assert on.history[0]["tnn"] > 0.0
    assert on.history[-1]["tnn"] <= on.history[0]["tnn"]
    assert [r["bce"] for r in off.history] != [r["bce"] for r in on.history]


def test_val_split_by_patient_and_no_validation(data, tiny_vit):
    res = _run(data, tiny_vit, val=None, val_split=0.3, config=_config(epochs=1))
    assert "by patient" in res.validation and res.images < len(data[0])
    res = _run(data, tiny_vit, val=None, val_split=0.0, config=_config(epochs=1))
    assert res.validation == "none" and res.images == len(data[0]) and np.isnan(res.val_auroc)
    assert "val_auroc" not in res.history[0]


def test_saved_backbone_and_head_work_through_the_chain(trained, data, phantom_set, tiny_vit, tiny_bert, cli, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))  # predict caches the weights the model file carries
    import torch

    from mavl_cli.encoders.timm import create_backbone
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.synthetic.phantoms import FINDINGS
    from mavl_cli.training.finetune import save_finetuned

    lrf, folder = tmp_path / "lrf.st", tmp_path / "ft_vit"
    save_finetuned(trained, str(lrf), folder, {"uncertain": "zeros"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["architecture"] == BACKBONE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary folder cleaned up
    model, info = create_backbone(BACKBONE, str(folder))
    assert info.dim == 48 and info.model_args["img_size"] == 32
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained.backbone_state[k]), k

    head = read_file(lrf, expect="lrf-head")
    assert head.meta["finetuned"] is True and head.meta["backbone"] == BACKBONE
    assert head.meta["backbone_weights"] == str(folder) and head.meta["in_dim"] == 48
    assert head.meta["labels"] == list(data[1].names) and head.meta["rank"] == 16 and head.meta["keep"] == 4
    assert head.meta["preprocessing"] == trained.info.data_config
    for k in ("fingerprint", "backbone_args", "best_epoch", "val_auroc", "uncertain", "backbone_fingerprint"):
        assert k in head.meta, k
    from mavl_cli.models.carried import tensor_fingerprint

    assert head.meta["fingerprint"] == tensor_fingerprint(head.tensors)

    root, train_csv = phantom_set.root, phantom_set.splits["train"]
    emb = tmp_path / "train.st"
    r = cli(f"embed-images {root} --labels {train_csv} --backbone {BACKBONE} --weights {folder} -o {emb}")
    assert r.exit_code == 0, r.stderr
    e = read_file(emb, expect="image-embeddings")
    assert e.meta["backbone_weights"] == str(folder)
    # the fine-tuned backbone gives other features than the starting one
    r = cli(f"embed-images {root} --labels {train_csv} --backbone {BACKBONE} --weights {tiny_vit} -o {tmp_path / 'orig.st'}")
    assert r.exit_code == 0, r.stderr
    assert not np.allclose(e.tensors["features"], read_file(tmp_path / "orig.st").tensors["features"])

    (tmp_path / "labels.txt").write_text("\n".join(FINDINGS) + "\n")
    r = cli(f"embed-text {tmp_path / 'labels.txt'} --text-model {tiny_bert} -o {tmp_path / 'text.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"fuse {emb} {tmp_path / 'text.st'} --lrf {lrf} --labels {train_csv} --epochs 2 -o {tmp_path / 'model.st'}")
    assert r.exit_code == 0, r.stderr
    m = read_file(tmp_path / "model.st", expect="model")
    assert m.meta["backbone_weights"] == str(folder)
    assert m.meta["lrf"]["fingerprint"] == head.meta["fingerprint"]
    one = min((root / "images").glob("*.png"))
    r = cli(f"predict {one} --model {tmp_path / 'model.st'} --json --device cpu")
    assert r.exit_code == 0, r.stderr


def test_finetune_stage_from_label_csvs(phantom_set, tiny_vit, tmp_path):
    from mavl_cli.core.options import ImageList, LabelOptions, Validation
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.stages.finetune import finetune_stage

    out, folder = tmp_path / "lrf.st", tmp_path / "bb"
    images = ImageList(labels=str(phantom_set.splits["train"]), root=str(phantom_set.root))
    spec, kw = _spec(tiny_vit), _opts(workers=0)
    res = finetune_stage(images, str(out), str(folder), spec, _config(epochs=1), label_opts=LabelOptions(only=["Cardiomegaly", "Edema"]),
                         validation=Validation(labels=str(phantom_set.splits["val"])), **kw)
    head = read_file(out, expect="lrf-head")
    assert head.labels() == ["Cardiomegaly", "Edema"] and head.tensors["classifier.weight"].shape == (2, 16)
    assert res.summary["epochs_run"] == 1 and "validation images" in res.summary["validation"]
    assert (folder / "model.safetensors").exists() and any("--weights" in n for n in res.notes)
    # saving again over the same folder replaces it; a folder with foreign files is refused
    res = finetune_stage(images, str(out), str(folder), spec, _config(epochs=1), validation=Validation(split=0), **kw)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(MavlError, match="other files"):  # refused before any training
        finetune_stage(images, str(out), str(folder), spec, _config(epochs=1), validation=Validation(split=0), **kw,
                       progress=_no_progress)
    with pytest.raises(MavlError, match="folder, but a file"):
        finetune_stage(images, str(out), str(out), spec, progress=_no_progress)


def _no_progress(*a):
    raise AssertionError("training started before the outputs were checked")


def test_unreadable_images_stop_or_are_skipped(data, tiny_vit, tmp_path):
    from mavl_cli.datasets.inputs import ImageItem

    items, table, val = data
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items2 = [*items, ImageItem("broken.png", bad)]
    y = np.concatenate([table.y, table.y[:1]])
    m = np.concatenate([table.mask, table.mask[:1]])
    from mavl_cli.training.finetune import finetune_lrf

    with pytest.raises(MavlError, match="broken.png"):
        finetune_lrf(items2, y, m, table.names, _spec(tiny_vit), _config(epochs=1), val=val, **_opts(workers=0))
    res = finetune_lrf(items2, y, m, table.names, _spec(tiny_vit), _config(epochs=1), val=val, **_opts(workers=0, skip_bad=True))
    assert [s["id"] for s in res.skipped] == ["broken.png"]


def test_bad_settings_are_refused(data, tiny_vit):
    with pytest.raises(MavlError, match="needs a CUDA GPU"):
        _run(data, tiny_vit, precision="fp16")
    with pytest.raises(MavlError, match="unknown training precision"):
        _run(data, tiny_vit, precision="int8")
    with pytest.raises(MavlError, match="--rank 64"):
        _run(data, tiny_vit, config=_config(rank=64))
    with pytest.raises(MavlError, match="do not match"):
        from mavl_cli.training.finetune import finetune_lrf

        items, table, _ = data
        finetune_lrf(items[:-1], table.y, table.mask, table.names, _spec(tiny_vit), **_opts())


def test_augmentation_is_mild_and_never_mirrors():
    import torch

    from mavl_cli.training.finetune import augment_batch

    x = torch.zeros(4, 3, 32, 32)
    x[:, :, 8:24, 4:12] = 1.0  # a bright blob on the image's left
    same = augment_batch(x, torch.Generator().manual_seed(0), max_shift=0.0, scale=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    left, right = out[..., :16].sum(), out[..., 16:].sum()
    assert left > 3 * right  # laterality kept
    again = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert "flip" in augment_batch.__doc__


def test_finetune_command_feeds_the_chain(phantom_set, tiny_vit, tiny_bert, tmp_path, monkeypatch):
    """`mavl finetune-lrf` -> embed-images with the new backbone -> fuse; the old backbone is refused."""
    from tests.conftest import run_cli

    ph = phantom_set
    bb = tmp_path / "bb"
    r = run_cli(f"finetune-lrf {ph.root} --labels {ph.splits['train']} --backbone vit_tiny_patch16_224 --weights {tiny_vit} "
                f"--backbone-out {bb} --rank 8 --keep 2 --epochs 1 --batch-size 8 -o {tmp_path/'lrf.st'}")
    assert r.exit_code == 0, r.stderr
    assert (bb / "model.safetensors").exists()
    for name, w in (("new", bb), ("old", tiny_vit)):
        r = run_cli(f"embed-images {ph.root} --labels {ph.splits['train']} --backbone vit_tiny_patch16_224 --weights {w} -o {tmp_path/name}.st")
        assert r.exit_code == 0, r.stderr
    (tmp_path / "labels.txt").write_text("Cardiomegaly\nEdema\n")
    assert run_cli(f"embed-text {tmp_path/'labels.txt'} --text-model {tiny_bert} -o {tmp_path/'t.st'}").exit_code == 0
    r = run_cli(f"fuse {tmp_path/'new.st'} {tmp_path/'t.st'} --lrf {tmp_path/'lrf.st'} --labels {ph.splits['train']} --epochs 1 -o {tmp_path/'m.st'}")
    assert r.exit_code == 0, r.stderr
    r = run_cli(f"fuse {tmp_path/'old.st'} {tmp_path/'t.st'} --lrf {tmp_path/'lrf.st'} --labels {ph.splits['train']} --epochs 1 -o {tmp_path/'m2.st'}")
    assert r.exit_code == 2 and "fine-tuned" in r.stderr
    # the model file carries the fine-tuned backbone: predict gives the same figures once the folder is gone
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    img = str(min((ph.root / "images").glob("*.png")))
    r = run_cli(f"predict {img} --model {tmp_path/'m.st'} --json --device cpu")
    assert r.exit_code == 0, r.stderr
    import shutil

    shutil.rmtree(bb)
    r2 = run_cli(f"predict {img} --model {tmp_path/'m.st'} --json --device cpu")
    assert r2.exit_code == 0, r2.stderr
    assert json.loads(r2.stdout)["images"] == json.loads(r.stdout)["images"]
    # a head whose weights changed after fine-tuning is refused by fuse (the model would pair it with other weights)
    r = run_cli(f"finetune-lrf {ph.root} --labels {ph.splits['train']} --backbone vit_tiny_patch16_224 --weights {tiny_vit} "
                f"--backbone-out {bb} --rank 8 --keep 2 --epochs 1 --batch-size 8 -o {tmp_path/'lrf2.st'}")
    assert r.exit_code == 0, r.stderr
    from safetensors.numpy import load_file, save_file

    w = load_file(str(bb / "model.safetensors"))
    first = sorted(w)[0]
    w[first] = w[first] + 1.0
    save_file(w, str(bb / "model.safetensors"))
    r = run_cli(f"fuse {tmp_path/'new.st'} {tmp_path/'t.st'} --lrf {tmp_path/'lrf2.st'} --labels {ph.splits['train']} --epochs 1 -o {tmp_path/'m3.st'}")
    assert r.exit_code == 2 and "not the ones" in r.stderr
