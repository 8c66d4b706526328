"""`mavl demo`: the whole chain, offline, on generated phantoms.

The demo calls the stages (:mod:`mavl_cli.stages`) one by one, each with the
options of the command a user would type for that step, and prints that
command line as it goes (so the chain can be repeated by hand). It uses real
pretrained encoders that arrive as PyPI packages: ImageNet EfficientNet-Lite0
for images (converted once to a safetensors model folder) and MiniLM-L6 for
text. Real deployments keep mavl's defaults (:mod:`mavl_cli.core.defaults`)."""

from __future__ import annotations

import csv
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mavl_cli.core import console as render
from mavl_cli.core.home import mavl_home
from mavl_cli.core.invocation import set_command
from mavl_cli.core.options import (
    EvalOptions,
    ImageList,
    PredictOptions,
    RunOptions,
    TextSpec,
    Validation,
)
from mavl_cli.datasets.labelmap import parse_label_options
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.encoders.weights import ensure_demo_backbone, minilm_folder
from mavl_cli.io.files import check_folder
from mavl_cli.models.modelfile import check_install_default, install_default
from mavl_cli.reports import views
from mavl_cli.stages.contact import contact_sheet
from mavl_cli.stages.embed import embed_images_stage
from mavl_cli.stages.evaluate import EvalExtras, evaluate_stage
from mavl_cli.stages.phantoms import phantoms_stage
from mavl_cli.stages.predict import predict_stage
from mavl_cli.stages.text import embed_text_stage
from mavl_cli.stages.train import fuse_stage, train_lrf_stage, tune_stage
from mavl_cli.synthetic.phantoms import FINDINGS
from mavl_cli.training.train import FusionConfig, LRFConfig

DEMO_BACKBONE = "tf_efficientnet_lite0"


def descriptions_path(name: str) -> Path:
    """A description file shipped with mavl (``mavl_cli/data/descriptions``)."""
    return Path(__file__).resolve().parents[1] / "data" / "descriptions" / name


@dataclass
class Step:
    """One command of the chain: ``argv`` as a user types it (shown, and recorded as each output's provenance)
    and ``run``, the stage call with exactly the options that command line gives (its CLI defaults included)."""

    argv: list[Any]
    run: Callable[[], Any]


def run_step(step: Step) -> Any:
    """Echo the step as a shell line, record it as the command the files come from, run its stage."""

    args = [str(a) for a in step.argv]
    render.err().print(render.styled("\n[bold green]$ mavl {}[/]", " ".join(shlex.quote(a) for a in args)), highlight=False)
    render.release_stdout()
    set_command(args)
    return step.run()


