"""Rolling-window per-unit accumulator used by :class:`deadrelu.Monitor`, built on the stats protocol.

Each activation site keeps a ring of the last ``window`` observed batches: row ``k`` is one
full set of the declared statistics (:data:`deadrelu.core.stats.STATISTICS`: observations,
fired count, Σ|h|, NaN/Inf count — int64 counts and float64 sums, so every row is exact) for
one batch. A batch zeroes one row and adds into it with the same single-read pass the scan
uses (:func:`deadrelu.core.stats.accumulate`), so the hot path never synchronises with the
host (on accelerators) and never grows a Python list. The row a new batch overwrites is
first added into the since-start totals, so both scopes stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.stats import StatTensors, accumulate, as_unit_batch, foreach_apply, fused_relu_accumulate, relu_engine
from ..errors import DeadReluError

__all__ = ["WindowStats", "WindowTotals", "add_sums_to_many"]

#: Rings up to this many rows keep views of every row; a longer one makes a row's views per batch.
_CACHED_ROWS = 1024


@dataclass
class WindowTotals:
    """Per-unit sums over one scope, still on the device (see :meth:`WindowStats.totals`).

    ``state`` holds one tensor per declared statistic (``observations`` has shape ``(1,)``);
    the attributes below are views of it.
    """

    state: dict[str, torch.Tensor]
    batches: int

    @property
    def fired(self) -> torch.Tensor:
        """int64 ``(units,)`` count of outputs ``> threshold``."""
        return self.state["fired"]

    @property
    def abs_sum(self) -> torch.Tensor:
        """float64 ``(units,)`` sum of ``|h|``."""
        return self.state["abs_sum"]

    @property
    def nonfinite(self) -> torch.Tensor:
        """int64 ``(units,)`` count of NaN/±Inf outputs."""
        return self.state["nonfinite"]

    @property
    def bad_batches(self) -> torch.Tensor:
        """Former name of :attr:`nonfinite` (which now counts values, as the scan does)."""
        return self.state["nonfinite"]

    @property
    def observations(self) -> int:
        """Values per unit in this scope (reads the device counter)."""
        return int(self.state["observations"].item())


class WindowStats:
    """Per-unit firing counts over the last ``window`` batches and since the start.

    Args:
        units: number of units at the site.
        threshold: an output fires when it is ``> threshold``.
        device: where the ring buffers live (moved to the activation's device on first use).
        window: number of most recent batches in the rolling window.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (see :func:`deadrelu.core.stats.accumulate`).

    Example:
        >>> w = WindowStats(2, 0.0, "cpu", window=2)
        >>> for v in ([1.0, 0.0], [0.0, 0.0], [0.0, 0.0]):
        ...     w.update(torch.tensor([v]), unit_dim=1)
        >>> w.totals("window").fired.tolist(), w.totals("total").fired.tolist()
        ([0, 0], [1, 0])
    """

    def __init__(
        self, units: int, threshold: float, device: torch.device | str | None, window: int, backend: str = "auto"
    ) -> None:
        self.units = int(units)
        self.threshold = float(threshold)
        self.window = int(window)
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.nonnegative = False  # set by the monitor for relu/relu6 sites
        try:
            self.ring = StatTensors(self.units, self.device, leading=(self.window,))
        except (RuntimeError, MemoryError, OverflowError) as err:
            # The ring holds window x units counters per statistic: a window given in samples
            # rather than batches (window=len(dataset)) asks for gigabytes at the first forward.
            raise DeadReluError(
                f"cannot allocate a rolling window of {self.window} batches for a site of {self.units} units on "
                f"{self.device} ({type(err).__name__}: {str(err)[:120]}): pass a smaller window= (it counts "
                "batches, not samples)"
            ) from err
        self.banked = StatTensors(self.units, self.device)  # rows that left the window
        self.pos = 0
        self.count = 0  # batches seen since the start
        # The sums over the first `window` batches, kept when the window first fills: several
        # forwards per step (gradient accumulation) may slide it on before the monitor looks, and a
        # unit's born-dead verdict is about its first full window.
        self.first: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._rows = None
        self.ring.reset()
        self.banked.reset()
        self.pos = 0
        self.count = 0
        self.first = None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The ring's state tensors by name, shape ``(window, ...)`` (for reduction by key)."""
        return self.ring.state

    @property
    def observations(self) -> int:
        """Values per unit seen since the start (reads the device counters)."""
        return self.totals("total").observations

    @property
    def full(self) -> bool:
        """True once ``window`` batches have been seen."""
        return self.count >= self.window

    def update(  # no no_grad context (its cost, every site of every step): accumulate reads a detached view
        self,
        activation: torch.Tensor,
        unit_dim: int,
        nonnegative: bool | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch whose units lie along ``unit_dim`` (overwrites the oldest ring row).

        ``nonnegative`` (default: the site's own flag) says the outputs cannot be negative,
        so the ``|h|`` pass is skipped; ``mask`` selects observations as in
        :meth:`deadrelu.core.stats.UnitStats.update`.

        Raises:
            DeadReluError: when the unit dimension's size differs from ``units`` or the mask does not fit.
        """
        x, unit_dim = as_unit_batch(activation, unit_dim, self.units)
        if mask is not None and activation.ndim < 2:
            mask = mask.reshape(1)
        row = self._claim_row(x.device)
        foreach_apply("zero", list(row.values()))  # the row the batch accumulates into
        nonneg = self.nonnegative if nonnegative is None else nonnegative
        accumulate(x, unit_dim, self.threshold, nonneg, row, mask, self.backend)
        self._advance()

    def relu_and_update(
        self, x: torch.Tensor, unit_dim: int, mask: torch.Tensor | None = None, inplace: bool = False
    ) -> torch.Tensor | None:
        """``relu(x)``, counted into the next ring row by the kernel that computes it (as
        :meth:`update` would count it); None, doing nothing, where that kernel does not apply."""
        if type(self).update is not WindowStats.update:  # a subclass's own update() must see every batch
            return None
        engine = None if x.ndim < 2 or x.shape[unit_dim] != self.units else relu_engine(x, unit_dim, self.backend, inplace)
        if engine is None:
            return None
        row = self._claim_row(x.device)
        foreach_apply("zero", list(row.values()))
        y = fused_relu_accumulate(x, unit_dim, self.threshold, row, mask, self.backend, inplace, engine)
        self._advance()
        return y

    def _claim_row(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The ring row the next batch fills; the batch it held first leaves for the totals."""
        row = self._row_views(device)
        if self.count >= self.window:  # the row still holds the batch that leaves the window
            self.banked.add_(row)
        return row

    def _row_views(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device != self.device:
            self.device = device
            self.ring.to(device)
            self.banked.to(device)
            self._rows = None
        if self.window > _CACHED_ROWS:  # a million views would take seconds and gigabytes to make
            return self.ring.row(self.pos)
        rows = getattr(self, "_rows", None)
        if rows is None:  # views of every ring row, made once: the per-step path then only indexes a list
            rows = self._rows = [self.ring.row(i) for i in range(self.window)]
        return rows[self.pos]

    def discard_last(self) -> None:
        """Take back the last batch (of a forward pass that raised part-way): its ring row is zeroed
        and the next batch fills it. The batch that row held before had left for the totals when
        the row was claimed, so until the next batch the window holds one batch fewer."""
        if self.count == 0:
            return
        self.pos = (self.pos - 1) % self.window
        foreach_apply("zero", list(self._row_views(self.device).values()))
        if self.count == self.window:
            self.first = None  # the first window's sums held this batch: taken again when it fills
        self.count -= 1

    def _advance(self) -> None:
        self.pos = (self.pos + 1) % self.window
        self.count += 1
        if self.count == self.window:  # once per site: the ring holds exactly the first window now
            with torch.no_grad():
                self.first = self.ring.summed()

    @torch.no_grad()
    def totals(self, scope: str) -> WindowTotals:
        """Per-unit sums over ``"window"`` (the last ``window`` batches), ``"total"`` (since the start)
        or ``"first"`` (the first ``window`` batches; those so far until the window has filled)."""
        if scope == "first" and self.first is not None:
            return WindowTotals(dict(self.first), self.window)
        summed = self.ring.summed()  # rows not yet written are zero
        if scope in ("window", "first"):
            return WindowTotals(summed, min(self.count, self.window))
        return WindowTotals({k: v + self.banked.state[k] for k, v in summed.items()}, self.count)


@torch.no_grad()
def add_sums_to_many(batches: Sequence[tuple[WindowStats, Sequence[torch.Tensor]]]) -> None:
    """Add one batch's sums to each of several rings with two multi-tensor launches in all (one
    that banks the rows leaving the windows, one that writes the new rows), not a few per ring.
    Each ring's sums come in :data:`~deadrelu.core.stats.STATISTICS` order, as
    :func:`~deadrelu.core.stats.traceable_batch_sums` returns them (the compiled capture computes
    them inside the graph).

    Raises:
        DeadReluError: when a ring gets a number of sums other than its statistics'.
    """
    bank_into: list[torch.Tensor] = []
    bank_from: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for stats, sums in batches:
        row = stats._row_views(sums[0].device)
        if len(sums) != len(row):
            raise DeadReluError(f"expected {len(row)} per-unit sums ({', '.join(row)}), got {len(sums)}")
        if stats.count >= stats.window:  # the row still holds the batch that leaves the window
            bank_into += stats.banked.state.values()
            bank_from += row.values()
        rows += row.values()
        sources += sums
    if bank_into:
        foreach_apply("add", bank_into, bank_from)
    foreach_apply("copy", rows, sources)
    for stats, _ in batches:
        stats._advance()
