"""The unit axis follows the data: each site's units are the feature axis its producing layer made,
checked against hand-computed activations of models with planted dead units."""

from __future__ import annotations

import pytest
import torch
from fixtures.models import UNIT_AXIS_MODELS, brute_force
import torch.nn.functional as F
from torch import nn

import deadrelu

SOURCES = {
    "ChannelsLastMLP": ["producer:Linear"],
    "PVTMlp": ["producer:conv"],
    "Wav2Vec2Features": ["producer:conv", "producer:conv"],
    "ConvGRU": ["producer:RNN"],
    "LinearAfterConv": ["producer:Linear"],
}


@pytest.mark.parametrize("make", list(UNIT_AXIS_MODELS), ids=lambda m: m.__name__)
def test_units_counts_and_dead_sets_match_hand_computed_truth(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*UNIT_AXIS_MODELS[make], generator=torch.Generator().manual_seed(1))
    report = deadrelu.scan(model, x, batch_size=7)
    with torch.no_grad():
        expected = model.activations(x)
    assert [s.name for s in report.sites] == [name for name, _, _ in expected]
    for site, (name, act, unit_dim) in zip(report.sites, expected):
        truth = brute_force(act, unit_dim)
        assert (site.units, site.observations) == (truth["units"], truth["observations"]), name
        assert list(site.fired_counts) == truth["fired"], name
        assert site.dead_units == truth["dead"] == model.planted[name], name
        assert site.unit_dim == unit_dim % act.ndim
    assert [s.unit_axis_source for s in report.sites] == SOURCES[make.__name__]


def test_channels_last_mlp_from_the_issue():
    from fixtures.models import ChannelsLastMLP

    report = deadrelu.scan(ChannelsLastMLP(), torch.randn(64, 4, 4, 8))
    site = report.sites[0]
    assert (site.units, site.dead, site.observations) == (32, 10, 64 * 16)


def test_rank_rule_is_the_fallback_and_says_so():
    # Raw input with no producer: the rank rule decides, and the site reports it.
    raw = deadrelu.scan(nn.Sequential(nn.ReLU()), torch.randn(10, 3, 5)).sites[0]
    assert (raw.units, raw.unit_axis_source) == (5, "rank rule")
    # A flatten that merges the feature axis away: the axis cannot be inferred.
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.ReLU())
    merged = deadrelu.scan(net, torch.randn(4, 2, 5, 5)).sites[0]
    assert (merged.units, merged.unit_axis_source) == (27, "rank rule")
    # A norm on raw channels-first input decides by itself.
    bn = deadrelu.scan(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), torch.randn(8, 3, 11)).sites[0]
    assert (bn.units, bn.unit_axis_source) == (3, "producer:norm")


def test_unit_dim_override_wins_and_is_recorded():
    from fixtures.models import ChannelsLastMLP

    site = deadrelu.scan(ChannelsLastMLP(), torch.randn(8, 4, 4, 8), unit_dim=1).sites[0]
    assert (site.units, site.unit_axis_source) == (4, "unit_dim override")


def test_layout_ops_move_the_axis():
    class Layouts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 7)

        def forward(self, x):  # x: (B, T, 3)
            h = self.fc(x)  # (B, T, 7): units on 2
            a = torch.relu(h.permute(2, 0, 1))  # (7, B, T): units on 0
            b = torch.relu(h.mT)  # (B, 7, T): units on 1
            c = torch.relu(h.unsqueeze(1).movedim(3, 0))  # (7, B, 1, T): units on 0
            d = torch.relu(h[:, 0])  # (B, 7): units on 1
            e = torch.relu(h.reshape(-1, 7).view(2, -1, 7))  # units on 2
            return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()

    report = deadrelu.scan(Layouts(), torch.randn(4, 5, 3))
    assert [(s.unit_dim, s.units) for s in report.sites] == [(0, 7), (1, 7), (0, 7), (1, 7), (2, 7)]
    assert {s.unit_axis_source for s in report.sites} == {"producer:Linear"}


def test_site_json_keeps_unit_axis_source():
    from fixtures.models import PVTMlp

    report = deadrelu.scan(PVTMlp(), torch.randn(4, 16, 5))
    again = deadrelu.Report.from_json(report.to_json())
    assert [s.unit_axis_source for s in again.sites] == ["producer:conv"]


def test_a_weight_multiplied_from_the_left_puts_its_rows_on_dim_minus_two():
    # Mamba's dt = dt_proj.weight @ h.transpose(1, 2): (B, out, T), the units are the weight's rows
    class LeftMatmul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.W = nn.Linear(4, 6), nn.Parameter(torch.randn(16, 6))
            with torch.no_grad():
                self.W[:3] = 0.0  # three rows that never fire (relu(0) = 0)

        def forward(self, x):
            return F.relu(self.W @ self.proj(x).transpose(1, 2))

    torch.manual_seed(0)
    data = [torch.randn(3, 7, 4), torch.randn(3, 9, 4)]  # two sequence lengths: T is no unit axis
    site = deadrelu.scan(LeftMatmul(), data).sites[0]
    assert (site.units, site.unit_dim, site.observations) == (16, 1, 3 * 7 + 3 * 9)
    assert site.dead_units == (0, 1, 2)

    class Reflected(nn.Module):  # the same product through Tensor.__rmatmul__
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 6))

        def forward(self, x):
            return F.relu(x.__rmatmul__(self.W))

    assert deadrelu.scan(Reflected(), [torch.randn(2, 6, 5)]).sites[0].units == 16
