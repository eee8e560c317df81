"""Find every activation call in a forward pass and feed its output to per-site accumulators.

How sites are found
-------------------
A ``TorchFunctionMode`` is active only while the model's forward runs, and only in the
thread that runs it. It sees every torch call made by any module's ``forward`` —
``F.relu``, ``torch.relu``, ``Tensor.relu_`` — so functional activations need no listing.
Activation *modules* (torch.nn's, the well-known hand-written ones of transformers and timm,
and any registered with :func:`deadrelu.register_activation`; see
:mod:`deadrelu.core.activations`) are one site each, read from the module's output, and the
activation calls inside them (a ``tanh`` inside a GELU approximation) are not separate sites.
Forward pre/post hooks on every submodule keep a stack of which module is running, so each
call is attributed to the innermost module that made it.

A *site* is ``(module path, module call, call position in the source, function)``. The call
position is the chain of Python frames (code object and bytecode offset) from the activation
call up to the module's ``forward``, plus a counter for a position reached several times (a
loop), so a call that runs only for some batches (``if x.shape[0] > 4: h = F.relu(h)``) never
shifts another site, and has its own observation count. Module calls are numbered the same way:
by the place they are made from (the calling module's call and the frames from there), in
first-seen order, so a module called three times (``self.relu`` in a ResNet bottleneck) gives
three sites, each with its own width, and a call made only for some batches keeps its own. Outputs are read right after the call returns, so in-place
activations are counted on their true output. On CUDA a ReLU call (``F.relu``, ``torch.relu``,
``x.relu_()``, a plain ``nn.ReLU`` after its first call) is instead run by the site's
accumulator as one kernel that writes the ReLU and counts it (:mod:`deadrelu.core.fused`):
the same output, the same sums, one read fewer.

TorchScript modules accept no Python hooks; :func:`deadrelu.scan` observes them with
a ``TorchDispatchMode`` instead (sites named by their order in the root forward).

Unit axis: the data decides
---------------------------
A unit is the feature axis as the nearest weight layer upstream produced it. While the forward
runs, every tensor it produces carries (by identity, in a per-forward table of weak references)
the dimension that holds that feature axis and the rule that decided it:

* ``producer:Linear`` / ``producer:matmul`` / ``producer:embedding`` / ``producer:RNN``: the last
  dimension of a linear layer's, matmul's, embedding's or recurrent layer's output;
* ``producer:matmul`` of a weight (an ``nn.Parameter``, frozen or not, or a leaf that requires
  grad) multiplied from the left (``W @ x``, ``addmm(b, W, x)``): dimension -2; of an
  ``einsum`` with one weight operand: the output dimension the equation gives the weight's last
  index that survives (``"oc,btc->bot"``: dimension 1);
* ``producer:conv``: dimension 1 (channels) of a convolution's output (0 when unbatched);
* ``producer:norm``: a normalisation layer applied to a tensor with no producer (dim 1 for
  batch/instance/group norm, the last for layer/RMS norm);
* elementwise ops, norms, pooling, slicing, basic indexing (ints, slices, ``None``, ``...``) and
  reductions over other dimensions keep the axis (the index and the ``dim=`` say where it went);
  ``transpose``/``permute``/``movedim``/``.T``/``.mT`` move it; ``view``/``reshape``/``flatten``/
  ``unflatten``/``squeeze``/``unsqueeze`` keep it when the feature block survives the reshape.

Only when nothing upstream decided (the model's raw input, or an op that merged the feature
axis away) does the rank rule apply, and the site says so (``unit_axis_source == "rank rule"``):
the last dimension for 0-D to 3-D outputs, dimension 1 for 4-D and larger. ``unit_dim=`` (an
int for all sites, a mapping from module path or site name to a dim, or a callable) overrides
both (``"unit_dim override"``).

Observation masks
-----------------
``mask`` is a bool tensor ``(B, T)`` (True = a real token). An activation whose leading
dimensions are ``(B, T)`` (or ``(T, B)`` when B != T) and whose unit axis lies after them is
counted at the unmasked positions only.

torch.func transforms
---------------------
An activation inside ``torch.func.grad``/``vmap`` (an energy model's forces, per-sample calls) is
counted on the plain values under the transform's wrapper; a vmapped dimension is more
observations of the same units, like a batch — so the members of a vmapped ensemble
(``vmap(functional_call)`` over stacked parameters) are counted together, as one site.

Threads and copies
------------------
Only the thread that runs the root forward acts on the hooks while that forward runs; a forward
of the same model in another thread meanwhile is not observed (and cannot disturb the first).
``nn.DataParallel`` replicas raise a clear :class:`~deadrelu.DeadReluError`. The hooks are
:func:`copy_safe_hook` objects: ``copy.deepcopy`` or pickling a model turns them into inert
hooks that remove themselves on the copy's first call, so a copy never feeds this capture.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import numbers
import operator
import re
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import DeadReluError
from .activations import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_MODULES,
    NONNEGATIVE_FUNCTIONS,
    RELU_SPELLINGS,
    called_activation,
    calls_no_activation,
    function_of_module,
    looks_like_activation,
)
from .hooks import copy_safe_hook, is_deadrelu_hook, only_deadrelu_forward_hooks, remove_inert_hooks
from .kernels import functorch_wrapped
from .inputs import (
    aligned_mask,
    apply_mask,
    call_samples,
    decoder_mask_of_call,
    in_decoder,
    iter_tensors,
    mask_from_call,
    mask_layout,
    mask_position,
)
from .unit_axis import ACT, GENERIC, PRODUCER, AxisTable, WeightSlice, function_kind, kind_of
from .stats import fused_on_cpu, release_scratch, UnitStats

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "ActivationCapture",
    "SiteInfo",
    "compiled_blocks",
    "eager_modules",
    "eager_stance",
    "eager_submodule",
    "next_site_order",
    "is_compiled_wrapper",
    "UnitDimSpec",
    "ThresholdSpec",
    "copy_safe_hook",
    "is_deadrelu_hook",
    "remove_inert_hooks",
    "apply_mask",
    "display_names",
    "dynamo_module_path",
    "resolve_unit_dim",
    "choose_unit_dim",
    "resolve_threshold",
    "checked_threshold",
    "same_function_ordinal",
]


@dataclass
class SiteInfo:
    """What is known about a site when it is first seen; passed to ``unit_dim``/``threshold`` callables.

    ``unit_axis_source`` says which rule chose the unit axis (see the module docstring);
    ``location`` is the source line of the call (``file.py:42``), empty for module sites;
    ``position`` identifies the call position (the frames from the call up to the module's
    forward, as ``file:first line:qualname:offset``, empty for module sites) and ``occurrence``
    how many times that position was reached before in the same module call — both the same in
    every process that runs the same code, so ranks agree on a site's identity. ``ordinal`` counts
    the sites of the same function in the same module call in first-seen order (1 for the first):
    the ``.k`` of a site name, so ``threshold``/``unit_dim`` mappings can use display names.
    """

    module: str
    module_type: str
    call: int
    slot: int
    function: str
    shape: tuple[int, ...]
    leaf: bool
    unit_axis_source: str = "rank rule"
    location: str = ""
    position: str = ""
    occurrence: int = 0
    ordinal: int = 1


def same_function_ordinal(
    infos: Iterable[SiteInfo], module: str, call: int, function: str, new: SiteInfo | None = None
) -> int:
    """The ``ordinal`` of a new site ``new``: 1 + the other call positions already seen of that
    function in that module call, so the experts of one call position (see :func:`expert_of`)
    share theirs."""
    place = lambda i: (i.position, _call_occurrence(i))  # noqa: E731
    mine = place(new) if new is not None else None
    return 1 + len({
        place(i) for i in infos
        if i.module == module and i.call == call and i.function == function and place(i) != mine
    })  # fmt: skip


def expert_of(info: SiteInfo) -> int | None:
    """The expert a site counts, for an activation of one expert of a stacked-weight experts layer
    (its ``occurrence`` is ``-1 - expert``), else None."""
    return -1 - info.occurrence if info.occurrence < 0 else None


def _call_occurrence(info: SiteInfo) -> Any:
    """The occurrence that tells call positions apart: every expert of one position is one."""
    return "experts" if info.occurrence < 0 else info.occurrence


UnitDimSpec = Union[None, int, Mapping[str, int], Callable[[SiteInfo], Union[int, None]]]
ThresholdSpec = Union[float, Mapping[str, float], Callable[[SiteInfo], Union[float, None]]]


@dataclass
class _Site:
    """Runtime state of one site: its identity, unit axis and accumulator."""

    info: SiteInfo
    unit_dim: int
    stats: Any  # UnitStats or any object with update(tensor, unit_dim, nonnegative)
    order: int  # first-seen position, for forward-execution order
    nonnegative: bool = False  # |h| = h for this activation
    takes_mask: bool = False  # its update() accepts mask=
    layout: str | None = None  # how a (B, T) mask lay over it when B != T: read a square one the same way


@dataclass
class _Frame:
    path: str
    call: int
    slots: int = 0
    counted: bool = False  # its output was counted by a fused kernel already
    entry: Any = None  # the Python frame of its Module._call_impl (where its callees' positions end)
    scope: bool = False  # the root of a forward_scope() block: no module call, just the caller's code
    until: Any = None  # a scope's boundary (a Python frame or code object): its root-level calls' positions end there
    # an activation module of an experts layer: the WeightSlice its input came from (one expert's slice,
    # or every expert's rows of a grouped or batched matmul) and each expert's call number
    experts: tuple[WeightSlice, tuple[int, ...]] | None = None


@dataclass
class _Forward:
    """Per-forward-pass bookkeeping (reset at each root call)."""

    calls: dict[str, int] = field(default_factory=dict)
    stack: list[_Frame] = field(default_factory=list)
    axes: AxisTable = field(default_factory=AxisTable)  # each tensor's feature axis and the rule that chose it
    seen: dict[Any, int] = field(default_factory=dict)  # call position -> times reached in this forward
    module_seen: dict[Any, int] = field(default_factory=dict)  # the same for module calls
    inside_activation: int = 0  # depth of activation modules: their inner calls are not sites
    mask: torch.Tensor | None = None
    mask_given: bool = False  # the mask came from a mask= option, not from the call's attention_mask
    masks: dict[tuple[torch.device, bool], torch.Tensor] = field(default_factory=dict)
    decoder_split: bool = False  # an encoder-decoder call: decoder sites take decoder_mask
    decoder_mask: torch.Tensor | None = None
    # In a call with inputs of other shapes than its mask's (B, T) (CLIP's pixel_values beside its
    # input_ids): which tensors come from the token inputs (True) and which from the others only
    # (False), by identity: the mask never lies over the latter, even where the lengths agree.
    sources: dict[int, tuple[Any, bool]] | None = None
    # per mask (the call's, the decoder's): whether it lay over some activation of this pass
    # (absent: no activation counted with it yet), and the shape of one it did not fit, for the
    # message when it fits none — each mask apart, as one that fits hides no other that does not
    mask_fit: dict[bool, bool] = field(default_factory=dict)
    unfit_shape: dict[bool, tuple[int, ...]] = field(default_factory=dict)


class _FunctionSpy(TorchFunctionMode):
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
_INPLACE_RELUS = frozenset({torch.relu_, torch.Tensor.relu_, F.relu_})
_RELUS = frozenset({F.relu, torch.relu, torch.Tensor.relu}) | _INPLACE_RELUS


class _DispatchSpy(TorchDispatchMode):
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


def _input_sources(args: tuple, kwargs: Mapping[str, Any], mask: torch.Tensor) -> dict[int, tuple[Any, bool]] | None:
    """The call's input tensors as sources (see ``_Forward.sources``): True for one laid out like
    the mask (``input_ids`` (B, T), ``inputs_embeds`` (B, T, C)), False for a float input of 3 or
    more dims laid out otherwise (``pixel_values``); None, so nothing is tracked, where the call
    lacks either kind."""
    lead = tuple(mask.shape)
    sources: dict[int, tuple[Any, bool]] = {}
    for t in iter_tensors((args, dict(kwargs))):
        if t is mask or t.ndim < len(lead):
            continue
        token = tuple(t.shape[: len(lead)]) == lead
        # another input is a float tensor of 3+ dims (images, audio features); position ids and the
        # like are neither, so a text tower's tensors never become another input's alone
        if token or (t.is_floating_point() and t.ndim >= 3):
            sources[id(t)] = (weakref.ref(t), token)
    kinds = {token for _, token in sources.values()}
    return sources if kinds == {True, False} else None  # a mask-shaped input and another


def _carry_source(sources: dict[int, tuple[Any, bool]], args: tuple, kwargs: dict | None, out: Any) -> None:
    """Mark an op's outputs: from the token inputs if any argument is, else from the other inputs if any is."""
    token = other = False
    for group in (args, (kwargs or {}).values()):
        for a in group:
            for t in a if type(a) in (list, tuple) else (a,):
                if not isinstance(t, torch.Tensor):
                    continue
                entry = sources.get(id(t))
                if entry is not None and entry[0]() is t:
                    token, other = token or entry[1], other or not entry[1]
    if not (token or other):
        return
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(o, torch.Tensor):
            sources[id(o)] = (weakref.ref(o), token)


