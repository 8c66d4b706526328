"""Scoring heads: fusion-input features ``[B, D]`` -> label logits ``[B, L]``.

Both heads carry their label text as buffers, so a head alone turns features
into logits and moves with ``.to(device)``:

- :class:`FusionHead`: the trained fusion (:class:`~mavl_cli.models.fusion.FusionModel`)
  with the label text embeddings ``[L, A, Dt]`` and aspect mask as buffers.
- :class:`ZeroShotHead`: an aligned image-text model's prompts (``mavl zero-shot``).
  For label ``l`` with positive prompt slots ``P_l`` and one negative prompt
  embedding ``n_l`` (all L2-normalised, as the image feature ``v`` is), the
  logit is ``s * (mean_{a in P_l} cos(v, p_a) - cos(v, n_l))`` with ``s`` the
  model's own logit scale, so ``sigmoid(logit)`` is the softmax over the pair
  ``(s cos(v, p), s cos(v, n))``: CheXzero's positive-vs-negative prompt score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mavl_cli.models.fusion import FusionModel


class FusionHead(nn.Module):
    def __init__(self, fusion: FusionModel, text: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.fusion = fusion
        self.register_buffer("text", text.float())
        self.register_buffer("mask", mask.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion(x, self.text, self.mask)

    def aspect_cosines(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion.aspect_cosines(x, self.text)


class ZeroShotHead(nn.Module):
    def __init__(self, positive: torch.Tensor, positive_mask: torch.Tensor, negative: torch.Tensor,
                 logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("positive", F.normalize(positive.float(), dim=-1))  # [L, A, D]
        self.register_buffer("positive_mask", positive_mask.bool())  # [L, A]
        self.register_buffer("negative", F.normalize(negative.float(), dim=-1))  # [L, D]
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def aspect_cosines(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine of each image with each positive prompt slot: ``[B, L, A]``."""
        return torch.einsum("bd,lad->bla", F.normalize(x.float(), dim=-1), self.positive)

    def pair_cosines(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) cosines per label, ``[B, L]`` each."""
        cos = self.aspect_cosines(x)
        m = self.positive_mask.unsqueeze(0).to(cos.dtype)
        pos = (cos * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        neg = F.normalize(x.float(), dim=-1) @ self.negative.T
        return pos, neg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos, neg = self.pair_cosines(x)
        return self.logit_scale * (pos - neg)
