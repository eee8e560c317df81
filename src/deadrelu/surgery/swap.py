"""Replace ReLU by another activation: modules by surgery, functional calls by an fx rewrite.

``nn.ReLU`` modules are replaced in their parent. A functional call (``F.relu``,
``torch.relu``, ``x.relu()``, ``x.relu_()``, ``F.relu(x, inplace=True)``) lives in some
module's ``forward`` code and cannot be replaced by surgery; instead that module is
traced with torch.fx *shallowly* (its children stay opaque calls, so only its own code
is in the graph), each ReLU node is replaced by a call to a new activation submodule,
and the module is replaced in its parent by the resulting ``torch.fx.GraphModule``
(same parameter objects, so optimizers still hold them; the parameters, buffers, submodules,
attributes and methods its forward does not use are carried over too, and a module shared by
several parents stays one module at all its paths). A forward that reads ``self.training`` (itself
or in a helper of its own code) is refused: a trace would freeze the branch of the current mode; so
is one with a grad-mode or autocast context, which a trace drops, and one that branches on an optional
argument's default (``if scale is not None:``; fx traces the argument as a proxy, see
:mod:`deadrelu.surgery.defaults`). An in-place call stays in place
(``inplace=True`` where the new activation has it, else an explicit ``copy_``), so code
that relies on the side effect keeps working.

The root module cannot be replaced in place: functional calls in the root's own forward
need ``copy=True`` (the result is then a GraphModule) or are refused. A module that
torch.fx cannot trace is read as source code — its forward and the methods and same-file functions
forward calls by name — and if that mentions ``relu`` it is refused with its file and line, because
the call could not be rewritten. TorchScript code can be
rewritten neither way: a scripted model is refused, and so is a scripted submodule whose compiled
code calls relu (one that does not is left as it is).
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .dataflow import (
    activation_name, reads_weight, check_report_matches, computed_weight_reason, leaves_no_attributes, trace_graph, unrewritable_reason,
)  # fmt: skip
from .defaults import default_branch_reason
from .tracing import inplace_call
from .transaction import Transaction, copy_model
from .verify import check_flag, check_generator
from ..errors import DeadReluError, RefusedError
from ..core.activations import RELU_SPELLINGS, base_name, function_of_module
from ..core.capture import eager_submodule
from ..core.report import Report

__all__ = ["swap_activations", "SwapResult", "ActivationChange", "TARGETS"]

#: Activations ReLU can be swapped to.
TARGETS = ("leaky_relu", "prelu", "elu", "selu", "gelu", "silu")
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
# relu itself, and the ReLU spellings the scan counts: clamp(0) / clamp(min=0) / clamp_min(0) / clip(...), threshold(
_RELU_SOURCE = re.compile(
    r"\brelu_?\b|\b(?:clamp|clip|clamp_min)_?\((?:[^()]*,\s*)?(?:min\s*=\s*)?0(?:\.0*)?\s*[,)]|\bthreshold_?\("
)


@dataclass(frozen=True)
class ActivationChange:
    """One replaced activation.

    Attributes:
        site: the module path of a replaced module, or ``"path:node"`` for a functional call
            (``"<root>"`` for the root module).
        kind: ``"module"``, ``"function"`` or ``"attribute"`` (an ``activation=F.relu`` attribute).
        old: what was there, e.g. ``"ReLU(inplace=True)"`` or ``"torch.relu"``.
        new: the new activation's repr, e.g. ``"LeakyReLU(negative_slope=0.01)"``.
    """

    site: str
    kind: str
    old: str
    new: str


@dataclass(frozen=True)
class SwapResult:
    """The outcome of :func:`swap_activations`.

    Attributes:
        model: the changed model — the same object unless ``copy=True`` (or a GraphModule
            when the root's own forward had functional calls and ``copy=True``; the new
            activation itself when the model was an ``nn.ReLU`` and ``copy=True``).
        changes: one :class:`ActivationChange` per replaced activation.
        reinitialised: Linear/Conv layers given LeCun-normal weights (``selu_init=True``).
        left_alone: with a ``report``, one line per module whose ReLU sites in the report no
            change covers, with the reason (``"rnn (the ReLU runs inside torch's fused RNN op)"``);
            those sites still compute ReLU. Empty without a report.
    """

    model: nn.Module
    changes: list[ActivationChange]
    reinitialised: tuple[str, ...] = ()
    left_alone: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"swap_activations: {len(self.changes)} activation(s) replaced"]
        lines += [f"  {c.site}: {c.old} -> {c.new}" for c in self.changes]
        if self.reinitialised:
            lines.append(f"  LeCun-normal re-initialised: {', '.join(self.reinitialised)}")
        if self.left_alone:
            lines += [f"  left as it is: {line}" for line in self.left_alone]
        return "\n".join(lines)


class _ShallowTracer(fx.Tracer):
    """Keeps every submodule opaque so the graph holds only the module's own forward code."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_relu_node(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return True
    # a ReLU spelled clamp(min=0), clamp_min(0) or threshold(0, 0), as the scan counts them: not on
    # integers or on a parameter (self.scale.clamp(min=0) keeps a scale non-negative)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_function", "call_method") or not isinstance(name, str) or base_name(name) not in RELU_SPELLINGS:
        return False
    return activation_name(node, {}) == "relu" and not reads_weight(node)


