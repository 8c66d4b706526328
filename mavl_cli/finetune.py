"""End-to-end fine-tuning of the image backbone together with the LRF head.

``mavl train-lrf`` normally trains the low-rank head on cached features: fast,
but the backbone stays as ImageNet (or CLIP...) made it. With a GPU, training
both from the images usually buys a few points of AUROC on radiographs. This
module does that and writes two ordinary artefacts, so nothing downstream
changes:

- the LRF head as a normal ``lrf-head`` file (``"finetuned": true`` in its
  metadata, ``backbone_weights`` naming the new backbone folder);
- the backbone in the hub folder layout (``config.json`` + ``model.safetensors``),
  loadable with ``mavl embed-images ... --backbone NAME --weights FOLDER``.

The loss is exactly phase 1's (masked BCE + ``eta`` * truncated nuclear norm
of the batch's low-rank features), with two AdamW parameter groups: a small
learning rate for the backbone, the head's own for the head. Images are
decoded batch by batch in threads (the backbone's own eval preprocessing), so
memory stays bounded by a few batches whatever the data set size.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mavl_cli.errors import MavlError

TRAIN_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class FinetuneResult:
    """What :func:`finetune_lrf` learned; :func:`save_finetuned` writes it."""

    head_state: dict[str, Any]  # LRFHead state dict (CPU tensors), keys as mavl_cli.models.lrf.LRFHead
    backbone_state: dict[str, Any]  # timm model state dict (CPU tensors), classifier removed
    info: Any  # BackboneInfo of the backbone it started from
    names: list[str]
    config: Any  # LRFConfig
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    val_auroc: float = float("nan")
    validation: str = "none"
    backbone_lr: float = 1e-5
    precision: str = "fp32"
    augment: bool = True
    images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


def check_train_precision(precision: str, device_type: str) -> None:
    """fp16/bf16 autocast only on CUDA: CPUs have no fast half-precision training path."""
    if precision not in TRAIN_PRECISIONS:
        raise MavlError(f"unknown training precision {precision!r}; use one of {', '.join(TRAIN_PRECISIONS)}")
    if precision != "fp32" and device_type != "cuda":
        raise MavlError(f"--precision {precision} for fine-tuning needs a CUDA GPU; on {device_type} use fp32")


def augment_batch(x: Any, gen: Any, max_shift: float = 0.06, scale: tuple[float, float] = (0.9, 1.1)) -> Any:
    """Random zoom (``scale``) and shift (up to ``max_shift`` of the side) per image, one vectorised resample.

    Deliberately no horizontal flip: chest films are not mirror-symmetric.
    The heart lies left, the aortic knob and gastric bubble too, and findings
    are often lateral (left effusion, right upper lobe collapse, a left-sided
    line) with an L/R marker burnt in; a flipped film is a different,
    mostly impossible patient (situs inversus), and the model would learn to
    ignore laterality. No rotation beyond what the shift gives, either:
    positioning variation in real films is mostly translation and scale.
    Borders are filled by edge replication. ``gen``: a CPU torch.Generator.
    """
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    zoom = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * max_shift)  # grid coordinates span 2 per side
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1 / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _cpu_state(module: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _decode_error(bad: list[dict[str, str]]) -> MavlError:
    first = bad[0]
    return MavlError(f"{first['path']}: {first['reason']} (use --skip-bad to skip unreadable images)", path=first["path"])


def _score(backbone: Any, head: Any, items: list[Any], dc: dict[str, Any], dev: Any, batch_size: int, workers: int,
           autocast: Any, skip_bad: bool) -> tuple[np.ndarray, list[int]]:
    """Probabilities ``[n_ok, L]`` for ``items`` (eval mode) and the positions of the readable ones."""
    import torch

    from mavl_cli.embed import prefetch_batches
    from mavl_cli.preprocess import normalize_batch

    out, rows = [], []
    with torch.inference_mode():
        for pos, (chunk, batch, ok, bad) in enumerate(prefetch_batches(items, dc, batch_size, workers)):
            if bad and not skip_bad:
                raise _decode_error(bad)
            if not ok:
                continue
            x = normalize_batch(batch, dc, dev)
            with autocast():
                logits, _ = head(backbone(x))
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
            rows.extend(pos * batch_size + i for i in ok)
    n_labels = head.classifier.out_features
    return (np.concatenate(out) if out else np.zeros((0, n_labels), np.float32)), rows


def finetune_lrf(
    items: list[Any],
    y: np.ndarray,
    mask: np.ndarray,
    names: list[str],
    backbone: str,
    weights: str | None = None,
    pretrained: bool = True,
    model_args: dict[str, Any] | None = None,
    config: Any = None,
    *,
    groups: list[str] | None = None,
    backbone_lr: float = 1e-5,
    val: tuple[list[Any], np.ndarray, np.ndarray] | None = None,
    val_split: float = 0.1,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "fp32",
    augment: bool = True,
    skip_bad: bool = False,
    grad_checkpointing: bool = False,
    advance: Callable[..., None] | None = None,
) -> FinetuneResult:
    """Train backbone + LRF head from images; keep the epoch with the best validation macro AUROC.

    ``items`` (:class:`mavl_cli.embed.ImageItem`) line up row by row with
    ``y``/``mask`` ``[N, L]`` (a LabelTable aligned to the items' ids) and
    ``groups`` (patients, for the held-out split). Validation: ``val`` =
    (items, y, mask), else ``val_split`` of the patients (0 = none: the epoch
    with the lowest training BCE is kept). ``config.batch_size`` is ignored
    (``batch_size`` is the image batch); ``config.lr`` is the head's rate and
    ``backbone_lr`` the backbone's (0 freezes it: phase 1 with augmentation).
    ``precision`` fp16 (with a GradScaler) or bf16 runs the forward under
    autocast on CUDA; the loss is always computed in fp32. Seeded: on CPU the
    same seed gives identical weights. ``advance(1, **epoch_record)`` per epoch.
    """
    import torch

    from mavl_cli.embed import default_workers
    from mavl_cli.losses import masked_bce_with_logits, truncated_nuclear_norm
    from mavl_cli.models.backbone import create_backbone
    from mavl_cli.models.lrf import LRFHead
    from mavl_cli.preprocess import normalize_batch
    from mavl_cli.runtime import resolve_device, set_seed
    from mavl_cli.train import BestEpoch, LRFConfig, masked_macro_auroc, split_validation

    c = config or LRFConfig()
    y = np.asarray(y, np.float32)
    mask = np.asarray(mask, bool)
    if not items:
        raise MavlError("no training images")
    if y.shape != mask.shape or y.ndim != 2 or y.shape[0] != len(items) or y.shape[1] != len(names):
        raise MavlError(f"labels {y.shape} / mask {mask.shape} do not match {len(items)} images x {len(names)} labels")
    if batch_size < 2:
        raise MavlError("--batch-size must be at least 2 for fine-tuning (batch statistics, nuclear norm)")
    if backbone_lr < 0:
        raise MavlError(f"--backbone-lr must be >= 0, got {backbone_lr}")
    dev = resolve_device(device)
    check_train_precision(precision, dev.type)
    gen = set_seed(c.seed)
    aug_gen = torch.Generator().manual_seed(c.seed + 1)

    from mavl_cli.encoders import EncoderSpec

    spec = backbone if isinstance(backbone, EncoderSpec) else EncoderSpec.parse(backbone, weights, pretrained=pretrained,
                                                                                 options=model_args)
    if spec.family != "timm":
        raise MavlError(f"finetune-lrf fine-tunes timm backbones for now; {spec.name} is a {spec.family} encoder "
                        "(embed its features with embed-images and use train-lrf)")
    model, info = create_backbone(spec.id, weights=spec.weights, pretrained=spec.pretrained, model_args=spec.options)
    d = info.dim
    if c.rank < 1 or c.rank > d:
        raise MavlError(f"--rank {c.rank} must be between 1 and the feature size {d} of {info.name}")
    if not 0 <= c.keep <= c.rank:
        raise MavlError(f"--keep {c.keep} must be between 0 and --rank {c.rank}")
    head = LRFHead(d, c.rank, len(names), c.dropout)

    if val is not None:
        v_items, v_y, v_mask = val[0], np.asarray(val[1], np.float32), np.asarray(val[2], bool)
        tr_idx = np.arange(len(items))
        validation = f"{len(v_items)} validation images"
    elif val_split > 0:
        tr_idx, va_idx = split_validation(len(items), val_split, c.seed, groups)
        v_items, v_y, v_mask = [items[i] for i in va_idx], y[va_idx], mask[va_idx]
        validation = f"{len(va_idx)} held-out images ({'by patient' if groups else 'random'})"
    else:
        tr_idx, v_items, v_y, v_mask, validation = np.arange(len(items)), None, None, None, "none"
    tr_items = [items[i] for i in tr_idx]
    tr_y, tr_m = torch.from_numpy(y[tr_idx]), torch.from_numpy(mask[tr_idx])
    n = len(tr_items)

    model = model.to(dev)
    head = head.to(dev)
    train_backbone = backbone_lr > 0
    for p in model.parameters():
        p.requires_grad_(train_backbone)
    if grad_checkpointing and train_backbone:
        if not hasattr(model, "set_grad_checkpointing"):
            raise MavlError(f"{info.name} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    groups_opt = [{"params": list(head.parameters()), "lr": c.lr}]
    if train_backbone:
        groups_opt.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": backbone_lr})
    opt = torch.optim.AdamW(groups_opt, lr=c.lr, weight_decay=c.weight_decay)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def autocast() -> Any:
        return torch.autocast(dev.type, dtype=half) if half is not None else nullcontext()

    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    dc = info.data_config
    nw = default_workers(dev.type) if workers is None else workers

    from mavl_cli.embed import prefetch_batches

    tracker = BestEpoch(c.patience if v_items is not None else 0)
    best_states: tuple[dict[str, Any], dict[str, Any]] | None = None
    history: list[dict[str, float]] = []
    skipped: dict[str, dict[str, str]] = {}
    for epoch in range(1, c.epochs + 1):
        model.train(train_backbone)
        head.train()
        perm = torch.randperm(n, generator=gen).numpy()
        order = [tr_items[i] for i in perm]
        tot_bce = tot_reg = 0.0
        seen = 0
        for pos, (chunk, batch, ok, bad) in enumerate(prefetch_batches(order, dc, batch_size, nw)):
            if bad:
                if not skip_bad:
                    raise _decode_error(bad)
                skipped.update({b["id"]: b for b in bad})
            if len(ok) < 2:  # a lone image: no batch statistics, nothing for the nuclear norm
                continue
            rows = torch.from_numpy(perm[[pos * batch_size + i for i in ok]])
            yb, mb = tr_y[rows].to(dev), tr_m[rows].to(dev)
            x = normalize_batch(batch, dc, dev)
            if augment:
                x = augment_batch(x, aug_gen)
            with autocast():
                feats = model(x) if train_backbone else _frozen(model, x)
                logits, z = head(feats.float() if half is None else feats)
            bce = masked_bce_with_logits(logits.float(), yb, mb)
            reg = truncated_nuclear_norm(z.float(), c.keep) if c.eta > 0 else torch.zeros((), device=dev)
            loss = bce + c.eta * reg
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            tot_bce += float(bce.detach()) * len(ok)
            tot_reg += float(reg.detach()) * len(ok)
            seen += len(ok)
        if seen == 0:
            raise MavlError("no training batch had two readable images; nothing was trained")
        model.eval()
        head.eval()
        rec: dict[str, float] = {"epoch": epoch, "bce": tot_bce / seen, "tnn": tot_reg / seen}
        if not math.isfinite(rec["bce"]):
            raise MavlError(f"training diverged at epoch {epoch} (loss {rec['bce']}); lower --backbone-lr or --lr"
                            + (", or use --precision bf16/fp32" if precision == "fp16" else ""))
        if v_items is not None:
            s, ok_rows = _score(model, head, v_items, dc, dev, batch_size, nw, autocast, skip_bad)
            rec["val_auroc"] = masked_macro_auroc(v_y[ok_rows], s, v_mask[ok_rows])
        history.append(rec)
        if tracker.update(epoch, rec):
            best_states = (_cpu_state(head), _cpu_state(model))
        if advance:
            advance(1, **{k: v for k, v in rec.items() if k != "epoch"})
        if tracker.stop():
            break
    best_epoch = tracker.epoch
    head_state, backbone_state = best_states or (_cpu_state(head), _cpu_state(model))
    va = history[best_epoch - 1].get("val_auroc", float("nan")) if best_epoch else float("nan")
    return FinetuneResult(
        head_state=head_state, backbone_state=backbone_state, info=copy.deepcopy(info), names=list(names), config=c,
        best_epoch=best_epoch, epochs_run=len(history), history=history, val_auroc=va, validation=validation,
        backbone_lr=backbone_lr, precision=precision, augment=augment, images=n, skipped=list(skipped.values()),
    )


def _frozen(model: Any, x: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(x)


def check_backbone_out(out_dir: Path) -> Path:
    """Fail before training if the backbone folder cannot be written; returns its parent folder.

    A folder holding anything besides a previous backbone is refused, so a
    typo never mixes weights into (or later overwrites files of) another folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MavlError(f"{out_dir}: --backbone-out must be a folder, but a file is there", path=out_dir)
    if out_dir.is_dir() and set(os.listdir(out_dir)) - {"config.json", "model.safetensors"}:
        raise MavlError(f"{out_dir}: folder holds other files; give an empty or new folder for the fine-tuned backbone", path=out_dir)
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.is_dir():
        raise MavlError(f"{out_dir}: parent folder {parent} does not exist", path=out_dir)
    if not os.access(parent, os.W_OK) or (out_dir.is_dir() and not os.access(out_dir, os.W_OK)):
        raise MavlError(f"{out_dir}: not writable", path=out_dir)
    return parent


def save_finetuned(result: FinetuneResult, lrf_out: str, backbone_out_dir: Path, extras: dict[str, Any] | None = None) -> None:
    """Write the backbone folder (hub layout) and then the ``lrf-head`` file that points at it.

    The backbone goes to a temporary sibling folder first and its files are
    renamed into ``backbone_out_dir``, so an interrupted save never leaves a
    half-written ``model.safetensors``. ``extras`` (e.g. ``uncertain``,
    ``train_labels``) are added to the head's metadata.
    """
    from types import SimpleNamespace

    from mavl_cli import contract
    from mavl_cli.modelfile import tensor_fingerprint
    from mavl_cli.models.backbone import save_local_backbone

    out_dir = Path(backbone_out_dir)
    contract.check_output_path(lrf_out)
    parent = check_backbone_out(out_dir)
    info = result.info
    # the state dict is all save_local_backbone reads: no need to rebuild the model (hf-hub: names would need the hub)
    model = SimpleNamespace(state_dict=lambda: result.backbone_state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        save_local_backbone(model, info.name, tmp, info.model_args)
        out_dir.mkdir(exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tensors = {k: v.numpy() for k, v in result.head_state.items()}
    backbone_np = {k: v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy() for k, v in result.backbone_state.items()}
    c = result.config
    meta = {
        "labels": list(result.names),
        **asdict(c),
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "val_auroc": None if math.isnan(result.val_auroc) else result.val_auroc, "validation": result.validation,
        "fingerprint": tensor_fingerprint(tensors), "in_dim": int(info.dim),
        "backbone": info.name, "backbone_weights": str(out_dir), "backbone_args": info.model_args,
        "preprocessing": info.data_config, "precision": "fp32",
        "finetuned": True, "backbone_fingerprint": tensor_fingerprint(backbone_np), "backbone_source": info.weights,
        "backbone_lr": result.backbone_lr, "train_precision": result.precision, "augment": result.augment,
        "train_images": result.images, "skipped": len(result.skipped),
        **(extras or {}),
    }
    contract.write_file(lrf_out, "lrf-head", tensors, meta)


def finetune_stage(
    images_root: str,
    labels: str,
    output: str,
    backbone_out: str,
    backbone: Any,  # an EncoderSpec, or a timm name with weights/pretrained/model_args
    weights: str | None = None,
    pretrained: bool = True,
    model_args: dict[str, Any] | None = None,
    config: Any = None,
    only: list[str] | None = None,
    val_labels: str | None = None,
    val_split: float = 0.1,
    uncertain: str = "zeros",
    label_map: dict[str, str] | None = None,
    path_column: str | None = None,
    backbone_lr: float = 1e-5,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "fp32",
    augment: bool = True,
    skip_bad: bool = False,
    grad_checkpointing: bool = False,
    progress: Callable[[str, int, str], Any] | None = None,
) -> Any:
    """``train-lrf --finetune IMAGES_ROOT``: label CSV(s) + images -> lrf-head file + backbone folder.

    ``val_labels``: a second label CSV whose paths lie under the same root
    (otherwise ``val_split`` of the patients is held out).
    """
    from mavl_cli import contract
    from mavl_cli.stages import StageResult
    from mavl_cli.train import LRFConfig

    config = config or LRFConfig()
    contract.check_output_path(output, [labels, *([val_labels] if val_labels else []), weights])
    check_backbone_out(Path(backbone_out))
    if Path(backbone_out).is_dir():  # the folder's files are outputs too: never the starting weights or the labels
        starting = [weights] if not (weights and Path(weights).is_dir()) else [p for p in Path(weights).iterdir()]
        contract.check_outputs({"-o": output, **{f"--backbone-out {n}": Path(backbone_out) / n for n in ("model.safetensors", "config.json")}},
                               [labels, val_labels, *starting])
    tr_items, tr_table = labelled_items(images_root, labels, only, uncertain, label_map, path_column, skip_bad)
    val = None
    if val_labels:
        v_items, v_table = labelled_items(images_root, val_labels, tr_table.names, uncertain, label_map, path_column, skip_bad)
        val = (v_items, v_table.y, v_table.mask)
    with (progress("train-lrf --finetune", config.epochs, "epoch") if progress else nullcontext(None)) as advance:
        res = finetune_lrf(tr_items, tr_table.y, tr_table.mask, tr_table.names, backbone, weights, pretrained, model_args,
                           config, groups=tr_table.groups, backbone_lr=backbone_lr, val=val, val_split=val_split,
                           device=device, batch_size=batch_size, workers=workers, precision=precision, augment=augment,
                           skip_bad=skip_bad, grad_checkpointing=grad_checkpointing, advance=advance)
    save_finetuned(res, output, Path(backbone_out), {"uncertain": uncertain, "train_labels": str(labels),
                                                      "train_images_root": str(images_root)})
    notes = [f"embed images with: mavl embed-images ... --backbone {res.info.name} --weights {backbone_out}"]
    if res.skipped:
        notes.append(f"{len(res.skipped)} unreadable image(s) skipped")
    return StageResult(
        output=output,
        summary={"images": res.images, "validation": res.validation, "labels": len(res.names), "rank": config.rank,
                 "keep": config.keep, "eta": config.eta, "backbone": res.info.name, "backbone_lr": backbone_lr,
                 "backbone_out": str(backbone_out), "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                 "val_macro_auroc": res.val_auroc},
        table=res.history, notes=notes,
    )


def labelled_items(
    images_root: str, labels_csv: str, names: list[str] | None = None, uncertain: str = "zeros",
    label_map: dict[str, str] | None = None, path_column: str | None = None, skip_missing: bool = False,
) -> tuple[list[Any], Any]:
    """Images listed in a label CSV, found under ``images_root``, and the LabelTable aligned to them."""
    from mavl_cli.datasets import collect_inputs
    from mavl_cli.datasets import read_labels

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
