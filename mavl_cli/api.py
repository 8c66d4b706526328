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

from mavl_cli.errors import MavlError


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

    def predict(self, images: Any, threshold: float | None = None, batch_size: int | None = None) -> list[dict[str, Any]]:
        """One dict per image, as ``mavl predict --json`` prints: image, findings, positive."""
        from mavl_cli.report_view import prediction_json
        from mavl_cli.stages import Prediction

        if threshold is not None and not 0 <= threshold <= 1:
            raise MavlError(f"threshold must lie in [0, 1], got {threshold}")
        ids, probs = self._score(images, batch_size)
        th = self.thresholds if threshold is None else np.full(len(self.labels), threshold, np.float32)
        return prediction_json(Prediction(ids, self.labels, probs, th))

    def _score(self, images: Any, batch_size: int | None) -> tuple[list[str], np.ndarray]:
        import torch

        items = _as_list(images)
        if all(isinstance(x, (str, Path)) for x in items):
            from mavl_cli.datasets import collect_inputs
            from mavl_cli.mavlmodel import score_images

            found, _ = collect_inputs([str(x) for x in items])
            res = score_images(self.module, found, device=self.device, batch_size=batch_size)
            return res.ids, res.probabilities
        batch = torch.stack([self.preprocess(x) for x in items])
        module = self.module.to(batch.device)
        with torch.inference_mode():
            probs = torch.sigmoid(module(batch)).float().cpu().numpy()
        return [getattr(x, "filename", "") or f"image{i}" for i, x in enumerate(items)], probs


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
    from mavl_cli.modelfile import find_model, load_model

    loaded = load_model(find_model(str(path) if path is not None else None))
    return Model(loaded, loaded.module(weights), device)
