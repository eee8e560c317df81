"""Regressions for the monitor bug hunt: odd site names in CSV, torn quoted CSV rows, sink classes,
steps after detach, a failed attach's files, NaN losses in the state, a model edited while attached."""

from __future__ import annotations

import csv
import json
import math
import os
import types
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import deadrelu
from deadrelu.errors import DeadReluError
from deadrelu.monitor import HistoryRow, LogRecord
from deadrelu.monitor import sinks as sinks_mod
from deadrelu.monitor.monitor import DeadUnitWarning
from deadrelu.monitor.sinks import CallbackSink, CSVSink, JSONLSink, Sink, SinkError, SinkWarning, TensorBoardSink

ODD_NAMES = ["a\rb", "c\nd", "e\r\nf", 'g"h', "i,j", "plain"]


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def named_relus(names: list[str]) -> nn.Sequential:
    net = nn.Sequential()
    for name in names:
        net.add_module(name, nn.ReLU())
    return net


def train(mon: deadrelu.Monitor, net: nn.Module, steps: int, loss: object = 1.0, width: int = 3) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with mon:
            for _ in range(steps):
                net(torch.randn(4, width, requires_grad=True)).sum().backward()
                mon.step(loss)


def parse_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def half_dead_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias[:4] = -50.0
    return net


# -- 1. CSV values with \r, \n, quotes or commas ------------------------------------------------------


def test_csv_rows_with_odd_site_names_parse_with_the_headers_width(tmp_path: Path):
    path = tmp_path / "h.csv"
    net = named_relus(ODD_NAMES)
    mon = deadrelu.Monitor(net, window=2, log_every=2, sinks=[path])
    train(mon, net, 4)
    rows = parse_csv(path)
    header = rows[0]
    assert tuple(header) == sinks_mod.CSV_COLUMNS
    assert all(len(r) == len(header) for r in rows), [len(r) for r in rows]
    sites = [r[header.index("site")] for r in rows[1:]]
    assert sites == [r.site for r in mon.history.rows] and set(sites) == set(ODD_NAMES)
    assert [int(r[0]) for r in rows[1:]] == [r.step for r in mon.history.rows]


# -- 2. a CSV torn inside a quoted value -------------------------------------------------------------