def _from_other_inputs(sources: dict[int, tuple[Any, bool]], t: torch.Tensor) -> bool:
    """Whether ``t`` was computed from the call's other inputs only (an image tower's activations)."""
    entry = sources.get(id(t))
    return entry is not None and entry[0]() is t and not entry[1]


def _expert_rows(out: torch.Tensor, origin: WeightSlice) -> list[tuple[int, torch.Tensor]]:
    """``(e, rows)`` for each expert ``e`` with rows in an experts layer's output: a grouped
    matmul's rows ``offsets[e-1]:offsets[e]`` (views, no copy), or a batched matmul's rows whose
    gathered expert is ``e`` (one sorted copy of ``out``). Reads the offsets (counts) on the host:
    one sync per experts layer on an accelerator."""
    if origin.rows is not None:
        ids = origin.rows.to(out.device)
        if ids.shape[0] != out.shape[0]:
            return [(-1, out)]  # not one expert per row after all: counted whole, on the pooled site
        order = ids.argsort(stable=True)
        ends = torch.bincount(ids, minlength=origin.slices).cumsum(0).tolist()
        out = out[order]
    else:
        ends = origin.offsets.tolist()
    start, out_rows = 0, []
    for e, end in enumerate(min(int(end), out.shape[0]) for end in ends):
        if end > start:
            out_rows.append((e, out[start:end]))
        start = max(start, end)
    return out_rows


def _rank_rule(ndim: int) -> int:
    if ndim <= 3:
        return max(ndim - 1, 0)
    return 1


# Frames of torch's own wrappers between a functional call and the code that made it.
_WRAPPER_FILES = frozenset(
    f for f in (getattr(m, "__file__", None) for m in (torch.overrides, F, torch._tensor, torch.functional)) if f
)
_MODULE_FILE = nn.modules.module.__file__
_THIS_FILE = __file__
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
        if filename not in _WRAPPER_FILES and filename != _THIS_FILE:
            out.append((code, f.f_lasti))
        if until is not None and (f is until or code is until):
            return tuple(out)
        f = f.f_back
    return tuple(out[:_MAX_FRAMES]) if stop is None else tuple(out)


def _call_position(depth: int, stop: Any = None, until: Any = None) -> tuple[Any, ...]:
    """The chain of (code, bytecode offset) from an activation call up to the module's call
    (its ``_call_impl`` frame ``stop``: hooks and unhooked module calls in between count too).

    ``depth`` counts the frames from here up to ``__torch_function__``'s caller; both routes in
    (``_on_activation`` and ``_counted_relu``) start there, so a call has one position either way.
    """
    return _frames_up_to(sys._getframe(depth), stop, until)


def _module_call_entry() -> Any:
    """The ``Module._call_impl`` frame of the module call whose pre-hook is running (the frames
    below it are the hook's own and deadrelu's wrappers)."""
    f = sys._getframe(2)  # the pre-hook's caller: Module._call_impl, or a hook wrapper below it
    while f is not None and f.f_code.co_filename != _MODULE_FILE:
        f = f.f_back
    return f


def _module_call_position(entry: Any, stop: Any) -> tuple[Any, ...]:
    """The chain of (code, bytecode offset) from a module call (its ``_call_impl`` frame
    ``entry``) up to the calling module's call (its ``_call_impl`` frame ``stop``): the caller's
    forward and every helper, hook or unhooked module call in between."""
    f = entry
    while f is not None and f.f_code.co_filename == _MODULE_FILE and f is not stop:
        f = f.f_back  # this call's _call_impl and _wrapped_call_impl
    return _frames_up_to(f, stop) if f is not None else ()


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


_SITE_ORDER = itertools.count()


def next_site_order() -> int:
    """A process-wide increasing number for a new site: captures that observe parts of one model
    (eager code beside compiled blocks) merge their sites in the order they were first seen."""
    return next(_SITE_ORDER)


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


