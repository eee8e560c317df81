"""What every sink shares: the :class:`Sink` base class, its error and warning, and the layouts a record is written in.

A sink receives one :class:`deadrelu.monitor.LogRecord` per evaluation. :func:`record_to_dict` is
the record's JSON layout (what :class:`~deadrelu.monitor.sinks.JSONLSink` writes, versioned by
``SCHEMA_VERSION``) and :func:`record_metrics` its flat per-site scalars (what the TensorBoard and
W&B sinks log). The sinks themselves are in :mod:`deadrelu.monitor.sinks` (files, callables) and
:mod:`deadrelu.monitor.framework_sinks` (TensorBoard, Weights & Biases); every name here is
importable from :mod:`deadrelu.monitor.sinks` too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..errors import DeadReluError

if TYPE_CHECKING:
    from .records import LogRecord

__all__ = ["Sink", "SinkError", "SinkWarning", "record_to_dict", "record_metrics", "SCHEMA_VERSION"]

#: Version of the JSONL record layout.
SCHEMA_VERSION = 1


class SinkError(DeadReluError):
    """A sink could not write (raised when the monitor runs with ``on_sink_error="raise"``)."""


class SinkWarning(UserWarning):
    """A sink failed and was disabled for the rest of the run (issued once per sink)."""


class Sink:
    """Base class: override :meth:`write`; :meth:`open` and :meth:`close` are optional.

    Example:
        >>> class Printer(Sink):
        ...     def write(self, record):
        ...         print(record.step, [round(r.dead, 2) for r in record.rows])
    """

    name = "sink"

    def open(self) -> None:
        """Called when the monitor attaches."""

    def write(self, record: "LogRecord") -> None:
        """Receive one evaluation."""
        raise NotImplementedError

    def close(self) -> None:
        """Called when the monitor detaches."""

    def check(self) -> None:
        """Called when the monitor attaches, before any sink opens: raise here to refuse (a log
        file of another format) before another sink has created or changed a file."""

    def abort(self) -> None:
        """Called after :meth:`close` when the attach that opened this sink fails: undo what
        :meth:`open` left behind (a file sink removes the empty log file it created)."""


def _clean(v: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings that ``float()`` reads back."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def record_to_dict(record: "LogRecord") -> dict[str, Any]:
    """The JSON layout of one record (also what the W&B and callback users can rely on)."""
    return {
        "kind": "deadrelu.monitor",
        "schema_version": SCHEMA_VERSION,
        "step": record.step,
        "loss": _clean(record.loss),
        "sites": [{k: _clean(v) for k, v in r.to_dict().items() if k not in ("step", "loss")} for r in record.rows],
        "events": [{"step": e.step, "site": e.site, "unit": e.unit, "kind": e.kind} for e in record.events],
    }


def record_metrics(record: "LogRecord", prefix: str = "deadrelu") -> dict[str, float]:
    """Flat ``{"<prefix>/<site>/<state>": fraction}`` scalars of one record, for metric loggers.

    Example:
        >>> from deadrelu.monitor import HistoryRow, LogRecord
        >>> row = HistoryRow(5, "relu", 4, 5, 0.5, 0.25, 0.25, 0.25, 0.0)
        >>> record_metrics(LogRecord(5, None, (row,), (), None))["deadrelu/relu/dead"]
        0.25
    """
    out: dict[str, float] = {}
    for row in record.rows:
        for state in ("active", "asleep", "dead", "dormant", "nonfinite", "unobserved"):
            out[f"{prefix}/{row.site}/{state}"] = getattr(row, state)
    return out
