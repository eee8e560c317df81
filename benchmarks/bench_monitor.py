"""Training-step time with deadrelu.Monitor ÷ without, beside a naive per-batch hook probe.

Run:  python benchmarks/bench_monitor.py [--repeats 7] [--steps 20] [--threads N] [--clock cpu]
                                        [--steady-malloc] [--compile]

For each model (a 5×1024 MLP at batch 256, a small CNN at batch 64 on 32×32 inputs)
the variants below are timed in the same process, interleaved round-robin so machine
load affects them alike; each printed ratio is the median over repeats of
(variant time ÷ plain time) for the same number of SGD steps on the same batches,
followed by the interquartile range of those ratios in brackets.

* plain      — no hooks at all
* monitor    — deadrelu.Monitor observing every step (log_every=10: evaluations included)
* monitor/10 — observing every 10th step
* naive      — a forward hook on every ReLU module doing ``seen |= (out > 0).any(0)``
* monitor, torch pass — every step with the compiled CPU kernel off (``DEADRELU_NO_NATIVE=1``)

With ``--compile``: a ``torch.compile``'d model without hooks vs a copy monitored with
``Monitor(..., compiled=True)`` attached before compiling (its graph pass puts the statistics into
the compiled graph); the plain copy gets its own graph, and the script checks that the monitored
copy recorded every step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

import deadrelu


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    layers.append(nn.Linear(1024, 10))
    return nn.Sequential(*layers), torch.randn(256, 1024), torch.randint(0, 10, (256,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    return net, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


# Wall time by default; --clock cpu uses this process's CPU time, which time spent
# descheduled by other processes on a shared machine does not inflate.
CLOCK = time.perf_counter


class NaiveProbe:
    """The textbook approach: a Python forward hook per ReLU module, one `any` per batch."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[nn.Module, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.ReLU)]

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: object, out: torch.Tensor) -> None:
        fired = (out > 0).any(0)
        if module in self.seen:
            self.seen[module] |= fired
        else:
            self.seen[module] = fired

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int, mon=None) -> float:
    loss_fn = nn.CrossEntropyLoss()
    start = CLOCK()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)
    return CLOCK() - start


def report(name: str, base_times: list[float], ratios: dict[str, list[float]], steps: int) -> dict[str, float]:
    ms = 1000 * statistics.median(base_times) / steps
    def spread(v: list[float]) -> str:
        q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), 0, max(v)]
        return f"{statistics.median(v):.3f} [{q[0]:.3f}–{q[2]:.3f}]"

    parts = ", ".join(f"{k} {spread(v)}" for k, v in ratios.items())
    print(f"{name}: plain {ms:.1f} ms/step; time ratio vs plain — {parts}", flush=True)
    return {k: statistics.median(v) for k, v in ratios.items()}


def interleave(plain, variants: dict, repeats: int) -> tuple[list[float], dict[str, list[float]]]:
    for fn in (plain, *variants.values()):  # warm-up: allocator, first-site setup, compilation
        fn()
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    base_times = []
    for _ in range(repeats):
        for key, fn in variants.items():
            base = plain()
            ratios[key].append(fn() / base)
            base_times.append(base)
    return base_times, ratios


@contextlib.contextmanager
def statistics_off(part: str):
    """The monitor with one part of its per-batch work patched out (``--parts``): "no stats" skips
    the statistics pass (hooks, ring rows and evaluations stay), "hooks only" skips the window
    update too. Ablations for seeing where the time goes, not ways to run the monitor."""
    from deadrelu.monitor import window

    saved = window.accumulate, window.WindowStats.update, window.WindowStats.relu_and_update
    window.WindowStats.relu_and_update = lambda self, *args, **kwargs: None  # torch's ReLU, then update()
    if part == "no stats":
        window.accumulate = lambda *args, **kwargs: None
    else:
        window.WindowStats.update = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        window.accumulate, window.WindowStats.update, window.WindowStats.relu_and_update = saved


@contextlib.contextmanager
def torch_pass():
    """The compiled CPU kernel off (``DEADRELU_NO_NATIVE=1``): the pure-torch statistics pass, for A/B."""
    os.environ["DEADRELU_NO_NATIVE"] = "1"
    try:
        yield
    finally:
        del os.environ["DEADRELU_NO_NATIVE"]


