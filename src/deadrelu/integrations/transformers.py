"""Hugging Face ``transformers`` integration: :class:`DeadReluTrainerCallback`.

The callback builds a :class:`deadrelu.Monitor` on the trainer's model in
``on_train_begin``, steps it in ``on_step_end`` (once per optimizer step; with gradient
accumulation every micro-batch forward is one window batch), and detaches in
``on_train_end``. At each checkpoint the monitor's state is saved in the ``checkpoint-N`` folder
as ``deadrelu_monitor-<digest>.json``, the digest made of the callback's options (so two callbacks,
say a short and a long window, each resume their own monitor), and
``train(resume_from_checkpoint=...)`` reads it back (a checkpoint from another ``output_dir`` is
looked for there too, under its step; one saved as ``deadrelu_monitor.json`` by an earlier release
still resumes). Each evaluation's ``deadrelu/<site>/<state>`` scalars are added to the
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

import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from .._imports import require
from ..core.files import atomic_write_text
from ..errors import DeadReluError
from ..monitor.monitor import LogRecord, Monitor
from ..monitor.sinks import Sink, SinkError, SinkWarning, as_sinks, record_metrics

_tf = require("transformers", "transformers")

__all__ = ["DeadReluTrainerCallback", "STATE_FILE"]

#: The monitor's state file in each checkpoint-N folder before the name held the callback's options
#: (see :attr:`DeadReluTrainerCallback.state_file`); a checkpoint that has only this one still resumes.
STATE_FILE = "deadrelu_monitor.json"


def _option_text(value: Any) -> Any:
    """An option as the state file's name reads it: plain values as they are, containers item by
    item, a function by its name and any other object by its type (its repr may hold an address)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_option_text(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _option_text(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return getattr(value, "__qualname__", type(value).__name__)


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
        DeadReluError: at ``train()``, when another callback in the trainer has options that give
            the same :attr:`state_file` (the same options): each would resume the other's monitor.

    Example:
        >>> cb = DeadReluTrainerCallback(window=20, log_every=10)  # doctest: +SKIP
    """

    def __init__(self, *, log_to_trainer: bool = True, **monitor_kwargs: Any) -> None:
        self.monitor_kwargs = monitor_kwargs
        self.log_to_trainer = log_to_trainer
        self.monitor: Monitor | None = None
        self._pending = _Pending()
        self._run_state: Any = None  # the TrainerState of the run this callback monitors, while it runs

    #: The callbacks monitoring a run now: two of one state file in one trainer are refused.
    _running: "weakref.WeakSet[DeadReluTrainerCallback]" = weakref.WeakSet()

    @property
    def state_file(self) -> str:
        """The name of the monitor's state file in each ``checkpoint-N`` folder: a digest of this
        callback's options, so two callbacks with other options in one Trainer (a short and a long
        window) each save and resume their own monitor instead of one overwriting the other's."""
        options = {"log_to_trainer": self.log_to_trainer, **self.monitor_kwargs}
        text = repr(sorted((k, _option_text(v)) for k, v in options.items()))
        return f"deadrelu_monitor-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"

    def add_to(self, trainer: Any) -> "DeadReluTrainerCallback":
        """Register with ``trainer`` ahead of its other callbacks, so reporters see our scalars."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("DeadReluTrainerCallback needs the model: the trainer passes it as model=")
        self.detach()
        self._refuse_a_twin(state)
        self._pending.metrics = {}  # a previous run's last evaluation is not this run's
        kwargs_ = dict(self.monitor_kwargs)
        if getattr(args, "torch_compile", False) is True:
            kwargs_.setdefault("compiled", True)  # the Trainer compiles the model after this callback attaches
        sinks = as_sinks(kwargs_.pop("sinks", ()))
        if self.log_to_trainer:
            sinks.append(self._pending)
        self.monitor = Monitor(model, sinks=sinks, **kwargs_)
        if state.global_step > 0:  # resume_from_checkpoint: the trainer state is the checkpoint's
            self._resume(self.monitor, _checkpoint_dir(args, state), state.global_step)
        self.monitor.attach()
        self._run_state = state
        DeadReluTrainerCallback._running.add(self)

    def _refuse_a_twin(self, state: Any) -> None:
        """Refuse to run beside a callback of the same state file in this trainer (the TrainerState
        is the trainer's, shared by its callbacks): at each save one would overwrite the other's.

        Raises:
            DeadReluError: naming the file; the twin, attached earlier in this ``train()``, is
                detached, so the failed call leaves the model without hooks.
        """
        name = self.state_file
        for other in list(DeadReluTrainerCallback._running):
            if other is not self and other._run_state is state and other.state_file == name:
                other.detach()
                raise DeadReluError(
                    "two DeadReluTrainerCallbacks in one Trainer have the same options (functions count by name, "
                    f"other objects by type), so both would save their monitor's state to checkpoint-N/{name} and "
                    "each resume the other's: give one other options (a window, log_every) or use one callback"
                )

    def _resume(self, monitor: Monitor, folder: str, step: int) -> None:
        path = os.path.join(folder, self.state_file)
        legacy = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path) and os.path.isfile(legacy):
            path = legacy  # a checkpoint saved before the file name held the options
        if not os.path.isfile(path):
            path = self._state_saved_with_other_options(folder, step)
        if path is None:
            return
        try:
            with open(path, encoding="utf-8") as fh:
                saved = json.load(fh)
        except (OSError, ValueError) as err:
            raise DeadReluError(f"cannot read the monitor state {path}: {err}") from err
        try:
            monitor.load_state_dict(saved)
        except DeadReluError as err:
            raise DeadReluError(f"{path}: {err}") from err

    def _state_saved_with_other_options(self, folder: str, step: int) -> str | None:
        """The checkpoint's one monitor state when it was saved by a callback with other options (a
        resumed run that changed ``log_every`` or the window), or None, with a warning either way.

        The state holds the lifecycle, history and events, not the rolling windows, so another
        window or schedule goes on from it; with several states there is no telling whose it is."""
        prefix, suffix = STATE_FILE.rsplit(".", 1)
        saved = sorted(n for n in os.listdir(folder) if n.startswith(f"{prefix}-") and n.endswith(f".{suffix}"))
        own = os.path.join(folder, self.state_file)
        if len(saved) == 1:
            warnings.warn(
                f"deadrelu: training resumes at step {step} and {own} does not exist; the checkpoint's one "
                f"monitor state, {saved[0]}, was saved by a callback with other options: the monitor goes on "
                "from it (its rolling window starts empty)",
                stacklevel=4,
            )
            return os.path.join(folder, saved[0])
        others = f" (it holds {len(saved)} of other callbacks: {', '.join(saved)})" if saved else ""
        warnings.warn(
            f"deadrelu: training resumes at step {step} but {own} does not exist{others}: the monitor starts "
            "afresh (its dead units count as born dead again)",
            stacklevel=4,
        )
        return None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the Trainer wrote checkpoint-N: the monitor's state goes beside it, so
        # train(resume_from_checkpoint=...) goes on with its lifecycle (see on_train_begin).
        folder = _checkpoint_dir(args, state)
        # Evaluations are reduced over ranks, so every rank holds the same lifecycle: one writes it.
        main_process = getattr(state, "is_world_process_zero", True)
        if self.monitor is not None and main_process and os.path.isdir(folder):
            # strict JSON (a NaN loss is a string in the state), so any JSON reader takes the file
            atomic_write_text(os.path.join(folder, self.state_file), json.dumps(self.monitor.state_dict(), allow_nan=False))

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
                self.detach()
        # The final evaluation comes after the trainer's last log: it joins the last log entry if
        # that is of this step, and is dropped otherwise (never carried into a next run's logs).
        self.on_log(args, state, control, logs=None)

    def detach(self) -> None:
        """Remove the monitor's hooks (safe to call twice; for runs that fail)."""
        DeadReluTrainerCallback._running.discard(self)
        self._run_state = None
        if self.monitor is not None:
            self.monitor.detach()

    def __enter__(self) -> "DeadReluTrainerCallback":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        try:
            self.detach()
        except SinkError as err:
            if exc_type is None:
                raise
            # a sink failing to close must not replace the training run's own error
            warnings.warn(str(err), SinkWarning, stacklevel=2)


def _checkpoint_dir(args: Any, state: Any) -> str:
    """The folder the Trainer saves the checkpoint of ``state.global_step`` in (``output_dir/checkpoint-N``)."""
    prefix = getattr(_tf.trainer_utils, "PREFIX_CHECKPOINT_DIR", "checkpoint")
    return os.path.join(args.output_dir, f"{prefix}-{state.global_step}")
