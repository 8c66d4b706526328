"""What every stage returns: its output path, a summary for scripts, a table for people, and notes."""

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
