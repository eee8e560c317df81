"""Printing a table on the terminal: drawn by rich where it fits, plain fixed-width text otherwise.

A table wider than the terminal is squeezed by rich, which elides or crops its cells, numbers and
site names included (``1234`` shown as ``12…``), so every verb prints such a table plain instead:
long lines wrap, but every name and number stays whole. Pipes and CI logs always get plain text.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from .._imports import available

__all__ = ["table_fits", "print_fitted"]


def table_fits(console: Any, table: Any) -> bool:
    """Whether ``table`` (a rich renderable) fits ``console`` at its natural width.

    Example:
        >>> from rich.console import Console  # doctest: +SKIP
        >>> from rich.table import Table  # doctest: +SKIP
        >>> table = Table("site", "dead"); table.add_row("encoder.layer.0.act", "1234")  # doctest: +SKIP
        >>> table_fits(Console(width=80), table), table_fits(Console(width=20), table)  # doctest: +SKIP
        (True, False)
    """
    from rich.measure import Measurement

    # measured as if the console were unlimited: a measurement within the console's width is clamped to it
    return Measurement.get(console, console.options.update_width(10**6), table).maximum <= console.width


def print_fitted(rich_table: Callable[[], Any], plain: str, *, title: str = "", console: Any = None) -> None:
    """Print a table drawn by rich where it fits the terminal, else its plain text (pipes, CI logs, narrow terminals).

    Args:
        rich_table: builds the rich renderable (an object with ``__rich__`` is fine); called only when
            rich is to draw it.
        plain: the same table as fixed-width text.
        title: a line printed above either, on its own (wrapped to the terminal, not to the table).
        console: the rich ``Console`` to print to; by default one on stdout when stdout is a terminal
            and rich is installed, otherwise the plain text goes to stdout.

    Example:
        >>> print_fitted(lambda: None, "site  dead\\nfc.0     3")  # not a terminal: the plain text
        site  dead
        fc.0     3
    """
    if console is None and available("rich") and sys.stdout.isatty():
        from rich.console import Console

        console = Console()
    if console is not None:
        from rich.protocol import rich_cast
        from rich.text import Text

        table = rich_cast(rich_table())
        if table_fits(console, table):
            if title:
                console.print(Text(title))
            console.print(table)
            return
    out = console.file if console is not None else sys.stdout
    if title:
        print(title, file=out)
    print(plain, file=out)
