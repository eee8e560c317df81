"""Sinks: JSONL/CSV content and append semantics, failing sinks, TensorBoard read-back, W&B via a fake module."""

from __future__ import annotations

import csv
import io
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu.monitor import sinks as sinks_mod
from deadrelu.errors import DeadReluError
from deadrelu.monitor.sinks import CSVSink, JSONLSink, SinkError, SinkWarning, TensorBoardSink, WandbSink


def half_dead_net() -> nn.Sequential:
    """Identity Linear → ReLU fed inputs whose columns 2 and 3 are always negative: half the units dead."""
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    return nn.Sequential(lin, nn.ReLU())


def run(mon: deadrelu.Monitor, net: nn.Module, steps: int) -> None:
    x = torch.tensor([[1.0, 2.0, -1.0, -1.0]] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deadrelu.monitor.DeadUnitWarning)
        with mon:
            for i in range(steps):
                net(x).sum().backward()
                mon.step(loss=torch.tensor(0.5 * i))


def test_jsonl_lines_match_history_and_events(tmp_path: Path):
    net = half_dead_net()
    path = tmp_path / "health.jsonl"
    mon = deadrelu.Monitor(net, window=2, log_every=2, sinks=[str(path)])
    run(mon, net, 6)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["step"] for d in lines] == mon.history.steps == [2, 4, 6]
    assert lines[0]["kind"] == "deadrelu.monitor" and lines[0]["schema_version"] == 1
    assert lines[0]["sites"][0] == {k: v for k, v in mon.history.rows[0].to_dict().items() if k not in ("step", "loss")}
    assert lines[0]["sites"][0]["dead"] == 0.5
    assert lines[-1]["loss"] == 2.5
    assert lines[0]["events"] == [
        {"step": 2, "site": "1", "unit": 2, "kind": "born_dead"},
        {"step": 2, "site": "1", "unit": 3, "kind": "born_dead"},
    ]
    assert lines[1]["events"] == []


def test_csv_rows_and_header_once_across_runs(tmp_path: Path):
    net = half_dead_net()
    path = tmp_path / "health.csv"
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[path]), net, 4)
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[CSVSink(path)]), net, 2)
    rows = list(csv.reader(path.open()))
    assert rows[0] == list(sinks_mod.CSV_COLUMNS)
    assert rows.count(list(sinks_mod.CSV_COLUMNS)) == 1
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert [r["step"] for r in body] == ["2", "4", "2"]  # the second run appended
    assert float(body[0]["dead"]) == 0.5 and float(body[0]["alive"]) == 0.5 and body[0]["site"] == "1"


def test_jsonl_appends_to_existing_file(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"earlier": true}\n')
    net = half_dead_net()
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[JSONLSink(path)]), net, 2)
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier": true}' and json.loads(lines[1])["step"] == 2


def test_stream_targets(tmp_path: Path):
    buf, cbuf = io.StringIO(), io.StringIO()
    net = half_dead_net()
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[JSONLSink(buf), CSVSink(cbuf)]), net, 2)
    assert json.loads(buf.getvalue())["step"] == 2
    assert cbuf.getvalue().splitlines()[0].startswith("step,site,units")
    assert not buf.closed  # the monitor does not close streams it did not open


def test_full_disk_warns_once_and_other_sinks_and_history_go_on(tmp_path: Path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    good = tmp_path / "good.jsonl"
    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=2, log_every=1, sinks=[JSONLSink("/dev/full"), str(good)])
    with pytest.warns(SinkWarning) as caught:
        run(mon, net, 5)
    sink_warnings = [w for w in caught if issubclass(w.category, SinkWarning)]
    assert len(sink_warnings) == 1 and "/dev/full" in str(sink_warnings[0].message)
    assert "No space left" in str(sink_warnings[0].message)
    assert len(good.read_text().splitlines()) == len(mon.history.steps) == 5


