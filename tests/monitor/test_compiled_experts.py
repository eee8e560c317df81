"""A data-dependent experts loop under the compiled monitor: one site per expert, as in eager mode.

An MoE layer whose experts are one stacked weight runs, in eager code, a loop over the experts a
batch hits (``for e in route.unique(): act(x[rows] @ w[e].T)``, as transformers' eager MoE does).
Dynamo cannot compile such a loop (a graph break inside it), so the loop runs eagerly and calls the
compiled graph of its activation once per expert: the graph holds no ``w[e]``. The compiled
monitor pooled every expert's rows into one site (a unit dead in one expert read alive), or did not
count them at all. Checked against each expert's activations computed by hand, with units planted
dead in single experts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.monitor.graph_capture import CompiledModelWarning, graph_capture_available
from deadrelu.monitor.monitor import DeadUnitWarning
from fixtures.toolchain import compiles_transformers, needs_inductor

pytestmark = [
    pytest.mark.skipif(not graph_capture_available(), reason="needs torch.library.custom_op and effectful ops"),
    needs_inductor,
]

EXPERTS, HIDDEN, INNER, LAYERS = 4, 8, 6, 2


class SiLUActivation(nn.Module):
    """A hand-written activation class (transformers' name): its forward is a frame Dynamo compiles on its own."""

    def forward(self, x):
        return F.silu(x)


class NewGELUActivation(nn.Module):
    """transformers' hand-written GELU (recognised by class name): several ops, one site (its output)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Experts(nn.Module):
    """Stacked experts run by a loop over the experts a batch hits; ``how`` spells the activation."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * INNER, HIDDEN) / HIDDEN**0.5)
        classes = {"activation class": SiLUActivation, "hand-written activation class": NewGELUActivation}
        self.act_fn = classes.get(how, nn.SiLU)()

    def activate(self, gate):
        return F.silu(gate) if self.how == "functional in a method" else self.act_fn(gate)

    def expert(self, x, e):
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x, route):
        out = torch.zeros(x.shape[0], INNER)
        if self.how == "helper per expert":  # one compiled graph for every expert: e is its (symbolic) input
            for e in route.unique().tolist():
                rows = (route == e).nonzero().squeeze(-1)
                out[rows] = self.expert(x[rows], e).to(out.dtype)
            return out
        for e in route.unique():
            rows = (route == e).nonzero().squeeze(-1)
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = self.activate(gate) if self.how.endswith("in a method") else self.act_fn(gate)
            out[rows] = (h * up).to(out.dtype)
        return out


class Layer(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.experts = Experts(how)
        self.post, self.out = nn.GELU(), nn.Linear(INNER, HIDDEN)

    def forward(self, h):
        h = torch.cat([h[:, :1].abs() + 1.0, h[:, 1:]], dim=1)  # feature 0 > 0: planted units never fire
        # an ordinary site, of the experts' output: a graph input whose history names no expert
        return h + self.out(self.post(self.experts(h, self.router(h).argmax(-1))))


class MoE(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.embed = nn.Linear(4, HIDDEN)
        self.layers = nn.ModuleList([Layer(how) for _ in range(LAYERS)])

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return h.sum()


PLANTED = {(0, 2): 1, (1, 1): 1}  # (layer, expert) -> a unit dead there only; the same unit lives in another expert
HOWS = ["act module in a method", "functional in a method", "activation class", "hand-written activation class", "helper per expert"]  # fmt: skip


def _model(how: str) -> MoE:
    torch.manual_seed(0)
    model = MoE(how)
    with torch.no_grad():
        for (layer, e), unit in PLANTED.items():
            w = model.layers[layer].experts.gate_up_proj
            w[e, unit] = 0.0
            w[e, unit, 0] = -1e-3  # a tiny negative weight on the positive feature 0 only
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 4, generator=g) for n in (40, 7, 25)]


