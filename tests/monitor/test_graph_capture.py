"""The compiled monitor reads its sites from the graph: the same sites and counts as eager mode,
functional calls and every call of a reused module included, with one graph for any schedule."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.monitor.graph_capture import GraphCapture, graph_capture_available
from deadrelu.monitor.monitor import DeadUnitWarning
from fixtures.toolchain import compiles_transformers, keeps_lone_effectful_ops, needs_inductor

pytestmark = pytest.mark.skipif(not graph_capture_available(), reason="needs torch.library.custom_op and effectful ops")


class NewGELUActivation(nn.Module):
    """transformers' hand-written GELU (recognised by class name): one site, not its inner tanh."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 16)
        self.relu, self.act = nn.ReLU(), NewGELUActivation()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        h = self.relu(self.l1(x))  # one module, called twice per block call
        h = self.relu(self.l2(h)) * F.softplus(self.scale)  # softplus of a parameter: not a site
        h = F.silu(h) + self.act(h)
        return F.relu(h.transpose(0, 1)).transpose(0, 1)  # units stay on the Linear's features


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.conv, self.head = Block(), nn.Conv2d(3, 4, 3), nn.Linear(16, 1)

    def forward(self, x, y):
        z = F.relu(self.conv(y)).mean((2, 3)).sum()  # channels of a convolution
        return self.head(self.block(x)).sum() + z + self.head(self.block(x)).sum()  # the block twice


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.block.l1.bias[:5] = -100.0  # five planted dead units
        net.conv.bias[1] = -100.0
    return net


def batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 8, generator=g), torch.randn(2, 3, 6, 6, generator=g)) for _ in range(n)]


def train(runner, mon, data, after_step=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        for i, batch in enumerate(data):
            runner(*batch).backward()  # no optimizer: the same weights in every run
            mon.step()
            if after_step:
                after_step(i)


def summary(report: deadrelu.Report) -> list[tuple]:
    return [(s.name, s.function, s.units, s.observations, s.unit_axis_source, s.dead_units) for s in report.sites]


def total_report(make, batches, step, compiled: bool, *, window: int, compile_options=None, **options) -> deadrelu.Report:
    """Train a fresh ``make()`` on ``batches`` under a monitor, eager or compiled (attached first);
    ``step(runner, batch)`` runs one forward and backward. Returns the since-start report."""
    model = make()
    mon = deadrelu.Monitor(model, window=window, log_every=100, compiled=compiled, **options).attach()
    runner = torch.compile(model, **(compile_options or {})) if compiled else model
    try:
        for batch in batches:
            step(runner, batch)
            mon.step()
        return mon.report("total")
    finally:
        mon.detach()


def eager_and_compiled(make, batches, step, **kwargs) -> tuple[deadrelu.Report, deadrelu.Report]:
    """:func:`total_report` of the eager monitor, then of the compiled one, on the same model and data."""
    return total_report(make, batches, step, False, **kwargs), total_report(make, batches, step, True, **kwargs)


@needs_inductor
def test_same_sites_and_counts_as_eager_with_one_graph(dynamo):
    data = batches()
    eager = make_net()
    with deadrelu.Monitor(eager, window=3, log_every=3) as ref:
        train(eager, ref, data)
        expected = {scope: ref.report(scope) for scope in ("window", "total")}
    net = make_net()
    mon = deadrelu.Monitor(net, window=3, log_every=3, compiled=True).attach()
    assert isinstance(mon.capture, GraphCapture)
    graphs = []
    train(torch.compile(net, fullgraph=True), mon, data, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
    mon.finish()
    got = {scope: mon.report(scope) for scope in ("window", "total")}
    mon.detach()
    assert graphs == [2] * len(data)  # compiled once, never again: the root hook's samples op, the forward
    for scope in ("window", "total"):
        assert summary(got[scope]) == summary(expected[scope])
        for a, b in zip(got[scope].sites, expected[scope].sites):
            assert a.fired_counts == b.fired_counts
            assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-5, abs=1e-7)
    names = [s.name for s in got["total"].sites]
    # every call of the reused ReLU and of the reused block is its own site; functional calls are sites
    assert names[:4] == ["<root>:relu", "block.relu#1", "block.relu#2", "block:silu#1"]
    assert len(names) == 11 and not any("softplus" in n for n in names)
    assert got["total"].site("block.relu#1").dead_units == (0, 1, 2, 3, 4)
    assert got["total"].site("<root>:relu").dead_units == (1,)
    assert got["total"].site("block.act#1").function == "gelu"
    assert mon.history.steps == ref.history.steps


@needs_inductor
def test_one_graph_for_any_schedule_and_only_training_forwards(dynamo):
    net = make_net()
    mon = deadrelu.Monitor(net, every=2, window=2, log_every=100, compiled=True).attach()
    compiled = torch.compile(net)
    train(compiled, mon, batches())
    with torch.no_grad():
        compiled(*batches(1)[0])  # an evaluation forward is not observed
    assert dynamo["stats"]["unique_graphs"] == 3  # the training graph, the root hook's samples op, the no-grad graph
    assert mon.report("total").batches == 3  # steps 0, 2 and 4 of six
    mon.detach()


@needs_inductor
def test_detach_stops_recording_and_restores_a_users_pass(dynamo):
    import torch._inductor.config as inductor_config

    calls = []
    users_pass = lambda graph: calls.append(len(graph.nodes))  # noqa: E731
    inductor_config.pre_grad_custom_pass = users_pass
    try:
        net = make_net()
        mon = deadrelu.Monitor(net, window=2, log_every=100, compiled=True).attach()
        other = deadrelu.Monitor(make_net(), window=2, compiled=True).attach()
        key = inductor_config.pre_grad_custom_pass.uuid()
        # torch <= 2.6 pickles the pass into the graph cache key: it pickles as its unique key
        assert pickle.loads(pickle.dumps(inductor_config.pre_grad_custom_pass)) == key
        other.detach()
        assert inductor_config.pre_grad_custom_pass.uuid() != key  # another set of monitors: no cache reuse
        compiled = torch.compile(net)
        train(compiled, mon, batches(2))
        assert calls, "the user's own pass still runs"
        mon.detach()
        assert inductor_config.pre_grad_custom_pass is users_pass
        counts = [s.stats.count for s in mon.capture.sites.values()]
        for batch in batches(2):  # the compiled graph still runs; nothing is recorded
            compiled(*batch).backward()
        assert [s.stats.count for s in mon.capture.sites.values()] == counts == [2] * len(counts)
        with pytest.raises(deadrelu.DeadReluError, match="detached"):  # and a detached monitor takes no step
            mon.step()
    finally:
        inductor_config.pre_grad_custom_pass = None


@needs_inductor
def test_graph_breaks_and_a_compiled_wrapper(dynamo):
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = F.gelu(self.l1(x))
            if h.sum() > -1e9:  # data-dependent branch: a graph break
                h = F.relu(self.l2(h))
            return h

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return F.relu(self.inner(x) - 1.0).sum()  # the wrapper's own relu is not the inner model's

    torch.manual_seed(1)
    outer = Outer()
    mon = deadrelu.Monitor(outer.inner, window=2, log_every=100, compiled=True).attach()
    compiled = torch.compile(outer)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    for x in xs:
        compiled(x).backward()
        mon.step()
    got = mon.report("total")
    mon.detach()
    ref_model = Outer()
    ref_model.load_state_dict(outer.state_dict())
    with deadrelu.Monitor(ref_model.inner, window=2, log_every=100) as ref:
        for x in xs:
            ref_model(x).backward()
            ref.step()
        expected = ref.report("total")
    assert summary(got) == summary(expected)
    assert [s.name for s in got.sites] == ["<root>:gelu", "<root>:relu"]


@needs_inductor
@pytest.mark.parametrize("hook", ["per unit", "scalar"])
def test_a_users_forward_hook_on_an_activation_module_is_not_its_output(dynamo, hook):
    # Dynamo traces the hook under the module's stack; the site is still the module's own output.
    def make() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
        with torch.no_grad():
            model[0].bias[1] = -100.0
        seen = []
        if hook == "per unit":
            model[1].register_forward_hook(lambda m, i, o: seen.append((o.detach() > 0).sum(0)))
        else:
            model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().sum()))
        return model

    g = torch.Generator().manual_seed(5)
    data = [torch.randn(8, 4, generator=g) for _ in range(3)]
    eager, compiled = eager_and_compiled(make, data, lambda m, x: m(x).sum().backward(), window=10)
    assert summary(compiled) == summary(eager)
    assert [s.fired_counts for s in compiled.sites] == [s.fired_counts for s in eager.sites]
    assert compiled.sites[0].observations == 24 and 1 in compiled.sites[0].dead_units


