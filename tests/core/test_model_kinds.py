"""Compiled models scan in any order, meta models get one line, scans leave compiled models working."""

from __future__ import annotations

import pytest
import torch
from fixtures.models import MLP, data_for
from fixtures.toolchain import needs_inductor
from torch import nn

import deadrelu


@needs_inductor
def test_compiled_model_scans_after_an_earlier_scan_and_still_runs():
    model = MLP().eval()
    x = data_for(model)
    first = deadrelu.scan(model, x)
    compiled = torch.compile(model)
    again = deadrelu.scan(compiled, x, batch_size=16)
    third = deadrelu.scan(compiled, x, batch_size=50)
    for a, b, c in zip(first.sites, again.sites, third.sites):
        assert a.name == b.name == c.name
        assert a.fired_counts == b.fired_counts == c.fired_counts
        assert a.observations == b.observations == c.observations
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # no hook or mode left for Dynamo to trip on
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_meta_model_is_one_line_error():
    model = nn.Sequential(nn.Linear(3, 4, device="meta"), nn.ReLU())
    with pytest.raises(deadrelu.DeadReluError) as info:
        deadrelu.scan(model, torch.randn(5, 3))
    assert "meta device" in str(info.value) and "\n" not in str(info.value)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.enc(x)))


@needs_inductor
def test_a_model_with_a_compiled_block_scans_like_the_uncompiled_model():
    """``model.enc = torch.compile(model.enc)``: sites are named as in the plain model (no
    ``_orig_mod``), counted exactly, and the compiled block still runs compiled afterwards."""
    torch.manual_seed(0)
    plain = TwoBlocks().eval()
    with torch.no_grad():
        plain.enc[0].bias[:3] = -50.0  # planted dead units
    x = torch.randn(96, 4)
    expected = deadrelu.scan(plain, x, batch_size=32)
    model = TwoBlocks().eval()
    model.load_state_dict(plain.state_dict())
    model.enc = torch.compile(model.enc)
    got = deadrelu.scan(model, x, batch_size=32)
    assert [s.name for s in got.sites] == [s.name for s in expected.sites] == ["enc.1", "enc.3", "<root>:relu"]
    for a, b in zip(got.sites, expected.sites):
        assert a.fired_counts == b.fired_counts and a.observations == b.observations and a.dead_units == b.dead_units
    assert got.sites[0].dead_units == (0, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@needs_inductor
def test_probe_and_eager_monitor_run_a_compiled_block_eagerly_and_count_exactly():
    """Eager observation of a model with a compiled block: Dynamo must not trace the capture's
    hooks (it failed on them); observed passes run the block eagerly, unobserved ones compiled."""
    torch.manual_seed(0)
    plain = TwoBlocks()
    with torch.no_grad():
        plain.enc[0].bias[:3] = -50.0
    x = torch.randn(40, 4)
    expected = deadrelu.scan(plain, x, batch_size=40)
    model = TwoBlocks()
    model.load_state_dict(plain.state_dict())
    model.enc = torch.compile(model.enc)
    with deadrelu.Probe(model) as probe:
        with torch.no_grad():
            model(x)
    got = probe.report()
    assert [(s.name, s.fired_counts) for s in got.sites] == [(s.name, s.fired_counts) for s in expected.sites]
    with deadrelu.Monitor(model, compiled=False, window=1, log_every=100) as mon:
        model(x).sum().backward()
        mon.step()
        total = mon.report("total")
    assert [(s.name, s.fired_counts) for s in total.sites] == [(s.name, s.fired_counts) for s in expected.sites]
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))  # and it still runs compiled afterwards


@needs_inductor
def test_a_probe_on_a_compiled_model_counts_eagerly_and_names_sites_as_the_plain_model():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.b(self.a(x)))

    torch.manual_seed(0)
    plain = M()
    x = torch.randn(16, 4)
    expected = deadrelu.scan(plain, x)
    compiled = torch.compile(plain)
    with deadrelu.Probe(compiled) as probe:
        with torch.no_grad():
            compiled(x)
    got = probe.report()
    assert got.model == "M" and got.fingerprint == expected.fingerprint
    assert [(s.name, s.fired_counts) for s in got.sites] == [(s.name, s.fired_counts) for s in expected.sites]
    assert [s.name for s in got.sites] == ["a.1", "<root>:relu"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x))
