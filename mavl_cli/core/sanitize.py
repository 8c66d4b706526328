"""The one sanitiser for text that comes from users' files and reaches a terminal or a spreadsheet.

Label names, file names, metadata fields and CSV headers are data, not
instructions. Two places would otherwise obey them:

* a terminal obeys control characters: ``ESC]0;...`` retitles the window,
  ``ESC[2J`` clears it, a newline in a file name forges a second ``error:``
  line. :func:`terminal` shows every control character escaped (``\\x1b``,
  ``\\n``), as well as bidirectional overrides and the undecodable bytes of
  non-UTF-8 file names (``\\xff``), so what is printed is what is there;
* a spreadsheet obeys formulas: a CSV cell ``=HYPERLINK(...)`` or
  ``+cmd|' /C calc'!A0`` runs when opened. :func:`csv_cell` prefixes such text
  cells with ``'`` (OWASP's advice), which spreadsheets show as plain text.

Rich markup (``[link=...]``, ``[/]``) is the third interpreter; the consoles in
:mod:`mavl_cli.core.console` never parse markup in data (they pass everything through
:func:`terminal` and render it as plain text).
"""

from __future__ import annotations

from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# bidirectional embeddings/overrides/isolates: they reorder what the reader sees
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def _escape(ch: str) -> str:
    o = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o <= 0xFF:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}"


def _unsafe(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or ch in _BIDI


def terminal(value: Any) -> str:
    """``value`` as text that is safe to print: control characters shown escaped."""
    s = value if isinstance(value, str) else str(value)
    if not any(_unsafe(ch) for ch in s):
        return s
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in s)


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula (numbers pass unchanged)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip() == s
