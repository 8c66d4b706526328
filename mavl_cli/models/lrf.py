"""Phase 1: low-rank feature learning (LRFL) head on cached backbone features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mavl_cli.core.errors import MavlError


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


def lrf_embed(tensors: dict[str, np.ndarray], x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Apply a trained LRF head (eval mode) to backbone features -> ``[N, r]``."""

    head = head_from_tensors(tensors)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(head.embed(torch.from_numpy(x[i : i + batch])).numpy())
    if not out:  # an empty shard
        return np.zeros((0, head.proj.out_features), np.float32)
    return np.concatenate(out).astype(np.float32)


def lrf_features(emb: Any, head: dict[str, np.ndarray], head_meta: dict[str, Any], where: str) -> np.ndarray:
    """An ``image-embeddings`` file as fusion input, through the LRF head ``where`` names.

    Backbone features are projected by the head; features already projected
    must come from this very head (by fingerprint). Refused: another feature
    size, another backbone, and a fine-tuned head given the original
    backbone's features. ``fuse`` (head file) and the model file share this.
    """

    x = emb.tensors["features"].astype(np.float32)
    if emb.meta.get("space") == "lrf":
        if emb.meta.get("lrf_fingerprint") != head_meta.get("fingerprint"):
            raise MavlError(f"{emb.path}: projected with a different LRF head than {where}")
        return x
    want = head["proj.weight"].shape[1]
    if x.shape[1] != want:
        raise MavlError(f"{emb.path}: {x.shape[1]}-d features, but {where} takes {want}-d")
    hb, eb = head_meta.get("backbone"), emb.meta.get("backbone")
    if hb and eb and hb != eb:
        raise MavlError(f"{emb.path}: embedded with {eb}, but {where} was trained on {hb}")
    if head_meta.get("finetuned") and emb.meta.get("backbone_weights"):
        want_w, got_w = Path(str(head_meta["backbone_weights"])), Path(str(emb.meta["backbone_weights"]))
        if not (got_w.exists() and want_w.exists() and got_w.resolve() == want_w.resolve()):
            raise MavlError(f"{emb.path}: {where} was fine-tuned with its own backbone; embed the images with --weights {want_w}")
    return lrf_embed(head, x)
