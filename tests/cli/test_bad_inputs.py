"""The CLI promise on hostile input: one line on stderr, exit 2, no traceback, no code run, no file touched.

Runs ``main([...])`` in process (fast); ``test_cli_scan.py`` checks the same promise through a subprocess.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from deadrelu.cli.main import main
from deadrelu.lab.idx import write_idx

MARKER = "PWNED"


class _Payload:
    """Unpickling this object opens (creates) the marker file: code execution, made visible."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    marker = str(d / MARKER)
    torch.save(_Payload(marker), d / "evil.pt")  # a torch zip archive whose data.pkl runs code
    with open(d / "evil_plain.pt", "wb") as f:  # a plain pickle that merely has a .pt name
        pickle.dump(_Payload(marker), f)
    torch.save({"x": torch.randn(8, 4), "hook": _Payload(marker)}, d / "evil_data.pt")
    torch.save(torch.randn(10, 4), d / "x.pt")
    torch.save(torch.nn.Linear(4, 8), d / "whole_model.pt")
    torch.save(np.zeros((10, 4)), d / "numpy_in_pt.pt")
    torch.save(torch.utils.data.TensorDataset(torch.randn(10, 4)), d / "dataset.pt")
    torch.save(torch.randn(10, 4, dtype=torch.complex64), d / "complex.pt")
    np.save(d / "complex.npy", np.ones((10, 4), dtype=np.complex64))
    np.savez(d / "labels_foo.npz", labels=np.arange(10), foo=np.random.default_rng(0).normal(size=(10, 4)))
    np.savez(d / "labels_two.npz", labels=np.arange(10), foo=np.zeros((10, 4)), bar=np.zeros((10, 4)))
    (d / "latin1.csv").write_bytes("a,b,c,d\n1,2,3,4\n\xe9,1,1,1\n".encode("latin-1"))
    for name, images in (("zero", torch.zeros(0, 2, 2, dtype=torch.uint8)),):
        (d / name).mkdir()
        write_idx(d / name / "t10k-images-idx3-ubyte", images)
    (d / "badgz").mkdir()
    (d / "badgz" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + bytes(64))[:20])
    (d / "idx").mkdir()
    write_idx(d / "idx" / "t10k-images-idx3-ubyte", torch.randint(0, 255, (6, 2, 2), dtype=torch.uint8))
    (d / "dir_out").mkdir()
    (d / "garbage.pt").write_bytes(b"garbage" * 10)  # no zip, no pickle: torch cannot load it at all
    torch.save(torch.randn(4), d / "x_1d.pt")  # no batch dimension
    np.save(d / "x_1d.npy", np.zeros(4, dtype=np.float32))
    (d / "cli_mods.py").write_text(
        textwrap.dedent(
            """
            import sys, torch

            def make():
                torch.manual_seed(0)
                return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

            def exits():
                sys.exit(0)

            def multiline():
                raise ValueError("first line\\nsecond line\\x1b[31m in red\\x1b[0m")

            def dies_mid_scan():
                for i in range(5):
                    if i == 2:
                        raise RuntimeError("the disk went away")
                    yield torch.randn(4, 4)
            """
        )
    )
    # A model whose class lives in the saving script's __main__ (the classic notebook pickle).
    (d / "save_main.py").write_text(
        textwrap.dedent(
            """
            import torch
            class Net(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = torch.nn.Linear(4, 8)
                def forward(self, x):
                    return torch.relu(self.fc(x))
            torch.save(Net(), "main_net.pt")
            torch.export.save(torch.export.export(Net(), (torch.randn(4, 4),)), "fixed_batch.pt2")
            """
        )
    )
    subprocess.run([sys.executable, "save_main.py"], cwd=d, check=True, capture_output=True)
    return d


def _snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): ("link:" + os.readlink(p)) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if (p.is_file() or p.is_symlink()) and "__pycache__" not in p.parts
    }


