"""Live terminal view of unit health: every layer as a grid of coloured unit cells, refreshed in place.

``Monitor(model, live=True)`` adds a :class:`LiveView` sink. On a terminal it redraws,
at most ``refresh_per_second`` times a second, one block per activation site: a
header with the counts and a grid of cells coloured **active** (green), **asleep**
(yellow), **dead** (red) or **NaN/Inf** (magenta). A layer with more units than
``max_cells`` is folded: each cell then stands for several consecutive units and
shows their most common state (ties go to the worse state, so a dead minority of a
cell is never painted healthy in a tie). When the output is not a terminal (CI logs,
files) the view prints one plain line every ``plain_interval`` seconds instead.

Needs ``rich`` (``pip install "deadrelu[cli]"``).

Example:
    >>> fold_states(["active", "dead", "dead", "asleep"], max_cells=2)
    (['dead', 'dead'], 2)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .._imports import require
from ..core.inputs import is_count
from ..errors import DeadReluError
from .sinks import Sink

if TYPE_CHECKING:
    from .records import LogRecord

__all__ = ["LiveView", "fold_states", "STATE_STYLES", "summary_line"]

#: Colour of each unit state in the grid.
STATE_STYLES = {"active": "green", "unobserved": "grey50", "asleep": "yellow", "dead": "red", "nonfinite": "magenta"}
_SEVERITY = {"active": 0, "unobserved": 1, "asleep": 2, "dead": 3, "nonfinite": 4}
_CELL = "■"


def fold_states(states: Sequence[str], max_cells: int) -> tuple[list[str], int]:
    """Fold per-unit states into at most ``max_cells`` cells of equal unit count.

    Returns:
        ``(cell states, units per cell)``; each cell takes its units' most common state,
        ties resolved towards the worse state (nonfinite > dead > asleep > unobserved > active).

    Raises:
        ValueError: when ``max_cells`` is below 1.
    """
    if max_cells < 1:
        raise ValueError(f"max_cells must be at least 1, got {max_cells}")
    per = max(1, math.ceil(len(states) / max_cells))
    if per == 1:
        return list(states), 1
    cells = []
    for i in range(0, len(states), per):
        counts = Counter(states[i : i + per])
        cells.append(max(counts, key=lambda s: (counts[s], _SEVERITY.get(s, 0))))
    return cells, per


def summary_line(record: "LogRecord") -> str:
    """One plain line: step, loss and per-site dead/asleep counts."""
    parts = [f"deadrelu step {record.step}"]
    if record.loss is not None:
        parts.append(f"loss {record.loss:.4g}")
    sites = []
    for s in record.report.sites:
        extra = (f", {s.unobserved} unobserved" if s.unobserved else "") + (f", {s.nonfinite} nan/inf" if s.nonfinite else "")
        sites.append(f"{s.name}: {s.dead}/{s.units} dead, {s.asleep} asleep{extra}")
    return " | ".join(parts + sites)


def _finite_real(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool, text or NaN), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return number if math.isfinite(number) else None


def _check_view_options(max_cells: Any, refresh_per_second: Any, plain_interval: Any, clock: Any) -> None:
    """Refuse each option of the wrong kind with one DeadReluError, when the view is made: a bad
    one would otherwise fail only at the first record (``max_cells=nan``, ``clock=0.0``) or quietly
    mean something else (``refresh_per_second=nan`` lifts the redraw limit: no gap is below NaN)."""
    if not is_count(max_cells):  # numpy integers too, not 512.0 or True
        raise DeadReluError(f"max_cells must be a whole number of at least 1 (cells per layer), got {max_cells!r:.80}")
    rate = _finite_real(refresh_per_second)
    if rate is None or rate <= 0:
        raise DeadReluError(f"refresh_per_second must be a finite number above 0, got {refresh_per_second!r:.80}")
    interval = _finite_real(plain_interval)
    if interval is None or interval < 0:
        raise DeadReluError(
            f"plain_interval must be a finite number of seconds, 0 or more (0: every record), got {plain_interval!r:.80}"
        )
    if not callable(clock):
        raise DeadReluError(f"clock must be a callable that returns seconds, got {clock!r:.80}")


class LiveView(Sink):
    """A :class:`~deadrelu.monitor.sinks.Sink` that draws unit health in the terminal (rich) or prints plain lines.

    Args:
        console: a ``rich.console.Console`` (default: a new one on stdout).
        max_cells: largest number of cells per layer; bigger layers are folded.
        refresh_per_second: upper bound on redraws per second on a terminal.
        plain_interval: seconds between plain lines when not on a terminal (0: every record).
        clock: time source (seconds); injectable for tests.

    Raises:
        ModuleNotFoundError: when rich is not installed.
        DeadReluError: for a ``max_cells`` that is not a whole number of at least 1 (a bool, a
            float, text), a ``refresh_per_second`` that is not a finite number above 0, a
            ``plain_interval`` that is not a finite number of at least 0, or a ``clock`` that
            cannot be called.

    Example:
        >>> import io, rich.console
        >>> view = LiveView(console=rich.console.Console(file=io.StringIO()), plain_interval=0)
        >>> view.is_terminal
        False
    """

    name = "LiveView"

    def __init__(
        self,
        *,
        console: Any = None,
        max_cells: int = 512,
        refresh_per_second: float = 4.0,
        plain_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require("rich", "cli")
        _check_view_options(max_cells, refresh_per_second, plain_interval, clock)
        if console is None:
            from rich.console import Console

            console = Console()
        self.console = console
        self.max_cells = int(max_cells)
        self.min_gap = 1.0 / float(refresh_per_second)
        self.plain_interval = float(plain_interval)
        self.clock = clock
        self.renders = 0  # redraws (terminal) or lines printed (plain): for tests and curiosity
        self._live: Any = None
        self._last_shown = -math.inf
        self._pending: "LogRecord | None" = None

    @property
    def is_terminal(self) -> bool:
        """True when the console is an interactive terminal (in-place redraws)."""
        return bool(self.console.is_terminal)

    def open(self) -> None:
        if self.is_terminal and self._live is None:
            from rich.live import Live

            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def write(self, record: "LogRecord") -> None:
        now = self.clock()
        gap = self.min_gap if self.is_terminal else self.plain_interval
        if now - self._last_shown < gap:
            self._pending = record  # shown at the next allowed moment, or on close
            return
        self._show(record, now)

    def _show(self, record: "LogRecord", now: float) -> None:
        self._pending = None
        self._last_shown = now
        self.renders += 1
        if self.is_terminal:
            if self._live is None:
                self.open()
            self._live.update(self.renderable(record), refresh=True)
        else:
            self.console.print(summary_line(record), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._pending is not None:  # the last state is always shown
            self._show(self._pending, self.clock())
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def renderable(self, record: "LogRecord") -> Any:
        """The rich renderable for one record: a header line and one block per site."""
        from rich.console import Group
        from rich.text import Text

        head = Text(f"deadrelu · step {record.step}", style="bold")
        if record.loss is not None:
            head.append(f" · loss {record.loss:.4g}")
        report = record.report
        head.append(f" · {report.dead}/{report.units} dead, {report.asleep} asleep, window {report.batches} batches")
        legend = Text("  ")
        for state, style in STATE_STYLES.items():
            legend.append(_CELL, style=style)
            legend.append(f" {state}  ")
        blocks: list[Any] = [head, legend]
        width = max(int(getattr(self.console, "width", 80)) - 2, 8)
        for site in report.sites:
            cells, per = fold_states(site.states, self.max_cells)
            title = Text(f"{site.name} ", style="bold")
            title.append(
                f"({site.function}) {site.units} units: {site.active} active, {site.asleep} asleep, {site.dead} dead"
            )
            if site.unobserved:
                title.append(f", {site.unobserved} unobserved", style="grey50")
            if site.nonfinite:
                title.append(f", {site.nonfinite} nan/inf", style="magenta")
            if per > 1:
                title.append(f" — {per} units per cell", style="dim")
            grid = Text("  ", no_wrap=False)
            for i, state in enumerate(cells):
                if i and i % width == 0:
                    grid.append("\n  ")
                grid.append(_CELL, style=STATE_STYLES.get(state, ""))
            blocks += [title, grid]
        return Group(*blocks)
