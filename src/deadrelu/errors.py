"""The one exception family deadrelu raises for user errors.

Every user-facing failure (bad model, bad data, a refused rescue) is a
:class:`DeadReluError`, so callers can catch one type and the CLI can turn it
into a single line on stderr with exit code 2.
"""

from __future__ import annotations

__all__ = [
    "DeadReluError",
    "NoActivationSitesError",
    "DataError",
    "ForwardError",
    "RefusedError",
    "ReportFormatError",
]


class DeadReluError(Exception):
    """Base class for every error deadrelu raises on bad input."""


class NoActivationSitesError(DeadReluError):
    """The model ran, but no activation (module or functional call) was seen."""


class DataError(DeadReluError):
    """The data is empty, of the wrong type, or cannot be fed to the model."""


class ForwardError(DeadReluError):
    """The model's forward pass raised; the message names the last site and the input shape."""


class RefusedError(DeadReluError):
    """A rescue or surgery was refused because it could not be proven safe; nothing was changed."""


class ReportFormatError(DeadReluError):
    """Saved report data (JSON) does not follow the report schema.

    The message names the offending field by its path, e.g.
    ``sites[2].fired_counts[5]: expected a non-negative integer, got -1``.
    """
