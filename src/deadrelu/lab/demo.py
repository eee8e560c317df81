"""The ``deadrelu demo`` story: kill ReLU units with a large learning rate, then compare rescues.

The lesson's setting, by default: scikit-learn's digits as pixel intensities in [0, 1]
(÷ 16, what MNIST's ``ToTensor`` gives), a 5×128 ReLU MLP with He initialisation, plain
SGD at LR 0.5, batch 64, a checkpoint "by epoch 2". For each of several seeds:

1. Train to the checkpoint, recording after every epoch the exact dead fraction of every
   hidden layer (a :func:`deadrelu.scan` over the whole training split, and another over the
   validation split) and the validation accuracy.
2. From that checkpoint, continue for the same number of epochs, on the same batches, five
   ways: no rescue (control), a 10× lower LR, swap to LeakyReLU, re-initialise dead units
   (ReDo, before every epoch that starts with dead units), swap to GELU.

Then :mod:`deadrelu.lab.verdicts` puts the seeds together (median and range; a diverged
seed is shown as diverged, never as a number) and decides each claim from this run's
numbers; the CLI prints the table and the verdicts and writes ``results.json``, the plots
and ``report.html``.

Its outputs are checked before training and written all or none by :mod:`deadrelu.lab.outputs`
(:func:`plan_outputs`, :func:`write_outputs`, :class:`OutputStage`, re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .datasets import Dataset, load_dataset
from .numerics import cpu_numerics_pinned
from .outputs import OutputPlan, OutputStage, interrupts_ignored, plan_outputs, write_outputs, write_results
from .schema import DEMO_SCHEMA_VERSION
from .tables import result_table
from .training import ProgressBar, build_mlp, check_lr, epoch_record, firing_rates, torch_threads, train_epoch
from .verdicts import CLASSIC_THRESHOLD, LABELS, STRATEGIES, aggregate, summarise
from ..core.report import Report
from ..errors import DeadReluError, RefusedError

__all__ = [
    "STRATEGIES", "CLASSIC_THRESHOLD", "DemoSetting", "rescue_story", "seeds_story", "summarise", "result_table",
    "run_demo", "write_results", "OutputStage", "OutputPlan", "plan_outputs", "write_outputs",
]

SCHEMA_VERSION = DEMO_SCHEMA_VERSION


@dataclass(frozen=True)
class DemoSetting:
    """What every seed of one demo shares: the training recipe and the strategies compared.

    Attributes:
        checkpoint_epoch: epochs at the large LR before the checkpoint (the lesson's "by epoch 2").
        epochs: epochs each strategy trains after the checkpoint.
        lr: SGD learning rate (the large one that kills units).
        batch_size: SGD mini-batch size.
        hidden: hidden widths (default five layers of 128).
        strategies: which of :data:`STRATEGIES` run from the checkpoint.
        lower_lr_factor: the ``lower_lr`` strategy trains at ``lr * lower_lr_factor``.

    Example:
        >>> DemoSetting().checkpoint_epoch, DemoSetting(lr=0.1).lr
        (2, 0.1)
    """

    checkpoint_epoch: int = 2
    epochs: int = 20
    lr: float = 0.5
    batch_size: int = 64
    hidden: tuple[int, ...] = (128,) * 5
    strategies: tuple[str, ...] = STRATEGIES
    lower_lr_factor: float = 0.1

    def check(self, ds: Dataset) -> None:
        """Raise :class:`DeadReluError` on a setting (or data set) the story cannot run."""
        if ds.task != "classification":
            raise DeadReluError(f"the rescue story needs a classification data set; {ds.name} is {ds.task}")
        if self.checkpoint_epoch < 1:
            raise DeadReluError(f"the checkpoint epoch must be at least 1, got {self.checkpoint_epoch}")
        if self.epochs < 1:
            raise DeadReluError(f"epochs must be at least 1, got {self.epochs}")
        check_lr(self.lr)
        if self.batch_size < 1:
            raise DeadReluError(f"batch_size must be at least 1, got {self.batch_size}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise DeadReluError(f"unknown strategy {unknown[0]!r}; choose from: {', '.join(STRATEGIES)}")

    def strategy_lr(self, strategy: str) -> float:
        """The learning rate a strategy trains at after the checkpoint."""
        return self.lr * (self.lower_lr_factor if strategy == "lower_lr" else 1.0)


@dataclass
class _Checkpoint:
    """One seed's model state at the checkpoint, with the scan that describes it."""

    state: dict[str, torch.Tensor]
    report: Report
    params: int
    record: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _monitored(model: nn.Module, live: bool, window: int, sink: dict[str, Any]) -> Iterator[Callable[[float], None]]:
    """Train under :class:`deadrelu.Monitor`; yields its per-step callback, records events into ``sink``.

    The monitor's window is one epoch of batches, so its "dead" matches the per-epoch scan's
    meaning as closely as a rolling window can.
    """
    from ..monitor.monitor import Monitor

    sinks = []
    if live:
        from rich.console import Console

        from ..monitor.live import LiveView

        # The CLI turns the live view on when stderr is a terminal, so it draws there: `deadrelu demo > out.txt`
        # keeps the table in the file and the view on the terminal.
        sinks.append(LiveView(console=Console(stderr=True)))
    monitor = Monitor(model, window=window, log_every=max(1, window // 4), sinks=sinks)
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


def _swap(strategy: str, model: nn.Module) -> dict[str, Any]:
    """Swap every ReLU of ``model`` in place for the strategy's activation; returns what changed."""
    from ..surgery.swap import swap_activations

    result = swap_activations(model, to=strategy, copy=False)
    return {"swapped": len(result.changes)}


def _reinit(model: nn.Module, optimizer: torch.optim.Optimizer, report: Report, generator: torch.Generator) -> int:
    """Re-initialise the units ``report`` found dead (with their optimizer state); returns how many."""
    from ..surgery.reinit import reinit_dead

    if report.dead == 0:
        return 0
    return int(reinit_dead(model, report, optimizer=optimizer, generator=generator).units)


def _train_epochs(
    model: nn.Module,
    ds: Dataset,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    first_epoch: int,
    before_epoch: Callable[[torch.optim.Optimizer, Report], int] | None = None,
    report: Report | None = None,
    on_step: Callable[[float], None] | None = None,
    bar: ProgressBar | None = None,
) -> tuple[list[dict[str, Any]], Report | None, float]:
    """Train ``epochs`` epochs, scanning both splits after each; returns records, the last scan, seconds.

    ``before_epoch(optimizer, last_scan)`` runs at the start of every epoch (the ReDo reset)
    and returns how many units it changed; its time counts as training time.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    records: list[dict[str, Any]] = []
    train_seconds = 0.0
    for e in range(epochs):
        t0 = time.perf_counter()
        changed = before_epoch(optimizer, report) if before_epoch is not None and report is not None else 0
        loss = train_epoch(model, optimizer, ds, batch_size, generator, on_step)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        record, report = epoch_record(model, ds, first_epoch + e, loss, seconds, validation_scan=True)
        if changed:
            record["changed"] = {"reinitialised": changed}
        records.append(record)
        if bar is not None:
            bar.update(1, last_dead=f"{100 * record['layers'][-1]['dead_fraction']:.0f}%", loss=f"{loss:.3g}")
    return records, report, train_seconds


def _train_to_checkpoint(
    ds: Dataset, setting: DemoSetting, seed: int, live: bool, bar: ProgressBar,
) -> tuple[dict[str, Any], _Checkpoint]:
    """Step 1: build the seed's MLP, train it to the checkpoint; returns the phase's records and the checkpoint."""
    model = build_mlp(ds.features, setting.hidden, ds.outputs, activation="relu", init="he", seed=seed)
    initial, _ = epoch_record(model, ds, 0, math.nan, 0.0, validation_scan=True)
    # No step yet, so no loss: only non-finite units would make the fresh model "diverged".
    initial.update(train_loss=None, diverged=any(layer["nonfinite"] for layer in initial["layers"]))
    generator = torch.Generator().manual_seed(seed)
    monitor_info: dict[str, Any] = {}
    steps_per_epoch = -(-len(ds.x_train) // setting.batch_size)
    with _monitored(model, live, steps_per_epoch, monitor_info) as on_step:
        records, report, seconds = _train_epochs(
            model, ds, lr=setting.lr, epochs=setting.checkpoint_epoch, batch_size=setting.batch_size,
            generator=generator, first_epoch=1, on_step=on_step, bar=bar,
        )
    assert report is not None
    phase = {"initial": initial, "baseline": {"epochs": records, "train_seconds": seconds, **monitor_info}}
    last = records[-1]
    phase["checkpoint"] = {
        "epoch": setting.checkpoint_epoch,
        "layers": last["layers"],
        "val_layers": last["val_layers"],
        "dead_fraction": report.dead_fraction,
        "val_accuracy": last["val_accuracy"],
        "diverged": any(r["diverged"] for r in records),
        "firing_rates": firing_rates(report),
    }
    checkpoint = _Checkpoint(copy.deepcopy(model.state_dict()), report, sum(p.numel() for p in model.parameters()))
    return phase, checkpoint


def _resurrected(before: Report, after: Report) -> list[int]:
    """Per layer, units dead at the checkpoint that fire at the end (training split, exact).

    The report's own states decide: a unit with NaN or ±Inf outputs at either end is neither dead
    nor alive, so it is never counted as dead before, nor as firing again after.
    """
    return [int((b.state_mask("dead") & (a.state_mask("active") | a.state_mask("asleep"))).sum())
            for b, a in zip(before.sites, after.sites)]


def _continue_with(
    strategy: str, ds: Dataset, setting: DemoSetting, seed: int, checkpoint: _Checkpoint, bar: ProgressBar,
) -> dict[str, Any]:
    """Step 2: one strategy from the checkpoint, on the batches every strategy of this seed sees."""
    net = build_mlp(ds.features, setting.hidden, ds.outputs, activation="relu", init="he", seed=seed)
    net.load_state_dict(checkpoint.state)
    batches = torch.Generator().manual_seed(seed + 1)  # same batch order for every strategy of this seed
    reinit_draws = torch.Generator().manual_seed(seed + 2)
    t0 = time.perf_counter()
    try:
        applied = _swap(strategy, net) if strategy in ("leaky_relu", "gelu") else {}
        surgery_seconds = time.perf_counter() - t0
        # ReDo resets periodically: units dead in the last exact scan are reset before each epoch.
        reset = (lambda opt, rep: _reinit(net, opt, rep, reinit_draws)) if strategy == "reinit" else None
        records, final_report, seconds = _train_epochs(
            net, ds, lr=setting.strategy_lr(strategy), epochs=setting.epochs, batch_size=setting.batch_size,
            generator=batches, first_epoch=setting.checkpoint_epoch + 1, before_epoch=reset,
            report=checkpoint.report, bar=bar,
        )
    except RefusedError as why:
        # A refusing rescue is reported as such; nothing stands in for it.
        bar.update(setting.epochs)
        return {"label": LABELS[strategy], "skipped": str(why)}
    assert final_report is not None
    final = records[-1]
    params = sum(p.numel() for p in net.parameters())
    rates = firing_rates(final_report)
    return {
        "label": LABELS[strategy],
        "lr": setting.strategy_lr(strategy),
        "epochs": records,
        "final": final["layers"],
        "final_val": final["val_layers"],
        "final_dead_fraction": final_report.dead_fraction,
        "val_accuracy": final["val_accuracy"],
        "diverged": any(r["diverged"] for r in records),
        "firing_rates": rates,
        "resurrected": _resurrected(checkpoint.report, final_report),
        "cost": {
            "train_seconds": seconds,
            "surgery_seconds": surgery_seconds,
            "params": params,
            "extra_params": params - checkpoint.params,
            "units_reinitialised": sum(r.get("changed", {}).get("reinitialised", 0) for r in records),
            "activations_swapped": applied.get("swapped", 0),
        },
    }


def rescue_story(
    ds: Dataset,
    *,
    seed: int = 0,
    setting: DemoSetting = DemoSetting(),
    live: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the dead-ReLU story for one seed on ``ds`` and return every number it measured (JSON-ready).

    Args:
        ds: a classification :class:`~deadrelu.lab.datasets.Dataset`.
        seed: seeds the weights and the batch order; the same seed gives the same numbers.
        setting: the recipe (:class:`DemoSetting`).
        live: show the monitor's live view while training to the checkpoint.
        progress: show progress bars.

    Returns:
        A dict with ``seed``, ``initial`` (the record before any step), ``baseline`` (per-epoch
        records up to the checkpoint, the monitor's events), ``checkpoint`` (per-layer stats on
        both splits, per-unit firing rates) and ``strategies`` (per strategy: per-epoch
        records, final stats, units resurrected, cost).

    Raises:
        DeadReluError: bad arguments (unknown strategy, non-positive epochs or LR, regression data).

    Example:
        >>> from deadrelu.lab.datasets import load_dataset
        >>> run = rescue_story(load_dataset("digits"), setting=DemoSetting(checkpoint_epoch=1, epochs=1,
        ...                    strategies=("control",)), progress=False)
        >>> sorted(run["strategies"]), run["checkpoint"]["epoch"]
        (['control'], 1)
    """
    setting.check(ds)
    # These matrices are tiny: a second intra-op thread buys nothing and, on a busy machine,
    # oversubscription made the same run 6x slower (measured), so the story trains on one.
    with torch_threads(1):
        bar = ProgressBar(progress and not live, setting.checkpoint_epoch,
                          f"seed {seed}: train at LR {setting.lr:g}", unit="epoch")
        phase, checkpoint = _train_to_checkpoint(ds, setting, seed, live, bar)
        bar.close()
        bar = ProgressBar(progress, setting.epochs * len(setting.strategies), f"seed {seed}: rescues", unit="epoch")
        strategies = {s: _continue_with(s, ds, setting, seed, checkpoint, bar) for s in setting.strategies}
        bar.close()
    return {"seed": seed, **phase, "strategies": strategies}


def _config(ds: Dataset, setting: DemoSetting, seeds: Sequence[int], standardize: bool) -> dict[str, Any]:
    return {
        "checkpoint_epoch": setting.checkpoint_epoch,
        "epochs": setting.epochs,
        "lr": setting.lr,
        "seed": seeds[0],
        "seeds": list(seeds),
        "batch_size": setting.batch_size,
        "hidden": list(setting.hidden),
        "init": "he",
        "optimizer": "SGD (no momentum)",
        "lower_lr_factor": setting.lower_lr_factor,
        "strategies": list(setting.strategies),
        "inputs": "standardised" if standardize else "in [0, 1]",
        "standardize": standardize,
        "torch": torch.__version__,
    }


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_seeds(
    ds: Dataset, seeds: Sequence[int], setting: DemoSetting, live: bool, progress: bool, workers: int,
) -> list[dict[str, Any]]:
    """One :func:`rescue_story` per seed, in order; with ``workers > 1`` seeds train in parallel processes.

    Each seed trains single-threaded, so a seed gives the same numbers in a worker as in this
    process. With ``live``, the first seed trains here (its live view needs this terminal).
    """
    if workers <= 1 or len(seeds) == 1:
        return [rescue_story(ds, seed=s, setting=setting, live=live and i == 0, progress=progress)
                for i, s in enumerate(seeds)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    here = tuple(seeds[:1]) if live else ()
    rest = tuple(seeds[len(here):])
    bar = ProgressBar(progress and not live, len(seeds), f"{len(seeds)} seeds on {workers} processes", unit="seed")
    # spawn, not fork: forking a process whose torch has started threads can deadlock.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(len(rest), max(1, workers - len(here))), mp_context=context,
                               initializer=init_worker, initargs=(os.getpid(),))
    workers_started = []
    try:
        with interrupts_ignored():
            # The workers start inside submit; started with Ctrl-C ignored, they inherit that through exec, so
            # a Ctrl-C while they import torch (before the initializer runs) gives no traceback of theirs.
            futures = [pool.submit(rescue_story, ds, seed=s, setting=setting, live=False, progress=False) for s in rest]
            workers_started = list((getattr(pool, "_processes", None) or {}).values())
        runs = [rescue_story(ds, seed=s, setting=setting, live=True, progress=False) for s in here]
        for future in futures:
            runs.append(future.result())
            bar.update(1)
    except BaseException:
        # Ctrl-C (or a failed seed): stop every worker now rather than wait for their seeds to finish.
        for process in workers_started:
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers_started:
            process.join(timeout=5)
        raise
    finally:
        bar.close()
    pool.shutdown()
    return runs


def ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the pool and says so once)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def init_worker(parent_pid: int) -> None:
    """Worker initializer: Ctrl-C ignored (:func:`ignore_interrupts`), and the worker ends when its parent does.

    A parent killed outright (SIGTERM from ``timeout`` or a CI runner, SIGKILL, a closed terminal) runs no
    cleanup, and its workers, Ctrl-C-proof, used to train on and then block forever writing their result
    into a pipe nobody reads. On Linux the kernel now kills a worker when its parent dies
    (``PR_SET_PDEATHSIG``); elsewhere a daemon thread watches the parent's process id.
    """
    ignore_interrupts()
    if not _kill_me_with_parent():
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="deadrelu-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before this worker got here
        os._exit(1)


def _kill_me_with_parent() -> bool:
    """Ask the Linux kernel to SIGKILL this process when its parent ends; False where it cannot."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc or no prctl in it
        return False


def _watch_parent(parent_pid: int) -> None:
    """End this process once its parent is gone (it is then adopted: another parent id)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def seeds_story(
    ds: Dataset,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    setting: DemoSetting = DemoSetting(),
    standardize: bool = False,
    live: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """:func:`rescue_story` for every seed, put together: medians, ranges and a verdict per claim.

    Args:
        ds: the classification data set (one split shared by every seed; each seed draws its
            own weights and batch order).
        seeds: the seeds to run.
        setting: the recipe (:class:`DemoSetting`).
        standardize: recorded in the config (the data set is already loaded accordingly).
        live: show the monitor's live view for the first seed.
        progress: show progress bars.
        workers: processes that train seeds in parallel (1: all in this process). The
            numbers do not depend on it.

    Returns:
        The evidence dict written to ``results.json``: ``runs`` (one :func:`rescue_story` per
        seed), ``strategies`` (per strategy: ``*_by_seed`` lists, medians), ``summary`` (the
        verdicts); ``initial``, ``baseline``, ``checkpoint`` and each strategy's ``epochs``,
        ``final`` and ``firing_rates`` are those of the first seed.

    Example:
        >>> from deadrelu.lab.datasets import load_dataset
        >>> story = seeds_story(load_dataset("digits"), seeds=(0, 1), setting=DemoSetting(checkpoint_epoch=1,
        ...                     epochs=1, strategies=("control",)), progress=False)
        >>> len(story["summary"]["last_layer_dead_fraction_by_seed"])
        2
    """
    if not seeds:
        raise DeadReluError("the demo needs at least one seed")
    setting.check(ds)
    runs = _run_seeds(ds, tuple(seeds), setting, live, progress, workers)
    story: dict[str, Any] = {
        "kind": "deadrelu.evidence",
        "schema_version": SCHEMA_VERSION,
        "experiment": "rescue",
        "config": _config(ds, setting, seeds, standardize),
        "dataset": ds.describe(),
        **aggregate(runs),
        "runs": runs,
    }
    story["summary"] = summarise(story)
    return story


def run_demo(
    *,
    dataset: str = "digits",
    epochs: int = 20,
    checkpoint_epoch: int = 2,
    lr: float = 0.5,
    seed: int = 0,
    seeds: int = 5,
    batch_size: int = 64,
    standardize: bool = False,
    workers: int | None = None,
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
        epochs: epochs each strategy trains after the checkpoint.
        checkpoint_epoch: epochs at ``lr`` before the checkpoint.
        lr: the large SGD learning rate.
        seed: the first seed (it also seeds the data split); the demo runs ``seed … seed + seeds - 1``.
        seeds: how many seeds.
        batch_size: SGD mini-batch size.
        standardize: standardise the inputs instead of the lesson's [0, 1] pixels.
        workers: processes training seeds in parallel (default: one per CPU core, at most one
            per seed); the numbers do not depend on it.
        out: output directory (created).
        data_dir: where local data files are (mnist, mnist1d).
        live: show the monitor's live view while the first seed trains.
        progress: show progress bars.
        plots: write PNG plots (needs matplotlib).
        html: write ``report.html`` (needs matplotlib for its images).

    The CPU kernels are pinned to their AVX2 code paths while it trains (:func:`deadrelu.lab.numerics.cpu_numerics_pinned`,
    three environment variables of this process, removed again on return): that takes effect in the
    worker processes, and in this one if it has not computed anything yet.

    Returns:
        The :func:`seeds_story` dict plus ``outputs`` (paths written) and ``wall_seconds``.

    Example:
        >>> r = run_demo(epochs=1, checkpoint_epoch=1, seeds=1, out="/tmp/deadrelu-doc-demo", progress=False,
        ...              plots=False, html=False)
        >>> r["outputs"]["results"].endswith("results.json")
        True
    """
    t0 = time.perf_counter()
    if seeds < 1:
        raise DeadReluError(f"seeds must be at least 1, got {seeds}")
    # before any arithmetic: the same numbers on every x86-64 machine (lab/numerics.py)
    with cpu_numerics_pinned():
        plan = plan_outputs(out, "demo", plots=plots, html=html)  # an unwritable --out is found before training
        ds = load_dataset(dataset, data_dir=data_dir, seed=seed, standardize=standardize)
        setting = DemoSetting(checkpoint_epoch=checkpoint_epoch, epochs=epochs, lr=lr, batch_size=batch_size)
        if workers is None:
            workers = min(seeds, _cores())
        story = seeds_story(ds, seeds=tuple(range(seed, seed + seeds)), setting=setting, standardize=standardize,
                            live=live, progress=progress, workers=workers)
    story["experiment"] = "demo"
    story["outputs"] = write_outputs(plan, story, t0)
    story["wall_seconds"] = time.perf_counter() - t0
    return story
