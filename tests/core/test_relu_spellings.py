"""A ReLU written another way is a ReLU site: ``x.clamp(min=0)`` (PyTorch's own tutorials write it
so), ``clamp_min(0)``, ``clip(min=0)``, ``F.threshold(x, 0, 0)``, ``nn.Threshold(0, 0)``, and
``clamp(0, 6)`` is a ReLU6. A clamp with other bounds, on integers or on a parameter is none.

Every count is checked against a brute-force recount of the same activations; rescue (prune,
reinit, swap) finds the same sites in its torch.fx trace, and TorchScript, torch.export and the
compiled monitor name them as the eager scan does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fixtures.models import brute_force, plant
from torch import nn

import deadrelu
from deadrelu.core.activations import called_activation


class Spelled(nn.Module):
    """Five ReLUs spelled five ways, a ReLU6 as a clamp, and clamps that are no activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.d, self.e, self.f = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.t = nn.Threshold(0.0, 0.0)
        self.scale = nn.Parameter(torch.ones(3))
        for layer, dead in ((self.a, [1]), (self.b, [0, 2]), (self.c, [3, 4, 5]), (self.d, [7]), (self.e, [2, 6]), (self.f, [0])):
            plant(layer.bias, dead)

    def forward(self, x):
        positions = torch.arange(6).clamp(min=0).sum() + (x[:, 0] > 0).long().clamp(min=0).sum()  # integers: no site
        h = self.a(x).clamp(min=0)
        h = torch.clamp_min(self.b(h), 0)
        h = F.threshold(self.c(h), 0.0, 0.0)
        h = self.t(self.d(h))
        h = torch.clip(self.e(h), min=0.0)
        h = torch.clamp(self.f(h), 0, 6)
        eps = x.clamp(min=1e-8).mean() * 0  # a numerical floor: no site
        return self.head(h) * self.scale.clamp(min=0) + eps + positions.sum() * 0  # a parameter: no site

    def activations(self, x):
        """The activations each site sees, recomputed with plain ops (ReLU is max(h, 0))."""
        out, h = [], x
        for layer in (self.a, self.b, self.c, self.d, self.e, self.f):
            h = layer(h)
            out.append(h)
            h = torch.maximum(h, torch.zeros_like(h))
            if layer is self.f:
                h = torch.minimum(h, torch.full_like(h, 6.0))
        return out


PLANTED = [(1,), (0, 2), (3, 4, 5), (7,), (2, 6), (0,)]
NAMES = ["<root>:relu.1", "<root>:relu.2", "<root>:relu.3", "t", "<root>:relu.4", "<root>:relu6"]


def make() -> Spelled:
    torch.manual_seed(0)
    return Spelled()


def data(n: int = 128) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(1))


def summary(report: deadrelu.Report) -> list[tuple]:
    return [(s.name, s.function, s.units, s.observations, s.fired_counts) for s in report.sites]


def test_each_spelling_is_a_site_counted_exactly():
    model, x = make(), data()
    report = deadrelu.scan(model, x)
    assert [s.name for s in report.sites] == NAMES
    assert [s.function for s in report.sites] == ["relu"] * 5 + ["relu6"]
    with torch.no_grad():
        truth = [brute_force(a, 1) for a in model.activations(x)]
    for site, want, planted in zip(report.sites, truth, PLANTED):
        assert site.fired_counts == tuple(want["fired"]) and site.observations == want["observations"]
        assert site.dead_units == want["dead"] == planted


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda h: h.clamp(0), "relu"),
        (lambda h: h.clamp(min=0.0, max=None), "relu"),
        (lambda h: h.clamp_(min=0), "relu"),
        (lambda h: h.clamp_min_(0), "relu"),
        (lambda h: h.clip(0, 6.0), "relu6"),
        (lambda h: F.threshold(h, 0, 0, True), "relu"),
        (lambda h: F.hardtanh(h, 0.0, 6.0), "relu6"),
        (lambda h: h.clamp(min=0, max=1), None),
        (lambda h: h.clamp(max=0), None),
        (lambda h: h.clamp(min=-1.0), None),
        (lambda h: F.threshold(h, 0.5, 0.0), None),
        (lambda h: F.threshold(h, 0.0, -1.0), None),
        (lambda h: h.clamp(min=torch.tensor(0.0)), None),  # a tensor bound is not read (a GPU sync)
    ],
    ids=["clamp(0)", "clamp(min=0., max=None)", "clamp_ in place", "clamp_min_", "clip(0, 6)", "threshold in place",
         "hardtanh(0, 6)", "clamp(0, 1)", "clamp(max=0)", "clamp(min=-1)", "threshold(0.5, 0)", "threshold(0, -1)",
         "tensor bound"],
)  # fmt: skip
def test_which_arguments_make_a_site(call, expected):
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 5)
            plant(self.fc.bias, [3])

        def forward(self, x):
            return call(self.fc(x))

    model, x = One(), torch.randn(32, 4)
    if expected is None:
        with pytest.raises(deadrelu.NoActivationSitesError):
            deadrelu.scan(model, x)
        return
    sites = deadrelu.scan(model, x).sites
    assert [s.function for s in sites] == [expected] and sites[0].dead_units == (3,)


