"""Sum per-site monitor state over ``torch.distributed`` ranks by site key, never by position.

Ranks need not meet the same sites in the same order: LayerDrop, stochastic depth or a
conditional branch make one rank run a layer another skipped, or run layers in another
order. Summing one flat buffer laid out in each rank's own order would add different
layers' counts together (or abort when the buffers differ in length). Instead, at every
evaluation:

1. each rank describes its sites — key ``(module, call, call position, occurrence, function)``, unit count, the
   name and length of every state tensor, batch counts — and the ranks exchange these
   descriptions with one ``all_gather_object``;
2. every rank builds the same union of keys, in the same order (rank 0's order, then the
   keys only later ranks have, in rank order);
3. one float64 buffer laid out by that union, with zeros where a rank lacks a site, is summed
   with one ``all_reduce`` (counts are integers below 2**53, so float64 keeps them exact).

A site whose unit count or state layout differs between ranks cannot be summed; every
rank sees the same descriptions, so every rank raises the same
:class:`~deadrelu.errors.DeadReluError` instead of one rank hanging or the job aborting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from ..errors import DeadReluError

__all__ = ["SiteState", "reduce_by_key", "union_order"]


@dataclass
class SiteState:
    """One site's monitor state on one rank, or summed over ranks.

    Attributes:
        key: ``(module, call, call position, occurrence, function)``, the site's identity on every rank.
        name: its display name on this rank.
        info: the capture's ``SiteInfo`` (module type, shape, ...), for the report.
        unit_dim: the unit axis.
        threshold: the firing threshold.
        units: number of units.
        tensors: named state tensors (per-unit vectors, or one-element counts), summed over ranks.
        batches: per scope, the batches this site saw (the largest over ranks once reduced).
        full: whether its window is full (on any rank, once reduced).
    """

    key: tuple[Any, ...]
    name: str
    info: Any
    unit_dim: int
    threshold: float
    units: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    full: bool = False

    def view(self) -> Any:
        """The ``info`` / ``unit_dim`` / ``stats.threshold`` record a SiteReport is built from."""
        return SimpleNamespace(info=self.info, unit_dim=self.unit_dim, stats=SimpleNamespace(threshold=self.threshold))

    def describe(self) -> tuple[Any, ...]:
        """What the other ranks need to know: everything but the tensors' values."""
        layout = tuple((k, int(t.numel()), bool(t.is_floating_point())) for k, t in self.tensors.items())
        return (self.key, self.name, self.info, self.unit_dim, self.threshold, self.units, layout, dict(self.batches), self.full)


def union_order(per_rank: Sequence[Sequence[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    """Site keys of all ranks, each once: rank 0's in its order, then each later rank's new ones.

    Example:
        >>> union_order([["a", "b"], ["b", "c", "a"]])
        ['a', 'b', 'c']
    """
    seen: dict[Any, None] = {}
    for keys in per_rank:
        for k in keys:
            seen.setdefault(k, None)
    return list(seen)


def _merge_descriptions(gathered: Sequence[Sequence[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    """One description per key of the union, checked to agree across the ranks that have it."""
    by_key: dict[Any, tuple[Any, ...]] = {}
    batches: dict[Any, dict[str, int]] = {}
    full: dict[Any, bool] = {}
    for rank, descs in enumerate(gathered):
        for d in descs:
            key, units, layout = d[0], d[5], d[6]
            first = by_key.setdefault(key, d)
            if (first[5], first[6]) != (units, layout):
                raise DeadReluError(
                    f"activation site {first[1]!r} has {first[5]} units (state {first[6]}) on one rank but {units} "
                    f"(state {layout}) on rank {rank}; per-unit counts of different widths cannot be summed"
                )
            b = batches.setdefault(key, {})
            for scope, n in d[7].items():
                b[scope] = max(b.get(scope, 0), n)
            full[key] = full.get(key, False) or d[8]
    order = union_order([[d[0] for d in descs] for descs in gathered])
    return [by_key[k][:7] + (batches[k], full[k]) for k in order]


def _names(merged: list[tuple[Any, ...]], gathered: Sequence[Sequence[tuple[Any, ...]]], namer: Any) -> list[str]:
    """The ranks' own names where they agree and are unique; otherwise ``namer`` over the union."""
    names: dict[Any, set[str]] = {}
    for descs in gathered:
        for d in descs:
            names.setdefault(d[0], set()).add(d[1])
    chosen = [next(iter(names[d[0]])) if len(names[d[0]]) == 1 else None for d in merged]
    if None not in chosen and len(set(chosen)) == len(chosen):
        return chosen  # type: ignore[return-value]
    return list(namer([d[2] for d in merged]))


def reduce_by_key(
    local: Sequence[SiteState], extra: torch.Tensor, namer: Any, group: Any = None
) -> tuple[list[SiteState], torch.Tensor]:
    """Sum ``local`` site states (and ``extra``, e.g. sample counts) over all ranks, matching sites by key.

    Args:
        local: this rank's sites (any order; may be empty).
        extra: a 1-D tensor summed element-wise across ranks as well (same length everywhere).
        namer: ``list of SiteInfo -> display names``, used when the ranks' names disagree.
        group: the process group (default: the world).

    Returns:
        The union of all ranks' sites (same order on every rank) with summed tensors, and ``extra`` summed.

    Raises:
        DeadReluError: a site has a different width or state layout on some rank (raised on every rank).
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, [s.describe() for s in local], group=group)
    merged = _merge_descriptions(gathered)
    names = _names(merged, gathered, namer)
    device = extra.device
    mine = {s.key: s for s in local}
    parts: list[torch.Tensor] = []
    for d in merged:
        site = mine.get(d[0])
        for stat, n, _ in d[6]:
            t = site.tensors[stat] if site is not None else None
            parts.append(t.reshape(-1).to(device=device, dtype=torch.float64) if t is not None else torch.zeros(n, dtype=torch.float64, device=device))
    parts.append(extra.reshape(-1).to(device=device, dtype=torch.float64))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out: list[SiteState] = []
    offset = 0
    for d, name in zip(merged, names):
        key, _, info, unit_dim, threshold, units, layout, batches, full = d
        tensors = {}
        for stat, n, is_float in layout:
            tensors[stat] = _cast(flat[offset : offset + n], torch.float64 if is_float else torch.int64)
            offset += n
        out.append(SiteState(key, name, info, unit_dim, threshold, units, tensors, batches, full))
    return out, _cast(flat[offset:], extra.dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Back from the float64 buffer: integer state is rounded (exact below 2**53)."""
    if dtype is None or dtype.is_floating_point:
        return t if dtype in (None, torch.float64) else t.to(dtype)
    return t.round().to(dtype)

