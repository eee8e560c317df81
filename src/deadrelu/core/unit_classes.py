"""A site's per-unit classification on tensors: each unit's state, dormancy score and dormant flag.

:class:`~deadrelu.core.report.SiteReport` derives every state (dead, asleep, ...) from its raw sums
and its levels; this module does that once per site on tensors, with the pure-Python rule of
:mod:`deadrelu.core.stats` where counts are too large for float64 to be exact, and lets the monitor
hand over the host tensors it already holds (:func:`prime_unit_classes`).
"""

from __future__ import annotations

import array
import itertools
import math
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from .unit_states import UNIT_STATES, classify, classify_codes

if TYPE_CHECKING:
    from .report import SiteReport

__all__ = ["UnitClasses", "unit_classes", "prime_unit_classes", "indices", "int_tensor"]


class UnitClasses(NamedTuple):
    """A site's per-unit classification, on tensors (see ``SiteReport._classes``)."""

    codes: torch.Tensor  # int8: each unit's index in UNIT_STATES
    score: torch.Tensor  # float64 dormancy score (NaN for non-finite units)
    dormant: torch.Tensor  # bool


def indices(mask: torch.Tensor) -> tuple[int, ...]:
    """The positions where a bool tensor is True, as a tuple of ints."""
    return tuple(torch.nonzero(mask).flatten().tolist())


def int_tensor(values: Sequence[int]) -> torch.Tensor:
    """int64 tensor of a site's counts, through a C array (a tenth of ``torch.tensor``'s time on a
    tuple of Python ints); ``torch.tensor`` where the values are not plain integers."""
    try:
        return torch.frombuffer(array.array("q", values), dtype=torch.int64) if values else torch.zeros(0, dtype=torch.int64)
    except (TypeError, OverflowError):
        return torch.tensor(list(values), dtype=torch.int64)


def _float_tensor(values: Sequence[float]) -> torch.Tensor:
    try:
        return torch.frombuffer(array.array("d", values), dtype=torch.float64) if values else torch.zeros(0, dtype=torch.float64)
    except TypeError:
        return torch.tensor(list(values), dtype=torch.float64)


def unit_classes(site: SiteReport) -> UnitClasses:
    """Every unit's state, dormancy score and dormant flag of one site, computed on tensors."""
    try:
        fired, nonfinite = int_tensor(site.fired_counts), int_tensor(site.nonfinite_counts)
    except (OverflowError, ValueError, RuntimeError):  # counts beyond int64 (a hand-made report)
        fired = nonfinite = None
    return _classes_of(site, fired, _float_tensor(site.mean_abs), nonfinite)


def prime_unit_classes(site: SiteReport, fired: torch.Tensor, mean_abs: torch.Tensor, nonfinite: torch.Tensor) -> SiteReport:
    """``site`` with its per-unit classification computed from host tensors the caller already
    holds, holding the same values as its fields (the monitor's evaluation: no second conversion
    of 100k Python numbers back into tensors). Returns ``site``."""
    site.__dict__["_classes"] = _classes_of(site, fired, mean_abs, nonfinite)
    return site


#: Counts below this are exact in float64, so the tensors' rate is Python's own division.
_EXACT_COUNTS = 2**53


def _classes_of(
    site: SiteReport, fired: torch.Tensor | None, mean_abs: torch.Tensor, nonfinite: torch.Tensor | None
) -> UnitClasses:
    lv = site.levels
    if fired is None or nonfinite is None or site.observations >= _EXACT_COUNTS or (
        fired.numel() and int(fired.max()) >= _EXACT_COUNTS
    ):  # counts too large for the float64 rate to be exact: the pure-Python rule, unit by unit
        states = classify(site.fired_counts, site.observations, site.nonfinite_counts, lv.asleep_rate, lv.min_observations)
        codes = torch.tensor([UNIT_STATES.index(state) for state in states], dtype=torch.int8)
        bad = torch.tensor([bool(b) for b in site.nonfinite_counts], dtype=torch.bool)
    else:
        bad = nonfinite != 0
        codes = classify_codes(fired, site.observations, bad, lv.asleep_rate, lv.min_observations)
    # The layer mean is Python's own sum over the finite units, in unit order, as the score was
    # always defined; the per-unit division is the same float64 division on tensors.
    finite = site.mean_abs if not bad.any() else list(itertools.compress(site.mean_abs, (~bad).tolist()))
    layer_mean = sum(finite) / len(finite) if finite else 0.0
    score = mean_abs / layer_mean if layer_mean > 0 else torch.zeros_like(mean_abs)
    score[bad] = math.nan
    dormant = (score <= lv.dormant_tau) & (codes != UNIT_STATES.index("unobserved"))  # NaN compares False
    return UnitClasses(codes, score, dormant)