@needs_inductor
@pytest.mark.parametrize("widths", [(8, 8, 8), (8, 32, 16)], ids=["same widths", "other widths"])
def test_a_reused_module_split_by_graph_breaks_keeps_each_calls_site(dynamo, widths):
    # Each graph numbers its module calls from zero: after a break the
    # module's second call would be "call 0" again, merged with the first or, at another width,
    # failing to record.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ls = nn.ModuleList([nn.Linear(a, b) for a, b in zip((4, *widths), widths)])
            self.act = nn.ReLU()

        def forward(self, x):
            x = self.act(self.ls[0](x))
            torch._dynamo.graph_break()  # a print, an .item(): the rest is another frame's graph
            x = self.act(self.ls[1](x))
            torch._dynamo.graph_break()
            x = self.act(self.ls[2](x))
            return F.relu(x - 0.5).sum()

    def make() -> Net:
        torch.manual_seed(3)
        net = Net()
        with torch.no_grad():
            net.ls[1].bias[:3] = -100.0
        return net

    g = torch.Generator().manual_seed(4)
    data = [torch.randn(5, 4, generator=g) for _ in range(3)]
    eager, compiled = eager_and_compiled(make, data, lambda m, x: m(x).backward(), window=2)
    assert summary(compiled) == summary(eager)
    assert [s.name for s in compiled.sites] == ["act#1", "act#2", "act#3", "<root>:relu"]
    assert {0, 1, 2} <= set(compiled.sites[1].dead_units)


@needs_inductor
def test_a_reused_module_called_conditionally_keeps_each_calls_site(dynamo):
    # The graph compiled for small batches skips the first call: numbered by Dynamo's k, its
    # later calls would be "call 0" again, counted into the skipped call's site.
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, h):
            return F.relu(h) + self.act(h - 0.1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 6)
            self.act, self.block = nn.ReLU(), Scale()

        def forward(self, x):
            h = self.l1(x)
            if x.shape[0] > 4:
                h = self.block(self.act(h))
            return self.block(self.act(self.l2(h))).sum()

    def make() -> Net:
        torch.manual_seed(5)
        net = Net()
        with torch.no_grad():
            net.l1.bias[:2] = -100.0
        return net

    g = torch.Generator().manual_seed(6)
    data = [torch.randn(n, 4, generator=g) for n in (3, 8, 2, 8)]
    eager, compiled = eager_and_compiled(make, data, lambda m, x: m(x).backward(), window=4)
    assert summary(compiled) == summary(eager)
    assert [list(s.fired_counts) for s in compiled.sites] == [list(s.fired_counts) for s in eager.sites]
    by_name = {s.name: s for s in compiled.sites}
    assert by_name["act#2"].observations == 16 and set(by_name["act#2"].dead_units) == {0, 1}
    assert by_name["act#1"].observations == 21


@needs_inductor
@pytest.mark.parametrize("precision", ["bf16 autocast", "float64"])
def test_compiled_counts_equal_eager_in_other_precisions(dynamo, precision):
    dtype = torch.float64 if precision == "float64" else torch.float32

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 1)).to(dtype)
        with torch.no_grad():
            model[0].bias[:4] = -50.0
        return model

    def step(runner, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            runner(x).float().sum().backward()

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, generator=g, dtype=dtype) for _ in range(4)]
    eager, compiled_report = eager_and_compiled(make, xs, step, window=4)
    assert summary(compiled_report) == summary(eager)
    assert [s.fired_counts for s in compiled_report.sites] == [s.fired_counts for s in eager.sites]
    assert eager.site("1").dead_units == (0, 1, 2, 3)
    for a, b in zip(compiled_report.sites, eager.sites):
        assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-3, abs=1e-6)


@needs_inductor
def test_relus_spelled_as_clamp_or_threshold_are_the_eager_sites(dynamo):
    class Spelled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
            self.t = nn.Threshold(0.0, 0.0)

        def forward(self, x):
            steps = torch.arange(x.shape[-1]).clamp(min=0).sum()  # integers: no site
            h = self.a(x).clamp(min=0)
            h = F.threshold(self.b(h), 0.0, 0.0)
            h = torch.clamp(self.t(self.c(h)), 0, 6) + x.clamp(min=1e-8).mean()  # relu6; a floor: no site
            return self.d(h) + steps * 0

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = Spelled()
        with torch.no_grad():
            model.a.bias[:3] = -100.0
            model.c.bias[5] = -100.0
        return model

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 6, generator=g) for _ in range(3)]
    eager, compiled_report = eager_and_compiled(make, xs, lambda runner, x: runner(x).sum().backward(), window=3)
    assert summary(compiled_report) == summary(eager)
    assert [s.fired_counts for s in compiled_report.sites] == [s.fired_counts for s in eager.sites]
    assert [(s.name, s.function) for s in eager.sites] == [
        ("<root>:relu.1", "relu"), ("<root>:relu.2", "relu"), ("t", "relu"), ("<root>:relu6", "relu6")
    ]  # fmt: skip
    assert eager.site("<root>:relu.1").dead_units == (0, 1, 2) and 5 in eager.site("t").dead_units


