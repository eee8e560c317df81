"""Per-unit statistics: one accumulator protocol, exact in every dtype, one read per activation.

The protocol (the shape of torchmetrics' ``add_state``)
-------------------------------------------------------
Every per-unit statistic is declared once, in :data:`STATISTICS`, as a :class:`Statistic`:
a name, a dtype and a shape (one value per unit, or one per site). Every statistic is a
*sum* over observations, so merging two accumulators, reducing across ``torch.distributed``
ranks, banking a window row or resetting is the same operation for all of them, written
once in :class:`StatTensors`. The three accumulators of the package are built on it:

* :class:`UnitStats` (the scan): one set of state tensors since the start;
* ``deadrelu.monitor.window.WindowStats``: a ring of ``window`` rows of the same state plus
  the rows that left the window;
* ``deadrelu.monitor.compiled.TensorWindowStats``: the same ring with tensor-only
  bookkeeping, which ``torch.compile`` traces.

Their state tensors are exposed by name (``acc.state["fired"]`` …), so distributed code can
reduce each site's state key by key.

Declared statistics (per unit unless noted)::

    observations  int64, one per site   values each unit produced (masked-out values excluded)
    fired         int64                 values > threshold
    abs_sum       float64               sum of |h|
    nonfinite     int64                 NaN/±Inf values

How a batch is reduced (:func:`accumulate`)
-------------------------------------------
One pass per activation computes the four built-in sums, with the fastest exact backend:

* a CUDA tensor with Triton importable → one fused Triton kernel
  (:mod:`deadrelu.core.kernels`): reads the activation once, accumulates |h| in float64,
  adds into the state tensors with atomics; no temporary the size of the activation and
  no host synchronisation;
* a CPU tensor where the C kernel of :mod:`deadrelu.core.native` builds → that kernel, in one
  read, with the same float64 sums;
* otherwise the pure-torch pass: on CPU a chunked pass that keeps each chunk in cache (a tile of
  whole rows where they fit, else of units, else of one run; at most 2**18 values, or the whole
  activation below 2**20): counts in float32, exact integers at these sizes; magnitudes widened
  to float64 (exact) in a scratch of one chunk and summed there by torch's cascade sum, so no
  buffer grows with the activation — for the common layout, units innermost in memory and small
  enough for one chunk (a Linear layer's output), a cached per-layout plan (:class:`RowsPlan`)
  whose buffers are made once, so a batch costs a compare, a matrix-vector count, a widening
  copy and a cascade sum of magnitudes; on other devices plain torch reductions with float64
  accumulation.

Either way counts are exact integers, magnitudes are summed in float64 (finite values near
the float32 maximum never overflow to inf) and the numbers agree: counts bit for bit, sums to
float64 rounding (a relative 1e-15 or so: the order of the additions differs). Comparisons
against the threshold are done in float32 (float64 for float64 activations), so half-precision
values are compared exactly against the threshold as a float32 number. Subnormal values are read
as the calling thread reads them (:func:`deadrelu.core.kernels.flushes_denormals`): as 0 after
``torch.set_flush_denormal(True)``, on every thread that counts. Autocast is switched off inside
the pass: under CPU bf16 autocast a matrix-vector count would otherwise be computed in bf16.

Adding a per-unit statistic
---------------------------
Append a :class:`Statistic` with a ``batch`` function to :data:`STATISTICS` in this file,
for example the sum of squares::

    Statistic("sq_sum", torch.float64, doc="sum of h²",
              batch=lambda b: per_unit_sum(b.x.double().square(), b.unit_dim))

and test it against brute force in ``tests/core/test_stats.py``. ``update``, ``merge``,
``all_reduce``, ``reset``, ``state_dict``, the monitor's window rings and the distributed
reduction then carry it with no further change; read it from ``acc.state["sq_sum"]``. A
``batch`` function sees a :class:`UnitBatch`: the activation after masking, with its unit
dimension; it runs as plain torch code after the fused pass (one extra read), so a
statistic that must be free belongs in the fused pass and its kernel instead.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import DeadReluError
from . import fused, kernels, native  # none imports Triton: the kernels compile on first use

# The names these modules define stay importable from here, where callers have always found them.
from .backend_checks import autocast_on, forward_ad_on, fused_on_cpu, fusion_off, native_ready, no_autocast, require_triton
from .cpu_scratch import SCRATCH, RowsPlan, column_sum_into, float32, float64_abs_sum, release_scratch, scratch, tile
from .statistic import Statistic, UnitBatch
from .unit_layout import as_unit_batch, check_mask, front_dim, per_unit_sum, three_d, unit_reduce_dims
from .unit_states import UNIT_STATES, UnitTotals, classify, classify_codes  # noqa: F401

_SCRATCH = SCRATCH  # the per-thread scratch buffers, under the name the tests read (stats._SCRATCH.pool)

__all__ = [
    "STATISTICS",
    "Statistic",
    "StatTensors",
    "UnitBatch",
    "UnitStats",
    "UnitTotals",
    "accumulate",
    "as_unit_batch",
    "fused_on_cpu",
    "fuses_relu",
    "fused_relu_accumulate",
    "relu_accumulate",
    "relu_engine",
    "batch_unit_sums",
    "per_unit_sum",
    "release_scratch",
    "traceable_batch_sums",
    "unit_reduce_dims",
]


# The four built-in statistics come out of the fused pass (kernel or torch) together.
FUSED = ("observations", "fired", "abs_sum", "nonfinite")

STATISTICS: tuple[Statistic, ...] = (
    Statistic("observations", torch.int64, per_unit=False, doc="values each unit produced"),
    Statistic("fired", torch.int64, doc="values > threshold"),
    Statistic("abs_sum", torch.float64, doc="sum of |h| (dormancy score)"),
    Statistic("nonfinite", torch.int64, doc="NaN/±Inf values"),
)


class StatTensors:
    """The state of every declared :class:`Statistic` for one site, optionally with leading dims.

    ``leading=(w,)`` gives ``w`` independent rows (the monitor's window ring). Everything is
    a sum, so reset, merge and the cross-rank reduction are written once here.

    Args:
        units: units at the site.
        device: where the tensors live.
        leading: extra leading dimensions of every state tensor.

    Example:
        >>> a, b = StatTensors(2, "cpu"), StatTensors(2, "cpu")
        >>> a.state["fired"] += torch.tensor([1, 0]); b.state["fired"] += torch.tensor([2, 5])
        >>> a.merge(b).state["fired"].tolist()
        [3, 5]
    """

    def __init__(self, units: int, device: torch.device | str | None = None, leading: tuple[int, ...] = ()) -> None:
        self.units = int(units)
        self.leading = tuple(int(n) for n in leading)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.state: dict[str, torch.Tensor] = {
            s.name: torch.zeros(*self.leading, *s.shape(self.units), dtype=s.dtype, device=self.device)
            for s in STATISTICS
        }

    def reset(self) -> None:
        """Zero every state tensor."""
        for t in self.state.values():
            t.zero_()

    def to(self, device: torch.device | str) -> "StatTensors":
        """Move the state to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        self.state = {k: t.to(self.device) for k, t in self.state.items()}
        return self

    def merge(self, other: "StatTensors") -> "StatTensors":
        """Add another accumulator of the same shape into this one (in place) and return self.

        Raises:
            DeadReluError: when the unit counts or leading dims differ.
        """
        if other.units != self.units or other.leading != self.leading:
            raise DeadReluError(f"cannot merge statistics of {other.units} units into {self.units} units")
        for k, t in self.state.items():
            t += other.state[k].to(t.device)
        return self

    def all_reduce(self, group: object | None = None) -> None:
        """Sum every state tensor over the ranks of ``torch.distributed`` (in place, one call per key)."""
        import torch.distributed as dist

        for t in self.state.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Views of row ``index`` of every state tensor (``leading`` must be one-dimensional)."""
        return {k: t[index] for k, t in self.state.items()}

    def add_(self, values: Mapping[str, torch.Tensor]) -> None:
        """Add per-key values (e.g. a ring row) into the state (one fused launch per dtype on accelerators)."""
        foreach_apply("add", list(self.state.values()), [values[k] for k in self.state])

    def summed(self) -> dict[str, torch.Tensor]:
        """Every state tensor summed over its leading dimension (new tensors)."""
        return {k: t.sum(0) for k, t in self.state.items()}


def foreach_apply(op: str, targets: list[torch.Tensor], sources: list[torch.Tensor] | None = None) -> None:
    """``targets[i] op= sources[i]`` (``add``, ``copy``) or ``targets[i].zero_()`` (``zero``) for all i:
    torch's multi-tensor kernels where they exist (a site's few small state tensors then cost one
    launch per dtype instead of one each), else a loop."""
    fused = getattr(torch, f"_foreach_{op}_", None)
    if fused is not None and all(t.device == targets[0].device for t in [*targets, *(sources or [])]):
        fused(targets) if sources is None else fused(targets, sources)
        return
    for i, t in enumerate(targets):
        if op == "zero":
            t.zero_()
        elif op == "copy":
            t.copy_(sources[i])  # type: ignore[index]
        else:
            t += sources[i]  # type: ignore[index]


# -- the pure-torch pass ------------------------------------------------------------------------

# Elements per chunk of the CPU pass: 1 MiB of float32, so a chunk's mask and its float64 copy are
# still in cache when they are reduced and the activation is read from memory once. A chunk is a
# tile of whole rows where they fit (else a block of units, else part of one unit's run), never more
# than 2**24 values, so its float32 counts are exact integers; its magnitudes are widened to float64
# (exact) in a scratch of the chunk's size and summed there, so memory stays bounded by the chunk.
_CHUNK_ELEMENTS = 1 << 18
_CHUNK_MIN_ELEMENTS = 4 * _CHUNK_ELEMENTS
_PARTIAL_ROWS = 4096  # rows of the cached one-chunk plan (RowsPlan)


def _rows_plan(x: torch.Tensor, unit_dim: int, nonnegative: bool) -> RowsPlan | None:
    """The cached :class:`RowsPlan` for ``x``'s layout, or None when ``x`` needs the general pass
    (not float32/float64, units not innermost in memory, or too large for one cached chunk)."""
    key = (x.shape, x.stride(), x.dtype, unit_dim, nonnegative)
    plans = getattr(SCRATCH, "plans", None)
    if plans is None:
        plans = SCRATCH.plans = {}
    plan = plans.get(key)
    if plan is not None:
        return plan
    if x.dtype not in (torch.float32, torch.float64) or x.numel() >= _CHUNK_MIN_ELEMENTS:
        return None
    units = x.shape[unit_dim]
    if units == 0 or x.numel() // units > _PARTIAL_ROWS or not x.movedim(unit_dim, -1).is_contiguous():
        return None
    if len(plans) >= 64:  # many layouts (e.g. every sequence length): keep the cache bounded
        plans.clear()
    plan = RowsPlan(x, unit_dim, nonnegative)
    SCRATCH.plans[key] = plan  # (the plans of before, if a scratch buffer had to grow, are gone)
    return plan


def _cpu_pass(
    x3: torch.Tensor, threshold: float, nonnegative: bool, flush: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit float64 (count of ``x > threshold``, sum of ``|x|``) over a ``(before, units,
    after)`` CPU tensor, chunk by chunk (see ``_CHUNK_ELEMENTS``) so each chunk stays in cache.
    ``flush``: read subnormal values (and threshold) as 0, whichever thread torch runs a chunk on."""
    before, units, after = x3.shape
    f64 = x3.dtype == torch.float64
    if not f64:  # compared in float32, as the kernels do (half-precision values widen exactly)
        threshold = float32(threshold)
    tiny = torch.finfo(torch.float64 if f64 else torch.float32).tiny
    if flush and abs(threshold) < tiny:
        threshold = 0.0
    direct = x3.dtype in (torch.float32, torch.float64) and not flush  # compared as they are
    chunk = x3.numel() if direct and x3.numel() < _CHUNK_MIN_ELEMENTS else _CHUNK_ELEMENTS
    rows, block, run = tile(before, units, after, chunk)
    fired = torch.zeros(units, dtype=torch.float64)
    mag = torch.zeros(units, dtype=torch.float64)
    size = rows * block * run
    mask_buf = scratch((size,), torch.float32, x3.device, slot=1)
    wide_buf = scratch((size,), torch.float64, x3.device, slot=2)
    for b0 in range(0, before, rows):
        for u0 in range(0, units, block):
            for a0 in range(0, after, run):
                c = x3[b0 : b0 + rows, u0 : u0 + block, a0 : a0 + run]
                shape, n = c.shape, c.numel()
                m, w = mask_buf[:n].view(shape), wide_buf[:n].view(shape)
                if f64 and direct:
                    torch.gt(c, threshold, out=m)
                    a = c if nonnegative else torch.abs(c, out=w)
                else:
                    a = w.copy_(c)  # float64, exact
                    if flush:  # zero by value: torch's worker threads may not flush them themselves
                        a.masked_fill_(a.abs() < tiny, 0.0)
                    torch.gt(c if direct else a, threshold, out=m)
                    if not nonnegative:
                        a.abs_()
                fired_here, mag_here = fired[u0 : u0 + shape[1]], mag[u0 : u0 + shape[1]]  # views
                if run == 1:
                    column_sum_into(fired_here, m[:, :, 0], counts=True)
                    column_sum_into(mag_here, a[:, :, 0], counts=False)
                else:
                    fired_here += m.sum(dim=(0, 2))
                    mag_here += a.sum(dim=(0, 2))
    return fired, mag


