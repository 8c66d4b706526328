"""The fused model file: everything `predict`, `evaluate` and `tune-threshold` need.

One ``model`` safetensors file holds the LRF head (``lrf.*``), the fusion
projectors (``fusion.*``), the label text embeddings (``text.*``), the
thresholds, and in its metadata the label names, the backbone id, weights
and preprocessing, the text model and pooling, and how thresholds were set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.core.home import default_model_path
from mavl_cli.evaluation.calibration import Calibration
from mavl_cli.io.files import atomic_write_bytes, check_folder, check_output_path
from mavl_cli.io.mavlfile import MavlFile, read_file
from mavl_cli.models.carried import ENCODER_PREFIX, read_finetuned_weights
from mavl_cli.models.fusion import FusionModel
from mavl_cli.models.lrf import lrf_features
from mavl_cli.models.mavlmodel import build_head, from_loaded


def check_install_default(inputs: list[Any] = ()) -> Path:
    """Fail before any work if the default model cannot be installed: ``$MAVL_HOME`` under a
    regular file or unwritable, the default path not a regular file, or one of ``inputs``."""

    dest = default_model_path()
    try:
        check_folder(dest.parent, create=True, what="mavl's home folder ($MAVL_HOME)")
    except MavlError as exc:
        raise MavlError(f"cannot install the default model: {exc}") from None
    if dest.parent.is_dir():
        check_output_path(dest, [p for p in inputs if p], may_replace=[dest])
    return dest


def install_default(data: bytes, inputs: list[Any] = ()) -> Path:
    """Make these model-file bytes the default for `mavl predict` (atomically)."""

    dest = check_install_default(inputs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MavlError(f"cannot install the default model: {dest.parent}: {exc.strerror or exc}") from None
    atomic_write_bytes(dest, data)
    return dest


def find_model(explicit: str | None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("MAVL_MODEL")
    if env:
        return env
    p = default_model_path()
    if p.exists():
        return str(p)
    raise MavlError(
        f"no model given and none found (no --model, $MAVL_MODEL unset, nothing at {p}); "
        "run `mavl demo` or `mavl fuse ... --set-default` to make one"
    )


def build_model(
    fusion_state: dict[str, Any],
    fusion_config: dict[str, Any],
    text: MavlFile,
    image_meta: dict[str, Any],
    lrf: MavlFile | None,
    extra_meta: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Assemble the tensors and metadata of a ``model`` file."""
    tensors: dict[str, Any] = {f"fusion.{k}": v for k, v in fusion_state.items()}
    if lrf is not None:
        tensors.update({f"lrf.{k}": v for k, v in lrf.tensors.items()})
    tensors["text.embeddings"] = text.tensors["embeddings"]
    tensors["text.mask"] = text.tensors["mask"]
    carried = read_finetuned_weights(lrf) if lrf is not None else None
    if carried is not None:  # the model file alone rebuilds the fine-tuned encoder
        tensors.update({f"{ENCODER_PREFIX}{k}": v for k, v in carried[0].items()})
    labels = text.labels()
    tensors["thresholds"] = np.full(len(labels), DEFAULT_THRESHOLD, np.float32)
    meta = {
        "labels": labels,
        "aspects": text.meta.get("aspects", []),
        "aspect_texts": text.meta.get("texts", []),
        "text_model": text.meta.get("text_model"),
        "pooling": text.meta.get("pooling"),
        "fusion": fusion_config,
        "backbone": image_meta.get("backbone"),
        "backbone_weights": image_meta.get("backbone_weights"),
        "backbone_args": image_meta.get("backbone_args", {}),
        "preprocessing": image_meta.get("preprocessing"),
        **({"encoder": image_meta["encoder"]} if image_meta.get("encoder") else {}),
        "feature_dim": image_meta.get("feature_dim") if image_meta.get("space") != "lrf" else (lrf.tensors["proj.weight"].shape[1] if lrf else None),
        "lrf": ({"rank": lrf.meta.get("rank"), "keep": lrf.meta.get("keep"), "eta": lrf.meta.get("eta"),
                 "fingerprint": lrf.meta.get("fingerprint")} if lrf is not None else None),
        "threshold": {"method": "default", "value": DEFAULT_THRESHOLD, "tuned_on": None},
        **({"encoder_weights": carried[1]} if carried is not None else {}),
        **extra_meta,
    }
    return tensors, meta


