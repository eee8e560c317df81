"""prune_dead and reinit_dead on gated MLPs: ``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2).

A dead unit j of the gated activation outputs 0, so its product with ``up``'s output is 0 (when that
is finite) and ``down`` never sees it: pruning removes row j of ``gate`` and ``up`` and column j of
``down``; re-initialising re-draws rows j of ``gate`` and ``up`` and zeroes column j of ``down``.
Before, the ``mul`` was "not a supported consumer" and both were refused.

Dead units are planted: a zero ``gate`` row with bias -1, or, for a bias-free ``gate``, a row of
negative weights on non-negative inputs. The truth is brute force: the dead set is where
``act(gate(x)) > 0`` never holds on the data, and outputs are compared with a deep copy of the
original. A refusal leaves parameters, buffers, hooks, training flags and optimizer state bit-identical.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import RefusedError
from fixtures.models import same_state
from fixtures.unchanged import assert_unchanged, snapshot, trained_optimizer

DEAD = [1, 4, 6]
PRODUCTS = {"operator": operator.mul, "torch.mul": torch.mul, "method": lambda a, b: a.mul(b)}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``up_first`` writes the product as ``up(x) * act(gate(x))``."""

    def __init__(self, bias: bool = True, down_bias: bool = False, up_first: bool = False, product: str = "operator"):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 12, bias=bias), nn.Linear(8, 12, bias=bias)
        self.down, self.act = nn.Linear(12, 5, bias=down_bias), nn.ReLU()
        self.up_first, self.product = up_first, PRODUCTS[product]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, u = self.act(self.gate(x)), self.up(x)
        return self.down(self.product(u, h) if self.up_first else self.product(h, u))


def plant_dead(gate: nn.Linear, units: list[int]) -> None:
    """Dead for every input with a bias (zero row, bias -1); without one, dead on non-negative inputs."""
    with torch.no_grad():
        if gate.bias is not None:
            gate.weight[units] = 0
            gate.bias[units] = -1.0
        else:
            gate.weight[units] = -gate.weight[units].abs() - 0.01


def inputs(shape: str, features: int, seed: int = 1) -> torch.Tensor:
    """Non-negative inputs, (B, C) or (B, T, C)."""
    g = torch.Generator().manual_seed(seed)
    size = (64, features) if shape == "BC" else (16, 5, features)
    return torch.randn(size, generator=g).abs()


def brute_force_dead(model: nn.Module, gate: nn.Linear, act: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        fired = (act(gate(x)) > 0).reshape(-1, gate.out_features).any(dim=0)
    return tuple(int(u) for u in (~fired).nonzero().flatten())


def hf_mlp(kind: str) -> nn.Module:
    if kind == "llama":
        mod = pytest.importorskip("transformers.models.llama.modeling_llama")
        cls, config = mod.LlamaMLP, mod.LlamaConfig
    elif kind == "mistral":
        mod = pytest.importorskip("transformers.models.mistral.modeling_mistral")
        cls, config = mod.MistralMLP, mod.MistralConfig
    else:
        mod = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
        cls, config = mod.Qwen2MLP, mod.Qwen2Config
    cfg = config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        hidden_act="relu",
    )  # fmt: skip
    return cls(cfg)


def build(form: str) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear, nn.Module, int]:
    """A model with planted dead units, and its gate, up, down, activation and input width."""
    torch.manual_seed(0)
    if form.startswith("hf-"):
        m = hf_mlp(form[3:]).eval()
        parts = m.gate_proj, m.up_proj, m.down_proj, m.act_fn, 32
    else:
        options = {
            "bias": {}, "bias-free": {"bias": False}, "down-bias": {"down_bias": True}, "up-first": {"up_first": True},
            "torch.mul": {"product": "torch.mul"}, "method": {"product": "method"},
        }  # fmt: skip
        m = GatedMLP(**options[form]).eval()
        parts = m.gate, m.up, m.down, m.act, 8
    plant_dead(parts[0], DEAD)
    return (m, *parts)


FORMS = ["bias", "bias-free", "down-bias", "up-first", "torch.mul", "method", "hf-llama", "hf-mistral", "hf-qwen2"]


