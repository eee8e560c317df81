"""Live view: folding rule, terminal redraws bounded by rate, plain lines off a terminal."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu.monitor.monitor import DeadUnitWarning

rich = pytest.importorskip("rich")
from rich.console import Console  # noqa: E402

from deadrelu.monitor.live import LiveView, fold_states, summary_line  # noqa: E402


class FakeClock:
    """Deterministic time: the test moves it, so no test depends on wall-clock speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def net_and_batch(units: int = 6):
    lin = nn.Linear(units, units, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(units))
    # units 0-1 always fire, unit 2 fires once in 40 outputs (asleep), the rest never
    x = -torch.ones(40, units)
    x[:, :2] = 1.0
    x[0, 2] = 1.0
    return nn.Sequential(lin, nn.ReLU()), x


def drive(view: LiveView, clock: FakeClock, steps: int, dt: float) -> deadrelu.Monitor:
    net, x = net_and_batch()
    mon = deadrelu.Monitor(net, window=1, log_every=1, sinks=[view])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with mon:
            for i in range(steps):
                net(x).sum().backward()
                clock.now += dt
                mon.step(loss=float(i))
    return mon


def test_fold_states_majority_and_ties_to_worse():
    assert fold_states(["active"] * 3, 5) == (["active"] * 3, 1)
    states = ["active", "active", "dead", "asleep", "dead", "active", "dead", "dead"]
    assert fold_states(states, 4) == (["active", "dead", "dead", "dead"], 2)
    cells, per = fold_states(["active"] * 1000 + ["dead"] * 24, 512)
    assert per == 2 and len(cells) == 512 and cells[-12:] == ["dead"] * 12
    with pytest.raises(ValueError, match="max_cells"):
        fold_states(states, 0)


def test_terminal_view_draws_coloured_cells_and_respects_refresh_rate():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=60, color_system="truecolor")
    clock = FakeClock()
    view = LiveView(console=console, refresh_per_second=2.0, clock=clock)
    assert view.is_terminal
    drive(view, clock, steps=10, dt=0.1)  # 10 records within one second
    # at most 2 redraws per second of fake time (0.5 s apart) + the final state on close
    assert view.renders == 3
    text = out.getvalue()
    assert "step 10" in text and "loss 9" in text
    assert "6 units: 2 active, 1 asleep, 3 dead" in text
    assert "\x1b[" in text and "■" in text  # ANSI colours and cells


def test_renderable_folds_large_layers():
    net = nn.Sequential(nn.Linear(4, 300), nn.ReLU())
    seen = []
    with deadrelu.Monitor(net, window=1, log_every=1, sinks=[seen.append], warn_at=(1.0,)) as mon:
        net(torch.randn(8, 4)).sum().backward()
        mon.step()
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    view = LiveView(console=console, max_cells=100)
    console.print(view.renderable(seen[0]))
    text = out.getvalue()
    assert "3 units per cell" in text
    assert text.count("■") == 100 + 5  # the grid plus the 5 legend cells


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=200)
    clock = FakeClock()
    view = LiveView(console=console, plain_interval=1.0, clock=clock)
    assert not view.is_terminal
    mon = drive(view, clock, steps=10, dt=0.25)  # one line per second of fake time + the last
    lines = out.getvalue().splitlines()
    assert len(lines) == view.renders == 4
    assert lines[0].startswith("deadrelu step 1 | loss 0 | 1: 3/6 dead, 1 asleep")
    assert lines[-1].startswith("deadrelu step 10")
    assert "\x1b[" not in out.getvalue()
    assert mon.history.steps[-1] == 10


def test_summary_line_mentions_nonfinite():
    net = nn.Sequential(nn.Identity(), nn.ReLU())
    seen = []
    with deadrelu.Monitor(net, window=1, log_every=1, sinks=[seen.append], warn_at=(1.0,)) as mon:
        net(torch.tensor([[1.0, float("nan")]]))
        mon.step()
    assert summary_line(seen[0]) == "deadrelu step 1 | 1: 0/2 dead, 0 asleep, 1 nan/inf"


def test_monitor_live_flag_adds_a_view():
    net, _ = net_and_batch()
    mon = deadrelu.Monitor(net, live=True)
    assert isinstance(mon.sinks[-1], LiveView)


BAD_VIEW_OPTIONS = {
    "max_cells 0": ({"max_cells": 0}, r"max_cells must be a whole number of at least 1 \(cells per layer\), got 0"),
    "max_cells nan": ({"max_cells": float("nan")}, r"max_cells must be a whole number of at least 1 .*, got nan"),
    "max_cells text": ({"max_cells": "8"}, r"max_cells must be a whole number of at least 1 .*, got '8'"),
    "max_cells float": ({"max_cells": 8.0}, r"max_cells must be a whole number of at least 1 .*, got 8\.0"),
    "max_cells bool": ({"max_cells": True}, r"max_cells must be a whole number of at least 1 .*, got True"),
    "refresh 0": ({"refresh_per_second": 0}, r"refresh_per_second must be a finite number above 0, got 0"),
    "refresh negative": ({"refresh_per_second": -2.0}, r"refresh_per_second must be .*, got -2\.0"),
    "refresh nan": ({"refresh_per_second": float("nan")}, r"refresh_per_second must be .*, got nan"),
    "refresh inf": ({"refresh_per_second": float("inf")}, r"refresh_per_second must be .*, got inf"),
    "refresh text": ({"refresh_per_second": "4"}, r"refresh_per_second must be .*, got '4'"),
    "refresh bool": ({"refresh_per_second": True}, r"refresh_per_second must be .*, got True"),
    "refresh huge int": ({"refresh_per_second": 10**400}, r"refresh_per_second must be a finite number above 0, got 1000"),
    "interval negative": ({"plain_interval": -1}, r"plain_interval must be a finite number of seconds, 0 or more .*, got -1"),
    "interval nan": ({"plain_interval": float("nan")}, r"plain_interval must be .*, got nan"),
    "interval inf": ({"plain_interval": float("inf")}, r"plain_interval must be .*, got inf"),
    "interval text": ({"plain_interval": "30"}, r"plain_interval must be .*, got '30'"),
    "interval None": ({"plain_interval": None}, r"plain_interval must be .*, got None"),
    "clock": ({"clock": 0.0}, r"clock must be a callable that returns seconds, got 0\.0"),
}


@pytest.mark.parametrize("options, match", BAD_VIEW_OPTIONS.values(), ids=list(BAD_VIEW_OPTIONS))
def test_bad_live_options_are_one_clear_error_when_the_view_is_made(options, match):
    # max_cells=nan was taken and failed only at the first record (a SinkWarning, no view),
    # max_cells="8" was a bare TypeError, refresh_per_second=nan lifted the redraw limit.
    out = io.StringIO()
    with pytest.raises(deadrelu.DeadReluError, match="^" + match):
        LiveView(console=Console(file=out), **options)
    assert out.getvalue() == ""


def test_live_options_of_other_number_types_are_taken():
    np = pytest.importorskip("numpy")
    view = LiveView(console=Console(file=io.StringIO()), max_cells=np.int64(16), refresh_per_second=2, plain_interval=0)
    assert (view.max_cells, view.min_gap, view.plain_interval) == (16, 0.5, 0.0) and type(view.max_cells) is int
