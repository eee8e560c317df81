"""Result tables of the demo and the experiments: rows of strings, header first.

The CLI prints them (plain or rich) and the HTML report renders them; both read saved
results only, so a table looks the same live and from ``results.json``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import DeadReluError
from .verdicts import median_or_none, span

__all__ = ["result_table", "rescue_table"]


def _med(values: Sequence[float | None]) -> str:
    m = median_or_none(values)
    return "diverged" if m is None else f"{100 * m:.1f}"


def _rng(values: Sequence[float | None]) -> str:
    r = span(values)
    return "-" if r is None else f"{100 * r[0]:.1f}-{100 * r[1]:.1f}"


def _kept(values: Sequence[float | None] | None, diverged: Sequence[bool] | None) -> list[float | None] | None:
    """``values`` with a diverged seed's made None (medians leave diverged seeds out); None without per-seed values."""
    if values is None:
        return None
    flags = list(diverged) if diverged is not None else [False] * len(values)
    return [None if d else v for v, d in zip(values, flags)]


def _seconds(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.1f}"


def _layer_medians(per_seed: Sequence[Sequence[float] | None], n_layers: int) -> list[str]:
    return [_med([None if v is None else v[j] for v in per_seed]) for j in range(n_layers)]


def rescue_table(story: dict[str, Any]) -> list[list[str]]:
    """Rows (header first) of the rescue table, over seeds.

    Per hidden layer, the median dead % on the training set; for the last layer also its
    range over seeds and its median on the validation set; then validation accuracy
    (median, range), diverged seeds and the median training seconds. A seed that diverged
    is left out of medians and counted under "diverged"; a strategy that diverged in every
    seed shows "diverged" instead of numbers.
    """
    if "runs" not in story:
        raise DeadReluError(
            f"a {story.get('experiment', 'demo')} result of schema {story.get('schema_version', '?')} (one seed, "
            "written by an older deadrelu) has no per-seed runs; rerun it to get this version's table"
        )
    runs = story["runs"]
    n = len(runs)
    names = [layer["site"] for layer in story["checkpoint"]["layers"]]
    last = names[-1]
    header = (["strategy"] + [f"dead% {name}" for name in names]
              + [f"{last} min-max", f"{last} val", "val acc%", "acc min-max", "diverged", "train s", "extra"])
    rows = [header]
    born = [[layer["dead_fraction"] for layer in r["initial"]["layers"]] for r in runs]
    born_val = [r["initial"]["val_layers"][-1]["dead_fraction"] for r in runs]
    acc0 = [r["initial"]["val_accuracy"] for r in runs]
    rows.append(["initialisation (epoch 0)"] + _layer_medians(born, len(names))
                + [_rng([b[-1] for b in born]), _med(born_val), _med(acc0), _rng(acc0), f"0/{n}", "", ""])
    cp = story["checkpoint"]
    per_seed = [None if r["checkpoint"]["diverged"] else [layer["dead_fraction"] for layer in r["checkpoint"]["layers"]]
                for r in runs]
    rows.append(
        [f"checkpoint (epoch {cp['epoch']})"] + _layer_medians(per_seed, len(names))
        + [_rng(cp["last_layer_dead_fraction_by_seed"]), _med(cp["val_last_layer_dead_fraction_by_seed"]),
           _med(cp["val_accuracy_by_seed"]), _rng(cp["val_accuracy_by_seed"]), f"{cp['diverged_seeds']}/{n}",
           _seconds(median_or_none(_kept(cp["train_seconds_by_seed"], cp.get("diverged_by_seed")) or [])), ""]
    )
    for name, v in story["strategies"].items():
        if "skipped" in v:
            rows.append([v["label"]] + ["-"] * (len(names) + 7) + ["not available"])
            continue
        per_seed = [None if d else [layer["dead_fraction"] for layer in r["strategies"][name]["final"]]
                    for r, d in zip(runs, v["diverged_by_seed"])]
        cost = v["cost"]
        # The story's cost medians count every seed; the table's, like its other medians, leave diverged seeds out.
        diverged = v.get("diverged_by_seed")
        raw_resets = _per_seed_cost(runs, name, "units_reinitialised")
        resets = _kept(raw_resets, diverged)
        seconds_by_seed = _kept(v.get("seconds_by_seed"), diverged)
        resets_median = cost["units_reinitialised"] if resets is None else median_or_none(resets)
        seconds = cost["seconds"] if seconds_by_seed is None else median_or_none(seconds_by_seed)
        extra = []
        if cost["extra_params"]:
            extra.append(f"{cost['extra_params']:+d} params")
        if resets_median:
            extra.append(f"{resets_median:g} unit resets (median)")
        elif resets_median is None and (cost["units_reinitialised"] or any(raw_resets or ())):
            extra.append("unit resets: diverged")
        if cost["activations_swapped"]:
            extra.append(f"{cost['activations_swapped']} swapped")
        rows.append(
            [v["label"]] + _layer_medians(per_seed, len(names))
            + [_rng(v["last_layer_dead_fraction_by_seed"]), _med(v["val_last_layer_dead_fraction_by_seed"]),
               _med(v["val_accuracy_by_seed"]), _rng(v["val_accuracy_by_seed"]), f"{v['diverged_seeds']}/{n}",
               _seconds(seconds), ", ".join(extra) or "none"]
        )
    return rows


