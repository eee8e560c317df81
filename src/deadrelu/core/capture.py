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

Where the parts are
-------------------
:class:`ActivationCapture` (here) keeps the options, the sites and the hot path: each op, each
activation call's site, the fused ReLU, the count. Its bases hold the module hooks and the observed
pass (:mod:`~deadrelu.core.capture_hooks`) and the observation masks
(:mod:`~deadrelu.core.observation_masks`); the torch modes are in :mod:`~deadrelu.core.spies`,
call positions in :mod:`~deadrelu.core.call_positions`, site records and names in
:mod:`~deadrelu.core.sites`, the ``unit_dim``/``threshold`` options in
:mod:`~deadrelu.core.site_options`, compiled blocks in :mod:`~deadrelu.core.compiled_blocks`, and
the module paths of traced graphs in :mod:`~deadrelu.core.graph_module_paths`. Every name is
importable from this module as before.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import replace
from typing import Any, Callable, Mapping

import torch
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
    function_of_module,
    looks_like_activation,
)
from .call_positions import call_position, describe_position, module_call_position, stable_position
from .capture_hooks import CaptureHooks, Forward, Frame
from .compiled_blocks import compiled_blocks, eager_modules, eager_stance, eager_submodule, is_compiled_wrapper
from .graph_module_paths import ACTIVATION_CLASS_NAMES, dynamo_module_path, exported_activation_modules
from .hooks import copy_safe_hook, is_deadrelu_hook, only_deadrelu_forward_hooks, remove_inert_hooks
from .kernels import functorch_wrapped
from .inputs import aligned_mask, apply_mask, mask_layout, mask_position
from .observation_masks import ObservationMasks, carry_source
from .site_options import (
    ThresholdSpec,
    UnitDimSpec,
    checked_threshold,
    checked_unit_dim,
    choose_unit_dim,
    resolve_threshold,
    resolve_unit_dim,
    squeezed_unit_axis,
)
from .sites import Site, SiteInfo, describe_site, display_names, next_site_order, same_function_ordinal
from .spies import INPLACE_RELUS
from .unit_axis import ACT, GENERIC, PRODUCER, WeightSlice
from .stats import fused_on_cpu, UnitStats

# Names that moved with their code and stay importable from here as before (the tests import the
# two private ones).
from .call_positions import stable_position as _stable_position  # noqa: F401
from .graph_module_paths import recorded_path as _recorded_path  # noqa: F401
from .sites import expert_of  # noqa: F401

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
    "squeezed_unit_axis",
]


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


