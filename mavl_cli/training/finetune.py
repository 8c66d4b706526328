"""End-to-end fine-tuning of the image backbone together with the LRF head.

``mavl train-lrf`` normally trains the low-rank head on cached features: fast,
but the backbone stays as ImageNet (or CLIP...) made it. With a GPU, training
both from the images usually buys a few points of AUROC on radiographs. This
module does that and writes two ordinary artefacts, so nothing downstream
changes:

- the LRF head as a normal ``lrf-head`` file (``"finetuned": true`` in its
  metadata, ``backbone_weights`` naming the new weights, ``weights_fingerprint``
  what they hold);
- the backbone: timm in the hub folder layout (``config.json`` +
  ``model.safetensors``), loadable with ``mavl embed-images ... --backbone NAME
  --weights FOLDER``; every other family (hf, open_clip, xrv: the registry's
  encoder module is what trains) as ``model.safetensors``, the state dict its
  loader takes with ``--weights FILE`` on top of the same spec.

``fuse`` then carries those weights inside the model file (see
:func:`mavl_cli.models.modelfile.read_finetuned_weights`), so ``predict`` rebuilds the
fine-tuned encoder from the model file alone.

The loss is exactly phase 1's (masked BCE + ``eta`` * truncated nuclear norm
of the batch's low-rank features), with two AdamW parameter groups: a small
learning rate for the backbone, the head's own for the head. Images are
decoded batch by batch in threads (the backbone's own eval preprocessing), so
memory stays bounded by a few batches whatever the data set size.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import FinetuneOptions, RunOptions
from mavl_cli.core.runtime import resolve_device, set_seed
from mavl_cli.encoders import build_image_encoder
from mavl_cli.encoders.loader import default_workers, prefetch_batches, prefetch_chunks
from mavl_cli.encoders.preprocess import normalize_batch
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.encoders.timm import create_backbone, save_local_backbone
from mavl_cli.io.files import check_output_path
from mavl_cli.io.mavlfile import write_file
from mavl_cli.models.carried import tensor_fingerprint
from mavl_cli.models.lrf import LRFHead
from mavl_cli.training import distributed
from mavl_cli.training.loop import (
    Amp,
    Stepper,
    check_rank_keep,
    check_train_precision,
    choose_validation,
    fit,
)
from mavl_cli.training.losses import masked_bce_with_logits, truncated_nuclear_norm
from mavl_cli.training.train import LRFConfig, masked_macro_auroc


@dataclass
class FinetuneResult:
    """What :func:`finetune_lrf` learned; :func:`save_finetuned` writes it."""

    head_state: dict[str, Any]  # LRFHead state dict (CPU tensors), keys as mavl_cli.models.lrf.LRFHead
    backbone_state: dict[str, Any]  # timm: the model's state dict, classifier removed; others: the ImageEncoder's ("net.*")
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
    encoder: Any = None  # hf / open_clip / xrv: the fine-tuned ImageEncoder (best epoch, CPU, eval mode)


def augment_batch(x: Any, gen: Any, max_shift: float = 0.06, scale: tuple[float, float] = (0.9, 1.1),
                  total: int | None = None, offset: int = 0) -> Any:
    """Random zoom (``scale``) and shift (up to ``max_shift`` of the side) per image, one vectorised resample.

    Deliberately no horizontal flip: chest films are not mirror-symmetric.
    The heart lies left, the aortic knob and gastric bubble too, and findings
    are often lateral (left effusion, right upper lobe collapse, a left-sided
    line) with an L/R marker burnt in; a flipped film is a different,
    mostly impossible patient (situs inversus), and the model would learn to
    ignore laterality. No rotation beyond what the shift gives, either:
    positioning variation in real films is mostly translation and scale.
    Borders are filled by edge replication. ``gen``: a CPU torch.Generator.
    Under DDP, ``total`` is the global batch and ``offset`` this rank's first
    row in it: every rank draws the whole batch's parameters and uses its
    rows, so each image is augmented as in one process.
    """

    b = x.shape[0]
    t = b if total is None else total
    zoom = torch.empty(t).uniform_(scale[0], scale[1], generator=gen)[offset : offset + b]
    shift = ((torch.rand(t, 2, generator=gen) * 2 - 1) * (2 * max_shift))[offset : offset + b]  # grid spans 2 per side
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1 / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _net(backbone: Any, head: Any, train_backbone: bool, half: bool) -> Any:
    """Backbone + head as one module (what DDP wraps): images -> (logits, low-rank features)."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, x: Any) -> Any:
            feats = self.backbone(x) if train_backbone else _frozen(self.backbone, x)
            return self.head(feats.float() if not half else feats)

    return Net()