def test_csv_torn_at_any_point_of_a_quoted_row_is_repaired_before_appending(tmp_path: Path):
    path = tmp_path / "h.csv"
    net = named_relus(["two\nlines"])
    train(deadrelu.Monitor(net, window=2, log_every=2, sinks=[path]), net, 2)
    data = path.read_bytes()
    row_start = data.index(b"\n") + 1  # the one data row, after the header
    quote_open, quote_close = data.index(b'"', row_start), data.rindex(b'"')
    row = HistoryRow(6, "two\nlines", 3, 2, 1.0, 0.0, 0.0, 0.0, 0.0, loss=0.5)
    for cut in range(row_start + 1, len(data)):
        path.write_bytes(data[:cut])
        sink = CSVSink(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sink.open()
            sink.write(LogRecord(6, 0.5, (row,), (), None))
            sink.close()
        torn = [str(w.message) for w in caught if issubclass(w.category, SinkWarning) and "torn last record" in str(w.message)]
        rows = parse_csv(path)
        assert all(len(r) == len(sinks_mod.CSV_COLUMNS) for r in rows), (cut, path.read_bytes())
        assert rows[-1][:2] == ["6", "two\nlines"], cut
        if quote_open < cut <= quote_close:  # cut inside the quoted site name: always torn, always cut
            assert torn, cut
            assert path.read_bytes().startswith(data[:row_start]) and len(rows) == 2, cut


def test_repair_torn_tail_cuts_a_csv_that_ends_with_a_newline_inside_quotes(tmp_path: Path):
    path = tmp_path / "log.csv"
    whole = b'h\n1,"x\ny"\n'
    path.write_bytes(whole + b'2,"two\n')
    assert sinks_mod.repair_torn_tail(path, quoted=True) == len(b'2,"two\n')
    assert path.read_bytes() == whole
    assert sinks_mod.repair_torn_tail(path, quoted=True) == 0  # whole: left alone
    path.write_bytes(whole + b'2,"q""\n')  # a doubled quote inside an open value: still open
    assert sinks_mod.repair_torn_tail(path, quoted=True) == len(b'2,"q""\n') and path.read_bytes() == whole


# -- 3. a sink class instead of an instance ----------------------------------------------------------


@pytest.mark.parametrize("cls", [JSONLSink, CSVSink, TensorBoardSink, CallbackSink, dict])
def test_a_sink_class_is_refused_at_construction(tmp_path: Path, monkeypatch, cls):
    monkeypatch.chdir(tmp_path)
    net = half_dead_net()
    for spec in ([cls], cls, ["h.jsonl", cls]):
        with pytest.raises(DeadReluError, match=rf"not the class {cls.__name__}: pass an instance") as info:
            deadrelu.Monitor(net, sinks=spec)
        if isinstance(spec, list) and len(spec) == 2:
            assert str(info.value).startswith("sinks[1]: ")
    assert hooks_of(net) == 0 and os.listdir(tmp_path) == []


# -- 4. step() after the monitor was detached --------------------------------------------------------


def test_step_after_the_with_block_is_refused_and_changes_nothing(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=2, log_every=2, sinks=[path])
    train(mon, net, 4, width=4)
    before = (path.read_bytes(), list(mon.history.rows), list(mon.events), mon.steps)
    for _ in range(2):
        net(torch.randn(5, 4)).sum().backward()
        with pytest.raises(DeadReluError, match=r"mon.step\(\) after detach: the monitor is detached"):
            mon.step()
    assert (path.read_bytes(), list(mon.history.rows), list(mon.events), mon.steps) == before
    assert mon.sinks[0]._fh is None  # the log was not reopened
    # detach() then attach() goes on: the same file, the steps counted on
    mon.attach()
    for _ in range(2):
        net(torch.randn(5, 4)).sum().backward()
        mon.step()
    mon.detach()
    with pytest.raises(DeadReluError, match="detached"):
        mon.step()
    assert mon.history.steps == [2, 4, 6] and len(path.read_text().splitlines()) == 3


def test_finish_after_detach_with_steps_left_is_refused(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=2, log_every=10, sinks=[path]).attach()
    for _ in range(3):
        net(torch.randn(5, 4)).sum().backward()
        mon.step()
    mon.detach()
    before = path.read_bytes()
    with pytest.raises(DeadReluError, match=r"finish\(\) after detach"):
        mon.finish()
    assert path.read_bytes() == before and mon.sinks[0]._fh is None
    assert mon.report().sites[0].name == "1"  # what was observed can still be read


# -- 5. a failed attach leaves the files as they were ------------------------------------------------


def test_a_refused_sink_fails_attach_before_any_file_is_made_or_changed(tmp_path: Path):
    foreign = tmp_path / "notes.csv"
    foreign.write_text("my,own\ndata,1\n")
    torn = tmp_path / "old.jsonl"
    torn.write_bytes(b'{"step": 1}\n{"st')  # the first sink would cut this tail when it opens
    new = tmp_path / "health.jsonl"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    net = half_dead_net()
    mon = deadrelu.Monitor(net, sinks=[new, torn, foreign], on_sink_error="raise")
    with pytest.raises(SinkError, match="not a deadrelu CSV"):
        mon.attach()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert hooks_of(net) == 0 and not mon.attached


def test_a_sink_failing_to_open_removes_only_the_files_this_attach_created(tmp_path: Path):
    class Broken(Sink):
        def open(self):
            raise OSError("no space left")

        def write(self, record):
            pass

    old = tmp_path / "old.csv"
    net = half_dead_net()
    train(deadrelu.Monitor(net, window=2, log_every=2, sinks=[old]), net, 2, width=4)
    before = old.read_bytes()
    new = tmp_path / "health.jsonl"
    mon = deadrelu.Monitor(net, sinks=[new, old, Broken()], on_sink_error="raise")
    with pytest.raises(SinkError, match="no space left"):
        mon.attach()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"] and old.read_bytes() == before
    assert hooks_of(net) == 0
    # an empty file that was there before is not removed either
    new.write_bytes(b"")
    with pytest.raises(SinkError):
        deadrelu.Monitor(net, sinks=[new, Broken()], on_sink_error="raise").attach()
    assert new.exists() and new.read_bytes() == b""


def test_a_failed_attach_takes_back_the_tensorboard_folder_it_made_and_nothing_else(tmp_path: Path, monkeypatch):
    pytest.importorskip("tensorboard")

    class Broken(Sink):
        def open(self):
            raise OSError("no space left")

        def write(self, record):
            pass

    net = half_dead_net()
    fresh = tmp_path / "runs" / "exp1"
    with pytest.raises(SinkError, match="no space left"):
        deadrelu.Monitor(net, sinks=[TensorBoardSink(fresh), Broken()], on_sink_error="raise").attach()
    assert list(tmp_path.iterdir()) == []  # runs/ and runs/exp1 were made by the attach: both gone
    assert hooks_of(net) == 0
    # a folder with an earlier run's events keeps them, and gets no new event file
    old = tmp_path / "old"
    train(deadrelu.Monitor(net, window=2, log_every=2, sinks=[TensorBoardSink(old)]), net, 2, width=4)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert before
    with pytest.raises(SinkError):
        deadrelu.Monitor(net, sinks=[TensorBoardSink(old), Broken()], on_sink_error="raise").attach()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    # a file put beside the event file meanwhile keeps the folder as it is
    other = tmp_path / "other"
    sink = TensorBoardSink(other)

    class Sneaky(Broken):
        def open(self):
            (other / "notes.txt").write_text("mine")
            raise OSError("no space left")

    with pytest.raises(SinkError):
        deadrelu.Monitor(net, sinks=[sink, Sneaky()], on_sink_error="raise").attach()
    assert (other / "notes.txt").read_text() == "mine"
    # without log_dir, SummaryWriter's runs/<time>_<host> goes, and runs/ with it where it was new
    default = tmp_path / "cwd"
    default.mkdir()
    monkeypatch.chdir(default)
    with pytest.raises(SinkError):
        deadrelu.Monitor(net, sinks=[TensorBoardSink(), Broken()], on_sink_error="raise").attach()
    assert list(default.iterdir()) == []


# -- 6. NaN/Inf losses in the state ------------------------------------------------------------------


def _strict_json(state: object) -> str:
    return json.dumps(state, allow_nan=False)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_state_with_a_nonfinite_loss_is_strict_json_and_round_trips(tmp_path: Path, loss):
    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=2, log_every=2)
    train(mon, net, 4, loss=torch.tensor(loss), width=4)
    text = _strict_json(mon.state_dict())
    resumed = deadrelu.Monitor(net, window=2, log_every=2)
    resumed.load_state_dict(json.loads(text))
    saved, back = [r.loss for r in mon.history.rows], [r.loss for r in resumed.history.rows]
    assert len(back) == len(saved) and all(isinstance(v, float) for v in back)
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(saved, back))
    assert resumed.state_dict() == json.loads(text)  # the same state again, written the same way
    torch.save(mon.state_dict(), tmp_path / "state.pt")  # still plain data for weights_only loads
    assert torch.load(tmp_path / "state.pt", weights_only=True) == json.loads(text)


