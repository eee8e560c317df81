"""The model as torch.fx traces it, and where the scan's activation sites are in that graph.

:func:`traced` traces a model symbolically, leaving it exactly as it was (fx adds constants and
re-registers buffers on the modules it traces; :func:`leaves_no_attributes` undoes that), and refuses
what cannot be traced faithfully: a TorchScript module, dynamic code fx fails on, a root forward that
branches on an optional argument's default. While tracing it records the parameters and buffers that
forward computes with eagerly, which fx would bake into the graph as constants.

:func:`site_nodes` then finds each scanned site in the graph. The mapping mirrors
:mod:`deadrelu.core.capture`: an activation call belongs to the innermost module whose ``forward``
made it, ``call`` counts that module's invocations (fx marks the k-th as ``path@k``), and ``slot``
counts activation calls made directly by that invocation. A hand-written activation module the scan
recognises by its class stays one call in the trace (:func:`whole_activation`), as it is one site.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..core.activations import (
    ACTIVATION_FUNCTIONS, ACTIVATION_MODULES, RELU_SPELLINGS, base_name, called_activation, function_of_module,
)  # fmt: skip
from ..core.inputs import error_summary
from ..errors import RefusedError
from .defaults import default_branch_reason

__all__ = [
    "trace", "traced", "trace_graph", "leaves_no_attributes", "scripted_reason", "whole_activation", "site_nodes",
    "activation_name", "reads_weight", "describe_node", "made_inside", "storage_key", "storage_names", "holds_part",
    "inplace_call",
]  # fmt: skip


def activation_name(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation base name a node computes (``"relu"`` for ``relu_`` and ``clamp(min=0)`` too), or None."""
    if node.op == "call_module":
        return function_of_module(modules[node.target]) if node.target in modules else None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
    elif node.op == "call_method":
        name = node.target
    else:
        return None
    if not isinstance(name, str):
        return None
    base = base_name(name)
    if base not in ACTIVATION_FUNCTIONS and base not in RELU_SPELLINGS:
        return None
    if base in RELU_SPELLINGS and _integer_valued(node.args[0] if node.args else node.kwargs.get("input")):
        return None  # index.clamp(min=0): the scan sees its integer dtype and makes no site of it
    if base in RELU_SPELLINGS and holds_part(node.args[0] if node.args else node.kwargs.get("input")):
        return None  # (rb - lt).clamp(min=0) of box corners: no site in the scan (AxisTable.parts)
    return called_activation(base, node.args, dict(node.kwargs))  # clamp(min=0) is relu, hardtanh(0, 6) relu6


