"""Fix dead units in place: re-initialise them (ReDo), nudge their bias, or swap the activation.

Every function here is all-or-nothing: the dataflow is proven and every value computed
before the first write, and should a write still fail, every touched tensor (parameters,
buffers, optimizer state) is restored before the error propagates. A refusal is a
:class:`~deadrelu.errors.RefusedError` naming the site; the model and optimizer are then
exactly as they were.

* :func:`reinit_dead` — ReDo (Sokar et al. 2023): fresh incoming weights, zero bias and
  zero outgoing weights for each dead unit, so the network computes the same function on
  the scanned data but the unit can learn again; optimizer state of exactly those
  rows/columns is reset.
* :func:`nudge_bias` — a small positive bias on each dead unit (or its BatchNorm shift).
* :func:`swap_activations` — replace ReLU modules and functional ReLU calls by another
  activation (functional calls via a torch.fx rewrite of the module that makes them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import dataflow as _graph
from .swap import ActivationChange, SwapResult, swap_activations
from .transaction import Transaction
from .verify import (
    PinnedReference,
    alive_units,
    call_model,
    check_flag,
    check_generator,
    check_input_fn,
    check_model,
    check_sites,
    describe_units,
)
from ..errors import DataError, DeadReluError, RefusedError
from ..core.capture import eager_submodule
from ..core.report import Report, SiteReport
from ..core.inputs import call_arguments, iter_batches, kept_training_flags, model_device, to_device

__all__ = [
    "reinit_dead",
    "ReinitResult",
    "UnitReset",
    "nudge_bias",
    "BiasNudge",
    "swap_activations",
    "SwapResult",
    "ActivationChange",
]

_INITS = ("he", "torch")

#: Rows per batch when ``data`` is a tensor (as :func:`deadrelu.scan`'s default).
_BATCH_SIZE = 256


@dataclass(frozen=True)
class UnitReset:
    """What :func:`reinit_dead` did at one site.

    Attributes:
        site: the report's site name.
        units: the unit indices re-initialised.
        producer: path of the layer whose rows (output features/channels) were re-drawn.
        norm: path of the BatchNorm between producer and activation whose channels were reset, or None.
        consumers: paths of the layers whose input columns/channels were zeroed.
        folded: paths of consumers whose bias absorbed a dead unit's constant (non-zero) output.
        multipliers: paths of the layers whose output multiplies the units (a gated MLP's ``up``),
            whose rows were re-drawn too.
    """

    site: str
    units: tuple[int, ...]
    producer: str
    norm: str | None
    consumers: tuple[str, ...]
    folded: tuple[str, ...] = ()
    multipliers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReinitResult:
    """The outcome of :func:`reinit_dead`.

    Attributes:
        changes: one :class:`UnitReset` per site that had units to re-initialise.
        optimizer_entries: how many optimizer state tensors had entries reset.
        silent: per site, re-initialised units that still would not fire on ``data``
            (only checked when ``data`` was given).
        skipped: per site name, why its dead units were left alone (as ``PruneResult.skipped``):
            a site scanned with a fire threshold above 0, whose "dead" units may still output up to it.
    """

    changes: tuple[UnitReset, ...]
    optimizer_entries: int = 0
    silent: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def units(self) -> int:
        """Total number of units re-initialised."""
        return sum(len(c.units) for c in self.changes)

    def __str__(self) -> str:
        if not self.changes:
            lines = ["reinit_dead: nothing to re-initialise"]
        else:
            lines = [f"reinit_dead: {self.units} unit(s) at {len(self.changes)} site(s)"]
        for c in self.changes:
            norm = "".join(f" + {p}" for p in ((c.norm,) if c.norm else ()) + c.multipliers)
            lines.append(
                f"  {c.site}: {len(c.units)} unit(s); rows of {c.producer}{norm} re-drawn, "
                f"columns of {', '.join(c.consumers)} zeroed"
            )
        lines += [f"  {name}: skipped ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class BiasNudge:
    """One site's bias change made by :func:`nudge_bias`.

    Attributes:
        site: the report's site name.
        parameter: the dotted name of the bias tensor changed.
        units: the unit indices whose bias was set.
        before: their biases before the change.
        after: their biases after the change.
    """

    site: str
    parameter: str
    units: tuple[int, ...]
    before: tuple[float, ...]
    after: tuple[float, ...]


def _units_of(dormant: bool) -> Any:
    def select(site: SiteReport) -> tuple[int, ...]:
        if dormant:
            return tuple(sorted(set(site.dormant_units) | set(site.dead_units)))
        return site.dead_units

    return select


def _threshold_skip(site: SiteReport) -> str | None:
    """Why :func:`reinit_dead` (without ``dormant``) leaves a site's dead units alone, or None.

    Scanned with a fire threshold above 0, a "dead" unit may still output up to it, so zeroing its
    outgoing weights would change the outputs; ``prune_dead`` skips such sites for the same reason.
    """
    why = _graph.threshold_reason(site) if site.dead_units else None
    return None if why is None else f"{why}; pass dormant=True to re-initialise them anyway, as ReDo does"


def _reinit_units(dormant: bool) -> Callable[[SiteReport], tuple[int, ...]]:
    """The units :func:`reinit_dead` acts on at a site: those of :func:`_units_of`, none at a skipped site."""
    select = _units_of(dormant)
    return lambda site: () if not dormant and _threshold_skip(site) else select(site)


def _skipped_sites(report: Report, sites: tuple[str, ...] | None, dormant: bool) -> dict[str, str]:
    """Per chosen site whose dead units :func:`reinit_dead` leaves alone, why."""
    if dormant:
        return {}
    chosen = [s for s in report.sites if sites is None or s.name in sites]
    return {s.name: why for s in chosen if (why := _threshold_skip(s)) is not None}


def _check_optimizer(optimizer: Any, what: str) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise DeadReluError(f"{what}: optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")


def _check_optimizer_holds(
    optimizer: torch.optim.Optimizer | None, model: nn.Module, params: Iterable[Any] | None, what: str
) -> None:
    """Refuse an optimizer that holds none of the trainable ``params`` (None: all of ``model``'s) in any param group.

    Such an optimizer is another model's (one made before a ``copy.deepcopy``, say): no state of it
    would be reset, while the one that trains these parameters keeps its stale momentum. An optimizer
    holding only some of them (a frozen backbone left out of it) is the model's own. Parameters that
    do not require grad are left out: a frozen part has no training state for any optimizer to hold.
    """
    if optimizer is None:
        return
    chosen = model.parameters() if params is None else params
    trainable = [p for p in chosen if isinstance(p, torch.Tensor) and p.requires_grad]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not trainable or any(id(p) in held for p in trainable):
        return
    if params is None:
        raise DeadReluError(
            f"{what}: the optimizer holds none of the model's parameters (was it made for another model, or before "
            "a copy.deepcopy?), so none of its state would be reset; pass the optimizer that trains this model, or "
            "optimizer=None"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    shown = [names.get(id(p), "?") for p in trainable]
    listed = ", ".join(shown[:4]) + (f", ... ({len(shown)} parameters)" if len(shown) > 4 else "")
    raise DeadReluError(
        f"{what}: the optimizer holds none of the parameters to change ({listed}), so their optimizer state "
        "(momentum, Adam moments) would be left stale; pass the optimizer that trains them, or optimizer=None; "
        "nothing was changed"
    )


def _chain_parameters(chain: _graph.Chain) -> list[Any]:
    """The parameters :func:`reinit_dead` writes at one site: producer, BatchNorm, multipliers, consumers."""
    layers = [chain.producer, *(m for _, m in chain.multipliers)] + ([chain.norm] if chain.norm is not None else [])
    params = [t for m in layers for t in (getattr(m, "weight", None), getattr(m, "bias", None))]
    # a consumer's bias changes only to absorb a constant, which is not known yet: its weight always changes
    return params + [getattr(link.module, "weight", None) for link in chain.links]


def _check_reinit_arguments(
    model: Any,
    optimizer: Any,
    dormant: Any,
    generator: Any,
    init: Any,
    input_fn: Any,
    max_draws: Any,
    sites: Any,
    what: str,
) -> tuple[nn.Module, tuple[str, ...] | None]:
    """Refuse a bad argument of :func:`reinit_dead` with one DeadReluError, before any work; return the module
    to edit and the site names. That module is the one inside a ``torch.compile`` wrapper, which torch.fx cannot
    trace; it holds the parameters the compiled code runs with."""
    check_model(model, what)
    if init not in _INITS:
        raise DeadReluError(f"{what}: init must be one of {_INITS}, got {init!r}")
    _check_optimizer(optimizer, what)
    check_flag(dormant, "dormant", what)
    check_generator(generator, what)
    if isinstance(max_draws, bool) or not hasattr(max_draws, "__index__") or max_draws < 1:
        raise DeadReluError(f"{what}: max_draws must be a whole number of at least 1, got {max_draws!r}")
    check_input_fn(input_fn, what)
    module = eager_submodule(model, "")
    _check_optimizer_holds(optimizer, module, None, what)
    return module, check_sites(sites, what)


# torch's defaults for the negative slope: F.leaky_relu / nn.LeakyReLU, nn.PReLU's initial weight, and
# F.rrelu / nn.RReLU's (lower, upper), whose eval-mode slope is their mean.
_DEFAULT_SLOPES = {"leaky_relu": 0.01, "prelu": 0.25, "rrelu": (1 / 8 + 1 / 3) / 2}


def _slope_values(value: Any, model: nn.Module) -> list[float] | None:
    """The slope(s) an activation argument holds: a number, a tensor, or the graph node of a model tensor
    (``F.prelu(h, self.weight)``); None for a value forward computes (no number before the call)."""
    if isinstance(value, torch.fx.Node):
        if value.op != "get_attr":
            return None
        try:
            value = _graph.fetch(model, str(value.target))
        except AttributeError:
            return None
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.detach().double().cpu().reshape(-1)] if value.numel() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return None


def _arg(node: torch.fx.Node, position: int, name: str) -> Any:
    """A call node's argument by keyword or position (None when not given)."""
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else None)


def _slopes(chain: _graph.Chain, model: nn.Module) -> list[float]:
    """The negative slope(s) of a leaky/parametric/randomized ReLU site, as the model computes it in eval mode.

    Read from the module (``nn.LeakyReLU.negative_slope``, ``nn.PReLU.weight``, ``nn.RReLU``'s bounds) or
    the call's arguments; a slope forward computes (``F.prelu(h, self.a.sigmoid())``) has no value before
    the call and counts as torch's default for that activation.
    """
    fn, node = chain.function, chain.node
    default = [_DEFAULT_SLOPES[fn]]
    if node.op == "call_module":
        m = model.get_submodule(str(node.target))
        if fn == "rrelu":
            return [(float(m.lower) + float(m.upper)) / 2]  # type: ignore[arg-type]
        found = _slope_values(m.weight if fn == "prelu" else getattr(m, "negative_slope", None), model)
        return found or default
    if fn == "prelu":
        return _slope_values(_arg(node, 1, "weight"), model) or default
    if fn == "rrelu":
        lower = _slope_values(_arg(node, 1, "lower"), model) or [1 / 8]
        upper = _slope_values(_arg(node, 2, "upper"), model) or [1 / 3]
        return [(lower[0] + upper[0]) / 2]
    given = _arg(node, 1, "negative_slope")
    return default if given is None else _slope_values(given, model) or default


def _gain(chain: _graph.Chain, model: nn.Module) -> float:
    """He gain for the site's activation (LeCun for SELU; ReLU's for smooth ReLU-likes).

    For a leaky ReLU of slope ``a`` it is ``sqrt(2 / (1 + a²))``; a per-channel PReLU uses the mean
    of ``a²`` over the units to re-draw, the variance its new rows share.
    """
    fn = chain.function
    if fn in _DEFAULT_SLOPES:
        slopes = _slopes(chain, model)
        if fn == "prelu" and len(slopes) > 1:
            slopes = [slopes[u] for u in chain.units if u < len(slopes)] or slopes
        mean_square = sum(a * a for a in slopes) / len(slopes)
        return math.sqrt(2.0 / (1 + mean_square))
    if fn in ("selu", "elu", "celu"):
        return 1.0
    return math.sqrt(2.0)


def _draw_rows(layer: nn.Module, units: Sequence[int], gain: float, init: str, gen: torch.Generator | None) -> torch.Tensor:
    """Fresh incoming weights for ``units`` of ``layer`` (He-normal, or PyTorch's own uniform)."""
    w = layer.weight  # type: ignore[union-attr]
    shape = (len(units),) + tuple(w.shape[1:])
    fan_in = w[0].numel()
    device = gen.device if gen is not None else torch.device("cpu")  # a generator draws on its own device
    if init == "he":
        new = torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * (gain / math.sqrt(fan_in))
    else:
        # nn.Linear / nn.ConvNd.reset_parameters: kaiming_uniform_(a=sqrt(5)) == U(±1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        new = (torch.rand(shape, generator=gen, dtype=torch.float32, device=device) * 2 - 1) * bound
    return new.to(device=w.device, dtype=w.dtype)


def _fresh_value(optimizer: Any, param: torch.Tensor, key: str) -> float:
    """The value a state entry has before the first step: 0, except Rprop's per-entry step size (lr)."""
    if key == "step_size" and isinstance(optimizer, torch.optim.Rprop):
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
    return 0.0


def _dead_output(chain: _graph.Chain, model: nn.Module) -> torch.Tensor:
    """Per unit, the activation output the unit had before: 0 for ReLU, the constant where provable."""
    value = torch.zeros(len(chain.units), dtype=torch.float64)
    if chain.function not in ("relu", "relu6"):
        units, consts = _graph.constant_units(chain, model)
        for u, c in zip(units, consts if consts is not None else []):
            value[chain.units.index(u)] = c
    return value


def _checked_first_batch(
    model: nn.Module,
    report: Report,
    chains: list[_graph.Chain],
    data: Any,
    input_fn: Callable[[Any], Any] | None,
    dormant: bool,
    what: str,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first batch's call arguments (on the model's device), once all of ``data`` shows every chosen unit quiet.

    A stale report — one whose dead (or, with ``dormant``, τ-dormant) units fire on ``data`` — is
    refused, naming them: re-initialising a unit that fires would change the outputs there.
    """
    batches = iter(iter_batches(data, _BATCH_SIZE))
    first = next(batches, None)
    if first is None:
        raise DataError(f"{what}: the data held no batches")
    if chains:
        picks = [(c.site, c.units) for c in chains]
        quiet = (lambda site: site.dormant_units) if dormant else None
        rest = itertools.chain([first], batches)  # the first batch is read once, so a one-shot iterator works
        alive = alive_units(
            model, report, picks, rest, what, input_fn=input_fn, batch_size=_BATCH_SIZE, also_quiet=quiet
        )
        if alive:
            kind = "dead or τ-dormant" if dormant else "dead"
            raise RefusedError(
                f"{what}: the report is stale for this data: units it calls {kind} are not {kind} on it "
                f"({describe_units(alive)}); re-initialising them would change the outputs there; scan this data "
                "and use that report; nothing was changed"
            )
    return call_arguments(to_device(first, model_device(model)), input_fn)


def _producer_inputs(
    model: nn.Module, producers: list[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any], what: str
) -> dict[nn.Module, torch.Tensor]:
    """Each producer's input on one batch (eval mode, no grad; the model is left as it was)."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def grab(module: nn.Module, inp: tuple[Any, ...]) -> None:
        seen.setdefault(module, inp[0].detach())

    handles = [p.register_forward_pre_hook(grab) for p in producers]
    try:
        with kept_training_flags(model), torch.no_grad():
            model.eval()
            call_model(model, args, kwargs, what)
    finally:
        for h in handles:
            h.remove()
    return seen


def _fires(chain: _graph.Chain, rows: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Per re-drawn unit, whether its new pre-activation (bias 0, reset BatchNorm) exceeds the threshold anywhere."""
    p = chain.producer
    if isinstance(p, nn.Linear):
        pre = torch.nn.functional.linear(inp, rows).reshape(-1, rows.shape[0]).T
    else:
        pre = p._conv_forward(inp, rows, None).transpose(0, 1).reshape(rows.shape[0], -1)  # type: ignore[operator]
    if chain.norm is not None:
        pre = pre / math.sqrt(1.0 + chain.norm.eps)  # type: ignore[operator]
    return (pre > chain.site.fire_threshold).any(dim=1)


def _redraw_silent(
    chain: _graph.Chain,
    rows: torch.Tensor,
    inp: torch.Tensor,
    init: str,
    gen: torch.Generator | None,
    tries: int,
    gain: float,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Re-draw the rows whose unit would not fire on ``inp``; return the rows and the units still silent."""
    with torch.no_grad():
        ok = _fires(chain, rows, inp)
        for _ in range(max(tries - 1, 0)):
            if bool(ok.all()):
                break
            bad = (~ok).nonzero().flatten()
            rows[bad] = _draw_rows(chain.producer, bad.tolist(), gain, init, gen)
            ok[bad] = _fires(chain, rows[bad], inp)
    return rows, tuple(u for u, good in zip(chain.units, ok.tolist()) if not good)


def _reset_state(optimizer: Any, param: torch.Tensor | None, index: Any, tx: Transaction) -> int:
    """Reset the entries ``param[index]`` in every optimizer state tensor shaped like ``param``."""
    if optimizer is None or param is None:
        return 0
    state = optimizer.state.get(param)
    if not state:
        return 0
    n = 0
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.ndim > 0:
            tx.save(value)
            value[index] = _fresh_value(optimizer, param, key)
            n += 1
    return n


def reinit_dead(
    model: nn.Module,
    report: Report,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    dormant: bool = False,
    generator: torch.Generator | None = None,
    init: str = "he",
    data: Any = None,
    input_fn: Callable[[Any], Any] | None = None,
    max_draws: int = 20,
    sites: Iterable[str] | None = None,
) -> ReinitResult:
    """Re-initialise dead units in place without changing what the network computes (ReDo).

    For each dead unit (or, with ``dormant=True``, each τ-dormant unit) of each site:

    * its incoming weights (a row of the producing Linear, an output channel of the
      producing Conv) are re-drawn — He-normal ``N(0, gain²/fan_in)`` with the gain of the site's
      activation (√2 for ReLU, √(2/(1+a²)) for a leaky ReLU of the model's slope a), or PyTorch's
      uniform with ``init="torch"`` — and its bias is set to 0; in a gated MLP its row of ``up`` too (gain 1);
    * a BatchNorm between producer and activation gets that channel reset to its
      initial state (weight 1, bias 0, running mean 0, running variance 1);
    * its outgoing weights (the matching input columns/channels of every consuming
      layer; all H·W columns of a channel after a flatten) are set to 0, so the output
      is unchanged. A dead unit's constant output that is not zero (a BatchNorm after
      the activation maps 0 to a constant) is first folded into the consumer's bias;
    * in ``optimizer``, every state tensor shaped like a touched parameter (``momentum_buffer``,
      ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``sum``) has exactly those rows/columns set
      to their value before the first step (0; Rprop's ``step_size``: the learning rate). Adam's
      per-tensor ``step`` is left as is (see docs/rescue.md for what that means for bias correction).

    Unless ``dormant=True``, a site scanned with a fire threshold above 0 is skipped (``result.skipped``,
    as in :func:`~deadrelu.prune_dead`): its "dead" units may output up to it, so outputs would change.

    A unit fed by non-negative inputs (the output of an earlier ReLU layer) whose new
    weights point away from the inputs' mean stays silent: without data, about half of
    such units do. With ``data``, the first batch is run once (eval mode, no grad) to
    record each producer's input, and a unit whose new weights would not fire on it is
    re-drawn, up to ``max_draws`` times; ``result.silent`` lists any that still would not.
    Before that, all of ``data`` is scanned with the report's own thresholds and levels:
    a unit to re-initialise that is not dead there (with ``dormant=True``: not dead or
    τ-dormant) shows the report is stale for this data, and the call is refused, naming it.

    The function is exactly preserved for ReLU units that were dead on the scanned data
    (their output there was 0), and for units of any activation whose incoming weights
    were all zero (their constant output is folded into the consumer's bias). τ-dormant
    units that still fired, and other dead units of non-ReLU activations, lose the
    small contribution they made.

    Args:
        model: the scanned model; changed in place.
        report: a :class:`~deadrelu.Report` of ``model``.
        optimizer: its optimizer, whose per-entry state is reset for the touched entries (one holding none is refused).
        dormant: also re-initialise τ-dormant units (``site.dormant_units``).
        generator: random generator for the new weights (reproducibility).
        init: ``"he"`` (default) or ``"torch"`` (PyTorch's Linear/Conv default).
        data: optional data (as for :func:`deadrelu.scan`) on which the chosen units must be
            quiet and, on its first batch, re-drawn units must fire.
        input_fn: ``batch -> model input``, as for :func:`deadrelu.scan`.
        max_draws: how many times a unit is drawn at most when ``data`` is given (a whole number >= 1).
        sites: only these sites (by report name); default all.

    Returns:
        A :class:`ReinitResult` listing, per site, the units and layers changed.

    Raises:
        RefusedError: when a site's producer/consumer dataflow cannot be proven (residual
            add, shared weights, unsupported layer, untraceable model), when the rewrite would
            change the outputs on held-out inputs, when the report is stale for ``data``, or when a
            write fails (an inference-mode tensor; rolled back, the cause named); nothing is changed.
        ForwardError: the model raises on ``data`` (e.g. the wrong number of features).
        DataError: ``data`` is unusable.
        DeadReluError: for a bad argument (``max_draws=0``, ``generator=3``, an optimizer holding none of the
            trainable parameters to change, ...), before any change.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> report = deadrelu.scan(net, torch.randn(64, 4))
        >>> result = deadrelu.reinit_dead(net, report)
        >>> result.units >= 0
        True
    """
    what = "reinit_dead"
    model, sites = _check_reinit_arguments(model, optimizer, dormant, generator, init, input_fn, max_draws, sites, what)
    chains = _chains_to_reinit(model, report, optimizer, dormant, sites, data is not None, what)
    # Plan every value first; a refusal here leaves everything untouched.
    batch = _checked_first_batch(model, report, chains, data, input_fn, dormant, what) if data is not None else None
    plans, reference = _plan_all(model, chains, batch, init, generator, max_draws, what)
    with Transaction(what) as tx:
        entries = _write_unit_resets(plans, optimizer, tx)
        if reference is not None:
            _check_reference(reference, model, plans)
    return ReinitResult(
        changes=tuple(p.change() for p in plans),
        optimizer_entries=entries,
        silent={p.chain.site.name: p.silent for p in plans if p.silent},
        skipped=_skipped_sites(report, sites, dormant),
    )


def _chains_to_reinit(
    model: nn.Module,
    report: Report,
    optimizer: torch.optim.Optimizer | None,
    dormant: bool,
    sites: tuple[str, ...] | None,
    checked_on_data: bool,
    what: str,
) -> list[_graph.Chain]:
    """The proven chains :func:`reinit_dead` edits, once ``optimizer`` is seen to hold some of their parameters."""
    # With data, the real model (global module hooks included) is checked against the pinned trace later.
    chains = _graph.find_chains(model, report, _reinit_units(dormant), what, sites=sites, checked_on_data=checked_on_data)
    _check_optimizer_holds(optimizer, model, [p for c in chains for p in _chain_parameters(c)], what)
    return chains


def _check_reference(reference: PinnedReference, model: nn.Module, plans: list["_UnitResetPlan"]) -> None:
    """``reference.check(model)``; a refusal names a BatchNorm without running statistics that explains it."""
    try:
        reference.check(model)
    except RefusedError as err:
        note = _graph.batch_statistics_note([(p.chain, p.value) for p in plans])
        if note is None:
            raise
        raise RefusedError(f"{str(err).removesuffix('; nothing was changed')}; {note}; nothing was changed") from err


@dataclass
class _UnitResetPlan:
    """Everything :func:`reinit_dead` will write at one site, computed before the first write."""

    chain: _graph.Chain
    rows: torch.Tensor  # the producer's new incoming weights of the chain's units
    folds: list[torch.Tensor | None]  # per consumer link, the bias change (None: no constant to fold)
    value: torch.Tensor  # per unit, the output it had when dead (what the consumers saw)
    silent: tuple[int, ...] = ()  # re-drawn units that still would not fire on the data
    multiplier_rows: list[torch.Tensor] = field(default_factory=list)  # per chain multiplier, its new rows

    def change(self) -> UnitReset:
        c = self.chain
        return UnitReset(
            site=c.site.name,
            units=c.units,
            producer=c.producer_path,
            norm=c.norm_path,
            consumers=tuple(link.path for link in c.links),
            folded=tuple(link.path for link, d in zip(c.links, self.folds) if d is not None),
            multipliers=tuple(path for path, _ in c.multipliers),
        )


def _plan_all(
    model: nn.Module,
    chains: list[_graph.Chain],
    batch: tuple[tuple[Any, ...], dict[str, Any]] | None,
    init: str,
    generator: torch.Generator | None,
    max_draws: int,
    what: str,
) -> tuple[list[_UnitResetPlan], PinnedReference | None]:
    """Every site's plan and, with a batch, the pinned reference the edited model must match."""
    inputs = _producer_inputs(model, [c.producer for c in chains], *batch, what) if batch is not None else {}
    plans = [_plan_unit_reset(model, chain, inputs, init, generator, max_draws, what) for chain in chains]
    reference = None
    if batch is not None and plans:
        pins = [(p.chain.site, p.chain.units, p.value) for p in plans]
        reference = PinnedReference.build(model, pins, *batch, what)
    return plans, reference


def _plan_unit_reset(
    model: nn.Module,
    chain: _graph.Chain,
    inputs: dict[nn.Module, torch.Tensor],
    init: str,
    generator: torch.Generator | None,
    max_draws: int,
    what: str,
) -> _UnitResetPlan:
    """Draw the new rows (re-drawing silent ones on ``inputs``) and the consumers' bias folds for one site."""
    gain = _gain(chain, model)
    rows = _draw_rows(chain.producer, chain.units, gain, init, generator)
    quiet: tuple[int, ...] = ()
    if chain.producer in inputs:
        rows, quiet = _redraw_silent(chain, rows, inputs[chain.producer], init, generator, max_draws, gain)
    folds: list[torch.Tensor | None] = []
    value = _dead_output(chain, model)
    if chain.multipliers and bool(torch.any(value != 0)):
        raise RefusedError(
            f"{what}: site '{chain.site.name}': its dead units output a non-zero constant that "
            f"'{chain.multipliers[0][0]}' multiplies, which is no constant to fold; nothing was changed"
        )
    # The up row must be fresh too: one left at 0 (weight decay while the unit was dead) keeps the product 0,
    # so no gradient would reach the zeroed down column, nor, through it, the gate and up rows. Gain 1: up is linear.
    ups = [_draw_rows(layer, chain.units, 1.0, init, generator) for _, layer in chain.multipliers]
    for link in chain.links:
        consts = _graph.constant_after(link, chain.units, value)
        delta = _graph.fold_into_bias(link, chain.units, consts, chain.site, what)
        if delta is not None and link.module.bias is None:  # type: ignore[union-attr]
            raise RefusedError(
                f"{what}: site '{chain.site.name}': '{link.path}' has no bias to absorb the dead units' "
                "constant output; nothing was changed"
            )
        folds.append(delta)
    return _UnitResetPlan(chain, rows, folds, value, quiet, ups)


def _write_unit_resets(plans: list[_UnitResetPlan], optimizer: Any, tx: Transaction) -> int:
    """Write every plan (saving each tensor in ``tx`` first); return the optimizer entries reset."""
    entries = 0
    with torch.no_grad():
        for plan in plans:
            for link, delta in zip(plan.chain.links, plan.folds):
                if delta is not None:
                    bias = link.module.bias  # type: ignore[union-attr]
                    tx.save(bias)
                    bias.add_(delta.to(bias.dtype))
        # Rows after folds (a re-drawn unit's bias is 0, not a fold), columns last so that a
        # layer that is both a consumer and a producer ends with zeros in the columns.
        for plan in plans:
            entries += _write_rows(plan, optimizer, tx)
        for plan in plans:
            for link in plan.chain.links:
                cols = _graph.columns(link, plan.chain.units)
                w = link.module.weight  # type: ignore[union-attr]
                tx.save(w)
                w[:, cols] = 0
                entries += _reset_state(optimizer, w, (slice(None), cols), tx)  # type: ignore[arg-type]
    return entries


def _write_rows(plan: _UnitResetPlan, optimizer: Any, tx: Transaction) -> int:
    """New producer (and multiplier) rows, zero bias and a fresh BatchNorm channel for one site's units."""
    chain, idx = plan.chain, list(plan.chain.units)
    entries = _write_fresh_rows(chain.producer, idx, plan.rows, optimizer, tx)
    for (_, layer), rows in zip(chain.multipliers, plan.multiplier_rows):
        entries += _write_fresh_rows(layer, idx, rows, optimizer, tx)
    bn = chain.norm
    if bn is not None:
        for t, v in ((bn.weight, 1.0), (bn.bias, 0.0), (bn.running_mean, 0.0), (bn.running_var, 1.0)):
            if t is not None:
                tx.save(t)  # type: ignore[arg-type]
                t[idx] = v  # type: ignore[index]
        entries += _reset_state(optimizer, bn.weight, idx, tx)  # type: ignore[arg-type]
        entries += _reset_state(optimizer, bn.bias, idx, tx)  # type: ignore[arg-type]
    return entries


def _write_fresh_rows(layer: nn.Module, idx: list[int], rows: torch.Tensor, optimizer: Any, tx: Transaction) -> int:
    """New rows ``idx`` of ``layer``'s weight, zero bias there, and those entries' optimizer state reset."""
    tx.save(layer.weight)  # type: ignore[arg-type]
    tx.save(layer.bias)  # type: ignore[arg-type]
    layer.weight[idx] = rows  # type: ignore[index, union-attr]
    entries = _reset_state(optimizer, layer.weight, idx, tx)  # type: ignore[arg-type]
    if layer.bias is not None:  # type: ignore[union-attr]
        layer.bias[idx] = 0  # type: ignore[index, union-attr]
        entries += _reset_state(optimizer, layer.bias, idx, tx)  # type: ignore[arg-type]
    return entries


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def nudge_bias(
    model: nn.Module,
    report: Report,
    value: float = 0.01,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    dormant: bool = False,
    sites: Iterable[str] | None = None,
) -> list[BiasNudge]:
    """Set the bias of each dead unit to a small positive ``value``, in place.

    The bias that decides whether the unit fires is changed: the producing layer's
    bias, or — when a BatchNorm sits between the layer and the activation, which
    cancels the layer's bias — that BatchNorm channel's shift (``bias``). Only the
    producer side of the dataflow is needed, so consumers are not checked. Unlike
    :func:`reinit_dead`, this changes what the network computes wherever a nudged unit
    now fires. Optimizer state of the changed bias entries is reset (zeroed).

    Args:
        model: the scanned model; changed in place.
        report: a :class:`~deadrelu.Report` of ``model``.
        value: the new bias (a small positive number, the usual "seed" advice).
        optimizer: optional optimizer whose state for the changed entries is reset; one that holds
            none of the (trainable) biases to change is refused.
        dormant: also nudge τ-dormant units.
        sites: only these sites (by report name); default all.

    Returns:
        One :class:`BiasNudge` per site changed, with the biases before and after.

    Raises:
        RefusedError: the producer cannot be proven, or has no bias; nothing is changed.
        DeadReluError: for a bad argument (a ``value`` that is not a finite number, a bad
            model, optimizer, ``dormant`` or ``sites``), before any work; for an optimizer that
            holds none of the trainable biases to change, before any change.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> changes = deadrelu.nudge_bias(net, deadrelu.scan(net, torch.randn(64, 4)), value=0.01)
        >>> all(v == 0.01 for c in changes for v in c.after) or not changes
        True
    """
    what = "nudge_bias"
    check_model(model, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        # An int fails here only when too large for a float: named, not printed (past 4300 digits repr raises).
        huge = isinstance(value, int) and not isinstance(value, bool)
        shown = "an int too large for a float" if huge else repr(value)
        raise DeadReluError(f"{what}: value must be a finite number, got {shown:.80}")
    _check_optimizer(optimizer, what)
    check_flag(dormant, "dormant", what)
    sites = check_sites(sites, what)
    model = eager_submodule(model, "")  # through torch.compile's wrapper: the same parameters
    _check_optimizer_holds(optimizer, model, None, what)
    chains = _graph.find_chains(model, report, _units_of(dormant), what, consumers=False, sites=sites)
    targets = []
    for chain in chains:
        if chain.norm is not None:
            owner, path = chain.norm, chain.norm_path
        else:
            owner, path = chain.producer, chain.producer_path
        if getattr(owner, "bias", None) is None:
            raise RefusedError(f"{what}: site '{chain.site.name}': '{path}' has no bias to nudge; nothing was changed")
        targets.append((chain, owner.bias, f"{path}.bias" if path else "bias"))
    _check_optimizer_holds(optimizer, model, [bias for _, bias, _ in targets], what)
    out = []
    with Transaction(what) as tx, torch.no_grad():
        for chain, bias, name in targets:
            idx = list(chain.units)
            tx.save(bias)
            before = tuple(float(v) for v in bias[idx])
            bias[idx] = float(value)
            _reset_state(optimizer, bias, idx, tx)
            out.append(BiasNudge(chain.site.name, name, chain.units, before, tuple(float(v) for v in bias[idx])))
    return out
