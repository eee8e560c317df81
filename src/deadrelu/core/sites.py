"""What a site is: :class:`SiteInfo`, what is known about it when it is first seen; :class:`Site`,
its state in a capture (unit axis, accumulator, first-seen order); and how sites are told apart
and named (the ``ordinal`` of a call position, experts, :func:`display_names`, :func:`describe_site`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = [
    "Site", "SiteInfo", "describe_site", "display_names", "expert_of", "next_site_order", "same_function_ordinal",
]


@dataclass
class SiteInfo:
    """What is known about a site when it is first seen; passed to ``unit_dim``/``threshold`` callables.

    ``unit_axis_source`` says which rule chose the unit axis (see :mod:`deadrelu.core.capture`);
    ``location`` is the source line of the call (``file.py:42``), empty for module sites;
    ``position`` identifies the call position (the frames from the call up to the module's
    forward, as ``file:first line:qualname:offset``, empty for module sites) and ``occurrence``
    how many times that position was reached before in the same module call — both the same in
    every process that runs the same code, so ranks agree on a site's identity. ``ordinal`` counts
    the sites of the same function in the same module call in first-seen order (1 for the first):
    the ``.k`` of a site name, so ``threshold``/``unit_dim`` mappings can use display names.
    """

    module: str
    module_type: str
    call: int
    slot: int
    function: str
    shape: tuple[int, ...]
    leaf: bool
    unit_axis_source: str = "rank rule"
    location: str = ""
    position: str = ""
    occurrence: int = 0
    ordinal: int = 1


def same_function_ordinal(
    infos: Iterable[SiteInfo], module: str, call: int, function: str, new: SiteInfo | None = None
) -> int:
    """The ``ordinal`` of a new site ``new``: 1 + the other call positions already seen of that
    function in that module call, so the experts of one call position (see :func:`expert_of`)
    share theirs."""
    place = lambda i: (i.position, _call_occurrence(i))  # noqa: E731
    mine = place(new) if new is not None else None
    return 1 + len({
        place(i) for i in infos
        if i.module == module and i.call == call and i.function == function and place(i) != mine
    })  # fmt: skip


def expert_of(info: SiteInfo) -> int | None:
    """The expert a site counts, for an activation of one expert of a stacked-weight experts layer
    (its ``occurrence`` is ``-1 - expert``), else None."""
    return -1 - info.occurrence if info.occurrence < 0 else None


def _call_occurrence(info: SiteInfo) -> Any:
    """The occurrence that tells call positions apart: every expert of one position is one."""
    return "experts" if info.occurrence < 0 else info.occurrence


@dataclass
class Site:
    """Runtime state of one site: its identity, unit axis and accumulator."""

    info: SiteInfo
    unit_dim: int
    stats: Any  # UnitStats or any object with update(tensor, unit_dim, nonnegative)
    order: int  # first-seen position, for forward-execution order
    nonnegative: bool = False  # |h| = h for this activation
    takes_mask: bool = False  # its update() accepts mask=
    layout: str | None = None  # how a (B, T) mask lay over it when B != T: read a square one the same way
    # its activation is a layer's single output with that size-1 axis squeezed away ((B, 1) -> (B,)):
    # counted as the (B, 1) it came from, one unit (the shape in ``info`` has the axis back)
    squeezed: bool = False


_SITE_ORDER = itertools.count()


def next_site_order() -> int:
    """A process-wide increasing number for a new site: captures that observe parts of one model
    (eager code beside compiled blocks) merge their sites in the order they were first seen."""
    return next(_SITE_ORDER)


def describe_site(info: SiteInfo) -> str:
    where = info.module or "<root>"
    at = f", {info.location}" if info.location else ""
    return f"{where} ({info.function}, call {info.call + 1}, slot {info.slot + 1}{at})"


def display_names(infos: list[SiteInfo]) -> list[str]:
    """Unique, readable names: ``path`` for an activation module, ``path:fn`` for a functional call,
    ``.k`` for the k-th call position of the same function in one module call (in first-seen
    order), ``#k`` for the k-th call of a reused module."""
    calls_per_module: dict[str, set[Any]] = {}
    per_call: dict[tuple[str, Any], dict[tuple[Any, ...], str]] = {}
    # An experts layer's sites are one call (position) each, told apart by ``[e]``, the expert.
    call_of = lambda i: ("experts", i.call) if expert_of(i) is not None and not i.position else i.call  # noqa: E731
    for i in infos:
        calls_per_module.setdefault(i.module, set()).add(call_of(i))
        per_call.setdefault((i.module, call_of(i)), {})[(i.position, _call_occurrence(i), i.function)] = i.function
    # A leaf module whose every call makes exactly one activation call is an activation module.
    single = {m: all(len(per_call[(m, c)]) == 1 for c in calls) for m, calls in calls_per_module.items()}
    names = []
    for i in infos:
        base = i.module or "<root>"
        calls = {c for c in calls_per_module[i.module] if not isinstance(c, tuple)}
        if not (i.leaf and single[i.module] and i.module):
            same_fn = [k for k, f in per_call[(i.module, call_of(i))].items() if f == i.function]
            base += f":{i.function}"
            if len(same_fn) > 1:
                base += f".{same_fn.index((i.position, _call_occurrence(i), i.function)) + 1}"
        if expert_of(i) is None and len(calls) > 1:
            base += f"#{i.call + 1}"
        if expert_of(i) is not None:
            base += f"[{expert_of(i)}]"
        names.append(base)
    # Dynamic control flow could still collide; make names unique without hiding either site.
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        unique.append(n if k == 0 else f"{n}~{k + 1}")
    return unique
