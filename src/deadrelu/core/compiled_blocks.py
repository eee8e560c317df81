"""A model's ``torch.compile``'d blocks seen as the eager modules the user wrote: the wrappers
(``OptimizedModule``) looked through in module paths and submodule lookups, the blocks found, and
the stance in which compiled code runs eagerly (how an observed pass runs a model with compiled
blocks).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = ["compiled_blocks", "eager_modules", "eager_stance", "eager_submodule", "is_compiled_wrapper"]


def is_compiled_wrapper(module: nn.Module) -> bool:
    """``torch.compile``'s ``OptimizedModule``: a wrapper whose ``_orig_mod`` is the real module."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def eager_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as the user wrote the model: each ``torch.compile`` wrapper is
    left out for the module inside it, whose path loses the ``_orig_mod`` segment — so a site in
    a compiled block is named ``enc.1`` as in the uncompiled model (``model.get_submodule`` finds
    it either way: the wrapper forwards attribute lookups)."""
    wrapped_root = model._orig_mod if is_compiled_wrapper(model) else None
    out = []
    for path, module in model.named_modules():
        if module is wrapped_root or (module is not model and is_compiled_wrapper(module)):
            continue  # a wrapper's module is named after it (a compiled root: the root itself)
        out.append((".".join(p for p in path.split(".") if p != "_orig_mod"), module))
    return out


def eager_stance() -> contextlib.AbstractContextManager[Any]:
    """A context in which ``torch.compile``'d code runs eagerly. Observed forward passes of a
    model with compiled blocks use it: Dynamo would otherwise trace the capture's hooks and
    function mode (and fail on them). ``Monitor(compiled=True)`` observes compiled blocks
    without giving up compilation."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is not None:
        return set_stance("force_eager")
    import torch._dynamo as dynamo

    return dynamo.config.patch(disable=True)


def eager_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, looking through a ``torch.compile`` wrapper at the end of the
    path, so that setting a child on the result changes the module the compiled code runs."""
    module = model.get_submodule(path) if path else model
    return module._orig_mod if is_compiled_wrapper(module) else module  # type: ignore[return-value]


def compiled_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that run inside a ``torch.compile`` wrapper of their own
    (``model.layers[i] = torch.compile(model.layers[i])``), by their :func:`eager_modules` path."""
    inner = {id(m._orig_mod) for m in model.modules() if is_compiled_wrapper(m) and m is not model}  # type: ignore[union-attr]
    return {p: m for p, m in eager_modules(model) if id(m) in inner}