def test_transformers_callback_saves_strict_json_with_a_nan_loss(tmp_path: Path):
    pytest.importorskip("transformers")
    from deadrelu.integrations import DeadReluTrainerCallback

    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=2, log_every=2)
    train(mon, net, 2, loss=float("nan"), width=4)
    cb = DeadReluTrainerCallback(window=2, log_every=2)
    cb.monitor = mon
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    cb.on_save(types.SimpleNamespace(output_dir=str(tmp_path)), types.SimpleNamespace(global_step=2), None)
    text = (folder / cb.state_file).read_text()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    state = json.loads(text, parse_constant=refuse)
    assert state["history"][0]["loss"] == "nan"


# -- 7. the model edited while attached --------------------------------------------------------------


def test_an_activation_swapped_mid_run_is_one_clear_error_and_a_new_monitor_goes_on():
    torch.manual_seed(0)
    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=3, log_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with pytest.raises(DeadReluError, match=r"'1' \(ReLU replaced by LeakyReLU\).*new deadrelu.Monitor"):
            with mon:
                for i in range(12):
                    if i == 6:
                        deadrelu.swap_activations(net, to="leaky_relu")
                    net(torch.randn(5, 4)).sum().backward()
                    mon.step()
    assert mon.history.steps == [3, 6] and mon.steps == 9  # no evaluation reported the removed ReLU
    assert hooks_of(net) == 0 and not mon.attached
    # what the error says to do: a new monitor, going on from the old one's state
    new = deadrelu.Monitor(net, window=3, log_every=3)
    new.load_state_dict(mon.state_dict())
    with new:
        for _ in range(3):
            net(torch.randn(5, 4)).sum().backward()
            new.step()
    assert new.history.steps == [3, 6, 12]
    assert [(s.name, s.function) for s in new.report().sites] == [("1", "leaky_relu")]


