"""Dataflow discovery for rescue and surgery: which layer makes a unit, and which layers read it.

A report names activation *sites* (module path, call, slot, function); surgery needs
*layers*. This module traces the model with ``torch.fx`` and, for each site, proves a
chain of the form::

    producer (Linear / ConvNd, groups=1) -> [BatchNorm] -> activation
        -> { per-channel ops: Dropout, Identity, pooling, BatchNorm, flatten } -> consumer(s) (Linear / ConvNd)

from the traced graph — never from module order. A Linear producer's units may also be multiplied,
one for one, by the output of another Linear of their width that nothing else reads (a gated MLP's
``down(act(gate(x)) * up(x))``): that ``up`` layer's rows belong to the units as the producer's do.
Anything that breaks the proof (a residual add, a ``cat``, a layer called twice, a parameter
shared between modules, an unsupported layer, a pool whose pooled dims include the units' dim,
a product with anything else, an untraceable or TorchScript model, a root forward that branches on an
optional argument's default, which fx traces as a proxy) raises :class:`~deadrelu.errors.RefusedError` naming the site, before anything is changed. So
does anything that makes a layer compute something other than what its weights say, or reads
its weights outside its own call:
a parametrization (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm`` /
``spectral_norm``), the old hook-based ``weight_norm`` / ``spectral_norm``, any forward
(pre-)hook that is not deadrelu's own on a chain layer — or anywhere the trace does not see it
(the root, a leaf off the chain; global module hooks unless the caller checks on data) — and a
direct read such as ``F.linear(x, self.fc.weight)``.
A report whose model fingerprint (parameter names and shapes) differs from the model's
is refused too.

The mapping from a site to a graph node mirrors :mod:`deadrelu.core.capture`: an activation
call belongs to the innermost module whose ``forward`` made it, ``call`` counts that
module's invocations (fx marks the k-th as ``path@k``), and ``slot`` counts activation
calls made directly by that invocation. A slot proves nothing where the module call makes another
number of activation calls in the graph than the scan counted (a ``clamp(min=0)`` of an integer input
is no site, but fx cannot see the dtype): such a site is refused. A hand-written activation module the
scan recognises by its class (``XIELUActivation``) stays one call in the trace, as it is one site; a
site of one expert of experts stacked in one weight (``experts.act_fn[e]``) is refused by name.

The trace and the mapping from a site to a graph node live in :mod:`deadrelu.surgery.tracing`, the
checks beyond the chain's shape (hooks, parametrizations, direct reads, tied parameters) in
:mod:`deadrelu.surgery.guards`; this module proves the chains, works out the constant a dead unit sends
along one, and re-exports the names the rewrites use from both.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import DeadReluError
from ..core.report import Report, SiteReport
from .guards import (
    check_direct_reads, check_module, check_report_matches, check_single_use, check_unseen_hooks,
    computed_weight_reason, direct_reads, fetch, is_deadrelu_hook, refuse, shared_parameters, threshold_reason,
    unrewritable_reason,
)  # fmt: skip
from .tracing import (
    activation_name, describe_node, leaves_no_attributes, made_inside, reads_weight, scripted_reason, site_nodes, trace,
    trace_graph, traced, whole_activation,
)  # fmt: skip

__all__ = [
    "Chain", "Link", "trace", "traced", "trace_graph", "leaves_no_attributes", "site_nodes", "find_chains", "activation_name", "describe_node", "reads_weight",
    "check_report_matches", "unrewritable_reason", "computed_weight_reason", "is_deadrelu_hook", "threshold_reason",
    "scripted_reason", "fetch", "batch_statistics_note", "expert_of_site", "whole_activation",
]  # fmt: skip

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONSUMERS = PRODUCERS
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules and functions that keep every element where it is (dropout, identity): the only ones followed
# after a gated product, which may broadcast to another rank than the site's, where the rank-based rules
# for pools, BatchNorm and flatten would misread it.
_ELEMENTWISE_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}
# Per-channel modules that map a constant channel to a constant channel and zero to zero.
_PASS_MODULES = _ELEMENTWISE_MODULES + (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
# Average pooling with zero padding counted in keeps zero but not other constants.
_ZERO_ONLY_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PASS_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_ZERO_ONLY_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
# How many trailing dims each pooling op pools over. torch takes dim -(k+1) as the channels, so the
# units stay separate only at rank k+2 with the units on dim 1: at rank k+1 (what torch reads as an
# unbatched call, e.g. MaxPool1d on a (B, C) Linear output) the batch becomes the channels and the pool
# slides across the units. Looked up by identity (the max_pool boolean_dispatch wrappers are all named
# "fn"), for modules along the class's MRO.
_POOL_DIMS: dict[Any, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}  # fmt: skip
# Dropout of any kind and rank needs no such rule: each element is multiplied by a mask that does not
# depend on the values (feature dropout only shares it along some dims), so units never mix, and in
# eval mode it is the identity.
_PASS_METHODS = {"contiguous", "clone"}
_ADDS = {operator.add, operator.iadd, operator.sub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
# Out-of-place products only: an in-place one would also change the activation output it overwrites.
_PRODUCTS = {operator.mul, torch.mul, "mul"}


@dataclass
class Link:
    """One consumer of a site's units and the per-channel path that leads to it."""

    path: str
    module: nn.Module
    block: int  # columns per unit in the consumer's input (H*W after a flatten, else 1)
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)  # BatchNorms after the activation
    zero_only: bool = False  # the path keeps zero but not other constants (avg pooling)
    fixed: str | None = None  # a reshape that hard-codes the width (prevents pruning), described


