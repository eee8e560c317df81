"""Fixed-size per-unit accumulators: update on device, merge exactly, compute once.

:class:`UnitStats` follows the ``update / merge / reset / compute`` pattern of
torchmetrics: each batch adds integer counts and float64 sums into tensors of
shape ``(units,)`` that live on the activation's device, with no host
synchronisation (no ``.item()``, no ``.cpu()``) until :meth:`UnitStats.compute`.
Because everything is a sum, any split of the data into batches gives the same
counts, and accumulators from different streams or processes merge exactly.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import DeadReluError

__all__ = ["UnitStats", "UnitTotals", "unit_reduce_dims"]


_SCRATCH = threading.local()


def _scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A reusable buffer of ``shape``: writing into memory already touched avoids the page
    faults that dominate the cost of a fresh large tensor on CPU. One buffer per
    (dtype, device, slot) per thread, grown as needed; :func:`release_scratch` frees them."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    numel = 1
    for s in shape:
        numel *= s
    key = (dtype, device, slot)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached vector of ``n`` ones (per thread, dtype and device)."""
    pool = getattr(_SCRATCH, "ones", None)
    if pool is None:
        pool = _SCRATCH.ones = {}
    vec = pool.get((dtype, device))
    if vec is None or vec.numel() < n:
        vec = pool[(dtype, device)] = torch.ones(max(n, 256), dtype=dtype, device=device)
    return vec[:n]


