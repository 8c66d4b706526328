"""`embed-text`: label descriptions -> ``[L, A, D]`` embeddings plus an aspect mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mavl_cli.core.runtime import resolve_device
from mavl_cli.encoders.text import HFText, load_text
from mavl_cli.io.descriptions import Descriptions


@dataclass
class TextEmbeddings:
    embeddings: np.ndarray  # [L, A, D]
    mask: np.ndarray  # [L, A] uint8
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: list[dict[str, Any]] = field(default_factory=list)


def embed_descriptions(
    desc: Descriptions,
    text_model: str,
    pooling: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    advance: Callable[..., None] | None = None,
    encoder: Any = None,
    trust_remote_code: bool = False,
) -> TextEmbeddings:
    """Encode every (label, aspect) text once; missing aspects stay zero and masked.

    ``text_model``: a text spec (``[hf:]ID``, a sentence-transformers folder,
    ``open_clip:ID``; see :mod:`mavl_cli.encoders.text`); ``pooling`` None = the
    encoder's own default. ``encoder``: an already loaded text encoder.
    """

    if encoder is None:
        encoder = load_text(text_model, pooling, trust_remote_code)
    elif isinstance(encoder, tuple):  # (tokenizer, model) from older callers

        encoder = HFText(text_model, encoder[0], encoder[1], pooling or "mean")
    pooling = encoder.pooling
    flat = desc.flat()
    enc = encoder.encode([t for _, _, t in flat], batch_size, resolve_device(device), advance)
    dim = enc.vectors.shape[1]
    emb = np.zeros((len(desc.labels), len(desc.aspects), dim), np.float32)
    mask = np.zeros((len(desc.labels), len(desc.aspects)), np.uint8)
    for (li, ai, _), v in zip(flat, enc.vectors):
        emb[li, ai] = v
        mask[li, ai] = 1
    truncated = [
        {"label": desc.labels[flat[t["index"]][0]], "aspect": desc.aspects[flat[t["index"]][1]],
         "tokens": t["tokens"], "kept": t["kept"], "lost": t["tokens"] - t["kept"]}
        for t in enc.truncated
    ]
    meta = {
        "labels": desc.labels,
        "aspects": desc.aspects,
        "texts": desc.texts,
        "form": desc.form,
        "text_model": text_model,
        "pooling": pooling,
        "text_encoder": encoder.meta(),
        "text_dim": int(dim),
        "truncated": truncated,
    }
    return TextEmbeddings(emb, mask, meta, truncated)
