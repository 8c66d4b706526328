"""Phase 1: low-rank feature learning (LRFL) head on cached backbone features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LRFHead(nn.Module):
    """LayerNorm -> Linear(D, r, no bias) -> ReLU -> Dropout, then Linear(r, labels).

    :meth:`embed` gives the r-dim low-rank features the fusion stage uses;
    the classifier exists so the projection is trained to be discriminative.
    """

    def __init__(self, in_dim: int, rank: int, n_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, rank, bias=False)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(rank, n_labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.proj(self.norm(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return self.classifier(z), z


def head_from_tensors(tensors: dict[str, Any], dropout: float = 0.0) -> LRFHead:
    """Rebuild an :class:`LRFHead` from the ``lrf-head`` file's tensors (eval mode)."""
    w = tensors["proj.weight"]
    rank, in_dim = int(w.shape[0]), int(w.shape[1])
    n_labels = int(tensors["classifier.weight"].shape[0])
    head = LRFHead(in_dim, rank, n_labels, dropout)
    head.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
    return head.eval()
