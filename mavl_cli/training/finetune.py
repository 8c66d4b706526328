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
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    import torch
    import torch.nn.functional as F

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
    import torch

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
    import torch


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
    import torch
    import torch.nn.functional as F



    c = config or LRFConfig()
    t, r = tune or FinetuneOptions(), run or RunOptions()
    backbone_lr, augment, grad_checkpointing = t.backbone_lr, t.augment, t.grad_checkpointing
    device, batch_size, workers, precision, skip_bad = r.device, r.batch(32), r.workers, r.precision, r.skip_bad
    y = np.asarray(y, np.float32)
    mask = np.asarray(mask, bool)
    if not items:
        raise MavlError("no training images")
    if y.shape != mask.shape or y.ndim != 2 or y.shape[0] != len(items) or y.shape[1] != len(names):
        raise MavlError(f"labels {y.shape} / mask {mask.shape} do not match {len(items)} images x {len(names)} labels")
    if batch_size < 2:
        raise MavlError("--batch-size must be at least 2 for fine-tuning (batch statistics, nuclear norm)")
    dist = distributed.setup(device)
    dev = resolve_device(dist.device if dist.active else device)
    check_train_precision(precision, dev.type)
    gen = set_seed(c.seed)
    aug_gen = torch.Generator().manual_seed(c.seed + 1)


    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.parse(encoder)
    if spec.family == "timm":
        if spec.pooling:
            raise MavlError("finetune-lrf trains timm backbones with their own pooling; drop --pooling")
        model, info = create_backbone(spec.id, weights=spec.weights, pretrained=spec.pretrained, model_args=spec.options)
    else:  # the registry's encoder: an nn.Module from the family's own preprocessed batch to pooled features

        model = build_image_encoder(spec)
        info = model.info
    d = info.dim
    check_rank_keep(c.rank, c.keep, d, info.name)
    head = LRFHead(d, c.rank, len(names), c.dropout)

    choice = choose_validation(len(items), f"{len(val[0])} validation images" if val is not None else None,
                               val_split, c.seed, groups)
    if val is not None:
        v_items, v_y, v_mask = val[0], np.asarray(val[1], np.float32), np.asarray(val[2], bool)
    elif choice.val is not None:
        v_items, v_y, v_mask = [items[i] for i in choice.val], y[choice.val], mask[choice.val]
    else:
        v_items, v_y, v_mask = None, None, None
    tr_idx = choice.train
    tr_items = [items[i] for i in tr_idx]
    tr_y, tr_m = torch.from_numpy(y[tr_idx]), torch.from_numpy(mask[tr_idx])
    n = len(tr_items)

    model = model.to(dev)
    head = head.to(dev)
    train_backbone = backbone_lr > 0
    for p in model.parameters():
        p.requires_grad_(train_backbone)
    if grad_checkpointing and train_backbone:
        inner = model if spec.family == "timm" else model.net
        if hasattr(inner, "set_grad_checkpointing"):  # timm, open_clip towers
            inner.set_grad_checkpointing(True)
        elif getattr(inner, "supports_gradient_checkpointing", False):  # transformers
            inner.gradient_checkpointing_enable()
        else:
            raise MavlError(f"{info.name} does not support gradient checkpointing")
    groups_opt = [{"params": list(head.parameters()), "lr": c.lr}]
    if train_backbone:
        groups_opt.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": backbone_lr})
    opt = torch.optim.AdamW(groups_opt, lr=c.lr, weight_decay=c.weight_decay)
    amp = Amp(precision, dev.type)
    net = _net(model, head, train_backbone, amp.half)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        # rank 0's weights are broadcast by DDP; dropout draws its own masks on each rank from here on
        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        torch.manual_seed(c.seed + 7919 * dist.rank)
    step = Stepper(opt, amp)
    dc = info.data_config
    nw = default_workers(dev.type) if workers is None else workers
    skipped: dict[str, dict[str, str]] = {}

    def run_epoch(epoch: int) -> dict[str, float]:
        model.train(train_backbone)
        head.train()
        perm = torch.randperm(n, generator=gen).numpy()
        # each global batch of --batch-size images is cut into world contiguous slices, one per rank
        mine = [_rank_slice(list(range(i, min(i + batch_size, n))), dist.rank, dist.world) for i in range(0, n, batch_size)]
        chunks = [[tr_items[perm[p]] for p in sl] for sl in mine]
        tot_bce = tot_reg = 0.0
        seen = 0
        for sl, (chunk, batch, ok, bad) in zip(mine, prefetch_chunks(chunks, dc, nw)):
            if bad:
                if not skip_bad:
                    raise _decode_error(bad)
                skipped.update({b["id"]: b for b in bad})
            rows = torch.from_numpy(perm[[sl[i] for i in ok]]) if ok else torch.zeros(0, dtype=torch.long)
            yb, mb = tr_y[rows].to(dev), tr_m[rows].to(dev)
            counts = distributed.exchange_counts(dist, [len(ok), int(mb.sum())], dev)
            g_ok, g_mask = sum(r[0] for r in counts), sum(r[1] for r in counts)
            if g_ok < 2:  # a lone image: no batch statistics, nothing for the nuclear norm
                continue
            if ok:
                x = normalize_batch(batch, dc, dev)
                if augment:
                    x = augment_batch(x, aug_gen, total=g_ok, offset=sum(r[0] for r in counts[: dist.rank]))
            else:  # nothing readable here this step: a stand-in image with zero loss keeps DDP's hooks in step
                x = torch.zeros(1, *dc["input_size"], device=dev)
                if augment:  # draw the global batch's parameters like the other ranks
                    x = augment_batch(x, aug_gen, total=g_ok)
            with amp.autocast():
                logits, z = net(x)
            if not dist.active:
                bce = masked_bce_with_logits(logits.float(), yb, mb)
                reg = truncated_nuclear_norm(z.float(), c.keep) if c.eta > 0 else torch.zeros((), device=dev)
                step.step(bce + c.eta * reg)
                tot_bce += float(bce.detach()) * len(ok)
            else:
                # the mean BCE of the global batch, scaled so that DDP's average of the ranks' gradients is its gradient
                lsum = (F.binary_cross_entropy_with_logits(logits.float()[: len(ok)], yb, reduction="none") * mb).sum()
                zero = 0.0 * (logits.float().sum() + z.float().sum())  # every parameter takes part, also in a stand-in step
                zg = distributed.gather_rows_with_grad(dist, z.float()[: len(ok)], [r[0] for r in counts])
                reg = truncated_nuclear_norm(zg, c.keep) if c.eta > 0 else torch.zeros((), device=dev)
                step.step(lsum * (dist.world / max(g_mask, 1)) + c.eta * reg + zero)
                tot_bce += float(lsum.detach()) / max(g_mask, 1) * g_ok
            tot_reg += float(reg.detach()) * g_ok
            seen += g_ok
        if dist.active:
            tot_bce = float(distributed.all_reduce_sum(dist, torch.tensor([tot_bce], dtype=torch.float64, device=dev)).item())
        if seen == 0:
            raise MavlError("no training batch had two readable images; nothing was trained")
        model.eval()
        head.eval()
        rec = {"bce": tot_bce / seen, "tnn": tot_reg / seen}
        if not math.isfinite(rec["bce"]):
            raise MavlError(f"training diverged at epoch {epoch} (loss {rec['bce']}); lower --backbone-lr or --lr"
                            + (", or use --precision bf16/fp32" if precision == "fp16" else ""))
        return rec

    validate = None
    if v_items is not None:
        v_lo, v_hi = _rank_bounds(len(v_items), dist.rank, dist.world)

        def validate() -> float:
            s, ok_rows = _score(model, head, v_items[v_lo:v_hi], dc, dev, batch_size, nw, amp.autocast, skip_bad)
            if dist.active:  # each rank scored its slice of the validation set
                got = distributed.all_gather_object(dist, (s, [v_lo + r for r in ok_rows]), "during validation")
                s = np.concatenate([g[0] for g in got]) if got else s
                ok_rows = [r for g in got for r in g[1]]
            return masked_macro_auroc(v_y[ok_rows], s, v_mask[ok_rows])

    res = fit(c.epochs, run_epoch, lambda: (_cpu_state(head), _cpu_state(model)), validate, patience=c.patience,
              advance=advance)
    head_state, backbone_state = res.best_state
    encoder = None
    if spec.family != "timm":  # the best epoch's weights, in the family's own module (what save_finetuned writes)
        model.load_state_dict(backbone_state)
        encoder = model.to("cpu").eval()
    if dist.active:
        for part in distributed.all_gather_object(dist, skipped, "after training"):
            skipped.update(part)
    return FinetuneResult(
        head_state=head_state, backbone_state=backbone_state, info=copy.deepcopy(info), names=list(names), config=c,
        best_epoch=res.best_epoch, epochs_run=res.epochs_run, history=res.history, val_auroc=res.val_auroc,
        validation=choice.description, backbone_lr=backbone_lr, precision=precision, augment=augment, images=n,
        skipped=list(skipped.values()), encoder=encoder,
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


def encoder_weights(encoder: Any) -> dict[str, Any]:
    """The state dict a family's loader takes as ``--weights FILE`` (hf and xrv: the network's; open_clip: the
    whole CLIP's, text tower included), as contiguous CPU tensors safetensors can write."""
    net = getattr(encoder, "_clip", None) or encoder.net
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}


