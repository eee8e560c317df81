"""Monitor: exact window/total counts, lifecycle events, history, warnings, schedule, hygiene, no interference."""

from __future__ import annotations

import warnings

import pytest
import torch
from fixtures.models import MLP
from fixtures.toolchain import needs_inductor
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deadrelu
from deadrelu.monitor.window import WindowStats
from deadrelu.errors import DeadReluError, NoActivationSitesError
from deadrelu.monitor.monitor import DeadUnitWarning, Event, History, HistoryRow


def identity_net(units: int = 3) -> nn.Sequential:
    """Linear(identity, no bias) → ReLU: unit i fires exactly when input column i is positive."""
    lin = nn.Linear(units, units, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(units))
    return nn.Sequential(lin, nn.ReLU())


def batch(*fires: bool, rows: int = 4) -> torch.Tensor:
    """A batch where column i is +1 on every row if fires[i], else -1."""
    return torch.tensor([[1.0 if f else -1.0 for f in fires]] * rows, requires_grad=False)


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def brute(model: MLP, xs: list[torch.Tensor]) -> dict[str, tuple[list[int], list[float], int]]:
    """Per site: fired counts, |h| sums and observations over ``xs``, from the hand-written forward."""
    out: dict[str, tuple[list[int], list[float], int]] = {}
    for x in xs:
        for name, h, _ in model.activations(x):
            fired = (h > 0).sum(0).tolist()
            mag = h.abs().double().sum(0).tolist()
            if name in out:
                f0, m0, n0 = out[name]
                out[name] = ([a + b for a, b in zip(f0, fired)], [a + b for a, b in zip(m0, mag)], n0 + h.shape[0])
            else:
                out[name] = (fired, mag, h.shape[0])
    return out


def test_window_and_total_counts_equal_brute_force():
    model = MLP()
    xs = [torch.randn(8 + i, 10) for i in range(7)]
    with deadrelu.Monitor(model, window=3, log_every=100) as mon:
        for x in xs:
            model(x).sum().backward()
            mon.step()
        window, total = mon.report("window"), mon.report("total")
    for scope_report, data in ((window, xs[-3:]), (total, xs)):
        expect = brute(model, data)
        for name, (fired, mag, n) in expect.items():
            site = scope_report.site(name)
            assert list(site.fired_counts) == fired
            assert site.observations == n
            assert site.mean_abs == pytest.approx([m / n for m in mag], rel=1e-5)
    assert set(window.site("1").dead_units) >= set(MLP.planted["1"])
    assert window.batches == 3 and total.batches == 7
    assert window.samples == sum(len(x) for x in xs[-3:]) and total.samples == sum(len(x) for x in xs)


def test_lifecycle_events_born_dead_died_revived():
    # unit 0 always fires, unit 1 fires only in batches 0 and 6, unit 2 never fires
    net = identity_net()
    plan = [(True, i in (0, 6), False) for i in range(9)]
    with deadrelu.Monitor(net, window=2, log_every=1, warn_at=(1.0,)) as mon:
        for fires in plan:
            net(batch(*fires)).sum().backward()
            mon.step()
    assert mon.events == [
        Event(2, "1", 2, "born_dead"),
        Event(3, "1", 1, "died"),
        Event(7, "1", 1, "revived"),
        Event(9, "1", 1, "died"),
    ]
    summary = mon.events_summary()
    assert (summary.born_dead, summary.died, summary.revived) == (1, 2, 1)
    assert summary.sites[0].died_steps == (3, 9) and summary.sites[0].dead_now == 2
    assert "1 unit(s) born dead, 2 died, 1 revived" in str(summary)


