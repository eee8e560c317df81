"""Frozen, serialisable results of a scan: :class:`Report` and :class:`SiteReport`.

A report holds only plain Python numbers (no tensors, no live hooks), so it can be
saved, loaded, diffed, plotted and rendered long after the model is gone. The raw
per-unit sums are stored; every classification (dead, asleep, dormant, ...) is
derived from them and the :class:`Levels`, so a loaded report classifies
exactly as the original did.

"Dead" is a claim about the data seen, so every dead unit carries its evidence: a unit
that never fired in ``n`` observations has, with 95% confidence, a firing rate below
``1 - 0.05**(1/n)`` (about ``3/n``, the "rule of three"). Below ``min_observations``
observations a unit that never fired is *unobserved*, not dead.

The evidence bound and its display are in :mod:`deadrelu.core.evidence`, each site's per-unit
classification on tensors in :mod:`deadrelu.core.unit_classes`, and what :meth:`Report.diff`
returns in :mod:`deadrelu.core.report_diff`; their public names are re-exported here.
"""

from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import DeadReluError, ReportFormatError
from .advice import advise
from .evidence import CONFIDENCE, format_count, format_rate, zero_rate_upper_bound
from .files import atomic_write_text
from .report_diff import ReportDiff, SiteDiff
from .report_schema import parse_report, parse_site
from .stats import UNIT_STATES
from .tables import floor_percent
from .unit_classes import UnitClasses, indices, int_tensor, prime_unit_classes, unit_classes

__all__ = [
    "SCHEMA_VERSION",
    "CONFIDENCE",
    "Levels",
    "Thresholds",
    "SiteReport",
    "Report",
    "SiteDiff",
    "ReportDiff",
    "zero_rate_upper_bound",
    "format_count",
    "format_rate",
    "model_fingerprint",
]

#: Bumped whenever the JSON layout changes incompatibly.
# 2: the asleep/dormant levels are stored under "levels" (1 called them "thresholds").
# Version 2 files may carry levels.min_observations (absent means 1, the earlier behaviour).
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Levels:
    """How per-unit statistics turn into states.

    Args:
        asleep_rate: a unit that fired on more than 0 and at most this fraction of its
            observations is *asleep* (default 5%).
        dormant_tau: a unit whose dormancy score ``s_i = E|h_i| / mean_k E|h_k|`` is at
            most this value is *τ-dormant* (Sokar et al. 2023; default 0.025). Dead
            ReLU units have ``s_i = 0`` and so are dormant too.
        min_observations: a unit that never fired is *dead* only when its site produced at
            least this many observations; on fewer it is *unobserved* (default 1: any
            observation). At ``n`` observations a dead unit's firing rate is below
            ``1 - 0.05**(1/n)`` ≈ ``3/n`` with 95% confidence.

    The firing threshold (an output counts as firing when it is ``> threshold``) is
    chosen per site at capture time and stored on each :class:`SiteReport`.

    Example:
        >>> Levels(min_observations=1000).min_observations
        1000
    """

    asleep_rate: float = 0.05
    dormant_tau: float = 0.025
    min_observations: int = 1

    def __post_init__(self) -> None:
        def real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not (real(self.asleep_rate) and 0.0 <= self.asleep_rate < 1.0):
            raise DeadReluError(f"asleep_rate must be in [0, 1), got {self.asleep_rate!r}")
        if not (real(self.dormant_tau) and 0.0 <= self.dormant_tau < math.inf):
            raise DeadReluError(f"dormant_tau must be >= 0 and finite, got {self.dormant_tau!r}")
        try:
            min_obs = operator.index(self.min_observations)  # numpy integers too, not 2.0 or True
        except TypeError:
            min_obs = 0
        if isinstance(self.min_observations, bool) or not 1 <= min_obs <= 2**63 - 1:
            # (at most int64's largest: a count of observations is an int64, and saved reports hold no more)
            raise DeadReluError(f"min_observations must be an integer from 1 to 2**63 - 1, got {self.min_observations!r:.80}")
        object.__setattr__(self, "min_observations", int(min_obs))


#: The name of :class:`Levels` before 0.2 ("threshold" now means the firing threshold only).
Thresholds = Levels