def _truth(model: MoE, batches: list[torch.Tensor]) -> dict[tuple[int, int], tuple[int, list[int]]]:
    """(layer, expert) -> (rows seen, fired count per unit): each expert's activation by hand,
    from the layer's input (caught by a pre-hook on an unmonitored run) and the expert's weight."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach()))
        for i, layer in enumerate(model.layers)
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    truth: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for i, layer in enumerate(model.layers):
        for h in inputs[i]:
            h = torch.cat([h[:, :1].abs() + 1.0, h[:, 1:]], dim=1)
            route = layer.router(h).argmax(-1)
            for e in range(EXPERTS):
                rows = h[route == e]
                if rows.shape[0]:
                    gate = F.linear(rows, layer.experts.gate_up_proj[e])[:, :INNER]  # SiLU and GELU fire where gate > 0
                    n, fired = truth.get((i, e), (0, [0] * INNER))
                    truth[(i, e)] = (n + rows.shape[0], [a + b for a, b in zip(fired, (F.silu(gate) > 0).sum(0).tolist())])
    return truth


def _report(how: str, compiled: bool, batches: list[torch.Tensor], model: MoE | None = None, between=None):
    """The since-start report of a monitor (compiled or eager) over one training step per batch,
    and the CompiledModelWarnings it gave."""
    torch._dynamo.reset()
    model = model or _model(how)
    mon = deadrelu.Monitor(model, window=8, log_every=100, compiled=compiled).attach()
    runner = torch.compile(model) if compiled else model
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", DeadUnitWarning)
            for x in batches:
                runner(x).backward()
                mon.step()
                if between is not None:
                    between()
            report = mon.report("total")
    finally:
        mon.detach()
        torch._dynamo.reset()
    return report, [str(w.message) for w in caught if issubclass(w.category, CompiledModelWarning)]


def _site_name(how: str, layer: int, e: int) -> str:
    path = f"layers.{layer}.experts"
    return f"{path}:silu[{e}]" if how == "functional in a method" else f"{path}.act_fn[{e}]"


def _assert_per_expert(report: deadrelu.Report, how: str, truth) -> None:
    sites = {s.name: s for s in report.sites}
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            site = sites[_site_name(how, layer, e)]  # every expert's site, a site no token reached included
            rows, fired = truth.get((layer, e), (0, [0] * INNER))
            assert (site.observations, list(site.fired_counts)) == (rows, fired), (layer, e)
    for (layer, e), unit in PLANTED.items():
        assert unit in sites[_site_name(how, layer, e)].dead_units
        others = [sites[_site_name(how, layer, o)] for o in range(EXPERTS) if o != e]
        assert any(s.observations and unit not in s.dead_units for s in others)  # the same unit of another expert lives


@pytest.mark.parametrize("how", HOWS)
def test_a_data_dependent_experts_loop_keeps_one_site_per_expert_when_compiled(dynamo, how):
    # The compiled monitor pooled each layer's experts into one site (72 observations of act_fn in
    # a 72-row run, a unit dead in one expert read alive), or counted nothing (a functional call or
    # an activation class's forward: a graph without parameters), or split a helper compiled for
    # every expert into act[0] and one pooled site for the others.
    batches = _batches()
    truth = _truth(_model(how), batches)
    assert len(truth) < LAYERS * EXPERTS  # an expert no token reaches
    compiled, said = _report(how, True, batches)
    _assert_per_expert(compiled, how, truth)
    eager, _ = _report(how, False, batches)
    assert [(s.name, s.observations, s.fired_counts) for s in compiled.sites] == [
        (s.name, s.observations, s.fired_counts) for s in eager.sites
    ]
    assert said == [] and compiled.uncaptured == ()


def test_experts_under_autocast_are_counted_per_expert_when_compiled(dynamo):
    # Autocast casts w[e] before the matmul: the expert is read through the cast.
    batches = _batches()
    how = "activation class"

    def step(runner, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runner(x).float().backward()

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model(how)
        mon = deadrelu.Monitor(model, window=8, log_every=100, compiled=compiled).attach()
        runner = torch.compile(model) if compiled else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeadUnitWarning)
            for x in batches:
                step(runner, x)
                mon.step()
        results.append(mon.report("total"))
        mon.detach()
    eager, compiled = results
    names = [[_site_name(how, layer, e) for e in range(EXPERTS)] + [f"layers.{layer}.post"] for layer in range(LAYERS)]
    assert [s.name for s in compiled.sites] == sum(names, [])
    assert [(s.name, s.observations, s.fired_counts) for s in compiled.sites] == [
        (s.name, s.observations, s.fired_counts) for s in eager.sites
    ]


def test_a_copy_running_the_same_expert_graphs_beside_it_is_not_counted(dynamo):
    # The activation's graph has no parameter: the expert's weight says which model runs it.
    how = "activation class"
    batches = _batches()
    model, twin = _model(how), _model(how)
    with torch.no_grad():
        twin.layers[0].experts.gate_up_proj.mul_(-1.0)  # the copy fires where the model does not
    truth = _truth(model, batches)
    run_twin = torch.compile(twin)
    report, said = _report(how, True, batches, model=model, between=lambda: run_twin(batches[0]).backward())
    _assert_per_expert(report, how, truth)
    assert said == []


@pytest.mark.parametrize("how", ["functional in a method", "activation class"])
def test_frozen_experts_in_a_graph_without_parameters_are_said_not_to_be_counted(dynamo, how):
    # Without gradients for the experts' weight nothing at run time says which expert (or model) ran
    # the graph: it is not counted, and the monitor says so (it was silent, or blamed a graph break).
    model = _model(how)
    for layer in model.layers:
        layer.experts.gate_up_proj.requires_grad_(False)
    report, said = _report(how, True, _batches(), model=model)
    assert [s.name for s in report.sites] == ["layers.0.post", "layers.1.post"]
    assert any("names no expert of a stacked weight" in m and "compiled=False" in m for m in said)
    assert any("layers.0.experts" in u for u in report.uncaptured)


def test_module_hooks_say_they_pool_an_experts_loops_activation(dynamo, monkeypatch):
    # What a torch without effectful custom ops gets (one site per module): it pooled the experts silently.
    monkeypatch.setattr("deadrelu.monitor.graph_capture.graph_capture_available", lambda: False)
    from deadrelu.monitor.compiled import ModuleCapture

    model = _model("act module in a method")  # module hooks see torch's activation classes only
    mon = deadrelu.Monitor(model, window=8, log_every=100, compiled=True).attach()
    assert isinstance(mon.capture, ModuleCapture)
    try:
        with pytest.warns(CompiledModelWarning, match=r"'layers.0.experts.act_fn' acts on one expert's rows.*compiled=False"):
            torch.compile(model)(_batches()[0]).backward()
    finally:
        mon.detach()


class _Ordinary(nn.Module):
    """An ordinary model with 3-D weights (a position embedding's, a Conv1d's), a transformer block,
    and (``graph_break``) an activation of a graph's input."""

    def __init__(self, graph_break: bool):
        super().__init__()
        self.graph_break = graph_break
        self.pos = nn.Parameter(torch.randn(1, 5, 4) / 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.fc, self.act = nn.Linear(4, 8), nn.GELU()
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.conv((x + self.pos).transpose(1, 2)).transpose(1, 2)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.head(self.block(self.fc(self.act(h)))).sum()


@pytest.mark.parametrize("graph_break", [False, True], ids=["one graph", "a graph break"])
def test_ordinary_compiled_models_are_not_taken_for_experts(dynamo, graph_break):
    # A guard, not a bug seen: no expert site, no expert warning, the same sites as eager.
    def make():
        torch.manual_seed(0)
        return _Ordinary(graph_break)

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 4, generator=g) for _ in range(3)]
    reports = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make()
        mon = deadrelu.Monitor(model, window=4, log_every=100, compiled=compiled).attach()
        runner = torch.compile(model) if compiled else model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x in batches:
                runner(x).backward()
                mon.step()
        reports.append(mon.report("total"))
        mon.detach()
        assert not [w for w in caught if issubclass(w.category, CompiledModelWarning)]
    eager, compiled = reports
    assert [(s.name, s.observations, s.fired_counts) for s in compiled.sites] == [
        (s.name, s.observations, s.fired_counts) for s in eager.sites
    ]
    assert [s.name for s in compiled.sites] == ["act", "block:relu"]


