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

The capture is split by concept: :mod:`~deadrelu.monitor.graph_ops` (the custom ops, their
registries and run-time dispatch, the pass installation), :mod:`~deadrelu.monitor.graph_rewrite`
(the graph pass), :mod:`~deadrelu.monitor.expert_routes` and :mod:`~deadrelu.monitor.expert_sites`
(experts known at run time), :mod:`~deadrelu.monitor.graph_nodes` (what graph nodes say); their
public names stay importable from this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core.activations import NONNEGATIVE_FUNCTIONS, function_of_module
from ..core.capture import (
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
)
from ..core.hooks import copy_safe_hook
from ..errors import DeadReluError
from .expert_routes import expert_of_input  # noqa: F401
from .expert_sites import ExpertSites, moved_path, relative_paths
from .graph_nodes import code_span
from .graph_ops import (
    ATTACHED,
    CALLBACKS,
    LOCK,
    SITE_IDS,
    CompiledModelWarning,
    Site,
    count_samples,  # noqa: F401
    graph_capture_available,
    install_pass,
    mask_op,
    observe_op,
    remove_pass,
    sample_counter,  # noqa: F401
    set_call_mask,
)
from .graph_rewrite import GraphRewrite
from .window import WindowStats, add_sums_to_many

__all__ = ["CompiledModelWarning", "GraphCapture", "graph_capture_available", "set_call_mask"]


class GraphCapture(GraphRewrite, ExpertSites):
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
        self.sites: dict[tuple[Any, ...], Site] = {}
        self.uncaptured: dict[str, str] = {}
        named = eager_modules(model)
        self._paths = {id(m): p for p, m in named}
        self._types = {p: type(m).__name__ for p, m in named}
        self._leaf = {p: next(iter(m.children()), None) is None for p, m in named}
        self._act_modules = {p: fn for p, m in named if (fn := function_of_module(m)) is not None}
        self._act_objects = {p: m for p, m in named if p in self._act_modules}
        self._module_objects = dict(named)
        self._root_code = code_span(type(model).forward)
        # Blocks compiled on their own (model.layers[i] = torch.compile(...)): each is the root of
        # its graphs, and instances of one class share one graph (see record()).
        blocks = compiled_blocks(model)
        self._blocks = sorted(blocks, key=len, reverse=True)  # innermost first
        self._block_code = [(span, p) for p, m in blocks.items() if (span := code_span(type(m).forward))]
        self._param_owner = {id(t): p for p, m in named for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        self._pointer_owner: dict[int, str] = {}
        self._graph_root = ""  # the module whose forward the graph being rewritten starts in
        self._graph_calls: dict[str, int] = {}  # calls of each module in that graph
        self._anchor_path: str | None = None  # the module holding that graph's anchor parameter
        self._adopted: dict[int, Site | None] = {}  # another capture's graph site id -> this capture's site
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
        self._pending: dict[tuple[Any, ...], Site] = {}  # routable sites not reported until they count a run themselves
        self._expert_sites: dict[tuple[int, int], list[Site]] = {}  # (routable site id, id of the weight) -> its experts' sites
        self._counted_in_graphs: set[str] = set()  # activation modules whose eagerly called forward a graph counted
        self._placed: set[int] = set()  # routable site ids whose experts' sites took its place in the order
        self._weight_relative: dict[int, tuple[str, str]] = {}  # routable site id -> (its path, its weight's) past their common part
        self._attached = False

    # -- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> "GraphCapture":
        """Start rewriting graphs compiled from now on (no-op when attached)."""
        if not self._attached:
            observe_op()
            if self.mask_from_call:
                mask_op()
            with LOCK:
                ATTACHED.add(self)
                install_pass()
                for site in (*self.sites.values(), *self._pending.values()):
                    CALLBACKS[site.ident] = (self, site)
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
        with LOCK:
            for site in (*self.sites.values(), *self._pending.values()):
                CALLBACKS.pop(site.ident, None)
            ATTACHED.discard(self)
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            if not ATTACHED:
                remove_pass()
            else:
                install_pass()
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

    def ordered_sites(self) -> list[tuple[str, Site]]:
        """Sites in first-seen order with the eager capture's display names."""
        ordered = sorted(self.sites.values(), key=lambda s: s.order)
        return list(zip(display_names([s.info for s in ordered]), ordered))

    def record(self, batch: list[tuple[Site, list[torch.Tensor]]], anchor: torch.Tensor | None) -> None:
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

    def _for_running_block(self, batch: list[tuple[Site, list[torch.Tensor]]], anchor: torch.Tensor) -> list[tuple[Site, list[torch.Tensor]]]:  # fmt: skip
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

    def _for_running_instance(self, batch: list[tuple[Site, list[torch.Tensor]]], anchor: torch.Tensor) -> list[tuple[Site, list[torch.Tensor]]]:  # fmt: skip
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
                    moved = moved_path(relative_paths(site.info.module, site.anchor_path), running)
                    if moved is not None and moved != site.info.module and self._types.get(moved) == site.info.module_type:
                        site = self._sibling(site, site.info.module, moved, 0)  # type: ignore[assignment]
                        if site is None:
                            continue
            out.append((site, sums))
        return out

    def _sibling(self, site: Site, traced: str, running: str, call: int) -> Site | None:
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
        new = dataclasses.replace(site, info=info, unit_dim=unit_dim, stats=stats, order=next_site_order(), ident=next(SITE_IDS), key=key)
        if unit_dim != site.unit_dim:  # the graph reduces over the traced block's axis: not this site's
            self.uncaptured.setdefault(path, f"{info.function}: unit_dim {unit_dim} differs from {site.info.module}'s")
            return None
        self.sites[key] = new
        with LOCK:
            if self._attached:
                CALLBACKS[new.ident] = (self, new)
        return new

    def _adopt(self, ident: int, template: Site, device: torch.device, pending: bool = False) -> Site | None:
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
            site = dataclasses.replace(template, info=info, stats=stats, order=next_site_order(), ident=next(SITE_IDS))
            (self._pending if pending or template.unowned is not None else self.sites)[template.key] = site
        self._adopted[ident] = site
        return site


def _wrapper_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each ``torch.compile`` wrapper inside ``model`` with the path of the block it wraps."""
    blocks = {id(m): p for p, m in compiled_blocks(model).items()}
    return [(blocks[id(m._orig_mod)], m) for m in model.modules() if m is not model and id(getattr(m, "_orig_mod", None)) in blocks]


def refuse_mask(mask: Any) -> None:
    """Compiled monitoring takes the call's ``attention_mask`` (the default) or none (``mask=False``)."""
    if mask is not None and mask is not False:
        raise DeadReluError(
            "with compiled=True the mask is the call's attention_mask (mask=None, the default) or none "
            "(mask=False); a mask tensor, key or callable needs the eager monitor"
        )
