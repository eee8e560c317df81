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
process id, and :func:`remove_stale_temporaries` lets a later run remove them once no process
has that id.

Example:
    >>> with sigterm_raises():
    ...     with sigterm_deferred():
    ...         pass  # a SIGTERM here is raised as Terminated when this block ends
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

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


#: A staged temporary (``.NAME.PID.XXXXXXXX.tmp``, ``OutputStage.add``) or backup link (``.NAME.PID.bak``).
_STAGED_NAME = r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?:[A-Za-z0-9_]{8}\.tmp|bak)"


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (POSIX; elsewhere always False: nothing is removed)."""
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: it runs, as another user; a number no pid can be
        return False
    return False


def remove_stale_temporaries(out_dir: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove what a killed run left for output ``name`` in ``out_dir``; returns the paths removed.

    Only files of :class:`deadrelu.lab.demo.OutputStage`'s own naming for this ``name`` whose
    process no longer runs: a temporary ``.NAME.PID.XXXXXXXX.tmp``, and a backup link
    ``.NAME.PID.bak`` while it is still the same file as ``NAME`` (otherwise it is the only copy of
    an earlier version, and stays).
    Another live run's files, other names and other files are never touched.

    Example:
        >>> import tempfile
        >>> remove_stale_temporaries(tempfile.mkdtemp(), "results.json")
        []
    """
    directory = Path(out_dir)
    pattern = re.compile(_STAGED_NAME)
    removed = []
    try:
        entries = [p for p in directory.iterdir() if p.name.startswith(f".{name}.")]
    except OSError:
        return []
    for path in entries:
        match = pattern.fullmatch(path.name)
        if not match or match["name"] != name or not _process_gone(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if path.suffix == ".bak" and not (path.is_file() and os.path.samefile(path, directory / name)):
                continue
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed
