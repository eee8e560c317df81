"""The graph capture's graph pass: which graphs a model owns, and their rewriting.

:class:`GraphRewrite` is a mixin base of :class:`~deadrelu.monitor.graph_capture.GraphCapture`:
deciding whether a graph may run the capture's model (``_owns``), finding every activation site
of a graph and naming it as the eager capture does (``_sites_in``, ``_unowned_sites``, ``_site``),
and inserting the sums after each site and one observe op call before the graph's output
(:meth:`GraphRewrite.rewrite`).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Iterator

import torch
from torch import fx, nn

from ..core.activations import NONNEGATIVE_FUNCTIONS, RELU_SPELLINGS, called_activation
from ..core.capture import (
    dynamo_module_path,
    SiteInfo,
    choose_unit_dim,
    eager_modules,
    next_site_order,
    resolve_threshold,
    same_function_ordinal,
    squeezed_unit_axis,
)
from ..core.hooks import global_forward_hooks
from ..core.inputs import MASK_KEYS, in_decoder, is_encoder_decoder, mask_layout
from ..core.unit_axis import ACT, AxisTable, kind_of
from .expert_routes import Route, expert_route, route_args
from .graph_nodes import (
    STACK_FRAME,
    code_span,
    example,
    function_span,
    graph_anchor,
    hook_function,
    in_span,
    is_weight,
    node_position,
)
from .graph_ops import (
    CALLBACKS,
    LOCK,
    SITE_IDS,
    TEMPLATES,
    CompiledModelWarning,
    Site,
    call_mask,
    observe_sites,
    site_sums,
)
from .window import WindowStats



def _parameter_inputs(graph: fx.Graph) -> Iterator[nn.Parameter]:
    """The parameters a graph takes as inputs (its placeholders' example values), in order."""
    for node in graph.nodes:
        value = example(node) if node.op == "placeholder" else None
        if isinstance(value, nn.Parameter):
            yield value

class GraphRewrite:
    """The graph pass as methods of :class:`~deadrelu.monitor.graph_capture.GraphCapture` (a mixin base: it
    uses the capture's state, set in ``GraphCapture.__init__``)."""

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
            if node.op == "placeholder" and id(example(node)) in self._weights:
                return True  # this model's own parameters
        if graph_anchor(graph) is None:
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
        frames = STACK_FRAME.findall(node.meta.get("stack_trace") or "")
        for f, line, _ in frames:
            for (file, first, last), path in spans:
                if f == file and first <= int(line) <= last:
                    return path
        return self._resumed_owner(frames)

    def _resumed_owner(self, frames: list[tuple[str, str, str]]) -> str | None:
        """The module whose ``forward`` goes on after a graph break in this graph (Dynamo compiles the
        rest as a resume function, outside every module call): of the modules of the class whose
        method holds the innermost frame, the one that holds the graph's anchor parameter or is
        above it (``0`` for ``0.l2.weight``); None where no single one does."""
        anchor = self._anchor_path
        if anchor is None:
            return None
        spans = self._spans_of_methods()
        for f, line, _ in reversed(frames):  # innermost first
            for (file, first, last), (paths, activation) in spans.items():
                if activation or f != file or not first <= int(line) <= last:
                    continue
                owners = [p for p in paths if p and (anchor == p or anchor.startswith(p + "."))]
                if len(owners) == 1:
                    return owners[0]
        return None

    def _root_block(self, graph: fx.Graph) -> str:
        """The compiled block a graph was compiled from: the one block all its parameters belong
        to (a graph of the whole model holds parameters of several, or of none), else ""."""
        if not self._blocks:
            return ""
        owners = {self._block_of(self._owner_of_tensor(p)) for p in _parameter_inputs(graph)}
        return owners.pop() if len(owners) == 1 else ""

    def _parameters_root(self, graph: fx.Graph) -> str:
        """The innermost module holding every parameter a graph takes ("" for none, or the root)."""
        common: list[str] | None = None
        for value in _parameter_inputs(graph):
            path = (self._owner_of_tensor(value) or "").split(".")
            if common is None:
                common = path
                continue
            n = 0
            while n < min(len(common), len(path)) and common[n] == path[n]:
                n += 1
            common = common[:n]
        return ".".join(common or [])

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
        traced = example(graph_anchor(graph)) if graph_anchor(graph) is not None else None
        self._anchor_path = self._owner_of_tensor(traced) if isinstance(traced, torch.Tensor) else None
        if not self._owns(graph):
            found, observed = self._unowned_sites(graph)
            self._note_unattributed(graph, observed)
            anchor = None
        else:
            self._note_frame(graph)
            found = self._sites_in(graph)
            anchor = graph_anchor(graph)
        if not found and anchor is None:
            return
        # A graph with no sites still gets the (empty) op: it says which model runs the graphs after it.
        sums = self._insert_sums(graph, [(node, site) for node, site, _ in found]) if found else []
        routes, inputs = route_args([route for _, _, route in found])
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        with graph.inserting_before(output):  # one op call per graph and step, not one per site
            graph.call_function(observe_sites, (sums, [site.ident for _, site, _ in found], anchor, routes, inputs))

    def _insert_sums(self, graph: fx.Graph, found: list[tuple[fx.Node, Site]]) -> list[fx.Node]:
        """After each site's node, its batch's per-unit sums (masked where the call's mask lies over it)."""
        mask, mask_shape = self._mask_input(graph), None
        call_input = mask is not None  # the graph takes an attention_mask (a block's call mask may be None)
        if self.mask_from_call and self._graph_root:
            mask, mask_shape = self._call_mask_node(graph)
            call_input = False
        # An encoder-decoder model: the attention_mask is the encoder's; decoder sites take the
        # decoder_attention_mask input, or none (as the eager capture does).
        decoder_mask = self._mask_input(graph, ("decoder_attention_mask",))
        if decoder_mask is None and call_input and is_encoder_decoder(self.model) and in_decoder(self._parameters_root(graph)):
            # A graph that starts inside the decoder (Dynamo resumed there after a graph break): the
            # attention_mask its frame holds is the decoder's own (T5Stack, BartDecoder take it so).
            decoder_mask = mask
        split = decoder_mask is not None or (call_input and is_encoder_decoder(self.model))
        sums, masked = [], False
        for node, site in found:
            with graph.inserting_after(node):
                nonnegative = site.info.function in NONNEGATIVE_FUNCTIONS
                site_mask = decoder_mask if split and in_decoder(site.info.module) else mask
                how = None if node.meta.get("deadrelu_heads_first") else _mask_layout(
                    node.meta["example_value"], site.unit_dim, site_mask, None if site_mask is not mask else mask_shape
                )
                extra = () if how is None else (site_mask, how == "transposed")
                masked = masked or how is not None
                sums.append(graph.call_function(site_sums, (node, site.unit_dim, site.stats.threshold, nonnegative, *extra)))
        if call_input and mask is not None and not masked:
            self._warn_unfit_mask(mask, found)
        return sums

    def _warn_unfit_mask(self, mask: fx.Node, found: list[tuple[fx.Node, Site]]) -> None:
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
        if graph_anchor(graph) is not None:
            return
        if self._class_spans is None:
            self._class_spans = {}
            for path, module in self._module_objects.items():
                span = code_span(inspect.unwrap(type(module).forward)) if path else None
                if span is not None:
                    self._class_spans.setdefault(span, []).append(path)
        where: dict[str, int] = {}
        for node in graph.nodes:
            target = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target), None)
            if node.op not in ("call_function", "call_method") or target is None or kind_of(target)[0] != ACT:
                continue
            if node in observed or called_activation(kind_of(target)[1], node.args, dict(node.kwargs)) is None:
                continue
            for f, line, _ in STACK_FRAME.findall(node.meta.get("stack_trace") or ""):
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
            value = example(node)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.ndim >= 2:
                if id(value) in self._weights:
                    continue  # a buffer
                with graph.inserting_after(inputs[-1]):
                    return graph.call_function(call_mask, (node, in_decoder(self._graph_root))), tuple(node.meta["example_value"].shape[:2])
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

    def _sites_in(self, graph: fx.Graph) -> list[tuple[fx.Node, Site, Route | None]]:
        """Every activation site of a graph, in graph order, with its site (created on first sight)
        and, for a site whose expert is known only at run time, where it gets it."""
        table = AxisTable()
        slots: dict[tuple[str, int], int] = {}
        seen: dict[tuple[Any, ...], int] = {}
        candidates: list[tuple[fx.Node, tuple[Any, ...], str, Route | None]] = []
        module_output: dict[tuple[str, ...], fx.Node] = {}  # activation module call -> its last node so far
        module_calls: dict[tuple[str, ...], tuple[str, int, str]] = {}
        module_route: dict[tuple[str, ...], Route] = {}  # activation module call -> the expert its input came from
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
                if isinstance(inp, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape == inp.shape:
                    table.carry(inp, value)
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
            if kind[0] != ACT or not isinstance(value, torch.Tensor) or is_weight(node):
                continue
            name = called_activation(kind[1], args, kwargs)
            if name is None:
                continue  # clamp(min=1e-8): no activation
            if kind[1] in RELU_SPELLINGS and not value.is_floating_point():
                continue  # index.clamp(min=0) on integers: no activation
            if kind[1] in RELU_SPELLINGS and table.is_part(args[0] if args else None):
                continue  # clamp(min=0) of box corners, a slice of features: no site (as eager)
            position = node_position(node)
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
        found: list[tuple[fx.Node, Site, Route | None]] = []
        for node, key, position, route in sorted(candidates, key=lambda c: order[c[0]]):  # sites in forward order
            site = self._site(key, node.meta["example_value"], table, slots, location=position, pending=route is not None)
            if site is not None:
                found.append((node, site, route))
                if table.lead_moved(node.meta["example_value"]):
                    node.meta["deadrelu_heads_first"] = True  # (B, H, T, d): no (B, T) mask lies over it (see _insert_sums)
        return found

    def _route_of(self, node: fx.Node) -> Route | None:
        """Where an activation node's expert comes from (see :func:`expert_route`): an input of the
        graph counts only as a plain tensor input of a model with stacked weights."""
        route = expert_route(node)
        if route is None or isinstance(route.index, int):
            return route
        if route.index is not None:  # a symbolic expert: the weight it indexes must be a graph input too
            return route if route.input is not None else None
        value = route.input.meta.get("example_value")
        if not self._stacked or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return None
        if id(example(route.input)) in self._weights or "_parameters_" in route.input.name or "_buffers_" in route.input.name:
            return None  # a parameter or buffer passed through an activation
        return route

    def _unowned_sites(self, graph: fx.Graph) -> tuple[list[tuple[fx.Node, Site, Route | None]], set[fx.Node]]:
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
        if not self._stacked or graph_anchor(graph) is not None:
            return [], observed  # a graph with parameters, none of them ours: another model's
        spans = self._spans_of_methods()
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        values = output.args[0] if output.args and isinstance(output.args[0], (tuple, list)) else output.args
        returned = next((a for a in values if isinstance(a, fx.Node)), None)  # what the graph's frame returns
        found: list[tuple[fx.Node, Site, Route | None]] = []
        modules_done: set[tuple[str, int, int]] = set()
        inside: dict[tuple[str, int, int], list[fx.Node]] = {}  # an activation module's forward -> its activation calls
        seen: dict[tuple[Any, ...], int] = {}
        for node in graph.nodes:
            target = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target), None)
            frames = STACK_FRAME.findall(node.meta.get("stack_trace") or "")
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
                if span in modules_done or not isinstance(out, torch.Tensor) or not in_span(returned, span):
                    continue
                route = self._route_of(node)
                if route is None or route.index is not None:
                    continue
                modules_done.add(span)
                node, name, position = returned, self._act_modules[paths[0]], None
            else:
                name = called_activation(kind_of(target)[1], node.args, dict(node.kwargs)) if kind_of(target)[0] == ACT else None
                value = node.meta.get("example_value")
                if name is None or not isinstance(value, torch.Tensor) or not value.is_floating_point() or is_weight(node):
                    continue
                route = self._route_of(node)
                if route is None or route.index is not None:
                    continue  # not an activation of the graph's input (an expert's rows made eagerly)
                position = node_position(node)
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
                        span = function_span(function)
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
        frames = [(f, int(line)) for f, line, _ in STACK_FRAME.findall(node.meta.get("stack_trace") or "")]
        span = self._forward_spans.get(path)
        if span is None:
            module = self._module_objects.get(path)
            forward = inspect.unwrap(type(module).forward) if module is not None else None
            span = self._forward_spans[path] = code_span(forward) or ("", 0, -1)
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
        spans = [span for hook in hooks if (span := code_span(hook_function(hook))) is not None]
        if not spans:
            return True
        frames = STACK_FRAME.findall(node.meta.get("stack_trace") or "")
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
    ) -> Site | None:  # fmt: skip
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
        entry = table.get(value)
        if entry is None and table.is_squeezed(value):  # its one unit one past the last dim: site_sums puts it back
            entry = squeezed_unit_axis(self.unit_dim_spec, info, value.ndim)
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, value.ndim, entry)
        units = value.shape[unit_dim] if unit_dim < value.ndim else 1
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
        site = Site(
            info, unit_dim, stats, order=next_site_order(), ident=next(SITE_IDS), key=key, entry=_axis_entry(entry),
            block=self._graph_root, calls_per_block_call=1 if path == self._graph_root else self._graph_calls.get(path, 1),
            unowned=unowned, anchor_path=self._anchor_path,
        )  # fmt: skip
        (self._pending if pending else self.sites)[key] = site
        with LOCK:
            TEMPLATES[site.ident] = dataclasses.replace(site, stats=None)  # type: ignore[arg-type]
            if self._attached:
                CALLBACKS[site.ident] = (self, site)
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
            frames = STACK_FRAME.findall(node.meta.get("stack_trace") or "")
            if frames:
                self._frame_names[compile_id.frame_id] = (frames[0][0], frames[0][2])  # its line is the node's
                return


def _axis_entry(entry: tuple[Any, int, str] | None) -> tuple[Any, int, str] | None:
    """An axis-table entry without its tensor (the site must not keep a graph's example value alive)."""
    return None if entry is None else (None, entry[1], entry[2])


def _mask_layout(value: Any, unit_dim: int, mask: fx.Node | None, shape: tuple[Any, ...] | None = None) -> str | None:
    """How the mask input (of ``shape``, else its example value's) lies over an activation's example
    value (:func:`deadrelu.core.inputs.mask_layout`, with symbolic sizes compared without adding a guard)."""
    if mask is None or not isinstance(value, torch.Tensor):
        return None
    sizes = (*value.shape, 1) if unit_dim == value.ndim else tuple(value.shape)  # a squeezed single output (see _site)
    return mask_layout(sizes, unit_dim, shape if shape is not None else mask.meta["example_value"].shape, same=_same)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Sizes provably equal (symbolic sizes included) without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _short_location(position: str) -> str:
    if not position:
        return ""
    file, line, _ = position.rsplit(":", 2)
    return f"{file.rsplit('/', 1)[-1]}:{line}"
