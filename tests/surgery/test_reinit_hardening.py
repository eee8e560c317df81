"""reinit_dead and nudge_bias on bad input: one deadrelu error each, and model and optimizer bit-identical.

* a stale report (its dead units fire on the data given) is refused, naming exactly the units a
  brute-force pass over the full activation tensors finds firing;
* a model that raises on the data (wrong width) gives one ForwardError carrying the original error;
* a bad argument (``max_draws=1.5``, ``generator=3``, ...) is refused before any work.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import DeadReluError, ForwardError, RefusedError, nudge_bias, reinit_dead
from deadrelu.surgery.verify import PinnedReference
from fixtures import rescue_models as rm
from fixtures.models import MLP, brute_force, same_state



def trained_mlp() -> tuple[MLP, torch.Tensor, torch.optim.Optimizer]:
    """The planted MLP after one Adam step (so the optimizer has per-entry state to keep)."""
    torch.manual_seed(0)
    net, x = MLP().eval(), torch.randn(256, 10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return net, x, opt


def snapshot(net: nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    return copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()) if opt is not None else None


def assert_unchanged(before: tuple[dict, dict | None], net: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    assert same_state(net.state_dict(), before[0])
    if opt is not None:
        assert same_state(opt.state_dict(), before[1])


def fired_dead_units(net: MLP, report: deadrelu.Report, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per site, the report's dead units that fire on ``x``, from the hand-written forward pass."""
    dead = {s.name: s.dead_units for s in report.sites}
    out = {}
    for name, act, dim in net.activations(x):
        fired = brute_force(act, dim)["fired"]
        units = tuple(u for u in dead[name] if fired[u] > 0)
        if units:
            out[name] = units
    return out


def named(units: dict[str, tuple[int, ...]]) -> list[str]:
    return [f"site '{name}': units {list(u)}" for name, u in units.items()]


def test_a_report_made_before_more_training_is_refused_naming_the_units_that_fire():
    net, x, opt = trained_mlp()
    report = deadrelu.scan(net, x)
    assert {s.name: s.dead_units for s in report.sites} == MLP.planted
    with torch.no_grad():  # further training revives unit 5 of layer 1 and unit 9 of layer 2
        net[0].bias[5] = 0.5
        net[2].bias[9] = 0.5
    expected = fired_dead_units(net, report, x)
    assert set(expected) == {"1", "3"} and 5 in expected["1"] and 9 in expected["3"]
    before, outputs = snapshot(net, opt), net(x).detach()
    with pytest.raises(RefusedError, match="stale") as err:
        reinit_dead(net, report, opt, data=x, generator=torch.Generator().manual_seed(0))
    for part in named(expected):
        assert part in str(err.value)
    assert_unchanged(before, net, opt)
    assert torch.equal(net(x).detach(), outputs)


def test_a_report_made_on_other_data_is_refused():
    net, x, _ = trained_mlp()
    with torch.no_grad():  # live units without a head start: many are silent on a few samples
        for layer in (net[0], net[2]):
            layer.bias.clamp_(max=0.0)
    report = deadrelu.scan(net, x[:2])  # units silent on two samples fire on the others
    expected = fired_dead_units(net, report, x)
    assert expected
    before = snapshot(net)
    with pytest.raises(RefusedError) as err:
        reinit_dead(net, report, data=x)
    assert all(part in str(err.value) for part in named(expected))
    assert_unchanged(before, net)
    # Without data nothing can be checked: the same call goes through (documented behaviour).
    assert reinit_dead(copy.deepcopy(net), report).units == report.dead


def test_only_the_units_to_reinitialise_are_checked():
    net, x, _ = trained_mlp()
    report = deadrelu.scan(net, x)
    with torch.no_grad():
        net[0].bias[5] = 0.5  # stale at site '1' only
    outputs = net(x).detach()
    result = reinit_dead(net, report, data=x, sites=["3"], generator=torch.Generator().manual_seed(0))
    assert [c.site for c in result.changes] == ["3"] and result.changes[0].units == MLP.planted["3"]
    torch.testing.assert_close(net(x).detach(), outputs, atol=1e-6, rtol=0)