def _is_relu_module(m: nn.Module) -> bool:
    """``nn.ReLU``, or ``nn.Threshold(0, 0)`` (the scan reports it as a relu), exact classes only."""
    return type(m) is nn.ReLU or (type(m) is nn.Threshold and function_of_module(m) == "relu")


def _is_user_code(m: nn.Module) -> bool:
    """True for modules whose forward is not torch.nn's own (those are handled separately)."""
    return isinstance(m, fx.GraphModule) or not type(m).__module__.startswith("torch.nn")


def _label(path: str) -> str:
    return path or "<root>"


def _width(node: Any, modules: dict[str, nn.Module]) -> int | None:
    """Channels of the tensor a node produces, when it comes straight from a Linear/Conv/BatchNorm."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features
        if isinstance(m, nn.Linear):
            return m.out_features
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.out_channels
    return None


def _module_widths(model: nn.Module, report: Report | None) -> dict[str, int]:
    """Per ReLU-module path, its channel count where it is used at exactly one place."""
    if report is not None:
        out: dict[str, int] = {}
        counts: dict[str, int] = {}
        for s in report.sites:
            counts[s.module] = counts.get(s.module, 0) + 1
            if s.unit_dim == 1 or len(s.shape) <= 2:
                out[s.module] = s.units
        return {k: v for k, v in out.items() if counts[k] == 1}
    try:
        with leaves_no_attributes(model):
            gm = fx.symbolic_trace(model)
    except Exception:  # untraceable: PReLU falls back to one shared slope
        return {}
    modules = dict(gm.named_modules())
    seen: dict[str, list[int | None]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and _is_relu_module(modules.get(node.target)):
            seen.setdefault(str(node.target), []).append(_width(node.args[0] if node.args else None, modules))
    return {k: v[0] for k, v in seen.items() if len(v) == 1 and v[0] is not None}


def _new_activation(to: str, inplace: bool, width: int | None, slope: float, like: torch.Tensor | None) -> nn.Module:
    if to == "leaky_relu":
        return nn.LeakyReLU(slope, inplace=inplace)
    if to == "prelu":
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        return nn.PReLU(width or 1, **kw)
    if to == "elu":
        return nn.ELU(inplace=inplace)
    if to == "selu":
        return nn.SELU(inplace=inplace)
    if to == "gelu":
        return nn.GELU()
    return nn.SiLU(inplace=inplace)


def _has_inplace(to: str) -> bool:
    return to in ("leaky_relu", "elu", "selu", "silu")


def _forward_code(m: nn.Module) -> list[Any]:
    """``type(m).forward`` and the Python functions it reaches by name within the module's own code: methods
    of its classes (``self.activate(h)``) and functions of the files those classes are defined in, each once.
    A helper that calls ``F.relu`` is as unrewritable as ``forward`` itself; code of other packages is not read."""
    classes = [k for k in type(m).__mro__ if k is not object and not k.__module__.startswith("torch")]
    files = {k.__module__ for k in classes}
    todo, seen, out = [type(m).forward], set(), []
    while todo:
        fn = inspect.unwrap(todo.pop())
        code = getattr(fn, "__code__", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        out.append(fn)
        names = set(code.co_names) | {n for c in code.co_consts if inspect.iscode(c) for n in c.co_names}
        for name in sorted(names):
            for klass in classes:  # a method, static or class method of the module's own classes
                member = vars(klass).get(name)
                member = getattr(member, "__func__", member)
                if inspect.isfunction(member):
                    todo.append(member)
                    break
            value = getattr(fn, "__globals__", {}).get(name)
            if inspect.isfunction(value) and value.__module__ in files:
                todo.append(value)
    return out


def _source_mentions_relu(m: nn.Module, path: str) -> None:
    """Refuse an untraceable module whose forward source (or a helper of its own it calls) calls relu;
    pass one that does not."""
    forward = inspect.unwrap(type(m).forward)
    for fn in _forward_code(m) or [forward]:  # a forward without Python code: its source is asked for, and missing
        try:
            lines, start = inspect.getsourcelines(fn)
            file = inspect.getsourcefile(fn)
        except (OSError, TypeError) as err:
            if fn is not forward:
                continue  # a helper without source (a compiled extension's): no Python relu call to rewrite either
            raise RefusedError(
                f"swap_activations: {_label(path)} ({type(m).__name__}) cannot be traced by torch.fx and its "
                "source is unavailable, so functional relu calls in its forward cannot be ruled out; nothing was changed"
            ) from err
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0]
            if _RELU_SOURCE.search(code):
                name = f"{type(m).__name__}.forward" if fn is forward else fn.__qualname__.rpartition("<locals>.")[2]
                called = "" if fn is forward else f", called from {type(m).__name__}.forward"
                raise RefusedError(
                    f"swap_activations: functional relu call at {file}:{start + i} in {_label(path)} "
                    f"({name}{called}) cannot be rewritten: torch.fx cannot trace that module; "
                    "use an nn.ReLU module there; nothing was changed"
                )


def _lecun(model: nn.Module, gen: torch.Generator | None) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]]:
    """LeCun-normal weights ``N(0, 1/fan_in)`` and zero bias for every Linear/Conv (what SELU assumes).

    A layer whose weight or bias is computed from other tensors is refused: writing the computed
    tensor changes a temporary (a parametrization) or is undone by the next forward (hook-based
    ``weight_norm`` / ``spectral_norm``, ``torch.nn.utils.prune``), so the layer would be listed as
    re-initialised while keeping its old weights.
    """
    plans = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            # The reason first: reading a spectral-normed weight in training mode runs a power iteration on its buffers.
            reason = computed_weight_reason(path, m)
            plain = [] if reason else [n for n in ("weight", "bias") if n not in m._parameters and getattr(m, n, None) is not None]
            if plain:
                reason = (
                    f"'{path}'.{plain[0]} is not a parameter of its own (e.g. torch.nn.utils.prune recomputes it "
                    "from weight_orig before every forward), so an edit would not hold"
                )
            if reason is not None:
                raise RefusedError(
                    f"swap_activations: selu_init=True cannot re-initialise {repr(path) if path else 'the model'} ({type(m).__name__}): "
                    f"{reason}; remove the parametrization or hook first, or pass selu_init=False; nothing was changed"
                )
            w = m.weight
            new = torch.randn(tuple(w.shape), generator=gen, dtype=torch.float32) / math.sqrt(w[0].numel())
            bias = torch.zeros_like(m.bias) if m.bias is not None else None
            plans.append((path, m, new.to(w.device, w.dtype), bias))
    return plans


def swap_activations(
    model: nn.Module,
    to: str = "leaky_relu",
    *,
    copy: bool = False,
    negative_slope: float = 0.01,
    selu_init: bool = False,
    report: Report | None = None,
    generator: torch.Generator | None = None,
) -> SwapResult:
    """Replace every ReLU — modules and functional calls, in-place ones included — by another activation.

    * ``nn.ReLU`` modules (and ``nn.Threshold(0, 0)``) are replaced in their parent module.
    * Functional calls in a module's own ``forward`` (``F.relu``, ``x.relu_()``, and ReLUs spelled
      ``x.clamp(min=0)``, ``clamp_min(0)``, ``F.threshold(x, 0, 0)``) are rewritten with torch.fx: that
      module becomes a ``torch.fx.GraphModule`` holding the same parameters, calling a
      new activation submodule (``swapped_act_<k>``) where ``relu`` was called.
    * An ``activation=F.relu`` attribute (``nn.TransformerEncoderLayer``) is replaced.

    ``"prelu"`` gets one slope per channel where the width is known: from ``report``
    (when given) or from the Linear/Conv/BatchNorm feeding the ReLU; a ReLU module used
    at several places, or of unknown width, gets one shared slope. GELU and PReLU have
    no in-place form: an ``nn.ReLU(inplace=True)`` module is replaced out of place (its
    return value is what ``forward`` uses), while an in-place functional call is kept
    in place with an explicit ``copy_``.

    Args:
        model: the model to change.
        to: one of ``"leaky_relu"``, ``"prelu"``, ``"elu"``, ``"selu"``, ``"gelu"``, ``"silu"``.
        copy: change a deep copy and leave ``model`` untouched.
        negative_slope: the LeakyReLU slope.
        selu_init: with ``to="selu"``, also give every Linear/Conv LeCun-normal weights
            (``N(0, 1/fan_in)``) and zero bias, which self-normalisation assumes.
        report: optional scan of ``model``: PReLU channel counts, and a check that every ReLU
            site it found is replaced (those that are not are listed in ``left_alone`` and warned of).
        generator: random generator for ``selu_init``.

    Returns:
        A :class:`SwapResult` with the changed model and the list of changes.

    Raises:
        RefusedError: a functional call cannot be rewritten (the root's own forward with
            ``copy=False``, an untraceable module that calls relu, a forward that branches on
            an optional argument's default), the model is TorchScript (or holds a scripted
            module that calls relu), ``selu_init=True`` meets a layer whose weight is computed
            (parametrization, weight/spectral norm, ``torch.nn.utils.prune``), or the model is an
            ``nn.ReLU`` itself with ``copy=False``; nothing is changed.
        DeadReluError: for an unknown ``to`` or a bad argument.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> result = deadrelu.swap_activations(net, to="leaky_relu")
        >>> result.changes[0].new
        'LeakyReLU(negative_slope=0.01)'
    """
    _check_swap_arguments(model, to, copy, selu_init, negative_slope, generator)
    if report is not None:
        check_report_matches(model, report, "swap_activations")
    if _is_relu_module(model):
        return _swap_root_relu(model, copy, to, negative_slope, report)
    _refuse_scripted(model)
    target = copy_model(model, "swap_activations") if copy else model
    plan = _plan_swaps(target, copy, to, report)
    selu_plans = _lecun(target, generator) if selu_init else []
    changes: list[ActivationChange] = []
    with Transaction("swap_activations") as tx:
        result_model = _write_swaps(target, plan, to, negative_slope, changes, tx)
        with torch.no_grad():
            for _, m, w, b in selu_plans:
                tx.save(m.weight)
                tx.save(m.bias)
                m.weight.copy_(w)
                if b is not None:
                    m.bias.copy_(b)
    left = _left_alone(report, plan) if report is not None else ()
    if left:
        warnings.warn(
            f"swap_activations: ReLU sites of the report left as they are (they still compute ReLU): {'; '.join(left)}",
            stacklevel=2,
        )
    return SwapResult(result_model, changes, tuple(p for p, *_ in selu_plans), left)


def _swap_root_relu(model: nn.Module, copy: bool, to: str, slope: float, report: Report | None) -> SwapResult:
    """The model is an ``nn.ReLU`` itself: it has no parent to be replaced in, so ``copy=True`` returns the
    new activation as ``result.model`` (the original is left as it is) and ``copy=False`` is refused."""
    if not copy:
        raise RefusedError(
            "swap_activations: the model itself is an nn.ReLU, which has no parent to be replaced in; pass "
            "copy=True to get the new activation as result.model, or wrap it; nothing was changed"
        )
    _refuse_unrewritable("", model, "would be replaced")
    widths = [s.units for s in report.sites if s.module == ""] if report is not None else []
    new = _new_activation(to, model.inplace and _has_inplace(to), widths[0] if len(widths) == 1 else None, slope, None)
    return SwapResult(new, [ActivationChange(_label(""), "module", repr(model), repr(new))])


def _refuse_scripted(model: nn.Module) -> None:
    """Refuse a TorchScript model, or a TorchScript submodule whose compiled code calls relu.

    Its code is compiled TorchScript: an ``nn.ReLU`` inside it is no Python module to replace and
    torch.fx cannot trace it. A scripted submodule without relu is left as it is (see :func:`_scripted_paths`).
    """
    for path, m in model.named_modules():
        if not isinstance(m, torch.jit.ScriptModule):
            continue
        where = f"'{path}' ({type(m).__name__}) is a TorchScript module" if path else (
            f"the model ({type(m).__name__}) is a TorchScript module"
        )  # fmt: skip
        try:
            calls = bool(path) and bool(_RELU_SOURCE.search(str(m.inlined_graph)))
        except Exception:  # no graph to read: relu calls cannot be ruled out
            calls = True
        if not path or calls:
            raise RefusedError(
                f"swap_activations: {where} (torch.jit.script / torch.jit.trace): its compiled code can be changed "
                "neither by replacing modules nor by a torch.fx rewrite; swap the activations of the nn.Module it was "
                "made from, then script that; nothing was changed"
            )


def _scripted_paths(model: nn.Module) -> tuple[str, ...]:
    """Paths of the TorchScript submodules (without relu, or :func:`_refuse_scripted` refused): left alone."""
    return tuple(path for path, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _check_swap_arguments(model: Any, to: str, copy: Any, selu_init: Any, negative_slope: Any, generator: Any) -> None:
    if not isinstance(to, str) or to not in TARGETS:
        raise DeadReluError(f"swap_activations: to must be one of {', '.join(TARGETS)}; got {to!r}")
    if not isinstance(model, nn.Module):
        raise DeadReluError(f"swap_activations: model must be a torch.nn.Module, not {type(model).__name__}")
    check_flag(copy, "copy", "swap_activations")
    check_flag(selu_init, "selu_init", "swap_activations")
    check_generator(generator, "swap_activations")
    if selu_init and to != "selu":
        raise DeadReluError("swap_activations: selu_init=True needs to='selu'")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise DeadReluError(f"swap_activations: negative_slope must be a finite number, got {negative_slope!r:.80}")
    try:
        finite = math.isfinite(negative_slope)
    except OverflowError:  # an int too large for a float (whose repr may be too long to print), as nudge_bias says
        raise DeadReluError(
            "swap_activations: negative_slope must be a finite number, got an int too large for a float"
        ) from None
    if not finite:
        raise DeadReluError(f"swap_activations: negative_slope must be a finite number, got {negative_slope!r}")


@dataclass
class _SwapPlan:
    """What :func:`swap_activations` replaces, found before anything is changed."""

    modules: list[tuple[str, nn.Module]]  # nn.ReLU modules, replaced in their parent
    attributes: list[tuple[str, nn.Module]]  # modules with an ``activation=F.relu`` attribute
    # modules whose own forward calls relu, with the constants their trace made (kept off the module)
    graphs: list[tuple[str, nn.Module, fx.Graph, list[fx.Node], dict[str, Any]]]
    like: torch.Tensor | None  # a parameter whose device/dtype new activations take
    widths: dict[str, int]  # PReLU channel counts per ReLU module path
    paths: dict[str, list[str]]  # every path of each rewritten module (a shared one has several)


def _left_alone(report: Report, plan: _SwapPlan) -> tuple[str, ...]:
    """The report's ReLU sites that no planned change covers: one line per module, saying why.

    A site in a replaced ReLU module or in a module whose ``activation`` attribute is replaced is
    covered. Functional sites are matched by count: a module call's ReLU sites (the trace unrolls
    a Python loop too) beyond the ReLU nodes rewritten in that module's forward are left. Which
    site is which node is not known, so the line names them all with how many are left."""
    replaced = {path for path, _ in plan.modules} | {path for path, _ in plan.attributes}
    nodes: dict[str, int] = {}
    for path, _, _, found, _ in plan.graphs:
        for where in plan.paths[path]:
            nodes[where] = len(found)
    calls: dict[str, dict[int, list[str]]] = {}
    types: dict[str, str] = {}
    for site in report.sites:
        if site.function == "relu" and site.module not in replaced:
            calls.setdefault(site.module, {}).setdefault(site.call, []).append(site.name)
            types[site.module] = site.module_type
    lines = []
    for path, per_call in calls.items():
        most = max(len(names) for names in per_call.values())
        missing = most - nodes.get(path, 0)
        if missing <= 0:
            continue
        names = ", ".join(name for call_names in per_call.values() for name in call_names)
        if types[path] in ("RNN", "RNNCell"):
            lines.append(f"{names} (the ReLU runs inside torch's fused {types[path]} op)")
        else:
            lines.append(
                f"{_label(path)}: {missing} of its {most} ReLU call(s) ({names}) found no call to rewrite "
                "(e.g. a clamp(min=0) of an indexed slice, which a trace cannot tell from part of a layer's features)"
            )
    return tuple(lines)


def _refuse_unrewritable(path: str, m: nn.Module, why: str) -> None:
    reason = unrewritable_reason(path, m)
    if reason is not None:
        where = f"'{path}'" if path else "<root>"
        raise RefusedError(f"swap_activations: {where} ({type(m).__name__}) {why}: {reason}; nothing was changed")


def _plan_swaps(target: nn.Module, copy: bool, to: str, report: Report | None) -> _SwapPlan:
    """Find every ReLU module, relu attribute and functional call, or refuse before any change."""
    scripted = _scripted_paths(target)
    everything = [(path, m) for path, m in target.named_modules(remove_duplicate=False) if not _inside(path, scripted)]
    modules = [(path, m) for path, m in everything if _is_relu_module(m) and path]
    for path, m in modules:
        _refuse_unrewritable(path, m, "would be replaced")
    attributes = [
        (path, m) for path, m in target.named_modules()
        if not _inside(path, scripted) and getattr(m, "activation", None) in (F.relu, torch.relu)
    ]  # fmt: skip
    graphs: list[tuple[str, nn.Module, fx.Graph, list[fx.Node], dict[str, Any]]] = []
    shared: dict[int, list[str]] = {}  # every path of a module reached from several parents
    for path, m in everything:
        if not _is_user_code(m):
            continue
        if id(m) in shared:
            shared[id(m)].append(path)
            continue
        shared[id(m)] = [path]
        try:
            graph, constants = trace_graph(_ShallowTracer(), m)
        except Exception:  # any trace failure: fall back to reading the source
            _source_mentions_relu(m, path)
            continue
        nodes = [n for n in graph.nodes if _is_relu_node(n)]
        if not nodes:
            continue
        if not path and not copy:
            where = ", ".join(f"'{n.name}'" for n in nodes)
            raise RefusedError(
                f"swap_activations: functional relu call(s) {where} in <root> ({type(m).__name__}.forward) cannot "
                "be rewritten in place; pass copy=True to get a torch.fx.GraphModule copy with them replaced, "
                "or use nn.ReLU modules; nothing was changed"
            )
        _refuse_unrewritable(path, m, "would be rewritten as a torch.fx.GraphModule")
        _refuse_python_state(path, m)
        _refuse_default_branches(path, m, graph, constants)
        graphs.append((path, m, graph, nodes, constants))
    like = next(iter(target.parameters()), None)
    widths = _module_widths(target, report) if to == "prelu" else {}
    return _SwapPlan(modules, attributes, graphs, like, widths, {p: shared[id(m)] for p, m, *_ in graphs})


# Names of grad-mode and precision contexts: an fx trace runs their code but records none of them,
# so a GraphModule would compute with grad on and in the default precision where they were.
_CONTEXTS = frozenset({"no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "autocast"})


def _code_names(fn: Any) -> set[str]:
    """The global and attribute names a function's code reads, nested functions and comprehensions included."""
    todo, names = [getattr(fn, "__code__", None)], set()
    while todo:
        code = todo.pop()
        if code is None:
            continue
        names.update(code.co_names)
        todo.extend(c for c in code.co_consts if inspect.iscode(c))
    return names