@pytest.mark.parametrize("shape", ["BC", "BTC"])
@pytest.mark.parametrize("form", FORMS)
def test_prune_removes_the_gate_and_up_rows_and_the_down_columns(form, shape):
    model, gate, up, down, act, width = build(form)
    x = inputs(shape, width)
    dead = brute_force_dead(model, gate, act, x)
    assert set(DEAD) <= set(dead)
    original = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = deadrelu.scan(model, x)
    assert report.sites[0].dead_units == dead
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.removed == {report.sites[0].name: dead}
    keep = [j for j in range(gate.out_features) if j not in dead]
    names = {id(gate): None, id(up): None, id(down): None}
    small = dict(result.model.named_modules())
    for path, layer in model.named_modules():
        if id(layer) in names:
            names[id(layer)] = small[path]
    new_gate, new_up, new_down = names[id(gate)], names[id(up)], names[id(down)]
    assert torch.equal(new_gate.weight, gate.weight[keep]) and torch.equal(new_up.weight, up.weight[keep])
    assert torch.equal(new_down.weight, down.weight[:, keep])
    for new, old in ((new_gate, gate), (new_up, up)):
        assert (new.bias is None) == (old.bias is None)
        assert new.bias is None or torch.equal(new.bias, old.bias[keep])
    assert (new_down.bias is None) == (down.bias is None)
    with torch.no_grad():
        assert torch.allclose(result.model(x), original(x), atol=1e-6)
        assert result.max_abs_diff <= 1e-6
    assert same_state(model.state_dict(), before)
    assert result.params_before - result.params_after == len(dead) * (2 * width + down.out_features) + (
        2 * len(dead) if gate.bias is not None else 0
    )


@pytest.mark.parametrize("form", ["bias", "up-first", "hf-llama"])
def test_prune_without_data_removes_the_same_units(form):
    model, gate, _, _, act, width = build(form)
    x = inputs("BTC", width)
    report = deadrelu.scan(model, x)
    result = deadrelu.prune_dead(model, report)
    assert result.removed == {report.sites[0].name: brute_force_dead(model, gate, act, x)}
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-6)


@pytest.mark.parametrize("with_data", [True, False], ids=["data", "no-data"])
@pytest.mark.parametrize("shape", ["BC", "BTC"])
@pytest.mark.parametrize("form", FORMS)
def test_reinit_redraws_gate_and_up_rows_and_zeroes_down_columns_keeping_outputs(form, shape, with_data):
    model, gate, up, down, act, width = build(form)
    x = inputs(shape, width)
    opt = trained_optimizer(model, x)
    report = deadrelu.scan(model, x)
    dead = list(report.sites[0].dead_units)
    assert tuple(dead) == brute_force_dead(model, gate, act, x)
    reference = copy.deepcopy(model)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    result = deadrelu.reinit_dead(
        model, report, opt, data=x if with_data else None, generator=torch.Generator().manual_seed(0)
    )
    (change,) = result.changes
    paths = {id(m): p for p, m in model.named_modules()}
    assert change.units == tuple(dead) and change.producer == paths[id(gate)]
    assert change.multipliers == (paths[id(up)],) and change.consumers == (paths[id(down)],)
    assert f"rows of {paths[id(gate)]} + {paths[id(up)]} re-drawn" in str(result)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    for layer in (gate, up):
        name = paths[id(layer)]
        assert not torch.equal(layer.weight[dead], old[f"{name}.weight"][dead])
        keep = [j for j in range(layer.out_features) if j not in dead]
        assert torch.equal(layer.weight[keep], old[f"{name}.weight"][keep])
        if layer.bias is not None:
            assert torch.equal(layer.bias[dead], torch.zeros(len(dead)))
        for p, rows in ((layer.weight, dead), (layer.bias, dead)):
            if p is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key][rows], torch.zeros_like(p[rows]))
                assert torch.equal(opt.state[p][key][keep], old_state[id(p)][key][keep])
    assert torch.equal(down.weight[:, dead], torch.zeros(down.out_features, len(dead)))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[down.weight][key][:, dead], torch.zeros(down.out_features, len(dead)))
    # weight and bias of gate and up (when present), and down's weight, each with exp_avg and exp_avg_sq
    assert result.optimizer_entries == 2 * (2 * (2 if gate.bias is not None else 1) + 1)
    if with_data:
        assert result.silent == {}