@dataclass
class Chain:
    """A proven producer -> [BatchNorm] -> activation -> consumers chain for one site."""

    site: SiteReport
    units: tuple[int, ...]
    node: fx.Node
    function: str
    producer_path: str
    producer: nn.Module
    norm_path: str | None = None
    norm: nn.Module | None = None
    links: list[Link] = field(default_factory=list)
    # Linear layers whose output multiplies the units one for one (a gated MLP's ``up``), by path: a dead
    # unit's product is 0 whatever their row gives (if finite), so that row goes with the unit.
    multipliers: list[tuple[str, nn.Module]] = field(default_factory=list)


def _out_units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels  # type: ignore[return-value]


def _in_units(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels  # type: ignore[return-value]


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool | str | None:
    """True for a flatten from dim 1 to the end, ``"fixed"`` for one that hard-codes the width
    (``x.view(-1, 400)``), None for another reshape, False for anything else."""
    if node.op == "call_module":
        m = modules.get(node.target)  # type: ignore[arg-type]
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1 and m.end_dim == -1
        return False
    args = list(node.args[1:])
    kwargs = dict(node.kwargs)
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        start = kwargs.get("start_dim", args[0] if args else 0)
        end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], fx.Node) and _reads_batch_size(shape[0]):
            return True  # x.view(x.size(0), -1)
        if len(shape) == 2 and shape[0] == -1 and isinstance(shape[1], int):
            # x.view(-1, C*H*W), as in the PyTorch tutorials: a flatten from dim 1 whenever the model
            # is correct (a wrong C*H*W would merge samples); the consumer's width is checked after.
            # The constant stays in the code, so the width cannot shrink.
            return "fixed"
        return None
    if node.op == "call_function" and node.target in (torch.reshape,):
        return None
    return False


def _reads_batch_size(node: fx.Node) -> bool:
    """True for ``x.size(0)``, which the flatten idiom ``x.view(x.size(0), -1)`` uses."""
    return (
        node.op == "call_method"
        and node.target == "size"
        and (node.args[1:] == (0,) or (len(node.args) == 1 and node.kwargs.get("dim") == 0))
    )


