"""The demo's seeds put together, and a verdict per claim computed from this run's numbers.

:func:`aggregate` turns one :func:`~deadrelu.lab.demo.rescue_story` per seed into per-seed
lists (``None`` where a seed diverged: a diverged model has no dead fraction and no
accuracy worth a number), medians and ranges. :func:`summarise` answers the lesson's
claims from them — which rescue wins on accuracy, which is cheapest, which is robust,
whether a lower LR resurrects dead units, whether LeakyReLU leaves units never positive —
in plain sentences with the numbers. Nothing here is written in advance: another data set,
learning rate or seed count gives other verdicts.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

__all__ = ["STRATEGIES", "LABELS", "CLASSIC_THRESHOLD", "aggregate", "summarise", "median_or_none", "span"]

#: Strategies compared from the checkpoint, in display order.
STRATEGIES = ("control", "lower_lr", "leaky_relu", "reinit", "gelu")

#: How each strategy is called in tables, plots and sentences.
LABELS = {
    "control": "no rescue (control)",
    "lower_lr": "lower LR (÷10)",
    "leaky_relu": "swap to LeakyReLU",
    "reinit": "re-initialise dead units",
    "gelu": "swap to GELU",
}

#: The classic lesson: "more than 40% of the last hidden layer dies". The demo checks it, never assumes it.
CLASSIC_THRESHOLD = 0.40


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the values that exist (diverged seeds are ``None``), or None when none does.

    >>> median_or_none([0.2, None, 0.4, 0.3])
    0.3
    """
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def span(values: Sequence[float | None]) -> tuple[float, float] | None:
    """(min, max) of the values that exist, or None.

    >>> span([0.2, None, 0.4])
    (0.2, 0.4)
    """
    kept = [v for v in values if v is not None]
    return (min(kept), max(kept)) if kept else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _pct_range(values: Sequence[float | None]) -> str:
    r = span(values)
    return "no seed" if r is None else f"{100 * r[0]:.1f}–{100 * r[1]:.1f}%"


def _by_seed(runs: Sequence[dict[str, Any]], pick: Any, diverged: Sequence[bool]) -> list[Any]:
    return [None if d else pick(r) for r, d in zip(runs, diverged)]