def test_reinit_restarts_learning_even_where_up_rows_had_decayed_to_zero():
    model, gate, up, down, _, _ = build("bias")
    with torch.no_grad():
        up.weight[DEAD] = 0  # weight decay while the unit was dead
        up.bias[DEAD] = 0
    x = inputs("BC", 8)
    report = deadrelu.scan(model, x)
    deadrelu.reinit_dead(model, report, data=x, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    for step in range(2):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        assert bool(down.weight.grad[:, DEAD].abs().sum(dim=0).gt(0).all())  # act(gate_j) * up_j * dL/dout
        if step == 1:  # down's column has moved off 0: gradient reaches gate and up rows
            assert bool(gate.weight.grad[DEAD].abs().sum(dim=1).gt(0).all())
            assert bool(up.weight.grad[DEAD].abs().sum(dim=1).gt(0).all())
        opt.step()


def test_a_bias_free_silu_gate_row_of_zeros_is_pruned_as_its_output_is_exactly_zero():
    model = hf_mlp("llama").eval()
    model.act_fn = nn.SiLU()
    with torch.no_grad():
        model.gate_proj.weight[DEAD] = 0  # silu(0) == 0: the product is 0 whatever up gives
    x = inputs("BTC", 32)
    report = deadrelu.scan(model, x)
    assert set(DEAD) <= set(report.sites[0].dead_units)
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.removed == {"act_fn": tuple(DEAD)}
    assert result.model.up_proj.out_features == 64 - len(DEAD)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-6)


def test_a_non_zero_constant_times_up_is_no_constant_prune_skips_and_reinit_refuses():
    model = GatedMLP().eval()
    model.act = nn.SiLU()
    plant_dead(model.gate, DEAD)  # silu(-1) != 0, times up(x): not constant
    x = inputs("BC", 8)
    report = deadrelu.scan(model, x)
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.removed == {} and "non-constant" in result.skipped["act"]
    with torch.no_grad():
        model.gate.bias[DEAD[0]] = 0  # silu(0) == 0: this one can go, the others stay
    result = deadrelu.prune_dead(model, deadrelu.scan(model, x), data=x)
    assert result.removed == {"act": (DEAD[0],)} and "2 dead silu unit(s) do not output exactly 0" in result.skipped["act"]
    with torch.no_grad():
        model.gate.bias[DEAD[0]] = -1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RefusedError, match=r"non-zero constant that 'up' multiplies.*nothing was changed"):
        deadrelu.reinit_dead(model, report, data=x)
    assert same_state(model.state_dict(), before)


def test_an_infinite_up_output_makes_the_product_nan_and_prune_with_data_refuses():
    # 0 * inf is NaN: the dead unit does reach the output, and the check on data sees it.
    model, gate, up, _, _, _ = build("bias")
    with torch.no_grad():
        up.bias[DEAD[0]] = float("inf")
    x = inputs("BC", 8)
    report = deadrelu.scan(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RefusedError, match=r"differ from the original's by up to inf on the data.*nothing was changed"):
        deadrelu.prune_dead(model, report, data=x)
    assert same_state(model.state_dict(), before)


# --- refusals: the product is not a per-unit Linear output ----------------------------------------


