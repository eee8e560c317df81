"""`deadrelu scan` end to end through a subprocess: every model and data format, every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures import torch_older_than
from fixtures.models import MLP, data_for

from deadrelu.lab.idx import write_idx


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # The pickled fixture model refers to fixtures.models, so the tests folder must be importable.
    # Keep any PYTHONPATH the suite runs under (a source checkout) in front.
    paths = [p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parents[1])) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", "deadrelu", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = MLP().eval()
    x = data_for(model, n=64)
    torch.save(model, d / "pickled.pt")
    torch.jit.save(torch.jit.script(model), d / "scripted.pt")
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},)), d / "exported.pt2")
    torch.save(model.state_dict(), d / "weights.pt")
    torch.save(x, d / "x.pt")
    torch.save((x, torch.zeros(len(x))), d / "xy.pt")
    torch.save(torch.randn(0, 10), d / "empty.pt")
    torch.save(torch.randn(6, 4), d / "x4.pt")
    torch.save(torch.randn(5, 7), d / "wrongwidth.pt")
    (d / "x.csv").write_text("a,b,c,d,e,f,g,h,i,j\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in x.tolist()))
    (d / "notamodel.pt").write_text("hello")
    (d / "models_mod.py").write_text(
        textwrap.dedent(
            """
            import torch, sys
            sys.path.insert(0, %r)
            from fixtures.models import MLP, NoActivations

            def make():
                torch.manual_seed(1)
                return MLP()

            def noact():
                return NoActivations()

            def batches():
                g = torch.Generator().manual_seed(0)
                return [torch.randn(16, 10, generator=g) for _ in range(3)]

            def not_a_model():
                return 42
            """
            % str(Path(__file__).parents[1])
        )
    )
    mnist = d / "mnist"
    mnist.mkdir()
    write_idx(mnist / "t10k-images-idx3-ubyte", torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8))
    write_idx(mnist / "t10k-labels-idx1-ubyte", torch.randint(0, 10, (20,), dtype=torch.uint8))
    return d, model, x


# torch 2.2 cannot load the .pt2 files it writes (its serializer splits metadata on commas in getattr(...))
OLD_PT2 = pytest.mark.skipif(torch_older_than(2, 3), reason="torch 2.2 cannot reload its own .pt2 files")


@pytest.mark.parametrize("model_file", ["pickled.pt", "scripted.pt", pytest.param("exported.pt2", marks=OLD_PT2)])
def test_scan_each_model_format_writes_json(files, model_file):
    d, model, x = files
    out = d / f"{model_file}.json"
    trust = [] if model_file == "scripted.pt" else ["--trust-pickle"]  # pickles and .pt2 run code: opt in
    res = run_cli("scan", model_file, *trust, "--data", "x.pt", "--json", str(out), "--batch-size", "16", cwd=d)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert [s["summary"]["dead_units"] for s in report["sites"]] == [[2, 5, 7], [0, 9]]
    # TorchScript hides module structure from Python: its sites are named by order in forward.
    names = ["<root>:relu.1", "<root>:relu.2"] if model_file == "scripted.pt" else ["1", "3"]
    assert [s["name"] for s in report["sites"]] == names
    assert report["batches"] == 4 and report["samples"] == 64
    assert "total" in res.stdout


def test_scan_factory_with_weights_and_data_formats(files):
    d, _, _ = files
    for data in ("x.pt", "xy.pt", "x.csv", "models_mod:batches"):
        res = run_cli("scan", "models_mod:make", "--weights", "weights.pt", "--data", data, "--json", "r.json", cwd=d)
        assert res.returncode == 0, (data, res.stderr)
        sites = json.loads((d / "r.json").read_text())["sites"]
        assert sites[0]["summary"]["dead_units"] == [2, 5, 7]


def test_scan_mnist_idx_directory(files):
    d, _, _ = files
    (d / "conv_mod.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4*26*26, 2))\n"
    )
    res = run_cli("scan", "conv_mod:make", "--data", "mnist", "--json", "m.json", cwd=d)
    assert res.returncode == 0, res.stderr
    rep = json.loads((d / "m.json").read_text())
    assert rep["samples"] == 20
    assert rep["sites"][0]["summary"]["units"] == 4 and rep["sites"][0]["observations"] == 20 * 26 * 26


def test_scan_advice_with_baseline(files):
    d, _, _ = files
    res = run_cli("scan", "pickled.pt", "--trust-pickle", "--data", "x.pt", "--advice", "--json", "base.json", cwd=d)
    assert res.returncode == 0, res.stderr
    assert "Advice:" in res.stdout and "5 of 48 units dead" in res.stdout
    assert "without a baseline" in res.stdout
    res = run_cli("scan", "pickled.pt", "--trust-pickle", "--data", "x.pt", "--advice", "--baseline", "base.json", cwd=d)
    assert res.returncode == 0, res.stderr
    assert "without a baseline" not in res.stdout
    bad = run_cli("scan", "pickled.pt", "--trust-pickle", "--data", "x.pt", "--advice", "--baseline", "x.csv", cwd=d)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "missing.pt", "--data", "x.pt"], "model file not found: missing.pt"),
        (["scan", "notamodel.pt", "--data", "x.pt"], "is not a model file"),
        (["scan", "weights.pt", "--data", "x.pt"], "holds a state_dict, not a model"),
        (["scan", "models_mod:nothing", "--data", "x.pt"], "has no attribute 'nothing'"),
        (["scan", "nomodule_xyz:make", "--data", "x.pt"], "cannot import 'nomodule_xyz'"),
        (["scan", "models_mod:not_a_model", "--data", "x.pt"], "not a torch.nn.Module"),
        (["scan", "models_mod:noact", "--data", "x4.pt"], "no activation sites"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "missing.pt"], "data not found: missing.pt"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "empty.pt"], "holds no samples"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "notamodel.pt"], "not a tensor file"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "wrongwidth.pt"], "input (5, 7); last activation site reached"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "models_mod.py"], "unknown data format"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "x.pt", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["scan", "models_mod:make", "--weights", "x.pt", "--data", "x.pt"], "not a state_dict"),
        (["scan", "pickled.pt", "--trust-pickle", "--data", "x.pt", "--json", "nodir/out.json"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(files, args, message):
    d, _, _ = files
    res = run_cli(*args, cwd=d)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert message in lines[0]
    assert lines[0].startswith("deadrelu scan: error: ")
    assert not (d / "nodir").exists()


def test_pickled_model_file_is_unchanged_by_a_scan(files):
    d, _, _ = files
    before = (d / "pickled.pt").read_bytes()
    assert run_cli("scan", "pickled.pt", "--trust-pickle", "--data", "x.pt", cwd=d).returncode == 0
    assert (d / "pickled.pt").read_bytes() == before


def test_help_lists_scan():
    res = subprocess.run([sys.executable, "-m", "deadrelu", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "scan" in res.stdout


def test_min_observations_turns_thin_evidence_into_unobserved(files):
    d, _, _ = files
    res = run_cli("scan", "scripted.pt", "--data", "x.pt", "--json", "thin.json", "--min-observations", "1000", cwd=d)
    assert res.returncode == 0, res.stderr
    report = json.loads((d / "thin.json").read_text())
    assert report["levels"]["min_observations"] == 1000
    first = report["sites"][0]["summary"]
    assert first["dead_units"] == [] and first["unobserved"] == 3  # 64 observations are too few to call dead
    bad = run_cli("scan", "scripted.pt", "--data", "x.pt", "--min-observations", "0", cwd=d)
    assert bad.returncode == 2 and "--min-observations" in bad.stderr


def test_a_reader_that_leaves_early_ends_the_scan_quietly(files):
    # `deadrelu scan ... | head -1` printed "error: [Errno 32] Broken pipe" and exited 2
    d, _, _ = files
    paths = [p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parents[1])) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deadrelu", "scan", "scripted.pt", "--data", "x.pt", "--advice", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=d, env=env,
    )  # fmt: skip
    proc.stdout.close()  # the reader is gone before the table is printed
    _, err = proc.communicate(timeout=120)
    assert err.decode() == "" and proc.returncode == 141


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch, capsys):
    import importlib

    cli_main = importlib.import_module("deadrelu.cli.main")  # the module (deadrelu.cli.main is also its function)

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli_main._VERBS, "scan", (cli_main._VERBS["scan"][0], broken))
    monkeypatch.setattr(cli_main, "_stdout_closed", lambda: False)
    assert cli_main.main(["scan", "m", "--data", "x"]) == 2
    assert capsys.readouterr().err == "deadrelu scan: error: [Errno 32] Broken pipe\n"


def test_a_float64_model_scans_its_float64_data(tmp_path):
    """The data is cast to the model's dtype: it was always float32, so a float64 model's own float64
    file failed with 'the model raised RuntimeError: mat1 and mat2 must have the same dtype'."""
    import numpy as np

    (tmp_path / "f64mod.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make():
                torch.manual_seed(0)
                m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
                with torch.no_grad():
                    m[0].bias[:5] = -50.0
                return m
            """
        )
    )
    x = np.random.default_rng(0).normal(size=(50, 8))  # float64, NumPy's default
    np.save(tmp_path / "x.npy", x)
    p = run_cli("scan", "f64mod:make", "--data", "x.npy", "--json", "r.json", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    site = json.loads((tmp_path / "r.json").read_text())["sites"][0]
    assert site["observations"] == 50 and site["fired_counts"][:5] == [0] * 5 and min(site["fired_counts"][5:]) > 0
