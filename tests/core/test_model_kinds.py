"""Compiled models scan in any order, meta models get one line, scans leave compiled models working."""

from __future__ import annotations

import pytest
import torch
from fixtures.models import MLP, data_for
from torch import nn

import deadrelu


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
