"""Check a function-preserving rewrite on held-out random inputs before it is committed.

The data a report was made on shows that a unit was dead *there*; a rewrite that is proven
from the traced dataflow claims more: the rewritten model computes exactly what the
original computes with the touched units *pinned* to the value they had when dead (0 for a
dead ReLU unit, the constant of a unit with all-zero incoming weights) — on every input.
:class:`PinnedReference` checks that claim on inputs the report never saw:

1. held-out inputs are drawn like the real batch (same structure, shapes and dtypes; float
   tensors with its mean and spread, integer tensors within its range, booleans kept) from a
   seeded generator of their own, so the global RNG is not touched;
2. the model is traced in eval mode, and the trace must reproduce the real model's outputs
   on them (it would not if forward did something the trace cannot see);
3. the traced graph with the units pinned (a ``torch.where`` after each activation) gives
   the reference outputs, computed before anything is edited;
4. after the edit, the rewritten model must match the reference within a tolerance scaled
   to the outputs' dtype and magnitude — or the rewrite is rolled back and refused.

A rewrite that reaches outside the proven chain (a weight also read elsewhere, a hook, a
parametrization the structural checks missed) changes these outputs and is caught here.

The pinned reference proves the rewrite equals the original *with the units pinned*; that
equals the original itself only where the units really are dead. :func:`alive_units` checks
that on the caller's data with a fresh scan at the report's own threshold, unit axis and
levels, so a stale report (made before more training, or on other data) is refused with the
units named. :func:`call_model` and the argument checks give the one clear error the rest of
the package gives for a model that raises on the data and for a bad argument.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from . import dataflow
from ..core.inputs import (
    describe_shapes, error_summary, iter_tensors, kept_training_flags, map_tensors, refuse_meta_weights,
)
from ..core.report import Report, SiteReport
from ..core.scan import scan
from ..errors import DataError, DeadReluError, ForwardError, NoActivationSitesError, RefusedError

__all__ = [
    "PinnedReference",
    "held_out_like",
    "output_tensors",
    "max_difference",
    "HELD_OUT_SEED",
    "call_model",
    "alive_units",
    "describe_units",
    "check_model",
    "check_flag",
    "check_input_fn",
    "check_sites",
    "rounding_limit",
]

#: Seed of the generator that draws held-out inputs (fixed, so a refusal is reproducible).
HELD_OUT_SEED = 20240601


def held_out_like(obj: Any, generator: torch.Generator) -> Any:
    """Random inputs with the structure, shapes and dtypes of ``obj`` (a tensor or nested batch).

    Floating tensors get Gaussian values with the original's mean and standard deviation,
    integer tensors uniform values within its range; booleans (masks) and non-tensors are kept.

    Example:
        >>> x = torch.arange(6.0).reshape(2, 3)
        >>> y = held_out_like(x, torch.Generator().manual_seed(0))
        >>> y.shape, y.dtype, torch.equal(x, y)
        (torch.Size([2, 3]), torch.float32, False)
    """
    return map_tensors(obj, lambda t: _held_out_tensor(t, generator))


def _held_out_tensor(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random tensor like ``t`` (see :func:`held_out_like`)."""
    if t.dtype == torch.bool or t.numel() == 0 or t.is_complex():
        return t
    if t.is_floating_point():
        ref = t.detach().double()
        mean = float(ref.mean())
        std = float(ref.std()) if t.numel() > 1 else 1.0
        std = std if std > 0 and std == std else 1.0
        mean = mean if mean == mean else 0.0
        new = torch.randn(tuple(t.shape), generator=generator, dtype=torch.float64) * std + mean
        return new.to(device=t.device, dtype=t.dtype)
    lo, hi = int(t.min()), int(t.max())
    new = torch.randint(lo, hi + 1, tuple(t.shape), generator=generator, dtype=torch.int64)
    return new.to(device=t.device, dtype=t.dtype)


def output_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in order."""
    return list(iter_tensors(obj))


def max_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between two output lists (NaN where both are NaN counts as equal).

    Returns ``inf`` when the structures or shapes differ.

    Example:
        >>> max_difference([torch.tensor([1.0, float("nan")])], [torch.tensor([1.5, float("nan")])])
        0.5
    """
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if not x.numel():
            continue
        if not (x.is_floating_point() or x.is_complex()):
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x64, y64 = x.detach().double(), y.detach().double()
        both_nan = torch.isnan(x64) & torch.isnan(y64)
        same = (x64 == y64) | both_nan  # equal infinities too
        diff = (x64 - y64).abs().masked_fill(same, 0.0)
        worst = max(worst, float(diff.nan_to_num(nan=float("inf")).max()))
    return worst


