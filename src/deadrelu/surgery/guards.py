"""What, beyond a chain's shape, keeps a rewrite from being proven: each check refuses or says why.

A proven chain (:mod:`deadrelu.surgery.dataflow`) says which layers make and read a site's units; an
edit of their weights is exact only where each layer computes what its weights say, once, and nothing
else reads them. Here are the checks for that: a parametrization or the old hook-based
``weight_norm`` / ``spectral_norm`` (:func:`computed_weight_reason`), a forward (pre-)hook that is not
deadrelu's, on a chain layer (:func:`unrewritable_reason`) or anywhere the trace does not see it
(:func:`check_unseen_hooks`), a weight read directly in forward (:func:`direct_reads`), a layer called
twice or sharing parameters (:func:`check_single_use`, :func:`shared_parameters`), a report made from
another model (:func:`check_report_matches`), a site scanned with a fire threshold above 0
(:func:`threshold_reason`). :func:`refuse` words a refusal for a site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import fx, nn

from ..core.hooks import global_forward_hooks
from ..core.report import Report, SiteReport, model_fingerprint
from ..errors import RefusedError
from .tracing import describe_node, storage_key, storage_names

if TYPE_CHECKING:
    from .dataflow import Chain

__all__ = [
    "refuse", "threshold_reason", "is_deadrelu_hook", "computed_weight_reason", "unrewritable_reason",
    "check_unseen_hooks", "check_report_matches", "check_module", "direct_reads", "fetch", "check_direct_reads",
    "check_single_use", "shared_parameters",
]  # fmt: skip


def refuse(site: SiteReport, what: str, why: str) -> RefusedError:
    """The refusal of ``what`` at ``site``, saying ``why`` and that nothing was changed."""
    return RefusedError(f"{what}: site '{site.name}': {why}; nothing was changed")


def threshold_reason(site: SiteReport) -> str | None:
    """Why a site's dead units are not provably silent: it was scanned with a fire threshold above
    0, so they may still output up to it (``prune_dead`` and ``reinit_dead`` skip it); else None."""
    if site.fire_threshold > 0:
        return f"scanned with fire threshold {site.fire_threshold:g} > 0, so dead units may output up to it"
    return None


def is_deadrelu_hook(hook: Any) -> bool:
    """True for a hook registered by deadrelu itself (a capture or monitor), which surgery may ignore."""
    fn = getattr(hook, "__func__", hook)
    fn = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(fn, "__module__", "") or "").startswith("deadrelu.")


def computed_weight_reason(path: str, module: nn.Module) -> str | None:
    """Why ``module``'s weights are computed from other tensors (a parametrization, the old
    hook-based ``weight_norm``/``spectral_norm``), or None when they are plain parameters."""
    name = f"'{path}'" if path else "the model"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        what = ", ".join(
            f"{t} ({', '.join(type(p).__name__ for p in plist)})" for t, plist in module.parametrizations.items()  # type: ignore[union-attr]
        )
        return (
            f"{name} is parametrized (torch.nn.utils.parametrize: {what}), so its weights are computed from "
            "other tensors and cannot be edited exactly"
        )
    for hook in module._forward_pre_hooks.values():
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm") and type(hook).__module__.startswith("torch.nn.utils"):
            old = "weight_norm" if kind == "WeightNorm" else "spectral_norm"
            return (
                f"{name} is wrapped by the hook-based torch.nn.utils.{old}, which recomputes its "
                f"'{getattr(hook, 'name', 'weight')}' before every forward, so an edit would not hold"
            )
    return None


def unrewritable_reason(path: str, module: nn.Module) -> str | None:
    """Why surgery cannot rewrite ``module`` exactly from its weights, or None when it can.

    A parametrized module computes its weight from other tensors; the old hook-based
    ``weight_norm`` / ``spectral_norm`` recompute ``weight`` before every forward (an edit of
    it is undone at the next call); any other forward (pre-)hook may change what the
    module computes in ways the dataflow cannot see.
    """
    reason = computed_weight_reason(path, module)
    if reason is not None:
        return reason
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    foreign = [h for h in hooks if not is_deadrelu_hook(h)]
    if foreign:
        label = getattr(foreign[0], "__qualname__", type(foreign[0]).__name__)
        name = f"'{path}'" if path else "the model"
        return (
            f"{name} has {len(foreign)} forward (pre-)hook(s) that are not "
            f"deadrelu's (e.g. {label}), which may change what it computes; remove them first"
        )
    return None


def _foreign_hooks(hooks: Iterable[Any]) -> list[Any]:
    """The hooks that are neither deadrelu's nor torch.nn.utils' weight recomputation (weight_norm,
    spectral_norm, prune), which reads and writes only its own module's tensors."""
    return [h for h in hooks if not is_deadrelu_hook(h) and not type(h).__module__.startswith("torch.nn.utils.")]


