"""The ``evaluate-maps`` stage: how well explanation maps point at the drawn findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mavl_cli.explain.mapeval import evaluate_maps


def evaluate_maps_stage(maps_dir: str | Path, opts: Any) -> Any:
    """`mavl evaluate-maps`: see :mod:`mavl_cli.explain.mapeval`."""

    return evaluate_maps(maps_dir, opts)
