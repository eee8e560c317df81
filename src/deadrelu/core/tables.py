"""Render a list of string rows as a plain-text or rich table."""

from __future__ import annotations

from typing import Any, Sequence


def render_plain(rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width text table: first row is the header; text left-aligned, numbers right-aligned."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(row: Sequence[str]) -> str:
        cells = []
        for i, cell in enumerate(row):
            numeric = i > 0 and cell.replace(".", "", 1).replace("-", "", 1).isdigit()
            cells.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:-1]]
    if len(rows) > 1:
        lines += [rule, fmt(rows[-1])] if rows[-1][0] == "total" else [fmt(rows[-1])]
    return "\n".join(lines)


def render_rich(rows: Sequence[Sequence[str]], title: str = "") -> Any:
    """A ``rich.table.Table`` of the rows; dead counts above zero are highlighted."""
    from .._imports import require

    table_mod = require("rich.table", "cli")
    table = table_mod.Table(title=title, title_justify="left", show_footer=False)
    header = rows[0]
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right")
    body = rows[1:]
    for j, row in enumerate(body):
        styled = list(row)
        if len(row) > 3 and row[3] not in ("0", ""):
            styled[3] = f"[bold red]{row[3]}[/]"
        is_total = j == len(body) - 1 and row[0] == "total"
        table.add_row(*styled, end_section=(j == len(body) - 2 and body[-1][0] == "total"),
                      style="bold" if is_total else None)
    return table
