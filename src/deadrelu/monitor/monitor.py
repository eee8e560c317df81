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
* **born dead**: dead over the first full window (its first ``window`` batches). **died at
  step k**: alive at the previous evaluation and dead at the evaluation of step ``k`` (it
  fired in none of the last ``window`` observed batches). **revived at step k**: dead before,
  fired in some batch since (also one that has left the window again).
* Until a site has seen ``window`` batches its fractions cover the batches so far and
  no lifecycle events or warnings are issued for it.

Where it lives
--------------
:class:`Monitor` (this module) holds the options, attaching and detaching, checkpoints and the
training-loop call. It is put together from three parts, each in a module of its own:
:mod:`deadrelu.monitor.forward_gate` (which forward passes are observed, their samples,
``observe()``), :mod:`deadrelu.monitor.evaluation` (the host copy, reports, history rows and sink
writes) and :mod:`deadrelu.monitor.unit_lifecycle` (lifecycle events, dead-unit warnings and their
advice); the names they define are importable from here too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from . import graph_capture
from .blocks import BlockCapture
from .evaluation import NEVER_ATTACHED, Evaluation
from .forward_gate import ForwardGate
from .graph_capture import CompiledModelWarning, GraphCapture, refuse_mask
from .window import WindowStats
from ..core.capture import (
    ActivationCapture,
    ThresholdSpec,
    UnitDimSpec,
    checked_unit_dim,
    compiled_blocks,
    copy_safe_hook,
    is_compiled_wrapper,
)
from ..errors import DeadReluError
from ..core.report import Report, Levels
from .records import Alert, Event, EventSummary, History, HistoryRow, LogRecord, SiteEvents
from .resume import MonitorState, parse_state
from .sinks import Sink, SinkError, SinkWarning, as_sinks
from .structure import ModelLayout
from .unit_lifecycle import DeadUnitWarning, UnitLifecycle, index_sets
from ..core.inputs import checked_mask_option, refuse_meta_weights

# Re-exported: defined with the monitor's parts, importable from here too.
from .forward_gate import batch_rows, first_input, input_rows
from .unit_lifecycle import ADVICE_BORN_DEAD, ADVICE_DIED, UnitMemory, site_identity

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

SinkSpec = Union[Sink, str, os.PathLike, Callable[[LogRecord], Any]]

_DETACHED = (
    "the monitor is detached (its `with` block ended, or detach() was called), so it observes nothing and "
    "its logs are closed; this call changed nothing. Call mon.attach() to go on monitoring, or make a new "
    "deadrelu.Monitor"
)


class _MonitorCapture(ActivationCapture):
    """ActivationCapture whose :meth:`forward_scope` composes with calls of the root module inside it,
    and observes there only what runs with gradients on (the grad-mode rule of root calls)."""

    scope_needs_grad = True

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


class Monitor(ForwardGate, Evaluation, UnitLifecycle):
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
            self.capture.on_forward, self.capture.on_forward_discarded = self._count_call_rows, self._uncount_call_rows
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
            known_dead=index_sets(self._known_dead),
            known_alive=index_sets(self._known_alive),
            born_dead=index_sets(self._born_dead),
            dead=index_sets(self._dead),
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
        self.history.aliases.update({n: self._ident_name[i] for n, i in self._name_ident.items() if i in self._ident_name})
        self._units = parsed.units

    @property
    def attached(self) -> bool:
        """True while hooks are registered."""
        return self._gate_handle is not None

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
            warnings.warn(NEVER_ATTACHED + "; this step and the ones before were not observed", stacklevel=2)
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
