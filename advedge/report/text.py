"""Names and numbers as text: inert Markdown cells, plain Matplotlib labels, percent with their
intervals."""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["fmt", "md_escape", "pct", "pct_ci", "plot_text"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# characters with a meaning in (GitHub-flavoured) Markdown inside a table cell: the cell break,
# emphasis, code, links and images, headings, strike-through, math, and what starts an autolink
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~:@$])")
_WWW = re.compile(r"(?i)\b(www)\.")


def md_escape(value: Any) -> str:
    """Any name, label or path as inert text in a Markdown table cell.

    Line breaks and other control characters become one space (a newline would end the table
    row); ``&``, ``<`` and ``>`` become HTML entities (no tag, ``<script>`` included, survives);
    every character Markdown gives a meaning to in a cell (``|`` cell breaks, ``[x](url)`` links,
    ``![x](url)`` images, emphasis, code, math, ``http://``, ``www.`` and e-mail autolinks) is
    backslash-escaped. Rendered, the cell shows the original text.
    """
    text = _CONTROL.sub(" ", str(value)).strip()
    text = html.escape(text, quote=False)
    return _WWW.sub(r"\1\\.", _MD_SPECIAL.sub(r"\\\1", text))


def plot_text(value: Any) -> str:
    """A name as plain text in a Matplotlib label (no mathtext, one line)."""
    return _CONTROL.sub(" ", str(value)).replace("$", r"\$")


def fmt(value: Any) -> str:
    """A number as ``%g``, ``-`` for None."""
    return "-" if value is None else f"{value:g}"


def pct(acc: float | None) -> str:
    """A fraction as percent with one decimal: ``0.455`` -> ``45.5``; ``-`` for None."""
    return "-" if acc is None else f"{100 * acc:.1f}"


def pct_ci(acc: float | None, ci: list[float] | None) -> str:
    """A fraction and its 95% interval in percent: ``45.5 [38.7, 52.4]``; the bare percent
    without an interval, ``-`` without an accuracy."""
    if acc is None:
        return "-"
    if ci is None:
        return pct(acc)
    return f"{pct(acc)} [{pct(ci[0])}, {pct(ci[1])}]"