class ActivationCapture:
    """Attach to a model and accumulate per-unit statistics at every activation site.

    This is the engine behind :func:`deadrelu.scan`, :class:`deadrelu.Probe` and the
    monitor. Hooks are registered by :meth:`attach` and always removed by
    :meth:`detach` (safe to call twice); no module's ``forward`` is replaced.

    Args:
        model: the model to observe.
        unit_dim: unit-axis override (see the module docstring).
        threshold: firing threshold; a float, a mapping from function name / module
            path / site name to float, or a callable returning a float (None = 0).
        stats_factory: builds an accumulator for a new site from ``(units, threshold,
            device)``; defaults to :class:`~deadrelu.core.stats.UnitStats`.
        mask: observation mask taken from each root call (see :func:`deadrelu.core.inputs.resolve_mask`):
            None = the call's ``attention_mask`` keyword if any, False = none, a tensor, a
            keyword name, or a callable on the call's batch. ``batch_mask`` set by the caller
            (``scan`` does, per batch) takes precedence.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        unit_dim: UnitDimSpec = None,
        threshold: ThresholdSpec = 0.0,
        stats_factory: Callable[[int, float, torch.device], Any] | None = None,
        mask: Any = None,
        beside_compiled_blocks: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise DeadReluError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.unit_dim_spec = checked_unit_dim(unit_dim)
        self.threshold_spec = checked_threshold(threshold)
        self.stats_factory = stats_factory or (lambda units, thr, device: UnitStats(units, thr, device))
        self.mask_spec = mask
        self._mask_position = mask_position(model.forward)  # attention_mask passed positionally
        # nn.MultiheadAttention / nn.Transformer*Layer with batch_first=False: a square mask is ambiguous
        self._sequence_first = any(getattr(m, "batch_first", None) is False for m in model.modules())
        self._warned_square = False
        self.batch_mask: torch.Tensor | None = None
        self.batch_mask_given = True  # the caller's batch_mask comes from its own mask= option
        self._warned_unfit: set[bool] = set()  # the masks (decoder's or not) already warned of
        self._script_calls: tuple[tuple[str, int], ...] | None = None  # calls per function in a scripted pass
        self._warned_script = False
        self.scripted = isinstance(model, torch.jit.ScriptModule)
        self.sites: dict[tuple[Any, ...], _Site] = {}
        # module path -> {place it is called from: its call number} (see _module_call); kept
        # through reset() so that a call keeps its number, and its site's key, for good
        self._call_numbers: dict[str, dict[Any, int]] = {}
        self.forwards = 0
        self.samples = 0  # rows of the observed root calls' first tensor input (what a Probe reports)
        self.last_site: str | None = None
        self.uncaptured: dict[str, str] = {}  # activation-like modules that made no site: path -> class
        named = eager_modules(model)
        self._leaf = {p: next(iter(m.children()), None) is None for p, m in named}
        self._types = {p: type(m).__name__ for p, m in named}
        if is_compiled_wrapper(model):  # a compiled root is named after the module it compiles
            self._types[""] = type(model._orig_mod).__name__
        self._act_modules = {p: fn for p, m in named if (fn := function_of_module(m)) is not None}
        # Modules whose forward is exactly one F.relu of their input: a fused kernel may count it.
        self._plain_relus = {p: m for p, m in named if type(m) is nn.ReLU and "forward" not in vars(m)}
        self._fuse_on_cpu: bool | None = None  # asked on the first CPU ReLU (it may build the CPU kernel)
        self._lookalikes = {p for p, m in named if looks_like_activation(m)}
        self._buffer_ids = {id(b) for b in model.buffers()}
        self._graph_sites = _exported_activation_modules(model)
        self._handles: list[Any] = []
        self._fwd = _Forward()
        self._depth = 0
        self._owner: int | None = None  # thread running the current root forward
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._mode: TorchFunctionMode | TorchDispatchMode | None = None
        # Compiled blocks either run eagerly on observed passes (the default), or stay compiled and
        # are left to a graph capture: no hooks inside them, the function mode suspended while one runs.
        self._beside_blocks = bool(beside_compiled_blocks)
        self._inside_blocks = set()
        blocks = compiled_blocks(model)
        if self._beside_blocks:
            # A block without parameters gives the graph capture no parameter to tell which block
            # ran: it is observed here instead, run eagerly (see _suspend).
            graphed = [p for p, m in blocks.items() if next(m.parameters(), None) is not None]
            self._inside_blocks = {p for p, _ in named if any(p == b or p.startswith(b + ".") for b in graphed)}
        self._has_compiled_blocks = not self._beside_blocks and (is_compiled_wrapper(model) or bool(blocks))
        self._suspended: list[Any] = []
        # Called with the arguments of the first module called inside a forward_scope() block (the
        # monitor counts that pass's samples from them); cleared once called.
        self.on_scope_call: Callable[[Any], None] | None = None
        # Called with (args, kwargs) of each root forward this capture claims: with forwards from
        # several threads only one is observed at a time, and the monitor counts that one's samples.
        self.on_forward: Callable[[tuple[Any, ...], Mapping[str, Any]], None] | None = None
        self.op_error: Exception | None = None  # the last op that raised under the dispatch spy (TorchScript)
        self.own_error: DeadReluError | None = None  # deadrelu's error raised inside that op (TorchScript)
        self._stance: contextlib.AbstractContextManager[Any] | None = None

    @property
    def current_mask(self) -> torch.Tensor | None:
        """The observation mask of the forward pass being observed (None: every position counts)."""
        return self._fwd.mask

    @property
    def current_decoder_mask(self) -> tuple[torch.Tensor | None, bool]:
        """``(decoder mask, split)`` of the forward pass being observed: in an encoder-decoder call
        (``split``) the ``decoder_attention_mask`` that its decoder sites take instead (None: every position)."""
        return self._fwd.decoder_mask, self._fwd.decoder_split

    @property
    def enabled(self) -> bool:
        """Whether forward passes started by the current thread are observed (default True)."""
        return getattr(self._tls, "enabled", True)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._tls.enabled = bool(value)

    # -- lifecycle ---------------------------------------------------------------------
    def attach(self) -> "ActivationCapture":
        """Register the hooks (no-op when already attached).

        Raises:
            DeadReluError: for TorchScript modules, which accept no hooks (use ``scan``).
        """
        if self._handles:
            return self
        if self.scripted:
            raise DeadReluError(
                "TorchScript modules accept no Python hooks: use deadrelu.scan(model, data), which "
                "observes them through a dispatch mode"
            )
        try:
            for path, module in eager_modules(self.model):
                is_root = module is self.model
                if not is_root and (calls_no_activation(module) or path in self._inside_blocks):
                    continue  # no site can occur inside it (or a graph capture sees them): no hooks
                pre = copy_safe_hook(self._make_pre_hook(path, module))
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                post = copy_safe_hook(self._make_post_hook(path, module))
                self._handles.append(module.register_forward_hook(post, always_call=True))
            if self._beside_blocks:
                for module in self.model.modules():
                    if module is not self.model and is_compiled_wrapper(module):
                        self._handles.append(module.register_forward_pre_hook(copy_safe_hook(self._suspend)))
                        self._handles.append(module.register_forward_hook(copy_safe_hook(self._resume), always_call=True))
        except BaseException:
            self.detach()
            raise
        return self

    def _suspend(self, module: nn.Module, args: Any) -> None:
        """A compiled block starts: leave the function mode, so Dynamo runs it as without deadrelu
        — or, for a block this capture observes itself (no parameters), run it eagerly."""
        mode = self._mode if self._owner == threading.get_ident() else None
        if mode is not None and next(module.parameters(), None) is None:
            stance = eager_stance()
            stance.__enter__()
            self._suspended.append(stance)
            return
        self._suspended.append(mode)
        if mode is not None:
            mode.__exit__(None, None, None)

    def _resume(self, module: nn.Module, args: Any, output: Any) -> None:
        held = self._suspended.pop() if self._suspended else None
        if isinstance(held, TorchFunctionMode):
            if held is self._mode:
                held.__enter__()
                self._carry_axis_through(args, output)
        elif held is not None:
            held.__exit__(None, None, None)  # the eager stance of a parameter-free block

    def _carry_axis_through(self, args: Any, output: Any) -> None:
        """The compiled block ran unseen: give its output its input's feature axis when the
        shapes agree (a residual block's hidden states), as the block's own ops would have carried
        it in eager mode; an output of another shape is left to the rank rule."""
        first = args[0] if isinstance(args, tuple) and args else None
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(first, torch.Tensor) and isinstance(out, torch.Tensor) and out.shape == first.shape:
            entry = self._axis(first)
            if entry is not None:
                self._fwd.axes.set(out, entry[1], entry[2])

    def detach(self) -> None:
        """Remove every hook and leave any active mode; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._owner in (None, threading.get_ident()):
            self._exit_mode()  # a mode is thread-local: only its own thread can leave it
        self._mode = None
        self._depth = 0
        self._owner = None
        release_scratch()

    def __enter__(self) -> "ActivationCapture":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    # -- forward-pass bookkeeping ---------------------------------------------------------
    def _begin_forward(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None) -> None:
        self._fwd = _Forward()
        self.op_error = self.own_error = None
        self.forwards += 1
        self.samples += call_samples(args, kwargs)
        if self.on_forward is not None:
            self.on_forward(args, kwargs or {})
        self.last_site = None
        mask, given = self.batch_mask, self.batch_mask_given
        if mask is None and self.mask_spec is not False:
            mask = mask_from_call(self.mask_spec, args, kwargs or {}, self._mask_position)
            given = self.mask_spec is not None
        self._fwd.mask = mask
        self._fwd.mask_given = given
        # The call's own attention_mask is the encoder's in a seq2seq model; its decoder sites take the
        # decoder_attention_mask, which a call may pass alone (Whisper, T5 without an encoder mask).
        if not given:
            self._fwd.decoder_split, self._fwd.decoder_mask = decoder_mask_of_call(self.model, args, kwargs or {})
        if mask is not None:
            self._fwd.sources = _input_sources(args, kwargs or {}, mask)

    def _end_forward(self) -> None:
        """A mask that lay over no activation of the pass counted every position, padding included:
        an error for a ``mask=`` option (its shape is wrong for this batch), a warning, once, for
        the call's own ``attention_mask`` (the model's activations are not laid out ``(B, T, ...)``)."""
        fwd = self._fwd
        if self.scripted:
            self._note_script_calls()
        for decoder, fits in fwd.mask_fit.items():
            if fits:
                continue
            mask = fwd.decoder_mask if decoder else fwd.mask
            name = "decoder_attention_mask" if decoder else "observation mask"
            what = (
                f"the {name} of shape {tuple(mask.shape)} fits no activation of this forward pass "
                f"(an activation's leading dimensions must be (B, T) or (T, B); e.g. {fwd.unfit_shape[decoder]})"
            )
            if fwd.mask_given:
                raise DeadReluError(f"{what}: give a mask of each batch's (B, T) shape, or mask=False to count every position")
            if decoder not in self._warned_unfit:
                self._warned_unfit.add(decoder)
                warnings.warn(
                    f"deadrelu: {what}, so every position was counted, padding included; pass mask= in the "
                    "activations' layout, or mask=False to silence this",
                    stacklevel=4,
                )

    def _note_script_calls(self) -> None:
        """A TorchScript model's sites are its k-th call of each function in the pass: a pass that
        makes a different number of calls of a function (a scripted branch) may have shifted them
        onto each other's sites — said once, as nothing else can tell."""
        calls = tuple(sorted((where[3], n) for where, n in self._fwd.seen.items()))
        if self._script_calls is None:
            self._script_calls = calls
        elif calls != self._script_calls and not self._warned_script:
            self._warned_script = True
            counts = lambda c: ", ".join(f"{n} {name}" for name, n in c)  # noqa: E731
            warnings.warn(
                f"deadrelu: this TorchScript model made {counts(calls)} call(s) in one pass and {counts(self._script_calls)} "
                "in another: scripted sites are numbered by call order, so a branch that skips a call moves the later "
                "calls of that function onto other sites; scan the eager module for sites keyed by their place in the code",
                stacklevel=4,
            )

    def _enter_mode(self) -> None:
        mode: TorchFunctionMode | TorchDispatchMode
        mode = _DispatchSpy(self) if self.scripted else _FunctionSpy(self)
        if self._has_compiled_blocks:  # observed passes run compiled blocks eagerly (see eager_stance)
            self._stance = eager_stance()
            self._stance.__enter__()
        mode.__enter__()
        self._mode = mode

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
        stance, self._stance = self._stance, None
        if stance is not None:
            stance.__exit__(None, None, None)

    @contextlib.contextmanager
    def forward_scope(
        self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, until: Any = None
    ) -> Iterator[None]:
        """Observe one forward pass run inside this block (used for TorchScript models, whose
        calls no hook sees: ``args``/``kwargs`` are the call's, for its mask and samples).
        ``until`` (a frame or code object) bounds the positions of the block's own functional
        calls (see :func:`_frames_up_to`)."""
        me = threading.get_ident()
        with self._lock:
            previous = self._owner
            if previous is not None and previous != me:
                raise DeadReluError("another thread is running a forward pass observed by this capture")
            self._owner = me
        self._begin_forward(args, kwargs)
        self._fwd.stack.append(_Frame("", 0, scope=True, until=until))
        self._enter_mode()
        try:
            yield
        finally:
            self._exit_mode()
            self._fwd.stack.clear()
            self._owner = previous
        self._end_forward()  # only after a pass that finished: a failing one raises its own error

    def _foreign_call(self, mod: nn.Module) -> None:
        # The hook fired for another module object than the one it was registered on: a
        # shallow replica (nn.DataParallel) sharing the hook dicts. Copies made with deepcopy or
        # pickle carry inert hooks instead and never get here.
        if getattr(mod, "_is_replica", False):
            raise DeadReluError(
                "deadrelu cannot observe nn.DataParallel replicas (they run in threads on copies of "
                "the model): scan or probe the module itself, or use DistributedDataParallel"
            )

    def _make_pre_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        is_root = module is self.model
        activation = path in self._act_modules

        def pre_hook(mod: nn.Module, args: Any, kwargs: Any = None) -> None:
            if mod is not module:
                return self._foreign_call(mod)
            if is_root:
                if not self.enabled and not self._depth:
                    return  # an unobserved pass (per thread) never claims the capture
                if torch.jit.is_tracing():
                    return  # torch.jit.trace would record the statistics' ops into the model's graph
                me = threading.get_ident()
                with self._lock:
                    if self._depth and self._owner != me:
                        return  # another thread's forward is being observed: leave this one alone
                    self._owner = me
                    self._depth += 1
                    first = self._depth == 1
                if first:
                    if not self.enabled:
                        return
                    self._begin_forward(args, kwargs)
                    self._enter_mode()
            elif self._owner != threading.get_ident():
                return
            if self._mode is None:
                return
            fwd = self._fwd
            if self.on_scope_call is not None and len(fwd.stack) == 1 and not is_root:
                call, self.on_scope_call = self.on_scope_call, None
                call((args, kwargs))  # the first module called inside a forward_scope() block: its inputs
            entry = _module_call_entry()
            origin = fwd.axes.origin(args[0]) if activation and args else None
            call = self._module_call(fwd, path, entry, origin)
            if origin is None:
                frame = _Frame(path, call, entry=entry)
            else:  # an experts layer: every expert's call number
                frame = _Frame(path, call[0] if origin.grouped else call[origin.index], entry=entry, experts=(origin, call))
            fwd.stack.append(frame)
            if activation:
                fwd.inside_activation += 1

        return pre_hook

    def _module_call(self, fwd: _Forward, path: str, entry: Any, origin: WeightSlice | None = None) -> Any:
        """The number of this call of module ``path``: one per place it is called from (the
        calling module call, the frames from there to here, and how often that place was reached
        before in this forward), numbered in first-seen order for the capture's lifetime. Not
        the n-th call of this forward: a reused module called conditionally (``if ...: h =
        self.act(h)``) would shift its later calls onto the skipped call's site.

        An activation whose input comes from slice ``e`` of a stacked weight (``origin``, see
        :meth:`AxisTable.origin`: an MoE experts loop, ``act_fn(x @ gate_up_proj[e])`` for each
        expert a batch hits) is numbered by that slice instead: ``#1`` is expert 0's call
        wherever the batch's routing put it, numbers reserved for every slice at first sight: with
        an ``origin`` the result is every expert's number, as a tuple."""
        if not fwd.stack or fwd.stack[-1].scope:
            # The root (or a re-entrant root call), or a module called straight from the code in a
            # forward_scope() block (Monitor.observe): no forward bounds the frames above it, which
            # are the training loop's (Lightning reaches training_step by several paths), so its
            # calls are counted per forward, in order.
            call = fwd.calls.get(path, 0)
            fwd.calls[path] = call + 1
            return call
        parent = fwd.stack[-1]
        where = (path, parent.path, parent.call, _module_call_position(entry, parent.entry))
        numbers = self._call_numbers.setdefault(path, {})
        if origin is not None:
            return self._slice_numbers(numbers, where, origin)
        k = fwd.module_seen.get(where, 0)
        fwd.module_seen[where] = k + 1
        call = numbers.get((where, k))
        if call is None:
            call = numbers[(where, k)] = len(numbers)
        return call

    @staticmethod
    def _slice_numbers(numbers: dict[Any, int], where: Any, origin: WeightSlice) -> tuple[int, ...]:
        """The numbers of ``where``'s calls for each slice (expert) of a stacked weight, every slice
        numbered in order at first sight."""
        keys = [(where, ("slice", origin.weight, i)) for i in range(origin.slices)]
        for key in keys:
            numbers.setdefault(key, len(numbers))
        return tuple(numbers[key] for key in keys)

    def _make_post_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        is_root = module is self.model
        activation = self._act_modules.get(path)
        lookalike = path in self._lookalikes

        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            if mod is not module or self._owner != threading.get_ident():
                return
            stack = self._fwd.stack
            if self._mode is not None and stack and stack[-1].path == path:
                frame = stack.pop()
                if activation is not None:
                    self._fwd.inside_activation -= 1
                    if not self._fwd.inside_activation and not frame.counted:
                        self._on_module_output(activation, frame, output, module)
                elif lookalike and not frame.slots:
                    self._note_lookalike(path, args, output)
            if is_root:
                with self._lock:
                    self._depth = max(self._depth - 1, 0)
                    done = self._depth == 0
                    if done:
                        self._owner = None
                if done:
                    self._exit_mode()
                    self._end_forward()

        return post_hook

    def _note_lookalike(self, path: str, args: Any, output: Any) -> None:
        first = args[0] if args else None
        if isinstance(output, torch.Tensor) and isinstance(first, torch.Tensor) and output.shape == first.shape:
            self.uncaptured.setdefault(path, self._types.get(path, ""))

    # -- the hot path ------------------------------------------------------------------------
    def _axis(self, t: Any) -> tuple[Any, int, str] | None:
        return self._fwd.axes.get(t)

    def _on_op(self, kind: tuple[int, str, Any], args: tuple, kwargs: dict | None, out: Any) -> None:
        """Carry the feature axis from an op's input to its output; hand activations on."""
        if self._fwd.sources is not None:
            _carry_source(self._fwd.sources, args, kwargs, out)
        if kind[0] == ACT:
            self._on_activation(kind[1], args, kwargs, out)
        else:
            self._fwd.axes.on_op(kind, args, kwargs, out)
            if kind[2] == "relu" and kind[0] == PRODUCER:
                self._on_relu_rnn(out)

    def _on_relu_rnn(self, out: Any) -> None:
        """``nn.RNN``/``nn.RNNCell`` with ``nonlinearity="relu"`` apply their ReLU inside one fused
        op: its output (the last layer's hidden state at every step, packed or not) is the site."""
        h = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(h, torch.Tensor) and h.is_floating_point():
            self._on_activation("relu", (h,), None, h)

    def _on_activation(self, name: str, args: tuple, kwargs: dict | None, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        spelled = name in RELU_SPELLINGS
        called = called_activation(name, args, kwargs)
        if called is None:  # clamp(min=1e-8) and the like: no activation, the axis goes on as through any op
            self._fwd.axes.on_op((GENERIC, name, None), args, kwargs, out)
            return
        if out.is_nested:  # no sizes to lay units on (torch raises on .shape): say so, not torch's internal error
            raise DeadReluError(
                f"a {name} call got a nested tensor; deadrelu counts dense activations only: pad it "
                "(torch.nested.to_padded_tensor) and pass mask= to leave the padding out"
            )
        inp = args[0] if args else None
        if inp is not out and isinstance(inp, torch.Tensor):
            entry = self._axis(inp)
            if entry is not None and out.shape == inp.shape:
                self._fwd.axes.set(out, entry[1], entry[2])
        origin = self._fwd.axes.origin(inp) if isinstance(inp, torch.Tensor) else None
        if origin is not None and origin.grouped and out.ndim == 2 and not self.scripted:
            # an activation of a grouped or batched matmul's output (every expert's rows): a site per expert
            sites = self._site_for(called, args, kwargs, out, depth=5, spelled=spelled, groups=origin)
            for site, rows in sites or ():
                self._update(site, rows)
            return
        site = self._site_for(called, args, kwargs, out, depth=5, spelled=spelled)
        if site is not None:
            self._update(site, out)

    def _site_for(
        self, name: str, args: tuple, kwargs: dict | None, out: torch.Tensor, depth: int, spelled: bool = False,
        groups: WeightSlice | None = None,
    ) -> Any:
        """The site of the activation call being made (new on its first call), or None where
        the call is no site. ``out`` is its output, or the input when that stands in for it;
        ``spelled``: the call is a ReLU written otherwise (``clamp(min=0)``). With ``groups`` (which
        rows are which expert's, see :func:`_expert_rows`) a list of ``(site, rows)``, one per
        expert with rows."""
        fwd = self._fwd
        if fwd.inside_activation or not fwd.stack:
            return None  # inside an activation module: the module's output is the site
        inp = args[0] if args else None
        if self._is_weight(inp):
            return None  # a parameter passed through an activation is not a unit of the network
        if spelled and not out.is_floating_point():
            return None  # index.clamp(min=0) on integers is no activation
        frame = fwd.stack[-1]
        slot = frame.slots
        frame.slots = slot + 1
        position = () if self.scripted else _call_position(depth, frame.entry, frame.until)
        where = (frame.path, frame.call, position, name)
        origin = groups or fwd.axes.origin(inp)
        if origin is not None and not self.scripted:
            self._expert_sites([(*where, -1 - e) for e in range(origin.slices)], out, slot, position)
            if groups is not None:
                keys = [((*where, -1 - e) if e >= 0 else (*where, 0), rows) for e, rows in _expert_rows(out, groups)]
                return [(self.sites.get(key) or self._new_site(key, rows, slot, position), rows) for key, rows in keys]
            # An experts loop's functional call (F.silu(x @ w[e])): keyed by the weight slice, not by
            # how often the loop reached it before (see _module_call); occurrences stay ints.
            k = -1 - origin.index
        else:
            k = fwd.seen.get(where, 0)
            fwd.seen[where] = k + 1
        key = (*where, k)
        site = self.sites.get(key)
        if site is None:
            site = self._new_site(key, out, slot, position)
        return site

    def _is_weight(self, t: Any) -> bool:
        """A parameter or buffer, or a view of one (``self.scale.view(1, -1)``)."""
        if isinstance(t, nn.Parameter) or id(t) in self._buffer_ids:
            return True
        base = getattr(t, "_base", None)
        return base is not None and (isinstance(base, nn.Parameter) or id(base) in self._buffer_ids)

    def _counted_relu(self, func: Any, args: tuple, kwargs: dict | None) -> torch.Tensor | None:
        """Run a ReLU call with its site's statistics in one kernel (core/fused.py, core/native.py).

        None, having done nothing, where the call is left to the usual route: a tensor no
        kernel counts (CUDA needs Triton, CPU the compiled kernel of core/native.py), inside an
        activation module other than a plain ``nn.ReLU``, or that module's
        first call (its output makes the site). A functional site is found first; if its
        accumulator cannot fuse the call, torch runs it and the site is updated as usual.
        """
        inp = args[0] if args else (kwargs or {}).get("input")
        if type(inp) is not torch.Tensor or self.scripted:
            return None
        if not inp.is_cuda:
            if self._fuse_on_cpu is None:
                self._fuse_on_cpu = fused_on_cpu()
            if not self._fuse_on_cpu:
                return None
        if kwargs and not kwargs.keys() <= {"input", "inplace"}:
            return None  # an argument the fused kernel does not take (out=, …): torch's own call
        if func in _INPLACE_RELUS:
            inplace = True
        elif kwargs and "inplace" in kwargs:
            inplace = bool(kwargs["inplace"])
        else:
            inplace = len(args) > 1 and bool(args[1])
        fwd = self._fwd
        if fwd.axes.origin(inp) is not None:
            return None  # an experts layer's rows: counted per expert by the usual route
        if fwd.inside_activation:
            frame = fwd.stack[-1] if fwd.stack else None
            if fwd.inside_activation != 1 or frame is None or frame.counted or frame.path not in self._plain_relus:
                return None
            if _output_hooked(self._plain_relus[frame.path]):
                return None  # a user's forward hook may replace the output: the site counts what it returns
            site = self.sites.get((frame.path, frame.call, None, "relu", 0))
            out = None if site is None else self._fused_update(site, inp, inplace)
            frame.counted = out is not None
            if out is not None and out is not inp:  # carry the feature axis, as _on_activation does
                entry = self._axis(inp)
                if entry is not None:
                    fwd.axes.set(out, entry[1], entry[2])
            return out
        if not fwd.stack or self._is_weight(inp):
            return None
        site = self._site_for("relu", args, kwargs, inp, depth=4)  # the input stands in for the output
        out = None if site is None else self._fused_update(site, inp, inplace)
        if out is None:
            out = func(*args, **kwargs) if kwargs else func(*args)
            if site is not None:
                self._update(site, out)
        if out is not inp:
            entry = self._axis(inp)
            if entry is not None:
                fwd.axes.set(out, entry[1], entry[2])
            if fwd.sources is not None:
                _carry_source(fwd.sources, (inp,), None, out)
        return out

    def _fused_update(self, site: _Site, x: torch.Tensor, inplace: bool) -> torch.Tensor | None:
        """``relu(x)`` counted into the site by its accumulator's fused kernel, or None."""
        fused = getattr(site.stats, "relu_and_update", None)
        dim = self._site_dim(site, x)
        if fused is None or dim >= x.ndim:
            return None
        mask = self._observation_mask(x, site)
        if mask is not None:
            if not site.takes_mask:
                return None
            mask = aligned_mask(x, dim, mask, self._square_layout(site, x, dim, mask))
            self._note_mask_fit(mask is not None, x, site)
        self.last_site = site.info.module or "<root>"
        try:
            return fused(x, dim, mask=mask, inplace=inplace)
        except torch.cuda.OutOfMemoryError:
            raise  # as torch's own ReLU would: callers that shrink the batch on OOM must see it
        except Exception as err:
            raise self._stats_error(site, x, err) from (None if isinstance(err, DeadReluError) else err)

    def _on_module_output(self, name: str, frame: _Frame, out: Any, module: nn.Module) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if frame.experts is not None:
            origin, calls = frame.experts
            # every expert has its site from the first call on, in expert order: one no token reached is unobserved
            keys = [(frame.path, call, None, name, -1 - e) for e, call in enumerate(calls)]
            self._expert_sites(keys, out, 0, None)
            if origin.grouped and out.ndim == 2:  # every expert's rows: expert e's are counted at calls[e]
                for e, rows in _expert_rows(out, origin):
                    key = keys[e] if e >= 0 else (frame.path, frame.call, None, name, 0)
                    site = self.sites.get(key) or self._new_site(key, rows, 0, None)
                    self._update(site, rows, site.nonnegative and not _output_hooked(module))
                return
        key = (frame.path, frame.call, None, name, 0 if frame.experts is None else -1 - frame.experts[0].index)
        site = self.sites.get(key)
        if site is None:
            site = self._new_site(key, out, 0, None)
        # |h| = h holds for the activation's own output only: a forward hook of the user's that ran
        # before this one may have returned another tensor (``o - 0.5``), which the site counts.
        self._update(site, out, site.nonnegative and not _output_hooked(module))

    def _observation_mask(self, out: torch.Tensor, site: _Site) -> torch.Tensor | None:
        """The forward's observation mask on ``out``'s device (copied there once per forward). In an
        encoder-decoder call the ``attention_mask`` is the encoder's: a site inside a ``decoder``
        module takes the call's ``decoder_attention_mask`` (none: every decoder position counts),
        even where the two lengths happen to be equal."""
        fwd = self._fwd
        source = fwd.decoder_mask if self._takes_decoder_mask(site) else fwd.mask
        if source is None:
            return None
        if source is fwd.mask and fwd.sources is not None and _from_other_inputs(fwd.sources, out):
            return None  # an image tower's tokens: the call's (text) mask is not theirs
        key = (out.device, source is fwd.mask)
        mask = fwd.masks.get(key)
        if mask is None:
            mask = fwd.masks[key] = source.to(out.device)
        return mask

    def _update(self, site: _Site, out: torch.Tensor, nonnegative: bool | None = None) -> None:
        self.last_site = site.info.module or "<root>"
        # Inside torch.func's transforms (grad, vmap) the output is a wrapper that accumulators made
        # outside may not be written with: count the plain values under it, the transforms off.
        wrapped = functorch_wrapped(out)
        # A module site is read in its post-hook, while the function mode is still active: the
        # mask selection and the accumulator's own torch calls must not go through it.
        nonneg = site.nonnegative if nonnegative is None else nonnegative
        with torch._C.DisableTorchFunction():
            dim = self._site_dim(site, out)
            if not wrapped:
                self._count(site, out, dim, nonneg)
                return
            out, dim = _plain_values(out, dim)
            with torch._C._DisableFuncTorch():
                self._count(site, out, dim, nonneg)

    def _count(self, site: _Site, out: torch.Tensor, dim: int, nonnegative: bool) -> None:
        """Add one output, its units on ``dim``, to the site's accumulator, masked as the forward's mask says."""
        x, mask = out, self._observation_mask(out, site)
        if mask is not None:
            square = self._square_layout(site, out, dim, mask)
            if site.takes_mask:  # the accumulator skips masked values in place: no copy, no sync
                mask = aligned_mask(out, dim, mask, square)
                self._note_mask_fit(mask is not None, out, site)
            else:  # a user's accumulator without mask=: hand it the kept values
                self._note_mask_fit(mask_layout(out.shape, dim, mask.shape) is not None, out, site)
                x, dim = apply_mask(out, dim, mask, square)
                mask = None
        try:
            if mask is None:
                site.stats.update(x, dim, nonnegative)
            else:
                site.stats.update(x, dim, nonnegative, mask=mask)
        except torch.cuda.OutOfMemoryError:
            raise  # the device is full: not a failure of deadrelu's statistics
        except Exception as err:
            raise self._stats_error(site, out, err) from (None if isinstance(err, DeadReluError) else err)

    def _site_dim(self, site: _Site, out: torch.Tensor) -> int:
        """The site's unit dimension in ``out``: the one chosen when the site was first seen, unless
        ``out`` has another rank (a Linear on ``(B, C)`` in one batch and on ``(B, T, C)`` in the
        next, an unbatched convolution input), whose units the same rules find again — the first
        output's dim would count positions as units, silently where the sizes happen to agree."""
        if out.ndim == len(site.info.shape) or out.ndim < 2:
            return site.unit_dim  # (a 0-D or 1-D output is one sample of its units: see as_unit_batch)
        info = replace(site.info, shape=tuple(out.shape))
        return choose_unit_dim(self.unit_dim_spec, info, out.ndim, self._axis(out))

    def _takes_decoder_mask(self, site: _Site) -> bool:
        """Whether the site is counted under the call's ``decoder_attention_mask`` (a decoder site of an encoder-decoder call)."""
        return self._fwd.decoder_split and in_decoder(site.info.module)

    def _note_mask_fit(self, fits: bool, out: torch.Tensor, site: _Site) -> None:
        fwd, decoder = self._fwd, self._takes_decoder_mask(site)
        if fits:
            fwd.mask_fit[decoder] = True
        elif decoder not in fwd.mask_fit:
            fwd.mask_fit[decoder], fwd.unfit_shape[decoder] = False, tuple(out.shape)

    def _square_layout(self, site: _Site, out: torch.Tensor, dim: int, mask: torch.Tensor) -> str:
        """How to read a square ``(B, T)`` mask (B = T fits a ``(B, T, C)`` and a ``(T, B, C)``
        activation alike) at this site: as the site's activation lay under the last mask with
        B != T. Before any such batch, as given — with a warning, once, where the mask is the
        call's own ``attention_mask`` (``(B, T)`` by convention) and the model has a
        sequence-first module (``batch_first=False``), so that guess may be wrong."""
        if mask.ndim != 2:
            return "leading"
        if mask.shape[0] != mask.shape[1]:
            layout = mask_layout(out.shape, dim, mask.shape)
            if layout is not None:
                site.layout = layout
            return "leading"
        if site.layout is None and self.mask_spec is None and self._sequence_first and not self._warned_square:
            self._warned_square = True
            warnings.warn(
                f"deadrelu: the observation mask is square ({mask.shape[0]} x {mask.shape[1]}) and the model has "
                "sequence-first (batch_first=False) modules: it is laid over an activation's leading dims as "
                "given (mask[i, j] on h[i, j]) until a batch with B != T shows how the activation lies; for "
                "sequence-first activations pass the mask as (T, B) (e.g. mask=lambda b: b['attention_mask'].T)",
                RuntimeWarning,
                stacklevel=2,
            )
        return site.layout or "leading"

    def _stats_error(self, site: _Site, out: torch.Tensor, err: Exception) -> DeadReluError:
        if isinstance(err, DeadReluError):
            # TorchScript hides call positions: its sites are numbered by order, which a branch shifts
            hint = (
                "; in a TorchScript model sites are numbered in call order, so a call that runs only for some "
                "batches shifts the later ones: scan the eager module to key sites by call position"
                if self.scripted and "units along dim" in str(err) else ""
            )
            return DeadReluError(f"activation site {_describe(site.info)}: {err}{hint}")
        if out.layout != torch.strided or out.is_nested or out.is_quantized:
            # sparse, nested or quantized activations have no per-element values to count in place
            kind = "nested" if out.is_nested else "quantized" if out.is_quantized else str(out.layout).replace("torch.", "")
            return DeadReluError(
                f"activation site {_describe(site.info)} got a {kind} tensor; deadrelu counts dense (strided) "
                "activations only: convert it before the activation (e.g. .to_dense(), .dequantize(), or "
                "torch.nested.to_padded_tensor with a mask=)"
            )
        # a failure of deadrelu's own statistics, not of the model
        return DeadReluError(
            f"deadrelu failed to compute statistics at activation site {_describe(site.info)} for an "
            f"output of shape {tuple(out.shape)} and dtype {out.dtype} on {out.device} "
            f"({type(err).__name__}: {err}); please report this"
        )

    def _expert_sites(self, keys: list[tuple[Any, ...]], out: torch.Tensor, slot: int, position: Any) -> None:
        """Make the sites of an experts layer's experts that do not exist yet, in expert order (``out``
        gives their shape and unit axis), so an expert no token reaches is there, unobserved."""
        if keys and keys[0] in self.sites:
            return  # made together at the layer's first call
        for key in keys:
            if key not in self.sites:
                self._new_site(key, out, slot, position)

    def _new_site(self, key: tuple[Any, ...], out: torch.Tensor, slot: int, position: Any) -> _Site:
        path, call, _, name, _ = key
        info = SiteInfo(
            module=path,
            module_type=self._types.get(path, type(self.model).__name__),
            call=call,
            slot=slot,
            function=name,
            shape=tuple(out.shape),
            leaf=self._leaf.get(path, False),
            location=_describe_position(position),
            position=_stable_position(position),
            occurrence=key[4],
        )
        if not path and slot < len(self._graph_sites) and self._graph_sites[slot] is not None:
            # A flattened graph (torch.export): name the site after the module it came from.
            info.module, info.module_type, info.call = self._graph_sites[slot]  # type: ignore[misc]
            info.slot, info.leaf = 0, info.module_type in _ACTIVATION_CLASS_NAMES
        info.ordinal = same_function_ordinal((s.info for s in self.sites.values()), info.module, info.call, name, info)
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, out.ndim, self._axis(out))
        units = out.shape[unit_dim] if out.ndim else 1
        thr = resolve_threshold(self.threshold_spec, info)
        site = _Site(
            info,
            unit_dim,
            self.stats_factory(units, thr, out.device),
            order=next_site_order(),
            nonnegative=info.function in NONNEGATIVE_FUNCTIONS,
        )
        site.takes_mask = _accepts_mask(site.stats)
        self.sites[key] = site
        return site

    # -- results ---------------------------------------------------------------------------
    def ordered_sites(self) -> list[tuple[str, _Site]]:
        """Sites in forward-execution order with their unique display names."""
        ordered = sorted(self.sites.items(), key=lambda kv: kv[1].order)
        names = display_names([site.info for _, site in ordered])
        return list(zip(names, [site for _, site in ordered]))

    def reset(self) -> None:
        """Forget all sites and statistics (hooks stay attached)."""
        self.sites.clear()
        self.uncaptured.clear()
        self.forwards = self.samples = 0
        self.last_site = None


def _plain_values(t: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor, int]:
    """The values under ``torch.func``'s wrappers (grad, vmap, nested) and where the units lie in
    them: a vmapped dimension is moved to the front, more observations of the same units."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        inner = functorch.get_unwrapped(t)
        if functorch.is_batchedtensor(t):
            bdim = functorch.maybe_get_bdim(t)
            if t.ndim == 0:  # one value per sample: the site's one unit
                inner, unit_dim = inner.reshape(-1, 1), 1
            else:
                unit = [d for d in range(inner.ndim) if d != bdim][unit_dim]
                inner, unit_dim = inner.movedim(bdim, 0), unit + (unit < bdim)
        t = inner
    return t, unit_dim


def _output_hooked(module: nn.Module) -> bool:
    """Whether a forward hook other than deadrelu's (the module's own, or a global one) runs after it."""
    return not only_deadrelu_forward_hooks(module)


def _accepts_mask(stats: Any) -> bool:
    """Whether an accumulator's ``update`` takes ``mask=`` (deadrelu's do; a user's factory may not)."""
    try:
        params = inspect.signature(stats.update).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "mask" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _stable_position(position: Any) -> str:
    if not position:
        return ""
    # co_qualname is Python 3.11+; on 3.10 the plain name (with the file and first line beside it,
    # still one code object's)
    return "|".join(
        f"{c.co_filename}:{c.co_firstlineno}:{getattr(c, 'co_qualname', c.co_name)}:{offset}" for c, offset in position
    )


