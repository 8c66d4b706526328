"""`mavl zero-shot`: a model file from an aligned image-text model, without training.

For each label, prompts are written from the descriptions file and encoded
with the model's own text tower (its own tokenizer); at scoring time the
image embedding is compared with them (:class:`mavl_cli.models.heads.ZeroShotHead`):

- ``--prompts pair`` (default): positive prompts from the label name
  (:data:`POSITIVE_TEMPLATES`) against negative ones (:data:`NEGATIVE_TEMPLATES`);
  each set is ensembled (mean of the normalised embeddings, renormalised).
  ``P(label) = softmax(s cos(v, pos), s cos(v, neg))[pos]``, as CheXzero does.
- ``--prompts aspects``: the positive side is each described sentence or
  aspect of the label (mean of the per-aspect cosines), against the same
  negative prompts.

A descriptions JSON whose labels carry ``positive`` and ``negative`` entries
(``{"Edema": {"positive": [...], "negative": [...]}}``) gives the prompts
verbatim. The file is an ordinary ``model`` file (``scorer: zeroshot``):
``tune-threshold``, ``evaluate`` and ``predict`` take it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.encoders import build_image_encoder
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.io.descriptions import Descriptions, read_descriptions
from mavl_cli.models.mavlmodel import LabelText

#: Written for mavl; ``{label}`` is the label name in lower case.
POSITIVE_TEMPLATES = ("{label}", "there is {label}", "the film shows {label}", "findings consistent with {label}")
NEGATIVE_TEMPLATES = ("no {label}", "there is no {label}", "the film shows no {label}", "no evidence of {label}")
PROMPT_MODES = ("pair", "aspects")


@dataclass
class Prompts:
    labels: list[str]
    aspects: list[str]  # positive slot names
    positive: list[list[list[str]]]  # [L][A] -> texts ensembled into that slot ([] = no slot)
    negative: list[list[str]]  # [L] -> texts ensembled into the negative prompt

    def texts(self) -> list[str]:
        out = {t for row in self.positive for slot in row for t in slot} | {t for row in self.negative for t in row}
        return sorted(out)


def _fill(templates: tuple[str, ...], label: str) -> list[str]:
    return [t.format(label=label.lower()) for t in templates]


def write_prompts(desc: Descriptions, mode: str = "pair") -> Prompts:
    """Prompts per label from a descriptions file (see the module docstring)."""
    if mode not in PROMPT_MODES:
        raise MavlError(f"unknown --prompts {mode!r}; use one of {', '.join(PROMPT_MODES)}")
    idx = {a: i for i, a in enumerate(desc.aspects)}

    def given(row: list[str | None], key: str) -> list[str]:
        return [t for a, i in idx.items() if a.split("#")[0] == key and (t := row[i])]

    explicit = desc.form == "aspects" and "positive" in idx and "negative" in idx
    half = [k for k in ("positive", "negative") if k in idx] if desc.form == "aspects" and not explicit else []
    if half:  # explicit prompts on one side only would be silently replaced by the templates
        other = "negative" if half[0] == "positive" else "positive"
        raise MavlError(f"the descriptions give {half[0]!r} prompts but no {other!r} ones (or none that are not empty); "
                        f"give both for every label, or neither to use mavl's templates")
    if explicit:
        missing = [lab for lab, row in zip(desc.labels, desc.texts) if not given(row, "positive") or not given(row, "negative")]
        if missing:
            raise MavlError(f"label(s) {', '.join(missing)} need both 'positive' and 'negative' prompts")
    positive, negative = [], []
    aspects = ["prompt"] if (mode == "pair" or explicit) else list(desc.aspects)
    for lab, row in zip(desc.labels, desc.texts):
        if explicit:
            positive.append([given(row, "positive")])
            negative.append(given(row, "negative"))
            continue
        negative.append(_fill(NEGATIVE_TEMPLATES, lab))
        if mode == "pair":
            positive.append([_fill(POSITIVE_TEMPLATES, lab)])
        else:
            positive.append([[t] if t else [] for t in row])
    return Prompts(list(desc.labels), aspects, positive, negative)


# ----------------------------------------------------------------------------- the aligned model


def aligned_towers(spec: Any) -> tuple[Any, Any]:
    """(image encoder, its aligned text tower) of an ``open_clip:`` spec, from the encoder registry."""

    image = build_image_encoder(spec)
    if not getattr(image, "has_text", False):
        raise MavlError(f"{spec.name}: this encoder has no aligned text tower")
    return image, image.text_encoder()


def encode_prompts(text: Any, texts: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Text -> L2-normalised embedding with the aligned text tower (``text.encode(list) -> [N, D]``)."""

    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            emb = F.normalize(text.encode(chunk).float(), dim=-1).cpu().numpy()
            out.update(zip(chunk, emb))
    return out


