"""The Python API for notebooks and scripts.

    import mavl_cli as mavl

    m = mavl.load("model.safetensors")      # or mavl.load() for the default model
    m.labels, m.thresholds                   # label names, tuned thresholds (numpy)
    x = m.preprocess("film.png")             # [C, H, W] tensor, the encoder's own recipe
    logits = m.module(x[None])               # the nn.Module: image batch -> logits [B, L]
    m.predict(["a.png", "b.dcm"])            # the figures of `mavl predict --json`

``predict`` runs exactly the code of ``mavl predict`` (same decoding, same
model object), so its figures equal the command's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.inputs import collect_inputs
from mavl_cli.models.mavlmodel import score_images
from mavl_cli.models.modelfile import find_model, load_model
from mavl_cli.reports.tables import prediction_json
from mavl_cli.stages.predict import Prediction
from mavl_cli.trust import ood


class Model:
    """A loaded model file: labels, thresholds, preprocessing and the whole ``nn.Module``."""

    def __init__(self, loaded: Any, module: Any, device: str = "cpu") -> None:
        self._loaded = loaded
        self.module = module
        self.device = device

    def __repr__(self) -> str:
        return (f"mavl.Model({self.path}: {len(self.labels)} labels, encoder {self.meta.get('backbone')}, "
                f"scorer {self.meta.get('scorer') or 'fusion'})")

    @property
    def path(self) -> str:
        return str(self._loaded.file.path)

    @property
    def labels(self) -> list[str]:
        return list(self.module.labels)

    @property
    def thresholds(self) -> np.ndarray:
        return self.module.thresholds.detach().cpu().numpy().astype(np.float32)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._loaded.meta)

    def preprocess(self, image: Any) -> Any:
        """A path (PNG, JPEG, DICOM...) or PIL image -> the ``[C, H, W]`` input tensor."""
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise MavlError(f"{image}: image file not found", path=image)
        return self.module.preprocess(image)

    def probabilities(self, images: Any, batch_size: int | None = None) -> np.ndarray:
        """``[N, L]`` probabilities for paths or PIL images (in the order given)."""
        return self._score(images, batch_size)[1]

    def predict(self, images: Any, threshold: float | None = None, batch_size: int | None = None,
                ood_threshold: float | None = None) -> list[dict[str, Any]]:
        """One dict per image, as the ``images`` of ``mavl predict --json``: image, findings, positive, ood, ood_score."""

        if threshold is not None and not 0 <= threshold <= 1:
            raise MavlError(f"threshold must lie in [0, 1], got {threshold}")
        ood.check_percentile(ood_threshold)
        ids, probs, inputs = self._score(images, batch_size, with_inputs=True)
        th = self.thresholds if threshold is None else np.full(len(self.labels), threshold, np.float32)
        pred = Prediction(ids, self.labels, probs, th)
        pred.ood = ood.assess_model(self._loaded, inputs, ood_threshold)
        return prediction_json(pred)

    def _score(self, images: Any, batch_size: int | None, with_inputs: bool = False) -> Any:

        items = _as_list(images)
        if all(isinstance(x, (str, Path)) for x in items):
            found, _ = collect_inputs([str(x) for x in items])
            res = score_images(self.module, found, device=self.device, batch_size=batch_size)
            return (res.ids, res.probabilities, res.head_inputs) if with_inputs else (res.ids, res.probabilities)
        batch = torch.stack([self.preprocess(x) for x in items])
        module = self.module.to(batch.device)
        with torch.inference_mode():
            z = module.head_input(module.features(batch))
            probs = torch.sigmoid(module.head(z)).float().cpu().numpy()
        ids = [getattr(x, "filename", "") or f"image{i}" for i, x in enumerate(items)]
        return (ids, probs, z.float().cpu().numpy()) if with_inputs else (ids, probs)


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (str, Path)) or hasattr(images, "convert"):  # one path or one PIL image
        return [images]
    items = list(images) if isinstance(images, Iterable) else [images]
    if not items:
        raise MavlError("no images given")
    return items


def load(path: str | Path | None = None, weights: str | None = None, device: str = "cpu") -> Model:
    """Load a model file (default: ``$MAVL_MODEL``, then ``~/.mavl/model.safetensors``) with its encoder.

    ``weights`` overrides the encoder weights path recorded in the file.
    """

    loaded = load_model(find_model(str(path) if path is not None else None))
    return Model(loaded, loaded.module(weights), device)