def _decorated_by_context(fn: Any) -> bool:
    """Whether a decorator around ``fn`` (``@torch.no_grad()``, ``@torch.autocast(...)``) holds a
    grad-mode or autocast context: one in its closure, itself or as the object of a bound method."""
    while fn is not None and hasattr(fn, "__wrapped__"):
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            for held in (value, getattr(value, "__self__", None)):
                if type(held).__module__.startswith(("torch.autograd.grad_mode", "torch.amp", "torch.cuda.amp", "torch.cpu.amp")):
                    return True
        fn = fn.__wrapped__
    return False


def _refuse_python_state(path: str, m: nn.Module) -> None:
    """A forward that reads ``self.training`` branches in Python: a trace keeps only the branch of
    the mode the model is in now (``F.dropout(..., training=self.training)`` would stay on in eval).
    A grad-mode or autocast context (``with torch.no_grad():``, ``@torch.autocast(...)`` on forward)
    is not recorded by the trace at all. Both are looked for in forward and the helpers of the
    module's own code that it calls (:func:`_forward_code`)."""
    forward = type(m).forward
    for fn in _forward_code(m) or [forward]:
        names = _code_names(fn)
        where = f"{type(m).__name__}.forward" if fn is inspect.unwrap(forward) else f"{fn.__qualname__}, called from {type(m).__name__}.forward"
        if "training" in names:
            raise RefusedError(
                f"swap_activations: {_label(path)} ({where}) reads self.training, and a "
                "torch.fx rewrite would freeze the branch of the current mode; use nn.ReLU modules there "
                "(replaced without tracing); nothing was changed"
            )
        context = sorted(names & _CONTEXTS)
        if context:
            raise RefusedError(
                f"swap_activations: {_label(path)} ({where}) uses torch.{context[0]}, which a torch.fx "
                "rewrite would drop (the GraphModule would compute with gradients on, in the default precision); "
                "use nn.ReLU modules there (replaced without tracing); nothing was changed"
            )
    if _decorated_by_context(forward):
        raise RefusedError(
            f"swap_activations: {_label(path)} ({type(m).__name__}.forward) is decorated by a grad-mode or autocast "
            "context, which a torch.fx rewrite would drop; use nn.ReLU modules there (replaced without tracing); "
            "nothing was changed"
        )


