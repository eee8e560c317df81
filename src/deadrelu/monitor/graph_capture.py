"""Capture for ``torch.compile``: the sites are read from the compiled graph itself.

The eager capture enters a ``TorchFunctionMode`` for each forward pass, which TorchDynamo
cannot trace without breaking the graph. This capture works one level down instead: while a
monitor with ``compiled=True`` is attached, a pre-grad pass of Inductor
(``torch._inductor.config.pre_grad_custom_pass``, chained with any pass already there) sees
every graph TorchDynamo hands to Inductor, before autograd is traced. In each graph it

* finds every activation call — functional calls (``F.relu(x)``, ``x.relu_()``) and activation
  modules alike, and each call of a reused module on its own — and names it exactly as the
  eager capture does (module path, that module's call index, call position, function);
* works out each site's unit axis with the eager capture's own rules
  (:class:`~deadrelu.core.unit_axis.AxisTable`, run on the graph's example values);
* inserts after each activation its batch's per-unit sums
  (:func:`~deadrelu.core.stats.traceable_batch_sums`: plain reductions that Inductor fuses,
  on a detached view so autograd is untouched; masked by the call's ``attention_mask`` input
  where it lies over the activation's ``(B, T)`` or ``(T, B)`` dimensions, as in eager mode);
* inserts before the graph's output one call of the custom op ``deadrelu::observe(sums,
  site ids, parameter)``, registered with :mod:`torch.library` as an *effectful* op so it is
  never removed or reordered. At run time that op hands every site's sums (``O(units)``
  tensors, still on the device: no host sync) to its
  :class:`~deadrelu.monitor.window.WindowStats` — the same ring the eager monitor keeps, so
  both give the same numbers — with two multi-tensor launches for all sites.

Whether a step is observed is decided when the op runs (the monitor's schedule), so one graph
serves every schedule and nothing recompiles per step. Only graphs compiled with gradients
enabled are observed, as in eager mode. Site ids are process-local: the pass has a ``uuid()``
unique to this process and set of monitors, so Inductor's caches never hand a graph to another
process or monitor.

TorchDynamo shares a graph between instances of the same class (their parameters are graph
inputs), so the op also takes one parameter input and records into the monitor whose model owns
it: a sibling instance running the same graph records nothing, unless it has an attached monitor
of its own, which adopts the graph's sites (``_dispatch``) — as does a new monitor on a new model
that reuses a graph compiled under an earlier one. Blocks compiled one by one share one graph per
class the same way; the parameter says which block runs (see :class:`GraphCapture`), as it says which
layer runs the rest of a layer's ``forward`` after a graph break (one graph for every layer).

Experts stacked in one weight (``experts.gate_up_proj[e]``) get the eager capture's per-expert sites
where the expert is known only when the graph runs: ``w[e]`` with ``e`` a graph input, or an
activation of a graph input that eager code made from ``w[e]`` — a data-dependent experts loop
(``for e in route.unique()``) graph-breaks, runs eagerly and calls its activation's compiled graph
once per expert, and the input's autograd history names the expert. The observe op takes these
as arguments; see :func:`_dispatch`.

Limits: it needs Inductor (the default ``torch.compile`` backend) and a torch with
``torch.library.custom_op`` and effectful ops (2.6 or later); otherwise the monitor falls back to
:class:`~deadrelu.monitor.compiled.ModuleCapture`. Graphs compiled while no monitor was attached
are not observed (compile after attaching, or call ``torch._dynamo.reset()``); after :meth:`detach`
compiled graphs keep computing their sums until they are recompiled, but nothing is recorded.
``mask=`` takes only None (the ``attention_mask`` input) or False. A graph without parameters (the
rest of a forward after a graph break) is counted for the model whose graph with parameters ran
last in the thread (``_RUNNING``) when it lies in the model's own forward; in a submodule's
forward it is listed in ``uncaptured`` instead (no instance to attribute it to). A site whose unit axis has a
dynamic size is skipped (listed in ``uncaptured``). An unexpected failure of the pass warns
(:class:`CompiledModelWarning`) and leaves that graph unobserved; it never breaks compilation. The op is tagged ``cudagraph_unsafe``: a CUDA-graph replay would skip the
Python that picks the ring row, so with ``mode="reduce-overhead"`` Inductor leaves those graphs
(or, with graph partitioning, the observe calls) out of its CUDA graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import re
import threading
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence  # typing's Sequence: see _observe_op

import torch
from torch import fx, nn

from ..core.activations import NONNEGATIVE_FUNCTIONS, RELU_SPELLINGS, called_activation, function_of_module
from ..core.capture import (
    dynamo_module_path,
    SiteInfo,
    ThresholdSpec,
    UnitDimSpec,
    choose_unit_dim,
    compiled_blocks,
    display_names,
    eager_modules,
    next_site_order,
    checked_threshold,
    checked_unit_dim,
    resolve_threshold,
    same_function_ordinal,
)
from ..core.hooks import copy_safe_hook, global_forward_hooks
from ..core.inputs import MASK_KEYS, in_decoder, is_encoder_decoder, mask_layout
from ..core.stats import traceable_batch_sums
from ..core.unit_axis import ACT, AxisTable, kind_of
from ..errors import DeadReluError
from .window import WindowStats, add_sums_to_many

__all__ = ["CompiledModelWarning", "GraphCapture", "graph_capture_available", "set_call_mask"]


class CompiledModelWarning(UserWarning):
    """A monitor and ``torch.compile`` do not meet as intended: a monitor without ``compiled=True``
    saw its model run compiled, a compiled-mode monitor saw no graph, or a graph could not be
    observed (each issued once)."""

_OP_NAME = "deadrelu::observe"
_LOCK = threading.Lock()
_CALLBACKS: dict[int, tuple["GraphCapture", "_Site"]] = {}  # site id -> where its sums go
# site id -> the site as the pass made it (without its rings): a graph compiled under one monitor
# keeps running after it detaches, for this model or another instance of its class (Dynamo shares
# graphs), and the monitor attached to that model then adopts the site (see _dispatch).
_TEMPLATES: dict[int, "_Site"] = {}
_SITE_IDS = itertools.count(1)
_ATTACHED: "weakref.WeakSet[GraphCapture]" = weakref.WeakSet()
# The capture whose model ran the last graph with a parameter input in this thread (None: a model no
# monitor watches). A graph without parameters (the rest of a forward after a graph break) has no
# anchor of its own: it belongs to the forward that the graph before it ran (see _dispatch).
_RUNNING = threading.local()
_UNKNOWN = object()
_installed: dict[str, Any] = {}  # "pass": our chained pass, "previous": what it replaced


def graph_capture_available() -> bool:
    """True when this torch has everything the graph capture needs (else ModuleCapture is used)."""
    try:
        import torch._higher_order_ops.effects as effects
        import torch._inductor.config as inductor_config
        import torch._inductor.custom_graph_pass as custom_graph_pass
    except ImportError:
        return False
    return (
        hasattr(torch.library, "custom_op")
        and hasattr(effects, "_register_effectful_op")
        and hasattr(custom_graph_pass, "CustomGraphPass")
        and hasattr(inductor_config, "pre_grad_custom_pass")
    )


def _registered_op(key: str, op_name: str, define: Callable[[], None]) -> Any:
    """The custom op ``op_name``, defined by ``define()`` once per process (a deadrelu imported
    again in the same process finds it in ``torch.ops`` already)."""
    op = _installed.get(key)
    if op is not None:
        return op
    with _LOCK:
        if key not in _installed:
            namespace, name = op_name.split("::")
            if not hasattr(getattr(torch.ops, namespace), name):
                define()
            _installed[key] = getattr(getattr(torch.ops, namespace), name).default
        return _installed[key]


def _observe_op() -> Any:
    """The effectful custom op ``deadrelu::observe(Tensor[] sums, int[] sites, Tensor? anchor, SymInt[]
    routes, Tensor[] inputs) -> ()`` (registered once per process): hands each site's sums to the
    capture that owns the site (``routes`` and ``inputs``: which expert each site counts, see
    :func:`_dispatch`)."""

    def define() -> None:
        # Not capturable by CUDA graphs: a replay would skip the Python that picks the ring row.
        unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
        tags = {"tags": (unsafe,)} if unsafe is not None else {}

        # typing.Sequence, not list[...]: torch 2.4-2.6 infer a custom op's schema from typing's
        # generics only (list[torch.Tensor] is refused there; later torches take both).
        @torch.library.custom_op(_OP_NAME, mutates_args=(), **tags)
        def observe(
            sums: Sequence[torch.Tensor], sites: Sequence[int], anchor: Optional[torch.Tensor], routes: Sequence[int],
            inputs: Sequence[torch.Tensor],
        ) -> None:  # fmt: skip
            _dispatch(sums, sites, anchor, routes, inputs)

        @observe.register_fake
        def _(
            sums: Sequence[torch.Tensor], sites: Sequence[int], anchor: Optional[torch.Tensor], routes: Sequence[int],
            inputs: Sequence[torch.Tensor],
        ) -> None:  # fmt: skip
            return None

        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

        # Effectful: Inductor keeps the call (it returns nothing) and keeps it in order.
        namespace, name = _OP_NAME.split("::")
        _register_effectful_op(getattr(getattr(torch.ops, namespace), name).default, _EffectType.ORDERED)

    return _registered_op("op", _OP_NAME, define)


_SAMPLES_OP_NAME = "deadrelu::count_samples"
_SAMPLE_COUNTERS: dict[int, "weakref.WeakMethod[Callable[[int], None]]"] = {}
_COUNTER_IDS = itertools.count(1)


def sample_counter(callback: Callable[[int], None]) -> int:
    """Register ``callback(rows)`` for :func:`count_samples` (held weakly); returns its id.
    Registers the op too, now: not while Dynamo traces the hook that calls it."""
    _samples_op()
    ident = next(_COUNTER_IDS)
    _SAMPLE_COUNTERS[ident] = weakref.WeakMethod(callback)  # type: ignore[arg-type]
    return ident


def count_samples(x: torch.Tensor, counter: int) -> None:
    """Called by the monitor's root hook while TorchDynamo traces it: puts one
    ``deadrelu::count_samples`` call at the start of the model's graph, so each compiled forward
    hands its batch size to counter ``counter`` when it runs (a hook of a model compiled as a
    whole runs only inside the compiled code, where a Python counter would be frozen at trace time)."""
    _samples_op()(x.detach(), counter)


def _samples_op() -> Any:
    """The effectful custom op ``deadrelu::count_samples(Tensor x, int counter) -> ()``."""

    def define() -> None:
        @torch.library.custom_op(_SAMPLES_OP_NAME, mutates_args=())
        def count(x: torch.Tensor, counter: int) -> None:
            ref = _SAMPLE_COUNTERS.get(counter)
            callback = ref() if ref is not None else None
            if callback is not None:
                callback(int(x.shape[0]) if x.ndim else 0)

        @count.register_fake
        def _(x: torch.Tensor, counter: int) -> None:
            return None

        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

        namespace, name = _SAMPLES_OP_NAME.split("::")
        _register_effectful_op(getattr(getattr(torch.ops, namespace), name).default, _EffectType.ORDERED)

    return _registered_op("samples", _SAMPLES_OP_NAME, define)


_CALL_MASK = threading.local()  # the observation mask of the model call running now (set by BlockCapture)
_MASK_OP_NAME = "deadrelu::call_mask"


def set_call_mask(mask: torch.Tensor | None, decoder_mask: torch.Tensor | None = None, split: bool = False) -> None:
    """Make ``mask`` (bool ``(B, T)``, or None) the observation mask that compiled blocks' graphs
    read while the model call that carries it runs (see :func:`_call_mask`); in an encoder-decoder
    call (``split``) a block inside a ``decoder`` module reads ``decoder_mask`` instead (None: every
    position), as the eager capture's decoder sites do."""
    _CALL_MASK.value = (mask, decoder_mask, split)


