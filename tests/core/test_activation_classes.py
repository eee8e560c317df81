"""Activations by what they are: hand-written activation classes of transformers and timm are one
site each (recognised by class name, nothing imported), users register their own, look-alikes that
nobody registered are listed, and TorchScript keeps PReLU/RReLU sites."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fixtures.models import brute_force, plant
from torch import nn

import deadrelu


# Same class names and arithmetic as transformers.activations / BLOOM / timm.layers.activations.
class NewGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class QuickGELUActivation(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class AccurateGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class BloomGelu(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class QuickGELU(nn.Module):  # timm / CLIP
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class HardMish(nn.Module):  # timm
    def forward(self, x):
        return 0.5 * x * (x + 2).clamp(min=0, max=2)


class GELUTanh(nn.Module):  # timm
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


HAND_WRITTEN = [NewGELUActivation, FastGELUActivation, QuickGELUActivation, AccurateGELUActivation, BloomGelu,
                QuickGELU, HardMish, GELUTanh]  # fmt: skip
FUNCTIONS = ["gelu", "gelu", "quick_gelu", "gelu", "gelu", "quick_gelu", "hard_mish", "gelu"]


class HandWrittenNet(nn.Module):
    """Linear → one hand-written activation each; planted dead unit k+1 in layer k (bias -1000)."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(6, 6) for _ in HAND_WRITTEN)
        self.acts = nn.ModuleList(cls() for cls in HAND_WRITTEN)
        for k, fc in enumerate(self.fcs):
            plant(fc.bias, [k % 6])

    def forward(self, x):
        return torch.stack([act(fc(x)) for fc, act in zip(self.fcs, self.acts)]).sum(0)


def test_model_made_of_hand_written_activations_has_one_site_each():
    torch.manual_seed(0)
    model = HandWrittenNet().eval()
    x = torch.randn(50, 6)
    report = deadrelu.scan(model, x, batch_size=16)
    assert [s.name for s in report.sites] == [f"acts.{k}" for k in range(len(HAND_WRITTEN))]
    assert [s.function for s in report.sites] == FUNCTIONS
    with torch.no_grad():
        for k, site in enumerate(report.sites):
            truth = brute_force(model.acts[k](model.fcs[k](x)), -1)
            assert list(site.fired_counts) == truth["fired"]
            assert site.observations == truth["observations"] == 50
            assert site.dead_units == truth["dead"] == (k % 6,)
            assert site.unit_axis_source == "producer:Linear"


def test_mixed_vit_gpt2_style_model_loses_no_site():
    class Enc(nn.Module):  # ViT MLP: nn.GELU
        def __init__(self, d_in):
            super().__init__()
            self.fc = nn.Linear(d_in, 8)
            self.act = nn.GELU()

        def forward(self, x):
            return self.act(self.fc(x))

    class Dec(nn.Module):  # GPT-2 MLP: NewGELUActivation
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(8, 8)
            self.act = NewGELUActivation()

        def forward(self, x):
            return self.act(self.c_fc(x))

    model = nn.Sequential(Enc(4), Enc(8), Dec(), Dec(), Dec(), nn.GELU())
    report = deadrelu.scan(model, torch.randn(10, 3, 4))
    assert [s.name for s in report.sites] == ["0.act", "1.act", "2.act", "3.act", "4.act", "5"]
    assert [s.units for s in report.sites] == [8] * 6
    assert report.uncaptured == () and "not counted" not in str(report)


def test_register_activation_and_uncaptured_look_alikes():
    class SnakeAct(nn.Module):  # a user's own activation: x + sin^2(x), parameter-free
        def forward(self, x):
            return x + torch.sin(x) ** 2

    class ScaledSoftsign(nn.Module):  # not activation-like by name: never listed
        def forward(self, x):
            return x / (1 + x.abs())

    model = nn.Sequential(nn.Linear(3, 5), SnakeAct(), nn.Linear(5, 5), nn.ReLU(), ScaledSoftsign())
    report = deadrelu.scan(model, torch.randn(20, 3))
    assert [s.name for s in report.sites] == ["3"]
    assert report.uncaptured == ("1 (SnakeAct)",)
    assert deadrelu.Report.from_json(report.to_json()).uncaptured == ("1 (SnakeAct)",)
    assert "not counted: 1 module(s) look like activations but are not known to deadrelu: 1 (SnakeAct)" in str(report)

    deadrelu.register_activation(SnakeAct, "snake")
    report = deadrelu.scan(model, torch.randn(20, 3))
    assert [(s.name, s.function) for s in report.sites] == [("1", "snake"), ("3", "relu")]
    assert report.uncaptured == ()


