"""Fused Triton kernel for the per-unit statistics: one read of the activation per batch.

:func:`unit_stats_into` adds, per unit, the count of values ``> threshold``, the float64
sum of ``|h|``, the count of NaN/±Inf values and the number of observations into
accumulator tensors, in one kernel launch. It allocates nothing the size of the activation and never synchronises with the
host. :func:`deadrelu.core.stats.accumulate` picks it for CUDA tensors when Triton imports;
the pure-torch pass gives the same numbers elsewhere, and takes over (after one warning) if the
kernel cannot compile or launch on a machine.

Layout: the activation is addressed as ``(before, units, after)`` through its strides,
so units on the last dim (``(N, C)``, ``(B, T, C)``), on dim 1 of a contiguous ``(N, C,
H, W)`` tensor and on dim 1 of a channels_last one all run without a copy; a layout whose
leading or trailing dims cannot be merged into one stride is made contiguous first.

Each program owns a block of units and a slice of rows; it loads ``[BLOCK_R, BLOCK_U]``
tiles, compares in float32 (float64 for float64 inputs), widens ``|h|`` to float64 before
adding (so finite values near the float32 maximum never overflow) into one partial sum per tile
position, reduces those across rows once after its last tile and adds the result into the
accumulators with atomics (int64 counts, float64 sums); see :func:`tile_sums_on` for the variant
that reduces each tile as it goes. The order
of float64 atomic additions varies between runs, so sums may differ in the last bits.

Importing this module does not import Triton; the kernel is compiled on first use. Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (float32/float16), which is how
the test-suite checks it on machines without a GPU.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any, Mapping

import torch

from .environment import env_is

__all__ = [
    "available", "dense", "flushes_denormals", "functorch_wrapped", "fusable", "interpreting", "launch_config", "mask_rows", "plan",
    "relu_output", "relu_stats_into", "tile_sums_on", "transforms_active", "unit_stats_into",
]  # fmt: skip


# A Python float compare runs on this thread's floating-point state: after
# torch.set_flush_denormal(True) the smallest subnormal double reads as 0 here, as subnormal
# values do in torch's kernels and the native kernel on this thread. Built from its bits: parsing
# a literal under flush-to-zero could give 0.
_SUBNORMAL = struct.unpack("<d", struct.pack("<q", 1))[0]
_ZERO = 0.0


def flushes_denormals() -> bool:
    """Whether this thread reads subnormal numbers as 0 (after ``torch.set_flush_denormal(True)``).

    The CPU statistics follow it (the torch pass, the native kernel on all its threads, Triton's
    interpreter): a subnormal activation — below float32's smallest normal number for float32,
    bfloat16 and float16 activations (a float16 subnormal is a normal float32), float64's for
    float64 — then counts as 0, neither firing nor adding to ``Σ|h|``, as torch's own compare on
    this thread counts it. torch's intra-op worker threads keep the state they were created with,
    so a multi-threaded ``(x > 0).sum()`` of torch's own may count otherwise.

    Example:
        >>> flushes_denormals()
        False
    """
    return not _SUBNORMAL > _ZERO


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_is("TRITON_INTERPRET", "1")


def tile_sums_on() -> bool:
    """Whether the kernel keeps one partial sum per tile position and reduces across rows once, at
    the end (the default), rather than reducing each tile's rows as it goes (``DEADRELU_TRITON_SUMS=rows``,
    kept for side-by-side timing in ``benchmarks/bench_gpu.py``).

    Compiled for an H100, reducing as it goes costs per value about three times the instructions,
    with cross-warp shuffles and barriers in the loop; with a sum per position the loop body has none
    and the rows are reduced once."""
    return not env_is("DEADRELU_TRITON_SUMS", "rows")


def available() -> bool:
    """True when Triton imports and can run here: CUDA is present, or the interpreter is on.

    ``DEADRELU_NO_TRITON=1`` forces the pure-torch pass (for comparisons)."""
    if env_is("DEADRELU_NO_TRITON", "1") or not _importable():
        return False
    return interpreting() or torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import time
        return False
    # The kernels are written for Triton 3 (torch >= 2.4 ships it): Triton 2 resolves a kernel's
    # names in module globals only, and its interpreter refuses them. Older installs count with torch.
    return _major(getattr(triton, "__version__", "0")) >= 3


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool) -> Any:
    """Build the jitted kernel (first use in each mode: Triton reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def unit_stats_kernel(
        x_ptr, y_ptr, mask_ptr, thr_ptr, fired_ptr, abs_ptr, bad_ptr, obs_ptr,
        units, after, rows, rows_per_prog, s_b, s_u, s_a, mask_div,
        HAS_MASK: tl.constexpr, NONNEG: tl.constexpr, WIDE: tl.constexpr, AFTER_ONE: tl.constexpr,
        LARGE: tl.constexpr, APPLY_RELU: tl.constexpr, BF16: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_U: tl.constexpr, TILE_SUMS: tl.constexpr,
    ):  # fmt: skip
        pid_u = tl.program_id(0)
        pid_r = tl.program_id(1)
        u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
        u_ok = u < units
        u_off = u.to(tl.int64) * s_u
        thr = tl.load(thr_ptr)
        if LARGE:  # 2**31 rows or more: row arithmetic in int64 (slower division)
            r_begin = pid_r.to(tl.int64) * rows_per_prog
        else:
            r_begin = pid_r * rows_per_prog
        r_end = tl.minimum(r_begin + rows_per_prog, rows)
        # A program's counts stay below its rows (< 2**31 unless LARGE): int32 in registers, cheaper
        # to reduce than int64 on a GPU, widened once for the int64 atomics at the end.
        if LARGE:
            fired = tl.zeros([BLOCK_U], dtype=tl.int64)
            bad = tl.zeros([BLOCK_U], dtype=tl.int64)
            kept = tl.zeros([BLOCK_R], dtype=tl.int64)  # observations: rows in range and unmasked
        else:
            fired = tl.zeros([BLOCK_U], dtype=tl.int32)
            bad = tl.zeros([BLOCK_U], dtype=tl.int32)
            kept = tl.zeros([BLOCK_R], dtype=tl.int32)
        mag = tl.zeros([BLOCK_U], dtype=tl.float64)
        if TILE_SUMS:  # one sum per tile position, reduced across rows once at the end (see launch_config)
            fired_tile = tl.zeros([BLOCK_R, BLOCK_U], dtype=fired.dtype)
            bad_tile = tl.zeros([BLOCK_R, BLOCK_U], dtype=bad.dtype)
            mag_tile = tl.zeros([BLOCK_R, BLOCK_U], dtype=tl.float64)
        for start in range(r_begin, r_end, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            r_ok = r < r_end
            if AFTER_ONE:
                b = r
                off = b.to(tl.int64) * s_b
            else:
                b = r // after
                off = b.to(tl.int64) * s_b + (r - b * after).to(tl.int64) * s_a
            where = off[:, None] + u_off[None, :]
            if APPLY_RELU:  # every position gets its output, masked or not; only the kept ones count
                inside = r_ok[:, None] & u_ok[None, :]
                raw = tl.load(x_ptr + where, mask=inside, other=0.0)
                # Compared in float32, or float64 for float64 input (a tiny float64 negative would
                # round to -0.0 in float32); bf16 compares are not reliable everywhere. NaN < 0 is
                # false, so NaN stays, and so does -0.0, as in torch's ReLU on CPU.
                if WIDE:
                    wide_raw = raw.to(tl.float64)
                elif BF16:  # bf16 is the top half of a float32: the shift is exact for every value,
                    # where a converting cast may flush subnormals (< 1.2e-38; the interpreter does)
                    wide_raw = (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                else:
                    wide_raw = raw.to(tl.float32)
                raw = tl.where(wide_raw < 0, tl.zeros_like(raw), raw)
                tl.store(y_ptr + where, raw, mask=inside)
            if HAS_MASK:
                keep = tl.load(mask_ptr + b // mask_div, mask=r_ok, other=0) != 0
                r_ok = r_ok & keep
            kept += r_ok.to(kept.dtype)
            ok = r_ok[:, None] & u_ok[None, :]
            if APPLY_RELU:
                v = tl.where(ok, raw, 0.0)
            else:
                v = tl.load(x_ptr + where, mask=ok, other=0.0)
            if WIDE:
                v = v.to(tl.float64)
            elif BF16:  # exact widening, as for the ReLU above: a flushed subnormal would not fire
                v = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            else:
                v = v.to(tl.float32)
            a = v if NONNEG else tl.abs(v)
            if TILE_SUMS:
                fired_tile += ((v > thr) & ok).to(fired.dtype)
                bad_tile += ((v - v) != 0).to(bad.dtype)  # NaN - NaN and inf - inf are NaN
                mag_tile += a.to(tl.float64)
            else:
                fired += tl.sum(((v > thr) & ok).to(fired.dtype), axis=0)
                bad += tl.sum(((v - v) != 0).to(bad.dtype), axis=0)
                mag += tl.sum(a.to(tl.float64), axis=0)
        if TILE_SUMS:
            fired = tl.sum(fired_tile, axis=0)
            bad = tl.sum(bad_tile, axis=0)
            mag = tl.sum(mag_tile, axis=0)
        tl.atomic_add(fired_ptr + u, fired.to(tl.int64), mask=u_ok)
        tl.atomic_add(bad_ptr + u, bad.to(tl.int64), mask=u_ok)
        tl.atomic_add(abs_ptr + u, mag, mask=u_ok)
        # Observations are counted by the first unit block of each row slice (the others add 0).
        tl.atomic_add(obs_ptr, tl.where(pid_u == 0, tl.sum(kept.to(tl.int64), axis=0), 0))

    return unit_stats_kernel


def _merged(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """(size, stride) of dims that one stride can address, or None (size 1 dims are free)."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 1, 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != n1 * s1:
            return None
    return math.prod(n for n, _ in dims), dims[-1][1]


def plan(x: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor, int, int, int, int, int, int]:
    """``(tensor, before, units, after, s_b, s_u, s_a)``: how the kernel addresses ``x``
    (``tensor`` is ``x`` itself unless its layout needed a contiguous copy).

    Example:
        >>> plan(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), 1)[1:]
        (40, 3, 1, 3, 1, 0)
    """
    if x.is_neg():  # a lazily negated view (``z.conj().imag``): its memory holds -x, so negate a copy
        x = x.resolve_neg()
    copy, *layout = _layout(tuple(x.shape), tuple(x.stride()), unit_dim)
    return (x.contiguous() if copy else x, *layout)  # type: ignore[return-value]


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], strides: tuple[int, ...], unit_dim: int) -> tuple[bool, int, int, int, int, int, int]:
    """:func:`plan` for one shape and strides (a batch's sites repeat them: worked out once):
    whether a contiguous copy is needed, then the six numbers."""
    if -len(shape) <= unit_dim < 0:  # -1 is the last dim: shape[unit_dim + 1:] would be all of it
        unit_dim += len(shape)
    copy = False
    head = _merged(shape[:unit_dim], strides[:unit_dim])
    tail = _merged(shape[unit_dim + 1 :], strides[unit_dim + 1 :])
    if head is None or tail is None:
        copy = True
        strides = tuple(_contiguous_strides(shape))
        head = _merged(shape[:unit_dim], strides[:unit_dim])
        tail = _merged(shape[unit_dim + 1 :], strides[unit_dim + 1 :])
        assert head is not None and tail is not None
    before, s_b, after, s_a = head[0], head[1], tail[0], tail[1]
    if after > 1 and (before == 1 or s_b == after * s_a):  # e.g. channels_last: rows (N, H, W) share one stride
        before, s_b, after, s_a = before * after, s_a, 1, 0
    return copy, before, shape[unit_dim], after, s_b, strides[unit_dim], s_a


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform runs (only then can a tensor be one of its wrappers,
    whose memory no kernel can read); True where this torch cannot tell."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is None or peek() is not None


_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a wrapper of ``torch.func``'s transforms (vmap, grad): no kernel can read it."""
    return bool(_IS_WRAPPED(x)) if _IS_WRAPPED is not None else False


def mask_rows(mask: torch.Tensor, before: int) -> tuple[torch.Tensor, int]:
    """A kernel's view of an observation mask over the leading dims: one byte per entry, and how
    many of the layout's ``before`` rows each entry covers."""
    flat = mask.reshape(-1)
    flat = flat.view(torch.uint8) if flat.is_contiguous() else flat.to(torch.uint8)
    return flat, before // max(mask.numel(), 1)


def relu_output(x: torch.Tensor, unit_dim: int, inplace: bool) -> tuple[tuple, torch.Tensor] | None:
    """``(layout, y)`` for a fused ReLU of ``x``: the layout :func:`plan` gives and the tensor the
    output goes into (``x`` itself when ``inplace``, else a new one with ``x``'s strides); None for
    a layout the kernel would have to copy, or a tensor that is not dense."""
    layout = plan(x, unit_dim)
    if layout[0] is not x or not dense(x):
        return None
    return layout, (x if inplace else torch.empty_like(x))  # dense tensors keep their strides, as torch.relu's output does


@functools.lru_cache(maxsize=4096)
def fusable(shape: tuple[int, ...], strides: tuple[int, ...], unit_dim: int) -> bool:
    """Whether a tensor of this shape and these strides is dense and addressed without a copy
    (:func:`deadrelu.core.fused.fusable_layout`, worked out once per layout)."""
    return _dense(shape, strides) and not _layout(shape, strides, unit_dim)[0]


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    """The strides ``x.contiguous()`` has: as torch computes them (a size-1 or size-0 dim counts as 1)."""
    out, step = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        out[i] = step
        step *= max(shape[i], 1)
    return out


def _blocks(units: int, s_u: int, after: int, s_a: int, tile_sums: bool = False, itemsize: int = 4) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_U): tiles contiguous along whichever axis is contiguous in memory. With
    ``tile_sums`` the tile is smaller (its sums are held per tile position): 16 bytes of input per
    thread and row, 16 values per thread in all, two 16-byte loads of bf16 (four of float32)."""
    if tile_sums:
        elements = 16 * 128  # 16 values for each of the 4 warps' 128 threads (32 spill on NCHW tiles)
        if s_u == 1 or after == 1:
            bu = min(max(16 // itemsize, 1) * 32 * 4, 1 << max(units - 1, 0).bit_length())  # a row of vectors per CTA
            return max(1, elements // max(bu, 1)), max(bu, 1)
        bu = min(8, 1 << max(units - 1, 0).bit_length())
        return elements // bu, bu
    if s_u == 1 or after == 1:  # units innermost: wide unit blocks, coalesced along units
        bu = min(128, 1 << max(units - 1, 0).bit_length())
        return max(16, 4096 // bu), max(bu, 1)
    return 256, min(8, 1 << max(units - 1, 0).bit_length())  # NCHW: coalesced along the spatial run


_THRESHOLDS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def _threshold_tensor(threshold: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The threshold as a cached one-element device tensor (no host-to-device copy per batch)."""
    key = (threshold, dtype, device, flushes_denormals())  # made under flush-to-zero, a subnormal one is 0
    t = _THRESHOLDS.get(key)
    if t is None:
        t = _THRESHOLDS[key] = torch.tensor([threshold], dtype=dtype, device=device)
    return t


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """Programs to launch in all: a few per streaming multiprocessor."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few and large


def unit_stats_into(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    nonnegative: bool,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
) -> None:
    """Add one batch's statistics into ``out`` (``observations``, ``fired``, ``abs_sum``, ``nonfinite``).

    Args:
        x: floating activation (CUDA; CPU only under ``TRITON_INTERPRET=1``).
        unit_dim: the dimension that indexes units.
        threshold: a value fires when it is ``> threshold`` (compared in float32, or float64
            for float64 inputs).
        nonnegative: skip the ``abs`` (ReLU-like activations).
        out: contiguous accumulators on ``x``'s device: int64 ``fired``/``nonfinite``, float64
            ``abs_sum`` of shape ``(units,)``, int64 ``observations`` of shape ``(1,)``.
        mask: optional bool mask of shape ``x.shape[:k]``, ``k <= unit_dim`` (see
            :meth:`deadrelu.core.stats.UnitStats.update`).
    """
    _launch(plan(x, unit_dim), None, threshold, nonnegative, out, mask)


def relu_stats_into(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor | None:
    """``relu(x)``, with its statistics added into ``out`` by the same kernel (one read of ``x``).

    The output has ``x``'s strides (``x`` itself when ``inplace``) and the values
    ``torch.relu`` gives, NaN included; the statistics are those :func:`unit_stats_into`
    adds for that output. The mask selects observations only: masked positions get their
    ReLU too. Returns None, launching nothing, for a layout the kernel would have to copy
    (the caller then runs the two passes).
    """
    made = relu_output(x, unit_dim, inplace)
    if made is None:
        return None
    _launch(made[0], made[1], threshold, True, out, mask)
    return made[1]


def dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its memory once each, in some order of its dims (contiguous,
    channels_last, a permutation of either): then ``empty_like(x)`` has ``x``'s strides. A slice
    (``x[:, :5]``) or an expanded tensor is not: its ReLU output would be laid out otherwise, and
    an in-place write would touch shared or foreign memory.

    >>> dense(torch.zeros(2, 3).t()), dense(torch.zeros(4, 6)[:, :5]), dense(torch.zeros(3, 1).expand(3, 4))
    (True, False, False)
    """
    return _dense(tuple(x.shape), tuple(x.stride()))


@functools.lru_cache(maxsize=4096)
def _dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(shape, strides) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_ACCUMULATORS = (("fired", torch.int64), ("abs_sum", torch.float64), ("nonfinite", torch.int64), ("observations", torch.int64))


def _addressable(out: Mapping[str, torch.Tensor], units: int, device: torch.device) -> bool:
    """Whether the kernel may add into ``out`` itself: contiguous tensors of the accumulator dtypes
    on the activation's device, ``units`` entries each (one observation count)."""
    for key, dtype in _ACCUMULATORS:
        t = out[key]
        if t.dtype != dtype or t.device != device or not t.is_contiguous():
            return False
        if t.numel() != (1 if key == "observations" else units):
            return False
    return True


def _launch(
    layout: tuple[torch.Tensor, int, int, int, int, int, int],
    y: torch.Tensor | None,
    threshold: float,
    nonnegative: bool,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None,
) -> None:
    t, before, units, after, s_b, s_u, s_a = layout
    if not _addressable(out, units, t.device):
        # The kernel adds at fired_ptr + u: accumulators that are strided views (a column of a
        # (units, steps) table), of another dtype or elsewhere would be written out of place.
        # Count into fresh ones and add those in (no host synchronisation either way).
        fresh = {
            k: torch.zeros(n, dtype=dtype, device=t.device)
            for k, n, dtype in (("fired", units, torch.int64), ("abs_sum", units, torch.float64),
                                ("nonfinite", units, torch.int64), ("observations", 1, torch.int64))
        }  # fmt: skip
        _launch(layout, y, threshold, nonnegative, fresh, mask)
        for k, v in fresh.items():
            out[k] += v.view(out[k].shape) if out[k].numel() == v.numel() else v
        return
    grid, scalars, constexprs = launch_config(layout, y is not None, nonnegative, mask is not None, _programs(t.device))
    wide = t.dtype == torch.float64
    thr = _threshold_tensor(float(threshold), torch.float64 if wide else torch.float32, t.device)
    if mask is None:
        mask_arg, mask_div = t, 1  # unused
    else:
        mask_arg, mask_div = mask_rows(mask, before)
    _kernel(interpreting())[grid](
        t, t if y is None else y, mask_arg, thr, out["fired"], out["abs_sum"], out["nonfinite"], out["observations"],
        *scalars, mask_div, **constexprs,
    )  # fmt: skip


def launch_config(
    layout: tuple[torch.Tensor, int, int, int, int, int, int], relu: bool, nonnegative: bool, masked: bool, programs: int
) -> tuple[tuple[int, int], tuple[int, ...], dict[str, Any]]:
    """``(grid, scalars, constexprs)`` of the kernel launch for a :func:`plan` layout: the grid, the
    integer arguments before ``mask_div`` (``units, after, rows, rows_per_prog, s_b, s_u, s_a``) and
    the compile-time constants. ``programs``: how many to launch in all (a few per SM on a GPU).
    One function, so the test-suite compiles for a GPU exactly what a launch would ask for."""
    t, before, units, after, s_b, s_u, s_a = layout
    rows = before * after
    tile_sums = tile_sums_on()
    block_r, block_u = _blocks(units, s_u, after, s_a, tile_sums, t.element_size())
    unit_blocks = -(-units // block_u)
    row_progs = max(1, min(-(-rows // block_r), programs // unit_blocks or 1))
    rows_per_prog = -(-rows // (row_progs * block_r)) * block_r
    row_progs = -(-rows // rows_per_prog)
    constexprs = dict(
        HAS_MASK=masked, NONNEG=bool(nonnegative), WIDE=t.dtype == torch.float64, AFTER_ONE=after == 1,
        LARGE=rows >= 2**31 - rows_per_prog, APPLY_RELU=relu, BF16=t.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_U=block_u, TILE_SUMS=tile_sums,
    )  # fmt: skip
    return (unit_blocks, row_progs), (units, after, rows, rows_per_prog, s_b, s_u, s_a), constexprs
