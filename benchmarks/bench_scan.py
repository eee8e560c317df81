"""Scan throughput ÷ plain ``no_grad`` inference throughput, measured side by side in one process.

    python benchmarks/bench_scan.py [--repeats 7] [--samples 4096] [--threads N] [--steady-malloc]

For each model, plain inference over the data and ``deadrelu.scan`` over the same data
alternate ``--repeats`` times. Printed: throughput ratios (plain time ÷ scan time; 1.00 =
free, target >= 0.95) from the median CPU time of this process — which other jobs on a
shared machine disturb far less than wall time — and from the median wall time. Also
printed: the CPU-time ratio with the capture machinery but a no-op accumulator, which
separates the cost of finding sites from the cost of the statistics, and the ratio of a scan
with the compiled CPU kernel off (``DEADRELU_NO_NATIVE=1``: the pure-torch statistics pass).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.core import native
from deadrelu.core.capture import ActivationCapture


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


def torch_pass_scan(model: nn.Module, data: torch.Tensor, batch_size: int) -> None:
    """The scan with the compiled CPU kernel off: the pure-torch statistics pass."""
    os.environ["DEADRELU_NO_NATIVE"] = "1"
    try:
        deadrelu.scan(model, data, batch_size=batch_size)
    finally:
        del os.environ["DEADRELU_NO_NATIVE"]


def measure(model: nn.Module, data: torch.Tensor, batch_size: int, repeats: int) -> dict[str, float]:
    """Median CPU and wall seconds of each runner, interleaved."""
    model.eval()
    runners = {"plain": plain, "capture only": capture_only, "scan": full_scan, "torch pass": torch_pass_scan}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    wall: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up: allocator, kernels
        fn(model, data, batch_size)
    for _ in range(repeats):
        for name, fn in runners.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(model, data, batch_size)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    out = {f"cpu {k}": statistics.median(v) for k, v in cpu.items()}
    out.update({f"wall {k}": statistics.median(v) for k, v in wall.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="re-run with glibc's mmap/trim thresholds raised, so freed activations are reused instead of "
        "returned to the OS and page-faulted back each batch (that noise otherwise swamps a few percent)",
    )
    args = parser.parse_args()
    if args.steady_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**32), MALLOC_TRIM_THRESHOLD_=str(2**32))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("MLP 5x1024 (nn.ReLU)", mlp_5x1024(), torch.randn(args.samples, 784), 256),
        ("MLP 5x1024 (F.relu)", FunctionalMLP(), torch.randn(args.samples, 784), 256),
        ("small CNN 32x32", small_cnn(), torch.randn(max(args.samples // 8, 64), 3, 32, 32), 128),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs, "
        f"steady malloc {'MALLOC_MMAP_THRESHOLD_' in os.environ}"
    )
    print(native.status())
    print(
        f"{'model':24s} {'plain cpu s':>11s} {'scan cpu s':>10s} {'ratio (cpu)':>11s} {'ratio (wall)':>12s} "
        f"{'capture-only (cpu)':>18s} {'torch pass (cpu)':>16s}"
    )
    for name, model, data, bs in cases:
        t = measure(model, data, bs, args.repeats)
        print(
            f"{name:24s} {t['cpu plain']:11.3f} {t['cpu scan']:10.3f} {t['cpu plain'] / t['cpu scan']:11.3f} "
            f"{t['wall plain'] / t['wall scan']:12.3f} {t['cpu plain'] / t['cpu capture only']:18.3f} "
            f"{t['cpu plain'] / t['cpu torch pass']:16.3f}"
        )


if __name__ == "__main__":
    main()
