"""Frozen, serialisable results of a scan: :class:`Report` and :class:`SiteReport`.

A report holds only plain Python numbers (no tensors, no live hooks), so it can be
saved, loaded, diffed, plotted and rendered long after the model is gone. The raw
per-unit sums are stored; every classification (dead, asleep, dormant, ...) is
derived from them and the :class:`Levels`, so a loaded report classifies
exactly as the original did.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import DeadReluError
from .advice import advise
from .files import atomic_write_text
from .stats import classify

__all__ = [
    "SCHEMA_VERSION", "Levels", "Thresholds", "SiteReport", "Report", "SiteDiff", "ReportDiff", "model_fingerprint",
]  # fmt: skip

#: Bumped whenever the JSON layout changes incompatibly.
# 2: the asleep/dormant levels are stored under "levels" (1 called them "thresholds").
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

    The firing threshold (an output counts as firing when it is ``> threshold``) is
    chosen per site at capture time and stored on each :class:`SiteReport`.
    """

    asleep_rate: float = 0.05
    dormant_tau: float = 0.025

    def __post_init__(self) -> None:
        if not 0.0 <= self.asleep_rate < 1.0:
            raise DeadReluError(f"asleep_rate must be in [0, 1), got {self.asleep_rate}")
        if self.dormant_tau < 0.0:
            raise DeadReluError(f"dormant_tau must be >= 0, got {self.dormant_tau}")


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
        call: 0-based occurrence of ``module`` in one forward pass (reused modules give 1, 2, ...).
        slot: 0-based index of this activation among those called directly by that module call.
        unit_dim: the dimension of the activation tensor that indexes units.
        shape: shape of the activation in the first batch seen.
        fire_threshold: an output counts as firing when it is greater than this.
        observations: how many values each unit produced (batch × tokens × spatial positions).
        fired_counts: per unit, how many outputs were ``> fire_threshold``.
        mean_abs: per unit, mean absolute activation ``E|h_i|`` (NaN/Inf for non-finite units).
        nonfinite_counts: per unit, how many outputs were NaN or ±Inf.
        levels: the asleep/dormant levels that classify units.
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

    # -- per-unit derived values -------------------------------------------------
    @property
    def units(self) -> int:
        """Number of units (channels / features / hidden units) at this site."""
        return len(self.fired_counts)

    @cached_property
    def firing_rate(self) -> tuple[float, ...]:
        """Per unit, the fraction of observations that fired."""
        n = self.observations
        return tuple(c / n if n else 0.0 for c in self.fired_counts)

    @cached_property
    def dormancy(self) -> tuple[float, ...]:
        """Per unit, the dormancy score ``E|h_i| / mean_k E|h_k|`` over finite units (NaN if non-finite)."""
        finite = [m for m, bad in zip(self.mean_abs, self.nonfinite_counts) if not bad]
        layer_mean = sum(finite) / len(finite) if finite else 0.0
        out = []
        for m, bad in zip(self.mean_abs, self.nonfinite_counts):
            if bad:
                out.append(math.nan)
            else:
                out.append(m / layer_mean if layer_mean > 0 else 0.0)
        return tuple(out)

    @cached_property
    def states(self) -> tuple[str, ...]:
        """Per unit, one of ``"nonfinite"``, ``"dead"``, ``"asleep"`` or ``"active"``."""
        return tuple(classify(self.fired_counts, self.observations, self.nonfinite_counts, self.levels.asleep_rate))

    def _units_in(self, state: str) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.states) if s == state)

    @cached_property
    def dead_units(self) -> tuple[int, ...]:
        """Indices of units that never fired over all observations (NaN-free units only)."""
        return self._units_in("dead")

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
        tau = self.levels.dormant_tau
        return tuple(i for i, s in enumerate(self.dormancy) if not math.isnan(s) and s <= tau)

    # -- counts ------------------------------------------------------------------
    @property
    def dead(self) -> int:
        """Number of dead units."""
        return len(self.dead_units)

    @property
    def asleep(self) -> int:
        """Number of asleep units."""
        return len(self.asleep_units)

    @property
    def active(self) -> int:
        """Number of active units."""
        return len(self.active_units)

    @property
    def dormant(self) -> int:
        """Number of τ-dormant units."""
        return len(self.dormant_units)

    @property
    def nonfinite(self) -> int:
        """Number of units that produced NaN or Inf."""
        return len(self.nonfinite_units)

    @property
    def dead_fraction(self) -> float:
        """Dead units ÷ units."""
        return self.dead / self.units if self.units else 0.0

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
            "asleep": self.asleep,
            "dormant": self.dormant,
            "nonfinite": self.nonfinite,
            "dead_units": list(self.dead_units),
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], levels: Levels) -> "SiteReport":
        """Rebuild a site from :meth:`to_dict` output."""
        return cls(
            name=str(d["name"]),
            module=str(d["module"]),
            module_type=str(d["module_type"]),
            function=str(d["function"]),
            call=int(d["call"]),
            slot=int(d["slot"]),
            unit_dim=int(d["unit_dim"]),
            shape=tuple(int(s) for s in d["shape"]),
            fire_threshold=float(d["fire_threshold"]),
            observations=int(d["observations"]),
            fired_counts=tuple(int(c) for c in d["fired_counts"]),
            mean_abs=tuple(float(m) for m in d["mean_abs"]),
            nonfinite_counts=tuple(int(c) for c in d["nonfinite_counts"]),
            levels=levels,
        )


