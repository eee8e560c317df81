"""The declaration of one per-unit statistic, and the batch its ``batch`` function sees.

A :class:`Statistic` names a state tensor, its dtype and its shape (one value per unit, or one per
site); every statistic is a sum over observations, so the accumulators merge, reduce and reset all
of them the same way. The declared set, and how to add to it, is
:data:`deadrelu.core.stats.STATISTICS`. A statistic outside the fused pass carries a ``batch``
function, which sees one batch as a :class:`UnitBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Statistic", "UnitBatch"]


@dataclass(frozen=True)
class UnitBatch:
    """One batch as a ``batch`` function of a :class:`Statistic` sees it.

    Attributes:
        x: the activation (masked-out observations removed), floating point, detached.
        unit_dim: the dimension of ``x`` that indexes units.
        threshold: the site's firing threshold.
    """

    x: torch.Tensor
    unit_dim: int
    threshold: float


@dataclass(frozen=True)
class Statistic:
    """Declaration of one accumulated statistic (merged by summation).

    Args:
        name: key of its state tensor.
        dtype: dtype of its state tensor (int64 for counts, float64 for sums).
        per_unit: one value per unit (shape ``(units,)``) or one per site (shape ``(1,)``).
        doc: what it holds, for readers.
        batch: for statistics outside the fused pass, a function from a :class:`UnitBatch`
            to this batch's contribution (shape ``(units,)`` or ``(1,)``).

    Example:
        >>> Statistic("fired", torch.int64).shape(4)
        (4,)
    """

    name: str
    dtype: torch.dtype
    per_unit: bool = True
    doc: str = ""
    batch: Callable[[UnitBatch], torch.Tensor] | None = None

    def shape(self, units: int) -> tuple[int, ...]:
        """Shape of the state tensor for a site with ``units`` units."""
        return (units,) if self.per_unit else (1,)
