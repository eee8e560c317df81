"""Which expert of a stacked weight an activation counts, read from a compiled graph and from autograd.

Experts stacked in one 3-D weight (``experts.gate_up_proj[e]``): in a graph, an activation's
input may come from ``w[e]`` with ``e`` a constant or a symbolic int (:func:`expert_route`), or
from a graph input whose autograd history names the expert when the graph runs
(:func:`expert_of_input`). :func:`route_args` turns a graph's routes into the observe op's
arguments, :func:`expert_at_run_time` reads them back (see
:func:`deadrelu.monitor.graph_ops._dispatch`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import fx, nn

from .graph_nodes import example


class Expert(NamedTuple):
    """The expert one run of a routable site counts: slice ``index`` of ``slices`` of a stacked
    weight (``weight``: that parameter, where the run's autograd history named it)."""

    index: int
    slices: int
    weight: Optional[torch.Tensor] = None


class Route(NamedTuple):
    """Where a graph's activation gets its expert: ``index`` (an int: a loop Dynamo unrolled; a node
    of a symbolic int: the expert is the graph's input) of a stacked weight of ``slices`` experts
    (``input``: that weight's graph input), or, without ``index``, ``input``, the graph input whose
    autograd history says it at run time."""

    index: Any = None
    slices: int = 0
    input: Optional[fx.Node] = None


_MATMULS = ("linear", "matmul", "mm", "__matmul__")


def expert_route(node: fx.Node, depth: int = 4) -> Route | None:
    """Where an activation node's expert comes from: its input comes (through at most ``depth`` ops,
    by their first input) from a linear or matmul with slice ``e`` of a 3-D parameter — ``e`` a
    constant (``F.linear(x, experts.w[e])`` in a loop Dynamo unrolled) or a symbolic int (a helper
    compiled once for every expert) — or from an input of the graph (whose history, at run time,
    may name one, see :func:`expert_of_input`); else None. The graph's reading of the eager
    capture's :class:`~deadrelu.core.unit_axis.WeightSlice`."""
    current = _first_input(node)
    for _ in range(depth):
        if not isinstance(current, fx.Node):
            return None
        if current.op == "placeholder":
            return Route(input=current)
        if current.op not in ("call_function", "call_method"):
            return None
        name = getattr(current.target, "__name__", str(current.target))
        if name in _MATMULS:
            found = [r for r in (_slice_route(a) for a in current.args[:2]) if r is not None]
            return found[0] if found else None
        current = _first_input(current)
    return None


def _first_input(node: fx.Node) -> fx.Node | None:
    """The first node among a node's arguments (``0.5 * x`` reads ``x``)."""
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


def _slice_route(node: Any) -> Route | None:
    """``e`` where ``node`` is ``w[e]`` (possibly transposed) of a 3-D parameter input, with ``e`` a
    constant or a node of a symbolic int."""
    for _ in range(2):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            return None
        name = getattr(node.target, "__name__", str(node.target))
        source = node.args[0] if node.args else None
        if name in ("getitem", "__getitem__", "select"):
            index = node.args[-1] if len(node.args) > 1 else None
            if name == "select" and len(node.args) == 3 and node.args[1] != 0:
                return None  # a slice along another dim
            value = example(source) if isinstance(source, fx.Node) else None
            weight = isinstance(source, fx.Node) and (
                source.op == "get_attr" or (source.op == "placeholder" and "_parameters_" in source.name)
            )
            if not weight or not isinstance(value, torch.Tensor) or value.ndim != 3:
                return None
            if type(index) is int:
                return Route(index % value.shape[0], value.shape[0])
            if isinstance(index, fx.Node) and isinstance(index.meta.get("example_value"), torch.SymInt):
                return Route(index, value.shape[0], source if source.op == "placeholder" else None)
            return None
        if name not in ("t", "transpose", "permute"):
            return None
        node = source
    return None


def route_args(routes: list[Route | None]) -> tuple[list[Any], list[fx.Node]]:
    """The observe op's ``routes`` and ``inputs`` arguments for a graph's sites (see :func:`_dispatch`)."""
    flat: list[Any] = []
    inputs: list[fx.Node] = []
    for route in routes:
        if route is None:
            flat += [0, 0, 0]
            continue
        flat += [-1, 0, len(inputs)] if route.index is None else [route.slices, route.index, len(inputs)]
        inputs.append(route.input)
    return flat, inputs


def expert_at_run_time(kind: int, index: Any, t: torch.Tensor) -> Expert | None:
    """The expert one run of a routable site counts (see :func:`_dispatch`), or None."""
    if kind > 0:
        return Expert(int(index) % kind, kind, t)
    return expert_of_input(t)


# Autograd nodes a stacked weight's slice passes through on its way into a matmul (a transpose, and
# autocast's cast); matmuls as autograd records them (F.linear of a 2-D input is an mm or addmm).
_WEIGHT_GRADS = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ToCopyBackward0", "AliasBackward0"})


_MATMUL_GRADS = frozenset({"MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0", "LinearBackward0"})


def expert_of_input(t: torch.Tensor, depth: int = 4) -> Expert | None:
    """The expert a graph input came from, read from its autograd history (eager code made it:
    ``act_fn(x[rows] @ w[e].T)`` in an experts loop Dynamo could not compile): through at most
    ``depth`` ops (by their first input) a matmul one of whose operands is ``w[e]`` (a select along
    dim 0, possibly transposed or cast) of a 3-D parameter — the run-time reading of
    :func:`expert_route`. None without such a history (no gradients, or frozen experts).

    Example:
        >>> w = torch.nn.Parameter(torch.randn(4, 6, 3))
        >>> h = torch.randn(5, 3, requires_grad=True) @ w[2].T
        >>> expert_of_input(h)[:2], expert_of_input(h.detach())
        ((2, 4), None)
    """
    fn = getattr(t, "grad_fn", None)
    for _ in range(depth):
        if fn is None:
            return None
        if type(fn).__name__ in _MATMUL_GRADS:
            found = {e for e in (_selected_expert(f) for f, _ in fn.next_functions) if e is not None}
            return found.pop() if len(found) == 1 else None
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return None


def _selected_expert(fn: Any) -> Expert | None:
    """The expert where autograd node ``fn`` is ``w[e]`` of a 3-D parameter ``w`` (see :func:`expert_of_input`)."""
    for _ in range(3):
        if fn is None:
            return None
        name = type(fn).__name__
        if name == "SelectBackward0":
            leaf = fn.next_functions[0][0] if fn.next_functions else None
            weight = getattr(leaf, "variable", None)
            if getattr(fn, "_saved_dim", None) != 0 or not isinstance(weight, nn.Parameter) or weight.ndim != 3:
                return None
            return Expert(int(fn._saved_index) % weight.shape[0], weight.shape[0], weight)
        if name not in _WEIGHT_GRADS:
            return None
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return None