def find_chains(
    model: nn.Module,
    report: Report,
    select: Callable[[SiteReport], Sequence[int]],
    what: str,
    *,
    consumers: bool = True,
    sites: Iterable[str] | None = None,
    checked_on_data: bool = False,
) -> list[Chain]:
    """Prove a chain for every site whose ``select(site)`` is non-empty, or refuse.

    Args:
        model: the model the report was made from.
        report: a scan of that model.
        select: the unit indices to act on at a site.
        what: the operation's name, used in messages.
        consumers: also prove the consumer side (not needed to change a bias).
        sites: act only on the sites with these names (default: all).
        checked_on_data: the caller runs the real model on data and compares (see :func:`check_unseen_hooks`).

    Raises:
        RefusedError: naming the site, when any chain cannot be proven.
        DeadReluError: a name in ``sites`` is not in the report.
    """
    check_report_matches(model, report, what)
    chosen = report.sites
    if sites is not None:
        names = [sites] if isinstance(sites, str) else list(sites)
        unknown = [n for n in names if n not in {s.name for s in report.sites}]
        if unknown:
            raise DeadReluError(
                f"{what}: no site {', '.join(map(repr, unknown))} in the report; sites are: "
                f"{', '.join(s.name for s in report.sites)}"
            )
        chosen = tuple(s for s in report.sites if s.name in names)
    wanted = [(s, tuple(select(s))) for s in chosen]
    wanted = [(s, u) for s, u in wanted if u]
    if not wanted:
        return []
    for site, _ in wanted:  # before tracing: the trace of an experts layer fails with fx's own words
        expert = expert_of_site(site)
        if expert is not None:
            raise refuse(
                site,
                what,
                f"it counts expert {expert} of a mixture-of-experts layer whose experts are stacked in one weight "
                f"('{site.module or '<root>'}' runs for every expert), and {what} does not support experts stacked in "
                "one weight yet: a unit there is a row of one expert's slice of a 3-D parameter, not of a layer of "
                "its own; pass sites=[...] without the expert sites",
            )
    gm, eager = traced(model, what)
    modules = dict(gm.named_modules())
    nodes = site_nodes(gm)
    traced_calls = Counter((path, call) for path, call, _ in nodes)
    scanned_calls = Counter((s.module, s.call) for s in report.sites if expert_of_site(s) is None)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    shared = shared_parameters(model)
    reads = direct_reads(gm, model, eager, checked_on_data)
    chains = []
    for site, units in wanted:
        found = nodes.get((site.module, site.call, site.slot))
        here = (site.module, site.call)
        if traced_calls[here] and traced_calls[here] != scanned_calls[here]:
            raise refuse(site, what, _slot_mismatch(site, nodes, scanned_calls[here]))
        if found is None:
            raise refuse(
                site,
                what,
                f"no matching activation in the traced graph of {type(model).__name__} (is the report from "
                f"this model, or is the call inside a layer torch.fx does not trace into? A clamp(min=0) of an "
                f"index or slice of a layer's output, h[:, 0], is left alone: the trace holds no shapes to tell "
                f"it from box arithmetic; write F.relu there)",
            )
        node, fn = found
        if fn != site.function:
            raise refuse(site, what, f"the traced graph has {fn} there, the report {site.function}")
        if node.op == "call_module":
            check_module(str(node.target), modules[str(node.target)], site, what)
        chain = _producer_side(site, units, node, fn, modules, calls, shared, what)
        if consumers:
            chain.links = _consumer_side(chain, modules, calls, shared, what)
        check_direct_reads(chain, reads, what)
        chains.append(chain)
    seen: dict[str, str] = {}
    for chain in chains:
        for path in {chain.producer_path, chain.norm_path, *(p for p, _ in chain.multipliers)} - {None}:
            if path in seen:
                raise refuse(chain.site, what, f"module '{path}' also produces site '{seen[path]}'")
            seen[path] = chain.site.name  # type: ignore[index]
    # Last, so that a hook on a chain layer is refused above with its site named.
    check_unseen_hooks(model, gm, what, checked_on_data)
    return chains


def _slot_mismatch(site: SiteReport, nodes: dict[tuple[str, int, int], tuple[fx.Node, str]], scanned: int) -> str:
    """Why a site's slot cannot be matched: its module call makes a different number of activation calls in
    the traced graph than the scan counted."""
    calls = [describe_node(node) for (path, call, _), (node, _) in sorted(nodes.items(), key=lambda kv: kv[0][2])
             if (path, call) == (site.module, site.call)]  # fmt: skip
    where = f"'{site.module}'" if site.module else "<root>"
    which = f" (call {site.call + 1})" if site.call else ""
    return (
        f"the traced graph has {len(calls)} activation call(s) in the forward of {where}{which} ({', '.join(calls)}) "
        f"where the scan counted {scanned} site(s), so which traced call is this site cannot be proven (a ReLU "
        "spelling such as clamp(min=0) on an integer input, or on a parameter returned as it is by .to() / "
        ".float(), is no site to the scan, and torch.fx cannot see the dtype or the tensor; a clamp(min=0) of "
        "an index or slice of a layer's output, h[:, 0], is none to the trace, which cannot see which dim it "
        "indexes; a branch on self.training traced in another mode than the scan ran)"
    )