# What a symbolic trace cannot see, read from the ops that made a value: integer (or bool) results,
# and ops whose result is integer when every tensor operand is.
_INTEGER_RESULTS = frozenset(
    {"long", "int", "short", "byte", "char", "bool", "argmax", "argmin", "argsort", "nonzero", "searchsorted",
     "bucketize", "count_nonzero", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
     "logical_xor", "isnan", "isinf", "isfinite", "size", "numel", "dim", "randint", "randperm", "__eq__", "__ne__",
     "__lt__", "__le__", "__gt__", "__ge__", "eq_", "ne_", "lt_", "le_", "gt_", "ge_", "floor_divide"}
)  # fmt: skip
_INTEGER_PRESERVING = frozenset(
    {"add", "sub", "mul", "neg", "abs", "floordiv", "mod", "remainder", "iadd", "isub", "imul", "__add__", "__sub__",
     "__mul__", "__radd__", "__rsub__", "__rmul__", "__floordiv__", "__mod__", "__neg__", "__abs__", "getitem",
     "__getitem__", "view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "t", "transpose",
     "permute", "contiguous", "clone", "repeat", "flip", "roll", "cumsum", "sum", "max", "min", "amax", "amin",
     "maximum", "minimum", "clamp", "clamp_min", "clamp_max", "clip", "where", "cat", "stack", "unique",
     "masked_fill", "detach", "to", "type", "cuda", "cpu", "arange", "zeros", "ones", "full", "zeros_like",
     "ones_like", "full_like", "empty", "empty_like", "tensor", "as_tensor"}
)  # fmt: skip
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _integer_valued(value: Any, depth: int = 0) -> bool:
    """Whether a traced value is an integer or bool tensor (or a Python int), read from the ops that made
    it (``torch.arange(x.shape[-1])``, ``mask.long()``, ``idx - 1``); False where that is unknown."""
    if isinstance(value, bool) or isinstance(value, int):
        return True
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_integer_valued(v, depth + 1) for v in value)
    if not isinstance(value, fx.Node) or depth > 32:
        return False
    if value.op == "call_function" and value.target is getattr and value.args[1:] == ("shape",):
        return True  # x.shape and its entries
    if value.op not in ("call_function", "call_method"):
        return False
    name = value.target if value.op == "call_method" else getattr(value.target, "__name__", "")
    name = str(name).rstrip("_") if not str(name).startswith("__") else str(name)
    dtype = value.kwargs.get("dtype")
    if name in ("to", "type") or dtype is not None:
        given = dtype if dtype is not None else next((a for a in value.args[1:] if isinstance(a, torch.dtype)), None)
        if isinstance(given, torch.dtype):
            return not given.is_floating_point and not given.is_complex
    if name in _INTEGER_RESULTS:
        return True
    if name not in _INTEGER_PRESERVING:
        return False
    operands = [a for a in value.args if not isinstance(a, (str, torch.dtype, torch.device, type(None), slice))]
    if name in ("getitem", "__getitem__", "view", "reshape", "expand", "permute", "transpose", "repeat", "flip"):
        operands = operands[:1]  # the index or the sizes say nothing of the dtype
    if name in ("zeros", "ones", "empty"):
        return False  # the default dtype, whatever the sizes
    if name == "arange":  # arange(9) is int64, arange(0.0, 1.0) float
        numbers = [a for a in (*value.args, *(v for k, v in value.kwargs.items() if k in ("start", "end", "step")))]
        return all(_integer_valued(a, depth + 1) for a in numbers)
    if name == "full":  # full(size, fill_value): the fill value's type
        fill = value.args[1] if len(value.args) > 1 else value.kwargs.get("fill_value")
        return _integer_valued(fill, depth + 1)
    if name in ("tensor", "as_tensor"):
        return _integer_valued(value.args[0] if value.args else value.kwargs.get("data"), depth + 1)
    return bool(operands) and all(_integer_valued(a, depth + 1) for a in operands)


# What a symbolic trace cannot see either: whether a value holds only part of a layer's features
# (the scan's AxisTable.parts, which reads shapes). Read from the ops: a slice or int index, a pick,
# split or reduction makes a part; an op of parts alone stays one; reading a whole tensor (a layer's or
# module's output, an input) makes it whole again, as in rsqrt(var) * h. Without shapes an index on
# another dim (h[:, 0] of (B, T, C)) reads as a part too: such a clamp is then left as it is.
_PICKS = frozenset({"select", "narrow", "chunk", "split", "unbind", "index_select", "gather", "take", "topk", "tensor_split"})
_DIM_REDUCTIONS = frozenset(
    {"sum", "mean", "var", "std", "amax", "amin", "prod", "max", "min", "logsumexp", "norm", "median", "nansum",
     "nanmean", "std_mean", "var_mean", "aminmax", "count_nonzero"}
)  # fmt: skip


def holds_part(value: Any, depth: int = 0, seen: dict[fx.Node, bool] | None = None) -> bool:
    """Whether a traced value is part of a layer's features (see above); False where unknown."""
    if not isinstance(value, fx.Node) or depth > 64:
        return False
    seen = {} if seen is None else seen
    if value in seen:
        return seen[value]
    seen[value] = False  # (a cycle cannot occur in a graph; this bounds revisits)
    part = _holds_part(value, depth, seen)
    seen[value] = part
    return part