def test_added_or_removed_activation_modules_are_noticed_but_plain_layers_are_not():
    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=1, log_every=1).attach()
    try:
        net(torch.randn(5, 4)).sum().backward()
        mon.step()
        net[2] = nn.Linear(8, 1)  # a plain layer replaced by another: no site can be there
        net(torch.randn(5, 4)).sum().backward()
        mon.step()
        assert mon.history.steps == [1, 2]
        net.append(nn.GELU())
        net(torch.randn(5, 4)).sum().backward()
        with pytest.raises(DeadReluError, match=r"'3' \(a new GELU\)"):
            mon.step()
        with pytest.raises(DeadReluError, match=r"'3' \(a new GELU\)"):
            mon.report()
        del net[3]
        del net[1]
        with pytest.raises(DeadReluError, match=r"changed while the monitor was attached \('1' \(a ReLU, removed\)\)"):
            mon.finish()
        assert mon.history.steps == [1, 2]
    finally:
        mon.detach()
    assert mon.report().sites[0].name == "1"  # detached: what was observed can still be read


def test_a_model_edited_between_construction_and_attach_is_refused_at_attach():
    net = half_dead_net()
    mon = deadrelu.Monitor(net)
    net[1] = nn.GELU()
    with pytest.raises(DeadReluError, match=r"changed since the monitor was made \('1' \(ReLU replaced by GELU\)\)"):
        mon.attach()
    assert hooks_of(net) == 0 and not mon.attached


# -- functional calls in an observe() block ----------------------------------------------------


class _Stepper(nn.Module):
    """A model whose training step applies a functional activation in its own code (no module call)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(1, 4)
        with torch.no_grad():
            self.net.weight.fill_(1.0)
            self.net.bias.zero_()  # every unit fires exactly on the positive inputs

    def training_step(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.net(x)).sum()


def _alternating(k: int) -> torch.Tensor:
    return torch.full((4, 1), 1.0 if k % 2 == 0 else -1.0)


def _observed_sites(mon: deadrelu.Monitor) -> list[tuple[str, int, int]]:
    return [(s.name, s.observations, s.dead) for s in mon.report("total").sites]


def test_a_functional_call_under_observe_is_one_site_whatever_loop_code_opened_the_block():
    # The with statement sits in one function reached from two loop branches (an accumulating
    # and a stepping batch): the frames above the with statement must not split the site.
    model = _Stepper()

    def run(mon: deadrelu.Monitor, x: torch.Tensor) -> torch.Tensor:
        with mon.observe(x):
            return model.training_step(x)

    def accumulate(mon, x):
        return run(mon, x)

    def optimise(mon, x):
        return run(mon, x)

    with deadrelu.Monitor(model, window=100, log_every=100, warn_at=()) as mon:
        for k in range(4):
            loss = (accumulate if k % 2 == 0 else optimise)(mon, _alternating(k))
            loss.backward()
            mon.step()
        assert _observed_sites(mon) == [("<root>:gelu", 16, 0)]


def test_observe_entry_bounds_the_positions_when_the_block_opens_outside_the_step():
    # A callback-style block: opened by one function, the step run by another (Lightning's
    # on_train_batch_start and training_step), reached by two routes.
    model = _Stepper()

    def via_a(x):
        return model.training_step(x)

    def via_b(x):
        return model.training_step(x)

    with deadrelu.Monitor(model, window=100, log_every=100, warn_at=()) as mon:
        for k in range(4):
            scope = mon.observe(_alternating(k), entry=model.training_step)
            scope.__enter__()
            try:
                loss = (via_a if k % 2 == 0 else via_b)(_alternating(k))
            finally:
                scope.__exit__(None, None, None)
            loss.backward()
            mon.step()
        assert _observed_sites(mon) == [("<root>:gelu", 16, 0)]


def test_a_helper_called_twice_in_an_observe_block_still_gives_two_sites():
    # The position still runs from the call up to the with statement: two calls of one helper
    # are two places in the step, as in a module's forward.
    lin = nn.Linear(3, 5)
    root = nn.Module()
    root.lin = lin

    def block(h):
        return torch.relu(h)

    with deadrelu.Monitor(root, window=10, log_every=100, warn_at=()) as mon:
        for _ in range(2):
            x = torch.randn(4, 3)
            with mon.observe(x):
                out = block(lin(x)) + block(-lin(x))
            out.sum().backward()
            mon.step()
        names = [s.name for s in mon.report("total").sites]
    assert len(names) == 2 and len(set(names)) == 2


def test_observe_entry_that_is_no_python_function_is_one_error():
    model = _Stepper()
    with deadrelu.Monitor(model, window=10, warn_at=()) as mon:
        with pytest.raises(DeadReluError, match="entry"):
            with mon.observe(entry=torch.relu):
                pass
        x = _alternating(0)
        with mon.observe(x):
            model.training_step(x).backward()
        mon.step()
        assert _observed_sites(mon) == [("<root>:gelu", 4, 0)]


# -- observe(): the grad-mode rule inside the block -------------------------------------------------


class _Online(nn.Module):
    """An online network and a target network (DQN / BYOL / mean teacher) with planted dead units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.online = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
        self.target = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        with torch.no_grad():
            self.online[0].bias[:2] = -50.0
            self.target[0].bias[:] = -50.0  # every target unit dead: a false alarm if it were counted


