"""CLI verbs for the evidence: ``deadrelu demo``, ``deadrelu experiment NAME``, ``deadrelu report DIR``.

Each verb has a ``*_command(args)`` that does the work and returns data (testable), and a
runner that prints the table, the summary and where every output went.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .._imports import available
from ..errors import DeadReluError
from .options import MAX_SEED, path_text, positive_number, seed_number, whole_number
from .tables_fit import print_fitted

__all__ = ["demo_command", "experiment_command", "report_command"]

_EXPERIMENTS = ("lr-sweep", "activations", "init", "rescue", "preprocessing")


def _rich_table(rows: Sequence[Sequence[str]]) -> Any:
    """The rows as a rich Table; every text is a ``Text``, so ``[min-max]`` is shown, never read as markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for i, name in enumerate(rows[0]):
        table.add_column(Text(name), justify="left" if i == 0 else "right", overflow="fold")
    for row in rows[1:]:
        table.add_row(*(Text(str(cell)) for cell in row))
    return table


def _print_table(rows: Sequence[Sequence[str]], title: str = "") -> None:
    """Rich table on a terminal wide enough for it, plain fixed-width text otherwise (pipes, CI logs, narrow terminals)."""
    from ..core.tables import render_plain

    print_fitted(lambda: _rich_table(rows), render_plain([list(r) for r in rows]), title=title)


def _print_summary(result: dict[str, Any], out: Path) -> None:
    """The summary lines, where the outputs went and the wall time, after a run's table."""
    print()
    for line in result["summary"]["lines"]:
        print(f"- {line}")
    _print_outputs(result["outputs"], out)
    print(f"total wall time: {result['wall_seconds']:.1f} s")


def _print_outputs(outputs: dict[str, str], out_dir: Path) -> None:
    print(f"\noutputs written to {out_dir.resolve()}/")
    for path in outputs.values():
        print(f"  {Path(path).name}")


# -- demo ------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="watch ReLU units die at a large learning rate over 5 seeds, then compare rescues (about 30 s on 2 idle cores)",
        description=(
            "The lesson's setting: digits as pixels in [0, 1], a 5x128 ReLU MLP (He init), SGD at LR 0.5, batch 64, "
            "a checkpoint at epoch 2. For each seed, record the exact dead fraction of every layer on the "
            "training and validation sets after every epoch, then continue from the same checkpoint on the same "
            "batches with no rescue, a lower LR, LeakyReLU, re-initialised dead units and GELU. Prints medians and "
            "ranges over seeds and a verdict per claim; writes results.json, plots and report.html to --out. "
            "Nothing is downloaded."
        ),
    )
    p.add_argument("--dataset", default="digits", choices=("digits", "mnist", "mnist1d"),
                   help="digits (default; ships with scikit-learn), mnist (local IDX files), mnist1d")
    p.add_argument("--data-dir", metavar="DIR", type=path_text, help="where mnist's IDX files / mnist1d's mnist1d.npz are")
    p.add_argument("--checkpoint-epoch", type=whole_number(), default=2, metavar="N",
                   help="epochs at the large LR before the checkpoint (2)")
    p.add_argument("--epochs", type=whole_number(), default=20, help="epochs of each rescue after the checkpoint (20)")
    p.add_argument("--lr", type=positive_number, default=0.5, help="SGD learning rate (0.5)")
    p.add_argument("--seeds", type=whole_number(), default=5, metavar="N", help="how many seeds (5)")
    p.add_argument("--seed", type=seed_number, default=0,
                   help=f"first seed, 0 to {MAX_SEED}; it also seeds the data split (0)")
    p.add_argument("--batch-size", type=whole_number(), default=64, help="SGD mini-batch size (64)")
    p.add_argument("--standardize", action="store_true",
                   help="standardise the inputs (zero mean, unit variance per feature) instead of pixels in [0, 1]")
    p.add_argument("--workers", type=whole_number(), default=None, metavar="N",
                   help="processes training seeds in parallel (default: one per CPU core); numbers do not change")
    p.add_argument("--out", default="deadrelu-demo", metavar="DIR", type=path_text, help="output directory (deadrelu-demo)")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                   help="show the monitor's live view while the first seed trains "
                        "(default: on a terminal, when rich is installed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def demo_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo with the parsed options; returns its result dict (with ``outputs``)."""
    from ..lab.demo import run_demo

    live_ready = available("rich") and available("deadrelu.monitor.live")
    live = args.live
    if live is None:
        live = live_ready and sys.stderr.isatty()
    elif live and not live_ready:
        raise DeadReluError(
            "--live needs rich and the monitor's live view (deadrelu.monitor.live); install \"deadrelu[cli]\" or drop --live"
        )
    _check_seed_range(args.seed, args.seeds)
    return run_demo(
        dataset=args.dataset,
        epochs=args.epochs,
        checkpoint_epoch=args.checkpoint_epoch,
        lr=args.lr,
        seed=args.seed,
        seeds=args.seeds,
        batch_size=args.batch_size,
        standardize=args.standardize,
        workers=args.workers,
        out=args.out,
        data_dir=args.data_dir,
        live=live,
        progress=not args.no_progress,
    )