def _describe_position(position: Any) -> str:
    if not position:
        return ""
    code, offset = position[0]
    line = None
    for start, end, lineno in code.co_lines():
        if start <= offset < end:
            line = lineno
            break
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{line if line is not None else code.co_firstlineno}"


_SOURCE_INDEX = re.compile(r"\[(\d+)\]|\._modules\['([^']*)'\]|\['([^']*)'\]")
_SOURCE_GETATTR = re.compile(r"getattr\((.*), '([^']*)'\)")


def dynamo_module_path(text: str) -> str | None:
    """A module path from the source TorchDynamo recorded for it, relative to the traced root, or None.

    Newer torch records plain paths in ``nn_module_stack``; torch 2.2 records sources, with
    ``getattr`` for names that are not identifiers (a Sequential's ``"0"``).

    Example:
        >>> dynamo_module_path("L['self'].layers[0].relu"), dynamo_module_path("getattr(L['fn'].blocks[0], '1')")
        ('layers.0.relu', 'blocks.0.1')
    """
    got = _SOURCE_GETATTR.fullmatch(text)
    if got is not None:
        inner = dynamo_module_path(got.group(1))
        return None if inner is None else ".".join(p for p in (inner, got.group(2)) if p)
    if not text.startswith("L["):
        return None
    rest = text[text.index("]") + 1 :]
    rest = _SOURCE_INDEX.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    return rest.lstrip(".")