def _cpu_batch(
    x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool, out: Mapping[str, torch.Tensor]
) -> None:
    """The CPU backend of :func:`accumulate` (mask already applied)."""
    flush = kernels.flushes_denormals()
    plan = None if flush else _rows_plan(x, unit_dim, nonnegative)
    if plan is not None:
        x3, fired, mag = plan.run(x, threshold)  # x3 is 2-D here: made 3-D only if needed below
    else:
        x3 = three_d(x, unit_dim)
        fired, mag = _cpu_pass(x3, threshold, nonnegative, flush)
    # A unit's magnitude sum is finite exactly when all its values are, unless a float64 sum
    # overflowed (float64 values near its maximum): the exact NaN/Inf count (and, after an
    # overflow, a magnitude pass row by row) is taken only for the rare batches that need it. On
    # CPU this check costs no device synchronisation.
    if not math.isfinite(mag.sum().item()):
        x3 = x3.view(*x3.shape[:2], -1)
        bad = per_unit_sum(~torch.isfinite(x3), 1, torch.int64)
        if bool(((bad == 0) & ~torch.isfinite(mag)).any()):
            mag = float64_abs_sum(x3)
        out["nonfinite"] += bad
    out["fired"] += fired.to(torch.int64)
    out["abs_sum"] += mag
    out["observations"] += x3.numel() // x3.shape[1]