def _traced_through(gm: fx.GraphModule) -> set[str]:
    """Paths of the submodules whose ``__call__`` the trace ran, not the root or a leaf.

    fx calls a non-leaf submodule through ``Module.__call__``, so its hooks run at trace time and
    what they compute is in the graph like the rest of its forward.
    """
    called: set[str] = set()
    for node in gm.graph.nodes:
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            called.add(value[0] if isinstance(value, tuple) else key.rpartition("@")[0] or key)
    leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return called - leaves - {""}


def check_unseen_hooks(model: nn.Module, gm: fx.GraphModule, what: str, checked_on_data: bool) -> None:
    """Refuse forward (pre-)hooks that run in ``model`` but are not in its torch.fx trace.

    ``fx.symbolic_trace`` runs the root's ``forward``, not its ``__call__``, so the root's hooks are
    left out; a leaf's hooks (and those of the modules inside a leaf) run only at call time. Such a
    hook may read or overwrite the layers the rewrite edits (the root's gets every layer: a weight
    penalty added to the output, say), so the proof cannot hold while one is there. Global module
    hooks reach every layer too; with ``checked_on_data`` the caller runs the real model, global
    hooks included, and compares, so they are left to that check.

    Raises:
        RefusedError: naming the first such module (or the global hooks).
    """
    seen = _traced_through(gm)
    for path, module in model.named_modules():
        hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
        foreign = _foreign_hooks(hooks) if path not in seen else []
        if foreign:
            label = getattr(foreign[0], "__qualname__", type(foreign[0]).__name__)
            name = f"module '{path}' ({type(module).__name__})" if path else f"the model's root ({type(module).__name__})"
            raise RefusedError(
                f"{what}: {name} has {len(foreign)} forward (pre-)hook(s) that are not deadrelu's (e.g. {label}); "
                "torch.fx does not trace them, so it cannot be proven that they do not read or change the edited "
                "layers; remove them first; nothing was changed"
            )
    if checked_on_data:
        return
    foreign = _foreign_hooks(global_forward_hooks(pre=True) + global_forward_hooks())
    if foreign:
        label = getattr(foreign[0], "__qualname__", type(foreign[0]).__name__)
        raise RefusedError(
            f"{what}: {len(foreign)} global module forward (pre-)hook(s) (torch.nn.modules.module."
            f"register_module_forward_hook, e.g. {label}) run on every layer and are not traced by torch.fx; remove "
            "them, or pass data= to check the rewrite on the real model; nothing was changed"
        )


def check_report_matches(model: nn.Module, report: Report, what: str) -> None:
    """Refuse a report whose recorded model fingerprint differs from ``model``'s.

    Raises:
        RefusedError: ``report`` is not a :class:`Report`, or naming both fingerprints; a report
            without one (older JSON) passes.
    """
    if not isinstance(report, Report):
        raise RefusedError(f"{what}: expected a deadrelu Report, got {type(report).__name__}; nothing was changed")
    recorded = getattr(report, "fingerprint", "")
    if recorded and recorded != model_fingerprint(model):
        raise RefusedError(
            f"{what}: the report was made from a different model: its parameter names and shapes (fingerprint "
            f"{recorded}) differ from those of this {type(model).__name__} ({model_fingerprint(model)}); scan this "
            "model and use that report; nothing was changed"
        )


def check_module(path: str, module: nn.Module, site: SiteReport, what: str) -> None:
    """Refuse at ``site`` when ``module`` cannot be rewritten exactly (see :func:`unrewritable_reason`)."""
    reason = unrewritable_reason(path, module)
    if reason is not None:
        raise refuse(site, what, reason)


# A get_attr node no op reads: forward handed the proxy to Python code, which fx cannot follow.
_UNTRACED_READ = (
    "by Python code torch.fx cannot follow (e.g. isinstance(self.fc.weight, torch.Tensor), which is False "
    "for the tracing proxy), so the traced graph may not be what the model runs; pass data= to check the "
    "rewrite on the real model"
)


