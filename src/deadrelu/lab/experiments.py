"""Seeded, reproducible experiments about dead units; each returns a JSON-ready result dict.

* ``lr-sweep``: a 4→64→32→1 ReLU regression MLP (PyTorch default init), per-sample SGD on
  ``y = 2x₀ − 1.5x₁ + 0.5x₂x₃ + noise`` (50 samples), at several learning rates and seeds:
  dead units per layer, divergence (NaN) reported as such.
* ``activations``: ReLU, LeakyReLU(0.01), PReLU, ELU, SELU (LeCun-normal init), GELU, SiLU on
  the demo's task and learning rate: dead and dormant fractions, validation accuracy.
* ``init``: PyTorch default vs He vs He with a small positive bias vs LeCun, across depths:
  units dead before the first step ("born dead") and after training.
* ``rescue``: the demo's comparison (:func:`deadrelu.lab.demo.seeds_story`) on any data set.
* ``preprocessing``: the demo's MLP and LR with inputs in [0, 1] vs standardised, over seeds:
  dead units per layer at initialisation and after each epoch up to the checkpoint.

Every run is single-threaded (tiny matrices; see :mod:`deadrelu.lab.demo`) and seeded, so the
same arguments give the same numbers. Sizes are parameters, so tests run them small.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from typing import Any, Callable, Sequence

import torch

from .numerics import cpu_numerics_pinned
from .schema import EXPERIMENT_SCHEMA_VERSION
from .tables import result_table
from .training import (
    ACTIVATIONS, INITS, ProgressBar, build_mlp, check_lr, epoch_record, evaluate, layer_stats, torch_threads, train_epoch,
)
from .datasets import load_dataset
from ..errors import DeadReluError
from ..core.scan import scan

__all__ = ["EXPERIMENTS", "lr_sweep", "activations", "init_depth", "rescue", "run_experiment", "result_table"]

SCHEMA_VERSION = EXPERIMENT_SCHEMA_VERSION


def _result(experiment: str, title: str, config: dict[str, Any], **rest: Any) -> dict[str, Any]:
    return {"kind": "deadrelu.evidence", "schema_version": SCHEMA_VERSION, "experiment": experiment, "title": title,
            "config": {**config, "torch": torch.__version__}, **rest}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- lr-sweep -------------------------------------------------------------------------------------
def lr_sweep(
    *,
    lrs: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: int = 100,
    samples: int = 50,
    hidden: Sequence[int] = (64, 32),
    progress: bool = True,
) -> dict[str, Any]:
    """Dead units per layer of a small ReLU regression MLP after per-sample SGD, by learning rate.

    The data is drawn once (seed 0); each seed draws its own initial weights and sample order.

    Args:
        lrs: learning rates to try.
        seeds: one run per seed and learning rate.
        epochs: passes over the data (batch size 1).
        samples: training samples of the regression task.
        hidden: hidden widths (default 64 and 32).
        progress: show a progress bar.

    Returns:
        ``rows`` (per LR: mean/min/max dead fraction per layer over the seeds that did not
        diverge, and how many diverged) and ``runs`` (every run's numbers).

    Example:
        >>> r = lr_sweep(lrs=(0.01,), seeds=(0,), epochs=1, progress=False)
        >>> r["rows"][0]["lr"], len(r["rows"][0]["dead_fraction_mean"])
        (0.01, 2)
    """
    if epochs < 1 or not seeds or not lrs:
        raise DeadReluError("lr-sweep needs epochs >= 1, at least one seed and at least one learning rate")
    if any(not lr > 0 for lr in lrs):
        raise DeadReluError(f"learning rates must be positive, got {list(lrs)}")
    ds = load_dataset("regression", seed=0, samples=samples)
    runs = []
    bar = ProgressBar(progress, len(lrs) * len(seeds), "lr-sweep", unit="run")
    with torch_threads(1):
        for lr in lrs:
            for seed in seeds:
                model = build_mlp(ds.features, hidden, 1, activation="relu", init="default", seed=seed)
                opt = torch.optim.SGD(model.parameters(), lr=lr)
                gen = torch.Generator().manual_seed(seed)
                loss = math.nan
                for _ in range(epochs):
                    loss = train_epoch(model, opt, ds, 1, gen)
                    if not math.isfinite(loss):
                        break  # NaN stays NaN: no point training on
                report = scan(model, ds.x_train)
                diverged = not math.isfinite(loss) or report.nonfinite > 0
                val = evaluate(model, ds)
                runs.append({
                    "lr": lr, "seed": seed, "diverged": diverged,
                    "train_mse": loss if math.isfinite(loss) else None,
                    "val_mse": val if math.isfinite(val) else None,
                    "layers": layer_stats(report),
                })
                bar.update(1)
    bar.close()
    rows = []
    for lr in lrs:
        mine = [r for r in runs if r["lr"] == lr]
        ok = [r for r in mine if not r["diverged"]]
        per_layer = [[r["layers"][j]["dead_fraction"] for r in ok] for j in range(len(hidden))]
        rows.append({
            "lr": lr,
            "seeds": len(mine),
            "diverged": len(mine) - len(ok),
            "dead_fraction_mean": [_mean(v) for v in per_layer],
            "dead_fraction_min": [min(v) if v else None for v in per_layer],
            "dead_fraction_max": [max(v) if v else None for v in per_layer],
            "dead_units_mean": [_mean([r["layers"][j]["dead"] for r in ok]) for j in range(len(hidden))],
            "val_mse_mean": _mean([r["val_mse"] for r in ok if r["val_mse"] is not None]),
        })
    result = _result(
        "lr-sweep", "Dead units vs learning rate (4-64-32-1 ReLU regression MLP, per-sample SGD)",
        {"lrs": list(lrs), "seeds": list(seeds), "epochs": epochs, "samples": samples, "hidden": list(hidden),
         "init": "PyTorch default", "optimizer": "SGD, batch size 1"},
        dataset=ds.describe(), hidden=list(hidden), seeds=list(seeds), epochs=epochs, rows=rows, runs=runs,
    )
    result["summary"] = {"lines": _lr_sweep_lines(result)}
    return result


def _lr_sweep_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for row in result["rows"]:
        if row["diverged"] == row["seeds"]:
            lines.append(f"LR {row['lr']:g}: diverged (NaN) in all {row['seeds']} seeds — no dead-unit count exists.")
            continue
        dead = ", ".join(f"h{j + 1} {100 * m:.1f}% (range {100 * lo:.1f}–{100 * hi:.1f}%)" for j, (m, lo, hi) in
                         enumerate(zip(row["dead_fraction_mean"], row["dead_fraction_min"], row["dead_fraction_max"])))
        div = f"; diverged (NaN) in {row['diverged']}/{row['seeds']} seeds" if row["diverged"] else ""
        lines.append(f"LR {row['lr']:g}: mean dead {dead}{div}.")
    return lines


# -- activations --------------------------------------------------------------------------------
def activations(
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    names: Sequence[str] = ACTIVATIONS,
    epochs: int = 20,
    lr: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
    hidden: Sequence[int] = (128,) * 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the demo's MLP with each activation at the same LR; dead/dormant fractions and accuracy.

    SELU gets LeCun-normal initialisation (what its self-normalisation assumes); every other
    activation gets He initialisation, as in the demo.

    Example:
        >>> r = activations(names=("relu", "gelu"), epochs=1, hidden=(16, 16), progress=False)
        >>> [row["activation"] for row in r["rows"]]
        ['relu', 'gelu']
    """
    if epochs < 1:
        raise DeadReluError(f"epochs must be at least 1, got {epochs}")
    check_lr(lr)
    bad = [n for n in names if n not in ACTIVATIONS]
    if bad:
        raise DeadReluError(f"unknown activation {bad[0]!r}; choose from: {', '.join(ACTIVATIONS)}")
    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    if ds.task != "classification":
        raise DeadReluError(f"the activations experiment needs a classification data set; {dataset} is {ds.task}")
    rows = []
    bar = ProgressBar(progress, len(names) * epochs, "activations", unit="epoch")
    with torch_threads(1):
        for name in names:
            init = "lecun" if name == "selu" else "he"
            model = build_mlp(ds.features, hidden, ds.outputs, activation=name, init=init, seed=seed)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            losses = []
            for _ in range(epochs):
                losses.append(train_epoch(model, opt, ds, batch_size, gen))
                bar.update(1)
            seconds = time.perf_counter() - t0
            record, report = epoch_record(model, ds, epochs, losses[-1], seconds)
            rows.append({
                "activation": name,
                "init": init,
                "dead_fraction": report.dead_fraction,
                "dormant_fraction": report.dormant / report.units,
                "nonfinite_fraction": report.nonfinite / report.units,
                "val_accuracy": record["val_accuracy"],
                "diverged": any(not math.isfinite(v) for v in losses),
                "train_seconds": seconds,
                "params": sum(p.numel() for p in model.parameters()),
                "layers": record["layers"],
            })
    bar.close()
    result = _result(
        "activations", f"Activation functions at LR {lr:g} ({ds.name})",
        {"dataset": ds.name, "epochs": epochs, "lr": lr, "seed": seed, "batch_size": batch_size,
         "hidden": list(hidden), "optimizer": "SGD (no momentum)"},
        dataset=ds.describe(), epochs=epochs, lr=lr, rows=rows,
    )
    ok = [r for r in rows if not r["diverged"]]
    lines = [
        f"{r['activation']}: training diverged (NaN loss); {100 * r['nonfinite_fraction']:.1f}% of units non-finite"
        if r["diverged"] else
        f"{r['activation']}: {100 * r['dead_fraction']:.1f}% dead, {100 * r['dormant_fraction']:.1f}% dormant, "
        f"{100 * (r['val_accuracy'] or 0):.1f}% validation accuracy"
        for r in rows
    ]
    if ok:
        best = max(ok, key=lambda r: (r["val_accuracy"] or 0, -r["dead_fraction"]))
        lines.append(f"Highest validation accuracy: {best['activation']} ({100 * (best['val_accuracy'] or 0):.1f}%).")
    result["summary"] = {"lines": lines}
    return result


# -- init -------------------------------------------------------------------------------------------
def init_depth(
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    inits: Sequence[str] = INITS,
    depths: Sequence[int] = (2, 5, 10, 20),
    width: int = 128,
    epochs: int = 10,
    lr: float = 0.1,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Born-dead fraction (before any step) and dead fraction after training, by init and depth.

    ``he_bias`` is He with every bias set to 0.01 (a common "keep ReLUs alive" trick).

    Example:
        >>> r = init_depth(inits=("default",), depths=(2,), width=8, epochs=1, progress=False)
        >>> r["rows"][0]["depth"]
        2
    """
    if epochs < 0:
        raise DeadReluError(f"epochs must be >= 0, got {epochs}")
    check_lr(lr)
    bad = [i for i in inits if i not in INITS]
    if bad:
        raise DeadReluError(f"unknown init {bad[0]!r}; choose from: {', '.join(INITS)}")
    if any(d < 1 for d in depths):
        raise DeadReluError(f"depths must be at least 1, got {list(depths)}")
    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    rows = []
    bar = ProgressBar(progress, len(inits) * len(depths), "init", unit="run")
    with torch_threads(1):
        for init in inits:
            for depth in depths:
                model = build_mlp(ds.features, (width,) * depth, ds.outputs, activation="relu", init=init, seed=seed)
                born = scan(model, ds.x_train, batch_size=1024)
                opt = torch.optim.SGD(model.parameters(), lr=lr)
                gen = torch.Generator().manual_seed(seed)
                losses = [train_epoch(model, opt, ds, batch_size, gen) for _ in range(epochs)]
                after = scan(model, ds.x_train, batch_size=1024)
                metric = evaluate(model, ds)
                rows.append({
                    "init": init,
                    "depth": depth,
                    "born_dead_fraction": born.dead_fraction,
                    "born_dead_per_layer": [s.dead_fraction for s in born.sites],
                    "trained_dead_fraction": after.dead_fraction,
                    "trained_dead_per_layer": [s.dead_fraction for s in after.sites],
                    "diverged": any(not math.isfinite(v) for v in losses) or after.nonfinite > 0,
                    "val_metric": metric if math.isfinite(metric) else None,
                })
                bar.update(1)
    bar.close()
    metric_name = "val_accuracy" if ds.task == "classification" else "val_mse"
    result = _result(
        "init", f"Initialisation vs depth ({ds.name}, width {width})",
        {"dataset": ds.name, "inits": list(inits), "depths": list(depths), "width": width, "epochs": epochs,
         "lr": lr, "seed": seed, "batch_size": batch_size, "metric": metric_name},
        dataset=ds.describe(), epochs=epochs, lr=lr, rows=rows,
    )
    lines = []
    for init in inits:
        mine = sorted((r for r in rows if r["init"] == init), key=lambda r: r["depth"])
        born = ", ".join(f"depth {r['depth']}: {100 * r['born_dead_fraction']:.1f}%" for r in mine)
        trained = ", ".join(
            f"depth {r['depth']}: " + ("diverged" if r["diverged"] else f"{100 * r['trained_dead_fraction']:.1f}%")
            for r in mine)
        lines.append(f"{init}: born dead {born}; after {epochs} epochs {trained}.")
    result["summary"] = {"lines": lines}
    return result


# -- rescue -------------------------------------------------------------------------------------------
def rescue(
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    epochs: int = 20,
    checkpoint_epoch: int = 2,
    lr: float = 0.5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    batch_size: int = 64,
    standardize: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The demo's rescue comparison (:func:`deadrelu.lab.demo.seeds_story`) on any classification data set.

    Example:
        >>> r = rescue(epochs=1, checkpoint_epoch=1, seeds=(0,), progress=False)
        >>> r["experiment"], len(r["runs"])
        ('rescue', 1)
    """
    from .demo import DemoSetting, seeds_story

    if not seeds:
        raise DeadReluError("rescue needs at least one seed")
    check_lr(lr)
    ds = load_dataset(dataset, data_dir=data_dir, seed=seeds[0], standardize=standardize)
    setting = DemoSetting(checkpoint_epoch=checkpoint_epoch, epochs=epochs, lr=lr, batch_size=batch_size)
    with torch_threads(1):
        story = seeds_story(ds, seeds=tuple(seeds), setting=setting, standardize=standardize, progress=progress)
    story["title"] = f"Rescue comparison on {ds.name} (seeds {seeds[0]}-{seeds[-1]}, LR {lr:g})"
    return story


# -- preprocessing ---------------------------------------------------------------------------------------
def _dead_until(ds: Any, *, seed: int, epochs: int, lr: float, batch_size: int, hidden: Sequence[int]) -> list[dict]:
    """One seed: the exact per-layer record (both splits) at initialisation and after each epoch."""
    model = build_mlp(ds.features, hidden, ds.outputs, activation="relu", init="he", seed=seed)
    record, _ = epoch_record(model, ds, 0, math.nan, 0.0, validation_scan=True)
    record["diverged"] = False
    records = [record]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for e in range(1, epochs + 1):
        loss = train_epoch(model, opt, ds, batch_size, gen)
        record, _ = epoch_record(model, ds, e, loss, 0.0, validation_scan=True)
        record["diverged"] = record["diverged"] or records[-1]["diverged"]
        records.append(record)
    return records


def preprocessing(
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    epochs: int = 2,
    lr: float = 0.5,
    seeds: Sequence[int] = tuple(range(10)),
    batch_size: int = 64,
    hidden: Sequence[int] = (128,) * 5,
    progress: bool = True,
) -> dict[str, Any]:
    """The demo's MLP and LR with inputs in [0, 1] vs standardised: dead units per layer up to ``epochs``.

    Both settings use the same split, initial weights and batch order per seed, so the only
    difference is the input scaling. Dead fractions are exact (a scan over the whole split).

    Example:
        >>> r = preprocessing(epochs=1, seeds=(0,), hidden=(16, 16), progress=False)
        >>> [row["inputs"] for row in r["rows"] if row["epoch"] == 1]
        ['in [0, 1]', 'standardised']
    """
    if epochs < 1 or not seeds:
        raise DeadReluError("preprocessing needs epochs >= 1 and at least one seed")
    check_lr(lr)
    rows, runs, sources = [], [], []
    bar = ProgressBar(progress, 2 * len(seeds), "preprocessing", unit="run")
    with torch_threads(1):
        for standardize in (False, True):
            ds = load_dataset(dataset, data_dir=data_dir, seed=seeds[0], standardize=standardize)
            sources.append(ds.source)
            if ds.task != "classification":
                raise DeadReluError(f"preprocessing needs a classification data set; {dataset} is {ds.task}")
            inputs = "standardised" if standardize else "in [0, 1]"
            mine = []
            for seed in seeds:
                mine.append(_dead_until(ds, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden))
                bar.update(1)
            runs.append({"inputs": inputs, "seeds": list(seeds), "records": mine})
            rows += _preprocessing_rows(inputs, mine)
    bar.close()
    result = _result(
        "preprocessing", f"Input scaling and dead units ({dataset}, LR {lr:g}, batch {batch_size})",
        {"dataset": dataset, "epochs": epochs, "lr": lr, "seeds": list(seeds), "batch_size": batch_size,
         "hidden": list(hidden), "init": "he", "optimizer": "SGD (no momentum)"},
        # both scalings were run: the data's description names both, not only the last one loaded
        dataset={**ds.describe(), "source": " vs ".join(sources)}, rows=rows, runs=runs,
    )
    result["summary"] = {"lines": _preprocessing_lines(result)}
    return result


def _preprocessing_rows(inputs: str, per_seed: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per epoch: median/min/max dead fraction per layer (train and validation) over seeds that did not diverge."""
    from .verdicts import median_or_none, span

    rows = []
    for e in range(len(per_seed[0])):
        at = [records[e] for records in per_seed]
        ok = [r for r in at if not r["diverged"]]
        n_layers = len(at[0]["layers"])
        train = [[r["layers"][j]["dead_fraction"] for r in ok] for j in range(n_layers)]
        val = [[r["val_layers"][j]["dead_fraction"] for r in ok] for j in range(n_layers)]
        rows.append({
            "inputs": inputs,
            "epoch": e,
            "layers": [layer["site"] for layer in at[0]["layers"]],
            "dead_fraction_median": [median_or_none(v) for v in train],
            "val_dead_fraction_median": [median_or_none(v) for v in val],
            "last_layer_range": span(train[-1]),
            "last_layer_dead_fraction_by_seed": [None if r["diverged"] else r["layers"][-1]["dead_fraction"]
                                                 for r in at],
            "diverged": len(at) - len(ok),
            "seeds": len(at),
        })
    return rows


def _preprocessing_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    last_epoch = result["config"]["epochs"]
    for row in result["rows"]:
        if row["epoch"] not in (0, last_epoch):
            continue
        m, r = row["dead_fraction_median"][-1], row["last_layer_range"]
        when = "before the first step" if row["epoch"] == 0 else f"after epoch {row['epoch']}"
        if m is None:
            lines.append(f"Inputs {row['inputs']}, {when}: diverged in all {row['seeds']} seeds.")
            continue
        div = f"; {row['diverged']}/{row['seeds']} seeds diverged" if row["diverged"] else ""
        lines.append(f"Inputs {row['inputs']}, {when}: the last hidden layer ({row['layers'][-1]}) was a median "
                     f"{100 * m:.1f}% dead (range {100 * r[0]:.1f}–{100 * r[1]:.1f}% over {row['seeds']} seeds"
                     f"{div}).")
    return lines


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "lr-sweep": lr_sweep,
    "activations": activations,
    "init": init_depth,
    "rescue": rescue,
    "preprocessing": preprocessing,
}


def run_experiment(name: str, **options: Any) -> dict[str, Any]:
    """Run the experiment called ``name`` with keyword ``options``.

    Raises:
        DeadReluError: unknown experiment, or an option it does not take.

    Example:
        >>> r = run_experiment("lr-sweep", lrs=(0.1,), seeds=(0,), epochs=1, progress=False)
        >>> r["experiment"]
        'lr-sweep'
    """
    fn = EXPERIMENTS.get(name)
    if fn is None:
        raise DeadReluError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    accepted = set(inspect.signature(fn).parameters)
    extra = sorted(set(options) - accepted)
    if extra:
        raise DeadReluError(f"experiment {name!r} does not take {', '.join(extra)}; it takes {', '.join(sorted(accepted))}")
    with cpu_numerics_pinned():  # before any arithmetic: the same numbers on every x86-64 machine (lab/numerics.py)
        return fn(**options)
