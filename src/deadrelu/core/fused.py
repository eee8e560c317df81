"""ReLU with its statistics counted as it is written: one kernel, one read of the input.

The eager capture normally lets a ReLU run and then reads its output once more to count it
(:func:`deadrelu.core.stats.accumulate`). On CUDA with Triton, :func:`counted_relu` does both
in one launch instead: the kernel of :mod:`deadrelu.core.kernels` loads each input value,
writes ``relu(x)`` and adds that output's fired count, ``Σ|h|`` and NaN/Inf count into the
site's accumulators. The output is the value ``torch.relu`` gives (NaN stays NaN, ``-0.0``
stays ``-0.0``; compared in float32, float64 for float64 input), so the model computes the same numbers with
or without deadrelu, and the statistics are the two-pass ones.

Autograd sees one node whose backward is ``threshold_backward(grad, output, 0)``, the
formula of torch's own ``ReluBackward``. The in-place form (``relu_``, ``nn.ReLU(inplace=True)``)
marks its input dirty, so autograd's version check still catches an overwritten saved tensor.
Only ReLU is fused: GELU and SiLU would be recomputed by Triton's ``erf``/``exp``, whose last
bits can differ from torch's, and deadrelu never changes what a model computes.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import torch

from . import kernels

__all__ = ["counted_relu", "fusable_layout", "launched"]

_STATE = threading.local()  # whether this thread's last counted_relu call launched its kernel


def launched() -> bool:
    """Whether the last :func:`counted_relu` call of this thread ran its kernel (counted the batch)
    before it failed: the caller then applies torch's ReLU without counting the batch again."""
    return getattr(_STATE, "launched", False)


def fusable_layout(x: torch.Tensor, unit_dim: int) -> bool:
    """True when the kernel addresses ``x`` in place through its strides (no contiguous copy) and
    ``x`` is dense, so the output has the layout ``torch.relu``'s would; never for a tensor of
    ``torch.func``'s transforms (vmap, grad), whose storage a kernel cannot read, nor for a lazily
    negated view (``z.conj().imag``), whose memory holds the values' negatives."""
    if x.is_neg():
        return False
    if kernels.transforms_active() and kernels.functorch_wrapped(x):
        return False
    return kernels.fusable(tuple(x.shape), tuple(x.stride()), unit_dim)


class _CountedReLU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        unit_dim: int,
        threshold: float,
        out: Mapping[str, torch.Tensor],
        mask: torch.Tensor | None,
        inplace: bool,
        engine: Any,
    ) -> torch.Tensor:
        y = engine.relu_stats_into(x, unit_dim, threshold, out, mask, inplace)
        assert y is not None, "fusable_layout is checked before"
        _STATE.launched = True
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0), None, None, None, None, None, None


def counted_relu(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    inplace: bool = False,
    engine: Any = kernels,
) -> torch.Tensor:
    """``relu(x)`` (``x`` itself when ``inplace``), its statistics added into ``out``.

    Args:
        x: a floating tensor on a device the kernel runs on, with :func:`fusable_layout`.
        unit_dim: the dimension that indexes units.
        threshold: an output fires when it is ``> threshold``.
        out: the accumulators of :func:`deadrelu.core.kernels.unit_stats_into`.
        mask: optional bool observation mask over ``x``'s leading dims (outputs are written
            everywhere; only kept positions are counted).
        inplace: write the output into ``x``, as ``torch.relu_`` does.
        engine: the kernel module, :mod:`deadrelu.core.kernels` (Triton) or
            :mod:`deadrelu.core.native` (the C kernel, CPU tensors).
    """
    _STATE.launched = False
    return _CountedReLU.apply(x, unit_dim, threshold, out, mask, inplace, engine)
