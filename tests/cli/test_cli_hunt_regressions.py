"""Regressions found by a hunt for hostile inputs to the CLI, the lab's report and the scan API:
each a case that gave a traceback, changed a file on error, or read more data than asked for."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import deadrelu
from deadrelu.cli.main import main

_MODS = """
import torch
def make_net():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        m[0].bias[:5] = -10
    return m
"""


@pytest.fixture
def net_spec(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "hunt_mods.py").write_text(_MODS)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(torch.randn(100, 8, generator=torch.Generator().manual_seed(1)), tmp_path / "x.pt")
    return tmp_path


def test_a_baseline_the_advice_cannot_compare_with_leaves_the_json_file_as_it_was(net_spec: Path, capsys):
    d = net_spec
    base = ["scan", "hunt_mods:make_net", "--data", str(d / "x.pt"), "--no-progress"]
    assert main([*base, "--json", str(d / "base.json"), "--asleep-rate", "0.1"]) == 0
    (d / "out.json").write_text('{"keep": "me"}')
    code = main([*base, "--json", str(d / "out.json"), "--advice", "--baseline", str(d / "base.json")])
    assert code == 2 and "levels" in capsys.readouterr().err
    assert (d / "out.json").read_text() == '{"keep": "me"}'  # before: replaced, then the advice failed


@pytest.mark.parametrize(
    "make, word",
    [(lambda: torch.randn(10, 8).to_sparse(), "sparse"), (lambda: torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]), "nested")],
    ids=["sparse", "nested"],
)  # fmt: skip
def test_data_of_a_sparse_or_nested_tensor_is_one_error_line(net_spec: Path, capsys, make, word):
    path = net_spec / "odd.pt"
    torch.save(make(), path)
    code = main(["scan", "hunt_mods:make_net", "--data", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and word in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_max_batches_takes_no_batch_beyond_them():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    pulled = []

    def batches():
        for i in range(5):
            pulled.append(i)
            if i == 2:
                raise RuntimeError("the third batch is broken, and never asked for")
            yield torch.randn(10, 8)

    assert deadrelu.scan(net, batches(), max_batches=2).batches == 2 and pulled == [0, 1]
    rest = iter([torch.randn(10, 8) for _ in range(4)])
    deadrelu.scan(net, rest, max_batches=2)
    assert len(list(rest)) == 2  # an iterator the caller goes on with keeps its other batches
    assert deadrelu.scan(net, torch.randn(10, 8), max_batches=10**30).batches == 1


def test_scan_data_and_options_at_their_limits():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    assert deadrelu.scan(net, torch.randn(10, 8), batch_size=2**63).batches == 1  # a raw overflow before
    with pytest.raises(deadrelu.DataError, match="sparse"):
        deadrelu.scan(net, torch.randn(10, 8).to_sparse())
    with pytest.raises(deadrelu.DeadReluError, match="2\\*\\*63 - 1"):
        deadrelu.scan(net, torch.randn(10, 8), min_observations=2**63)  # its report could not be read back
    report = deadrelu.scan(net, torch.randn(10, 8), min_observations=2**63 - 1)
    assert deadrelu.Report.from_json(report.to_json()).sites[0].levels.min_observations == 2**63 - 1


def test_a_probe_reports_the_mode_its_forwards_ran_in_and_a_nested_block_is_part_of_the_outer():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    x = torch.randn(16, 8)
    probe = deadrelu.Probe(net.train())
    with probe:
        with probe:
            net(x)
        net(x)  # still inside the outer block: observed (the inner exit detached the probe before)
    net.eval()
    report = probe.report()
    assert report.mode == "train" and report.sites[0].observations == 32
    with probe:
        net(x)
    with pytest.warns(UserWarning, match="train mode and in eval mode"):
        assert probe.report().mode == "train"
    probe.reset()
    with probe:
        net(x)
    assert probe.report().mode == "eval"


def test_a_report_file_whose_name_starts_like_json_is_read_as_a_file(tmp_path: Path, monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    report = deadrelu.scan(net, torch.randn(10, 8))
    monkeypatch.chdir(tmp_path)
    report.to_json("{run1}.json")
    assert deadrelu.Report.from_json("{run1}.json").units == 16  # it was read as JSON text


def test_a_json_file_name_near_the_systems_limit_is_written(tmp_path: Path):
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    report = deadrelu.scan(net, torch.randn(10, 8))
    name = "r" * 245 + ".json"  # the OS takes 250 bytes; the temporary's name is shortened, not the file's
    report.to_json(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert deadrelu.Report.from_json(tmp_path / name).units == 16


def test_site_names_with_brackets_are_shown_as_they_are_in_a_rich_table():
    rich = pytest.importorskip("rich.console")
    from deadrelu.core.tables import render_rich

    console = rich.Console(record=True, width=200, color_system=None)
    console.print(render_rich([["site", "fn", "units", "dead"], ["acts.[/x]", "relu", "4", "1"], ["acts.[bold]", "relu", "4", "0"]]))
    text = console.export_text()
    assert "acts.[/x]" in text and "acts.[bold]" in text


def test_the_html_report_skips_other_programs_json_and_dangling_links(tmp_path: Path):
    from deadrelu.lab.html_report import _read_result_json, _same_file

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    huge = tmp_path / "huge.json"
    huge.write_text("1" * 5000)
    assert _read_result_json(deep) is None and _read_result_json(huge) is None
    os.symlink(tmp_path / "missing.json", tmp_path / "dangling.json")
    assert _same_file(tmp_path / "deep.json", tmp_path / "dangling.json") is False


def test_a_threshold_or_unit_dim_key_that_names_no_site_is_warned_of_once():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    x = torch.randn(10, 8)
    with pytest.warns(UserWarning, match="'nosuch' name no activation site") as caught:
        report = deadrelu.scan(net, x, threshold={"nosuch": 5.0, "1": 0.1}, unit_dim={"relu": -1})
    assert report.sites[0].fire_threshold == 0.1  # the keys that name a site are used as before
    assert len([w for w in caught if "name no activation site" in str(w.message)]) == 1  # unit_dim's 'relu' names it
    assert "the sites: '1'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deadrelu.scan(net, x, threshold={"1": 0.1, "relu": 0.2, "1:relu": 0.3})  # every key names the site