def _check_seed_range(first: int, count: int) -> None:
    """The last seed a run uses must be a seed too (--seed is checked alone by its option type)."""
    if first + count - 1 > MAX_SEED:
        raise DeadReluError(f"--seed {first} with --seeds {count} runs seeds up to {first + count - 1}; "
                            f"the last must be at most {MAX_SEED}")


def demo_table_title(result: dict[str, Any]) -> str:
    """The line above the demo's table: what was run and what the numbers are."""
    cfg = result["config"]
    return (f"{result['dataset']['name']}, inputs {cfg['inputs']}: {cfg['checkpoint_epoch']} epochs at LR "
            f"{cfg['lr']:g} to the checkpoint, then {cfg['epochs']} more per strategy on the same batches; "
            f"dead % per hidden layer (exact, training set) and accuracy: median [min-max] of {len(cfg['seeds'])} "
            "seeds, diverged seeds left out of medians and counted")


def run_demo_verb(args: argparse.Namespace) -> int:
    """Print the rescue table, the summary, the outputs and the wall time."""
    from ..lab.demo import result_table

    result = demo_command(args)
    _print_table(result_table(result), demo_table_title(result))
    _print_summary(result, Path(args.out))
    return 0


# -- experiment --------------------------------------------------------------------------------
def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="run one seeded experiment: lr-sweep, activations, init, rescue or preprocessing",
        description=(
            "lr-sweep: dead units vs learning rate on a small regression MLP; activations: ReLU vs LeakyReLU, "
            "PReLU, ELU, SELU, GELU, SiLU; init: PyTorch default vs He vs He+bias vs LeCun across depths; "
            "rescue: the demo's comparison on any data set; preprocessing: inputs in [0, 1] vs standardised, "
            "dead units per layer up to the checkpoint over seeds. Results go to OUT/NAME.json, plots and "
            "OUT/report.html (which includes every result already in OUT)."
        ),
    )
    p.add_argument("name", choices=_EXPERIMENTS, metavar="NAME", help=", ".join(_EXPERIMENTS))
    p.add_argument("--out", default="deadrelu-results", metavar="DIR", type=path_text, help="output directory (deadrelu-results)")
    p.add_argument("--dataset", default=None, help="data set (activations, init, rescue, preprocessing; default digits)")
    p.add_argument("--data-dir", metavar="DIR", type=path_text, help="where local data files are (mnist, mnist1d)")
    p.add_argument("--epochs", type=whole_number(), default=None, help="training epochs (experiment's default)")
    p.add_argument("--lr", type=positive_number, default=None,
                   help="SGD learning rate (activations, init, rescue, preprocessing; default: the experiment's own). "
                        "lr-sweep sweeps its own learning rates and takes no --lr")
    p.add_argument("--seeds", type=whole_number(), default=None,
                   help="number of seeds (lr-sweep: 0..N-1; rescue, preprocessing: --seed..--seed+N-1)")
    p.add_argument("--seed", type=seed_number, default=None,
                   help=f"seed, 0 to {MAX_SEED} (activations, init; first seed of rescue, preprocessing)")
    p.add_argument("--standardize", action="store_true", help="standardised inputs instead of [0, 1] (rescue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# run_experiment's keyword -> the CLI option that sets it, so refusals name only options a user can type
_OPTION_OF = {"dataset": "--dataset", "data_dir": "--data-dir", "epochs": "--epochs", "lr": "--lr",
              "seeds": "--seeds", "seed": "--seed", "standardize": "--standardize"}


def _experiment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of ``run_experiment`` from the CLI's; an option the experiment does not take is refused."""
    options: dict[str, Any] = {"progress": not args.no_progress}
    for key in ("dataset", "data_dir", "epochs", "lr"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.standardize:
        if args.name != "rescue":
            raise DeadReluError(f"--standardize applies to rescue only ({args.name} chooses its own inputs)")
        options["standardize"] = True
    if args.name == "lr-sweep":
        if args.dataset is not None:
            raise DeadReluError("lr-sweep runs on its own synthetic regression task; drop --dataset")
        if args.seed is not None:
            raise DeadReluError("lr-sweep runs seeds 0..N-1: use --seeds N instead of --seed")
        if args.lr is not None:
            raise DeadReluError("lr-sweep sweeps its own learning rates (0.001, 0.01, 0.1, 1); drop --lr")
        if args.seeds is not None:
            options["seeds"] = tuple(range(args.seeds))
    elif args.name in ("rescue", "preprocessing"):
        first = args.seed if args.seed is not None else 0
        count = args.seeds if args.seeds is not None else (5 if args.name == "rescue" else 10)
        _check_seed_range(first, count)
        options["seeds"] = tuple(range(first, first + count))
    else:
        if args.seeds is not None:
            raise DeadReluError(f"--seeds applies to lr-sweep, rescue and preprocessing; {args.name} takes --seed")
        options["seed"] = args.seed if args.seed is not None else 0
    from ..lab.experiments import EXPERIMENTS

    takes = inspect.signature(EXPERIMENTS[args.name]).parameters
    for key in options:
        if key not in takes:
            accepted = [flag for name, flag in _OPTION_OF.items() if name in takes]
            raise DeadReluError(f"{args.name} does not take {_OPTION_OF.get(key, key)}; "
                                f"it takes {', '.join(accepted + ['--no-progress', '--out'])}")
    return options


def experiment_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run one experiment, write its JSON and plots and re-render the report; returns the result."""
    from ..lab.demo import plan_outputs, write_outputs
    from ..lab.experiments import run_experiment

    t0 = time.perf_counter()
    options = _experiment_options(args)
    # Checked before training: a --out that cannot take the outputs, or a malformed result already there.
    plan = plan_outputs(args.out, args.name, results_name=f"{args.name}.json")
    result = run_experiment(args.name, **options)
    result["outputs"] = write_outputs(plan, result, t0)
    return result


def run_experiment_verb(args: argparse.Namespace) -> int:
    """Print the experiment's table, summary and outputs."""
    from ..lab.experiments import result_table

    result = experiment_command(args)
    _print_table(result_table(result), result.get("title", args.name))
    _print_summary(result, Path(args.out))
    return 0


# -- report ------------------------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render saved demo/experiment results as one self-contained HTML file",
        description="Render every deadrelu result JSON in RESULTS_DIR into one HTML file (images embedded).",
    )
    p.add_argument("results_dir", metavar="RESULTS_DIR", type=path_text)
    p.add_argument("--out", metavar="FILE", type=path_text, help="HTML file to write (default RESULTS_DIR/report.html)")


def report_command(args: argparse.Namespace) -> Path:
    """Render the report; returns the path written."""
    from ..lab.html_report import write_report

    return write_report(args.results_dir, args.out)


def run_report_verb(args: argparse.Namespace) -> int:
    """Print where the report went."""
    path = report_command(args)
    print(f"report written to {path.resolve()}")
    return 0


# verb -> (function that adds its subparser, function that runs it and returns an exit code)
VERBS = {
    "demo": (_add_demo, run_demo_verb),
    "experiment": (_add_experiment, run_experiment_verb),
    "report": (_add_report, run_report_verb),
}
