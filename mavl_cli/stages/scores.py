"""Score sets from anywhere: `predict --out` files, CSVs from other tools, or a model plus embeddings.

A scores CSV has one image path column (``path``, ``Image Index``,
``filename``...) and one probability column per label, e.g. what
torchxrayvision or CheXzero write. Probabilities must lie in [0, 1]; other
columns that are not numbers (e.g. a ``split`` column) are an error so a
typo is not mistaken for a label. Thresholds: those stored with the scores,
the model's, else 0.5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.ids import normalize_many
from mavl_cli.datasets.sniff import PATH_COLUMNS, canon
from mavl_cli.io.imageio import sniff_head
from mavl_cli.io.mavlfile import MavlFile, read_file
from mavl_cli.models.modelfile import check_model_backbone, load_model


@dataclass
class ScoreSet:
    ids: list[str]
    names: list[str]
    scores: np.ndarray  # [N, L] probabilities
    thresholds: np.ndarray  # [L]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "?"  # "scores", "csv" or "model"
    tuned: bool = False  # thresholds came from tuning, not the 0.5 default

    def as_file(self) -> MavlFile:
        """The same data as a ``scores`` MavlFile (what evaluate --scores reads)."""
        meta = {**self.meta, "ids": list(self.ids), "labels": list(self.names)}
        return MavlFile("scores", {"scores": self.scores, "thresholds": self.thresholds}, meta, self.meta.get("path", "?"))


def is_csv(path: str) -> bool:
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv", ".gz") and not str(path).endswith(".safetensors"):
        return True

    head = sniff_head(p, 8)  # never opens a FIFO or device: that can block forever
    return bool(head) and head[:1] not in (b"\x00",) and not _looks_safetensors(head)


def _looks_safetensors(head: bytes) -> bool:

    if len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head)
    return 0 < n < 100 * 1024 * 1024


def read_scores_csv(path: str) -> ScoreSet:


    p = Path(path)
    if not p.is_file():
        raise MavlError(f"{path}: file not found", path=p)
    try:
        df = pd.read_csv(p, sep=None, engine="python")
    except Exception as exc:  # pandas raises many types for a broken CSV
        raise MavlError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:120]})", path=p) from None
    cols = {canon(c): c for c in df.columns}
    pcol = next((cols[c] for c in PATH_COLUMNS if c in cols), None)
    if pcol is None:
        raise MavlError(f"{path}: no image path column (one of {', '.join(PATH_COLUMNS)}) in {', '.join(map(str, df.columns))}")
    names = [str(c) for c in df.columns if c != pcol]
    if not names:
        raise MavlError(f"{path}: no score columns next to {pcol!r}")
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise MavlError(f"{path}: column(s) {', '.join(map(repr, bad))} are not numbers; a scores CSV holds a path and one probability column per label")
    s = df[names].to_numpy(np.float64)
    if not np.isfinite(s).all():
        raise MavlError(f"{path}: {int((~np.isfinite(s)).sum())} blank, NaN or infinite score(s)")
    if (s < 0).any() or (s > 1).any():
        raise MavlError(f"{path}: scores must be probabilities in [0, 1] (found {s.min():.3g}..{s.max():.3g}); apply a sigmoid first")
    ids = normalize_many([str(x) for x in df[pcol].tolist()])
    if len(set(ids)) != len(ids):
        raise MavlError(f"{path}: the same image appears more than once in {pcol!r}")
    return ScoreSet(ids, names, s.astype(np.float32), np.full(len(names), DEFAULT_THRESHOLD, np.float32),
                    {"path": str(path), "format": "csv"}, "csv")


def load_score_set(path: str, embeddings: str | None = None, allow_model: bool = True) -> ScoreSet:
    """A scores file, a scores CSV, or (with ``allow_model``) a model scored on ``embeddings``."""
    if is_csv(path):
        return read_scores_csv(path)
    f = read_file(path, expect=("scores", "model") if allow_model else "scores")
    if f.kind == "scores":
        names = f.labels()
        th = np.asarray(f.tensors.get("thresholds", np.full(len(names), DEFAULT_THRESHOLD, np.float32)), np.float32)[: len(names)]
        tuned = ((f.meta.get("threshold") or {}).get("method", "default")) != "default"
        return ScoreSet(f.ids(), names, f.tensors["scores"].astype(np.float32), th, {**f.meta, "path": str(path)}, "scores", tuned)
    if embeddings is None:
        raise MavlError(f"{path}: is a model; pass --embeddings TEST_EMB to score it (or a scores file from `mavl predict --out`)")

    model = load_model(path)
    emb = read_file(embeddings, expect="image-embeddings")
    check_model_backbone(model, emb)
    scores = model.score(model.to_fusion_input(emb))
    tuned = ((model.meta.get("threshold") or {}).get("method", "default")) != "default"
    return ScoreSet(emb.ids(), list(model.labels), scores, model.thresholds, {**model.meta, "path": str(path),
                    "embeddings": str(embeddings)}, "model", tuned)