def demo_steps(work: Path, weights: Path, text_model: Path, epochs: int, seed: int) -> list[Step]:
    """The chain, step by step: what `examples/pipeline.sh` does by hand."""

    ph = work / "phantoms"
    b = ["--backbone", DEMO_BACKBONE, "--weights", weights]
    encoder = EncoderSpec.parse(DEMO_BACKBONE, weights)
    emb = {split: work / f"{split}_img.safetensors" for split in ("train", "val", "test")}
    csv = {split: ph / f"{split}.csv" for split in ("train", "val", "test")}
    lrf, text, model, tuned = (work / f"{n}.safetensors" for n in ("lrf", "text", "model", "model_tuned"))
    val = Validation(str(emb["val"]), str(csv["val"]))
    zeros, ignore = parse_label_options("zeros"), parse_label_options("ignore")  # the CLI defaults: fit / tune, evaluate

    def embed(split: str) -> Callable[[], None]:
        def run() -> None:
            views.embed_images(embed_images_stage(ImageList([str(ph)], str(csv[split])), str(emb[split]), encoder,
                                                         RunOptions(), progress=render.progress))
        return run

    def train_lrf() -> None:
        config = LRFConfig(rank=64, keep=16, eta=1e-3, seed=seed)
        views.stage("train-lrf", train_lrf_stage(str(emb["train"]), str(csv["train"]), str(lrf), config, label_opts=zeros,
                                                        validation=val, progress=render.progress))

    def embed_text() -> None:
        res = embed_text_stage(str(descriptions_path("phantoms6.json")), str(text), TextSpec(str(text_model)),
                                      RunOptions(batch_size=32), progress=render.progress)
        views.stage("embed-text", res, notes="warn")

    def fuse() -> None:
        res = fuse_stage(str(emb["train"]), str(text), str(csv["train"]), str(model), FusionConfig(epochs=epochs, seed=seed),
                                lrf=str(lrf), validation=val, label_opts=zeros, progress=render.progress)
        views.stage("fuse", res)

    def tune() -> None:
        views.tune(tune_stage(str(model), str(emb["val"]), str(csv["val"]), str(tuned), "per-label", None, ignore))

    def evaluate() -> None:
        plot, report_csv = work / "report.png", work / "report.csv"
        extras = EvalExtras(by=[], metadata=None, html=None, labels_file=str(csv["test"]), embeddings=str(emb["test"]),
                            scores=None, model=str(tuned))
        opts = EvalOptions(bootstrap=1000, seed=0, plot=str(plot), csv_out=str(report_csv))
        report, warnings, sc = evaluate_stage(str(tuned), str(emb["test"]), str(csv["test"]), opts, ignore, extras)
        views.evaluate(report, warnings, sc, csv_out=str(report_csv), plot=str(plot))

    steps = [Step(["embed-images", ph, "--labels", csv[split], *b, "-o", emb[split]], embed(split))
             for split in ("train", "val", "test")]
    steps += [
        Step(["train-lrf", emb["train"], "--labels", csv["train"], "--val", emb["val"], "--val-labels", csv["val"],
              "--rank", "64", "--keep", "16", "--eta", "1e-3", "--seed", seed, "-o", lrf], train_lrf),
        Step(["embed-text", descriptions_path("phantoms6.json"), "--text-model", text_model, "-o", text], embed_text),
        Step(["fuse", emb["train"], text, "--lrf", lrf, "--labels", csv["train"], "--val", emb["val"], "--val-labels", csv["val"],
              "--epochs", epochs, "--seed", seed, "-o", model], fuse),
        Step(["tune-threshold", model, emb["val"], "--labels", csv["val"], "--per-label", "-o", tuned], tune),
        Step(["evaluate", tuned, emb["test"], "--labels", csv["test"], "--bootstrap", "1000", "--plot", work / "report.png",
              "--csv", work / "report.csv"], evaluate),
    ]
    return steps


def demo_commands(work: Path, weights: Path, text_model: Path, epochs: int, seed: int) -> list[list[Any]]:
    """The chain as argument lists for the command line (``mavl ARGS``): :func:`demo_steps`' command lines."""
    return [step.argv for step in demo_steps(work, weights, text_model, epochs, seed)]


def phantoms_step(root: Path, n: int, seed: int, size: int) -> Step:
    return Step(["phantoms", root, "-n", n, "--seed", seed, "--size", size],
                lambda: views.phantoms(phantoms_stage(str(root), n=n, seed=seed, size=size, progress=render.progress)))


def predict_step(image: Path, model: Path) -> Step:
    def run() -> None:
        pred, skipped = predict_stage([str(image)], str(model), PredictOptions(explain=True), RunOptions(), progress=render.progress)
        views.prediction(pred, skipped)

    return Step(["predict", image, "--model", model, "--explain"], run)


def run_demo(workdir: Path, n: int = 600, epochs: int = 100, seed: int = 0, install: bool = True, size: int = 256) -> Path:
    """Generate phantoms, run every stage, write a contact sheet; returns the tuned model path."""

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
    run_step(phantoms_step(work / "phantoms", n, seed, size))
    for step in demo_steps(work, weights, text_model, epochs, seed):
        run_step(step)
    model = work / "model_tuned.safetensors"
    ph = work / "phantoms"

    with open(ph / "test.csv") as fh:  # an image with findings, so --explain has something to show
        rows = list(csv.DictReader(fh))
    pick = next((r for r in rows if sum(r[f] == "1.0" for f in FINDINGS) >= 2), rows[0])
    run_step(predict_step(ph / pick["Path"], model))
    sheet = contact_sheet(model, ph / "test.csv", ph, work / "contact_sheet.png", n=8)
    if install:
        dest = install_default(model.read_bytes())
        render.err().print(f"installed the demo model as the default: {dest} (`mavl predict IMAGE` now uses it)")
    for line in (f"contact sheet: {sheet}", f"report plot: {work / 'report.png'}", f"demo finished in {time.perf_counter() - t0:.0f} s"):
        render.err().print(line)
    return model
