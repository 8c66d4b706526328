"""Terminal rendering: consoles, progress bars and tables.

Data may go to stdout (``-o -``), so progress always goes to stderr and
tables go to stdout unless a command has claimed stdout for data.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mavl_cli.core.sanitize import terminal


class SafeConsole(Console):
    """A console that treats every string as data: no rich markup or emoji codes are parsed
    (a label ``[link=...]`` stays text) and control characters are shown escaped
    (:func:`mavl_cli.core.sanitize.terminal`). Styled output is built from :class:`Text` pieces."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(markup=False, emoji=False, **kw)

    def render_str(self, text: str, **kw: Any) -> Text:  # type: ignore[override]
        kw["markup"], kw["emoji"] = False, False
        return super().render_str(terminal(text), **kw)


def _console(stderr: bool) -> Console:
    """A console; when output is a file or pipe (logs, CI) use a wide fixed width, not 80 columns."""

    c = SafeConsole(stderr=stderr, soft_wrap=True)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = SafeConsole(stderr=stderr, soft_wrap=True, width=160)
    return c


def safe(value: Any, style: str = "") -> Text:
    """User-supplied text as a rich :class:`Text`: never parsed as markup, control characters escaped."""
    if isinstance(value, Text):
        return Text(terminal(value.plain), style=value.style or style)
    return Text(terminal(value), style=style)


def styled(template: str, *values: Any) -> Text:
    """Markup written by mavl (``template``) with user values filled in as plain, escaped text."""
    from rich.markup import escape

    return Text.from_markup(template.format(*(escape(terminal(v)) for v in values)))


_err = _console(stderr=True)
_out = _console(stderr=False)
_stdout_is_data = False


def claim_stdout() -> None:
    """Called when a command writes binary data to stdout: tables move to stderr."""
    global _stdout_is_data
    _stdout_is_data = True


def release_stdout() -> None:
    global _stdout_is_data
    _stdout_is_data = False


def out() -> Console:
    """Console for human-readable results (tables)."""
    return _err if _stdout_is_data else _out


def err() -> Console:
    """Console for progress, warnings and errors."""
    return _err


def refresh_consoles() -> None:
    """Re-create consoles (tests swap sys.stdout/sys.stderr between invocations)."""
    global _err, _out
    _err = _console(stderr=True)
    _out = _console(stderr=False)


def error_line(message: str) -> None:
    """The one ``error:`` line: the message is sanitised, so a file name cannot forge a second line."""
    _err.print(Text.assemble(("error: ", "bold red"), (terminal(message), "red")), soft_wrap=True)


def warn(message: str) -> None:
    _err.print(Text.assemble(("warning: ", "bold yellow"), terminal(message)), soft_wrap=True)


def alarm(message: str) -> None:
    """A warning that must not be missed (e.g. thresholds tuned on the evaluated data)."""
    _err.print(Text.assemble(("WARNING: ", "bold white on red"), (" " + terminal(message), "bold red")), soft_wrap=True)


def info(message: str) -> None:
    _err.print(Text(terminal(message), style="dim"), soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, in the unit of the task (images/s, epochs/s)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {unit}/s", style="progress.data.speed")


class Advance:
    """``advance(n, **fields)`` moves a bar on; ``resume_at(n)`` starts it at n (a resumed run)
    without counting those n in the rate and ETA."""

    def __init__(self, bar: Progress, task: Any) -> None:
        self.bar, self.task = bar, task

    def __call__(self, n: int = 1, **fields: Any) -> None:
        status = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        self.bar.update(self.task, advance=n, status=status)

    def resume_at(self, n: int) -> None:
        self.bar.reset(self.task, completed=n)

    def set_total(self, n: int) -> None:
        self.bar.update(self.task, total=n)


@contextmanager
def progress(description: str, total: int | None, unit: str = "it", enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; yields ``advance(n=1, **fields)``."""
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    if not enabled:
        yield lambda n=1, **kw: None
        return
    with Progress(*columns, console=_err, transient=False) as bar:
        task = bar.add_task(description, total=total, unit=unit, status="")
        advance = Advance(bar, task)
        try:
            yield advance
        except BaseException:
            # on failure the error line is all the user should see: drop the bar
            bar.live.transient = True
            raise


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None,
          numeric: bool = True) -> Table:
    """A results table; ``numeric`` right-aligns every column but the first."""
    t = Table(title=safe(title), caption=safe(caption) if caption is not None else None, header_style="bold cyan",
              show_lines=False)
    for i, c in enumerate(columns):
        t.add_column(safe(c), justify="right" if (numeric and i > 0) else "left")
    for r in rows:
        t.add_row(*[safe(x) if isinstance(x, Text) else safe(fmt_num(x)) for x in r])
    return t


def show(renderable: Any) -> None:
    """Print a table or a line of results; a plain string is data (sanitised, no markup)."""
    out().print(safe(renderable) if isinstance(renderable, str) else renderable)
