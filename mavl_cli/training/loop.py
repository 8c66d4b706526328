"""One training skeleton for `train-lrf`, `finetune-lrf` and `fuse`.

Each trainer supplies only what is its own: how one epoch runs over its data
(``run_epoch``), how it scores its validation set (``validate``) and how to
snapshot its weights (``snapshot``). Everything else lives here, once:

- :func:`check_rank_keep`: the ``--rank``/``--keep`` bounds;
- :func:`choose_validation`: a given validation set, else ``--val-split`` of
  the patients (of the images when patients are unknown), else none;
- :func:`fit`: the epoch loop: validation, the :class:`BestEpoch` rule, early
  stopping, the progress callback, the history;
- :class:`Amp` and :class:`Stepper`: autocast, the fp16 GradScaler and the
  optimiser step, including the all-reduce of gradients under
  ``torch.distributed`` (see :mod:`mavl_cli.training.distributed`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mavl_cli.core.errors import MavlError


class BestEpoch:
    """Which epoch to keep, and when to stop.

    With validation: the best macro AUROC (ties broken by lower training BCE;
    an undefined AUROC ranks below any defined one). Without: the lowest
    training BCE. ``stop`` says when ``patience`` epochs passed without a new best.
    """

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self.key = (-math.inf, -math.inf)
        self.epoch = 0
        self.bad = 0

    def update(self, epoch: int, rec: dict[str, float]) -> bool:
        """Record an epoch's figures; True when it is the new best."""
        if "val_auroc" in rec:
            va = rec["val_auroc"]
            key = (va if not math.isnan(va) else -1.0, -rec["bce"])
        else:
            key = (-rec["bce"], 0.0)
        if key > self.key:
            self.key, self.epoch, self.bad = key, epoch, 0
            return True
        self.bad += 1
        return False

    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


def check_rank_keep(rank: int, keep: int, dim: int, source: str = "") -> None:
    """``1 <= rank <= dim`` (the feature size of ``source``) and ``0 <= keep <= rank``."""
    if rank < 1 or rank > dim:
        raise MavlError(f"--rank {rank} must be between 1 and the feature size {dim}" + (f" of {source}" if source else ""))
    if not 0 <= keep <= rank:
        raise MavlError(f"--keep {keep} must be between 0 and --rank {rank}")


def split_validation(
    n: int, fraction: float, seed: int, groups: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation row indices; whole patients go to one side when groups are known."""
    if not 0 < fraction < 1:
        raise MavlError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        uniq = np.array(sorted(set(groups)))
        rng.shuffle(uniq)
        n_val = max(1, int(round(len(uniq) * fraction)))
        val_groups = set(uniq[:n_val].tolist())
        is_val = np.array([g in val_groups for g in groups])
    else:
        perm = rng.permutation(n)
        is_val = np.zeros(n, bool)
        is_val[perm[: max(1, int(round(n * fraction)))]] = True
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(tr) == 0 or len(va) == 0:
        raise MavlError("too few images (or patients) to hold out a validation split; pass --val FILE or more data")
    return tr, va


@dataclass
class ValidationChoice:
    train: np.ndarray  # row indices trained on
    val: np.ndarray | None  # held-out row indices (None: a given set, or no validation)
    description: str


def choose_validation(n: int, given: str | None, val_split: float, seed: int,
                      groups: list[str] | None = None) -> ValidationChoice:
    """The validation rule all trainers share: ``given`` (a description of a separate set) wins,
    else ``val_split`` of the patients (or images) is held out, else there is none."""
    if given is not None:
        return ValidationChoice(np.arange(n), None, given)
    if val_split > 0:
        tr, va = split_validation(n, val_split, seed, groups)
        return ValidationChoice(tr, va, f"{len(va)} held-out images ({'by patient' if groups else 'random'})")
    return ValidationChoice(np.arange(n), None, "none")


@dataclass
class Fit:
    best_state: Any
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def val_auroc(self) -> float:
        if not self.best_epoch or not self.history:
            return float("nan")
        return self.history[self.best_epoch - 1].get("val_auroc", float("nan"))


def fit(
    epochs: int,
    run_epoch: Callable[[int], dict[str, float]],
    snapshot: Callable[[], Any],
    validate: Callable[[], float] | None = None,
    patience: int = 0,
    without_val: str = "lowest-bce",
    advance: Callable[..., None] | None = None,
) -> Fit:
    """The epoch loop: ``run_epoch(epoch)`` trains and returns ``{"bce": ..., ...}``.

    With ``validate``: keep the epoch with the best validation macro AUROC
    (:class:`BestEpoch`), stop after ``patience`` epochs without a new best.
    Without: ``without_val`` is ``"lowest-bce"`` (keep the lowest training
    BCE) or ``"last"`` (keep the final epoch). ``snapshot()`` copies the
    weights worth keeping; the kept snapshot is returned (the final weights
    when no epoch qualified).
    """
    if without_val not in ("lowest-bce", "last"):
        raise ValueError(f"without_val must be 'lowest-bce' or 'last', not {without_val!r}")
    track = validate is not None or without_val == "lowest-bce"
    tracker = BestEpoch(patience if validate is not None else 0)
    best, history = None, []
    for epoch in range(1, epochs + 1):
        rec = {"epoch": epoch, **run_epoch(epoch)}
        if validate is not None:
            rec["val_auroc"] = validate()
        history.append(rec)
        if track and tracker.update(epoch, rec):
            best = snapshot()
        if advance:
            advance(1, **{k: v for k, v in rec.items() if k != "epoch"})
        if track and tracker.stop():
            break
    if not track:
        return Fit(snapshot(), len(history), history)
    return Fit(best if best is not None else snapshot(), tracker.epoch, history)


# ----------------------------------------------------------------------------- precision and steps

TRAIN_PRECISIONS = ("fp32", "fp16", "bf16")


def check_train_precision(precision: str, device_type: str) -> None:
    """fp16/bf16 autocast only on CUDA: CPUs have no fast half-precision training path."""
    if precision not in TRAIN_PRECISIONS:
        raise MavlError(f"unknown training precision {precision!r}; use one of {', '.join(TRAIN_PRECISIONS)}")
    if precision != "fp32" and device_type != "cuda":
        raise MavlError(f"--precision {precision} for fine-tuning needs a CUDA GPU; on {device_type} use fp32")


class Amp:
    """Autocast for the forward pass (fp16/bf16 on CUDA) and, for fp16, a GradScaler."""

    def __init__(self, precision: str, device_type: str) -> None:

        check_train_precision(precision, device_type)
        self.precision, self.device_type = precision, device_type
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @property
    def half(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> Any:

        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()


class Stepper:
    """``zero_grad -> backward -> step`` with the fp16 scaler; under DDP the module's own hooks
    all-reduce (average) the gradients during ``backward``."""

    def __init__(self, opt: Any, amp: Amp | None = None) -> None:
        self.opt, self.amp = opt, amp

    def step(self, loss: Any) -> None:
        scaler = self.amp.scaler if self.amp is not None else None
        self.opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(self.opt)
            scaler.update()
        else:
            loss.backward()
            self.opt.step()
