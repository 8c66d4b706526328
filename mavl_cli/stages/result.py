"""mavl_cli.stages.result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Advance = Callable[..., None]


@dataclass
class StageResult:
    output: str
    summary: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
