"""The ``deadrelu`` command line: one parser per verb, one function per verb that returns data.

The promise: every user error (bad options, bad files, bad data, refusals, a full disk)
prints ONE line on stderr and exits 2, without a traceback, and leaves every input file
as it was. Each verb module (``scan``, ``lab``) lists its verbs in ``VERBS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..errors import DeadReluError
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
    except (DeadReluError, ModuleNotFoundError, OSError, MemoryError) as err:
        # OSError: a file that vanished or became unreadable mid-run, a full disk, no permission.
        text = one_line(err) or type(err).__name__
        if isinstance(err, MemoryError):
            text = "out of memory" + (f": {text}" if text != "MemoryError" else "; try a smaller --batch-size")
        print(f"deadrelu {args.verb}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deadrelu {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover  (python -m deadrelu.cli.main)
    sys.exit(main())