@dataclass(frozen=True)
class SiteDiff:
    """How one site changed between two reports."""

    name: str
    units: int
    died: tuple[int, ...]
    revived: tuple[int, ...]
    dead_before: int
    dead_after: int


@dataclass(frozen=True)
class ReportDiff:
    """Units that died or revived between an earlier and a later report (matched by site name)."""

    sites: tuple[SiteDiff, ...]
    only_before: tuple[str, ...] = ()
    only_after: tuple[str, ...] = ()

    @property
    def died(self) -> int:
        """Total units dead in the later report but not in the earlier one."""
        return sum(len(s.died) for s in self.sites)

    @property
    def revived(self) -> int:
        """Total units dead in the earlier report but not in the later one."""
        return sum(len(s.revived) for s in self.sites)

    def __str__(self) -> str:
        lines = [f"{self.died} unit(s) died, {self.revived} revived"]
        for s in self.sites:
            if s.died or s.revived:
                lines.append(
                    f"  {s.name}: dead {s.dead_before} -> {s.dead_after}"
                    f" (died {_fmt_idx(s.died)}; revived {_fmt_idx(s.revived)})"
                )
        for n in self.only_before:
            lines.append(f"  {n}: only in the earlier report")
        for n in self.only_after:
            lines.append(f"  {n}: only in the later report")
        return "\n".join(lines)


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

    def advice(self) -> Any:
        """Ranked, evidence-backed advice for this report (see :mod:`deadrelu.core.advice`)."""
        return advise(self)

    # -- comparison ----------------------------------------------------------------
    def diff(self, other: "Report") -> ReportDiff:
        """Which units died or revived going from this (earlier) report to ``other`` (later).

        Raises:
            DeadReluError: when a site with the same name has a different number of units.
        """
        mine = {s.name: s for s in self.sites}
        theirs = {s.name: s for s in other.sites}
        diffs = []
        for name, before in mine.items():
            after = theirs.get(name)
            if after is None:
                continue
            if after.units != before.units:
                raise DeadReluError(
                    f"site {name!r} has {before.units} units in one report and {after.units} in the other"
                )
            dead_b, dead_a = set(before.dead_units), set(after.dead_units)
            diffs.append(
                SiteDiff(
                    name=name,
                    units=before.units,
                    died=tuple(sorted(dead_a - dead_b)),
                    revived=tuple(sorted(dead_b - dead_a)),
                    dead_before=len(dead_b),
                    dead_after=len(dead_a),
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
                "asleep": self.asleep,
                "dormant": self.dormant,
                "nonfinite": self.nonfinite,
            },
            "sites": [s.to_dict() for s in self.sites],
            "fingerprint": self.fingerprint,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int | None = 1) -> str:
        """Serialise to JSON; also write it to ``path`` when given (atomically)."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Report":
        """Rebuild a report from :meth:`to_dict` output.

        Raises:
            DeadReluError: for data that is not a deadrelu report or has a newer schema.
        """
        if not isinstance(d, Mapping) or d.get("kind") != "deadrelu.Report":
            raise DeadReluError("not a deadrelu report (missing kind 'deadrelu.Report')")
        version = d.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise DeadReluError(
                f"report schema_version {version!r} is not supported (this deadrelu reads <= {SCHEMA_VERSION})"
            )
        levels = Levels(**d.get("levels", d.get("thresholds", {})))
        return cls(
            sites=tuple(SiteReport.from_dict(s, levels) for s in d["sites"]),
            levels=levels,
            batches=int(d.get("batches", 0)),
            samples=int(d.get("samples", 0)),
            mode=str(d.get("mode", "eval")),
            model=str(d.get("model", "")),
            fingerprint=str(d.get("fingerprint") or ""),
        )

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> "Report":
        """Load a report from a JSON string or a path to a JSON file."""
        text = str(source)
        if isinstance(source, os.PathLike) or not text.lstrip().startswith("{"):
            try:
                text = Path(source).read_text(encoding="utf-8")
            except OSError as err:
                raise DeadReluError(f"cannot read report {source}: {err.strerror or err}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DeadReluError(f"report is not valid JSON: {err}") from err
        return cls.from_dict(data)

    # -- display -----------------------------------------------------------------------
    def table_rows(self) -> list[tuple[str, ...]]:
        """Rows of the summary table (header first), as strings."""
        rows = [("site", "fn", "units", "dead", "asleep", "dormant", "nan/inf", "dead %")]
        for s in self.sites:
            rows.append(
                (
                    s.name,
                    s.function,
                    str(s.units),
                    str(s.dead),
                    str(s.asleep),
                    str(s.dormant),
                    str(s.nonfinite),
                    f"{100 * s.dead_fraction:.1f}",
                )
            )
        rows.append(
            (
                "total",
                "",
                str(self.units),
                str(self.dead),
                str(self.asleep),
                str(self.dormant),
                str(self.nonfinite),
                f"{100 * self.dead_fraction:.1f}",
            )
        )
        return rows

    def _caption(self) -> str:
        return (
            f"{self.model or 'model'}: {len(self.sites)} activation site(s), {self.batches} batch(es), "
            f"{self.samples} sample(s), {self.mode} mode; asleep <= {self.levels.asleep_rate:g} firing rate, "
            f"dormant score <= {self.levels.dormant_tau:g}"
        )

    def __str__(self) -> str:
        from .tables import render_plain

        return self._caption() + "\n" + render_plain(self.table_rows())

    def __repr__(self) -> str:
        return (
            f"Report(model={self.model!r}, sites={len(self.sites)}, units={self.units}, "
            f"dead={self.dead}, asleep={self.asleep}, dormant={self.dormant}, nonfinite={self.nonfinite})"
        )

    def __rich__(self) -> Any:
        from .tables import render_rich

        return render_rich(self.table_rows(), title=self._caption())


def _json_float(v: float) -> float | str:
    """JSON has no NaN/Inf: store them as strings that ``float()`` reads back."""
    if math.isfinite(v):
        return v
    return str(v)


def _fmt_idx(idx: Sequence[int], limit: int = 12) -> str:
    if not idx:
        return "none"
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f", … (+{len(idx) - limit})" if len(idx) > limit else "")