# nn.Threshold too: its threshold(0, 0) call is a site only with those arguments (called_activation)
_ACTIVATION_CLASS_NAMES = frozenset(m.__name__ for m in ACTIVATION_MODULES) | {"Threshold"}


def _recorded_path(stack: Mapping[str, Any]) -> str:
    """The module path of an ``nn_module_stack``'s innermost entry.

    torch 2.2 records Dynamo sources (parsed by :func:`dynamo_module_path`), later torches plain
    paths. torch 2.6's ``torch.export.save`` mangles a ``getattr(L['fn'], '1')`` source to the bare
    ``'getattr'``; the entry's key (``fn_1``) still spells it, after the key of the innermost
    intact ancestor (``fn``): that remainder, ``_`` read as ``.``, is appended to the ancestor's
    path (exact for indices and names without underscores)."""
    entries = list(stack.items())
    key, (path, _) = entries[-1]
    source = dynamo_module_path(str(path))
    if source is not None or str(path) != "getattr":
        return str(path) if source is None else source
    for parent_key, (parent_path, _) in reversed(entries[:-1]):
        parent = dynamo_module_path(str(parent_path))
        parent = str(parent_path) if parent is None and str(parent_path) != "getattr" else parent
        if parent is not None and str(key).startswith(f"{parent_key}_"):
            rest = str(key)[len(parent_key) + 1 :].replace("_", ".")
            return ".".join(p for p in (parent, rest) if p)
    return str(path)


