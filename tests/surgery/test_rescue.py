"""reinit_dead, nudge_bias and swap_activations on models with planted dead units.

Dead sets are known from the fixtures and re-checked by brute force (forward hooks on
the full activation tensor); "unchanged" means equal state_dicts, compared tensor by
tensor, for the model and the optimizer.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from fixtures.models import same_state
from deadrelu import RefusedError, nudge_bias, reinit_dead, swap_activations
from deadrelu.errors import DeadReluError
from fixtures import rescue_models as rm


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)



def brute_dead(net: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """Per ReLU-family module, the units whose output is <= 0 on every sample (hooks on the full tensor)."""
    out: dict[str, list[int]] = {}
    hooks = []
    for path, m in net.named_modules():
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):

            def hook(mod, inp, y, path=path):
                dim = 1
                flat = y.transpose(0, dim).reshape(y.shape[dim], -1)
                out[path] = [i for i in range(flat.shape[0]) if bool((flat[i] <= 0).all())]

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return out


def trained(optimizer_cls, net: nn.Module, x: torch.Tensor, steps: int = 3, **kw):
    """An optimizer with populated state after a few steps on a fixed regression target."""
    opt = optimizer_cls(net.parameters(), **kw)
    with torch.no_grad():
        target = torch.sin(x[:, : net(x).shape[1]])
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(net(x), target).backward()
        opt.step()
    return opt


# -- reinit_dead ------------------------------------------------------------------------------

CASES = [
    ("mlp", rm.mlp, rm.data),
    ("functional", rm.FunctionalMLP, rm.data),
    ("nested", rm.Nested, rm.data),
    ("cnn_bn", rm.cnn_bn, rm.images),
    ("conv_flatten", rm.conv_flatten, rm.images),
    ("view_flatten", rm.ViewFlatten, rm.images),
    ("post_bn", rm.post_bn, rm.data),
    ("functional_cnn", rm.FunctionalCNN, rm.images),
    ("tutorial_net", rm.TutorialNet, lambda: rm.images(32, size=32)),
]


@pytest.mark.parametrize("name,build,inputs", CASES, ids=[c[0] for c in CASES])
def test_reinit_preserves_outputs_and_revives(name, build, inputs):
    net, x = build().eval(), inputs()
    report = deadrelu.scan(net, x)
    assert report.dead > 0
    before = net(x).detach()
    result = reinit_dead(net, report, generator=gen(), data=x)
    assert result.units == report.dead and result.silent == {}
    after = net(x).detach()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    revived = deadrelu.scan(net, x)
    for old, new in zip(report.sites, revived.sites):
        assert all(new.fired_counts[u] > 0 for u in old.dead_units), (old.name, new.dead_units)


def test_reinit_rewrites_exactly_the_dead_rows_and_columns():
    net, x = rm.mlp().eval(), rm.data()
    assert brute_dead(net, x) == {"1": [1, 3, 7], "3": [2, 5]}
    old = copy.deepcopy(net.state_dict())
    reinit_dead(net, deadrelu.scan(net, x), generator=gen())
    new = net.state_dict()
    for layer, dead, consumer in (("0", [1, 3, 7], "2"), ("2", [2, 5], "4")):
        alive = [i for i in range(new[f"{layer}.weight"].shape[0]) if i not in dead]
        assert not torch.equal(new[f"{layer}.weight"][dead], old[f"{layer}.weight"][dead])
        assert torch.all(new[f"{layer}.bias"][dead] == 0)
        assert torch.all(new[f"{consumer}.weight"][:, dead] == 0)
        keep_cols = [i for i in range(new[f"{consumer}.weight"].shape[1]) if i not in dead]
        rows = [i for i in range(new[f"{consumer}.weight"].shape[0]) if consumer != "2" or i not in [2, 5]]
        assert torch.equal(new[f"{consumer}.weight"][rows][:, keep_cols], old[f"{consumer}.weight"][rows][:, keep_cols])
        assert torch.equal(new[f"{layer}.weight"][alive][:, [c for c in range(new[f"{layer}.weight"].shape[1]) if layer != "2" or c not in [1, 3, 7]]],
                           old[f"{layer}.weight"][alive][:, [c for c in range(new[f"{layer}.weight"].shape[1]) if layer != "2" or c not in [1, 3, 7]]])  # fmt: skip
    # He-normal with ReLU gain: std sqrt(2 / fan_in) — a loose check over all re-drawn entries.
    drawn = torch.cat([new["0.weight"][[1, 3, 7]].flatten() / (2 / 6) ** 0.5, new["2.weight"][[2, 5]].flatten() / (2 / 16) ** 0.5])
    assert 0.5 < float(drawn.std()) < 1.6


def test_reinit_units_fire_and_get_gradients():
    net, x = rm.mlp().eval(), rm.data()
    reinit_dead(net, deadrelu.scan(net, x), generator=gen())
    assert brute_dead(net, x)["1"] == [] and brute_dead(net, x)["3"] == []
    F.mse_loss(net(x), torch.sin(x[:, :3])).backward()
    # Outgoing weights are zero, so the revived units' outgoing columns learn first ...
    assert torch.all(net[2].weight.grad[:, [1, 3, 7]].abs().sum(0) > 0)
    assert torch.all(net[4].weight.grad[:, [2, 5]].abs().sum(0) > 0)
    # ... and after one step their incoming rows get gradient too.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    F.mse_loss(net(x), torch.sin(x[:, :3])).backward()
    assert torch.all(net[0].weight.grad[[1, 3, 7]].abs().sum(1) > 0)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reinit_resets_exactly_the_touched_optimizer_state(kind):
    net, x = rm.mlp().eval(), rm.data()
    opt = trained(torch.optim.SGD, net, x, lr=0.01, momentum=0.9) if kind == "sgd" else trained(torch.optim.Adam, net, x, lr=1e-3)
    keys = ["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq"]
    before = copy.deepcopy(opt.state_dict())
    report = deadrelu.scan(net, x)
    params = dict(net.named_parameters())
    # Make the touched entries non-zero first, so "reset" is observable.
    with torch.no_grad():
        for p in params.values():
            for k in keys:
                opt.state[p][k].add_(1.0)
    snap = {n: {k: opt.state[p][k].clone() for k in keys} for n, p in params.items()}
    result = reinit_dead(net, report, opt, generator=gen())
    assert result.optimizer_entries == len(keys) * 6  # 0.w, 0.b, 2.w(rows+cols), 2.b, 4.w; 2.w counted twice
    touched = {
        "0.weight": (([1, 3, 7], slice(None)),), "0.bias": (([1, 3, 7],),),
        "2.weight": (([2, 5], slice(None)), (slice(None), [1, 3, 7])), "2.bias": (([2, 5],),),
        "4.weight": ((slice(None), [2, 5]),), "4.bias": (),
    }  # fmt: skip
    for name, p in params.items():
        for k in keys:
            now, was = opt.state[p][k], snap[name][k]
            mask = torch.zeros_like(now, dtype=torch.bool)
            for idx in touched[name]:
                mask[idx] = True
            assert torch.all(now[mask] == 0), (name, k)
            assert torch.equal(now[~mask], was[~mask]), (name, k)
        if kind == "adam":
            assert torch.equal(opt.state[p]["step"], before["state"][list(params).index(name)]["step"])


def test_reinit_with_adam_keeps_units_alive():
    x = rm.data(256)
    target = torch.sin(x[:, :3]) + x[:, 3:] ** 2
    net = rm.mlp().eval()
    opt = trained(torch.optim.Adam, net, x, steps=10, lr=1e-2)
    report = deadrelu.scan(net, x)
    result = reinit_dead(net, report, opt, generator=gen())
    for _ in range(40):
        opt.zero_grad()
        F.mse_loss(net(x), target).backward()
        opt.step()
    after = deadrelu.scan(net, x)
    revived = [s.fired_counts[u] > 0 for c, s in zip(result.changes, after.sites) for u in c.units]
    assert len(revived) == result.units >= 5
    assert sum(revived) / len(revived) >= 0.8


def test_reinit_resets_batchnorm_channel():
    net, x = rm.cnn_bn(), rm.images()
    reinit_dead(net, deadrelu.scan(net, x), generator=gen())
    bn = net[1]
    assert torch.all(bn.weight[[2, 5]] == 1) and torch.all(bn.bias[[2, 5]] == 0)
    assert torch.all(bn.running_mean[[2, 5]] == 0) and torch.all(bn.running_var[[2, 5]] == 1)
    assert torch.all(bn.bias[[0, 1, 3, 4, 6, 7]] != rm.DEAD_BIAS)


def test_reinit_folds_post_bn_constant_into_consumer_bias():
    net, x = rm.post_bn(), rm.data()
    w, b = net[3].weight.detach().clone(), net[3].bias.detach().clone()
    bn = net[2]
    c = (0 - bn.running_mean[[0, 6]]) / torch.sqrt(bn.running_var[[0, 6]] + bn.eps) * bn.weight[[0, 6]] + bn.bias[[0, 6]]
    result = reinit_dead(net, deadrelu.scan(net, x), generator=gen())
    assert result.changes[0].folded == ("3",)
    torch.testing.assert_close(net[3].bias.detach(), b + (w[:, [0, 6]] * c.detach()).sum(1), atol=1e-6, rtol=0)


def test_reinit_dormant_selects_dormant_units():
    net, x = rm.mlp(dead={0: [1]}), rm.data()
    with torch.no_grad():
        net[0].weight[4] *= 1e-4  # fires, but with tiny magnitude: dormant, not dead
        net[0].bias[4] = 1e-4
    report = deadrelu.scan(net, x)
    assert 4 in report.sites[0].dormant_units and 4 not in report.sites[0].dead_units
    assert reinit_dead(copy.deepcopy(net), report).changes[0].units == (1,)
    assert 4 in reinit_dead(net, report, dormant=True).changes[0].units


def test_reinit_is_reproducible_with_a_generator():
    a, b, x = rm.mlp(), rm.mlp(), rm.data()
    reinit_dead(a, deadrelu.scan(a, x), generator=gen(7))
    reinit_dead(b, deadrelu.scan(b, x), generator=gen(7))
    assert same_state(a.state_dict(), b.state_dict())


REFUSALS = [
    ("residual", rm.Residual, "relu", "residual"),
    ("reused layer", rm.SharedLayer, "<root>:relu.1", "called 2 times"),
    ("tied weights", rm.TiedWeights, "<root>:relu.1", "shares parameters"),
    ("layernorm", rm.unsupported, "'2'", "LayerNorm"),
    ("untraceable", rm.Untraceable, "Untraceable", "cannot trace"),
]


@pytest.mark.parametrize("op", ["reinit", "nudge"])
@pytest.mark.parametrize("name,build,site,why", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_change_nothing(op, name, build, site, why):
    net, x = build(), rm.data()
    opt = trained(torch.optim.Adam, net, x, lr=1e-3)
    report = deadrelu.scan(net, x)
    assert report.dead > 0
    model_before, opt_before = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    if op == "nudge" and name in ("residual", "reused layer", "tied weights"):
        # Changing a bias needs only the producer side; these refuse for reinit only,
        # except where the producer itself is shared.
        if name == "residual":
            nudge_bias(net, report, optimizer=opt)
            return
    with pytest.raises(RefusedError) as err:
        if op == "reinit":
            reinit_dead(net, report, opt, generator=gen())
        else:
            nudge_bias(net, report, optimizer=opt)
    assert site in str(err.value) and why in str(err.value) and "nothing was changed" in str(err.value)
    assert same_state(net.state_dict(), model_before)
    assert same_state(opt.state_dict(), opt_before)


def test_failure_midway_rolls_back(monkeypatch):
    net, x = rm.mlp(), rm.data()
    opt = trained(torch.optim.SGD, net, x, lr=0.01, momentum=0.9)
    report = deadrelu.scan(net, x)
    model_before, opt_before = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    from deadrelu.surgery import dataflow as _graph

    def boom(link, units):
        raise RuntimeError("simulated failure while zeroing columns")

    monkeypatch.setattr(_graph, "columns", boom)
    # After the rollback the failure is one deadrelu error naming it, the original as its cause.
    with pytest.raises(RefusedError, match="a write failed .RuntimeError: simulated.*nothing was changed") as err:
        reinit_dead(net, report, opt, generator=gen())
    assert isinstance(err.value.__cause__, RuntimeError)
    assert same_state(net.state_dict(), model_before)
    assert same_state(opt.state_dict(), opt_before)


def test_reinit_bad_arguments():
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x)
    with pytest.raises(DeadReluError, match="init must be"):
        reinit_dead(net, report, init="xavier")
    with pytest.raises(DeadReluError, match="torch.optim.Optimizer"):
        reinit_dead(net, report, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(RefusedError, match="expected a deadrelu Report"):
        reinit_dead(net, {"sites": []})  # type: ignore[arg-type]
    other = deadrelu.scan(rm.cnn_bn(), rm.images())
    with pytest.raises(RefusedError, match="report was made from a different model"):
        reinit_dead(net, other)
    # A report without a fingerprint (older JSON) is still matched against the graph.
    with pytest.raises(RefusedError, match="no matching activation"):
        reinit_dead(net, dataclasses.replace(other, fingerprint=""))


# -- nudge_bias -------------------------------------------------------------------------------


def test_nudge_sets_dead_biases_only():
    net, x = rm.mlp(), rm.data()
    old = copy.deepcopy(net.state_dict())
    changes = nudge_bias(net, deadrelu.scan(net, x), value=0.05)
    assert [(c.parameter, c.units) for c in changes] == [("0.bias", (1, 3, 7)), ("2.bias", (2, 5))]
    assert all(b == rm.DEAD_BIAS for c in changes for b in c.before)
    assert torch.all(net[0].bias[[1, 3, 7]] == 0.05) and torch.all(net[2].bias[[2, 5]] == 0.05)
    keep = [i for i in range(16) if i not in (1, 3, 7)]
    assert torch.equal(net[0].bias[keep], old["0.bias"][keep])
    assert torch.equal(net[0].weight, old["0.weight"])


def test_nudge_uses_batchnorm_shift_and_refuses_without_bias():
    net, x = rm.cnn_bn(), rm.images()
    conv_bias = net[0].bias.detach().clone()
    changes = nudge_bias(net, deadrelu.scan(net, x))
    assert changes[0].parameter == "1.bias" and torch.all(net[1].bias[[2, 5]] == 0.01)
    assert torch.equal(net[0].bias, conv_bias)
    nobias = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        nobias[0].weight[1] = -nobias[0].weight[1].abs() * 0 - 1.0
    xs = rm.data().abs()
    report = deadrelu.scan(nobias, xs)
    assert report.sites[0].dead_units == (1,)
    before = copy.deepcopy(nobias.state_dict())
    with pytest.raises(RefusedError, match="'0' has no bias"):
        nudge_bias(nobias, report)
    assert same_state(nobias.state_dict(), before)
    with pytest.raises(DeadReluError, match="finite"):
        nudge_bias(net, deadrelu.scan(net, x), value=float("nan"))


# -- swap_activations -------------------------------------------------------------------------


def mildly_dead_mlp() -> nn.Sequential:
    """Dead units with pre-activations near -3: smooth activations still pass a gradient there."""
    net = rm.mlp(dead={})
    with torch.no_grad():
        for layer, units in ((0, [1, 3, 7]), (2, [2, 5])):
            net[layer].weight[units] *= 0.05
            net[layer].bias[units] = -3.0
    return net


@pytest.mark.parametrize("to", ["leaky_relu", "prelu", "elu", "selu", "gelu", "silu"])
def test_swap_leaves_no_relu_and_gradients_flow(to):
    net, x = mildly_dead_mlp(), rm.data()
    assert brute_dead(net, x) == {"1": [1, 3, 7], "3": [2, 5]}
    result = swap_activations(net, to=to)
    assert result.model is net
    assert [c.site for c in result.changes] == ["1", "3"] and all(c.kind == "module" for c in result.changes)
    sites = deadrelu.scan(net, x).sites
    assert [s.function for s in sites] == [to, to]
    F.mse_loss(net(x), torch.sin(x[:, :3])).backward()
    assert torch.all(net[0].weight.grad[[1, 3, 7]].abs().sum(1) > 0)
    assert torch.all(net[2].weight.grad[[2, 5]].abs().sum(1) > 0)
    if to == "prelu":
        assert net[1].weight.shape == (16,) and net[3].weight.shape == (12,)


def test_swap_prelu_per_channel_on_conv():
    net = rm.cnn_bn()
    swap_activations(net, to="prelu")
    assert net[2].weight.shape == (8,) and net[6].weight.shape == (6,)
    assert [s.function for s in deadrelu.scan(net, rm.images()).sites] == ["prelu", "prelu"]


def test_swap_functional_root_needs_copy():
    net, x = rm.FunctionalMLP(), rm.data()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RefusedError, match=r"'relu', 'relu_' in <root> \(FunctionalMLP.forward\)"):
        swap_activations(net, to="leaky_relu")
    assert same_state(net.state_dict(), before)
    assert [s.function for s in deadrelu.scan(net, x).sites] == ["relu", "relu"]
    result = swap_activations(net, to="leaky_relu", copy=True)
    assert result.model is not net and isinstance(result.model, torch.fx.GraphModule)
    assert [s.function for s in deadrelu.scan(result.model, x).sites] == ["leaky_relu", "leaky_relu"]
    expected = net.fc3(F.leaky_relu(net.fc2(F.leaky_relu(net.fc1(x)))))
    torch.testing.assert_close(result.model(x), expected)
    assert [s.function for s in deadrelu.scan(net, x).sites] == ["relu", "relu"]  # original untouched


def test_swap_functional_in_child_in_place_keeps_parameters():
    net, x = rm.Nested(), rm.data()
    weight = net.block.fc.weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    result = swap_activations(net, to="gelu")
    assert result.model is net and isinstance(net.block, torch.fx.GraphModule)
    assert net.block.fc.weight is weight  # the optimizer still holds the live parameter
    assert {c.kind for c in result.changes} == {"module", "function"}
    assert all(s.function == "gelu" for s in deadrelu.scan(net, x).sites)
    expected = net.head(F.gelu(net.fc(F.gelu(net.block.fc(x)))))
    torch.testing.assert_close(net(x), expected)
    w0 = weight.detach().clone()
    F.mse_loss(net(x), torch.zeros(256, 2)).backward()
    opt.step()
    assert not torch.equal(net.block.fc.weight, w0)  # the optimizer trains the swapped module


class InplaceReuse(nn.Module):
    """``y.relu_()`` whose result is read through ``y``: the rewrite must stay in place."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential()
        self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y.relu_()
        return self.out(y)


