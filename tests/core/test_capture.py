"""Exactness: deadrelu's per-unit statistics equal a brute-force reduction of every activation."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.models import PLANTED_MODELS, WrappedActivations, data_for

import deadrelu


def brute_force(act: torch.Tensor, unit_dim: int, threshold: float = 0.0) -> dict[str, object]:
    """Reduce a materialised activation by hand: per-unit counts over all other dims."""
    a = act.detach().movedim(unit_dim, -1).reshape(-1, act.shape[unit_dim]).double()
    fired = [(a[:, u] > threshold).sum().item() for u in range(a.shape[1])]
    return {
        "observations": a.shape[0],
        "fired": fired,
        "mean_abs": [a[:, u].abs().mean().item() for u in range(a.shape[1])],
        "dead": tuple(u for u, f in enumerate(fired) if f == 0),
    }


@pytest.mark.parametrize("make", PLANTED_MODELS, ids=lambda m: m.__name__)
def test_matches_brute_force_and_planted_dead_sets(make):
    model = make().eval()
    x = data_for(model)
    report = deadrelu.scan(model, x, batch_size=32)
    with torch.no_grad():
        expected = model.activations(x)
    assert [s.name for s in report.sites] == [name for name, _, _ in expected]
    for site, (name, act, unit_dim) in zip(report.sites, expected):
        truth = brute_force(act, unit_dim)
        assert site.units == act.shape[unit_dim]
        assert site.observations == truth["observations"], name
        assert list(site.fired_counts) == truth["fired"], name
        assert site.dead_units == truth["dead"], name
        for got, want in zip(site.mean_abs, truth["mean_abs"]):
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), name
        assert site.nonfinite == 0
    # The planted units are exactly the dead ones (no unit died by accident in these fixtures).
    for name, planted in model.planted.items():
        assert report.site(name).dead_units == planted, name


def test_reused_module_gives_one_site_per_call_with_its_own_width():
    from fixtures.models import Bottleneck

    report = deadrelu.scan(Bottleneck(), data_for(Bottleneck()), batch_size=40)
    widths = [(s.name, s.units, s.call) for s in report.sites]
    assert widths == [("relu#1", 4, 0), ("relu#2", 4, 1), ("relu#3", 16, 2)]


def test_unit_axis_rules():
    from fixtures.models import Conv1dNet, Conv2dBNNet, TransformerBlock

    assert [s.unit_dim for s in deadrelu.scan(Conv1dNet(), data_for(Conv1dNet())).sites] == [1, 1]
    assert [s.unit_dim for s in deadrelu.scan(Conv2dBNNet(), data_for(Conv2dBNNet())).sites] == [1, 1]
    t = deadrelu.scan(TransformerBlock(), data_for(TransformerBlock()))
    assert t.sites[0].unit_dim == 2 and t.sites[0].units == 48
    # observations per unit = batch × tokens
    assert t.sites[0].observations == 96 * 7


def test_unit_dim_override_per_site():
    from fixtures.models import Conv1dNet

    model = Conv1dNet()
    x = data_for(model)
    report = deadrelu.scan(model, x, unit_dim={"act1": -1})
    assert report.site("act1").unit_dim == 2 and report.site("act1").units == 20
    assert report.site("act2").unit_dim == 1
    with torch.no_grad():
        (_, a1, _), _ = model.activations(x)
    assert list(report.site("act1").fired_counts) == brute_force(a1, 2)["fired"]


def test_wrapper_and_other_activation_modules_are_sites():
    report = deadrelu.scan(WrappedActivations(), torch.randn(50, 4))
    assert [(s.name, s.function) for s in report.sites] == [("act1", "gelu"), ("act2", "silu"), ("act3", "elu")]


def test_threshold_for_non_relu_activations():
    model = WrappedActivations()
    x = torch.randn(200, 4)
    report = deadrelu.scan(model, x, threshold={"gelu": 0.5})
    with torch.no_grad():
        h = torch.nn.functional.gelu(model.fc1(x))
    assert report.site("act1").fire_threshold == 0.5
    assert list(report.site("act1").fired_counts) == (h > 0.5).sum(0).tolist()
    assert report.site("act2").fire_threshold == 0.0


def test_threshold_and_unit_dim_mappings_take_display_names_with_their_suffixes():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = torch.nn.Linear(6, 12), torch.nn.Linear(12, 12), torch.nn.ReLU()

        def forward(self, x):
            h = self.act(self.a(x))  # act#1
            h = self.act(self.b(h))  # act#2
            h = torch.nn.functional.relu(h - 0.1)  # <root>:relu.1
            return torch.nn.functional.relu(h - 0.2)  # <root>:relu.2

    torch.manual_seed(0)
    net, x = Net(), torch.randn(64, 6)
    names = [s.name for s in deadrelu.scan(net, x).sites]
    assert names == ["act#1", "act#2", "<root>:relu.1", "<root>:relu.2"]
    report = deadrelu.scan(net, x, threshold={"act#2": 0.25, "<root>:relu.2": 0.5})
    assert [s.fire_threshold for s in report.sites] == [0.0, 0.25, 0.0, 0.5]
    with torch.no_grad():
        h2 = net.act(net.b(net.act(net.a(x))))
    assert list(report.site("act#2").fired_counts) == (h2 > 0.25).sum(0).tolist()
    seq = deadrelu.scan(net, x.view(8, 8, 6), unit_dim={"act#2": 1, "<root>:relu.2": 1})
    assert [(s.unit_dim, s.unit_axis_source) for s in seq.sites] == [
        (2, "producer:Linear"), (1, "unit_dim override"), (2, "producer:Linear"), (1, "unit_dim override"),
    ]  # fmt: skip


def test_nan_units_are_their_own_state():
    class NanNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            h = self.fc(x)
            h = torch.cat([h[:, :1] * float("nan"), h[:, 1:2] * float("inf"), h[:, 2:]], dim=1)
            return torch.relu(h)

    net = NanNet()
    with torch.no_grad():
        net.fc.bias[3] = -1000.0
    report = deadrelu.scan(net, torch.randn(30, 3), batch_size=7)
    site = report.sites[0]
    # Unit 0 is NaN everywhere (NaN stays NaN through ReLU); unit 1 is +Inf wherever the
    # pre-activation is positive (and 0 elsewhere): both are non-finite, neither dead nor alive.
    assert site.nonfinite_units == (0, 1)
    assert site.nonfinite_counts[0] == 30
    assert site.states[3] == "dead"
    assert site.dead_units == (3,)
    assert 0 not in site.dead_units and 0 not in site.active_units


def test_dormant_score_follows_sokar_definition():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.01, 0.0], [0.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    site = deadrelu.scan(model, x, dormant_tau=0.025).sites[0]
    # E|h| = (1.5, 0.015, 0); layer mean 0.505 → scores (2.97, 0.0297, 0)
    assert site.dormancy[0] == pytest.approx(1.5 / 0.505)
    assert site.dormancy[1] == pytest.approx(0.015 / 0.505)
    assert site.dormant_units == (2,)
    assert deadrelu.scan(model, x, dormant_tau=0.05).sites[0].dormant_units == (1, 2)


def test_asleep_classification():
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU())
    x = torch.zeros(100, 3)
    x[:5, 0] = 1.0  # fires 5% → asleep (<= 5%)
    x[:6, 1] = 1.0  # fires 6% → active
    site = deadrelu.scan(model, x).sites[0]
    assert site.states == ("asleep", "active", "dead")
    assert site.firing_rate == (0.05, 0.06, 0.0)


def test_torchscript_and_export_give_same_counts_as_eager():
    from fixtures.models import MLP

    model = MLP().eval()
    x = data_for(model)
    eager = deadrelu.scan(model, x)
    scripted = deadrelu.scan(torch.jit.script(model), x)
    exported = deadrelu.scan(
        torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module(), x
    )
    assert [s.fired_counts for s in scripted.sites] == [s.fired_counts for s in eager.sites]
    assert [s.name for s in exported.sites] == [s.name for s in eager.sites]
    assert [s.fired_counts for s in exported.sites] == [s.fired_counts for s in eager.sites]


def test_probe_in_custom_loop_and_train_forward_with_grad():
    from fixtures.models import MLP

    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = data_for(model)
    with deadrelu.Probe(model) as probe:
        for xb in x.split(32):
            loss = model(xb).pow(2).mean()
            loss.backward()
            opt.step()
    report = probe.report()
    assert report.batches == 3
    assert report.site("1").dead_units == (2, 5, 7)
    assert report.mode == "train"


def test_relu6_module_is_captured_as_relu6():
    from fixtures.models import Conv2dBNNet

    site = deadrelu.scan(Conv2dBNNet(), data_for(Conv2dBNNet())).site("relu6")
    assert site.function == "relu6" and site.module_type == "ReLU6"


def test_large_counts_stay_exact():
    from deadrelu.core.stats import UnitStats

    s = UnitStats(2)
    s.observations = 10**10
    s.fired += torch.tensor([10**10 - 1, 0])
    s.update(torch.tensor([[1.0, 0.0]]), unit_dim=1)
    assert s.compute().fired_counts == (10**10, 0)
    assert s.compute().observations == 10**10 + 1


@pytest.mark.parametrize("unit_dim", [1, 2, 3, -1])
def test_any_unit_axis_and_memory_layout_matches_brute_force(unit_dim):
    from deadrelu.core.stats import UnitStats

    x = torch.randn(6, 5, 4, 3).relu()
    for layout in (x, x.to(memory_format=torch.channels_last), x.transpose(0, 2)):
        s = UnitStats(layout.shape[unit_dim])
        s.update(layout, unit_dim % layout.ndim, nonnegative=True)
        truth = brute_force(layout, unit_dim % layout.ndim)
        got = s.compute()
        assert list(got.fired_counts) == truth["fired"]
        assert got.mean_abs == pytest.approx(truth["mean_abs"], rel=1e-5)


def test_channels_last_model_matches_eager_layout():
    from fixtures.models import Conv2dBNNet

    model = Conv2dBNNet().eval()
    x = data_for(model)
    plain = deadrelu.scan(model, x)
    cl = deadrelu.scan(model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last))
    assert [s.fired_counts for s in cl.sites] == [s.fired_counts for s in plain.sites]


@pytest.mark.parametrize(
    "shape,unit_dim",
    [((40, 24, 36, 36), 1), ((3000, 400), 1), ((12, 300, 256), 2), ((3, 50, 9000), 1)],
    ids=["conv", "rows", "tokens", "one-row-chunks"],
)
@pytest.mark.parametrize("nonnegative", [True, False])
def test_large_activations_chunked_pass_matches_brute_force(shape, unit_dim, nonnegative, monkeypatch):
    # Activations above a million values take the chunked CPU pass; shrink its chunk so a
    # batch spans many chunks with a ragged last one, and compare with the plain reduction.
    from deadrelu.core import stats
    from deadrelu.core.stats import UnitStats

    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 40_000)
    monkeypatch.setattr(stats, "_CHUNK_MIN_ELEMENTS", 80_000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) - 0.5
    if nonnegative:
        x = x.relu()
    dead = [0, 3]
    x.select(unit_dim, dead[0]).fill_(0.0 if nonnegative else -1.0)
    x.select(unit_dim, dead[1]).fill_(0.0 if nonnegative else -2.0)
    s = UnitStats(shape[unit_dim], threshold=0.0 if nonnegative else 0.25)
    s.update(x, unit_dim, nonnegative=nonnegative)
    s.update(x[:1], unit_dim, nonnegative=nonnegative)  # a small batch takes the plain pass
    truth, small = brute_force(x, unit_dim, s.threshold), brute_force(x[:1], unit_dim, s.threshold)
    got = s.compute()
    assert list(got.fired_counts) == [a + b for a, b in zip(truth["fired"], small["fired"])]
    assert got.fired_counts[dead[0]] == got.fired_counts[dead[1]] == 0
    n_big, n_small = x.numel() // shape[unit_dim], x[:1].numel() // shape[unit_dim]
    expected_mean = [
        (a * n_big + b * n_small) / (n_big + n_small) for a, b in zip(truth["mean_abs"], small["mean_abs"])
    ]
    assert got.mean_abs == pytest.approx(expected_mean, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("kind", ["batch first", "bidirectional", "packed", "cell", "two layers"])
def test_relu_rnns_are_sites_of_their_hidden_units(kind):
    # nn.RNN(nonlinearity="relu") applies its ReLU inside one fused op: its outputs are the site.
    torch.manual_seed(0)
    hidden = 12
    if kind == "cell":
        rnn = torch.nn.RNNCell(4, hidden, nonlinearity="relu")
        with torch.no_grad():
            rnn.bias_ih[:3] = -1e3
    else:
        rnn = torch.nn.RNN(
            4, hidden, nonlinearity="relu", batch_first=kind != "packed",
            bidirectional=kind == "bidirectional", num_layers=2 if kind == "two layers" else 1,
        )  # fmt: skip
        with torch.no_grad():
            getattr(rnn, f"bias_ih_l{rnn.num_layers - 1}")[:3] = -1e3  # dead in the layer whose outputs are seen

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            if kind == "cell":
                return self.rnn(x[:, 0])
            if kind == "packed":
                seq = torch.nn.utils.rnn.pack_padded_sequence(x.transpose(0, 1), [5, 3, 2, 2], enforce_sorted=False)
                return self.rnn(seq)[0].data
            return self.rnn(x)[0]

    net = Net()
    x = torch.randn(4, 5, 4)
    with torch.no_grad():
        out = net(x)
    report = deadrelu.scan(net, x)
    (site,) = report.sites
    truth = brute_force(out, out.ndim - 1)
    assert site.name == "rnn" and site.function == "relu" and site.units == out.shape[-1]
    assert site.observations == truth["observations"] and list(site.fired_counts) == truth["fired"]
    assert set(range(3)) <= set(site.dead_units) and site.dead_units == truth["dead"]


def test_an_activation_of_a_parameter_or_its_view_is_no_site():
    class P(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.raw = torch.nn.Linear(4, 6), torch.nn.Parameter(torch.randn(6))
            self.register_buffer("gain", torch.randn(6))

        def forward(self, x):
            scale = torch.nn.functional.softplus(self.raw) * torch.nn.functional.softplus(self.raw.view(1, -1))
            return torch.relu(self.l(x)) * scale * torch.relu(self.gain.unsqueeze(0))

    report = deadrelu.scan(P(), torch.randn(10, 4))
    assert [(s.name, s.units, s.observations) for s in report.sites] == [("<root>:relu", 6, 10)]


def test_an_exported_program_names_its_sites_as_the_eager_model():
    class S(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act = torch.nn.Linear(6, 12), torch.nn.ReLU()

        def forward(self, x):
            h = self.act(self.a(x)) + torch.nn.functional.gelu(self.a(x)) + torch.nn.functional.relu(self.a(x))
            return h + self.act(self.a(x) - 1) + torch.nn.functional.relu(self.a(x) - 2)

    torch.manual_seed(0)
    model, x = S(), torch.randn(5, 6)
    exported = torch.export.export(model, (x,)).module()
    eager, program = deadrelu.scan(model, x), deadrelu.scan(exported, x)
    assert [s.name for s in program.sites] == [s.name for s in eager.sites] == [
        "act#1", "<root>:gelu", "<root>:relu.1", "act#2", "<root>:relu.2",
    ]  # fmt: skip
    assert [s.fired_counts for s in program.sites] == [s.fired_counts for s in eager.sites]


class _FunctionalReLUs(torch.nn.Module):
    """A functional ReLU and an nn.ReLU, with units 0 and 3 of the first planted dead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.act = torch.nn.Linear(4, 6), torch.nn.Linear(6, 5), torch.nn.ReLU()
        with torch.no_grad():
            self.a.weight[[0, 3]] = 0.0
            self.a.bias[[0, 3]] = -1.0

    def forward(self, x):
        return self.act(self.b(torch.nn.functional.relu(self.a(x))))


