"""The one sanitizer for model text, prompts and names on their way to a terminal or Markdown.

Model text is hostile: an escape sequence can clear the screen, retitle the window or write the
clipboard (OSC 52), and bidi overrides reorder what a reader sees. `visible` shows every control
character (C0 but newline and tab, DEL, C1), bidi control and lone surrogate as a visible escape
(`\\x1b`, `\\u202e`); `md_inline` also escapes Markdown syntax, so a name cannot become a heading,
a link or raw HTML. HTML output keeps `html.escape` on top of `visible`.
"""

from __future__ import annotations

import re

from auditui.errors import AuditError

_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")  # inline syntax: emphasis, code, links, raw HTML, tables
_BLOCK_START = re.compile(r"^(\s*)(#{1,6}(?=\s|$)|[-+](?=\s|$)|>|\d+[.)](?=\s|$))")  # heading, list, quote


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def check_text(text: str, what: str) -> str:
    """Refuse text that is not valid Unicode (e.g. undecodable bytes on the command line)."""
    bad = re.search("[\ud800-\udfff]", text)
    if bad:
        raise AuditError(f"{what} is not valid UTF-8 text (an undecodable byte at character {bad.start()})")
    return text


def visible(text: str) -> str:
    """`text` with control, bidi and surrogate characters shown as escapes (newline and tab kept)."""
    return _HIDDEN.sub(_escape, text)


def one_line(text: str) -> str:
    """`visible` on one line: newlines and tabs as spaces."""
    return visible(text).replace("\n", " ").replace("\t", " ")


def md_inline(text: str) -> str:
    """Text for a Markdown heading, paragraph, list item or table cell: one line, syntax escaped."""
    escaped = _MARKDOWN.sub(r"\\\1", one_line(text))
    return _BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2), escaped)


def number(value: float | int | None, spec: str = ".4g") -> str:
    """A number for a table cell: "-" for none, integers as they are, floats by `spec`."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else format(value, spec)


def yes_no(flag: bool | None) -> str:
    """A three-way table cell: yes, no, or "-" when undecided."""
    return "-" if flag is None else "yes" if flag else "no"
