"""Remove dead units structurally: a smaller network that computes the same outputs.

A ReLU unit that never fired on the data outputs exactly 0 there, so it can be removed
with everything that only exists to make or read it: its row of the producing
Linear (or output channel of the producing Conv), its BatchNorm channel(s), and its
input columns of each consuming layer (after a flatten, the whole block of H·W
columns the channel owns). Where the dead unit's constant reaches a consumer as
something other than 0 — a BatchNorm after the activation maps 0 to
``beta - gamma·mean/sqrt(var+eps)`` — that constant times the removed weights is folded
into the consumer's bias (a bias is added if the consumer had none). The same folding
removes a dead unit of any other activation whose incoming weights are all zero: its
output is the activation of its bias, whatever the input.

In a gated MLP, ``down(act(gate(x)) * up(x))``, a dead unit's product is 0 whatever ``up``
gives it (as long as that is finite: ``0 * inf`` is NaN), so row ``j`` of ``up`` is removed
with row ``j`` of ``gate`` and column ``j`` of ``down``. A constant there is no longer constant
once multiplied, so only units whose output is exactly 0 are removed.

The dataflow is proven on a ``torch.fx`` trace (see :mod:`deadrelu._graph`); the new
model is a deep copy of the original with those layers replaced by smaller ones of the
same class, so it keeps the original's Python class, scripts and exports wherever the
original does. The original model is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from . import dataflow as _graph
from .transaction import copy_model
from .verify import (
    PinnedReference,
    alive_units,
    call_model,
    check_input_fn,
    check_model,
    check_sites,
    describe_units,
    max_difference,
    output_tensors,
    rounding_limit,
)
from ..core.activations import ZERO_WHEN_DEAD_FUNCTIONS
from ..core.capture import eager_submodule
from ..core.hooks import is_deadrelu_hook
from ..errors import DataError, DeadReluError, RefusedError
from ..core.report import Report, SiteReport
from ..core.inputs import (
    call_arguments,
    error_summary,
    iter_batches,
    kept_training_flags,
    model_device,
    to_device,
    whole_batch_size,
)

__all__ = ["prune_dead", "PruneResult", "count_parameters", "count_macs"]

# Activations whose output on a dead unit (never above a threshold <= 0) is exactly 0.


@dataclass(frozen=True)
class PruneResult:
    """The outcome of :func:`prune_dead`.

    Attributes:
        model: the new, smaller model (a modified deep copy; the original is untouched).
        removed: per site name, the unit indices removed.
        kept: per site name, dead units kept because removing them all would leave a layer empty.
        skipped: per site name, why its dead units were not removed (not a ReLU site, ...).
        params_before: parameters of the original (shared tensors counted once).
        params_after: parameters of the pruned model.
        macs_before: multiply-accumulates per sample of the original's Linear and Conv layers
            (``out.numel() × in_features`` / ``out.numel() × in_channels/groups × kernel``,
            measured on the first batch of ``data``); None without data.
        macs_after: the same for the pruned model.
        max_abs_diff: largest absolute output difference on ``data`` (None without data).
    """

    model: nn.Module
    removed: dict[str, tuple[int, ...]]
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    max_abs_diff: float | None = None

    @property
    def units_removed(self) -> int:
        """Total number of units removed."""
        return sum(len(u) for u in self.removed.values())

    def __str__(self) -> str:
        lines = [f"prune_dead: removed {self.units_removed} unit(s) at {sum(1 for u in self.removed.values() if u)} site(s)"]
        for name, units in self.removed.items():
            lines.append(f"  {name}: removed {len(units)}")
        for name, units in self.kept.items():
            lines.append(f"  {name}: kept dead unit(s) {list(units)} so the layer is not empty")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: skipped ({why})")
        lines.append(f"  parameters: {self.params_before:,} -> {self.params_after:,}")
        if self.macs_before is not None:
            lines.append(f"  MACs/sample: {self.macs_before:,} -> {self.macs_after:,}")
        if self.max_abs_diff is not None:
            lines.append(f"  max |output difference| on the data: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, shared tensors counted once.

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Multiply-accumulates per sample of all Linear and Conv calls in one forward.

    Only Linear (``out.numel() × in_features``) and ConvNd (``out.numel() ×
    in_channels/groups × prod(kernel)``) are counted; norms, activations and pooling are
    cheap by comparison and left out. The total is divided by the batch size, taken as
    the first dimension of the first tensor argument.

    Example:
        >>> count_macs(torch.nn.Linear(3, 2), (torch.randn(5, 3),), {})
        6
    """
    total = 0

    def hook(module: nn.Module, inputs: Any, out: Any) -> None:
        nonlocal total
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        else:
            k = 1
            for s in module.kernel_size:  # type: ignore[union-attr]
                k *= s
            total += out.numel() * (module.in_channels // module.groups) * k  # type: ignore[union-attr, operator]

    counted = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # transposed convs count differently: left out
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
    n = first.shape[0] if first is not None and first.ndim else 1
    return total // max(n, 1)


def _select(site: SiteReport) -> tuple[int, ...]:
    if site.function in ZERO_WHEN_DEAD_FUNCTIONS and site.fire_threshold <= 0:
        return site.dead_units
    return ()


def _constant_chain(
    model: nn.Module, report: Report, site: SiteReport, what: str
) -> tuple[_graph.Chain | None, torch.Tensor | None]:
    """For a non-ReLU site: a chain over its dead units whose output is provably constant, if any."""
    try:
        (chain,) = _graph.find_chains(model, report, lambda s: s.dead_units if s is site else (), what)
    except RefusedError:
        return None, None  # stays skipped: its units are not provably constant anyway
    units, value = _graph.constant_units(chain, model)
    if chain.multipliers and value is not None:
        # A non-zero constant times up's output is no constant: only exact zeros can go.
        units, value = tuple(u for u, v in zip(units, value.tolist()) if v == 0), value[value == 0]
    if not units:
        return None, None
    chain.units = units
    return chain, value


def _skip_reason(site: SiteReport) -> str | None:
    if not site.dead_units:
        return None
    if site.function not in ZERO_WHEN_DEAD_FUNCTIONS:
        if _graph.expert_of_site(site) is not None:  # even a constant unit: its row is a slice of a stacked weight
            return "it counts one expert of experts stacked in one weight, which prune_dead does not support yet"
        return f"a dead {site.function} unit still outputs a non-constant value"
    return _graph.threshold_reason(site)


@dataclass
class _Edit:
    """What to cut from one module: output rows/channels, input columns, and a bias change."""

    out: set[int] = field(default_factory=set)
    inp: set[int] = field(default_factory=set)
    bias: torch.Tensor | None = None  # float64, full output size


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _uninitialised(cls: Any, *args: Any, device: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` on ``device`` without running its random init (which would draw
    from the global RNG): built on the meta device, then given uninitialised storage, all of
    which the caller overwrites."""
    return cls(*args, device="meta", **kwargs).to_empty(device=device if device is not None else "cpu")


_STANDARD_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _rebuild_reason(path: str, module: nn.Module) -> str | None:
    """Why a smaller copy of ``module`` built from its weights (:func:`_smaller`) would lose what was
    attached to it, or None: backward hooks, hooks on its parameters, or parameters and buffers of
    its own beyond the layer's (a calibration ``amax``), whose shapes may follow the cut units."""
    name = f"'{path}' ({type(module).__name__})"
    hooks = [h for h in (*module._backward_hooks.values(), *module._backward_pre_hooks.values()) if not is_deadrelu_hook(h)]
    if hooks:
        return f"{name} has {len(hooks)} backward (pre-)hook(s), which the smaller layer built in its place would not have; remove them first"
    for key, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
        if key not in _STANDARD_TENSORS:
            return (
                f"{name} holds a tensor '{key}' of its own ({tuple(t.shape)}), which the smaller layer built in its "
                "place would not have, and whose shape may follow the cut units; remove it first"
            )
        if getattr(t, "_backward_hooks", None) or getattr(t, "_post_accumulate_grad_hooks", None):
            return f"{name}.{key} has a tensor hook (register_hook), which the smaller layer's new tensor would not have; remove it first"
    return None


def _carry_attributes(old: nn.Module, new: nn.Module) -> None:
    """Plain attributes set on the layer (``layer.no_decay = True``, a tag a training script reads) go
    on to the smaller one; its own (sizes, options) are the new layer's."""
    for key, value in vars(old).items():
        if not key.startswith("_") and key not in vars(new):
            vars(new)[key] = value


def _smaller(old: nn.Module, edit: _Edit) -> nn.Module:
    new = _smaller_layer(old, edit)
    _carry_attributes(old, new)
    return new


def _smaller_layer(old: nn.Module, edit: _Edit) -> nn.Module:
    """A new module of the same class without the cut rows/columns/channels; every value is copied."""
    w = old.weight if hasattr(old, "weight") else None
    dev = dtype = None
    for t in list(old.parameters()) + list(old.buffers()):
        if t.is_floating_point():
            dev, dtype = t.device, t.dtype
            break
    if isinstance(old, nn.PReLU):
        keep = _keep(old.num_parameters, edit.out)
        new = _uninitialised(nn.PReLU, len(keep), device=dev, dtype=dtype)
        new.weight.data.copy_(old.weight.data[keep])
        new.weight.requires_grad_(old.weight.requires_grad)
        new.train(old.training)
        return new
    if isinstance(old, nn.modules.batchnorm._BatchNorm):
        keep = _keep(old.num_features, edit.out)
        new = _uninitialised(
            type(old), len(keep), old.eps, old.momentum, old.affine, old.track_running_stats, device=dev, dtype=dtype
        )
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(old, name), getattr(new, name)
            if src is not None:
                dst.data.copy_(src.data[keep])
                dst.requires_grad_(src.requires_grad)
        if old.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
        new.train(old.training)
        return new
    assert w is not None
    n_out, n_in = w.shape[0], w.shape[1]
    keep_out, keep_in = _keep(n_out, edit.out), _keep(n_in, edit.inp)
    has_bias = old.bias is not None or edit.bias is not None
    if isinstance(old, nn.Linear):
        new = _uninitialised(nn.Linear, len(keep_in), len(keep_out), bias=has_bias, device=dev, dtype=dtype)
    else:
        new = _uninitialised(
            type(old), len(keep_in), len(keep_out), old.kernel_size, stride=old.stride, padding=old.padding,  # type: ignore[arg-type]
            dilation=old.dilation, groups=old.groups, bias=has_bias, padding_mode=old.padding_mode,  # type: ignore[arg-type]
            device=dev, dtype=dtype,
        )  # fmt: skip
    new.weight.data.copy_(w.data[keep_out][:, keep_in])
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        # A channels_last model (a common CNN speed-up) stays so: outputs are the same either way, speed is not.
        if w.dim() == rank and not w.is_contiguous() and w.is_contiguous(memory_format=fmt):
            new.weight.data = new.weight.data.contiguous(memory_format=fmt)
    new.weight.requires_grad_(w.requires_grad)
    if has_bias:
        bias = old.bias.data.double() if old.bias is not None else torch.zeros(n_out, dtype=torch.float64, device=w.device)
        if edit.bias is not None:
            bias = bias + edit.bias.to(bias.device)
        new.bias.data.copy_(bias[keep_out].to(new.bias.dtype))
        # a bias the fold added (the layer had none) trains as its weight does: not at all in a frozen model
        new.bias.requires_grad_((old.bias if old.bias is not None else w).requires_grad)
    new.train(old.training)
    return new


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(eager_submodule(model, parent), name, module)


def _compare(
    original: nn.Module, pruned: nn.Module, data: Any, input_fn: Callable[[Any], Any] | None, batch_size: int
) -> tuple[float, float, tuple[Any, ...], dict[str, Any]]:
    """Largest absolute output difference over all batches (eval mode, no grad), the largest difference
    rounding may explain in the outputs' dtype (:func:`~deadrelu.surgery.verify.rounding_limit`, at least
    1e-5), and the first batch's inputs."""
    device = model_device(original)
    worst = 0.0
    rounding = 1e-5
    first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    with kept_training_flags(original, pruned), torch.no_grad():
        original.eval()
        pruned.eval()
        for batch in iter_batches(data, batch_size):
            args, kwargs = call_arguments(to_device(batch, device), input_fn)
            if first is None:
                first = (args, kwargs)
            before = output_tensors(call_model(original, args, kwargs, "prune_dead"))
            try:
                after = output_tensors(pruned(*args, **kwargs))
            except Exception as err:  # the original ran on this batch, so the rewrite broke the model
                raise RefusedError(
                    f"prune_dead: the pruned model raised {type(err).__name__} on data the original runs on "
                    f"({error_summary(err)}); nothing was changed"
                ) from err
            diff = max_difference(before, after)
            rounding = max(rounding, rounding_limit(before))
            if diff == float("inf"):
                return diff, rounding, args, kwargs
            worst = max(worst, diff)
    if first is None:
        raise DataError("prune_dead: the data held no batches to verify on")
    return worst, rounding, first[0], first[1]


def prune_dead(
    model: nn.Module,
    report: Report,
    data: Any = None,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    batch_size: int = 256,
    tolerance: float | None = None,
    sites: Iterable[str] | None = None,
) -> PruneResult:
    """Return a smaller copy of ``model`` without the dead ReLU units in ``report``.

    For each site, every dead unit's producing row/channel, BatchNorm channel(s) and
    consuming columns/channels are removed (see the module docstring) — in a gated MLP
    ``down(act(gate(x)) * up(x))`` the unit's row of ``up`` too. A site whose
    units are all dead keeps one, so no layer becomes empty. A dead unit of a non-ReLU
    site is removed only when its incoming weights are all zero: its output is then the
    activation of its (eval-mode BatchNorm'd) bias, a constant folded into the consumer's
    bias; other dead non-ReLU units still pass a signal and are skipped (listed in
    ``result.skipped``). A per-channel PReLU shrinks with its layer.

    Args:
        model: the scanned model; never modified.
        report: a :class:`~deadrelu.Report` of ``model`` (ideally on the data you will verify on).
        data: optional data (as for :func:`deadrelu.scan`): when given, outputs of the
            pruned and original model are compared on all of it (eval mode) and the
            pruning is refused if they differ by more than ``tolerance``; it also gives
            the input for counting MACs.
        input_fn: ``batch -> model input``, as for :func:`deadrelu.scan`.
        batch_size: rows per batch when ``data`` is a tensor.
        tolerance: the largest accepted absolute output difference on ``data``. By default (None) it is what
            rounding may explain in the outputs' dtype: ``1e-5 × max(1, max |output|)`` in float32
            (at least 1e-5 in any dtype), ``1e-2 ×`` in float16, ``5e-2 ×`` in bfloat16. A number is
            used as given.
        sites: only prune these sites (by report name); default all.

    Returns:
        A :class:`PruneResult` with the new model, removed unit indices, and parameter
        and MAC counts before and after.

    Raises:
        RefusedError: the graph cannot be rewritten safely (residual add, shared weights,
            unsupported layer, untraceable model, a constant that cannot be folded), or
            the outputs on ``data`` differ by more than ``tolerance`` — as they do when the
            report is stale for ``data`` (units it calls dead fire there; the message names them).
        ForwardError: the model raises on ``data`` (e.g. the wrong number of features).
        DataError: ``data`` is unusable.
        DeadReluError: a bad argument (model, tolerance, batch_size, input_fn, sites).

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(64, 4)
        >>> result = deadrelu.prune_dead(net, deadrelu.scan(net, x), data=x)
        >>> result.params_after <= result.params_before
        True
    """
    what = "prune_dead"
    check_model(model, what)
    tolerance = _tolerance(tolerance, what)
    batch_size = whole_batch_size(batch_size, what)
    check_input_fn(input_fn, what)
    sites = check_sites(sites, what)
    # torch.fx cannot trace torch.compile's wrapper, only the module inside; the result is compiled like the model.
    wrapper, model = model, eager_submodule(model, "")
    # With data, the real model (global module hooks included) is compared with the pruned one below.
    chains = _graph.find_chains(model, report, _select, what, sites=sites, checked_on_data=data is not None)
    skipped = _skipped_sites(report, sites)
    values: dict[str, torch.Tensor | float] = {c.site.name: 0.0 for c in chains}
    _add_constant_chains(model, report, chains, values, skipped, what)
    plan = _plan_cuts(model, report, chains, values, what)
    originals = dict(model.named_modules())
    for path in plan.edits:
        reason = _rebuild_reason(path, originals[path])
        if reason is not None:
            raise RefusedError(f"{what}: {reason}; nothing was changed")
    pruned_wrapper = copy_model(wrapper, what)
    pruned = eager_submodule(pruned_wrapper, "")
    for path, edit in plan.edits.items():
        _replace(pruned, path, _smaller(originals[path], edit))
    result: dict[str, Any] = dict(
        model=pruned_wrapper,
        removed=plan.removed,
        kept=plan.kept,
        skipped=skipped,
        params_before=count_parameters(model),
        params_after=count_parameters(pruned),
    )
    if data is not None:
        result.update(_verify(model, report, pruned, plan, data, input_fn, batch_size, tolerance, what))
    return PruneResult(**result)


def _tolerance(tolerance: Any, what: str) -> float | None:
    """``tolerance`` as a float >= 0 (infinity accepted: compare nothing; None: the dtype's rounding), or one DeadReluError."""
    if tolerance is None:
        return None
    try:
        value = float(tolerance) if isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) else None
    except OverflowError:  # an int too large for a float
        value = None
    if value is None or not value >= 0:
        raise DeadReluError(f"{what}: tolerance must be a number >= 0, got {tolerance!r}")
    return value


@dataclass
class _CutPlan:
    """What :func:`prune_dead` cuts: per module path an :class:`_Edit`, and per site the units removed/kept."""

    edits: dict[str, _Edit] = field(default_factory=dict)
    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pins: list[tuple[SiteReport, tuple[int, ...], torch.Tensor | float]] = field(default_factory=list)
    chains: list[tuple[_graph.Chain, torch.Tensor | float]] = field(default_factory=list)  # with the units' value


def _skipped_sites(report: Report, sites: Iterable[str] | None) -> dict[str, str]:
    """Per chosen site with dead units that cannot be removed for free, why."""
    chosen = None if sites is None else ({sites} if isinstance(sites, str) else set(sites))
    return {
        s.name: r
        for s in report.sites
        if (chosen is None or s.name in chosen) and (r := _skip_reason(s)) is not None
    }


def _add_constant_chains(
    model: nn.Module,
    report: Report,
    chains: list[_graph.Chain],
    values: dict[str, torch.Tensor | float],
    skipped: dict[str, str],
    what: str,
) -> None:
    """Add the chains of skipped non-ReLU sites whose dead units are provably constant (in place)."""
    for site in report.sites:
        if site.name in skipped and site.function not in ZERO_WHEN_DEAD_FUNCTIONS:
            chain, value = _constant_chain(model, report, site, what)
            if chain is not None:
                chains.append(chain)
                values[site.name] = value  # type: ignore[assignment]
                left = len(site.dead_units) - len(chain.units)
                if left and chain.multipliers:
                    skipped[site.name] = (
                        f"{left} dead {site.function} unit(s) do not output exactly 0 (non-zero incoming weights, or "
                        f"a non-zero constant that '{chain.multipliers[0][0]}' multiplies)"
                    )
                elif left:
                    skipped[site.name] = f"{left} dead {site.function} unit(s) with non-zero incoming weights are not constant"
                else:
                    del skipped[site.name]


def _plan_cuts(
    model: nn.Module, report: Report, chains: list[_graph.Chain], values: dict[str, torch.Tensor | float], what: str
) -> _CutPlan:
    """Every module's cut rows/columns and bias folds, or a refusal before anything is built."""
    plan = _CutPlan()
    for chain in chains:
        units = chain.units
        value = values[chain.site.name]
        if len(units) == chain.site.units:
            plan.kept[chain.site.name] = units[:1]
            units = units[1:]
            if isinstance(value, torch.Tensor):
                value = value[1:]
        plan.removed[chain.site.name] = units
        if not units:
            continue
        plan.pins.append((chain.site, units, value))
        plan.chains.append((chain, value))
        edits = plan.edits
        edits.setdefault(chain.producer_path, _Edit()).out.update(units)
        act = model.get_submodule(str(chain.node.target)) if chain.node.op == "call_module" else None
        if isinstance(act, nn.PReLU) and act.num_parameters > 1:
            # One slope per unit: the PReLU shrinks with the layer, so it must serve this site only.
            if sum(s.module == chain.node.target for s in report.sites) > 1:
                raise RefusedError(
                    f"{what}: site '{chain.site.name}': the per-channel PReLU '{chain.node.target}' is used at "
                    "several sites; nothing was changed"
                )
            edits.setdefault(str(chain.node.target), _Edit()).out.update(units)
        if chain.norm_path:
            edits.setdefault(chain.norm_path, _Edit()).out.update(units)
        for path, _ in chain.multipliers:
            edits.setdefault(path, _Edit()).out.update(units)
        for link in chain.links:
            _plan_link_cut(edits, chain, link, units, value, what)
    return plan


def _plan_link_cut(
    edits: dict[str, _Edit], chain: _graph.Chain, link: _graph.Link, units: tuple[int, ...], value: Any, what: str
) -> None:
    """The consumer's cut columns (and norms' channels), and the bias that absorbs a non-zero constant."""
    if link.fixed:
        raise RefusedError(
            f"{what}: site '{chain.site.name}': its units reach '{link.path}' through {link.fixed}, which "
            "cannot shrink; write x.flatten(1) or x.view(x.size(0), -1) instead; nothing was changed"
        )
    for norm_path, _ in link.norms:
        edits.setdefault(norm_path, _Edit()).out.update(units)
    consts = _graph.constant_after(link, units, value)
    delta = _graph.fold_into_bias(link, units, consts, chain.site, what)
    edit = edits.setdefault(link.path, _Edit())
    edit.inp.update(_graph.columns(link, units))
    if delta is not None:
        edit.bias = delta if edit.bias is None else edit.bias + delta


def _verify(
    model: nn.Module,
    report: Report,
    pruned: nn.Module,
    plan: _CutPlan,
    data: Any,
    input_fn: Callable[[Any], Any] | None,
    batch_size: int,
    tolerance: float | None,
    what: str,
) -> dict[str, Any]:
    """Compare on all of ``data`` and on held-out inputs like its first batch; MACs on that batch."""
    diff, rounding, args, kwargs = _compare(model, pruned, data, input_fn, batch_size)
    limit = rounding if tolerance is None else tolerance
    if not diff <= limit:
        why = _stale_units(model, report, plan, data, input_fn, batch_size, what)
        if tolerance is None:
            given = f"tolerance {limit:.3g}, the default: rounding in the outputs' dtype at their scale"
        else:
            given = f"tolerance {tolerance:g}" + (
                f"; rounding in the outputs' dtype alone may reach {rounding:.3g}, the default" if rounding > tolerance else ""
            )  # fmt: skip
        raise RefusedError(
            f"{what}: the pruned model's outputs differ from the original's by up to {diff:.3g} on the data "
            f"({given}); {why}nothing was changed"
        )
    reference = PinnedReference.build(model, plan.pins, args, kwargs, what) if plan.pins else None
    if reference is not None:
        reference.check(pruned, tolerance or 0.0)
    with kept_training_flags(model, pruned):
        model.eval()
        pruned.eval()
        return dict(
            macs_before=count_macs(model, args, kwargs),
            macs_after=count_macs(pruned, args, kwargs),
            max_abs_diff=diff,
        )


def _stale_units(
    model: nn.Module,
    report: Report,
    plan: _CutPlan,
    data: Any,
    input_fn: Callable[[Any], Any] | None,
    batch_size: int,
    what: str,
) -> str:
    """Why the outputs differ, for the refusal: the removed units that fire on ``data``, if a re-scan finds any."""
    if not isinstance(data, torch.Tensor) and iter(data) is data:
        return "the report may not be from this data; "  # a one-shot iterator: read once already
    picks = [(site, units) for site, units, _ in plan.pins]
    alive = alive_units(model, report, picks, data, what, input_fn=input_fn, batch_size=batch_size)
    if not alive:  # the removed units are dead here: the model computes more than its trace shows
        note = _graph.batch_statistics_note(plan.chains)
        if note is not None:
            return f"the units removed are dead on this data, but {note}; pass a larger tolerance to accept it; "
        return (
            "the units removed are dead on this data, so the model computes something its traced graph does "
            "not show (a branch or Python code torch.fx did not record) or a non-finite value met a removed unit "
            "(0 * inf); "
        )
    return (
        f"the report is stale for this data: units it calls dead fire on it ({describe_units(alive)}); scan this "
        "data and prune with that report; "
    )
