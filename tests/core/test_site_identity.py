"""Stable site identity: a site is (module path, call position in the source, function), so a
conditional call never shifts another site, and each call position counts its own observations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from fixtures.models import brute_force, plant
from torch import nn

import deadrelu


class Conditional(nn.Module):
    """``if x.shape[0] > 4: h = F.relu(h)`` before ``F.relu(fc2(h))``; planted dead: fc1 {1}, fc2 {0, 7}."""

    def __init__(self, width=12):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, width)
        plant(self.fc1.bias, [1])
        plant(self.fc2.bias, [0, 7])

    def forward(self, x):
        h = self.fc1(x)
        if x.shape[0] > 4:
            h = F.relu(h)
        return F.relu(self.fc2(h))

    def truth(self, batches):
        """Per call position, the activations it produced, batch by batch, by hand."""
        first, second = [], []
        for x in batches:
            h = x @ self.fc1.weight.T + self.fc1.bias
            if x.shape[0] > 4:
                h = h.clamp(min=0)
                first.append(h)
            second.append((h @ self.fc2.weight.T + self.fc2.bias).clamp(min=0))
        return torch.cat(first), torch.cat(second)


def test_conditional_call_has_its_own_site_and_count():
    model = Conditional().eval()
    g = torch.Generator().manual_seed(1)
    sizes = [8, 4, 8, 4, 3, 8]
    batches = [torch.randn(n, 6, generator=g) for n in sizes]
    report = deadrelu.scan(model, batches)
    with torch.no_grad():
        first, second = model.truth(batches)
    assert [s.name for s in report.sites] == ["<root>:relu.1", "<root>:relu.2"]
    cond, always = report.sites
    for site, act, units in ((cond, first, 10), (always, second, 12)):
        truth = brute_force(act, 1)
        assert (site.units, site.observations, list(site.fired_counts)) == (units, truth["observations"], truth["fired"])
    assert cond.observations == 24 and always.observations == sum(sizes)
    assert cond.dead_units == (1,) and always.dead_units == (0, 7)


def test_first_batch_without_the_conditional_call_does_not_shift_sites():
    model = Conditional().eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 6, generator=g) for n in (4, 8, 2, 8)]
    report = deadrelu.scan(model, batches)
    with torch.no_grad():
        first, second = model.truth(batches)
    by_units = {s.units: s for s in report.sites}
    assert list(by_units[12].fired_counts) == brute_force(second, 1)["fired"]
    assert list(by_units[10].fired_counts) == brute_force(first, 1)["fired"]
    assert (by_units[10].observations, by_units[12].observations) == (16, 22)


def test_loop_and_helper_positions_keep_readme_names():
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def act(self, h):
            return F.relu(h)

        def forward(self, x):
            for layer in self.layers:
                x = F.relu(layer(x))
            return self.act(x) + self.act(-x)

    report = deadrelu.scan(Looped(), torch.randn(10, 4))
    assert [s.name for s in report.sites] == [f"<root>:relu.{k}" for k in range(1, 6)]
    assert all(s.observations == 10 for s in report.sites)


class ConditionalModule(Conditional):
    """:class:`Conditional` with one ``nn.ReLU`` module called at both places (the first only for
    batches of more than 4 rows); ``width`` sets fc2's width; ``truth`` is the same."""

    def __init__(self, width=10):
        super().__init__(width)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.fc1(x)
        if x.shape[0] > 4:
            h = self.act(h)
        return self.act(self.fc2(h))


def _by_call(report):
    return {s.call: s for s in report.sites}


def test_conditionally_reused_module_keeps_each_call_site():
    # Same widths: keyed by call number, the second call of a batch that skipped the first
    # would have been counted into the first call's site without any error.
    for width in (10, 12):
        model = ConditionalModule(width).eval()
        g = torch.Generator().manual_seed(3)
        sizes = [4, 8, 3, 8, 2]
        batches = [torch.randn(n, 6, generator=g) for n in sizes]
        report = deadrelu.scan(model, batches)
        with torch.no_grad():
            first, second = model.truth(batches)
        assert len(report.sites) == 2
        # call numbers are given in first-seen order: the first batch reached only the second call
        late, always = _by_call(report)[1], _by_call(report)[0]
        for site, act in ((late, first), (always, second)):
            truth = brute_force(act, 1)
            assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])
        assert (late.observations, always.observations) == (16, sum(sizes))
        assert late.dead_units == (1,) and always.dead_units == (0, 7)


def test_conditionally_reused_block_keeps_each_call_site():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, h):
            return self.act(h) * 2

    class Model(ConditionalModule):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            h = self.fc1(x)
            if x.shape[0] > 4:
                h = self.block(h) / 2
            return self.block(self.fc2(h)) / 2

    model = Model().eval()
    g = torch.Generator().manual_seed(4)
    sizes = [3, 8, 8, 2, 5]
    batches = [torch.randn(n, 6, generator=g) for n in sizes]
    report = deadrelu.scan(model, batches)
    with torch.no_grad():
        first, second = model.truth(batches)
    sites = _by_call(report)
    assert set(sites) == {0, 1} and {s.module for s in report.sites} == {"block.act"}
    late, always = sites[1], sites[0]  # the first batch (3 rows) reached only the second call
    for site, act in ((late, first), (always, second)):
        truth = brute_force(act, 1)
        assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])
    assert late.dead_units == (1,) and always.dead_units == (0, 7)


