"""Losses: masked BCE and the LRFL regulariser (truncated nuclear norm)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def truncated_nuclear_norm(features: Any, keep: int) -> Any:
    """Sum of the singular values of ``features`` beyond the largest ``keep``.

    This is the low-rank feature learning (LRFL) penalty: minimising it pushes
    the feature matrix towards rank ``keep`` while leaving its top ``keep``
    directions free (unlike the full nuclear norm, which also shrinks the
    useful directions). It is differentiable through ``torch.linalg.svdvals``,
    whose gradient is stable even for repeated singular values. Being a sum
    over the batch, its strength relative to a mean loss grows with batch size.

    ``features``: ``[batch, dim]``; returns a scalar tensor.
    """

    if features.ndim != 2:
        raise ValueError("truncated_nuclear_norm expects a [batch, dim] matrix")
    sv = torch.linalg.svdvals(features)  # descending
    if keep >= sv.shape[0]:
        return sv.sum() * 0.0
    return sv[keep:].sum()


def masked_bce_with_logits(logits: Any, targets: Any, mask: Any | None = None) -> Any:
    """Mean BCE over the entries where ``mask`` is true.

    Uncertain labels under ``--uncertain ignore`` are masked out: they neither
    push a score up nor down, and do not dilute the mean.
    """

    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)
