"""User-facing errors.

Anything a user can cause (a wrong file, a bad option, missing weights) raises
:class:`MavlError`. The CLI turns it into one red line and exit code 2; every
other exception is a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations

from pathlib import Path


class MavlError(Exception):
    """A problem with the user's input, reported as one clear sentence."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        if self.path and self.path not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)