def test_closed_file_keeps_earlier_lines(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    sink = JSONLSink(path)
    net = half_dead_net()
    x = torch.tensor([[1.0, 2.0, -1.0, -1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deadrelu.monitor.DeadUnitWarning)
        with pytest.warns(SinkWarning, match="closed file"):
            with deadrelu.Monitor(net, window=1, log_every=1, sinks=[sink]) as mon:
                for i in range(4):
                    if i == 2:
                        sink._fh.close()  # someone closed our file under us
                    net(x).sum().backward()
                    mon.step()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert mon.history.steps == [1, 2, 3, 4]


def test_raise_mode_gives_sink_error(tmp_path: Path):
    def broken(record):
        raise OSError("disk on fire")

    net = half_dead_net()
    mon = deadrelu.Monitor(net, window=1, log_every=1, sinks=[broken], on_sink_error="raise")
    with pytest.raises(SinkError, match="disk on fire"):
        run(mon, net, 2)
    assert not mon.attached


class _FailsToClose(sinks_mod.Sink):
    name = "fails-to-close"

    def write(self, record) -> None:
        pass

    def close(self) -> None:
        raise OSError("disk gone")


def test_a_sink_failing_to_close_does_not_hide_why_the_block_failed():
    # With on_sink_error="raise" the SinkError from closing replaced the training error.
    net = half_dead_net()
    with pytest.warns(SinkWarning, match=r"sink fails-to-close failed \(OSError: disk gone\)"):
        with pytest.raises(RuntimeError, match="^diverged$"):
            with deadrelu.Monitor(net, window=2, sinks=[_FailsToClose()], on_sink_error="raise") as mon:
                net(torch.randn(4, 4)).sum().backward()
                mon.step()
                raise RuntimeError("diverged")
    assert not mon.attached and sum(len(m._forward_pre_hooks) for m in net.modules()) == 0
    with pytest.raises(SinkError, match="disk gone"):  # a clean block still raises it
        with deadrelu.Monitor(net, window=2, sinks=[_FailsToClose()], on_sink_error="raise") as mon:
            net(torch.randn(4, 4)).sum().backward()
            mon.step()


def test_callable_sink_receives_records():
    seen = []
    net = half_dead_net()
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[seen.append]), net, 4)
    assert [r.step for r in seen] == [2, 4]
    assert seen[0].report.sites[0].dead_units == (2, 3)


def test_bad_sink_paths(tmp_path: Path):
    with pytest.raises(DeadReluError, match="does not exist"):
        JSONLSink(tmp_path / "missing" / "h.jsonl")
    with pytest.raises(DeadReluError, match="is a directory"):
        CSVSink(tmp_path)
    with pytest.raises(DeadReluError, match="must be a Sink"):
        deadrelu.Monitor(half_dead_net(), sinks=[42])


def test_tensorboard_scalars_and_histograms(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = half_dead_net()
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[TensorBoardSink(tmp_path)]), net, 4)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()
    assert "deadrelu/1/dead" in tags["scalars"] and "deadrelu/1/firing_rate" in tags["histograms"]
    dead = acc.Scalars("deadrelu/1/dead")
    assert [(e.step, e.value) for e in dead] == [(2, 0.5), (4, 0.5)]
    hist = acc.Histograms("deadrelu/1/firing_rate")[0].histogram_value
    assert hist.num == 4 and hist.min == 0.0 and hist.max == 1.0