def _mask_op() -> Any:
    """The custom op ``deadrelu::call_mask(Tensor like, bool decoder) -> Tensor`` (registered once
    per process): the running model call's mask (its decoder mask for a ``decoder`` block of an
    encoder-decoder call) over ``like``'s two leading dims — transposed when ``like`` is
    ``(T, B, ...)`` — or all True when the call has none that fits. A block's graph takes only
    the block's inputs, never the model call's ``attention_mask``; this op hands it in."""

    def define() -> None:
        @torch.library.custom_op(_MASK_OP_NAME, mutates_args=())
        def call_mask(like: torch.Tensor, decoder: bool) -> torch.Tensor:
            mask, decoder_mask, split = getattr(_CALL_MASK, "value", None) or (None, None, False)
            if decoder and split:
                mask = decoder_mask
            lead = tuple(like.shape[:2])
            if mask is not None and mask.ndim == 2:
                if tuple(mask.shape) == lead:
                    return mask.to(device=like.device, dtype=torch.bool)
                if tuple(mask.shape) == lead[::-1]:
                    return mask.t().to(device=like.device, dtype=torch.bool).contiguous()
            return torch.ones(lead, dtype=torch.bool, device=like.device)

        @call_mask.register_fake
        def _(like: torch.Tensor, decoder: bool) -> torch.Tensor:
            return like.new_empty(like.shape[:2], dtype=torch.bool)

    return _registered_op("mask", _MASK_OP_NAME, define)


def _call_mask(like: torch.Tensor, decoder: bool = False) -> torch.Tensor:
    """Inserted at the start of a compiled block's graph (see :meth:`GraphCapture.rewrite`); ``decoder``:
    the block lies inside a ``decoder`` module."""
    return _mask_op()(like.detach(), decoder)


def _dispatch(
    sums: list[torch.Tensor],
    sites: list[int],
    anchor: Optional[torch.Tensor],
    routes: Sequence[int] = (),
    inputs: Sequence[torch.Tensor] = (),
) -> None:
    """The observe op's body: each site's sums to the capture whose model ran the graph — the one
    that made the site, or else an attached capture of the model that owns the anchor parameter,
    which adopts the site (the graph was compiled under another monitor, or for a sibling instance).

    ``routes`` holds three numbers per site (:func:`_route_args`): ``0, 0, 0`` for a site counted as
    it is; ``E, e, j`` for an activation of ``w[e]``, ``w = inputs[j]`` a stacked weight of ``E``
    experts and ``e`` the graph's input (a helper compiled once for every expert, ``e`` a symbolic
    int); ``-1, 0, j`` for an activation of graph input ``inputs[j]``, whose autograd history names
    the expert (a data-dependent experts loop runs eagerly and calls the activation's compiled
    graph once per expert). Such a site's sums go to its expert's site (see :meth:`GraphCapture._routed`)."""
    per_site = len(sums) // max(len(sites), 1)
    batches: dict[GraphCapture, list[tuple[_Site, list[torch.Tensor]]]] = {}
    ours: dict[GraphCapture, bool] = {}
    if anchor is not None:
        _RUNNING.model = next((c for c in list(_ATTACHED) if c._is_ours(anchor)), None)
    running = getattr(_RUNNING, "model", _UNKNOWN)

    def runs_it(capture: GraphCapture) -> bool:
        if capture not in ours:
            if anchor is not None:
                ours[capture] = capture is running
            else:  # a graph without parameters: the model of the last graph that had some runs it
                ours[capture] = running is _UNKNOWN or running is capture
        return ours[capture]

    adopters = None
    for i, ident in enumerate(sites):
        owner = _CALLBACKS.get(ident)
        part = sums[i * per_site : (i + 1) * per_site]
        kind = int(routes[3 * i]) if len(routes) > 3 * i else 0
        expert = _expert_at_run_time(kind, routes[3 * i + 1], inputs[int(routes[3 * i + 2])]) if kind else None
        template = owner[1] if owner is not None else _TEMPLATES.get(ident)
        if template is not None and template.unowned is not None:
            # A graph no module of any model claims: the expert's weight says whose it is.
            placed = _unowned_run(owner, ident, template, expert, part[0].device)
            if placed is not None:
                batches.setdefault(placed[0], []).append((placed[1], part))
            continue
        if owner is not None and runs_it(owner[0]):
            site = owner[0]._routed(owner[1], expert) if kind else owner[1]
            if site is not None:
                batches.setdefault(owner[0], []).append((site, part))
            continue
        if template is None or anchor is None:
            continue
        if adopters is None:
            adopters = [c for c in list(_ATTACHED) if runs_it(c)]
        for capture in adopters:
            site = capture._adopt(ident, template, part[0].device, pending=bool(kind))
            if site is not None:
                site = capture._routed(site, expert) if kind else site
                if site is not None:
                    batches.setdefault(capture, []).append((site, part))
                break
    for capture, batch in batches.items():
        capture.record(batch, anchor)


def _unowned_run(
    owner: tuple["GraphCapture", "_Site"] | None, ident: int, template: "_Site", expert: "_Expert | None", device: torch.device
) -> tuple["GraphCapture", "_Site"] | None:  # fmt: skip
    """Where one run of a site of a graph without parameters or modules goes (see
    :meth:`GraphCapture._unowned_sites`): the expert site of the capture whose model holds the
    expert's weight, or nowhere — another model's weight, or none found (said once)."""
    weight = expert.weight if expert is not None else None
    if owner is not None:
        capture = owner[0]
        if weight is None:
            capture._unrouted(template)
            return None
        if not capture._is_ours(weight):
            return None  # another model's experts (its own monitor, attached when this graph compiled, has its own op)
        base: _Site | None = owner[1]
    else:  # the capture that compiled the graph is gone: an attached capture of the weight's model adopts it
        capture = next((c for c in list(_ATTACHED) if weight is not None and c._is_ours(weight)), None)
        if capture is None:
            return None
        base = capture._adopt(ident, template, device, pending=True)
    site = capture._expert_site(base, expert) if base is not None and expert is not None else None
    return None if site is None else (capture, site)


def _site_sums(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    nonnegative: bool,
    mask: torch.Tensor | None = None,
    transposed: bool = False,
) -> list[torch.Tensor]:
    """Inserted after each activation: its batch's per-unit sums, which AOTAutograd traces into
    plain reductions and Inductor fuses with the kernels around the activation. ``mask`` is the
    call's ``attention_mask`` (``(B, T)``; ``transposed`` for a ``(T, B)`` activation)."""
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        elif mask.is_floating_point():
            keep = mask == 1  # 0/1 float masks; an additive 0/-inf mask then counts nothing, never the pads
        else:
            keep = mask != 0
        keep = keep.t().contiguous() if transposed else keep
    return list(traceable_batch_sums(x.detach(), unit_dim, threshold, nonnegative, keep).values())


def _observe_sites(
    sums: list[list[torch.Tensor]],
    sites: list[int],
    anchor: torch.Tensor | None,
    routes: Sequence[Any] = (),
    inputs: Sequence[torch.Tensor] = (),
) -> None:
    """Inserted once at the end of a graph: hands every site's sums to the monitor in one op call.

    ``anchor`` is one of the graph's parameter inputs: TorchDynamo shares a graph between
    instances of the same class (their parameters are inputs), so the op checks at run time
    that the instance running is the monitored one. ``routes`` and ``inputs`` say which expert
    each site counts (see :func:`_dispatch`)."""
    _observe_op()([t for site in sums for t in site], sites, anchor, list(routes), list(inputs))


def _pass_token(ident: Any) -> Any:
    """What the installed pass pickles as (see ``_DeadReluPass.__reduce__``); never unpickled."""
    return ident