def _cpu_state(module: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _decode_error(bad: list[dict[str, str]]) -> MavlError:
    first = bad[0]
    return MavlError(f"{first['path']}: {first['reason']} (use --skip-bad to skip unreadable images)", path=first["path"])


def _score(backbone: Any, head: Any, items: list[Any], dc: dict[str, Any], dev: Any, batch_size: int, workers: int,
           autocast: Any, skip_bad: bool) -> tuple[np.ndarray, list[int]]:
    """Probabilities ``[n_ok, L]`` for ``items`` (eval mode) and the positions of the readable ones."""

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


@dataclass(frozen=True)
class _Split:
    """The training rows (images, labels as CPU tensors) and the validation set (``v_items`` None: none)."""

    choice: Any  # ValidationChoice
    tr_items: list[Any]
    tr_y: Any
    tr_m: Any
    v_items: list[Any] | None
    v_y: np.ndarray | None
    v_mask: np.ndarray | None


@dataclass(frozen=True)
class _Trainer:
    """What one epoch of fine-tuning needs: the modules, the optimiser step, the data and the run settings."""

    c: Any  # LRFConfig
    model: Any
    head: Any
    net: Any  # backbone + head, DDP-wrapped under torchrun
    step: Any  # Stepper
    amp: Any  # Amp
    dist: Any
    dev: Any
    data: _Split
    gen: Any  # the permutation generator
    aug_gen: Any  # the augmentation generator
    dc: dict[str, Any]
    nw: int
    batch_size: int
    train_backbone: bool
    augment: bool
    skip_bad: bool
    precision: str
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)


def finetune_lrf(
    items: list[Any],
    y: np.ndarray,
    mask: np.ndarray,
    names: list[str],
    encoder: Any,
    config: Any = None,
    *,
    groups: list[str] | None = None,
    val: tuple[list[Any], np.ndarray, np.ndarray] | None = None,
    val_split: float = 0.1,
    tune: Any = None,
    run: Any = None,
    advance: Callable[..., None] | None = None,
) -> FinetuneResult:
    """Train backbone + LRF head from images; keep the epoch with the best validation macro AUROC.

    ``items`` (:class:`mavl_cli.models.embed.ImageItem`) line up row by row with
    ``y``/``mask`` ``[N, L]`` (a LabelTable aligned to the items' ids) and
    ``groups`` (patients, for the held-out split). Validation: ``val`` =
    (items, y, mask), else ``val_split`` of the patients (0 = none: the epoch
    with the lowest training BCE is kept). ``encoder``: an
    :class:`~mavl_cli.encoders.EncoderSpec` (or a timm name). ``config.batch_size``
    is ignored (``run.batch_size`` is the image batch, default 32); ``config.lr``
    is the head's rate and ``tune.backbone_lr`` (:class:`mavl_cli.core.options.FinetuneOptions`)
    the backbone's (0 freezes it: phase 1 with augmentation). ``run.precision``
    fp16 (with a GradScaler) or bf16 runs the forward under autocast on CUDA;
    the loss is always computed in fp32. Seeded: on CPU the
    same seed gives identical weights. ``advance(1, **epoch_record)`` per epoch.
    """

    c = config or LRFConfig()
    t, r = tune or FinetuneOptions(), run or RunOptions()
    device, batch_size, precision = r.device, r.batch(32), r.precision
    y, mask = _checked_labels(items, y, mask, names, batch_size)
    dist = distributed.setup(device)
    dev = resolve_device(dist.device if dist.active else device)
    check_train_precision(precision, dev.type)
    gen = set_seed(c.seed)
    aug_gen = torch.Generator().manual_seed(c.seed + 1)
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.parse(encoder)
    model, info = _build_backbone(spec)
    check_rank_keep(c.rank, c.keep, info.dim, info.name)
    head = LRFHead(info.dim, c.rank, len(names), c.dropout)
    data = _split_data(items, y, mask, val, val_split, c.seed, groups)
    tr = _prepare_trainer(c, t, r, model, head, spec, info, dist, dev, data, gen, aug_gen)
    res = fit(c.epochs, lambda epoch: _run_epoch(tr, epoch), lambda: (_cpu_state(tr.head), _cpu_state(tr.model)),
              _validator(tr), patience=c.patience, advance=advance)
    return _finetune_result(tr, res, spec, info, names, t)


