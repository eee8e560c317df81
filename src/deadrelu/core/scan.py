"""``scan(model, data)`` and ``Probe(model)``: run data through a model and report every unit.

How a batch becomes model input (unless you pass ``input_fn``):

* a tensor is the input: ``model(batch)``;
* a tuple or list is ``(inputs, targets, ...)``: ``model(batch[0])``;
* a mapping is keyword arguments minus label keys (``labels``, ``label``, ``target``,
  ``targets``, ``y``): ``model(**inputs)`` — Hugging Face style batches work as is.

``input_fn(batch)`` may return a tensor (one positional argument), a tuple (positional
arguments) or a dict (keyword arguments).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import sys
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .inputs import (
    ProgressBar,
    call_arguments,
    call_samples,
    describe_shapes,
    error_summary,
    first_tensor,
    iter_batches,
    iter_tensors,
    model_device,
    preserved_mode,
    refuse_meta_weights,
    checked_mask_option,
    resolve_mask,
    to_device,
    whole_batch_size,
    whole_number,
)
from .capture import ActivationCapture, ThresholdSpec, UnitDimSpec, checked_unit_dim, is_compiled_wrapper
from .site_options import unmatched_keys
from ..errors import DataError, DeadReluError, ForwardError, NoActivationSitesError
from .report import Report, SiteReport, Levels, model_fingerprint
from .stats import UnitStats, UnitTotals

__all__ = ["scan", "Probe", "report_from_capture"]


def site_report(name: str, site: Any, totals: UnitTotals, levels: Levels) -> SiteReport:
    """One site's :class:`SiteReport` from its capture record (``info``, ``unit_dim``,
    ``stats.threshold``) and its per-unit totals; shared by scans and the monitor."""
    info = site.info
    return SiteReport(
        name=name,
        module=info.module,
        module_type=info.module_type,
        function=info.function,
        call=info.call,
        slot=info.slot,
        unit_dim=site.unit_dim,
        shape=info.shape,
        fire_threshold=site.stats.threshold,
        observations=totals.observations,
        fired_counts=totals.fired_counts,
        mean_abs=totals.mean_abs,
        nonfinite_counts=totals.nonfinite_counts,
        levels=levels,
        unit_axis_source=getattr(info, "unit_axis_source", ""),
    )


def report_from_capture(
    capture: ActivationCapture,
    levels: Levels,
    *,
    batches: int,
    samples: int,
    mode: str,
) -> Report:
    """Turn a capture's accumulators into a frozen :class:`Report` (one host sync per site).

    Raises:
        NoActivationSitesError: when no activation was seen.
    """
    model = _eager_module(capture.model)  # a Probe's compiled model is reported as the model inside
    if not capture.sites:
        raise NoActivationSitesError(
            f"no activation sites found in {type(model).__name__}: deadrelu looks for ReLU-family, "
            "GELU, SiLU, Mish, Hardswish and Softplus activations (modules or functional calls) and the "
            "well-known hand-written activation classes in forward"
            + (
                f"; these modules look like activations but are not known: {', '.join(f'{p} ({c})' for p, c in capture.uncaptured.items())}"
                " — register them with deadrelu.register_activation(cls)"
                if capture.uncaptured
                else ""
            )
        )
    _warn_unmatched_keys(capture)
    sites = [site_report(name, site, _totals(site.stats), levels) for name, site in capture.ordered_sites()]
    return Report(
        sites=tuple(sites),
        levels=levels,
        batches=batches,
        samples=samples,
        mode=mode,
        model=type(model).__name__,
        fingerprint=model_fingerprint(model),
        uncaptured=tuple(f"{path} ({cls})" for path, cls in capture.uncaptured.items()),
    )


def _warn_unmatched_keys(capture: ActivationCapture) -> None:
    """A ``threshold=`` / ``unit_dim=`` mapping key that names no site was never used: said once
    per capture, with the names the sites do have, since a typo would otherwise pass silently."""
    said = getattr(capture, "_warned_keys", set())
    infos = [site.info for site in capture.sites.values()]
    for option, spec in (("threshold", capture.threshold_spec), ("unit_dim", capture.unit_dim_spec)):
        unused = [key for key in unmatched_keys(spec, infos) if (option, key) not in said]
        if not unused:
            continue
        said.update((option, key) for key in unused)
        names = ", ".join(repr(name) for name, _ in list(capture.ordered_sites())[:6])
        warnings.warn(
            f"deadrelu: {option}= key(s) {', '.join(repr(k) for k in unused)} name no activation site of this model, "
            f"so they were not used; keys are site names, module paths, 'path:function' or function names "
            f"(the sites: {names}{', ...' if len(infos) > 6 else ''})",
            stacklevel=4,
        )
    capture._warned_keys = said


def _totals(stats: Any) -> Any:
    """A site's totals; a site that saw only empty tensors is reported with its units unobserved
    rather than failing the whole report (a user's accumulator keeps its own ``compute()``)."""
    return stats.compute(allow_empty=True) if isinstance(stats, UnitStats) else stats.compute()


class Probe:
    """Collect per-unit statistics from forward passes you run yourself.

    The probe does not change the model's mode or grad mode: it only observes. Hooks
    are removed on exit, also when the block raises.

    Args:
        model: the model to observe.
        unit_dim: unit-axis override (see :mod:`deadrelu.core.capture`).
        threshold: firing threshold (float, mapping or callable).
        asleep_rate: firing rate at or below which a unit is asleep.
        dormant_tau: dormancy score at or below which a unit is τ-dormant.
        min_observations: fewer observations than this leave a unit that never fired
            *unobserved* instead of dead.
        mask: observation mask per model call: None = the call's ``attention_mask`` keyword when
            it has one; False = none; a bool tensor ``(B, T)``; the name of a keyword argument; or
            a callable on the call's keyword arguments (or its single positional argument).
            Activations whose leading dims are ``(B, T)`` count only the True positions.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> with deadrelu.Probe(net) as probe:
        ...     _ = net(torch.randn(32, 4))
        >>> probe.report().units
        8
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        unit_dim: UnitDimSpec = None,
        threshold: ThresholdSpec = 0.0,
        asleep_rate: float = 0.05,
        dormant_tau: float = 0.025,
        min_observations: int = 1,
        mask: Any = None,
    ) -> None:
        self.levels = Levels(asleep_rate=asleep_rate, dormant_tau=dormant_tau, min_observations=min_observations)
        self.capture = ActivationCapture(model, unit_dim=unit_dim, threshold=threshold, mask=mask)
        self.model = model
        self._entered = 0  # a with block inside another on the same probe is part of it
        self._modes: set[bool] = set()  # model.training at each observed forward (the report's mode)
        self.capture.on_forward = lambda args, kwargs: self._modes.add(self.model.training)

    def __enter__(self) -> "Probe":
        if not self._entered:
            self.capture.attach()
        self._entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered = max(self._entered - 1, 0)
        if not self._entered:
            self.capture.detach()

    def reset(self) -> None:
        """Forget everything observed so far."""
        self.capture.reset()
        self._modes.clear()

    def report(self) -> Report:
        """The statistics so far as a :class:`Report`, whose ``mode`` is the one its forwards ran in
        (not the model's mode now); forwards in both modes make a ``"train"`` report, with a warning.

        Raises:
            NoActivationSitesError: when no forward pass with activations has been observed.
        """
        modes = self._modes or {self.model.training}
        if len(modes) > 1:
            warnings.warn(
                "deadrelu: this probe observed forwards in train mode and in eval mode, pooled in one report "
                "(its mode says 'train'); reset() between them to report each apart",
                stacklevel=2,
            )
        return report_from_capture(
            self.capture,
            self.levels,
            batches=self.capture.forwards,
            samples=self.capture.samples,
            mode="train" if True in modes else "eval",
        )


def scan(
    model: nn.Module,
    data: Any,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    batch_size: int = 256,
    train: bool = False,
    unit_dim: UnitDimSpec = None,
    threshold: ThresholdSpec = 0.0,
    asleep_rate: float = 0.05,
    dormant_tau: float = 0.025,
    min_observations: int = 1,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    mask: Any = None,
) -> Report:
    """Run ``data`` through ``model`` and return exact per-unit statistics of every activation site.

    The scan runs in eval mode under ``torch.no_grad()`` (``train=True`` for train mode)
    and writes nothing into the model: ``training`` flags, grad mode and (train mode) buffers and
    RNG are restored, also on error; a forward's own writes in eval mode stay (with a warning).

    Args:
        model: any ``nn.Module`` (TorchScript modules too).
        data: a tensor (split into ``batch_size`` rows), a DataLoader, or any iterable of
            tensors / tuples / dicts (see the module docstring for how input is taken).
        input_fn: ``batch -> model input`` (tensor, tuple of args, or dict of kwargs).
        batch_size: rows per batch when ``data`` is a tensor.
        train: run in train mode (BatchNorm batch statistics, dropout) instead of eval.
        unit_dim: unit-axis override: int, ``{module path or site name: dim}`` or callable.
        threshold: an output fires when ``> threshold``; float, mapping (function name,
            module path or ``path:fn``) or callable. Default 0.
        asleep_rate: units with ``0 < firing rate <= asleep_rate`` are asleep (default 0.05).
        dormant_tau: units with dormancy score ``<= dormant_tau`` are τ-dormant (default 0.025).
        min_observations: a unit that never fired is dead only when its site produced at
            least this many observations, else *unobserved* (default 1). Either way each
            dead unit's evidence is in the report: 0 firings in ``n`` observations bound its
            rate below ``1 - 0.05**(1/n)`` ≈ ``3/n`` (95%).
        device: move inputs here (default: the device of the model's parameters).
        max_batches: stop after this many batches.
        progress: show a progress bar on stderr.
        mask: which token positions count as observations. None (default): a dict batch's
            ``attention_mask`` when it has one, else the one the model call passes (a dict or
            tuple from ``input_fn``, or a positional argument in the place of the forward's
            ``attention_mask`` parameter); False: every position; a bool tensor ``(B, T)``
            (True = count; split along with ``data`` when it has one row per sample); the key
            of a dict batch; or a callable ``batch -> bool (B, T)`` (for ``nn.TransformerEncoder``:
            ``mask=lambda b: ~b["src_key_padding_mask"]``). Activations whose leading dims are
            ``(B, T)`` (or ``(T, B)``) count only the True positions; the others count everything.

    Returns:
        A frozen :class:`Report`, sites in forward-execution order.

    Raises:
        DataError: empty data, batches the input rule cannot use, or a batch on the meta device.
        DeadReluError: before any batch, a bad ``unit_dim``/``threshold``/``max_batches``/``device``.
        ForwardError: the model raised; the message names the last site reached and the input shape.
        NoActivationSitesError: the model has no activation sites.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> report = deadrelu.scan(net, torch.randn(100, 4))
        >>> [s.name for s in report.sites]
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise DeadReluError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    target = _available_device(device) if device is not None else model_device(model)
    unit_dim = checked_unit_dim(unit_dim)
    batch_size = whole_batch_size(batch_size)
    max_batches = None if max_batches is None else whole_number(max_batches, "max_batches")
    levels = Levels(asleep_rate=asleep_rate, dormant_tau=dormant_tau, min_observations=min_observations)
    batches_iter = iter_batches(data, batch_size)
    try:
        total = len(batches_iter)  # type: ignore[arg-type]
    except TypeError:
        total = None
    total = min(total, max_batches) if max_batches is not None and total is not None else total
    refuse_meta_weights(model)
    model = _eager_module(model)
    mask, mask_rows = checked_mask_option(mask), None
    if isinstance(mask, torch.Tensor) and isinstance(data, torch.Tensor) and mask.ndim >= 1 and mask.shape[0] == data.shape[0]:
        mask_rows = iter(mask.split(batch_size))  # one mask row per sample: split like the data
    # Masks from mask= or the batch are set per batch below; else the capture reads the call's own.
    capture = ActivationCapture(model, unit_dim=unit_dim, threshold=threshold, mask=None if mask is None else False)
    capture.batch_mask_given = mask is not None  # else a batch's own attention_mask: one that fits nothing warns
    bar = ProgressBar(progress, total, "deadrelu scan")
    with preserved_mode(model, train):
        if not capture.scripted:
            capture.attach()
        try:
            batches, samples = _run_batches(model, capture, batches_iter, input_fn, target, mask, mask_rows, max_batches, bar)
        finally:
            capture.detach()
            bar.close()
    if batches == 0:
        raise DataError("the data yielded no batches: nothing to scan")
    return report_from_capture(capture, levels, batches=batches, samples=samples, mode="train" if train else "eval")


def _run_batches(
    model: nn.Module,
    capture: ActivationCapture,
    batches_iter: Iterable[Any],
    input_fn: Callable[[Any], Any] | None,
    target: torch.device | None,
    mask: Any,
    mask_rows: Iterator[torch.Tensor] | None,
    max_batches: int | None,
    bar: ProgressBar,
) -> tuple[int, int]:
    """Feed each batch through the attached capture; return (batches, samples) seen."""
    batches = samples = 0
    # islice stops before asking for batch max_batches + 1: a generator's next batch may raise, block
    # or cost a load, and an iterator the caller goes on with keeps it
    stop = None if max_batches is None or max_batches >= sys.maxsize else max_batches
    for batch in itertools.islice(batches_iter, stop):
        capture.batch_mask = next(mask_rows) if mask_rows is not None else resolve_mask(mask, batch)
        args, kwargs = call_arguments(batch, input_fn)
        if any(t.is_meta for t in iter_tensors((args, kwargs))):
            raise DataError(f"a batch holds a tensor on the meta device (no values to count): {describe_shapes(args, kwargs)}")
        args, kwargs = to_device(args, target), to_device(kwargs, target)
        first = first_tensor((args, kwargs))
        if first is None:
            raise DataError(
                f"a batch holds no tensor (got {describe_shapes(args, kwargs)}); pass input_fn=... to build one"
            )
        _forward(model, capture, args, kwargs)
        batches += 1
        samples += call_samples(args, kwargs)
        bar.update()
    return batches, samples


def _available_device(device: Any) -> torch.device:
    """``device=`` as a :class:`torch.device` this machine can allocate on, or one DeadReluError."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise DeadReluError(
            f"device must be a torch.device, a device name such as 'cpu' or 'cuda:0', or None, not {type(device).__name__}"
        )
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:  # "gpu0"; an index with no accelerator
        what = "is not available here" if isinstance(device, int) else "is not a device name (e.g. 'cpu', 'cuda', 'cuda:0')"
        raise DeadReluError(f"device={device!r} {what} ({_first_line(err)})") from None
    if target.type == "meta":
        raise DeadReluError("device='meta' holds no values to run the model on; use 'cpu' or 'cuda'")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise DeadReluError(
            f"device={device!r} is not available: this machine has no usable CUDA device (torch.cuda.is_available() is False)"
        )
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise DeadReluError(f"device={device!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:  # any other backend (mps, xpu, ...): ask it for an empty tensor
        torch.empty(0, device=target)
    except Exception as err:
        raise DeadReluError(f"device={device!r} is not available here ({_first_line(err)})") from None
    return target


def _first_line(err: BaseException) -> str:
    summary = error_summary(err)
    return f"{type(err).__name__}: {summary}" if summary else type(err).__name__


def _eager_module(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s wrapper: a scan counts the same values eagerly, and
    tracing the capture's function mode would make Dynamo recompile (or fail) on every batch."""
    return model._orig_mod if is_compiled_wrapper(model) else model  # type: ignore[return-value]


def _forward(model: nn.Module, capture: ActivationCapture, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    scope = capture.forward_scope(args, kwargs) if capture.scripted else contextlib.nullcontext()
    try:
        with scope:
            model(*args, **kwargs)
    except DeadReluError:
        raise
    except Exception as err:  # the model rejected the batch: say where and with what
        if capture.own_error is not None:  # raised by deadrelu inside a TorchScript op, wrapped by it
            raise capture.own_error from None
        last = capture.last_site or "none (it failed before the first activation)"
        raise ForwardError(
            f"the model raised {type(err).__name__}: {error_summary(err, capture.op_error)} "
            f"— input {describe_shapes(args, kwargs)}; last activation site reached: {last}"
        ) from err