def _checkpoint_aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first seed's checkpoint, plus every seed's numbers at it."""
    cps = [r["checkpoint"] for r in runs]
    diverged = [cp["diverged"] for cp in cps]
    n_layers = len(cps[0]["layers"])
    per_layer = _by_seed(cps, lambda cp: [layer["dead_fraction"] for layer in cp["layers"]], diverged)
    val_layer = _by_seed(cps, lambda cp: [layer["dead_fraction"] for layer in cp["val_layers"]], diverged)
    return {
        **cps[0],
        "diverged": all(diverged),
        "diverged_by_seed": diverged,
        "diverged_seeds": sum(diverged),
        "dead_fraction_by_seed": _by_seed(cps, lambda cp: cp["dead_fraction"], diverged),
        "dead_units_by_seed": _by_seed(cps, lambda cp: sum(layer["dead"] for layer in cp["layers"]), diverged),
        "last_layer_dead_fraction_by_seed": [None if v is None else v[-1] for v in per_layer],
        "val_last_layer_dead_fraction_by_seed": [None if v is None else v[-1] for v in val_layer],
        "layer_dead_fraction_median": [median_or_none([None if v is None else v[j] for v in per_layer])
                                       for j in range(n_layers)],
        "val_layer_dead_fraction_median": [median_or_none([None if v is None else v[j] for v in val_layer])
                                           for j in range(n_layers)],
        "val_accuracy_by_seed": _by_seed(cps, lambda cp: cp["val_accuracy"], diverged),
        "train_seconds_by_seed": [r["baseline"]["train_seconds"] for r in runs],
    }


def _strategy_aggregate(name: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One strategy over every seed: per-seed lists (None where diverged), medians, the first seed's curves."""
    mine = [r["strategies"][name] for r in runs]
    if all("skipped" in m for m in mine):
        return dict(mine[0])
    # A seed that diverged before the checkpoint hands every strategy NaN weights: diverged too.
    diverged = [("skipped" in m) or m["diverged"] or r["checkpoint"]["diverged"] for m, r in zip(mine, runs)]
    layers = _by_seed(mine, lambda m: [layer["dead_fraction"] for layer in m["final"]], diverged)
    seconds = [None if "skipped" in m else m["cost"]["train_seconds"] + m["cost"]["surgery_seconds"] for m in mine]
    first = next(m for m in mine if "skipped" not in m)
    out = {
        "label": first["label"],
        "lr": first["lr"],
        "epochs": first["epochs"],
        "final": first["final"],
        "firing_rates": first["firing_rates"],
        "diverged": all(diverged),
        "diverged_by_seed": diverged,
        "diverged_seeds": sum(diverged),
        "val_accuracy_by_seed": _by_seed(mine, lambda m: m["val_accuracy"], diverged),
        "last_layer_dead_fraction_by_seed": [None if v is None else v[-1] for v in layers],
        "val_last_layer_dead_fraction_by_seed": _by_seed(mine, lambda m: m["final_val"][-1]["dead_fraction"], diverged),
        "dead_fraction_by_seed": _by_seed(mine, lambda m: m["final_dead_fraction"], diverged),
        "layer_dead_fraction_median": [median_or_none([None if v is None else v[j] for v in layers])
                                       for j in range(len(first["final"]))],
        "resurrected_by_seed": _by_seed(mine, lambda m: sum(m["resurrected"]), diverged),
        "seconds_by_seed": seconds,
    }
    out["val_accuracy"] = median_or_none(out["val_accuracy_by_seed"])
    out["final_dead_fraction"] = median_or_none(out["dead_fraction_by_seed"])
    out["last_layer_dead_fraction"] = median_or_none(out["last_layer_dead_fraction_by_seed"])
    # Cost medians leave diverged seeds out, as every other median does (the table says so).
    out["cost"] = {
        **first["cost"],
        "train_seconds": median_or_none([None if d else m["cost"]["train_seconds"] for m, d in zip(mine, diverged)]),
        "surgery_seconds": median_or_none([None if d else m["cost"]["surgery_seconds"] for m, d in zip(mine, diverged)]),
        "seconds": median_or_none([None if d else v for v, d in zip(seconds, diverged)]),
        "units_reinitialised": median_or_none(
            [None if d else m["cost"]["units_reinitialised"] for m, d in zip(mine, diverged)]),
    }
    return out


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed runs → the story's ``initial``, ``baseline``, ``checkpoint`` and ``strategies``.

    ``initial``/``baseline`` are the first seed's (the curves of every seed stay in ``runs``);
    ``checkpoint`` and each strategy add ``*_by_seed`` lists and medians to the first seed's fields.

    Example:
        >>> from deadrelu.lab.datasets import load_dataset
        >>> from deadrelu.lab.demo import DemoSetting, rescue_story
        >>> setting = DemoSetting(checkpoint_epoch=1, epochs=1, strategies=("control",))
        >>> runs = [rescue_story(load_dataset("digits"), seed=s, setting=setting, progress=False) for s in (0, 1)]
        >>> len(aggregate(runs)["strategies"]["control"]["val_accuracy_by_seed"])
        2
    """
    born = [[layer["dead_fraction"] for layer in r["initial"]["layers"]] for r in runs]
    return {
        "initial": {**runs[0]["initial"], "last_layer_dead_fraction_by_seed": [b[-1] for b in born]},
        "baseline": runs[0]["baseline"],
        "checkpoint": _checkpoint_aggregate(runs),
        "strategies": {name: _strategy_aggregate(name, runs) for name in runs[0]["strategies"]},
    }


# -- verdicts -----------------------------------------------------------------------------------------
def _ran(story: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Strategies that ran and did not diverge in every seed."""
    return {k: v for k, v in story["strategies"].items() if "skipped" not in v and not v["diverged"]}


def _seeds_note(v: dict[str, Any], n: int) -> str:
    k = v["diverged_seeds"]
    return f", over the {n - k}/{n} seeds that did not diverge" if k else ""


def _accuracy_verdict(story: dict[str, Any], n: int) -> dict[str, Any]:
    ran = _ran(story)
    control = ran.get("control")
    rescues = {k: v for k, v in ran.items() if k != "control" and v["val_accuracy"] is not None}
    if not rescues:
        return {"winner": None, "text": "Accuracy: no rescue finished without diverging, so none can be compared."}
    best = max(rescues, key=lambda k: rescues[k]["val_accuracy"])
    b = rescues[best]
    acc = (f"a median {_pct(b['val_accuracy'])} validation accuracy (range "
           f"{_pct_range(b['val_accuracy_by_seed'])}{_seeds_note(b, n)})")
    vs = "" if control is None else f"; control {_pct(control['val_accuracy'])}{_seeds_note(control, n)}"
    if control is not None and control["val_accuracy"] is not None and b["val_accuracy"] <= control["val_accuracy"]:
        return {"winner": None, "text": f"Accuracy: no rescue beat the control; the best rescue, {b['label']}, "
                                        f"reached {acc}{vs}."}
    return {"winner": best, "text": f"Accuracy: {b['label']} wins with {acc}{vs}."}