def brute_lifecycle(plan):
    """Events from per-evaluation unit states ("fire", "quiet", "nan"), by the rules, on Python sets."""
    known_dead: set[int] = set()
    known_alive: set[int] = set()
    events = []
    for step, states in enumerate(plan, start=1):
        dead = {u for u, x in enumerate(states) if x == "quiet"}
        alive = {u for u, x in enumerate(states) if x == "fire"}
        fresh = dead - known_dead
        events += [Event(step, "1", u, "born_dead") for u in sorted(fresh - known_alive)]
        events += [Event(step, "1", u, "died") for u in sorted(fresh & known_alive)]
        events += [Event(step, "1", u, "revived") for u in sorted(known_dead & alive)]
        known_dead, known_alive = (known_dead - alive) | dead, (known_alive - dead) | alive
    return events


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["fire", "quiet", "quiet", "nan"]), min_size=5, max_size=5), min_size=1, max_size=8))
def test_lifecycle_events_equal_the_rules_on_python_sets(plan):
    # window=1, log_every=1: each step's batch is one evaluation; NaN units are neither dead nor
    # alive there, so they start and end nothing.
    class Scale(nn.Module):  # elementwise, so a NaN input stays in its own unit (a matmul would spread it)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    net = nn.Sequential(Scale(), nn.ReLU())
    value = {"fire": 1.0, "quiet": -1.0, "nan": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(net, window=1, log_every=1) as mon:
            for states in plan:
                net(torch.tensor([[value[x] for x in states]] * 3))
                mon.step()
    assert mon.events == brute_lifecycle(plan)
    summary = mon.events_summary().sites[0]
    assert summary.dead_now == plan[-1].count("quiet")
    state = mon.state_dict()  # the lifecycle memory travels as index sets and goes on the same way
    resumed = deadrelu.Monitor(net, window=1, log_every=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


def test_one_quiet_batch_does_not_kill_a_unit():
    net = identity_net(2)
    with deadrelu.Monitor(net, window=3, log_every=1, warn_at=(1.0,)) as mon:
        for fires in [(True, True), (True, False), (True, True), (True, False), (True, False)]:
            net(batch(*fires)).sum().backward()
            mon.step()
    # unit 1 was quiet in single batches but fired within every 3-batch window until step 5
    assert mon.history.series("1", "dead") == ([1, 2, 3, 4, 5], [0.0, 0.0, 0.0, 0.0, 0.0])
    assert mon.events == []


def test_history_rows_are_window_fractions_with_loss():
    net = identity_net(4)
    with deadrelu.Monitor(net, window=2, log_every=2, warn_at=(1.0,)) as mon:
        for i in range(6):
            out = net(batch(True, i % 2 == 0, False, False)).sum()
            out.backward()
            mon.step(loss=torch.tensor(float(i)))
    assert isinstance(mon.history, History)
    assert mon.history.steps == [2, 4, 6]
    row = mon.history.rows[-1]
    assert row == HistoryRow(6, "1", 4, 2, active=0.5, asleep=0.0, dead=0.5, dormant=0.5, nonfinite=0.0, loss=5.0)
    assert row.alive == 0.5
    assert mon.history.to_dicts()[0]["alive"] == 0.5
    with pytest.raises(KeyError, match="no site 'nope'"):
        mon.history.series("nope")


def test_schedule_every_k_and_callable_and_no_grad_passes_ignored():
    net = identity_net(2)
    with deadrelu.Monitor(net, every=3, window=50, log_every=100) as mon:
        for _ in range(7):  # steps 0..6: observed 0, 3, 6
            net(batch(True, True)).sum().backward()
            with torch.no_grad():
                net(batch(True, True))  # an evaluation pass: never observed
            mon.step()
        assert mon.report().batches == 3
    odd = deadrelu.Monitor(net, every=lambda step: step % 2 == 1, window=50)
    with odd:
        for _ in range(6):  # observed 1, 3, 5
            net(batch(True, True)).sum().backward()
            odd.step()
        assert odd.report().batches == 3


def test_asleep_and_first_window_evaluated_even_off_log_interval():
    net = identity_net(2)
    with deadrelu.Monitor(net, window=3, log_every=10, warn_at=(1.0,)) as mon:
        for i in range(3):
            x = batch(True, False, rows=20)
            if i == 0:
                x[0, 1] = 1.0  # unit 1 fires once in 60 outputs: asleep at 5%
            net(x).sum().backward()
            mon.step()
        assert mon.history.steps == [3]  # first full window, not a multiple of log_every
        report = mon.report()
    assert report.sites[0].asleep_units == (1,)
    assert mon.history.rows[0].asleep == 0.5


def test_warnings_once_per_layer_and_threshold_with_advice():
    net = identity_net(4)
    with pytest.warns(DeadUnitWarning) as caught:
        with deadrelu.Monitor(net, window=2, log_every=1) as mon:
            for _ in range(6):  # units 1..3 never fire: 75% born dead
                net(batch(True, False, False, False)).sum().backward()
                mon.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, DeadUnitWarning)]
    assert len(messages) == 2  # 20% and 50%, each once despite five evaluations
    assert "'1'" in messages[0] and "75.0%" in messages[0] and "initialisation" in messages[0]
    assert [a.level for a in mon.alerts] == [0.2, 0.5] and mon.alerts[0].cause == "born_dead"