def bench(name: str, build, repeats: int, steps: int, parts: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model, x, y = build()
    # Tiny learning rate: weights barely move, so every variant times the same work.
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    mon = deadrelu.Monitor(model, every=1, window=100, log_every=10)
    mon10 = deadrelu.Monitor(model, every=10, window=100, log_every=10)

    def with_monitor(m) -> float:
        m.attach()
        try:
            return time_steps(model, opt, x, y, steps, m)
        finally:
            m.detach()

    def naive() -> float:
        probe = NaiveProbe(model)
        try:
            return time_steps(model, opt, x, y, steps)
        finally:
            probe.close()

    def monitor_torch_pass() -> float:
        with torch_pass():
            return with_monitor(mon)

    variants = {
        "monitor": lambda: with_monitor(mon), "monitor/10": lambda: with_monitor(mon10), "naive": naive,
        "monitor, torch pass": monitor_torch_pass,
    }  # fmt: skip
    if parts:
        def without(part: str) -> float:
            with statistics_off(part):
                return with_monitor(mon)

        variants.update({part: (lambda part=part: without(part)) for part in ("no stats", "hooks only")})
    base_times, ratios = interleave(lambda: time_steps(model, opt, x, y, steps), variants, repeats)
    return report(name, base_times, ratios, steps)


def own_graph(model: nn.Module) -> nn.Module:
    """Give the plain copy a class of its own: TorchDynamo shares one graph between instances of
    a class, and the plain copy must run its own graph, without the monitor's observe calls."""
    model.__class__ = type(f"Plain{type(model).__name__}", (type(model),), {})
    return model


def bench_compiled(name: str, build, repeats: int, steps: int) -> dict[str, float]:
    """Compiled model vs a copy monitored with compiled=True (attached before compiling)."""
    torch.manual_seed(0)
    model, x, y = build()
    watched = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    opt_w = torch.optim.SGD(watched.parameters(), lr=1e-5)
    plain_c = torch.compile(own_graph(model))
    time_steps(plain_c, opt, x, y, 1)  # compiled before the monitor's graph pass is installed
    mon = deadrelu.Monitor(watched, every=1, window=100, log_every=10, compiled=True).attach()
    watched_c = torch.compile(watched)
    variants = {"monitor(compiled=True)": lambda: time_steps(watched_c, opt_w, x, y, steps, mon)}
    base_times, ratios = interleave(lambda: time_steps(plain_c, opt, x, y, steps), variants, repeats)
    observed = mon.report("total")
    mon.detach()
    # The monitored copy really was observed: every step, at every site.
    assert observed.batches == steps * (repeats + 1), (observed.batches, steps, repeats)
    print(f"  (monitored: {len(observed.sites)} sites, {observed.batches} batches observed)")
    return report(name, base_times, ratios, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd CNN")
    parser.add_argument("--only", choices=["mlp", "cnn"], default=None)
    parser.add_argument(
        "--parts", action="store_true",
        help="also time the every-step monitor without its statistics pass ('no stats') and without its "
        "window update ('hooks only'): where the monitor's time goes",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time or process CPU time")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="re-run with glibc's mmap/trim thresholds raised, so freed activations are reused instead of "
        "returned to the OS and page-faulted back each step (that noise otherwise swamps a few percent)",
    )
    args = parser.parse_args()
    if args.steady_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**32), MALLOC_TRIM_THRESHOLD_=str(2**32))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {os.cpu_count()} CPU(s), "
        f"load average {load:.1f}; {args.clock} clock; steady malloc {'MALLOC_MMAP_THRESHOLD_' in os.environ}; median of {args.repeats} interleaved repeats of {args.steps} steps"
    )
    if args.only in (None, "mlp"):
        bench("MLP 5x1024, batch 256", mlp, args.repeats, args.steps, args.parts)
    if args.only in (None, "cnn"):
        bench("CNN 4 conv, batch 64x3x32x32", cnn, args.repeats, args.steps, args.parts)
    if args.compile:
        if args.only in (None, "mlp"):
            bench_compiled("MLP 5x1024, torch.compile", mlp, args.repeats, args.steps)
        if args.only in (None, "cnn"):
            bench_compiled("CNN 4 conv, torch.compile", cnn, args.repeats, args.steps)


if __name__ == "__main__":
    main()