def run_main(args, d, monkeypatch, capsys):
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))
    code = main(["scan", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, message):
    assert code == 2, err
    assert "Traceback" not in err and "\x1b" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deadrelu scan: error: "), err
    assert message in lines[0], err


CASES = [
    # (arguments, part of the one-line message)
    (["evil.pt", "--data", "x.pt"], "add --trust-pickle"),
    (["evil_plain.pt", "--data", "x.pt"], "add --trust-pickle"),
    (["whole_model.pt", "--data", "x.pt"], "add --trust-pickle"),
    (["fixed_batch.pt2", "--data", "x.pt"], "a torch.export program; loading it runs code"),
    (["cli_mods:make", "--weights", "evil.pt", "--data", "x.pt"], "is not a state_dict"),
    (["cli_mods:make", "--weights", "whole_model.pt", "--data", "x.pt"], "save model.state_dict() instead"),
    (["cli_mods:make", "--data", "evil_data.pt"], "holds pickled Python objects"),
    (["cli_mods:make", "--data", "numpy_in_pt.pt"], "holds pickled Python objects (numpy"),
    (["cli_mods:make", "--data", "dataset.pt"], "TensorDataset"),
    (["cli_mods:make", "--data", "latin1.csv"], "is not UTF-8 text"),
    (["cli_mods:make", "--data", "zero"], "holds no samples"),
    (["cli_mods:make", "--data", "badgz"], "is a damaged gzip file"),
    (["cli_mods:make", "--data", "cli_mods:dies_mid_scan"], "raised RuntimeError: the disk went away after 2 batches"),
    (["cli_mods:exits", "--data", "x.pt"], "calling cli_mods:exits() raised SystemExit(0)"),
    (["cli_mods:multiline", "--data", "x.pt"], "raised ValueError: first line second line in red"),
    (["cli_mods:make", "--data", "complex.pt"], "holds complex numbers"),
    (["cli_mods:make", "--data", "complex.npy"], "holds complex numbers"),
    (["cli_mods:make", "--data", "labels_two.npz"], "name the inputs"),
    (["main_net.pt", "--trust-pickle", "--data", "x.pt"], "defined in the script that saved it (__main__)"),
    (["fixed_batch.pt2", "--trust-pickle", "--data", "x.pt", "--batch-size", "4"], "exported with (4): pass --batch-size"),
    (["cli_mods:make", "--data", "x.pt", "--json", "dir_out"], "it is a directory"),
    (["cli_mods:make", "--data", "x.pt", "--json", "x.pt"], "is the input file x.pt: it would be overwritten"),
    (["cli_mods:make", "--data", "x.pt", "--json", "nowhere/r.json"], "does not exist"),
    (["cli_mods:make", "--data", "x.pt", "--json", "cli_mods.py"], "is the file behind cli_mods:make"),
    (["cli_mods:make", "--data", "idx", "--json", "idx/t10k-images-idx3-ubyte"], "in the input directory idx"),
    (["cli_mods:make", "--data", "x.pt", "--device", "nonsense:0"], "is not a device name"),
    (["cli_mods:make", "--data", "x.pt", "--device", "meta"], "--device meta holds no values"),
    (["cli_mods:make", "--data", "x.pt", "--max-length", "8"], "--max-length is only used with --text"),
    (["cli_mods:make", "--data", "x.pt", "--baseline", "x.pt"], "--baseline is only used with --advice"),
    (["cli_mods:make", "--data", "x.pt", "--advice", "--baseline", "labels_foo.npz"], "--baseline"),
    # garbage is no pickle: not "add --trust-pickle", and with it not "pickle data was truncated"
    (["garbage.pt", "--data", "x.pt"], "garbage.pt is not a model file torch can load (neither a zip archive nor a pickle"),
    (["garbage.pt", "--trust-pickle", "--data", "x.pt"], "garbage.pt is not a model file torch can load (neither"),
    (["cli_mods:make", "--weights", "garbage.pt", "--data", "x.pt"], "garbage.pt is not a state_dict file (neither"),
    (["cli_mods:make", "--data", "garbage.pt"], "garbage.pt is not a tensor file torch can load (neither"),
    # 1-D data was scanned as one unbatched sample per batch ("4 sample(s)", 1 observation)
    (["cli_mods:make", "--data", "x_1d.pt"], "x_1d.pt holds 1-D data of shape (4,): deadrelu expects a batch dimension"),
    (["cli_mods:make", "--data", "x_1d.npy", "--batch-size", "2"], "save one sample as shape (1, 4)"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_each_bad_input_is_one_line_exit_2_and_changes_nothing(hostile, monkeypatch, capsys, args, message):
    before = _snapshot(hostile)
    code, _, err = run_main(args, hostile, monkeypatch, capsys)
    assert_one_line_error(code, err, message)
    assert _snapshot(hostile) == before  # no file written, changed, or left behind (no .tmp)
    assert not (hostile / MARKER).exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--threshold", "nan", "expected a finite number, got 'nan'"),
        ("--threshold", "inf", "expected a finite number"),
        ("--threshold", "abc", "expected a number, got 'abc'"),
        ("--dormant-tau", "nan", "expected a finite number"),
        ("--dormant-tau", "-1", "must be at least 0"),
        ("--dormant-tau", "5", "must be at most 1"),
        ("--asleep-rate", "1.5", "must be at most"),
        ("--asleep-rate", "-0.1", "must be at least 0"),
        ("--batch-size", "1e20", "expected a whole number, got '1e20'"),
        ("--batch-size", "100000000000000000000", "must be at most"),
        ("--batch-size", "0", "must be at least 1"),
        ("--batch-size", "-3", "must be at least 1"),
        ("--batch-size", "2.5", "expected a whole number"),
        ("--max-batches", "0", "must be at least 1"),
        ("--max-length", "-1", "must be at least 1"),
        # Negative numbers with an exponent or in words are values too, refused by the option's own check
        # (argparse's pattern misses them: they failed as "expected one argument").
        ("--threshold", "-inf", "expected a finite number, got '-inf'"),
        ("--threshold", "-nan", "expected a finite number, got '-nan'"),
        ("--asleep-rate", "-1e-3", "must be at least 0, got -0.001"),
        ("--dormant-tau", "-1E-2", "must be at least 0, got -0.01"),
        ("--batch-size", "-1e3", "expected a whole number, got '-1e3'"),
        ("--min-observations", "-2", "must be at least 1"),
    ],
)
def test_every_numeric_option_is_validated(hostile, monkeypatch, capsys, option, value, message):
    monkeypatch.chdir(hostile)
    with pytest.raises(SystemExit) as done:  # argparse's own exit, with a one-line message
        main(["scan", "cli_mods:make", "--data", "x.pt", option, value])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("deadrelu scan: error: argument " + option), err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["-1e-3", "-1E+1", "-.5e-1", "-0.25", "-2"])
