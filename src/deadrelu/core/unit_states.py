"""The pure functional core of a scan: a site's totals in, each unit's state out.

:class:`UnitTotals` is a site's totals as plain Python numbers (what
:meth:`deadrelu.core.stats.UnitStats.compute` returns); :func:`classify` turns counts into the
per-unit states of :data:`UNIT_STATES` (active, asleep, dead, unobserved, nonfinite) and
:func:`classify_codes` does the same on tensors, by the same rule. Reports and the monitor classify
through them (:mod:`deadrelu.core.unit_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["UNIT_STATES", "UnitTotals", "classify", "classify_codes"]


@dataclass(frozen=True)
class UnitTotals:
    """Host-side snapshot of a :class:`UnitStats` (plain Python numbers)."""

    observations: int
    fired_counts: tuple[int, ...]
    mean_abs: tuple[float, ...]
    nonfinite_counts: tuple[int, ...]


#: The per-unit states, indexed by the codes :func:`classify_codes` gives.
UNIT_STATES = ("active", "asleep", "dead", "unobserved", "nonfinite")


def classify_codes(
    fired: torch.Tensor,
    observations: int,
    nonfinite: torch.Tensor,
    asleep_rate: float,
    min_observations: int = 1,
) -> torch.Tensor:
    """:func:`classify` on tensors: per unit, the index of its state in :data:`UNIT_STATES` (int8).

    The same states as :func:`classify` for the same numbers: the rate is the same float64
    division (exact while the counts stay below 2**53), compared with the same ``<=``.
    """
    codes = torch.zeros(fired.shape, dtype=torch.int8)
    if observations:
        codes[(fired.to(torch.float64) / observations) <= asleep_rate] = 1
    codes[fired == 0] = 2 if observations >= max(1, min_observations) else 3
    codes[nonfinite != 0] = 4
    return codes


def classify(
    fired: Sequence[int],
    observations: int,
    nonfinite: Sequence[int],
    asleep_rate: float,
    min_observations: int = 1,
) -> list[str]:
    """Pure core: per unit, ``"nonfinite"``, ``"unobserved"``, ``"dead"``, ``"asleep"`` or ``"active"``.

    NaN/Inf units are their own state; dead means zero firings over at least
    ``min_observations`` observations. A unit that never fired on fewer observations is
    ``"unobserved"``: too little evidence to call it dead (a unit that fired is alive however
    few its observations).
    """
    out = []
    for f, bad in zip(fired, nonfinite):
        if bad:
            out.append("nonfinite")
        elif f == 0:
            out.append("dead" if observations >= max(1, min_observations) else "unobserved")
        elif observations and f / observations <= asleep_rate:  # the printed rate's own division: at the level is asleep
            out.append("asleep")
        else:
            out.append("active")
    return out
