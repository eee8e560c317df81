"""A run ended from outside: SIGTERM while outputs are written, and what a killed run left behind.

``timeout``, a CI runner, ``kill`` and systemd end a process with SIGTERM, whose default action
ends it at once: no ``finally`` runs, and the temporary files a run stages before renaming them
into place stayed in the output folder for good. Inside :func:`sigterm_raises` SIGTERM raises
:class:`Terminated` instead, so the cleanup runs; :func:`sigterm_deferred` holds it back over a
few steps that must not be cut in half (the renames of a set of outputs, the bookkeeping of a
temporary file just made) and raises it after them.

Only the main thread can set signal handlers, and a handler that is not SIGTERM's default
belongs to whoever set it (an application embedding deadrelu): in both cases nothing changes.

A run killed outright (SIGKILL, a power cut) runs no code at all; its temporaries carry its
process id, and :func:`remove_stale_temporaries` (from :mod:`deadrelu.core.files`, where every
atomic write takes its temporary's name, re-exported here) lets a later run remove them once no
process has that id.

Example:
    >>> with sigterm_raises():
    ...     with sigterm_deferred():
    ...         pass  # a SIGTERM here is raised as Terminated when this block ends
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

from ..core.files import remove_stale_temporaries

__all__ = ["Terminated", "sigterm_raises", "sigterm_deferred", "remove_stale_temporaries", "TERMINATED_EXIT"]

#: The exit status of a command ended by SIGTERM (128 + 15), as a shell reports it.
TERMINATED_EXIT = 128 + int(signal.SIGTERM)

_pending = False  # a SIGTERM arrived while deferred
_deferring = 0  # depth of sigterm_deferred blocks (main thread only)


class Terminated(SystemExit):
    """Raised in place of SIGTERM's default action; uncaught, the process exits with 143.

    A ``SystemExit``, so ``except Exception`` clauses let it pass, as they let the signal pass.

    >>> Terminated().code
    143
    """

    def __init__(self) -> None:
        super().__init__(TERMINATED_EXIT)


def _on_sigterm(signum: int, frame: Any) -> None:
    """The handler: raise now, or remember the signal while a deferred block runs."""
    global _pending
    if _deferring:
        _pending = True
        return
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`; the previous handler is back afterwards.

    Nested blocks share the outer one's handler. Outside the main thread, or where SIGTERM
    already has a handler that is not the default, nothing changes.
    """
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold a SIGTERM back until the block ends, then raise :class:`Terminated` (inside :func:`sigterm_raises`).

    Outside it, or outside the main thread, SIGTERM acts as it would anyway.
    """
    global _deferring, _pending
    if not _main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            _pending = False
            raise Terminated()