def _column_sum(m: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Sum a 2-D tensor over its rows. A matrix-vector product with ones runs 2-3x faster than
    ``sum(0)`` on CPU, and stays exact for the 0/1 counts (integers below 2**24 in float32)."""
    if m.dtype in (torch.float32, torch.float64) and dtype in (None, m.dtype) and m.shape[0] > 1:
        return _ones(m.shape[0], m.dtype, m.device) @ m
    return m.sum(0, dtype=dtype)


def _per_unit_sum(t: torch.Tensor, unit_dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over every dimension but ``unit_dim``.

    A contiguous tensor is viewed as ``(before, units, after)``: the inner dimension is reduced
    first, then the outer one — about twice as fast on CPU as one multi-dimension reduction."""
    units = t.shape[unit_dim]
    if t.is_contiguous():
        if unit_dim == t.ndim - 1:
            return _column_sum(t.view(-1, units), dtype)
        after = 1
        for size in t.shape[unit_dim + 1 :]:
            after *= size
        return _column_sum(t.view(-1, units, after).sum(2, dtype=dtype), None)
    moved = t.movedim(unit_dim, -1)
    if moved.is_contiguous():  # e.g. channels_last convolution outputs
        return _column_sum(moved.view(-1, units), dtype)
    return t.sum(dim=unit_reduce_dims(t.ndim, unit_dim), dtype=dtype)


def batch_unit_sums(
    x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool, count_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit count of ``x > threshold`` (in ``count_dtype``) and float32 sum of ``|x|`` for
    one batch: the fastest exact pass for the tensor's size, layout and device.

    Counting in a float dtype is exact while each count stays below 2**24 (float32) or
    2**53 (float64), and a float reduction is several times faster on CPU than summing a
    bool mask. ``nonnegative`` (ReLU, ReLU6, Softplus) skips the ``abs`` pass."""
    sums = _chunked_sums(x, unit_dim, threshold, nonnegative, count_dtype)
    if sums is not None:
        return sums
    fired = _per_unit_sum(torch.gt(x, threshold, out=_scratch(x.shape, count_dtype, x.device)), unit_dim)
    if nonnegative:
        mag = _per_unit_sum(x, unit_dim, torch.float32)
    else:
        mag = _per_unit_sum(torch.abs(x, out=_scratch(x.shape, torch.float32, x.device, slot=2)), unit_dim)
    return fired, mag


# Elements per chunk of the CPU chunked pass: 1 MiB of float32, so a chunk's mask is still in
# cache when it is reduced and the activation is read from memory once instead of twice.
_CHUNK_ELEMENTS = 1 << 18
_CHUNK_MIN_ELEMENTS = 4 * _CHUNK_ELEMENTS


def _chunked_sums(
    x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool, count_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-unit (count of ``x > threshold``, sum of ``|x|``) in one cache-friendly pass over a
    large contiguous CPU activation, chunk by chunk along the leading dimensions; ``None``
    where the plain whole-tensor pass is as good (small, strided or accelerator tensors).

    Measured on a 2-core CPU: a (128, 32, 32, 32) ReLU output costs 3-4% of its convolution
    this way instead of 6-7%."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.numel() < _CHUNK_MIN_ELEMENTS:
        return None
    units = x.shape[unit_dim]
    before = 1
    for size in x.shape[:unit_dim]:
        before *= size
    after = x.numel() // (before * units)
    rows = max(1, _CHUNK_ELEMENTS // (units * after))
    if rows * 2 > before:
        return None
    x3 = x.view(before, units, after)
    mask = _scratch((rows, units, after), count_dtype, x.device, slot=1)
    absx = None if nonnegative else _scratch((rows, units, after), torch.float32, x.device, slot=2)
    if after == 1:  # (rows, units): add each chunk's column sums into the totals
        fired = torch.zeros(units, dtype=count_dtype)
        mag = torch.zeros(units, dtype=torch.float32)
        ones_c, ones_f = _ones(rows, count_dtype, x.device), _ones(rows, torch.float32, x.device)
        for start in range(0, before, rows):
            chunk = x3[start : start + rows, :, 0]
            n = chunk.shape[0]
            m = torch.gt(chunk, threshold, out=mask[:n, :, 0])
            mag_src = chunk if absx is None else torch.abs(chunk, out=absx[:n, :, 0])
            fired.addmv_(m.t(), ones_c[:n])
            mag.addmv_(mag_src.t(), ones_f[:n])
        return fired, mag
    # (before, units, after): per-row sums over the trailing run, then one sum over rows.
    fired_rows = _scratch((before, units), count_dtype, x.device, slot=3)
    mag_rows = _scratch((before, units), torch.float32, x.device, slot=4)
    for start in range(0, before, rows):
        chunk = x3[start : start + rows]
        n = chunk.shape[0]
        m = torch.gt(chunk, threshold, out=mask[:n])
        mag_src = chunk if absx is None else torch.abs(chunk, out=absx[:n])
        torch.sum(m, dim=2, out=fired_rows[start : start + n])
        torch.sum(mag_src, dim=2, dtype=torch.float32, out=mag_rows[start : start + n])
    return _column_sum(fired_rows, None), _column_sum(mag_rows, None)


def release_scratch() -> None:
    """Free the scratch buffers of this thread (called when a capture detaches)."""
    _SCRATCH.pool = {}
    _SCRATCH.ones = {}


def unit_reduce_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """Every dimension except ``unit_dim``: the ones a per-unit statistic reduces over."""
    return tuple(d for d in range(ndim) if d != unit_dim)


def as_unit_batch(activation: torch.Tensor, unit_dim: int, units: int) -> tuple[torch.Tensor, int]:
    """The activation detached, with an explicit batch dimension and a floating dtype.

    Returns the tensor and its unit dimension (an unbatched 0-D or 1-D activation becomes one
    sample of shape ``(1, units)``). Every accumulator goes through this, so they agree on what
    a batch is.

    Raises:
        DeadReluError: when the unit dimension's size differs from ``units``.
    """
    x = activation.detach()  # detached: nothing downstream is recorded by autograd
    if x.ndim < 2:
        x = x.reshape(1, -1)
        unit_dim = 1
    if x.shape[unit_dim] != units:
        raise DeadReluError(
            f"activation has {x.shape[unit_dim]} units along dim {unit_dim} (shape {tuple(x.shape)}), "
            f"expected {units}"
        )
    if not x.is_floating_point():
        x = x.float()
    return x, unit_dim


@dataclass(frozen=True)
class UnitTotals:
    """Host-side snapshot of a :class:`UnitStats` (plain Python numbers)."""

    observations: int
    fired_counts: tuple[int, ...]
    mean_abs: tuple[float, ...]
    nonfinite_counts: tuple[int, ...]


class UnitStats:
    """Per-unit firing statistics of one activation site.

    State (all shape ``(units,)`` on ``device``):
        * ``fired``: int64 count of outputs ``> threshold``;
        * ``abs_sum``: float64 sum of ``|h|`` (for the dormancy score);
        * ``nonfinite``: int64 count of NaN/±Inf outputs;
    plus ``observations``, the number of values each unit produced (a Python int,
    known from shapes alone, so counting it never synchronises).

    Counts are int64 and so stay exact far beyond 10^10 observations.

    Args:
        units: number of units.
        threshold: an output fires when it is ``> threshold`` (0 for ReLU-like activations).
        device: where the accumulators live (the activation's device).

    Example:
        >>> s = UnitStats(3)
        >>> s.update(torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.0, 3.0]]), unit_dim=1)
        >>> s.compute().fired_counts
        (2, 0, 1)
    """

    def __init__(self, units: int, threshold: float = 0.0, device: torch.device | str | None = None) -> None:
        self.units = int(units)
        self.threshold = float(threshold)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.observations = 0
        self.fired = torch.zeros(self.units, dtype=torch.int64, device=self.device)
        self.abs_sum = torch.zeros(self.units, dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros(self.units, dtype=torch.int64, device=self.device)

    def update(self, activation: torch.Tensor, unit_dim: int, nonnegative: bool = False) -> None:
        """Add one batch of activations whose units lie along ``unit_dim``.

        Args:
            activation: the activation output (any shape; detached internally).
            unit_dim: the dimension that indexes units.
            nonnegative: the activation cannot be negative (ReLU, ReLU6, Softplus), so
                ``|h| = h`` and the magnitude sum needs no ``abs`` pass.

        Raises:
            DeadReluError: when the unit dimension's size differs from ``units``.
        """
        x, unit_dim = as_unit_batch(activation, unit_dim, self.units)
        if x.device != self.device:
            self._move(x.device)
        per_unit = x.numel() // self.units if self.units else 0
        self.observations += per_unit
        count_dtype = torch.float32 if per_unit < 2**24 else torch.float64  # exact counts, see batch_unit_sums
        fired, mag = batch_unit_sums(x, unit_dim, self.threshold, nonnegative, count_dtype)
        self.fired += fired.to(torch.int64)
        self.abs_sum += mag
        # A unit's magnitude sum is finite exactly when all its values are. On CPU checking
        # that costs nothing, so the exact NaN/Inf count is taken only for batches that need
        # it; on accelerators it is always taken, to avoid a device synchronisation.
        if x.device.type != "cpu" or not math.isfinite(mag.sum().item()):
            self.nonfinite += _per_unit_sum(~torch.isfinite(x), unit_dim, torch.int64)

    def _move(self, device: torch.device) -> None:
        self.device = device
        self.fired = self.fired.to(device)
        self.abs_sum = self.abs_sum.to(device)
        self.nonfinite = self.nonfinite.to(device)

    def merge(self, other: "UnitStats") -> "UnitStats":
        """Add another accumulator of the same site into this one (in place) and return self.

        Raises:
            DeadReluError: when the two have different unit counts or thresholds.
        """
        if other.units != self.units:
            raise DeadReluError(f"cannot merge statistics of {other.units} units into {self.units} units")
        if other.threshold != self.threshold:
            raise DeadReluError(
                f"cannot merge statistics with firing thresholds {other.threshold} and {self.threshold}"
            )
        self.observations += other.observations
        self.fired += other.fired.to(self.device)
        self.abs_sum += other.abs_sum.to(self.device)
        self.nonfinite += other.nonfinite.to(self.device)
        return self

    def all_reduce(self, group: object | None = None) -> None:
        """Sum this accumulator over all ranks of ``torch.distributed`` (in place)."""
        import torch.distributed as dist

        obs = torch.tensor([self.observations], dtype=torch.int64, device=self.device)
        for t in (self.fired, self.abs_sum, self.nonfinite, obs):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.observations = int(obs.item())

    def state_dict(self) -> dict[str, object]:
        """Tensors and counts, for checkpointing or sending to another process."""
        return {
            "units": self.units,
            "threshold": self.threshold,
            "observations": self.observations,
            "fired": self.fired.clone(),
            "abs_sum": self.abs_sum.clone(),
            "nonfinite": self.nonfinite.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> "UnitStats":
        """Rebuild an accumulator from :meth:`state_dict`."""
        fired = state["fired"]
        assert isinstance(fired, torch.Tensor)
        out = cls(int(state["units"]), float(state["threshold"]), device=fired.device)  # type: ignore[arg-type]
        out.observations = int(state["observations"])  # type: ignore[arg-type]
        out.fired = fired.clone()
        out.abs_sum = state["abs_sum"].clone()  # type: ignore[union-attr]
        out.nonfinite = state["nonfinite"].clone()  # type: ignore[union-attr]
        return out

    def compute(self) -> UnitTotals:
        """Copy the totals to the host (the only synchronisation point).

        Raises:
            DeadReluError: when no data has been seen yet.
        """
        if self.observations == 0:
            raise DeadReluError("no activations were observed yet: run some data through the model first")
        n = self.observations
        mean_abs = (self.abs_sum / n).tolist()
        return UnitTotals(
            observations=n,
            fired_counts=tuple(self.fired.tolist()),
            mean_abs=tuple(mean_abs),
            nonfinite_counts=tuple(self.nonfinite.tolist()),
        )


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
        elif f <= asleep_rate * observations:
            out.append("asleep")
        else:
            out.append("active")
    return out