def test_warning_for_units_that_die_during_training_advises_learning_rate():
    net = identity_net(2)
    with pytest.warns(DeadUnitWarning, match="learning rate") as caught:
        with deadrelu.Monitor(net, window=2, log_every=1, warn_at=(0.5,)) as mon:
            for i in range(5):
                net(batch(True, i < 2)).sum().backward()
                mon.step()
    assert len([w for w in caught if issubclass(w.category, DeadUnitWarning)]) == 1
    assert mon.alerts[0].cause == "died" and mon.alerts[0].step == 4


def test_hooks_removed_after_block_and_after_exception_and_detach_twice():
    model = MLP()
    before = hooks_of(model)
    x = torch.randn(5, 10)
    expected = model(x)
    mon = deadrelu.Monitor(model)
    with pytest.raises(RuntimeError, match="boom"):
        with mon:
            model(x).sum().backward()
            raise RuntimeError("boom")
    assert hooks_of(model) == before and not mon.attached
    mon.detach()
    mon.detach()
    with mon:
        assert hooks_of(model) > before
    assert hooks_of(model) == before
    assert torch.equal(model(x), expected)


def train(monitored: bool, steps: int = 12) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = [(torch.randn(8, 6), torch.randn(8, 1)) for _ in range(steps)]
    mon = deadrelu.Monitor(model, window=4, log_every=3, warn_at=(1.0,)) if monitored else None
    losses = []
    if mon:
        mon.attach()
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if mon:
            mon.step(loss)
    if mon:
        mon.detach()
        assert len(mon.history) > 0
    return losses, torch.get_rng_state()


def test_no_interference_identical_losses_and_rng_state():
    plain_losses, plain_rng = train(False)
    mon_losses, mon_rng = train(True)
    assert mon_losses == plain_losses
    assert torch.equal(mon_rng, plain_rng)


def test_report_before_data_and_bad_scope_are_errors():
    net = identity_net()
    with deadrelu.Monitor(net) as mon:
        with pytest.raises(NoActivationSitesError, match="has not observed"):
            mon.report()
        with torch.no_grad():
            net(batch(True, True, True))
        with pytest.raises(NoActivationSitesError):
            mon.report()  # a no-grad pass is not a training pass
        net(batch(True, True, True)).sum().backward()
        with pytest.raises(DeadReluError, match="scope must be 'window' or 'total'"):
            mon.report("epoch")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window": 0}, "window must be a positive int"),
        ({"every": 0}, "every must be a positive int or a callable"),
        ({"log_every": 1.5}, "log_every must be a positive int"),
        ({"warn_at": (0.2, 1.5)}, r"warn_at fractions must be in \(0, 1\]"),
        ({"on_sink_error": "ignore"}, "on_sink_error must be 'warn' or 'raise'"),
        ({"sinks": ["health.txt"]}, "cannot tell the log format"),
        ({"asleep_rate": 2.0}, "asleep_rate must be in"),
        # text from a config file was truthy: compiled="no" turned compiled mode on
        ({"compiled": "no"}, r"^compiled must be True, False or None, got 'no'$"),
        ({"distributed": "false"}, r"^distributed must be True, False or None, got 'false'$"),
        ({"live": "yes"}, r"^live must be True or False, got 'yes'$"),
    ],
)
def test_bad_options_raise_one_clear_error_and_attach_nothing(kwargs, message):
    net = identity_net()
    with pytest.raises(DeadReluError, match=message):
        deadrelu.Monitor(net, **kwargs)
    assert hooks_of(net) == 0


