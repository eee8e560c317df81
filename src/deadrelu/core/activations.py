"""The one table of activations: which functions and module classes are activation sites,
which outputs are never negative, and which are exactly zero when a unit is dead.

Every part of deadrelu (capture, the compiled-model capture, the monitor, surgery, advice) asks
this module; adding an activation means adding one :class:`Activation` row here, or calling
:func:`register_activation` for a class of your own.

Module classes are recognised three ways, in this order: the exact ``torch.nn`` class (and its
subclasses); a class registered with :func:`register_activation`; a class whose *name* is one of
the well-known hand-written activations of transformers, timm, CLIP and open_clip
(:data:`KNOWN_MODULE_NAMES`) — by name, so those libraries are never imported.

>>> from deadrelu.core.activations import ACTIVATIONS, function_of_module
>>> ACTIVATIONS["relu"].zero_when_dead, ACTIVATIONS["gelu"].nonnegative
(True, False)
>>> import torch
>>> function_of_module(torch.nn.LeakyReLU())
'leaky_relu'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = [
    "base_name",
    "calls_no_activation",
    "called_activation",
    "Activation",
    "ACTIVATIONS",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "NONNEGATIVE_FUNCTIONS",
    "ZERO_WHEN_DEAD_FUNCTIONS",
    "RELU_SPELLINGS",
    "MODULE_FUNCTIONS",
    "KNOWN_MODULE_NAMES",
    "function_of_module",
    "register_activation",
    "looks_like_activation",
]


@dataclass(frozen=True)
class Activation:
    """One activation function and the module class that calls it.

    Attributes:
        function: base name of the torch function (``relu``; in-place ``relu_`` maps here too),
            or a deadrelu name for activations that exist only as hand-written modules
            (``quick_gelu``, ``hard_mish``, ``relu_squared``).
        module: the ``torch.nn`` class whose forward calls it, or None (``hardtanh`` has subclasses only).
        nonnegative: the output is never negative (or NaN), so ``|h| == h`` and one abs pass is saved.
        zero_when_dead: a unit that never fires outputs exactly 0, so removing it changes nothing
            downstream (prune may drop it without folding a constant).
        torch_function: a torch function of this name exists, so functional calls are sites too.
    """

    function: str
    module: type[nn.Module] | None
    nonnegative: bool = False
    zero_when_dead: bool = False
    torch_function: bool = True


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
        Activation("softplus", nn.Softplus),  # not nonnegative: beta < 0 makes it negative
        Activation("hardtanh", None),
        # Hand-written only: no torch function of that name, recognised as modules.
        Activation("quick_gelu", None, torch_function=False),
        Activation("hard_mish", None, torch_function=False),
        Activation("relu_squared", None, nonnegative=True, zero_when_dead=True, torch_function=False),
        # xIELU (transformers' XIELUActivation, the Apertus models' FFN): x > 0 gives a quadratic,
        # x <= 0 an ELU-like branch, both with learned scalar coefficients.
        Activation("xielu", None, torch_function=False),
    )
}

#: Well-known hand-written activation classes (by class name) and the function each computes.
#: transformers.activations, BLOOM, timm.layers.activations(_me), CLIP / open_clip, x-transformers.
KNOWN_MODULE_NAMES: dict[str, str] = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu",
    "FastGELUActivation": "gelu",
    "AccurateGELUActivation": "gelu",
    "ClippedGELUActivation": "gelu",
    "PytorchGELUTanh": "gelu",
    "GELUTanh": "gelu",
    "BloomGelu": "gelu",
    "GeLU": "gelu",
    "QuickGELUActivation": "quick_gelu",
    "QuickGELU": "quick_gelu",
    "SiLUActivation": "silu",
    "Swish": "silu",
    "SwishMe": "silu",
    "MishActivation": "mish",
    "MishMe": "mish",
    "HardSwish": "hardswish",
    "HardSwishMe": "hardswish",
    "HardMish": "hard_mish",
    "HardMishMe": "hard_mish",
    "ReLUSquaredActivation": "relu_squared",
    "ReluSquared": "relu_squared",
    "SquaredReLU": "relu_squared",
    "XIELUActivation": "xielu",
}

#: Activation functions captured as functional calls (base names; in-place ``name_`` variants included).
ACTIVATION_FUNCTIONS = frozenset(a.function for a in ACTIVATIONS.values() if a.torch_function)

#: Functions that are a ReLU (or ReLU6) for some arguments only, base names: ``clamp(min=0)``
#: (PyTorch's own tutorials write ReLU so), ``clip``, ``clamp_min(0)``, ``threshold(0, 0)``
#: (Torch7 ports). They are classified with the activations; :func:`called_activation` reads
#: each call's arguments, so ``std.clamp(min=1e-8)`` is no site.
RELU_SPELLINGS = frozenset({"clamp", "clip", "clamp_min", "threshold"})

#: Activation module classes of torch.nn (their forward calls one of ACTIVATION_FUNCTIONS).
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(a.module for a in ACTIVATIONS.values() if a.module)

#: Functions whose output is never negative: ``|h| = h`` (grows with :func:`register_activation`).
NONNEGATIVE_FUNCTIONS: set[str] = {a.function for a in ACTIVATIONS.values() if a.nonnegative}

#: Functions whose output is exactly zero for a unit that never fires (at firing threshold <= 0).
ZERO_WHEN_DEAD_FUNCTIONS: set[str] = {a.function for a in ACTIVATIONS.values() if a.zero_when_dead}

#: Activation module class name -> function name (TorchScript and exported programs keep only names).
MODULE_FUNCTIONS: dict[str, str] = {a.module.__name__: a.function for a in ACTIVATIONS.values() if a.module}

_BY_CLASS: dict[type[nn.Module], str] = {a.module: a.function for a in ACTIVATIONS.values() if a.module}
_REGISTERED: dict[type, str] = {}  # user classes (register_activation)
_REGISTERED_NAMES: dict[str, str] = {}  # user class names, "pkg.mod.Class" or "Class"


# torch functions whose __name__ is not the name torch documents them by
_ALIASES = {"_threshold": "threshold"}  # F.threshold


def base_name(name: str) -> str:
    """A torch function's name as the activation table keys it: in-place ``relu_`` is ``relu``,
    ``F.threshold`` (named ``_threshold``) is ``threshold``.

    >>> base_name("relu_"), base_name("_threshold"), base_name("__matmul__")
    ('relu', 'threshold', '__matmul__')
    """
    name = _ALIASES.get(name, name)
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _is_zero(v: object) -> bool:
    """A Python number equal to 0 (a tensor bound is not read: that would sync a GPU)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _is_six(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 6


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: object) -> object:
    return args[index] if len(args) > index else kwargs.get(name, default)