_EXPERT_NAME = re.compile(r"\[(\d+)\](?:~\d+)?$")


def expert_of_site(site: SiteReport) -> int | None:
    """The expert a site counts when it is one expert of an experts layer stacked in one weight, else None.

    The scan names such sites ``experts.act_fn[e]`` (an activation module) or ``experts:silu[e]``
    (a functional call): every expert runs the same code on its slice ``e`` of a 3-D parameter.

    >>> from types import SimpleNamespace as Site
    >>> expert_of_site(Site(name="layers.0.mlp.experts.act_fn[3]")), expert_of_site(Site(name="fc:relu.2"))
    (3, None)
    """
    found = _EXPERT_NAME.search(site.name)
    return int(found.group(1)) if found else None


def _producer_side(
    site: SiteReport,
    units: tuple[int, ...],
    node: fx.Node,
    fn: str,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    shared: dict[str, list[str]],
    what: str,
) -> Chain:
    """Walk back from the activation node to its BatchNorm and producing layer."""
    inp = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(inp, fx.Node):
        raise refuse(site, what, "the activation's input is not a traced tensor")
    norm_path = norm = None
    cur = inp
    if cur.op == "call_module" and str(cur.target) in modules:
        check_module(str(cur.target), modules[str(cur.target)], site, what)
    if cur.op == "call_module" and type(modules.get(cur.target)) in NORMS:  # type: ignore[arg-type]
        norm_path, norm = str(cur.target), modules[cur.target]  # type: ignore[index]
        if len(cur.users) != 1:
            raise refuse(site, what, f"the output of '{norm_path}' is used outside the activation")
        cur = cur.args[0]  # type: ignore[assignment]
        if isinstance(cur, fx.Node) and cur.op == "call_module" and str(cur.target) in modules:
            check_module(str(cur.target), modules[str(cur.target)], site, what)
    if not (isinstance(cur, fx.Node) and cur.op == "call_module" and type(modules.get(cur.target)) in PRODUCERS):  # type: ignore[arg-type]
        src = describe_node(cur) if isinstance(cur, fx.Node) else repr(cur)
        if isinstance(cur, fx.Node) and cur.op == "call_module":
            src += f" ({type(modules.get(cur.target)).__name__})"  # type: ignore[arg-type]
        elif isinstance(cur, fx.Node):
            src += made_inside(cur, node, modules)
        raise refuse(
            site,
            what,
            f"its input comes from {src}, not from an nn.Linear or nn.Conv1d/2d/3d layer (optionally through BatchNorm)",
        )
    path = str(cur.target)
    producer = modules[path]
    if len(cur.users) != 1:
        users = ", ".join(describe_node(u) for u in cur.users)
        raise refuse(site, what, f"the pre-activation output of '{path}' is also used by {users} (residual?)")
    if getattr(producer, "groups", 1) != 1:
        raise refuse(site, what, f"'{path}' is a grouped convolution (groups={producer.groups})")
    for p in [path] + ([norm_path] if norm_path else []):
        check_single_use(p, site, what, calls, shared)
    n = _out_units(producer)
    if n != site.units:
        raise refuse(site, what, f"'{path}' makes {n} units but the report has {site.units}")
    if norm is not None and norm.num_features != n:  # type: ignore[union-attr]
        raise refuse(site, what, f"'{norm_path}' has {norm.num_features} features, not {n}")  # type: ignore[union-attr]
    ndim = len(site.shape)
    expected = ndim - 1 if isinstance(producer, nn.Linear) else 1
    if site.unit_dim != expected:
        raise refuse(site, what, f"the report counts units on dim {site.unit_dim}, '{path}' makes them on dim {expected}")
    if isinstance(producer, nn.Linear) and norm is not None and ndim > 2:
        raise refuse(site, what, f"'{norm_path}' normalises dim 1 of a {ndim}-D Linear output, not its units")
    return Chain(site, units, node, fn, path, producer, norm_path, norm)


