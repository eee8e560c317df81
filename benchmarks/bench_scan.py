"""Scan throughput ÷ plain ``no_grad`` inference throughput, measured side by side in one process.

    python benchmarks/bench_scan.py [--repeats 7] [--samples 4096]

For each model, plain inference over the data and ``deadrelu.scan`` over the same data
alternate ``--repeats`` times; the ratio of median wall times is printed (1.00 = free,
target >= 0.95). Also printed: the same ratio with the capture machinery but a no-op
accumulator, which separates the cost of finding sites from the cost of the statistics.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.capture import ActivationCapture


def mlp_5x1024() -> nn.Module:
    layers: list[nn.Module] = []
    width = 784
    for _ in range(5):
        layers += [nn.Linear(width, 1024), nn.ReLU()]
        width = 1024
    return nn.Sequential(*layers, nn.Linear(1024, 10))


class FunctionalMLP(nn.Module):
    """The same 5×1024 MLP with ``F.relu`` calls in forward instead of modules."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(784 if i == 0 else 1024, 1024) for i in range(5))
        self.out = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip


class _Null:
    """An accumulator that does nothing: isolates the cost of site discovery."""

    threshold = 0.0

    def update(self, activation: torch.Tensor, unit_dim: int, nonnegative: bool = False) -> None:
        pass


def plain(model: nn.Module, data: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for xb in data.split(batch_size):
            model(xb)


def capture_only(model: nn.Module, data: torch.Tensor, batch_size: int) -> None:
    with ActivationCapture(model, stats_factory=lambda *a: _Null()), torch.no_grad():
        for xb in data.split(batch_size):
            model(xb)


def full_scan(model: nn.Module, data: torch.Tensor, batch_size: int) -> None:
    deadrelu.scan(model, data, batch_size=batch_size)


def measure(model: nn.Module, data: torch.Tensor, batch_size: int, repeats: int) -> dict[str, float]:
    model.eval()
    runners = {"plain": plain, "capture only": capture_only, "scan": full_scan}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up: allocator, kernels
        fn(model, data, batch_size)
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(model, data, batch_size)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("MLP 5x1024 (nn.ReLU)", mlp_5x1024(), torch.randn(args.samples, 784), 256),
        ("MLP 5x1024 (F.relu)", FunctionalMLP(), torch.randn(args.samples, 784), 256),
        ("small CNN 32x32", small_cnn(), torch.randn(max(args.samples // 8, 64), 3, 32, 32), 128),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'model':24s} {'plain s':>8s} {'scan s':>8s} {'throughput ratio':>17s} {'capture-only ratio':>19s}")
    for name, model, data, bs in cases:
        t = measure(model, data, bs, args.repeats)
        print(
            f"{name:24s} {t['plain']:8.3f} {t['scan']:8.3f} {t['plain'] / t['scan']:17.3f} "
            f"{t['plain'] / t['capture only']:19.3f}"
        )


if __name__ == "__main__":
    main()