def test_fresh_report_still_reinitialises_and_verifies_the_function(monkeypatch):
    net, x, opt = trained_mlp()
    report = deadrelu.scan(net, x)
    checks = []
    original_check = PinnedReference.check

    def spy(self, edited, tolerance=0.0):
        checks.append(self.what)
        return original_check(self, edited, tolerance)

    monkeypatch.setattr(PinnedReference, "check", spy)
    outputs = net(x).detach()
    result = reinit_dead(net, report, opt, data=iter([x]), generator=torch.Generator().manual_seed(0))
    assert checks == ["reinit_dead"]  # the held-out check of the rewrite still ran
    assert {c.site: c.units for c in result.changes} == MLP.planted and result.silent == {}
    torch.testing.assert_close(net(x).detach(), outputs, atol=1e-6, rtol=0)
    for name, act, dim in net.activations(x):  # every re-initialised unit fires now
        fired = brute_force(act, dim)["fired"]
        assert all(fired[u] > 0 for u in MLP.planted[name]), name


def dormancy(h: torch.Tensor) -> torch.Tensor:
    """Per unit ``E|h_i| / mean_k E|h_k|``, from the full activation tensor."""
    m = h.detach().double().abs().mean(0)
    return m / m.mean()


def test_dormant_units_must_still_be_dormant_on_the_data():
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(256, 6)
    with torch.no_grad():
        net[0].bias.fill_(0.5)
        net[0].weight[3] *= 1e-4  # unit 3 fires, but barely: tau-dormant
        net[0].bias[3] = 1e-4
    report = deadrelu.scan(net, x)
    tau = report.levels.dormant_tau
    assert float(dormancy(net[1](net[0](x)))[3]) <= tau and 3 not in report.sites[0].dead_units
    fresh = reinit_dead(copy.deepcopy(net), report, dormant=True, data=x)
    assert fresh.changes[0].units == (3,)
    with torch.no_grad():  # more training: unit 3 is now as active as the others
        net[0].weight[3] *= 1e4
        net[0].bias[3] = 0.5
    assert float(dormancy(net[1](net[0](x)))[3]) > tau
    before = snapshot(net)
    with pytest.raises(RefusedError, match=r"site '1': units \[3\]"):
        reinit_dead(net, report, dormant=True, data=x)
    assert_unchanged(before, net)


@pytest.mark.parametrize("batches", [False, True], ids=["tensor", "list of batches"])
def test_wrong_width_data_is_one_forward_error(batches):
    net, x, opt = trained_mlp()
    report = deadrelu.scan(net, x)
    bad = torch.randn(32, 9)
    data = [bad[:16], bad[16:]] if batches else bad
    with pytest.raises(RuntimeError) as raw:
        net(data[0] if batches else bad)  # the first batch fed
    before = snapshot(net, opt)
    with pytest.raises(ForwardError) as err:
        reinit_dead(net, report, opt, data=data)
    message = str(err.value)
    assert isinstance(err.value, DeadReluError) and message.startswith("reinit_dead: the model raised RuntimeError")
    assert str(raw.value).splitlines()[0] in message and "nothing was changed" in message
    assert_unchanged(before, net, opt)


def untraceable() -> tuple[nn.Module, deadrelu.Report]:
    """A model whose chains cannot be proven: any argument checked late would meet a RefusedError first."""
    net = rm.Untraceable()
    return net, deadrelu.scan(net, rm.data())


@pytest.mark.parametrize(
    "options,argument",
    [({"max_draws": 1.5}, "max_draws"), ({"max_draws": 0}, "max_draws"), ({"max_draws": -2}, "max_draws"),
     ({"max_draws": True}, "max_draws"), ({"max_draws": "3"}, "max_draws"), ({"max_draws": None}, "max_draws"),
     ({"generator": 3}, "generator"), ({"generator": "seed"}, "generator"), ({"dormant": "no"}, "dormant"),
     ({"dormant": 1}, "dormant"), ({"sites": 3}, "sites"), ({"sites": [3]}, "sites"), ({"input_fn": 3}, "input_fn"),
     ({"init": None}, "init"), ({"optimizer": 3}, "optimizer")],
)  # fmt: skip
def test_reinit_refuses_bad_arguments_before_any_work(options, argument):
    net, report = untraceable()
    with pytest.raises(RefusedError, match="cannot trace"):
        reinit_dead(net, report, data=rm.data())  # valid arguments get as far as the proof
    before = snapshot(net)
    with pytest.raises(DeadReluError, match=rf"^reinit_dead: {argument} ") as err:
        reinit_dead(net, report, data=rm.data(), **options)
    assert not isinstance(err.value, RefusedError)
    assert_unchanged(before, net)


