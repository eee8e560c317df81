"""What changed between two reports: :class:`ReportDiff`, one :class:`SiteDiff` per shared site.

Made by :meth:`Report.diff <deadrelu.core.report.Report.diff>` (and re-exported by
:mod:`deadrelu.core.report`): which units died or revived between an earlier and a later report,
matched by site name; units unobserved or non-finite in either report are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["SiteDiff", "ReportDiff"]


@dataclass(frozen=True)
class SiteDiff:
    """How one site changed between two reports.

    Attributes:
        name: the site.
        units: its number of units.
        died: units dead in the later report that were not dead (nor unobserved, nor non-finite) before.
        revived: units dead in the earlier report that are neither dead, unobserved nor non-finite now.
        dead_before: dead units in the earlier report.
        dead_after: dead units in the later report.
        stayed_dead: units dead in both reports.
        unobserved: units unobserved in either report: not compared, their change is unknown.
        nonfinite: units non-finite (NaN/Inf, neither dead nor alive) in either report: not compared.
    """

    name: str
    units: int
    died: tuple[int, ...]
    revived: tuple[int, ...]
    dead_before: int
    dead_after: int
    stayed_dead: tuple[int, ...] = ()
    unobserved: tuple[int, ...] = ()
    nonfinite: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReportDiff:
    """Units that died or revived between an earlier and a later report (matched by site name)."""

    sites: tuple[SiteDiff, ...]
    only_before: tuple[str, ...] = ()
    only_after: tuple[str, ...] = ()

    @property
    def died(self) -> int:
        """Total units dead in the later report but not in the earlier one."""
        return sum(len(s.died) for s in self.sites)

    @property
    def revived(self) -> int:
        """Total units dead in the earlier report but not in the later one."""
        return sum(len(s.revived) for s in self.sites)

    def __str__(self) -> str:
        lines = [f"{self.died} unit(s) died, {self.revived} revived"]
        for s in self.sites:
            if s.died or s.revived:
                lines.append(
                    f"  {s.name}: dead {s.dead_before} -> {s.dead_after}"
                    f" (died {_fmt_idx(s.died)}; revived {_fmt_idx(s.revived)})"
                )
            if s.unobserved:
                lines.append(f"  {s.name}: {len(s.unobserved)} unit(s) unobserved in one report, not compared")
        for n in self.only_before:
            lines.append(f"  {n}: only in the earlier report")
        for n in self.only_after:
            lines.append(f"  {n}: only in the later report")
        return "\n".join(lines)


def _fmt_idx(idx: Sequence[int], limit: int = 12) -> str:
    if not idx:
        return "none"
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f", … (+{len(idx) - limit})" if len(idx) > limit else "")