@pytest.mark.parametrize("to", ["gelu", "leaky_relu"])
def test_swap_inplace_call_keeps_side_effect(to):
    torch.manual_seed(0)
    net, x = InplaceReuse(), rm.data()
    result = swap_activations(net, to=to, copy=True)
    act = F.gelu if to == "gelu" else F.leaky_relu
    torch.testing.assert_close(result.model(x), net.out(act(net.fc(x))))
    result.model(x).sum().backward()
    assert result.model.fc.weight.grad is not None


def test_swap_selu_init_and_bad_arguments():
    net = rm.mlp()
    result = swap_activations(net, to="selu", selu_init=True, generator=gen())
    assert result.reinitialised == ("0", "2", "4")
    assert torch.all(net[0].bias == 0)
    w = torch.cat([net[2].weight.flatten() * 16**0.5, net[4].weight.flatten() * 12**0.5])
    assert 0.8 < float(w.detach().std()) < 1.2
    with pytest.raises(DeadReluError, match="to must be one of"):
        swap_activations(net, to="tanh")
    with pytest.raises(DeadReluError, match="selu_init"):
        swap_activations(net, to="gelu", selu_init=True)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"to": "selu", "selu_init": True, "generator": 0}, "generator must be a torch.Generator"),
        ({"to": "selu", "selu_init": "yes"}, "selu_init must be True or False"),
        ({"copy": "no"}, "copy must be True or False"),
        ({"negative_slope": True}, "negative_slope must be a finite number"),
        ({"to": ["gelu"]}, "to must be one of"),
    ],
    ids=["generator", "selu_init", "copy", "slope", "to"],
)
def test_swap_refuses_bad_arguments_and_changes_nothing(options, message):
    net = rm.mlp()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(DeadReluError, match=message):
        swap_activations(net, **options)
    assert same_state(net.state_dict(), before) and [type(m) for m in net] == [type(m) for m in rm.mlp()]