def _cost_verdict(story: dict[str, Any]) -> dict[str, Any]:
    timed = {k: v for k, v in story["strategies"].items() if "skipped" not in v and v["cost"]["seconds"] is not None}
    rescues = {k: v for k, v in timed.items() if k != "control"}
    if not rescues:
        return {"winner": None, "text": "Cost: no rescue ran."}
    epochs = story["config"]["epochs"]
    order = sorted(rescues, key=lambda k: rescues[k]["cost"]["seconds"])
    cheap, dear = rescues[order[0]], rescues[order[-1]]

    def extra(v: dict[str, Any]) -> str:
        params = v["cost"].get("extra_params") or 0
        return f", {params:+d} parameters" if params else ""

    control = timed.get("control")
    vs = "" if control is None else f"; control {control['cost']['seconds']:.2f} s"
    text = (f"Cost: {cheap['label']} is cheapest, {cheap['cost']['seconds']:.2f} s for {epochs} epochs "
            f"(median wall time of training plus surgery{extra(cheap)}){vs}; the dearest is {dear['label']}, "
            f"{dear['cost']['seconds']:.2f} s{extra(dear)}.")
    return {"winner": order[0], "text": text}


def _robustness_verdict(story: dict[str, Any], n: int) -> dict[str, Any]:
    ran = {k: v for k, v in story["strategies"].items() if "skipped" not in v}
    rescues = {k: v for k, v in ran.items() if k != "control"}
    if not rescues:
        return {"winner": None, "text": "Robustness: no rescue ran."}
    fewest = min(v["diverged_seeds"] for v in rescues.values())
    winners = [k for k, v in rescues.items() if v["diverged_seeds"] == fewest]
    counts = ", ".join(f"{v['label']} {v['diverged_seeds']}/{n}" for v in ran.values())
    labels = [rescues[k]["label"] for k in winners]
    names = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
    verb = "diverged in the fewest seeds" if len(labels) < len(rescues) else "diverged equally often"
    return {"winner": winners, "text": f"Robustness: {names} {verb} ({fewest}/{n}). "
                                       f"Diverged seeds per strategy: {counts}."}


def _revived(story: dict[str, Any], name: str, seeds: Sequence[int]) -> tuple[int, int]:
    """(units dead at the checkpoint that fire at the end, units dead at the checkpoint) over ``seeds``."""
    revived = story["strategies"][name]["resurrected_by_seed"]
    dead = story["checkpoint"]["dead_units_by_seed"]
    return sum(revived[i] for i in seeds), sum(dead[i] for i in seeds)


def _surviving_seeds(story: dict[str, Any], names: Sequence[str]) -> list[int]:
    """Seed indices where every named strategy and the checkpoint have numbers (none diverged)."""
    dead = story["checkpoint"]["dead_units_by_seed"]
    columns = [story["strategies"][n]["resurrected_by_seed"] for n in names]
    return [i for i, d in enumerate(dead) if d is not None and all(c[i] is not None for c in columns)]