def test_a_tensorboard_log_dir_that_is_a_file_is_refused_when_the_sink_is_made(tmp_path: Path):
    # It used to fail at attach with a FileExistsError turned into a SinkWarning, and the run
    # went on logging nothing to TensorBoard.
    pytest.importorskip("tensorboard")
    log = tmp_path / "runs"
    log.write_text("notes")
    with pytest.raises(DeadReluError, match=r"^TensorBoardSink needs a folder for its event files, but .*runs is a file$"):
        TensorBoardSink(log)
    assert log.read_text() == "notes" and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_missing_extra_names_the_pip_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name in ("tensorboard", "wandb", "rich"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "deadrelu\[tensorboard\]"'):
        TensorBoardSink("runs")
    with pytest.raises(ModuleNotFoundError, match=r'pip install "deadrelu\[wandb\]"'):
        WandbSink()
    net = half_dead_net()
    with pytest.raises(ModuleNotFoundError, match=r'pip install "deadrelu\[cli\]"'):
        deadrelu.Monitor(net, live=True)
    assert sum(len(m._forward_pre_hooks) for m in net.modules()) == 0


def test_wandb_sink_with_a_fake_module(monkeypatch):
    logged = []

    class Histogram:
        def __init__(self, values):
            self.values = values

    class Run:
        def log(self, data, **kwargs):
            logged.append((data, kwargs))

    fake = types.ModuleType("wandb")
    fake.Histogram = Histogram
    fake.run = Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    net = half_dead_net()
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[WandbSink(commit=False)]), net, 2)
    data, kwargs = logged[0]
    assert kwargs == {"commit": False}
    assert data["deadrelu/step"] == 2 and data["deadrelu/1/dead"] == 0.5
    assert data["deadrelu/1/firing_rate"].values == [1.0, 1.0, 0.0, 0.0]


def test_wandb_without_a_run_warns_clearly(monkeypatch):
    fake = types.ModuleType("wandb")
    fake.Histogram = lambda values: values
    fake.run = None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    net = half_dead_net()
    with pytest.warns(SinkWarning, match=r"wandb.init"):
        run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[WandbSink()]), net, 2)


def _warn_on_torn(sink_factory, path: Path, steps: int = 2):
    net = half_dead_net()
    with pytest.warns(SinkWarning, match="torn last record"):
        run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[sink_factory(path)]), net, steps)


def test_jsonl_torn_last_record_is_cut_before_appending(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    good = '{"step": 1, "kind": "deadrelu.monitor"}\n'
    path.write_text(good + '{"step": 2, "kind": "deadr')  # the disk filled up mid-record
    _warn_on_torn(JSONLSink, path)
    lines = path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is valid JSON again
    assert lines[0] + "\n" == good and [d["step"] for d in parsed] == [1, 2]
    assert parsed[1]["kind"] == "deadrelu.monitor" and "sites" in parsed[1]


def test_csv_torn_row_is_cut_and_never_merged(tmp_path: Path):
    path = tmp_path / "h.csv"
    net = half_dead_net()
    run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[path]), net, 2)
    whole = path.read_text()
    # A torn row whose quoted field holds a newline: the cut must follow the quotes, not the last newline.
    path.write_text(whole + '4,"odd\nsite",4,2,0.5')
    _warn_on_torn(CSVSink, path)
    rows = list(csv.reader(path.open()))
    assert path.read_text().startswith(whole)
    assert rows[0] == list(sinks_mod.CSV_COLUMNS) and rows.count(rows[0]) == 1
    assert all(len(r) == len(sinks_mod.CSV_COLUMNS) for r in rows)
    assert [r[0] for r in rows[1:]] == ["2", "2"] and all(r[1] == "1" for r in rows[1:])


