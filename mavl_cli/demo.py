"""`mavl demo`: the whole chain, offline, on generated phantoms.

The demo runs the very commands a user would type (printed as it goes), with
real pretrained encoders that arrive as PyPI packages: ImageNet
EfficientNet-Lite0 for images (converted once to a safetensors model folder)
and MiniLM-L6 for text. Real deployments keep the hub defaults
(``vit_base_patch16_224``, ``emilyalsentzer/Bio_ClinicalBERT``).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from mavl_cli import render

DEMO_BACKBONE = "tf_efficientnet_lite0"


def descriptions_path(name: str) -> Path:
    """A description file shipped with mavl (``mavl_cli/data/descriptions``)."""
    return Path(__file__).parent / "data" / "descriptions" / name


def run_cli(args: list[str]) -> None:
    """Run one mavl command in-process, echoing it as a shell line first."""
    from mavl_cli.cli import app

    render.err().print(render.styled("\n[bold green]$ mavl {}[/]", " ".join(shlex.quote(str(a)) for a in args)), highlight=False)
    app(args=[str(a) for a in args], standalone_mode=False)


def demo_commands(work: Path, weights: Path, text_model: Path, epochs: int, seed: int) -> list[list[str]]:
    """The chain as argument lists: what `examples/pipeline.sh` does by hand."""
    ph = work / "phantoms"
    b = ["--backbone", DEMO_BACKBONE, "--weights", weights]
    cmds = []
    for split in ("train", "val", "test"):
        cmds.append(["embed-images", ph, "--labels", ph / f"{split}.csv", *b, "-o", work / f"{split}_img.safetensors"])
    cmds += [
        ["train-lrf", work / "train_img.safetensors", "--labels", ph / "train.csv", "--val", work / "val_img.safetensors",
         "--val-labels", ph / "val.csv", "--rank", "64", "--keep", "16", "--eta", "1e-3", "--seed", seed, "-o", work / "lrf.safetensors"],
        ["embed-text", descriptions_path("phantoms6.json"), "--text-model", text_model, "-o", work / "text.safetensors"],
        ["fuse", work / "train_img.safetensors", work / "text.safetensors", "--lrf", work / "lrf.safetensors",
         "--labels", ph / "train.csv", "--val", work / "val_img.safetensors", "--val-labels", ph / "val.csv",
         "--epochs", epochs, "--seed", seed, "-o", work / "model.safetensors"],
        ["tune-threshold", work / "model.safetensors", work / "val_img.safetensors", "--labels", ph / "val.csv",
         "--per-label", "-o", work / "model_tuned.safetensors"],
        ["evaluate", work / "model_tuned.safetensors", work / "test_img.safetensors", "--labels", ph / "test.csv",
         "--bootstrap", "1000", "--plot", work / "report.png", "--csv", work / "report.csv"],
    ]
    return cmds


def run_demo(workdir: Path, n: int = 600, epochs: int = 100, seed: int = 0, install: bool = True, size: int = 256) -> Path:
    """Generate phantoms, run every stage, write a contact sheet; returns the tuned model path."""
    import time

    from mavl_cli.contact import contact_sheet
    from mavl_cli.contract import check_folder
    from mavl_cli.modelfile import check_install_default, install_default, mavl_home
    from mavl_cli.weights import ensure_demo_backbone, minilm_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    work = Path(workdir)
    check_folder(work, create=True, what="--workdir")  # before any work: where everything goes
    check_folder(mavl_home(), create=True, what="mavl's home folder ($MAVL_HOME)")  # the converted weights
    if install:
        check_install_default()
    work.mkdir(parents=True, exist_ok=True)
    text_model = minilm_folder()
    weights = ensure_demo_backbone(mavl_home() / "weights" / DEMO_BACKBONE)
    render.err().print(render.styled("[bold]mavl demo[/] in {}: {} phantom radiographs, backbone {} (ImageNet, from {}), text encoder MiniLM-L6 ({})",
                                     work, n, DEMO_BACKBONE, weights, text_model))
    run_cli(["phantoms", work / "phantoms", "-n", n, "--seed", seed, "--size", size])
    for cmd in demo_commands(work, weights, text_model, epochs, seed):
        run_cli(cmd)
    model = work / "model_tuned.safetensors"
    ph = work / "phantoms"
    import csv

    from mavl_cli.phantoms import FINDINGS

    with open(ph / "test.csv") as fh:  # an image with findings, so --explain has something to show
        rows = list(csv.DictReader(fh))
    pick = next((r for r in rows if sum(r[f] == "1.0" for f in FINDINGS) >= 2), rows[0])
    run_cli(["predict", ph / pick["Path"], "--model", model, "--explain"])
    sheet = contact_sheet(model, ph / "test.csv", ph, work / "contact_sheet.png", n=8)
    if install:
        dest = install_default(model.read_bytes())
        render.err().print(f"installed the demo model as the default: {dest} (`mavl predict IMAGE` now uses it)")
    for line in (f"contact sheet: {sheet}", f"report plot: {work / 'report.png'}", f"demo finished in {time.perf_counter() - t0:.0f} s"):
        render.err().print(line)
    return model
