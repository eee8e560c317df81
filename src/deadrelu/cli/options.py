"""Validated option values for the command line: every number is checked before any work starts.

Each function is an ``argparse`` ``type=``: it turns the text into a value or raises
``argparse.ArgumentTypeError`` with a message that names what was expected, so
``--threshold nan`` or ``--batch-size 1e20`` is one line on stderr and exit 2, never a
traceback or a silently absurd result.

>>> whole_number(1, 10)("8")
8
>>> finite_float()("-0.5")
-0.5
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable

__all__ = ["whole_number", "finite_float", "positive_number", "seed_number", "path_text", "OneLineParser",
           "MAX_COUNT", "MAX_SEED", "FLOAT32_MAX"]

#: Largest count accepted for sizes and batch counts (fits every index type torch uses).
MAX_COUNT = 2**31 - 1

#: Largest seed accepted: numpy's seeds (mnist1d's generator) stop at 2**32 - 1, torch's go further.
MAX_SEED = 2**32 - 1

#: ``torch.finfo(torch.float32).max``, spelled out so parsing options does not import torch:
#: the models train in float32, so a larger learning rate overflows inside the optimizer.
FLOAT32_MAX = 3.4028234663852886e38


def whole_number(low: int = 1, high: int = MAX_COUNT) -> Callable[[str], int]:
    """A ``type=`` accepting whole numbers in ``[low, high]`` (``"64"``; not ``"1e20"`` nor ``"2.5"``).

    >>> whole_number(1)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be at least 1, got 0
    """

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def finite_float(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    """A ``type=`` accepting finite numbers in ``[low, high]``; ``nan`` and ``inf`` are refused.

    >>> finite_float(0, 1)("nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a finite number, got 'nan'
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {value:g}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {value:g}")
        return value

    return parse


def positive_number(text: str) -> float:
    """A ``type=`` accepting finite numbers above 0 (a learning rate); ``nan``, ``inf`` (and
    ``1e400``, which reads as inf), numbers above float32's largest (``1e300``: the models train
    in float32), 0 and negatives are refused.

    >>> positive_number("0.5")
    0.5
    >>> positive_number("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be positive, got 0.0
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.6g} (the largest float32), got {text!r}")
    return value


def seed_number(text: str) -> int:
    """A ``type=`` for a random seed: a whole number from 0 to :data:`MAX_SEED` (what torch and numpy accept).

    >>> seed_number("7")
    7
    >>> seed_number("99999999999999999999999")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: a seed must be at most 4294967295, got 99999999999999999999999
    """
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed must be at least 0, got {value}")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be at most {MAX_SEED}, got {value}")
    return value


def path_text(text: str) -> str:
    """A ``type=`` for a file or directory name: an empty (or blank) one is refused, since
    ``--json ''`` would otherwise write nothing and ``--out ''`` write into the current directory.

    >>> path_text("out/r.json")
    'out/r.json'
    >>> path_text("")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a path, got an empty one
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {'an empty one' if not text else repr(text)}")
    return text


#: Every text ``float()`` reads as a negative number (``-1``, ``-.5``, ``-1e-3``, ``-1E+05``, ``-1_000``,
#: ``-inf``, ``-nan``). argparse's own pattern (``^-\d+$|^-\d*\.\d+$``, Python 3.10 to 3.13) misses
#: the exponents and the words, so ``--threshold -1e-3`` failed as "expected one argument".
_NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:\d(?:_?\d)*)?\.\d(?:_?\d)*|\d(?:_?\d)*\.?)(?:e[-+]?\d(?:_?\d)*)?$|^-(?:inf|infinity|nan)$",
    re.IGNORECASE,
)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit 2), pointing at ``--help``.

    A value that reads as a negative number is a value, never an option, in every spelling
    ``float()`` takes (``--threshold -1e-3``): its option's ``type=`` then accepts or refuses it by
    name (``--lr -1e-3``: "must be positive"). No option of this CLI looks like a negative number,
    so none is shadowed.

    >>> OneLineParser(prog="x").prog
    'x'
    >>> p = OneLineParser(prog="x"); _ = p.add_argument("--t", type=float)
    >>> p.parse_args(["--t", "-1e-3"]).t
    -0.001
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse reads this attribute when it tells options from values (Python 3.10 to 3.13).
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # type: ignore[override]
        from .loading import one_line

        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
