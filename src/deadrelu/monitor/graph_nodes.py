"""What a compiled graph's nodes say about their source: stack-trace frames, recorded example
values, the anchor parameter, and the code spans of functions those frames are matched against
(helpers of the graph capture's modules)."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

from torch import fx, nn


STACK_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def node_position(node: fx.Node) -> str:
    """The innermost source frame of a graph node (``file:line:function``), from its stack trace."""
    frames = STACK_FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line, function = frames[-1]
    return f"{file}:{line}:{function}"


def example(node: fx.Node) -> Any:
    """The real value TorchDynamo recorded for a graph input (a parameter, a buffer, the batch), or None."""
    try:
        return getattr(node.meta.get("grapharg"), "example", None)
    except Exception:  # a graph argument without a real value (a symbolic size)
        return None


def graph_anchor(graph: fx.Graph) -> fx.Node | None:
    """The graph input the observe op checks the running instance by: a parameter of as few
    dimensions as possible (Inductor may hand a convolution a re-laid-out copy of its 4-D
    weight, but passes biases and matrices as they are)."""
    params = [n for n in graph.nodes if n.op == "placeholder" and isinstance(example(n), nn.Parameter)]
    return min(params, key=lambda n: example(n).ndim, default=None)


def is_weight(node: fx.Node) -> bool:
    """An activation applied to a parameter or buffer is not a unit of the network."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return False
    if first.op == "get_attr":
        return True
    return first.op == "placeholder" and ("_parameters_" in first.name or "_buffers_" in first.name)


def in_span(node: fx.Node, span: tuple[str, int, int]) -> bool:
    """Whether a node's innermost source frame lies in a function's code (``span``)."""
    frames = STACK_FRAME.findall(node.meta.get("stack_trace") or "")
    return bool(frames) and frames[-1][0] == span[0] and span[1] <= int(frames[-1][1]) <= span[2]


def hook_function(hook: Any) -> Any:
    """The function whose code a hook runs: itself, a partial's function or a callable's ``__call__``."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    if getattr(hook, "__code__", None) is None:
        hook = getattr(hook, "__func__", None) or getattr(type(hook), "__call__", None)
    return getattr(hook, "__func__", hook)


def code_span(function: Any) -> tuple[str, int, int] | None:
    """(file, first line, last line) of a function's source, or None."""
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno)


def function_span(obj: Any) -> tuple[str, int, int] | None:
    """:func:`code_span` of a class attribute that is a function (a static or class method's too)."""
    function = getattr(obj, "__func__", obj)
    if not callable(function) or getattr(function, "__code__", None) is None and not hasattr(function, "__wrapped__"):
        return None
    try:
        return code_span(inspect.unwrap(function))
    except ValueError:  # a __wrapped__ cycle
        return None