def _consumer_side(
    chain: Chain, modules: dict[str, nn.Module], calls: dict[str, int], shared: dict[str, list[str]], what: str
) -> list[Link]:
    """Walk forward from the activation through per-channel ops to every consuming layer."""
    site = chain.site
    channels_first = chain.site.unit_dim == 1
    links: list[Link] = []
    products: set[fx.Node] = set()  # the products with a multiplier and what follows them
    # (node, flattened, norms, zero_only, hard-coded reshape)
    todo: list[tuple[fx.Node, bool, list[tuple[str, nn.Module]], bool, str | None]] = [
        (chain.node, False, [], False, None)
    ]
    while todo:
        node, flat, norms, zero_only, fixed = todo.pop()
        if not node.users:
            raise refuse(site, what, f"the output of {describe_node(node)} is never used")
        for user in node.users:
            if _reads_batch_size(user):
                continue  # x.size(0) reads no unit values and survives pruning
            if user.target in _ADDS:
                raise refuse(site, what, f"its units feed {describe_node(user)}, a residual connection")
            if user.op in ("call_function", "call_method") and user.target in _PRODUCTS:
                chain.multipliers.append(_multiplier(chain, node, user, flat, norms, modules, calls, shared, what))
                products.add(user)
                todo.append((user, flat, norms, zero_only, fixed))  # a dead unit's product is 0, as its output was
                continue
            if user.args[:1] != (node,):
                raise refuse(site, what, f"its units feed {describe_node(user)} as a non-first argument")
            m = modules.get(user.target) if user.op == "call_module" else None  # type: ignore[arg-type]
            if m is not None:
                check_module(str(user.target), m, site, what)
            elementwise = _keeps_units(user, m, _ELEMENTWISE_MODULES, _ELEMENTWISE_FUNCTIONS)
            if node in products and not (m is not None and type(m) in CONSUMERS or elementwise):
                raise refuse(
                    site, what, f"its product with '{chain.multipliers[-1][0]}' feeds {describe_node(user)}: after a "
                    "product only dropout, identity and Linear consumers are followed (it may broadcast to another rank)",
                )  # fmt: skip
            if m is not None and type(m) in CONSUMERS:
                links.append(_link(chain, user, m, flat, norms, zero_only, calls, shared, what))
                links[-1].fixed = fixed
                continue
            if m is not None and type(m) in NORMS:
                if flat or m.num_features != site.units or not channels_first and len(site.shape) > 2:
                    raise refuse(site, what, f"'{user.target}' does not normalise the site's units")
                check_single_use(str(user.target), site, what, calls, shared)
                todo.append((user, flat, norms + [(str(user.target), m)], zero_only, fixed))
                continue
            passes = _keeps_units(user, m, _PASS_MODULES, _PASS_FUNCTIONS)
            zero = (m is not None and isinstance(m, _ZERO_ONLY_MODULES)) or (
                user.op == "call_function" and user.target in _ZERO_ONLY_FUNCTIONS
            )
            if passes or zero:
                mixes = _pool_mixes_units(user, m, site, flat)
                if mixes is not None:
                    raise refuse(site, what, mixes)
                if node in products:
                    products.add(user)
                todo.append((user, flat, norms, zero_only or zero, fixed))
                continue
            flatten = _is_flatten(user, modules)
            if flatten and (channels_first or len(site.shape) == 2):
                hard = f"{describe_node(user)} with a hard-coded width" if flatten == "fixed" else fixed
                todo.append((user, True, norms, zero_only, hard))
                continue
            if flatten is None or flatten:
                raise refuse(site, what, f"its units are reshaped by {describe_node(user)} in a way deadrelu cannot follow")
            kind = f" ({type(m).__name__})" if m is not None else ""
            raise refuse(site, what, f"its units feed {describe_node(user)}{kind}, which is not a supported consumer")
    return links