def test_a_negative_threshold_is_taken_in_every_spelling(hostile, monkeypatch, capsys, tmp_path, value):
    import deadrelu
    from deadrelu.core.report import Report

    out = tmp_path / "r.json"
    code, _, err = run_main(["cli_mods:make", "--data", "x.pt", "--threshold", value, "--json", str(out)],
                            hostile, monkeypatch, capsys)
    assert code == 0, err
    report = Report.from_json(out)
    sys.path.insert(0, str(hostile))
    try:
        import cli_mods

        expected = deadrelu.scan(cli_mods.make(), torch.load(hostile / "x.pt"), threshold=float(value))
    finally:
        sys.path.remove(str(hostile))
    assert [s.fire_threshold for s in report.sites] == [s.fire_threshold for s in expected.sites]
    assert report.sites[0].fire_threshold == pytest.approx(float(value), rel=1e-6)
    assert [s.fired_counts for s in report.sites] == [s.fired_counts for s in expected.sites]


@pytest.mark.parametrize("argv, option, message", [
    (["demo", "--lr", "-1e-3"], "--lr", "must be positive, got -0.001"),
    (["experiment", "activations", "--lr", "-5E-1"], "--lr", "must be positive, got -0.5"),
    (["demo", "--seed", "-1e3"], "--seed", "expected a whole number, got '-1e3'"),
    (["experiment", "init", "--seed", "-1"], "--seed", "a seed must be at least 0, got -1"),
    (["experiment", "lr-sweep", "--epochs", "-1e2"], "--epochs", "expected a whole number, got '-1e2'"),
    (["demo", "--batch-size", "-64"], "--batch-size", "must be at least 1, got -64"),
])
def test_a_negative_lab_option_is_refused_by_name_and_writes_nothing(argv, option, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"deadrelu {argv[0]}: error: argument {option}: {message}"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "0"])
def test_a_learning_rate_must_be_a_finite_positive_number(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["demo", "--lr", value, "--seeds", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1 and "argument --lr" in err, err
    assert not (tmp_path / "out").exists()


def test_cuda_on_a_cpu_machine(hostile, monkeypatch, capsys):
    code, _, err = run_main(["cli_mods:make", "--data", "x.pt", "--device", "cuda"], hostile, monkeypatch, capsys)
    assert_one_line_error(code, err, "--device cuda is not available here")


@pytest.mark.parametrize("args", [["evil.pt"], ["evil_plain.pt"], ["cli_mods:make", "--weights", "evil.pt"]])
def test_pickled_code_runs_only_with_trust_pickle(hostile, monkeypatch, capsys, args):
    marker = hostile / MARKER
    code, _, err = run_main([*args, "--data", "x.pt"], hostile, monkeypatch, capsys)
    assert code == 2 and not marker.exists(), err
    # The payload is real: with the explicit opt-in it runs (and the scan then fails on what it returned).
    code, _, err = run_main([*args, "--trust-pickle", "--data", "x.pt"], hostile, monkeypatch, capsys)
    assert marker.exists(), err
    assert code == 2 and len(err.splitlines()) == 1
    marker.unlink()


def test_npz_with_labels_scans_the_other_array(hostile, monkeypatch, capsys, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = run_main(["cli_mods:make", "--data", "labels_foo.npz", "--json", str(out)], hostile, monkeypatch, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["samples"] == 10 and report["sites"][0]["observations"] == 10  # foo (10, 4), not labels (10,)


def test_json_through_a_symlink_writes_the_target(hostile, monkeypatch, capsys, tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, _, err = run_main(["cli_mods:make", "--data", "x.pt", "--json", str(link)], hostile, monkeypatch, capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["samples"] == 10


def _existing_report(tmp_path: Path) -> Path:
    out = tmp_path / "out.json"
    out.write_text('{"old": true}\n')
    return out


def test_full_disk_leaves_the_old_json_and_no_temp_file(hostile, monkeypatch, capsys, tmp_path):
    out = _existing_report(tmp_path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = run_main(["cli_mods:make", "--data", "x.pt", "--json", str(out)], hostile, monkeypatch, capsys)
    assert_one_line_error(code, err, "No space left on device")
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_unwritable_directory_is_one_line(hostile, monkeypatch, capsys, tmp_path):
    out = _existing_report(tmp_path)
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # what a read-only folder does, also for root
    code, _, err = run_main(["cli_mods:make", "--data", "x.pt", "--json", str(out)], hostile, monkeypatch, capsys)
    assert_one_line_error(code, err, "Permission denied")
    assert out.read_text() == '{"old": true}\n'


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_directory_is_refused_before_the_scan(hostile, monkeypatch, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_main(["cli_mods:make", "--data", "x.pt", "--json", str(ro / "r.json")], hostile, monkeypatch, capsys)
        assert_one_line_error(code, err, "is not writable")
    finally:
        ro.chmod(0o700)


_EVIDENCE = {"kind": "deadrelu.evidence"}
MALFORMED_RESULTS = {
    "summary is a list": {**_EVIDENCE, "experiment": "demo", "summary": [1, 2]},
    "summary lines a number": {**_EVIDENCE, "experiment": "demo", "summary": {"lines": 5}},
    "config a list": {**_EVIDENCE, "experiment": "demo", "config": [1]},
    "wall time a string": {**_EVIDENCE, "experiment": "demo", "wall_seconds": "x"},
    "experiment a number": {**_EVIDENCE, "experiment": 5},
    "demo without fields": {**_EVIDENCE, "experiment": "demo"},
    "sweep without fields": {**_EVIDENCE, "experiment": "lr-sweep"},
    "title a number": {**_EVIDENCE, "experiment": "init", "title": 3},
    "dataset a string": {**_EVIDENCE, "experiment": "rescue", "dataset": "mnist"},
    "unknown experiment": {**_EVIDENCE, "experiment": "zzz"},
}


@pytest.mark.parametrize("content", MALFORMED_RESULTS.values(), ids=MALFORMED_RESULTS)
def test_report_on_malformed_results_is_one_line(tmp_path, capsys, content):
    (tmp_path / "result.json").write_text(json.dumps(content))
    (tmp_path / "report.html").write_text("earlier page")
    before = _snapshot(tmp_path)
    code = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("deadrelu report: error: result.json"), err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("option", ["--json", "--data", "--weights", "--baseline"])
def test_an_empty_path_is_refused(hostile, monkeypatch, capsys, option):
    # --json '' used to write nothing, say nothing and exit 0
    before = _snapshot(hostile)
    monkeypatch.chdir(hostile)
    argv = ["scan", "cli_mods:make", "--data", "x.pt", "--advice", option, ""]
    with pytest.raises(SystemExit) as done:
        main(argv if option != "--data" else ["scan", "cli_mods:make", "--data", ""])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"argument {option}: expected a path, got an empty one" in err
    assert _snapshot(hostile) == before


def test_check_output_path_refuses_an_empty_path():
    from deadrelu.cli.scan import check_output_path
    from deadrelu.errors import DeadReluError

    with pytest.raises(DeadReluError, match="cannot write --json '': an empty path names no file"):
        check_output_path("", [])


@pytest.mark.parametrize(
    "message",
    [
        "Guard failed: x.size()[0] == 4",  # torch >= 2.4
        "Expected input at *args[0].shape[0] to be equal to 4, but got 6",  # torch 2.6
        "Input l_x_.shape[0] is specialized at 4",  # torch 2.2
    ],
)
def test_an_exported_programs_batch_size_error_names_the_size_it_takes_in_each_torchs_words(message):
    from deadrelu.cli.scan import _with_hint

    class GraphModuleLike:  # what the hint looks for: an exported program's module
        pass

    hinted = _with_hint(message, GraphModuleLike())
    assert hinted.startswith(message) and "exported with (4)" in hinted and "--batch-size" in hinted