def _exported_activation_modules(model: nn.Module) -> list[tuple[str, str, int] | None]:
    """For an fx graph that recorded ``nn_module_stack`` (torch.export), the original module
    path and class of each activation call, in graph order; empty for other models."""
    graph = getattr(model, "graph", None)
    if not isinstance(model, torch.fx.GraphModule) or graph is None:
        return []
    out: list[tuple[str, str, int] | None] = []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        kind = function_kind(node.target)
        if kind[0] != ACT or called_activation(kind[1], node.args, dict(node.kwargs)) is None:
            continue
        value = node.meta.get("val")
        if kind[1] in RELU_SPELLINGS and isinstance(value, torch.Tensor) and not value.is_floating_point():
            continue  # index.clamp(min=0): no site (see ActivationCapture._site_for)
        stack = node.meta.get("nn_module_stack")
        if not stack:
            out.append(None)
            continue
        key, (path, cls) = list(stack.items())[-1]
        path = _recorded_path(stack)
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        _, at, k = str(key).rpartition("@")
        if at and k.isdigit():  # the recorded k-th call of a reused module
            call = int(k)
        elif cls_name in _ACTIVATION_CLASS_NAMES:  # an activation module: one activation per call
            call = calls.get(str(path), 0)
        else:  # functional calls made by one call of a module (the root's own forward): call 0
            call = 0
        calls[str(path)] = call + 1
        out.append((str(path), cls_name, call))
    return out


