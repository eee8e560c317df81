"""Turn a report into ranked, evidence-backed advice on what to do about dead units.

The advice is a pure function of one or two reports (no model, no data), so it can be
given for a saved JSON report as well. What it can say depends on the evidence:

* **non-finite units** come first: NaN/Inf make every other number unreliable;
* with a ``baseline`` (a scan at initialisation or an earlier checkpoint, same data),
  each dead unit is either **born dead** (already dead in the baseline) — a matter of
  initialisation and input scaling — or **died in training** — a matter of learning
  rate, gradient spikes and the activation's zero gradient;
* without a baseline the two cannot be told apart, and the advice says so;
* the **dead fraction by depth** (site order) shows where the problem sits: growing
  with depth points at signal shrinking through the stack (initialisation scale,
  missing normalisation), concentrated early at input scaling;
* units that are dead on the data can be **pruned** for free (same outputs);
* units too thinly observed to call dead (``min_observations``) are named, not counted.

Each action carries the numbers that support it and a score (units implicated ÷
units), by which actions are ranked. Each kind of advice is one named rule in
:data:`RULES`: a function of the :class:`Evidence` that yields actions and notes, so
adding advice is adding one rule.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

from .activations import ZERO_WHEN_DEAD_FUNCTIONS
from .tables import floor_percent
from ..errors import DeadReluError

if TYPE_CHECKING:  # report.py calls advise(); advice only reads reports, so it never imports them
    from .report import Report

__all__ = ["advise", "Advice", "Action", "Evidence", "RULES"]


@dataclass(frozen=True)
class Action:
    """One recommended action.

    Attributes:
        title: what to do, in a few words.
        evidence: the numbers that support it.
        how: concrete calls or settings to try.
        units: how many units the evidence implicates.
        score: ranking weight (``units / total units``; non-finite units rank first).
    """

    title: str
    evidence: str
    how: tuple[str, ...] = ()
    units: int = 0
    score: float = 0.0


@dataclass(frozen=True)
class Advice:
    """Ranked advice for a report; ``str(advice)`` is a readable summary.

    Attributes:
        actions: recommended actions, most strongly supported first.
        depth: per site in forward order, ``(name, dead, units)``.
        notes: what could not be told from the evidence given.
        born_dead: units dead in both the baseline and the report (None without baseline).
        died: units alive in the baseline and dead now (None without baseline).
        revived: units dead in the baseline and alive now (None without baseline).
        units: units in the report.
        dead: dead units in the report.
        certainty: what "dead" rests on: the weakest evidence behind any dead unit.
        min_fraction: the ``min_fraction`` the advice was given with.
        left_out: actions left out because they score at most ``min_fraction``.
    """

    actions: tuple[Action, ...]
    depth: tuple[tuple[str, int, int], ...]
    notes: tuple[str, ...] = ()
    born_dead: int | None = None
    died: int | None = None
    revived: int | None = None
    units: int = 0
    dead: int = 0
    certainty: str = ""
    min_fraction: float = 0.0
    left_out: int = 0

    def __str__(self) -> str:
        lines = [f"Advice: {self.dead} of {self.units} units dead ({floor_percent(self.dead, self.units)}%)"]
        if self.certainty:
            lines.append(f"  {self.certainty}")
        if self.born_dead is not None:
            lines.append(f"  vs baseline: {self.born_dead} born dead, {self.died} died in training, {self.revived} revived")
        # An empty list must not read as "nothing to do" while units are dead: say why it is empty.
        if not self.actions and self.left_out:
            lines.append(
                f"  No action scores above min_fraction={self.min_fraction:g}; {self.left_out} action(s) left out "
                "(pass a lower min_fraction to see them)."
            )
        elif not self.actions and self.dead:
            lines.append(
                "  No action: none of the dead units could be compared with the baseline "
                "(unobserved or non-finite there, or at a site it lacks)."
            )
        elif not self.actions:
            lines.append("  Nothing to do: no dead or non-finite units.")
        for i, a in enumerate(self.actions, 1):
            lines.append(f"{i}. {a.title}")
            lines.append(f"   evidence: {a.evidence}")
            for h in a.how:
                lines.append(f"   - {h}")
        if self.actions and self.left_out:
            lines.append(f"  ({self.left_out} more action(s) score at most min_fraction={self.min_fraction:g})")
        if any(d for _, d, _ in self.depth):
            lines.append("Dead fraction by depth:")
            width = max(len(n) for n, _, _ in self.depth)
            for name, d, n in self.depth:
                frac = d / n if n else 0.0
                lines.append(f"  {name:<{width}}  {d:>5}/{n:<5} {100 * frac:5.1f}%  {'#' * round(20 * frac)}".rstrip())
        for note in self.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)


def _is_report(obj: object) -> bool:
    """Whether ``obj`` reads like a :class:`deadrelu.Report` (sites, totals and levels)."""
    return all(hasattr(obj, name) for name in ("sites", "units", "dead", "levels", "diff"))


def _pct(a: int, b: int) -> str:
    return f"{floor_percent(a, b)}%" if b else "0%"



def _top(counts: list[tuple[int, str]], k: int = 3) -> str:
    """``"name (count), ..."`` for the ``k`` largest non-zero counts."""
    return ", ".join(f"{name} ({c})" for c, name in sorted(counts, reverse=True)[:k] if c)


@dataclass(frozen=True)
class Evidence:
    """What every rule reads: the report, the optional baseline and what follows from both.

    Attributes:
        report: the report advised on.
        baseline: the earlier report, or None.
        diff: ``baseline.diff(report)`` (None without baseline).
        total: units in the report.
        depth: per site in forward order, ``(name, dead, units)``.
    """

    report: Any
    baseline: Any
    diff: Any
    total: int
    depth: tuple[tuple[str, int, int], ...]

    @property
    def born(self) -> int | None:
        """Units dead in both reports (None without baseline)."""
        return None if self.diff is None else sum(len(d.stayed_dead) for d in self.diff.sites)

    def share(self, units: int) -> float:
        """``units`` as a fraction of all units: the score of an action implicating them."""
        return units / max(self.total, 1)


#: What a rule yields: an action to rank, or a note (a string) on what the evidence cannot tell.
Finding = Union[Action, str]
Rule = Callable[[Evidence], Iterator[Finding]]


def non_finite(ev: Evidence) -> Iterator[Finding]:
    """NaN/Inf units make every other number unreliable: fixing them ranks first (score > 1)."""
    sites = [(s.name, s.nonfinite) for s in ev.report.sites if s.nonfinite]
    if sites:
        n = sum(c for _, c in sites)
        yield Action(
            "Fix non-finite activations first",
            f"{n} unit(s) produced NaN/Inf at {', '.join(f'{k} ({c})' for k, c in sites[:5])}",
            ("lower the learning rate; clip gradients (torch.nn.utils.clip_grad_norm_)",
             "check the inputs for NaN/Inf and their scale"),
            n, 1.0 + ev.share(n),
        )  # fmt: skip


def _names(report: Report, limit: int = 4) -> str:
    names = [s.name for s in report.sites]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} sites)" if len(names) > limit else "")


def other_model(ev: Evidence) -> Iterator[Finding]:
    """A baseline of a model with other parameter names or shapes: only the shared sites compare."""
    before, now = (ev.baseline.fingerprint, ev.report.fingerprint) if ev.baseline is not None else ("", "")
    if before and now and before != now:
        yield (
            "the baseline was scanned from a model with other parameter names or shapes "
            f"({ev.baseline.model} vs {ev.report.model}): only the sites both have were compared"
        )


def sites_not_compared(ev: Evidence) -> Iterator[Finding]:
    """Sites in only one of report and baseline were not compared."""
    if ev.diff is not None and (ev.diff.only_after or ev.diff.only_before):
        yield f"sites not in both reports were not compared: {', '.join(ev.diff.only_before + ev.diff.only_after)}"


def born_dead(ev: Evidence) -> Iterator[Finding]:
    """Units already dead in the baseline: initialisation and input scaling."""
    born = ev.born
    if born:
        yield Action(
            "Initialisation: units are born dead",
            f"{born} of {ev.total} units ({_pct(born, ev.total)}) were already dead in the baseline; most at "
            + _top([(len(d.stayed_dead), d.name) for d in ev.diff.sites]),
            ("He (Kaiming) init for ReLU layers: nn.init.kaiming_normal_(w, nonlinearity='relu')",
             "small positive bias so units start firing: deadrelu.nudge_bias(model, report, 0.01)",
             "standardise the inputs (zero mean, unit variance)"),
            born, ev.share(born),
        )  # fmt: skip


def died_in_training(ev: Evidence) -> Iterator[Finding]:
    """Units alive in the baseline and dead now: learning rate, gradient spikes, zero gradient."""
    died = ev.diff.died if ev.diff is not None else 0
    if died:
        # Alive = fired (active or asleep) in the baseline, over the sites both reports have:
        # its unobserved and NaN units were not alive, and a site gone since is not counted.
        now = {site.name for site in ev.report.sites}
        alive_before = sum(b.active + b.asleep for b in ev.baseline.sites if b.name in now)
        yield Action(
            "Training killed units",
            f"{died} unit(s) alive in the baseline are dead now ({_pct(died, alive_before)} of the "
            f"{alive_before} that were alive); most at " + _top([(len(d.died), d.name) for d in ev.diff.sites]),
            ("lower the learning rate or add warm-up (large steps push biases far negative)",
             "clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
             "a leaky activation keeps a gradient: deadrelu.swap_activations(model, 'leaky_relu')",
             "revive them without changing outputs: deadrelu.reinit_dead(model, report, optimizer)"),
            died, ev.share(died),
        )  # fmt: skip


def dead_without_baseline(ev: Evidence) -> Iterator[Finding]:
    """Without a baseline the cause of death is unknown: say so, and offer the remedies."""
    report = ev.report
    if ev.baseline is not None or not report.dead:
        return
    yield (
        "without a baseline, units born dead (initialisation) cannot be told from units that died in "
        "training (learning rate, gradient spikes); scan at initialisation and pass baseline= to tell"
    )
    worst = max(report.sites, key=lambda s: s.dead_fraction)
    yield Action(
        "Revive or replace dead units",
        f"{report.dead} of {ev.total} units ({_pct(report.dead, ev.total)}) never fired on {report.samples} "
        f"samples; worst site {worst.name} with {worst.dead}/{worst.units}",
        ("revive without changing outputs: deadrelu.reinit_dead(model, report, optimizer)",
         "or train with a leaky activation: deadrelu.swap_activations(model, 'leaky_relu')",
         "check initialisation (He for ReLU) and the learning rate"),
        report.dead, ev.share(report.dead),
    )  # fmt: skip


def depth_trend(ev: Evidence) -> Iterator[Finding]:
    """Dead units concentrated deep (signal shrinks through the stack) or early (input scaling).

    Compares the dead fraction of the first and last half of the sites (the middle one of an
    odd count left out); a diagnosis, so weighted at half the units it implicates."""
    depth = ev.depth
    if len(depth) < 3 or not ev.report.dead:
        return
    k = len(depth) // 2

    def frac(part: tuple[tuple[str, int, int], ...]) -> float:
        units = sum(n for _, _, n in part)
        return sum(d for _, d, _ in part) / units if units else 0.0

    first, last = frac(depth[:k]), frac(depth[-k:])
    evidence = f"dead fraction {100 * first:.1f}% in the first half of the sites vs {100 * last:.1f}% in the last half"
    if last >= 2 * first and last - first >= 0.05:
        deep_dead = sum(d for _, d, _ in depth[-k:])
        yield Action(
            "Dead units concentrate in deep layers", evidence,
            ("signal shrinks or shifts through the stack: check init scale (He), add BatchNorm/LayerNorm",
             "or residual connections"),
            deep_dead, 0.5 * ev.share(deep_dead),
        )  # fmt: skip
    elif first >= 2 * last and first - last >= 0.05:
        early_dead = sum(d for _, d, _ in depth[:k])
        yield Action(
            "Dead units concentrate in early layers", evidence,
            ("check input scaling/normalisation and the first layers' init and bias",),
            early_dead, 0.5 * ev.share(early_dead),
        )  # fmt: skip


def prunable(ev: Evidence) -> Iterator[Finding]:
    """Dead units of zero-when-dead activations (ReLU, ReLU6 at threshold <= 0) output exactly 0."""
    n = sum(s.dead for s in ev.report.sites if s.function in ZERO_WHEN_DEAD_FUNCTIONS and s.fire_threshold <= 0)
    if n:
        yield Action(
            "Prune dead units for a smaller, equal model",
            f"{n} dead ReLU unit(s) output exactly 0 on the scanned data",
            ("deadrelu.prune_dead(model, report, data) returns a smaller model, verified on the data",),
            n, 0.5 * ev.share(n),
        )  # fmt: skip


def asleep(ev: Evidence) -> Iterator[Finding]:
    """Asleep units are alive but at risk of dying."""
    n = ev.report.asleep
    if n:
        rate = ev.report.levels.asleep_rate
        yield f"{n} unit(s) are asleep (fire on at most {100 * rate:g}% of observations): at risk of dying"


def unobserved(ev: Evidence) -> Iterator[Finding]:
    """Units that never fired on too few observations have no verdict: name them, do not count them."""
    report = ev.report
    if report.unobserved:
        where = _top([(s.unobserved, s.name) for s in report.sites])
        yield (
            f"{report.unobserved} unit(s) never fired but were seen on fewer than "
            f"min_observations={report.levels.min_observations} observations, so they are unobserved, "
            f"not counted dead (at {where}); scan more data, or data that reaches them, to tell"
        )


#: The rules, in the order their findings are collected (actions are then ranked by score).
RULES: tuple[Rule, ...] = (
    non_finite, other_model, sites_not_compared, born_dead, died_in_training, dead_without_baseline,
    depth_trend, prunable, asleep, unobserved,
)  # fmt: skip


def _certainty(report: Report) -> str:
    """The weakest evidence behind any dead unit, in words ("" without dead units)."""
    dead_sites = [s for s in report.sites if s.dead]
    if not dead_sites:
        return ""
    weakest = min(dead_sites, key=lambda s: s.observations)
    return f"dead = never fired; weakest evidence: {weakest.dead_evidence} (95%) at {weakest.name}"


def advise(report: Report, *, baseline: Report | None = None, min_fraction: float = 0.0) -> Advice:
    """Rank what to do about the dead units in ``report``, each action with its supporting numbers.

    Args:
        report: the scan to advise on (typically of the trained model).
        baseline: a scan of the same model at initialisation (or an earlier checkpoint) on
            the same data; tells born-dead units from units that died in training.
        min_fraction: leave out actions implicating at most this fraction of units (a number
            in [0, 1]); ``str()`` of the advice says how many were left out.

    Returns:
        An :class:`Advice`; print it for a readable summary.

    Raises:
        DeadReluError: ``report``/``baseline`` is not a Report, ``min_fraction`` is not a
            number in [0, 1], or a site has different widths in the two reports.

    Example:
        >>> import torch, deadrelu
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> print(deadrelu.advise(deadrelu.scan(net, torch.randn(64, 4))))  # doctest: +ELLIPSIS
        Advice: ...
    """
    if not _is_report(report):
        raise DeadReluError(f"advise: expected a deadrelu Report, got {type(report).__name__}")
    if baseline is not None and not _is_report(baseline):
        raise DeadReluError(f"advise: baseline must be a deadrelu Report, got {type(baseline).__name__}")
    # a score is a share of the units: outside [0, 1] (or NaN) the cut would hide all or nothing silently
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, numbers.Real) or not 0 <= min_fraction <= 1:
        raise DeadReluError(
            f"advise: min_fraction must be a number in [0, 1] (a share of the units), got {min_fraction!r:.80}"
        )
    diff = baseline.diff(report) if baseline is not None else None
    if diff is not None and not diff.sites and baseline.sites and report.sites:
        # nothing to compare: "0 born dead, 0 died" would read as a finding
        raise DeadReluError(
            f"advise: the baseline ({baseline.model or 'a model'}: {_names(baseline)}) shares no site with the report "
            f"({report.model or 'a model'}: {_names(report)}); scan the same model at initialisation or an earlier checkpoint"
        )
    depth = tuple((s.name, s.dead, s.units) for s in report.sites)
    ev = Evidence(report, baseline, diff, report.units, depth)
    findings = [f for rule in RULES for f in rule(ev)]
    found = [a for a in findings if isinstance(a, Action)]
    actions = sorted((a for a in found if a.score > min_fraction), key=lambda a: -a.score)
    notes = tuple(f for f in findings if isinstance(f, str))
    return Advice(
        tuple(actions), depth, notes, ev.born, diff.died if diff else None, diff.revived if diff else None,
        ev.total, report.dead, _certainty(report), float(min_fraction), len(found) - len(actions),
    )  # fmt: skip
