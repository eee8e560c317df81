"""prune_dead, reinit_dead and nudge_bias on the shapes real models come in.

Each model has planted dead units (a zero row and a bias of -1: dead for every input). The truth
is brute force: the outputs of an independent deep copy of the original, and "nothing was
changed" is a byte-for-byte comparison of every state_dict tensor (and the optimizer's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import RefusedError
from fixtures.models import same_state


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def plant(layer: nn.Module, units: list[int]) -> None:
    """Make ``units`` of ``layer`` dead for every input: zero incoming weights, bias -1."""
    with torch.no_grad():
        layer.weight[units] = 0
        layer.bias[units] = -1.0


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    plant(net[0], [1, 3])
    plant(net[2], [0, 5])
    return net


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- torch.compile's OptimizedModule at the root ------------------------------------------------
# scan and swap_activations looked through the wrapper; the other rescues traced the wrapper itself
# and refused with torch.fx's "Module [OptimizedModule] is missing the required forward function".


def test_prune_of_a_compiled_model_prunes_the_module_inside_and_stays_compiled():
    net = mlp()
    x = torch.randn(64, 6)
    expected = copy.deepcopy(net)(x)
    compiled = torch.compile(net, backend="eager")
    before = state(net)
    result = deadrelu.prune_dead(compiled, deadrelu.scan(compiled, x), data=x)
    assert type(result.model) is type(compiled)
    assert result.removed == {"1": (1, 3), "3": (0, 5)}
    assert result.model._orig_mod[0].out_features == 14 and result.model._orig_mod[2].in_features == 14
    with torch.no_grad():
        assert torch.allclose(result.model(x), expected, atol=1e-6)
    assert same_state(state(net), before)


def test_reinit_and_nudge_of_a_compiled_model_edit_the_parameters_it_runs_with():
    net = mlp()
    x = torch.randn(64, 6)
    compiled = torch.compile(net, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    compiled(x).sum().backward()
    opt.step()
    opt.zero_grad()
    report = deadrelu.scan(compiled, x)
    with torch.no_grad():
        expected = copy.deepcopy(net)(x)
    result = deadrelu.reinit_dead(compiled, report, opt, data=x, generator=torch.Generator().manual_seed(0))
    assert {c.site for c in result.changes} == {"1", "3"}
    assert result.optimizer_entries > 0
    assert not torch.equal(net[0].weight[[1, 3]], torch.zeros(2, 6))  # re-drawn in the module compile runs
    with torch.no_grad():
        assert torch.equal(compiled(x), expected)
    nudges = deadrelu.nudge_bias(compiled, report, value=0.5, sites=["1"])
    assert [(n.parameter, n.units) for n in nudges] == [("0.bias", (1, 3))]
    assert torch.equal(net[0].bias[[1, 3]], torch.full((2,), 0.5))
