"""Render a list of string rows as a plain-text or rich table.

The first row is the header. A last row whose first cell is ``"total"`` is set off by a rule.
Cells that read as numbers (``12``, ``31.2``, ``1.2M``, ``2.5e-6``) are right-aligned, text
left-aligned, so columns of figures line up in plain text as they do in rich.

Example:
    >>> print(render_plain([("site", "dead"), ("fc1", "3"), ("total", "3")]))
    site   dead
    -----  ----
    fc1       3
    -----  ----
    total     3
"""

from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ["render_plain", "render_rich", "is_number_cell", "floor_percent"]

# An optional sign, digits, an optional fraction and exponent, an optional k/M/G/T or % suffix.
_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?[kMGT%]?")


def is_number_cell(cell: str) -> bool:
    """Whether a table cell reads as a number (and so is right-aligned)."""
    return _NUMBER.fullmatch(cell) is not None


def _has_total(rows: Sequence[Sequence[str]]) -> bool:
    return len(rows) > 1 and bool(rows[-1]) and rows[-1][0] == "total"


def render_plain(rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width text table: first row is the header; text left-aligned, numbers right-aligned."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(row: Sequence[str]) -> str:
        cells = []
        for i, cell in enumerate(row):
            numeric = i > 0 and is_number_cell(cell)
            cells.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:-1]]
    if len(rows) > 1:
        lines += [rule, fmt(rows[-1])] if _has_total(rows) else [fmt(rows[-1])]
    return "\n".join(lines)


def render_rich(rows: Sequence[Sequence[str]], title: str = "", caption: str = "") -> Any:
    """A ``rich.table.Table`` of the rows; dead counts (column 3) above zero are highlighted."""
    from .._imports import require

    table_mod = require("rich.table", "cli")
    Text = require("rich.text", "cli").Text
    # Every string is a Text, never markup: a module path or site name may hold brackets
    # (acts.[bold], a path with [/x]), which rich would read as styles or reject.
    table = table_mod.Table(
        title=Text(title) if title else "", title_justify="left", caption=Text(caption) if caption else None,
        caption_justify="left", show_footer=False,
    )  # fmt: skip
    header = rows[0]
    for i, name in enumerate(header):
        table.add_column(Text(name), justify="left" if i < 2 else "right")
    body = rows[1:]
    total = _has_total(rows)
    for j, row in enumerate(body):
        styled = [Text(cell) for cell in row]
        if len(row) > 3 and row[3] not in ("0", ""):
            styled[3] = Text(row[3], style="bold red")
        is_total = total and j == len(body) - 1
        table.add_row(*styled, end_section=total and j == len(body) - 2, style="bold" if is_total else None)
    return table


def floor_percent(a: int, b: int) -> str:
    """``100 a / b`` to one decimal, rounded down, so the printed share never overstates the count
    (1999 of 2000 dead is 99.9%, not 100.0%).

    >>> floor_percent(1999, 2000), floor_percent(1, 3), floor_percent(2, 2)
    ('99.9', '33.3', '100.0')
    """
    return f"{(1000 * a // b) / 10:.1f}" if b else "0.0"
