"""What the monitor records: history rows, lifecycle events, alerts and the log record sinks receive.

These are plain frozen values computed from reports; the engine (:mod:`deadrelu.monitor.monitor`)
makes them, sinks and the live view consume them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.report import Report

__all__ = ["HistoryRow", "History", "Event", "SiteEvents", "EventSummary", "Alert", "LogRecord"]


@dataclass(frozen=True)
class HistoryRow:
    """Fractions of one site's units in each state at one evaluation (over the rolling window).

    Example:
        >>> HistoryRow(10, "relu", 4, 10, active=0.5, asleep=0.25, dead=0.25, dormant=0.25, nonfinite=0.0).alive
        0.75
    """

    step: int
    site: str
    units: int
    batches: int
    active: float
    asleep: float
    dead: float
    dormant: float
    nonfinite: float
    loss: float | None = None
    unobserved: float = 0.0  # never fired on too few observations (``min_observations``): neither dead nor alive

    @property
    def alive(self) -> float:
        """Fraction of units that fired at least once in the window (active + asleep)."""
        return self.active + self.asleep

    def to_dict(self) -> dict[str, Any]:
        """Plain data, ``alive`` included."""
        d = asdict(self)
        d["alive"] = self.alive
        return d


@dataclass
class History:
    """Per-site state fractions over time, one :class:`HistoryRow` per site per evaluation.

    Example:
        >>> h = History([HistoryRow(10, "relu", 4, 10, 0.5, 0.25, 0.25, 0.25, 0.0)])
        >>> h.series("relu", "dead")
        ([10], [0.25])
    """

    rows: list[HistoryRow] = field(default_factory=list)
    # Every name a site has had -> its latest (a site's display name changes when a second call
    # position of its function appears: "<root>:relu" becomes "<root>:relu.1"). Rows keep the name
    # they were written under, as the logs do; ``sites`` and ``series`` follow the site.
    aliases: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def sites(self) -> list[str]:
        """Site names (each site's latest) in first-seen order."""
        return list(dict.fromkeys(self.aliases.get(r.site, r.site) for r in self.rows))

    @property
    def steps(self) -> list[int]:
        """Evaluation steps in order."""
        return list(dict.fromkeys(r.step for r in self.rows))

    def series(self, site: str, state: str = "dead") -> tuple[list[int], list[float]]:
        """``(steps, fractions)`` of one site for ``state`` (active/asleep/dead/dormant/nonfinite/unobserved/alive),
        under whichever name the site had at each step (``site`` may be any of its names).

        Raises:
            KeyError: for an unknown site or state.
        """
        if state not in _STATES:
            raise KeyError(f"unknown state {state!r}; use {', '.join(_STATES[:-1])} or {_STATES[-1]}")
        name = self.aliases.get(site, site)  # any name the site has had
        rows = [r for r in self.rows if self.aliases.get(r.site, r.site) == name]
        if not rows:
            raise KeyError(f"no site {site!r} in the history; sites are: {', '.join(self.sites)}")
        return [r.step for r in rows], [getattr(r, state) for r in rows]

    def to_dicts(self) -> list[dict[str, Any]]:
        """All rows as plain dictionaries."""
        return [r.to_dict() for r in self.rows]


_STATES = ("active", "asleep", "dead", "dormant", "nonfinite", "unobserved", "alive")


@dataclass(frozen=True)
class Event:
    """A unit changing state: ``kind`` is ``"born_dead"``, ``"died"`` or ``"revived"``.

    Example:
        >>> Event(120, "layer1.relu", 7, "died")
        Event(step=120, site='layer1.relu', unit=7, kind='died')
    """

    step: int
    site: str
    unit: int
    kind: str


@dataclass(frozen=True)
class SiteEvents:
    """Lifecycle counts of one site."""

    site: str
    units: int
    born_dead: int
    died: int
    revived: int
    dead_now: int
    died_steps: tuple[int, ...]


@dataclass(frozen=True)
class EventSummary:
    """How many units were born dead, died and revived, per site and in total."""

    sites: tuple[SiteEvents, ...]

    @property
    def born_dead(self) -> int:
        """Units dead over the first window, all sites."""
        return sum(s.born_dead for s in self.sites)

    @property
    def died(self) -> int:
        """Death events after the first window, all sites."""
        return sum(s.died for s in self.sites)

    @property
    def revived(self) -> int:
        """Revival events, all sites."""
        return sum(s.revived for s in self.sites)

    def __str__(self) -> str:
        lines = [f"{self.born_dead} unit(s) born dead, {self.died} died, {self.revived} revived"]
        for s in self.sites:
            if s.born_dead or s.died or s.revived:
                when = ""
                if s.died_steps:
                    when = f" (deaths at steps {s.died_steps[0]}..{s.died_steps[-1]})"
                lines.append(
                    f"  {s.site}: {s.born_dead} born dead, {s.died} died{when}, {s.revived} revived; "
                    f"{s.dead_now}/{s.units} dead now"
                )
        return "\n".join(lines)


@dataclass(frozen=True)
class Alert:
    """A warning the monitor issued: the site, the warning level crossed (a dead fraction), the dead fraction and the advice."""

    step: int
    site: str
    level: float
    dead_fraction: float
    cause: str  # "born_dead" or "died"
    message: str


@dataclass(frozen=True)
class LogRecord:
    """What sinks receive at each evaluation."""

    step: int
    loss: float | None
    rows: tuple[HistoryRow, ...]
    events: tuple[Event, ...]
    report: Report
