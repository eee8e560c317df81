"""Watch unit health during training: rolling-window dead/asleep/dormant fractions, lifecycle events, warnings.

Quickstart::

    with deadrelu.Monitor(model, sinks=["health.jsonl"]) as mon:
        for x, y in loader:
            loss = train_step(x, y)
            mon.step(loss)

What is measured
----------------
Every observed training forward pass (grad enabled; ``every=`` picks the steps) adds,
per unit of every activation site, the number of outputs that fired and the sum of
``|h|`` into one row of a ring buffer of the last ``window`` batches, on the
activation's device. Nothing is copied to the host until the monitor *evaluates* —
every ``log_every`` steps, when the first window fills, or when you call
:meth:`Monitor.report` — and then one copy serves every site.

* **dead**: the unit never fired over the whole window (all ``window`` batches), so one
  quiet batch does not kill a unit; **asleep**: it fired on at most ``asleep_rate`` of
  its window outputs; **dormant**: its dormancy score over the window is at most
  ``dormant_tau`` (see :class:`deadrelu.Levels`).
* **born dead**: dead over the first full window. **died at step k**: alive at the
  previous evaluation and dead at the evaluation of step ``k`` (it last fired at most
  ``window`` observed batches earlier). **revived at step k**: dead before, fired since.
* Until a site has seen ``window`` batches its fractions cover the batches so far and
  no lifecycle events or warnings are issued for it.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import sys
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from . import graph_capture
from .blocks import BlockCapture
from .graph_capture import CompiledModelWarning, GraphCapture, refuse_mask
from .window import WindowStats
from ..core.capture import (
    ActivationCapture,
    ThresholdSpec,
    UnitDimSpec,
    checked_unit_dim,
    compiled_blocks,
    copy_safe_hook,
    display_names,
    is_compiled_wrapper,
)
from ..errors import DeadReluError, NoActivationSitesError
from ..core.report import Report, SiteReport, Levels, model_fingerprint, prime_unit_classes
from ..core.scan import site_report
from .ranks import SiteState, reduce_by_key
from .records import Alert, Event, EventSummary, History, HistoryRow, LogRecord, SiteEvents
from .resume import MonitorState, parse_state
from .sinks import Sink, SinkError, SinkWarning, as_sinks
from .structure import ModelLayout
from ..core.inputs import checked_mask_option, first_tensor, iter_tensors, refuse_meta_weights
from ..core.stats import UnitTotals

__all__ = [
    "Monitor",
    "HistoryRow",
    "History",
    "Event",
    "EventSummary",
    "Alert",
    "LogRecord",
    "DeadUnitWarning",
    "CompiledModelWarning",
]

Schedule = Union[int, Callable[[int], bool]]

_NEVER_ATTACHED = (
    "the monitor was never attached, so it has observed nothing: use `with deadrelu.Monitor(model, ...) as mon:` "
    "or `mon = deadrelu.Monitor(model, ...).attach()` before training"
)
SinkSpec = Union[Sink, str, os.PathLike, Callable[[LogRecord], Any]]

_DETACHED = (
    "the monitor is detached (its `with` block ended, or detach() was called), so it observes nothing and "
    "its logs are closed; this call changed nothing. Call mon.attach() to go on monitoring, or make a new "
    "deadrelu.Monitor"
)

ADVICE_BORN_DEAD = (
    "these units were dead from the first window, which points at initialisation: use He/Kaiming init "
    "for ReLU layers, check input normalisation, or start biases slightly positive"
)
ADVICE_DIED = (
    "these units died during training: lower the learning rate or add warm-up, clip gradients, "
    "switch to a leaky activation (LeakyReLU/GELU), or re-initialise the dead units (deadrelu.reinit_dead)"
)


def _is_compiling() -> bool:
    """Whether TorchDynamo is tracing this call (``torch.compiler.is_compiling`` from torch 2.3 on)."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:
        import torch._dynamo as dynamo

        check = dynamo.is_compiling
    return bool(check())


def _checkpoint_recompute() -> bool:
    """Whether this forward is an activation checkpoint's recompute (``torch.utils.checkpoint``)
    of a pass that was observed when it first ran: a forward that autograd's backward runs.

    The reentrant variant (``use_reentrant=True``) ran the pass under ``no_grad`` first, which
    is not observed, so its recompute is the pass's only observation and is not one of these."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    if task is None or task() < 0:  # not inside a backward: the common case, one C call
        return False
    import torch.utils.checkpoint as checkpoint

    reentrant = getattr(getattr(checkpoint, "CheckpointFunction", None), "backward", None)
    code = getattr(reentrant, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return False
        frame = frame.f_back
    return True


class DeadUnitWarning(UserWarning):
    """A layer's dead fraction crossed a warning threshold (issued once per layer and threshold)."""


class _MonitorCapture(ActivationCapture):
    """ActivationCapture whose :meth:`forward_scope` composes with calls of the root module inside it."""

    @contextlib.contextmanager
    def forward_scope(self, until: Any = None) -> Iterator[None]:  # type: ignore[override]
        # Counting the scope as one level of root depth keeps a root call made inside the
        # scope (Lightning's ``self(x)`` in ``training_step``) from starting a second pass.
        self._depth += 1
        try:
            with super().forward_scope(until=until):
                yield
        finally:
            self._depth -= 1