@dataclass(frozen=True)
class SiteReport:
    """Statistics of one activation site: one activation call at one position in the forward pass.

    Attributes:
        name: unique display name, e.g. ``"layer1.0.relu#2"`` (second call of a reused module)
            or ``"block:relu"`` (a functional call inside ``block.forward``).
        module: dotted path of the module whose forward made the call (``""`` for the root).
        module_type: class name of that module.
        function: the activation function called, e.g. ``"relu"``, ``"gelu"``.
        call: 0-based number of the place ``module`` is called from (reused modules give 1, 2, ...,
            in first-seen order; a call that runs only for some batches keeps its own number).
        slot: 0-based index of this activation among those called directly by that module call.
        unit_dim: the dimension of the activation tensor that indexes units.
        shape: shape of the activation in the first batch seen.
        fire_threshold: an output counts as firing when it is greater than this.
        observations: how many values each unit produced (batch × tokens × spatial positions).
        fired_counts: per unit, how many outputs were ``> fire_threshold``.
        mean_abs: per unit, mean absolute activation ``E|h_i|`` (NaN/Inf for non-finite units).
        nonfinite_counts: per unit, how many outputs were NaN or ±Inf.
        levels: the levels (asleep rate, dormancy, minimum observations) that classify units.
        unit_axis_source: which rule chose ``unit_dim``: ``"producer:Linear"``, ``"producer:conv"``,
            ``"producer:matmul"``, ``"producer:embedding"``, ``"producer:RNN"``, ``"producer:norm"``
            (the layer that made the feature axis), ``"unit_dim override"``, or ``"rank rule"``
            when nothing upstream decided (see :mod:`deadrelu.core.capture`).

    All units of a site share its ``observations``: a site that ran in only some batches
    counts only the batches it ran in, and its dead units' evidence is that count.
    """

    name: str
    module: str
    module_type: str
    function: str
    call: int
    slot: int
    unit_dim: int
    shape: tuple[int, ...]
    fire_threshold: float
    observations: int
    fired_counts: tuple[int, ...]
    mean_abs: tuple[float, ...]
    nonfinite_counts: tuple[int, ...]
    levels: Levels = field(default_factory=Levels)
    unit_axis_source: str = ""

    # -- per-unit derived values -------------------------------------------------
    @property
    def units(self) -> int:
        """Number of units (channels / features / hidden units) at this site."""
        return len(self.fired_counts)

    @cached_property
    def firing_rate(self) -> tuple[float, ...]:
        """Per unit, the fraction of observations that fired."""
        n = self.observations
        if not n:
            return (0.0,) * self.units
        return tuple((int_tensor(self.fired_counts).to(torch.float64) / n).tolist())

    @cached_property
    def dormancy(self) -> tuple[float, ...]:
        """Per unit, the dormancy score ``E|h_i| / mean_k E|h_k|`` over finite units (NaN if non-finite)."""
        return tuple(self._classes.score.tolist())

    @cached_property
    def states(self) -> tuple[str, ...]:
        """Per unit, one of ``"nonfinite"``, ``"unobserved"``, ``"dead"``, ``"asleep"`` or ``"active"``."""
        return tuple(map(UNIT_STATES.__getitem__, self._classes.codes.tolist()))

    @cached_property
    def _classes(self) -> "UnitClasses":
        """Every unit's state and dormancy score, computed once on tensors (the monitor classifies
        each site at every evaluation, and a Python loop over 100k units takes 50 ms). A cache
        only: pickles and copies carry the fields (see ``__getstate__``), and the public values
        are Python tuples made from it on first use."""
        return unit_classes(self)

    @cached_property
    def _state_counts(self) -> tuple[int, ...]:
        return tuple(torch.bincount(self._classes.codes.to(torch.int64), minlength=len(UNIT_STATES)).tolist())

    def state_mask(self, state: str) -> torch.Tensor:
        """A bool tensor over the units, True where a unit is in ``state`` (one of
        ``"active"``, ``"asleep"``, ``"dead"``, ``"unobserved"``, ``"nonfinite"``; or
        ``"dormant"``): the vectorised form of ``dead_units`` and its kind, a new tensor each call.

        Raises:
            DeadReluError: for another state name.

        Example:
            >>> s = SiteReport("r", "", "ReLU", "relu", 0, 0, 1, (4, 2), 0.0, 4, (0, 3), (0.0, 1.5), (0, 0))
            >>> s.state_mask("dead").tolist()
            [True, False]
        """
        if state == "dormant":
            return self._classes.dormant.clone()
        if state not in UNIT_STATES:
            raise DeadReluError(f"unknown unit state {state!r}: expected one of {', '.join(UNIT_STATES)} or dormant")
        return self._classes.codes == UNIT_STATES.index(state)

    def _units_in(self, state: str) -> tuple[int, ...]:
        return indices(self.state_mask(state))

    def _count_of(self, state: str) -> int:
        return self._state_counts[UNIT_STATES.index(state)]

    def __getstate__(self) -> dict[str, Any]:
        # The fields only: cached derived values (tensors among them) are remade after loading.
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @cached_property
    def dead_units(self) -> tuple[int, ...]:
        """Indices of units that never fired over all observations (NaN-free units only, and at
        least ``levels.min_observations`` observations)."""
        return self._units_in("dead")

    @cached_property
    def unobserved_units(self) -> tuple[int, ...]:
        """Indices of units that never fired on fewer than ``levels.min_observations``
        observations: too little evidence to call them dead (neither dead nor alive)."""
        return self._units_in("unobserved")

    @cached_property
    def asleep_units(self) -> tuple[int, ...]:
        """Indices of units with ``0 < firing rate <= asleep_rate``."""
        return self._units_in("asleep")

    @cached_property
    def active_units(self) -> tuple[int, ...]:
        """Indices of units firing more often than ``asleep_rate``."""
        return self._units_in("active")

    @cached_property
    def nonfinite_units(self) -> tuple[int, ...]:
        """Indices of units that produced at least one NaN or Inf (neither dead nor alive)."""
        return self._units_in("nonfinite")

    @cached_property
    def dormant_units(self) -> tuple[int, ...]:
        """Indices of τ-dormant units (dormancy score ``<= dormant_tau``; includes dead ReLU units)."""
        return indices(self._classes.dormant)

    # -- evidence ----------------------------------------------------------------
    @property
    def dead_rate_bound(self) -> float:
        """95% upper bound on the firing rate of a unit of this site that never fired:
        ``1 - 0.05**(1/observations)`` (≈ ``3/observations``; 1.0 with no observations)."""
        return zero_rate_upper_bound(self.observations)

    @property
    def dead_evidence(self) -> str:
        """What "dead" means here, e.g. ``"0 of 1.2M observations, rate < 2.5e-6"``."""
        return f"0 of {format_count(self.observations)} observations, rate < {format_rate(self.dead_rate_bound)}"

    # -- counts ------------------------------------------------------------------
    @property
    def dead(self) -> int:
        """Number of dead units."""
        return self._count_of("dead")

    @property
    def asleep(self) -> int:
        """Number of asleep units."""
        return self._count_of("asleep")

    @property
    def active(self) -> int:
        """Number of active units."""
        return self._count_of("active")

    @property
    def dormant(self) -> int:
        """Number of τ-dormant units."""
        return int(self._classes.dormant.sum())

    @property
    def nonfinite(self) -> int:
        """Number of units that produced NaN or Inf."""
        return self._count_of("nonfinite")

    @property
    def unobserved(self) -> int:
        """Number of unobserved units (never fired, fewer than ``min_observations`` observations)."""
        return self._count_of("unobserved")

    @property
    def dead_fraction(self) -> float:
        """Dead units ÷ units."""
        return self.dead / self.units if self.units else 0.0

    def check_compatible(self, other: Any, verb: str = "compare") -> None:
        """Refuse to ``verb`` (merge, diff) this site with ``other`` unless both count the same
        thing: the same name, function, unit axis, firing threshold, levels and number of units.

        Raises:
            DeadReluError: naming the first field that differs (or what ``other`` is instead of a site).
        """
        if not isinstance(other, SiteReport):
            raise DeadReluError(f"cannot {verb} site {self.name!r}: expected a deadrelu SiteReport, got {type(other).__name__}")
        for key in ("name", "function", "unit_dim", "fire_threshold", "levels", "units"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                raise DeadReluError(f"cannot {verb} site {self.name!r}: {key} is {mine!r} in one report, {theirs!r} in the other")

    def merge(self, other: "SiteReport") -> "SiteReport":
        """The statistics of this site over the data of both reports (e.g. two shards of a dataset).

        Counts and observations add exactly; ``mean_abs`` is the observation-weighted mean.

        Raises:
            DeadReluError: when ``other`` is not a site, another site, or has other units, threshold or levels.

        Example:
            >>> a = SiteReport("r", "", "ReLU", "relu", 0, 0, 1, (4, 2), 0.0, 4, (0, 3), (0.0, 1.5), (0, 0))
            >>> a.merge(a).fired_counts, a.merge(a).observations
            ((0, 6), 8)
        """
        self.check_compatible(other, "merge")
        n1, n2 = self.observations, other.observations
        n = n1 + n2
        return replace(
            self,
            observations=n,
            fired_counts=tuple(a + b for a, b in zip(self.fired_counts, other.fired_counts)),
            nonfinite_counts=tuple(a + b for a, b in zip(self.nonfinite_counts, other.nonfinite_counts)),
            mean_abs=tuple(
                (a * n1 + b * n2) / n if n else 0.0 for a, b in zip(self.mean_abs, other.mean_abs)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The raw fields as JSON-ready data (derived values are recomputed on load)."""
        d = {k: v for k, v in asdict(self).items() if k != "levels"}
        d["shape"] = list(self.shape)
        d["fired_counts"] = list(self.fired_counts)
        d["mean_abs"] = [_json_float(v) for v in self.mean_abs]
        d["nonfinite_counts"] = list(self.nonfinite_counts)
        d["fire_threshold"] = _json_float(self.fire_threshold)
        # Derived summaries are written for readers of the JSON; they are ignored on load.
        d["summary"] = {
            "units": self.units,
            "dead": self.dead,
            "unobserved": self.unobserved,
            "asleep": self.asleep,
            "dormant": self.dormant,
            "nonfinite": self.nonfinite,
            "dead_units": list(self.dead_units),
            "unobserved_units": list(self.unobserved_units),
            # The evidence behind every dead unit of this site (all share the site's observations).
            "dead_evidence": {
                "observations": self.observations,
                "confidence": CONFIDENCE,
                "rate_upper_bound": self.dead_rate_bound,
                "text": self.dead_evidence,
            },
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], levels: Levels) -> "SiteReport":
        """Rebuild a site from :meth:`to_dict` output, validated field by field.

        Raises:
            ReportFormatError: naming the first field that breaks the report schema.
        """
        return cls(**parse_site(d, "site"), levels=levels)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name the OS cannot hold (too long, a NUL byte)
        return False


def model_fingerprint(model: Any) -> str:
    """A short digest of a model's parameter names and shapes (not their values).

    Recorded in every :class:`Report` at scan time, so surgery can refuse a report that was
    made from a different model. Training changes values, not the fingerprint;
    ``torch.compile``'s ``_orig_mod.`` prefix is ignored.

    Example:
        >>> import torch
        >>> model_fingerprint(torch.nn.Linear(3, 2)) == model_fingerprint(torch.nn.Linear(3, 2))
        True
        >>> model_fingerprint(torch.nn.Linear(3, 2)) == model_fingerprint(torch.nn.Linear(4, 2))
        False
    """
    import hashlib

    lines = []
    for name, p in model.named_parameters():
        name = name[len("_orig_mod.") :] if name.startswith("_orig_mod.") else name
        lines.append(f"{name}:{tuple(p.shape)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Report:
    """Per-unit activation statistics of every activation site of a model, in forward order.

    Attributes:
        sites: one :class:`SiteReport` per activation site, in forward-execution order.
        levels: the asleep/dormant levels used by every site.
        batches: number of forward passes observed.
        samples: number of input samples observed (first dimension of each batch).
        mode: ``"eval"`` or ``"train"`` — the mode the model ran in.
        model: class name of the scanned model.
        fingerprint: :func:`model_fingerprint` of the scanned model ("" when unknown).
        uncaptured: modules that look like activations (parameter-free, shape-preserving,
            activation-like class name) but made no site, as ``"path (Class)"``; register them
            with :func:`deadrelu.register_activation` to count them.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> report = deadrelu.scan(net, torch.randn(64, 4))
        >>> report.sites[0].units
        8
    """

    sites: tuple[SiteReport, ...]
    levels: Levels = field(default_factory=Levels)
    batches: int = 0
    samples: int = 0
    mode: str = "eval"
    model: str = ""
    fingerprint: str = ""
    uncaptured: tuple[str, ...] = ()

    # -- totals --------------------------------------------------------------------
    @property
    def units(self) -> int:
        """Units over all sites."""
        return sum(s.units for s in self.sites)

    @property
    def dead(self) -> int:
        """Dead units over all sites."""
        return sum(s.dead for s in self.sites)

    @property
    def asleep(self) -> int:
        """Asleep units over all sites."""
        return sum(s.asleep for s in self.sites)

    @property
    def dormant(self) -> int:
        """τ-dormant units over all sites."""
        return sum(s.dormant for s in self.sites)

    @property
    def nonfinite(self) -> int:
        """Units that produced NaN/Inf, over all sites."""
        return sum(s.nonfinite for s in self.sites)

    @property
    def active(self) -> int:
        """Active units over all sites."""
        return sum(s.active for s in self.sites)

    @property
    def unobserved(self) -> int:
        """Unobserved units (never fired, too few observations to call dead), over all sites."""
        return sum(s.unobserved for s in self.sites)

    @property
    def dead_rate_bound(self) -> float | None:
        """The weakest evidence behind any dead unit: the largest 95% upper bound on a dead
        unit's firing rate over sites with dead units (None when no unit is dead)."""
        bounds = [s.dead_rate_bound for s in self.sites if s.dead]
        return max(bounds) if bounds else None

    @property
    def dead_fraction(self) -> float:
        """Dead units ÷ units, over all sites."""
        return self.dead / self.units if self.units else 0.0

    # -- access --------------------------------------------------------------------
    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def site(self, name: str) -> SiteReport:
        """Return the site called ``name``.

        Raises:
            KeyError: naming the sites that exist.
        """
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites are: {', '.join(s.name for s in self.sites)}")

    def check_compatible(self, other: Any, verb: str = "merge") -> None:
        """Refuse to ``verb`` this report with ``other`` unless their counts mean the same thing.

        Both must be Reports with the same levels and mode, and every site they share must pass
        :meth:`SiteReport.check_compatible` (function, unit axis, firing threshold, units). To
        merge, the model (class name and :func:`model_fingerprint`) must be the same too; a diff
        may compare the shared sites of two models (:func:`~deadrelu.advise` notes it).

        Raises:
            DeadReluError: naming what differs, or what ``other`` is instead of a Report.

        Example:
            >>> import torch, deadrelu
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
            >>> r = deadrelu.scan(net, torch.randn(64, 4))
            >>> r.check_compatible(deadrelu.scan(net, torch.randn(64, 4), threshold=1.0), "diff")
            Traceback (most recent call last):
            ...
            deadrelu.errors.DeadReluError: cannot diff site '1': fire_threshold is 0.0 in one report, 1.0 in the other
        """
        if not isinstance(other, Report):
            raise DeadReluError(f"cannot {verb} reports: expected a deadrelu Report, got {type(other).__name__}")
        keys = ("levels", "mode", "model", "fingerprint") if verb == "merge" else ("levels", "mode")
        for key in keys:
            if getattr(self, key) != getattr(other, key):
                raise DeadReluError(
                    f"cannot {verb} reports with {key} {getattr(self, key)!r} and {getattr(other, key)!r}"
                )
        theirs = {s.name: s for s in other.sites}
        for site in self.sites:
            if site.name in theirs:
                site.check_compatible(theirs[site.name], verb)

    def merge(self, other: "Report") -> "Report":
        """One report over the data of both (e.g. two shards scanned apart, or two processes).

        Sites are matched by name and merged with :meth:`SiteReport.merge`; a site in only
        one report keeps its own counts (its observations say how much data it saw). Names
        number the call positions of one function in first-seen order, so a call that runs only
        for some batches (a conditional branch) can carry another name, or take another call's
        ``.k``, in a shard whose batches reached it in another order or not at all: such shards
        do not merge site by site. Scan them in one pass (``scan`` takes any iterable) instead.

        Raises:
            DeadReluError: ``other`` is not a Report; different levels, modes or models, or sites
                that do not match (see :meth:`check_compatible`).
        """
        self.check_compatible(other, "merge")
        theirs = {s.name: s for s in other.sites}
        merged = [s.merge(theirs[s.name]) if s.name in theirs else s for s in self.sites]
        mine = {s.name for s in self.sites}
        merged += [s for s in other.sites if s.name not in mine]
        return replace(
            self, sites=tuple(merged), batches=self.batches + other.batches, samples=self.samples + other.samples,
            uncaptured=tuple(dict.fromkeys(self.uncaptured + other.uncaptured)),  # look-alikes of either
        )

    def advice(self) -> Any:
        """Ranked, evidence-backed advice for this report (see :mod:`deadrelu.core.advice`)."""
        return advise(self)

    # -- comparison ----------------------------------------------------------------
    def diff(self, other: "Report") -> ReportDiff:
        """Which units died or revived going from this (earlier) report to ``other`` (later).

        Sites are matched by name; the two reports may come from different models (only the
        sites both have are compared), but their counts must mean the same thing. A unit
        unobserved or non-finite (NaN/Inf: neither dead nor alive) in either report is not
        compared: it neither died nor revived.

        Raises:
            DeadReluError: ``other`` is not a Report; other levels or mode; a shared site with
                another function, unit axis, firing threshold or number of units (as :meth:`merge`
                refuses them: see :meth:`check_compatible`).
        """
        self.check_compatible(other, "diff")
        mine = {s.name: s for s in self.sites}
        theirs = {s.name: s for s in other.sites}
        diffs = []
        for name, before in mine.items():
            after = theirs.get(name)
            if after is None:
                continue
            dead_b, dead_a = set(before.dead_units), set(after.dead_units)
            # An unobserved unit has no verdict: it neither died nor revived. Nor does a non-finite
            # one: NaN/Inf is its own state, neither dead nor alive, so dead -> NaN is no revival.
            unobs_b, unobs_a = set(before.unobserved_units), set(after.unobserved_units)
            nonfin_b, nonfin_a = set(before.nonfinite_units), set(after.nonfinite_units)
            diffs.append(
                SiteDiff(
                    name=name,
                    units=before.units,
                    died=tuple(sorted(dead_a - dead_b - unobs_b - nonfin_b)),
                    revived=tuple(sorted(dead_b - dead_a - unobs_a - nonfin_a)),
                    dead_before=len(dead_b),
                    dead_after=len(dead_a),
                    stayed_dead=tuple(sorted(dead_a & dead_b)),
                    unobserved=tuple(sorted(unobs_a | unobs_b)),
                    nonfinite=tuple(sorted(nonfin_a | nonfin_b)),
                )
            )
        return ReportDiff(
            sites=tuple(diffs),
            only_before=tuple(n for n in mine if n not in theirs),
            only_after=tuple(n for n in theirs if n not in mine),
        )

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data with a ``schema_version``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "deadrelu.Report",
            "model": self.model,
            "mode": self.mode,
            "batches": self.batches,
            "samples": self.samples,
            "levels": asdict(self.levels),
            "totals": {
                "units": self.units,
                "dead": self.dead,
                "unobserved": self.unobserved,
                "asleep": self.asleep,
                "dormant": self.dormant,
                "nonfinite": self.nonfinite,
                "dead_rate_upper_bound": self.dead_rate_bound,
            },
            "sites": [s.to_dict() for s in self.sites],
            "fingerprint": self.fingerprint,
            "uncaptured": list(self.uncaptured),
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int | None = 1) -> str:
        """Serialise to JSON; also write it to ``path`` when given (atomically)."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Report":
        """Rebuild a report from :meth:`to_dict` output (schema versions 1 and 2), validated
        field by field against the schema in :mod:`deadrelu.core.report_schema`.

        Raises:
            ReportFormatError: naming the first field that breaks the schema (missing keys,
                wrong types, negative or fractional counts, more firings than observations,
                lists of the wrong length, NaN where none can be, unknown schema versions).
        """
        args = parse_report(d)
        try:
            levels = Levels(**args.pop("levels"))
        except DeadReluError as err:  # parse_report checks the same ranges; kept as one error type
            raise ReportFormatError(f"levels: {err}") from None
        sites = tuple(SiteReport(**site, levels=levels) for site in args.pop("sites"))
        return cls(sites=sites, levels=levels, **args)

    @classmethod
    def from_json(cls, source: str | bytes | os.PathLike[str]) -> "Report":
        """Load a report from a JSON string or a path to a JSON file.

        Raises:
            DeadReluError: the file cannot be read.
            ReportFormatError: the text is not JSON or not a valid report.
        """
        if isinstance(source, (bytes, bytearray)):
            try:
                text = bytes(source).decode("utf-8")
            except UnicodeDecodeError as err:
                raise ReportFormatError(f"report is not UTF-8 text: {err}") from None
        else:
            text = str(source)
        # a string is JSON text unless it names a file ("{run1}.json" starts like JSON but is a path)
        is_file = isinstance(source, str) and "\n" not in source and len(source) < 4096 and _is_file(source)
        if isinstance(source, os.PathLike) or is_file or not text.lstrip().startswith(("{", "[")):
            try:
                text = Path(source).read_text(encoding="utf-8")  # type: ignore[arg-type]
            except UnicodeDecodeError as err:
                raise ReportFormatError(f"report {source} is not UTF-8 text: {err}") from None
            except (OSError, ValueError) as err:  # ValueError: e.g. a NUL byte in the name
                reason = getattr(err, "strerror", None) or err
                raise DeadReluError(f"cannot read report {str(source)[:200]}: {reason}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, over-long integers, deep nesting
            raise ReportFormatError(f"report is not valid JSON: {str(err)[:200]}") from None
        return cls.from_dict(data)

    # -- display -----------------------------------------------------------------------
    def table_rows(self) -> list[tuple[str, ...]]:
        """Rows of the summary table (header first, the total last), as strings.

        ``obs`` is each site's observations per unit; ``dead rate <`` the 95% upper bound on
        the firing rate of its dead units (the total row: the largest over sites).
        """
        rows = [TABLE_HEADER]
        for s in self.sites:
            rows.append(
                (s.name, s.function, *self._count_cells(s), format_count(s.observations),
                 format_rate(s.dead_rate_bound) if s.dead else "")
            )  # fmt: skip
        bound = self.dead_rate_bound
        rows.append(("total", "", *self._count_cells(self), "", format_rate(bound) if bound is not None else ""))
        return rows

    @staticmethod
    def _count_cells(x: "Report | SiteReport") -> tuple[str, ...]:
        return (
            str(x.units), str(x.dead), str(x.unobserved), str(x.asleep), str(x.dormant), str(x.nonfinite),
            floor_percent(x.dead, x.units),
        )  # fmt: skip

    def _caption(self) -> str:
        evidence = f", dead needs >= {self.levels.min_observations} observations" if self.levels.min_observations > 1 else ""
        return (
            f"{self.model or 'model'}: {len(self.sites)} activation site(s), {self.batches} batch(es), "
            f"{self.samples} sample(s), {self.mode} mode; asleep <= {self.levels.asleep_rate:g} firing rate, "
            f"dormant score <= {self.levels.dormant_tau:g}{evidence}"
        )

    def footnotes(self) -> list[str]:
        """The lines printed with the table: what the evidence columns mean, where they apply."""
        notes = []
        if self.dead:
            notes.append(
                "dead rate <: with 95% confidence a dead unit fires less often than this; "
                "1 - 0.05**(1/obs), about 3/obs"
            )
        if self.unobserved:
            notes.append(
                f"unobserved: never fired, but on fewer than min_observations={self.levels.min_observations} "
                "observations: too few to call dead"
            )
        if self.uncaptured:
            shown = ", ".join(self.uncaptured[:5]) + (f" and {len(self.uncaptured) - 5} more" if len(self.uncaptured) > 5 else "")
            notes.append(
                f"not counted: {len(self.uncaptured)} module(s) look like activations but are not known to "
                f"deadrelu: {shown}; add them with deadrelu.register_activation"
            )
        return notes

    def __str__(self) -> str:
        from .tables import render_plain

        # The notes go above the table, so its last line stays the total row.
        return "\n".join([self._caption(), *self.footnotes(), render_plain(self.table_rows())])

    def __repr__(self) -> str:
        return (
            f"Report(model={self.model!r}, sites={len(self.sites)}, units={self.units}, "
            f"dead={self.dead}, asleep={self.asleep}, dormant={self.dormant}, nonfinite={self.nonfinite}, "
            f"unobserved={self.unobserved})"
        )

    def __rich__(self) -> Any:
        from .tables import render_rich

        return render_rich(self.table_rows(), title="\n".join([self._caption(), *self.footnotes()]))


#: Columns of :meth:`Report.table_rows`.
TABLE_HEADER = (
    "site", "fn", "units", "dead", "unobserved", "asleep", "dormant", "nan/inf", "dead %", "obs", "dead rate <",
)  # fmt: skip


def _json_float(v: float) -> float | str:
    """JSON has no NaN/Inf: store them as strings that ``float()`` reads back."""
    if math.isfinite(v):
        return v
    return str(v)
