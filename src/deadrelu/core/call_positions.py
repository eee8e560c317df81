"""Where a call is in the code: the chain of Python frames (code object, bytecode offset) from an
activation call, or from a module call, up to the call of the module that made it — the call
position in a site's identity (see :mod:`deadrelu.core.capture`) — and how a position is written.

torch's functional wrappers and the capture's own frames are in no position: a call has one
position whichever route reached it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["call_position", "describe_position", "module_call_entry", "module_call_position", "stable_position"]


# Frames of torch's own wrappers between a functional call and the code that made it.
_WRAPPER_FILES = frozenset(
    f for f in (getattr(m, "__file__", None) for m in (torch.overrides, F, torch._tensor, torch.functional)) if f
)
_MODULE_FILE = nn.modules.module.__file__
# deadrelu's own frames, left out of every position: those of the capture's modules (capture.py and
# the modules split from it), which a walk may pass between a call and here (the capture's methods
# and hooks, its torch modes, the unit_dim/threshold options that call a user's callable).
_CAPTURE_MODULES = (
    "call_positions", "capture", "capture_hooks", "compiled_blocks", "graph_module_paths", "observation_masks",
    "site_options", "sites", "spies",
)
_CAPTURE_FILES = frozenset(os.path.join(os.path.dirname(__file__), f"{name}.py") for name in _CAPTURE_MODULES)
_MAX_FRAMES = 8
_MAX_CALL_FRAMES = 64  # a bound only: the walk normally ends at the calling module's frame


def _frames_up_to(f: Any, stop: Any, until: Any = None) -> tuple[Any, ...]:
    """The (code, bytecode offset) of ``f`` and the frames above it, up to the frame ``stop``
    (a module's ``_call_impl``) or, where ``stop`` is None, the first ``Module.__call__`` frame;
    torch's functional wrappers and deadrelu's own frames are left out (a call has one position
    whichever route reached it).

    With no module call above it (code run in a ``forward_scope()`` block), the walk ends at and
    includes ``until``, a frame or code object (the block's ``with`` frame, or the function the
    block runs): the frames above it are the training loop's, which reaches the same line by
    several paths (Lightning's accumulating and stepping batches). Where ``until`` is not on
    the stack, the first ``_MAX_FRAMES`` frames are kept."""
    out = []
    limit = _MAX_CALL_FRAMES if stop is not None or until is not None else _MAX_FRAMES
    for _ in range(limit):
        if f is None or f is stop:
            break
        code = f.f_code
        filename = code.co_filename
        if filename == _MODULE_FILE and stop is None:
            break
        if filename not in _WRAPPER_FILES and filename not in _CAPTURE_FILES:
            out.append((code, f.f_lasti))
        if until is not None and (f is until or code is until):
            return tuple(out)
        f = f.f_back
    return tuple(out[:_MAX_FRAMES]) if stop is None else tuple(out)


def call_position(depth: int, stop: Any = None, until: Any = None) -> tuple[Any, ...]:
    """The chain of (code, bytecode offset) from an activation call up to the module's call
    (its ``_call_impl`` frame ``stop``: hooks and unhooked module calls in between count too).

    ``depth`` counts the frames from here up to ``__torch_function__``'s caller; both routes in
    (``_on_activation`` and ``_counted_relu``) start there, so a call has one position either way.
    """
    return _frames_up_to(sys._getframe(depth), stop, until)


def module_call_entry() -> Any:
    """The ``Module._call_impl`` frame of the module call whose pre-hook is running (the frames
    below it are the hook's own and deadrelu's wrappers)."""
    f = sys._getframe(2)  # the pre-hook's caller: Module._call_impl, or a hook wrapper below it
    while f is not None and f.f_code.co_filename != _MODULE_FILE:
        f = f.f_back
    return f


def module_call_position(entry: Any, stop: Any) -> tuple[Any, ...]:
    """The chain of (code, bytecode offset) from a module call (its ``_call_impl`` frame
    ``entry``) up to the calling module's call (its ``_call_impl`` frame ``stop``): the caller's
    forward and every helper, hook or unhooked module call in between."""
    f = entry
    while f is not None and f.f_code.co_filename == _MODULE_FILE and f is not stop:
        f = f.f_back  # this call's _call_impl and _wrapped_call_impl
    return _frames_up_to(f, stop) if f is not None else ()


def stable_position(position: Any) -> str:
    """A call position as text that is the same in every process running the same code (``SiteInfo.position``)."""
    if not position:
        return ""
    # co_qualname is Python 3.11+; on 3.10 the plain name (with the file and first line beside it,
    # still one code object's)
    return "|".join(
        f"{c.co_filename}:{c.co_firstlineno}:{getattr(c, 'co_qualname', c.co_name)}:{offset}" for c, offset in position
    )


def describe_position(position: Any) -> str:
    """A call position's innermost source line, ``file.py:42`` (``SiteInfo.location``)."""
    if not position:
        return ""
    code, offset = position[0]
    line = None
    for start, end, lineno in code.co_lines():
        if start <= offset < end:
            line = lineno
            break
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{line if line is not None else code.co_firstlineno}"