def _keeps_units(node: fx.Node, module: nn.Module | None, modules: tuple[type, ...], functions: set[Any]) -> bool:
    """Whether ``node`` is one of ``modules`` or ``functions``, or ``.clone()`` / ``.contiguous()``."""
    if module is not None:
        return isinstance(module, modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in _PASS_METHODS


def _multiplier(
    chain: Chain,
    node: fx.Node,
    product: fx.Node,
    flat: bool,
    norms: list[tuple[str, nn.Module]],
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    shared: dict[str, list[str]],
    what: str,
) -> tuple[str, nn.Module]:
    """The Linear whose output ``product`` multiplies the units by, one for one (a gated MLP's ``up``), or refuse.

    Only such a factor gives each unit a row of its own to remove with it; a constant, a broadcast
    tensor, the units themselves or an input tensor does not.
    """
    site = chain.site
    operands = list(product.args)
    if product.kwargs or len(operands) != 2 or operands.count(node) != 1:
        form = "by themselves" if operands.count(node) > 1 else "in a form deadrelu cannot follow"
        raise refuse(site, what, f"its units are multiplied {form} ({describe_node(product)})")
    other = operands[1 - operands.index(node)]
    m = modules.get(other.target) if isinstance(other, fx.Node) and other.op == "call_module" else None  # type: ignore[arg-type]
    if type(m) is not nn.Linear:
        kind = describe_node(other) if isinstance(other, fx.Node) else f"the constant {other!r}"
        kind += f" ({type(m).__name__})" if m is not None else ""
        raise refuse(
            site, what, f"its units are multiplied by {kind}; {describe_node(product)} is followed only with the output "
            "of an nn.Linear of the units' width used nowhere else (a gated MLP's up projection)",
        )  # fmt: skip
    path = str(other.target)
    if norms or flat or not isinstance(chain.producer, nn.Linear) or site.unit_dim != len(site.shape) - 1:
        # A BatchNorm before the product would turn the dead unit's 0 into a constant times up's output.
        how = f"after '{norms[-1][0]}'" if norms else "other than on a Linear's units in the last dim"
        raise refuse(site, what, f"its units are multiplied by '{path}' {how}")
    if m.out_features != site.units:
        raise refuse(site, what, f"its units are multiplied by '{path}', which makes {m.out_features} values, not {site.units}")
    if len(other.users) != 1:
        users = ", ".join(describe_node(u) for u in other.users)
        raise refuse(site, what, f"the output of '{path}', which multiplies its units, is also used by {users}")
    check_module(path, m, site, what)
    check_single_use(path, site, what, calls, shared)
    return path, m


def _pool_mixes_units(node: fx.Node, module: nn.Module | None, site: SiteReport, flat: bool) -> str | None:
    """Why a pooling node pools across the site's units, or None when it pools each unit's channel alone.

    The rank is the site's (the scanned activation's shape): every op between the activation
    and a pool keeps the rank, except a flatten, after which any pool mixes units.
    """
    key = next((c for c in type(module).__mro__ if c in _POOL_DIMS), None) if module is not None else node.target
    dims = _POOL_DIMS.get(key) if node.op in ("call_module", "call_function") else None  # type: ignore[arg-type]
    if dims is None:
        return None
    if flat:
        return f"{describe_node(node)} pools a flattened tensor, across the units"
    rank = len(site.shape)
    channel_dim = rank - dims - 1  # the dim torch takes as channels: the last `dims` are pooled
    if site.unit_dim > channel_dim:
        unbatched = " (torch reads it as unbatched, dim 0 as channels)" if channel_dim == 0 else ""
        return (
            f"{describe_node(node)} pools over the last {dims} dim(s) of the {rank}-D tensor{unbatched}, "
            f"across the units on dim {site.unit_dim}"
        )
    if site.unit_dim != channel_dim or channel_dim != 1:
        return (
            f"{describe_node(node)} takes dim {channel_dim} of the {rank}-D tensor as channels, "
            f"not the units' dim {site.unit_dim}"
        )
    return None


def _link(
    chain: Chain,
    user: fx.Node,
    m: nn.Module,
    flat: bool,
    norms: list[tuple[str, nn.Module]],
    zero_only: bool,
    calls: dict[str, int],
    shared: dict[str, list[str]],
    what: str,
) -> Link:
    site = chain.site
    path = str(user.target)
    check_single_use(path, site, what, calls, shared)
    n_in = _in_units(m)
    if isinstance(m, nn.Linear):
        if flat:
            if n_in % site.units:
                raise refuse(site, what, f"'{path}' takes {n_in} inputs, not a multiple of {site.units} units")
            block = n_in // site.units
        else:
            if site.unit_dim != len(site.shape) - 1:
                raise refuse(site, what, f"'{path}' reads the last dim, but units are on dim {site.unit_dim}")
            block = 1
            if n_in != site.units:
                raise refuse(site, what, f"'{path}' takes {n_in} inputs, the site has {site.units} units")
    else:
        if flat or site.unit_dim != 1 or n_in != site.units:
            raise refuse(site, what, f"'{path}' does not read the site's {site.units} units as its channels")
        if len(site.shape) != len(m.kernel_size) + 2:  # type: ignore[arg-type]
            # e.g. a Conv2d on a (B, C, L) tensor: torch reads it as unbatched, (B, C, L) as (channels, H, W).
            raise refuse(
                site, what, f"'{path}' reads the {len(site.shape)}-D tensor as unbatched, its channels on dim 0, not the units"
            )
        if m.groups != 1:  # type: ignore[union-attr]
            raise refuse(site, what, f"'{path}' is a grouped convolution (groups={m.groups})")
        block = 1
    return Link(path, m, block, list(norms), zero_only)


def columns(link: Link, units: Iterable[int]) -> list[int]:
    """Consumer input columns (or channels) read from the given units."""
    return [u * link.block + k for u in units for k in range(link.block)]


def _bn_eval(bn: nn.Module, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm of the channels ``idx`` applied to per-channel values ``x`` (float64, on CPU),
    each channel holding its value ``x`` everywhere (a constant unit).

    Without running statistics (``track_running_stats=False``) torch normalises with the batch's own
    statistics in eval mode too: a channel constant over the batch has that constant as its mean and
    variance 0, so it comes out as exactly 0 before the affine map (``beta`` after it), whatever ``x``.
    """

    def pick(t: torch.Tensor | None, default: float) -> torch.Tensor:
        if t is None:
            return torch.full((len(idx),), default, dtype=torch.float64)
        return t.detach()[idx.to(t.device)].double().cpu()

    x = x.double().cpu()
    if _batch_statistics(bn):  # as F.batch_norm then does
        out = torch.zeros_like(x)
    else:
        out = (x - pick(bn.running_mean, 0.0)) / torch.sqrt(pick(bn.running_var, 1.0) + bn.eps)  # type: ignore[arg-type, operator]
    if bn.affine:
        out = out * pick(bn.weight, 1.0) + pick(bn.bias, 0.0)  # type: ignore[arg-type]
    return out


def _batch_statistics(bn: nn.Module | None) -> bool:
    """Whether ``bn`` normalises with the batch's statistics in eval mode (no running statistics)."""
    return bn is not None and bn.running_mean is None and bn.running_var is None


def batch_statistics_note(chains: Sequence[tuple[Chain, torch.Tensor | float]]) -> str | None:
    """Why a check on data may differ for a proven fold: a non-zero constant channel reaches a BatchNorm
    without running statistics. Its batch variance is 0, so torch divides its rounding of the channel's
    batch mean by ``sqrt(eps)`` (about 300× for eps=1e-5): noise the exact fold (``beta``) leaves out.
    ``chains`` pairs each chain with its units' dead output. None when no such BatchNorm is involved."""
    found = []
    for chain, value in chains:
        nonzero = bool(torch.any(torch.as_tensor(value, dtype=torch.float64) != 0))
        bias = getattr(chain.producer, "bias", None)
        if _batch_statistics(chain.norm) and bias is not None and bool(torch.any(bias.detach()[list(chain.units)] != 0)):
            found.append(chain.norm_path)
        found += [path for link in chain.links for path, bn in link.norms if nonzero and _batch_statistics(bn)]
    if not found:
        return None
    names = ", ".join(sorted({f"'{p}'" for p in found}))
    return (
        f"BatchNorm {names} has no running statistics (track_running_stats=False), so it normalises a dead unit's "
        "constant channel with the batch's mean and a variance of 0: torch's rounding of that mean, divided by "
        "sqrt(eps), is what differs (the proven value is exactly the BatchNorm's bias)"
    )


def constant_after(link: Link, units: Sequence[int], value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per unit, the eval-mode value reaching the consumer when the activation outputs ``value`` (per unit)."""
    out = torch.zeros(len(units), dtype=torch.float64) + torch.as_tensor(value, dtype=torch.float64).cpu()
    idx = torch.tensor(list(units), dtype=torch.long)
    for _, bn in link.norms:
        out = _bn_eval(bn, idx, out)
    return out


def constant_units(chain: Chain, model: nn.Module) -> tuple[tuple[int, ...], torch.Tensor | None]:
    """The chain's units whose incoming weights are all zero, and the activation's constant output for each.

    Such a unit's pre-activation is its bias (through the eval-mode BatchNorm), whatever the
    input, so its output is the activation of that constant — computed by calling the
    activation exactly as the model does. Returns ``((), None)`` when there are none or the
    call cannot be replayed (an argument computed in forward).
    """
    w = chain.producer.weight.detach()  # type: ignore[union-attr]
    units = tuple(u for u in chain.units if not bool(torch.any(w[u] != 0)))
    node = chain.node
    extra = list(node.args[1:]) + list(node.kwargs.values())
    if not units or any(isinstance(a, fx.Node) for a in extra):
        return (), None
    idx = torch.tensor(units, dtype=torch.long)
    bias = chain.producer.bias  # type: ignore[union-attr]
    pre = bias.detach()[idx.to(w.device)].double().cpu() if bias is not None else torch.zeros(len(units), dtype=torch.float64)
    if chain.norm is not None:
        pre = _bn_eval(chain.norm, idx, pre)
    shape = [1] * len(chain.site.shape)
    shape[chain.site.unit_dim] = chain.site.units
    x = torch.zeros(chain.site.units, dtype=w.dtype, device=w.device)
    x[idx.to(w.device)] = pre.to(device=w.device, dtype=w.dtype)
    x = x.view(shape)
    with torch.no_grad():
        if node.op == "call_module":
            y = model.get_submodule(str(node.target))(x)
        elif node.op == "call_function":
            y = node.target(x, *node.args[1:], **node.kwargs)  # type: ignore[operator]
        else:
            y = getattr(x, str(node.target))(*node.args[1:], **node.kwargs)
    return units, y.reshape(-1)[idx.to(y.device)].double().cpu()


def fold_into_bias(link: Link, units: Sequence[int], consts: torch.Tensor, site: SiteReport, what: str) -> torch.Tensor | None:
    """The consumer-bias change that keeps the output when the given units' constant input is removed.

    Returns None when every constant is zero. Raises RefusedError where the constant is not
    exactly foldable (zero-padded convolution, average pooling with padding).
    """
    if not torch.any(consts != 0):
        return None
    if link.zero_only:
        raise refuse(site, what, f"a non-zero constant reaches '{link.path}' through average pooling")
    m = link.module
    w = m.weight.detach().double()  # type: ignore[union-attr]
    if isinstance(m, nn.Linear):
        cols = torch.tensor(columns(link, units), dtype=torch.long)
        per_col = consts.repeat_interleave(link.block)
        return (w[:, cols] * per_col).sum(dim=1)
    padding = m.padding if isinstance(m.padding, tuple) else (m.padding,)  # type: ignore[union-attr]
    if m.padding_mode == "zeros" and any(p != 0 for p in padding if isinstance(p, int)) or m.padding == "same":  # type: ignore[union-attr]
        raise refuse(
            site, what, f"a non-zero constant reaches the zero-padded convolution '{link.path}' (not constant at borders)"
        )
    idx = torch.tensor(list(units), dtype=torch.long)
    return (w[:, idx].flatten(2).sum(dim=2) * consts).sum(dim=1)
