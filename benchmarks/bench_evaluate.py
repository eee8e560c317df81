"""Cost of one Monitor evaluation (every ``log_every`` steps) as models get wider, in one process.

    python benchmarks/bench_evaluate.py [--repeats 5] [--window 100]

For MLPs of 5×1024, 16×5632 (a Llama-1B-like unit count) and 32×11008 ReLU units the monitor
observes ``window + 2`` small batches, then one evaluation is timed (host copy, reports,
history rows, lifecycle events, warnings). Printed: ms per evaluation and ns per unit; then the
classification alone (what an evaluation reads of every site: each state's count, the dead and
the dormant units; from a copy of the report with nothing cached) as
:class:`~deadrelu.SiteReport` computes it, beside the per-unit states and dormancy scores unit
by unit in plain Python from their definitions (the way it once computed them), and the
speed-up. At ``log_every=10`` a step pays a tenth of the evaluation; on a CPU, most of what is
left at ``window=100`` is summing the ring of window rows, which a GPU does in well under 1 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings

import torch
from torch import nn

import deadrelu
from deadrelu.core.stats import classify


def unit_by_unit(site: deadrelu.SiteReport) -> tuple[list[str], list[float], list[int]]:
    """States (:func:`deadrelu.core.stats.classify`, the pure-Python rule), dormancy scores and
    dormant units, one unit at a time (the reference)."""
    lv = site.levels
    states = classify(site.fired_counts, site.observations, site.nonfinite_counts, lv.asleep_rate, lv.min_observations)
    finite = [m for m, bad in zip(site.mean_abs, site.nonfinite_counts) if not bad]
    layer = sum(finite) / len(finite) if finite else 0.0
    score = [math.nan if bad else (m / layer if layer > 0 else 0.0) for m, bad in zip(site.mean_abs, site.nonfinite_counts)]
    return states, score, [i for i, d in enumerate(score) if d <= lv.dormant_tau and states[i] != "unobserved"]


class Affine(nn.Module):
    """A per-unit scale and shift: as many units as a Linear of that width, without its weights
    (only the unit count matters to an evaluation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.bias = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, window {args.window}, best of {args.repeats}")
    # (the best time: the cost without this machine's noise)
    print(
        f"{'model':>10s} {'units':>8s} {'evaluate ms':>11s} {'ns/unit':>8s} {'classify ms':>14s} "
        f"{'unit-by-unit ms':>15s} {'speed-up':>8s}"
    )
    for depth, width in ((5, 1024), (16, 5632), (32, 11008)):
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [Affine(width), nn.ReLU()]
        model = nn.Sequential(*layers)
        x = torch.randn(2, width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mon = deadrelu.Monitor(model, window=args.window, log_every=10**9)
            with mon:
                for _ in range(args.window + 2):
                    model(x)
                    mon.step()
                mon._evaluate()  # the first full window: every unit's first lifecycle state
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    mon._evaluate()
                    times.append(time.perf_counter() - t)
                report = mon.report()
        fresh = lambda: [dataclasses.replace(site) for site in report.sites]  # noqa: E731 (no cached values)
        vec, ref = [], []
        for _ in range(args.repeats):
            sites = fresh()
            t = time.perf_counter()
            for site in sites:  # what an evaluation reads: each state's count, the dead and dormant units
                site.active, site.asleep, site.dead, site.dormant, site.nonfinite, site.unobserved
                site.dead_units, site.dormant_units
            vec.append(time.perf_counter() - t)
            t = time.perf_counter()
            for site in sites:
                unit_by_unit(site)
            ref.append(time.perf_counter() - t)
        units = depth * width
        print(
            f"{depth:>3d}x{width:<6d} {units:8d} {min(times) * 1e3:11.2f} {min(times) / units * 1e9:8.0f} "
            f"{min(vec) * 1e3:14.2f} {min(ref) * 1e3:15.2f} {min(ref) / min(vec):8.1f}"
        )

if __name__ == "__main__":
    main()
