"""swap_activations' torch.fx rewrite of a module whose forward calls F.relu keeps the module whole."""

from __future__ import annotations

import warnings

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


# -- swap_activations(report=...) says which of the report's ReLU sites it left ---------------------


class _Covered(nn.Module):
    """Every ReLU the scan finds is one swap rewrites: a reused module, a loop, a shared block, an
    activation attribute, a clamp spelling."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(8, 8))
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        self.loop = _Loop()
        self.again = self.loop  # one module at two paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        h = self.act(self.block(h))
        h = self.layer(h)
        return self.again(h).clamp(min=0)


class _Loop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            h = F.relu(self.fc(h))
        return h


def test_a_swap_covering_every_scanned_relu_site_leaves_none_and_warns_of_none():
    torch.manual_seed(0)
    net = _Covered().eval()
    x = torch.randn(4, 5, 6)
    report = deadrelu.scan(net, x)
    assert sum(s.function == "relu" for s in report.sites) >= 7  # two act calls, the layer, three loop calls, the clamp
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = deadrelu.swap_activations(net, report=report, copy=True)
    assert result.left_alone == ()
    assert all(s.function != "relu" for s in deadrelu.scan(result.model, x).sites)  # the claim, checked


class _Leaves(nn.Module):
    """A recurrent ReLU (inside torch's fused op) and a ReLU of one token's features: both sites of
    the scan that swap cannot rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.rnn = nn.RNN(8, 8, nonlinearity="relu", batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x))
        first = h[:, 0].clamp(min=0)  # (B, C): token 0's features, not a part of the feature axis
        return self.rnn(h)[0], first


def test_scanned_relu_sites_the_swap_cannot_rewrite_are_listed_and_warned_of():
    torch.manual_seed(0)
    net = _Leaves().eval()
    x = torch.randn(4, 5, 6)
    report = deadrelu.scan(net, x)
    relu_sites = {s.name for s in report.sites if s.function == "relu"}
    assert relu_sites == {"<root>:relu.1", "<root>:relu.2", "rnn"}
    with pytest.warns(UserWarning, match="left as they are") as caught:
        result = deadrelu.swap_activations(net, report=report, copy=True)
    assert len(result.left_alone) == 2
    root, rnn = sorted(result.left_alone, key=lambda line: line.startswith("rnn"))
    assert root.startswith("<root>: 1 of its 2 ReLU call(s) (<root>:relu.1, <root>:relu.2)") and "indexed slice" in root
    assert rnn.startswith("rnn (") and "fused RNN op" in rnn
    assert all(line in str(caught[0].message) for line in result.left_alone)
    assert all(f"left as it is: {line}" in str(result) for line in result.left_alone)
    # what is listed is what still computes ReLU after the swap
    after = [s for s in deadrelu.scan(result.model, x).sites if s.function == "relu"]
    assert len(after) == 2 and {s.module for s in after} == {"", "rnn"}


def test_without_a_report_nothing_is_listed():
    net = _Leaves().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = deadrelu.swap_activations(net, copy=True)
    assert result.left_alone == ()


# -- what a torch.fx rewrite would lose: refused, or kept ---------------------------------------------


class _SliceRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h[:, :4].relu_()  # rectifies half of h through a view that is never read again
        return self.out(h)


def test_an_in_place_relu_of_a_view_stays_in_place_and_rectifies_the_base():
    torch.manual_seed(0)
    net = nn.Sequential(_SliceRelu())
    x = torch.randn(16, 8)
    deadrelu.swap_activations(net, to="leaky_relu", negative_slope=0.01)
    block = net[0]
    with torch.no_grad():
        h = block.fc(x)
        expected = h.clone()
        expected[:, :4] = F.leaky_relu(h[:, :4], 0.01)
        assert torch.allclose(net(x), block.out(expected))
        assert not torch.allclose(net(x), block.out(h))  # before: the activation was gone


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.relu(self.fc(x))


class _Autocast(_NoGrad):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.relu(self.fc(x))


class _DecoratedNoGrad(_NoGrad):
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class _TrainingInHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, 0.5, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.fc(x)))


@pytest.mark.parametrize(
    "block, reason",
    [(_NoGrad, "torch.no_grad"), (_Autocast, "torch.autocast"), (_DecoratedNoGrad, "decorated by a grad-mode"),
     (_TrainingInHelper, "_TrainingInHelper.drop, called from _TrainingInHelper.forward\\) reads self.training")],
    ids=["no_grad", "autocast", "decorated", "training in a helper"],
)  # fmt: skip
def test_state_a_trace_would_drop_or_freeze_is_refused_and_changes_nothing(block, reason):
    net = nn.Sequential(block(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RefusedError, match=reason):
        deadrelu.swap_activations(net)
    assert type(net[0]) is block and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _FrozenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.fc(x)))


def test_a_rewrite_keeps_each_childs_training_flag():
    net = nn.Sequential(_FrozenNorm(), nn.Linear(8, 2)).train()
    net[0].bn.eval()  # a frozen BatchNorm inside a model in training
    deadrelu.swap_activations(net)
    assert net[0].training and not net[0].bn.training and net[0].fc.training
    mean = net[0].bn.running_mean.clone()
    net(torch.randn(16, 8))
    assert torch.equal(net[0].bn.running_mean, mean)
