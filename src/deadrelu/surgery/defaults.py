"""Optional forward arguments and torch.fx: is the traced graph the one a call with the defaults runs?

``torch.fx`` makes a proxy of every argument of the traced module's ``forward``, those with a
default too. Code that asks *which* value it got — ``if offset is None:``, ``isinstance(mask,
torch.Tensor)`` — sees the proxy, never the default, so the trace records the branch of a call
that passes the argument, while the usual call (with the default) runs the other one. Nothing in
the graph shows it: the proof would hold for a program the model does not run, and a GraphModule
made from that trace fails or computes something else when called with the default.

:func:`default_branch_reason` traces the module a second time with its defaults as fx's
``concrete_args`` and compares the two graphs op by op, the proxies of the defaults standing for
their values. The same graph means forward does not branch on them; a different graph (or a
second trace that fails) is the reason surgery gives for refusing.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.utils._pytree import tree_flatten

from ..core.inputs import error_summary

__all__ = ["plain_defaults", "default_branch_reason"]

# The checks fx adds for a concrete argument (and torch._assert in user code): they compute no value.
_ASSERTS = tuple(f for f in (torch._assert, getattr(_symbolic_trace, "_assert_is_none", None)) if f is not None)
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)

# A retrace: concrete_args -> (graph, the tensor constants the trace stored on the module).
Retrace = Callable[[dict[str, Any]], tuple[fx.Graph, dict[str, Any]]]


def _plain(value: Any) -> bool:
    """Whether ``value`` is a default fx can specialise on: None, a number, a string, a dtype/device, tuples of them."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def plain_defaults(module: nn.Module) -> dict[str, Any]:
    """The parameters of ``module.forward`` that have a plain default (see :func:`_plain`), by name.

    A tensor or object default is left out: fx cannot specialise on it, so it stays a proxy in both traces.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x, offset=None, scale=1.0, w=torch.ones(1)):
        ...         return x
        >>> plain_defaults(Net())
        {'offset': None, 'scale': 1.0}
    """
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or C++ forward: nothing to specialise
        return {}
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if p.kind not in skip and p.default is not inspect.Parameter.empty and _plain(p.default)
    }


def _value(a: Any, index: dict[fx.Node, int], substitute: dict[str, Any]) -> Any:
    """A comparable form of a node argument: nodes by position, a default's proxy by its value."""
    if isinstance(a, fx.Node):
        if a.op == "placeholder":
            return substitute[a.target] if a.target in substitute else ("arg", a.target)
        return ("node", index[a]) if a in index else ("skipped", a.name)
    if isinstance(a, (tuple, list)):
        return (type(a).__name__, tuple(_value(v, index, substitute) for v in a))
    if isinstance(a, dict):
        return ("dict", tuple((k, _value(v, index, substitute)) for k, v in a.items()))
    if isinstance(a, slice):
        return ("slice", _value(a.start, index, substitute), _value(a.stop, index, substitute), _value(a.step, index, substitute))
    if isinstance(a, torch.Tensor):
        return ("tensor", id(a))
    return (type(a).__name__, repr(a))  # repr: NaN equals NaN, 1 differs from True


def _tensor_key(t: torch.Tensor) -> Any:
    """A tensor constant by value (two traces store different objects for the same constant)."""
    t = t.detach().cpu().contiguous()
    return ("constant", t.dtype, tuple(t.shape), tuple(t.reshape(-1).view(torch.uint8).tolist()) if t.numel() else ())


def _canonical(graph: fx.Graph, constants: dict[str, Any], substitute: dict[str, Any]) -> list[Any]:
    """The graph's value-computing nodes in order: (op, target, args, kwargs), placeholders and asserts left out."""
    nodes = list(graph.nodes)
    skip = {n for n in nodes if n.op == "call_function" and n.target in _ASSERTS}
    for n in reversed(nodes):  # `arg == default`, made only for the assert that follows it
        if n.op == "call_function" and n.target is operator.eq and n.users and all(u in skip for u in n.users):
            skip.add(n)
    index: dict[fx.Node, int] = {}
    out: list[Any] = []
    for n in nodes:
        if n.op == "placeholder" or n in skip:
            continue
        target: Any = n.target
        if n.op == "get_attr" and isinstance(constants.get(str(target)), torch.Tensor):
            target = _tensor_key(constants[str(target)])
        args = _output_form(graph, n) if n.op == "output" else n.args
        index[n] = len(out)
        out.append((n.op, target, _value(args, index, substitute), _value(n.kwargs, index, substitute)))
    return out


def _output_form(graph: fx.Graph, node: fx.Node) -> tuple[Any, ...]:
    """The output node's values, flattened, and their structure: a trace with ``concrete_args`` returns a
    flat list and keeps the structure in its code generator, a plain trace returns the structure itself."""
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        return (list(node.args[0]), str(info.out_spec))
    leaves, spec = tree_flatten(node.args[0])
    return (leaves, str(spec))


def _differs(graph: fx.Graph, constants: dict[str, Any], defaults: dict[str, Any], retrace: Retrace) -> bool:
    """Whether tracing with ``defaults`` concrete gives another graph than ``graph`` (proxies for all)."""
    substitute = {name: _value(v, {}, {}) for name, v in defaults.items()}
    other, other_constants = retrace(dict(defaults))
    return _canonical(graph, constants, substitute) != _canonical(other, other_constants, {})


def default_branch_reason(
    module: nn.Module, graph: fx.Graph, constants: dict[str, Any], retrace: Retrace, label: str
) -> str | None:
    """Why ``graph`` (``module`` traced with a proxy for every argument) is not what a call with the
    defaults runs, naming the arguments; None when forward does not branch on its defaults.

    Args:
        module: the traced module.
        graph: its trace with every argument a proxy.
        constants: the tensor constants that trace stored (``_tensor_constant<k>``), compared by value.
        retrace: traces ``module`` again with the given ``concrete_args``, returning the graph and its constants.
        label: how to name the module in the reason.
    """
    defaults = plain_defaults(module)
    if not defaults:
        return None
    try:
        if not _differs(graph, constants, defaults, retrace):
            return None
    except Exception as err:  # fx raises many types for code it cannot trace with the defaults
        return (
            f"{label}.forward has optional argument(s) {_named(defaults)}, and torch.fx cannot trace it with "
            f"their defaults ({type(err).__name__}: {error_summary(err)}), though it can with them as proxies: "
            "forward branches on them, so the traced graph is not what a call with the defaults runs"
        )
    culprits = {}
    for name, value in defaults.items():  # name the argument(s) that change the graph alone, if any does
        try:
            if _differs(graph, constants, {name: value}, retrace):
                culprits[name] = value
        except Exception:  # this default alone cannot be traced: it is one that matters
            culprits[name] = value
    return (
        f"{label}.forward branches on its optional argument(s) {_named(culprits or defaults)}: torch.fx traces "
        "an argument as a proxy, never as its default, so the traced graph is not what a call with the default "
        "runs (`if arg is None:` sees a proxy and takes the other branch)"
    )


def _named(defaults: dict[str, Any]) -> str:
    return ", ".join(f"'{name}' (default {value!r})" for name, value in defaults.items())
