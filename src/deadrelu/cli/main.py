"""The ``deadrelu`` command line: one parser per verb, one function per verb that returns data.

The promise: every user error (bad options, bad files, bad data, refusals, a full disk)
prints ONE line on stderr and exits 2, without a traceback, and leaves every input file
as it was. Each verb module (``scan``, ``lab``) lists its verbs in ``VERBS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from ..errors import DeadReluError
from ..lab.termination import TERMINATED_EXIT, Terminated
from . import lab as lab_verbs
from . import scan as scan_verbs
from .loading import one_line
from .options import OneLineParser

__all__ = ["main", "build_parser"]

# Verbs live in their own modules (scan, lab), each with a VERBS table; main only collects them.
_VERBS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    **scan_verbs.VERBS,
    **lab_verbs.VERBS,
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all verbs); usage errors are one line (see :class:`OneLineParser`)."""
    from .. import __version__

    parser = OneLineParser(prog="deadrelu", description="Find, watch and fix dead neurons in PyTorch models.")
    parser.add_argument("--version", action="version", version=f"deadrelu {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for add, _ in _VERBS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deadrelu`` command; returns the exit code.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        deadrelu 0.1.0
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: one line and SystemExit(2), as argparse does
    _, run = _VERBS[args.verb]
    try:
        return run(args)
    except BrokenPipeError as err:
        if not _stdout_closed():
            return _fail(args.verb, err)  # another pipe broke (a --json FIFO's reader went away)
        # stdout's reader left (`deadrelu scan ... | head -1`): stop quietly, as standard tools do
        _silence_stdout()
        return _SIGPIPE_EXIT
    except (DeadReluError, ModuleNotFoundError, OSError, MemoryError) as err:
        # OSError: a file that vanished or became unreadable mid-run, a full disk, no permission.
        return _fail(args.verb, err)
    except KeyboardInterrupt:
        print(f"deadrelu {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM while outputs were written: their temporary files are gone
        print(f"deadrelu {args.verb}: terminated", file=sys.stderr)
        return TERMINATED_EXIT


#: The exit status of a command ended by SIGPIPE (128 + 13), as a shell reports it.
_SIGPIPE_EXIT = 141


def _fail(verb: str, err: BaseException) -> int:
    """Print the one error line for ``err`` on stderr; return the exit code 2."""
    text = one_line(err) or type(err).__name__
    if isinstance(err, MemoryError):
        text = "out of memory" + (f": {text}" if text != "MemoryError" else "; try a smaller --batch-size")
    print(f"deadrelu {verb}: error: {text}", file=sys.stderr)
    return 2


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader went away (poll says POLLERR/POLLHUP)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # closed, or no descriptor (a test's StringIO)
        return True
    if not hasattr(select, "poll"):  # Windows: no way to ask; the broken pipe was most likely stdout
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at the null device, so the interpreter's flush at exit raises no second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test's StringIO)
        pass


if __name__ == "__main__":  # pragma: no cover  (python -m deadrelu.cli.main)
    sys.exit(main())
