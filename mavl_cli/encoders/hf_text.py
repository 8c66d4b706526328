"""Text encoders: a Hugging Face model id or a local model folder.

The default is a clinical BERT; any encoder with a tokenizer works (the
offline demo uses MiniLM). Sentences are pooled over real tokens only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from mavl_cli.core.errors import MavlError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json", "sentencepiece.bpe.model")


@dataclass
class Encoded:
    vectors: Any  # numpy [n, D]
    truncated: list[dict[str, Any]] = field(default_factory=list)  # {"index", "tokens", "kept"}


def load_text_encoder(name_or_path: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(tokenizer, model) from a hub id or a local folder, with clear errors.

    Models whose config asks for their own Python code (``auto_map``) are
    refused unless ``trust_remote_code``.
    """

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # mavl draws its own progress; no second bar per model load
    local = Path(name_or_path)
    if local.exists():
        if not local.is_dir():
            raise MavlError(f"{local}: a text model must be a folder (config.json, weights, tokenizer files)", path=local)
        if not (local / "config.json").exists():
            raise MavlError(f"{local}: not a Hugging Face model folder (no config.json)", path=local)
        if not any((local / f).exists() for f in TOKENIZER_FILES):
            raise MavlError(f"{local}: model folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}...)", path=local)

        try:
            auto_map = json.loads((local / "config.json").read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            auto_map = None
        if auto_map and not trust_remote_code:
            raise MavlError(f"{local}: this text model needs its own Python code (auto_map in config.json); mavl does "
                            "not run it unless you pass --trust-remote-code", path=local)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise MavlError(f"{name_or_path}: text model folder not found", path=name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except MavlError:
        raise
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise MavlError(f"text model {name_or_path!r} needs its own Python code; mavl does not run it unless you "
                            "pass --trust-remote-code") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if local.exists():
            raise MavlError(f"{local}: cannot load text model ({str(exc).splitlines()[0][:160]})", path=local) from None
        why = "HF_HUB_OFFLINE is set" if offline else str(exc).splitlines()[0][:160]
        raise MavlError(
            f"cannot load text model {name_or_path!r} from the model hub ({why}); pass a local model folder with --text-model"
        ) from None
    model.eval()
    return tokenizer, model


def max_tokens(tokenizer: Any, model: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", 512) or 512
    tok_limit = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_limit, 512))


def encode_texts(
    texts: list[str],
    tokenizer: Any,
    model: Any,
    pool: Callable[[Any, Any], Any],
    batch_size: int = 32,
    device: Any = "cpu",
    advance: Callable[..., None] | None = None,
) -> Encoded:
    """Encode sentences to pooled vectors; report (never hide) truncation."""

    limit = max_tokens(tokenizer, model)
    full = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    truncated = [
        {"index": i, "tokens": len(ids), "kept": limit} for i, ids in enumerate(full) if len(ids) > limit
    ]
    model = model.to(device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            out.append(pool(hidden, enc["attention_mask"]).float().cpu())
            if advance:
                advance(len(chunk))
    vectors = torch.cat(out).numpy() if out else None
    return Encoded(vectors=vectors, truncated=truncated)