def test_swap_refuses_untraceable_relu_with_its_line():
    net = rm.Untraceable()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RefusedError, match=r"rescue_models.py:\d+ in <root> \(Untraceable.forward\)"):
        swap_activations(net, to="leaky_relu", copy=True)
    assert same_state(net.state_dict(), before)


def test_swap_transformer_activation_attribute():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    result = swap_activations(layer, to="silu")
    assert [(c.site, c.kind) for c in result.changes] == [("activation", "attribute")]
    assert [s.function for s in deadrelu.scan(layer, torch.randn(4, 3, 8)).sites] == ["silu"]


@pytest.mark.parametrize(
    "build,inputs",
    [(rm.ReusedReLU, rm.data), (rm.ReusedFunctionalAct, rm.data), (rm.token_mlp, rm.tokens),
     (rm.conv1d_bn, lambda: rm.tokens().transpose(1, 2))],
    ids=["reused relu", "reused functional act", "tokens (N,T,F)", "conv1d+bn"],
)
def test_reinit_reused_activation_tokens_and_conv1d(build, inputs):
    net, x = build().eval(), inputs()
    report = deadrelu.scan(net, x)
    before = net(x).detach()
    reinit_dead(net, report, generator=gen())
    torch.testing.assert_close(net(x).detach(), before, atol=1e-6, rtol=0)
    assert deadrelu.scan(net, x).sites[0].dead == 0


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=1, max_size=3), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_random_mlps_reinit_keeps_outputs(widths, fraction, seed):
    torch.manual_seed(seed)
    dims = [5, *widths, 3]
    layers: list[nn.Module] = []
    for i in range(len(widths)):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1])).eval()
    g = torch.Generator().manual_seed(seed)
    for i, w in enumerate(widths):
        rm.plant(net[2 * i].bias, [u for u in range(w) if float(torch.rand((), generator=g)) < fraction])
    x = rm.data(64, 5, seed)
    report = deadrelu.scan(net, x)
    opt = trained(torch.optim.SGD, net, x, lr=1e-3, momentum=0.9)
    before = net(x).detach()
    result = reinit_dead(net, report, opt, generator=gen(seed))
    assert result.units == report.dead
    torch.testing.assert_close(net(x).detach(), before, atol=1e-5, rtol=0)
    first = report.sites[0].dead_units
    assert all(net[0].bias[u] == 0 for u in first)
    assert all(torch.all(opt.state[net[0].weight]["momentum_buffer"][u] == 0) for u in first)


