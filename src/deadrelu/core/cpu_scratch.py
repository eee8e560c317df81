"""The memory of the pure-torch CPU pass and what is built on it: scratch buffers, per-layout plans.

Where neither kernel counts a CPU tensor, :func:`deadrelu.core.stats.accumulate` runs a chunked
torch pass. Writing into memory already touched avoids the page faults that dominate the cost of a
fresh large tensor, so the pass works in per-thread scratch buffers (:func:`scratch`, freed by
:func:`release_scratch` when a capture detaches). For a layout whose units are innermost in memory
and that fits in one chunk (a Linear layer's output), a :class:`RowsPlan` holds its buffers and
views, made once per layout. The rest is the pass's exact arithmetic: the tile of a chunk
(:func:`tile`), column sums (:func:`column_sum_into`), a threshold as a float32 comparison sees it
(:func:`float32`) and a float64 magnitude sum row by row (:func:`float64_abs_sum`). The chunk loop
and its sizes (``_CHUNK_ELEMENTS``, which the tests shrink) stay in :mod:`deadrelu.core.stats`.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import torch

from . import kernels

__all__ = ["SCRATCH", "RowsPlan", "column_sum_into", "float32", "float64_abs_sum", "release_scratch", "scratch", "tile"]


SCRATCH = threading.local()


def scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A reusable buffer of ``shape``: writing into memory already touched avoids the page
    faults that dominate the cost of a fresh large tensor on CPU. One buffer per
    (dtype, device, slot) per thread, grown as needed; :func:`release_scratch` frees them."""
    pool = getattr(SCRATCH, "pool", None)
    if pool is None:
        pool = SCRATCH.pool = {}
    numel = math.prod(shape)
    key = (dtype, device, slot)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
        SCRATCH.plans = {}  # plans hold views of the old buffer: rebuild them on the new one
    return buf[:numel].view(shape)


def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached vector of ``n`` ones (per thread, dtype and device)."""
    pool = getattr(SCRATCH, "ones", None)
    if pool is None:
        pool = SCRATCH.ones = {}
    vec = pool.get((dtype, device))
    if vec is None or vec.numel() < n:
        vec = pool[(dtype, device)] = torch.ones(max(n, 256), dtype=dtype, device=device)
    return vec[:n]


def release_scratch() -> None:
    """Free the scratch buffers of this thread (called when a capture detaches)."""
    SCRATCH.pool = {}
    SCRATCH.ones = {}
    SCRATCH.plans = {}


def column_sum_into(total: torch.Tensor, m: torch.Tensor, counts: bool) -> None:
    """Add the column sums of a 2-D float tensor into a float64 ``total``. For wide rows of
    ``counts`` a matrix-vector product with ones runs up to 2x faster than ``sum(0)`` on CPU (and
    is exact for integers below 2**24); for narrow ones BLAS is slower, pathologically so for one
    column. Magnitudes (float64 here) always go through ``sum(0)``, torch's cascade sum: BLAS adds a
    column's values one after another."""
    if m.shape[0] == 1:
        total += m[0]
    elif counts and m.shape[1] >= 128:
        total += _ones(m.shape[0], m.dtype, m.device) @ m
    else:
        total += m.sum(0)


class RowsPlan:
    """The CPU pass for one activation layout whose units are innermost in memory and which fits
    in cache (a Linear layer's ``(batch, units)`` output, a ``(B, T, C)`` sequence, a channels_last
    feature map): its buffers and views are made once per layout, so a batch costs a handful of
    torch calls. At these sizes the per-call cost of Python and the dispatcher rivals the
    arithmetic, and it grows when the layer's own matmul has just flushed the caches.

    Counts are summed in the activation's dtype (float32 or float64; exact, below 2**24 values per
    unit); magnitudes are widened to float64 (exact) and summed there, as the kernels sum them. The
    plan covers activations of fewer than ``_CHUNK_MIN_ELEMENTS`` values, so its float64 scratch
    holds at most 8 MiB."""

    __slots__ = (
        "rows", "units", "unit_dim", "moved", "nonnegative", "mask", "wide", "counts", "mags", "ones", "route",
    )  # fmt: skip

    def __init__(self, x: torch.Tensor, unit_dim: int, nonnegative: bool) -> None:
        self.units = x.shape[unit_dim]
        self.rows = x.numel() // self.units
        self.unit_dim = unit_dim
        self.moved = unit_dim != x.ndim - 1  # channels_last: move the unit dim last (a view)
        self.nonnegative = nonnegative
        shape, dt = (self.rows, self.units), x.dtype
        self.mask = scratch(shape, dt, x.device, slot=1)
        # |x| in float64 (a float64 ReLU output is summed as it is)
        self.wide = None if dt == torch.float64 and nonnegative else scratch(shape, torch.float64, x.device, slot=2)
        self.counts = scratch((self.units,), dt, x.device, slot=6)
        self.mags = scratch((self.units,), torch.float64, x.device, slot=7)
        self.ones = _ones(self.rows, dt, x.device)
        # the fastest exact column sum of counts for this width (see column_sum_into)
        self.route = "row" if self.rows == 1 else "mv" if self.units >= 128 else "sum"

    def run(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows view of ``x``, per-unit count of ``x > threshold``, per-unit float64 sum of ``|x|``)."""
        x2 = (x.movedim(self.unit_dim, -1) if self.moved else x).view(self.rows, self.units)
        m = torch.gt(x2, threshold, out=self.mask)
        if self.route == "mv":
            torch.mv(m.t(), self.ones, out=self.counts)
        elif self.route == "sum":
            torch.sum(m, 0, out=self.counts)
        else:
            self.counts.copy_(m[0])
        if self.wide is None:
            a = x2
        elif x2.dtype == torch.float64:
            a = torch.abs(x2, out=self.wide)
        else:
            a = self.wide.copy_(x2)  # exact
            if not self.nonnegative:
                a.abs_()
        if self.rows == 1:
            self.mags.copy_(a[0])
        else:
            torch.sum(a, 0, out=self.mags)
        return x2, self.counts, self.mags


def float32(threshold: float) -> float:
    """``threshold`` rounded to the nearest float32, as a float32 comparison sees it (±inf beyond
    float32's range; a subnormal one is 0 where this thread flushes them)."""
    return _float32_under(threshold, kernels.flushes_denormals())


@functools.lru_cache(maxsize=256)
def _float32_under(threshold: float, flush: bool) -> float:
    """:func:`float32`, cached per flush-to-zero state (the rounding itself flushes under it)."""
    return torch.tensor(threshold, dtype=torch.float32).item()


def tile(before: int, units: int, after: int, chunk: int) -> tuple[int, int, int]:
    """(rows, units, run positions) of one chunk of a ``(before, units, after)`` tensor: whole rows
    while they fit in ``chunk`` values, else a block of units' whole runs, else part of one run."""
    run = max(1, min(after, chunk))
    block = max(1, min(units, chunk // run))
    return max(1, min(before, chunk // (block * run))), block, run


def float64_abs_sum(x3: torch.Tensor) -> torch.Tensor:
    """Per-unit float64 sum of ``|x|`` over a ``(before, units, after)`` tensor, row by row."""
    mag = torch.zeros(x3.shape[1], dtype=torch.float64, device=x3.device)
    for start in range(0, x3.shape[0], 256):
        mag += x3[start : start + 256].double().abs().sum(dim=(0, 2))
    return mag
