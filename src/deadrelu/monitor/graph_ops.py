"""What compiled graphs call at run time, and the Inductor pass that puts those calls there.

The custom ops the graph capture inserts (``deadrelu::observe``, ``deadrelu::count_samples``,
``deadrelu::call_mask``), registered once per process with :mod:`torch.library`; the
process-wide registries of graph sites (``CALLBACKS``, ``TEMPLATES``) and attached captures;
:func:`_dispatch`, the observe op's body, which hands each site's sums to the capture whose
model ran the graph; and the chained pre-grad pass that has each attached
:class:`~deadrelu.monitor.graph_capture.GraphCapture` rewrite every graph. See
:mod:`deadrelu.monitor.graph_capture` for the whole design.
"""

from __future__ import annotations

import itertools
import threading
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence  # typing's Sequence: see observe_op

import torch
from torch import fx

from ..core.capture import SiteInfo
from ..core.stats import traceable_batch_sums
from ..errors import DeadReluError
from .expert_routes import Expert, expert_at_run_time
from .window import WindowStats

if TYPE_CHECKING:
    from .graph_capture import GraphCapture


class CompiledModelWarning(UserWarning):
    """A monitor and ``torch.compile`` do not meet as intended: a monitor without ``compiled=True``
    saw its model run compiled, a compiled-mode monitor saw no graph, or a graph could not be
    observed (each issued once)."""


_OP_NAME = "deadrelu::observe"


LOCK = threading.Lock()


CALLBACKS: dict[int, tuple["GraphCapture", "Site"]] = {}  # site id -> where its sums go


# site id -> the site as the pass made it (without its rings): a graph compiled under one monitor
# keeps running after it detaches, for this model or another instance of its class (Dynamo shares
# graphs), and the monitor attached to that model then adopts the site (see _dispatch).
TEMPLATES: dict[int, "Site"] = {}


SITE_IDS = itertools.count(1)


ATTACHED: "weakref.WeakSet[GraphCapture]" = weakref.WeakSet()


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
    with LOCK:
        if key not in _installed:
            namespace, name = op_name.split("::")
            if not hasattr(getattr(torch.ops, namespace), name):
                define()
            _installed[key] = getattr(getattr(torch.ops, namespace), name).default
        return _installed[key]


def observe_op() -> Any:
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
    read while the model call that carries it runs (see :func:`call_mask`); in an encoder-decoder
    call (``split``) a block inside a ``decoder`` module reads ``decoder_mask`` instead (None: every
    position), as the eager capture's decoder sites do."""
    _CALL_MASK.value = (mask, decoder_mask, split)


def mask_op() -> Any:
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


def call_mask(like: torch.Tensor, decoder: bool = False) -> torch.Tensor:
    """Inserted at the start of a compiled block's graph (see :meth:`GraphCapture.rewrite`); ``decoder``:
    the block lies inside a ``decoder`` module."""
    return mask_op()(like.detach(), decoder)


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

    ``routes`` holds three numbers per site (:func:`route_args`): ``0, 0, 0`` for a site counted as
    it is; ``E, e, j`` for an activation of ``w[e]``, ``w = inputs[j]`` a stacked weight of ``E``
    experts and ``e`` the graph's input (a helper compiled once for every expert, ``e`` a symbolic
    int); ``-1, 0, j`` for an activation of graph input ``inputs[j]``, whose autograd history names
    the expert (a data-dependent experts loop runs eagerly and calls the activation's compiled
    graph once per expert). Such a site's sums go to its expert's site (see :meth:`GraphCapture._routed`)."""
    per_site = len(sums) // max(len(sites), 1)
    batches: dict[GraphCapture, list[tuple[Site, list[torch.Tensor]]]] = {}
    ours: dict[GraphCapture, bool] = {}
    if anchor is not None:
        _RUNNING.model = next((c for c in list(ATTACHED) if c._is_ours(anchor)), None)
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
        owner = CALLBACKS.get(ident)
        part = sums[i * per_site : (i + 1) * per_site]
        kind = int(routes[3 * i]) if len(routes) > 3 * i else 0
        expert = expert_at_run_time(kind, routes[3 * i + 1], inputs[int(routes[3 * i + 2])]) if kind else None
        template = owner[1] if owner is not None else TEMPLATES.get(ident)
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
            adopters = [c for c in list(ATTACHED) if runs_it(c)]
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
    owner: tuple["GraphCapture", "Site"] | None, ident: int, template: "Site", expert: "Expert | None", device: torch.device
) -> tuple["GraphCapture", "Site"] | None:  # fmt: skip
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
        base: Site | None = owner[1]
    else:  # the capture that compiled the graph is gone: an attached capture of the weight's model adopts it
        capture = next((c for c in list(ATTACHED) if weight is not None and c._is_ours(weight)), None)
        if capture is None:
            return None
        base = capture._adopt(ident, template, device, pending=True)
    site = capture._expert_site(base, expert) if base is not None and expert is not None else None
    return None if site is None else (capture, site)


def site_sums(
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
    if unit_dim == x.ndim:  # a layer's single output with its size-1 axis squeezed away: that axis back
        x = x.unsqueeze(-1)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        elif mask.is_floating_point():
            keep = mask == 1  # 0/1 float masks; an additive 0/-inf mask then counts nothing, never the pads
        else:
            keep = mask != 0
        keep = keep.t().contiguous() if transposed else keep
    return list(traceable_batch_sums(x.detach(), unit_dim, threshold, nonnegative, keep).values())


def observe_sites(
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
    observe_op()([t for site in sums for t in site], sites, anchor, list(routes), list(inputs))


def _pass_token(ident: Any) -> Any:
    """What the installed pass pickles as (see ``_DeadReluPass.__reduce__``); never unpickled."""
    return ident


def install_pass() -> None:
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _DeadReluPass(CustomGraphPass):
        def __init__(self, previous: Any) -> None:
            self.previous = previous
            self.key = uuid.uuid4().hex

        def __call__(self, graph: fx.Graph) -> None:
            for capture in list(ATTACHED):
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


def remove_pass() -> None:
    import torch._inductor.config as inductor_config

    ours = _installed.get("pass")
    if ours is not None and inductor_config.pre_grad_custom_pass is ours:
        inductor_config.pre_grad_custom_pass = _installed.get("previous")
        _installed.pop("pass", None)
        _installed.pop("previous", None)


@dataclass
class Site:
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