def _holds_part(node: fx.Node, depth: int, seen: dict[fx.Node, bool]) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False  # an input, a constant, a module's output: whole
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    name = str(name)
    base = name.rstrip("_") if not name.startswith("__") else name.strip("_")
    operands = [a for a in node.args if isinstance(a, fx.Node)] + [v for v in node.kwargs.values() if isinstance(v, fx.Node)]
    if base == "getitem":
        index = node.args[1] if len(node.args) > 1 else None
        items = index if isinstance(index, tuple) else (index,)
        picks = any((isinstance(i, int) and not isinstance(i, bool) and isinstance(index, tuple)) or
                    (isinstance(i, slice) and i != slice(None)) for i in items)  # fmt: skip
        # a plain int index is a tuple's item (out, h = rnn(x)): a part where the tuple is one (chunks)
        return picks or holds_part(node.args[0], depth + 1, seen)
    if base in _PICKS:
        return True
    if base in _DIM_REDUCTIONS and (len(node.args) > 1 or "dim" in node.kwargs):
        second = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(second, fx.Node):  # max(a, b) of two tensors is elementwise
            return True
    if base in _LAYER_CALLS or not operands:
        return False
    if base in _LAYOUT_CALLS:
        operands = operands[:1]  # h.view(x.size(0), -1): the sizes are no features
    flags = [holds_part(a, depth + 1, seen) for a in operands]
    return any(flags) and all(flags)


_LAYOUT_CALLS = frozenset({"view", "reshape", "expand", "expand_as", "permute", "transpose", "repeat", "flip",
                           "unsqueeze", "squeeze", "flatten", "contiguous", "to", "type", "float", "double", "half",
                           "bfloat16", "clone", "detach", "view_as", "reshape_as", "movedim", "unflatten", "t"})  # fmt: skip
_LAYER_CALLS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                          "conv_transpose3d", "matmul", "mm", "bmm", "addmm", "einsum", "embedding", "layer_norm",
                          "batch_norm", "group_norm", "instance_norm", "rms_norm", "__matmul__"})  # fmt: skip


def describe_node(node: fx.Node) -> str:
    """A short human description of a graph node for error messages."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the model output"
    return f"{node.op} {node.target}"


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """``id`` of each parameter and buffer of ``model`` -> its first dotted name."""
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), name)
    return names


def storage_key(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (0 where it has none: meta, sparse, a tensor subclass)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except Exception:  # no storage to compare
        return 0


def storage_names(model: nn.Module) -> dict[int, str]:
    """Storage address of each parameter and buffer of ``model`` -> its first dotted name."""
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        key = storage_key(t)
        if key:
            names.setdefault(key, name)
    return names


class _EagerReads(TorchFunctionMode):
    """Records the parameters and buffers that forward computes with eagerly while torch.fx traces it.

    fx makes proxies only of the input and of attributes read through ``Module.__getattr__``; a
    tensor reached otherwise (``self.parameters()``, a buffer, a plain attribute aliasing a weight)
    is real, so an op on it alone runs once at trace time and its result is baked into the graph as
    a constant. Such an op is one whose arguments hold no proxy and some tensor of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._ids = _tensor_names(model)
        self._storages = storage_names(model)
        self.found: dict[str, str] = {}  # tensor name -> the op that read it

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if func is not torch.Tensor.__hash__ and not any(isinstance(v, fx.Proxy) for v in leaves):
            for v in leaves:
                if isinstance(v, torch.Tensor) and not isinstance(v, fx.Proxy):
                    name = self._ids.get(id(v)) or self._storages.get(storage_key(v))
                    if name is not None:
                        self.found.setdefault(name, getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@contextmanager
def leaves_no_attributes(model: nn.Module) -> Iterator[None]:
    """Undo what tracing adds to ``model``'s modules (fx stores constants as ``_tensor_constant<k>``
    attributes on the traced root, and re-registers a leaf's buffer read directly as persistent)."""
    # A TorchScript module keeps its members in C++ (its _buffers is a read-only wrapper): fx cannot add to it.
    saved = [
        (m, set(vars(m)), dict(m._buffers), dict(m._parameters), dict(m._modules), set(m._non_persistent_buffers_set))
        for m in model.modules()
        if not isinstance(m, torch.jit.ScriptModule)
    ]
    try:
        yield
    finally:
        for m, names, buffers, params, children, non_persistent in saved:
            for name in set(vars(m)) - names:
                del m.__dict__[name]
            for now, before in ((m._buffers, buffers), (m._parameters, params), (m._modules, children)):
                if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                    now.clear()
                    now.update(before)
            if m._non_persistent_buffers_set != non_persistent:
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)