def _refuse_default_branches(path: str, m: nn.Module, graph: fx.Graph, constants: dict[str, Any]) -> None:
    """A forward that branches on an optional argument's default (``if scale is not None:``) traces the
    branch of a call that passes it (fx makes a proxy of it): the GraphModule would run that branch on
    every call, and fail or compute something else with the default."""
    retrace = lambda concrete: trace_graph(_ShallowTracer(), m, concrete)  # noqa: E731
    reason = default_branch_reason(m, graph, constants, retrace, type(m).__name__)
    if reason is not None:
        raise RefusedError(
            f"swap_activations: {_label(path)} ({type(m).__name__}) would be rewritten as a torch.fx.GraphModule, "
            f"but {reason}; use nn.ReLU modules there (replaced without tracing); nothing was changed"
        )


def _keep_members(gm: fx.GraphModule, m: nn.Module) -> None:
    """Give the GraphModule what a trace drops: parameters, buffers, submodules and plain attributes
    its forward does not read, and the methods of ``m``'s own classes (``aux_loss``, properties), so
    the state_dict, an optimizer's parameters and the module's other uses stay as they were."""
    for name, param in m._parameters.items():
        if not hasattr(gm, name):
            gm.register_parameter(name, param)
    for name, buf in m._buffers.items():
        if not hasattr(gm, name):
            gm.register_buffer(name, buf, persistent=name not in m._non_persistent_buffers_set)
    for name, child in m._modules.items():
        if not hasattr(gm, name):
            gm.add_module(name, child)
    for name, value in vars(m).items():
        if not name.startswith("_") and name not in gm.__dict__:
            gm.__dict__[name] = value
    cls = type(gm)  # fx makes a class per GraphModule: adding to it touches no other module
    for base in reversed(type(m).__mro__):
        if base is object or base.__module__.startswith("torch"):
            continue
        for name, member in vars(base).items():
            if name.startswith("__") or name == "forward" or hasattr(fx.GraphModule, name):
                continue
            setattr(cls, name, member)


