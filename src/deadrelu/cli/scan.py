"""``deadrelu scan MODEL --data DATA``: per-unit statistics of a saved model on saved data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import DeadReluError
from ..core.report import Report

__all__ = ["scan_command"]


def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="find dead, asleep and dormant units of a model on data",
        description=(
            "Run DATA through MODEL and report every activation site's dead, asleep and dormant units. "
            "MODEL: a TorchScript file, a torch.export program (.pt2), a pickled nn.Module, or "
            "package.module:factory (with --weights). DATA: .pt/.npy/.npz/.csv, a directory of MNIST "
            "IDX files, or package.module:function returning a tensor or an iterable of batches."
        ),
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--weights", metavar="STATE_DICT", help="state_dict to load into a factory-built model")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON here")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="rows per batch for tensor data (256)")
    p.add_argument("--flatten", action="store_true", help="flatten each sample (e.g. MNIST images for an MLP)")
    p.add_argument("--train-mode", action="store_true", help="run the model in train mode (default: eval)")
    p.add_argument("--max-batches", type=int, metavar="N", help="stop after N batches")
    p.add_argument("--device", help="run on this device (default: where the model's parameters are)")
    p.add_argument("--threshold", type=float, default=0.0, help="an output fires when > this (0)")
    p.add_argument("--asleep-rate", type=float, default=0.05, help="asleep: 0 < firing rate <= this (0.05)")
    p.add_argument("--dormant-tau", type=float, default=0.025, help="dormant: E|h_i| / mean_k E|h_k| <= this (0.025)")
    p.add_argument("--advice", action="store_true", help="print ranked advice after the table")
    p.add_argument(
        "--baseline",
        metavar="REPORT_JSON",
        help="an earlier report (e.g. at initialisation) so --advice can tell born-dead from died-in-training",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def scan_command(args: argparse.Namespace) -> Report:
    """Load, scan, optionally write JSON; return the report (testable without printing)."""
    from .loading import load_data, load_model
    from ..core.scan import scan

    if args.batch_size < 1:
        raise DeadReluError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.baseline and not args.advice:
        raise DeadReluError("--baseline is only used with --advice")
    if args.baseline:
        Report.from_json(Path(args.baseline))  # fail before the (possibly long) scan
    if args.json:
        out_dir = Path(args.json).resolve().parent
        if not out_dir.is_dir():
            raise DeadReluError(f"cannot write --json {args.json}: directory {out_dir} does not exist")
    model = load_model(args.model, args.weights)
    data = load_data(args.data, flatten=args.flatten)
    report = scan(
        model,
        data,
        batch_size=args.batch_size,
        train=args.train_mode,
        threshold=args.threshold,
        asleep_rate=args.asleep_rate,
        dormant_tau=args.dormant_tau,
        device=args.device,
        max_batches=args.max_batches,
        progress=not args.no_progress,
    )
    if args.json:
        report.to_json(args.json)
    return report


def _print(obj: Any) -> None:
    from .._imports import available

    if available("rich") and sys.stdout.isatty():
        from rich.console import Console

        Console().print(obj)
    else:
        print(obj)


def run_scan(args: argparse.Namespace) -> int:
    """Print the report table (and advice); exit 0."""
    report = scan_command(args)
    _print(report)
    if args.advice:
        from ..core.advice import advise

        baseline = Report.from_json(Path(args.baseline)) if args.baseline else None
        print()
        print(advise(report, baseline=baseline))
    if args.json:
        print(f"\nreport written to {args.json}")
    return 0


# verb -> (function that adds its subparser, function that runs it and returns an exit code)
VERBS = {
    "scan": (_add_scan, run_scan),
}
