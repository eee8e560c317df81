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
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .datasets import Dataset, load_dataset
from .numerics import cpu_numerics_pinned
from .schema import DEMO_SCHEMA_VERSION
from .tables import result_table
from .termination import sigterm_deferred, sigterm_raises
from .training import ProgressBar, build_mlp, epoch_record, firing_rates, torch_threads, train_epoch
from .verdicts import CLASSIC_THRESHOLD, LABELS, STRATEGIES, aggregate, summarise
from ..core.files import atomic_write_text, backup_path, make_temporary, remove_stale_temporaries
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
        if not self.lr > 0:
            raise DeadReluError(f"lr must be positive, got {self.lr}")
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
        with _interrupts_ignored():
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


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT for the block (main thread only: only there can Python set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


def write_results(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a result dict as JSON (atomically) and return the path.

    Example:
        >>> write_results({"kind": "example"}, "/tmp/deadrelu-doc/r.json").name
        'r.json'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():  # a SIGTERM mid-write removes the temporary file (see lab/termination.py)
        atomic_write_text(target, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return target


class OutputStage:
    """A run's output files, written under temporary names in their directory and renamed into place together.

    Nothing appears under a final name until :meth:`commit`; leaving the ``with`` block without
    committing (an error, Ctrl-C, SIGTERM) removes the temporaries and every directory the stage
    created, so an earlier run's files stay exactly as they were and no partial set is left behind.
    Within the block SIGTERM raises :class:`~deadrelu.lab.termination.Terminated` (main thread
    only), held back over the renames. Temporaries are named ``.NAME.PID.XXXXXXXX.tmp``; those
    of a process that is gone (killed outright, SIGKILL), for a name this stage writes, are
    removed when it writes that name.

    Example:
        >>> import tempfile
        >>> with OutputStage(Path(tempfile.mkdtemp()) / "o") as stage:
        ...     path = stage.add("a.txt", "hello")
        ...     stage.commit()
        >>> path.read_text()
        'hello'
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self._created: list[Path] = []
        self._staged: list[tuple[str, Path]] = []
        self._committed = False
        self._sigterm = contextlib.ExitStack()

    def __enter__(self) -> "OutputStage":
        self._sigterm.enter_context(sigterm_raises())
        missing = [d for d in (self.out_dir, *self.out_dir.parents) if not d.exists()]
        try:
            for directory in reversed(missing):
                with sigterm_deferred():  # made and recorded together, or neither
                    directory.mkdir()
                    self._created.append(directory)
        except BaseException:  # a name too long, a dangling link: leave no directory behind either
            self.__exit__()
            raise
        return self

    def add(self, name: str, data: str | bytes) -> Path:
        """Write one output under a temporary name; returns the path it will have once committed."""
        remove_stale_temporaries(self.out_dir, name)
        with sigterm_deferred():  # made and recorded together, so the cleanup knows every temporary
            fd, tmp = make_temporary(self.out_dir / name)
            self._staged.append((tmp, self.out_dir / name))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        final = self.out_dir / name
        umask = os.umask(0)
        os.umask(umask)
        # an existing file keeps the permissions a user gave it; a new one gets what open() would give
        os.chmod(tmp, final.stat().st_mode & 0o7777 if final.is_file() else 0o666 & ~umask)
        return final

    def commit(self) -> None:
        """Rename every staged file into place.

        Ctrl-C is ignored during the renames: they take microseconds, and an interrupt between two of
        them would leave a half-replaced set, the one thing the stage exists to prevent. A SIGTERM
        then is held back and raised once every file is in place.
        """
        for _, final in self._staged:
            if final.is_dir():
                raise DeadReluError(f"cannot write {final}: it is a directory")
        with _interrupts_ignored(), sigterm_deferred():
            done: list[tuple[Path, Path | None, bool]] = []  # (final, hard-linked backup, existed before)
            try:
                for tmp, final in self._staged:
                    existed, backup = final.exists(), None
                    if existed:
                        backup = backup_path(final)
                        try:
                            os.link(final, backup)  # the earlier file stays reachable until all are in
                        except OSError:  # no hard links here: that file cannot be restored
                            backup = None
                    done.append((final, backup, existed))
                    os.replace(tmp, final)
            except BaseException:  # one rename failed (a full disk): put the earlier set back
                for final, backup, existed in reversed(done):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, final)
                        elif not existed:
                            os.unlink(final)
                raise
            finally:
                for _, backup, _ in done:
                    if backup is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(backup)
            self._committed = True

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._committed:
                return
            with sigterm_deferred():  # a (second) SIGTERM does not cut the cleanup short
                for tmp, _ in self._staged:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                for directory in reversed(self._created):
                    with contextlib.suppress(OSError):
                        directory.rmdir()  # only if still empty: never anything someone else put there
        finally:
            self._sigterm.close()  # SIGTERM's previous handler back


@dataclass
class OutputPlan:
    """What a run will write to ``out_dir``, checked before it trains, and the saved results its report adds.

    Attributes:
        out_dir: the output directory (created by the run if missing).
        experiment: the result's ``experiment`` (names its PNG files).
        results_name: the result JSON's file name.
        plots: write PNG files.
        html: write ``report.html``.
        saved: the valid results already in ``out_dir`` (not ``results_name``) that the report includes.
        saved_plots: their plots, drawn while checking them, file name → plot name → PNG.
    """

    out_dir: Path
    experiment: str
    results_name: str = "results.json"
    plots: bool = True
    html: bool = True
    saved: list[dict[str, Any]] = field(default_factory=list)
    saved_plots: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def file_names(self) -> list[str]:
        """Every file the run writes in ``out_dir``."""
        from .plots import plot_file_names

        return ((plot_file_names(self.experiment) if self.plots else []) + [self.results_name]
                + (["report.html"] if self.html else []))


def _check_out_dir(out_dir: Path, names: Sequence[str]) -> None:
    """The output directory can be created (or is a directory) and no output's name is taken by a directory.

    Checked for real, not from permission bits alone: the directories ``out_dir`` lacks and a file in it
    are created and removed again, so a dangling symbolic link, a name too long, or a file system that
    refuses (``/proc``, a read-only mount; root passes every ``os.access`` test) is found before
    training, not after it.
    """
    try:
        chain = (out_dir, *out_dir.parents)
        for link in chain:
            if link.is_symlink() and not link.exists():
                raise DeadReluError(
                    f"cannot write outputs to {out_dir}: {link} is a symbolic link to {os.readlink(link)}, which "
                    "does not exist; create that directory or choose another --out"
                )
        existing = next(d for d in (*chain, Path(".")) if d.exists())
        if not existing.is_dir():
            what = "it is a file" if existing == out_dir else f"{existing} is a file"
            raise DeadReluError(f"cannot write outputs to {out_dir}: {what}, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DeadReluError(f"cannot write outputs to {out_dir}: {existing} is not writable")
        for name in names:
            if (out_dir / name).is_dir():
                raise DeadReluError(f"cannot write {out_dir / name}: it is a directory")
        _probe_out_dir(out_dir, [d for d in chain if not d.exists()])
    except OSError as err:  # ENAMETOOLONG from a stat, EPERM/EROFS/ENOENT from the probe
        raise DeadReluError(f"cannot write outputs to {out_dir}: {err.strerror or err}") from None


def _probe_out_dir(out_dir: Path, missing: Sequence[Path]) -> None:
    """Create the ``missing`` directories (deepest last) and one temporary file in ``out_dir``; remove them again."""
    created: list[Path] = []
    with sigterm_raises(), sigterm_deferred():  # microseconds: a SIGTERM is raised once all is removed again
        try:
            for directory in reversed(missing):
                directory.mkdir()
                created.append(directory)
            fd, probe = tempfile.mkstemp(prefix=".deadrelu-probe.", suffix=".tmp", dir=out_dir)
            os.close(fd)
            os.unlink(probe)
        finally:
            for directory in reversed(created):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if still empty


def _check_not_foreign(out_dir: Path, results_name: str, html: bool) -> None:
    """An existing result JSON or ``report.html`` in ``out_dir`` that deadrelu did not write is never replaced."""
    from .html_report import is_deadrelu_page, is_deadrelu_result

    checks = [(results_name, is_deadrelu_result, "deadrelu result")]
    if html:
        checks.append(("report.html", is_deadrelu_page, "report deadrelu wrote"))
    for name, ours, what in checks:
        path = out_dir / name
        if path.is_file() and not ours(path):
            raise DeadReluError(
                f"{path} exists and is not a {what}; it was left as it is: "
                "choose another --out directory, or move or delete that file"
            )


def plan_outputs(
    out_dir: str | os.PathLike[str], experiment: str, *, results_name: str = "results.json",
    plots: bool = True, html: bool = True,
) -> OutputPlan:
    """Check, before any training, that a run's outputs can be written; returns the plan :func:`write_outputs` follows.

    Raises:
        DeadReluError: ``out_dir`` or one of its parents is a file, an output's name is a directory, the
            result JSON or ``report.html`` exists there and is not deadrelu's (it is never replaced), or a
            result already in ``out_dir`` that the report would include is malformed (naming the file).
        ModuleNotFoundError: the plots or the report are asked for and matplotlib (``deadrelu[plot]``) is not
            installed: found here, not after the training.
    """
    plan = OutputPlan(Path(out_dir), experiment, results_name, plots, html)
    _check_out_dir(plan.out_dir, plan.file_names())
    _check_not_foreign(plan.out_dir, results_name, html)
    if plots or html:  # the PNG files and the report's images are drawn with matplotlib
        from .._imports import require

        require("matplotlib", "plot")
    if html:
        from .html_report import result_plots, saved_results

        plan.saved = saved_results(plan.out_dir, skip=results_name)
        plan.saved_plots = {r["_file"]: result_plots(r) for r in plan.saved}
    return plan


def write_outputs(plan: OutputPlan, result: dict[str, Any], t0: float | None = None) -> dict[str, str]:
    """Plots, the result JSON and ``report.html``, all or none (see :class:`OutputStage`); returns name → path.

    With ``t0`` (a ``time.perf_counter()``), ``result["wall_seconds"]`` is set just before it is saved.
    """
    pngs: dict[str, bytes] = {}
    if plan.plots or plan.html:
        from .plots import plot_pngs

        pngs = plot_pngs(result)  # drawn once, for the PNG files and the report
    page = None
    if t0 is not None:
        result["wall_seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1, allow_nan=False) + "\n"
    if plan.html:
        from .html_report import report_page

        from .html_report import result_plots, saved_results

        # Read again now: another run may have saved a result into the same folder while this one
        # trained. Plots drawn at planning time are reused for the results that did not change.
        before = {r["_file"]: r for r in plan.saved}
        saved = saved_results(plan.out_dir, skip=plan.results_name)
        plots = {r["_file"]: plan.saved_plots[r["_file"]] if before.get(r["_file"]) == r else result_plots(r) for r in saved}
        page = report_page(saved, {plan.results_name: result}, rendered={**plots, plan.results_name: pngs})
    outputs: dict[str, str] = {}
    with OutputStage(plan.out_dir) as stage:
        if plan.plots:
            for name, png in pngs.items():
                outputs[f"plot:{name}"] = str(stage.add(f"{result['experiment']}-{name}.png", png))
        outputs["results"] = str(stage.add(plan.results_name, text))
        if page is not None:
            outputs["report"] = str(stage.add("report.html", page))
        stage.commit()
    return outputs


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
