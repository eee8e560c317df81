"""Mixture-of-experts layers keep one site per expert: experts stored as one stacked weight
(``gate_up_proj[e]``, transformers 5's Mixtral, Qwen-MoE, OLMoE, …) run as a loop over the
experts a batch hits, as one grouped matmul over token rows sorted by expert, or as a batched
matmul with each row's expert matrix gathered. Checked
against a brute-force per-expert computation, with units planted dead in single experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu

EXPERTS, HIDDEN, INNER = 6, 8, 12  # grouped_mm wants rows of a multiple of 16 bytes


class Experts(nn.Module):
    """Stacked experts, top-1 routing given by the caller; ``impl`` picks how they run."""

    def __init__(self, impl: str, functional: bool = False, act: str = "silu"):
        super().__init__()
        self.impl, self.functional = impl, functional
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * INNER, HIDDEN) / HIDDEN**0.5)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INNER) / INNER**0.5)
        self.act_fn = nn.SiLU() if act == "silu" else nn.ReLU()

    def activate(self, gate):
        if self.functional:
            return F.silu(gate) if isinstance(self.act_fn, nn.SiLU) else F.relu(gate)
        return self.act_fn(gate)

    def forward(self, x, route):
        out = torch.zeros_like(x)
        if self.impl == "loop":
            for e in route.unique():  # only the experts this batch hits, in expert order
                rows = (route == e).nonzero().squeeze(-1)
                gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                out[rows] = F.linear(self.activate(gate) * up, self.down_proj[e])
            return out
        if self.impl == "batched":  # one expert's matrix gathered per row (transformers' batched_mm)
            h = torch.bmm(self.gate_up_proj[route], x.unsqueeze(-1)).squeeze(-1)
            gate, up = h.chunk(2, dim=-1)
            return torch.bmm(self.down_proj[route], (self.activate(gate) * up).unsqueeze(-1)).squeeze(-1)
        order = route.argsort(stable=True)
        offs = torch.bincount(route, minlength=EXPERTS).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[order], self.gate_up_proj.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(self.activate(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)
        out[order] = y
        return out


class MoE(nn.Module):
    def __init__(self, impl: str, **options):
        super().__init__()
        self.embed = nn.Linear(4, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.experts = Experts(impl, **options)

    def forward(self, x):
        h = self.embed(x)
        return self.experts(h, self.router(h).argmax(-1))


def _model(impl: str, **options) -> MoE:
    torch.manual_seed(0)
    model = MoE(impl, **options)
    with torch.no_grad():
        # unit 2 of expert 0 and unit 5 of expert 3 are dead; the same units of other experts are not
        model.experts.gate_up_proj[0, 2] = 0.0
        model.experts.gate_up_proj[3, 5] = 0.0
        model.experts.gate_up_proj[0, 2, 0] = -1e-3  # a tiny negative weight on an input kept positive below
        model.experts.gate_up_proj[3, 5, 0] = -1e-3
    return model.eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (40, 7, 25):
        x = torch.randn(n, 4, generator=g)
        out.append(x)
    return out


def _truth(model: MoE, batches):
    """Per expert: (rows seen, fired count per unit), by running every expert on its own rows."""
    experts = model.experts
    truth: dict[int, list] = {}
    with torch.no_grad():
        for x in batches:
            h = model.embed(x)
            route = model.router(h).argmax(-1)
            for e in range(EXPERTS):
                rows = h[route == e]
                if rows.shape[0] == 0:
                    continue
                gate = F.linear(rows, experts.gate_up_proj[e])[:, :INNER]
                t = truth.setdefault(e, [0, torch.zeros(INNER, dtype=torch.long)])
                t[0] += rows.shape[0]
                t[1] += (experts.act_fn(gate) > 0).sum(0)
    return truth


class _PositiveFirst(nn.Module):
    """Makes hidden feature 0 positive, so a planted unit whose only weight is -1e-3 on it never fires."""

    def forward(self, h):
        return torch.cat([h[:, :1].abs() + 1.0, h[:, 1:]], dim=1)


def _instrumented(impl: str, **options) -> MoE:
    model = _model(impl, **options)
    model.embed = nn.Sequential(model.embed, _PositiveFirst())
    return model


def _expert_sites(report, path="experts.act_fn"):
    """{expert: site} from the names: ``experts.act_fn[3]`` counts expert 3."""
    return {int(s.name[len(path) + 1 : -1]): s for s in report.sites if s.name.startswith(path + "[")}


needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")


def _check(report, model, batches, path):
    truth = _truth(model, batches)
    sites = _expert_sites(report, path)
    assert list(sites) == list(range(EXPERTS))  # one site per expert, in expert order
    for e, site in sites.items():
        rows, fired = truth.get(e, (0, torch.zeros(INNER, dtype=torch.long)))
        assert site.observations == rows, e
        assert list(site.fired_counts) == fired.tolist(), e
        if not rows:  # an expert no token reached: unobserved, not dead
            assert site.unobserved == INNER and site.dead_units == ()
    return sites, truth


@pytest.mark.parametrize(
    "impl",
    ["loop", pytest.param("grouped", marks=needs_grouped_mm), "batched"],
    ids=["loop over hit experts", "grouped matmul", "batched matmul"],
)
@pytest.mark.parametrize("functional", [False, True], ids=["act_fn module", "functional"])
def test_each_expert_is_its_own_site(impl, functional):
    # The loop's sites were "the k-th expert this batch hit" (a batch that skipped an expert moved the
    # later ones onto other experts' sites, reporting dead units dead in no expert); the grouped
    # matmul made every expert one site (a unit dead in one expert read alive if another fired).
    model = _instrumented(impl, functional=functional)
    batches = _batches()
    report = deadrelu.scan(model, batches)
    path = "experts:silu" if functional else "experts.act_fn"
    sites, truth = _check(report, model, batches, path)
    assert 3 <= len(truth) < EXPERTS  # some experts get no token: their sites say so
    for e, site in sites.items():
        dead = {i for i, n in enumerate(truth[e][1].tolist()) if n == 0} if e in truth else set()
        assert set(site.dead_units) == dead
    assert {0, 3} <= set(truth) and 2 in sites[0].dead_units and 5 in sites[3].dead_units
    assert 2 not in sites[2].dead_units and 5 not in sites[2].dead_units  # the same units of another expert live


@pytest.mark.parametrize("impl", ["loop", pytest.param("grouped", marks=needs_grouped_mm), "batched"])
def test_the_loop_and_the_grouped_matmul_give_the_same_sites_and_the_monitor_agrees(impl):
    batches = _batches()
    model = _instrumented(impl)
    scanned = deadrelu.scan(model, batches)
    with deadrelu.Monitor(model, window=8) as mon:
        for x in batches:
            model(x)
            mon.step()
    monitored = mon.report("total")
    assert [(s.name, s.observations, s.fired_counts) for s in monitored.sites] == [
        (s.name, s.observations, s.fired_counts) for s in scanned.sites
    ]
    loop = deadrelu.scan(_instrumented("loop"), batches)  # the same experts run the other way
    assert {s.name: s.fired_counts for s in loop.sites} == {s.name: s.fired_counts for s in scanned.sites}


@needs_grouped_mm
def test_grouped_relu_experts_are_counted_per_expert_by_the_usual_route():
    # A plain ReLU may be counted by a fused kernel over the whole tensor: not for an experts layer's rows.
    batches = _batches()
    loop, grouped = _instrumented("loop", act="relu"), _instrumented("grouped", act="relu")
    a, b = deadrelu.scan(loop, batches), deadrelu.scan(grouped, batches)
    assert [(s.name, s.observations, s.fired_counts) for s in a.sites] == [
        (s.name, s.observations, s.fired_counts) for s in b.sites
    ]
    assert len(_expert_sites(b)) >= 3


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_transformers_mixtral_experts_are_counted_per_expert(impl):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=60,
        intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
    )  # fmt: skip
    config._experts_implementation = impl
    torch.manual_seed(0)
    try:
        model = transformers.MixtralModel(config).eval()
    except (ValueError, ImportError) as err:  # an older transformers without this implementation
        pytest.skip(str(err))
    experts = model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 60, (2, n), generator=g)} for n in (6, 2, 5)]
    truth: dict[int, list] = {}

    def brute_force(module, args, out):  # every expert on the tokens routed to it
        hidden, index = args[0], args[1]
        for e in range(experts.num_experts):
            tokens = (index == e).any(-1)
            if tokens.any():
                gate = F.linear(hidden[tokens], experts.gate_up_proj[e]).chunk(2, dim=-1)[0]
                t = truth.setdefault(e, [0, torch.zeros(gate.shape[-1], dtype=torch.long)])
                t[0] += gate.shape[0]
                t[1] += (experts.act_fn(gate) > 0).sum(0)

    handle = experts.register_forward_hook(brute_force)
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    sites = _expert_sites(deadrelu.scan(model, batches), "layers.0.mlp.experts.act_fn")
    assert list(sites) == list(range(experts.num_experts))
    assert {e: (s.observations, list(s.fired_counts)) for e, s in sites.items() if e in truth} == {
        e: (n, fired.tolist()) for e, (n, fired) in truth.items()
    }
    assert all(s.observations == 0 for e, s in sites.items() if e not in truth)