def test_a_second_capture_or_a_users_mode_still_sees_each_relu_call():
    # The capture computes a ReLU call with its counts in one kernel; with another capture (or any
    # torch-function mode) outside it, the call must still reach that one as a torch call: the
    # outer capture used to miss the functional site altogether.
    from torch.overrides import TorchFunctionMode

    from deadrelu.core.capture import ActivationCapture

    model, x = _FunctionalReLUs().eval(), torch.randn(12, 4)
    with torch.no_grad():
        first = torch.relu(model.a(x))
        truth = {"": brute_force(first, 1), "act": brute_force(torch.relu(model.b(first)), 1)}

    def counts(capture):
        return {s.info.module: (s.stats.observations, s.stats.compute().fired_counts) for s in capture.sites.values()}

    with ActivationCapture(model) as outer, ActivationCapture(model) as inner, torch.no_grad():
        model(x)
    for capture in (outer, inner):
        got = counts(capture)
        assert set(got) == set(truth)
        for name, want in truth.items():
            assert got[name] == (want["observations"], tuple(want["fired"])), name
    assert truth[""]["dead"] == (0, 3)

    class Seen(TorchFunctionMode):
        calls: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Seen() as seen, ActivationCapture(model) as capture, torch.no_grad():
        model(x)
    assert seen.calls.count("relu") == 2  # F.relu and nn.ReLU's, as without deadrelu
    assert counts(capture)[""] == (12, tuple(truth[""]["fired"]))
