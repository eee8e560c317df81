"""Each unit's lifecycle over a training run (born dead, died, revived) and the warnings a dead fraction raises.

:class:`UnitLifecycle` is the part of :class:`deadrelu.Monitor` that turns each full-window
evaluation into lifecycle :class:`~deadrelu.monitor.Event` s, from every unit's last known state
(dead or alive); issues a :class:`DeadUnitWarning`, with its advice, when a layer's dead fraction
crosses a ``warn_at`` level; and counts the events per site (:meth:`UnitLifecycle.events_summary`).
Its memory is keyed by :func:`site_identity`, so it follows a site whose display name changes, and
lives on the monitor (made by ``_init_lifecycle``), whose ``state_dict()`` saves it.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Mapping, Union

import torch

from ..core.report import Report, SiteReport
from .records import Alert, Event, EventSummary, SiteEvents

__all__ = [
    "UnitLifecycle", "DeadUnitWarning", "ADVICE_BORN_DEAD", "ADVICE_DIED", "UnitMemory", "index_sets", "site_identity",
]  # fmt: skip

ADVICE_BORN_DEAD = (
    "these units were dead from the first window, which points at initialisation: use He/Kaiming init "
    "for ReLU layers, check input normalisation, or start biases slightly positive"
)
ADVICE_DIED = (
    "these units died during training: lower the learning rate or add warm-up, clip gradients, "
    "switch to a leaky activation (LeakyReLU/GELU), or re-initialise the dead units (deadrelu.reinit_dead)"
)


class DeadUnitWarning(UserWarning):
    """A layer's dead fraction crossed a warning threshold (issued once per layer and threshold)."""


#: A set of a site's units: a bool mask over them, or (as a resumed state gives it) their indices.
UnitMemory = Union[torch.Tensor, "set[int]"]


def _unit_mask(memory: UnitMemory | None, units: int) -> torch.Tensor:
    """``memory`` as a bool mask over ``units`` units (indices beyond them are dropped)."""
    if isinstance(memory, torch.Tensor) and memory.numel() == units:
        return memory
    mask = torch.zeros(units, dtype=torch.bool)
    indices = [u for u in _index_set(memory) if 0 <= u < units] if memory is not None else []
    if indices:
        mask[torch.tensor(indices, dtype=torch.int64)] = True
    return mask


