"""Where mavl keeps its own things: ``$MAVL_HOME`` (default ``~/.mavl``) and the default model file in it."""

from __future__ import annotations

import os
from pathlib import Path


def mavl_home() -> Path:
    """mavl's own folder (``$MAVL_HOME``, default ``~/.mavl``): default model, converted weights."""
    return Path(os.environ.get("MAVL_HOME") or Path.home() / ".mavl")


def default_model_path() -> Path:
    """Where `mavl predict` looks when no --model is given (after $MAVL_MODEL)."""
    return mavl_home() / "model.safetensors"
