"""Text encoders behind one spec: ``[hf:]ID`` (BERT family, sentence-transformers folders) or ``open_clip:ID``.

- ``hf:ID`` or a bare ``ID`` (hub id or local folder; for text, no prefix
  means transformers): any ``AutoModel`` with a tokenizer, pooled over real
  tokens (``mean``, the default, or ``cls``). Models whose config needs
  remote code (``auto_map``) are refused unless ``--trust-remote-code``.
- a sentence-transformers folder (``modules.json``): its own modules are
  honoured: ``Transformer`` (``max_seq_length`` from
  ``sentence_bert_config.json``), ``Pooling`` (cls / max / mean /
  mean_sqrt_len, concatenated in sentence-transformers' order), ``Dense`` and
  ``Normalize``, so vectors equal ``SentenceTransformer(folder).encode(texts)``.
  An explicit ``--pooling`` replaces the folder's pooling (and drops its
  Dense/Normalize, which were trained on that pooling).
- ``open_clip:ID``: the text tower of an open_clip model (same IDs as the image
  family) with open_clip's own tokenizer: vectors in the space its image
  tower projects to (``encode_text``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders import build_image_encoder
from mavl_cli.encoders.common import load_state_dict
from mavl_cli.encoders.hf_text import load_text_encoder, max_tokens
from mavl_cli.encoders.pooling import POOLING, get_pooling
from mavl_cli.encoders.spec import ALIASES

ST_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers' concat order
_NEW_MODES = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
              "mean_sqrt_len": "mean_sqrt_len_tokens"}


@dataclass
class TextSpec:
    family: str
    id: str
    pooling: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def parse(cls, text: str, pooling: str | None = None, trust_remote_code: bool = False) -> "TextSpec":
        head, sep, rest = (text or "").partition(":")
        if sep and head.lower() in ALIASES and not Path(text).exists():
            family = ALIASES[head.lower()]
            if family in ("timm", "xrv"):
                raise MavlError(f"{text!r}: the {family} family has image encoders only; for text use hf:ID, a "
                                "sentence-transformers folder, or open_clip:ID")
            return cls(family, rest, pooling, trust_remote_code)
        return cls("hf", text, pooling, trust_remote_code)


@dataclass
class Encoded:
    vectors: Any  # numpy [n, D]
    truncated: list[dict[str, Any]] = field(default_factory=list)  # {"index", "tokens", "kept"}


class HFText:
    """A transformers text model (optionally with sentence-transformers' modules after it)."""

    def __init__(self, name: str, tokenizer: Any, model: Any, pooling: str, st: dict[str, Any] | None = None) -> None:
        self.name, self.tokenizer, self.model, self.st = name, tokenizer, model, st
        self.pooling = pooling

        self.limit = max_tokens(tokenizer, model)
        if st and st.get("max_seq_length"):
            self.limit = min(self.limit, int(st["max_seq_length"]))

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": "hf", "id": self.name, "pooling": self.pooling}
        if self.st:
            out["sentence_transformers"] = {k: v for k, v in self.st.items() if k != "dense"}
        return out

    def _pool(self, hidden: Any, mask: Any) -> Any:


        if self.pooling != "folder":
            return get_pooling(self.pooling)(hidden, mask)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        parts = []
        for mode in self.st["modes"]:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
            elif mode == "mean_tokens":
                parts.append((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9))
            else:
                parts.append((hidden * m).sum(1) / torch.sqrt(m.sum(1).clamp_min(1e-9)))
        out = torch.cat(parts, dim=1)
        for dense in self.st.get("dense", []):
            out = dense(out)
        if self.st.get("normalize"):
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        return out

    def encode(self, texts: list[str], batch_size: int = 32, device: Any = "cpu",
               advance: Callable[..., None] | None = None) -> Encoded:

        full = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        truncated = [{"index": i, "tokens": len(ids), "kept": self.limit} for i, ids in enumerate(full) if len(ids) > self.limit]
        model = self.model.to(device)
        for d in (self.st or {}).get("dense", []):
            d.to(device)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start: start + batch_size]
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.limit, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = model(**enc).last_hidden_state
                out.append(self._pool(hidden, enc["attention_mask"]).float().cpu())
                if advance:
                    advance(len(chunk))
        return Encoded(torch.cat(out).numpy() if out else None, truncated)


class CLIPText:
    """open_clip's text tower as a mavl text encoder."""

    def __init__(self, name: str, tower: Any) -> None:
        self.name, self.tower, self.pooling = name, tower, "open_clip"

    def meta(self) -> dict[str, Any]:
        return {"family": "open_clip", "id": self.name, "pooling": "open_clip", "context_length": self.tower.context_length}

    def encode(self, texts: list[str], batch_size: int = 32, device: Any = "cpu",
               advance: Callable[..., None] | None = None) -> Encoded:

        limit = self.tower.context_length
        counts = self.tower.token_counts(texts)
        truncated = [{"index": i, "tokens": n, "kept": limit} for i, n in enumerate(counts) if n > limit]
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start: start + batch_size]
                out.append(self.tower.encode(chunk, device).float().cpu())
                if advance:
                    advance(len(chunk))
        return Encoded(torch.cat(out).numpy() if out else None, truncated)


