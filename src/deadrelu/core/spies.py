"""The torch modes that hand each torch call of an observed forward pass to its
:class:`~deadrelu.core.capture.ActivationCapture`: a ``TorchFunctionMode`` for an eager model (every
call; a ReLU call is first offered to a fused kernel), a ``TorchDispatchMode`` for a TorchScript
one (aten ops, the only calls of a scripted forward Python sees).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import DeadReluError
from .unit_axis import ACT, kind_of

if TYPE_CHECKING:
    from .capture import ActivationCapture

__all__ = ["DispatchSpy", "FunctionSpy", "INPLACE_RELUS"]


class FunctionSpy(TorchFunctionMode):
    """Sees every torch function called while the model's forward runs."""

    def __init__(self, capture: "ActivationCapture") -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kind = kind_of(func)
        if kind[0] == ACT and func in _RELUS:
            out = self.capture._counted_relu(func, args, kwargs)
            if out is not None:
                return out
        out = func(*args, **kwargs) if kwargs else func(*args)
        if isinstance(out, (torch.Tensor, tuple, list)):
            self.capture._on_op(kind, args, kwargs, out)
        return out


# The ReLU calls a fused kernel may compute and count at once (core/fused.py), in place or not.
INPLACE_RELUS = frozenset({torch.relu_, torch.Tensor.relu_, F.relu_})
_RELUS = frozenset({F.relu, torch.relu, torch.Tensor.relu}) | INPLACE_RELUS


class DispatchSpy(TorchDispatchMode):
    """Sees aten ops; used for TorchScript modules, whose Python-level calls are invisible."""

    def __init__(self, capture: "ActivationCapture") -> None:
        super().__init__()
        self.capture = capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        try:
            out = func(*args, **(kwargs or {}))
        except Exception as err:
            # The TorchScript interpreter re-raises it with its message dropped: keep the cause.
            self.capture.op_error = err
            raise
        if isinstance(out, (torch.Tensor, tuple, list)):
            try:
                self.capture._on_op(kind_of(func), args, kwargs, out)
            except DeadReluError as err:
                # deadrelu's own error (a bad unit_dim, a width mismatch): the interpreter would
                # turn it into a RuntimeError without its message, blamed on the model.
                self.capture.own_error = err
                raise
        return out
