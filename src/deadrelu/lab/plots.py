"""Plots of evidence results (matplotlib, Agg backend, imported lazily).

Every function takes the JSON-ready result dicts the demo and the experiments return
(or load from disk) and returns a matplotlib ``Figure``; nothing here reaches into a
live model. :func:`plots_for` draws every plot of one result and writes PNG files.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .._imports import require

__all__ = [
    "alive_over_training",
    "firing_heatmap",
    "rescue_curves",
    "lr_sweep_bars",
    "activation_bars",
    "init_depth_lines",
    "plots_for",
    "figure_png",
]


def _plt() -> Any:
    """pyplot on the Agg backend: plots are files, never windows, and work without a display."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot", "plot")


def layer_labels(layers: Sequence[dict[str, Any]]) -> list[str]:
    """Short display names ``L1``, ``L2``, ... (site name in brackets when it says more than the index)."""
    return [f"L{i + 1}" for i in range(len(layers))]


def figure_png(fig: Any) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _epoch_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    epochs = [r["epoch"] for r in records]
    per_layer = [[r["layers"][i][key] for r in records] for i in range(len(records[0]["layers"]))]
    return epochs, per_layer


def alive_over_training(story: dict[str, Any]) -> Any:
    """Per-layer alive % (100 − dead %) after every epoch of the first (high-LR) phase.

    Example:
        >>> fig = alive_over_training(story)  # doctest: +SKIP
    """
    plt = _plt()
    records = [story["initial"], *story["baseline"]["epochs"]]
    epochs, dead = _epoch_series(records, "dead_fraction")
    labels = layer_labels(records[0]["layers"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, series in zip(labels, dead):
        ax.plot(epochs, [100 * (1 - d) for d in series], marker="o", markersize=3, label=label)
    diverged = [r["epoch"] for r in records if r.get("diverged")]
    if diverged:
        ax.axvline(diverged[0], color="red", linestyle=":", label=f"loss NaN (epoch {diverged[0]})")
    cfg = story["config"]
    ax.set_title(f"Alive units per layer while training at LR {cfg['lr']:g} ({story['dataset']['name']})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("alive units (% of layer)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(title="hidden layer", fontsize=8, loc="lower left")
    return fig


def firing_heatmap(rates: Sequence[Sequence[float]], title: str = "Firing rate of every unit") -> Any:
    """Unit grid, layers × units, coloured by firing rate; units that never fired are black.

    Example:
        >>> fig = firing_heatmap([[0.0, 0.5, 1.0], [0.2, 0.0, 0.9]])
    """
    plt = _plt()
    np = require("numpy", "plot")
    width = max(len(r) for r in rates)
    grid = np.full((len(rates), width), np.nan)
    for i, row in enumerate(rates):
        grid[i, : len(row)] = row
    dead = grid == 0
    cmap = plt.get_cmap("viridis").with_extremes(bad="black")
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rates) + 1.6))
    image = ax.imshow(np.ma.masked_where(dead | np.isnan(grid), grid), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_yticks(range(len(rates)))
    ax.set_yticklabels([f"L{i + 1} ({int(dead[i].sum())} dead)" for i in range(len(rates))])
    ax.set_xlabel("unit index")
    ax.set_title(f"{title}\n(black: dead — never fired on the training set)")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("firing rate (fraction of samples)")
    return fig


def _strategy_items(story: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in story["strategies"].items() if "skipped" not in v]


def rescue_curves(story: dict[str, Any]) -> Any:
    """Dead % (all layers) and validation accuracy per epoch: the shared high-LR phase, then one line per strategy."""
    plt = _plt()
    base = [story["initial"], *story["baseline"]["epochs"]]
    fig, (ax_dead, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2))

    def total_dead(r: dict[str, Any]) -> float:
        units = sum(layer["units"] for layer in r["layers"])
        return 100 * sum(layer["dead"] for layer in r["layers"]) / units

    def acc(r: dict[str, Any]) -> float:
        v = r.get("val_accuracy")
        return math.nan if v is None else 100 * v

    x0 = [r["epoch"] for r in base]
    ax_dead.plot(x0, [total_dead(r) for r in base], color="black", linewidth=2, label="shared phase")
    ax_acc.plot(x0, [acc(r) for r in base], color="black", linewidth=2, label="shared phase")
    for _, v in _strategy_items(story):
        recs = [base[-1], *v["epochs"]]
        xs = [r["epoch"] for r in recs]
        ax_dead.plot(xs, [total_dead(r) for r in recs], marker=".", label=v["label"])
        ax_acc.plot(xs, [acc(r) for r in recs], marker=".", label=v["label"])
    for ax in (ax_dead, ax_acc):
        ax.axvline(story["checkpoint"]["epoch"], color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch (dashed line: checkpoint)")
        ax.grid(alpha=0.3)
    ax_dead.set_ylabel("dead units (% of all hidden units)")
    ax_dead.set_title("Dead units: rescues from the same checkpoint")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_title("Validation accuracy")
    ax_acc.legend(fontsize=8, loc="lower right")
    return fig


def lr_sweep_bars(result: dict[str, Any]) -> Any:
    """Mean dead % per layer at each learning rate (error bars: min–max over seeds); divergence marked."""
    plt = _plt()
    rows = result["rows"]
    lrs = [r["lr"] for r in rows]
    n_layers = len(rows[0]["dead_fraction_mean"])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / n_layers
    for j in range(n_layers):
        xs = [i + (j - (n_layers - 1) / 2) * width for i in range(len(lrs))]
        means = [100 * (r["dead_fraction_mean"][j] or 0) for r in rows]
        lo = [m - 100 * (r["dead_fraction_min"][j] or 0) for m, r in zip(means, rows)]
        hi = [100 * (r["dead_fraction_max"][j] or 0) - m for m, r in zip(means, rows)]
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=f"hidden layer {j + 1} ({result['hidden'][j]} units)")
    for i, r in enumerate(rows):
        if r["diverged"]:
            ax.text(i, 102, f"NaN in {r['diverged']}/{r['seeds']} seeds", ha="center", fontsize=8, color="red")
    ax.set_xticks(range(len(lrs)))
    ax.set_xticklabels([f"{lr:g}" for lr in lrs])
    ax.set_xlabel("learning rate (per-sample SGD)")
    ax.set_ylabel("dead units (% of layer, mean over seeds)")
    ax.set_ylim(0, 110)
    ax.set_title(f"Dead units after {result['epochs']} epochs vs learning rate ({len(result['seeds'])} seeds)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def activation_bars(result: dict[str, Any]) -> Any:
    """Dead %, dormant % and validation accuracy per activation function."""
    plt = _plt()
    rows = result["rows"]
    names = [r["activation"] for r in rows]
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(12, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r["dead_fraction"] for r in rows], 0.4, label="dead (never fired)")
    ax.bar([x + 0.2 for x in xs], [100 * r["dormant_fraction"] for r in rows], 0.4, label="τ-dormant")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylabel("% of all hidden units")
    ax.set_title(f"Dead and dormant units after {result['epochs']} epochs at LR {result['lr']:g}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    accs = [100 * (r["val_accuracy"] or 0) for r in rows]
    ax_acc.bar(list(xs), accs, 0.6, color="tab:green")
    for x, r in zip(xs, rows):
        if r["diverged"]:
            ax_acc.text(x, 2, "NaN", ha="center", color="red")
    ax_acc.set_xticks(list(xs))
    ax_acc.set_xticklabels(names, rotation=20)
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title(f"Validation accuracy ({result['dataset']['name']})")
    ax_acc.grid(axis="y", alpha=0.3)
    return fig


def init_depth_lines(result: dict[str, Any]) -> Any:
    """Born-dead % (step 0) and dead % after training vs depth, one line per initialisation."""
    plt = _plt()
    rows = result["rows"]
    inits = list(dict.fromkeys(r["init"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "born_dead_fraction", "Born dead (before any training step)"),
        (axes[1], "trained_dead_fraction", f"Dead after {result['epochs']} epochs at LR {result['lr']:g}"),
    ):
        for init in inits:
            mine = [r for r in rows if r["init"] == init]
            ax.plot([r["depth"] for r in mine], [100 * r[key] for r in mine], marker="o", label=init)
        ax.set_xlabel("depth (hidden layers)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dead units (% of all hidden units)")
    axes[0].legend(title="initialisation", fontsize=8)
    return fig


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """Name → figure for every plot of one result (by its ``experiment``)."""
    kind = result.get("experiment")
    if kind in ("demo", "rescue"):
        figs = {
            "alive": alive_over_training(result),
            "heatmap": firing_heatmap(result["checkpoint"]["firing_rates"],
                                      f"Firing rate of every unit at the checkpoint (epoch {result['checkpoint']['epoch']})"),
            "rescue": rescue_curves(result),
        }
        return figs
    if kind == "lr-sweep":
        return {"bars": lr_sweep_bars(result)}
    if kind == "activations":
        return {"bars": activation_bars(result)}
    if kind == "init":
        return {"depth": init_depth_lines(result)}
    return {}


def plot_pngs(result: dict[str, Any]) -> dict[str, bytes]:
    """Name → PNG bytes for every plot of one result (used by the HTML report)."""
    return {name: figure_png(fig) for name, fig in _figures(result).items()}


def plots_for(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every plot of one result as ``<experiment>-<name>.png`` in ``out_dir``; returns the paths.

    Example:
        >>> paths = plots_for(result, "out")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in plot_pngs(result).items():
        path = out / f"{result['experiment']}-{name}.png"
        path.write_bytes(png)
        paths[f"plot:{name}"] = path
    return paths