def test_swap_failure_midway_rolls_back(monkeypatch):
    net = rm.Nested()
    before_types = [type(m) for m in net.modules()]
    from deadrelu.surgery import swap as _swap

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure in the fx rewrite")

    monkeypatch.setattr(_swap, "_rewrite", boom)
    with pytest.raises(RefusedError, match="swap_activations: a write failed .RuntimeError: simulated") as err:
        swap_activations(net, to="elu")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert [type(m) for m in net.modules()] == before_types  # the nn.ReLU module swap was undone
    assert isinstance(net.act, nn.ReLU)


def test_docs_snippet_runs_and_prints_what_it_says():
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "rescue.md"
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(doc), "exec"), namespace)
    assert (namespace["small"].params_before, namespace["small"].params_after) == (163, 143)
    assert namespace["result"].units == 2


def test_rprop_step_size_is_reset_to_lr_not_zero():
    net, x = rm.mlp(), rm.data()
    opt = trained(torch.optim.Rprop, net, x, lr=0.02)
    reinit_dead(net, deadrelu.scan(net, x), opt, generator=gen())
    state = opt.state[net[0].weight]
    assert torch.all(state["step_size"][[1, 3, 7]] == 0.02) and torch.all(state["prev"][[1, 3, 7]] == 0)