def trace_graph(
    tracer: fx.Tracer, model: nn.Module, concrete_args: dict[str, Any] | None = None
) -> tuple[fx.Graph, dict[str, Any]]:
    """``tracer.trace(model, concrete_args)``, leaving ``model`` as it was; returns the graph and the
    constants the trace stored on ``model`` (``_tensor_constant<k>``), which a GraphModule of it needs."""
    before = set(vars(model))
    with leaves_no_attributes(model):
        graph = tracer.trace(model, concrete_args=concrete_args)
        constants = {k: v for k, v in vars(model).items() if k not in before}
    return graph, constants


def whole_activation(module: nn.Module) -> bool:
    """Whether the trace keeps ``module`` as one call: a hand-written activation the scan recognises by its
    class (transformers' ``XIELUActivation``, ``NewGELUActivation``, a :func:`~deadrelu.register_activation`
    class). The scan counts such a module's output as one site and nothing inside it; traced through, its
    forward is plain arithmetic (``torch.where``, ``tanh``) with no activation node to match the site.
    torch.nn's own activations are leaves anyway; a subclass of one is traced through, since its forward
    may add to what the class computes."""
    if isinstance(module, ACTIVATION_MODULES) or isinstance(module, nn.Threshold):
        return False
    return function_of_module(module) is not None


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping hand-written activation modules whole (see :func:`whole_activation`)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or whole_activation(m)


def scripted_reason(model: nn.Module) -> str | None:
    """Why torch.fx cannot trace ``model`` because it is, or holds, a TorchScript module; else None."""
    for path, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            which = "it is" if not path else f"its submodule '{path}' is"
            return (
                f"{which} a TorchScript module (torch.jit.script / torch.jit.trace), whose forward is compiled "
                "TorchScript code, not Python that torch.fx can trace"
            )
    return None


def traced(model: nn.Module, what: str) -> tuple[fx.GraphModule, dict[str, str]]:
    """Symbolically trace ``model`` or refuse, saying why the dataflow cannot be proven.

    ``model`` is left without the attributes fx adds to it. A forward that branches on an optional
    argument's default (``if offset is None:``, see :mod:`deadrelu.surgery.defaults`) is refused: fx
    traces the argument as a proxy, so the graph would be that of a call that passes it. Returns the
    GraphModule and, per parameter or buffer that forward computed with eagerly at trace time (see
    :class:`_EagerReads`), the op that read it.
    """
    scripted = scripted_reason(model)
    if scripted is not None:
        raise RefusedError(
            f"{what}: cannot trace {type(model).__name__} with torch.fx: {scripted}, so its dataflow cannot be "
            "proven; rescue the nn.Module it was made from, then script that; nothing was changed"
        )
    eager = _EagerReads(model)
    before = set(vars(model))
    try:
        with leaves_no_attributes(model):
            with eager:
                tracer = _Tracer()
                graph = tracer.trace(model)
            constants = {k: v for k, v in vars(model).items() if k not in before}
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) for dynamic code
        raise RefusedError(
            f"{what}: cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: "
            f"{error_summary(err)}), so its dataflow cannot be proven{_wrapper_advice(model)}; nothing was changed"
        ) from err
    retrace = lambda concrete: trace_graph(_Tracer(), model, concrete)  # noqa: E731
    branches = default_branch_reason(model, graph, constants, retrace, type(model).__name__)
    if branches is not None:
        raise RefusedError(f"{what}: {branches}, and its dataflow cannot be proven on it; nothing was changed")
    mode = _mode_branch(model, graph)
    if mode is not None:
        raise RefusedError(f"{what}: {mode}; nothing was changed")
    _alias_inplace_activations(gm)
    return gm, eager.found