def _write_swaps(
    target: nn.Module, plan: _SwapPlan, to: str, slope: float, changes: list[ActivationChange], tx: Transaction
) -> nn.Module:
    """Replace modules, attributes and functional calls; returns the (possibly new) root."""
    like = plan.like
    for path, m in plan.modules:
        parent_path, _, name = path.rpartition(".")
        parent = eager_submodule(target, parent_path)
        new = _new_activation(to, m.inplace and _has_inplace(to), plan.widths.get(path), slope, like)
        tx.setattr(parent, name, new)
        changes.append(ActivationChange(path, "module", repr(m), repr(new)))
    for path, m in plan.attributes:
        new = _new_activation(to, False, None, slope, like)
        tx.setattr(m, "activation", new)
        if hasattr(m, "activation_relu_or_gelu"):
            # The fused fast path of nn.TransformerEncoderLayer would still apply ReLU.
            tx.setattr(m, "activation_relu_or_gelu", 0)
        changes.append(ActivationChange(f"{path}.activation" if path else "activation", "attribute", "F.relu", repr(new)))
    result_model = target
    # Deepest modules first, so a parent's GraphModule picks up its rewritten children.
    def depth(g: tuple[str, nn.Module, fx.Graph, list[fx.Node], dict[str, Any]]) -> int:
        return max(p.count(".") + bool(p) for p in plan.paths[g[0]])

    for path, m, graph, nodes, constants in sorted(plan.graphs, key=lambda g: -depth(g)):
        gm = _rewrite(m, graph, nodes, constants, to, slope, like, path, changes)
        _keep_members(gm, m)
        for where in plan.paths[path]:  # a shared module stays one module at all its paths
            if where:
                parent_path, _, name = where.rpartition(".")
                tx.setattr(eager_submodule(target, parent_path), name, gm)
            else:
                result_model = gm
    return result_model


