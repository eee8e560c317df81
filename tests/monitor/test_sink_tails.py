"""File sinks appending to existing logs: a whole unterminated last record is kept, only a torn one is cut,
a foreign file is refused however long its first line, and sinks sharing one CSV write one header.

Every check is on bytes: the file as it was must be a prefix of the file afterwards, followed by exactly
what a fresh run writes (a newline first when the last record lacked one)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu.monitor import HistoryRow, LogRecord
from deadrelu.monitor import sinks as sinks_mod
from deadrelu.monitor.sinks import CSVSink, JSONLSink, SinkError, SinkWarning

HEADER = ",".join(sinks_mod.CSV_COLUMNS).encode()


def half_dead_net() -> nn.Sequential:
    """Identity Linear → ReLU fed inputs whose columns 2 and 3 are always negative: half the units dead."""
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    return nn.Sequential(lin, nn.ReLU())


def log_run(path: Path, *sinks, on_sink_error: str = "warn") -> list[warnings.WarningMessage]:
    """One evaluation (two steps, log_every=2) of the half-dead net into ``sinks`` (default: ``path`` itself);
    returns the warnings it gave."""
    net = half_dead_net()
    x = torch.tensor([[1.0, 2.0, -1.0, -1.0]] * 3)
    mon = deadrelu.Monitor(net, window=2, log_every=2, sinks=list(sinks or [path]), on_sink_error=on_sink_error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", deadrelu.monitor.DeadUnitWarning)
        with mon:
            for i in range(2):
                net(x).sum().backward()
                mon.step(loss=torch.tensor(0.5 * i))
    return list(caught)


def fresh(tmp_path: Path, suffix: str) -> bytes:
    """What one run writes to a new file: the additions every append is compared against."""
    path = tmp_path / f"fresh{suffix}"
    log_run(path)
    return path.read_bytes()


def sink_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SinkWarning)]


# --- an unterminated last line: whole record kept, torn record cut -------------------------------


@pytest.mark.parametrize("before", [
    b'{"run": 1, "loss": 0.5}\n{"run": 2, "loss": 0.4}',  # the last record lost only its newline
    b'{"run": 1, "nested": {"a": [1, 2]}}',  # json.dump: one object, no newline at all
    b'{"run": 1}\r',  # a CRLF writer stopped between \r and \n
])  # fmt: skip
def test_jsonl_keeps_a_whole_last_record_that_lacks_its_newline(tmp_path: Path, before: bytes):
    path = tmp_path / "h.jsonl"
    path.write_bytes(before)
    caught = log_run(path)
    assert path.read_bytes() == before + b"\n" + fresh(tmp_path, ".jsonl")
    assert sink_warnings(caught) == []  # nothing was cut, so nothing to warn about


@pytest.mark.parametrize("torn", [b'{"a": 12', b'{"a": 1', b'{"a": "x', b'{"a": 1,', b'{"caf\xc3'])
def test_jsonl_still_cuts_a_torn_record_that_parses_as_nothing(tmp_path: Path, torn: bytes):
    """A JSON object ends with its brace, so no cut-short record parses: a number cut short included."""
    whole = b'{"a": 123}\n'
    path = tmp_path / "h.jsonl"
    path.write_bytes(whole + torn)
    caught = log_run(path)
    assert path.read_bytes() == whole + fresh(tmp_path, ".jsonl")
    assert any("torn last record" in m for m in sink_warnings(caught))


def test_csv_keeps_its_own_last_row_that_lacks_its_newline(tmp_path: Path):
    ours = fresh(tmp_path, ".csv")
    path = tmp_path / "h.csv"
    path.write_bytes(ours.rstrip(b"\n"))  # an editor stripped the final newline
    caught = log_run(path)
    rows = ours.split(b"\n", 1)[1]  # the second run appends rows only, no second header
    assert path.read_bytes() == ours + rows
    assert sink_warnings(caught) == []


def test_csv_keeps_a_lone_full_header_that_lacks_its_newline(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_bytes(HEADER)
    caught = log_run(path)
    assert path.read_bytes() == fresh(tmp_path, ".csv")  # = HEADER + b"\n" + the rows
    assert sink_warnings(caught) == []


def _torn_tails(row: str) -> list[str]:
    cut = row.rindex(",")
    return [
        row[:cut],  # cut just before the last comma: one value short
        row[: cut + 1],  # cut just after it: the last value (a number) is empty
        row[:cut] + ",1e-",  # cut inside an exponent: not a number
        '2,"odd\nsi',  # cut inside a quoted value that holds a newline
        row.split(",", 1)[0],  # only the first value made it
    ]


@pytest.mark.parametrize("case", range(5))
def test_csv_cuts_a_torn_row_even_when_it_splits_cleanly(tmp_path: Path, case: int):
    ours = fresh(tmp_path, ".csv")
    tail = _torn_tails(ours.decode().rstrip("\n").rsplit("\n", 1)[1])[case].encode()
    path = tmp_path / "h.csv"
    path.write_bytes(ours + tail)
    caught = log_run(path)
    assert path.read_bytes() == ours + ours.split(b"\n", 1)[1]
    assert any(f"torn last record ({len(tail)} bytes" in m for m in sink_warnings(caught))


def test_csv_keeps_a_whole_row_of_an_older_layout_ending_in_an_empty_loss(tmp_path: Path):
    """``loss`` may be empty (no loss given), so a row of an older layout that ends with it is whole."""
    old = [c for c in sinks_mod.CSV_COLUMNS if c != "unobserved"]
    before = (",".join(old) + "\n" + "2,1,4,2,0.5,0,0.5,0,0,0.5,").encode()
    path = tmp_path / "h.csv"
    path.write_bytes(before)
    caught = log_run(path)
    assert any("unobserved not logged" in m for m in sink_warnings(caught))
    row = fresh(tmp_path, ".csv").splitlines()[1]
    assert path.read_bytes() == before + b"\n" + row.rsplit(b",", 1)[0] + b"\n"  # the row less unobserved


# --- a foreign JSONL file is refused however long its first line ---------------------------------

ARRAY_LINE = b"[" + b",".join([b"1"] * 600_000) + b"]\n"  # 1.2 MB: longer than the 1 MiB once read


@pytest.mark.parametrize("on_sink_error", ["raise", "warn"])
def test_jsonl_refuses_a_first_line_over_1_mib_that_is_not_an_object(tmp_path: Path, on_sink_error: str):
    path = tmp_path / "h.jsonl"
    before = ARRAY_LINE + b'{"partial": '  # the tail alone looks like the start of a record
    path.write_bytes(before)
    if on_sink_error == "raise":
        with pytest.raises(SinkError, match="first line is not a JSON object"):
            log_run(path, on_sink_error="raise")
    else:
        assert any("first line is not a JSON object" in m for m in sink_warnings(log_run(path)))
    assert path.read_bytes() == before


def test_jsonl_appends_after_a_first_line_over_1_mib_that_is_an_object(tmp_path: Path):
    big = json.dumps({"kind": "deadrelu.monitor", "events": list(range(300_000))}).encode() + b"\n"
    path = tmp_path / "h.jsonl"
    path.write_bytes(big)
    log_run(path)
    assert len(big) > 1 << 20 and path.read_bytes() == big + fresh(tmp_path, ".jsonl")


@pytest.mark.parametrize("before, why", [
    (b'{"a": ' + b"1" * 200 + b"}\n", "too long to check"),  # an object, maybe, but past the limit
    (b"x" * 200 + b"\n", "not a JSON object"),  # visibly not an object, whatever follows
    (b'{"a": ' + b"1" * 200, "too long to check"),  # the only line, unterminated
    (b'{"a": 1}\n{"b": ' + b"1" * 200, "too long to check"),  # an unterminated last line past the limit
], ids=["long-object-line", "long-text-line", "long-only-line", "long-tail"])  # fmt: skip
def test_jsonl_refuses_a_line_too_long_to_check_and_leaves_the_file(tmp_path: Path, monkeypatch, before, why):
    """Past the limit a line is not read whole (a huge file stays out of memory), and an unchecked line
    is never taken for ours: the file is refused as it is."""
    monkeypatch.setattr(sinks_mod, "_CHECK_LIMIT", 100)
    path = tmp_path / "h.jsonl"
    path.write_bytes(before)
    with pytest.raises(SinkError, match=why):
        log_run(path, on_sink_error="raise")
    assert path.read_bytes() == before


def test_csv_refuses_a_first_line_far_longer_than_a_header_without_reading_it_whole(tmp_path: Path):
    before = HEADER + b"," + b"x" * (1 << 17)  # starts like ours, but no header is 128 KiB long
    path = tmp_path / "h.csv"
    path.write_bytes(before)
    with pytest.raises(SinkError, match="not a deadrelu CSV"):
        log_run(path, on_sink_error="raise")
    assert path.read_bytes() == before


# --- two sinks on one CSV file: one header ------------------------------------------------------


def test_one_csv_path_listed_twice_gets_one_header(tmp_path: Path):
    ours = fresh(tmp_path, ".csv")
    path = tmp_path / "h.csv"
    log_run(path, path, path)  # both sinks open the empty file before either writes
    assert path.read_bytes() == ours + ours.split(b"\n", 1)[1]


def test_two_monitors_on_one_csv_write_one_header(tmp_path: Path):
    path = tmp_path / "h.csv"
    nets = [half_dead_net(), half_dead_net()]
    mons = [deadrelu.Monitor(n, window=2, log_every=1, sinks=[path]).attach() for n in nets]
    x = torch.tensor([[1.0, 2.0, -1.0, -1.0]] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deadrelu.monitor.DeadUnitWarning)
        for _ in range(2):
            for net, mon in zip(nets, mons):
                net(x).sum().backward()
                mon.step()
    for mon in mons:
        mon.detach()
    lines = path.read_bytes().splitlines()
    assert lines[0] == HEADER and lines.count(HEADER) == 1
    assert len(lines) == 1 + 4 and all(len(line.split(b",")) == len(sinks_mod.CSV_COLUMNS) for line in lines)


def _record() -> LogRecord:
    return LogRecord(2, 0.5, (HistoryRow(2, "relu", 4, 2, 0.5, 0.0, 0.5, 0.0, 0.0, loss=0.5),), (), None)


def test_a_csv_sink_follows_the_header_written_after_it_opened(tmp_path: Path):
    """The sink opened an empty file; by its first write another writer's older-layout header is there."""
    old = ",".join(c for c in sinks_mod.CSV_COLUMNS if c != "unobserved").encode() + b"\n"
    path = tmp_path / "h.csv"
    sink = CSVSink(path)
    sink.open()
    path.write_bytes(old)
    with pytest.warns(SinkWarning, match="unobserved not logged"):
        sink.write(_record())
    sink.close()
    assert path.read_bytes() == old + b"2,relu,4,2,0.5,0.0,0.5,0.0,0.0,0.5,0.5\n"


def test_a_csv_sink_refuses_a_foreign_header_written_after_it_opened(tmp_path: Path):
    path = tmp_path / "h.csv"
    sink = CSVSink(path)
    sink.open()
    path.write_bytes(b"name,age\n")
    with pytest.raises(SinkError, match="not a deadrelu CSV"):
        sink.write(_record())
    sink.close()
    assert path.read_bytes() == b"name,age\n"
