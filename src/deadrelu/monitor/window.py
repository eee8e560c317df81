"""Rolling-window per-unit accumulator used by :class:`deadrelu.Monitor`.

Each activation site keeps a ring buffer of the last ``window`` observed batches:
row ``k`` holds, per unit, how many outputs fired and the float32 sum of ``|h|`` in
that batch. Counts are kept in float32 — exact while a unit produces fewer than 2**24
values per batch (float64 beyond) — because a float reduction is several times faster
on CPU than summing a bool mask; window sums are taken in float64 and so stay exact. A batch only overwrites one row of fixed-size device tensors, so the
hot path never synchronises with the host and never grows a Python list. The row a
new batch overwrites is first added into the since-start totals, so both scopes stay
exact.

Non-finite outputs are detected from the row sums (a NaN/Inf anywhere in a unit's
batch makes its ``|h|`` sum non-finite) instead of a separate full pass over the
activation; the monitor therefore counts, per unit, the *batches* that contained a
NaN/Inf rather than the individual values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.stats import as_unit_batch, batch_unit_sums

__all__ = ["WindowStats", "WindowTotals"]


@dataclass
class WindowTotals:
    """Per-unit sums over one scope, still on the device (see :meth:`WindowStats.totals`)."""

    fired: torch.Tensor  # int64 (units,)
    abs_sum: torch.Tensor  # float64 (units,)
    bad_batches: torch.Tensor  # int64 (units,)
    observations: int
    batches: int


class WindowStats:
    """Per-unit firing counts over the last ``window`` batches and since the start.

    Args:
        units: number of units at the site.
        threshold: an output fires when it is ``> threshold``.
        device: where the ring buffers live (moved to the activation's device on first use).
        window: number of most recent batches in the rolling window.

    Example:
        >>> w = WindowStats(2, 0.0, "cpu", window=2)
        >>> for v in ([1.0, 0.0], [0.0, 0.0], [0.0, 0.0]):
        ...     w.update(torch.tensor([v]), unit_dim=1)
        >>> w.totals("window").fired.tolist(), w.totals("total").fired.tolist()
        ([0, 0], [1, 0])
    """

    def __init__(self, units: int, threshold: float, device: torch.device | str | None, window: int) -> None:
        self.units = int(units)
        self.threshold = float(threshold)
        self.window = int(window)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.nonnegative = False  # set by the monitor for relu/relu6/softplus sites
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        w, u, dev = self.window, self.units, self.device
        self.ring_fired = torch.zeros(w, u, dtype=torch.float32, device=dev)
        self.ring_abs = torch.zeros(w, u, dtype=torch.float32, device=dev)
        self.ring_obs = [0] * w  # fixed length: values per unit in each slot, known from shapes
        self.old_fired = torch.zeros(u, dtype=torch.int64, device=dev)
        self.old_abs = torch.zeros(u, dtype=torch.float64, device=dev)
        self.old_bad = torch.zeros(u, dtype=torch.int64, device=dev)
        self.old_obs = 0
        self.pos = 0
        self.count = 0  # batches seen since the start

    @property
    def observations(self) -> int:
        """Values per unit seen since the start (Python int, no sync)."""
        return self.old_obs + sum(self.ring_obs)

    @property
    def full(self) -> bool:
        """True once ``window`` batches have been seen."""
        return self.count >= self.window

    @torch.no_grad()
    def update(self, activation: torch.Tensor, unit_dim: int, nonnegative: bool | None = None) -> None:
        """Add one batch whose units lie along ``unit_dim`` (overwrites the oldest ring row).

        ``nonnegative`` (default: the site's own flag) says the outputs cannot be negative,
        so the ``|h|`` pass is skipped.

        Raises:
            DeadReluError: when the unit dimension's size differs from ``units``.
        """
        x, unit_dim = as_unit_batch(activation, unit_dim, self.units)
        if x.device != self.device:
            self._move(x.device)
        per_unit = x.numel() // self.units if self.units else 0
        if per_unit >= 2**24 and self.ring_fired.dtype != torch.float64:
            self.ring_fired = self.ring_fired.double()  # float32 counts would round
        pos = self.pos
        if self.count >= self.window:
            # The slot still holds the batch that leaves the window: bank it in the since-start totals.
            row_abs = self.ring_abs[pos]
            self.old_fired += self.ring_fired[pos].to(torch.int64)
            self.old_abs += row_abs
            self.old_bad += ~torch.isfinite(row_abs)
            self.old_obs += self.ring_obs[pos]
        nonneg = self.nonnegative if nonnegative is None else nonnegative
        fired, mag = batch_unit_sums(x, unit_dim, self.threshold, nonneg, self.ring_fired.dtype)
        self.ring_fired[pos] = fired
        self.ring_abs[pos] = mag
        self.ring_obs[pos] = per_unit
        self.pos = (pos + 1) % self.window
        self.count += 1

    def _move(self, device: torch.device) -> None:
        self.device = device
        for name in ("ring_fired", "ring_abs", "old_fired", "old_abs", "old_bad"):
            setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def totals(self, scope: str) -> WindowTotals:
        """Per-unit sums over ``"window"`` (the last ``window`` batches) or ``"total"`` (since the start)."""
        filled = min(self.count, self.window)
        ring_abs = self.ring_abs[:filled] if filled < self.window else self.ring_abs
        fired = self.ring_fired.sum(0, dtype=torch.float64).to(torch.int64)
        abs_sum = ring_abs.sum(0, dtype=torch.float64)
        bad = (~torch.isfinite(ring_abs)).sum(0)
        obs = sum(self.ring_obs)
        if scope == "window":
            return WindowTotals(fired, abs_sum, bad, obs, filled)
        return WindowTotals(
            fired + self.old_fired, abs_sum + self.old_abs, bad + self.old_bad, obs + self.old_obs, self.count
        )