def test_reinit_refuses_a_model_that_is_not_a_module():
    net, report = untraceable()
    with pytest.raises(DeadReluError, match="reinit_dead: model must be a torch.nn.Module, not int"):
        reinit_dead(3, report)


@pytest.mark.parametrize(
    "options,argument",
    [({"value": True}, "value"), ({"value": 10**400}, "value"), ({"dormant": "x"}, "dormant"),
     ({"sites": 3}, "sites"), ({"optimizer": "adam"}, "optimizer")],
)  # fmt: skip
def test_nudge_bias_refuses_bad_arguments(options, argument):
    net, x, _ = trained_mlp()
    report = deadrelu.scan(net, x)
    before = snapshot(net)
    with pytest.raises(DeadReluError, match=rf"^nudge_bias: {argument} ") as err:
        nudge_bias(net, report, **options)
    assert not isinstance(err.value, RefusedError)
    assert_unchanged(before, net)
    with pytest.raises(DeadReluError, match="nudge_bias: model must be a torch.nn.Module"):
        nudge_bias(3, report)



def _below_threshold_net() -> tuple[nn.Sequential, torch.Tensor]:
    """6-16-3 with units 1 and 3 dead and unit 5 alive but never above 0.1."""
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[0].bias[[1, 3]] = -100.0
        net[0].weight[5] *= 0.05
        net[0].bias[5] = 0.0
    return net, x


@pytest.mark.parametrize("with_data", [False, True])
def test_site_scanned_with_a_positive_threshold_is_skipped_like_prune(with_data):
    net, x = _below_threshold_net()
    report = deadrelu.scan(net, x, threshold=0.5)
    hidden = torch.relu(net[0](x))
    assert 5 in report.sites[0].dead_units and 0 < hidden[:, 5].max() < 0.5  # "dead" yet it fires
    ref, before = net(x).detach(), snapshot(net)
    result = reinit_dead(net, report, data=x if with_data else None)
    assert result.changes == () and result.units == 0
    assert list(result.skipped) == ["1"]
    assert result.skipped["1"].startswith(deadrelu.prune_dead(net, report).skipped["1"])  # the same reason
    assert "1: skipped (scanned with fire threshold 0.5 > 0" in str(result)
    assert_unchanged(before, net)
    assert torch.equal(net(x), ref)  # the old code re-initialised unit 5 and moved the outputs by 0.025


def test_positive_threshold_site_with_dormant_is_reinitialised_as_redo():
    net, x = _below_threshold_net()
    report = deadrelu.scan(net, x, threshold=0.5)
    result = reinit_dead(net, report, dormant=True, generator=torch.Generator().manual_seed(0))
    assert result.skipped == {} and set(report.sites[0].dead_units) <= set(result.changes[0].units)


def test_threshold_zero_sites_are_not_skipped():
    net, x = _below_threshold_net()
    report = deadrelu.scan(net, x)
    result = reinit_dead(net, report, data=x, generator=torch.Generator().manual_seed(0))
    assert result.skipped == {} and result.changes[0].units == (1, 3)


def _inference_consumer() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    with torch.inference_mode():
        consumer = nn.Linear(16, 3)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), consumer)
    with torch.no_grad():
        net[0].bias[[1, 3]] = -100.0
    return net, torch.randn(64, 6)


def test_a_write_torch_refuses_is_rolled_back_and_one_deadrelu_error():
    net, x = _inference_consumer()
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1, momentum=0.9)
    net[0](x).sum().backward()
    opt.step()
    report = deadrelu.scan(net, x)
    before = snapshot(net, opt)
    with pytest.raises(RefusedError, match=r"reinit_dead: a write failed \(RuntimeError: Inplace update to inference "
                       r"tensor.*rolled back; nothing was changed") as err:
        reinit_dead(net, report, opt)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert_unchanged(before, net, opt)  # the producer rows written before the failure are back


def test_nudge_on_an_inference_tensor_bias_is_one_deadrelu_error():
    torch.manual_seed(0)
    with torch.inference_mode():
        producer = nn.Linear(6, 16)
        producer.bias[[1, 3]] = -100.0
    net = nn.Sequential(producer, nn.ReLU(), nn.Linear(16, 3))
    report = deadrelu.scan(net, torch.randn(64, 6))
    before = snapshot(net)
    with pytest.raises(RefusedError, match=r"nudge_bias: a write failed \(RuntimeError: Inplace update to inference"):
        nudge_bias(net, report, value=0.5)
    assert_unchanged(before, net)
