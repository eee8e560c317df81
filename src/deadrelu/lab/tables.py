"""Result tables of the demo and the experiments: rows of strings, header first.

The CLI prints them (plain or rich) and the HTML report renders them; both read saved
results only, so a table looks the same live and from ``results.json``.
"""

from __future__ import annotations

from typing import Any

from ..errors import DeadReluError

__all__ = ["result_table", "rescue_table"]


def rescue_table(story: dict[str, Any]) -> list[list[str]]:
    """Rows (header first) of the rescue table: dead % per layer, overall, accuracy and cost."""
    layers = [f"L{i + 1}" for i in range(len(story["checkpoint"]["layers"]))]
    header = ["strategy"] + [f"dead% {name}" for name in layers] + ["dead% all", "val acc%", "train s", "extra"]
    rows = [header]
    cp = story["checkpoint"]
    rows.append(
        [f"checkpoint (epoch {cp['epoch']})"]
        + [f"{100 * r['dead_fraction']:.1f}" for r in cp["layers"]]
        + [f"{100 * cp['dead_fraction']:.1f}", _pct_or_nan(cp["val_accuracy"]), f"{story['baseline']['train_seconds']:.1f}", ""]
    )
    for v in story["strategies"].values():
        if "skipped" in v:
            rows.append([v["label"]] + ["-"] * (len(layers) + 3) + ["not available"])
            continue
        cost = v["cost"]
        extra = []
        if cost["extra_params"]:
            extra.append(f"{cost['extra_params']:+d} params")
        if cost["units_reinitialised"]:
            extra.append(f"{cost['units_reinitialised']} unit reset(s)")
        if cost["activations_swapped"]:
            extra.append(f"{cost['activations_swapped']} swapped")
        if v["diverged"]:
            extra.append("diverged")
        rows.append(
            [v["label"]]
            + [f"{100 * r['dead_fraction']:.1f}" for r in v["final"]]
            + [f"{100 * v['final_dead_fraction']:.1f}", _pct_or_nan(v["val_accuracy"]), f"{cost['train_seconds']:.1f}",
               ", ".join(extra) or "none"]
        )
    return rows


def _pct_or_nan(v: float | None) -> str:
    return "nan" if v is None else f"{100 * v:.1f}"


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
    if kind == "lr-sweep":
        n = len(result["hidden"])
        header = ["LR"] + [f"dead% L{j + 1} mean [min-max]" for j in range(n)] + ["dead units (mean)", "diverged", "val MSE"]
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
            rows.append([r["activation"], r["init"], dead, dormant, _pct(r["nonfinite_fraction"]),
                         _pct(r["val_accuracy"]), f"{r['train_seconds']:.1f}", str(r["params"])])
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