@needs_inductor
def test_in_place_activations_and_dynamic_batch_sizes(dynamo):
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.relu, self.l2 = nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8)
            with torch.no_grad():
                self.l2.bias[6] = -100.0

        def forward(self, x):
            h = self.l2(self.relu(self.l1(x)))
            torch.relu_(h)  # in place: counted on its true output
            return h.relu().sum()

    def make() -> nn.Module:
        torch.manual_seed(0)
        return InPlace()

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5 + i, 6, generator=g) for i in range(4)]  # a new batch size every step: one symbolic graph
    eager, compiled = eager_and_compiled(
        make, xs, lambda runner, x: runner(x).backward(), window=4, compile_options={"dynamic": True}
    )
    assert summary(compiled) == summary(eager)
    assert [s.observations for s in compiled.sites] == [5 + 6 + 7 + 8] * 3
    assert compiled.site("<root>:relu.1").dead_units == (6,)
    assert dynamo["stats"]["unique_graphs"] == 2  # the forward and the root hook's samples op, both symbolic


def test_a_compiled_monitor_that_sees_no_graph_says_why(dynamo):
    from deadrelu.monitor.monitor import CompiledModelWarning

    net = make_net()
    mon = deadrelu.Monitor(net, window=2, log_every=2, compiled=True).attach()
    runner = torch.compile(net, backend="aot_eager")  # not Inductor: its graphs never reach the pass
    with pytest.warns(CompiledModelWarning, match="default \\(Inductor\\) backend"):
        train(runner, mon, batches(4))
    with pytest.raises(deadrelu.NoActivationSitesError, match="Inductor"):
        mon.report()
    mon.detach()


@needs_inductor
def test_a_copy_of_the_model_compiled_beside_it_is_not_observed(dynamo):
    import copy

    class Functional(nn.Module):  # every activation in the root's own forward: no module stack to go by
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return F.relu(F.relu(x @ self.w1) @ self.w2).sum()

    torch.manual_seed(0)
    watched = Functional()
    other = copy.deepcopy(watched)
    mon = deadrelu.Monitor(watched, window=4, log_every=100, compiled=True).attach()
    compiled_watched, compiled_other = torch.compile(watched), torch.compile(other)
    x = torch.randn(5, 4)
    for _ in range(3):
        compiled_other(x).backward()  # the same code, another model: not this monitor's
    compiled_watched(x).backward()
    mon.step()
    report = mon.report("total")
    mon.detach()
    assert [s.name for s in report.sites] == ["<root>:relu.1", "<root>:relu.2"]
    assert report.batches == 1 and [s.observations for s in report.sites] == [5, 5]


@needs_inductor
def test_a_parameter_free_lookalike_compiled_beside_the_model_is_not_observed(dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    helper = nn.Sequential(nn.ReLU())  # same class, same path "0", no parameters to tell it apart
    mon = deadrelu.Monitor(model, window=4, log_every=100, compiled=True).attach()
    compiled_model, compiled_helper = torch.compile(model), torch.compile(helper)
    x = torch.randn(3, 4, requires_grad=True)
    compiled_helper(x).sum().backward()
    compiled_model(x).sum().backward()
    mon.step()
    report = mon.report("total")
    mon.detach()
    assert [(s.name, s.observations) for s in report.sites] == [("0", 3), ("2", 3)]  # the helper added nothing


@needs_inductor
def test_threshold_and_unit_dim_options_apply_as_in_eager(dynamo):
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 6), nn.GELU())
            self.out = nn.Linear(6, 6)

        def forward(self, x):
            return torch.relu(self.out(self.block(x))).sum()  # a root-level call: its site is "<root>:relu"

    def make() -> nn.Module:
        torch.manual_seed(0)
        return Seq()

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    options = {"threshold": {"gelu": 0.5}, "unit_dim": {"<root>:relu": 0}}  # by function and by site name
    eager, compiled = eager_and_compiled(make, xs, lambda runner, x: runner(x).backward(), window=3, **options)
    assert summary(compiled) == summary(eager)
    assert [s.fire_threshold for s in compiled.sites] == [0.5, 0.0]
    assert compiled.site("<root>:relu").units == 5 and compiled.site("<root>:relu").unit_axis_source == "unit_dim override"


class MaskedEncoder(nn.Module):
    """Hugging Face-style ``model(input_ids=..., attention_mask=...)``; unit 3 fires only on the pad
    token, so it is dead over real tokens and alive when pads are counted."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.act, self.out = nn.Embedding(20, 8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.weight[3].zero_()
            self.fc.weight[3, 0], self.fc.bias[3] = 1.0, -5.0
            self.emb.weight[:, 0] = 0.0
            self.emb.weight[0, 0] = 10.0  # the pad token

    def forward(self, input_ids, attention_mask=None):
        h = self.act(self.fc(self.emb(input_ids)))
        h = F.relu(h.transpose(0, 1))  # (T, B, C): the mask applies transposed
        return (self.out(h).transpose(0, 1) * attention_mask[..., None]).sum()


def padded(n: int = 4, batch: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        t = 5 + i  # a different length each batch
        lengths = torch.randint(1, t + 1, (batch,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        ids = torch.randint(1, 20, (batch, t), generator=g)
        ids[~mask] = 0
        out.append({"input_ids": ids, "attention_mask": mask.long()})
    return out


@needs_inductor
@pytest.mark.parametrize("mask", [None, False], ids=["attention_mask", "mask=False"])
def test_attention_mask_is_applied_in_compiled_mode_as_in_eager(dynamo, mask):
    def by_keyword(runner, b):
        runner(**b).backward()

    def by_position(runner, b):
        runner(b["input_ids"], b["attention_mask"]).backward()

    eager, compiled = eager_and_compiled(MaskedEncoder, padded(), by_keyword, window=4, mask=mask)
    assert summary(compiled) == summary(eager)
    assert [s.fired_counts for s in compiled.sites] == [s.fired_counts for s in eager.sites]
    real = sum(int(b["attention_mask"].sum()) for b in padded())
    every = sum(b["input_ids"].numel() for b in padded())
    assert [s.observations for s in compiled.sites] == [real if mask is None else every] * 2
    assert (3 in compiled.site("act").dead_units) == (mask is None)  # alive only on the pads
    if mask is None:
        positional = total_report(MaskedEncoder, padded(), by_position, False, window=4, mask=mask)
        assert summary(positional) == summary(eager)  # a positional mask counts too


def test_compiled_mode_refuses_masks_it_cannot_read_in_the_graph():
    for mask in (torch.ones(2, 3, dtype=torch.bool), "keep", lambda batch: batch["keep"]):
        with pytest.raises(deadrelu.DeadReluError, match="attention_mask"):
            deadrelu.Monitor(make_net(), compiled=True, mask=mask)


@needs_inductor
def test_an_internal_failure_of_the_pass_never_breaks_compilation(dynamo, monkeypatch):
    from deadrelu.monitor.graph_capture import CompiledModelWarning

    def broken(self, graph):
        raise RuntimeError("unexpected graph")

    monkeypatch.setattr(GraphCapture, "_sites_in", broken)
    net = make_net()
    mon = deadrelu.Monitor(net, window=2, log_every=100, compiled=True).attach()
    with pytest.warns(CompiledModelWarning, match="could not observe a compiled graph of Net"):
        loss = torch.compile(net)(*batches(1)[0])
    loss.backward()  # the model still trains, unobserved
    assert not mon.capture.sites
    mon.detach()


@needs_inductor
@compiles_transformers
def test_a_real_gpt2_compiled_equals_eager_with_padding(dynamo):
    tf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):
        mask = torch.ones(3, 8, dtype=torch.long)
        mask[0, 5:], mask[2, 3:] = 0, 0
        data.append({"input_ids": torch.randint(1, 50, (3, 8), generator=g), "attention_mask": mask})

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        return tf.GPT2Model(cfg).train()

    def step(runner, batch):
        runner(**batch).last_hidden_state.sum().backward()

    eager, compiled = eager_and_compiled(make, data, step, window=3)
    assert summary(compiled) == summary(eager)
    assert [(s.name, s.function, s.observations) for s in compiled.sites] == [
        ("h.0.mlp.act", "gelu", 48), ("h.1.mlp.act", "gelu", 48)  # 16 real tokens of 24 per batch
    ]

    def make_blocks() -> nn.Module:  # torchtitan-style: each transformer block compiled on its own
        model = make()
        for i in range(len(model.h)):
            model.h[i] = torch.compile(model.h[i])
        return model

    model = make_blocks()
    with deadrelu.Monitor(model, window=3, log_every=100) as mon:  # compiled mode, chosen by itself
        for batch in data:
            step(model, batch)
            mon.step()
        assert type(mon.capture).__name__ == "BlockCapture"
        blocks = mon.report("total")
    assert summary(blocks) == summary(eager)  # the padding mask reached the blocks' graphs
    for a, b in zip(blocks.sites, eager.sites):
        assert a.fired_counts == b.fired_counts


class Bottleneck(nn.Module):
    """A ResNet bottleneck: one in-place ReLU module called three times, BatchNorm in train mode."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.down = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, 2, bias=False), nn.BatchNorm2d(4 * width))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.down(x))