def _ensemble(vecs: list[np.ndarray]) -> np.ndarray:
    m = np.mean(vecs, axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def prompt_tensors(prompts: Prompts, emb: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive ``[L, A, D]``, positive mask ``[L, A]``, negative ``[L, D]``) from encoded prompts."""
    dim = len(next(iter(emb.values())))
    L, A = len(prompts.labels), len(prompts.aspects)
    pos = np.zeros((L, A, dim), np.float32)
    mask = np.zeros((L, A), np.uint8)
    for li, row in enumerate(prompts.positive):
        for ai, slot in enumerate(row):
            if slot:
                pos[li, ai] = _ensemble([emb[t] for t in slot])
                mask[li, ai] = 1
    neg = np.stack([_ensemble([emb[t] for t in row]) for row in prompts.negative])
    return pos, mask, neg


def logit_scale(text: Any) -> float:
    """The CLIP model's own temperature, ``exp(logit_scale)`` (open_clip clamps it at 100)."""
    return float(text.clip.logit_scale.detach().exp().clamp(max=100.0))


# ----------------------------------------------------------------------------- the model file


@dataclass
class ZeroShotOptions:
    encoder: str
    descriptions: str
    output: str
    weights: str | None = None
    prompts: str = "pair"


def build_zero_shot(opts: ZeroShotOptions) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(tensors, metadata, summary) of a zero-shot ``model`` file."""

    spec = EncoderSpec.parse(opts.encoder, opts.weights)
    if spec.family != "open_clip":
        raise MavlError(f"--encoder {opts.encoder!r}: zero-shot needs aligned image and text towers; "
                        "use an open_clip:ID encoder (a folder in open_clip's layout, hf-hub:..., or NAME --weights FILE)")
    desc = read_descriptions(opts.descriptions)
    prompts = write_prompts(desc, opts.prompts)
    image, text = aligned_towers(spec)
    emb = encode_prompts(text, prompts.texts())
    pos, mask, neg = prompt_tensors(prompts, emb)
    if pos.shape[2] != image.dim:
        raise MavlError(f"{opts.encoder}: text embeddings are {pos.shape[2]}-d but image features {image.dim}-d; "
                        "the image encoder must pool to the aligned (projected) embedding")
    scale = logit_scale(text)
    tensors = {"text.embeddings": pos, "text.mask": mask, "zeroshot.negative": neg,
               "zeroshot.logit_scale": np.array([scale], np.float32),
               "thresholds": np.full(len(prompts.labels), DEFAULT_THRESHOLD, np.float32)}
    meta = {
        **image.to_meta(),
        "scorer": "zeroshot",
        "labels": prompts.labels,
        "aspects": prompts.aspects,
        "aspect_texts": prompts.positive,
        "negative_texts": prompts.negative,
        "text_model": spec.name,
        "pooling": None,
        "fusion": None,
        "lrf": None,
        "zeroshot": {"prompts": opts.prompts, "logit_scale": scale, "descriptions_file": str(opts.descriptions),
                     "positive_templates": list(POSITIVE_TEMPLATES), "negative_templates": list(NEGATIVE_TEMPLATES)},
        "threshold": {"method": "default", "value": DEFAULT_THRESHOLD, "tuned_on": None},
    }
    summary = {"encoder": spec.name, "labels": len(prompts.labels), "prompts": opts.prompts,
               "positive slots": len(prompts.aspects), "texts encoded": len(emb), "dim": int(pos.shape[2]),
               "logit scale": round(scale, 3)}
    return tensors, meta, summary


def extend_labels(loaded: Any, desc: Descriptions, thresholds: np.ndarray) -> Any:
    """Labels described only in text, added to a zero-shot model (``predict --descriptions``)."""

    meta = loaded.meta
    zs = meta.get("zeroshot") or {}
    prompts = write_prompts(desc, zs.get("prompts") or "pair")
    if prompts.aspects != list(meta.get("aspects") or []):
        raise MavlError(f"the new labels' prompt slots ({', '.join(prompts.aspects)}) differ from the model's "
                        f"({', '.join(meta.get('aspects') or [])}); describe them in the same form")
    _, text = aligned_towers(EncoderSpec.from_meta(meta))
    pos, mask, neg = prompt_tensors(prompts, encode_prompts(text, prompts.texts()))
    t = loaded.file.tensors
    return LabelText(list(loaded.labels) + prompts.labels, np.concatenate([t["text.embeddings"], pos]),
                     np.concatenate([t["text.mask"], mask]), thresholds,
                     negative=np.concatenate([t["zeroshot.negative"], neg]))
