"""The evidence behind a dead unit, and how counts and rates are shown.

"Dead" is a claim about the data seen: a unit that never fired in ``n`` observations has, with
95% confidence, a firing rate below ``1 - 0.05**(1/n)`` (about ``3/n``, the "rule of three").
:func:`zero_rate_upper_bound` computes that bound; :func:`format_count` and :func:`format_rate`
show counts and bounds in tables without claiming more evidence than there was. Every
:class:`~deadrelu.core.report.SiteReport` carries this evidence (re-exported by
:mod:`deadrelu.core.report`).
"""

from __future__ import annotations

import math
import re

__all__ = ["CONFIDENCE", "zero_rate_upper_bound", "format_count", "format_rate"]

#: Confidence of the upper bound on a dead unit's firing rate.
CONFIDENCE = 0.95


def zero_rate_upper_bound(observations: int, confidence: float = CONFIDENCE) -> float:
    """Exact one-sided upper confidence bound on the rate of an event seen 0 times in ``observations``.

    ``1 - (1 - confidence) ** (1 / n)`` (the Clopper-Pearson bound for 0 successes), about
    ``3 / n`` at 95% — the "rule of three". 1.0 for ``n = 0``: no evidence at all.

    Example:
        >>> round(zero_rate_upper_bound(1000), 6)
        0.002991
    """
    if observations <= 0:
        return 1.0
    # -expm1(log(a)/n) == 1 - a**(1/n) without the cancellation that loses digits for large n.
    return -math.expm1(math.log(1.0 - confidence) / observations)


def format_count(n: int) -> str:
    """A count for a table: exact below 10,000, else rounded *down* to 3 digits with k/M/G/T
    (so "0 of 1.2M observations" never claims more evidence than there was).

    Example:
        >>> format_count(640), format_count(1_249_999), format_count(12_345)
        ('640', '1.2M', '12.3k')
    """
    if n < 10_000:
        return str(n)
    for scale, suffix in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= scale:
            tenths = n * 10 // scale
            text = str(tenths // 10) if tenths >= 1000 else f"{tenths // 10}.{tenths % 10}"
            return text.removesuffix(".0") + suffix
    return str(n)  # pragma: no cover - n >= 10_000 always meets a scale


def format_rate(rate: float) -> str:
    """An upper bound for display: two significant digits rounded *up* (so "rate < x" stays true).

    Example:
        >>> format_rate(zero_rate_upper_bound(1_200_000)), format_rate(zero_rate_upper_bound(1000))
        ('2.5e-6', '0.003')
    """
    if not rate > 0:
        return "0"
    exp = math.floor(math.log10(rate)) - 1
    digits = math.ceil(rate / 10.0**exp * (1 - 1e-12))  # 10..100; the factor absorbs float noise
    text = f"{digits * 10.0**exp:.2g}"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", text).replace("e+", "e")