@needs_inductor
def test_a_resnet_in_channels_last_under_bf16_autocast_equals_eager(dynamo):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 16, 16, generator=g).to(memory_format=torch.channels_last) for _ in range(3)]

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), Bottleneck(8, 4), nn.AdaptiveAvgPool2d(1))
        model = model.to(memory_format=torch.channels_last).train()
        with torch.no_grad():
            model[0].bias[:2] = -100.0  # two channels planted dead
        return model

    def step(runner, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = runner(x)
        out.float().sum().backward()

    eager, compiled = eager_and_compiled(make, xs, step, window=3)
    assert summary(compiled) == summary(eager)
    assert [s.name for s in compiled.sites] == ["1", "2.relu#1", "2.relu#2", "2.relu#3"]
    assert compiled.site("1").dead_units == (0, 1) and compiled.site("1").unit_axis_source == "producer:conv"


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out, self.act = nn.Linear(8, 12), nn.Linear(12, 8), nn.GELU()

    def forward(self, x):
        return x + self.act(self.out(F.relu(self.fc(x))))  # a functional call in the block's own forward


class Stack(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def make_stack() -> Stack:
    torch.manual_seed(0)
    net = Stack()
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            layer.fc.bias[: i + 1] = -100.0  # layer i: i + 1 planted dead units
    return net


def stack_data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(5, 8, generator=g) for _ in range(n)]


def eager_stack_total(data: list[torch.Tensor]) -> deadrelu.Report:
    """The eager monitor's since-start report of an uncompiled :func:`make_stack` on ``data``."""
    eager = make_stack()
    with deadrelu.Monitor(eager, window=2, log_every=100) as ref:
        for x in data:
            eager(x).backward()
            ref.step()
        return ref.report("total")


def stack_compiled_by_layer() -> Stack:
    net = make_stack()
    for i in range(len(net.layers)):
        net.layers[i] = torch.compile(net.layers[i])
    return net


def test_an_eager_activation_of_a_compiled_blocks_output_keeps_the_feature_axis(dynamo):
    # The producer inside the compiled block is not seen: the block's output takes its input's
    # axis (same shape, a residual block), not the rank rule (dim 1 of a 4-D tensor).
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            return x + F.relu(self.l(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.blocks = nn.Linear(4, 8), nn.ModuleList([Block(), Block()])

        def forward(self, x):
            h = self.emb(x)
            for block in self.blocks:
                h = block(h)
            return F.relu(h).sum()

    def make(compiled: bool) -> Net:
        torch.manual_seed(0)
        net = Net()
        if compiled:
            for i, block in enumerate(net.blocks):
                net.blocks[i] = torch.compile(block)
        return net

    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 3, 5, 4, generator=g) for _ in range(2)]
    reports = [total_report(lambda: make(c), data, lambda m, x: m(x).backward(), False, window=2) for c in (False, True)]
    assert summary(reports[1]) == summary(reports[0])
    assert reports[1].site("<root>:relu").unit_axis_source == "producer:Linear" and reports[1].site("<root>:relu").units == 8


@needs_inductor
def test_blocks_compiled_one_by_one_keep_their_own_sites(dynamo):
    """torchtitan-style ``layers[i] = torch.compile(layers[i])``: one graph serves every layer
    (Dynamo shares it between instances of the class); each layer's sums still go to its own sites,
    named and counted as in eager mode."""
    data = stack_data(4)
    expected = eager_stack_total(data)
    net = stack_compiled_by_layer()
    with deadrelu.Monitor(net, window=2, log_every=100) as mon:
        assert mon.compiled
        for x in data:
            net(x).backward()
            mon.step()
        got = mon.report("total")
    assert summary(got) == summary(expected)
    assert [s.name for s in got.sites][:2] == ["layers.0:relu", "layers.0.act"]
    assert [s.dead_units for s in got.sites if s.function == "relu"] == [(0,), (0, 1), (0, 1, 2)]
    for a, b in zip(got.sites, expected.sites):
        assert a.fired_counts == b.fired_counts
        assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-5, abs=1e-7)


@needs_inductor
def test_a_compiled_block_called_twice_beside_eager_code_equals_eager(dynamo):
    """``net.block = torch.compile(net.block)``, called twice in each forward, with eager code (a
    convolution's ``F.relu``) in the model's own forward: the block stays compiled (one graph, no
    recompiles), each of its calls has its own sites, the eager code is observed eagerly, and
    every site is named and counted as by the eager monitor on the uncompiled model."""
    data = batches()
    eager = make_net()
    with deadrelu.Monitor(eager, window=3, log_every=100) as ref:
        train(eager, ref, data)
        expected = ref.report("total").sites
    net = make_net()
    net.block = torch.compile(net.block)
    graphs = []
    with deadrelu.Monitor(net, window=3, log_every=100) as mon:
        assert mon.compiled
        train(net, mon, data, lambda i: graphs.append(dynamo["stats"]["unique_graphs"]))
        got = mon.report("total")
    assert graphs == [graphs[0]] * len(data) and graphs[0] >= 1  # compiled at the first step, never again
    assert [s.name for s in got.sites] == [s.name for s in expected]
    assert [s.name for s in got.sites][:4] == ["<root>:relu", "block.relu#1", "block.relu#2", "block:silu#1"]
    assert "block.relu#3" in [s.name for s in got.sites] and not got.uncaptured
    for a, b in zip(got.sites, expected):
        assert (a.observations, a.fired_counts, a.dead_units) == (b.observations, b.fired_counts, b.dead_units)
        assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-5, abs=1e-7)
    assert got.samples == ref.report("total").samples > 0


