"""The ``deadrelu`` command line: one parser per verb, one function per verb that returns data.

User errors (bad files, bad data, refusals) print one line on stderr and exit 2,
without a traceback. Each verb registers itself in ``_VERBS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import DeadReluError

__all__ = ["main", "build_parser"]

# verb -> (function that adds the subparser, function that runs it and returns an exit code)
_VERBS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {}


def verb(name: str, add: Callable[[argparse._SubParsersAction], None]):
    """Register a CLI verb: ``add(subparsers)`` builds its parser; the decorated function runs it."""

    def deco(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _VERBS[name] = (add, run)
        return run

    return deco


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all verbs)."""
    from . import __version__

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


# Verbs live in their own modules; importing them registers them.
from . import cli_scan  # noqa: E402,F401  (registers "scan")
from . import cli_evidence  # noqa: E402,F401  (registers "demo", "experiment", "report")

if __name__ == "__main__":  # pragma: no cover  (python -m deadrelu.cli: use the registered module)
    from deadrelu.cli import main as _main

    sys.exit(_main())
