"""Which dimension of a tensor is its feature axis, as the layer that produced it made it.

The capture's function mode calls :func:`kind_of` once per torch function (cached) and, for
each op of a forward pass, moves the feature axis of the op's input to its output with
:func:`carried_axis`, :func:`reshaped_axis` or :func:`moved_axis`; weight layers (linear,
matmul, convolution, embedding, recurrent layers) start a new one. See
:mod:`deadrelu.core.capture` for the rules as a user sees them.

>>> import torch
>>> kind_of(torch.nn.functional.linear)[:2]
(1, 'producer:Linear')
>>> reshaped_axis(1, (2, 12, 4, 4), (2, 12, 16)), carried_axis(2, (8, 5, 7), (8, 7))
(1, 1)
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch

from .activations import ACTIVATION_FUNCTIONS, RELU_SPELLINGS, base_name

__all__ = [
    "ACT", "PRODUCER", "TRANSPOSE", "PERMUTE", "RESHAPE", "NORM", "GENERIC", "INDEX", "REDUCE",
    "AxisTable", "function_kind", "kind_of", "reshaped_axis", "carried_axis", "moved_axis", "indexed_axis",
    "reduced_axis", "selected_axis", "rank_rule_dim",
]  # fmt: skip

# -- what each torch function does to the feature axis -----------------------------------------
ACT, PRODUCER, TRANSPOSE, PERMUTE, RESHAPE, NORM, GENERIC, INDEX, REDUCE = range(9)

_CONV_PREFIXES = ("conv", "_conv", "cudnn_conv", "mkldnn_conv", "miopen_conv", "slow_conv", "thnn_conv")
_LINEAR_NAMES = {"linear": "producer:Linear", "_linear": "producer:Linear", "bilinear": "producer:Linear"}
# Grouped matmuls: rows offs[e-1]:offs[e] of the input times expert e's matrix (an MoE layer's
# experts in one kernel: torch's grouped_mm, transformers' fallback op of the same arguments).
_GROUPED_MM_NAMES = frozenset({"grouped_mm", "_grouped_mm", "grouped_mm_fallback"})
_MATMUL_NAMES = frozenset(
    {"addmm", "mm", "matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum", "addbmm", "_addmm_activation"}
)
# addmm(bias, a, b) and the like: argument 0 is the added term, the product's left operand is 1.
_BIAS_FIRST = frozenset({"addmm", "baddbmm", "addbmm", "_addmm_activation"})
_EMBEDDING_NAMES = frozenset({"embedding", "embedding_bag", "_embedding_bag"})
_RNN_NAMES = frozenset(
    {"gru", "lstm", "rnn_tanh", "rnn_relu", "gru_cell", "lstm_cell", "rnn_tanh_cell", "rnn_relu_cell"}
)
_TRANSPOSE_NAMES = frozenset(
    {"transpose", "transpose_", "swapaxes", "swapaxes_", "swapdims", "swapdims_", "t", "t_", "adjoint",
     "movedim", "moveaxis"}
)  # fmt: skip
_RESHAPE_NAMES = frozenset(
    {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "squeeze_",
     "unsqueeze_", "_unsafe_view", "_reshape_alias", "ravel"}
)  # fmt: skip
_NORM_FIRST = frozenset(
    {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
     "cudnn_batch_norm", "instance_norm", "group_norm", "native_group_norm"}
)  # fmt: skip
# Reductions whose second argument (or dim=) names the reduced dims: the dims before the axis that
# they remove shift it, so their shapes alone cannot say where it went ((B, C, H, W).mean(-1) keeps C).
_REDUCTION_NAMES = frozenset(
    {"sum", "nansum", "mean", "nanmean", "amax", "amin", "max", "min", "prod", "std", "var", "std_mean",
     "var_mean", "logsumexp", "any", "all", "median", "nanmedian", "mode", "argmax", "argmin",
     "count_nonzero", "aminmax"}
)  # fmt: skip
_NORM_LAST = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"})
# aten kernels (TorchScript, dispatch level) that implement an activation under another name.
_KERNEL_ACTIVATIONS = {"_prelu_kernel": "prelu", "rrelu_with_noise": "rrelu"}


def function_kind(func: Any) -> tuple[int, str, Any]:
    """Classify a torch callable once: an activation (with its base name), a producer of a
    feature axis, a layout change, a normalisation, or anything else (which carries the axis)."""
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        return (GENERIC, "", None)
    if name == "__get__":  # a Tensor property: .T / .mT move the axis, the others keep or drop it
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        if prop in ("T", "H", "mT", "mH"):
            return (TRANSPOSE, prop, None)
        return (GENERIC, prop, None)
    name = name.split(".")[0]  # OpOverload names look like "relu_.default"
    base = base_name(name)
    if base in ACTIVATION_FUNCTIONS or base in RELU_SPELLINGS:  # a spelling is a site for some arguments only
        return (ACT, base, None)
    if name in _KERNEL_ACTIVATIONS:
        return (ACT, _KERNEL_ACTIVATIONS[name], None)
    if name.startswith(_CONV_PREFIXES):
        digit = next((c for c in reversed(name) if c in "123"), None)
        batched = int(digit) + 2 if digit and name[-1] == "d" else None
        return (PRODUCER, "producer:conv", batched)
    if name in _LINEAR_NAMES:
        return (PRODUCER, _LINEAR_NAMES[name], None)
    if name in _GROUPED_MM_NAMES:
        return (PRODUCER, "producer:grouped_mm", None)
    if name == "einsum":  # the equation says where the weight's units go (see _einsum_axis)
        return (PRODUCER, "producer:matmul", "einsum")
    if name in _MATMUL_NAMES:  # the third field: which arguments are the (left, right) operands
        operands = (1, 2) if name in _BIAS_FIRST else (1, 0) if name == "__rmatmul__" else (0, 1)
        return (PRODUCER, "producer:matmul", operands)
    if name in _EMBEDDING_NAMES:
        return (PRODUCER, "producer:embedding", None)
    if name in _RNN_NAMES:  # a ReLU RNN's outputs are ReLU outputs: the capture makes them a site
        return (PRODUCER, "producer:RNN", "relu" if name.startswith("rnn_relu") else None)
    if name in _TRANSPOSE_NAMES:
        return (TRANSPOSE, name.rstrip("_"), None)
    if name == "permute":
        return (PERMUTE, name, None)
    if name in ("__getitem__", "getitem"):  # Tensor.__getitem__; operator.getitem in a Dynamo graph
        return (INDEX, name, None)
    if name in _REDUCTION_NAMES:
        return (REDUCE, name, None)
    if name in _RESHAPE_NAMES:
        return (RESHAPE, name, None)
    if name in _NORM_FIRST:
        return (NORM, name, 1)
    if name in _NORM_LAST:
        return (NORM, name, -1)
    return (GENERIC, name, None)


_KIND_CACHE: dict[Any, tuple[int, str, Any]] = {}


def kind_of(func: Any) -> tuple[int, str, Any]:
    try:
        return _KIND_CACHE[func]
    except KeyError:
        kind = _KIND_CACHE[func] = function_kind(func)
        return kind
    except TypeError:  # unhashable callable
        return function_kind(func)


def reshaped_axis(axis: int, before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
    """Where the feature block ``before[axis]`` lies after a reshape, or None when it was merged, or
    split right after the batch dim (``fc(z).view(B, C, H, W)``: the rank rule's channels).

    A block split behind two or more leading dims is attention heads (``(B, T, C)`` to
    ``(B, T, H, d)``): the last of its dims, ``d``, the features of each head with the heads pooled, as
    the rank rule counts a 3-D ``(B, H, d)``; its dim 1 would count tokens as units.

    >>> reshaped_axis(2, (2, 5, 12), (2, 5, 3, 4)), reshaped_axis(1, (2, 48), (2, 3, 4, 4))
    (3, None)
    """
    prefix = 1
    for s in before[:axis]:
        prefix *= s
    size = before[axis]
    p = 1
    for b, s in enumerate(after):
        if p == prefix and s == size:
            return b
        if p == prefix and b >= 2 and s and size % s == 0:
            q, last = s, b  # the block may be split into after[b:last + 1]
            while q < size and last + 1 < len(after):
                last += 1
                q *= after[last]
            if q == size and last > b:
                return last
        p *= s
        if prefix and p > prefix:
            break
    return None


def carried_axis(axis: int, before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
    """The axis after an op that does not reorder dimensions (elementwise, pooling, slicing, reductions)."""
    if after == before:
        return axis
    n_in, n_out = len(before), len(after)
    if n_in == n_out and (after[axis] == before[axis] or after[:axis] + after[axis + 1 :] == before[:axis] + before[axis + 1 :]):
        return axis
    b = n_out - (n_in - axis)  # dimensions removed or added in front: align the trailing ones
    if 0 <= b < n_out and after[b:] == before[axis:]:
        return b
    return None


def _dim(d: Any, ndim: int) -> int | None:
    return d % ndim if isinstance(d, int) and not isinstance(d, bool) and ndim else None


# indexed_axis / reduced_axis: the axis was indexed or reduced away (no unit axis is left).
GONE = -1


def rank_rule_dim(ndim: int) -> int:
    """The units' dim where no layer says: the last up to 3-D (``(B, C)``, ``(B, T, C)``), else dim 1
    (the channels of ``(N, C, H, W)``)."""
    return max(ndim - 1, 0) if ndim <= 3 else 1


# select(t, dim, i) and unbind(t, dim): ``t[:, i]`` as TorchScript and torch.export record it.
_SELECTIONS = frozenset({"select", "select_copy", "unbind", "unbind_copy"})
# Ops that may narrow an axis, besides indexing, selections and reductions: for tensors no layer made.
_NARROWING = _SELECTIONS | {"narrow", "chunk", "split", "tensor_split", "split_with_sizes", "slice", "index_select", "gather"}


def selected_axis(axis: int, ndim: int, args: tuple, kwargs: dict | None) -> int | None:
    """The axis after ``select(dim, i)`` / ``unbind(dim)``: :data:`GONE` when ``dim`` is the axis,
    shifted down when it is in front of it, None when the arguments are not understood."""
    dim = _dim((kwargs or {}).get("dim", args[1] if len(args) > 1 else 0), ndim)
    if dim is None:
        return None
    return GONE if dim == axis else axis - (dim < axis)


def indexed_axis(axis: int, ndim: int, index: Any) -> int | None:
    """The axis after ``t[index]`` for basic indexing (ints, slices, ``None``, ``...``): its new
    position, :data:`GONE` when an int picked one element of it, or None when the index is not
    understood (tensors, bools, lists: advanced indexing)."""
    items = index if type(index) is tuple else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool)) for i in items):
        return None
    if sum(i is Ellipsis for i in items) > 1:
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if consumed > ndim:
        return None
    if Ellipsis not in items:
        items = items + (Ellipsis,)
    where = items.index(Ellipsis)
    items = items[:where] + (slice(None),) * (ndim - consumed) + items[where + 1 :]
    d_in = d_out = 0
    for i in items:
        if i is None:
            d_out += 1
        elif isinstance(i, slice):
            if d_in == axis:
                return d_out
            d_in, d_out = d_in + 1, d_out + 1
        else:
            if d_in == axis:
                return GONE
            d_in += 1
    return None


def reduced_axis(axis: int, before: tuple[int, ...], after: tuple[int, ...], args: tuple, kwargs: dict | None) -> int | None:
    """The axis after a reduction over the dims its ``dim`` argument names: shifted down by the
    dims removed in front of it, :data:`GONE` when it was reduced itself, the same with
    ``keepdim=True``, or None when the arguments are not understood."""
    kwargs = kwargs or {}
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return None
    n = len(before)
    dims = {_dim(d, n) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    if not dims or None in dims:
        return None
    if len(after) == n:  # keepdim
        return axis
    if len(after) != n - len(dims):
        return None
    if axis in dims:
        return GONE
    return axis - sum(1 for d in dims if d < axis)  # type: ignore[operator]


def moved_axis(kind: tuple[int, str, Any], axis: int, ndim: int, args: tuple, kwargs: dict | None) -> int | None:
    """The axis after a transpose-like op or a permute (None when the arguments are not understood)."""
    code, name, _ = kind
    kwargs = kwargs or {}
    if code == PERMUTE:
        rest = args[1:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            dims = rest[0]
        else:
            dims = rest or kwargs.get("dims", ())
        dims = [_dim(d, ndim) for d in dims]
        return dims.index(axis) if axis in dims else None
    if name in ("T", "H"):
        return ndim - 1 - axis
    if name in ("mT", "mH", "adjoint"):
        d0, d1 = ndim - 2, ndim - 1
    elif name == "t":
        if ndim < 2:
            return axis
        d0, d1 = 0, 1
    elif name in ("movedim", "moveaxis"):
        src = args[1] if len(args) > 1 else kwargs.get("source")
        dst = args[2] if len(args) > 2 else kwargs.get("destination")
        s, t = _dim(src, ndim), _dim(dst, ndim)
        if s is None or t is None:
            return None
        order = [d for d in range(ndim) if d != s]
        order.insert(t, s)
        return order.index(axis)
    else:  # transpose / swapaxes / swapdims
        d0 = _dim(args[1] if len(args) > 1 else kwargs.get("dim0"), ndim)
        d1 = _dim(args[2] if len(args) > 2 else kwargs.get("dim1"), ndim)
        if d0 is None or d1 is None:
            return None
    return d1 if axis == d0 else d0 if axis == d1 else axis


def _is_weight_like(t: Any, ndim: int) -> bool:
    """A parameter, or a trainable leaf tensor: a weight (an activation is no leaf, or needs no
    grad). A frozen ``nn.Parameter`` (``requires_grad_(False)``, inference) is still a weight."""
    if not isinstance(t, torch.Tensor) or t.ndim < ndim:
        return False
    return isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)


def _is_weight(t: Any) -> bool:
    """A 2-D weight matrix (see :func:`_is_weight_like`)."""
    return isinstance(t, torch.Tensor) and t.ndim == 2 and _is_weight_like(t, 2)


class WeightSlice(NamedTuple):
    """Where a tensor's rows came from in a stacked (experts) weight: slice ``index`` of ``slices``
    (a loop over experts); with ``offsets``, a grouped matmul whose rows ``offsets[e-1]:offsets[e]``
    are expert ``e``'s; with ``rows``, a batched matmul with one expert's matrix gathered per row,
    row ``r`` being expert ``rows[r]``'s (``index`` is -1 for both)."""

    weight: int  # id of the stacked parameter
    index: int
    slices: int
    offsets: Any = None  # the grouped matmul's offs tensor (int, one end per expert)
    rows: Any = None  # the gather's index tensor (int, one expert per row)

    @property
    def grouped(self) -> bool:
        """Whether the tensor holds every expert's rows (a grouped or batched matmul), not one slice's."""
        return self.index < 0


def stacked_slice(t: Any) -> WeightSlice | None:
    """The :class:`WeightSlice` where ``t`` is one slice along dim 0 of a stacked parameter
    (``experts.gate_up_proj[e]``, possibly transposed), else None.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(4, 3, 2))
    >>> stacked_slice(w[2])[1:3], stacked_slice(w[2].t())[1:3], stacked_slice(w[:, 0])
    ((2, 4), (2, 4), None)
    """
    base = getattr(t, "_base", None)
    if not isinstance(base, torch.nn.Parameter) or not isinstance(t, torch.Tensor) or base.ndim != t.ndim + 1:
        return None
    if sorted(zip(t.shape, t.stride())) != sorted(zip(base.shape[1:], base.stride()[1:])):
        return None
    offset, step = t.storage_offset() - base.storage_offset(), base.stride(0)
    if step <= 0 or offset % step or not 0 <= offset // step < base.shape[0]:
        return None
    return WeightSlice(id(base), offset // step, base.shape[0])


def _gathered_experts(weight: Any, index: Any) -> WeightSlice | None:
    """The :class:`WeightSlice` of ``weight[index]`` where ``weight`` is a stacked 3-D parameter and
    ``index`` a 1-D integer tensor (one expert per row), else None."""
    if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 3 or not isinstance(index, torch.Tensor):
        return None
    if index.ndim != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        return None
    return WeightSlice(id(weight), -1, weight.shape[0], rows=index)


def _stacked_parameter(t: Any) -> torch.nn.Parameter | None:
    """``t`` if it is a 3-D parameter, or the parameter it is a same-sized view of (``w.transpose(-2, -1)``)."""
    base = t if isinstance(t, torch.nn.Parameter) else getattr(t, "_base", None)
    if isinstance(base, torch.nn.Parameter) and base.ndim == 3 and isinstance(t, torch.Tensor) and t.numel() == base.numel():
        return base
    return None


def _stacked_operand(rule: str, operands: Any, args: tuple, kwargs: dict | None = None) -> WeightSlice | None:
    """The :class:`WeightSlice` of a linear's or matmul's weight operand, or a grouped matmul's rows."""
    if rule == "producer:Linear":
        return stacked_slice(args[1]) if len(args) > 1 else None
    if rule == "producer:matmul" and isinstance(operands, tuple) and len(args) > max(operands):
        return stacked_slice(args[operands[1]]) or stacked_slice(args[operands[0]])
    if rule == "producer:grouped_mm":
        offsets = (kwargs or {}).get("offs", args[2] if len(args) > 2 else None)
        weight = _stacked_parameter(args[1]) if len(args) > 1 else None
        if weight is None or not isinstance(offsets, torch.Tensor) or offsets.ndim != 1 or offsets.numel() != weight.shape[0]:
            return None
        if isinstance(args[0], torch.Tensor) and args[0].ndim != 2:
            return None
        return WeightSlice(id(weight), -1, weight.shape[0], offsets)
    return None


def _weight_on_the_left(args: tuple, operands: Any) -> bool:
    """Whether a matmul multiplies a weight from the left (``W @ x``, as Mamba's ``dt_proj.weight @
    h.transpose(1, 2)``) and an activation from the right; ``operands`` are the (left, right)
    argument positions (``addmm(bias, W, x)`` has them at 1 and 2)."""
    if not isinstance(operands, tuple):
        return False
    left, right = operands
    if len(args) <= max(left, right):
        return False
    return _is_weight(args[left]) and not _is_weight(args[right])


def _einsum_axis(args: tuple, ndim: int) -> int | None:
    """The output dimension of an einsum that holds its weight operand's units — the weight's last
    index that survives into the output (``"oc,btc->bot"``: ``o``, dim 1; ``"btd,dh->bth"``: ``h``)
    — or None where no single operand is a weight or the equation is not understood."""
    if not args or not isinstance(args[0], str):
        return None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])  # einsum(eq, [a, b])
    inputs, arrow, output = args[0].replace(" ", "").partition("->")
    terms = inputs.split(",")
    if len(terms) != len(operands):
        return None
    if not arrow:  # implicit output: the indices used once, in alphabetical order, after an ellipsis
        letters = inputs.replace(",", "").replace(".", "")
        output = ("..." if "..." in inputs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    weights = [t for t in operands if _is_weight_like(t, 2)]
    if len(weights) != 1 or len(operands) < 2:
        return None
    term = terms[next(i for i, t in enumerate(operands) if t is weights[0])]
    free = [c for c in term.replace(".", "") if c in output]
    if not free:
        return None
    at = output.index(free[-1])
    ellipsis = output.find("...")
    if 0 <= ellipsis < at:  # the ellipsis stands for the dims the explicit indices leave
        at += ndim - len(output.replace("...", "")) - 3
    return at if 0 <= at < ndim else None


class AxisTable:
    """Each tensor's feature axis during one forward pass, by identity (weak references).

    An entry is ``(weakref, dim, rule)``; :meth:`on_op` moves it from an op's input to its
    output with the rules above. Used by the capture's function mode on real tensors and by
    the compiled capture on a graph's example values.

    >>> import torch
    >>> table, h = AxisTable(), torch.zeros(2, 3, 4)
    >>> table.on_op(kind_of(torch.nn.functional.linear), (h,), None, h)
    >>> t = h.transpose(1, 2)
    >>> table.on_op(kind_of(torch.Tensor.transpose), (h, 1, 2), None, t)
    >>> table.get(t)[1:]
    (1, 'producer:Linear')
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Any, int, str]] = {}
        # Tensors computed from a stacked experts weight (an MoE layer's ``gate_up_proj``), by
        # identity: (weakref, WeightSlice). Carried with the axis, so the capture can key an expert's
        # activation by its expert, not by how many experts the batch hit before it.
        self.origins: dict[int, tuple[Any, WeightSlice]] = {}
        # Tensors holding part of a layer's features, by identity (weakref): the axis sliced
        # (``h[..., :2]``, a chunk), one feature picked (``h[:, 2]``), reduced over (``mean(-1)``),
        # and what is computed from such parts alone. No layer outputs them, so a ReLU *spelled*
        # ``clamp(min=0)`` there (box corners, widths, a variance) is no activation; ``F.relu`` is.
        self.parts: dict[int, Any] = {}
        # Tensors whose feature axis was a layer's single output, squeezed away (``head(h).squeeze(-1)``
        # of a ``Linear(d, 1)``: ``(B, 1)`` to ``(B,)``), by identity (weakref): every value is an
        # observation of that one unit, not a unit of its own (the rank rule would count batch rows).
        self.squeezed: dict[int, Any] = {}
        # Tensors whose first two dims are no longer the (B, T) (or (T, B)) of the tensors they came
        # from, by identity: (weakref, where the original dims 0 and 1 are now). ``q.view(B, T, H, d)
        # .transpose(1, 2)`` puts heads at dim 1: a (B, T) mask must not lie over (B, H) there, even
        # when H == T. Kept through transposes and permutes (one that moves them back ends it) and
        # ops that keep the leading dims; any other op ends it.
        self.moved_lead: dict[int, tuple[Any, tuple[int, int]]] = {}

    def lead_moved(self, t: Any) -> bool:
        """Whether ``t``'s dims 0 and 1 are not its sources' (see :attr:`moved_lead`)."""
        return self._lead(t) != (0, 1)  # ((0, 1) and (1, 0) are never kept)

    def _lead(self, t: Any) -> tuple[int, int]:
        entry = self.moved_lead.get(id(t)) if self.moved_lead else None
        return entry[1] if entry is not None and entry[0]() is t else (0, 1)

    def _move_lead(self, kind: tuple[int, str, Any], args: tuple, kwargs: dict | None, out: Any) -> None:
        """Follow the original dims 0 and 1 through a transpose or permute."""
        src = args[0] if args else None
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.ndim < 2 or out.ndim != src.ndim:
            return
        lead = tuple(moved_axis(kind, p, src.ndim, args, kwargs) for p in self._lead(src))
        if lead in ((0, 1), (1, 0)):  # (B, T) or (T, B): both lie where a mask's layouts look for them
            self.moved_lead.pop(id(out), None)
        elif None not in lead:
            self.moved_lead[id(out)] = (weakref.ref(out), lead)  # type: ignore[assignment]

    def _lead_through(self, args: tuple, out: Any) -> None:
        """A same-shape op of a tensor whose leading dims moved: so have its output's."""
        if not isinstance(out, torch.Tensor):
            return
        for a in args[:2]:  # (an op of the last dim, such as a Linear, keeps the others where they are)
            if isinstance(a, torch.Tensor) and a.ndim == out.ndim and a.shape[:-1] == out.shape[:-1] and self.lead_moved(a):
                self.moved_lead[id(out)] = (weakref.ref(out), self._lead(a))
                return

    def is_squeezed(self, t: Any) -> bool:
        """Whether ``t``'s values are all of one unit whose size-1 axis was squeezed away (see :attr:`squeezed`)."""
        ref = self.squeezed.get(id(t)) if self.squeezed else None
        return ref is not None and ref() is t

    def is_part(self, t: Any) -> bool:
        """Whether ``t`` holds part of a layer's features (see :attr:`parts`)."""
        ref = self.parts.get(id(t)) if self.parts else None
        return ref is not None and ref() is t

    def carry(self, src: Any, out: Any) -> None:
        """Give ``out`` the feature axis of ``src``, and its mark where ``src`` is a part: ``out`` is
        computed from it value by value (an activation's output, a block's hidden states)."""
        if self.moved_lead and isinstance(out, torch.Tensor) and self.lead_moved(src):
            self.moved_lead[id(out)] = (weakref.ref(out), self._lead(src))
        entry = self.get(src)
        if entry is None and isinstance(out, torch.Tensor) and self.is_squeezed(src):
            self.squeezed[id(out)] = weakref.ref(out)
        if entry is None or not isinstance(out, torch.Tensor):
            return
        self.set(out, entry[1], entry[2])
        if self.is_part(src):
            self.parts[id(out)] = weakref.ref(out)

    def origin(self, t: Any) -> "WeightSlice | None":
        """The :class:`WeightSlice` a tensor was made from (see :func:`stacked_slice`), or None."""
        entry = self.origins.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def get(self, t: Any) -> tuple[Any, int, str] | None:
        entry = self.entries.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry
        return None

    def set(self, t: Any, axis: int, rule: str) -> None:
        if isinstance(t, torch.Tensor):
            self.entries[id(t)] = (weakref.ref(t), axis, rule)

    def on_op(self, kind: tuple[int, str, Any], args: tuple, kwargs: dict | None, out: Any) -> None:
        """Carry the feature axis from a (non-activation) op's inputs to its outputs."""
        # Every torch call of an observed forward comes here: the common case (an elementwise op
        # or a view of a tracked tensor) is kept to a few dict lookups.
        code = kind[0]
        if code == TRANSPOSE or code == PERMUTE:
            self._move_lead(kind, args, kwargs, out)
        elif self.moved_lead:
            self._lead_through(args, out)
        if code == PRODUCER:
            self._produced(kind, out, args, kwargs)
            return
        if code == INDEX and isinstance(out, torch.Tensor) and len(args) > 1:
            gathered = _gathered_experts(args[0], args[1])
            if gathered is not None:  # w[expert_ids]: one expert's matrix per row, for a batched matmul
                self.origins[id(out)] = (weakref.ref(out), gathered)
                return
        entries = self.entries
        src = entry = None
        for a in args[:2]:
            if type(a) in (list, tuple):
                if not a:
                    continue
                a = a[0]
            entry = entries.get(id(a))
            if entry is not None:
                if entry[0]() is a:
                    src = a
                    break
                entry = None
        if entry is None:
            if code == NORM and isinstance(out, torch.Tensor) and out.ndim >= 2:
                self.set(out, kind[2] % out.ndim, "producer:norm")
            elif code == NORM and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                self.set(out[0], kind[2] % max(out[0].ndim, 1), "producer:norm")
            elif self.squeezed and self._squeezed_through(args, out):
                pass  # a squeezed single output, elementwise (head(h).squeeze(-1) * scale + shift)
            elif self.parts and any(self.is_part(a) for a in args[:2]):
                self._mark_parts(out)  # computed from parts alone (b[:, 2] - b[:, 0])
            elif (code == INDEX or code == REDUCE or kind[1] in _NARROWING) and args and isinstance(args[0], torch.Tensor):
                self._untracked_part(kind, args, kwargs, out)  # boxes given as an input: boxes[:, 2]
            return
        if out is src:
            return
        _, axis, rule = entry
        before = src.shape  # a torch.Size: a tuple
        origin = self.origin(src) if self.origins else None
        # A part stays one unless the op also reads a whole output of a layer (rsqrt(var) * h is h's).
        part = self.parts and self.is_part(src) and not any(a is not src and self._whole(a) for a in args[:2])
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(o, torch.Tensor):
                continue
            after = o.shape
            if code == RESHAPE:
                new = reshaped_axis(axis, before, after)
            elif code == INDEX and len(args) > 1 and isinstance(args[0], torch.Tensor):  # not a tuple's item
                new = indexed_axis(axis, len(before), args[1])
                new = carried_axis(axis, before, after) if new is None else new
            elif code == REDUCE:
                new = reduced_axis(axis, before, after, args, kwargs)
                new = carried_axis(axis, before, after) if new is None else new
            elif code in (TRANSPOSE, PERMUTE):
                new = moved_axis(kind, axis, len(before), args, kwargs) if len(after) == len(before) else None
            elif kind[1] in _SELECTIONS:
                new = selected_axis(axis, len(before), args, kwargs)
                new = carried_axis(axis, before, after) if new is None else new
            else:
                new = carried_axis(axis, before, after)
            if before[axis] == 1 and (new is None or new == GONE) and tuple(after) == before[:axis] + before[axis + 1 :]:
                if code == RESHAPE or code == INDEX or kind[1] in _SELECTIONS:
                    # the layer's one output squeezed, selected or flattened away ((B, 1) -> (B,)): its
                    # values are that unit's observations, not a part of the layer and not units
                    self.squeezed[id(o)] = weakref.ref(o)
                    continue
            if new == GONE or (new is not None and (part or (code != RESHAPE and after[new] < before[axis]))):
                # fewer of the layer's units than before (a reshape only splits them into heads), or none
                self.parts[id(o)] = weakref.ref(o)
            if new is not None and new != GONE:
                entries[id(o)] = (weakref.ref(o), new, rule)
                # a grouped matmul's output stays grouped only while its rows stay as they were
                if origin is not None and (not origin.grouped or (o.ndim >= 2 and after[0] == before[0])):
                    self.origins[id(o)] = (weakref.ref(o), origin)

    def _squeezed_through(self, args: tuple, out: Any) -> bool:
        """Mark ``out`` squeezed where it has the shape of a squeezed input it is computed from."""
        if not isinstance(out, torch.Tensor):
            return False
        for a in args[:2]:
            if isinstance(a, torch.Tensor) and a.shape == out.shape and self.is_squeezed(a):
                self.squeezed[id(out)] = weakref.ref(out)
                return True
        return False

    def _whole(self, t: Any) -> bool:
        """A tensor with a feature axis that is no part."""
        return isinstance(t, torch.Tensor) and self.get(t) is not None and not self.is_part(t)

    def _untracked_part(self, kind: tuple[int, str, Any], args: tuple, kwargs: dict | None, out: Any) -> None:
        """Mark a part of a tensor no layer made (an input) where the op narrows the axis the rank rule
        would count its units on (the last dim up to 3-D, else dim 1), as a layer's axis is tracked."""
        src = args[0]
        if src.ndim == 0:
            return
        axis = rank_rule_dim(src.ndim)
        before = src.shape
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(o, torch.Tensor):
                continue
            if kind[0] == INDEX:
                new = indexed_axis(axis, len(before), args[1]) if len(args) > 1 else None
            elif kind[0] == REDUCE:
                new = reduced_axis(axis, before, o.shape, args, kwargs)
            elif kind[1] in _SELECTIONS:
                new = selected_axis(axis, len(before), args, kwargs)
            else:
                new = carried_axis(axis, before, o.shape)
            if new == GONE or (new is not None and o.shape[new] < before[axis]):
                self.parts[id(o)] = weakref.ref(o)

    def _mark_parts(self, out: Any) -> None:
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.parts[id(o)] = weakref.ref(o)

    def _gathered_operand(self, rule: str, operands: Any, args: tuple) -> tuple[WeightSlice, bool] | None:
        """A batched matmul's operand gathered from stacked experts (``w[expert_ids]``), and whether it is the left one."""
        if rule != "producer:matmul" or not isinstance(operands, tuple) or len(args) <= max(operands):
            return None
        for position, on_left in ((operands[0], True), (operands[1], False)):
            origin = self.origin(args[position])
            if origin is not None and origin.rows is not None:
                return origin, on_left
        return None

    def _produced(self, kind: tuple[int, str, Any], out: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        rule, batched = kind[1], kind[2]
        origin = _stacked_operand(rule, batched, args, kwargs)
        gathered = self._gathered_operand(rule, batched, args)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.ndim:
                if rule == "producer:conv":
                    axis = 1 if o.ndim >= 2 and (batched is None or o.ndim == batched) else 0
                elif rule == "producer:matmul" and batched == "einsum":
                    axis = _einsum_axis(args, o.ndim)
                    axis = o.ndim - 1 if axis is None else axis
                elif rule == "producer:matmul" and o.ndim >= 2 and _weight_on_the_left(args, batched):
                    axis = o.ndim - 2  # W @ x: W's rows (out x in) are the units, on the output's dim -2
                else:
                    axis = o.ndim - 1
                if gathered is not None:
                    origin, on_left = gathered
                    axis = o.ndim - 2 if on_left and o.ndim >= 3 else axis  # bmm(w[ids], x): units on dim -2
                self.set(o, axis, rule)
                if origin is not None:
                    self.origins[id(o)] = (weakref.ref(o), origin)
            if rule != "producer:RNN":
                break  # conv/linear return one tensor; an RNN returns (output, h_n[, c_n])