@needs_inductor
def test_a_model_compiled_whole_with_compiled_blocks_inside_keeps_its_graphs_sites(dynamo):
    """Blocks compiled one by one and then the whole model compiled after attach (Dynamo inlines the
    blocks into one graph): the graph's sites are its own, never re-routed as a block's."""
    data = stack_data(3)
    expected = eager_stack_total(data)
    net = stack_compiled_by_layer()
    mon = deadrelu.Monitor(net, window=2, log_every=100, compiled=True).attach()
    whole = torch.compile(net)
    try:
        for x in data:
            whole(x).backward()
            mon.step()
        got = mon.report("total")
    finally:
        mon.detach()
    assert summary(got) == summary(expected)
    assert [a.fired_counts for a in got.sites] == [b.fired_counts for b in expected.sites]


@needs_inductor
def test_a_graph_compiled_under_an_earlier_monitor_is_adopted_by_the_next(dynamo):
    """A second run in the same process (a notebook cell run again, a second ``trainer.fit``): a new
    model of the same class reuses the graph Dynamo compiled under the first monitor, whose site ids
    belong to that monitor. The new monitor adopts those sites by the graph's parameter and counts
    exactly, with no recompilation; the first monitor's numbers are untouched."""
    data = batches()
    eager = make_net()
    with deadrelu.Monitor(eager, window=3, log_every=100) as ref:
        train(eager, ref, data)
        expected = ref.report("total")
    reports, graphs = [], []
    for _ in range(2):
        net = make_net()
        mon = deadrelu.Monitor(net, window=3, log_every=100, compiled=True).attach()
        try:
            train(torch.compile(net), mon, data)
            reports.append(mon.report("total"))
        finally:
            mon.detach()
        graphs.append(dynamo["stats"]["unique_graphs"])
    # The second model ran the first one's graph; only the root hook's one-op graph, which hands
    # the samples to the new monitor, is new.
    assert graphs[1] == graphs[0] + 1
    for got in reports:
        assert summary(got) == summary(expected)
        assert [a.fired_counts for a in got.sites] == [b.fired_counts for b in expected.sites]


@needs_inductor
def test_two_monitored_instances_sharing_one_graph_each_count_their_own(dynamo):
    data = batches(4)
    nets = [make_net(), make_net()]
    with torch.no_grad():
        nets[1].block.l1.bias[5:8] = -100.0  # the second instance has three more dead units
    mons = [deadrelu.Monitor(n, window=2, log_every=100, compiled=True).attach() for n in nets]
    runners = [torch.compile(n) for n in nets]
    try:
        for x, y in data:
            for runner, mon in zip(runners, mons):
                runner(x, y).backward()
                mon.step()
        got = [m.report("total").site("block.relu#1").dead_units for m in mons]
    finally:
        for m in mons:
            m.detach()
    assert got == [(0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5, 6, 7)]


@needs_inductor
def test_the_calls_attention_mask_reaches_compiled_blocks(dynamo):
    """The model call's ``attention_mask`` is an input of the model, not of its compiled blocks'
    graphs; ``deadrelu::call_mask`` hands it in, so block sites skip padding exactly as eager ones."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.act = Layer(), nn.ReLU()

        def forward(self, x, attention_mask=None):
            return self.act(self.block(x)).sum()

    def run(model, **options):
        g = torch.Generator().manual_seed(1)
        with deadrelu.Monitor(model, window=2, log_every=100, **options) as mon:
            for _ in range(2):
                model(torch.randn(2, 5, 8, generator=g), attention_mask=mask).backward()
                mon.step()
            return mon.report("total")

    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    torch.manual_seed(0)
    plain = Masked()
    compiled = Masked()
    compiled.load_state_dict(plain.state_dict())
    compiled.block = torch.compile(compiled.block)
    expected, got = run(plain), run(compiled)
    assert [(s.name, s.observations) for s in got.sites] == [("block:relu", 16), ("block.act", 16), ("act", 16)]
    assert [(s.name, s.observations, s.fired_counts) for s in got.sites] == [
        (s.name, s.observations, s.fired_counts) for s in expected.sites
    ]
    unmasked = run(compiled, mask=False)  # the same graph, its mask now all True
    assert [s.observations for s in unmasked.sites] == [20, 20, 20]


@needs_inductor
def test_a_compiled_decoder_block_reads_the_decoder_mask(dynamo):
    """In an encoder-decoder call a compiled block inside ``decoder`` skips the decoder's padding
    (``decoder_attention_mask``), not the encoder's, as the eager capture's decoder sites do."""

    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = Layer(), Layer()

        def forward(self, x, y, attention_mask=None, decoder_attention_mask=None):
            return self.encoder(x).sum() + self.decoder(y).sum()

    def run(model, **call):
        g = torch.Generator().manual_seed(1)
        with deadrelu.Monitor(model, window=2, log_every=100) as mon:
            for _ in range(2):
                model(torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), **call).backward()
                mon.step()
            return mon.report("total")

    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # 8 real source tokens
    dmask = torch.zeros(2, 5, dtype=torch.bool)
    dmask[:, :3] = True  # 6 real target tokens, the same length as the source's
    torch.manual_seed(0)
    plain = EncoderDecoder()
    compiled = EncoderDecoder()
    compiled.load_state_dict(plain.state_dict())
    compiled.decoder = torch.compile(compiled.decoder)
    for call in ({"attention_mask": mask, "decoder_attention_mask": dmask}, {"decoder_attention_mask": dmask}):
        expected, got = run(plain, **call), run(compiled, **call)
        source = 16 if "attention_mask" in call else 20
        assert {s.name: s.observations for s in got.sites} == {
            "encoder:relu": source, "encoder.act": source, "decoder:relu": 12, "decoder.act": 12
        }
        assert [(s.name, s.observations, s.fired_counts) for s in got.sites] == [
            (s.name, s.observations, s.fired_counts) for s in expected.sites
        ]




@needs_inductor
def test_a_compiled_block_without_parameters_is_observed_eagerly(dynamo):
    """No parameter tells which parameter-free block ran a shared graph: such a block runs eagerly
    while observed, inside the eager half, and its sites equal the eager monitor's."""

    class Act(nn.Module):
        def forward(self, x):
            return F.gelu(F.relu(x) - 0.5)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.act, self.l2 = nn.Linear(4, 8), Act(), nn.Linear(8, 2)
            self.deep = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

        def forward(self, x):
            return self.l2(self.deep(self.act(self.l1(x)))).sum()

    def run(model):
        g = torch.Generator().manual_seed(0)
        with deadrelu.Monitor(model, window=2, log_every=100) as mon:
            for _ in range(3):
                model(torch.randn(6, 4, generator=g)).backward()
                mon.step()
            return mon.report("total")

    torch.manual_seed(0)
    plain, compiled = Model(), Model()
    compiled.load_state_dict(plain.state_dict())
    compiled.act, compiled.deep = torch.compile(compiled.act), torch.compile(compiled.deep)
    expected, got = run(plain), run(compiled)
    assert [s.name for s in got.sites] == ["act:relu", "act:gelu", "deep.1"]
    assert [(s.name, s.observations, s.fired_counts) for s in got.sites] == [
        (s.name, s.observations, s.fired_counts) for s in expected.sites
    ]