class Product(nn.Module):
    """``down(act(gate(x)) * factor)`` with the factor of ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 5), nn.ReLU()
        self.narrow, self.side, self.up2, self.wide = nn.Linear(8, 1), nn.Linear(12, 5), nn.Linear(8, 12), nn.Linear(64 * 12, 5)
        self.bn, self.drop = nn.BatchNorm1d(12), nn.Dropout(0.5)
        self.scale = nn.Parameter(torch.rand(12) + 0.5)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x))
        if self.kind == "scalar":
            return self.down(h * 2.0)
        if self.kind == "broadcast":
            return self.down(h * self.scale)
        if self.kind == "narrow":
            return self.down(h * self.narrow(x))
        if self.kind == "square":
            return self.down(h * h)
        if self.kind == "input":
            return self.down(h * x.repeat(1, 2)[:, :12])
        u = self.up(x)
        if self.kind == "up-reused":
            return self.down(h * u) + self.side(u)
        if self.kind == "product-in-place":
            return self.down(h.mul_(u))
        if self.kind == "norm-after-product":
            return self.down(self.bn(h * u))
        if self.kind == "flatten-after-broadcast":  # (B, 12) * (3, B, 12) is (3, B, 12): flatten(1) is not per unit
            return self.wide((h * self.up2(x.expand(3, -1, -1))).flatten(1))
        if self.kind == "two-factors":
            return self.down(self.drop(h * u) * self.up2(x))
        p = h * u
        if self.kind == "product-in-residual":
            return self.down(p) + p.sum(dim=-1, keepdim=True)
        return self.down(p) + self.side(p)  # two consumers: both lose column j


REFUSALS = {
    "scalar": r"multiplied by the constant 2\.0",
    "broadcast": r"multiplied by get_attr scale",
    "narrow": r"multiplied by 'narrow', which makes 1 values, not 12",
    "square": r"multiplied by themselves",
    "input": r"multiplied by getitem\(\)",
    "up-reused": r"the output of 'up', which multiplies its units, is also used by mul\(\), module 'side'",
    "product-in-residual": r"its product with 'up' feeds \.sum\(\)",
    "product-in-place": r"\.mul_\(\).*not a supported consumer",
    "norm-after-product": r"its product with 'up' feeds module 'bn': after a product only dropout, identity and Linear",
    "flatten-after-broadcast": r"its product with 'up2' feeds \.flatten\(\)",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
@pytest.mark.parametrize("op", ["prune", "prune-nodata", "reinit", "reinit-data"])
def test_a_product_with_anything_but_a_per_unit_linear_output_is_refused_and_nothing_changes(kind, op):
    torch.manual_seed(0)
    model = Product(kind)
    plant_dead(model.gate, DEAD)
    x = inputs("BC", 8)
    report = deadrelu.scan(model, x)
    assert report.sites[0].dead_units == tuple(DEAD)
    opt = trained_optimizer(model, x) if kind != "product-in-place" else torch.optim.Adam(model.parameters())
    model.eval()
    before = snapshot(model, opt)
    with pytest.raises(RefusedError, match=r"site 'act'.*" + f"({REFUSALS[kind]})" + r".*nothing was changed"):
        if op.startswith("prune"):
            deadrelu.prune_dead(model, report, data=x if op == "prune" else None)
        else:
            deadrelu.reinit_dead(model, report, opt, data=x if op == "reinit-data" else None)
    assert_unchanged(before, snapshot(model, opt))


def test_a_product_read_by_two_layers_loses_the_column_in_both():
    torch.manual_seed(0)
    model = Product("two-consumers").eval()
    plant_dead(model.gate, DEAD)
    x = inputs("BC", 8)
    report = deadrelu.scan(model, x)
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.model.down.in_features == result.model.side.in_features == result.model.up.out_features == 9
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-6)
        expected = copy.deepcopy(model)(x)
    deadrelu.reinit_dead(model, report, data=x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_product_with_two_factors_through_dropout_loses_the_row_of_both():
    torch.manual_seed(0)
    model = Product("two-factors").eval()
    plant_dead(model.gate, DEAD)
    x = inputs("BC", 8)
    report = deadrelu.scan(model, x)
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.model.up.out_features == result.model.up2.out_features == result.model.down.in_features == 9
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-6)
        expected = copy.deepcopy(model)(x)
    (change,) = deadrelu.reinit_dead(model, report, data=x, generator=torch.Generator().manual_seed(0)).changes
    assert set(change.multipliers) == {"up", "up2"}
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_phi3_fused_gate_up_projection_is_refused_and_nothing_changes():
    phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    torch.manual_seed(0)
    config = phi3.Phi3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        hidden_act="relu",
    )  # fmt: skip
    model = phi3.Phi3MLP(config).eval()
    with torch.no_grad():
        model.gate_up_proj.weight[DEAD] = -model.gate_up_proj.weight[DEAD].abs() - 0.01  # gate is the first half
    x = inputs("BTC", 32)
    report = deadrelu.scan(model, x)
    assert set(DEAD) <= set(report.sites[0].dead_units)
    opt = trained_optimizer(model, x)
    before = snapshot(model, opt)
    for call in (
        lambda: deadrelu.prune_dead(model, report, data=x),
        lambda: deadrelu.reinit_dead(model, report, opt, data=x),
    ):
        with pytest.raises(RefusedError, match=r"its input comes from getitem\(\), not from an nn.Linear"):
            call()
        assert_unchanged(before, snapshot(model, opt))
