"""Phase 3: vision-language fusion.

Image features and label text embeddings are projected into one space; each
label's logit is ``exp(log_scale) * cos(image, label) + bias[label]``. The
learnable scale lets logits leave [-1, 1] (the notebook version fed raw cosine
to a sigmoid, so probabilities were stuck in 0.27-0.73), and the per-label bias
absorbs each finding's prevalence.

With several aspects per label (``[L, A, D]`` text), the image is compared
with each aspect and the cosines are aggregated per label:
``none`` (one vector: masked mean of the aspect embeddings, then projected),
``mean``, ``max`` or ``learned`` (per-label softmax weights over aspects).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mavl_cli.io.mavlfile import AGGREGATES

MAX_LOG_SCALE = math.log(100.0)


def _mlp(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


class FusionModel(nn.Module):
    def __init__(
        self,
        img_dim: int,
        txt_dim: int,
        n_labels: int,
        n_aspects: int,
        dim: int = 256,
        aggregate: str = "none",
        init_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}")
        self.aggregate = aggregate
        self.img_proj = _mlp(img_dim, dim)
        self.txt_proj = _mlp(txt_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.zeros(n_labels))
        self.aspect_logits = nn.Parameter(torch.zeros(n_labels, n_aspects))

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=MAX_LOG_SCALE).exp()

    def aspect_cosines(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Cosine of each image with each label aspect: ``[B, L, A]``."""
        i = F.normalize(self.img_proj(img), dim=-1)
        t = F.normalize(self.txt_proj(txt), dim=-1)
        return torch.einsum("bd,lad->bla", i, t)

    def aspect_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-label softmax weights over the aspects a label has: ``[L, A]``."""
        logits = self.aspect_logits.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def similarity(self, img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Aggregated cosine per label, ``[B, L]``, before scale and bias."""
        mask = mask.bool()
        if self.aggregate == "none":
            m = mask.unsqueeze(-1).to(txt.dtype)
            single = (txt * m).sum(1) / m.sum(1).clamp_min(1.0)
            i = F.normalize(self.img_proj(img), dim=-1)
            t = F.normalize(self.txt_proj(single), dim=-1)
            return i @ t.T
        cos = self.aspect_cosines(img, txt)
        if self.aggregate == "mean":
            m = mask.unsqueeze(0).to(cos.dtype)
            return (cos * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        if self.aggregate == "max":
            return cos.masked_fill(~mask.unsqueeze(0), float("-inf")).amax(-1)
        return (cos * self.aspect_weights(mask).unsqueeze(0)).sum(-1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.scale() * self.similarity(img, txt, mask) + self.bias