@needs_inductor
def test_a_reused_submodules_functional_call_across_a_graph_break_is_numbered_by_call(dynamo):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(6, 6)

        def forward(self, x):
            return F.relu(self.l(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = Block()

        def forward(self, x):
            h = self.shared(x)
            torch._dynamo.graph_break()
            return self.shared(h - 100.0).sum()  # its second call: every unit dead

    def make() -> Net:
        torch.manual_seed(0)
        return Net()

    data = [torch.randn(5, 6) for _ in range(2)]
    eager, compiled = eager_and_compiled(make, data, lambda m, x: m(x).backward(), window=4)
    assert summary(compiled) == summary(eager)
    assert [s.name for s in compiled.sites] == ["shared:relu#1", "shared:relu#2"]


class BreakThenActivate(nn.Module):
    """A graph break: the activations after it are in a graph of the root's own forward without
    any parameter input (nothing there says which instance runs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        h = self.lin(x)
        torch._dynamo.graph_break()
        return F.gelu(F.relu(h) - 0.5).sum()


@needs_inductor
def test_activations_after_a_graph_break_in_a_graph_without_parameters_are_observed(dynamo):
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(5, 4, generator=g) for _ in range(6)]

    def make():
        torch.manual_seed(0)
        return BreakThenActivate()

    def step(runner, x):
        runner(x).backward()

    expected, got = eager_and_compiled(make, data, step, window=2)
    assert [s.name for s in expected.sites] == ["<root>:relu", "<root>:gelu"]
    assert [(s.name, s.observations, s.fired_counts) for s in got.sites] == [
        (s.name, s.observations, s.fired_counts) for s in expected.sites
    ]


@needs_inductor
def test_a_copy_running_the_parameter_free_graph_after_a_break_is_not_observed(dynamo):
    import copy

    torch.manual_seed(0)
    watched = BreakThenActivate()
    other = copy.deepcopy(watched)
    mon = deadrelu.Monitor(watched, window=4, log_every=100, compiled=True).attach()
    compiled_watched, compiled_other = torch.compile(watched), torch.compile(other)
    x = torch.randn(5, 4)
    try:
        compiled_watched(x).backward()
        for _ in range(3):
            compiled_other(x).backward()  # the same graphs, another model: not this monitor's
        compiled_watched(x).backward()
        mon.step()
        report = mon.report("total")
    finally:
        mon.detach()
    assert [(s.name, s.observations) for s in report.sites] == [("<root>:relu", 10), ("<root>:gelu", 10)]


@needs_inductor
def test_one_activation_object_shared_by_two_blocks_is_two_sites_as_in_eager(dynamo):
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            act = nn.ReLU()  # one object, registered under a.1 and b.1: named once, a.1
            self.a, self.b = nn.Sequential(nn.Linear(4, 6), act), nn.Sequential(nn.Linear(6, 3), act)

        def forward(self, x):
            return self.b(self.a(x)).sum()

    def make():
        torch.manual_seed(0)
        model = Shared()
        with torch.no_grad():
            model.a[0].bias[:2] = -100.0  # two planted dead units in the first call only
        return model

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(5, 4, generator=g) for _ in range(4)]
    expected, got = eager_and_compiled(make, data, lambda runner, x: runner(x).backward(), window=2)
    assert [(s.name, s.units) for s in expected.sites] == [("a.1#1", 6), ("a.1#2", 3)]
    assert expected.sites[0].dead_units[:2] == (0, 1)
    assert [(s.name, s.observations, s.fired_counts) for s in got.sites] == [
        (s.name, s.observations, s.fired_counts) for s in expected.sites
    ]


@needs_inductor
def test_activations_after_a_graph_break_inside_a_blocks_forward_are_named_as_not_counted(dynamo):
    from deadrelu.monitor.monitor import CompiledModelWarning

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            h = self.act(self.lin(x))
            torch._dynamo.graph_break()  # the rest runs in a graph of Inner's code without parameters
            return F.relu(h - 0.1)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(Inner(), Inner())

        def forward(self, x):
            return self.blocks(x).sum()

    torch.manual_seed(0)
    model = Outer()
    mon = deadrelu.Monitor(model, window=2, log_every=100, compiled=True).attach()
    runner = torch.compile(model)
    try:
        with pytest.warns(CompiledModelWarning, match=r"activation call\(s\) in Inner.forward of blocks.0, blocks.1 come after a graph break"):
            for _ in range(2):
                runner(torch.randn(3, 4)).backward()
                mon.step()
        report = mon.report("total")
    finally:
        mon.detach()
    assert any(u.startswith("Inner.forward of blocks.0, blocks.1 (") for u in report.uncaptured)
    assert {s.name for s in report.sites} == {"blocks.0.act", "blocks.1.act"}  # the parts with parameters


@needs_inductor
def test_a_data_dependent_branch_compiled_both_ways_keeps_the_sites_after_it(dynamo):
    """Dynamo compiles each way out of the branch as its own frame, resuming at the same place:
    alternatives, so the activations after the branch are one site each, as in eager mode."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()
            with torch.no_grad():
                self.lin.weight.copy_(torch.eye(4))
                self.lin.bias.zero_()

        def forward(self, x):
            h = self.lin(x)
            if h.sum() > 0:  # a graph break; positive batches go one way, negative the other
                h = F.relu(h - 1)
            else:
                h = self.act(h + 0.5)
            return F.gelu(self.act(h - 0.2)).sum()

    g = torch.Generator().manual_seed(0)
    data = [torch.rand(5, 4, generator=g) * (1 if i % 2 else -1) for i in range(6)]
    expected, got = eager_and_compiled(Branchy, data, lambda runner, x: runner(x).backward(), window=2)
    assert sorted(s.name for s in expected.sites) == ["<root>:gelu", "<root>:relu", "act#1", "act#2"]
    assert [(s.name, s.observations, s.fired_counts) for s in got.sites] == [
        (s.name, s.observations, s.fired_counts) for s in expected.sites
    ]


@needs_inductor
@keeps_lone_effectful_ops
def test_a_module_called_twice_whose_forward_breaks_the_graph_is_said_to_pool_its_calls(dynamo):
    from deadrelu.monitor.monitor import CompiledModelWarning

    class Breaking(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            h = self.act(self.lin(x))
            torch._dynamo.graph_break()  # Dynamo compiles this forward as a frame of its own
            return h + 1

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = Breaking()

        def forward(self, x):
            return self.blk(self.blk(x)).sum()

    torch.manual_seed(0)
    model = Twice()
    mon = deadrelu.Monitor(model, window=2, log_every=1, compiled=True).attach()
    runner = torch.compile(model)
    try:
        with pytest.warns(CompiledModelWarning, match=r"compiled site 'blk.act' was recorded 2 times in 1 forward"):
            runner(torch.randn(3, 4)).backward()
            mon.step()
    finally:
        mon.detach()


@needs_inductor
def test_a_reused_module_compiled_in_one_graph_is_not_said_to_pool(dynamo):
    from deadrelu.monitor.monitor import CompiledModelWarning

    net = make_net()
    mon = deadrelu.Monitor(net, window=2, log_every=1, compiled=True).attach()
    runner = torch.compile(net)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompiledModelWarning)
            train(runner, mon, batches(3))
    finally:
        mon.detach()
    assert {"block.relu#1", "block.relu#4"} <= {s.name for s in mon.report("total").sites}


@needs_inductor
def test_activation_modules_that_run_eagerly_under_a_compiled_monitor_are_named(dynamo):
    """A graph break inside a loop makes Dynamo skip the whole frame: its activation modules run
    eagerly, which compiled mode does not count. The monitor says so (once) and lists them."""
    from deadrelu.monitor.monitor import CompiledModelWarning

    class Looping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
                if x.sum() > 1e9:  # a data-dependent branch inside a loop
                    x = x / 2
            return x.sum()

    torch.manual_seed(0)
    model = Looping()
    mon = deadrelu.Monitor(model, window=2, log_every=100, compiled=True).attach()
    runner = torch.compile(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CompiledModelWarning)
            for _ in range(2):
                runner(torch.randn(3, 4)).backward()
                mon.step()
        eager = [str(w.message) for w in caught if "ran eagerly" in str(w.message)]
        assert len(eager) == 1 and "'layers.0.1' (ReLU) ran eagerly" in eager[0]
        assert set(mon.capture.uncaptured) == {"layers.0.1", "layers.1.1", "layers.2.1"}
    finally:
        mon.detach()


@needs_inductor
def test_no_eager_run_is_reported_for_a_model_compiled_in_full(dynamo):
    from deadrelu.monitor.monitor import CompiledModelWarning

    net = make_net()
    mon = deadrelu.Monitor(net, window=2, log_every=1, compiled=True).attach()
    runner = torch.compile(net, fullgraph=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompiledModelWarning)
            train(runner, mon, batches(3))
        assert mon.capture.uncaptured == {}
    finally:
        mon.detach()


class FlatEncoder(MaskedEncoder):
    """Tokens flattened to (B·T, C) before the activation: the (B, T) mask lies over nothing."""

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).flatten(0, 1)
        h = self.act(self.fc(h))
        return (self.out(h).view(*input_ids.shape, 2) * attention_mask[..., None]).sum()


@needs_inductor
def test_an_attention_mask_that_fits_no_compiled_activation_is_said_once_as_in_eager(dynamo):
    def step(runner, b):
        runner(**b).backward()

    with pytest.warns(UserWarning, match=r"fits no activation of this forward pass") as eager_warnings:
        eager = total_report(FlatEncoder, padded(), step, False, window=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = total_report(FlatEncoder, padded(), step, True, window=4)
    said = [str(w.message) for w in caught if "fits no activation of a compiled graph" in str(w.message)]
    assert len(said) == 1 and "every position was counted" in said[0]
    every = sum(b["input_ids"].numel() for b in padded())
    assert [s.observations for s in compiled.sites] == [s.observations for s in eager.sites] == [every]
    assert len([w for w in eager_warnings if "fits no activation" in str(w.message)]) == 1


@needs_inductor
def test_an_attention_mask_that_fits_is_not_said_to_fit_nothing(dynamo):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total_report(MaskedEncoder, padded(), lambda runner, b: runner(**b).backward(), True, window=4)
    assert not [w for w in caught if "fits no activation" in str(w.message)]


def test_a_copy_of_a_model_under_a_compiled_monitor_carries_no_live_hook(dynamo):
    import copy

    net = make_net()
    mon = deadrelu.Monitor(net, window=2, log_every=100, compiled=True).attach()
    try:
        twin = copy.deepcopy(net)  # an EMA copy, say, made while the monitor is attached
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            twin(*batches(1)[0]).backward()  # runs eagerly: the copy's hooks are inert, nothing is said
        assert mon.capture.uncaptured == {}
        assert all(not m._forward_hooks for m in twin.modules())
    finally:
        mon.detach()


def _tiny_t5():
    """A one-layer T5 encoder-decoder, the same weights at each call."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    )
    torch.manual_seed(0)
    return transformers.T5Model(config)


def _t5_step(runner, batch):
    runner(**batch).last_hidden_state.sum().backward()


@needs_inductor
@compiles_transformers
def test_an_encoder_decoder_models_decoder_is_not_masked_by_the_encoders_mask(dynamo):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    data = [
        {"input_ids": torch.randint(1, 50, (2, 4), generator=g) * mask, "attention_mask": mask,
         "decoder_input_ids": torch.randint(1, 50, (2, 4), generator=g)}  # the same length as the encoder's
        for _ in range(2)
    ]  # fmt: skip

    eager, compiled = eager_and_compiled(_tiny_t5, data, _t5_step, window=4)
    assert [(s.name, s.observations) for s in compiled.sites] == [(s.name, s.observations) for s in eager.sites]
    assert {s.name.split(".")[0]: s.observations for s in eager.sites} == {"encoder": 12, "decoder": 16}


@needs_inductor
@compiles_transformers
def test_a_decoder_attention_mask_alone_masks_the_compiled_decoder(dynamo):
    # With no encoder attention_mask in the call, the decoder's mask was ignored (eager and compiled).
    g = torch.Generator().manual_seed(0)
    dmask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    data = [{"input_ids": torch.randint(1, 50, (2, 6), generator=g), "decoder_input_ids": torch.randint(1, 50, (2, 4), generator=g),
             "decoder_attention_mask": dmask} for _ in range(2)]  # fmt: skip

    eager, compiled = eager_and_compiled(_tiny_t5, data, _t5_step, window=4)
    assert [(s.name, s.observations) for s in compiled.sites] == [(s.name, s.observations) for s in eager.sites]
    assert {s.name.split(".")[0]: s.observations for s in eager.sites} == {"encoder": 24, "decoder": 8}


@needs_inductor
@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")
def test_a_compiled_grouped_experts_site_says_it_pools_the_experts(dynamo):
    # The eager capture splits a grouped matmul's rows into one site per expert; the compiled
    # monitor cannot yet and pooled them silently.
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.router = nn.Linear(4, 16), nn.Linear(16, 4)
            self.w = nn.Parameter(torch.randn(4, 16, 16) / 4)
            self.act = nn.SiLU()

        def forward(self, x):
            h = self.embed(x)
            route = self.router(h).argmax(-1)
            offs = torch.bincount(route, minlength=4).cumsum(0).to(torch.int32)
            return self.act(torch._grouped_mm(h[route.argsort(stable=True)], self.w.transpose(-2, -1), offs=offs))

    from deadrelu.monitor.graph_capture import CompiledModelWarning

    torch.manual_seed(0)
    model = Grouped().to(torch.bfloat16)  # Inductor's grouped_mm takes bf16 only
    mon = deadrelu.Monitor(model, window=4, compiled=True).attach()
    try:
        with pytest.warns(CompiledModelWarning, match="grouped matmul over stacked experts.*compiled=False"):
            torch.compile(model)(torch.randn(32, 4, dtype=torch.bfloat16)).float().sum().backward()
            mon.step()
    finally:
        mon.detach()


class _DenseExperts(nn.Module):
    """Every token through every expert of one stacked weight, in a loop Dynamo unrolls."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.w = nn.Parameter(torch.randn(3, 8, 4))
        self.act = nn.ReLU()
        with torch.no_grad():
            self.w[1, 2] = -1.0  # unit 2 of expert 1 never fires on the positive inputs below
            self.w[1, 2, 0] = -1.0

    def forward(self, x):
        x = x.abs()
        outs = [F.linear(x, self.w[e]) for e in range(3)]
        return sum((F.relu(h) if self.functional else self.act(h)).sum() for h in outs)


@needs_inductor
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_a_static_experts_loop_has_the_eager_per_expert_sites_when_compiled(dynamo, functional):
    # The compiled monitor named them by call (act#1..#3) where eager names them by expert (act[e]).
    torch.manual_seed(0)
    data = [torch.randn(5, 4) for _ in range(2)]

    def make():
        torch.manual_seed(0)
        return _DenseExperts(functional)

    def step(runner, x):
        runner(x).backward()

    eager, compiled = eager_and_compiled(make, data, step, window=4)
    got = [(s.name, s.observations, s.fired_counts) for s in compiled.sites]
    assert got == [(s.name, s.observations, s.fired_counts) for s in eager.sites]
    names = [s.name for s in eager.sites]
    assert names == (["<root>:relu[0]", "<root>:relu[1]", "<root>:relu[2]"] if functional else ["act[0]", "act[1]", "act[2]"])
    assert 2 in compiled.sites[1].dead_units and 2 not in compiled.sites[0].dead_units


def _six_by_four() -> list[torch.Tensor]:
    """Three batches of 6 rows of 4 features."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=g) for _ in range(3)]


def _backward(runner, x):
    runner(x).sum().backward()


class _BreakingLayer(nn.Module):
    """A layer whose forward breaks the graph: the rest of it is a graph every layer's call runs."""

    def __init__(self, bias: float):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.bias[0] = bias  # unit 0: dead in one layer, alive in the other

    def forward(self, x):
        h = self.fc(x)
        torch._dynamo.graph_break()
        return x + self.out(self.act(h))


class _BreakingStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.layers = nn.ModuleList([_BreakingLayer(-100.0), _BreakingLayer(100.0)])

    def forward(self, x):
        x = self.embed(x)  # every layer's input requires grad: one graph for both (no recompilation)
        for layer in self.layers:  # a graph break inside a loop: this frame runs eagerly, each layer's compiled
            x = layer(x)
        return x


@needs_inductor
def test_layers_running_one_graph_after_a_graph_break_each_count_their_own_site(dynamo):
    # Each layer's call ran the same graph (the rest of its forward after the break), rewritten with
    # the sites of the layer Dynamo traced first: layers.0.act counted both layers' rows (36 in 3
    # batches of 6; its dead unit 0 read alive), and there was no layers.1.act.
    def make():
        torch.manual_seed(0)
        return _BreakingStack()

    data = _six_by_four()
    eager, compiled = eager_and_compiled(make, data, _backward, window=4)
    assert [(s.name, s.observations, s.fired_counts) for s in compiled.sites] == [
        (s.name, s.observations, s.fired_counts) for s in eager.sites
    ]
    assert [(s.name, s.observations) for s in compiled.sites] == [("layers.0.act", 18), ("layers.1.act", 18)]
    assert 0 in compiled.sites[0].dead_units and 0 not in compiled.sites[1].dead_units


class _FunctionalAfterBreak(nn.Module):
    """A block whose F.relu comes after a graph break: Dynamo compiles it in a resume function,
    outside every module call (no module on its nodes' stack)."""

    def __init__(self, bias: float):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4)
        with torch.no_grad():
            self.out.weight[1] = 0.0
            self.out.bias[1] = bias  # unit 1 of this block's F.relu: dead in one block, alive in the other

    def forward(self, x):
        h = self.act(self.fc(x))
        torch._dynamo.graph_break()
        return F.relu(self.out(h))


@needs_inductor
def test_a_functional_activation_after_a_graph_break_in_a_submodule_is_counted(dynamo):
    # The rest of the block's forward is one graph with the block's parameters but no module on
    # its nodes' stack: its F.relu was dropped without a word (eager: 0.act, 0:relu, 1.act,
    # 1:relu; compiled: 0.act, 1.act). The parameter the graph holds says which block runs it.
    def make():
        torch.manual_seed(0)
        return nn.Sequential(_FunctionalAfterBreak(-100.0), _FunctionalAfterBreak(100.0))

    data = _six_by_four()
    eager, compiled = eager_and_compiled(make, data, _backward, window=4)
    assert [(s.name, s.observations, s.fired_counts) for s in compiled.sites] == [
        (s.name, s.observations, s.fired_counts) for s in eager.sites
    ]
    model = make()
    with torch.no_grad():  # brute force: every block's F.relu output, by hand
        x = torch.cat(data)
        first = F.relu(model[0].out(torch.relu(model[0].fc(x))))
        second = F.relu(model[1].out(torch.relu(model[1].fc(first))))
    by_name = {s.name: s for s in compiled.sites}
    for name, act in (("0:relu", first), ("1:relu", second)):
        assert by_name[name].observations == 18
        assert list(by_name[name].fired_counts) == (act > 0).sum(0).tolist()
    assert 1 in by_name["0:relu"].dead_units and 1 not in by_name["1:relu"].dead_units


class _SqueezedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 10), nn.Linear(10, 1)

    def forward(self, x):
        return F.relu(self.head(F.relu(self.body(x))).squeeze(-1))  # (B,): the head's one unit


def test_a_squeezed_single_output_is_one_unit_as_in_eager_mode(dynamo):
    """The compiled monitor made each batch row of a (B,) activation a unit and raised at a short batch."""
    torch.manual_seed(0)
    model = _SqueezedHead()
    mon = deadrelu.Monitor(model, window=4, compiled=True).attach()
    compiled, fired = torch.compile(model), 0
    for size in (16, 16, 8):
        x = torch.randn(size, 6)
        compiled(x).sum().backward()
        with torch.no_grad():
            fired += int((model(x) > 0).sum())
        mon.step()
    head = mon.report("total").sites[-1]
    mon.detach()
    assert (head.units, head.observations, head.fired_counts) == (1, 40, (fired,))
