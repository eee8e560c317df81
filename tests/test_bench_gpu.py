"""benchmarks/bench_gpu.py runs end to end: its CPU smoke mode, and a clean exit without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_cpu_smoke_run_fills_every_number(tmp_path):
    # Two of the six models, one dtype and no torch.compile keep this quick; the full smoke run
    # (python benchmarks/bench_gpu.py --cpu-smoke) covers the rest, compiled MLP included.
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--no-compile", "--models", "MLP", "BERT", "--dtypes", "bf16", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU smoke run" in proc.stdout and "scan ratio" in proc.stdout
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["skipped"] == []
    assert [(r["model"], r["dtype"]) for r in data["rows"]] == [("MLP 5x4096", "bf16"), ("BERT-base", "bf16")]
    for row in data["rows"]:
        assert row["note"] == "", row
        assert row["scan_ratio"] > 0 and row["monitor_eager"] > 0
        assert row["scan_extra_mib"] is None and row["monitor_compiled"] is None  # no CUDA memory; compile skipped


def test_a_spent_budget_starts_no_row_and_says_which_were_left(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--no-compile", "--models", "MLP", "--budget-s", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["skipped"] == ["MLP 5x4096 fp32", "MLP 5x4096 bf16"]
    assert "not measured (--budget-s 0 spent): MLP 5x4096 fp32, MLP 5x4096 bf16" in proc.stdout
    assert not (tmp_path / "rows.json.tmp").exists()


@pytest.mark.parametrize("budget", ["-1", "nan", "inf"])
def test_a_budget_that_is_not_a_duration_is_refused(budget):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-s", budget], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--budget-s must be a number of seconds" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_it_says_so_and_exits_cleanly():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout and not proc.stderr.strip()
