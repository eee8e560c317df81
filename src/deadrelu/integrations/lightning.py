"""PyTorch Lightning integration: :class:`DeadReluCallback`.

The callback builds a :class:`deadrelu.Monitor` on the ``LightningModule`` in
``on_fit_start`` (after ``configure_model``, so layers made there are seen), observes each ``training_step`` up to its backward as one forward pass
(so steps that call submodules directly are seen; with manual optimization, each forward
after a backward up to the next is one more), steps it after every training batch
(passing the batch loss), logs
each evaluation through every logger of the trainer (``trainer.loggers``) as
``deadrelu/<site>/<state>`` scalars at ``trainer.global_step``, and detaches in
``teardown`` and ``on_exception``. The monitor's state goes into Lightning checkpoints, so
a run resumed with ``ckpt_path=`` goes on with its history and lifecycle. Validation runs under ``torch.inference_mode`` and so
is never observed. ``lightning.pytorch`` is used when installed, otherwise the older
``pytorch_lightning`` package.

Example:
    >>> import lightning  # doctest: +SKIP
    >>> cb = DeadReluCallback(window=50, log_every=50)  # doctest: +SKIP
    >>> lightning.Trainer(callbacks=[cb]).fit(model, loader)  # doctest: +SKIP
    >>> cb.monitor.events_summary()  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

from .._imports import available, require
from ..monitor.monitor import LogRecord, Monitor
from ..monitor.sinks import Sink, SinkError, SinkWarning, as_sinks, record_metrics

if available("lightning"):
    _pl = require("lightning.pytorch", "lightning")
else:
    _pl = require("pytorch_lightning", "lightning")

__all__ = ["DeadReluCallback"]


class _TrainerLoggers(Sink):
    """Sends each evaluation to ``trainer.loggers`` (TensorBoard, CSV, W&B, ... as configured)."""

    name = "lightning loggers"

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def write(self, record: LogRecord) -> None:
        metrics = record_metrics(record)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)


class DeadReluCallback(_pl.Callback):
    """Monitor unit health during ``Trainer.fit`` and log it through the trainer's loggers.

    Args:
        log_to_trainer: also send evaluations to ``trainer.loggers`` (default True).
        **monitor_kwargs: passed to :class:`deadrelu.Monitor` (``every``, ``window``,
            ``log_every``, ``sinks``, ``live``, ``warn_at``, ...). ``log_every`` counts
            training batches.

    Attributes:
        monitor: the :class:`deadrelu.Monitor` of the last fit (None before ``on_fit_start``, which
            comes after ``configure_model``: layers made there are monitored).

    Raises:
        ModuleNotFoundError: when neither ``lightning`` nor ``pytorch_lightning`` is installed.

    Example:
        >>> cb = DeadReluCallback(window=20, log_every=10)  # doctest: +SKIP
    """

    def __init__(self, *, log_to_trainer: bool = True, **monitor_kwargs: Any) -> None:
        super().__init__()
        self.monitor_kwargs = monitor_kwargs
        self.log_to_trainer = log_to_trainer
        self.monitor: Monitor | None = None
        self._scope: Any = None
        self._in_batch = False  # between on_train_batch_start and on_train_batch_end
        self._resumed: Any = None  # a checkpoint's monitor state restored before on_fit_start() built the monitor

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Not in setup(): Lightning calls LightningModule.configure_model (where layers are made
        # lazily, or sharded) after the setup hooks, so the model is complete only from here on.
        kwargs = dict(self.monitor_kwargs)
        sinks = as_sinks(kwargs.pop("sinks", ()))
        if self.log_to_trainer:
            sinks.append(_TrainerLoggers(trainer))
        self.monitor = Monitor(pl_module, sinks=sinks, **kwargs)
        if self._resumed is not None:
            self.monitor.load_state_dict(self._resumed)
            self._resumed = None
        self.monitor.attach()

    @property
    def state_key(self) -> str:
        """Where Lightning keeps this callback's state in a checkpoint: the class name and its plain
        options, so two callbacks with other options (a short and a long window) can run in one
        Trainer and each resumes its own monitor (Lightning refuses two callbacks of one key)."""
        plain = (bool, int, float, str, type(None))
        options = {
            k: v if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v)) else type(v).__name__
            for k, v in sorted(self.monitor_kwargs.items())
        }
        return self._generate_state_key(log_to_trainer=self.log_to_trainer, **options)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        legacy = type(self).__qualname__
        if self.state_key in states:
            return  # Lightning hands it to load_state_dict
        if legacy in states:  # saved before the state key held the options: under the class name
            self.load_state_dict(states[legacy])
            return
        # Resumed with other options (another log_every or window): the key differs. The state holds
        # the lifecycle, history and events, not the rolling windows, so the one saved state goes on.
        saved = sorted(k for k in states if isinstance(k, str) and k.startswith(legacy + "{"))
        if len(saved) == 1:
            warnings.warn(
                f"deadrelu: the checkpoint's one monitor state, {saved[0]}, was saved by a callback with other "
                "options: the monitor goes on from it (its rolling window starts empty)",
                stacklevel=2,
            )
            self.load_state_dict(states[saved[0]])
        elif saved:
            warnings.warn(
                f"deadrelu: the checkpoint holds {len(saved)} monitor states of callbacks with other options "
                f"({', '.join(saved)}) and none of this one's: the monitor starts afresh (its dead units count as "
                "born dead again)",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (:meth:`deadrelu.Monitor.state_dict`), saved in Lightning checkpoints."""
        return self.monitor.state_dict() if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the monitor from a checkpoint (``Trainer.fit(ckpt_path=...)``): its steps, history,
        events and lifecycle memory go on, so dead units are not reported as born dead again."""
        if not state_dict:  # saved before on_fit_start built a monitor
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._resumed = state_dict

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # training_step may call submodules directly (self.net(x)) and never the module
        # itself, so the whole step up to backward is observed as one forward pass.
        if self.monitor is not None and self.monitor.attached:
            self._in_batch = True
            # The block opens here, not in a caller of training_step: its functional calls'
            # positions end at training_step's frame (Lightning reaches it by several paths).
            self._scope = self.monitor.observe(batch, entry=pl_module.training_step)
            self._scope.__enter__()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._close_scope()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        # Manual optimization may run more forwards after a backward (a GAN's second network, a
        # second loss): each of them up to its own backward is observed too. No batch is given,
        # so its samples come from its first call, and a scope in which nothing runs (the
        # optimizer step of automatic optimization) counts nothing.
        if self._in_batch and self._scope is None and self.monitor is not None and self.monitor.attached:
            self._scope = self.monitor.observe(entry=pl_module.training_step)
            self._scope.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch = False
        self._close_scope()
        if self.monitor is None or not self.monitor.attached:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.step(loss)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._in_batch = False
        self._close_scope()
        self._detach(final=False)

    def _close_scope(self) -> None:
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.__exit__(None, None, None)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._detach(final=True)

    def _detach(self, final: bool) -> None:
        mon = self.monitor
        if mon is None or not mon.attached:
            return
        try:
            if final:
                mon.finish()
        finally:
            try:
                mon.detach()
            except SinkError as err:
                if final:
                    raise
                # on_exception: a sink failing to close must not replace the run's own error
                warnings.warn(str(err), SinkWarning, stacklevel=2)