def _lower_lr_verdict(story: dict[str, Any]) -> dict[str, Any] | None:
    v = story["strategies"].get("lower_lr")
    if v is None or "skipped" in v:
        return None
    if v["diverged"]:
        return {"answer": None, "text": f"Lower LR: {v['label']} diverged in every seed; no answer."}
    # One denominator for both numbers: the seeds where lower LR and the control (when it ran) survived.
    compared = ["lower_lr"] + (["control"] if "control" in _ran(story) else [])
    seeds = _surviving_seeds(story, compared)
    if not seeds:  # the control diverged wherever lower LR did not: lower LR on its own seeds
        compared, seeds = ["lower_lr"], _surviving_seeds(story, ["lower_lr"])
    revived, dead = _revived(story, "lower_lr", seeds)
    share = revived / dead if dead else 0.0
    answer = "no" if revived == 0 else ("partly" if share < 0.5 else "yes")
    verb = {"no": "did not resurrect", "partly": "resurrected only some", "yes": "resurrected most"}[answer]
    cp_last = median_or_none(story["checkpoint"]["last_layer_dead_fraction_by_seed"])
    text = (f"Lower LR: training on at LR {v['lr']:g} {verb} dead units: {revived} of the {dead} units dead at the "
            f"checkpoint fired again after {story['config']['epochs']} epochs ({100 * share:.0f}%); the last hidden "
            f"layer went from a median {_pct(cp_last)} to {_pct(v['last_layer_dead_fraction'])} dead")
    if "control" in compared:
        c_revived, _ = _revived(story, "control", seeds)
        text += f" (control at LR {story['config']['lr']:g}: {c_revived} of the same {dead} revived)"
    seeds_run = len(story["checkpoint"]["dead_units_by_seed"])
    if len(seeds) < seeds_run:
        text += f"; counted over the {len(seeds)} of {seeds_run} seeds where {' and '.join(story['strategies'][n]['label'] for n in compared)} did not diverge"
    return {"answer": answer, "text": text + "."}


def _leaky_verdict(story: dict[str, Any], n: int) -> dict[str, Any] | None:
    v = story["strategies"].get("leaky_relu")
    if v is None or "skipped" in v:
        return None
    if v["diverged"]:
        return {"answer": None, "text": "LeakyReLU: training diverged in every seed after the swap; no answer."}
    worst = max(x for x in v["dead_fraction_by_seed"] if x is not None)
    answer = "yes" if worst > 0 else "no"
    head = ("LeakyReLU left units that are never positive" if answer == "yes"
            else "LeakyReLU left no unit that is never positive")
    return {"answer": answer, "text": (
        f"{head}: a median {_pct(v['final_dead_fraction'])} of all hidden units (range "
        f"{_pct_range(v['dead_fraction_by_seed'])}) and {_pct(v['last_layer_dead_fraction'])} of the last hidden "
        f"layer had no positive output on the training set after {story['config']['epochs']} epochs"
        f"{_seeds_note(v, n)} — their gradient is only the 0.01 slope.")}


def _headline(story: dict[str, Any]) -> tuple[str, list[str]]:
    """The title-sized finding and the sentences about the checkpoint."""
    cfg, cp = story["config"], story["checkpoint"]
    n = len(cfg["seeds"])
    last = cp["layers"][-1]["site"]
    by_seed = cp["last_layer_dead_fraction_by_seed"]
    med, val_med = median_or_none(by_seed), median_or_none(cp["val_last_layer_dead_fraction_by_seed"])
    div = f"; {cp['diverged_seeds']} diverged" if cp["diverged_seeds"] else ""
    setting = f"epoch {cp['epoch']} at LR {cfg['lr']:g}" + (f", inputs {cfg['inputs']}" if cfg.get("inputs") else "")
    if med is None:
        return (f"Training diverged in all {n} seeds by epoch {cp['epoch']}",
                [f"Training at LR {cfg['lr']:g} diverged (NaN loss or NaN units) in all {n} seeds before the "
                 f"checkpoint: units went non-finite rather than dead."])
    title = f"{100 * med:.0f}% of the last hidden layer dead by epoch {cp['epoch']} (median of {n} seeds)"
    lines = [
        f"At the checkpoint ({setting}), the last hidden layer ({last}) was dead for a median {_pct(med)} of its "
        f"units on the training set (range {_pct_range(by_seed)} over {n} seeds{div}) and {_pct(val_med)} on the "
        "validation set.",
        "Per seed (training set / validation set): " + ", ".join(
            f"seed {s} diverged" if t is None else f"seed {s} {_pct(t)} / {_pct(v)}"
            for s, t, v in zip(cfg["seeds"], by_seed, cp["val_last_layer_dead_fraction_by_seed"])) + ".",
    ]
    born = story.get("initial", {}).get("last_layer_dead_fraction_by_seed")
    if born:
        lines.append(f"Before the first step, a median {_pct(median_or_none(born))} of {last} was already dead "
                     f"(range {_pct_range(born)}).")
    above = sum(1 for v in by_seed if v is not None and v > CLASSIC_THRESHOLD)
    lines.append(
        f"The classic lesson (more than {100 * CLASSIC_THRESHOLD:.0f}% of the last hidden layer dies) "
        + ("holds for the median seed" if med > CLASSIC_THRESHOLD else "does not hold for the median seed")
        + f": {above} of {n} seeds had more than {100 * CLASSIC_THRESHOLD:.0f}% dead."
    )
    return title, lines


