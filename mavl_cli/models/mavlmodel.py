"""One model object: :class:`MavlModel`, an ``nn.Module`` from image batch to label logits.

``MavlModel = encoder -> (LRF head) -> scoring head``, rebuilt from a model
file alone: the file records the encoder spec and its preprocessing (see
:mod:`mavl_cli.models.modelfile`), the LRF head and fusion weights, the label text
embeddings and the thresholds; text and thresholds become buffers. The
scoring head is the trained fusion (``mavl fuse``) or an aligned model's
prompts (``mavl zero-shot``), see :mod:`mavl_cli.models.heads`.

Every scoring path goes through the same head: ``predict`` on images and the
Python API run the whole module; ``evaluate``/``tune-threshold``/``predict``
on an embeddings file run its head on the stored features (the encoder ran
when the file was made). This module imports torch: import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_BATCH
from mavl_cli.core.runtime import resolve_device
from mavl_cli.encoders import encoder_from_meta
from mavl_cli.encoders.loader import (
    default_batch_size,
    default_workers,
    prefetch_batches,
)
from mavl_cli.encoders.preprocess import (
    decode_size,
    load_and_prepare,
    normalize_batch,
    prepare_image,
    stack_batch,
)
from mavl_cli.io.imageio import as_radiograph
from mavl_cli.models.calibrated import CalibratedHead
from mavl_cli.models.carried import embedded_weights_file
from mavl_cli.models.heads import FusionHead, ZeroShotHead
from mavl_cli.models.lrf import head_from_tensors


class MavlModel(nn.Module):
    """Image batch (the encoder's normalised input) -> logits ``[B, L]``.

    ``encoder`` may be None for a head-only model (scoring stored features).
    ``preprocessing`` is the encoder's recorded recipe: :meth:`preprocess`
    turns a path or PIL image into the input tensor exactly as ``embed-images``
    does.
    """

    def __init__(self, head: nn.Module, labels: list[str], thresholds: torch.Tensor, encoder: nn.Module | None = None,
                 lrf: nn.Module | None = None, preprocessing: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.lrf = lrf
        self.head = head
        self.labels = list(labels)
        self.preprocessing = dict(preprocessing or {})
        self.register_buffer("thresholds", thresholds.float())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled features ``[B, D]`` (what ``embed-images`` writes)."""
        if self.encoder is None:
            raise MavlError("this model was built without its image encoder (head only)")
        return self.encoder(images).float()

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features -> the scoring head's input (through the LRF head when there is one)."""
        return self.lrf.embed(features) if self.lrf is not None else features

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_input(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(images))

    def preprocess(self, image: Any) -> torch.Tensor:
        """A path or PIL image -> the ``[C, H, W]`` input tensor (the encoder family's own recipe)."""

        if not self.preprocessing:
            raise MavlError("this model records no image preprocessing")
        if isinstance(image, (str, Path)):
            arr = load_and_prepare(Path(image), self.preprocessing)
        else:  # the same decoding rules as a file's (16-bit windowing, alpha, palette, EXIF)

            arr = prepare_image(as_radiograph(image, decode_size(self.preprocessing)), self.preprocessing)
        return normalize_batch(stack_batch([arr]), self.preprocessing)[0]


# ----------------------------------------------------------------------------- building from a model file


def scorer_kind(meta: dict[str, Any]) -> str:
    """``fusion`` (``mavl fuse``) or ``zeroshot`` (``mavl zero-shot``)."""
    return str(meta.get("scorer") or "fusion")


def build_head(loaded: Any, text: np.ndarray | None = None, mask: np.ndarray | None = None,
               bias: np.ndarray | None = None, negative: np.ndarray | None = None, calibrated: bool = True) -> nn.Module:
    """The scoring head of a loaded model file; ``text``/``mask``/``bias``/``negative`` replace the
    stored ones (``predict --descriptions`` appends labels described only in text). With a stored
    `mavl calibrate` map (and ``calibrated``) the head's logits are the calibrated ones."""
    head = _raw_head(loaded, text, mask, bias, negative)
    cal = loaded.calibration if calibrated else None
    if cal is None:
        return head

    return CalibratedHead(head, cal).eval()


def _raw_head(loaded: Any, text: np.ndarray | None, mask: np.ndarray | None, bias: np.ndarray | None,
              negative: np.ndarray | None) -> nn.Module:

    tensors = loaded.file.tensors
    t = np.array(tensors["text.embeddings"] if text is None else text, np.float32)
    m = np.array(tensors["text.mask"] if mask is None else mask).astype(bool)
    if scorer_kind(loaded.meta) == "zeroshot":
        neg = tensors["zeroshot.negative"] if negative is None else negative
        return ZeroShotHead(torch.from_numpy(t), torch.from_numpy(m), torch.from_numpy(np.array(neg, np.float32)),
                            float(np.asarray(tensors["zeroshot.logit_scale"]).reshape(-1)[0])).eval()
    fusion = loaded.fusion()
    with torch.no_grad():
        if bias is not None:
            fusion.bias = nn.Parameter(torch.from_numpy(bias.astype(np.float32)))
        extra = t.shape[0] - fusion.aspect_logits.shape[0]
        if extra > 0:  # labels added from text: no learned aspect weights, so uniform = mean
            pad = torch.zeros(extra, fusion.aspect_logits.shape[1])
            fusion.aspect_logits = nn.Parameter(torch.cat([fusion.aspect_logits, pad]))
    return FusionHead(fusion, torch.from_numpy(t), torch.from_numpy(m)).eval()


def build_lrf(loaded: Any) -> nn.Module | None:
    lrf = {k[4:]: v for k, v in loaded.file.tensors.items() if k.startswith("lrf.")}
    return head_from_tensors(lrf) if lrf else None


def image_encoder(meta: dict[str, Any], weights: str | None = None,
                  tensors: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder module, preprocessing) recorded in a model file's metadata; with the file's ``tensors``, a
    fine-tuned encoder carried in the file (``encoder.*``) is rebuilt from them (``weights`` overrides)."""

    if weights is None and tensors is not None:
        weights = embedded_weights_file(tensors, meta)
    enc = encoder_from_meta(meta, weights)
    return enc, dict(enc.preprocessing)


@dataclass
class LabelText:
    """Label text replacing a model's own (``predict --descriptions`` adds labels)."""

    labels: list[str]
    text: np.ndarray
    mask: np.ndarray
    thresholds: np.ndarray
    bias: np.ndarray | None = None  # fusion models
    negative: np.ndarray | None = None  # zero-shot models


def from_loaded(loaded: Any, weights: str | None = None, with_encoder: bool = True,
                label_text: LabelText | None = None) -> MavlModel:
    """A :class:`MavlModel` (eval mode, CPU) from a :class:`~mavl_cli.models.modelfile.LoadedModel`."""
    encoder, prep = (None, dict(loaded.meta.get("preprocessing") or {}))
    if with_encoder:
        encoder, prep = image_encoder(loaded.meta, weights, loaded.file.tensors)
    lt = label_text
    head = build_head(loaded, *((lt.text, lt.mask, lt.bias, lt.negative) if lt else ()))
    labels, th = (lt.labels, lt.thresholds) if lt else (loaded.labels, loaded.thresholds)
    model = MavlModel(head, labels, torch.from_numpy(np.asarray(th, np.float32)), encoder, build_lrf(loaded), prep)
    if with_encoder:
        feat_dim = (model.lrf.proj.in_features if model.lrf is not None else None)
        if feat_dim is not None and getattr(encoder, "dim", feat_dim) != feat_dim:
            raise MavlError(f"{loaded.file.path}: its LRF head takes {feat_dim}-d features, but the encoder gives {encoder.dim}-d")
    return model.eval()


# ----------------------------------------------------------------------------- scoring images


@dataclass
class ImageScores:
    ids: list[str]
    probabilities: np.ndarray  # [N, L]
    head_inputs: np.ndarray  # [N, D'] what the head saw (for --explain)
    skipped: list[dict[str, str]] = field(default_factory=list)


def score_images(model: MavlModel, items: list[Any], device: str = "auto", batch_size: int | None = None,
                 workers: int | None = None, skip_bad: bool = False, advance: Callable[..., None] | None = None) -> ImageScores:
    """Decode ``items`` (:class:`~mavl_cli.models.embed.ImageItem`) in background threads and run the whole model."""

    if not items:
        raise MavlError("no images to score")

    if batch_size is not None and not 0 <= batch_size <= MAX_BATCH:  # 0 or None: the device's default
        raise MavlError(f"batch size must lie in 1..{MAX_BATCH}, got {batch_size}")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    bs = batch_size or default_batch_size(dev.type)
    nw = default_workers(dev.type) if workers is None else workers
    ids: list[str] = []
    probs, inputs, skipped = [], [], []
    with torch.inference_mode():
        for chunk, batch, ok, bad in prefetch_batches(items, model.preprocessing, bs, nw):
            if bad and not skip_bad:
                first = bad[0]
                raise MavlError(f"{first['path']}: {first['reason']} (use --skip-bad to skip unreadable images)", path=first["path"])
            skipped.extend(bad)
            if ok:
                z = model.head_input(model.features(normalize_batch(batch, model.preprocessing, dev)))
                probs.append(torch.sigmoid(model.head(z)).float().cpu().numpy())
                inputs.append(z.float().cpu().numpy())
                ids.extend(chunk[i].id for i in ok)
            if advance:
                advance(len(chunk), skipped=len(skipped))
    if not ids:
        raise MavlError("no image could be read (all skipped as unreadable)")
    return ImageScores(ids, np.concatenate(probs).astype(np.float32), np.concatenate(inputs).astype(np.float32), skipped)
