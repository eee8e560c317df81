"""Hugging Face ``transformers`` integration: :class:`DeadReluTrainerCallback`.

The callback builds a :class:`deadrelu.Monitor` on the trainer's model in
``on_train_begin``, steps it in ``on_step_end`` (once per optimizer step; with gradient
accumulation every micro-batch forward is one window batch), and detaches in
``on_train_end``. Each evaluation's ``deadrelu/<site>/<state>`` scalars are added to the
next ``Trainer.log`` call — to the ``logs`` dict the reporting callbacks receive and to
``state.log_history`` (saved in ``trainer_state.json``).

The ``TrainerCallback`` API has no exception event, so a failing ``trainer.train()``
cannot detach the hooks by itself: use the callback as a context manager (shown below)
or call :meth:`DeadReluTrainerCallback.detach`. Add it with :meth:`add_to` so it runs
before the reporting callbacks (TensorBoard, W&B, ...), which then log its scalars too.

Example:
    >>> cb = DeadReluTrainerCallback(window=50)  # doctest: +SKIP
    >>> with cb:  # doctest: +SKIP
    ...     cb.add_to(trainer)
    ...     trainer.train()
"""

from __future__ import annotations

from typing import Any

from .._imports import require
from ..monitor.monitor import LogRecord, Monitor
from ..monitor.sinks import Sink, as_sinks, record_metrics

_tf = require("transformers", "transformers")

__all__ = ["DeadReluTrainerCallback"]


class _Pending(Sink):
    """Keeps the latest evaluation's scalars until the trainer's next log call."""

    name = "transformers log"

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def write(self, record: LogRecord) -> None:
        self.metrics.update(record_metrics(record))


class DeadReluTrainerCallback(_tf.TrainerCallback):
    """Monitor unit health during ``Trainer.train`` and log it through the trainer's own logging.

    Args:
        log_to_trainer: add evaluations to the trainer's logs (default True).
        **monitor_kwargs: passed to :class:`deadrelu.Monitor` (``every``, ``window``,
            ``log_every``, ``sinks``, ``live``, ``warn_at``, ...). ``log_every`` counts
            optimizer steps.

    Attributes:
        monitor: the :class:`deadrelu.Monitor` of the last training run (None before it starts).

    Raises:
        ModuleNotFoundError: when transformers is not installed.

    Example:
        >>> cb = DeadReluTrainerCallback(window=20, log_every=10)  # doctest: +SKIP
    """

    def __init__(self, *, log_to_trainer: bool = True, **monitor_kwargs: Any) -> None:
        self.monitor_kwargs = monitor_kwargs
        self.log_to_trainer = log_to_trainer
        self.monitor: Monitor | None = None
        self._pending = _Pending()

    def add_to(self, trainer: Any) -> "DeadReluTrainerCallback":
        """Register with ``trainer`` ahead of its other callbacks, so reporters see our scalars."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("DeadReluTrainerCallback needs the model: the trainer passes it as model=")
        self.detach()
        self._pending.metrics = {}  # a previous run's last evaluation is not this run's
        kwargs_ = dict(self.monitor_kwargs)
        if getattr(args, "torch_compile", False) is True:
            kwargs_.setdefault("compiled", True)  # the Trainer compiles the model after this callback attaches
        sinks = as_sinks(kwargs_.pop("sinks", ()))
        if self.log_to_trainer:
            sinks.append(self._pending)
        self.monitor = Monitor(model, sinks=sinks, **kwargs_)
        self.monitor.attach()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None and self.monitor.attached:
            self.monitor.step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        metrics, self._pending.metrics = self._pending.metrics, {}
        if not metrics:
            return
        if logs is not None:
            logs.update(metrics)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mon = self.monitor
        if mon is not None and mon.attached:
            try:
                mon.finish()
            finally:
                mon.detach()
        # The final evaluation comes after the trainer's last log: it joins the last log entry if
        # that is of this step, and is dropped otherwise (never carried into a next run's logs).
        self.on_log(args, state, control, logs=None)

    def detach(self) -> None:
        """Remove the monitor's hooks (safe to call twice; for runs that fail)."""
        if self.monitor is not None:
            self.monitor.detach()

    def __enter__(self) -> "DeadReluTrainerCallback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