def _install_pass() -> None:
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _DeadReluPass(CustomGraphPass):
        def __init__(self, previous: Any) -> None:
            self.previous = previous
            self.key = uuid.uuid4().hex

        def __call__(self, graph: fx.Graph) -> None:
            for capture in list(_ATTACHED):
                try:
                    capture.rewrite(graph)
                except DeadReluError:
                    raise  # the user's own options (an out-of-range unit_dim): as in eager mode
                except Exception as err:  # never break the user's compilation over a monitor
                    warnings.warn(
                        f"deadrelu could not observe a compiled graph of {type(capture.model).__name__} "
                        f"({type(err).__name__}: {err}); it runs unobserved; please report this",
                        CompiledModelWarning,
                        stacklevel=2,
                    )
            if self.previous is not None:
                self.previous(graph)

        def __reduce__(self) -> Any:
            # torch <= 2.6 pickle the pre-grad pass into the FX graph cache key (later ones ask
            # uuid()): pickled as its uuid, the key is unique, as intended, and no "Failed to
            # pickle cache key" warning is logged for this local class.
            return (_pass_token, (self.uuid(),))

        def uuid(self) -> Any:
            # Unique per process and set of monitors: the site ids baked into a graph mean
            # nothing anywhere else, so Inductor must never reuse it from a cache.
            previous = getattr(self.previous, "uuid", None)
            return (self.key, previous() if callable(previous) else None)

    current, ours = inductor_config.pre_grad_custom_pass, _installed.get("pass")
    if ours is not None and current is ours:
        ours.key = uuid.uuid4().hex  # a new set of monitors: graphs cached for the old set are not reused
        return
    _installed["previous"] = current
    _installed["pass"] = inductor_config.pre_grad_custom_pass = _DeadReluPass(current)


def _remove_pass() -> None:
    import torch._inductor.config as inductor_config

    ours = _installed.get("pass")
    if ours is not None and inductor_config.pre_grad_custom_pass is ours:
        inductor_config.pre_grad_custom_pass = _installed.get("previous")
        _installed.pop("pass", None)
        _installed.pop("previous", None)


@dataclass
class _Site:
    info: SiteInfo
    unit_dim: int
    stats: WindowStats
    order: float  # sites are reported in this order (an expert's site sits between its layer's neighbours)
    ident: int
    key: tuple[Any, ...] = ()
    entry: tuple[Any, int, str] | None = None  # the producer's unit axis (for sibling blocks' sites)
    block: str = ""  # the compiled block whose own graph holds the site ("" for the model's graphs)
    calls_per_block_call: int = 1  # calls of the site's module in one call of that block
    # A site of a graph no module claims (see GraphCapture._unowned_sites): the module paths it may
    # lie in; the weight of the expert a run counts picks one.
    unowned: tuple[str, ...] | None = None
    anchor_path: str | None = None  # the module holding its graph's anchor when traced (see _for_running_instance)


class _Expert(NamedTuple):
    """The expert one run of a routable site counts: slice ``index`` of ``slices`` of a stacked
    weight (``weight``: that parameter, where the run's autograd history named it)."""

    index: int
    slices: int
    weight: Optional[torch.Tensor] = None


class _Route(NamedTuple):
    """Where a graph's activation gets its expert: ``index`` (an int: a loop Dynamo unrolled; a node
    of a symbolic int: the expert is the graph's input) of a stacked weight of ``slices`` experts
    (``input``: that weight's graph input), or, without ``index``, ``input``, the graph input whose
    autograd history says it at run time."""

    index: Any = None
    slices: int = 0
    input: Optional[fx.Node] = None


_STACK_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _position(node: fx.Node) -> str:
    """The innermost source frame of a graph node (``file:line:function``), from its stack trace."""
    frames = _STACK_FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line, function = frames[-1]
    return f"{file}:{line}:{function}"


