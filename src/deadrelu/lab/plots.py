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
    "dead_by_layer",
    "firing_heatmap",
    "rescue_panels",
    "preprocessing_bands",
    "lr_sweep_bars",
    "activation_bars",
    "init_depth_lines",
    "plots_for",
    "figure_png",
    "PLOTS",
    "plot_file_names",
]

#: The plots drawn for each kind of result, by name; each is written as ``<experiment>-<name>.png``.
PLOTS: dict[str, tuple[str, ...]] = {
    "demo": ("layers", "heatmap", "rescue"),
    "rescue": ("layers", "heatmap", "rescue"),
    "preprocessing": ("bands",),
    "lr-sweep": ("bars",),
    "activations": ("bars",),
    "init": ("depth",),
}


def _plt() -> Any:
    """pyplot on the Agg backend: plots are files, never windows, and work without a display."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot", "plot")


def layer_labels(layers: Sequence[dict[str, Any]]) -> list[str]:
    """The hidden layers' names: their site names (``h1`` … for the lab's MLP), as scan and the live view say."""
    return [str(layer.get("site", f"h{i + 1}")) for i, layer in enumerate(layers)]


def figure_png(fig: Any) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _seed_series(
    story: dict[str, Any], strategy: str, key: str, pick: Any,
) -> tuple[list[int], list[list[float]]]:
    """Epochs and one series per seed: initialisation, the shared phase, then ``strategy``; NaN where diverged."""
    epochs: list[int] = []
    series = []
    for run in story["runs"]:
        records = [run["initial"], *run["baseline"]["epochs"]]
        continued = run["strategies"].get(strategy, {})
        records += continued.get("epochs", [])
        epochs = [r["epoch"] for r in records]
        values, broken = [], False
        for r in records:
            broken = broken or bool(r.get("diverged"))
            value = None if broken or r.get(key) is None else pick(r[key])
            values.append(math.nan if value is None else value)
        series.append(values)
    return epochs, series


def _band(ax: Any, xs: Sequence[int], series: Sequence[Sequence[float]], color: Any, label: str) -> None:
    """Median line and min–max band over seeds (NaN, i.e. diverged, seeds left out at that epoch)."""
    np = require("numpy", "plot")
    data = np.array(series, dtype=float)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an epoch where every seed diverged is all-NaN
            med, lo, hi = np.nanmedian(data, 0), np.nanmin(data, 0), np.nanmax(data, 0)
    ax.plot(xs, med, color=color, marker="o", markersize=2.5, linewidth=1.6, label=label)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)


def dead_by_layer(story: dict[str, Any]) -> Any:
    """Dead % per hidden layer per epoch, median line and min–max band over seeds, training and validation set.

    Epoch 0 is the fresh network; the shared large-LR phase runs to the checkpoint (dashed
    line), then the control (no rescue) continues, so the plot shows what the lesson's
    setting does on its own.

    Example:
        >>> fig = dead_by_layer(story)  # doctest: +SKIP
    """
    plt = _plt()
    names = layer_labels(story["checkpoint"]["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    colors = plt.get_cmap("viridis")([i / max(1, len(names) - 1) * 0.9 for i in range(len(names))])
    for ax, key, where in ((axes[0], "layers", "training set"), (axes[1], "val_layers", "validation set")):
        for j, (name, color) in enumerate(zip(names, colors)):
            xs, series = _seed_series(story, "control", key, lambda layers, j=j: 100 * layers[j]["dead_fraction"])
            _band(ax, xs, series, color, name)
        ax.axvline(story["checkpoint"]["epoch"], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"Dead units per hidden layer, {where}")
        ax.set_xlabel("epoch (dashed: checkpoint; after it, no rescue)")
        ax.grid(alpha=0.3)
    cfg = story["config"]
    axes[0].set_ylabel(f"dead units (% of layer): median, band min–max of {len(story['runs'])} seeds")
    axes[0].legend(title="hidden layer", fontsize=8, loc="upper right")
    fig.suptitle(f"{story['dataset']['name']}, inputs {cfg.get('inputs', '')}, SGD at LR {cfg['lr']:g}, "
                 f"batch {cfg['batch_size']}", fontsize=10)
    return fig


def firing_heatmap(
    rates: Sequence[Sequence[float | None]], title: str = "Firing rate of every unit", names: Sequence[str] | None = None,
) -> Any:
    """Unit grid, layers × units, coloured by firing rate; units that never fired are black.

    A unit whose rate is None (how :func:`deadrelu.lab.training.firing_rates` saves a unit that
    produced NaN or ±Inf) or NaN is red and counted apart: it is neither dead nor alive, as
    :class:`deadrelu.Report` says, so it is never drawn or counted as dead. Cells past a shorter
    layer's last unit stay blank.

    Example:
        >>> fig = firing_heatmap([[0.0, 0.5, 1.0], [0.2, None, 0.9]])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['h1 (1 dead)', 'h2 (0 dead, 1 non-finite)']
    """
    plt = _plt()
    np = require("numpy", "plot")
    from matplotlib.colors import ListedColormap

    width = max(len(r) for r in rates)
    grid = np.full((len(rates), width), np.nan)
    nonfinite = np.zeros((len(rates), width), dtype=bool)
    for i, row in enumerate(rates):
        values = np.array([math.nan if v is None else float(v) for v in row], dtype=float)
        grid[i, : len(row)] = values
        nonfinite[i, : len(row)] = ~np.isfinite(values)
    dead = grid == 0
    cmap = plt.get_cmap("viridis").with_extremes(bad=(0, 0, 0, 0))  # masked cells: drawn by the layer below
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rates) + 1.6))
    image = ax.imshow(np.ma.masked_where(dead | np.isnan(grid), grid), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
    states = np.where(dead, 0.0, np.where(nonfinite, 1.0, np.nan))  # 0: dead (black), 1: non-finite (red)
    ax.imshow(np.ma.masked_invalid(states), aspect="auto", cmap=ListedColormap(["black", "tab:red"]), vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_yticks(range(len(rates)))
    names = list(names) if names is not None else [f"h{i + 1}" for i in range(len(rates))]
    ax.set_yticklabels([f"{names[i]} ({int(dead[i].sum())} dead"
                        + (f", {int(nonfinite[i].sum())} non-finite)" if nonfinite[i].any() else ")")
                        for i in range(len(rates))])
    ax.set_xlabel("unit index")
    note = "; red: non-finite (NaN/Inf), neither dead nor alive" if nonfinite.any() else ""
    ax.set_title(f"{title}\n(black: dead — never fired on the training set{note})")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("firing rate (fraction of samples)")
    return fig


def rescue_panels(story: dict[str, Any]) -> Any:
    """Small multiples, one column per strategy on the same axes: last-layer dead % and validation accuracy.

    Each panel draws the median over seeds with a min–max band, from the checkpoint on; the
    panel's title says how many seeds diverged (they are left out of the band from then on).

    Example:
        >>> fig = rescue_panels(story)  # doctest: +SKIP
    """
    plt = _plt()
    items = [(k, v) for k, v in story["strategies"].items() if "skipped" not in v]
    n = len(story["runs"])
    fig, axes = plt.subplots(2, max(1, len(items)), figsize=(3.1 * max(1, len(items)), 5.6), sharex=True,
                             sharey="row", squeeze=False)
    cp = story["checkpoint"]["epoch"]
    last = layer_labels(story["checkpoint"]["layers"])[-1]
    for col, (name, v) in enumerate(items):
        xs, dead = _seed_series(story, name, "layers", lambda layers: 100 * layers[-1]["dead_fraction"])
        _, acc = _seed_series(story, name, "val_accuracy", lambda a: 100 * a)
        keep = [i for i, x in enumerate(xs) if x >= cp]
        xs = [xs[i] for i in keep]
        _band(axes[0][col], xs, [[s[i] for i in keep] for s in dead], "tab:red", "median")
        _band(axes[1][col], xs, [[s[i] for i in keep] for s in acc], "tab:green", "median")
        axes[0][col].set_title(f"{v['label']}\n{v['diverged_seeds']}/{n} seeds diverged", fontsize=9)
        axes[1][col].set_xlabel("epoch")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{last} dead (% of layer)")
    axes[0][0].set_ylim(-2, 102)
    axes[1][0].set_ylabel("validation accuracy (%)")
    axes[1][0].set_ylim(-2, 102)
    fig.suptitle(f"From the same checkpoint (epoch {cp}), the same batches: median and min–max of {n} seeds",
                 fontsize=10)
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
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=f"h{j + 1} ({result['hidden'][j]} units)")
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
    # A diverged run has no dead or dormant count: a 0% bar would read as "no dead units", so it gets a
    # grey hatched full-height bar labelled "diverged" instead.
    ok = [x for x, r in zip(xs, rows) if not r["diverged"]]
    ax.bar([x - 0.2 for x in ok], [100 * rows[x]["dead_fraction"] for x in ok], 0.4, label="dead (never fired)")
    ax.bar([x + 0.2 for x in ok], [100 * rows[x]["dormant_fraction"] for x in ok], 0.4, label="τ-dormant")
    diverged = [x for x, r in zip(xs, rows) if r["diverged"]]
    if diverged:
        ax.bar(diverged, [100] * len(diverged), 0.8, color="0.85", hatch="//", edgecolor="0.5",
               label="diverged (NaN): no count")
        for x in diverged:
            ax.text(x, 50, "diverged", ha="center", va="center", rotation=90, color="0.25", fontsize=9)
    ax.set_ylim(0, 100)
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


def preprocessing_bands(result: dict[str, Any]) -> Any:
    """Last-hidden-layer dead % per epoch for inputs in [0, 1] and standardised: median and min–max over seeds.

    Example:
        >>> fig = preprocessing_bands(result)  # doctest: +SKIP
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key, where in ((axes[0], "layers", "training set"), (axes[1], "val_layers", "validation set")):
        for run, color in zip(result["runs"], ("tab:red", "tab:blue")):
            series = [[math.nan if r["diverged"] else 100 * r[key][-1]["dead_fraction"] for r in records]
                      for records in run["records"]]
            xs = [r["epoch"] for r in run["records"][0]]
            _band(ax, xs, series, color, f"inputs {run['inputs']}")
        ax.set_title(f"Last hidden layer, {where}")
        ax.set_xlabel("epoch (0: before the first step)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"dead units (% of layer): median, band min–max of {len(result['config']['seeds'])} seeds")
    axes[0].legend(fontsize=8)
    return fig


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """Name → figure for every plot of one result (by its ``experiment``)."""
    kind = result.get("experiment")
    if kind in ("demo", "rescue"):
        cp = result["checkpoint"]
        return {
            "layers": dead_by_layer(result),
            "heatmap": firing_heatmap(cp["firing_rates"], f"Firing rate of every unit at the checkpoint (epoch "
                                      f"{cp['epoch']}, seed {result['config']['seed']})",
                                      layer_labels(cp["layers"])),
            "rescue": rescue_panels(result),
        }
    if kind == "preprocessing":
        return {"bands": preprocessing_bands(result)}
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


def plots_for(
    result: dict[str, Any], out_dir: str | os.PathLike[str], pngs: dict[str, bytes] | None = None,
) -> dict[str, Path]:
    """Write every plot of one result as ``<experiment>-<name>.png`` in ``out_dir``; returns the paths.

    ``pngs`` are the plots already drawn by :func:`plot_pngs` (drawn here when None).

    Example:
        >>> paths = plots_for(result, "out")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in (plot_pngs(result) if pngs is None else pngs).items():
        path = out / f"{result['experiment']}-{name}.png"
        path.write_bytes(png)
        paths[f"plot:{name}"] = path
    return paths


def plot_file_names(experiment: str) -> list[str]:
    """The PNG file names :func:`plots_for` writes for a result of this experiment.

    >>> plot_file_names("lr-sweep")
    ['lr-sweep-bars.png']
    """
    return [f"{experiment}-{name}.png" for name in PLOTS.get(experiment, ())]