def test_torn_header_only_csv_gets_a_fresh_header(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("step,site,uni")
    _warn_on_torn(CSVSink, path)
    rows = list(csv.reader(path.open()))
    assert rows[0] == list(sinks_mod.CSV_COLUMNS) and len(rows) == 2


@pytest.mark.parametrize("content, quoted, removed", [
    ("", False, 0), ("a\n", False, 0), ("a\nbc", False, 2), ("abc", False, 3),
    ('a,"x\ny"\n', True, 0), ('a\nb,"x\ny', True, 6), ('a\n"q""x', True, 5),
])  # fmt: skip
def test_repair_torn_tail_against_a_reader(tmp_path: Path, content, quoted, removed):
    path = tmp_path / "log"
    path.write_bytes(content.encode())
    assert sinks_mod.repair_torn_tail(path, quoted=quoted) == removed
    assert path.read_bytes() == content.encode()[: len(content.encode()) - removed]


def test_failed_write_drops_the_handle_and_the_next_write_repairs(tmp_path: Path, monkeypatch):
    path = tmp_path / "h.jsonl"
    sink = JSONLSink(path)
    sink.open()
    sink._emit('{"a": 1}\n')
    real = sink._fh

    class Torn:  # writes half the record, then the disk is full
        def write(self, text):
            real.write(text[: len(text) // 2])
            real.flush()
            raise OSError(28, "No space left on device")

        def close(self):
            real.close()

    sink._fh = Torn()
    with pytest.raises(OSError):
        sink._emit('{"b": 2, "padding": "xxxxxxxx"}\n')
    assert sink._fh is None
    with pytest.warns(SinkWarning, match="torn"):
        sink._emit('{"c": 3}\n')
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"c": 3}]


def test_csv_append_to_an_older_layout_keeps_that_files_columns(tmp_path: Path):
    """A file written before the ``unobserved`` column existed: rows stay as wide as its header."""
    old = [c for c in sinks_mod.CSV_COLUMNS if c != "unobserved"]
    path = tmp_path / "h.csv"
    path.write_text(",".join(old) + "\n" + ",".join(["2", "1", "4", "2", "0.5", "0", "0.5", "0", "0", "0.5", "0.0"]) + "\n")
    net = half_dead_net()
    with pytest.warns(SinkWarning, match="unobserved not logged"):
        run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[CSVSink(path)]), net, 4)
    rows = list(csv.reader(path.open()))
    assert rows[0] == old and rows.count(old) == 1
    assert all(len(r) == len(old) for r in rows)
    body = [dict(zip(old, r)) for r in rows[1:]]
    assert [r["step"] for r in body] == ["2", "2", "4"] and float(body[1]["dead"]) == 0.5


def test_csv_append_follows_a_reordered_deadrelu_header(tmp_path: Path):
    cols = ["site", "step", "dead"]
    path = tmp_path / "h.csv"
    path.write_text("site,step,dead\n")
    net = half_dead_net()
    with pytest.warns(SinkWarning):
        run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[CSVSink(path)]), net, 2)
    rows = list(csv.reader(path.open()))
    assert rows == [cols, ["1", "2", "0.5"]]


@pytest.mark.parametrize("header", ["name,age\n", "step,site,step\n", "dead,alive\n", b"\xff\xfe\x00bin\n", b"no newline at all"])
def test_csv_refuses_a_foreign_header_and_leaves_the_file(tmp_path: Path, header):
    path = tmp_path / "h.csv"
    body = b"" if header == b"no newline at all" else b"x,y\n"
    path.write_bytes((header if isinstance(header, bytes) else header.encode()) + body)
    before = path.read_bytes()
    net = half_dead_net()
    with pytest.raises(SinkError, match="not a deadrelu CSV"):
        run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[CSVSink(path)], on_sink_error="raise"), net, 2)
    assert path.read_bytes() == before



@pytest.mark.parametrize("content", [b"notes without a newline", b"a,b\n1,2\n", b'{"ok": 1}\nplain text tail', b"\xff\xfe\n"])
def test_jsonl_refuses_a_file_that_is_not_json_lines_and_leaves_it(tmp_path: Path, content: bytes):
    path = tmp_path / "h.jsonl"
    path.write_bytes(content)
    net = half_dead_net()
    with pytest.raises(SinkError, match="not a JSON Lines log"):
        run(deadrelu.Monitor(net, window=2, log_every=2, sinks=[JSONLSink(path)], on_sink_error="raise"), net, 2)
    assert path.read_bytes() == content
