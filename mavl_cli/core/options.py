"""The option specs the stages take, each defined once (torch-free: the CLI builds them).

A command's options arrive at its stage (:mod:`mavl_cli.stages`) as a few
small typed objects instead of a long positional list; each object checks its
own values when it is built, so a bad value is one clear ``MavlError`` before
any work, whoever calls the stage (the CLI, ``mavl demo``, a script):

- :class:`~mavl_cli.encoders.spec.EncoderSpec` - which image encoder (family,
  id, weights, pooling, constructor options, remote code);
- :class:`TextSpec` - which text encoder;
- :class:`ImageList` - which images (paths, folders, globs, or a label CSV's
  path column under a root);
- :class:`LabelOptions` - how a label file is read (uncertain policy, renames,
  the labels kept);
- :class:`Validation` - the validation data of a training stage;
- :class:`RunOptions` - where and how the work runs (device, batch, threads...);
- :class:`FinetuneOptions` - what only end-to-end fine-tuning has;
- :class:`EvalOptions` - evaluation's figures and outputs;
- :class:`PredictOptions` - prediction's extras and outputs.

Training hyper-parameters stay in :class:`mavl_cli.training.train.LRFConfig` /
``FusionConfig`` (recorded verbatim in the files they make). The defaults
(image and text encoder, threshold) live in :mod:`mavl_cli.core.defaults`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mavl_cli.core.defaults import DEFAULT_TEXT_ENCODER
from mavl_cli.core.errors import MavlError

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


def check_uncertain(value: str) -> str:
    if value not in UNCERTAIN_POLICIES:
        raise MavlError(f"--uncertain must be ones, zeros or ignore, not {value!r}")
    return value


def check_threshold(value: float | None, name: str = "--threshold") -> float | None:
    if value is not None and not 0 <= value <= 1:
        raise MavlError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_finite(value: float | None, name: str) -> None:
    if value is not None and not math.isfinite(value):
        raise MavlError(f"{name} must be a finite number, not {value}")


@dataclass(frozen=True)
class TextSpec:
    """A text encoder: a Hugging Face id or folder (or ``open_clip:ID``), its pooling, remote code."""

    model: str = DEFAULT_TEXT_ENCODER
    pooling: str | None = None  # None: the encoder's own (sentence-transformers folders) or mean
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ImageList:
    """Which images: files, folders (recursive), globs or ``-`` (paths on stdin); or the images a
    label CSV's path column lists, relative to ``root`` (default: the folder given, else the CSV's folder)."""

    inputs: Sequence[str] = ()
    labels: Any = None  # a CSV path, or a datasets.options.LabelSource carrying the data-set filters
    root: str | None = None
    path_column: str | None = None


@dataclass(frozen=True)
class LabelOptions:
    """How a label file is read: CheXpert -1 policy, label renames, and the labels kept (None = all)."""

    uncertain: str = "zeros"
    label_map: Mapping[str, str] | None = None
    only: Sequence[str] | None = None

    def __post_init__(self) -> None:
        check_uncertain(self.uncertain)

    @property
    def names(self) -> list[str] | None:
        return list(self.only) if self.only is not None else None

    @property
    def renames(self) -> dict[str, str] | None:
        return dict(self.label_map) if self.label_map is not None else None


@dataclass(frozen=True)
class Validation:
    """Validation data of a training stage: ``embeddings`` (or, fine-tuning, images under the training
    root) with ``labels`` (default: the training labels), else ``split`` of the patients held out."""

    embeddings: str | None = None
    labels: Any = None
    split: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.split < 1:
            raise MavlError(f"--val-split must lie in [0, 1), got {self.split}")


@dataclass(frozen=True)
class RunOptions:
    """Where and how the work runs. None: the stage's own default for that device (see each command's help)."""

    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    precision: str = "fp32"
    skip_bad: bool = False
    pipeline: str = "auto"  # embed-images: threads or device decoding
    compile_model: bool = False  # embed-images: torch.compile

    def __post_init__(self) -> None:
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0), ("--threads", self.threads, 1)):
            if value is not None and value < low:
                raise MavlError(f"{name} must be at least {low}, got {value}")

    def batch(self, default: int) -> int:
        return self.batch_size if self.batch_size is not None else default


@dataclass(frozen=True)
class FinetuneOptions:
    """What only end-to-end fine-tuning has (the head's hyper-parameters are the LRFConfig's)."""

    backbone_lr: float = 1e-5  # 0 freezes the backbone
    augment: bool = True  # random shift/zoom (never a left-right flip)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_finite(self.backbone_lr, "--backbone-lr")
        if self.backbone_lr < 0:
            raise MavlError(f"--backbone-lr must be >= 0, got {self.backbone_lr}")


@dataclass(frozen=True)
class EvalOptions:
    """Evaluation: saved scores instead of a model, bootstrap CIs, threshold override and outputs."""

    scores: str | None = None  # a `predict --out` file or a scores CSV, instead of MODEL + EMBEDDINGS
    bootstrap: int = 0
    seed: int = 0
    threshold: float | None = None
    plot: str | None = None
    csv_out: str | None = None
    json_out: str | None = None
    ood_threshold: float | None = None

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.bootstrap < 0:
            raise MavlError(f"--bootstrap must be >= 0, got {self.bootstrap}")


@dataclass(frozen=True)
class PredictOptions:
    """Prediction: threshold override, extra labels in text, explanations, outputs, sharding."""

    weights: str | None = None  # the backbone weights, if the path recorded in the model is not on this machine
    threshold: float | None = None
    descriptions: str | None = None
    explain: bool = False
    scores_out: str | None = None
    json_out: str | None = None
    shard: str | None = None
    ood_threshold: float | None = None
    heatmap: Any = None  # a heatmaps.HeatmapOptions

    def __post_init__(self) -> None:
        check_threshold(self.threshold)


__all__ = ["EvalOptions", "FinetuneOptions", "ImageList", "LabelOptions", "PredictOptions", "RunOptions",
           "TextSpec", "Validation", "UNCERTAIN_POLICIES", "check_threshold", "check_uncertain"]