class GraphCapture:
    """Observe a compiled model through its graphs (see the module docstring).

    Presents the part of :class:`deadrelu.ActivationCapture`'s interface the monitor uses.

    Args:
        model: the (uncompiled) model; compile it after :meth:`attach`.
        unit_dim: int, mapping or callable on :class:`SiteInfo` (as for the eager capture).
        threshold: float, mapping or callable (as for the eager capture).
        window: rolling-window length in batches.
        observing: called when a compiled forward runs; the batch is recorded only when it
            returns True (the monitor's schedule).
        mask: the call's ``attention_mask`` input is used unless False (see the module docstring).
        eager_beside: an eager capture observes the code outside the compiled blocks, and hands
            the model call's mask to the blocks' graphs (``deadrelu::call_mask``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        unit_dim: UnitDimSpec,
        threshold: ThresholdSpec,
        window: int,
        observing: Callable[[], bool] = lambda: True,
        mask: Any = None,
        eager_beside: bool = False,
    ) -> None:
        refuse_mask(mask)
        self.mask_spec = mask
        self.model = model
        self.unit_dim_spec = checked_unit_dim(unit_dim)
        self.threshold_spec = checked_threshold(threshold)
        self.window = window
        self.observing = observing
        self.enabled = True
        self.sites: dict[tuple[Any, ...], _Site] = {}
        self.uncaptured: dict[str, str] = {}
        named = eager_modules(model)
        self._paths = {id(m): p for p, m in named}
        self._types = {p: type(m).__name__ for p, m in named}
        self._leaf = {p: next(iter(m.children()), None) is None for p, m in named}
        self._act_modules = {p: fn for p, m in named if (fn := function_of_module(m)) is not None}
        self._act_objects = {p: m for p, m in named if p in self._act_modules}
        self._module_objects = dict(named)
        self._root_code = _code_span(type(model).forward)
        # Blocks compiled on their own (model.layers[i] = torch.compile(...)): each is the root of
        # its graphs, and instances of one class share one graph (see record()).
        blocks = compiled_blocks(model)
        self._blocks = sorted(blocks, key=len, reverse=True)  # innermost first
        self._block_code = [(span, p) for p, m in blocks.items() if (span := _code_span(type(m).forward))]
        self._param_owner = {id(t): p for p, m in named for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        self._pointer_owner: dict[int, str] = {}
        self._graph_root = ""  # the module whose forward the graph being rewritten starts in
        self._graph_calls: dict[str, int] = {}  # calls of each module in that graph
        self._anchor_path: str | None = None  # the module holding that graph's anchor parameter
        self._adopted: dict[int, _Site | None] = {}  # another capture's graph site id -> this capture's site
        # A graph break splits a forward into graphs (frames) that each number module calls from 0:
        # a key first made in another frame is that call's key in this one, renumbered (see _site).
        self._frame_keys: dict[tuple[Any, tuple[Any, ...]], tuple[Any, ...]] = {}
        # module path -> {place it is called from: call number} and its forward's code span (_call_number)
        self._call_numbers: dict[str, dict[Any, int]] = {}
        self._forward_spans: dict[str, tuple[str, int, int]] = {}
        self._key_frames: dict[tuple[Any, ...], Any] = {}
        self._frame_names: dict[Any, tuple[str, str]] = {}  # frame id -> (file, function) of the code it runs
        # Blocks' graphs read the model call's mask through deadrelu::call_mask (BlockCapture sets it).
        self.mask_from_call = eager_beside and mask is not False
        self._eager_beside = eager_beside  # an eager capture counts the code outside the graphs
        self._eager_seen: set[str] = set()  # activation modules that ran eagerly (warned once each)
        self._warned_unfit = False  # an attention_mask that fit no activation of a graph was said once
        # A block's k-th call in one forward of the model (its wrapper's hooks run eagerly around
        # the compiled call): its sites are those of call k, as in eager mode.
        self._block_calls: dict[str, int] = {}
        self._running_call: dict[str, int] = {}
        self._wrappers = _wrapper_paths(model)
        self._handles: list[Any] = []
        self._weights = {id(t) for t in (*model.parameters(), *model.buffers())}
        self._pointers: set[int] = set()  # storage of this model's weights, refreshed on a miss
        self._class_spans: dict[tuple[str, int, int], list[str]] | None = None  # a forward's code -> its modules
        self._method_spans: dict[tuple[str, int, int], tuple[list[str], bool]] | None = None  # see _unowned_sites
        # Experts (a stacked 3-D weight, as the eager capture's WeightSlice reads it): a graph's activation of
        # one expert's rows, run once per expert, counts on its expert's site (see _routed).
        self._stacked = any(
            p.ndim == 3 for m in model.modules() if not isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters(recurse=False)
        )  # fmt: skip
        self._pending: dict[tuple[Any, ...], _Site] = {}  # routable sites not reported until they count a run themselves
        self._expert_sites: dict[tuple[int, int], list[_Site]] = {}  # (routable site id, id of the weight) -> its experts' sites
        self._counted_in_graphs: set[str] = set()  # activation modules whose eagerly called forward a graph counted
        self._placed: set[int] = set()  # routable site ids whose experts' sites took its place in the order
        self._weight_relative: dict[int, tuple[str, str]] = {}  # routable site id -> (its path, its weight's) past their common part
        self._attached = False

    # -- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> "GraphCapture":
        """Start rewriting graphs compiled from now on (no-op when attached)."""
        if not self._attached:
            _observe_op()
            if self.mask_from_call:
                _mask_op()
            with _LOCK:
                _ATTACHED.add(self)
                _install_pass()
                for site in (*self.sites.values(), *self._pending.values()):
                    _CALLBACKS[site.ident] = (self, site)
            self._attached = True
            self._hook_block_calls()
            if not self._eager_beside:
                self._hook_eager_calls()
        return self

    def _hook_eager_calls(self) -> None:
        """Say when an activation module runs eagerly (a frame Dynamo skipped, such as a forward
        with a graph break inside a loop, or the uncompiled model trained by mistake): compiled
        mode counts graphs only. The hook does nothing while Dynamo traces it, so graphs are
        unchanged; eagerly it costs one Python call per activation module call."""

        def ran_eagerly(module: nn.Module, args: Any, output: Any) -> None:
            if torch.compiler.is_compiling() or not (self.enabled and torch.is_grad_enabled()):
                return
            path = self._paths.get(id(module), "?")
            if path in self._eager_seen or path in self._counted_in_graphs:
                return  # said already, or its forward ran as a graph that counted it (an experts loop's activation)
            self._eager_seen.add(path)
            self.uncaptured.setdefault(path, "ran eagerly, outside any compiled graph")
            if len(self._eager_seen) == 1:  # once: the report's uncaptured lists every such module
                warnings.warn(
                    f"deadrelu: activation module {path!r} ({type(module).__name__}) ran eagerly, outside any compiled "
                    "graph (Dynamo skipped its frame, e.g. a graph break inside a loop, or the model ran uncompiled): "
                    "compiled mode counts only compiled graphs, so it is not counted, nor are functional activation "
                    "calls in eager code (the report's uncaptured lists each such module). Use the eager monitor "
                    "(compiled=False) or remove the graph break",
                    CompiledModelWarning,
                    stacklevel=2,
                )

        skip_code = getattr(torch._dynamo.eval_frame, "skip_code", None)
        if skip_code is None:
            return
        # Called from eager code (a skipped frame), Dynamo would compile the hook as a frame of its
        # own, where is_compiling() is True: it runs as Python there, and is still inlined (a no-op)
        # into the graphs that trace it.
        skip_code(ran_eagerly.__code__)
        for module in self._act_objects.values():
            self._handles.append(module.register_forward_hook(copy_safe_hook(ran_eagerly)))

    def _hook_block_calls(self) -> None:
        """Count each compiled block's calls per forward of the model (hooks that do nothing while
        Dynamo traces them, so a model compiled as a whole is unaffected)."""
        if not self._wrappers:
            return

        def new_forward(module: nn.Module, args: Any) -> None:
            if not torch.compiler.is_compiling():
                self.new_forward()

        self._handles.append(self.model.register_forward_pre_hook(new_forward))
        for path, wrapper in self._wrappers:

            def enter(module: nn.Module, args: Any, path: str = path) -> None:
                if not torch.compiler.is_compiling():
                    k = self._block_calls.get(path, 0)
                    self._block_calls[path] = k + 1
                    self._running_call[path] = k

            def leave(module: nn.Module, args: Any, output: Any, path: str = path) -> None:
                if not torch.compiler.is_compiling():
                    self._running_call.pop(path, None)

            self._handles.append(wrapper.register_forward_pre_hook(enter))
            self._handles.append(wrapper.register_forward_hook(leave, always_call=True))

    def detach(self) -> None:
        """Stop recording (compiled graphs' calls become no-ops); safe to call twice."""
        if not self._attached:
            return
        with _LOCK:
            for site in (*self.sites.values(), *self._pending.values()):
                _CALLBACKS.pop(site.ident, None)
            _ATTACHED.discard(self)
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            if not _ATTACHED:
                _remove_pass()
            else:
                _install_pass()
        self._attached = False

    @property
    def attached(self) -> bool:
        """True while attached."""
        return self._attached

    @contextlib.contextmanager
    def forward_scope(self, until: Any = None) -> Iterator[None]:
        """Graphs need no scope (whatever runs them is observed); the scope is one forward pass,
        for numbering the calls of compiled blocks (``until``, which bounds eager functional
        call positions, does not apply: a graph's sites are keyed by its nodes)."""
        self.new_forward()
        yield

    def new_forward(self) -> None:
        """A forward pass of the model starts (its root call, an observed scope, or a new training
        step): compiled blocks' calls are numbered from zero again."""
        self._block_calls.clear()

    def reset(self) -> None:
        """Forget every site's statistics (compiled graphs keep their sites)."""
        for site in (*self.sites.values(), *self._pending.values()):
            site.stats.reset()

    def ordered_sites(self) -> list[tuple[str, _Site]]:
        """Sites in first-seen order with the eager capture's display names."""
        ordered = sorted(self.sites.values(), key=lambda s: s.order)
        return list(zip(display_names([s.info for s in ordered]), ordered))

    def record(self, batch: list[tuple[_Site, list[torch.Tensor]]], anchor: torch.Tensor | None) -> None:
        """Add one compiled forward's sums into its sites' rings (called by the observe op)."""
        if not (self.enabled and self.observing()) or (anchor is not None and not self._is_ours(anchor)):
            return  # unscheduled, or another instance of the model's class running the same graph
        if anchor is not None and self._blocks and batch:
            batch = self._for_running_block(batch, anchor)
        if anchor is not None and batch:
            batch = self._for_running_instance(batch, anchor)
        try:
            add_sums_to_many([(site.stats, sums) for site, sums in batch])
        except Exception as err:  # a failure of deadrelu's own bookkeeping, not of the model
            names = ", ".join(f"{s.info.module or '<root>'} ({s.info.function}, shape {s.info.shape})" for s, _ in batch)
            raise DeadReluError(
                f"deadrelu failed to record the compiled activation sites {names} "
                f"({type(err).__name__}: {err}); please report this"
            ) from err

    def _for_running_block(self, batch: list[tuple[_Site, list[torch.Tensor]]], anchor: torch.Tensor) -> list[tuple[_Site, list[torch.Tensor]]]:  # fmt: skip
        """Blocks compiled one by one (``layers[i] = torch.compile(layers[i])``) share one graph per
        class: Dynamo rewrote it once, with the sites of the block it traced first. The anchor says
        which block runs now; its sums go to that block's own sites (made on first sight)."""
        traced = batch[0][0].block
        if not traced:
            return batch  # a graph of the whole model: its sites are its own
        running = self._block_of(self._owner_of_tensor(anchor)) or traced
        call = self._running_call.get(running, 0)
        if running == traced and call == 0:
            return batch
        pairs = [(self._sibling(site, traced, running, call), sums) for site, sums in batch]
        return [(site, sums) for site, sums in pairs if site is not None]

    def _for_running_instance(self, batch: list[tuple[_Site, list[torch.Tensor]]], anchor: torch.Tensor) -> list[tuple[_Site, list[torch.Tensor]]]:  # fmt: skip
        """The rest of a module's forward after a graph break is a graph of its own, which serves
        every instance of the module's class in the model (each layer; their parameters are its
        inputs): its sites are those of the instance it was traced for. The anchor parameter says
        which instance runs; a site that lies where the traced anchor lies from it counts on the
        running instance's site at that place (made on first sight)."""
        running = None
        out = []
        for site, sums in batch:
            if site.anchor_path is not None and not site.block:
                running = self._owner_of_tensor(anchor) if running is None else running
                if running is not None and running != site.anchor_path:
                    moved = _moved(_relative(site.info.module, site.anchor_path), running)
                    if moved is not None and moved != site.info.module and self._types.get(moved) == site.info.module_type:
                        site = self._sibling(site, site.info.module, moved, 0)  # type: ignore[assignment]
                        if site is None:
                            continue
            out.append((site, sums))
        return out

    def _sibling(self, site: _Site, traced: str, running: str, call: int) -> _Site | None:
        """The site of call ``call`` of block ``running`` at the place of ``site`` in the first
        call of block ``traced`` (the same class)."""
        path = running + site.info.module[len(traced) :]
        module_call = site.key[1] + call * site.calls_per_block_call
        key = (path, module_call, *site.key[2:])
        found = self.sites.get(key)
        if found is not None:
            return found
        info = dataclasses.replace(
            site.info,
            module=path,
            module_type=self._types.get(path, site.info.module_type),
            leaf=self._leaf.get(path, False),
            call=module_call,
        )
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, len(info.shape), site.entry)
        stats = WindowStats(site.stats.units, resolve_threshold(self.threshold_spec, info), site.stats.device, self.window)
        stats.nonnegative = site.stats.nonnegative
        new = dataclasses.replace(site, info=info, unit_dim=unit_dim, stats=stats, order=next_site_order(), ident=next(_SITE_IDS), key=key)
        if unit_dim != site.unit_dim:  # the graph reduces over the traced block's axis: not this site's
            self.uncaptured.setdefault(path, f"{info.function}: unit_dim {unit_dim} differs from {site.info.module}'s")
            return None
        self.sites[key] = new
        with _LOCK:
            if self._attached:
                _CALLBACKS[new.ident] = (self, new)
        return new

    # -- the graph pass ------------------------------------------------------------------------
    def _is_ours(self, anchor: torch.Tensor) -> bool:
        """Whether a parameter handed to the observe op belongs to this model: by identity, else
        by storage (Inductor may pass an alias; the model may have moved or replaced its weights)."""
        if id(anchor) in self._weights:
            return True
        pointer = anchor.data_ptr()
        if pointer in self._pointers:
            return True
        self._pointers = {t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        return pointer in self._pointers

    def _owns(self, graph: fx.Graph) -> bool:
        """Whether a graph may run this model: it calls one of its modules (or a module of the same
        class at the same path: Dynamo shares graphs between instances), takes its parameters, or
        runs its root forward. The observe op's anchor settles which instance runs it."""
        for node in graph.nodes:
            for key in node.meta.get("nn_module_stack") or {}:
                ident = key.partition("@")[0]
                if ident.isdigit() and int(ident) in self._paths:
                    return True  # one of this model's own modules
            if node.op == "placeholder" and id(_example(node)) in self._weights:
                return True  # this model's own parameters
        if _anchor(graph) is None:
            # No parameter to tell instances apart at run time: the rest of this model's own forward
            # after a graph break is observed (it runs in the forward of the graph before it); a
            # module's mere resemblance to one of ours is not.
            return any(self._forward_owner(n) == "" for n in graph.nodes if n.op in ("call_function", "call_method"))
        for node in graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if any(self._resolve(key, value) is not None for key, value in stack.items()):
                return True  # a module of the same class at the same path: maybe a sibling instance
        return any(self._in_root_forward(n) for n in graph.nodes)

    def _resolve(self, key: str, value: Any) -> str | None:
        """Our module path for one ``nn_module_stack`` entry, or None."""
        ident = key.partition("@")[0]
        if ident.isdigit() and int(ident) in self._paths:
            return self._paths[int(ident)]
        try:  # another instance of the same class: match its path and class
            path, cls = dynamo_module_path(str(value[0])), value[1]
        except (TypeError, IndexError):
            return None
        name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", None)
        return path if path is not None and self._types.get(path) == name and path else None

    def _in_root_forward(self, node: fx.Node) -> bool:
        """Whether a node outside every module call was made by this model's own forward, or by the
        forward of a block compiled on its own (and not, say, by a wrapper compiled around it)."""
        return self._forward_owner(node) is not None

    def _forward_owner(self, node: fx.Node) -> str | None:
        """The path of the module (the root ``""`` or the graph's compiled block) whose own forward
        made a node outside every module call, or None."""
        spans = [(self._root_code, "")] if self._root_code is not None else []
        spans += [(span, path) for span, path in self._block_code if path == self._graph_root]
        for f, line, _ in _STACK_FRAME.findall(node.meta.get("stack_trace") or ""):
            for (file, first, last), path in spans:
                if f == file and first <= int(line) <= last:
                    return path
        return None

    def _root_block(self, graph: fx.Graph) -> str:
        """The compiled block a graph was compiled from: the one block all its parameters belong
        to (a graph of the whole model holds parameters of several, or of none), else ""."""
        if not self._blocks:
            return ""
        owners = set()
        for node in graph.nodes:
            value = _example(node) if node.op == "placeholder" else None
            if isinstance(value, nn.Parameter):
                owners.add(self._block_of(self._owner_of_tensor(value)))
        return owners.pop() if len(owners) == 1 else ""

    def _calls_in(self, graph: fx.Graph) -> dict[str, int]:
        """How often each of this model's modules is called in one run of a graph."""
        calls: dict[str, int] = {}
        for node in graph.nodes:
            for key, value in (node.meta.get("nn_module_stack") or {}).items():
                path = self._resolve(key, value)
                k = key.partition("@")[2]
                if path is not None:
                    calls[path] = max(calls.get(path, 0), (int(k) if k.isdigit() else 0) + 1)
        return calls

    def _block_of(self, path: str | None) -> str:
        """The compiled block a module path lies in (``""``: none, the model's own graph)."""
        for block in self._blocks:
            if path is not None and (path == block or path.startswith(block + ".")):
                return block
        return ""

    def _owner_of_tensor(self, t: torch.Tensor) -> str | None:
        """The module path holding a parameter or buffer: by identity, else by storage."""
        path = self._param_owner.get(id(t))
        if path is None:
            if t.data_ptr() not in self._pointer_owner:
                self._pointer_owner = {
                    w.data_ptr(): p for p, m in eager_modules(self.model) for w in (*m.parameters(False), *m.buffers(False))
                }
            path = self._pointer_owner.get(t.data_ptr())
        return path

    def rewrite(self, graph: fx.Graph) -> None:
        """Insert the observation of every activation site in one graph (Inductor's pre-grad pass)."""
        if not torch.is_grad_enabled():
            return  # inference graphs are not observed, as in eager mode
        self._graph_root = self._root_block(graph)
        self._graph_calls = self._calls_in(graph)
        traced = _example(_anchor(graph)) if _anchor(graph) is not None else None
        self._anchor_path = self._owner_of_tensor(traced) if isinstance(traced, torch.Tensor) else None
        if not self._owns(graph):
            found, observed = self._unowned_sites(graph)
            self._note_unattributed(graph, observed)
            anchor = None
        else:
            self._note_frame(graph)
            found = self._sites_in(graph)
            anchor = _anchor(graph)
        if not found and anchor is None:
            return
        # A graph with no sites still gets the (empty) op: it says which model runs the graphs after it.
        sums = self._insert_sums(graph, [(node, site) for node, site, _ in found]) if found else []
        routes, inputs = _route_args([route for _, _, route in found])
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        with graph.inserting_before(output):  # one op call per graph and step, not one per site
            graph.call_function(_observe_sites, (sums, [site.ident for _, site, _ in found], anchor, routes, inputs))

    def _insert_sums(self, graph: fx.Graph, found: list[tuple[fx.Node, _Site]]) -> list[fx.Node]:
        """After each site's node, its batch's per-unit sums (masked where the call's mask lies over it)."""
        mask, mask_shape = self._mask_input(graph), None
        call_input = mask is not None  # the graph takes an attention_mask (a block's call mask may be None)
        if self.mask_from_call and self._graph_root:
            mask, mask_shape = self._call_mask_node(graph)
            call_input = False
        # An encoder-decoder model: the attention_mask is the encoder's; decoder sites take the
        # decoder_attention_mask input, or none (as the eager capture does).
        decoder_mask = self._mask_input(graph, ("decoder_attention_mask",))
        split = decoder_mask is not None or (call_input and is_encoder_decoder(self.model))
        sums, masked = [], False
        for node, site in found:
            with graph.inserting_after(node):
                nonnegative = site.info.function in NONNEGATIVE_FUNCTIONS
                site_mask = decoder_mask if split and in_decoder(site.info.module) else mask
                how = _mask_layout(node.meta["example_value"], site.unit_dim, site_mask, None if site_mask is not mask else mask_shape)
                extra = () if how is None else (site_mask, how == "transposed")
                masked = masked or how is not None
                sums.append(graph.call_function(_site_sums, (node, site.unit_dim, site.stats.threshold, nonnegative, *extra)))
        if call_input and mask is not None and not masked:
            self._warn_unfit_mask(mask, found)
        return sums

    def _warn_unfit_mask(self, mask: fx.Node, found: list[tuple[fx.Node, _Site]]) -> None:
        """The call's ``attention_mask`` lies over none of a graph's activations (a model that
        flattens tokens to ``(B·T, C)``): every position is counted, padding included — said once,
        as the eager monitor does."""
        if self._warned_unfit:
            return
        self._warned_unfit = True
        shape = tuple(mask.meta["example_value"].shape)
        example = tuple(found[0][0].meta["example_value"].shape)
        warnings.warn(
            f"deadrelu: the attention_mask of shape {shape} fits no activation of a compiled graph (an activation's "
            f"leading dimensions must be (B, T) or (T, B); e.g. {example}), so every position was counted, padding "
            "included; use the eager monitor with mask= in the activations' layout, or mask=False to silence this",
            stacklevel=2,
        )

    def _note_unattributed(self, graph: fx.Graph, observed: set[fx.Node] | frozenset[fx.Node] = frozenset()) -> None:
        """A graph without parameters whose activations lie in the forward of one of this model's
        module classes (the rest of a block's forward after a graph break): nothing at run time says
        which instance runs it, so it is not observed — listed in ``uncaptured`` and warned once.
        ``observed``: activations whose runs name their instance after all (see :meth:`_unowned_sites`)."""
        if _anchor(graph) is not None:
            return
        if self._class_spans is None:
            self._class_spans = {}
            for path, module in self._module_objects.items():
                span = _code_span(inspect.unwrap(type(module).forward)) if path else None
                if span is not None:
                    self._class_spans.setdefault(span, []).append(path)
        where: dict[str, int] = {}
        for node in graph.nodes:
            target = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target), None)
            if node.op not in ("call_function", "call_method") or target is None or kind_of(target)[0] != ACT:
                continue
            if node in observed or called_activation(kind_of(target)[1], node.args, dict(node.kwargs)) is None:
                continue
            for f, line, _ in _STACK_FRAME.findall(node.meta.get("stack_trace") or ""):
                paths = next((v for (file, first, last), v in self._class_spans.items() if f == file and first <= int(line) <= last), None)
                if paths:
                    key = f"{self._types[paths[0]]}.forward of {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}"
                    where[key] = where.get(key, 0) + 1
                    break
        for key, n in where.items():
            if key not in self.uncaptured:
                self.uncaptured[key] = f"{n} activation call(s) after a graph break, in a graph without parameters"
                warnings.warn(
                    f"deadrelu: {n} activation call(s) in {key} come after a graph break, in a compiled graph with no "
                    "parameter to say which module runs it: compiled mode does not count them. Remove the graph break "
                    "there, or use the eager monitor (compiled=False) for exact counts",
                    CompiledModelWarning,
                    stacklevel=2,
                )

    def _call_mask_node(self, graph: fx.Graph) -> tuple[fx.Node | None, tuple[Any, ...] | None]:
        """In a compiled block's graph: a ``deadrelu::call_mask`` node over the block's first input
        tensor (its hidden states), and that mask's shape, the input's two leading dims."""
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        for node in inputs:
            value = _example(node)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.ndim >= 2:
                if id(value) in self._weights:
                    continue  # a buffer
                with graph.inserting_after(inputs[-1]):
                    return graph.call_function(_call_mask, (node, in_decoder(self._graph_root))), tuple(node.meta["example_value"].shape[:2])
        return None, None

    def _mask_input(self, graph: fx.Graph, keys: tuple[str, ...] = MASK_KEYS) -> fx.Node | None:
        """The graph input that is the call's ``attention_mask`` (a parameter of that name, or that
        key of a ``**kwargs`` dict; ``keys`` for another), unless ``mask=False``."""
        if self.mask_spec is False:
            return None
        for node in graph.nodes:
            if node.op != "placeholder" or not isinstance(node.meta.get("example_value"), torch.Tensor):
                continue
            source = getattr(node.meta.get("grapharg"), "source", None)
            name = getattr(source, "local_name", None) or getattr(source, "index", None)
            if name in keys:
                return node
        return None

    def _sites_in(self, graph: fx.Graph) -> list[tuple[fx.Node, _Site, _Route | None]]:
        """Every activation site of a graph, in graph order, with its site (created on first sight)
        and, for a site whose expert is known only at run time, where it gets it."""
        table = AxisTable()
        slots: dict[tuple[str, int], int] = {}
        seen: dict[tuple[Any, ...], int] = {}
        candidates: list[tuple[fx.Node, tuple[Any, ...], str, _Route | None]] = []
        module_output: dict[tuple[str, ...], fx.Node] = {}  # activation module call -> its last node so far
        module_calls: dict[tuple[str, ...], tuple[str, int, str]] = {}
        module_route: dict[tuple[str, ...], _Route] = {}  # activation module call -> the expert its input came from
        numbered: dict[tuple[str, int, tuple[str, ...]], int] = {}  # (module, Dynamo's k-th call, stack) -> call number
        reached: dict[tuple[str, Any], int] = {}  # (module, place) -> calls from there so far
        for node in graph.nodes:
            value = node.meta.get("example_value")
            if node.op not in ("call_function", "call_method"):
                continue
            target = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target), None)
            if target is None:
                continue
            owner = self._owner(node)
            if owner is None:
                continue  # another model's module
            path, k, act_key, chain = owner
            call = numbered.get((path, k, chain))
            if call is None:
                call = numbered[(path, k, chain)] = self._call_number(path, k, node, reached)
            kind = kind_of(target)
            args = fx.node.map_arg(node.args, lambda n: n.meta.get("example_value"))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("example_value"))
            if kind[0] == ACT:
                inp = args[0] if args else None
                entry = table.get(inp)
                if entry is not None and isinstance(value, torch.Tensor) and value.shape == inp.shape:
                    table.set(value, entry[1], entry[2])
            else:
                table.on_op(kind, args, kwargs, value)
            if act_key is not None:
                if kind[0] == ACT and act_key not in module_route:
                    route = self._route_of(node)
                    if route is not None:
                        module_route[act_key] = route
                if self._in_forward_of(node, path):
                    module_output[act_key] = node  # the module's output is the last node of its forward
                    module_calls[act_key] = (path, call, self._act_modules[path])
                continue
            if kind[0] != ACT or not isinstance(value, torch.Tensor) or _is_weight(node):
                continue
            name = called_activation(kind[1], args, kwargs)
            if name is None:
                continue  # clamp(min=1e-8): no activation
            if kind[1] in RELU_SPELLINGS and not value.is_floating_point():
                continue  # index.clamp(min=0) on integers: no activation
            position = _position(node)
            where = (path, call, position, name)
            route = self._route_of(node)
            if route is not None and isinstance(route.index, int):  # keyed by expert, as the eager capture keys it
                k, route = -1 - route.index, None  # (a static experts loop)
            else:
                k = seen.get(where, 0)
                seen[where] = k + 1
            candidates.append((node, (*where, k), position, route))
        for act_key, node in module_output.items():
            path, call, name = module_calls[act_key]
            if isinstance(node.meta.get("example_value"), torch.Tensor):
                route = module_route.get(act_key)
                static = route is not None and isinstance(route.index, int)
                candidates.append((node, (path, call, None, name, -1 - route.index if static else 0), "", None if static else route))
        order = {n: i for i, n in enumerate(graph.nodes)}
        found: list[tuple[fx.Node, _Site, _Route | None]] = []
        for node, key, position, route in sorted(candidates, key=lambda c: order[c[0]]):  # sites in forward order
            site = self._site(key, node.meta["example_value"], table, slots, location=position, pending=route is not None)
            if site is not None:
                found.append((node, site, route))
        return found

    def _route_of(self, node: fx.Node) -> _Route | None:
        """Where an activation node's expert comes from (see :func:`_expert_route`): an input of the
        graph counts only as a plain tensor input of a model with stacked weights."""
        route = _expert_route(node)
        if route is None or isinstance(route.index, int):
            return route
        if route.index is not None:  # a symbolic expert: the weight it indexes must be a graph input too
            return route if route.input is not None else None
        value = route.input.meta.get("example_value")
        if not self._stacked or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return None
        if id(_example(route.input)) in self._weights or "_parameters_" in route.input.name or "_buffers_" in route.input.name:
            return None  # a parameter or buffer passed through an activation
        return route

    def _unowned_sites(self, graph: fx.Graph) -> tuple[list[tuple[fx.Node, _Site, _Route | None]], set[fx.Node]]:
        """The activations of a graph without parameters or modules of this model (so no rule of
        :meth:`_owns` claims it) that lie in a method of one of its module classes and act on an
        input of the graph: an experts loop Dynamo cannot compile (a data-dependent loop over the
        experts a batch hits, as transformers' eager MoE runs) calls the compiled graph of its
        activation — ``act_fn.forward``, or a helper method — once per expert. The graph says neither
        which module runs it nor which expert: each run's input does, through its autograd history
        (``x @ w[e]``, see :func:`expert_of_input`), so these sites (one per activation, never
        reported) hand each run to the site of its expert in the module the weight names (:meth:`_expert_site`).
        Returns them and the activation calls they observe."""
        observed: set[fx.Node] = set()
        if not self._stacked or _anchor(graph) is not None:
            return [], observed  # a graph with parameters, none of them ours: another model's
        spans = self._spans_of_methods()
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        values = output.args[0] if output.args and isinstance(output.args[0], (tuple, list)) else output.args
        returned = next((a for a in values if isinstance(a, fx.Node)), None)  # what the graph's frame returns
        found: list[tuple[fx.Node, _Site, _Route | None]] = []
        modules_done: set[tuple[str, int, int]] = set()
        inside: dict[tuple[str, int, int], list[fx.Node]] = {}  # an activation module's forward -> its activation calls
        seen: dict[tuple[Any, ...], int] = {}
        for node in graph.nodes:
            target = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target), None)
            frames = _STACK_FRAME.findall(node.meta.get("stack_trace") or "")
            if node.op not in ("call_function", "call_method") or target is None or not frames:
                continue
            file, line, _ = frames[-1]
            span = next((sp for sp in spans if sp[0] == file and sp[1] <= int(line) <= sp[2]), None)
            if span is None:
                continue
            paths, module = spans[span]
            if module:  # an activation module's own forward: its output (the graph's) is the site
                if kind_of(target)[0] == ACT:
                    inside.setdefault(span, []).append(node)
                out = returned.meta.get("example_value") if returned is not None else None
                if span in modules_done or not isinstance(out, torch.Tensor) or not _in_span(returned, span):
                    continue
                route = self._route_of(node)
                if route is None or route.index is not None:
                    continue
                modules_done.add(span)
                node, name, position = returned, self._act_modules[paths[0]], None
            else:
                name = called_activation(kind_of(target)[1], node.args, dict(node.kwargs)) if kind_of(target)[0] == ACT else None
                value = node.meta.get("example_value")
                if name is None or not isinstance(value, torch.Tensor) or not value.is_floating_point() or _is_weight(node):
                    continue
                route = self._route_of(node)
                if route is None or route.index is not None:
                    continue  # not an activation of the graph's input (an expert's rows made eagerly)
                position = _position(node)
            where = (paths[0], -1, position, name)
            k = seen.get(where, 0)
            seen[where] = k + 1
            site = self._site((*where, k), node.meta["example_value"], AxisTable(), {}, location=position or "", pending=True, unowned=tuple(paths))  # fmt: skip
            if site is not None:
                found.append((node, site, route))
                observed.add(node)
        observed.update(n for span in modules_done for n in inside.get(span, ()))  # counted as their module's output
        return found, observed

    def _spans_of_methods(self) -> dict[tuple[str, int, int], tuple[list[str], bool]]:
        """The code of each function of this model's module classes -> (the modules of that class,
        whether it is an activation module's ``forward``: then only the activation modules)."""
        if self._method_spans is None:
            by_class: dict[type, list[str]] = {}
            for path, module in self._module_objects.items():
                by_class.setdefault(type(module), []).append(path)
            spans: dict[tuple[str, int, int], tuple[dict[str, None], bool]] = {}
            for cls, paths in by_class.items():
                for klass in cls.__mro__:
                    if klass in (nn.Module, object):
                        break
                    for attr, function in vars(klass).items():
                        span = _function_span(function)
                        if span is not None:
                            spans.setdefault(span, ({}, attr == "forward"))[0].update(dict.fromkeys(paths))
            self._method_spans = {}
            for span, (found, forward) in spans.items():
                acts = [p for p in found if p in self._act_modules] if forward else []
                self._method_spans[span] = (acts, True) if acts else (list(found), False)
        return self._method_spans

    def _call_number(self, path: str, k: int, node: fx.Node, reached: dict[tuple[str, Any], int]) -> int:
        """The call number of module ``path``'s ``k``-th call in a graph, as the eager capture numbers
        it: by the place it is called from (the node's source frames outside the module's own
        ``forward``, and how often the graph reached that place before), first-seen, for the
        capture's lifetime. Not ``k``: a graph compiled for batches that skip a conditional call
        (``if ...: h = self.act(h)``) numbers the later calls from 0 again."""
        if not path:
            return k  # the root: called once per forward
        frames = [(f, int(line)) for f, line, _ in _STACK_FRAME.findall(node.meta.get("stack_trace") or "")]
        span = self._forward_spans.get(path)
        if span is None:
            module = self._module_objects.get(path)
            forward = inspect.unwrap(type(module).forward) if module is not None else None
            span = self._forward_spans[path] = _code_span(forward) or ("", 0, -1)
        file, first, last = span
        inside = next((i for i, (f, line) in enumerate(frames) if f == file and first <= line <= last), None)
        # torch.nn's own forwards are left out of Dynamo's stack traces: all frames are the caller's
        place = tuple(frames[:inside]) if frames else ("call", k)
        j = reached.get((path, place), 0)
        reached[(path, place)] = j + 1
        numbers = self._call_numbers.setdefault(path, {})
        return numbers.setdefault((place, j), len(numbers))

    def _in_forward_of(self, node: fx.Node, path: str) -> bool:
        """Whether a node under an activation module's stack was made by the module's call itself,
        not by a forward hook on it (Dynamo traces those under the module's stack too): no frame
        of its stack trace lies in a hook's code."""
        module = self._act_objects.get(path)
        hooks = [*getattr(module, "_forward_hooks", {}).values(), *global_forward_hooks()]
        spans = [span for hook in hooks if (span := _code_span(_hook_function(hook))) is not None]
        if not spans:
            return True
        frames = _STACK_FRAME.findall(node.meta.get("stack_trace") or "")
        return not any(f == file and first <= int(line) <= last for f, line, _ in frames for file, first, last in spans)

    def _owner(self, node: fx.Node) -> tuple[str, int, tuple[str, ...] | None, tuple[str, ...]] | None:
        """(module path, that module's call index, the activation module call it lies inside or None,
        the module stack down to that call). Dynamo keys a module by its id, and numbers repeated
        calls only under one parent: one object called from two parents (an activation shared by two
        blocks) has the same key in both, so a call is told by the whole stack above it."""
        stack = list((node.meta.get("nn_module_stack") or {}).keys())
        path, call, act_key, chain = "", 0, None, ()
        ours = False
        if not stack:  # no module on the stack: the compiled root's own code (the model's or a block's)
            root = self._forward_owner(node)
            ours, path = root is not None, root or ""
        entries = node.meta.get("nn_module_stack") or {}
        for i, key in enumerate(stack):  # outermost first
            found = self._resolve(key, entries[key])
            if found is None:
                continue  # a module outside this model (a wrapper compiled around it)
            k = key.partition("@")[2]
            ours, path, call, chain = True, found, int(k) if k.isdigit() else 0, tuple(stack[: i + 1])
            if path in self._act_modules:
                act_key = chain  # the outermost activation module: its output is the site
                break
        return (path, call, act_key, chain) if ours else None

    def _site(
        self, key: tuple[Any, ...], value: torch.Tensor, table: AxisTable, slots: dict[tuple[str, int], int], location: str,
        pending: bool = False, unowned: tuple[str, ...] | None = None,
    ) -> _Site | None:  # fmt: skip
        """The site of ``key``, made on first sight; ``pending``: not reported until it counts a run of
        its own (its runs may count on their experts' sites, see :meth:`_routed`)."""
        key = self._in_forward(key)
        path, call, position, name, occurrence = key
        slot = slots.get((path, call), 0)
        slots[(path, call)] = slot + 1
        site = self.sites.get(key) or self._pending.get(key)
        if site is not None:
            return site
        info = SiteInfo(
            module=path,
            module_type=self._types.get(path, type(self.model).__name__),
            call=call,
            slot=slot,
            function=name,
            shape=tuple(s if isinstance(s, int) else -1 for s in value.shape),
            leaf=self._leaf.get(path, False),
            location=_short_location(location),
            position=position or "",
            occurrence=occurrence,
            ordinal=same_function_ordinal((s.info for s in self.sites.values()), path, call, name),
        )
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, value.ndim, table.get(value))
        units = value.shape[unit_dim] if value.ndim else 1
        if not isinstance(units, int):
            self.uncaptured.setdefault(path or "<root>", f"{name} with a dynamic number of units")
            return None
        if info.unit_axis_source == "producer:grouped_mm":
            # The eager capture splits a grouped matmul's rows by its offsets, one site per expert;
            # a compiled graph's sums cannot yet, so say that this site pools them.
            warnings.warn(
                f"deadrelu: the {name} in {path or '<root>'} follows a grouped matmul over stacked experts (an MoE "
                "layer); the compiled monitor counts unit k of every expert as one unit, so a unit dead in one "
                "expert reads alive if another fires. Use compiled=False (eager, one site per expert) for "
                "per-expert counts",
                CompiledModelWarning,
                stacklevel=2,
            )
        stats = WindowStats(units, resolve_threshold(self.threshold_spec, info), value.device, self.window)
        stats.nonnegative = name in NONNEGATIVE_FUNCTIONS
        site = _Site(
            info, unit_dim, stats, order=next_site_order(), ident=next(_SITE_IDS), key=key, entry=_axis_entry(table.get(value)),
            block=self._graph_root, calls_per_block_call=1 if path == self._graph_root else self._graph_calls.get(path, 1),
            unowned=unowned, anchor_path=self._anchor_path,
        )  # fmt: skip
        (self._pending if pending else self.sites)[key] = site
        with _LOCK:
            _TEMPLATES[site.ident] = dataclasses.replace(site, stats=None)  # type: ignore[arg-type]
            if self._attached:
                _CALLBACKS[site.ident] = (self, site)
        return site

    def _in_forward(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        """A graph's site key as a key of the whole forward pass.

        Each graph numbers its module calls and repeated call positions from zero. After a graph
        break the rest of the forward is another frame's graph, so ``act``'s second call there
        is call 0 again: a key that another frame made first is renumbered — the next unused
        call of that module (a submodule's own output or functional call), or occurrence of that
        position (a functional call of the root's own forward) — in the order frames are
        compiled, which is the forward's on the first pass. Recompiling a frame (same frame id)
        keeps its keys."""
        compile_id = torch._guards.CompileContext.current_compile_id()
        frame = None if compile_id is None else compile_id.frame_id
        mapped = self._frame_keys.get((frame, key))
        if mapped is not None:
            return mapped
        out = key
        first = self._key_frames.get(out)
        if frame is not None and first is not None and first != frame:
            # Frames resuming the same code at the same place (the two ways out of a data-dependent
            # branch) are alternatives, never run in one forward: they share keys.
            while out in self._key_frames and not self._alternatives(self._key_frames[out], frame):
                path, call, position, name, occurrence = out
                # A submodule's activation seen again in another frame is that module's next call; the
                # root is called once per forward, so there it is the position reached once more (a loop).
                out = (path, call + 1, position, name, occurrence) if position is None or path else (path, call, position, name, occurrence + 1)
        self._key_frames.setdefault(out, frame)
        self._frame_keys[(frame, key)] = out
        return out

    def _alternatives(self, a: Any, b: Any) -> bool:
        """Whether two frames are one frame, or two resume functions of one place in one function."""
        if a == b:
            return True
        name = self._frame_names.get(a)
        return name is not None and "torch_dynamo_resume_in_" in name[1] and name == self._frame_names.get(b)

    def _note_frame(self, graph: fx.Graph) -> None:
        """Remember the code a graph's frame runs: the outermost frame of its nodes' stack traces."""
        compile_id = torch._guards.CompileContext.current_compile_id()
        if compile_id is None or compile_id.frame_id in self._frame_names:
            return
        for node in graph.nodes:
            frames = _STACK_FRAME.findall(node.meta.get("stack_trace") or "")
            if frames:
                self._frame_names[compile_id.frame_id] = (frames[0][0], frames[0][2])  # its line is the node's
                return

    def _adopt(self, ident: int, template: _Site, device: torch.device, pending: bool = False) -> _Site | None:
        """This capture's site for a graph site another capture made (None when this model has no
        module of that class at that path): the same key, this monitor's threshold and rings (on
        ``device``, where the graph's sums are); ``pending`` as for :meth:`_site`."""
        if ident in self._adopted:
            return self._adopted[ident]
        info = template.info
        site = self.sites.get(template.key) or self._pending.get(template.key)
        if site is None and (not info.module or self._types.get(info.module) == info.module_type):
            info = dataclasses.replace(info)
            units = info.shape[template.unit_dim] if info.shape else 1  # the unit dim's size is never symbolic
            stats = WindowStats(units, resolve_threshold(self.threshold_spec, info), device, self.window)
            stats.nonnegative = info.function in NONNEGATIVE_FUNCTIONS
            site = dataclasses.replace(template, info=info, stats=stats, order=next_site_order(), ident=next(_SITE_IDS))
            (self._pending if pending or template.unowned is not None else self.sites)[template.key] = site
        self._adopted[ident] = site
        return site

    # -- experts known at run time -------------------------------------------------------------
    def _routed(self, site: _Site, expert: _Expert | None) -> _Site | None:
        """The site one run of a routable site counts on: its expert's (see :meth:`_expert_site`)
        where the run names an expert of this model, else the site itself, reported from now on."""
        if expert is not None and (expert.weight is None or self._is_ours(expert.weight)):
            found = self._expert_site(site, expert)
            if found is not None:
                return found
        if self._pending.get(site.key) is site:
            self.sites[site.key] = self._pending.pop(site.key)
        return site

    def _expert_site(self, site: _Site, expert: _Expert) -> _Site | None:
        """Expert ``expert.index``'s site at the place of the routable ``site``: the key the eager
        capture gives it (occurrence ``-1 - e``; an activation module's call numbered by expert),
        made with every other expert's, in expert order, on first sight (so an expert no token
        reaches is there, unobserved). None where this capture cannot place it (said in ``uncaptured``)."""
        cache = (site.ident, id(expert.weight))
        sites = self._expert_sites.get(cache)
        if sites is None:
            sites = self._expert_sites[cache] = self._make_expert_sites(site, expert)
        return sites[expert.index] if expert.index < len(sites) else None

    def _make_expert_sites(self, site: _Site, expert: _Expert) -> list[_Site]:
        path, call, position, name, _ = site.key
        weight_path = self._owner_of_tensor(expert.weight) if expert.weight is not None else None
        if site.unowned is None and weight_path is not None:
            # A graph without parameters serves every instance of its module's class (each layer's experts): its
            # first run is the instance it was traced for, whose weight lies where this one's lies from its own.
            relative = self._weight_relative.setdefault(site.ident, _relative(path, weight_path))
            moved = _moved(relative, weight_path)
            path = moved if moved is not None and self._types.get(moved) == self._types.get(path) else path
        if site.unowned is not None:  # a graph no module claims: the expert's weight says which module runs it
            path = _innermost_of(site.unowned, weight_path) if weight_path is not None else None
            if path is None:
                where = site.unowned[0] if len(site.unowned) == 1 else f"one of {', '.join(site.unowned[:3])}"
                self.uncaptured.setdefault(where, f"{name}: which module's call runs its compiled graph is unknown")
                return []
            call = 0
            if position is None:  # an activation module: each expert's call numbered as the eager capture numbers it
                numbers = self._call_numbers.setdefault(path, {})
                call = numbers.setdefault(("experts", weight_path), len(numbers))
                for e in range(1, expert.slices):
                    numbers.setdefault(("experts", weight_path, e), len(numbers))
                self._counted_in_graphs.add(path)
        # The first experts placed from a site stand where it stands in its graph; others (another layer's,
        # running the same graph) where they are first seen, as the eager capture orders them.
        order = site.order if site.ident not in self._placed else next_site_order()
        self._placed.add(site.ident)
        made = []
        for e in range(expert.slices):
            key = (path, call + e if position is None else call, position, name, -1 - e)
            found = self.sites.get(key)
            if found is None:
                found = self._new_expert_site(site, key, order + (e + 1) / (expert.slices + 1))
                if found is None:
                    return []
            made.append(found)
        return made

    def _new_expert_site(self, site: _Site, key: tuple[Any, ...], order: float) -> _Site | None:
        """One expert's site, ``site``'s counts under ``key``; None (said in ``uncaptured``) where this
        capture's ``unit_dim`` or ``threshold`` options give it other ones than the graph computes with."""
        path, call, _, name, occurrence = key
        info = dataclasses.replace(
            site.info, module=path, module_type=self._types.get(path, site.info.module_type),
            leaf=self._leaf.get(path, site.info.leaf), call=call, occurrence=occurrence,
        )  # fmt: skip
        info.ordinal = same_function_ordinal((s.info for s in self.sites.values()), path, call, name, info)
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, len(info.shape), site.entry)
        threshold = resolve_threshold(self.threshold_spec, info)
        if unit_dim != site.unit_dim or threshold != site.stats.threshold:
            self.uncaptured.setdefault(path or "<root>", f"{name}: its options differ from those its compiled graph counts with")
            return None
        stats = WindowStats(site.stats.units, threshold, site.stats.device, self.window)
        stats.nonnegative = site.stats.nonnegative
        new = dataclasses.replace(
            site, info=info, stats=stats, order=order, ident=next(_SITE_IDS), key=key, unowned=None, anchor_path=None
        )  # placed by the expert's weight already, not by the anchor
        self.sites[key] = new
        return new

    def _unrouted(self, site: _Site) -> None:
        """A run of a graph no module claims whose input named no expert of any model (frozen expert
        weights, no gradients, or not an experts layer after all): not counted; said once."""
        where = site.unowned[0] if site.unowned else site.info.module
        if where in self.uncaptured:
            return
        self.uncaptured[where] = f"{site.info.function} in a compiled graph without parameters that names no expert"
        warnings.warn(
            f"deadrelu: the {site.info.function} of {where} ran in a compiled graph with no parameter to say which "
            "module runs it (its caller runs eagerly: a graph break inside a loop, such as a data-dependent loop over "
            "experts), and its input's autograd history names no expert of a stacked weight of this model, which "
            "would (frozen expert weights, or no gradients?): compiled mode does not count it. Use the eager monitor "
            "(compiled=False), which keeps one site per expert, or remove the graph break",
            CompiledModelWarning,
            stacklevel=2,
        )