def _checked_labels(items: list[Any], y: Any, mask: Any, names: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``y`` / ``mask`` as float32 / bool arrays, refused unless they match the images and labels."""
    y = np.asarray(y, np.float32)
    mask = np.asarray(mask, bool)
    if not items:
        raise MavlError("no training images")
    if y.shape != mask.shape or y.ndim != 2 or y.shape[0] != len(items) or y.shape[1] != len(names):
        raise MavlError(f"labels {y.shape} / mask {mask.shape} do not match {len(items)} images x {len(names)} labels")
    if batch_size < 2:
        raise MavlError("--batch-size must be at least 2 for fine-tuning (batch statistics, nuclear norm)")
    return y, mask


def _build_backbone(spec: Any) -> tuple[Any, Any]:
    """The module that trains and its BackboneInfo: a timm model, else the registry's encoder module."""
    if spec.family == "timm":
        if spec.pooling:
            raise MavlError("finetune-lrf trains timm backbones with their own pooling; drop --pooling")
        return create_backbone(spec.id, weights=spec.weights, pretrained=spec.pretrained, model_args=spec.options)
    # the registry's encoder: an nn.Module from the family's own preprocessed batch to pooled features
    model = build_image_encoder(spec)
    return model, model.info


def _split_data(items: list[Any], y: np.ndarray, mask: np.ndarray, val: Any, val_split: float, seed: int,
                groups: list[str] | None) -> _Split:
    """The training rows and the validation set: ``val`` if given, else a held-out share of the patients."""

    choice = choose_validation(len(items), f"{len(val[0])} validation images" if val is not None else None,
                               val_split, seed, groups)
    if val is not None:
        v_items, v_y, v_mask = val[0], np.asarray(val[1], np.float32), np.asarray(val[2], bool)
    elif choice.val is not None:
        v_items, v_y, v_mask = [items[i] for i in choice.val], y[choice.val], mask[choice.val]
    else:
        v_items, v_y, v_mask = None, None, None
    tr_idx = choice.train
    return _Split(choice, [items[i] for i in tr_idx], torch.from_numpy(y[tr_idx]), torch.from_numpy(mask[tr_idx]),
                  v_items, v_y, v_mask)


def _prepare_trainer(c: Any, t: Any, r: Any, model: Any, head: Any, spec: Any, info: Any, dist: Any, dev: Any,
                     data: _Split, gen: Any, aug_gen: Any) -> _Trainer:
    """Move the modules to the device, freeze or checkpoint the backbone, build the AdamW groups (head, then
    backbone) and the network (DDP-wrapped under torchrun)."""

    model = model.to(dev)
    head = head.to(dev)
    train_backbone = t.backbone_lr > 0
    for p in model.parameters():
        p.requires_grad_(train_backbone)
    if t.grad_checkpointing and train_backbone:
        _enable_grad_checkpointing(model if spec.family == "timm" else model.net, info.name)
    groups_opt = [{"params": list(head.parameters()), "lr": c.lr}]
    if train_backbone:
        groups_opt.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": t.backbone_lr})
    opt = torch.optim.AdamW(groups_opt, lr=c.lr, weight_decay=c.weight_decay)
    amp = Amp(r.precision, dev.type)
    net = _net(model, head, train_backbone, amp.half)
    if dist.active:
        # rank 0's weights are broadcast by DDP; dropout draws its own masks on each rank from here on
        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        torch.manual_seed(c.seed + 7919 * dist.rank)
    return _Trainer(
        c=c, model=model, head=head, net=net, step=Stepper(opt, amp), amp=amp, dist=dist, dev=dev, data=data, gen=gen,
        aug_gen=aug_gen, dc=info.data_config, nw=default_workers(dev.type) if r.workers is None else r.workers,
        batch_size=r.batch(32), train_backbone=train_backbone, augment=t.augment, skip_bad=r.skip_bad,
        precision=r.precision,
    )


def _enable_grad_checkpointing(inner: Any, name: str) -> None:
    if hasattr(inner, "set_grad_checkpointing"):  # timm, open_clip towers
        inner.set_grad_checkpointing(True)
    elif getattr(inner, "supports_gradient_checkpointing", False):  # transformers
        inner.gradient_checkpointing_enable()
    else:
        raise MavlError(f"{name} does not support gradient checkpointing")


def _run_epoch(tr: _Trainer, epoch: int) -> dict[str, float]:
    """One pass over the training images in a seeded random order; returns ``{"bce", "tnn"}`` (per image)."""

    tr.model.train(tr.train_backbone)
    tr.head.train()
    n, bs, dist = len(tr.data.tr_items), tr.batch_size, tr.dist
    perm = torch.randperm(n, generator=tr.gen).numpy()
    # each global batch of --batch-size images is cut into world contiguous slices, one per rank
    mine = [_rank_slice(list(range(i, min(i + bs, n))), dist.rank, dist.world) for i in range(0, n, bs)]
    chunks = [[tr.data.tr_items[perm[p]] for p in sl] for sl in mine]
    tot_bce = tot_reg = 0.0
    seen = 0
    for sl, (chunk, batch, ok, bad) in zip(mine, prefetch_chunks(chunks, tr.dc, tr.nw)):
        if bad:
            if not tr.skip_bad:
                raise _decode_error(bad)
            tr.skipped.update({b["id"]: b for b in bad})
        got = _train_batch(tr, perm, sl, batch, ok)
        if got is None:
            continue
        bce_part, reg_part, g_ok = got
        tot_bce += bce_part
        tot_reg += reg_part
        seen += g_ok
    return _epoch_record(tr, epoch, tot_bce, tot_reg, seen)


def _train_batch(tr: _Trainer, perm: np.ndarray, sl: list[int], batch: Any, ok: list[int]) -> tuple[float, float, int] | None:
    """One optimiser step on this rank's slice of a global batch; returns its (BCE, TNN) sums and the global
    batch's readable image count, or None when fewer than two images of the global batch were readable."""

    rows = torch.from_numpy(perm[[sl[i] for i in ok]]) if ok else torch.zeros(0, dtype=torch.long)
    yb, mb = tr.data.tr_y[rows].to(tr.dev), tr.data.tr_m[rows].to(tr.dev)
    counts = distributed.exchange_counts(tr.dist, [len(ok), int(mb.sum())], tr.dev)
    g_ok, g_mask = sum(r[0] for r in counts), sum(r[1] for r in counts)
    if g_ok < 2:  # a lone image: no batch statistics, nothing for the nuclear norm
        return None
    x = _batch_images(tr, batch, ok, counts, g_ok)
    with tr.amp.autocast():
        logits, z = tr.net(x)
    if not tr.dist.active:
        bce_part, reg = _local_step(tr, logits, z, yb, mb, len(ok))
    else:
        bce_part, reg = _ddp_step(tr, logits, z, yb, mb, counts, len(ok), g_ok, g_mask)
    return bce_part, float(reg.detach()) * g_ok, g_ok


def _batch_images(tr: _Trainer, batch: Any, ok: list[int], counts: list[list[int]], g_ok: int) -> Any:
    """The normalised (and augmented) images of this rank's slice, or a stand-in image when none was readable."""

    if ok:
        x = normalize_batch(batch, tr.dc, tr.dev)
        if tr.augment:
            x = augment_batch(x, tr.aug_gen, total=g_ok, offset=sum(r[0] for r in counts[: tr.dist.rank]))
    else:  # nothing readable here this step: a stand-in image with zero loss keeps DDP's hooks in step
        x = torch.zeros(1, *tr.dc["input_size"], device=tr.dev)
        if tr.augment:  # draw the global batch's parameters like the other ranks
            x = augment_batch(x, tr.aug_gen, total=g_ok)
    return x


def _local_step(tr: _Trainer, logits: Any, z: Any, yb: Any, mb: Any, n_ok: int) -> tuple[float, Any]:
    """The single-process step: masked BCE + eta * TNN of the batch; returns the BCE sum and the TNN."""

    c = tr.c
    bce = masked_bce_with_logits(logits.float(), yb, mb)
    reg = truncated_nuclear_norm(z.float(), c.keep) if c.eta > 0 else torch.zeros((), device=tr.dev)
    tr.step.step(bce + c.eta * reg)
    return float(bce.detach()) * n_ok, reg


def _ddp_step(tr: _Trainer, logits: Any, z: Any, yb: Any, mb: Any, counts: list[list[int]], n_ok: int, g_ok: int,
              g_mask: int) -> tuple[float, Any]:
    """The DDP step on the global batch's loss (TNN of the gathered features); returns the BCE share and the TNN."""

    c, dist = tr.c, tr.dist
    # the mean BCE of the global batch, scaled so that DDP's average of the ranks' gradients is its gradient
    lsum = (F.binary_cross_entropy_with_logits(logits.float()[:n_ok], yb, reduction="none") * mb).sum()
    zero = 0.0 * (logits.float().sum() + z.float().sum())  # every parameter takes part, also in a stand-in step
    zg = distributed.gather_rows_with_grad(dist, z.float()[:n_ok], [r[0] for r in counts])
    reg = truncated_nuclear_norm(zg, c.keep) if c.eta > 0 else torch.zeros((), device=tr.dev)
    tr.step.step(lsum * (dist.world / max(g_mask, 1)) + c.eta * reg + zero)
    return float(lsum.detach()) / max(g_mask, 1) * g_ok, reg


def _epoch_record(tr: _Trainer, epoch: int, tot_bce: float, tot_reg: float, seen: int) -> dict[str, float]:
    """The epoch's mean BCE and TNN (BCE summed over the ranks); back to eval mode; refuses a diverged loss."""

    if tr.dist.active:
        tot_bce = float(distributed.all_reduce_sum(tr.dist, torch.tensor([tot_bce], dtype=torch.float64, device=tr.dev)).item())
    if seen == 0:
        raise MavlError("no training batch had two readable images; nothing was trained")
    tr.model.eval()
    tr.head.eval()
    rec = {"bce": tot_bce / seen, "tnn": tot_reg / seen}
    if not math.isfinite(rec["bce"]):
        raise MavlError(f"training diverged at epoch {epoch} (loss {rec['bce']}); lower --backbone-lr or --lr"
                        + (", or use --precision bf16/fp32" if tr.precision == "fp16" else ""))
    return rec


def _validator(tr: _Trainer) -> Callable[[], float] | None:
    """The validation macro AUROC after an epoch (each rank scores its share), or None without a validation set."""
    d, dist = tr.data, tr.dist
    if d.v_items is None:
        return None
    v_lo, v_hi = _rank_bounds(len(d.v_items), dist.rank, dist.world)

    def validate() -> float:
        s, ok_rows = _score(tr.model, tr.head, d.v_items[v_lo:v_hi], tr.dc, tr.dev, tr.batch_size, tr.nw,
                            tr.amp.autocast, tr.skip_bad)
        if dist.active:  # each rank scored its slice of the validation set
            got = distributed.all_gather_object(dist, (s, [v_lo + r for r in ok_rows]), "during validation")
            s = np.concatenate([g[0] for g in got]) if got else s
            ok_rows = [r for g in got for r in g[1]]
        return masked_macro_auroc(d.v_y[ok_rows], s, d.v_mask[ok_rows])

    return validate


def _finetune_result(tr: _Trainer, res: Any, spec: Any, info: Any, names: list[str], t: Any) -> FinetuneResult:
    """The kept epoch's weights (hf / open_clip / xrv: loaded back into the encoder module) and the run's record."""
    head_state, backbone_state = res.best_state
    encoder = None
    if spec.family != "timm":  # the best epoch's weights, in the family's own module (what save_finetuned writes)
        tr.model.load_state_dict(backbone_state)
        encoder = tr.model.to("cpu").eval()
    skipped = tr.skipped
    if tr.dist.active:
        for part in distributed.all_gather_object(tr.dist, skipped, "after training"):
            skipped.update(part)
    return FinetuneResult(
        head_state=head_state, backbone_state=backbone_state, info=copy.deepcopy(info), names=list(names), config=tr.c,
        best_epoch=res.best_epoch, epochs_run=res.epochs_run, history=res.history, val_auroc=res.val_auroc,
        validation=tr.data.choice.description, backbone_lr=t.backbone_lr, precision=tr.precision, augment=t.augment,
        images=len(tr.data.tr_items), skipped=list(skipped.values()), encoder=encoder,
    )


def _rank_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank's contiguous share of ``n`` rows (the first ``n % world`` ranks get one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _rank_slice(rows: list[int], rank: int, world: int) -> list[int]:
    lo, hi = _rank_bounds(len(rows), rank, world)
    return rows[lo:hi]


def _frozen(model: Any, x: Any) -> Any:

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


def encoder_weights(encoder: Any) -> dict[str, Any]:
    """The state dict a family's loader takes as ``--weights FILE`` (hf and xrv: the network's; open_clip: the
    whole CLIP's, text tower included), as contiguous CPU tensors safetensors can write."""
    net = getattr(encoder, "_clip", None) or encoder.net
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}


