"""The one table of activations: which functions and module classes are activation sites,
which outputs are never negative, and which are exactly zero when a unit is dead.

Every part of deadrelu (capture, the compiled-model capture, the monitor, surgery, advice) asks
this module; adding an activation means adding one :class:`Activation` row here.

>>> from deadrelu.core.activations import ACTIVATIONS, function_of_module
>>> ACTIVATIONS["relu"].zero_when_dead, ACTIVATIONS["gelu"].nonnegative
(True, False)
>>> import torch
>>> function_of_module(torch.nn.LeakyReLU())
'leaky_relu'
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "NONNEGATIVE_FUNCTIONS",
    "ZERO_WHEN_DEAD_FUNCTIONS",
    "MODULE_FUNCTIONS",
    "function_of_module",
]


@dataclass(frozen=True)
class Activation:
    """One activation function and the module class that calls it.

    Attributes:
        function: base name of the torch function (``relu``; in-place ``relu_`` maps here too).
        module: the ``torch.nn`` class whose forward calls it, or None (``hardtanh`` has subclasses only).
        nonnegative: the output is never negative (or NaN), so ``|h| == h`` and one abs pass is saved.
        zero_when_dead: a unit that never fires outputs exactly 0, so removing it changes nothing
            downstream (prune may drop it without folding a constant).
    """

    function: str
    module: type[nn.Module] | None
    nonnegative: bool = False
    zero_when_dead: bool = False


ACTIVATIONS: dict[str, Activation] = {
    a.function: a
    for a in (
        Activation("relu", nn.ReLU, nonnegative=True, zero_when_dead=True),
        Activation("relu6", nn.ReLU6, nonnegative=True, zero_when_dead=True),
        Activation("leaky_relu", nn.LeakyReLU),
        Activation("prelu", nn.PReLU),
        Activation("rrelu", nn.RReLU),
        Activation("elu", nn.ELU),
        Activation("celu", nn.CELU),
        Activation("selu", nn.SELU),
        Activation("gelu", nn.GELU),
        Activation("silu", nn.SiLU),
        Activation("mish", nn.Mish),
        Activation("hardswish", nn.Hardswish),
        Activation("softplus", nn.Softplus, nonnegative=True),
        Activation("hardtanh", None),
    )
}

#: Activation functions captured (base names; in-place ``name_`` variants included).
ACTIVATION_FUNCTIONS = frozenset(ACTIVATIONS)

#: Activation module classes (their forward calls one of ACTIVATION_FUNCTIONS).
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(a.module for a in ACTIVATIONS.values() if a.module)

#: Functions whose output is never negative: ``|h| = h``.
NONNEGATIVE_FUNCTIONS = frozenset(a.function for a in ACTIVATIONS.values() if a.nonnegative)

#: Functions whose output is exactly zero for a unit that never fires (at firing threshold <= 0).
ZERO_WHEN_DEAD_FUNCTIONS = frozenset(a.function for a in ACTIVATIONS.values() if a.zero_when_dead)

#: Activation module class name -> function name (TorchScript and exported programs keep only names).
MODULE_FUNCTIONS: dict[str, str] = {a.module.__name__: a.function for a in ACTIVATIONS.values() if a.module}

_BY_CLASS: dict[type[nn.Module], str] = {a.module: a.function for a in ACTIVATIONS.values() if a.module}


def function_of_module(module: nn.Module) -> str | None:
    """The activation function a module instance stands for (exact class first, then subclasses)."""
    name = _BY_CLASS.get(type(module))
    if name is not None:
        return name
    for cls, fn in _BY_CLASS.items():
        if isinstance(module, cls):
            return fn
    return None
