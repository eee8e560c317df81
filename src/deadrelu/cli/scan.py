"""``deadrelu scan MODEL --data DATA`` (and ``deadrelu scan DIR --text corpus.txt``): per-unit statistics.

Every option is validated and every output path checked before the (possibly long) scan
starts; the model, the data and any existing file stay as they were whatever fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..core.files import is_stream_path, refuse_directory_name
from ..core.report import Report
from ..errors import DeadReluError, ReportFormatError
from .loading import TRUST_FLAG, one_line
from .options import finite_float, path_text, whole_number

__all__ = ["scan_command", "check_device", "check_output_path"]

_DEFAULT_BATCH = 256  # rows per batch for tensor data
_DEFAULT_TEXT_BATCH = 32  # documents per batch for --text


def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="find dead, asleep and dormant units of a model on data",
        description=(
            "Run DATA through MODEL and report every activation site's dead, asleep and dormant units. "
            "MODEL: a TorchScript file, package.module:factory (with --weights STATE_DICT), or with "
            f"{TRUST_FLAG} a pickled nn.Module or a torch.export program (.pt2); with --text, a local "
            "Hugging Face model directory. DATA: .pt/.npy/.npz/.csv, a directory of MNIST IDX files, or "
            "package.module:function returning a tensor or an iterable of batches."
        ),
    )
    p.add_argument("model", metavar="MODEL", type=path_text)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DATA", type=path_text)
    source.add_argument(
        "--text",
        metavar="CORPUS",
        type=path_text,
        help="a UTF-8 text file, one document per line, tokenised with MODEL's tokenizer (MODEL: a Hugging Face "
        "model directory); padding is masked out of the counts",
    )
    p.add_argument("--weights", metavar="STATE_DICT", type=path_text, help="state_dict to load into a factory-built model")
    p.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="allow files that unpickle Python objects (a whole pickled model, a .pt2 program, a .pt data file "
        "holding non-tensors). Loading such a file runs any code its author put in it: only for files you trust",
    )
    p.add_argument("--json", metavar="OUT", type=path_text, help="also write the report as JSON here")
    p.add_argument(
        "--batch-size",
        type=whole_number(1),
        default=None,
        metavar="N",
        help=f"rows per batch for tensor data ({_DEFAULT_BATCH}); documents per batch for --text ({_DEFAULT_TEXT_BATCH})",
    )
    p.add_argument("--max-length", type=whole_number(1), metavar="TOKENS", help="--text: truncate documents to this many tokens (the model's limit)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="--text: load the model in this dtype (as saved)")
    p.add_argument("--flatten", action="store_true", help="flatten each sample (e.g. MNIST images for an MLP)")
    p.add_argument("--train-mode", action="store_true", help="run the model in train mode (default: eval)")
    p.add_argument("--max-batches", type=whole_number(1), metavar="N", help="stop after N batches")
    p.add_argument("--device", help="run on this device, e.g. cpu, cuda, cuda:1 (default: where the model's parameters are)")
    p.add_argument("--threshold", type=finite_float(), default=0.0, help="an output fires when > this (0)")
    p.add_argument("--asleep-rate", type=finite_float(0.0, 0.999999), default=0.05, help="asleep: 0 < firing rate <= this, in [0, 1) (0.05)")
    p.add_argument("--dormant-tau", type=finite_float(0.0, 1.0), default=0.025, help="dormant: E|h_i| / mean_k E|h_k| <= this, in [0, 1] (0.025)")
    p.add_argument(
        "--min-observations",
        type=whole_number(1),
        default=1,
        metavar="N",
        help="a unit that never fired is dead only on at least N observations of its site, else unobserved (1)",
    )
    p.add_argument("--advice", action="store_true", help="print ranked advice after the table")
    p.add_argument(
        "--baseline",
        metavar="REPORT_JSON",
        type=path_text,
        help="an earlier report (e.g. at initialisation) so --advice can tell born-dead from died-in-training",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_device(text: str) -> torch.device:
    """The ``--device`` as a :class:`torch.device` that this machine can really allocate on.

    Raises:
        DeadReluError: an unknown device name, or one this build or machine does not have
            (``cuda`` on a CPU-only build, ``cuda:3`` on a one-GPU machine, ``meta``).

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as err:
        raise DeadReluError(f"--device {text!r} is not a device name (e.g. cpu, cuda, cuda:0): {one_line(err, 150)}") from None
    if device.type == "meta":
        raise DeadReluError("--device meta holds no values to count; use cpu or cuda")
    try:
        torch.empty(1, device=device)
    except Exception as err:  # AssertionError "Torch not compiled with CUDA enabled", RuntimeError, ...
        raise DeadReluError(f"--device {text} is not available here ({one_line(err, 200)})") from None
    return device


