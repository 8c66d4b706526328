"""Training loops for the LRF head (phase 1) and the fusion model (phase 3).

Both train on cached features, so an epoch over CheXpert's 224k images takes
seconds on a GPU and minutes on a laptop CPU. Runs are seeded; on CPU the
same seed gives byte-identical weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mavl_cli.core.runtime import set_seed
from mavl_cli.datasets.join import Split
from mavl_cli.evaluation.metrics import binary_auroc
from mavl_cli.models.fusion import FusionModel
from mavl_cli.models.lrf import LRFHead
from mavl_cli.training.loop import Stepper, check_rank_keep, fit
from mavl_cli.training.losses import masked_bce_with_logits, truncated_nuclear_norm


@dataclass(frozen=True)
class LRFConfig:
    """Phase 1 hyper-parameters; stored verbatim in the ``lrf-head`` file."""

    rank: int = 64
    keep: int = 16
    eta: float = 1e-3
    dropout: float = 0.1
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0


@dataclass(frozen=True)
class FusionConfig:
    """Phase 3 hyper-parameters (defaults: Adam, lr 1e-3, batch 64, 100 epochs); stored in the model file."""

    aggregate: str = "mean"
    dim: int = 256
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    init_scale: float = 10.0
    seed: int = 0


@dataclass
class TrainResult:
    state: dict[str, Any]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    val_auroc: float = float("nan")


def masked_macro_auroc(y: np.ndarray, s: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean AUROC over labels where both classes are present (masked entries dropped)."""

    vals = []
    for j in range(y.shape[1]):
        keep = mask[:, j] if mask is not None else slice(None)
        yj, sj = y[keep, j], s[keep, j]
        if yj.size and 0 < yj.sum() < yj.size:
            vals.append(binary_auroc(yj, sj))
    return float(np.mean(vals)) if vals else float("nan")


def _batches(n: int, batch: int, gen: Any) -> list[Any]:

    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch] for i in range(0, n, batch)]


def _predict(fn: Callable[[Any], Any], x: np.ndarray, batch: int = 4096) -> np.ndarray:

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(fn(torch.from_numpy(x[i : i + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def train_lrf(
    train: Split,
    val: Split | None,
    config: LRFConfig = LRFConfig(),
    advance: Callable[..., None] | None = None,
) -> TrainResult:
    """Fit LayerNorm -> Linear(D, r) -> ReLU -> Dropout -> Linear(r, L).

    Loss = masked BCE + ``eta`` * truncated nuclear norm of the batch's
    low-rank feature matrix Z = ReLU(W LN(x)), ``[batch, r]``: the sum of
    Z's singular values beyond the top ``keep``. Z is the matrix the fusion
    stage consumes, so that is where low rank is asked for: the batch's
    embeddings should span about ``keep`` directions (one per finding pattern),
    not ``r`` noisy ones. Early stopping on validation macro AUROC.

    Measured (``benchmarks/lrf_eta.py``): at eta >= 1e-3 the tail reaches 0
    within a few epochs by switching ReLU units off (about ``keep`` stay
    alive), after which the penalty is inactive; its pull relative to the
    mean BCE grows with the batch size (a sum of singular values).
    """

    c = config
    rank, keep, eta, seed = c.rank, c.keep, c.eta, c.seed
    n, d = train.x.shape
    check_rank_keep(rank, keep, d)
    gen = set_seed(seed)
    model = LRFHead(d, rank, train.y.shape[1], c.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    step = Stepper(opt)
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y)
    m = torch.from_numpy(train.mask)

    def run_epoch(epoch: int) -> dict[str, float]:
        model.train()
        tot_bce = tot_reg = 0.0
        for idx in _batches(n, c.batch_size, gen):
            logits, z = model(x[idx])
            bce = masked_bce_with_logits(logits, y[idx], m[idx])
            # at eta = 0 the penalty is still measured (on a detached Z) so the log shows the real tail
            reg = truncated_nuclear_norm(z if eta > 0 else z.detach(), keep)
            step.step(bce + eta * reg if eta > 0 else bce)
            tot_bce += float(bce.detach()) * len(idx)
            tot_reg += float(reg.detach()) * len(idx)
        model.eval()
        return {"bce": tot_bce / n, "tnn": tot_reg / n}

    validate = None
    if val is not None:
        def validate() -> float:
            return masked_macro_auroc(val.y, _predict(lambda t: model(t)[0], val.x), val.mask)

    res = fit(c.epochs, run_epoch, lambda: copy.deepcopy(model.state_dict()), validate, patience=c.patience,
              advance=advance)
    state = {k: v.detach().clone() for k, v in res.best_state.items()}
    return TrainResult(state=state, best_epoch=res.best_epoch, epochs_run=res.epochs_run, history=res.history,
                       val_auroc=res.val_auroc)


def train_fusion(
    train: Split,
    text: np.ndarray,
    text_mask: np.ndarray,
    val: Split | None = None,
    config: FusionConfig = FusionConfig(),
    advance: Callable[..., None] | None = None,
) -> TrainResult:
    """Fit the image/text projectors, log-scale and per-label bias with masked BCE.

    The bias starts at each label's log-odds prevalence so early epochs learn
    similarity rather than base rates. With ``val``, the epoch with the best
    validation macro AUROC is kept.
    """

    c = config
    gen = set_seed(c.seed)
    n = train.x.shape[0]
    n_labels, n_aspects, txt_dim = text.shape
    model = FusionModel(train.x.shape[1], txt_dim, n_labels, n_aspects, dim=c.dim, aggregate=c.aggregate, init_scale=c.init_scale)
    with torch.no_grad():
        pos = (train.y * train.mask).sum(0)
        cnt = train.mask.sum(0).clip(min=1)
        prev = np.clip(pos / cnt, 1e-3, 1 - 1e-3)
        model.bias.copy_(torch.from_numpy(np.log(prev / (1 - prev)).astype(np.float32)))
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    step = Stepper(opt)
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y)
    m = torch.from_numpy(train.mask)
    t = torch.from_numpy(text)
    tm = torch.from_numpy(text_mask.astype(bool))

    def run_epoch(epoch: int) -> dict[str, float]:
        model.train()
        total = 0.0
        for idx in _batches(n, c.batch_size, gen):
            loss = masked_bce_with_logits(model(x[idx], t, tm), y[idx], m[idx])
            step.step(loss)
            total += float(loss.detach()) * len(idx)
        model.eval()
        return {"bce": total / n, "scale": float(model.scale().detach())}

    validate = None
    if val is not None:
        def validate() -> float:
            return masked_macro_auroc(val.y, _predict(lambda b: model(b, t, tm), val.x), val.mask)

    res = fit(c.epochs, run_epoch, lambda: copy.deepcopy(model.state_dict()), validate, without_val="last", advance=advance)
    state = {k: v.detach().clone() for k, v in res.best_state.items()}
    return TrainResult(state=state, best_epoch=res.best_epoch, epochs_run=res.epochs_run, history=res.history,
                       val_auroc=res.val_auroc)
