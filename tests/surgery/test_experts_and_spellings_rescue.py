"""Rescue on the sites the scan gained lately: one site per expert of a mixture-of-experts layer whose experts
are stacked in one weight (``experts.act_fn[e]``, ``experts:silu[e]``), ReLUs spelled ``clamp(min=0)``, and
hand-written activation modules such as transformers' ``XIELUActivation``. Each test failed before its fix.

1. Expert sites: ``prune_dead``, ``reinit_dead`` and ``nudge_bias`` refused with fx's own words ("Proxy object
   cannot be iterated"), naming no site; now one refusal names the expert site and why. ``swap_activations``
   reported a hand-written experts layer's ``F.relu`` (called from a helper method) as swapped while it stayed.
2. A ReLU spelling the scan does not count (a clamp of an integer input, of a parameter through ``.to()``) still
   took a slot in the traced graph: the next site's dead units were pruned, re-initialised or nudged in the
   layer before it, silently without ``data``.
3. A hand-written activation module was traced into, where the trace has no activation node of its kind:
   ``reinit_dead`` refused ("no matching activation"), ``prune_dead`` skipped units it can remove exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu import RefusedError, nudge_bias, prune_dead, reinit_dead, swap_activations
from fixtures.unchanged import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS, HIDDEN, INNER = 4, 8, 12  # grouped_mm wants rows of a multiple of 16 bytes
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")
OPERATIONS = {
    "prune": lambda net, rep, x: prune_dead(net, rep),
    "prune_data": lambda net, rep, x: prune_dead(net, rep, data=x),
    "reinit": lambda net, rep, x: reinit_dead(net, rep),
    "reinit_data": lambda net, rep, x: reinit_dead(net, rep, data=x),
    "nudge": lambda net, rep, x: nudge_bias(net, rep),
}


def outputs(net: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return net(**x).last_hidden_state if isinstance(x, dict) else net(x)


# -- 1: experts stacked in one weight ---------------------------------------------------------------------


class Experts(nn.Module):
    """Stacked experts (transformers 5's layout), top-1 routing; ``impl`` picks a loop or one grouped matmul."""

    def __init__(self, impl: str, functional: bool, act: str) -> None:
        super().__init__()
        self.impl, self.functional, self.act = impl, functional, act
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * INNER, HIDDEN) / HIDDEN**0.5)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INNER) / INNER**0.5)
        self.act_fn = nn.ReLU() if act == "relu" else nn.SiLU()

    def activate(self, gate):
        if not self.functional:
            return self.act_fn(gate)
        return F.relu(gate) if self.act == "relu" else F.silu(gate)

    def forward(self, x, route):
        out = torch.zeros_like(x)
        if self.impl == "loop":
            for e in route.unique():  # the experts this batch hits
                rows = (route == e).nonzero().squeeze(-1)
                gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                out[rows] = F.linear(self.activate(gate) * up, self.down_proj[e])
            return out
        order = route.argsort(stable=True)
        offs = torch.bincount(route, minlength=EXPERTS).cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x[order], self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        out[order] = torch._grouped_mm(self.activate(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)
        return out


class MoE(nn.Module):
    def __init__(self, impl: str, functional: bool = False, act: str = "relu") -> None:
        super().__init__()
        self.embed, self.router = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, EXPERTS)
        self.experts = Experts(impl, functional, act)

    def forward(self, x):
        h = self.embed(x)
        return self.experts(h, self.router(h).argmax(-1))


def moe(impl: str, functional: bool = False, act: str = "relu") -> MoE:
    torch.manual_seed(0)
    net = MoE(impl, functional, act).eval()
    with torch.no_grad():
        net.experts.gate_up_proj[1, 2] = 0.0  # unit 2 of expert 1: a zero row (dead, and constant 0)
        net.experts.gate_up_proj[3, 5] = 0.0
    return net


IMPLS = ["loop", pytest.param("grouped", marks=needs_grouped_mm)]


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("functional", [False, True], ids=["act_fn module", "functional"])
@pytest.mark.parametrize("impl", IMPLS)
def test_an_expert_site_is_refused_by_name_and_nothing_changes(impl, functional, op):
    net, x = moe(impl, functional), torch.randn(96, 4, generator=torch.Generator().manual_seed(1))
    report = deadrelu.scan(net, x)
    experts = [s for s in report.sites if s.dead_units]
    assert experts and all(s.name.endswith("]") for s in report.sites)
    before, out = snapshot(net, None), outputs(net, x)
    with pytest.raises(RefusedError, match=r"site 'experts[.:]\S+\[\d+\]': it counts expert \d+ .*stacked in one weight"):
        OPERATIONS[op](net, report, x)
    assert_unchanged(before, snapshot(net, None))
    assert torch.equal(outputs(net, x), out)


