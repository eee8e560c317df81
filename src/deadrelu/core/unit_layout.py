"""An activation's unit layout as the statistics read it: its unit dimension, its mask, its sums.

Every accumulator turns an activation into a batch the same way (:func:`as_unit_batch`: detached,
floating, with an explicit batch dimension), checks an observation mask the same way
(:func:`check_mask`: the shape of a prefix of the leading, non-unit dimensions) and counts the unit
dimension from the front (:func:`front_dim`) before any layout computation (:func:`three_d`,
:func:`unit_reduce_dims`). :func:`per_unit_sum` is the plain reduction the ``batch`` function of a
declared statistic uses (see :mod:`deadrelu.core.statistic`).
"""

from __future__ import annotations

import math

import torch

from ..errors import DeadReluError

__all__ = ["as_unit_batch", "check_mask", "front_dim", "per_unit_sum", "three_d", "unit_reduce_dims"]


def unit_reduce_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """Every dimension except ``unit_dim``: the ones a per-unit statistic reduces over."""
    unit_dim = front_dim(ndim, unit_dim)
    return tuple(d for d in range(ndim) if d != unit_dim)


def front_dim(ndim: int, unit_dim: int) -> int:
    """``unit_dim`` counted from the front (``-1`` is the last dim). Every layout computation
    (the ``(before, units, after)`` split, a mask's prefix, the kernels' strides) takes a
    non-negative index: ``shape[unit_dim + 1:]`` of ``-1`` is the whole shape, and the kernels
    would read past the tensor. Out-of-range values are left for indexing to refuse."""
    return unit_dim + ndim if -ndim <= unit_dim < 0 else unit_dim


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
    unit_dim = front_dim(x.ndim, unit_dim)
    if x.shape[unit_dim] != units:
        raise DeadReluError(
            f"activation has {x.shape[unit_dim]} units along dim {unit_dim} (shape {tuple(x.shape)}), "
            f"expected {units}"
        )
    if not x.is_floating_point():
        x = x.float()
    return x, unit_dim


def check_mask(x: torch.Tensor, unit_dim: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate an observation mask (see :meth:`UnitStats.update`); returns it as bool on x's device.

    Raises:
        DeadReluError: when the mask's shape is not a prefix of the leading (non-unit) dims.
    """
    if mask is None:
        return None
    unit_dim = front_dim(x.ndim, unit_dim)
    if mask.ndim > unit_dim or tuple(mask.shape) != tuple(x.shape[: mask.ndim]):
        raise DeadReluError(
            f"mask of shape {tuple(mask.shape)} does not match the leading dimensions of an activation of "
            f"shape {tuple(x.shape)} with units on dim {unit_dim}: it must have the shape of "
            f"activation.shape[:k] for some k <= {unit_dim}"
        )
    return mask.to(device=x.device, dtype=torch.bool)


def per_unit_sum(t: torch.Tensor, unit_dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over every dimension but ``unit_dim`` (a plain reduction, for ``batch`` functions).

    Example:
        >>> per_unit_sum(torch.ones(2, 3, 4), 1).tolist()
        [8.0, 8.0, 8.0]
    """
    if t.ndim < 2:  # every value is a unit: torch's sum over no dims would add them all up
        return t.reshape(-1).to(dtype or t.dtype, copy=True)
    return t.sum(dim=unit_reduce_dims(t.ndim, unit_dim), dtype=dtype)


def three_d(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``x`` as a ``(before, units, after)`` view without copying when its layout allows:
    contiguous tensors keep their order; a tensor whose unit dim is innermost in memory
    (channels_last) becomes ``(rows, units, 1)``; anything else is copied once."""
    units = x.shape[unit_dim]
    before, after = math.prod(x.shape[:unit_dim]), math.prod(x.shape[unit_dim + 1 :])
    if x.is_contiguous():
        return x.view(before, units, after)
    moved = x.movedim(unit_dim, -1)
    if moved.is_contiguous():
        return moved.view(before * after, units, 1)
    return x.contiguous().view(before, units, after)
