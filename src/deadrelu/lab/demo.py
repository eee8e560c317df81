"""The ``deadrelu demo`` story: kill ReLU units with a large learning rate, then compare rescues.

1. Train a 5×128 ReLU MLP (He initialisation) with plain SGD at LR 0.5 on real data
   (scikit-learn's digits by default), recording after every epoch the exact dead
   fraction of every layer (a :func:`deadrelu.scan` over the whole training split) and
   the validation accuracy.
2. From that checkpoint, continue for the same number of epochs five ways: no rescue
   (control), a 10× lower LR, swap to LeakyReLU, re-initialise dead units (ReDo, before
   every epoch that starts with dead units), swap to GELU.
3. Print a table, write ``results.json``, the plots and ``report.html`` to one directory.

Whatever the run shows is what it reports: when fewer than 40% of the last hidden layer
die, the summary says so; when training diverges (NaN loss), it says that instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .tables import result_table
from .training import Bar, build_mlp, epoch_record, firing_rates, torch_threads, train_epoch
from .datasets import Dataset, load_dataset
from ..errors import DeadReluError, RefusedError
from ..core.files import atomic_write_text
from ..core.report import Report

__all__ = ["STRATEGIES", "CLASSIC_THRESHOLD", "rescue_story", "summarise", "result_table", "run_demo", "write_results"]

#: Strategies compared from the checkpoint, in display order.
STRATEGIES = ("control", "lower_lr", "leaky_relu", "reinit", "gelu")

#: The classic lesson: "more than 40% of the last hidden layer dies". The demo checks it, never assumes it.
CLASSIC_THRESHOLD = 0.40

_LABELS = {
    "control": "no rescue (control)",
    "lower_lr": "lower LR (÷10)",
    "leaky_relu": "swap to LeakyReLU",
    "reinit": "re-initialise dead units",
    "gelu": "swap to GELU",
}

SCHEMA_VERSION = 1


def _rescue_function(name: str) -> Callable[..., Any] | None:
    """A rescue function of the package, or None when that part of deadrelu is not installed yet."""
    import deadrelu

    try:
        return getattr(deadrelu, name)
    except (AttributeError, ImportError):
        return None


@contextlib.contextmanager
def _monitored(model: nn.Module, live: bool, window: int, sink: dict[str, Any]) -> Iterator[Callable[[float], None] | None]:
    """Train under :class:`deadrelu.Monitor` when it exists; yields its per-step callback (or None).

    The monitor's window is one epoch of batches, so its "dead" matches the per-epoch scan's
    meaning as closely as a rolling window can; its events and alerts go into ``sink``.
    """
    monitor_cls = _rescue_function("Monitor")
    if monitor_cls is None:
        sink["monitor"] = "not available in this install"
        yield None
        return
    import warnings

    monitor = monitor_cls(model, window=window, log_every=max(1, window // 4), live=live)
    with warnings.catch_warnings():
        # The monitor's alerts are recorded below and shown in the summary, not as Python warnings mid-table.
        warnings.simplefilter("ignore")
        with monitor:
            yield lambda loss: monitor.step(loss=loss)
    kinds: dict[str, int] = {}
    for event in monitor.events:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    sink["monitor"] = {
        "window_batches": window,
        "steps": monitor.steps,
        "events": kinds,
        "alerts": [{"step": a.step, "site": a.site, "dead_fraction": a.dead_fraction, "message": a.message}
                   for a in monitor.alerts],
    }


def _apply(
    strategy: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    report: Report,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Apply a rescue to ``model`` in place; returns what it changed (JSON-ready)."""
    if strategy in ("control", "lower_lr"):
        return {}
    if strategy in ("leaky_relu", "gelu"):
        swap = _rescue_function("swap_activations")
        if swap is None:
            raise _Unavailable("deadrelu.swap_activations is not available in this install")
        result = swap(model, to=strategy, copy=False)
        return {"swapped": len(getattr(result, "changes", ()) or ())}
    if strategy == "reinit":
        reinit = _rescue_function("reinit_dead")
        if reinit is None:
            raise _Unavailable("deadrelu.reinit_dead is not available in this install")
        if report.dead == 0:
            return {"reinitialised": 0}
        result = reinit(model, report, optimizer=optimizer, generator=generator)
        return {"reinitialised": int(result.units)}
    raise DeadReluError(f"unknown strategy {strategy!r}; choose from: {', '.join(STRATEGIES)}")


