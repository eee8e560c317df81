"""The README's set-up commands and its usage snippet are true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_starts_with_the_two_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert blocks[0].endswith("deadrelu demo") and "pip install" in blocks[0]
    assert blocks[1].endswith("python -m pytest -q") and '".[test]"' in blocks[1]
    # .ci/run runs the same test command.
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and '".[test]"' in ci


def test_scan_snippet_prints_what_the_readme_shows(tmp_path):
    part = README.split("<!-- readme-snippet: scan -->", 1)[1]
    code, shown = re.findall(r"```(?:python|text)\n(.*?)\n```", part, flags=re.S)[:2]
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == shown.strip()


def test_demo_table_in_readme_matches_a_fresh_run(tmp_path):
    """Every number in the README's demo table except wall times comes out of `deadrelu demo` now."""
    block = README.split("<!-- readme-demo -->", 1)[1]
    shown = re.findall(r"```text\n(.*?)\n```", block, flags=re.S)[0].splitlines()
    res = subprocess.run(
        [sys.executable, "-m", "deadrelu", "demo", "--no-progress", "--no-live", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    printed = res.stdout.splitlines()

    def without_times(line: str) -> list[str]:
        cells = re.split(r"\s{2,}", line.strip())
        # strategy, 5 layers, all, val acc, train s[, extra]: drop the wall time ("train s")
        return cells[:8] + cells[9:]

    for line in shown[2:]:
        name = re.split(r"\s{2,}", line.strip())[0]
        match = next(p for p in printed if p.startswith(name))
        assert without_times(match) == without_times(line), name