@pytest.mark.parametrize("off", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_a_pass_with_gradients_off_inside_observe_is_no_training_pass(off):
    m = _Online()
    x = torch.randn(4, 3)
    with deadrelu.Monitor(m, window=5) as mon:
        for _ in range(2):
            with mon.observe():
                with off():
                    m.target(torch.randn(5, 3))  # the target's pass, and a functional call of the block's own
                    torch.relu(torch.randn(5, 3))
                h = m.online(x)
                h.sum().backward()
            mon.step()
        report = mon.report()
    assert [(s.name, s.observations) for s in report.sites] == [("online.1", 8)]
    assert report.samples == 8  # the online pass's 4 rows, twice; not the target's 5
    fired = (m.online(x) > 0).sum(0) * 2
    assert list(report.sites[0].fired_counts) == fired.tolist() and report.sites[0].dead_units == (0, 1)


def test_a_reentrant_checkpoint_inside_observe_is_one_site_counted_once():
    import torch.utils.checkpoint as checkpoint

    m = _Online()
    x = torch.randn(4, 3, requires_grad=True)
    with deadrelu.Monitor(m, window=5) as mon:
        with mon.observe(x):
            h = checkpoint.checkpoint(m.online, x, use_reentrant=True)  # runs under no_grad, then again in backward
            h.sum().backward()
        mon.step()
        report = mon.report()
    assert [(s.name, s.observations) for s in report.sites] == [("online.1", 4)]
    assert list(report.sites[0].fired_counts) == (m.online(x) > 0).sum(0).tolist()


def _brute_events(plan: list[list[tuple[bool, ...]]], window: int, log_every: int) -> list[tuple[int, int, str]]:
    """Lifecycle events by the documented rules, on Python sets, from which unit fired in which batch.

    Evaluations: every ``log_every`` steps, and the step the window first fills. At a site's first
    evaluation its first full window (batches 1..window) is read first (born dead: dead there), then
    the current window; "fired since" spans every batch after the previous evaluation (or after the
    first window), also those that already left the window."""
    batches: list[tuple[bool, ...]] = []
    known_dead: set[int] = set()
    known_alive: set[int] = set()
    seen_at_eval, first_done, events = 0, False, []

    def apply(step: int, dead: set[int], alive: set[int], since: set[int]) -> None:
        nonlocal known_dead, known_alive
        fired = alive | since
        back = known_dead & fired
        fresh = dead - known_dead
        events.extend((step, u, "born_dead") for u in sorted(fresh - known_alive))
        events.extend((step, u, "died") for u in sorted(fresh & known_alive))
        events.extend((step, u, "revived") for u in sorted(back))
        events.extend((step, u, "died") for u in sorted(back & dead))
        known_dead, known_alive = (known_dead - fired) | dead, ((known_alive | fired) - dead) | alive

    units = len(plan[0][0]) if plan and plan[0] else 0

    def fired_in(bs: list[tuple[bool, ...]]) -> set[int]:
        return {u for u in range(units) if any(b[u] for b in bs)}

    for step, step_batches in enumerate(plan, start=1):
        batches += step_batches
        filled_now = not first_done and len(batches) >= window
        last = step == len(plan)  # leaving the with block evaluates a step not evaluated yet
        if not (filled_now or step % log_every == 0 or last) or len(batches) < window:
            continue
        if not first_done:
            alive = fired_in(batches[:window])
            apply(step, set(range(units)) - alive, alive, set())
            seen_at_eval, first_done = window, True
        alive = fired_in(batches[-window:])
        apply(step, set(range(units)) - alive, alive, fired_in(batches[seen_at_eval:]))
        seen_at_eval = len(batches)
    return events


@settings(max_examples=40, deadline=None)
@given(
    plan=st.lists(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=3), min_size=1, max_size=9),
    window=st.integers(1, 3),
    log_every=st.sampled_from([1, 2, 3, 5]),
)
def test_lifecycle_events_from_every_batch_with_several_forwards_per_step(plan, window, log_every):
    """Several forwards per step (gradient accumulation) and log_every steps holding more batches
    than the window: a unit that fired in the first full window was called born dead once the window
    slid on before the first evaluation, and a dead unit that fired only in batches that left the
    window before the next evaluation was never revived."""
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
    net = nn.Sequential(lin, nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(net, window=window, log_every=log_every) as mon:
            for step_batches in plan:
                for fires in step_batches:
                    net(torch.tensor([[1.0 if f else -1.0 for f in fires]] * 2)).sum().backward()
                mon.step()
    assert [(e.step, e.unit, e.kind) for e in mon.events] == _brute_events(plan, window, log_every)


class _FailsSometimes(nn.Module):
    """Two ReLU layers; with ``fail`` set the forward raises between them (as a too-large batch would)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.a1, self.l2, self.a2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        h = self.a1(self.l1(x))
        if self.fail:
            raise torch.cuda.OutOfMemoryError("simulated out of memory")
        out = self.a2(self.l2(h))
        return None if getattr(self, "returns_none", False) else out


@pytest.mark.parametrize("window", [2, 10])
def test_a_forward_that_raises_part_way_counts_nothing(window):
    """The 'skip the batch on out-of-memory' loop: the layers before the error took the failed
    batch (a1 had 76 observations and a2 12, samples 76)."""
    torch.manual_seed(0)
    net = _FailsSometimes()
    mon = deadrelu.Monitor(net, window=window, log_every=1).attach()
    good: list[torch.Tensor] = []
    for size in [4, 64, 4, 64, 4, 4]:
        x = torch.randn(size, 4)
        net.fail = size == 64
        try:
            net(x).sum().backward()
            good.append(x)
        except torch.cuda.OutOfMemoryError:
            pass
        mon.step()
    total, last = mon.report("total"), mon.report("window")
    mon.detach()
    with torch.no_grad():
        h1 = [net.a1(net.l1(x)) for x in good]
        h2 = [net.a2(net.l2(h)) for h in h1]
    for report, kept in ((total, slice(None)), (last, slice(-window, None))):
        for name, acts in (("a1", h1), ("a2", h2)):
            site, seen = report.site(name), torch.cat(acts[kept])
            assert site.observations == len(seen) and site.fired_counts == tuple((seen > 0).sum(0).tolist())
        assert report.samples == sum(len(x) for x in good[kept])


def test_a_forward_returning_none_inside_a_users_except_block_still_counts():
    """Only a call that raised is taken back: one run from an except block (a retry with a smaller
    batch) that returns None is a pass like any other."""
    net = _FailsSometimes()
    net.returns_none = True
    with deadrelu.Monitor(net, window=4) as mon:
        try:
            raise RuntimeError("the user's own error, being handled")
        except RuntimeError:
            net(torch.randn(3, 4))
        mon.step()
        assert mon.report("total").site("a2").observations == 3 and mon.report("total").samples == 3


def test_a_site_renamed_mid_run_keeps_one_history_series():
    """A second F.relu position that first runs later renames the first site ('<root>:relu' becomes
    '<root>:relu.1'): its history split in two series, the first under a name no site has any more."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.relu(self.l1(x))
            if x.shape[0] > 4:  # the README's example of a call position that runs for some batches only
                h = torch.nn.functional.relu(self.l2(h))
            return h

    net = Net()
    with deadrelu.Monitor(net, window=1, log_every=2) as mon:
        for size in (2, 2, 2, 2, 8, 8, 8, 8):
            net(torch.randn(size, 3)).sum().backward()
            mon.step()
        state = mon.state_dict()
    assert [r.site for r in mon.history if r.step == 2] == ["<root>:relu"]  # rows keep the name they had
    assert mon.history.sites == ["<root>:relu.1", "<root>:relu.2"]
    for name in ("<root>:relu", "<root>:relu.1"):
        assert mon.history.series(name)[0] == [1, 2, 4, 5, 6, 8]  # (1 and 5: each site's first full window)
    resumed = deadrelu.Monitor(net, window=1)
    resumed.load_state_dict(state)
    assert resumed.history.series("<root>:relu.1")[0] == [1, 2, 4, 5, 6, 8]