def _with_frame() -> Any:
    """The frame that entered the ``observe()`` block being opened: the first caller outside
    contextlib and this file."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename in (__file__, contextlib.__file__):
        f = f.f_back
    return f


def _entry_code(entry: Any) -> Any:
    """The code object of ``observe(entry=...)``: a function, a bound method or a decorated one."""
    func = inspect.unwrap(getattr(entry, "__func__", entry))
    code = getattr(func, "__code__", None)
    if code is None:
        raise DeadReluError(
            f"Monitor.observe(entry=...) takes the Python function the block runs (such as "
            f"model.training_step), got {type(entry).__name__}"
        )
    return code


def _host_values(states: Sequence[SiteState]) -> list[dict[str, torch.Tensor]]:
    """Every site's state tensors on the host, with one device-to-host copy for all of them.

    The tensors travel as one float64 vector (integer counts are exact below 2**53) and are
    split and cast back here."""
    tensors = [t for s in states for t in s.tensors.values()]
    if not tensors:
        return [{} for _ in states]
    device = tensors[0].device
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]).cpu()
    out, offset = [], 0
    for s in states:
        values: dict[str, torch.Tensor] = {}
        for k, t in s.tensors.items():
            chunk = flat[offset : offset + t.numel()]
            offset += t.numel()
            # counts become int64 again on the host (exact: integral float64 values below 2**53)
            values[k] = chunk if t.is_floating_point() else chunk.to(torch.int64)
        out.append(values)
    return out


#: A set of a site's units: a bool mask over them, or (as a resumed state gives it) their indices.
UnitMemory = Union[torch.Tensor, "set[int]"]


def _unit_mask(memory: UnitMemory | None, units: int) -> torch.Tensor:
    """``memory`` as a bool mask over ``units`` units (indices beyond them are dropped)."""
    if isinstance(memory, torch.Tensor) and memory.numel() == units:
        return memory
    mask = torch.zeros(units, dtype=torch.bool)
    indices = [u for u in _index_set(memory) if 0 <= u < units] if memory is not None else []
    if indices:
        mask[torch.tensor(indices, dtype=torch.int64)] = True
    return mask


def _indices(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def _index_set(memory: UnitMemory) -> set[int]:
    return set(_indices(memory)) if isinstance(memory, torch.Tensor) else set(memory)


def _index_sets(memories: Mapping[Any, UnitMemory]) -> dict[Any, set[int]]:
    return {key: _index_set(m) for key, m in memories.items()}


def _size(memory: UnitMemory) -> int:
    return int(memory.sum()) if isinstance(memory, torch.Tensor) else len(memory)


def _warn_levels(warn_at: Any) -> tuple[float, ...]:
    """The sorted ``warn_at`` fractions, or one DeadReluError (a bare number, text, out of range)."""
    try:
        levels = tuple(sorted(float(w) for w in warn_at))
    except (TypeError, ValueError):
        raise DeadReluError(f"warn_at must be a sequence of fractions in (0, 1], got {warn_at!r}") from None
    if any(not 0.0 < w <= 1.0 for w in levels):
        raise DeadReluError(f"warn_at fractions must be in (0, 1], got {tuple(warn_at)!r}")
    return levels


def _check_options(window: Any, log_every: Any, live: Any, distributed: Any, compiled: Any) -> None:
    """Refuse a count that is not a positive int, and a switch that is not a bool (``distributed``
    and ``compiled`` may be None): text from a config file is truthy, so ``compiled="no"`` would
    turn compiled mode on."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise DeadReluError(f"window must be a positive int (batches), got {window!r}")
    if window > sys.maxsize:  # no ring of that many rows can be indexed, let alone allocated
        raise DeadReluError(f"window must be at most {sys.maxsize} batches, got {window}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise DeadReluError(f"log_every must be a positive int (steps), got {log_every!r}")
    for option, value, none_too in (("live", live, False), ("distributed", distributed, True), ("compiled", compiled, True)):
        if not (isinstance(value, bool) or (none_too and value is None)):
            choices = "True, False or None" if none_too else "True or False"
            raise DeadReluError(f"{option} must be {choices}, got {value!r}")


def _schedule(every: Schedule) -> Callable[[int], bool]:
    if callable(every):
        return every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise DeadReluError(f"every must be a positive int or a callable step -> bool, got {every!r}")
    if every == 1:
        return lambda step: True
    return lambda step: step % every == 0


def _first_step_observed(schedule: Callable[[int], bool]) -> bool:
    """Whether step 0 is observed; an ``every=`` callable that cannot take a step number is refused here."""
    try:
        return bool(schedule(0))
    except Exception as err:
        raise DeadReluError(
            f"every= must be a positive int or a callable step -> bool; calling it with step 0 raised "
            f"{type(err).__name__}: {err}"
        ) from err


class Monitor:
    """Track per-unit health of every activation site during training, at near-zero cost.

    Args:
        model: the model being trained (register the monitor before ``torch.compile``).
        every: which steps to observe: every step (1), every k-th step (k), or a callable
            ``step -> bool``. Only forward passes with grad enabled are observed, so
            evaluation passes under ``torch.no_grad()`` are ignored.
        window: number of most recent observed batches per site in the rolling window; a
            unit is dead when it fired in none of them.
        log_every: evaluate (one host copy, history row, events, warnings, sinks) every
            this many steps. The first full window is always evaluated.
        asleep_rate: units firing on ``0 < rate <= asleep_rate`` of their outputs are asleep.
        dormant_tau: units with dormancy score ``<= dormant_tau`` are dormant.
        min_observations: a unit that never fired in the window is dead only when its site
            produced at least this many observations there, else *unobserved*.
        threshold: firing threshold (float, mapping or callable; see :mod:`deadrelu.core.capture`).
        unit_dim: unit-axis override (see :mod:`deadrelu.core.capture`).
        sinks: where to log: a list of :class:`~deadrelu.monitor.sinks.Sink` objects, paths ending
            in ``.jsonl`` or ``.csv``, or callables taking a :class:`LogRecord`; a single one of
            them stands for a one-element list (``sinks="health.jsonl"``).
        live: show the live terminal view (:mod:`deadrelu.monitor.live`; needs ``rich``).
        warn_at: dead fractions at which a layer warns (once per layer and threshold).
        on_sink_error: ``"warn"`` (warn once and stop writing to that sink) or ``"raise"``
            (raise :class:`~deadrelu.monitor.sinks.SinkError`).
        distributed: sum counts over ``torch.distributed`` ranks when evaluating, matched by
            site key (ranks may run different layers, in different orders; see
            :mod:`deadrelu.monitor.ranks`); ``None`` means "when a process group is
            initialised". Every rank must then call :meth:`step` and :meth:`report` in lockstep.
        compiled: observe the graphs ``torch.compile`` builds (an Inductor pass inserts each
            site's sums and an effectful ``deadrelu::observe`` op after every activation; see
            :mod:`deadrelu.monitor.graph_capture`): the same sites and numbers as eager mode.
            ``None`` turns it on when ``model`` is the result of ``torch.compile`` or holds a
            compiled submodule (``model.block = torch.compile(model.block)``); pass True when
            you attach first and compile afterwards.
        mask: observation mask per training forward (as for :class:`deadrelu.Probe`): None = the
            call's ``attention_mask`` keyword when it has one; False = none; a bool tensor
            ``(B, T)``, the name of a keyword argument, or a callable on the call's keyword
            arguments. With ``compiled=True``: None (the call's ``attention_mask``, read inside
            the graph) or False only.

    Raises:
        DeadReluError: for a non-module model or invalid options (a sink that is not a sink, a
            ``unit_dim`` of the wrong type, ...), before anything is attached or opened.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with deadrelu.Monitor(net, window=5, log_every=5) as mon:
        ...     for _ in range(10):
        ...         loss = net(torch.randn(16, 4)).pow(2).mean()
        ...         opt.zero_grad(); loss.backward(); opt.step()
        ...         mon.step(loss)
        >>> mon.history.steps
        [5, 10]
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: Schedule = 1,
        window: int = 100,
        log_every: int = 10,
        asleep_rate: float = 0.05,
        dormant_tau: float = 0.025,
        min_observations: int = 1,
        threshold: ThresholdSpec = 0.0,
        unit_dim: UnitDimSpec = None,
        sinks: Union[SinkSpec, Iterable[SinkSpec], None] = (),
        live: bool = False,
        warn_at: Sequence[float] = (0.2, 0.5),
        on_sink_error: str = "warn",
        distributed: bool | None = None,
        compiled: bool | None = None,
        mask: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise DeadReluError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        root_compiled = is_compiled_wrapper(model)
        self._wrapper = model if root_compiled else None
        if root_compiled:  # the module inside torch.compile's OptimizedModule
            model, compiled = model._orig_mod, True if compiled is None else compiled  # type: ignore[assignment]
        has_blocks = bool(compiled_blocks(model))
        if compiled is None and has_blocks:
            compiled = True  # a compiled block: Dynamo would trace the eager hooks
        _check_options(window=window, log_every=log_every, live=live, distributed=distributed, compiled=compiled)
        if on_sink_error not in ("warn", "raise"):
            raise DeadReluError(f"on_sink_error must be 'warn' or 'raise', got {on_sink_error!r}")
        warn_levels = _warn_levels(warn_at)
        unit_dim = checked_unit_dim(unit_dim)
        mask = checked_mask_option(mask)
        self.levels = Levels(asleep_rate=asleep_rate, dormant_tau=dormant_tau, min_observations=min_observations)
        self.schedule = _schedule(every)
        self.model = model
        self.window = window
        self.log_every = log_every
        self.warn_at = warn_levels
        self.on_sink_error = on_sink_error
        self.distributed = distributed
        sink_list = as_sinks(sinks)
        if live:
            from .live import LiveView

            sink_list.append(LiveView())
        self.sinks: list[Sink] = sink_list
        self.compiled = bool(compiled)
        self.capture: Any

        def eager_capture(model: nn.Module, **options: Any) -> ActivationCapture:
            # the eager capture, accumulating into window rings
            return _MonitorCapture(model, stats_factory=lambda u, thr, device: WindowStats(u, thr, device, window), **options)

        if self.compiled:
            refuse_mask(mask)
            if graph_capture.graph_capture_available() and has_blocks and not root_compiled:
                # blocks compiled one by one: their graphs, and the model's own eager code around them
                self.capture = BlockCapture(
                    model, eager=eager_capture, unit_dim=unit_dim, threshold=threshold, window=window,
                    observing=lambda: self._observe, mask=mask,
                )  # fmt: skip
            elif graph_capture.graph_capture_available():  # looked up when called: tests can stand in an older torch
                self.capture = GraphCapture(
                    model, unit_dim=unit_dim, threshold=threshold, window=window, observing=lambda: self._observe, mask=mask
                )
            else:  # an older torch: hooks on activation modules only
                from .compiled import ModuleCapture

                self.capture = ModuleCapture(model, unit_dim=unit_dim, threshold=threshold, window=window)
        else:
            self.capture = eager_capture(model, unit_dim=unit_dim, threshold=threshold, mask=mask)
        self._op_asks_schedule = isinstance(self.capture, GraphCapture)
        self._eager_root = not self.compiled or isinstance(self.capture, BlockCapture)  # counts samples per forward
        # The eager capture counts the passes it claims (one thread's at a time), so samples match its sites.
        self._rows_from_capture = isinstance(self.capture, ActivationCapture)
        if self._rows_from_capture:
            self.capture.on_forward = self._count_call_rows
        self.history = History()
        self.events: list[Event] = []
        self.alerts: list[Alert] = []
        self.steps = 0
        self._gate_handle: Any = None
        self._wrapper_handle: Any = None
        self._observe = _first_step_observed(self.schedule)
        self._loss: Any = None
        self._init_lifecycle()
        self._warned: set[tuple[Any, float]] = set()
        self._first_window_done = False
        self._last_eval_step = -1
        self._broken: set[int] = set()
        self._opened = False
        self._open_sinks: list[int] = []  # the sinks whose open() returned: the ones detach() closes
        self._compile_warned = False
        self._init_samples(window)
        self._observed_steps = 0
        self._units: dict[str, int] = {}  # per site of the last evaluation (all ranks' sites): units
        self._layout = ModelLayout(model)  # the modules the capture learnt, to notice an edited model

    def _init_samples(self, window: int) -> None:
        # the samples of the last `window` forwards: grows with them, never to `window` up front
        self._samples_ring: collections.deque[int] = collections.deque(maxlen=window)
        self._samples_total = 0
        # A plain int (0: none) for the traced hook to read: the wrapper itself must not be touched there.
        graph_counts = self._op_asks_schedule and self._wrapper is None
        self._sample_counter = graph_capture.sample_counter(self._count_graph_samples) if graph_counts else 0
        self._forwards = 0
        self._scope_counted: bool | None = None  # None: outside observe(); else whether it counted
        self._scoped = False  # an observe() block has counted a pass
        self._pooled_warned: set[str] = set()

    def _init_lifecycle(self) -> None:
        # Unit memories are bool masks over a site's units once it has been evaluated, and index
        # sets as a resumed state gives them (made masks at the site's next evaluation).
        self._dead: dict[str, UnitMemory] = {}  # per site: dead units at the last full-window evaluation
        self._born_dead: dict[Any, UnitMemory] = {}
        # per site: units whose last known state (ignoring NaN/Inf and unobserved evaluations) is dead / alive
        self._known_dead: dict[Any, UnitMemory] = {}
        self._known_alive: dict[Any, UnitMemory] = {}
        # sites whose window has not been full at an evaluation yet: their first full window is evaluated
        self._filling: list[Any] = []
        self._filled: "weakref.WeakSet[Any]" = weakref.WeakSet()  # accumulators whose full window was evaluated
        self._sites_seen = 0
        self._name_ident: dict[str, Any] = {}  # every display name a site has had -> the site
        self._ident_name: dict[Any, str] = {}  # the site -> its name at the last evaluation

    _ever_attached = False  # set by attach(); a monitor never attached says so instead of "no activation yet"

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> "Monitor":
        """Register the hooks and open the sinks (no-op when already attached).

        Raises:
            DeadReluError: for TorchScript models, which accept no hooks, a model whose weights
                are on the meta device, ``distributed=True`` without an initialised process group,
                or a model whose activation modules were replaced since the monitor was made.
            SinkError: with ``on_sink_error="raise"``, when a sink refuses its file or fails to
                open; every sink checks its file before any opens, and the empty log files this
                attach created are removed again.
        """
        if self._gate_handle is not None:
            return self
        refuse_meta_weights(self.model)  # before any hook: nothing to count, and the first step would fail
        self._refuse_edited_model("since the monitor was made")
        self._ever_attached = True
        self._use_distributed()  # distributed=True without a process group fails here, before any hook
        # Runs before the capture's own root hook, so unobserved passes never enter the function mode.
        self._gate_handle = self.model.register_forward_pre_hook(copy_safe_hook(self._gate), prepend=True, with_kwargs=True)
        if self._wrapper is not None and not self._eager_root:
            self._wrapper_handle = self._wrapper.register_forward_pre_hook(copy_safe_hook(self._gate_wrapper), with_kwargs=True)
        try:
            self.capture.attach()
            if not self._opened:
                self._opened = True
                # Every sink checks its target before any opens, so a refused one (a foreign log
                # file) fails the attach before another sink has created or changed a file.
                for i, sink in enumerate(self.sinks):
                    self._guard(i, sink, getattr(sink, "check", lambda: None))
                for i, sink in enumerate(self.sinks):
                    self._guard(i, sink, sink.open)
                    self._open_sinks.append(i)
        except BaseException:
            opened = [self.sinks[i] for i in self._open_sinks]
            try:
                self.detach()
            except SinkError:  # a sink failing to close must not hide why attach failed
                pass
            for sink in opened:  # a failed attach leaves no new, empty log file behind
                with contextlib.suppress(Exception):
                    getattr(sink, "abort", lambda: None)()
            raise
        return self

    def _refuse_edited_model(self, since: str) -> None:
        """One DeadReluError when a module that may hold an activation site was replaced, added or
        removed: the capture's hooks and site names are those of the model it learnt, so it would
        go on reporting a removed module's last window and misname the new one."""
        changes = self._layout.changes(self.model)
        if not changes:
            return
        shown = ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise DeadReluError(
            f"the model's modules changed {since} ({shown}): this monitor watches the modules it was made for, "
            "and would go on reporting a removed module as if it were still there. Detach it and monitor the edited "
            "model with a new deadrelu.Monitor; new.load_state_dict(mon.state_dict()) carries the steps, history, "
            "events and lifecycle over"
        )

    def detach(self) -> None:
        """Remove every hook and close the sinks; safe to call twice."""
        if self._gate_handle is not None:
            self._gate_handle.remove()
            self._gate_handle = None
        if self._wrapper_handle is not None:
            self._wrapper_handle.remove()
            self._wrapper_handle = None
        self.capture.detach()  # ActivationCapture.detach frees the shared scratch buffers
        if self._opened:
            self._opened = False
            opened, self._open_sinks = self._open_sinks, []
            failure: SinkError | None = None
            for i in opened:  # every opened sink is closed, even after one fails to close
                sink = self.sinks[i]
                if i in self._broken:  # already reported; still release its file
                    try:
                        sink.close()
                    except Exception:
                        pass
                    continue
                try:
                    self._guard(i, sink, sink.close)
                except SinkError as err:  # on_sink_error="raise": raised once all are closed
                    failure = failure or err
            if failure is not None:
                raise failure

    def __enter__(self) -> "Monitor":
        return self.attach()

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        failed = exc_type is not None
        try:
            if not failed:  # a failing block gets no final evaluation, only a clean detach
                self.finish()
        except BaseException:
            failed = True
            raise
        finally:
            try:
                self.detach()
            except SinkError as err:
                if not failed:
                    raise
                # a sink failing to close (on_sink_error="raise") must not hide why the block failed
                warnings.warn(str(err), SinkWarning, stacklevel=2)

    def finish(self) -> None:
        """Evaluate the steps since the last evaluation, so logs end at the last step.

        A clean exit from the ``with`` block calls it; call it yourself before :meth:`detach`.

        Raises:
            DeadReluError: after :meth:`detach` with steps left to evaluate (the sinks are
                closed), or when the model was edited while attached (see :meth:`step`).
        """
        if self._last_eval_step == self.steps:
            return
        if self._ever_attached and not self.attached:  # the sinks are closed: nothing to write to
            raise DeadReluError(f"mon.finish() after detach(): {_DETACHED} (call finish() before detach())")
        if self.capture.sites or self._use_distributed():  # distributed: a collective every rank joins
            self._evaluate()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped (plain Python data).

        Saved: the step counters, the history, events and alerts, and each site's lifecycle
        memory (units last known dead or alive, born dead, warning levels crossed), so a
        resumed run neither reports its dead units as "born dead" again nor repeats its
        warnings. Not saved: the rolling windows, which refill from the next batches (see
        :mod:`deadrelu.monitor.resume`). Save it beside the model and optimizer state.

        Example:
            >>> import torch, deadrelu
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            >>> with deadrelu.Monitor(net, window=2, log_every=2) as mon:
            ...     for _ in range(4):
            ...         _ = net(torch.randn(4, 2)); mon.step()
            >>> resumed = deadrelu.Monitor(net, window=2, log_every=2)
            >>> resumed.load_state_dict(mon.state_dict())
            >>> resumed.steps, resumed.history.steps
            (4, [2, 4])
        """
        return MonitorState(
            steps=self.steps,
            observed_steps=self._observed_steps,
            last_eval_step=self._last_eval_step,
            first_window_done=self._first_window_done,
            history=list(self.history.rows),
            events=list(self.events),
            alerts=list(self.alerts),
            known_dead=_index_sets(self._known_dead),
            known_alive=_index_sets(self._known_alive),
            born_dead=_index_sets(self._born_dead),
            dead=_index_sets(self._dead),
            warned=self._warned,
            names=self._name_ident,
            current_names={name: ident for ident, name in self._ident_name.items()},
            units=self._units,
        ).to_dict()

    def load_state_dict(self, state: Any) -> None:
        """Go on from a :meth:`state_dict` (a resumed run: call it before the first step).

        Replaces this monitor's counters, history, events, alerts and lifecycle memory; its
        rolling windows are kept as they are (empty on a new monitor).

        Raises:
            DeadReluError: for anything that is not a monitor state, naming the malformed
                entry; the monitor is unchanged then.
        """
        parsed = parse_state(state)
        self.steps = parsed.steps
        self._observed_steps = parsed.observed_steps
        self._observe = bool(self.schedule(self.steps))
        self._last_eval_step = parsed.last_eval_step
        self._first_window_done = parsed.first_window_done
        self.history = History(parsed.history)
        self.events = parsed.events
        self.alerts = parsed.alerts
        self._known_dead = parsed.known_dead
        self._known_alive = parsed.known_alive
        self._born_dead = parsed.born_dead
        self._dead = parsed.dead
        self._warned = parsed.warned
        self._name_ident = parsed.names
        self._ident_name = {ident: name for name, ident in parsed.current_names.items()}
        self._units = parsed.units

    @property
    def attached(self) -> bool:
        """True while hooks are registered."""
        return self._gate_handle is not None

    def _gate(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if module is not self.model:
            return  # a replica sharing the hook dicts (nn.DataParallel): the capture refuses it
        if self._op_asks_schedule:
            # The graph capture asks the schedule when its op runs: nothing here for Dynamo to
            # guard on. Traced into a whole-model graph (not when the monitor was given the
            # compiled wrapper, whose own hook counts), the hook leaves a samples op in the graph.
            if self._sample_counter and _is_compiling() and torch.is_grad_enabled():
                first = first_input(args, kwargs)
                if first is not None:
                    graph_capture.count_samples(first, self._sample_counter)
            return
        if (not self.compiled or isinstance(self.capture, BlockCapture)) and _is_compiling():
            # The function mode would make Dynamo break the graph and recompile every step: the
            # eager capture stays out of compiled code (the block capture's graph half sees it;
            # without compiled=True it runs unobserved, and the monitor says how to see it).
            if not self.compiled:
                self._compiled_unobserved()
            self.capture.enabled = False
            return
        # A checkpoint's recompute in backward runs the forward again, with grad: counted once.
        on = self._observe and torch.is_grad_enabled() and not _checkpoint_recompute()
        self.capture.enabled = on
        if on and self._eager_root and (not self._rows_from_capture or self._scope_counted is not None):
            self._count_rows(input_rows(args, kwargs))  # inside an observe() block, only the block's first
        elif on and self._wrapper is None and self.compiled and not self._eager_root:
            # An older torch's module hooks leave no samples op in the graph: counted outside it.
            self._count_rows_eagerly(input_rows(args, kwargs))

    @torch.compiler.disable
    def _count_rows_eagerly(self, rows: int) -> None:
        self._count_rows(rows)

    def _count_call_rows(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """A pass the eager capture claimed (outside ``observe()``, whose block counts its own samples)."""
        if self._scope_counted is None:
            self._add_samples(input_rows(args, kwargs))

    def _count_graph_samples(self, rows: int) -> None:
        """A compiled forward's batch size, handed in by its ``deadrelu::count_samples`` op."""
        if self._observe:
            self._count_rows(rows)

    def _count_rows(self, rows: int) -> None:
        """One observed forward's samples; inside an ``observe()`` block, only the block's first."""
        if self._scope_counted is None:
            self._add_samples(rows)
        else:
            self._count_in_scope(rows)

    def _add_samples(self, n: int) -> None:
        self._samples_total += n
        self._samples_ring.append(n)
        self._forwards += 1

    def _gate_wrapper(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        """Pre-hook on the ``torch.compile`` wrapper the monitor was given: it runs eagerly, before
        the compiled code, so the samples of observed forwards are counted as in eager mode."""
        if self._observe and torch.is_grad_enabled() and not _is_compiling() and not _checkpoint_recompute():
            self._count_rows(input_rows(args, kwargs))

    @torch.compiler.disable
    def _compiled_unobserved(self) -> None:
        if not self._compile_warned:
            self._compile_warned = True
            warnings.warn(
                "deadrelu: this model is being run by torch.compile, which cannot trace the monitor's "
                "default capture; it runs unobserved. Create the monitor with compiled=True before "
                "compiling, or pass the compiled module: Monitor(torch.compile(model))",
                CompiledModelWarning,
                stacklevel=2,
            )

    @contextlib.contextmanager
    def observe(self, batch: Any = None, *, entry: Callable[..., Any] | None = None) -> Iterator[None]:
        """Treat everything run inside this block as one training forward pass.

        For code that calls submodules directly instead of ``model(...)`` — Lightning's
        ``training_step`` calling ``self.net(x)`` is the usual case. The schedule and the
        grad-mode rule apply as for ordinary forward passes. The pass's samples
        (``Report.samples``) are the leading dim of ``batch``'s first tensor when it is given,
        else of the first input of the first module called inside the block.

        A functional call made in the block outside any module (``F.gelu`` in the step's own
        code) is a site keyed by its source position up to the ``with`` statement's frame, so
        the training loop above that frame does not matter. Where the block is entered
        elsewhere than in a caller of the code it observes (a callback that opens it before the
        framework calls ``training_step``), pass that function as ``entry``: positions then end
        at its frame.

        Example:
            >>> import torch, deadrelu
            >>> outer = torch.nn.Module()
            >>> outer.net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            >>> with deadrelu.Monitor(outer, window=1) as mon:
            ...     with mon.observe():
            ...         _ = outer.net(torch.randn(4, 2))
            ...     mon.step()
            >>> [s.name for s in mon.report().sites]
            ['net.1']
        """
        if self._scope_counted is not None:  # inside another observe() block: part of that pass
            yield
            return
        active = self.attached and self._observe and torch.is_grad_enabled()
        previous, self.capture.enabled = self.capture.enabled, active
        eager = getattr(self.capture, "eager", self.capture)  # the block capture's eager half
        rows = batch_rows(batch) if batch is not None else 0
        # A batch whose size cannot be read (a dataclass, a graph batch) falls back to the first call's input.
        watches = active and isinstance(eager, ActivationCapture) and rows == 0
        outer = self._scope_counted
        until = _entry_code(entry) if entry is not None else _with_frame()
        try:
            if active:
                self._scoped = True  # several forwards may make one counted pass: see _warn_pooled
                self._scope_counted = False
                if rows:
                    self._count_in_scope(rows)
                elif watches:
                    eager.on_scope_call = lambda call: self._count_in_scope(input_rows(*call))
                with self.capture.forward_scope(until=until):
                    yield
            else:
                yield
        finally:
            del until  # a frame: kept no longer than the block
            self.capture.enabled = previous
            self._scope_counted = outer
            if watches:
                eager.on_scope_call = None

    def _count_in_scope(self, rows: int) -> None:
        """Samples of an ``observe()`` pass: counted once, however many modules it calls."""
        if self._scope_counted is False:
            self._scope_counted = True
            self._add_samples(rows)

    # -- the training-loop call ----------------------------------------------------------------
    def step(self, loss: Any = None) -> None:
        """Mark the end of one training step (call it after ``optimizer.step()``).

        Args:
            loss: the step's loss (tensor or number) for the logs; kept on the device and
                only read at evaluation time, so passing a tensor does not synchronise.

        Raises:
            DeadReluError: after :meth:`detach` (or the end of the ``with`` block), changing
                nothing; or, at an evaluation, when a module that may hold an activation site was
                replaced, added or removed since the monitor was made (monitor the edited model
                with a new monitor: ``new.load_state_dict(mon.state_dict())`` goes on).
        """
        if not self._ever_attached and self.steps == 0:
            warnings.warn(_NEVER_ATTACHED + "; this step and the ones before were not observed", stacklevel=2)
        if self._ever_attached and not self.attached:
            # Evaluating now would stamp the frozen window with new steps and reopen closed logs.
            raise DeadReluError(f"mon.step() after detach: {_DETACHED}")
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        self._loss = loss
        new_forward = getattr(self.capture, "new_forward", None)
        if new_forward is not None:  # compiled blocks called outside any root call: a step ends their pass
            new_forward()
        if self._observe:
            self._observed_steps += 1  # the step that just ended was observed
        self.steps += 1
        self._observe = bool(self.schedule(self.steps))
        if self._use_distributed():
            # Every rank must take the same decision (evaluating is a collective), so it rests on the
            # step schedule, not on this rank's own sites: a rank may lack a site or see it less often.
            first = not self._first_window_done and self._observed_steps >= self.window
            if first or self.steps % self.log_every == 0:
                self._evaluate()
            return
        first = self._a_window_filled()
        if first or self.steps % self.log_every == 0:
            if self.capture.sites:
                self._evaluate()
                self._filled.update(site.stats for site in self._filling if site.stats.full)
                self._filling = [site for site in self._filling if not site.stats.full]
            elif self._op_asks_schedule and not self._compile_warned:
                self._compile_warned = True
                warnings.warn(
                    f"deadrelu: after {self.steps} step(s) the compiled-mode monitor has seen no graph of "
                    f"{type(self.model).__name__} with an activation: with compiled=True only graphs that "
                    "torch.compile's default (Inductor) backend compiles after attach() are observed, not eager "
                    "calls or other backends (call torch._dynamo.reset() to recompile)",
                    CompiledModelWarning,
                    stacklevel=2,
                )

    def _a_window_filled(self) -> bool:
        """Whether a site's window is full for the first time (each site's first full window is
        evaluated: its born-dead units are read there). Only sites still filling are looked at."""
        sites = self.capture.sites
        if len(sites) != self._sites_seen:  # sites came (or went) since the last look
            self._filling = [site for site in sites.values() if site.stats not in self._filled]
            self._sites_seen = len(sites)
        return any(site.stats.full for site in self._filling)

    # -- results ------------------------------------------------------------------------------
    def report(self, scope: str = "window") -> Report:
        """A :class:`Report` over the rolling window (``"window"``) or since the start (``"total"``).

        Under ``torch.distributed`` this is a collective call (every rank must make it).

        Raises:
            DeadReluError: for an unknown scope.
            NoActivationSitesError: before any observed forward pass with activations.
        """
        if scope not in ("window", "total"):
            raise DeadReluError(f"scope must be 'window' or 'total', got {scope!r}")
        if self.attached:
            self._refuse_edited_model("while the monitor was attached")
        return self._reports((scope,))[0][scope]

    def events_summary(self) -> EventSummary:
        """Counts of born-dead, died and revived units per site (see :class:`EventSummary`).

        Example:
            >>> import torch, deadrelu
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            >>> with deadrelu.Monitor(net, window=2) as mon:
            ...     for _ in range(2):
            ...         _ = net(torch.randn(4, 2)); mon.step()
            >>> mon.events_summary().died
            0
        """
        current = dict(self._ident_name)
        current.update({site_identity(site.info): name for name, site in self.capture.ordered_sites()})
        per_site: dict[str, dict[str, list[int]]] = {}
        for e in self.events:  # under the site's current name, whatever it was called then
            name = current.get(self._name_ident.get(e.site), e.site)
            per_site.setdefault(name, {"born_dead": [], "died": [], "revived": []})[e.kind].append(e.step)
        units = {name: site.stats.units for name, site in self.capture.ordered_sites()}
        for name, n in self._units.items():  # sites only other ranks have run (not a renamed one of ours)
            if current.get(self._name_ident.get(name), name) == name:
                units.setdefault(name, n)
        # dead at the last evaluation, under the current name of the site it was evaluated as
        dead_now = {current.get(self._name_ident.get(name), name): dead for name, dead in self._dead.items()}
        out = []
        for name in units:
            ev = per_site.get(name, {"born_dead": [], "died": [], "revived": []})
            out.append(
                SiteEvents(
                    site=name,
                    units=units[name],
                    born_dead=len(ev["born_dead"]),
                    died=len(ev["died"]),
                    revived=len(ev["revived"]),
                    dead_now=_size(dead_now.get(name, ())),
                    died_steps=tuple(sorted(ev["died"])),
                )
            )
        return EventSummary(tuple(out))

    # -- evaluation -------------------------------------------------------------------------
    def _use_distributed(self) -> bool:
        if self.distributed is False:
            return False
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        if self.distributed and not ready:
            raise DeadReluError("distributed=True but torch.distributed has no initialised process group")
        return ready and dist.get_world_size() > 1

    def _reports(self, scopes: Sequence[str]) -> tuple[dict[str, Report], dict[str, int], dict[str, bool]]:
        """Reports for the given scopes, each site's batch count in the last scope, and whether its window is full.

        One host copy serves every site. Distributed, the ranks first agree on the union of
        their site keys and then sum one buffer laid out by key (:mod:`deadrelu.monitor.ranks`):
        a site one rank lacks counts as zeros there, and no two layers are ever added together.
        """
        states, samples = self._site_states(scopes)
        if not states:
            if not self._ever_attached:
                raise NoActivationSitesError(_NEVER_ATTACHED)
            hint = ""
            if self._op_asks_schedule:
                hint = (
                    "; with compiled=True only graphs that torch.compile's default (Inductor) backend compiles "
                    "after attach() are observed, not eager calls (call torch._dynamo.reset() to recompile)"
                )
            raise NoActivationSitesError(
                "the monitor has not observed an activation yet: run a training forward pass (with grad) "
                f"through {type(self.model).__name__} first{hint}"
            )
        values = _host_values(states)
        global_samples = dict(zip(scopes, samples.tolist()))
        out: dict[str, Report] = {}
        for scope in scopes:
            sites = []
            for state, v in zip(states, values):
                obs = int(v[f"{scope}.observations"][0])
                fired, abs_sum, bad = v[f"{scope}.fired"], v[f"{scope}.abs_sum"], v[f"{scope}.nonfinite"]
                mean_abs = abs_sum / obs if obs else torch.zeros_like(abs_sum)
                totals = UnitTotals(obs, tuple(fired.tolist()), tuple(mean_abs.tolist()), tuple(bad.tolist()))
                site = site_report(state.name, state.view(), totals, self.levels)
                sites.append(prime_unit_classes(site, fired, mean_abs, bad))
            out[scope] = Report(
                sites=tuple(sites),
                levels=self.levels,
                batches=max([s.batches[scope] for s in states]),
                samples=int(global_samples[scope]),
                mode="train",
                model=type(self.model).__name__,
                fingerprint=model_fingerprint(self.model),
                uncaptured=tuple(f"{path} ({why})" for path, why in getattr(self.capture, "uncaptured", {}).items()),
            )
        last = scopes[-1]
        return out, {s.name: s.batches[last] for s in states}, {s.name: s.full for s in states}

    def _site_states(self, scopes: Sequence[str]) -> tuple[list[SiteState], torch.Tensor]:
        """This rank's per-site state tensors (summed over ranks by key when distributed) and sample counts."""
        named = self.capture.ordered_sites()
        local = []
        for name, site in named:
            info = site.info
            state = SiteState(
                (info.module, info.call, info.position, info.occurrence, info.function), name, info, site.unit_dim,
                site.stats.threshold,
                site.stats.units, full=bool(site.stats.full),
            )
            for scope in scopes:
                t = site.stats.totals(scope)
                state.batches[scope] = t.batches  # per rank: ranks step in lockstep, so the largest, not the sum
                for stat, tensor in t.state.items():  # every declared statistic, by name
                    state.tensors[f"{scope}.{stat}"] = tensor
            local.append(state)
        totals = {"window": sum(self._samples_ring), "total": self._samples_total}
        samples = torch.tensor([totals[sc] for sc in scopes], dtype=torch.int64)  # summed over ranks too
        if not self._use_distributed():
            return local, samples
        device = named[0][1].stats.device if named else self._collective_device()
        pooled = not isinstance(self.capture, (ActivationCapture, GraphCapture, BlockCapture))  # ModuleCapture: one per module
        namer = (lambda infos: [i.module or "<root>" for i in infos]) if pooled else display_names
        return reduce_by_key(local, samples.to(device), namer)

    def _collective_device(self) -> torch.device:
        """Where this rank's side of a collective lives when it has no site: NCCL needs the current GPU."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _evaluate(self) -> None:
        if self.attached:
            self._refuse_edited_model("while the monitor was attached")
        try:
            reports, site_batches, full = self._reports(("window",))
        except NoActivationSitesError:
            if self._use_distributed():
                return  # no rank has seen an activation yet (all ranks agree: the union is empty)
            raise
        report = reports["window"]
        # A site's display name can change mid-run (a second call position of its function
        # appears and both get ".k"): lifecycle state and warnings follow the site itself.
        identities = {name: site_identity(site.info) for name, site in self.capture.ordered_sites()}
        self._forget_resized(report, identities)
        self._warn_pooled()
        for name, ident in identities.items():  # every name a site has had -> its current one
            self._name_ident[name] = ident
            self._ident_name[ident] = name
        step = self.steps
        self._last_eval_step = step
        self._units = {s.name: s.units for s in report.sites}
        loss = self._loss_value()
        rows, new_events = [], []
        for s in report.sites:
            n = s.units or 1
            rows.append(
                HistoryRow(
                    step=step,
                    site=s.name,
                    units=s.units,
                    batches=site_batches[s.name],
                    active=s.active / n,
                    asleep=s.asleep / n,
                    dead=s.dead / n,
                    dormant=s.dormant / n,
                    nonfinite=s.nonfinite / n,
                    loss=loss,
                    unobserved=s.unobserved / n,
                )
            )
            if full.get(s.name):
                new_events += self._lifecycle(step, s, identities.get(s.name, s.name))
        if any(full.values()):
            self._first_window_done = True
        self.history.rows.extend(rows)
        self.events.extend(new_events)
        record = LogRecord(step=step, loss=loss, rows=tuple(rows), events=tuple(new_events), report=report)
        for i, sink in enumerate(self.sinks):
            self._guard(i, sink, lambda sink=sink: sink.write(record))

    def _warn_pooled(self) -> None:
        """Compiled mode: a site recorded more often than there were observed forward passes is
        one graph run by several calls of a module (its own ``forward`` holds a graph break, so
        Dynamo compiled it as a frame of its own): nothing in the graph tells those calls apart,
        so their counts are pooled. Said once per site (the eager monitor keeps them apart)."""
        if type(self.capture) is not GraphCapture or not self._forwards or self._scoped:
            return
        for name, site in self.capture.ordered_sites():
            if site.stats.count > self._forwards and name not in self._pooled_warned:
                self._pooled_warned.add(name)
                warnings.warn(
                    f"deadrelu: compiled site {name!r} was recorded {site.stats.count} times in {self._forwards} "
                    "forward pass(es): it is a module called several times per forward whose own forward holds a "
                    "graph break, and compiled mode pools those calls into one site. For one site per call use the "
                    "eager monitor (compiled=False), or remove the graph break",
                    CompiledModelWarning,
                    stacklevel=4,
                )

    def _forget_resized(self, report: Report, identities: dict[str, Any]) -> None:
        """A site whose width differs from the one its lifecycle memory was made for (a state
        resumed into another model): that memory is about other units, so it is dropped, with a
        warning, and the site starts afresh (no false died/revived events)."""
        for s in report.sites:
            before, ident = self._units.get(s.name), identities.get(s.name, s.name)
            if before is None or before == s.units or self._name_ident.get(s.name, ident) != ident:
                continue  # unknown, the same width, or the name of another site before a rename
            for memory in (self._known_dead, self._known_alive, self._born_dead):
                memory.pop(ident, None)
            self._dead.pop(s.name, None)
            self._warned = {key for key in self._warned if key[0] != ident}
            warnings.warn(
                f"deadrelu: site {s.name!r} has {s.units} units, but the monitor state it goes on from was "
                f"made for {before}: that site's unit lifecycle starts afresh (is the checkpoint from another model?)",
                DeadUnitWarning,
                stacklevel=3,
            )

    def _lifecycle(self, step: int, s: SiteReport, ident: Any) -> list[Event]:
        """Events from each unit's last known state, dead or alive (fired, all values finite). An
        evaluation where a unit is NaN/Inf or unobserved says neither: it starts or ends nothing,
        so a dead unit that outputs NaN for a while is not "revived" and then "died" again."""
        # On bool masks over the units: set operations on 100k Python ints take milliseconds.
        dead = s.state_mask("dead")
        alive = s.state_mask("active") | s.state_mask("asleep")  # fired, and every value finite
        was_dead = _unit_mask(self._known_dead.get(ident), s.units)
        was_alive = _unit_mask(self._known_alive.get(ident), s.units)
        fresh = dead & ~was_dead
        born = fresh & ~was_alive  # dead the first time its state is known
        events = [Event(step, s.name, u, "born_dead") for u in _indices(born)]
        events += [Event(step, s.name, u, "died") for u in _indices(fresh & was_alive)]
        events += [Event(step, s.name, u, "revived") for u in _indices(was_dead & alive)]
        self._born_dead[ident] = _unit_mask(self._born_dead.get(ident), s.units) | born
        self._known_dead[ident] = (was_dead & ~alive) | dead
        self._known_alive[ident] = (was_alive & ~dead) | alive
        self._dead[s.name] = dead
        self._maybe_warn(step, s, dead, ident)
        return events

    def _maybe_warn(self, step: int, s: SiteReport, dead: torch.Tensor, ident: Any) -> None:
        frac = s.dead_fraction
        for level in self.warn_at:
            key = (ident, level)
            if frac < level or key in self._warned:
                continue
            self._warned.add(key)
            born = int((dead & _unit_mask(self._born_dead.get(ident), s.units)).sum())
            cause = "born_dead" if born * 2 >= s.dead else "died"
            advice = ADVICE_BORN_DEAD if cause == "born_dead" else ADVICE_DIED
            message = (
                f"deadrelu: layer {s.name!r} has {100 * frac:.1f}% dead units ({s.dead}/{s.units}) at step {step}, "
                f"crossing the {100 * level:g}% warning level; {advice}"
            )
            self.alerts.append(Alert(step, s.name, level, frac, cause, message))
            warnings.warn(message, DeadUnitWarning, stacklevel=4)

    def _loss_value(self) -> float | None:
        loss = self._loss
        if loss is None:
            return None
        try:
            value = float(loss.float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        except (TypeError, ValueError):
            return None
        return value

    def _guard(self, index: int, sink: Sink, action: Callable[[], Any]) -> None:
        """Run a sink action; a failing sink warns once (or raises) and never stops the training run."""
        if index in self._broken:
            return
        try:
            action()
        except Exception as err:
            self._broken.add(index)
            name = getattr(sink, "name", type(sink).__name__)
            message = f"deadrelu: sink {name} failed ({type(err).__name__}: {err}); it is disabled for this run"
            if self.on_sink_error == "raise":
                raise SinkError(message) from err
            warnings.warn(message, SinkWarning, stacklevel=3)


def batch_rows(batch: Any) -> int:
    """The leading dim of the first tensor in a batch (nested tuples, lists and mappings), else 0.

    >>> batch_rows({"x": torch.zeros(5, 3), "y": torch.zeros(5)}), batch_rows((torch.zeros(()),)), batch_rows("text")
    (5, 0, 0)
    """
    first = first_tensor(batch)
    return int(first.shape[0]) if first is not None and first.ndim else 0


def site_identity(info: Any) -> tuple[Any, ...]:
    """What a site is, whatever its display name: module, call, call position, function, occurrence."""
    return (info.module, info.call, info.position, info.function, info.occurrence)


def first_input(args: Any, kwargs: Any) -> torch.Tensor | None:
    """A model call's first batched tensor: depth first through its positional arguments, then
    its keyword ones (``input_ids=...``, HF style), looking inside tuples, lists and dicts; 0-D
    tensors (a scalar option) are skipped.

    >>> first_input(((torch.zeros(()), [torch.zeros(3, 2)]),), {"y": torch.zeros(5)}).shape
    torch.Size([3, 2])
    """
    # A plain loop, not next(generator, None): TorchDynamo traces this (a monitor's root hook
    # under torch.compile), and torch <= 2.6 cannot trace next() with a default.
    for tensor in iter_tensors((args or (), kwargs or {})):
        if tensor.ndim:
            return tensor
    return None


def input_rows(args: Any, kwargs: Any) -> int:
    """The samples of a model call: the leading dim of :func:`first_input` (0 when there is none)."""
    first = first_input(args, kwargs)
    return int(first.shape[0]) if first is not None else 0
