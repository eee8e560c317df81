"""prune_dead and scan refuse a bad batch_size or tolerance with one DeadReluError, changing nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deadrelu


@pytest.mark.parametrize("options", [{"batch_size": 0}, {"batch_size": -1}, {"batch_size": 2.5}, {"tolerance": "a"}])
def test_prune_dead_refuses_bad_options(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:3] = -50.0
    x = torch.randn(32, 4)
    report = deadrelu.scan(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(deadrelu.DeadReluError, match="batch_size|tolerance"):
        deadrelu.prune_dead(model, report, data=x, **options)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("batch_size", [0, 2.5, "8"])
def test_scan_refuses_a_batch_size_that_is_not_a_whole_number(batch_size):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(deadrelu.DeadReluError, match="batch_size"):
        deadrelu.scan(model, torch.randn(8, 4), batch_size=batch_size)