def test_data_redraws_units_that_would_stay_silent():
    x = rm.images(32, size=32)
    # One draw: units fed by non-negative (post-ReLU) inputs often point away from them.
    net = rm.TutorialNet().eval()
    report = deadrelu.scan(net, x)
    once = reinit_dead(net, report, generator=gen(), data=x, max_draws=1)
    after = deadrelu.scan(net, x)
    still_dead = {s.name: tuple(u for u in old.dead_units if u in s.dead_units) for old, s in zip(report.sites, after.sites)}
    assert once.silent == {k: v for k, v in still_dead.items() if v}  # silent = exactly the units a scan finds dead
    assert sum(len(v) for v in once.silent.values()) > 0
    # Re-drawing until they fire revives all of them, with outputs still unchanged.
    net = rm.TutorialNet().eval()
    before = net(x).detach()
    result = reinit_dead(net, report, generator=gen(), data=x)
    assert result.silent == {}
    torch.testing.assert_close(net(x).detach(), before, atol=1e-5, rtol=0)
    assert all(s.fired_counts[u] > 0 for old, s in zip(report.sites, deadrelu.scan(net, x).sites) for u in old.dead_units)


def test_swap_prelu_uses_report_for_token_inputs():
    net, x = rm.token_mlp().eval(), rm.tokens()
    report = deadrelu.scan(net, x)
    result = swap_activations(net, to="prelu", report=report)
    assert net[1].weight.shape == (1,)  # units are on dim 2, PReLU's channel dim is 1: one shared slope
    assert net(x).shape == (32, 5, 4)
    mlp = rm.mlp()
    swap_activations(mlp, to="prelu", report=deadrelu.scan(mlp, rm.data()))
    assert mlp[1].weight.shape == (16,) and mlp[3].weight.shape == (12,)
    assert result.changes[0].new == "PReLU(num_parameters=1)"


