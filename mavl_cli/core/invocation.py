"""The mavl command line being run, recorded once and read as provenance.

Kept apart from ``contract`` (which needs numpy) so that the CLI can record
its arguments before parsing without paying for numpy on ``mavl --help``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

_COMMAND: dict[str, Any] = {"line": None, "args": None}


def set_command(args: list[str]) -> None:
    """Record the mavl invocation being run (the CLI calls this; in-process runs too)."""

    _COMMAND["args"] = [str(a) for a in args]
    _COMMAND["line"] = "mavl " + " ".join(shlex.quote(str(a)) for a in args)


def command_args() -> list[str] | None:
    """The arguments of the invoking mavl command (None when not run through the CLI)."""
    return list(_COMMAND["args"]) if _COMMAND["args"] is not None else None


def command_line() -> str:
    """The invoking command, recorded as provenance."""
    if _COMMAND["line"]:
        return _COMMAND["line"]
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)