def _wrapper_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each ``torch.compile`` wrapper inside ``model`` with the path of the block it wraps."""
    blocks = {id(m): p for p, m in compiled_blocks(model).items()}
    return [(blocks[id(m._orig_mod)], m) for m in model.modules() if m is not model and id(getattr(m, "_orig_mod", None)) in blocks]


def _axis_entry(entry: tuple[Any, int, str] | None) -> tuple[Any, int, str] | None:
    """An axis-table entry without its tensor (the site must not keep a graph's example value alive)."""
    return None if entry is None else (None, entry[1], entry[2])


def _mask_layout(value: Any, unit_dim: int, mask: fx.Node | None, shape: tuple[Any, ...] | None = None) -> str | None:
    """How the mask input (of ``shape``, else its example value's) lies over an activation's example
    value (:func:`deadrelu.core.inputs.mask_layout`, with symbolic sizes compared without adding a guard)."""
    if mask is None or not isinstance(value, torch.Tensor):
        return None
    return mask_layout(value.shape, unit_dim, shape if shape is not None else mask.meta["example_value"].shape, same=_same)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Sizes provably equal (symbolic sizes included) without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _anchor(graph: fx.Graph) -> fx.Node | None:
    """The graph input the observe op checks the running instance by: a parameter of as few
    dimensions as possible (Inductor may hand a convolution a re-laid-out copy of its 4-D
    weight, but passes biases and matrices as they are)."""
    params = [n for n in graph.nodes if n.op == "placeholder" and isinstance(_example(n), nn.Parameter)]
    return min(params, key=lambda n: _example(n).ndim, default=None)


def _example(node: fx.Node) -> Any:
    """The real value TorchDynamo recorded for a graph input (a parameter, a buffer, the batch), or None."""
    try:
        return getattr(node.meta.get("grapharg"), "example", None)
    except Exception:  # a graph argument without a real value (a symbolic size)
        return None


def _hook_function(hook: Any) -> Any:
    """The function whose code a hook runs: itself, a partial's function or a callable's ``__call__``."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    if getattr(hook, "__code__", None) is None:
        hook = getattr(hook, "__func__", None) or getattr(type(hook), "__call__", None)
    return getattr(hook, "__func__", hook)


def _code_span(function: Any) -> tuple[str, int, int] | None:
    """(file, first line, last line) of a function's source, or None."""
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno)


