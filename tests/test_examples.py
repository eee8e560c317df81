"""Every script in examples/ runs to completion and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    res = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**__import__("os").environ, "MPLBACKEND": "agg"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()


def test_scan_planted_example_finds_the_planted_channels(tmp_path):
    script = Path(__file__).parents[1] / "examples" / "scan_planted.py"
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True)
    assert "2: dead channels [3, 7]" in res.stdout
    sites = json.loads(out.read_text())["sites"]
    assert sites[1]["summary"]["dead_units"] == [0, 1, 2, 3]
