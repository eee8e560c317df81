"""All-or-nothing edits: snapshot, edit, verify, then commit or roll back.

Every rescue function follows the same four steps. It proves and plans everything before
the first write; then, inside a :class:`Transaction`, it snapshots each tensor just before
writing it (parameters, buffers, optimizer state) and each module attribute just before
replacing it, makes its edits, and verifies the result. Any exception inside the block —
a verification that refuses, a failed write, ``KeyboardInterrupt`` — puts every snapshot
back, in reverse order, before it propagates. Leaving the block normally commits.

A refusal therefore leaves the model and optimizer bit-identical: the tensors are the
same objects holding the same bits, the module tree holds the same objects.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> before = layer.weight.detach().clone()
    >>> try:
    ...     with Transaction() as tx:
    ...         tx.save(layer.weight)
    ...         _ = layer.weight.data.zero_()
    ...         raise RuntimeError("verification failed")
    ... except RuntimeError:
    ...     pass
    >>> torch.equal(layer.weight, before)
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.inputs import error_summary
from ..errors import DeadReluError, RefusedError
from .dataflow import computed_weight_reason, is_deadrelu_hook

__all__ = ["Transaction", "copy_model"]

_MISSING = object()


class Transaction:
    """Remembers what is about to be changed and puts it all back if the block fails.

    Use it as a context manager; inside, call :meth:`save` before writing a tensor in
    place and :meth:`setattr` to replace an attribute (a submodule in its parent).
    Snapshots are taken once per object, so saving a tensor twice keeps its first state.

    Args:
        what: the operation's name. When given, an exception that is not a deadrelu error (a
            write torch refuses, e.g. to an inference-mode tensor) is re-raised after the
            rollback as one :class:`~deadrelu.errors.RefusedError` naming it (the original is
            its ``__cause__``); ``KeyboardInterrupt`` and deadrelu's own errors propagate as they are.
    """

    def __init__(self, what: str | None = None) -> None:
        self._tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._attrs: list[tuple[Any, str, Any]] = []
        self.committed = False
        self.what = what

    def save(self, t: torch.Tensor | None) -> None:
        """Snapshot ``t`` (a parameter, buffer or optimizer state tensor) before it is written."""
        if t is not None and id(t) not in self._tensors:
            self._tensors[id(t)] = (t, t.detach().clone())

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering the old value (or its absence) for rollback."""
        self._attrs.append((obj, name, getattr(obj, name, _MISSING)))
        setattr(obj, name, value)

    def rollback(self) -> None:
        """Restore every snapshot: attributes in reverse order, then tensor contents."""
        for obj, name, old in reversed(self._attrs):
            if old is _MISSING:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._attrs.clear()
        failed = []
        with torch.no_grad():
            for t, old in self._tensors.values():
                try:
                    t.copy_(old)
                except Exception:  # a tensor torch will not write (inference mode) was not written either
                    if not torch.equal(t, old):
                        failed.append(tuple(t.shape))
        self._tensors.clear()
        if failed:
            raise RuntimeError(f"rollback could not restore {len(failed)} tensor(s) of shape(s) {failed}")

    def commit(self) -> None:
        """Keep the edits and drop the snapshots."""
        self._tensors.clear()
        self._attrs.clear()
        self.committed = True

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.commit()
            return
        self.rollback()
        if self.what is not None and isinstance(exc, Exception) and not isinstance(exc, DeadReluError):
            raise RefusedError(
                f"{self.what}: a write failed ({type(exc).__name__}: {error_summary(exc)}), so every edit was "
                "rolled back; nothing was changed"
            ) from exc


def _hook_dicts(module: nn.Module) -> tuple[dict[int, Any], ...]:
    return (module._forward_hooks, module._forward_pre_hooks)


def copy_model(model: nn.Module, what: str) -> nn.Module:
    """A deep copy of ``model`` for a rewrite that must leave the original untouched.

    Deadrelu's own hooks (a Monitor or Probe attached to ``model``) do not travel into the
    copy: they would keep feeding the original's capture, and a monitor's open log files
    cannot be copied. A module under the old hook-based ``weight_norm``/``spectral_norm``
    holds a computed ``weight`` that ``copy.deepcopy`` cannot copy; that is refused.

    Raises:
        RefusedError: the model cannot be copied (the message says why); nothing was changed.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> twin = copy_model(net, "example")
        >>> twin[0].weight is net[0].weight, torch.equal(twin[0].weight, net[0].weight)
        (False, True)
    """
    memo: dict[int, Any] = {}
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
                raise RefusedError(
                    f"{what}: {computed_weight_reason(path, module)}, and that computed weight cannot be copied; use "
                    "torch.nn.utils.parametrizations instead, or remove the hook first; nothing was changed"
                )
        for hooks in _hook_dicts(module):
            for hook in hooks.values():
                if is_deadrelu_hook(hook):
                    memo[id(hook)] = None  # copied as None, then dropped below
    try:
        twin = copy.deepcopy(model, memo)
    except Exception as err:  # deepcopy raises whatever a module's state raises
        raise RefusedError(
            f"{what}: cannot copy {type(model).__name__} ({type(err).__name__}: "
            f"{error_summary(err)}); nothing was changed"
        ) from err
    for module in twin.modules():
        for hooks in _hook_dicts(module):
            for key in [k for k, h in hooks.items() if h is None]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    return twin