def _st_config(folder: Path) -> dict[str, Any] | None:
    """A sentence-transformers folder's modules, read without sentence-transformers."""
    mod_file = folder / "modules.json"
    if not mod_file.exists():
        return None
    try:
        modules = json.loads(mod_file.read_text())
    except (OSError, ValueError):
        raise MavlError(f"{mod_file}: not valid JSON", path=mod_file) from None
    st: dict[str, Any] = {"modes": ["mean_tokens"], "normalize": False, "dense": [], "dense_files": []}
    for m in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        path = folder / str(m.get("path", ""))
        if kind == "Transformer":
            if str(m.get("path", "")) not in ("", "."):
                raise MavlError(f"{folder}: the Transformer module lives in {m.get('path')!r}; mavl reads it from the "
                                "folder itself (sentence-transformers' standard layout)", path=folder)
            cfg_file = folder / "sentence_bert_config.json"
            if cfg_file.exists():
                st["max_seq_length"] = json.loads(cfg_file.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            cfg = json.loads((path / "config.json").read_text())
            if "pooling_mode" in cfg:  # sentence-transformers >= 5: a name or a list, concatenated in that order
                names = [cfg["pooling_mode"]] if isinstance(cfg["pooling_mode"], str) else list(cfg["pooling_mode"])
                bad = [n for n in names if n not in _NEW_MODES]
                if bad:
                    raise MavlError(f"{path}: pooling {bad[0]!r} is not supported by mavl (cls, max, mean, "
                                    "mean_sqrt_len_tokens are)", path=path)
                st["modes"] = [_NEW_MODES[n] for n in names]
            else:  # older folders: one boolean per mode, concatenated in a fixed order
                other = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k[13:] not in ST_MODES]
                if other:
                    raise MavlError(f"{path}: pooling {other[0][13:]!r} is not supported by mavl (cls, max, mean, "
                                    "mean_sqrt_len are)", path=path)
                st["modes"] = [k for k in ST_MODES if cfg.get(f"pooling_mode_{k}")]
            if not st["modes"]:
                raise MavlError(f"{path}: no pooling mode is switched on", path=path)
        elif kind == "Dense":
            st["dense"].append(_dense(path))
            st["dense_files"].append(str(m.get("path")))
        elif kind == "Normalize":
            st["normalize"] = True
        else:
            raise MavlError(f"{folder}: sentence-transformers module {kind!r} is not supported by mavl "
                            "(Transformer, Pooling, Dense, Normalize are)", path=folder)
    return st


def _dense(path: Path) -> Any:


    cfg = json.loads((path / "config.json").read_text())
    act_name = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    act = getattr(torch.nn, act_name, None)
    if act is None:
        raise MavlError(f"{path}: unknown activation {act_name!r} in the Dense module", path=path)
    linear = torch.nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)))
    wfile = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()), None)
    if wfile is None:
        raise MavlError(f"{path}: Dense module without weights", path=path)
    state = load_state_dict(wfile)
    linear.load_state_dict({k.split("linear.", 1)[-1]: v for k, v in state.items()})
    return torch.nn.Sequential(linear, act()).eval()


def load_text(text: str, pooling: str | None = None, trust_remote_code: bool = False) -> Any:
    """A text encoder (``encode(texts, batch_size, device, advance) -> Encoded``) for a text spec."""
    spec = TextSpec.parse(text, pooling, trust_remote_code)
    if pooling == "folder":  # recorded for a sentence-transformers folder's own pooling
        pooling = None
    if spec.family == "open_clip":
        if pooling not in (None, "open_clip"):
            raise MavlError("--pooling does not apply to open_clip text towers (they pool as they were trained)")
        enc = build_image_encoder(f"open_clip:{spec.id}")
        return CLIPText(spec.id, enc.text_encoder())

    if pooling is not None and pooling not in POOLING:
        raise MavlError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLING)}")
    folder = Path(spec.id).expanduser()
    st = _st_config(folder) if folder.is_dir() else None
    tokenizer, model = load_text_encoder(spec.id, trust_remote_code=trust_remote_code)
    if st is not None and pooling is None:
        return HFText(spec.id, tokenizer, model, "folder", st)
    return HFText(spec.id, tokenizer, model, pooling or "mean", {"max_seq_length": st.get("max_seq_length")} if st else None)


def st_pooling_name(st: dict[str, Any]) -> str:
    """A readable name for a folder's pooling, e.g. ``mean+normalize``."""
    name = "+".join(m.replace("_tokens", "").replace("_token", "") for m in st["modes"])
    if st.get("dense"):
        name += "+dense"
    return name + ("+normalize" if st.get("normalize") else "")