def _lookup(spec: Mapping[str, Any], info: SiteInfo) -> Any:
    # Most specific key first: a display name with its ".k" (k-th such function in the module
    # call) and "#k" (k-th call of the module) — whichever of them the name carries — then
    # "path:fn", the module path, the function name; the root module is "<root>", as in site names.
    where = info.module or "<root>"
    fn, call, k = f"{where}:{info.function}", f"#{info.call + 1}", f".{info.ordinal}"
    keys = (f"{fn}{k}{call}", f"{fn}{call}", f"{where}{call}", f"{fn}{k}", fn, f"{info.module}:{info.function}", where, info.module, info.function)  # fmt: skip
    for key in keys:
        if key in spec:
            return spec[key]
    return None


def _option_value(option: str, spec: Any, info: SiteInfo) -> Any:
    """What a ``unit_dim``/``threshold`` option gives for one site: a mapping's entry, or a
    callable's answer — whose failure is reported as the callable's, naming the site, and never
    as the model's (it runs inside the model's forward)."""
    if isinstance(spec, Mapping):
        return _lookup(spec, info)
    try:
        return spec(info)
    except DeadReluError:
        raise
    except Exception as err:
        name = getattr(spec, "__qualname__", type(spec).__name__)
        raise DeadReluError(
            f"the {option} callable {name} raised {type(err).__name__} for activation site {_describe(info)} "
            f"with shape {info.shape}: {err}"
        ) from err


