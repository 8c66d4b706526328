"""mavl_cli.stages.finetune."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import FinetuneOptions, LabelOptions, RunOptions, Validation
from mavl_cli.datasets.inputs import collect_inputs
from mavl_cli.datasets.reader import read_labels
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.io.files import check_output_path, check_outputs, model_inputs
from mavl_cli.stages.result import StageResult
from mavl_cli.training import distributed
from mavl_cli.training.finetune import (
    check_backbone_out,
    cli_encoder_args,
    finetune_lrf,
    save_finetuned,
)
from mavl_cli.training.train import LRFConfig


def finetune_stage(
    images: Any,
    output: str,
    backbone_out: str,
    encoder: Any,
    config: Any = None,
    *,
    label_opts: Any = None,
    validation: Any = None,
    tune: Any = None,
    run: Any = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> Any:
    """``mavl finetune-lrf``: label CSV(s) + images -> lrf-head file + backbone folder.

    ``images``: a :class:`mavl_cli.core.options.ImageList` whose ``labels`` CSV lists
    the training images under ``root``; ``validation.labels``: a second label CSV
    whose paths lie under the same root (otherwise ``validation.split`` of the
    patients is held out). ``encoder``: an EncoderSpec; ``tune``/``run``:
    :class:`~mavl_cli.core.options.FinetuneOptions` / :class:`~mavl_cli.core.options.RunOptions`.
    """
    config = config or LRFConfig()
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.parse(encoder)
    read, v = label_opts or LabelOptions(), validation or Validation()
    tune, run = tune or FinetuneOptions(), run or RunOptions()
    _check_stage_outputs(output, backbone_out, images.labels, v.labels, spec.weights)
    tr_items, tr_table, val = _stage_labels(images, read, v.labels, run.skip_bad)
    dist = distributed.setup(run.device)
    if dist.active and not dist.main:
        progress = None  # one progress bar per job, on rank 0
    with (progress("train-lrf --finetune", config.epochs, "epoch") if progress else nullcontext(None)) as advance:
        res = finetune_lrf(tr_items, tr_table.y, tr_table.mask, tr_table.names, spec, config, groups=tr_table.groups,
                           val=val, val_split=v.split, tune=tune, run=run, advance=advance)
    error = None
    if dist.main:  # rank 0 alone writes the head and the backbone
        try:
            save_finetuned(res, output, Path(backbone_out), {"uncertain": read.uncertain, "train_labels": str(images.labels),
                                                              "train_images_root": str(images.root),
                                                              **({"ranks": dist.world} if dist.active else {})})
        except MavlError as exc:
            if not dist.active:
                raise
            error = f"rank 0: {exc}"
    distributed.agree(dist, error)
    return _stage_result(res, output, backbone_out, config, tune)


def _check_stage_outputs(output: str, backbone_out: str, labels: str, val_labels: str | None, weights: str | None) -> None:
    """Refuse, before any training, outputs that cannot be written or that would overwrite an input."""
    check_output_path(output, [labels, *([val_labels] if val_labels else []), weights, *model_inputs(weights)])
    check_backbone_out(Path(backbone_out))
    if Path(backbone_out).is_dir():  # the folder's files are outputs too: never the starting weights or the labels
        starting = [weights] if not (weights and Path(weights).is_dir()) else [p for p in Path(weights).iterdir()]
        check_outputs({"-o": output, **{f"--backbone-out {n}": Path(backbone_out) / n for n in ("model.safetensors", "config.json")}},
                               [labels, val_labels, *starting])


def _stage_labels(images: Any, read: Any, val_labels: str | None, skip_bad: bool) -> tuple[list[Any], Any, Any]:
    """The training images and LabelTable, and the validation set (items, y, mask) when ``val_labels`` is given."""
    images_root, path_column = images.root, images.path_column
    tr_items, tr_table = labelled_items(images_root, images.labels, read.names, read.uncertain, read.renames, path_column,
                                        skip_bad)
    val = None
    if val_labels:
        v_items, v_table = labelled_items(images_root, val_labels, tr_table.names, read.uncertain, read.renames,
                                          path_column, skip_bad)
        val = (v_items, v_table.y, v_table.mask)
    return tr_items, tr_table, val


def _stage_result(res: Any, output: str, backbone_out: str, config: Any, tune: Any) -> Any:
    """The stage's summary, its epoch table and the ``embed-images`` options that use the new backbone."""
    if res.encoder is None:
        notes = [f"embed images with: mavl embed-images ... --backbone {res.info.name} --weights {backbone_out}"]
    else:
        ft = res.encoder.spec.with_(weights=str(Path(backbone_out) / "model.safetensors"), pretrained=True)
        notes = [f"embed images with: mavl embed-images ... {cli_encoder_args(ft)}"]
    if res.skipped:
        notes.append(f"{len(res.skipped)} unreadable image(s) skipped")
    return StageResult(
        output=output,
        summary={"images": res.images, "validation": res.validation, "labels": len(res.names), "rank": config.rank,
                 "keep": config.keep, "eta": config.eta, "backbone": res.info.name, "backbone_lr": tune.backbone_lr,
                 "backbone_out": str(backbone_out), "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                 "val_macro_auroc": res.val_auroc},
        table=res.history, notes=notes,
    )


def labelled_items(
    images_root: str, labels_csv: str, names: list[str] | None = None, uncertain: str = "zeros",
    label_map: dict[str, str] | None = None, path_column: str | None = None, skip_missing: bool = False,
) -> tuple[list[Any], Any]:
    """Images listed in a label CSV, found under ``images_root``, and the LabelTable aligned to them."""

    items, missing = collect_inputs([images_root], labels_csv, path_column=path_column)
    if missing and not skip_missing:
        shown = ", ".join(m["id"] for m in missing[:3])
        raise MavlError(f"{labels_csv}: {len(missing)} image(s) listed were not found under {images_root} (e.g. {shown}); "
                        "use --skip-bad to skip them", path=labels_csv)
    if not items:
        raise MavlError(f"{labels_csv}: none of its images were found under {images_root}", path=labels_csv)
    table = read_labels(labels_csv, uncertain=uncertain, label_map=label_map, path_column=path_column)
    if names is not None:
        table = table.select(list(names))
    return items, table.align([it.id for it in items])