def inplace_call(node: fx.Node) -> bool:
    """Whether an activation node writes its input (``h.relu_()``, ``F.relu(h, inplace=True)``)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    flag = 3 if base_name(str(name)) == "threshold" else 1  # threshold(x, 0, 0, True), relu(x, True)
    return str(name).endswith("_") or bool(node.kwargs.get("inplace")) or (len(node.args) > flag and node.args[flag] is True)


def _alias_inplace_activations(gm: fx.GraphModule) -> None:
    """An in-place activation written as a statement (``h = self.fc(x); h.relu_(); return self.out(h)``)
    leaves later readers of ``h`` on the pre-activation node in the trace, though they read the
    rectified tensor: those reads are moved to the activation's node, which is what runs (the
    activation returns its input), so the chain proof sees the consumer behind the activation."""
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or activation_name(node, modules) is None or not inplace_call(node):
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(src, fx.Node):
            continue
        later = [user for user in src.users if user is not node and order[user] > order[node]]
        for user in later:
            user.replace_input_with(src, node)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _graph_ops(graph: fx.Graph) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in graph.nodes]


def _mode_branch(model: nn.Module, graph: fx.Graph) -> str | None:
    """Why the proof on ``graph`` (traced in the model's current mode) would not hold in the other
    mode, or None: a forward that branches on ``self.training`` in Python (``if self.training:
    h = self.fa(x) else: h = self.fb(x)``) traces other layers in each mode, and a report made in
    eval mode would then be proven on, and act on, the training-mode layers. Every module's flag is
    flipped for a second trace, and put back as it was."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, training in flags:
            m.training = not training
        try:
            other, _ = trace_graph(_Tracer(), model)
        except Exception as err:  # the other mode's branch is untraceable: no proof covers it either
            return (
                f"its forward cannot be traced in {'eval' if model.training else 'training'} mode "
                f"({type(err).__name__}: {error_summary(err)}), so its dataflow cannot be proven for both modes"
            )
    finally:
        for m, training in flags:
            m.training = training
    if _graph_ops(other) == _graph_ops(graph):
        return None
    return (
        f"{type(model).__name__} computes with other operations in training and in eval mode (a forward branches "
        "on self.training in Python), so the layers a unit's dataflow runs through depend on the mode and one proof "
        "cannot hold for both; move the branch into a module of its own (nn.Dropout-like) or rescue a model "
        "without it"
    )


def _wrapper_advice(model: nn.Module) -> str:
    """What to do instead when ``model`` is a data-parallel wrapper, whose forward fx cannot trace."""
    if not isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return ""
    return (
        f"; {type(model).__name__} only runs copies of its .module: scan model.module and rescue it with that "
        "report (it holds the same parameters)"
    )


def trace(model: nn.Module, what: str) -> fx.GraphModule:
    """Symbolically trace ``model`` or refuse, saying why; ``model`` is left as it was (see :func:`traced`)."""
    return traced(model, what)[0]


def _owner(node: fx.Node) -> tuple[str, int]:
    """(module path, call index) of the innermost module whose forward made this node.

    fx records the module stack per node, innermost last, keyed ``path`` for a module's
    first call in the trace and ``path@k`` for its k-th; a leaf module's own node lists
    the leaf itself last.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return (str(node.target), 0) if node.op == "call_module" else ("", 0)
    key = next(reversed(stack))
    value = stack[key]
    path = str(node.target) if node.op == "call_module" else (value[0] if isinstance(value, tuple) else key)
    _, at, call = key.rpartition("@")
    return path, int(call) if at and call.isdigit() else 0


def _calls_by_runs(graph: fx.Graph) -> dict[fx.Node, int] | None:
    """Each node's call index of its innermost module, for a trace whose stack keys carry no
    ``@k`` (torch before 2.3 numbers no repeated call); None when they do.

    One call of a module makes a contiguous run of nodes, so the k-th run of nodes under a path
    is its k-th call; a leaf module's node is a call of its own."""
    stacks = [(n, n.meta.get("nn_module_stack") or {}) for n in graph.nodes]
    if any("@" in str(key) for _, stack in stacks for key in stack):
        return None
    runs: dict[str, int] = {}
    before: set[str] = set()
    out: dict[fx.Node, int] = {}
    for node, stack in stacks:
        here = {str(v[0]) if isinstance(v, tuple) else str(k) for k, v in stack.items()}
        leaf = str(node.target) if node.op == "call_module" else None
        for path in here - before | ({leaf} if leaf is not None else set()):
            runs[path] = runs.get(path, 0) + 1
        innermost = leaf if leaf is not None else _owner(node)[0]
        out[node] = max(runs.get(innermost, 1) - 1, 0)
        before = here
    return out


# Tensor methods that return a view: a parameter seen through one is still a parameter (as the scan's
# ``_is_weight`` reads ``tensor._base``).
_VIEW_METHODS = frozenset(
    {"view", "view_as", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "t", "transpose", "permute",
     "flatten", "unflatten", "narrow", "select", "__getitem__", "getitem", "detach"}
)  # fmt: skip


def reads_weight(node: fx.Node) -> bool:
    """An activation call on a parameter or buffer, or a view of one (``F.softplus(self.raw.view(1, -1))``):
    the scan makes no site of it and gives it no slot, so neither does :func:`site_nodes`."""
    if node.op == "call_module":
        return False
    src = node.args[0] if node.args else node.kwargs.get("input")
    while isinstance(src, fx.Node) and src.op in ("call_method", "call_function"):
        name = src.target if src.op == "call_method" else getattr(src.target, "__name__", "")
        if name not in _VIEW_METHODS or not src.args:
            return False
        src = src.args[0]
    return isinstance(src, fx.Node) and src.op == "get_attr"


def site_nodes(gm: fx.GraphModule) -> dict[tuple[str, int, int], tuple[fx.Node, str]]:
    """Map ``(module, call, slot)`` to ``(node, function)`` for every activation node in ``gm``."""
    modules = dict(gm.named_modules())
    slots: dict[tuple[str, int], int] = {}
    out: dict[tuple[str, int, int], tuple[fx.Node, str]] = {}
    calls = _calls_by_runs(gm.graph)
    for node in gm.graph.nodes:
        fn = activation_name(node, modules)
        if fn is None or reads_weight(node):
            continue
        path, call = _owner(node)
        if calls is not None:
            call = calls[node]
        slot = slots.get((path, call), 0)
        slots[(path, call)] = slot + 1
        out[(path, call, slot)] = (node, fn)
    return out


def made_inside(made: fx.Node, activation: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Where a node was computed, for a refusal: ``" in module 'c_fc' (Conv1D)"`` when a submodule that
    torch.fx traced into made it (transformers' Conv1D, a transposed Linear, is one), else ``""``."""
    path = _owner(made)[0]
    if not path or path == _owner(activation)[0]:
        return ""
    # The GraphModule keeps a traced-through module as a bare nn.Module; fx's stack records its class.
    kinds = [v[1] for v in (made.meta.get("nn_module_stack") or {}).values() if isinstance(v, tuple) and v[0] == path]
    kind = kinds[-1] if kinds else type(modules.get(path)).__name__
    return f" in module '{path}' ({getattr(kind, '__name__', str(kind).rpartition('.')[2])})"