@dataclass
class LoadedModel:
    file: MavlFile

    @property
    def labels(self) -> list[str]:
        return self.file.labels()

    @property
    def thresholds(self) -> np.ndarray:
        return self.file.tensors["thresholds"].astype(np.float32)

    @property
    def meta(self) -> dict[str, Any]:
        return self.file.meta

    def _lrf_tensors(self) -> dict[str, np.ndarray] | None:
        t = {k[4:]: v for k, v in self.file.tensors.items() if k.startswith("lrf.")}
        return t or None

    def fusion(self) -> Any:


        cfg = self.meta.get("fusion")
        if not cfg:
            raise MavlError(f"{self.file.path}: a {self.meta.get('scorer')} model has no fusion")
        model = FusionModel(cfg["img_dim"], cfg["txt_dim"], len(self.labels), cfg["n_aspects"], dim=cfg["dim"], aggregate=cfg["aggregate"])
        state = {k[7:]: torch.from_numpy(np.array(v)) for k, v in self.file.tensors.items() if k.startswith("fusion.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise MavlError(f"{self.file.path}: fusion weights do not match its config ({str(exc).splitlines()[0]})") from None
        return model.eval()

    def input_dim(self) -> int:
        """Size of the scoring head's input features."""
        if self.meta.get("scorer") == "zeroshot":
            return int(self.file.tensors["text.embeddings"].shape[2])
        return int(self.meta["fusion"]["img_dim"])

    def to_fusion_input(self, emb: MavlFile) -> np.ndarray:
        """Image embeddings (backbone or LRF space) -> the scoring head's input features."""
        lrf = self._lrf_tensors()
        if lrf is None:
            x = emb.tensors["features"].astype(np.float32)
        else:
            head_meta = {**(self.meta.get("lrf") or {}), "backbone": self.meta.get("backbone")}
            x = lrf_features(emb, lrf, head_meta, f"the LRF head in {self.file.path}")
        if x.shape[1] != self.input_dim():
            raise MavlError(f"{emb.path}: {x.shape[1]}-d features, but the model expects {self.input_dim()}-d ({self.meta.get('backbone')})")
        return x

    def head(self, label_text: Any = None, calibrated: bool = True) -> Any:
        """The scoring head (an ``nn.Module``: head-input features -> logits), see :mod:`mavl_cli.models.mavlmodel`."""

        lt = label_text
        return build_head(self, *((lt.text, lt.mask, lt.bias, lt.negative) if lt is not None else ()), calibrated=calibrated)

    def score(self, x: np.ndarray, label_text: Any = None, batch: int = 4096, calibrated: bool = True) -> np.ndarray:
        """Probabilities ``[N, L]`` for head-input features ``x`` (``label_text``: a ``mavlmodel.LabelText``),
        through `mavl calibrate`'s map unless ``calibrated=False``."""

        head = self.head(label_text, calibrated=calibrated)
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out.append(torch.sigmoid(head(torch.from_numpy(x[i : i + batch]))).numpy())
        n = len(label_text.labels) if label_text is not None else len(self.labels)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, n), np.float32)

    @property
    def calibration(self) -> Any:
        """The :class:`mavl_cli.evaluation.calibration.Calibration` stored by `mavl calibrate`, or None."""

        return Calibration.from_file(self.file.tensors, self.meta)

    def aspect_cosines(self, x: np.ndarray, label_text: Any = None) -> np.ndarray:
        """Per-aspect cosine ``[N, L, A]`` (for --explain)."""

        with torch.no_grad():
            return self.head(label_text).aspect_cosines(torch.from_numpy(x)).numpy()

    def module(self, weights: str | None = None, label_text: Any = None) -> Any:
        """The whole model as one :class:`~mavl_cli.models.mavlmodel.MavlModel` (encoder rebuilt from the file)."""

        return from_loaded(self, weights, label_text=label_text)


def load_model(path: str | Path) -> LoadedModel:
    return LoadedModel(read_file(path, expect="model"))


def check_model_backbone(model: Any, emb: MavlFile) -> None:
    mb, eb = model.meta.get("backbone"), emb.meta.get("backbone")
    if mb and eb and mb != eb:
        raise MavlError(f"{emb.path}: embedded with {eb}, but the model {model.file.path} uses {mb}")