def called_activation(name: str, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """The activation a call of torch function ``name`` (a base name, as :data:`ACTIVATION_FUNCTIONS`
    and :data:`RELU_SPELLINGS` hold them) computes with these arguments: ``name`` itself for a plain
    activation, ``relu``/``relu6`` for a call spelled otherwise, None for a spelling that is none.

    Arguments are read as torch takes them, positionally or by keyword; the input (``args[0]``) is
    not looked at, so a graph node may stand for it. Bounds must be plain numbers.

    >>> called_activation("clamp", (None,), {"min": 0}), called_activation("clamp", (None, 0, 6))
    ('relu', 'relu6')
    >>> called_activation("clamp", (None,), {"min": 1e-8}), called_activation("threshold", (None, 0.0, 0.0))
    (None, 'relu')
    >>> called_activation("hardtanh", (None, 0.0, 6.0)), called_activation("gelu", (None,))
    ('relu6', 'gelu')
    """
    kwargs = kwargs or {}
    if name == "hardtanh":  # nn.ReLU6 and F.relu6 in TorchScript are hardtanh(0, 6)
        low, high = _argument(args, kwargs, 1, "min_val", -1.0), _argument(args, kwargs, 2, "max_val", 1.0)
        return "relu6" if _is_zero(low) and _is_six(high) else name
    if name not in RELU_SPELLINGS:
        return name
    if name in ("clamp", "clip"):
        low, high = _argument(args, kwargs, 1, "min", None), _argument(args, kwargs, 2, "max", None)
        if not _is_zero(low):
            return None
        return "relu" if high is None else "relu6" if _is_six(high) else None
    if name == "clamp_min":
        return "relu" if _is_zero(_argument(args, kwargs, 1, "min", None)) else None
    # threshold(x, t, v): x where x > t, else v
    t, v = _argument(args, kwargs, 1, "threshold", None), _argument(args, kwargs, 2, "value", None)
    return "relu" if _is_zero(t) and _is_zero(v) else None


def register_activation(
    cls: type[nn.Module] | str,
    function: str | None = None,
    *,
    nonnegative: bool = False,
    zero_when_dead: bool = False,
) -> None:
    """Make a module class of your own an activation site: its output is one site, and activation
    calls made inside it are not separate sites.

    Args:
        cls: the class, or its name (``"Class"`` or ``"package.module.Class"``) when you would
            rather not import it.
        function: the activation's name in reports (default: the class name in lower case).
        nonnegative: the output is never negative (saves the ``|h|`` pass).
        zero_when_dead: a unit that never fires outputs exactly 0 (lets prune drop it outright).

    Raises:
        TypeError: for something that is neither an ``nn.Module`` subclass nor a string.

    Example:
        >>> import torch, deadrelu
        >>> class Squash(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp(min=0) ** 2
        >>> deadrelu.register_activation(Squash, "squash", nonnegative=True, zero_when_dead=True)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), Squash())
        >>> deadrelu.scan(net, torch.randn(16, 3)).sites[0].function
        'squash'
    """
    if isinstance(cls, str):
        name = function or cls.rsplit(".", 1)[-1].lower()
        _REGISTERED_NAMES[cls] = name
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        name = function or cls.__name__.lower()
        _REGISTERED[cls] = name
    else:
        raise TypeError(f"register_activation takes an nn.Module subclass or a class name, not {cls!r}")
    if nonnegative:
        NONNEGATIVE_FUNCTIONS.add(name)
    if zero_when_dead:
        ZERO_WHEN_DEAD_FUNCTIONS.add(name)


def function_of_module(module: nn.Module) -> str | None:
    """The activation function a module instance stands for, or None.

    Exact torch.nn class first, then registered classes and names, then torch.nn subclasses, then
    the known hand-written class names (:data:`KNOWN_MODULE_NAMES`) along the class's MRO.
    """
    cls = type(module)
    name = _BY_CLASS.get(cls) or _REGISTERED.get(cls)
    if name is not None:
        return name
    for klass in cls.__mro__:
        if klass in _REGISTERED:
            return _REGISTERED[klass]
        for key in (f"{klass.__module__}.{klass.__qualname__}", f"{klass.__module__}.{klass.__name__}", klass.__name__):
            name = _REGISTERED_NAMES.get(key)
            if name is not None:
                return name
    for base, fn in _BY_CLASS.items():
        if isinstance(module, base):
            return fn
    if isinstance(module, nn.Threshold) and _is_zero(module.threshold) and _is_zero(module.value):
        return "relu"  # nn.Threshold(0, 0), as Torch7 ports write ReLU
    for klass in cls.__mro__:
        name = KNOWN_MODULE_NAMES.get(klass.__name__)
        if name is not None:
            return name
    return None


_NORM_LIKE = re.compile(r"(?i)norm")  # ActNorm (Glow) is a normalisation, not an activation
_ACTIVATION_LIKE = re.compile(r"(?i)(gelu|relu|elu$|silu|swish|mish|softplus|squash|snake|activation|^act|act$)")


def looks_like_activation(module: nn.Module) -> bool:
    """A module that is probably an activation nobody told deadrelu about: not a known activation,
    not torch's own, a leaf with at most per-channel parameters (learned slopes), with an
    activation-like class name.

    >>> import torch
    >>> class MyAct(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(x)
    >>> looks_like_activation(MyAct()), looks_like_activation(torch.nn.Tanh())
    (True, False)
    """
    cls = type(module)
    if cls.__module__.startswith("torch.") or function_of_module(module) is not None:
        return False
    if next(iter(module.children()), None) is not None or _NORM_LIKE.search(cls.__name__):
        return False
    # Learned slopes or coefficients (a scalar, one per channel) leave it an activation; a weight
    # matrix makes it a layer.
    if any(sum(size > 1 for size in p.shape) > 1 for p in module.parameters()):
        return False
    return bool(_ACTIVATION_LIKE.search(cls.__name__))


# torch.nn leaf modules whose forward never calls an activation function: no site can occur
# inside them, so the capture need not hook them (two Python hooks per call are a measurable
# share of a small layer's cost on CPU). Exact classes only: a subclass may override forward.
_PLAIN_LEAF_NAMES = (
    "Linear", "Bilinear", "Identity", "Flatten", "Unflatten",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "GroupNorm", "RMSNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    "Embedding", "EmbeddingBag",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "Upsample", "PixelShuffle", "PixelUnshuffle", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d",
    "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
)  # fmt: skip
_PLAIN_LEAVES = frozenset(getattr(nn, name) for name in _PLAIN_LEAF_NAMES if hasattr(nn, name))


def calls_no_activation(module: nn.Module) -> bool:
    """True for a torch.nn leaf (Linear, Conv2d, LayerNorm, Dropout, …) that can hold no activation
    site: its exact class is torch's own, it has no children and no forward of its own set on it.

    >>> calls_no_activation(nn.Linear(2, 2)), calls_no_activation(nn.ReLU()), calls_no_activation(nn.Sequential())
    (True, False, False)
    """
    return (
        type(module) in _PLAIN_LEAVES
        and "forward" not in module.__dict__
        and next(iter(module.children()), None) is None
        and function_of_module(module) is None
    )