def _dtype_tolerance(outputs: Sequence[torch.Tensor]) -> float:
    """Relative tolerance for rounding differences in the outputs' least precise float dtype."""
    rel = 1e-9
    for t in outputs:
        if t.dtype in (torch.float16, torch.bfloat16):
            rel = max(rel, 5e-2 if t.dtype == torch.bfloat16 else 1e-2)
        elif t.dtype == torch.float32 or t.dtype == torch.complex64:
            rel = max(rel, 1e-5)
    return rel


def rounding_limit(outputs: Sequence[torch.Tensor]) -> float:
    """The output difference rounding alone may explain: a relative tolerance for the outputs' least
    precise float dtype (1e-5 in float32, 1e-2 in float16, 5e-2 in bfloat16) times ``max(1, max |output|)``.

    Example:
        >>> rounding_limit([torch.full((2,), 4.0)]), rounding_limit([torch.ones(2, dtype=torch.float16)])
        (4e-05, 0.01)
    """
    return _dtype_tolerance(outputs) * _scale(outputs)


def _scale(outputs: Sequence[torch.Tensor]) -> float:
    finite = [t.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0) for t in outputs if t.numel() and t.is_floating_point()]
    return max([1.0] + [float(t.max()) for t in finite])


class _Pin(nn.Module):
    """Replaces the chosen units of an activation output by fixed values (the units' dead output)."""

    def __init__(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("values", values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.values.to(device=x.device, dtype=x.dtype), x)


class PinnedReference:
    """The original model's outputs on held-out inputs with chosen units pinned to their dead value.

    Build it before editing (:meth:`build`), then :meth:`check` the edited model.

    Args:
        what: the operation's name, for messages.
        args: held-out positional inputs.
        kwargs: held-out keyword inputs.
        outputs: the reference outputs.
    """

    def __init__(
        self, what: str, args: tuple[Any, ...], kwargs: dict[str, Any], outputs: list[torch.Tensor], rounding: float | None = None
    ) -> None:
        self.what = what
        self.args = args
        self.kwargs = kwargs
        self.outputs = outputs
        # What rounding may explain: that of the model's own outputs where they are coarser than the
        # reference's (a forward under torch.autocast computes in bfloat16; its fx trace drops the context)
        self.rounding = _dtype_tolerance(outputs) if rounding is None else max(rounding, _dtype_tolerance(outputs))

    @classmethod
    def build(
        cls,
        model: nn.Module,
        pins: Sequence[tuple[SiteReport, Sequence[int], torch.Tensor | float]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        what: str,
    ) -> "PinnedReference | None":
        """Trace ``model``, check the trace, and compute the pinned outputs on held-out inputs like ``args``.

        Args:
            model: the model before the edit.
            pins: per site, the units to pin and their values (a scalar or one per unit).
            args: a real batch's positional inputs (only their shapes, dtypes and ranges are used).
            kwargs: its keyword inputs.
            what: the operation's name.

        Returns:
            The reference, or None when the original model itself cannot run on random inputs
            like these (then there is nothing to check against).

        Raises:
            RefusedError: the traced graph does not reproduce the model's outputs.
        """
        gen = torch.Generator().manual_seed(HELD_OUT_SEED)
        h_args, h_kwargs = held_out_like(tuple(args), gen), held_out_like(dict(kwargs), gen)
        with kept_training_flags(model), torch.no_grad():
            model.eval()
            try:
                real = output_tensors(model(*h_args, **h_kwargs))
            except Exception:  # random inputs are not valid for this model: nothing to compare on
                return None
            gm = dataflow.trace(model, what)
            gm.eval()
            try:
                traced = output_tensors(gm(*h_args, **h_kwargs))
            except Exception as err:
                raise RefusedError(
                    f"{what}: the traced graph of {type(model).__name__} fails on held-out inputs ({type(err).__name__}: "
                    f"{error_summary(err)}), so its dataflow is not proven; nothing was changed"
                ) from err
            diff = max_difference(real, traced)
            if not diff <= _dtype_tolerance(real) * _scale(real):
                raise RefusedError(
                    f"{what}: the traced graph of {type(model).__name__} does not reproduce its outputs on held-out "
                    f"inputs (they differ by {diff:.3g}): forward does something torch.fx cannot see; nothing was changed"
                )
            _insert_pins(gm, pins, what)
            outputs = [t.detach().clone() for t in output_tensors(gm(*h_args, **h_kwargs))]
        return cls(what, h_args, h_kwargs, outputs, _dtype_tolerance(real))

    def difference(self, edited: nn.Module) -> float:
        """Largest absolute difference between ``edited``'s outputs and the reference (eval mode, no grad)."""
        with kept_training_flags(edited), torch.no_grad():
            edited.eval()
            return max_difference(self.outputs, output_tensors(edited(*self.args, **self.kwargs)))

    def check(self, edited: nn.Module, tolerance: float = 0.0) -> float:
        """Refuse unless ``edited`` matches the reference on the held-out inputs.

        The accepted difference is ``max(tolerance, dtype rounding) × max(1, |reference|)``.

        Returns:
            The measured difference.

        Raises:
            RefusedError: the outputs differ by more (the caller rolls its edit back).
        """
        diff = self.difference(edited)
        limit = max(tolerance, self.rounding) * _scale(self.outputs)
        if not diff <= limit:
            raise RefusedError(
                f"{self.what}: on held-out random inputs the rewritten model differs from the original with the "
                f"units pinned to their dead value by {diff:.3g} (accepted {limit:.3g}), so the rewrite would change "
                "what the network computes beyond the dead units; nothing was changed"
            )
        return diff


def _insert_pins(
    gm: fx.GraphModule, pins: Sequence[tuple[SiteReport, Sequence[int], torch.Tensor | float]], what: str
) -> None:
    """Put a :class:`_Pin` after each pinned site's activation node in ``gm``."""
    nodes = dataflow.site_nodes(gm)
    device = next((t.device for t in list(gm.parameters()) + list(gm.buffers())), torch.device("cpu"))
    for k, (site, units, values) in enumerate(pins):
        units = list(units)
        if not units:
            continue
        found = nodes.get((site.module, site.call, site.slot))
        if found is None:
            raise RefusedError(f"{what}: site '{site.name}': not found in the eval-mode trace; nothing was changed")
        node = found[0]
        shape = [1] * max(len(site.shape), 1)
        dim = site.unit_dim if len(site.shape) else 0
        shape[dim] = site.units
        idx = torch.tensor(units, dtype=torch.long)
        mask = torch.zeros(site.units, dtype=torch.bool)
        mask[idx] = True
        full = torch.zeros(site.units, dtype=torch.float64)
        full[idx] = torch.as_tensor(values, dtype=torch.float64).expand(len(units))
        name = f"deadrelu_pin_{k}"
        gm.add_submodule(name, _Pin(mask.view(shape).to(device), full.view(shape).to(device)))
        with gm.graph.inserting_after(node):
            pin = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(pin, delete_user_cb=lambda user: user is not pin)
    gm.graph.lint()
    gm.recompile()


def call_model(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> Any:
    """``model(*args, **kwargs)`` on the caller's data; the model raising becomes one ForwardError.

    The message has the form a scan gives (the original error's type and first line, the input
    shapes), so wrong-width data reads the same whichever function was given it.

    Raises:
        ForwardError: the model raised (the original error is its ``__cause__``).

    Example:
        >>> try:
        ...     call_model(torch.nn.Linear(6, 2), (torch.zeros(8, 5),), {}, "example")
        ... except ForwardError as err:
        ...     print(err)
        example: the model raised RuntimeError: ... — input (8, 5); nothing was changed
    """
    try:
        return model(*args, **kwargs)
    except DeadReluError:
        raise
    except Exception as err:  # the model rejected the data: say so once, with what it was given
        raise ForwardError(
            f"{what}: the model raised {type(err).__name__}: {error_summary(err)} "
            f"— input {describe_shapes(args, kwargs)}; nothing was changed"
        ) from err


def _site_key(site: Any) -> tuple[str, int, int]:
    """A site's identity across scans (module path, call, slot), as the traced graph names it."""
    return (site.module, site.call, site.slot)


def alive_units(
    model: nn.Module,
    report: Report,
    picks: Sequence[tuple[SiteReport, Sequence[int]]],
    data: Any,
    what: str,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    batch_size: int = 256,
    also_quiet: Callable[[SiteReport], Iterable[int]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Per site, the picked units that are not dead on ``data`` by the report's own levels.

    ``data`` is scanned (eval mode; the model is left bit-identical) with each site's threshold
    and unit axis from ``report`` and its levels. A picked unit counts as quiet when the new scan
    finds it dead or unobserved (it never fired there), or is among ``also_quiet(site)`` of the
    new scan's site (e.g. its τ-dormant units); every other picked unit is returned. A site the
    data never reaches has no units that fired.

    Args:
        model: the model the report was made from.
        report: its report.
        picks: per site of ``report``, the unit indices an operation will act on.
        data: the caller's data (as for :func:`deadrelu.scan`).
        what: the operation's name, for messages.
        input_fn: ``batch -> model input``, as for :func:`deadrelu.scan`.
        batch_size: rows per batch when ``data`` is a tensor.
        also_quiet: more units, per site of the new scan, that count as quiet.

    Returns:
        ``{site name: units}`` for the sites with picked units that fired on ``data``.

    Raises:
        ForwardError: the model raised on the data; nothing was changed.
        DataError: the data is unusable.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> x = torch.randn(64, 4)
        >>> report = scan(net, x[:1])
        >>> alive = alive_units(net, report, [(report.sites[0], range(8))], x, "example")
        >>> set(alive["1"]) == set(range(8)) - set(scan(net, x).sites[0].dead_units)
        True
    """
    thresholds = {_site_key(s): s.fire_threshold for s in report.sites}
    dims = {_site_key(s): s.unit_dim for s in report.sites}
    levels = report.levels
    try:
        fresh = scan(
            model,
            data,
            input_fn=input_fn,
            batch_size=batch_size,
            threshold=lambda info: thresholds.get(_site_key(info)),
            unit_dim=lambda info: dims.get(_site_key(info)),
            asleep_rate=levels.asleep_rate,
            dormant_tau=levels.dormant_tau,
            min_observations=levels.min_observations,
        )
    except NoActivationSitesError:
        return {}  # no activation ran on this data, so none of the picked units fired
    except (ForwardError, DataError) as err:
        raise type(err)(f"{what}: {err}; nothing was changed") from err
    now = {_site_key(s): s for s in fresh.sites}
    out: dict[str, tuple[int, ...]] = {}
    for site, units in picks:
        seen = now.get(_site_key(site))
        if seen is None:
            continue
        quiet = set(seen.dead_units) | set(seen.unobserved_units) | set(also_quiet(seen) if also_quiet else ())
        fired = tuple(u for u in units if u not in quiet)
        if fired:
            out[site.name] = fired
    return out


def describe_units(units: dict[str, Sequence[int]]) -> str:
    """``site '1': units [2, 5]; site '3': units [0]`` for messages.

    Example:
        >>> describe_units({"1": (2, 5), "3": (0,)})
        "site '1': units [2, 5]; site '3': units [0]"
    """
    return "; ".join(f"site '{name}': units {list(u)}" for name, u in units.items())


def check_model(model: Any, what: str) -> None:
    """Refuse anything but an ``nn.Module`` as the model, or one with a tensor on the meta device, before any work.

    A meta tensor has no values: nothing to re-draw, fold, nudge or compare (its first read raised
    torch's "Tensor.item() cannot be called on meta tensors" from deep inside the rewrite).

    Raises:
        DeadReluError: naming its type, or the first meta tensor.
    """
    if not isinstance(model, nn.Module):
        raise DeadReluError(f"{what}: model must be a torch.nn.Module, not {type(model).__name__}")
    refuse_meta_weights(model, what)


def check_flag(value: Any, name: str, what: str) -> None:
    """Refuse a flag that is not ``True`` or ``False`` (a string like ``"no"`` would count as true).

    Raises:
        DeadReluError: naming the argument and the value.
    """
    if not isinstance(value, bool):
        raise DeadReluError(f"{what}: {name} must be True or False, got {value!r}")


def check_generator(generator: Any, what: str) -> None:
    """Refuse a ``generator`` that is neither None nor a ``torch.Generator``, before any work.

    Raises:
        DeadReluError: naming what it got.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise DeadReluError(
            f"{what}: generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, "
            f"got {type(generator).__name__}"
        )


def check_input_fn(input_fn: Any, what: str) -> None:
    """Refuse an ``input_fn`` that is neither None nor callable, before any work.

    Raises:
        DeadReluError: naming the argument and what it got.
    """
    if input_fn is not None and not callable(input_fn):
        raise DeadReluError(
            f"{what}: input_fn must be a callable (batch -> model input) or None, got {type(input_fn).__name__}"
        )


def check_sites(sites: Any, what: str) -> tuple[str, ...] | None:
    """``sites`` as a tuple of names (read once, so a generator works), or one DeadReluError.

    Example:
        >>> check_sites("1", "example"), check_sites((n for n in ["1", "3"]), "example"), check_sites(None, "example")
        (('1',), ('1', '3'), None)
    """
    if sites is None:
        return None
    if isinstance(sites, str):
        return (sites,)
    names = tuple(sites) if isinstance(sites, Iterable) and not isinstance(sites, bytes) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise DeadReluError(
            f"{what}: sites must be a site name or an iterable of site names (str), got {sites!r}"
        )
    return names