def cli_encoder_args(spec: Any) -> str:
    """The ``--backbone ... --weights ...`` options that rebuild ``spec`` on the command line."""
    import json
    import shlex

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
    from types import SimpleNamespace


    out_dir = Path(backbone_out_dir)
    check_output_path(lrf_out)
    parent = check_backbone_out(out_dir)
    info = result.info
    enc = result.encoder
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        if enc is None:  # timm
            # the state dict is all save_local_backbone reads: no need to rebuild the model (hf-hub: names would need the hub)
            save_local_backbone(SimpleNamespace(state_dict=lambda: result.backbone_state), info.name, tmp, info.model_args)
            names = ("model.safetensors", "config.json")
        else:
            from safetensors.torch import save_file

            save_file(encoder_weights(enc), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            names = ("model.safetensors",)
        out_dir.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, out_dir / name)
        if enc is not None and (out_dir / "config.json").exists():  # a timm folder saved here before: not ours now
            (out_dir / "config.json").unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tensors = {k: v.numpy() for k, v in result.head_state.items()}
    weights_fp = None
    try:  # what the weights file holds, exactly: `fuse` checks it before carrying the weights into the model file
        from safetensors.numpy import load_file

        weights_fp = tensor_fingerprint(load_file(str(out_dir / "model.safetensors")))
    except Exception:  # e.g. bf16 tensors numpy cannot hold: fuse then takes the file as it is
        pass
    backbone_np = {k: v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy() for k, v in result.backbone_state.items()}
    c = result.config
    if enc is None:
        spec = info.spec.with_(weights=str(out_dir)) if info.spec is not None else None
        where = {"backbone": info.name, "backbone_weights": str(out_dir), "backbone_args": info.model_args,
                 "preprocessing": info.data_config}
    else:
        spec = enc.spec.with_(weights=str(out_dir / "model.safetensors"), pretrained=True)
        where = {"backbone": spec.name, "backbone_weights": spec.weights, "backbone_args": dict(spec.options),
                 "preprocessing": enc.preprocessing, "encoder": {**spec.to_meta(), "pooling": enc.pooling},
                 "encoder_family": spec.family}
    meta = {
        "labels": list(result.names),
        **asdict(c),
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
    write_file(lrf_out, "lrf-head", tensors, meta)
    return spec
