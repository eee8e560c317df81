"""Monitor.state_dict / load_state_dict: a resumed run goes on with its steps, history and lifecycle."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import DeadReluError
from deadrelu.monitor.monitor import DeadUnitWarning


def planted_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].bias[:5] = -100.0  # five units dead from the start
    return net


def train(net: nn.Module, mon: deadrelu.Monitor, steps: int, kill_at: int | None = None) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(steps):
        g = torch.Generator().manual_seed(mon.steps)  # each step's batch, however the run was split
        if mon.steps == kill_at:
            with torch.no_grad():
                net[2].bias[:3] = -100.0  # three units die here
        loss = net(torch.randn(8, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain data only: safe checkpoints load it
    assert json.loads(json.dumps(loaded)) == loaded
    return loaded


def test_a_resumed_monitor_reports_what_one_uninterrupted_run_reports():
    options = dict(window=4, log_every=4, warn_at=(0.2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        net = planted_net()
        with deadrelu.Monitor(net, **options) as whole:
            train(net, whole, 24, kill_at=14)

        net = planted_net()
        with deadrelu.Monitor(net, **options) as first:
            train(net, first, 12)
        state = roundtrip(first.state_dict())
        resumed = deadrelu.Monitor(net, **options)
        resumed.load_state_dict(state)
        with resumed:
            train(net, resumed, 12, kill_at=14)

    assert resumed.steps == whole.steps == 24
    # window == log_every: each evaluation's window is the same four batches in both runs
    assert resumed.events == whole.events
    assert [(e.step, e.unit) for e in whole.events if e.kind == "born_dead" and e.site == "1"] == [(4, u) for u in range(5)]
    # killed before batch 15: the first window without a firing batch of them ends at step 20
    assert [(e.step, e.unit) for e in whole.events if e.site == "3" and e.unit < 3] == [(20, u) for u in range(3)]
    assert [a.site for a in resumed.alerts] == [a.site for a in whole.alerts] == ["1", "3"]  # each once
    assert resumed.history.steps == whole.history.steps
    assert str(resumed.events_summary()) == str(whole.events_summary())


def test_without_the_state_a_second_monitor_calls_the_dead_units_born_dead_again():
    # what load_state_dict prevents: the comparison that shows the test above can fail
    net = planted_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(net, window=4, log_every=4) as first:
            train(net, first, 8)
        with deadrelu.Monitor(net, window=4, log_every=4) as fresh:
            train(net, fresh, 8)
    assert fresh.steps == 8 and fresh.events_summary().born_dead == first.events_summary().born_dead == 6


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: "not a state", "not a deadrelu Monitor state"),
        (lambda s: {**s, "format": "other"}, "format='other'"),
        (lambda s: {**s, "version": 99}, "version 99"),
        (lambda s: {k: v for k, v in s.items() if k != "events"}, "lacks the entry 'events'"),
        (lambda s: {**s, "steps": -1}, "steps should be an int >= 0"),
        (lambda s: {**s, "steps": True}, "steps should be an int"),
        (lambda s: {**s, "events": [{"step": 1, "site": "x", "unit": 0, "kind": "zombie"}]}, "events\\[0\\].kind"),
        (lambda s: {**s, "events": [{"step": "1", "site": "x", "unit": 0, "kind": "died"}]}, "events\\[0\\].step"),
        (lambda s: {**s, "history": [{"step": 1}]}, "history\\[0\\]"),
        (lambda s: {**s, "known_dead": [[["m", 0], [1]]]}, "known_dead\\[0\\]"),
        (lambda s: {**s, "known_dead": [[s["known_dead"][0][0], [-3]]]}, "known_dead\\[0\\]"),
        (lambda s: {**s, "warned": [[s["known_dead"][0][0], 2.0]]}, "warned\\[0\\]"),
        (lambda s: {**s, "names": []}, "names should be a mapping"),
    ],
    ids=[
        "str", "format", "version", "missing", "negative", "bool", "kind", "step type", "row", "identity",
        "unit", "level", "names",
    ],
)  # fmt: skip
def test_a_malformed_state_is_one_error_and_changes_nothing(change, message):
    net = planted_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(net, window=4, log_every=4) as mon:
            train(net, mon, 8)
    good = mon.state_dict()
    before = (mon.steps, list(mon.events), list(mon.history.rows), str(mon.events_summary()))
    with pytest.raises(DeadReluError, match=message):
        mon.load_state_dict(change(good))
    assert (mon.steps, list(mon.events), list(mon.history.rows), str(mon.events_summary())) == before
    assert mon.state_dict() == good


def test_a_state_resumed_into_a_layer_of_another_width_starts_that_site_afresh_with_a_warning():
    net = planted_net()
    mon = deadrelu.Monitor(net, window=2, log_every=2).attach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        train(net, mon, 6)
    state = roundtrip(mon.state_dict())
    mon.detach()
    assert state["units"]["1"] == 16

    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        other[0].bias[:9] = 5.0  # every unit of the resized layer fires: nothing there is dead
    resumed = deadrelu.Monitor(other, window=2, log_every=2)
    resumed.load_state_dict(state)
    before = len(resumed.events)
    with pytest.warns(DeadUnitWarning, match=r"site '1' has 9 units, but the monitor state .* made for 16"):
        with resumed:
            train(other, resumed, 4)
    new = [e for e in resumed.events[before:] if e.site == "1"]
    assert new == []  # the old units' deaths are not read into the new units (no false "revived")