class ActivationCapture(CaptureHooks, ObservationMasks):
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
        self._warned_unfit_sites: set[int] = set()  # sites whose unmasked rows were warned of (id of the Site)
        self._script_calls: tuple[tuple[str, int], ...] | None = None  # calls per function in a scripted pass
        self._warned_script = False
        self.scripted = isinstance(model, torch.jit.ScriptModule)
        self.sites: dict[tuple[Any, ...], Site] = {}
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
        self._graph_sites = exported_activation_modules(model)
        self._handles: list[Any] = []
        self._fwd = Forward()
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
        # Called when a claimed root forward raised part-way and its batches were taken back (see
        # CaptureHooks._discard_forward): the monitor takes back the samples it counted for it.
        self.on_forward_discarded: Callable[[], None] | None = None
        self.op_error: Exception | None = None  # the last op that raised under the dispatch spy (TorchScript)
        self.own_error: DeadReluError | None = None  # deadrelu's error raised inside that op (TorchScript)
        self._stance: contextlib.AbstractContextManager[Any] | None = None

    # -- module calls: where each is made from (site identity) -------------------------------
    def _module_call(self, fwd: Forward, path: str, entry: Any, origin: WeightSlice | None = None) -> Any:
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
        where = (path, parent.path, parent.call, module_call_position(entry, parent.entry))
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

    # -- the hot path ------------------------------------------------------------------------
    def _axis(self, t: Any) -> tuple[Any, int, str] | None:
        return self._fwd.axes.get(t)

    def _on_op(self, kind: tuple[int, str, Any], args: tuple, kwargs: dict | None, out: Any) -> None:
        """Carry the feature axis from an op's input to its output; hand activations on."""
        if self._fwd.sources is not None:
            carry_source(self._fwd.sources, args, kwargs, out)
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
        if inp is not out and isinstance(inp, torch.Tensor) and out.shape == inp.shape:
            self._fwd.axes.carry(inp, out)
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
        if self._muted_in_scope(fwd):
            return None  # a no-grad call inside the monitor's observe() block: no training pass
        inp = args[0] if args else None
        if self._is_weight(inp):
            return None  # a parameter passed through an activation is not a unit of the network
        if spelled and not out.is_floating_point():
            return None  # index.clamp(min=0) on integers is no activation
        if spelled and fwd.axes.is_part(inp):
            # clamp(min=0) of part of a layer's features (box corners, widths, a variance): its "units"
            # would be coordinates or boxes. F.relu there is still a site: that call is an activation.
            return None
        frame = fwd.stack[-1]
        slot = frame.slots
        frame.slots = slot + 1
        position = () if self.scripted else call_position(depth, frame.entry, frame.until)
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
        if _function_modes() or _dispatch_modes():
            # Another mode is active outside this one (a second capture on the model, a user's
            # FlopCounterMode): it must see this ReLU as the torch call, which a kernel of ours
            # run in its place would hide from it.
            return None
        if not inp.is_cuda:
            if self._fuse_on_cpu is None:
                self._fuse_on_cpu = fused_on_cpu()
            if not self._fuse_on_cpu:
                return None
        if kwargs and not kwargs.keys() <= {"input", "inplace"}:
            return None  # an argument the fused kernel does not take (out=, …): torch's own call
        if func in INPLACE_RELUS:
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
                fwd.axes.carry(inp, out)
            return out
        if not fwd.stack or self._is_weight(inp):
            return None
        site = self._site_for("relu", args, kwargs, inp, depth=4)  # the input stands in for the output
        out = None if site is None else self._fused_update(site, inp, inplace)
        counted = out is not None
        if out is None:
            out = func(*args, **kwargs) if kwargs else func(*args)
        if out is not inp:  # before counting: the mask's fit reads what the output came from
            fwd.axes.carry(inp, out)
            if fwd.sources is not None:
                carry_source(fwd.sources, (inp,), None, out)
        if site is not None and not counted:
            self._update(site, out)
        return out

    def _fused_update(self, site: Site, x: torch.Tensor, inplace: bool) -> torch.Tensor | None:
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
            out = fused(x, dim, mask=mask, inplace=inplace)
            if out is not None:
                self._fwd.written.append(site.stats)
            return out
        except torch.cuda.OutOfMemoryError:
            raise  # as torch's own ReLU would: callers that shrink the batch on OOM must see it
        except Exception as err:
            raise self._stats_error(site, x, err) from (None if isinstance(err, DeadReluError) else err)

    def _on_module_output(self, name: str, frame: Frame, out: Any, module: nn.Module) -> None:
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

    def _update(self, site: Site, out: torch.Tensor, nonnegative: bool | None = None) -> None:
        self.last_site = site.info.module or "<root>"
        if site.squeezed and out.ndim == len(site.info.shape) - 1:
            out = out.unsqueeze(-1)  # the size-1 unit axis the producer's output had
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

    def _count(self, site: Site, out: torch.Tensor, dim: int, nonnegative: bool) -> None:
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
            self._fwd.written.append(site.stats)
        except torch.cuda.OutOfMemoryError:
            raise  # the device is full: not a failure of deadrelu's statistics
        except Exception as err:
            raise self._stats_error(site, out, err) from (None if isinstance(err, DeadReluError) else err)

    def _site_dim(self, site: Site, out: torch.Tensor) -> int:
        """The site's unit dimension in ``out``: the one chosen when the site was first seen, unless
        ``out`` has another rank (a Linear on ``(B, C)`` in one batch and on ``(B, T, C)`` in the
        next, an unbatched convolution input), whose units the same rules find again — the first
        output's dim would count positions as units, silently where the sizes happen to agree."""
        if site.squeezed and out.ndim == len(site.info.shape) - 1:
            return out.ndim  # (no such dim: counted unsqueezed, see _update)
        if out.ndim == len(site.info.shape) or out.ndim < 2:
            return site.unit_dim  # (a 0-D or 1-D output is one sample of its units: see as_unit_batch)
        info = replace(site.info, shape=tuple(out.shape))
        return choose_unit_dim(self.unit_dim_spec, info, out.ndim, self._axis(out))

    def _stats_error(self, site: Site, out: torch.Tensor, err: Exception) -> DeadReluError:
        if isinstance(err, DeadReluError):
            # TorchScript hides call positions: its sites are numbered by order, which a branch shifts
            hint = (
                "; in a TorchScript model sites are numbered in call order, so a call that runs only for some "
                "batches shifts the later ones: scan the eager module to key sites by call position"
                if self.scripted and "units along dim" in str(err) else ""
            )
            return DeadReluError(f"activation site {describe_site(site.info)}: {err}{hint}")
        if out.layout != torch.strided or out.is_nested or out.is_quantized:
            # sparse, nested or quantized activations have no per-element values to count in place
            kind = "nested" if out.is_nested else "quantized" if out.is_quantized else str(out.layout).replace("torch.", "")
            return DeadReluError(
                f"activation site {describe_site(site.info)} got a {kind} tensor; deadrelu counts dense (strided) "
                "activations only: convert it before the activation (e.g. .to_dense(), .dequantize(), or "
                "torch.nested.to_padded_tensor with a mask=)"
            )
        # a failure of deadrelu's own statistics, not of the model
        return DeadReluError(
            f"deadrelu failed to compute statistics at activation site {describe_site(site.info)} for an "
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

    def _new_site(self, key: tuple[Any, ...], out: torch.Tensor, slot: int, position: Any) -> Site:
        path, call, _, name, _ = key
        info = SiteInfo(
            module=path,
            module_type=self._types.get(path, type(self.model).__name__),
            call=call,
            slot=slot,
            function=name,
            shape=tuple(out.shape),
            leaf=self._leaf.get(path, False),
            location=describe_position(position),
            position=stable_position(position),
            occurrence=key[4],
        )
        if not path and slot < len(self._graph_sites) and self._graph_sites[slot] is not None:
            # A flattened graph (torch.export): name the site after the module it came from.
            info.module, info.module_type, info.call = self._graph_sites[slot]  # type: ignore[misc]
            info.slot, info.leaf = 0, info.module_type in ACTIVATION_CLASS_NAMES
        info.ordinal = same_function_ordinal((s.info for s in self.sites.values()), info.module, info.call, name, info)
        entry, squeezed = self._axis(out), False
        if entry is None and self._fwd.axes.is_squeezed(out):  # counted as the (..., 1) it was (see _update)
            entry = squeezed_unit_axis(self.unit_dim_spec, info, out.ndim)
            squeezed = entry is not None
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, out.ndim, entry)
        units = 1 if squeezed or not out.ndim else out.shape[unit_dim]
        thr = resolve_threshold(self.threshold_spec, info)
        site = Site(
            info,
            unit_dim,
            self.stats_factory(units, thr, out.device),
            order=next_site_order(),
            nonnegative=info.function in NONNEGATIVE_FUNCTIONS,
            squeezed=squeezed,
        )
        site.takes_mask = _accepts_mask(site.stats)
        self.sites[key] = site
        return site

    # -- results ---------------------------------------------------------------------------
    def ordered_sites(self) -> list[tuple[str, Site]]:
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


# The torch-function and dispatch modes active around the one running (inside a mode's handler,
# that mode itself is off the stack); torch 2.2 has both queries.
_function_modes = torch._C._len_torch_function_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack


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
