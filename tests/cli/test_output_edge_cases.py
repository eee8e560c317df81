"""Where and how the CLI writes its output: a file name that names a directory, a terminal narrower than the table."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch

from deadrelu.cli.main import main
from deadrelu.core.files import atomic_write_text
from deadrelu.errors import DeadReluError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _tree(root):
    """Every path under ``root`` with its bytes (None for a directory): what a refused command must leave."""
    return {p.relative_to(root): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def scan_files(tmp_path, monkeypatch):
    """A TorchScript model and its data in the current directory, tmp_path."""
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    torch.jit.save(torch.jit.script(model), tmp_path / "m.pt")
    torch.save(torch.randn(32, 4), tmp_path / "x.pt")
    return tmp_path


# -- a path ending in "/" names a directory ----------------------------------------------------------
@pytest.mark.parametrize("out", ["jdir/", "jdir/.", "jdir//", "prev.json/"])
def test_scan_json_naming_a_directory_is_refused_and_nothing_written(scan_files, capsys, out):
    assert main(["scan", "m.pt", "--data", "x.pt", "--json", "prev.json", "--no-progress"]) == 0
    capsys.readouterr()
    before = _tree(scan_files)
    assert main(["scan", "m.pt", "--data", "x.pt", "--json", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write --json {out}: a path ending in " in err and "names a directory" in err
    assert _tree(scan_files) == before  # no file "jdir", and prev.json (behind "prev.json/") not replaced


def test_scan_json_an_existing_directory_with_a_slash_is_still_refused(scan_files, capsys):
    (scan_files / "d").mkdir()
    assert main(["scan", "m.pt", "--data", "x.pt", "--json", "d/", "--no-progress"]) == 2
    assert capsys.readouterr().err == "deadrelu scan: error: cannot write --json d/: it is a directory\n"
    assert list((scan_files / "d").iterdir()) == []


def test_report_out_naming_a_directory_is_refused_and_nothing_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # the old code drew the plots, then wrote a file "rdir"
    from deadrelu.lab.demo import write_results
    from deadrelu.lab.experiments import lr_sweep

    monkeypatch.chdir(tmp_path)
    write_results(lr_sweep(lrs=(0.01,), seeds=(0,), epochs=1, progress=False), tmp_path / "res" / "lr-sweep.json")
    before = _tree(tmp_path)
    assert main(["report", "res", "--out", "rdir/"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "deadrelu report: error: cannot write the report to rdir/: a path ending in '/' names a directory, "
        "and rdir does not exist; give a file name\n"
    )
    assert _tree(tmp_path) == before


def test_library_writes_refuse_a_name_ending_in_a_slash(tmp_path):
    from deadrelu.core.report import Report
    from deadrelu.lab.html_report import write_report

    (tmp_path / "earlier.json").write_text("{}\n")
    for path in (tmp_path / "new", tmp_path / "earlier.json"):
        with pytest.raises(DeadReluError, match="names a directory"):
            atomic_write_text(f"{path}/", "text\n")
    with pytest.raises(DeadReluError, match="names a directory"):
        Report.to_json(_a_report(), f"{tmp_path}/report/")
    with pytest.raises(DeadReluError, match="names a directory"):
        write_report(tmp_path, f"{tmp_path}/page/", images=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json"]
    assert (tmp_path / "earlier.json").read_text() == "{}\n"


def _a_report():
    import deadrelu

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    return deadrelu.scan(model, torch.randn(16, 4), progress=False)


# -- a terminal narrower than the table ----------------------------------------------------------------
_WIDE_MODEL = """
import torch
from torch import nn

class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 1536)
        self.intermediate_act_fn = nn.ReLU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))

class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        return self.layer[0](x).sum(-1, keepdim=True) + self.layer[1](x).sum(-1, keepdim=True)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x):
        return self.encoder(x)

def make():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.encoder.layer[0].dense.bias[:1234] = -100.0
        m.encoder.layer[1].dense.bias[:77] = -100.0
    return m

def data():
    torch.manual_seed(0)
    return torch.randn(64, 8)
"""


@pytest.fixture
def wide_model(tmp_path, monkeypatch):
    """``edge_wide_mods:make``: two sites with long names, 1234 and 77 dead units (a table of about 125 columns)."""
    (tmp_path / "edge_wide_mods.py").write_text(textwrap.dedent(_WIDE_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edge_wide_mods", raising=False)
    return ["scan", "edge_wide_mods:make", "--data", "edge_wide_mods:data", "--no-progress"]


def _on_a_terminal(monkeypatch, columns: int) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", str(columns))


@pytest.mark.parametrize("columns", [100, 72, 40])
def test_scan_on_a_narrow_terminal_prints_every_name_and_number_whole(wide_model, capsys, monkeypatch, columns):
    pytest.importorskip("rich")
    _on_a_terminal(monkeypatch, columns)
    assert main(wide_model) == 0
    out = _ANSI.sub("", capsys.readouterr().out)
    assert "…" not in out and "┃" not in out  # the plain table, not rich's squeezed one
    lines = [line.split() for line in out.splitlines()]
    assert ["encoder.layer.0.intermediate_act_fn", "relu", "1536", "1234"] in [row[:4] for row in lines]
    assert ["encoder.layer.1.intermediate_act_fn", "relu", "1536", "77"] in [row[:4] for row in lines]


def test_scan_on_a_wide_terminal_still_draws_the_rich_table(wide_model, capsys, monkeypatch):
    pytest.importorskip("rich")
    _on_a_terminal(monkeypatch, 200)
    assert main(wide_model) == 0
    out = _ANSI.sub("", capsys.readouterr().out)
    assert "┃" in out and "encoder.layer.0.intermediate_act_fn" in out and "1234" in out and "…" not in out


def test_print_fitted_follows_the_consoles_width():
    rich_console = pytest.importorskip("rich.console")
    import io

    from deadrelu.cli.tables_fit import print_fitted

    report = _a_report()
    for width, drawn in ((40, False), (300, True)):
        console = rich_console.Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None)
        print_fitted(report.__rich__, str(report), console=console)
        text = console.file.getvalue()
        assert ("┃" in text) is drawn and "…" not in text
        if not drawn:  # the plain table, whose last line is the total row
            assert text.rstrip("\n").splitlines()[-1].split()[0] == "total"


def test_results_and_log_files_refuse_a_name_ending_in_a_slash(tmp_path):
    """write_results("res/") wrote a file named res; JSONLSink("logs/") logged into a file named logs."""
    from deadrelu.lab.outputs import write_results
    from deadrelu.monitor.sinks import CSVSink, JSONLSink

    for write in (lambda p: write_results({"kind": "x"}, p), JSONLSink, CSVSink):
        with pytest.raises(DeadReluError, match="names a directory"):
            write(str(tmp_path / "res") + "/")
    assert list(tmp_path.iterdir()) == []