def direct_reads(gm: fx.GraphModule, model: nn.Module, eager: dict[str, str], checked_on_data: bool) -> dict[str, str]:
    """Tensor path -> how forward reads it outside its module's call, for the refusal message.

    Three ways: a get_attr node (``self.fc.weight`` outside ``self.fc(...)``); a get_attr of another
    tensor that shares its storage (a plain attribute ``self.w = self.fc.weight.T``); an eager op at
    trace time (``eager``, from :func:`~deadrelu.surgery.tracing.traced`: ``self.parameters()``,
    ``self.bn.running_var.sum()``).
    A get_attr node that no op uses computes nothing in the graph, but the Python code that took it
    (T5's ``isinstance(self.wo.weight, torch.Tensor)``) may run otherwise in the real model; with
    ``checked_on_data`` the caller compares the real model with the trace, so it is left to that check.
    """
    nodes: dict[str, list[fx.Node]] = {}
    storages = storage_names(model)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or (checked_on_data and not node.users):
            continue
        nodes.setdefault(str(node.target), []).append(node)
        try:
            value = fetch(gm, str(node.target))
        except AttributeError:
            continue
        alias = storages.get(storage_key(value)) if isinstance(value, torch.Tensor) else None
        if alias is not None and alias != str(node.target):
            nodes.setdefault(alias, []).append(node)
    users = {t: ", ".join(sorted({describe_node(u) for n in found for u in n.users})) for t, found in nodes.items()}
    out = {target: f"by {by}" if by else _UNTRACED_READ for target, by in users.items()}
    for name, op in eager.items():
        out.setdefault(
            name, f"eagerly, by {op}() on the tensor itself, e.g. through self.parameters(): torch.fx computes that "
            "once while tracing and keeps the result as a constant"
        )
    return out


def fetch(root: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` of ``root``."""
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def check_direct_reads(chain: "Chain", reads: dict[str, str], what: str) -> None:
    """Refuse when a tensor of a layer the rewrite edits is also read outside that layer's own call."""
    paths = {chain.producer_path, chain.norm_path} | {l.path for l in chain.links} | {p for p, _ in chain.multipliers}
    paths |= {p for l in chain.links for p, _ in l.norms}
    if chain.node.op == "call_module":
        paths.add(str(chain.node.target))
    for target, how in reads.items():
        owner = next((p for p in paths if p and (target == p or target.startswith(p + "."))), None)
        if owner is not None and how == _UNTRACED_READ:
            raise refuse(chain.site, what, f"'{target}' is read in forward outside the call of '{owner}', {how}")
        if owner is not None:
            raise refuse(
                chain.site,
                what,
                f"'{target}' is also read directly in forward ({how}), outside the call of '{owner}', so "
                "editing it would change that computation too",
            )


def check_single_use(
    path: str, site: SiteReport, what: str, calls: dict[str, int], shared: dict[str, list[str]]
) -> None:
    """Refuse at ``site`` when module ``path`` is called more than once in forward or shares parameters."""
    if calls.get(path, 0) > 1:
        raise refuse(site, what, f"module '{path}' is called {calls[path]} times in forward (shared weights)")
    if path in shared:
        raise refuse(site, what, f"module '{path}' shares parameters with {', '.join(shared[path])}")


def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    """The bytes of its storage that ``t`` can read, as (start, end); None without storage or elements."""
    key = storage_key(t)
    if not key or t.numel() == 0:
        return None
    size = t.element_size()
    start = key + t.storage_offset() * size
    return start, start + (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * size


def shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Module path -> other modules holding one of its parameters (tied weights).

    Tied means the same Parameter object, or tensors whose storage overlaps: ``b.weight =
    nn.Parameter(a.weight.data)`` is a second Parameter on the same memory, and an in-place write
    of one is a write of the other. Buffers count too (a BatchNorm's running statistics are written).
    """
    owners: dict[int, set[str]] = {}
    spans: dict[int, list[tuple[int, int, str]]] = {}  # storage -> (start, end, module) per tensor
    for mpath, module in model.named_modules(remove_duplicate=False):
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            owners.setdefault(id(t), set()).add(mpath)
            span = _byte_range(t)
            if span is not None:
                spans.setdefault(storage_key(t), []).append((span[0], span[1], mpath))
    groups = list(owners.values())  # a module registered under two names is shared too
    for found in spans.values():
        groups += [{a, b} for i, (s, e, a) in enumerate(found) for s2, e2, b in found[i + 1:] if a != b and s < e2 and s2 < e]
    out: dict[str, set[str]] = {}
    for paths in groups:
        if len(paths) > 1:
            for p in paths:
                out.setdefault(p, set()).update(q for q in paths if q != p)
    return {p: sorted(q) for p, q in out.items()}