def _as_index(value: Any) -> int | None:
    """``value`` as an int (Python or NumPy integers, not bools), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def resolve_unit_dim(spec: UnitDimSpec | None, info: SiteInfo, ndim: int, default: int) -> int:
    """The unit dimension a ``unit_dim`` option gives for one site (``default`` where it gives none).

    Raises:
        DeadReluError: when the dimension does not exist in the site's output, or a callable
            raises or returns something other than an int or None.
    """
    given = spec if spec is None or isinstance(spec, int) else _option_value("unit_dim", spec, info)
    if given is None:
        return default
    dim = _as_index(given)
    if dim is None:
        raise DeadReluError(
            f"unit_dim gave {given!r} for activation site {_describe(info)}: it must be an int dimension or None"
        )
    if ndim == 0 or not -ndim <= dim < ndim:
        raise DeadReluError(
            f"unit_dim {dim} is out of range for activation site {_describe(info)} with shape {info.shape}"
        )
    return dim % ndim


def choose_unit_dim(spec: UnitDimSpec | None, info: SiteInfo, ndim: int, entry: tuple[Any, int, str] | None) -> int:
    """A new site's unit dimension: the ``unit_dim`` option's, else the producer's (``entry``, from
    :class:`~deadrelu.core.unit_axis.AxisTable`), else the rank rule; records the rule in ``info``."""
    if entry is not None:
        default_dim, info.unit_axis_source = entry[1], entry[2]
    else:
        default_dim, info.unit_axis_source = _rank_rule(ndim), "rank rule"
    unit_dim = resolve_unit_dim(spec, info, ndim, -1)
    if unit_dim == -1:
        return default_dim
    info.unit_axis_source = "unit_dim override"
    return unit_dim


def resolve_threshold(spec: ThresholdSpec, info: SiteInfo) -> float:
    """The firing threshold a ``threshold`` option gives for one site (0.0 where it gives none).

    Raises:
        DeadReluError: for a NaN threshold (no value is ``> nan``: every unit would look dead),
            or a callable that raises or returns something other than a number or None.
    """
    thr = spec if isinstance(spec, (int, float)) else _option_value("threshold", spec, info)
    try:
        value = 0.0 if thr is None else float(thr)
    except (TypeError, ValueError):
        raise DeadReluError(
            f"threshold gave {thr!r} for activation site {_describe(info)}: it must be a number or None"
        ) from None
    if math.isnan(value):
        raise DeadReluError(f"the firing threshold for activation site {_describe(info)} is NaN: no output is > NaN")
    return value


_UNIT_DIM_FORMS = "an int (every site), a mapping {module path or site name: int}, or a callable SiteInfo -> int | None"


def checked_unit_dim(spec: Any) -> Any:
    """The ``unit_dim`` option, checked before any forward pass: None, an int, a mapping of
    text to ints (or None) or a callable. Only whether a dimension exists is left to each site
    (it depends on the site's rank).

    Returns:
        The option with NumPy integers made ints.

    Raises:
        DeadReluError: for text, a float, a bool, or a mapping with other keys or values.

    Example:
        >>> checked_unit_dim(-1), checked_unit_dim({"block.act": 2})
        (-1, {'block.act': 2})
        >>> checked_unit_dim("x")
        Traceback (most recent call last):
        ...
        deadrelu.errors.DeadReluError: unit_dim must be an int (every site), ...; got str 'x'
    """
    if spec is None:
        return None
    dim = _as_index(spec)
    if dim is not None:
        return dim
    if isinstance(spec, Mapping):
        out: dict[str, int | None] = {}
        for key, value in spec.items():
            if not isinstance(key, str):
                raise DeadReluError(f"unit_dim mapping keys must be module paths or site names (text), got {key!r}")
            dim = _as_index(value)
            if dim is None and value is not None:
                raise DeadReluError(f"unit_dim[{key!r}] must be an int dimension (or None), got {value!r}")
            out[key] = dim
        return out
    if callable(spec):
        return spec
    raise DeadReluError(f"unit_dim must be {_UNIT_DIM_FORMS}; got {type(spec).__name__} {spec!r:.80}")


def checked_threshold(spec: Any) -> ThresholdSpec:
    """The ``threshold`` option with a NumPy or 0-d tensor number made a float; a NaN, +inf, bool or
    non-number (a float, or a mapping's value) refused before anything runs.

    Returns:
        The option, scalars as floats (a mapping's values and a callable as given).

    Raises:
        DeadReluError: naming the key whose threshold is NaN, +inf or not a number.

    Example:
        >>> import numpy as np
        >>> checked_threshold(np.float32(0.5)), checked_threshold({"relu": 0.1})
        (0.5, {'relu': 0.1})
    """
    if isinstance(spec, torch.Tensor) and spec.ndim == 0:
        spec = spec.item()
    if isinstance(spec, Mapping):
        values = [(f"threshold[{key!r}]", value) for key, value in spec.items()]
    elif callable(spec):
        return spec
    else:
        values = [("threshold", spec)]
    for name, value in values:
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DeadReluError(
                f"{name} must be a number (or the option a mapping or a callable), got {value!r:.80}"
            )
        number = float(value)
        if math.isnan(number) or number == math.inf:
            raise DeadReluError(f"{name} is {number}: no output is > {number}, so every unit would look dead")
    if isinstance(spec, Mapping):
        return {key: float(v.item() if isinstance(v, torch.Tensor) else v) for key, v in spec.items()}
    return float(spec)


def _describe(info: SiteInfo) -> str:
    where = info.module or "<root>"
    at = f", {info.location}" if info.location else ""
    return f"{where} ({info.function}, call {info.call + 1}, slot {info.slot + 1}{at})"


def display_names(infos: list[SiteInfo]) -> list[str]:
    """Unique, readable names: ``path`` for an activation module, ``path:fn`` for a functional call,
    ``.k`` for the k-th call position of the same function in one module call (in first-seen
    order), ``#k`` for the k-th call of a reused module."""
    calls_per_module: dict[str, set[Any]] = {}
    per_call: dict[tuple[str, Any], dict[tuple[Any, ...], str]] = {}
    # An experts layer's sites are one call (position) each, told apart by ``[e]``, the expert.
    call_of = lambda i: ("experts", i.call) if expert_of(i) is not None and not i.position else i.call  # noqa: E731
    for i in infos:
        calls_per_module.setdefault(i.module, set()).add(call_of(i))
        per_call.setdefault((i.module, call_of(i)), {})[(i.position, _call_occurrence(i), i.function)] = i.function
    # A leaf module whose every call makes exactly one activation call is an activation module.
    single = {m: all(len(per_call[(m, c)]) == 1 for c in calls) for m, calls in calls_per_module.items()}
    names = []
    for i in infos:
        base = i.module or "<root>"
        calls = {c for c in calls_per_module[i.module] if not isinstance(c, tuple)}
        if not (i.leaf and single[i.module] and i.module):
            same_fn = [k for k, f in per_call[(i.module, call_of(i))].items() if f == i.function]
            base += f":{i.function}"
            if len(same_fn) > 1:
                base += f".{same_fn.index((i.position, _call_occurrence(i), i.function)) + 1}"
        if expert_of(i) is None and len(calls) > 1:
            base += f"#{i.call + 1}"
        if expert_of(i) is not None:
            base += f"[{expert_of(i)}]"
        names.append(base)
    # Dynamic control flow could still collide; make names unique without hiding either site.
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        unique.append(n if k == 0 else f"{n}~{k + 1}")
    return unique