def _per_seed_cost(runs: Sequence[dict[str, Any]], name: str, key: str) -> list[float | None] | None:
    """Each seed's ``cost[key]`` for strategy ``name`` (None for a seed that skipped it), or None if a run lacks it."""
    values: list[float | None] = []
    for run in runs:
        mine = run.get("strategies", {}).get(name, {})
        if "skipped" in mine:
            values.append(None)
        elif key in mine.get("cost", {}):
            values.append(mine["cost"][key])
        else:
            return None
    return values


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def result_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows (header first) of an experiment's table.

    Example:
        >>> from deadrelu.lab.experiments import run_experiment
        >>> result_table(run_experiment("lr-sweep", lrs=(0.1,), seeds=(0,), epochs=1, progress=False))[0][0]
        'LR'
    """
    kind = result["experiment"]
    if kind in ("rescue", "demo"):
        return rescue_table(result)
    if kind == "preprocessing":
        names = result["rows"][0]["layers"]
        last = names[-1]
        rows = [["inputs", "epoch"] + [f"dead% {n}" for n in names] + [f"{last} min-max", f"{last} val", "diverged"]]
        for r in result["rows"]:
            cells = [r["inputs"], str(r["epoch"])] + [_pct(m) for m in r["dead_fraction_median"]]
            lo_hi = r["last_layer_range"]
            cells += ["-" if lo_hi is None else f"{100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f}",
                      _pct(r["val_dead_fraction_median"][-1]), f"{r['diverged']}/{r['seeds']}"]
            rows.append(cells)
        return rows
    if kind == "lr-sweep":
        n = len(result["hidden"])
        header = ["LR"] + [f"dead% h{j + 1} mean [min-max]" for j in range(n)] + ["dead units (mean)", "diverged", "val MSE"]
        rows = [header]
        for r in result["rows"]:
            cells = [f"{r['lr']:g}"]
            for j in range(n):
                m, lo, hi = r["dead_fraction_mean"][j], r["dead_fraction_min"][j], r["dead_fraction_max"][j]
                cells.append("-" if m is None else f"{100 * m:.1f} [{100 * lo:.1f}-{100 * hi:.1f}]")
            cells.append(" / ".join("-" if u is None else f"{u:.1f}" for u in r["dead_units_mean"]))
            cells.append(f"{r['diverged']}/{r['seeds']}")
            cells.append("-" if r["val_mse_mean"] is None else f"{r['val_mse_mean']:.3g}")
            rows.append(cells)
        return rows
    if kind == "activations":
        rows = [["activation", "init", "dead%", "dormant%", "non-finite%", "val acc%", "train s", "params"]]
        for r in result["rows"]:
            # A diverged net has NaN units, which are neither dead nor dormant: say "diverged", not "0.0".
            dead, dormant = ("diverged", "-") if r["diverged"] else (_pct(r["dead_fraction"]), _pct(r["dormant_fraction"]))
            accuracy = "-" if r["diverged"] else _pct(r["val_accuracy"])  # a NaN model's 0% is not a score
            rows.append([r["activation"], r["init"], dead, dormant, _pct(r["nonfinite_fraction"]),
                         accuracy, f"{r['train_seconds']:.1f}", str(r["params"])])
        return rows
    if kind == "init":
        metric = result["config"].get("metric", "val_accuracy")
        rows = [["init", "depth", "born dead%", "dead% after training", "val acc%" if metric == "val_accuracy" else "val MSE"]]
        for r in result["rows"]:
            m = r["val_metric"]
            shown = "-" if m is None else (f"{100 * m:.1f}" if metric == "val_accuracy" else f"{m:.3g}")
            rows.append([r["init"], str(r["depth"]), _pct(r["born_dead_fraction"]),
                         "diverged" if r["diverged"] else _pct(r["trained_dead_fraction"]), shown])
        return rows
    raise DeadReluError(f"unknown experiment {kind!r} in result")