def test_module_called_in_a_loop_numbers_its_calls_in_order():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            for _ in range(3):
                x = self.act(self.fc(x)) - 0.5
            return x

    model = Loop().eval()
    x = torch.randn(6, 4)
    report = deadrelu.scan(model, x)
    assert [s.name for s in report.sites] == ["act#1", "act#2", "act#3"]
    with torch.no_grad():
        h = x
        for site in report.sites:
            out = model.fc(h).clamp(min=0)
            assert list(site.fired_counts) == brute_force(out, 1)["fired"]
            h = out - 0.5


def test_a_module_called_from_observe_blocks_at_several_places_is_one_site():
    # Inside Monitor.observe() no module forward bounds the frames above a call: they are the
    # training loop's (Lightning reaches training_step by one path on accumulation batches and
    # another on step batches), so they must not split a layer into sites.
    outer = nn.Module()
    outer.net = nn.Sequential(nn.Linear(1, 4), nn.ReLU())
    with torch.no_grad():
        outer.net[0].weight.fill_(1.0)
        outer.net[0].bias.zero_()
    with deadrelu.Monitor(outer, window=100, log_every=1000) as mon:

        def step_a(x):
            with mon.observe(x):
                outer.net(x)

        def step_b(x):
            with mon.observe(x):
                outer.net(x)

        for k in range(6):  # step_a's batches fire every unit, step_b's none
            (step_a if k % 2 == 0 else step_b)(torch.full((8, 1), 1.0 if k % 2 == 0 else -1.0))
            mon.step()
        sites = mon.report("total").sites
    assert [(s.name, s.observations, s.dead) for s in sites] == [("net.1", 48, 0)]
    assert list(sites[0].fired_counts) == [24] * 4


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_calls_from_a_hook_of_a_reused_layer_keep_their_sites(functional):
    # The hook runs inside the layer's call (a layer deadrelu does not hook): the place of the
    # activation call is the hook *and* the layer's call site, so a conditional call never shifts.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()
            with torch.no_grad():
                self.lin.weight.copy_(torch.eye(4))
                self.lin.bias.zero_()
            self.lin.register_forward_hook(lambda m, i, o: F.relu(o) if functional else self.act(o))

        def forward(self, x):
            if x.shape[0] > 2:
                self.lin(-x)  # its activations never fire
            return self.lin(x)

    report = deadrelu.scan(M(), [torch.ones(2, 4), torch.ones(3, 4)])
    got = sorted((s.observations, tuple(s.fired_counts)) for s in report.sites)
    assert got == [(3, (0, 0, 0, 0)), (5, (5, 5, 5, 5))]


def test_a_conditional_call_many_helper_frames_deep_keeps_its_site():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def helper(self, h, depth):
            return self.act(h) if depth == 0 else self.helper(h, depth - 1)

        def forward(self, x):
            if x.shape[0] > 2:
                self.helper(-x, 12)
            return self.helper(x, 12)

    report = deadrelu.scan(Deep(), [torch.ones(2, 4), torch.ones(3, 4)])
    got = sorted((s.observations, tuple(s.fired_counts)) for s in report.sites)
    assert got == [(3, (0, 0, 0, 0)), (5, (5, 5, 5, 5))]


def test_a_torchscript_branch_that_skips_a_call_is_said_to_shift_the_scripted_sites():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] > 2:
                x = F.relu(self.a(x))
            return F.relu(self.b(x))

    scripted = torch.jit.script(Branchy())
    with pytest.warns(UserWarning, match=r"TorchScript model made 1 relu call\(s\) in one pass and 2 relu in another"):
        deadrelu.scan(scripted, [torch.randn(3, 4), torch.randn(2, 4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deadrelu.scan(scripted, [torch.randn(3, 4), torch.randn(5, 4)])  # the same calls every pass: nothing to say


def test_a_call_position_is_keyed_without_co_qualname_on_python_3_10():
    # Python 3.10's code objects have no co_qualname (3.11+): every scan failed there with
    # "AttributeError: 'code' object has no attribute 'co_qualname'", blamed on the model.
    from types import SimpleNamespace

    from deadrelu.core.capture import _stable_position

    code = SimpleNamespace(co_filename="m.py", co_firstlineno=3, co_name="forward")
    assert _stable_position(((code, 14),)) == "m.py:3:forward:14"


@pytest.mark.parametrize(
    "stack, path",
    [
        # torch >= 2.4 export: plain paths
        ({"L__self__": ("", "Seq"), "L__self___blocks_0": ("blocks.0", "Block"), "k": ("blocks.0.act", "ReLU")}, "blocks.0.act"),
        # torch 2.2: Dynamo sources
        ({"fn": ("L['fn']", "Seq"), "fn_1": ("getattr(L['fn'], '1')", "ReLU")}, "1"),
        # torch 2.6 export.save/load: the source mangled to 'getattr'; the key still spells it
        ({"L__self__": ("", "Seq"), "fn": ("L['fn']", "Seq"), "fn_3": ("getattr", "ReLU")}, "3"),
        ({"fn": ("L['fn']", "M"), "fn_blocks": ("L['fn'].blocks", "Seq"), "fn_blocks_0": ("getattr", "ReLU")}, "blocks.0"),
    ],
)
def test_an_exported_programs_recorded_module_path_is_read_in_each_torchs_spelling(stack, path):
    from deadrelu.core.capture import _recorded_path

    assert _recorded_path(stack) == path