class _Unavailable(Exception):
    """A strategy whose rescue function is missing from this install (recorded, not faked)."""


def _phase(
    model: nn.Module,
    ds: Dataset,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    first_epoch: int,
    before_epoch: Callable[[nn.Module, torch.optim.Optimizer, Report | None], dict[str, Any]] | None = None,
    on_step: Callable[[float], None] | None = None,
    bar: Bar | None = None,
    report: Report | None = None,
) -> tuple[list[dict[str, Any]], Report | None, float]:
    """Train ``epochs`` epochs; returns per-epoch records, the last scan and the training seconds."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    records: list[dict[str, Any]] = []
    train_seconds = 0.0
    for e in range(epochs):
        t0 = time.perf_counter()
        changed = before_epoch(model, optimizer, report) if before_epoch is not None else {}
        loss = train_epoch(model, optimizer, ds, batch_size, generator, on_step)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        record, report = epoch_record(model, ds, first_epoch + e, loss, seconds)
        if changed:
            record["changed"] = changed
        records.append(record)
        if bar is not None:
            last = record["layers"][-1]["dead_fraction"]
            bar.update(1, last_dead=f"{100 * last:.0f}%", loss=f"{loss:.3g}")
    return records, report, train_seconds


def rescue_story(
    ds: Dataset,
    *,
    epochs: int = 20,
    lr: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
    hidden: Sequence[int] = (128,) * 5,
    strategies: Sequence[str] = STRATEGIES,
    lower_lr_factor: float = 0.1,
    live: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the dead-ReLU story on ``ds`` and return every number it measured (JSON-ready).

    Args:
        ds: a classification :class:`~deadrelu.lab.datasets.Dataset`.
        epochs: epochs before the checkpoint, and again for each strategy after it.
        lr: SGD learning rate (the large one that kills units).
        seed: seeds the weights and the batch order; the same seed gives the same numbers.
        batch_size: SGD mini-batch size.
        hidden: hidden widths (default five layers of 128).
        strategies: which of :data:`STRATEGIES` to run from the checkpoint.
        lower_lr_factor: the ``lower_lr`` strategy trains at ``lr * lower_lr_factor``.
        live: show the monitor's live view during the first phase.
        progress: show progress bars.

    Returns:
        A dict with ``config``, ``dataset``, ``baseline`` (per-epoch records), ``checkpoint``
        (per-layer stats and per-unit firing rates), ``strategies`` (per strategy: per-epoch
        records, final stats, cost) and ``summary`` (see :func:`summarise`).

    Raises:
        DeadReluError: bad arguments (unknown strategy, non-positive epochs or LR, regression data).

    Example:
        >>> from deadrelu.lab.datasets import load_dataset
        >>> story = rescue_story(load_dataset("digits"), epochs=1, strategies=("control",), progress=False)
        >>> sorted(story["strategies"])
        ['control']
    """
    if ds.task != "classification":
        raise DeadReluError(f"the rescue story needs a classification data set; {ds.name} is {ds.task}")
    if epochs < 1:
        raise DeadReluError(f"epochs must be at least 1, got {epochs}")
    if not lr > 0:
        raise DeadReluError(f"lr must be positive, got {lr}")
    if batch_size < 1:
        raise DeadReluError(f"batch_size must be at least 1, got {batch_size}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise DeadReluError(f"unknown strategy {unknown[0]!r}; choose from: {', '.join(STRATEGIES)}")

    model = build_mlp(ds.features, hidden, ds.outputs, activation="relu", init="he", seed=seed)
    initial_record, _ = epoch_record(model, ds, 0, math.nan, 0.0)
    initial_record["train_loss"] = None
    initial_record["diverged"] = False
    generator = torch.Generator().manual_seed(seed)
    bar = Bar(epochs, f"train at LR {lr:g}", progress and not live)
    monitor_info: dict[str, Any] = {}
    steps_per_epoch = -(-len(ds.x_train) // batch_size)
    with _monitored(model, live, steps_per_epoch, monitor_info) as on_step:
        baseline, checkpoint_report, base_seconds = _phase(
            model, ds, lr=lr, epochs=epochs, batch_size=batch_size, generator=generator,
            first_epoch=1, on_step=on_step, bar=bar,
        )
    bar.close()
    assert checkpoint_report is not None
    checkpoint_state = copy.deepcopy(model.state_dict())
    params = sum(p.numel() for p in model.parameters())

    results: dict[str, Any] = {}
    bar = Bar(epochs * len(strategies), "rescues", progress)
    for strategy in strategies:
        net = build_mlp(ds.features, hidden, ds.outputs, activation="relu", init="he", seed=seed)
        net.load_state_dict(checkpoint_state)
        # Every strategy sees the same batch order after the checkpoint, so differences are the rescue's.
        gen = torch.Generator().manual_seed(seed + 1)
        reinit_gen = torch.Generator().manual_seed(seed + 2)
        applied: dict[str, Any] = {"reinitialised": 0}
        t0 = time.perf_counter()
        try:
            if strategy in ("leaky_relu", "gelu"):
                applied.update(_apply(strategy, net, torch.optim.SGD(net.parameters(), lr=lr), checkpoint_report))
            surgery_seconds = time.perf_counter() - t0

            def before(m: nn.Module, opt: torch.optim.Optimizer, rep: Report | None, s: str = strategy) -> dict[str, Any]:
                if s != "reinit":
                    return {}
                # ReDo resets periodically: units dead in the last exact scan are reset before each epoch.
                changed = _apply("reinit", m, opt, rep if rep is not None else checkpoint_report, reinit_gen)
                applied["reinitialised"] += changed["reinitialised"]
                return changed

            records, final_report, seconds = _phase(
                net, ds, lr=lr * (lower_lr_factor if strategy == "lower_lr" else 1.0), epochs=epochs,
                batch_size=batch_size, generator=gen, first_epoch=epochs + 1, before_epoch=before, bar=bar,
                report=checkpoint_report,
            )
        except (_Unavailable, RefusedError) as why:
            # A missing or refusing rescue is reported as such; nothing stands in for it.
            results[strategy] = {"label": _LABELS[strategy], "skipped": str(why)}
            bar.update(epochs)
            continue
        assert final_report is not None
        final = records[-1]
        results[strategy] = {
            "label": _LABELS[strategy],
            "lr": lr * (lower_lr_factor if strategy == "lower_lr" else 1.0),
            "epochs": records,
            "final": final["layers"],
            "final_dead_fraction": final_report.dead_fraction,
            "val_accuracy": final["val_accuracy"],
            "diverged": any(r["diverged"] for r in records),
            "firing_rates": firing_rates(final_report),
            "cost": {
                "train_seconds": seconds,
                "surgery_seconds": surgery_seconds,
                "params": sum(p.numel() for p in net.parameters()),
                "extra_params": sum(p.numel() for p in net.parameters()) - params,
                "units_reinitialised": applied["reinitialised"],
                "activations_swapped": applied.get("swapped", 0),
            },
        }
    bar.close()

    story: dict[str, Any] = {
        "kind": "deadrelu.evidence",
        "schema_version": SCHEMA_VERSION,
        "experiment": "rescue",
        "config": {
            "epochs": epochs,
            "lr": lr,
            "seed": seed,
            "batch_size": batch_size,
            "hidden": list(hidden),
            "init": "he",
            "optimizer": "SGD (no momentum)",
            "lower_lr_factor": lower_lr_factor,
            "strategies": list(strategies),
            "torch": torch.__version__,
        },
        "dataset": ds.describe(),
        "initial": initial_record,
        "baseline": {"epochs": baseline, "train_seconds": base_seconds, **monitor_info},
        "checkpoint": {
            "epoch": epochs,
            "layers": baseline[-1]["layers"],
            "dead_fraction": checkpoint_report.dead_fraction,
            "val_accuracy": baseline[-1]["val_accuracy"],
            "diverged": any(r["diverged"] for r in baseline),
            "firing_rates": firing_rates(checkpoint_report),
        },
        "strategies": results,
    }
    story["summary"] = summarise(story)
    return story


def summarise(story: dict[str, Any]) -> dict[str, Any]:
    """What died, where, and what fixed it best — computed from the numbers, with sentences to print.

    Best fix: the non-diverged strategy with the lowest final dead fraction over all
    layers, ties broken by validation accuracy — or none, when it has no fewer dead units
    than the control. The most accurate strategy is named too when it is a different one.
    """
    cp = story["checkpoint"]
    layers = cp["layers"]
    last = layers[-1]
    worst = max(layers, key=lambda r: r["dead_fraction"])
    lr = story["config"]["lr"]
    epochs = story["config"]["epochs"]
    lines = []
    if cp["diverged"]:
        first = next(r["epoch"] for r in story["baseline"]["epochs"] if r["diverged"])
        lines.append(
            f"Training at LR {lr:g} diverged (NaN loss) at epoch {first}: units went non-finite rather than dead "
            f"({sum(r['nonfinite'] for r in layers)} non-finite units at the checkpoint)."
        )
    reproduced = last["dead_fraction"] > CLASSIC_THRESHOLD
    n = len(layers)
    worst_names = [f"L{i + 1}" for i, r in enumerate(layers) if r["dead_fraction"] == worst["dead_fraction"]]
    where = (f"the worst layer{'s were' if len(worst_names) > 1 else ' was'} {', '.join(worst_names)} with "
             f"{100 * worst['dead_fraction']:.1f}%" if worst["dead_fraction"] > 0 else "no layer had a dead unit")
    lines.append(
        f"After {epochs} epochs at LR {lr:g}, {last['dead']}/{last['units']} units "
        f"({100 * last['dead_fraction']:.1f}%) of the last hidden layer (L{n}) were dead; {where}; "
        f"{100 * cp['dead_fraction']:.1f}% of all units."
    )
    # Units can die and later revive (earlier layers move their inputs), so the peak is part of the story.
    peak_epoch, peak = max(((r["epoch"], r["layers"][-1]["dead_fraction"]) for r in story["baseline"]["epochs"]
                            if not r["diverged"]), key=lambda t: t[1], default=(0, 0.0))
    if peak > last["dead_fraction"]:
        lines.append(f"The last hidden layer peaked at {100 * peak:.1f}% dead at epoch {peak_epoch}; "
                     "some of those units later revived.")
    monitor = story["baseline"].get("monitor")
    if isinstance(monitor, dict):
        events = monitor.get("events", {})
        seen = ", ".join(f"{n} {kind}" for kind, n in sorted(events.items())) or "no unit deaths or revivals"
        lines.append(f"The training monitor (rolling window of {monitor['window_batches']} batches, about one epoch) "
                     f"recorded {seen} and {len(monitor.get('alerts', []))} alert(s).")
    lines.append(
        "The classic lesson (more than 40% of the last hidden layer dies) reproduced on this run."
        if reproduced
        else f"Fewer than {100 * CLASSIC_THRESHOLD:.0f}% of the last hidden layer died on this run: the classic "
        "lesson did not reproduce here, and this report says so rather than tuning the run."
    )
    ran = {k: v for k, v in story["strategies"].items() if "skipped" not in v}
    candidates = {k: v for k, v in ran.items() if not v["diverged"]}
    best = best_acc = None
    if candidates:
        best = min(candidates, key=lambda k: (candidates[k]["final_dead_fraction"], -(candidates[k]["val_accuracy"] or 0)))
        best_acc = max(candidates, key=lambda k: (candidates[k]["val_accuracy"] or 0, -candidates[k]["final_dead_fraction"]))
        b = candidates[best]
        control = ran.get("control")
        vs = ""
        if control is not None:
            vs = (f" (control: {100 * control['final_dead_fraction']:.1f}% dead, "
                  f"{100 * (control['val_accuracy'] or 0):.1f}% accuracy)")
        if control is not None and not control["diverged"] and b["final_dead_fraction"] >= control["final_dead_fraction"]:
            # Nothing beat doing nothing: say that instead of crowning a tie-break winner.
            best = None
            lines.append(f"No rescue ended with fewer dead units than the control after {epochs} more epochs{vs}.")
            shown = control
        else:
            lines.append(
                f"Fewest dead units after {epochs} more epochs: {b['label']} with {100 * b['final_dead_fraction']:.1f}% "
                f"dead overall and {100 * (b['val_accuracy'] or 0):.1f}% validation accuracy{vs}."
            )
            shown = b
        if (candidates[best_acc]["val_accuracy"] or 0) > (shown["val_accuracy"] or 0):
            a = candidates[best_acc]
            lines.append(f"Highest validation accuracy: {a['label']} with {100 * (a['val_accuracy'] or 0):.1f}%.")
    for k, v in story["strategies"].items():
        if "skipped" in v:
            lines.append(f"{v['label']}: not run — {v['skipped']}.")
        elif v["diverged"]:
            lines.append(f"{v['label']}: training diverged (NaN loss) after the checkpoint.")
    return {
        "last_layer": last["site"],
        "last_layer_dead_fraction": last["dead_fraction"],
        "worst_layer": worst["site"],
        "last_layer_peak_dead_fraction": peak,
        "last_layer_peak_epoch": peak_epoch,
        "worst_layer_dead_fraction": worst["dead_fraction"],
        "dead_fraction": cp["dead_fraction"],
        "classic_reproduced": reproduced,
        "diverged": cp["diverged"],
        "best_strategy": best,
        "best_accuracy_strategy": best_acc,
        "lines": lines,
    }


def write_results(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a result dict as JSON (atomically) and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return target


def run_demo(
    *,
    dataset: str = "digits",
    epochs: int = 20,
    lr: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
    out: str | os.PathLike[str] = "deadrelu-demo",
    data_dir: str | None = None,
    live: bool = False,
    progress: bool = True,
    plots: bool = True,
    html: bool = True,
) -> dict[str, Any]:
    """Run the whole demo and write its outputs; returns the result with ``outputs`` and ``wall_seconds``.

    Args:
        dataset: ``digits`` (default), ``mnist`` or ``mnist1d`` (see :mod:`deadrelu.lab.datasets`).
        epochs: epochs before the checkpoint and again after it for each strategy.
        lr: the large SGD learning rate.
        seed: seeds data split, weights and batch order.
        batch_size: SGD mini-batch size.
        out: output directory (created).
        data_dir: where local data files are (mnist, mnist1d).
        live: show the monitor's live view while training.
        progress: show progress bars.
        plots: write PNG plots (needs matplotlib).
        html: write ``report.html`` (needs matplotlib for its images).

    Returns:
        The :func:`rescue_story` dict plus ``outputs`` (paths written) and ``wall_seconds``.

    Example:
        >>> r = run_demo(epochs=1, out="/tmp/deadrelu-doc-demo", progress=False, plots=False, html=False)
        >>> r["outputs"]["results"].endswith("results.json")
        True
    """
    t0 = time.perf_counter()
    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    # These matrices are tiny: a second intra-op thread buys nothing and, on a busy machine,
    # oversubscription made the same run 6x slower (measured), so the demo trains on one.
    with torch_threads(1):
        story = rescue_story(ds, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, live=live, progress=progress)
    story["experiment"] = "demo"
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    if plots or html:
        from .plots import plots_for

        for name, path in plots_for(story, out_dir).items():
            outputs[name] = str(path)
    story["wall_seconds"] = time.perf_counter() - t0
    outputs["results"] = str(write_results(story, out_dir / "results.json"))
    if html:
        from .html_report import write_report

        outputs["report"] = str(write_report(out_dir))
    story["outputs"] = outputs
    story["wall_seconds"] = time.perf_counter() - t0
    return story