@compiles_transformers
def test_transformers_mixtral_eager_experts_are_counted_per_expert_when_compiled(dynamo):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=60,
        intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
    )  # fmt: skip
    config._experts_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 60, (2, n), generator=g)} for n in (6, 2, 5)]
    truth: dict[tuple[int, int], list] = {}

    def make():
        torch.manual_seed(0)
        try:
            return transformers.MixtralModel(config)
        except (ValueError, ImportError) as err:  # an older transformers without this implementation
            pytest.skip(str(err))

    def brute_force(layer):
        experts = model.layers[layer].mlp.experts

        def hook(module, args, out):  # every expert on the tokens routed to it
            hidden, index = args[0], args[1]
            for e in range(experts.num_experts):
                tokens = (index == e).any(-1)
                if tokens.any():
                    gate = F.linear(hidden[tokens], experts.gate_up_proj[e]).chunk(2, dim=-1)[0]
                    t = truth.setdefault((layer, e), [0, torch.zeros(gate.shape[-1], dtype=torch.long)])
                    t[0] += gate.shape[0]
                    t[1] += (experts.act_fn(gate) > 0).sum(0)

        return experts.register_forward_hook(hook)

    model = make()
    handles = [brute_force(i) for i in range(config.num_hidden_layers)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for handle in handles:
        handle.remove()

    reports = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make()
        mon = deadrelu.Monitor(model, window=8, log_every=100, compiled=compiled).attach()
        runner = torch.compile(model) if compiled else model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in batches:
                runner(**b).last_hidden_state.sum().backward()
                mon.step()
        reports.append(mon.report("total"))
        mon.detach()
    eager, compiled = reports
    assert not [w for w in caught if issubclass(w.category, CompiledModelWarning)]
    sites = {s.name: s for s in compiled.sites}
    for (layer, e), (rows, fired) in truth.items():
        site = sites[f"layers.{layer}.mlp.experts.act_fn[{e}]"]
        assert (site.observations, list(site.fired_counts)) == (rows, fired.tolist())
    assert [(s.name, s.observations, s.fired_counts) for s in compiled.sites] == [
        (s.name, s.observations, s.fired_counts) for s in eager.sites
    ]