def test_not_a_module_is_rejected():
    with pytest.raises(DeadReluError, match="must be a torch.nn.Module"):
        deadrelu.Monitor("model")  # type: ignore[arg-type]


def test_final_evaluation_on_clean_exit_only():
    net = identity_net(2)
    with deadrelu.Monitor(net, window=2, log_every=10, warn_at=(1.0,)) as mon:
        for _ in range(3):
            net(batch(True, False)).sum().backward()
            mon.step()
    assert mon.history.steps == [2, 3]  # first full window, then the closing evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        mon2 = deadrelu.Monitor(net, window=2, log_every=10)
        with pytest.raises(ValueError):
            with mon2:
                net(batch(True, False)).sum().backward()
                mon2.step()
                raise ValueError
    assert mon2.history.steps == []


def test_nan_units_are_counted_as_nonfinite_not_dead():
    net = nn.Sequential(nn.Identity(), nn.ReLU())  # no mixing: a NaN stays in its own unit
    with deadrelu.Monitor(net, window=2, log_every=2, warn_at=(1.0,)) as mon:
        for _ in range(2):
            x = batch(True, True)
            x[0, 1] = float("nan")
            net(x)  # grad mode is on, so this counts as a training pass
            mon.step()
        site = mon.report().sites[0]
    assert site.nonfinite_units == (1,) and site.dead_units == ()
    assert mon.history.rows[-1].nonfinite == 0.5


@pytest.mark.parametrize("capture", ["function mode", "module hooks", pytest.param("graph", marks=needs_inductor)])
def test_observe_scope_follows_the_schedule(capture, monkeypatch):
    if capture == "module hooks":  # the compiled-mode fallback of a torch without effectful custom ops
        monkeypatch.setattr("deadrelu.monitor.graph_capture.graph_capture_available", lambda: False)
    if capture == "graph":
        from deadrelu.monitor.graph_capture import graph_capture_available

        if not graph_capture_available():
            pytest.skip("needs effectful custom ops")
        torch._dynamo.reset()
    outer = nn.Module()
    outer.net = identity_net(2)
    with deadrelu.Monitor(outer, every=2, window=10, compiled=capture != "function mode") as mon:
        net = torch.compile(outer.net) if capture == "graph" else outer.net
        for _ in range(5):  # steps 0, 2, 4 observed
            with mon.observe():
                net(batch(True, False))  # the root module itself is never called
            mon.step()
        report = mon.report()
    assert report.batches == 3 and report.sites[0].name == "net.1"
    assert report.sites[0].fired_counts == (12, 0)


