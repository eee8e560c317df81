"""Bad ``sinks`` and ``unit_dim`` options of ``deadrelu.Monitor``: one clear DeadReluError, raised when the
monitor is made (before any hook is attached or file written), and a single sink taken as a list of one."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu.errors import DeadReluError
from deadrelu.monitor.sinks import CallbackSink, CSVSink, JSONLSink, SinkError, as_sinks


def net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def hooks(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def train(mon: deadrelu.Monitor, model: nn.Module, steps: int = 2) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deadrelu.monitor.DeadUnitWarning)
        with mon:
            for _ in range(steps):
                model(torch.randn(8, 4)).sum().backward()
                mon.step()


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- one sink stands for a list of one ---------------------------------------------------------
@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "Path"])
def test_a_single_path_is_one_sink(tmp_path: Path, as_path):
    model = net()
    mon = deadrelu.Monitor(model, sinks=as_path(tmp_path / "h.jsonl"), window=2, log_every=2)
    assert [type(s) for s in mon.sinks] == [JSONLSink]
    train(mon, model)
    lines = (tmp_path / "h.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]
    assert files(tmp_path) == ["h.jsonl"]


def test_a_single_sink_object_or_callable_is_one_sink(tmp_path: Path):
    sink = CSVSink(tmp_path / "h.csv")
    assert deadrelu.Monitor(net(), sinks=sink).sinks == [sink]
    seen: list = []
    mon = deadrelu.Monitor(net(), sinks=seen.append)
    assert [type(s) for s in mon.sinks] == [CallbackSink]
    assert deadrelu.Monitor(net(), sinks=None).sinks == []
    assert [s.name for s in as_sinks(p for p in ("a.jsonl", "b.csv"))] == ["JSONLSink(a.jsonl)", "CSVSink(b.csv)"]


# -- every other wrong value: one clear error, nothing attached, nothing written -------------------
WRONG_SINKS = {
    "int": (lambda d: 5, r"^sinks must be a Sink, a \.jsonl/\.csv path or a callable, or a list of them; got int 5$"),
    "None in list": (
        lambda d: [str(d / "ok.jsonl"), None],
        r"^sinks\[1\]: a sink must be a Sink, a \.jsonl/\.csv path or a callable, not None$",
    ),
    "int in list": (lambda d: [42], r"^sinks\[0\]: a sink must be a Sink, .* not int 42$"),
    "directory": (lambda d: [d], r"^sinks\[0\]: cannot log to '.*': it is a directory; name a file in it ending in \.jsonl or \.csv"),
    "single directory": (lambda d: str(d), r"^cannot log to '.*': it is a directory; .*TensorBoardSink"),
    "unknown suffix": (lambda d: [d / "h.txt"], r"^sinks\[0\]: cannot tell the log format of '.*h\.txt' \(suffix '\.txt'\)"),
    "no suffix": (lambda d: str(d / "health"), r"^cannot tell the log format of '.*health' \(no suffix\)"),
    "missing folder": (lambda d: [d / "nope" / "h.jsonl"], r"^sinks\[0\]: cannot log to .*: the folder .*nope does not exist"),
    "empty path": (lambda d: "", r"^a sink path must be a non-empty text path"),
    "bytes": (lambda d: b"h.jsonl", r"^sinks must be .*; got bytes b'h\.jsonl' \(pass a path as str\)"),
    "stream": (lambda d: io.StringIO(), r"^a sink must be .* not a StringIO with a write\(\) method: .*JSONLSink\(stream\)"),
    "stream in list": (lambda d: [io.StringIO()], r"^sinks\[0\]: a sink must be .*JSONLSink\(stream\) or CSVSink\(stream\)"),
    "mapping": (lambda d: {"h.jsonl": 1}, r"^sinks must be .*; got a mapping \(dict\)"),
}


@pytest.mark.parametrize("make, match", WRONG_SINKS.values(), ids=list(WRONG_SINKS))
def test_wrong_sinks_are_one_clear_error_before_anything_is_written(tmp_path: Path, make, match):
    (tmp_path / "keep.jsonl").write_text('{"step": 1}\n')
    before = files(tmp_path)
    model = net()
    with pytest.raises(DeadReluError, match=match):
        deadrelu.Monitor(model, sinks=make(tmp_path))
    assert files(tmp_path) == before and (tmp_path / "keep.jsonl").read_text() == '{"step": 1}\n'
    assert all(h == (0, 0) for h in hooks(model))


# -- unit_dim ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, match",
    [
        ("x", r"unit_dim must be an int \(every site\), .*; got str 'x'"),
        (2.0, r"unit_dim must be an int \(every site\), .*; got float 2.0"),
        ({"1": "last"}, r"unit_dim\['1'\] must be an int dimension \(or None\), got 'last'"),
        (object(), r"unit_dim must be an int .*; got object"),
    ],
    ids=["str", "float", "dict-str-value", "object"],
)
def test_unit_dim_of_the_wrong_type_is_refused_when_the_monitor_is_made(tmp_path: Path, spec, match):
    model = net()
    with pytest.raises(DeadReluError, match=match):
        deadrelu.Monitor(model, unit_dim=spec, sinks=[tmp_path / "h.jsonl"])
    assert files(tmp_path) == [] and all(h == (0, 0) for h in hooks(model))


def test_a_raising_unit_dim_callable_is_named_as_the_callable_and_the_hooks_go(tmp_path: Path):
    def pick_axis(info):
        raise IndexError("no axis rule")

    model = net()
    mon = deadrelu.Monitor(model, unit_dim=pick_axis, window=2, sinks=[tmp_path / "h.jsonl"])
    with pytest.raises(DeadReluError) as info:
        train(mon, model)
    message = str(info.value)
    assert message.startswith("the unit_dim callable ") and "pick_axis raised IndexError" in message
    assert "activation site 1 (relu, call 1" in message and "no axis rule" in message
    assert isinstance(info.value.__cause__, IndexError)
    assert not mon.attached and all(h == (0, 0) for h in hooks(model))
    assert (tmp_path / "h.jsonl").read_text() == ""  # opened at attach, no record written


def test_a_monitor_never_attached_says_so():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    mon = deadrelu.Monitor(model)
    with pytest.warns(UserWarning, match="never attached"):
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
    mon.step()  # warned once
    with pytest.raises(deadrelu.errors.NoActivationSitesError, match="never attached.*attach\\(\\)"):
        mon.report()
    with mon:
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
        assert mon.report("total").sites[0].observations == 2


@pytest.mark.parametrize("mask", [3, [1, 2], 1.5, True], ids=["int", "list", "float", "True"])
def test_a_mask_of_the_wrong_form_is_refused_when_the_monitor_is_made(mask):
    model = net()
    with pytest.raises(DeadReluError, match=r"^mask must be a bool tensor, a key of a dict batch, a callable"):
        deadrelu.Monitor(model, mask=mask)
    assert hooks(model) == hooks(net())


def test_an_every_callable_that_takes_no_step_is_refused_when_the_monitor_is_made():
    with pytest.raises(DeadReluError, match=r"every= must be .* calling it with step 0 raised TypeError"):
        deadrelu.Monitor(net(), every=lambda: True)


def test_a_model_on_the_meta_device_is_refused_at_attach_with_nothing_attached():
    with torch.device("meta"):
        model = net()
    mon = deadrelu.Monitor(model)
    with pytest.raises(DeadReluError, match="weights on the meta device"):
        mon.attach()
    assert not mon.attached and all(h == (0, 0) for h in hooks(model))


# -- a log path that is not a regular file ----------------------------------------------------------
def attach_or_unblock(attach, folder: Path, timeout: float = 5.0) -> BaseException | None:
    """Run ``attach`` in a thread and return what it raised. Opening a named pipe for writing waits
    for a reader: if it still runs after ``timeout`` the pipes in ``folder`` are opened for reading
    to free it, and the test fails instead of hanging the suite."""
    raised: list[BaseException | None] = [None]

    def target() -> None:
        try:
            attach()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            raised[0] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pipes = [p for p in folder.iterdir() if stat.S_ISFIFO(os.stat(p).st_mode)]
        readers = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in pipes]
        try:
            thread.join(timeout)
        finally:
            for fd in readers:
                os.close(fd)
        pytest.fail(f"attaching a monitor that logs to a named pipe in {folder} hung")
    return raised[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize(
    "make_sink",
    [lambda p: str(p.with_suffix(".jsonl")), lambda p: p.with_suffix(".csv"), lambda p: JSONLSink(p), lambda p: CSVSink(p)],
    ids=["jsonl-path", "csv-path", "JSONLSink", "CSVSink"],
)
def test_a_named_pipe_log_path_is_refused_when_the_monitor_is_made_instead_of_hanging(tmp_path: Path, make_sink):
    # Opening a pipe to append blocked until a reader came: Monitor(...).attach() hung for ever,
    # with the model already hooked.
    for name in ("pipe", "pipe.jsonl", "pipe.csv"):
        os.mkfifo(tmp_path / name)
    model = net()

    def make_and_attach() -> None:
        deadrelu.Monitor(model, sinks=make_sink(tmp_path / "pipe")).attach()

    err = attach_or_unblock(make_and_attach, tmp_path)
    assert isinstance(err, DeadReluError), err
    message = str(err).removeprefix("sinks[0]: ")  # as_sinks names the entry; the refusal is the sink's own
    assert re.fullmatch(
        r"(JSONL|CSV)Sink needs a regular file to append to, but .*pipe(\.jsonl|\.csv)? is a named pipe \(opening it "
        r"waits for a reader\); to log into it, open it yourself and pass the stream, (JSONL|CSV)Sink\(open\(path, 'w'\)\)",
        message,
    ), message
    assert all(h == (0, 0) for h in hooks(model))
    assert files(tmp_path) == ["pipe", "pipe.csv", "pipe.jsonl"]
    assert all(stat.S_ISFIFO(os.stat(tmp_path / n).st_mode) for n in files(tmp_path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_log_path_that_became_a_named_pipe_after_the_sink_was_made_is_refused_at_attach(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    model = net()
    mon = deadrelu.Monitor(model, sinks=[path], on_sink_error="raise")
    os.mkfifo(path)  # after the check when the sink was made
    err = attach_or_unblock(mon.attach, tmp_path)
    assert isinstance(err, SinkError), err
    assert re.match(
        r"^deadrelu: sink JSONLSink\(.*h\.jsonl\) failed \(SinkError: JSONLSink needs a regular file to append to, "
        r"but .*h\.jsonl is a named pipe \(opening it waits for a reader\)",
        str(err),
    ), err
    assert not mon.attached and all(h == (0, 0) for h in hooks(model))
    assert files(tmp_path) == ["h.jsonl"] and stat.S_ISFIFO(os.stat(path).st_mode)


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_dev_null_is_a_log_path_that_takes_every_record():
    # a character device opens at once: logging nowhere stays possible
    model = net()
    mon = deadrelu.Monitor(model, sinks=[JSONLSink("/dev/null"), CSVSink("/dev/null")], window=2, log_every=1, on_sink_error="raise")
    train(mon, model)
    assert mon.history.steps == [1, 2]