def _short_location(position: str) -> str:
    if not position:
        return ""
    file, line, _ = position.rsplit(":", 2)
    return f"{file.rsplit('/', 1)[-1]}:{line}"


_MATMULS = ("linear", "matmul", "mm", "__matmul__")


def _expert_route(node: fx.Node, depth: int = 4) -> _Route | None:
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
            return _Route(input=current)
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


def _slice_route(node: Any) -> _Route | None:
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
            value = _example(source) if isinstance(source, fx.Node) else None
            weight = isinstance(source, fx.Node) and (
                source.op == "get_attr" or (source.op == "placeholder" and "_parameters_" in source.name)
            )
            if not weight or not isinstance(value, torch.Tensor) or value.ndim != 3:
                return None
            if type(index) is int:
                return _Route(index % value.shape[0], value.shape[0])
            if isinstance(index, fx.Node) and isinstance(index.meta.get("example_value"), torch.SymInt):
                return _Route(index, value.shape[0], source if source.op == "placeholder" else None)
            return None
        if name not in ("t", "transpose", "permute"):
            return None
        node = source
    return None


def _route_args(routes: list[_Route | None]) -> tuple[list[Any], list[fx.Node]]:
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


def _expert_at_run_time(kind: int, index: Any, t: torch.Tensor) -> _Expert | None:
    """The expert one run of a routable site counts (see :func:`_dispatch`), or None."""
    if kind > 0:
        return _Expert(int(index) % kind, kind, t)
    return expert_of_input(t)


