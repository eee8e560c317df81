"""The graph capture's per-expert sites: where one run of a routable site counts.

:class:`ExpertSites` is a mixin base of :class:`~deadrelu.monitor.graph_capture.GraphCapture`:
a run of a site whose expert is known only when the graph runs (see
:mod:`deadrelu.monitor.expert_routes`) counts on its expert's site, keyed as the eager capture
keys it and placed in the module its weight names; plus the module-path arithmetic that places it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

from ..core.capture import choose_unit_dim, next_site_order, resolve_threshold, same_function_ordinal
from .expert_routes import Expert
from .graph_ops import SITE_IDS, CompiledModelWarning, Site
from .window import WindowStats


class ExpertSites:
    """Experts known at run time, as methods of :class:`~deadrelu.monitor.graph_capture.GraphCapture` (a
    mixin base: it uses the capture's state, set in ``GraphCapture.__init__``)."""

    # -- experts known at run time -------------------------------------------------------------
    def _routed(self, site: Site, expert: Expert | None) -> Site | None:
        """The site one run of a routable site counts on: its expert's (see :meth:`_expert_site`)
        where the run names an expert of this model, else the site itself, reported from now on."""
        if expert is not None and (expert.weight is None or self._is_ours(expert.weight)):
            found = self._expert_site(site, expert)
            if found is not None:
                return found
        if self._pending.get(site.key) is site:
            self.sites[site.key] = self._pending.pop(site.key)
        return site

    def _expert_site(self, site: Site, expert: Expert) -> Site | None:
        """Expert ``expert.index``'s site at the place of the routable ``site``: the key the eager
        capture gives it (occurrence ``-1 - e``; an activation module's call numbered by expert),
        made with every other expert's, in expert order, on first sight (so an expert no token
        reaches is there, unobserved). None where this capture cannot place it (said in ``uncaptured``)."""
        cache = (site.ident, id(expert.weight))
        sites = self._expert_sites.get(cache)
        if sites is None:
            sites = self._expert_sites[cache] = self._make_expert_sites(site, expert)
        return sites[expert.index] if expert.index < len(sites) else None

    def _make_expert_sites(self, site: Site, expert: Expert) -> list[Site]:
        path, call, position, name, _ = site.key
        weight_path = self._owner_of_tensor(expert.weight) if expert.weight is not None else None
        if site.unowned is None and weight_path is not None:
            # A graph without parameters serves every instance of its module's class (each layer's experts): its
            # first run is the instance it was traced for, whose weight lies where this one's lies from its own.
            relative = self._weight_relative.setdefault(site.ident, relative_paths(path, weight_path))
            moved = moved_path(relative, weight_path)
            path = moved if moved is not None and self._types.get(moved) == self._types.get(path) else path
        if site.unowned is not None:  # a graph no module claims: the expert's weight says which module runs it
            path = _innermost_of(site.unowned, weight_path) if weight_path is not None else None
            if path is None:
                where = site.unowned[0] if len(site.unowned) == 1 else f"one of {', '.join(site.unowned[:3])}"
                self.uncaptured.setdefault(where, f"{name}: which module's call runs its compiled graph is unknown")
                return []
            call = 0
            if position is None:  # an activation module: each expert's call numbered as the eager capture numbers it
                numbers = self._call_numbers.setdefault(path, {})
                call = numbers.setdefault(("experts", weight_path), len(numbers))
                for e in range(1, expert.slices):
                    numbers.setdefault(("experts", weight_path, e), len(numbers))
                self._counted_in_graphs.add(path)
        # The first experts placed from a site stand where it stands in its graph; others (another layer's,
        # running the same graph) where they are first seen, as the eager capture orders them.
        order = site.order if site.ident not in self._placed else next_site_order()
        self._placed.add(site.ident)
        made = []
        for e in range(expert.slices):
            key = (path, call + e if position is None else call, position, name, -1 - e)
            found = self.sites.get(key)
            if found is None:
                found = self._new_expert_site(site, key, order + (e + 1) / (expert.slices + 1))
                if found is None:
                    return []
            made.append(found)
        return made

    def _new_expert_site(self, site: Site, key: tuple[Any, ...], order: float) -> Site | None:
        """One expert's site, ``site``'s counts under ``key``; None (said in ``uncaptured``) where this
        capture's ``unit_dim`` or ``threshold`` options give it other ones than the graph computes with."""
        path, call, _, name, occurrence = key
        info = dataclasses.replace(
            site.info, module=path, module_type=self._types.get(path, site.info.module_type),
            leaf=self._leaf.get(path, site.info.leaf), call=call, occurrence=occurrence,
        )  # fmt: skip
        info.ordinal = same_function_ordinal((s.info for s in self.sites.values()), path, call, name, info)
        unit_dim = choose_unit_dim(self.unit_dim_spec, info, len(info.shape), site.entry)
        threshold = resolve_threshold(self.threshold_spec, info)
        if unit_dim != site.unit_dim or threshold != site.stats.threshold:
            self.uncaptured.setdefault(path or "<root>", f"{name}: its options differ from those its compiled graph counts with")
            return None
        stats = WindowStats(site.stats.units, threshold, site.stats.device, self.window)
        stats.nonnegative = site.stats.nonnegative
        new = dataclasses.replace(
            site, info=info, stats=stats, order=order, ident=next(SITE_IDS), key=key, unowned=None, anchor_path=None
        )  # placed by the expert's weight already, not by the anchor
        self.sites[key] = new
        return new

    def _unrouted(self, site: Site) -> None:
        """A run of a graph no module claims whose input named no expert of any model (frozen expert
        weights, no gradients, or not an experts layer after all): not counted; said once."""
        where = site.unowned[0] if site.unowned else site.info.module
        if where in self.uncaptured:
            return
        self.uncaptured[where] = f"{site.info.function} in a compiled graph without parameters that names no expert"
        warnings.warn(
            f"deadrelu: the {site.info.function} of {where} ran in a compiled graph with no parameter to say which "
            "module runs it (its caller runs eagerly: a graph break inside a loop, such as a data-dependent loop over "
            "experts), and its input's autograd history names no expert of a stacked weight of this model, which "
            "would (frozen expert weights, or no gradients?): compiled mode does not count it. Use the eager monitor "
            "(compiled=False), which keeps one site per expert, or remove the graph break",
            CompiledModelWarning,
            stacklevel=2,
        )


def _innermost_of(paths: Sequence[str], path: str) -> str | None:
    """The one of ``paths`` inside module ``path``, else inside the closest module above it that
    holds any (None where several are equally close)."""
    scope = path
    while True:
        inside = [p for p in paths if not scope or p == scope or p.startswith(scope + ".")]
        if inside or not scope:
            return inside[0] if len(inside) == 1 else None
        scope = scope.rpartition(".")[0]


def relative_paths(path: str, other: str) -> tuple[str, str]:
    """Two module paths past the part they share: ``("act_fn", "")`` for ``l.0.experts.act_fn``, ``l.0.experts``."""
    a, b = path.split(".") if path else [], other.split(".") if other else []
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return ".".join(a[k:]), ".".join(b[k:])


def moved_path(relative: tuple[str, str], other: str) -> str | None:
    """The path that lies from ``other`` as :func:`relative_paths` says (``l.1.experts.act_fn`` from ``l.1.experts``), or None."""
    mine, theirs = relative
    if theirs and other != theirs and not other.endswith("." + theirs):
        return None
    common = other[: len(other) - len(theirs)].rstrip(".") if theirs else other
    return ".".join(p for p in (common, mine) if p)
