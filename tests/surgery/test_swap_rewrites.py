"""swap_activations' torch.fx rewrite of a module whose forward calls F.relu keeps the module whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.errors import RefusedError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.aux = nn.Linear(6, 3)  # used only by aux_loss
        self.register_buffer("count", torch.zeros(1))
        self.extra = nn.Parameter(torch.ones(2))
        self.scale = 2.0

    def forward(self, x):
        return F.relu(self.a(x))

    def aux_loss(self, h):
        return self.aux(h).sum() * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_members_the_forward_does_not_read_survive_the_rewrite():
    torch.manual_seed(0)
    m = Net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = {id(p) for p in m.parameters()}
    h = torch.randn(3, 6)
    aux = m.block.aux_loss(h)
    deadrelu.swap_activations(m, to="leaky_relu", negative_slope=0.0)
    assert isinstance(m.block, torch.fx.GraphModule)
    assert set(m.state_dict()) == set(before)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert {id(p) for p in m.parameters()} == params  # an optimizer keeps training them all
    assert torch.equal(m.block.aux_loss(h), aux)
    assert [s.function for s in deadrelu.scan(m, torch.randn(8, 4)).sites] == ["leaky_relu"]


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return F.dropout(F.relu(self.a(x)), 0.5, training=self.training)


def test_a_forward_reading_self_training_is_refused_and_left_unchanged():
    m = nn.Sequential(Gated(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RefusedError, match="self.training"):
        deadrelu.swap_activations(m, to="gelu")
    assert type(m[0]) is Gated and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


class Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.a(x))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = self.second = Sub()

    def forward(self, x):
        return self.second(self.first(x))


def test_a_module_shared_by_two_paths_is_rewritten_once_at_both():
    m = Twice()
    deadrelu.swap_activations(m, to="gelu")
    assert m.first is m.second and isinstance(m.first, torch.fx.GraphModule)
    assert [s.function for s in deadrelu.scan(m, torch.randn(8, 4)).sites] == ["gelu", "gelu"]