@pytest.mark.parametrize("impl", IMPLS)
def test_prune_skips_a_non_relu_expert_site_and_says_why(impl):
    net, x = moe(impl, act="silu"), torch.randn(96, 4, generator=torch.Generator().manual_seed(1))
    report = deadrelu.scan(net, x)
    dead = {s.name for s in report.sites if s.dead_units}
    assert dead  # a zero row's SiLU is 0: dead, and constant (prune removes such units of a Linear)
    with pytest.raises(RefusedError, match="stacked in one weight"):
        reinit_dead(net, report)
    result = prune_dead(net, report, data=x)
    assert result.removed == {} and set(result.skipped) == dead
    assert all("stacked in one weight" in why for why in result.skipped.values())
    torch.testing.assert_close(outputs(result.model, x), outputs(net, x), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_swap_refuses_a_relu_an_untraceable_forward_calls_through_a_helper(impl):
    net = moe(impl, functional=True)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=r"test_experts_and_spellings_rescue\.py:\d+ in experts \(Experts\.activate, "
                                           r"called from Experts\.forward\)"):  # fmt: skip
        swap_activations(net, to="leaky_relu")
    assert_unchanged(before, snapshot(net, None))


def _helper_relu(h):
    return F.relu(h)


class HelperCalls(nn.Module):
    """Untraceable (a branch on a value); its ReLU is in a module-level function ``forward`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 1e9:  # data-dependent: torch.fx cannot trace it
            h = h / 2
        return self.out(_helper_relu(h))


def test_swap_reads_the_functions_an_untraceable_forward_calls():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = HelperCalls()

        def forward(self, x):
            return self.inner(x)

    net = Outer()
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=r"functional relu call at .*:\d+ in inner \(_helper_relu, called from HelperCalls"):
        swap_activations(net, to="elu")
    assert_unchanged(before, snapshot(net, None))


@pytest.fixture(scope="module")
def mixtral_parts():
    transformers = pytest.importorskip("transformers")
    return transformers.MixtralConfig, transformers.MixtralModel


def mixtral(parts, implementation: str | None) -> nn.Module:
    config_class, model_class = parts
    config = config_class(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          vocab_size=60, intermediate_size=12, num_local_experts=4, num_experts_per_tok=1,
                          hidden_act="relu")  # fmt: skip
    if implementation is not None:
        config._experts_implementation = implementation
    torch.manual_seed(0)
    net = model_class(config).eval()
    with torch.no_grad():
        net.layers[0].mlp.experts.gate_up_proj[:, 3] = 0.0  # unit 3 of every expert: zero gate rows
    return net


IDS = torch.randint(0, 60, (4, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("implementation", [None, "eager"], ids=["default (grouped_mm)", "eager loop"])
def test_mixtral_expert_sites_are_refused_by_name(mixtral_parts, implementation, op):
    net, ids = mixtral(mixtral_parts, implementation), IDS
    report = deadrelu.scan(net, ids)
    assert any(s.name.startswith("layers.0.mlp.experts.act_fn[") and 3 in s.dead_units for s in report.sites)
    before, out = snapshot(net, None), outputs(net, {"input_ids": ids})
    with pytest.raises(RefusedError, match=r"site 'layers\.0\.mlp\.experts\.act_fn\[\d\]': it counts expert"):
        OPERATIONS[op](net, report, ids)
    assert_unchanged(before, snapshot(net, None))
    assert torch.equal(outputs(net, {"input_ids": ids}), out)


@pytest.mark.parametrize("implementation", [None, "eager"], ids=["default (grouped_mm)", "eager loop"])
def test_mixtral_experts_activation_module_is_swapped_for_every_expert(mixtral_parts, implementation):
    net = mixtral(mixtral_parts, implementation)
    result = swap_activations(net, to="leaky_relu", copy=True)
    assert [c.site for c in result.changes] == ["layers.0.mlp.experts.act_fn"]
    want = copy.deepcopy(net)
    want.layers[0].mlp.experts.act_fn = nn.LeakyReLU(0.01)
    torch.testing.assert_close(outputs(result.model, {"input_ids": IDS}), outputs(want, {"input_ids": IDS}), rtol=0, atol=0)
    sites = deadrelu.scan(result.model, IDS).sites
    assert len(sites) == 4 and {s.function for s in sites} == {"leaky_relu"}


# -- 2: a ReLU spelling the scan does not count -----------------------------------------------------------


class ClampedIds(nn.Module):
    """``ids.clamp(min=0)`` maps padding ids (-1) to 0: an integer clamp, no site (fx cannot see the dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.a, self.b, self.out = nn.Embedding(10, 6), nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, ids):
        h = F.relu(self.a(self.emb(ids.clamp(min=0))))
        return self.out(F.relu(self.b(h)))