def cli_encoder_args(spec: Any) -> str:
    """The ``--backbone ... --weights ...`` options that rebuild ``spec`` on the command line."""

    args = ["--backbone", spec.name]
    if spec.weights:
        args += ["--weights", spec.weights]
    if spec.options:
        args += ["--model-args", json.dumps(spec.options, sort_keys=True)]
    if spec.pooling:
        args += ["--pooling", spec.pooling]
    if spec.trust_remote_code:
        args.append("--trust-remote-code")
    return " ".join(shlex.quote(a) for a in args)


def save_finetuned(result: FinetuneResult, lrf_out: str, backbone_out_dir: Path, extras: dict[str, Any] | None = None) -> Any:
    """Write the backbone folder and then the ``lrf-head`` file that points at it; returns the EncoderSpec that
    rebuilds the fine-tuned encoder (``embed-images`` with it, then ``fuse``: the model file records it).

    timm: the hub folder layout (``config.json`` + ``model.safetensors``), ``--weights FOLDER``.
    hf / open_clip / xrv: ``model.safetensors``, the state dict the family's loader reads as
    ``--weights FILE`` on top of the same encoder spec (its config, preprocessing and options unchanged).
    The files go to a temporary sibling folder first and are renamed into ``backbone_out_dir``, so an
    interrupted save never leaves a half-written weights file. ``extras`` (e.g. ``uncertain``,
    ``train_labels``) are added to the head's metadata.
    """
    out_dir = Path(backbone_out_dir)
    check_output_path(lrf_out)
    parent = check_backbone_out(out_dir)
    _write_backbone(result, out_dir, parent)
    tensors = {k: v.numpy() for k, v in result.head_state.items()}
    weights_fp = _weights_file_fingerprint(out_dir / "model.safetensors")
    spec, where = _backbone_meta(result, out_dir)
    write_file(lrf_out, "lrf-head", tensors, _head_meta(result, tensors, where, weights_fp, extras))
    return spec