# Autograd nodes a stacked weight's slice passes through on its way into a matmul (a transpose, and
# autocast's cast); matmuls as autograd records them (F.linear of a 2-D input is an mm or addmm).
_WEIGHT_GRADS = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ToCopyBackward0", "AliasBackward0"})
_MATMUL_GRADS = frozenset({"MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0", "LinearBackward0"})


def expert_of_input(t: torch.Tensor, depth: int = 4) -> _Expert | None:
    """The expert a graph input came from, read from its autograd history (eager code made it:
    ``act_fn(x[rows] @ w[e].T)`` in an experts loop Dynamo could not compile): through at most
    ``depth`` ops (by their first input) a matmul one of whose operands is ``w[e]`` (a select along
    dim 0, possibly transposed or cast) of a 3-D parameter — the run-time reading of
    :func:`_expert_route`. None without such a history (no gradients, or frozen experts).

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


def _selected_expert(fn: Any) -> _Expert | None:
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
            return _Expert(int(fn._saved_index) % weight.shape[0], weight.shape[0], weight)
        if name not in _WEIGHT_GRADS:
            return None
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return None


def _innermost_of(paths: Sequence[str], path: str) -> str | None:
    """The one of ``paths`` inside module ``path``, else inside the closest module above it that
    holds any (None where several are equally close)."""
    scope = path
    while True:
        inside = [p for p in paths if not scope or p == scope or p.startswith(scope + ".")]
        if inside or not scope:
            return inside[0] if len(inside) == 1 else None
        scope = scope.rpartition(".")[0]


def _relative(path: str, other: str) -> tuple[str, str]:
    """Two module paths past the part they share: ``("act_fn", "")`` for ``l.0.experts.act_fn``, ``l.0.experts``."""
    a, b = path.split(".") if path else [], other.split(".") if other else []
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return ".".join(a[k:]), ".".join(b[k:])


def _moved(relative: tuple[str, str], other: str) -> str | None:
    """The path that lies from ``other`` as :func:`_relative` says (``l.1.experts.act_fn`` from ``l.1.experts``), or None."""
    mine, theirs = relative
    if theirs and other != theirs and not other.endswith("." + theirs):
        return None
    common = other[: len(other) - len(theirs)].rstrip(".") if theirs else other
    return ".".join(p for p in (common, mine) if p)


def _in_span(node: fx.Node, span: tuple[str, int, int]) -> bool:
    """Whether a node's innermost source frame lies in a function's code (``span``)."""
    frames = _STACK_FRAME.findall(node.meta.get("stack_trace") or "")
    return bool(frames) and frames[-1][0] == span[0] and span[1] <= int(frames[-1][1]) <= span[2]


def _function_span(obj: Any) -> tuple[str, int, int] | None:
    """:func:`_code_span` of a class attribute that is a function (a static or class method's too)."""
    function = getattr(obj, "__func__", obj)
    if not callable(function) or getattr(function, "__code__", None) is None and not hasattr(function, "__wrapped__"):
        return None
    try:
        return _code_span(inspect.unwrap(function))
    except ValueError:  # a __wrapped__ cycle
        return None


def _is_weight(node: fx.Node) -> bool:
    """An activation applied to a parameter or buffer is not a unit of the network."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return False
    if first.op == "get_attr":
        return True
    return first.op == "placeholder" and ("_parameters_" in first.name or "_buffers_" in first.name)


def refuse_mask(mask: Any) -> None:
    """Compiled monitoring takes the call's ``attention_mask`` (the default) or none (``mask=False``)."""
    if mask is not None and mask is not False:
        raise DeadReluError(
            "with compiled=True the mask is the call's attention_mask (mask=None, the default) or none "
            "(mask=False); a mask tensor, key or callable needs the eager monitor"
        )
