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
* units that are dead on the data can be **pruned** for free (same outputs).

Each action carries the numbers that support it and a score (units implicated ÷
units), by which actions are ranked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .activations import ZERO_WHEN_DEAD_FUNCTIONS
from ..errors import DeadReluError

if TYPE_CHECKING:  # report.py calls advise(); advice only reads reports, so it never imports them
    from .report import Report

__all__ = ["advise", "Advice", "Action"]


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
    """

    actions: tuple[Action, ...]
    depth: tuple[tuple[str, int, int], ...]
    notes: tuple[str, ...] = ()
    born_dead: int | None = None
    died: int | None = None
    revived: int | None = None
    units: int = 0
    dead: int = 0

    def __str__(self) -> str:
        pct = 100 * self.dead / self.units if self.units else 0.0
        lines = [f"Advice: {self.dead} of {self.units} units dead ({pct:.1f}%)"]
        if self.born_dead is not None:
            lines.append(f"  vs baseline: {self.born_dead} born dead, {self.died} died in training, {self.revived} revived")
        if not self.actions:
            lines.append("  Nothing to do: no dead or non-finite units.")
        for i, a in enumerate(self.actions, 1):
            lines.append(f"{i}. {a.title}")
            lines.append(f"   evidence: {a.evidence}")
            for h in a.how:
                lines.append(f"   - {h}")
        if any(d for _, d, _ in self.depth):
            lines.append("Dead fraction by depth:")
            width = max(len(n) for n, _, _ in self.depth)
            for name, d, n in self.depth:
                frac = d / n if n else 0.0
                lines.append(f"  {name:<{width}}  {d:>5}/{n:<5} {100 * frac:5.1f}%  {'#' * round(20 * frac)}")
        for note in self.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)


def _is_report(obj: object) -> bool:
    """Whether ``obj`` reads like a :class:`deadrelu.Report` (sites, totals and levels)."""
    return all(hasattr(obj, name) for name in ("sites", "units", "dead", "levels", "diff"))


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "0%"


def _depth_trend(depth: list[tuple[str, int, int]]) -> tuple[float, float] | None:
    """Dead fraction in the first and last half of the sites (the middle one of an odd count left out)."""
    if len(depth) < 3:
        return None
    k = max(1, len(depth) // 2)

    def frac(part: list[tuple[str, int, int]]) -> float:
        units = sum(n for _, _, n in part)
        return sum(d for _, d, _ in part) / units if units else 0.0

    return frac(depth[:k]), frac(depth[-k:])


def advise(report: Report, *, baseline: Report | None = None, min_fraction: float = 0.0) -> Advice:
    """Rank what to do about the dead units in ``report``, each action with its supporting numbers.

    Args:
        report: the scan to advise on (typically of the trained model).
        baseline: a scan of the same model at initialisation (or an earlier checkpoint) on
            the same data; tells born-dead units from units that died in training.
        min_fraction: leave out actions implicating at most this fraction of units.

    Returns:
        An :class:`Advice`; print it for a readable summary.

    Raises:
        DeadReluError: ``report``/``baseline`` is not a Report, or a site has different
            widths in the two reports.

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
    total = report.units
    depth = [(s.name, s.dead, s.units) for s in report.sites]
    actions: list[Action] = []
    notes: list[str] = []

    nonfinite = [(s.name, s.nonfinite) for s in report.sites if s.nonfinite]
    if nonfinite:
        n = sum(c for _, c in nonfinite)
        actions.append(
            Action(
                "Fix non-finite activations first",
                f"{n} unit(s) produced NaN/Inf at {', '.join(f'{k} ({c})' for k, c in nonfinite[:5])}",
                ("lower the learning rate; clip gradients (torch.nn.utils.clip_grad_norm_)",
                 "check the inputs for NaN/Inf and their scale"),
                n, 1.0 + n / max(total, 1),
            )  # fmt: skip
        )

    born = died = revived = None
    worst = max(report.sites, key=lambda s: s.dead_fraction, default=None)
    if baseline is not None:
        diff = baseline.diff(report)
        died = diff.died
        revived = diff.revived
        born = sum(d.dead_after - len(d.died) for d in diff.sites)
        if diff.only_after or diff.only_before:
            notes.append(
                f"sites not in both reports were not compared: {', '.join(diff.only_before + diff.only_after)}"
            )
        if born:
            where = sorted(((d.dead_after - len(d.died), d.name) for d in diff.sites), reverse=True)[:3]
            actions.append(
                Action(
                    "Initialisation: units are born dead",
                    f"{born} of {total} units ({_pct(born, total)}) were already dead in the baseline; most at "
                    + ", ".join(f"{n} ({c})" for c, n in where if c),
                    ("He (Kaiming) init for ReLU layers: nn.init.kaiming_normal_(w, nonlinearity='relu')",
                     "small positive bias so units start firing: deadrelu.nudge_bias(model, report, 0.01)",
                     "standardise the inputs (zero mean, unit variance)"),
                    born, born / max(total, 1),
                )  # fmt: skip
            )
        if died:
            alive_before = total - baseline.dead
            where = sorted(((len(d.died), d.name) for d in diff.sites), reverse=True)[:3]
            actions.append(
                Action(
                    "Training killed units",
                    f"{died} unit(s) alive in the baseline are dead now ({_pct(died, alive_before)} of the "
                    f"{alive_before} that were alive); most at " + ", ".join(f"{n} ({c})" for c, n in where if c),
                    ("lower the learning rate or add warm-up (large steps push biases far negative)",
                     "clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
                     "a leaky activation keeps a gradient: deadrelu.swap_activations(model, 'leaky_relu')",
                     "revive them without changing outputs: deadrelu.reinit_dead(model, report, optimizer)"),
                    died, died / max(total, 1),
                )  # fmt: skip
            )
    elif report.dead:
        notes.append(
            "without a baseline, units born dead (initialisation) cannot be told from units that died in "
            "training (learning rate, gradient spikes); scan at initialisation and pass baseline= to tell"
        )
        actions.append(
            Action(
                "Revive or replace dead units",
                f"{report.dead} of {total} units ({_pct(report.dead, total)}) never fired on {report.samples} "
                f"samples; worst site {worst.name} with {worst.dead}/{worst.units}" if worst else "",
                ("revive without changing outputs: deadrelu.reinit_dead(model, report, optimizer)",
                 "or train with a leaky activation: deadrelu.swap_activations(model, 'leaky_relu')",
                 "check initialisation (He for ReLU) and the learning rate"),
                report.dead, report.dead / max(total, 1),
            )  # fmt: skip
        )

    trend = _depth_trend(depth)
    if trend is not None and report.dead:
        first, last = trend
        # Where the dead units sit is a diagnosis, weighted below the causes it explains.
        k = max(1, len(depth) // 2)
        early_dead, deep_dead = sum(d for _, d, _ in depth[:k]), sum(d for _, d, _ in depth[-k:])
        if last >= 2 * first and last - first >= 0.05:
            actions.append(
                Action(
                    "Dead units concentrate in deep layers",
                    f"dead fraction {100 * first:.1f}% in the first half of the sites vs {100 * last:.1f}% in the last half",
                    ("signal shrinks or shifts through the stack: check init scale (He), add BatchNorm/LayerNorm",
                     "or residual connections"),
                    deep_dead, 0.5 * deep_dead / max(total, 1),
                )  # fmt: skip
            )
        elif first >= 2 * last and first - last >= 0.05:
            actions.append(
                Action(
                    "Dead units concentrate in early layers",
                    f"dead fraction {100 * first:.1f}% in the first half of the sites vs {100 * last:.1f}% in the last half",
                    ("check input scaling/normalisation and the first layers' init and bias",),
                    early_dead, 0.5 * early_dead / max(total, 1),
                )  # fmt: skip
            )

    prunable = sum(s.dead for s in report.sites if s.function in ZERO_WHEN_DEAD_FUNCTIONS and s.fire_threshold <= 0)
    if prunable:
        actions.append(
            Action(
                "Prune dead units for a smaller, equal model",
                f"{prunable} dead ReLU unit(s) output exactly 0 on the scanned data",
                ("deadrelu.prune_dead(model, report, data) returns a smaller model, verified on the data",),
                prunable, 0.5 * prunable / max(total, 1),
            )  # fmt: skip
        )
    asleep = report.asleep
    if asleep:
        rate = report.levels.asleep_rate
        notes.append(f"{asleep} unit(s) are asleep (fire on at most {100 * rate:g}% of observations): at risk of dying")

    actions = [a for a in actions if a.score > min_fraction]
    actions.sort(key=lambda a: -a.score)
    return Advice(tuple(actions), tuple(depth), tuple(notes), born, died, revived, total, report.dead)
