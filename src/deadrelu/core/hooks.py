"""deadrelu's forward hooks stay with the model they were registered on: copies never get them.

``copy.deepcopy(model)`` copies a module's hook dictionaries, and ``pickle`` tries to pickle the
hooks. A hook wrapped by :func:`copy_safe_hook` turns, in both cases, into an inert hook that
removes deadrelu's hooks from the copy on its first call — so a pruned or swapped copy of a
watched model never feeds the old capture, and a model with a Probe or Monitor attached (whose
sinks hold open files) still pickles.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn
from torch.nn.modules import module as _module_impl

__all__ = ["copy_safe_hook", "global_forward_hooks", "is_deadrelu_hook", "only_deadrelu_forward_hooks", "remove_inert_hooks"]


def _inert_hook(module: nn.Module, *args: Any) -> None:
    """What a deadrelu hook becomes in a copy of the model: it removes deadrelu's hooks from the
    copy on its first call and does nothing else."""
    remove_inert_hooks(module)


def _make_inert() -> Callable[..., None]:
    return _inert_hook


class _Hook(functools.partial):
    """A deadrelu hook: ``copy.deepcopy`` and pickling turn it into :func:`_inert_hook`, so a
    copy of a model never feeds the capture, and a model with a capture attached still pickles."""

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert_hook

    def __reduce__(self) -> tuple[Any, tuple]:
        return (_make_inert, ())


def copy_safe_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a hook so that copies and pickles of the model carry an inert hook instead of it.

    >>> import copy, torch
    >>> net = torch.nn.Linear(2, 2)
    >>> _ = net.register_forward_hook(copy_safe_hook(lambda m, a, o: print("seen")))
    >>> twin = copy.deepcopy(net)
    >>> _ = twin(torch.randn(1, 2))  # the copy's hook is inert: nothing printed
    >>> len(twin._forward_hooks)
    0
    """
    return _Hook(fn)


def is_deadrelu_hook(hook: Any) -> bool:
    """True for a hook deadrelu registered (live, or the inert form it takes in copies)."""
    return hook is _inert_hook or isinstance(hook, _Hook)


def remove_inert_hooks(model: nn.Module) -> int:
    """Remove the inert hooks that copies of a watched model carry; returns how many were removed."""
    removed = 0
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if h is _inert_hook]:
                del hooks[key]
                for flags in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(module, flags, {}).pop(key, None)
                removed += 1
    return removed


def global_forward_hooks(pre: bool = False) -> list[Callable[..., Any]]:
    """The forward hooks (``pre=True``: pre-hooks) registered for every module at once
    (``torch.nn.modules.module.register_module_forward_hook``)."""
    name = "_global_forward_pre_hooks" if pre else "_global_forward_hooks"
    return list(getattr(_module_impl, name, {}).values())


def only_deadrelu_forward_hooks(module: nn.Module) -> bool:
    """Whether every forward hook that runs after ``module`` (its own and the global ones) is
    deadrelu's: asked at each activation call, so it builds no lists."""
    return all(map(is_deadrelu_hook, module._forward_hooks.values())) and all(
        map(is_deadrelu_hook, getattr(_module_impl, "_global_forward_hooks", {}).values())
    )
