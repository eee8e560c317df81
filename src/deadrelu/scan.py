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
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .capture import ActivationCapture, ThresholdSpec, UnitDimSpec
from .errors import DataError, DeadReluError, ForwardError, NoActivationSitesError
from .report import Report, SiteReport, Thresholds
from .stats import UnitTotals

__all__ = ["scan", "Probe", "report_from_capture"]

LABEL_KEYS = frozenset({"labels", "label", "target", "targets", "y"})


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _call_arguments(batch: Any, input_fn: Callable[[Any], Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split a batch into ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if input_fn is not None:
        batch = input_fn(batch)
        if isinstance(batch, tuple):
            return batch, {}
        if isinstance(batch, Mapping):
            return (), dict(batch)
        return (batch,), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a batch is an empty tuple/list: nothing to feed the model")
        if not isinstance(batch[0], torch.Tensor):
            raise DataError(
                f"the first element of a tuple batch is a {type(batch[0]).__name__}, not a tensor; "
                "pass input_fn=lambda batch: ... to say what the model takes"
            )
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if not kwargs:
            raise DataError(f"a dict batch holds only label keys {sorted(batch)}; nothing to feed the model")
        return (), kwargs
    raise DataError(
        f"cannot take model input from a batch of type {type(batch).__name__}; expected a tensor, a tuple "
        "(inputs, targets), or a dict — or pass input_fn=lambda batch: ..."
    )


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, Mapping):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, torch.Tensor):
        if data.ndim == 0 or data.shape[0] == 0:
            raise DataError(f"the data tensor has shape {tuple(data.shape)}: no samples to scan")
        return data.split(batch_size)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(
            f"data must be a tensor, a DataLoader or an iterable of batches, not {type(data).__name__}"
        )
    return data


def _shape_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    parts = [str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
    parts += [f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}" for k, v in kwargs.items()]
    return ", ".join(parts)


def site_report(name: str, site: Any, totals: UnitTotals, thresholds: Thresholds) -> SiteReport:
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
        thresholds=thresholds,
    )


def report_from_capture(
    capture: ActivationCapture,
    thresholds: Thresholds,
    *,
    batches: int,
    samples: int,
    mode: str,
) -> Report:
    """Turn a capture's accumulators into a frozen :class:`Report` (one host sync per site).

    Raises:
        NoActivationSitesError: when no activation was seen.
    """
    if not capture.sites:
        raise NoActivationSitesError(
            f"no activation sites found in {type(capture.model).__name__}: deadrelu looks for ReLU-family, "
            "GELU, SiLU, Mish, Hardswish and Softplus activations (modules or functional calls) in forward"
        )
    sites = [site_report(name, site, site.stats.compute(), thresholds) for name, site in capture.ordered_sites()]
    return Report(
        sites=tuple(sites),
        thresholds=thresholds,
        batches=batches,
        samples=samples,
        mode=mode,
        model=type(capture.model).__name__,
    )


class Probe:
    """Collect per-unit statistics from forward passes you run yourself.

    The probe does not change the model's mode or grad mode: it only observes. Hooks
    are removed on exit, also when the block raises.

    Args:
        model: the model to observe.
        unit_dim: unit-axis override (see :mod:`deadrelu.capture`).
        threshold: firing threshold (float, mapping or callable).
        asleep_rate: firing rate at or below which a unit is asleep.
        dormant_tau: dormancy score at or below which a unit is τ-dormant.

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
    ) -> None:
        self.thresholds = Thresholds(asleep_rate=asleep_rate, dormant_tau=dormant_tau)
        self.capture = ActivationCapture(model, unit_dim=unit_dim, threshold=threshold)
        self.model = model

    def __enter__(self) -> "Probe":
        self.capture.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.detach()

    def reset(self) -> None:
        """Forget everything observed so far."""
        self.capture.reset()

    def report(self) -> Report:
        """The statistics so far as a :class:`Report`.

        Raises:
            NoActivationSitesError: when no forward pass with activations has been observed.
        """
        return report_from_capture(
            self.capture,
            self.thresholds,
            batches=self.capture.forwards,
            samples=0,
            mode="train" if self.model.training else "eval",
        )


@contextlib.contextmanager
def _preserved(model: nn.Module, train: bool) -> Iterator[None]:
    """Set eval/train mode and no_grad; restore every module's flag, buffers and RNG afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    # Train mode updates BatchNorm running statistics and draws dropout masks; a scan must
    # leave the model bit-identical and the RNG where it was.
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    rng = contextlib.nullcontext() if not train else torch.random.fork_rng(devices=[])
    try:
        with rng, torch.no_grad():
            try:
                model.train(train)
            except NotImplementedError as err:  # torch.export programs have a fixed mode
                if train:
                    raise DeadReluError(f"{type(model).__name__} cannot switch to train mode: {err}") from err
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in saved_buffers:
                b.copy_(saved)


class _Progress:
    """A progress bar on stderr: tqdm when installed, a simple counter otherwise, nothing when off."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self.bar = None
        self.count = 0
        self.total = total
        self.desc = desc
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, disable=None)
            except ImportError:
                self.bar = None

    def update(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and sys.stderr.isatty():
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.desc}: {self.count}{of} batches", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


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
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> Report:
    """Run ``data`` through ``model`` and return exact per-unit statistics of every activation site.

    The scan runs in eval mode under ``torch.no_grad()`` (``train=True`` for train mode)
    and leaves the model bit-identical: parameters, buffers, every module's ``training``
    flag, grad mode and — in train mode — the RNG state are restored, also on error.

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
        device: move inputs here (default: the device of the model's parameters).
        max_batches: stop after this many batches.
        progress: show a progress bar on stderr.

    Returns:
        A frozen :class:`Report`, sites in forward-execution order.

    Raises:
        DataError: empty data or batches the input rule cannot use.
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
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    thresholds = Thresholds(asleep_rate=asleep_rate, dormant_tau=dormant_tau)
    batches_iter = _batches(data, batch_size)
    target = torch.device(device) if device is not None else _model_device(model)
    try:
        total = len(batches_iter)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    capture = ActivationCapture(model, unit_dim=unit_dim, threshold=threshold)
    batches = samples = 0
    bar = _Progress(progress, total, "deadrelu scan")
    with _preserved(model, train):
        if not capture.scripted:
            capture.attach()
        try:
            for batch in batches_iter:
                if max_batches is not None and batches >= max_batches:
                    break
                args, kwargs = _call_arguments(batch, input_fn)
                args, kwargs = _to_device(args, target), _to_device(kwargs, target)
                first = _first_tensor((args, kwargs))
                if first is None:
                    raise DataError(
                        f"a batch holds no tensor (got {_shape_of(args, kwargs)}); pass input_fn=... to build one"
                    )
                _forward(model, capture, args, kwargs)
                batches += 1
                samples += int(first.shape[0]) if first.ndim else 1
                bar.update()
        finally:
            capture.detach()
            bar.close()
    if batches == 0:
        raise DataError("the data yielded no batches: nothing to scan")
    return report_from_capture(capture, thresholds, batches=batches, samples=samples, mode="train" if train else "eval")


def _forward(model: nn.Module, capture: ActivationCapture, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    scope = capture.forward_scope() if capture.scripted else contextlib.nullcontext()
    try:
        with scope:
            model(*args, **kwargs)
    except DeadReluError:
        raise
    except Exception as err:  # the model rejected the batch: say where and with what
        last = capture.last_site or "none (it failed before the first activation)"
        raise ForwardError(
            f"the model raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            f"— input {_shape_of(args, kwargs)}; last activation site reached: {last}"
        ) from err
