"""prune_dead on bad input: one deadrelu error each, the original model bit-identical.

* a model that raises on the data (wrong width) gives one ForwardError carrying the original error;
* a stale report is refused naming the units that fire, found by brute force on the full activations;
* a bad argument (``sites=3``, ``input_fn=3``, a tolerance too large for a float) is refused up front.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import DeadReluError, ForwardError, RefusedError, prune_dead
from fixtures import rescue_models as rm
from fixtures.models import MLP, brute_force, same_state



def planted() -> tuple[MLP, torch.Tensor, deadrelu.Report]:
    torch.manual_seed(0)
    net, x = MLP().eval(), torch.randn(256, 10)
    return net, x, deadrelu.scan(net, x)


@pytest.mark.parametrize("batches", [False, True], ids=["tensor", "list of batches"])
def test_wrong_width_data_is_one_forward_error(batches):
    net, _, report = planted()
    bad = torch.randn(32, 9)
    data = [bad[:16], bad[16:]] if batches else bad
    with pytest.raises(RuntimeError) as raw:
        net(data[0] if batches else bad)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ForwardError) as err:
        prune_dead(net, report, data=data)
    message = str(err.value)
    assert isinstance(err.value, DeadReluError) and message.startswith("prune_dead: the model raised RuntimeError")
    assert str(raw.value).splitlines()[0] in message and "nothing was changed" in message
    assert same_state(net.state_dict(), before)


def test_a_stale_report_is_refused_naming_the_units_that_fire():
    net, x, report = planted()
    with torch.no_grad():  # more training revives unit 2 of layer 1
        net[0].bias[2] = 0.5
    (name, act, dim), _ = net.activations(x)
    fired = brute_force(act, dim)["fired"]
    expected = [u for u in report.sites[0].dead_units if fired[u] > 0]
    assert name == "1" and expected == [2]
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RefusedError, match="differ from the original's by up to") as err:
        prune_dead(net, report, data=x)
    assert f"site '1': units {expected}" in str(err.value) and "site '3'" not in str(err.value)
    assert same_state(net.state_dict(), before)
    # Data that can be read only once is still verified; the refusal then cannot name the units.
    with pytest.raises(RefusedError, match="may not be from this data"):
        prune_dead(net, report, data=iter([x]))
    assert same_state(net.state_dict(), before)


@pytest.mark.parametrize(
    "options,argument",
    [({"sites": 3}, "sites"), ({"sites": ["1", 3]}, "sites"), ({"input_fn": "x"}, "input_fn"),
     ({"tolerance": 10**400}, "tolerance"), ({"tolerance": True}, "tolerance")],
)  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(options, argument):
    net = rm.Untraceable()  # valid arguments would meet a RefusedError in the proof
    x = rm.data()
    report = deadrelu.scan(net, x)
    with pytest.raises(RefusedError, match="cannot trace"):
        prune_dead(net, report, data=x)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(DeadReluError, match=rf"^prune_dead: {argument} ") as err:
        prune_dead(net, report, data=x, **options)
    assert not isinstance(err.value, RefusedError)
    assert same_state(net.state_dict(), before)


def test_sites_given_as_a_generator_are_read_once_for_everything():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    rm.plant(net[0].bias, [1])
    rm.plant(net[2].bias, [3])
    x = rm.data()
    report = deadrelu.scan(net, x)
    as_list = prune_dead(net, report, data=x, sites=["1", "3"])
    as_generator = prune_dead(net, report, data=x, sites=(name for name in ["1", "3"]))
    assert as_list.removed == as_generator.removed == {"3": (3,)}
    assert as_list.skipped == as_generator.skipped and "leaky_relu" in as_generator.skipped["1"]


@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "prelu"])
@pytest.mark.parametrize("with_data", [False, True])
def test_prune_leaves_the_global_rng_alone(model, with_data):
    """The smaller layers are built without their random init (which drew from the global RNG)."""
    if model == "mlp":
        net, x = rm.mlp(), rm.data()
    elif model == "cnn_bn":
        net, x = rm.cnn_bn(), rm.images()
    else:
        torch.manual_seed(0)
        net, x = nn.Sequential(nn.Linear(6, 16), nn.PReLU(16), nn.Linear(16, 3)), rm.data()
        with torch.no_grad():
            net[0].weight[[1, 3]] = 0.0  # constant units: removable from a PReLU site
    net.eval()
    report = deadrelu.scan(net, x)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    result = prune_dead(net, report, data=x if with_data else None)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result.units_removed > 0
    with torch.no_grad():
        assert (result.model(x) - net(x)).abs().max() <= 1e-5  # every value of the new layers was copied
    assert all(torch.isfinite(t).all() for t in list(result.model.parameters()) + list(result.model.buffers()))