def test_register_activation_by_name_without_importing():
    class ElementwiseSquash(nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x, 0.01 * torch.tanh(x))

    deadrelu.register_activation(f"{__name__}.ElementwiseSquash", "squash")
    report = deadrelu.scan(nn.Sequential(nn.Linear(2, 3), ElementwiseSquash()), torch.randn(9, 2))
    assert [(s.name, s.function, s.units) for s in report.sites] == [("1", "squash", 3)]
    with pytest.raises(TypeError):
        deadrelu.register_activation(42)


def test_activation_module_computing_with_relu_inside_is_one_site():
    class ReLUSquaredActivation(nn.Module):  # transformers: relu(x) ** 2
        def forward(self, x):
            return torch.square(F.relu(x))

    model = nn.Sequential(nn.Linear(4, 6), ReLUSquaredActivation())
    plant(model[0].bias, [2])
    x = torch.randn(30, 4)
    site = deadrelu.scan(model, x).sites
    assert [(s.name, s.function) for s in site] == [("1", "relu_squared")]
    with torch.no_grad():
        assert list(site[0].fired_counts) == brute_force(model(x), -1)["fired"]


def test_torchscript_keeps_prelu_and_rrelu_sites():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 6), nn.RReLU(), nn.Linear(6, 5), nn.ReLU6())
    plant(model[0].bias, [1])
    plant(model[2].bias, [3])
    model.eval()
    x = torch.randn(40, 4)
    eager = deadrelu.scan(model, x, batch_size=16)
    scripted = deadrelu.scan(torch.jit.script(model), x, batch_size=16)
    assert [s.function for s in scripted.sites] == ["prelu", "rrelu", "relu6"] == [s.function for s in eager.sites]
    for a, b in zip(eager.sites, scripted.sites):
        assert (a.units, a.observations, a.fired_counts) == (b.units, b.observations, b.fired_counts)
    assert scripted.sites[0].dead_units == (1,)
    assert 3 in scripted.sites[1].dead_units


def test_parameters_through_an_activation_are_not_sites():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.log_scale = nn.Parameter(torch.zeros(4))
            self.register_buffer("offset", torch.ones(4))

        def forward(self, x):
            return F.relu(self.fc(x)) * F.softplus(self.log_scale) + F.relu(self.offset)

    report = deadrelu.scan(Scaled(), torch.randn(12, 3))
    assert [(s.name, s.units, s.observations) for s in report.sites] == [("<root>:relu", 4, 12)]


class XIELUActivation(nn.Module):
    """transformers.activations.XIELUActivation's Python path (the Apertus FFN): learned scalar coefficients."""

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.log(torch.expm1(torch.tensor([0.8]))))
        self.alpha_n = nn.Parameter(torch.log(torch.expm1(torch.tensor([0.8 - 0.5]))))
        self.beta, self.eps = 0.5, -1e-6

    def forward(self, x):
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.clamp(x, max=self.eps)) - x) * alpha_n + self.beta * x)  # fmt: skip


def test_xielu_with_its_learned_coefficients_is_a_site():
    # It has parameters, so it was neither a site nor listed as uncaptured: its units went unseen
    # (and an Apertus model had no activation site at all).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), XIELUActivation(), nn.Linear(8, 8), nn.ReLU())
    plant(model[0].bias, [0, 3, 5])
    x = torch.randn(64, 4)
    report = deadrelu.scan(model, x)
    assert [(s.name, s.function, s.units) for s in report.sites] == [("1", "xielu", 8), ("3", "relu", 8)]
    with torch.no_grad():
        hidden = model[1](model[0](x))
    truth = brute_force(hidden, -1)["fired"]
    assert list(report.sites[0].fired_counts) == truth
    # xIELU's negative branch grows again for large negative inputs: a planted bias does not kill it
    assert report.sites[0].dead_units == tuple(i for i, n in enumerate(truth) if n == 0)


def test_look_alikes_with_learned_slopes_are_listed_but_layers_and_norms_are_not():
    class LearnedSlopeAct(nn.Module):  # one slope per channel: still an activation
        def __init__(self):
            super().__init__()
            self.slope = nn.Parameter(torch.full((1, 5), 0.1))

        def forward(self, x):
            return torch.where(x > 0, x, self.slope * x)

    class ActNorm(nn.Module):  # Glow's per-channel affine normalisation: matches ^act, but no activation
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(5))

        def forward(self, x):
            return x * self.scale

    class GatedActivation(nn.Module):  # a weight matrix inside: a layer, not an activation
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.randn(5, 5))

        def forward(self, x):
            return x * torch.sigmoid(x @ self.gate)

    model = nn.Sequential(nn.Linear(3, 5), LearnedSlopeAct(), ActNorm(), GatedActivation(), nn.ReLU())
    report = deadrelu.scan(model, torch.randn(20, 3))
    assert report.uncaptured == ("1 (LearnedSlopeAct)",)