def test_conv_channels_and_integer_or_parameter_inputs():
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            plant(self.conv.bias, [1, 4])
            self.gain = nn.Parameter(torch.full((6, 1, 1), -1.0))

        def forward(self, x):
            steps = (x.shape[-1] - torch.arange(9)).clamp(min=0)
            return self.conv(x).clamp(min=0) * self.gain.clamp_min(0) + steps.sum()

    model, x = Conv(), torch.randn(4, 3, 8, 8)
    (site,) = deadrelu.scan(model, x).sites
    assert site.unit_dim == 1 and site.units == 6 and site.dead_units == (1, 4)
    assert site.observations == 4 * 6 * 6


def test_called_activation_reads_arguments_only():
    assert called_activation("clamp", (None,), {"min": False}) is None  # a bool is no bound
    assert called_activation("clamp_min", (None, 0)) == "relu"
    assert called_activation("threshold", (None,), {"threshold": 0, "value": 0}) == "relu"
    assert called_activation("gelu", (None,)) == "gelu"
    assert called_activation("hardtanh", (None,)) == "hardtanh"


def test_prune_and_reinit_find_the_spelled_sites_in_their_trace():
    model, x = make(), data()
    report = deadrelu.scan(model, x)
    with torch.no_grad():
        before = model(x)
    result = deadrelu.prune_dead(model, report, data=x)
    pruned = result.model
    assert result.removed == dict(zip(NAMES, PLANTED))
    assert pruned.a.out_features == 7 and pruned.c.out_features == 5 and pruned.f.out_features == 7
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), before, rtol=0, atol=1e-5)
    again = deadrelu.scan(pruned, x)
    assert [s.dead for s in again.sites] == [0] * 6

    fresh = copy.deepcopy(model)
    deadrelu.reinit_dead(fresh, report, data=x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, rtol=0, atol=1e-5)
    assert fresh.a.weight[1].ne(model.a.weight[1]).any()  # the dead unit's row was drawn again


def test_swap_rewrites_spelled_relus_and_leaves_other_clamps():
    model, x = make(), data()
    result = deadrelu.swap_activations(model, to="leaky_relu", copy=True)
    assert len(result.changes) == 5  # four calls and the Threshold module; clamp(0, 6) is a ReLU6, not swapped
    assert isinstance(result.model.t, nn.LeakyReLU)
    new = result.model
    with torch.no_grad():
        h = x
        for layer in (model.a, model.b, model.c, model.d, model.e):
            h = F.leaky_relu(layer(h), 0.01)
        want = model.head(torch.clamp(model.f(h), 0, 6)) * model.scale.clamp(min=0)
        torch.testing.assert_close(new(x), want, rtol=0, atol=1e-6)
    assert [s.function for s in deadrelu.scan(new, x).sites] == ["leaky_relu"] * 5 + ["relu6"]


def test_an_in_place_threshold_call_is_swapped_in_place():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            F.threshold(h, 0.0, 0.0, True)  # the side effect is what the next line reads
            return h * 2

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = InPlace()

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model, x = Outer(), torch.randn(16, 4)
    deadrelu.swap_activations(model, to="elu")
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.elu(model.inner.fc(x)) * 2)


def test_a_softplus_of_a_parameter_leaves_the_rescue_slots_as_the_scan_counts_them():
    """The scan gives an activation of a parameter no slot; the fx trace did, so the next site's slot
    pointed at the softplus node and prune refused ('the traced graph has softplus there')."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
            self.raw = nn.Parameter(torch.zeros(2))
            plant(self.fc.bias, [2, 5])

        def forward(self, x):
            gain = F.softplus(self.raw.view(1, -1))
            return self.out(F.relu(self.fc(x))) * gain

    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(64, 4)
    report = deadrelu.scan(model, x)
    assert [s.name for s in report.sites] == ["<root>:relu"]
    with torch.no_grad():
        before = model(x)
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.removed == {"<root>:relu": (2, 5)} and result.model.fc.out_features == 6
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), before, rtol=0, atol=1e-6)


def test_torchscript_and_export_name_the_sites_as_eager():
    model, x = make(), data()
    eager = deadrelu.scan(model, x)
    exported = deadrelu.scan(torch.export.export(model, (x,)).module(), x)
    assert summary(exported) == summary(eager)
    scripted = deadrelu.scan(torch.jit.script(model), x)
    # TorchScript keeps no module calls to name sites by: every site is a call of the root
    assert [s.function for s in scripted.sites] == [s.function for s in eager.sites]
    assert [s.fired_counts for s in scripted.sites] == [s.fired_counts for s in eager.sites]


def test_the_monitor_counts_them_as_the_scan():
    model, x = make(), data()
    with deadrelu.Monitor(model, window=2, log_every=100) as mon:
        for batch in x.split(64):
            model(batch).sum().backward()
            mon.step()
        report = mon.report("total")
    assert summary(report) == summary(deadrelu.scan(model, x))
