"""torch.compile: the monitor's hooks are traced into the graph, nothing recompiles per step, counts stay exact."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.monitor.compiled import ModuleCapture, TensorWindowStats
from deadrelu.monitor.graph_capture import graph_capture_available
from deadrelu.monitor.window import WindowStats
from deadrelu.monitor.monitor import CompiledModelWarning, DeadUnitWarning
from fixtures.toolchain import needs_inductor

STEPS = 8
# Without effectful custom ops (torch < 2.4) compiled monitoring falls back to module hooks, which
# Dynamo traces with graph breaks and recompiles: the counts stay exact, the one-graph promise does not.
ONE_GRAPH = pytest.mark.skipif(not graph_capture_available(), reason="one graph needs effectful custom ops (torch >= 2.4)")


def tiny() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:5] = -100.0
    return model


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 8, generator=g) for _ in range(STEPS)]


def train(runner: nn.Module, mon: deadrelu.Monitor, after_step=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        for i, x in enumerate(batches()):
            runner(x).pow(2).mean().backward()  # no optimizer: identical weights in every run
            mon.step()
            if after_step:
                after_step(i)


def site_counts(report: deadrelu.Report) -> list[tuple]:
    return [(s.name, s.function, s.observations, s.fired_counts) for s in report.sites]


@needs_inductor
@pytest.mark.parametrize("capture", [pytest.param("graph", marks=ONE_GRAPH), "module hooks"])
def test_compiled_model_no_recompilation_and_exact_counts(dynamo, capture, monkeypatch):
    if capture == "module hooks":  # what a torch without effectful custom ops gets
        monkeypatch.setattr("deadrelu.monitor.graph_capture.graph_capture_available", lambda: False)
    model = tiny()
    mon = deadrelu.Monitor(model, window=3, log_every=2, compiled=True)
    mon.attach()  # hooks first, then compile
    compiled = torch.compile(model)
    graphs = []
    train(compiled, mon, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
    mon.finish()
    window, total = mon.report(), mon.report("total")
    mon.detach()
    assert isinstance(mon.capture, ModuleCapture) == (capture == "module hooks")
    if capture == "graph":  # compiled once: the graph pass makes the sites, not the first run
        assert graphs == [1] * STEPS, graphs
    else:  # the first call compiles around the one-off site creation; from then on nothing recompiles
        assert graphs[-1] >= 1 and graphs[1] == graphs[-1], graphs
    eager = tiny()
    with deadrelu.Monitor(eager, window=3, log_every=2) as ref:
        train(eager, ref)
        assert site_counts(window) == site_counts(ref.report())
        assert site_counts(total) == site_counts(ref.report("total"))
        assert (total.batches, total.samples) == (ref.report("total").batches, ref.report("total").samples)
        for a, b in zip(window.sites, ref.report().sites):
            assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-4)
    assert set(window.site("1").dead_units) >= set(range(5))
    assert mon.history.steps == ref.history.steps


@needs_inductor
@ONE_GRAPH
def test_every_k_compiles_one_graph(dynamo):
    model = tiny()
    mon = deadrelu.Monitor(torch.compile(model), every=2, window=2, log_every=4)
    assert mon.compiled and mon.model is model  # the compiled wrapper was recognised
    compiled = torch.compile(model)
    mon.attach()
    graphs = []
    train(compiled, mon, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
    mon.detach()
    assert graphs == [1] * STEPS, graphs  # the schedule is asked when the observe op runs, not guarded on
    assert mon.report("total").batches == STEPS // 2


def test_module_capture_refuses_a_model_without_activation_modules():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return F.relu(self.lin(x))

    with pytest.raises(deadrelu.DeadReluError, match="no activation modules"):
        ModuleCapture(Functional(), unit_dim=None, threshold=0.0, window=2)


def test_tensor_window_stats_equal_python_window_stats():
    g = torch.Generator().manual_seed(1)
    a, b = TensorWindowStats(5, 0.1, "cpu", window=3), WindowStats(5, 0.1, "cpu", window=3)
    for i in range(7):
        x = torch.randn(4, 5, 2, 2, generator=g)
        if i == 2:
            x[0, 3, 0, 0] = float("inf")
        a.update(x, 1)
        b.update(x, 1)
    for scope in ("window", "total"):
        ta, tb = a.totals(scope), b.totals(scope)
        assert torch.equal(ta.fired, tb.fired) and torch.equal(ta.bad_batches, tb.bad_batches)
        assert (ta.observations, ta.batches) == (tb.observations, tb.batches)
        assert torch.allclose(ta.abs_sum, tb.abs_sum, equal_nan=True)


@needs_inductor
def test_default_monitor_under_compile_warns_and_never_recompiles(dynamo):
    model = tiny()
    mon = deadrelu.Monitor(model, window=2, log_every=100)
    mon.attach()
    compiled = torch.compile(model)
    graphs = []
    with pytest.warns(CompiledModelWarning, match="compiled=True") as caught:
        train(compiled, mon, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
    assert len([w for w in caught if issubclass(w.category, CompiledModelWarning)]) == 1
    assert graphs[1] == graphs[-1], graphs
    assert not mon.capture.sites  # it ran unobserved rather than slowly
    x = batches()[0]
    model(x).sum().backward()  # the same monitor still observes eager calls
    assert mon.report().batches == 1
    mon.detach()


@needs_inductor
@ONE_GRAPH
@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_monitor_attached_before_the_whole_model_is_compiled_counts_samples(dynamo, fullgraph):
    # Its root hook runs only inside the compiled code: it leaves a samples op in the graph.
    model = tiny()
    mon = deadrelu.Monitor(model, every=2, window=2, log_every=4, compiled=True).attach()
    compiled = torch.compile(model, fullgraph=fullgraph)
    graphs = []
    try:
        train(compiled, mon, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
        with torch.no_grad():
            compiled(batches()[0])  # an evaluation pass counts no samples
        total, window = mon.report("total"), mon.report("window")
    finally:
        mon.detach()
    assert graphs == [graphs[0]] * STEPS  # no recompilation for the schedule
    assert total.batches == STEPS // 2 and total.samples == 6 * STEPS // 2
    assert window.samples == 6 * 2


@needs_inductor
@ONE_GRAPH
def test_a_monitor_given_the_compiled_model_counts_samples_without_recompiling(dynamo):
    model = tiny()
    compiled = torch.compile(model)
    mon = deadrelu.Monitor(compiled, every=2, window=2, log_every=4).attach()
    graphs = []
    try:
        train(compiled, mon, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
        total = mon.report("total")
    finally:
        mon.detach()
    assert graphs == [graphs[0]] * STEPS  # the wrapper's hook runs outside the compiled code
    assert total.batches == STEPS // 2 and total.samples == 6 * STEPS // 2  # batches of 6, every 2nd step


@needs_inductor
@pytest.mark.parametrize("given", ["attached, then compiled", "the compiled module"])
def test_observe_around_a_compiled_model_counts_each_pass_once(dynamo, given):
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    if given == "the compiled module":
        call = torch.compile(make())
        mon = deadrelu.Monitor(call, window=4).attach()
    else:
        model = make()
        mon = deadrelu.Monitor(model, window=4, compiled=True).attach()
        call = torch.compile(model)
    try:
        for rows in (3, 5, 4):
            x = torch.randn(rows, 4)
            with mon.observe((x,)):
                call(x).sum().backward()
                call(x[:2]).sum().backward()  # a second call in the same pass: no more samples
            mon.step()
        assert mon.report("total").samples == 12
    finally:
        mon.detach()
