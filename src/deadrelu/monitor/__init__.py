"""Live tracking during training: the engine, its records, rolling windows, sinks and the live view."""

from .monitor import CompiledModelWarning, DeadUnitWarning, Monitor
from .records import Alert, Event, EventSummary, History, HistoryRow, LogRecord, SiteEvents

__all__ = [
    "Monitor",
    "DeadUnitWarning",
    "CompiledModelWarning",
    "HistoryRow",
    "History",
    "Event",
    "SiteEvents",
    "EventSummary",
    "Alert",
    "LogRecord",
]