def _monitor_line(story: dict[str, Any]) -> str | None:
    monitors = [r["baseline"].get("monitor") for r in story.get("runs", [story])]
    monitors = [m for m in monitors if isinstance(m, dict)]
    if not monitors:
        return None
    kinds: dict[str, int] = {}
    for m in monitors:
        for kind, count in m.get("events", {}).items():
            kinds[kind] = kinds.get(kind, 0) + count
    seen = ", ".join(f"{c} {kind}" for kind, c in sorted(kinds.items())) or "no unit deaths or revivals"
    alerts = sum(len(m.get("alerts", [])) for m in monitors)
    return (f"The training monitor (rolling window of {monitors[0]['window_batches']} batches, about one epoch) "
            f"recorded {seen} and {alerts} alert(s) up to the checkpoint, over {len(monitors)} seed(s).")


def _legacy_best(story: dict[str, Any]) -> tuple[str | None, str | None]:
    """The fewest-dead rescue (None when it is no better than the control) and the most accurate strategy."""
    ran = _ran(story)
    scored = {k: v for k, v in ran.items() if v["final_dead_fraction"] is not None}
    if not scored:
        return None, None
    best = min(scored, key=lambda k: (scored[k]["final_dead_fraction"], -(scored[k]["val_accuracy"] or 0)))
    best_acc = max(scored, key=lambda k: (scored[k]["val_accuracy"] or 0, -scored[k]["final_dead_fraction"]))
    control = scored.get("control")
    if best == "control" or (control is not None and
                             scored[best]["final_dead_fraction"] >= control["final_dead_fraction"]):
        best = None
    return best, best_acc


def summarise(story: dict[str, Any]) -> dict[str, Any]:
    """The seeds' finding and a verdict per claim, with sentences to print (``lines``).

    Example:
        >>> from deadrelu.lab.datasets import load_dataset
        >>> from deadrelu.lab.demo import DemoSetting, seeds_story
        >>> story = seeds_story(load_dataset("digits"), seeds=(0,), setting=DemoSetting(checkpoint_epoch=1,
        ...                     epochs=1, strategies=("control", "gelu")), progress=False)
        >>> sorted(summarise(story)["verdicts"])
        ['accuracy', 'cost', 'robustness']
    """
    cfg, cp = story["config"], story["checkpoint"]
    n = len(cfg["seeds"])
    title, lines = _headline(story)
    monitor = _monitor_line(story)
    if monitor:
        lines.append(monitor)
    verdicts: dict[str, Any] = {}
    if not cp["diverged"]:
        verdicts = {"accuracy": _accuracy_verdict(story, n), "cost": _cost_verdict(story),
                    "robustness": _robustness_verdict(story, n)}
        for key, verdict in (("lower_lr_resurrects", _lower_lr_verdict(story)),
                             ("leaky_relu_never_positive", _leaky_verdict(story, n))):
            if verdict is not None:
                verdicts[key] = verdict
        lines += [v["text"] for v in verdicts.values()]
    for v in story["strategies"].values():
        if "skipped" in v:
            lines.append(f"{v['label']}: not run — {v['skipped']}.")
    by_seed = cp["last_layer_dead_fraction_by_seed"]
    med = median_or_none(by_seed)
    worst = max(range(len(cp["layers"])), key=lambda j: cp["layer_dead_fraction_median"][j] or 0)
    best, best_acc = _legacy_best(story)
    return {
        "title": title,
        "last_layer": cp["layers"][-1]["site"],
        "last_layer_dead_fraction": med,
        "last_layer_dead_fraction_by_seed": by_seed,
        "last_layer_dead_range": span(by_seed),
        "val_last_layer_dead_fraction": median_or_none(cp["val_last_layer_dead_fraction_by_seed"]),
        "val_last_layer_dead_fraction_by_seed": cp["val_last_layer_dead_fraction_by_seed"],
        "worst_layer": cp["layers"][worst]["site"],
        "worst_layer_dead_fraction": cp["layer_dead_fraction_median"][worst],
        "dead_fraction": median_or_none(cp["dead_fraction_by_seed"]),
        "classic_reproduced": med is not None and med > CLASSIC_THRESHOLD,
        "diverged": cp["diverged"],
        "diverged_seeds": cp["diverged_seeds"],
        "best_strategy": best,
        "best_accuracy_strategy": best_acc,
        "verdicts": verdicts,
        "lines": lines,
    }
