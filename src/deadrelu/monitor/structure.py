"""Whether a monitored model was edited since its monitor was made: modules replaced, added or removed.

A monitor's capture learns the model when it is made (each module's path, class and activation
function) and hooks its modules when it attaches. A module swapped in later
(``deadrelu.swap_activations``, ``model.act = nn.GELU()``) has no hook and is unknown to it: the
removed module's site would go on being reported from its last window, and activations in the new
module would be named as functional calls of its parent. :class:`ModelLayout` remembers the
modules that may hold an activation site (the ones the capture hooks) and names what changed.

Modules that cannot hold a site (a ``Linear`` replaced by another ``Linear``) do not count, and
``torch.compile`` wrappers put around blocks are seen through (:func:`eager_modules`), so
compiling a block after attaching is no edit.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> layout = ModelLayout(net)
    >>> layout.changes(net)
    []
    >>> net[1] = torch.nn.GELU()
    >>> layout.changes(net)
    ["'1' (ReLU replaced by GELU)"]
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from ..core.activations import calls_no_activation
from ..core.capture import eager_modules

__all__ = ["ModelLayout"]


def _site_holders(model: nn.Module) -> dict[str, nn.Module]:
    """The modules, by path, that may hold an activation site (the root always does)."""
    return {path: m for path, m in eager_modules(model) if m is model or not calls_no_activation(m)}


class ModelLayout:
    """The modules of a model, kept by weak reference (a removed module is not kept alive).

    Args:
        model: the model as the monitor learnt it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._all = self._snapshot(list(model.named_modules()))
        self._holders = {path: (weakref.ref(m), type(m).__name__) for path, m in _site_holders(model).items()}

    @staticmethod
    def _snapshot(named: list[tuple[str, nn.Module]]) -> list[tuple[str, Any]]:
        return [(path, weakref.ref(m)) for path, m in named]

    def changes(self, model: nn.Module) -> list[str]:
        """What was edited since: one ``'path' (what happened)`` entry per module that may hold a
        site and was replaced, added or removed; empty when none was.

        The common case, nothing edited at all, is one walk over the modules comparing identities
        (the raw ``named_modules``: a block compiled since only takes the slower look below).
        """
        named = list(model.named_modules())
        if len(named) == len(self._all) and all(p == q and m is r() for (p, m), (q, r) in zip(named, self._all)):
            return []
        now = _site_holders(model)
        out = []
        for path, (ref, before) in self._holders.items():
            module = now.get(path)
            if module is None:
                out.append(f"{path or '<root>'!r} (a {before}, removed)")
            elif module is not ref():
                out.append(f"{path or '<root>'!r} ({before} replaced by {type(module).__name__})")
        out += [f"{path!r} (a new {type(m).__name__})" for path, m in now.items() if path not in self._holders]
        if not out:  # only modules that hold no site changed: remember them, so the next look is quick again
            self._all = self._snapshot(named)
        return out