def _write_backbone(result: FinetuneResult, out_dir: Path, parent: Path) -> None:
    """The backbone's files, written in a temporary folder under ``parent`` and renamed into ``out_dir``."""

    info, enc = result.info, result.encoder
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        if enc is None:  # timm
            # the state dict is all save_local_backbone reads: no need to rebuild the model (hf-hub: names would need the hub)
            save_local_backbone(SimpleNamespace(state_dict=lambda: result.backbone_state), info.name, tmp, info.model_args)
            names = ("model.safetensors", "config.json")
        else:
            save_file(encoder_weights(enc), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            names = ("model.safetensors",)
        out_dir.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, out_dir / name)
        if enc is not None and (out_dir / "config.json").exists():  # a timm folder saved here before: not ours now
            (out_dir / "config.json").unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _weights_file_fingerprint(path: Path) -> str | None:
    """What the weights file holds, exactly: `fuse` checks it before carrying the weights into the model file."""
    try:
        return tensor_fingerprint(load_file(str(path)))
    except Exception:  # e.g. bf16 tensors numpy cannot hold: fuse then takes the file as it is
        return None


def _backbone_meta(result: FinetuneResult, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The EncoderSpec that rebuilds the fine-tuned encoder and the head metadata naming the backbone."""
    info, enc = result.info, result.encoder
    if enc is None:
        spec = info.spec.with_(weights=str(out_dir)) if info.spec is not None else None
        where = {"backbone": info.name, "backbone_weights": str(out_dir), "backbone_args": info.model_args,
                 "preprocessing": info.data_config}
    else:
        spec = enc.spec.with_(weights=str(out_dir / "model.safetensors"), pretrained=True)
        where = {"backbone": spec.name, "backbone_weights": spec.weights, "backbone_args": dict(spec.options),
                 "preprocessing": enc.preprocessing, "encoder": {**spec.to_meta(), "pooling": enc.pooling},
                 "encoder_family": spec.family}
    return spec, where


def _head_meta(result: FinetuneResult, tensors: dict[str, Any], where: dict[str, Any], weights_fp: str | None,
               extras: dict[str, Any] | None) -> dict[str, Any]:
    """The ``lrf-head`` file's metadata: labels, config, training record and the backbone it pairs with."""
    info = result.info
    backbone_np = {k: v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy() for k, v in result.backbone_state.items()}
    return {
        "labels": list(result.names),
        **asdict(result.config),
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "val_auroc": None if math.isnan(result.val_auroc) else result.val_auroc, "validation": result.validation,
        "fingerprint": tensor_fingerprint(tensors), "in_dim": int(info.dim),
        **where, "precision": "fp32",
        "finetuned": True, "backbone_fingerprint": tensor_fingerprint(backbone_np), "backbone_source": info.weights,
        "weights_fingerprint": weights_fp,
        "backbone_lr": result.backbone_lr, "train_precision": result.precision, "augment": result.augment,
        "train_images": result.images, "skipped": len(result.skipped), "history": result.history,
        **(extras or {}),
    }