class ClampedGain(nn.Module):
    """``self.gain.to(x.dtype)`` is the parameter itself, so its clamp is no site (fx sees a ``.to()`` node)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.gain = nn.Parameter(torch.ones(2))

    def forward(self, x):
        g = self.gain.to(x.dtype).clamp(min=0)
        return self.out(F.relu(self.b(F.relu(self.a(x))))) * g


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("cls", [ClampedIds, ClampedGain])
def test_a_clamp_that_is_no_site_does_not_shift_the_next_site_onto_another_layer(cls, op):
    torch.manual_seed(0)
    net = cls().eval()
    with torch.no_grad():
        net.b.bias[[2, 5]] = -100.0  # dead in the second site (layer b) only
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 10, (64, 3), generator=g) if cls is ClampedIds else torch.randn(64, 6, generator=g)
    report = deadrelu.scan(net, x)
    assert [s.name for s in report.sites] == ["<root>:relu.1", "<root>:relu.2"]
    assert not report.sites[0].dead_units and {2, 5} <= set(report.sites[1].dead_units)
    before, out = snapshot(net, None), outputs(net, x)
    # before: layer a's units 2 and 5 were pruned / re-drawn / nudged (the outputs changed by up to 0.2)
    with pytest.raises(RefusedError, match=r"site '<root>:relu\.2': the traced graph has 3 activation call\(s\) in the "
                                           r"forward of <root> \(\.clamp\(\), relu\(\), relu\(\)\) where the scan counted 2"):  # fmt: skip
        OPERATIONS[op](net, report, x)
    assert_unchanged(before, snapshot(net, None))
    assert torch.equal(outputs(net, x), out)


# -- 3: hand-written activation modules -------------------------------------------------------------------


def _activation(name: str) -> nn.Module:
    activations = pytest.importorskip("transformers.activations")
    if name == "xielu":
        return activations.XIELUActivation(dtype=torch.float32)
    return {"gelu_new": activations.NewGELUActivation, "relu2": activations.ReLUSquaredActivation}[name]()


class Between(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 10), act, nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("name, function", [("xielu", "xielu"), ("gelu_new", "gelu"), ("relu2", "relu_squared")])
def test_a_hand_written_activation_module_is_one_site_to_prune_and_reinit(name, function):
    torch.manual_seed(0)
    net = Between(_activation(name)).eval()
    with torch.no_grad():
        if function == "relu_squared":
            net.fc1.bias[[1, 4]] = -100.0  # relu² of a negative pre-activation is exactly 0
        else:
            net.fc1.weight[[1, 4]] = 0.0  # zero incoming weights: a constant unit, dead at bias 0
            net.fc1.bias[[1, 4]] = 0.0
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
    report = deadrelu.scan(net, x)
    assert [(s.name, s.function) for s in report.sites] == [("act", function)]
    dead = report.sites[0].dead_units
    assert set(dead) >= {4} and set(dead) <= {1, 4}
    held_out = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    before = outputs(net, held_out)

    result = prune_dead(net, report, data=x)
    assert result.removed == {"act": dead} and result.model.fc1.out_features == 10 - len(dead)
    torch.testing.assert_close(outputs(result.model, x), outputs(net, x), rtol=0, atol=1e-5)
    if function != "relu_squared":  # a constant unit is removed exactly, on any input
        torch.testing.assert_close(outputs(result.model, held_out), before, rtol=0, atol=1e-5)

    fresh = copy.deepcopy(net)
    changed = reinit_dead(fresh, report, data=x, generator=torch.Generator().manual_seed(0))
    assert changed.units == len(dead)
    torch.testing.assert_close(outputs(fresh, x), outputs(net, x), rtol=0, atol=1e-5)
    assert all(fresh.fc1.weight[u].ne(0).any() for u in dead)  # the rows were drawn again
    rows = [u for u in range(10) if u not in dead]
    assert torch.equal(fresh.fc1.weight[rows], net.fc1.weight[rows])

    nudged = copy.deepcopy(net)
    (change,) = nudge_bias(nudged, report)
    assert change.parameter == "fc1.bias" and change.units == dead
    assert torch.equal(nudged.fc1.bias[rows], net.fc1.bias[rows])
