"""Sinks that log to a training framework's tracker: TensorBoard event files and Weights & Biases runs.

Both log the flat per-site fractions of :func:`~deadrelu.monitor.sink_protocol.record_metrics`
(``deadrelu/<site>/dead`` ...) and, unless turned off, a histogram of each site's per-unit firing
rates. Their libraries are optional extras, imported when a sink is made
(``pip install "deadrelu[tensorboard]"``, ``"deadrelu[wandb]"``). Both sinks are importable from
:mod:`deadrelu.monitor.sinks` too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._imports import require
from ..errors import DeadReluError
from .sink_protocol import Sink, SinkError, record_metrics

if TYPE_CHECKING:
    from .records import LogRecord

__all__ = ["TensorBoardSink", "WandbSink"]


class TensorBoardSink(Sink):
    """Per-site scalars (``deadrelu/<site>/dead`` ...) and a histogram of per-unit window firing rates.

    Uses ``torch.utils.tensorboard.SummaryWriter`` (needs ``pip install "deadrelu[tensorboard]"``).

    Args:
        log_dir: folder for the event files (ignored when ``writer`` is given).
        writer: an existing ``SummaryWriter`` to share with your own logging (not closed by the sink).
        histograms: also log the per-unit firing-rate histogram of every site.

    Raises:
        ModuleNotFoundError: when tensorboard is not installed.
        DeadReluError: when ``log_dir`` is an existing file.

    Example:
        >>> sink = TensorBoardSink("runs/exp1")  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None, histograms: bool = True):
        require("tensorboard", "tensorboard")
        self.log_dir = None if log_dir is None else str(log_dir)
        if writer is None and self.log_dir is not None and os.path.exists(self.log_dir) and not os.path.isdir(self.log_dir):
            # SummaryWriter would fail only at attach (FileExistsError), after the run has started
            raise DeadReluError(f"TensorBoardSink needs a folder for its event files, but {self.log_dir} is a file")
        self._writer = writer
        self._owned = writer is None
        self.histograms = histograms
        self.name = f"TensorBoardSink({self.log_dir or 'writer'})"
        self._created: tuple[Path, list[Path], set[str]] | None = None  # what the last open() made, for abort()

    def open(self) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # SummaryWriter makes its folder (and, without log_dir, runs/<time>_<host>) and an
            # event file at once: note what was there, so a failed attach can take back the rest.
            target = None if self.log_dir is None else Path(self.log_dir)
            missing = _missing_folders(Path("runs") if target is None else target)
            before = _names(target) if target is not None and not missing else set()
            self._writer = SummaryWriter(log_dir=self.log_dir)  # writes its event file already
            folder = Path(self._writer.log_dir)
            if target is None:  # a new runs/<time>_<host> folder, inside runs/
                missing = [folder, *missing]
            self._created = (folder, missing, before)

    def abort(self) -> None:
        """Remove the event file this sink's failed attach created, and the folders it made while
        they hold nothing else; a folder or file that was there before is never touched."""
        created, self._created = self._created, None
        if created is None or self._writer is not None:
            return
        folder, missing, before = created
        new = _names(folder) - before
        if any(not n.startswith("events.out.tfevents.") for n in new):
            return  # something else was put there meanwhile: leave it all
        for n in new:
            with contextlib.suppress(OSError):
                (folder / n).unlink()
        for d in missing:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()  # only an empty folder goes

    def write(self, record: "LogRecord") -> None:
        if self._writer is None:
            self.open()
        w = self._writer
        for tag, value in record_metrics(record).items():
            w.add_scalar(tag, value, record.step)
        if self.histograms:
            import torch

            for site in record.report.sites:
                w.add_histogram(f"deadrelu/{site.name}/firing_rate", torch.tensor(site.firing_rate), record.step)
        if record.loss is not None:
            w.add_scalar("deadrelu/loss", record.loss, record.step)
        w.flush()

    def close(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            if self._owned:
                w.close()
            else:
                w.flush()
                self._writer = w


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


class WandbSink(Sink):
    """Log per-site fractions to Weights & Biases (``deadrelu/<site>/dead`` ...).

    Args:
        run: a ``wandb`` run; defaults to the active ``wandb.run`` at write time.
        commit: passed to ``log``; ``False`` merges into your next ``wandb.log`` call.
        histograms: also log the per-unit firing-rate histogram of every site.

    Raises:
        ModuleNotFoundError: when wandb is not installed.

    Example:
        >>> sink = WandbSink()  # doctest: +SKIP
    """

    def __init__(self, run: Any = None, *, commit: bool | None = None, histograms: bool = True) -> None:
        self._wandb = require("wandb", "wandb")
        self.run = run
        self.commit = commit
        self.histograms = histograms
        self.name = "WandbSink"

    def write(self, record: "LogRecord") -> None:
        data: dict[str, Any] = {"deadrelu/step": record.step, **record_metrics(record)}
        if self.histograms:
            for site in record.report.sites:
                data[f"deadrelu/{site.name}/firing_rate"] = self._wandb.Histogram(list(site.firing_rate))
        run = self.run if self.run is not None else getattr(self._wandb, "run", None)
        if run is None:
            raise SinkError("no wandb run: call wandb.init(...) first or pass run=")
        kwargs = {} if self.commit is None else {"commit": self.commit}
        run.log(data, **kwargs)