def check_output_path(path: str, inputs: list[str | None]) -> None:
    """Refuse an output path before the scan: an empty one, a folder or a name ending in ``/`` (which names
    one), a missing or read-only folder, or one of the inputs.

    Raises:
        DeadReluError: when ``path`` cannot be written, or would overwrite an input file.
    """
    if not str(path).strip():
        raise DeadReluError(f"cannot write --json {path!r}: an empty path names no file")
    refuse_directory_name(path, "--json ")  # before Path(), which drops the "/" of "out/"
    target = Path(path)
    if is_stream_path(target):
        return  # /dev/stdout, a FIFO: written to as a stream, never replaced
    final = Path(os.path.realpath(target))  # a symlink is written through, so check where it points
    if final.is_dir():
        raise DeadReluError(f"cannot write --json {path}: it is a directory")
    directory = final.parent
    if not directory.is_dir():
        raise DeadReluError(f"cannot write --json {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DeadReluError(f"cannot write --json {path}: directory {directory} is not writable")
    if not final.exists():
        return
    for other in inputs:
        if not other:
            continue
        for read in _files_behind(other):
            try:
                same = os.path.samefile(final, read)
            except OSError:
                same = False
            if same:
                what = "the input file" if read == other else f"the file behind {other},"
                raise DeadReluError(f"--json {path} is {what} {read}: it would be overwritten")
        if Path(other).is_dir() and final.is_relative_to(os.path.realpath(other)) and not _is_report(final):
            raise DeadReluError(
                f"--json {path} would overwrite {final.name} in the input directory {other}, which the scan may "
                "read; write the report elsewhere (an earlier deadrelu report there may be replaced)"
            )


def _files_behind(spec: str) -> list[str]:
    """The files an input argument names: itself, and for ``package.module:name`` the module's
    source once it is imported (the second check, after loading, sees it)."""
    out = [spec]
    module, colon, name = spec.partition(":")
    if colon and name and module and not Path(spec).exists():
        loaded = sys.modules.get(module)
        source = getattr(loaded, "__file__", None)
        if source:
            out.append(source)
    return out


def _is_report(path: Path) -> bool:
    """Whether an existing file is a deadrelu report (an earlier --json output, fine to replace)."""
    try:
        Report.from_json(path)
    except Exception:  # anything unreadable as a report is some other file
        return False
    return True


def _load_baseline(path: str) -> Report:
    try:
        return Report.from_json(Path(path))
    except ReportFormatError as err:  # names the field; say which option the file came from
        raise ReportFormatError(f"--baseline {path} is not a valid deadrelu report: {err}") from err
    except DeadReluError:
        raise
    except Exception as err:  # KeyError/TypeError/ValueError from a malformed file
        raise DeadReluError(f"--baseline {path} is not a deadrelu report ({type(err).__name__}: {one_line(err, 200)})") from err


def _check_combinations(args: argparse.Namespace) -> None:
    if args.baseline and not args.advice:
        raise DeadReluError("--baseline is only used with --advice")
    text_only = [flag for flag, given in (("--max-length", args.max_length), ("--dtype", args.dtype)) if given]
    if args.text is None and text_only:
        raise DeadReluError(f"{text_only[0]} is only used with --text")
    if args.text is not None:
        data_only = [f for f, given in (("--weights", args.weights), ("--flatten", args.flatten)) if given]
        if data_only:
            raise DeadReluError(f"{data_only[0]} is not used with --text (MODEL is a Hugging Face model directory)")


def _load_inputs(args: argparse.Namespace, batch_size: int) -> tuple[Any, Any]:
    """``(model, data)`` from the arguments."""
    if args.text is not None:
        from .text import text_scan_inputs

        return text_scan_inputs(
            args.model, args.text, batch_size=batch_size, max_length=args.max_length, dtype=args.dtype
        )
    from .loading import inputs_for, load_data, load_model

    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    data = load_data(args.data, flatten=args.flatten, trust_pickle=args.trust_pickle)
    return model, inputs_for(model, data)


def scan_command(args: argparse.Namespace) -> Report:
    """Validate, load, scan, optionally write JSON; return the report (testable without printing).

    Raises:
        DeadReluError: any user error, before anything is written.
    """
    from ..core.scan import scan

    _check_combinations(args)
    batch_size = args.batch_size or (_DEFAULT_TEXT_BATCH if args.text is not None else _DEFAULT_BATCH)
    device = check_device(args.device) if args.device else None
    if args.baseline:
        _load_baseline(args.baseline)  # fail before the (possibly long) scan
    if args.json is not None:
        check_output_path(args.json, [args.model, args.data, args.text, args.weights, args.baseline])
    model, data = _load_inputs(args, batch_size)
    if args.json is not None:  # again, now that module:factory specs are imported and their files are known
        check_output_path(args.json, [args.model, args.data, args.text, args.weights, args.baseline])
    if device is not None:
        try:
            model.to(device)  # the CLI loaded this model itself: moving it changes no user object
        except Exception as err:
            raise DeadReluError(f"cannot move the model to {device}: {type(err).__name__}: {one_line(err, 200)}") from err
    try:
        report = scan(
            model,
            data,
            batch_size=batch_size,
            train=args.train_mode,
            threshold=args.threshold,
            asleep_rate=args.asleep_rate,
            dormant_tau=args.dormant_tau,
            min_observations=args.min_observations,
            device=device,
            max_batches=args.max_batches,
            progress=not args.no_progress,
        )
    except DeadReluError as err:
        hinted = _with_hint(str(err), model)
        if hinted == str(err):
            raise
        raise DeadReluError(hinted) from err
    args.advice_text = None
    if args.advice:
        from ..core.advice import advise

        # before the JSON is written: a baseline the report cannot be compared with (other levels, no
        # site in common) is one error that leaves --json's file as it was
        baseline = _load_baseline(args.baseline) if args.baseline else None
        args.advice_text = advise(report, baseline=baseline)
    if args.json is not None:
        from ..lab.termination import sigterm_raises

        with sigterm_raises():  # a SIGTERM mid-write removes the temporary file instead of leaving it
            report.to_json(args.json)
    if args.text is not None:
        # the documents scanned (--max-batches may stop before the corpus ends), not the corpus's count
        args.text_counts = (report.samples, data.tokens, data.positions - data.tokens)
    return report


def _with_hint(message: str, model: Any) -> str:
    """Add what to try when an error has a known cause (a torch.export program traced at one batch size)."""
    exported = type(model).__module__.startswith("torch.export") or "GraphModule" in type(model).__name__
    shape_words = ("shape", "size", "Expected input", "expected input", "guard")
    if exported and any(w in message for w in shape_words):
        import re

        # torch >= 2.4: "...size()[0] == 4"; torch 2.6: "Expected input at *args[0].shape[0] to be
        # equal to 4, but got 6"; torch 2.2: "Input l_x_.shape[0] is specialized at 4"
        fixed = (
            re.search(r"size\(\)\[0\] == (\d+)", message)
            or re.search(r"shape\[0\] to be equal to (\d+)", message)
            or re.search(r"shape\[0\] is specialized at (\d+)", message)
        )
        size = f" ({fixed.group(1)})" if fixed else ""
        return (
            f"{message} — a torch.export program may only take the batch size it was exported with{size}: pass "
            "--batch-size equal to it and a sample count divisible by it, or export with a dynamic batch dimension"
        )
    return message


def _text_summary(report: Report, documents: int, tokens: int, padding: int) -> str:
    """What the census counted, read back from the report (not assumed): were the pads left out?"""
    # Sites whose activations are (batch, tokens, units) observe one row per counted position.
    observed = {site.observations for site in report.sites}
    if padding == 0:
        how = "no padding"
    elif observed == {tokens}:
        how = f"{padding} padding positions left out of the counts"
    elif tokens + padding in observed:
        how = f"{padding} padding positions COUNTED as observations (this deadrelu has no padding mask)"
    else:
        how = f"{padding} padding positions"
    return f"{documents} documents, {tokens} tokens; {how}"


def _print(report: Report) -> None:
    """The report's table: drawn by rich on a terminal wide enough for it, plain otherwise (every name and number whole)."""
    from .tables_fit import print_fitted

    print_fitted(report.__rich__, str(report))


def run_scan(args: argparse.Namespace) -> int:
    """Print the report table (and advice); exit 0."""
    report = scan_command(args)
    _print(report)
    if args.text is not None:
        print("\n" + _text_summary(report, *args.text_counts))
    if args.advice_text is not None:
        print()
        print(args.advice_text)
    if args.json is not None:
        print(f"\nreport written to {args.json}")
    return 0


# verb -> (function that adds its subparser, function that runs it and returns an exit code)
VERBS = {
    "scan": (_add_scan, run_scan),
}
