"""The CLI promise for the lab commands (demo, experiment, report): bad input is one line on stderr, exit 2, no
traceback, and no file touched — malformed MNIST files, a truncated result, files deadrelu did not write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deadrelu.cli.main import main
from deadrelu.lab.datasets import MNIST_FILES
from deadrelu.lab.idx import write_idx

SMALL = ["--seeds", "1", "--epochs", "1", "--checkpoint-epoch", "1", "--workers", "1", "--no-progress"]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _no_training(monkeypatch):
    def trained(*_, **__):
        raise AssertionError("trained although the run was refused")

    monkeypatch.setattr("deadrelu.lab.demo.seeds_story", trained)
    monkeypatch.setattr("deadrelu.lab.experiments.run_experiment", trained)


def _one_error_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [["demo", *SMALL, "--no-live"],
                                     ["experiment", "rescue", "--seeds", "1", "--no-progress"]])
def test_malformed_mnist_is_one_line_for_demo_and_experiment(command, tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    for name, tensor in zip(MNIST_FILES, (images, torch.tensor([0, 1, 2, 111], dtype=torch.uint8),
                                          images, torch.zeros(4, dtype=torch.uint8))):
        write_idx(data / name, tensor)
    before = _files(data)
    err = _one_error_line([*command, "--dataset", "mnist", "--data-dir", str(data), "--out", str(tmp_path / "o")],
                          capsys)
    assert MNIST_FILES[1] in err and "0..9" in err
    assert not (tmp_path / "o").exists() and _files(data) == before


def test_report_of_a_folder_with_only_a_truncated_result_names_it(tmp_path, capsys):
    (tmp_path / "init.json").write_text('{"kind": "deadrelu.evidence", "experiment": "init", "conf')
    err = _one_error_line(["report", str(tmp_path)], capsys)
    assert "init.json" in err and "no deadrelu results" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.json"]


def test_a_truncated_result_in_out_is_found_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / "init.json").write_text('{"kind": "deadrelu.evidence", "experiment": "in')
    err = _one_error_line(["experiment", "lr-sweep", "--seeds", "1", "--epochs", "1", "--no-progress",
                           "--out", str(tmp_path)], capsys)
    assert "init.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.json"]


@pytest.mark.parametrize("command, name", [
    (["demo", *SMALL, "--no-live"], "results.json"),
    (["demo", *SMALL, "--no-live"], "report.html"),
    (["experiment", "init", "--seed", "0", "--no-progress"], "init.json"),
])
def test_demo_and_experiment_never_replace_a_file_they_did_not_write(command, name, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / name).write_text('{"my": "precious results"}' if name.endswith(".json") else "<p>mine</p>")
    before = _files(tmp_path)
    err = _one_error_line([*command, "--out", str(tmp_path)], capsys)
    assert name in err and "--out" in err
    assert _files(tmp_path) == before


def test_rerunning_the_demo_into_its_own_folder_still_works(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", *SMALL, "--no-live", "--out", str(out)]) == 0
    assert main(["demo", *SMALL, "--no-live", "--out", str(out)]) == 0  # its own results.json and report.html
    assert main(["report", str(out)]) == 0
    story = json.loads((out / "results.json").read_text())
    assert story["kind"] == "deadrelu.evidence"
    # `deadrelu report DIR` never replaces someone else's DIR/report.html; --out elsewhere still works
    (out / "report.html").write_text("<p>mine</p>")
    capsys.readouterr()
    err = _one_error_line(["report", str(out)], capsys)
    assert "report.html" in err and (out / "report.html").read_text() == "<p>mine</p>"
    assert main(["report", str(out), "--out", str(tmp_path / "elsewhere.html")]) == 0


def _refused(*_, **__):
    raise AssertionError("trained although the run was refused")


def _mnist1d_npz(path: Path, **changes) -> None:
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.normal(size=(30, 40)), y=np.arange(30) % 10, x_test=rng.normal(size=(10, 40)),
                  y_test=np.arange(10))
    arrays.update(changes)
    np.savez(path, **arrays)


MNIST1D_BAD = {
    "widths": (lambda np: {"x_test": np.zeros((10, 41))}, "x holds samples of length 40 but x_test of length 41"),
    "label 14": (lambda np: {"y": np.full(30, 14)}, "y holds label 14; MNIST-1D labels are 0..9"),
    "label -1": (lambda np: {"y_test": -np.ones(10, dtype=int)}, "y_test holds label -1"),
    "empty": (lambda np: {"x": np.zeros((0, 40)), "y": np.zeros(0, dtype=int)}, "x holds no data (shape (0, 40))"),
    "strings": (lambda np: {"x": np.array([["a"] * 40] * 30)}, "x must hold numbers of shape (samples, length)"),
    "NaN inputs": (lambda np: {"x": np.full((30, 40), np.nan)}, "x holds 1200 NaN or infinite value(s)"),
    "float labels": (lambda np: {"y": np.arange(30) % 10 + 0.7}, "y must hold one integer label per sample (N,), got float64"),
}


@pytest.mark.parametrize("case", list(MNIST1D_BAD))
@pytest.mark.parametrize("command", [["demo", *SMALL, "--no-live"],
                                     ["experiment", "activations", "--epochs", "1", "--no-progress"]])
def test_malformed_mnist1d_is_one_line_for_demo_and_experiment(case, command, tmp_path, capsys, monkeypatch):
    np = pytest.importorskip("numpy")
    monkeypatch.setattr("deadrelu.lab.demo.seeds_story", _refused)  # run_experiment loads the data itself
    make, message = MNIST1D_BAD[case]
    data = tmp_path / "m1"
    data.mkdir()
    _mnist1d_npz(data / "mnist1d.npz", **make(np))
    before = _files(data)
    err = _one_error_line([*command, "--dataset", "mnist1d", "--data-dir", str(data), "--out", str(tmp_path / "o")],
                          capsys)
    assert str(data / "mnist1d.npz") in err and message in err, err
    assert not (tmp_path / "o").exists() and _files(data) == before


@pytest.mark.parametrize("command", [["demo", *SMALL, "--no-live"],
                                     ["experiment", "init", "--no-progress"]])
def test_a_data_dir_for_a_dataset_that_reads_no_files_is_refused(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("deadrelu.lab.demo.seeds_story", _refused)  # run_experiment loads the data itself
    err = _one_error_line([*command, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "the digits data set reads no files" in err and "--data-dir" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["demo", *SMALL, "--no-live", "--out", ""],
                                  ["experiment", "init", "--no-progress", "--out", ""],
                                  ["demo", *SMALL, "--no-live", "--data-dir", "", "--dataset", "mnist1d"],
                                  ["report", ""], ["report", ".", "--out", ""]])
def test_an_empty_path_is_refused(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --out used to mean the current directory
    monkeypatch.setattr("deadrelu.lab.demo.seeds_story", _refused)  # run_experiment loads the data itself
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a path, got an empty one" in err, err
    assert list(tmp_path.iterdir()) == []
