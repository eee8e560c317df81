"""Shared training pieces of the demo and the experiments: MLP builder, epochs, exact per-epoch stats.

The MLP's modules are named ``fc1, h1, fc2, h2, …, out`` (``h`` for the hidden layer's
activation), so a hidden layer has one name everywhere: in :func:`deadrelu.scan`'s sites,
in the monitor's live view, in the demo's tables, plots and report.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .datasets import Dataset
from ..errors import DeadReluError
from ..core.inputs import ProgressBar, kept_training_flags
from ..core.report import Report
from ..core.scan import scan

__all__ = [
    "ACTIVATIONS", "INITS", "ProgressBar", "build_mlp", "epoch_record", "evaluate", "firing_rates", "init_linear",
    "layer_stats", "loss_of", "make_activation", "torch_threads", "train_epoch",
]

ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu")
INITS = ("default", "he", "he_bias", "lecun")


def check_lr(lr: Any) -> None:
    """Refuse an ``lr`` that is not a positive finite number, before any training: torch.optim raises
    a bare ValueError on a negative one, and a NaN or infinite one would train on to a "diverged" finding.

    Raises:
        DeadReluError: naming the value.
    """
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise DeadReluError(f"lr must be a positive number, got {lr!r:.80}")
    try:
        value = float(lr)
    except OverflowError:  # an int too large for a float (whose digits may be too many to print)
        raise DeadReluError("lr must be a positive number a float can hold, got an int too large for a float") from None
    if not value > 0 or not math.isfinite(value):
        raise DeadReluError(f"lr must be a positive finite number, got {lr}")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (``leaky_relu`` uses slope 0.01, PyTorch's default)."""
    table = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "prelu": nn.PReLU,
        "elu": nn.ELU,
        "selu": nn.SELU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
    }
    if name not in table:
        raise DeadReluError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return table[name]()


def init_linear(layer: nn.Linear, init: str, bias: float = 0.01) -> None:
    """Initialise one layer: ``default`` (PyTorch's own), ``he``, ``he_bias`` (He + small positive bias), ``lecun``."""
    if init == "default":
        return
    with torch.no_grad():
        if init in ("he", "he_bias"):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.constant_(layer.bias, bias if init == "he_bias" else 0.0)
        elif init == "lecun":
            # LeCun normal: std 1/sqrt(fan_in), the init SELU's self-normalisation assumes.
            nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
        else:
            raise DeadReluError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")


def build_mlp(
    features: int,
    hidden: Sequence[int],
    outputs: int,
    *,
    activation: str = "relu",
    init: str = "he",
    seed: int = 0,
) -> nn.Sequential:
    """``Linear → activation`` per hidden width, then a linear head; weights drawn from ``seed``.

    Modules are named ``fc1, h1, fc2, h2, …, out``: the activation of hidden layer ``k`` is ``hk``.

    >>> build_mlp(4, (8, 8), 2)
    Sequential(
      (fc1): Linear(in_features=4, out_features=8, bias=True)
      (h1): ReLU()
      (fc2): Linear(in_features=8, out_features=8, bias=True)
      (h2): ReLU()
      (out): Linear(in_features=8, out_features=2, bias=True)
    )
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = features
        for k, h in enumerate(hidden, start=1):
            lin = nn.Linear(width, h)
            init_linear(lin, init)
            layers[f"fc{k}"] = lin
            layers[f"h{k}"] = make_activation(activation)
            width = h
        head = nn.Linear(width, outputs)
        if init == "lecun":
            init_linear(head, "lecun")
        layers["out"] = head
        return nn.Sequential(layers)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    out = model(x)
    if task == "classification":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ds: Dataset,
    batch_size: int,
    generator: torch.Generator,
    on_step: Any = None,
) -> float:
    """One shuffled pass over the training split; returns the mean loss (NaN once it diverged)."""
    model.train()
    n = len(ds.x_train)
    order = torch.randperm(n, generator=generator)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        loss = loss_of(model, ds.x_train[idx], ds.y_train[idx], ds.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        total += value * len(idx)
        count += len(idx)
        if on_step is not None:
            on_step(value)
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset) -> float:
    """Validation accuracy (classification) or validation MSE (regression); NaN outputs count as wrong."""
    with kept_training_flags(model):
        model.eval()
        out = model(ds.x_val)
    if ds.task == "classification":
        # argmax of a NaN row is an arbitrary class; a diverged model must not score chance accuracy.
        ok = torch.isfinite(out).all(1) & (out.argmax(1) == ds.y_val)
        return float(ok.float().mean())
    return float(nn.functional.mse_loss(out, ds.y_val))


def layer_stats(report: Report) -> list[dict[str, Any]]:
    """Per activation site, the counts the evidence needs (JSON-ready)."""
    rows = []
    for s in report.sites:
        rows.append(
            {
                "site": s.name,
                "function": s.function,
                "units": s.units,
                "dead": s.dead,
                "asleep": s.asleep,
                "dormant": s.dormant,
                "nonfinite": s.nonfinite,
                "dead_fraction": s.dead_fraction,
                "dormant_fraction": s.dormant / s.units if s.units else 0.0,
                "nonfinite_fraction": s.nonfinite / s.units if s.units else 0.0,
            }
        )
    return rows


def epoch_record(
    model: nn.Module, ds: Dataset, epoch: int, loss: float, seconds: float, *, validation_scan: bool = False,
) -> tuple[dict[str, Any], Report]:
    """Exact statistics after one epoch: a scan over the whole training split plus validation score.

    With ``validation_scan`` the record also holds ``val_layers``: the same per-layer counts
    over the validation split (a unit can be dead on one split and alive on the other). A
    model with NaN/Inf units counts as diverged even when the epoch's loss was finite.
    """
    report = scan(model, ds.x_train, batch_size=1024)
    metric = evaluate(model, ds)
    record: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": loss if math.isfinite(loss) else None,
        "diverged": not math.isfinite(loss) or report.nonfinite > 0,
        "val_accuracy" if ds.task == "classification" else "val_mse": metric if math.isfinite(metric) else None,
        "seconds": seconds,
        "layers": layer_stats(report),
    }
    if validation_scan:
        record["val_layers"] = layer_stats(scan(model, ds.x_val, batch_size=1024))
    return record, report


def firing_rates(report: Report) -> list[list[float | None]]:
    """Per site, the per-unit firing rates (for the unit-grid heatmap); None for a non-finite unit.

    A unit that produced NaN or ±Inf never counted as firing (``NaN > 0`` is false), so its rate
    reads 0 like a dead unit's; the report calls it neither dead nor alive, and so does this list
    (``null`` in JSON). Rates keep 6 significant digits, so a unit that fired once is never 0.
    """
    return [[None if state == "nonfinite" else float(f"{r:.6g}") for r, state in zip(s.firing_rate, s.states)]
            for s in report.sites]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave as is), restoring the old count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
