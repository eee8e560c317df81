"""The ``deadrelu`` command line: one parser per verb, one function per verb that returns data.

User errors (bad files, bad data, refusals) print one line on stderr and exit 2,
without a traceback. Each verb module (``scan``, ``lab``) lists its verbs in ``VERBS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..errors import DeadReluError
from . import lab as lab_verbs
from . import scan as scan_verbs

__all__ = ["main", "build_parser"]

# Verbs live in their own modules (scan, lab), each with a VERBS table; main only collects them.
_VERBS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    **scan_verbs.VERBS,
    **lab_verbs.VERBS,
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all verbs)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="deadrelu", description="Find, watch and fix dead neurons in PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"deadrelu {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    sub.required = True
    for add, _ in _VERBS.values():
        add(sub)
    return parser


class _UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deadrelu`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = _VERBS[args.verb]
    try:
        return run(args)
    except (DeadReluError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"deadrelu {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deadrelu {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover  (python -m deadrelu.cli.main)
    sys.exit(main())