def _rewrite(
    m: nn.Module,
    graph: fx.Graph,
    nodes: list[fx.Node],
    constants: dict[str, Any],
    to: str,
    slope: float,
    like: torch.Tensor | None,
    path: str,
    changes: list[ActivationChange],
) -> fx.GraphModule:
    """A GraphModule of ``m`` whose relu nodes call new activation submodules."""
    with leaves_no_attributes(m):  # the trace's constants go into the GraphModule, not back onto ``m``
        vars(m).update(constants)
        gm = fx.GraphModule(m, graph, class_name=type(m).__name__)
    modules = dict(gm.named_modules())
    for k, node in enumerate(nodes):
        src = node.args[0] if node.args else node.kwargs.get("input")
        # An in-place call stays in place: its input may be read again, directly or as the base of
        # a view (h[:, :4].relu_() rectifies part of h, and the view itself is never read again).
        inplace = inplace_call(node)
        act = _new_activation(to, inplace and _has_inplace(to), _width(src, modules), slope, like)
        name = f"swapped_act_{k}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, act)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (src,))
        final = new
        if inplace and not _has_inplace(to):
            # act(x.clone()) then x.copy_(...): the activation's saved input is not overwritten.
            with gm.graph.inserting_before(new):
                twin = gm.graph.call_method("clone", (src,))
            new.args = (twin,)
            with gm.graph.inserting_after(new):
                final = gm.graph.call_method("copy_", (src, new))
        old = f".{node.target}()" if node.op == "call_method" else f"{getattr(node.target, '__module__', 'torch')}.{node.target.__name__}"  # type: ignore[union-attr]
        node.replace_all_uses_with(final)
        gm.graph.erase_node(node)
        changes.append(ActivationChange(f"{_label(path)}:{node.name}", "function", old, repr(act)))
    gm.graph.lint()
    gm.recompile()
    # The GraphModule's own flag only: gm.train() would also set every child's, undoing a frozen
    # BatchNorm's eval() inside a model in training (the children are m's own, flags as they were).
    gm.training = m.training
    for name, act in gm.named_children():
        if name.startswith("swapped_act_"):
            act.training = m.training
    return gm