@settings(max_examples=40, deadline=None)
@given(
    window=st.integers(1, 5),
    batches=st.integers(1, 9),
    shape=st.sampled_from([(3, 4), (2, 4, 3), (2, 4, 2, 2), (4,)]),
    threshold=st.sampled_from([0.0, 0.3, -0.2]),
    nonnegative=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_window_stats_equal_brute_force_over_random_sequences(window, batches, shape, threshold, nonnegative, seed):
    g = torch.Generator().manual_seed(seed)
    unit_dim = 1 if len(shape) >= 2 else 0
    units = shape[unit_dim]
    stats = WindowStats(units, threshold, "cpu", window)
    xs = []
    for _ in range(batches):
        x = torch.randn(shape, generator=g)
        if nonnegative:
            x = x.clamp(min=0)
        xs.append(x)
        stats.update(x, unit_dim, nonnegative=nonnegative)

    def brute(data):
        flat = [x.movedim(unit_dim, -1).reshape(-1, units) for x in data]
        allx = torch.cat(flat)
        return (allx > threshold).sum(0).tolist(), allx.abs().double().sum(0), allx.shape[0]

    for scope, data in (("window", xs[-window:]), ("total", xs)):
        t = stats.totals(scope)
        fired, mag, n = brute(data)
        assert t.fired.tolist() == fired
        assert t.observations == n and t.batches == len(data)
        assert torch.allclose(t.abs_sum, mag, rtol=1e-5)
        assert t.bad_batches.tolist() == [0] * units


def test_unobserved_units_are_their_own_state_in_history_logs_and_live_view(tmp_path):
    from deadrelu.monitor.live import summary_line

    net = identity_net(3)
    records = []
    path = tmp_path / "health.csv"
    with deadrelu.Monitor(net, window=2, log_every=2, min_observations=100, sinks=[records.append, str(path)]) as mon:
        for _ in range(2):
            net(batch(True, False, False))  # units 1 and 2 never fire, on 8 observations only
            mon.step()
    row = mon.history.rows[-1]
    assert (row.active, row.dead, row.unobserved) == (pytest.approx(1 / 3), 0.0, pytest.approx(2 / 3))
    assert "2 unobserved" in summary_line(records[-1])
    header, values = path.read_text().splitlines()[:2]
    assert header.split(",")[-1] == "unobserved" and float(values.split(",")[-1]) == pytest.approx(2 / 3)


def test_monitor_reports_name_lookalike_activations_it_did_not_count():
    class SnakeAct(nn.Module):  # a user's own activation, not registered
        def forward(self, x):
            return x + torch.sin(x) ** 2

    net = nn.Sequential(nn.Linear(3, 4), SnakeAct(), nn.Linear(4, 4), nn.ReLU())
    with deadrelu.Monitor(net, window=2, log_every=2) as mon:
        for _ in range(2):
            net(torch.randn(5, 3))
            mon.step()
        report = mon.report()
    assert [s.name for s in report.sites] == ["3"] and report.uncaptured == ("1 (SnakeAct)",)
    assert "not counted" in str(report)


def test_a_dead_unit_that_is_nan_or_unobserved_for_a_while_is_neither_revived_nor_died_again():
    def net() -> nn.Sequential:
        m = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        with torch.no_grad():
            m[0].weight.zero_()
            m[0].bias.copy_(torch.tensor([1.0, -1.0, 1.0]))  # unit 1 never fires
        return m

    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(model, window=2, log_every=2) as mon:
            for step in range(6):
                with torch.no_grad():
                    model[0].bias[1] = float("nan") if step in (2, 3) else -1.0  # NaN > 0 is false: no firing
                model(torch.randn(4, 2)).nan_to_num().sum().backward()
                mon.step()
        nan_events = [(e.step, e.kind) for e in mon.events if e.unit == 1]
        model = net()
        with deadrelu.Monitor(model, window=2, log_every=2, min_observations=10) as mon:
            for rows in (8, 8, 2, 2, 8, 8):  # steps 3-4: 4 observations in the window, too few to say dead
                model(torch.randn(rows, 2)).sum().backward()
                mon.step()
        unobserved_events = [(e.step, e.kind) for e in mon.events if e.unit == 1]
    assert nan_events == [(2, "born_dead")]
    assert unobserved_events == [(2, "born_dead")]


def test_each_sites_first_full_window_is_evaluated_even_when_another_filled_first():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Sequential(nn.Linear(2, 3), nn.ReLU())
            for m in (self.a[0], self.b[0]):
                with torch.no_grad():
                    m.weight.zero_()
                    m.bias.fill_(1.0)

        def forward(self, x, branch):
            h = self.a(x).sum()
            return h + self.b(x).sum() if branch else h  # b runs on odd steps only: its window fills later

    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(net, window=2, log_every=10) as mon:
            for step in range(10):
                with torch.no_grad():
                    net.b[0].bias[0] = -5.0 if step < 4 else 1.0  # dead over b's first window (steps 1, 3), then fires
                    net.b[0].bias[1] = -5.0 if step >= 5 else 1.0  # alive in that window, dies later
                net(torch.randn(4, 2), step % 2 == 1).backward()
                mon.step()
    events = [(e.step, e.unit, e.kind) for e in mon.events if e.site == "b.1"]
    assert events == [(4, 0, "born_dead"), (10, 1, "died"), (10, 0, "revived")]


@pytest.mark.parametrize("how", ["first call", "batch given", "root called inside"])
def test_samples_of_passes_observed_through_observe_are_counted_once(how):
    outer = nn.Module()
    outer.net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    outer.forward = lambda x: outer.net(x)
    with deadrelu.Monitor(outer, window=10) as mon:
        for _ in range(5):
            x = torch.randn(8, 2)
            with mon.observe({"x": x, "y": torch.zeros(8)} if how == "batch given" else None):
                h = outer(x) if how == "root called inside" else outer.net(x)
                (h.sum() + outer.net(x[:3]).sum()).backward()  # a second call: not more samples
            mon.step()
    total = mon.report("total")
    assert total.batches == 5 and total.samples == 40
    assert [(s.name, s.observations) for s in total.sites] == [("net.1#1", 40), ("net.1#2", 15)]


def test_a_failed_attach_closes_the_sinks_it_opened(tmp_path):
    from deadrelu.monitor.sinks import JSONLSink, Sink, SinkError

    class FailsToOpen(Sink):
        name = "fails-to-open"

        def open(self):
            raise OSError("no space")

        def write(self, record):
            pass

    jsonl = JSONLSink(tmp_path / "health.jsonl")
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    mon = deadrelu.Monitor(net, sinks=[jsonl, FailsToOpen()], on_sink_error="raise")
    with pytest.raises(SinkError, match="no space"):
        mon.attach()
    assert not mon.attached and hooks_of(net) == 0
    assert jsonl._fh is None or jsonl._fh.closed


def test_history_series_of_every_state_in_its_rows():
    net = identity_net()
    with deadrelu.Monitor(net, window=1, log_every=1, min_observations=100) as mon:
        net(batch(True, False, True)).sum().backward()
        mon.step()
    for state in ("active", "asleep", "dead", "dormant", "nonfinite", "unobserved", "alive"):
        steps, values = mon.history.series("1", state)
        assert steps == [1] and values == [getattr(mon.history.rows[0], state)]
    assert mon.history.series("1", "unobserved")[1] == [1 / 3]  # the silent unit on 4 < 100 observations


def test_torch_jit_trace_of_a_monitored_model_records_only_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    x = torch.randn(8, 4)
    plain = torch.jit.trace(model, x)
    with deadrelu.Monitor(model, window=2) as mon:
        traced = torch.jit.trace(model, x)  # its check re-traces: both traces must be the model's alone
        model(x).sum().backward()
        mon.step()
        assert mon.report().batches == 1  # the traced passes were not observed
    kinds = [[n.kind() for n in t.inlined_graph.nodes()] for t in (traced, plain)]
    assert kinds[0] == kinds[1]  # no statistics op recorded
    assert torch.equal(traced(x), plain(x))


def test_a_site_renamed_mid_run_keeps_its_lifecycle():
    # A second relu position that first runs at step 4 turns "<root>:relu" into "<root>:relu.1":
    # its dead units are born dead once, not again under the new name.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 6)
            with torch.no_grad():
                self.l.bias[:2] = -100.0

        def forward(self, x, late):
            h = torch.nn.functional.relu(self.l(x))
            return h + torch.nn.functional.relu(h) if late else h

    torch.manual_seed(0)
    net = Net()
    with deadrelu.Monitor(net, window=2, log_every=1, warn_at=()) as mon:
        for step in range(8):
            net(torch.randn(5, 4), step >= 4).sum().backward()
            mon.step()
    first_site = [(e.step, e.unit) for e in mon.events if e.kind == "born_dead" and e.site in ("<root>:relu", "<root>:relu.1")]
    assert {0, 1} <= {u for _, u in first_site} and all(step == 2 for step, _ in first_site)
    assert len(first_site) == len({u for _, u in first_site})  # each unit born dead once
    summary = {s.site: s for s in mon.events_summary().sites}
    assert set(summary) == {"<root>:relu.1", "<root>:relu.2"}  # events under the site's current name
    assert summary["<root>:relu.1"].born_dead == len(first_site)


def test_observe_with_a_batch_whose_size_cannot_be_read_counts_the_first_calls_input():
    from dataclasses import dataclass

    @dataclass
    class Batch:
        x: torch.Tensor

    outer = nn.Module()
    outer.net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with deadrelu.Monitor(outer, window=4) as mon:
        for _ in range(2):
            batch = Batch(torch.randn(5, 2))
            with mon.observe(batch):
                outer.net(batch.x).sum().backward()
            mon.step()
    assert mon.report("total").samples == 10


def test_a_model_called_with_keywords_only_counts_its_samples():
    class KeywordModel(nn.Module):  # called as Hugging Face models are: model(input_ids=..., labels=...)
        def __init__(self) -> None:
            super().__init__()
            self.l, self.r = nn.Linear(4, 6), nn.ReLU()

        def forward(self, input_ids=None, labels=None):
            return self.r(self.l(input_ids)).sum()

    model = KeywordModel()
    with deadrelu.Monitor(model, window=4) as mon:
        for rows in (5, 3):
            model(input_ids=torch.randn(rows, 4), labels=torch.zeros(rows)).backward()
            mon.step()
    assert mon.report("total").samples == 8


def test_a_nested_observe_block_is_part_of_the_outer_pass():
    outer = nn.Module()
    outer.net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with deadrelu.Monitor(outer, window=4) as mon:
        for _ in range(2):
            with mon.observe():
                h = outer.net(torch.randn(5, 2))
                with mon.observe(torch.zeros(7, 1)):  # e.g. a helper that opens its own block
                    h = h.sum() + outer.net(torch.randn(7, 2)).sum()
                h.backward()
            mon.step()
    total = mon.report("total")
    assert total.batches == 2 and total.samples == 10
    assert [(s.name, s.observations) for s in total.sites] == [("net.1#1", 10), ("net.1#2", 14)]


def test_samples_come_from_the_first_batched_tensor_however_the_model_is_called():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l, self.r = nn.Linear(2, 3), nn.ReLU()

        def forward(self, scale=None, inputs=None, input_ids=None):
            x = input_ids if input_ids is not None else inputs["x"]
            return self.r(self.l(x)).sum()

    net = Net()
    with deadrelu.Monitor(net, window=8) as mon:
        net(torch.tensor(2.0), {"x": torch.randn(5, 2)}).backward()  # a 0-D option first, a dict input
        mon.step()
        with mon.observe():
            net.l(torch.zeros(1, 2))  # noqa: hooks-free leaf: the counted call is the next one
            net(input_ids=torch.randn(4, 2)).backward()  # keywords only, inside observe()
        mon.step()
    assert mon.report("total").samples == 5 + 4


@pytest.mark.parametrize("warn_at", [0.5, ["a"], (0.0,), (1.5,)])
def test_a_bad_warn_at_is_one_deadrelu_error(warn_at):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(deadrelu.DeadReluError, match="warn_at"):
        deadrelu.Monitor(net, warn_at=warn_at)
    assert not net._forward_hooks and not net._forward_pre_hooks


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("whole", [True, False], ids=["model-checkpointed", "block-checkpointed"])
def test_an_activation_checkpoint_recompute_is_not_counted_twice(reentrant: bool, whole: bool):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.b = nn.Sequential(nn.Linear(16, 16), nn.ReLU())

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if whole else checkpoint(self.b, h, use_reentrant=reentrant)

    net = Net()
    seen: dict[str, list[torch.Tensor]] = {"a.1": [], "b.1": []}
    record = [False]

    def keep(name: str):
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            if record[0]:  # the training forward's outputs, not the recompute's
                seen[name].append(out.detach())

        return hook

    for name in seen:
        net.get_submodule(name).register_forward_hook(keep(name))
    with deadrelu.Monitor(net, window=10, log_every=100) as mon:
        for _ in range(3):
            x = torch.randn(5, 8, requires_grad=True)
            record[0] = True
            y = checkpoint(net, x, use_reentrant=reentrant) if whole else net(x)
            record[0] = False
            y.sum().backward()
            mon.step()
        report = mon.report("total")
    assert report.batches == 3 and report.samples == 15
    for site in report.sites:
        outs = torch.cat(seen[site.name])
        assert site.observations == outs.shape[0] == 15
        assert list(site.fired_counts) == (outs > 0).sum(0).tolist()


def test_a_large_window_costs_memory_only_for_the_batches_it_holds():
    # A window was a Python list of `window` sample counts made up front (window=10**9: 8 GB
    # before the first step, 10**30: an OverflowError), and every ring built views of all its
    # rows at the first batch (window=10**6: 3 GB and 20 s for one site of 8 units).
    import tracemalloc

    net = identity_net(2)
    with pytest.raises(DeadReluError, match="window must be at most"):
        deadrelu.Monitor(net, window=10**30)
    tracemalloc.start()
    try:
        deadrelu.Monitor(net, window=10**9, log_every=10**9)  # made, never filled
        big = WindowStats(2, 0.0, "cpu", window=200_000)
        big.update(torch.ones(3, 2), unit_dim=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak  # the 200 000-row ring's own tensors are not traced here
    assert big.totals("window").fired.tolist() == [3, 3]
    wide = nn.Sequential(nn.Linear(2, 4096), nn.ReLU())  # 10**9 rows of 4096 units: petabytes, refused at once
    mon = deadrelu.Monitor(wide, window=10**9)
    with pytest.raises(DeadReluError, match=r"cannot allocate a rolling window of 1000000000 batches .* smaller window="):
        with mon:
            wide(torch.randn(3, 2))
    assert hooks_of(wide) == 0


def test_a_window_longer_than_the_cached_row_views_counts_exactly():
    from deadrelu.monitor.window import _CACHED_ROWS

    window = _CACHED_ROWS + 7
    g = torch.Generator().manual_seed(0)
    stats = WindowStats(3, 0.0, "cpu", window)
    xs = [torch.randn(2, 3, generator=g) for _ in range(window + 40)]
    for x in xs:
        stats.update(x, unit_dim=1)
    for scope, data in (("window", xs[-window:]), ("total", xs)):
        t = stats.totals(scope)
        assert t.fired.tolist() == (torch.cat(data) > 0).sum(0).tolist()
        assert t.observations == 2 * len(data) and t.batches == len(data)


def test_forwards_from_several_threads_count_samples_only_for_the_passes_the_sites_saw():
    # One thread's forward is observed at a time; the others run unobserved. The samples must be
    # those of the observed passes (they were every thread's), so samples, batches and rows agree.
    import threading

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = deadrelu.Monitor(net, window=1000).attach()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        for _ in range(25):
            net(torch.randn(3, 4)).sum().backward()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mon.step()
    total = mon.report("total")
    mon.detach()
    assert total.sites[0].observations == 3 * mon.capture.forwards
    assert total.samples == total.sites[0].observations  # one row per sample, in the passes observed