def traceable_batch_sums(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    nonnegative: bool,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """This batch's contribution to each fused statistic, with plain torch reductions only.

    Device-agnostic and traceable by TorchDynamo (no Python branch on tensor values, no host
    sync); Inductor fuses the reductions into one read. Magnitudes accumulate in float64.

    Example:
        >>> traceable_batch_sums(torch.tensor([[1.0, -2.0]]), 1, 0.0, False)["abs_sum"].tolist()
        [1.0, 2.0]
    """
    if x.ndim < 2:  # one sample of its units (as_unit_batch); sum over no dims would sum them all
        x, unit_dim = x.reshape(1, -1), 1
    unit_dim = front_dim(x.ndim, unit_dim)
    dims = unit_reduce_dims(x.ndim, unit_dim)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # threshold comparisons in float32, like the fused backends
    fired = x > threshold
    bad = ~torch.isfinite(x)
    mag = x if nonnegative else x.abs()
    rest = x.numel() // max(x.shape[unit_dim], 1)
    if mask is None:
        # ones * rest, not full((1,), rest): with a symbolic batch size, torch 2.6 Inductor's
        # uniform-value constant folding evaluates full's fill value and so pins the batch size
        # (a recompilation per size); a pointwise op on a SymInt is left alone.
        obs = torch.ones((1,), dtype=torch.int64, device=x.device) * rest
    else:
        keep = mask.view(*mask.shape, *([1] * (x.ndim - mask.ndim)))
        fired, bad = fired & keep, bad & keep
        mag = torch.where(keep, mag, torch.zeros((), dtype=mag.dtype, device=mag.device))
        obs = (mask.sum(dtype=torch.int64) * (rest // max(mask.numel(), 1))).view(1)
    out = {
        "observations": obs,
        "fired": fired.sum(dims, dtype=torch.int64),
        "abs_sum": mag.sum(dims, dtype=torch.float64),
        "nonfinite": bad.sum(dims, dtype=torch.int64),
    }
    extra = {s.name: torch.zeros(s.shape(x.shape[unit_dim]), dtype=s.dtype, device=x.device) for s in STATISTICS if s.batch}
    if extra:
        _extra_statistics(x, unit_dim, threshold, extra, mask)
        out.update(extra)
    return out


# -- backend choice and the one entry point -----------------------------------------------------

BACKENDS = ("auto", "torch", "triton", "native")


_TRITON_FAILED: list[str] = []  # why the kernel could not run here, once it failed (then torch is used)


def _triton_ready(x: torch.Tensor) -> bool:
    if not x.is_cuda or _TRITON_FAILED:
        return False
    return kernels.available()


def _run_kernel(x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool, out: Mapping[str, torch.Tensor], mask: torch.Tensor | None, explicit: bool) -> bool:  # fmt: skip
    """Run the Triton kernel; False (after one warning) when it cannot compile or launch here, so
    the caller uses the torch pass: a Triton or driver mismatch must not stop a scan or a training run.
    Compilation and launch fail before the kernel writes anything, so the batch is not half-counted."""
    try:
        kernels.unit_stats_into(x, unit_dim, threshold, nonnegative, out, mask)
        return True
    except Exception as err:
        if explicit or isinstance(err, torch.cuda.OutOfMemoryError):
            raise  # out of memory says nothing about whether the kernel can run here
        _kernel_failed(err, stacklevel=4)
        return False


def _kernel_failed(err: Exception, stacklevel: int) -> None:
    """Remember that the kernel cannot run here (torch counts from now on) and warn once."""
    _TRITON_FAILED.append(f"{type(err).__name__}: {err}")
    import warnings

    warnings.warn(
        f"deadrelu: the Triton statistics kernel cannot run here ({type(err).__name__}: {str(err)[:300]}); "
        "using the torch pass instead (same numbers, more memory traffic); set DEADRELU_NO_TRITON=1 to skip it",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def accumulate(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    nonnegative: bool,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Add one batch's statistics into the state tensors ``out`` (one key per :data:`STATISTICS`).

    Args:
        x: a floating activation (see :func:`as_unit_batch`) on the device of ``out``.
        unit_dim: the dimension of ``x`` that indexes units.
        threshold: an output fires when it is ``> threshold``.
        nonnegative: the activation cannot be negative, so ``|h| = h`` (skips an ``abs``).
        out: state tensors to add into (views of a ring row work).
        mask: optional bool observation mask (see :meth:`UnitStats.update`).
        backend: ``"auto"`` (the Triton kernel for CUDA tensors when Triton imports, the
            compiled C kernel of :mod:`deadrelu.core.native` for CPU tensors where it builds,
            else torch), ``"torch"``, ``"triton"`` (the kernel, on any device Triton can run:
            CPU tensors only under ``TRITON_INTERPRET=1``) or ``"native"`` (the C kernel).

    Raises:
        DeadReluError: for an unknown backend or a mask that does not fit.
    """
    if backend not in BACKENDS:
        raise DeadReluError(f"statistics backend must be one of {BACKENDS}, got {backend!r}")
    # Detached rather than under no_grad: the same guarantee (nothing is recorded by autograd)
    # without a context manager's cost on every site of every batch.
    x = x.detach()
    unit_dim = front_dim(x.ndim, unit_dim)
    mask = check_mask(x, unit_dim, mask)
    if x.numel() == 0:
        return  # nothing observed (no values, or no units)
    if backend == "triton":
        require_triton(x)
    if _native_route(x, backend):
        native.unit_stats_into(x, unit_dim, threshold, nonnegative, out, mask)
        _extra_statistics(x, unit_dim, threshold, out, mask)
        return
    if mask is None and x.is_cpu and backend != "triton" and not autocast_on("cpu") and not (
        backend == "auto" and _triton_ready(x)
    ):
        _cpu_batch(x, unit_dim, threshold, nonnegative, out)  # the common case, with the fewest calls
        _extra_statistics(x, unit_dim, threshold, out, mask)
        return
    with no_autocast(x.device.type):
        use_kernel = backend == "triton" or (backend == "auto" and _triton_ready(x))
        if use_kernel and _run_kernel(x, unit_dim, threshold, nonnegative, out, mask, explicit=backend == "triton"):
            pass  # the kernel counted the batch
        elif x.device.type == "cpu":
            kept, kept_dim = (x, unit_dim) if mask is None else (x[mask], unit_dim - mask.ndim + 1)
            _cpu_batch(kept, kept_dim, threshold, nonnegative, out)  # x[mask] needs no sync on CPU
        else:
            for k, v in traceable_batch_sums(x, unit_dim, threshold, nonnegative, mask).items():
                out[k] += v
        _extra_statistics(x, unit_dim, threshold, out, mask)


def _native_route(x: torch.Tensor, backend: str) -> bool:
    """Whether :func:`accumulate` counts ``x`` with the C kernel (an error for ``"native"`` where it cannot)."""
    return (backend == "native" or (backend == "auto" and not _triton_ready(x))) and native_ready(x, backend)


def _native_counts(x: torch.Tensor, backend: str) -> bool:
    """Whether :func:`accumulate` counts an unmasked ``x`` with the C kernel and nothing else."""
    return not any(s.batch is not None for s in STATISTICS) and _native_route(x, backend)


def fuses_relu(x: torch.Tensor, unit_dim: int, backend: str = "auto", inplace: bool = False) -> bool:
    """Whether :func:`relu_accumulate` runs the ReLU and its statistics as one kernel here.

    True for a floating tensor of two or more dims that a kernel would count anyway (Triton:
    ``backend="auto"`` on CUDA, or ``"triton"``; the C kernel: ``"auto"`` or ``"native"`` on
    CPU) in a layout it addresses without a copy,
    with no extra declared statistic, unless ``DEADRELU_NO_FUSED_RELU=1`` is set. An in-place ReLU of a leaf or a view that autograd
    records is left to torch, which raises or rebases history itself.
    """
    return relu_engine(x, unit_dim, backend, inplace) is not None


def relu_engine(x: torch.Tensor, unit_dim: int, backend: str, inplace: bool) -> object | None:
    """The kernel module (:mod:`.kernels` or :mod:`.native`) that fuses this ReLU, or None."""
    unit_dim = front_dim(x.ndim, unit_dim)
    if backend == "torch" or x.ndim < 2 or not x.is_floating_point() or x.numel() == 0:
        return None
    if fusion_off():
        return None
    if type(x) is not torch.Tensor or any(s.batch is not None for s in STATISTICS):
        return None  # a tensor subclass (DTensor, fake tensors) keeps its own dispatch
    if inplace and x.requires_grad and torch.is_grad_enabled() and (x.is_leaf or x._is_view()):
        return None
    if inplace and x.is_inference() and not torch.is_inference_mode_enabled():
        return None  # torch refuses this write, and must do so before anything is written
    engine: object
    if backend == "auto" and _triton_ready(x):
        engine = kernels
    elif x.is_cpu and backend in ("auto", "native") and native.supports(x):
        engine = native
    elif backend == "triton" and not _TRITON_FAILED and kernels.available() and (x.is_cuda or kernels.interpreting()):
        engine = kernels
    else:
        return None
    return engine if fused.fusable_layout(x, unit_dim) else None


def relu_accumulate(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """``relu(x)`` (in place when ``inplace``), its output's statistics added into ``out``.

    Where :func:`fuses_relu` holds, one kernel reads ``x`` once, writes the output and
    counts it; elsewhere (or once the kernel failed to compile or launch here) torch applies
    the ReLU and :func:`accumulate` counts it. The output and the sums are the same either way.

    Raises:
        DeadReluError: for a mask that does not fit.
    """
    return fused_relu_accumulate(x, unit_dim, threshold, out, mask, backend, inplace, relu_engine(x, unit_dim, backend, inplace))


def fused_relu_accumulate(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None,
    backend: str,
    inplace: bool,
    engine: object | None,
) -> torch.Tensor:
    """:func:`relu_accumulate` with the kernel already chosen (``relu_engine``'s answer, given by
    a caller that asked it first): the per-site decision is made once per call."""
    unit_dim = front_dim(x.ndim, unit_dim)
    if mask is not None:
        mask = check_mask(x.detach(), unit_dim, mask)
    if engine is native and not (inplace or (x.requires_grad and torch.is_grad_enabled()) or forward_ad_on()):
        # Nothing for autograd to record (a scan, an evaluation): the kernel's output as it is.
        # The C kernel runs no torch op, so autocast needs no switching off either.
        y = native.relu_stats_into(x, unit_dim, threshold, out, mask)
        if y is not None:
            return y
    elif engine is not None:
        try:
            with no_autocast(x.device.type):
                return fused.counted_relu(x, unit_dim, threshold, out, mask, inplace, engine)
        except Exception as err:
            if fused.launched():  # counted; autograd's machinery refused the op (forward-mode AD)
                return torch.relu_(x) if inplace else torch.relu(x)  # torch's ReLU, not counted twice
            if backend != "auto" or engine is not kernels or isinstance(err, torch.cuda.OutOfMemoryError):
                raise  # out of memory says nothing about whether the kernel can run here
            _kernel_failed(err, stacklevel=3)
    y = torch.relu_(x) if inplace else torch.relu(x)
    accumulate(y, unit_dim, threshold, True, out, mask, backend)
    return y


def _extra_statistics(
    x: torch.Tensor, unit_dim: int, threshold: float, out: Mapping[str, torch.Tensor], mask: torch.Tensor | None
) -> None:
    """Statistics declared with a ``batch`` function (none built in)."""
    extra = [s for s in STATISTICS if s.batch is not None]
    if not extra:
        return
    if mask is not None:
        x, unit_dim = x[mask], unit_dim - mask.ndim + 1
    batch = UnitBatch(x, unit_dim, threshold)
    for s in extra:
        out[s.name] += s.batch(batch)  # type: ignore[misc]


def batch_unit_sums(
    x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool = False, backend: str = "auto"
) -> dict[str, torch.Tensor]:
    """One batch's statistics as fresh tensors (``observations``, ``fired``, ``abs_sum``, ``nonfinite``).

    Example:
        >>> batch_unit_sums(torch.tensor([[1.0, -2.0], [3.0, 0.0]]), 1, 0.0)["fired"].tolist()
        [2, 0]
    """
    if x.ndim == 0:  # one value of one unit (the layouts index a unit dim)
        x, unit_dim = x.reshape(1, 1), 1
    units = x.shape[unit_dim]
    out = StatTensors(units, x.device).state
    accumulate(x, unit_dim, threshold, nonnegative, out, backend=backend)
    return out


# -- the scan's accumulator ---------------------------------------------------------------------


class UnitStats(StatTensors):
    """Per-unit firing statistics of one activation site since the start (the scan's accumulator).

    State (``self.state``, see :data:`STATISTICS`), all on ``device``: ``observations``
    (int64, one per site), ``fired`` (int64 count of outputs ``> threshold``), ``abs_sum``
    (float64 sum of ``|h|``), ``nonfinite`` (int64 count of NaN/±Inf outputs). Counts are int64
    and so stay exact far beyond 10^10 observations; nothing is copied to the host until
    :meth:`compute`.

    Args:
        units: number of units.
        threshold: an output fires when it is ``> threshold`` (0 for ReLU-like activations).
        device: where the accumulators live (moved to the activation's device on first use).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (see :func:`accumulate`).

    Example:
        >>> s = UnitStats(3)
        >>> s.update(torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.0, 3.0]]), unit_dim=1)
        >>> s.compute().fired_counts
        (2, 0, 1)
    """

    def __init__(
        self, units: int, threshold: float = 0.0, device: torch.device | str | None = None, backend: str = "auto"
    ) -> None:
        super().__init__(units, device)
        self.threshold = float(threshold)
        self.backend = backend

    @property
    def fired(self) -> torch.Tensor:
        """int64 ``(units,)`` count of outputs ``> threshold``."""
        return self.state["fired"]

    @fired.setter
    def fired(self, value: torch.Tensor) -> None:
        self.state["fired"] = value

    @property
    def abs_sum(self) -> torch.Tensor:
        """float64 ``(units,)`` sum of ``|h|``."""
        return self.state["abs_sum"]

    @abs_sum.setter
    def abs_sum(self, value: torch.Tensor) -> None:
        self.state["abs_sum"] = value

    @property
    def nonfinite(self) -> torch.Tensor:
        """int64 ``(units,)`` count of NaN/±Inf outputs."""
        return self.state["nonfinite"]

    @nonfinite.setter
    def nonfinite(self, value: torch.Tensor) -> None:
        self.state["nonfinite"] = value

    @property
    def observations(self) -> int:
        """Values each unit produced (reads the device counter)."""
        return int(self.state["observations"].item())

    @observations.setter
    def observations(self, value: int) -> None:
        self.state["observations"].fill_(int(value))

    def update(
        self, activation: torch.Tensor, unit_dim: int, nonnegative: bool = False, mask: torch.Tensor | None = None
    ) -> None:
        """Add one batch of activations whose units lie along ``unit_dim``.

        Args:
            activation: the activation output (any shape, any floating dtype; detached internally).
            unit_dim: the dimension that indexes units.
            nonnegative: the activation cannot be negative (ReLU, ReLU6), so
                ``|h| = h`` and the magnitude sum needs no ``abs`` pass.
            mask: optional bool tensor marking which observations count, for padding: its
                shape is the activation's leading dims ``activation.shape[:k]`` for some
                ``k <= unit_dim`` (e.g. ``(B, T)`` for a ``(B, T, C)`` activation with units
                last, ``(N,)`` for a ``(N, C, H, W)`` one) and it broadcasts over the
                remaining dims. Where it is False nothing is counted: not as an observation,
                firing, magnitude or NaN. Both backends support it; neither synchronises.

        Raises:
            DeadReluError: when the unit dimension's size differs from ``units`` or the mask
                does not fit the activation.
        """
        if mask is None and type(activation) is torch.Tensor and activation.is_cpu and activation.is_floating_point():
            if self._launched(activation, unit_dim, bool(nonnegative), relu=False):
                return
        x, unit_dim = as_unit_batch(activation, unit_dim, self.units)
        if x.device != self.device:
            self.to(x.device)
        if mask is not None and activation.ndim < 2:
            mask = mask.reshape(1)
        accumulate(x, unit_dim, self.threshold, nonnegative, self.state, mask, self.backend)

    def relu_and_update(
        self, x: torch.Tensor, unit_dim: int, mask: torch.Tensor | None = None, inplace: bool = False
    ) -> torch.Tensor | None:
        """``relu(x)``, counted into this accumulator by the same kernel that computes it.

        Returns None, doing nothing, where :func:`fuses_relu` does not hold (the caller then
        applies the ReLU and calls :meth:`update`).
        """
        if type(self).update is not UnitStats.update:  # a subclass's own update() must see every batch
            return None
        if mask is None and not inplace and type(x) is torch.Tensor and x.is_cpu:
            if not (x.requires_grad and torch.is_grad_enabled()) and not forward_ad_on():  # nothing for autograd
                y = self._launched(x, unit_dim, True, relu=True)
                if isinstance(y, torch.Tensor):
                    return y
        engine = None if x.ndim < 2 or x.shape[unit_dim] != self.units else relu_engine(x, unit_dim, self.backend, inplace)
        if engine is None:
            return None
        if x.device != self.device:
            self.to(x.device)
        return fused_relu_accumulate(x, unit_dim, self.threshold, self.state, mask, self.backend, inplace, engine)

    def _launched(self, x: torch.Tensor, unit_dim: int, nonnegative: bool, relu: bool) -> bool | torch.Tensor | None:
        """The common call, an unmasked CPU batch of a layout this accumulator has counted before,
        as one prepared kernel call (:class:`~deadrelu.core.native.Launch`): the call the general
        route below makes, without its per-call checks. ``relu(x)`` (``relu``) or True when it
        counted ``x``; None, having done nothing, where that route must decide."""
        if self.backend not in ("auto", "native") or fusion_off() or not native.available():
            return None
        if x.is_neg() or kernels.transforms_active():
            return None
        key = (x.shape, x.stride(), x.dtype, unit_dim, self.threshold, nonnegative, relu, torch.get_num_threads())
        launches: dict[tuple, native.Launch | None] | None = getattr(self, "_launches", None)
        if launches is None:
            launches = self._launches = {}
        launch = launches.get(key)
        if launch is None or not launch.adds_into(self.state):
            if launch is None and key in launches:
                return None  # a layout the general route handles (a copy, threads, another kernel)
            if x.ndim < 2 or x.shape[unit_dim] != self.units or x.device != self.device or x.numel() == 0:
                return None
            usual = relu_engine(x, unit_dim, self.backend, False) is native if relu else _native_counts(x, self.backend)
            if len(launches) >= 64:  # many layouts (e.g. every sequence length): keep the cache bounded
                launches.clear()
            launch = launches[key] = (
                native.prepare(x, front_dim(x.ndim, unit_dim), self.threshold, nonnegative, self.state, relu) if usual else None
            )
            if launch is None:
                return None
        y = launch(x)
        return True if y is None else y

    def merge(self, other: "StatTensors") -> "UnitStats":
        """Add another accumulator of the same site into this one (in place) and return self.

        Raises:
            DeadReluError: when the two have different unit counts or thresholds.
        """
        threshold = getattr(other, "threshold", self.threshold)
        if other.units == self.units and threshold != self.threshold:
            raise DeadReluError(f"cannot merge statistics with firing thresholds {threshold} and {self.threshold}")
        super().merge(other)
        return self

    def state_dict(self) -> dict[str, object]:
        """Tensors and settings (units, threshold, statistics backend), for checkpointing or sending
        to another process: an accumulator rebuilt by :meth:`from_state_dict` counts the next batches
        as this one does."""
        settings = {"units": self.units, "threshold": self.threshold, "backend": self.backend}
        return {**settings, **{k: t.clone() for k, t in self.state.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> "UnitStats":
        """Rebuild an accumulator from :meth:`state_dict` (one saved without a backend counts with
        ``"auto"``), on the device its tensors are on.

        Raises:
            DeadReluError: when a statistic is missing or the backend is unknown.
        """
        missing = [k for k in ("units", "threshold", *(s.name for s in STATISTICS)) if k not in state]
        if missing:
            raise DeadReluError(f"not a UnitStats state: it lacks {', '.join(map(repr, missing))}")
        backend = state.get("backend", "auto")
        if backend not in BACKENDS:
            raise DeadReluError(f"statistics backend must be one of {BACKENDS}, got {backend!r}")
        fired = state["fired"]
        assert isinstance(fired, torch.Tensor)
        out = cls(int(state["units"]), float(state["threshold"]), device=fired.device, backend=str(backend))  # type: ignore[arg-type]
        for k, t in out.state.items():
            value = state[k]
            value = value if isinstance(value, torch.Tensor) else torch.tensor([value])
            out.state[k] = value.to(device=t.device, dtype=t.dtype).clone()
        return out

    def compute(self, allow_empty: bool = False) -> UnitTotals:
        """Copy the totals to the host (the only synchronisation point).

        ``allow_empty`` gives zero totals for a site that ran only on empty tensors (an expert
        that got no tokens, a fully masked batch): every unit is then unobserved.

        Raises:
            DeadReluError: when no data has been seen yet (and ``allow_empty`` is False).
        """
        n = self.observations
        if n == 0 and allow_empty:
            return UnitTotals(0, (0,) * self.units, (0.0,) * self.units, (0,) * self.units)
        if n == 0:
            raise DeadReluError("no activations were observed yet: run some data through the model first")
        return UnitTotals(
            observations=n,
            fired_counts=tuple(self.fired.tolist()),
            mean_abs=tuple((self.abs_sum / n).tolist()),
            nonfinite_counts=tuple(self.nonfinite.tolist()),
        )