def _indices(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def _index_set(memory: UnitMemory) -> set[int]:
    return set(_indices(memory)) if isinstance(memory, torch.Tensor) else set(memory)


def index_sets(memories: Mapping[Any, UnitMemory]) -> dict[Any, set[int]]:
    """Each site's remembered units as a set of indices."""
    return {key: _index_set(m) for key, m in memories.items()}


def _size(memory: UnitMemory) -> int:
    return int(memory.sum()) if isinstance(memory, torch.Tensor) else len(memory)


class UnitLifecycle:
    """The part of :class:`deadrelu.Monitor` that follows each unit: lifecycle events, warnings, summary."""

    def _init_lifecycle(self) -> None:
        # Unit memories are bool masks over a site's units once it has been evaluated, and index
        # sets as a resumed state gives them (made masks at the site's next evaluation).
        self._dead: dict[str, UnitMemory] = {}  # per site: dead units at the last full-window evaluation
        self._born_dead: dict[Any, UnitMemory] = {}
        # per site: units whose last known state (ignoring NaN/Inf and unobserved evaluations) is dead / alive
        self._known_dead: dict[Any, UnitMemory] = {}
        self._known_alive: dict[Any, UnitMemory] = {}
        # sites whose window has not been full at an evaluation yet: their first full window is evaluated
        self._filling: list[Any] = []
        self._filled: "weakref.WeakSet[Any]" = weakref.WeakSet()  # accumulators whose full window was evaluated
        # per site: its since-start fired and NaN/Inf counts at the last evaluation (host), to tell
        # which units fired in batches that left the window before this one
        self._fired_at_eval: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sites_seen = 0
        self._name_ident: dict[str, Any] = {}  # every display name a site has had -> the site
        self._ident_name: dict[Any, str] = {}  # the site -> its name at the last evaluation

    def events_summary(self) -> EventSummary:
        """Counts of born-dead, died and revived units per site (see :class:`EventSummary`).

        Example:
            >>> import torch, deadrelu
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            >>> with deadrelu.Monitor(net, window=2) as mon:
            ...     for _ in range(2):
            ...         _ = net(torch.randn(4, 2)); mon.step()
            >>> mon.events_summary().died
            0
        """
        current = dict(self._ident_name)
        current.update({site_identity(site.info): name for name, site in self.capture.ordered_sites()})
        per_site: dict[str, dict[str, list[int]]] = {}
        for e in self.events:  # under the site's current name, whatever it was called then
            name = current.get(self._name_ident.get(e.site), e.site)
            per_site.setdefault(name, {"born_dead": [], "died": [], "revived": []})[e.kind].append(e.step)
        units = {name: site.stats.units for name, site in self.capture.ordered_sites()}
        for name, n in self._units.items():  # sites only other ranks have run (not a renamed one of ours)
            if current.get(self._name_ident.get(name), name) == name:
                units.setdefault(name, n)
        # dead at the last evaluation, under the current name of the site it was evaluated as
        dead_now = {current.get(self._name_ident.get(name), name): dead for name, dead in self._dead.items()}
        out = []
        for name in units:
            ev = per_site.get(name, {"born_dead": [], "died": [], "revived": []})
            out.append(
                SiteEvents(
                    site=name,
                    units=units[name],
                    born_dead=len(ev["born_dead"]),
                    died=len(ev["died"]),
                    revived=len(ev["revived"]),
                    dead_now=_size(dead_now.get(name, ())),
                    died_steps=tuple(sorted(ev["died"])),
                )
            )
        return EventSummary(tuple(out))

    def _forget_resized(self, report: Report, identities: dict[str, Any]) -> None:
        """A site whose width differs from the one its lifecycle memory was made for (a state
        resumed into another model): that memory is about other units, so it is dropped, with a
        warning, and the site starts afresh (no false died/revived events)."""
        for s in report.sites:
            before, ident = self._units.get(s.name), identities.get(s.name, s.name)
            if before is None or before == s.units or self._name_ident.get(s.name, ident) != ident:
                continue  # unknown, the same width, or the name of another site before a rename
            for memory in (self._known_dead, self._known_alive, self._born_dead):
                memory.pop(ident, None)
            self._dead.pop(s.name, None)
            self._warned = {key for key in self._warned if key[0] != ident}
            warnings.warn(
                f"deadrelu: site {s.name!r} has {s.units} units, but the monitor state it goes on from was "
                f"made for {before}: that site's unit lifecycle starts afresh (is the checkpoint from another model?)",
                DeadUnitWarning,
                stacklevel=3,
            )

    def _lifecycle(
        self, step: int, s: SiteReport, ident: Any, fired_since: torch.Tensor | None = None, warn: bool = True
    ) -> list[Event]:
        """Events from each unit's last known state, dead or alive (fired, all values finite). An
        evaluation where a unit is NaN/Inf or unobserved says neither: it starts or ends nothing,
        so a dead unit that outputs NaN for a while is not "revived" and then "died" again.

        ``fired_since`` (bool per unit) marks the units that fired, with finite values only, in the
        batches since the previous evaluation, also those that left the window since (``log_every``
        steps may hold more batches than ``window``): a dead unit that fired there and is dead again
        revived and died in between. ``warn=False`` records a state without warnings (the first full
        window of a site, evaluated after its window slid on)."""
        # On bool masks over the units: set operations on 100k Python ints take milliseconds.
        dead = s.state_mask("dead")
        alive = s.state_mask("active") | s.state_mask("asleep")  # fired, and every value finite
        was_dead = _unit_mask(self._known_dead.get(ident), s.units)
        was_alive = _unit_mask(self._known_alive.get(ident), s.units)
        fired = alive if fired_since is None or fired_since.numel() != s.units else alive | fired_since
        back = was_dead & fired  # fired since it was last known dead
        fresh = dead & ~was_dead
        born = fresh & ~was_alive  # dead the first time its state is known
        events = [Event(step, s.name, u, "born_dead") for u in _indices(born)]
        events += [Event(step, s.name, u, "died") for u in _indices(fresh & was_alive)]
        events += [Event(step, s.name, u, "revived") for u in _indices(back)]
        events += [Event(step, s.name, u, "died") for u in _indices(back & dead)]  # fired in between, dead again
        self._born_dead[ident] = _unit_mask(self._born_dead.get(ident), s.units) | born
        self._known_dead[ident] = (was_dead & ~fired) | dead
        self._known_alive[ident] = ((was_alive | fired) & ~dead) | alive
        self._dead[s.name] = dead
        if warn:
            self._maybe_warn(step, s, dead, ident)
        return events

    def _maybe_warn(self, step: int, s: SiteReport, dead: torch.Tensor, ident: Any) -> None:
        frac = s.dead_fraction
        for level in self.warn_at:
            key = (ident, level)
            if frac < level or key in self._warned:
                continue
            self._warned.add(key)
            born = int((dead & _unit_mask(self._born_dead.get(ident), s.units)).sum())
            cause = "born_dead" if born * 2 >= s.dead else "died"
            advice = ADVICE_BORN_DEAD if cause == "born_dead" else ADVICE_DIED
            message = (
                f"deadrelu: layer {s.name!r} has {100 * frac:.1f}% dead units ({s.dead}/{s.units}) at step {step}, "
                f"crossing the {100 * level:g}% warning level; {advice}"
            )
            self.alerts.append(Alert(step, s.name, level, frac, cause, message))
            warnings.warn(message, DeadUnitWarning, stacklevel=4)


def site_identity(info: Any) -> tuple[Any, ...]:
    """What a site is, whatever its display name: module, call, call position, function, occurrence."""
    return (info.module, info.call, info.position, info.function, info.occurrence)