def test_sites_limits_reinit_and_nudge():
    net, x = rm.Residual(), rm.data()
    report = deadrelu.scan(net, x)
    with pytest.raises(RefusedError):
        reinit_dead(net, report)
    assert reinit_dead(net, report, sites=[]).units == 0  # nothing chosen, nothing refused
    mlp = rm.mlp()
    result = reinit_dead(mlp, deadrelu.scan(mlp, x), sites=["3"], generator=gen())
    assert [c.site for c in result.changes] == ["3"] and torch.all(mlp[0].bias[[1, 3, 7]] == rm.DEAD_BIAS)
    assert [c.site for c in nudge_bias(mlp, deadrelu.scan(mlp, x), sites="1")] == ["1"]


def test_swap_transformer_fast_path_uses_new_activation():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    ref = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation="gelu").eval()
    ref.load_state_dict(layer.state_dict())
    swap_activations(layer, to="gelu")
    x = torch.randn(4, 3, 8)
    with torch.no_grad():  # eval + no_grad is where the fused fast path would run
        torch.testing.assert_close(layer(x), ref(x))


def test_reinit_folds_constant_output_of_zero_weight_gelu_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[[2, 5]] = 0.0
        net[0].bias[[2, 5]] = torch.tensor([-4.0, -2.5])
    x = rm.data()
    report = deadrelu.scan(net, x)
    assert report.sites[0].dead_units == (2, 5)
    before = net(x).detach()
    result = reinit_dead(net, report, generator=gen())
    assert result.changes[0].folded == ("2",)
    torch.testing.assert_close(net(x).detach(), before, atol=1e-6, rtol=0)
