"""The README's set-up commands, its Python blocks and its demo output are true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)\n```", README, flags=re.S)


def test_readme_starts_with_the_two_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert blocks[0].endswith("deadrelu demo") and "pip install" in blocks[0]
    test_command = blocks[1].rsplit("&& ", 1)[-1]
    assert test_command.startswith("python -m pytest -q") and '".[test]"' in blocks[1]
    # .ci/run runs the same test command.
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert test_command in ci.splitlines() and '".[test]"' in ci


def _env() -> dict[str, str]:
    """This process's environment, with the deadrelu under test first on the path (also from another folder)."""
    import deadrelu

    src = str(Path(deadrelu.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=_env())


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_every_python_block_runs_as_pasted(index, tmp_path):
    """Each block on its own, in a fresh interpreter and an empty folder: no name it does not define."""
    assert len(PYTHON_BLOCKS) >= 3  # scan, monitor, fix
    res = _run_block(PYTHON_BLOCKS[index], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()


def test_scan_snippet_prints_what_the_readme_shows(tmp_path):
    part = README.split("<!-- readme-snippet: scan -->", 1)[1]
    code, shown = re.findall(r"```(?:python|text)\n(.*?)\n```", part, flags=re.S)[:2]
    out = _run_block(code, tmp_path)
    assert out.stdout.strip() == shown.strip()


def test_fix_snippet_shows_prune_dead_returning_a_prune_result(tmp_path):
    code = re.findall(r"```python\n(.*?)\n```", README.split("<!-- readme-snippet: fix -->", 1)[1], flags=re.S)[0]
    assert "pruned = deadrelu.prune_dead(" in code and "pruned.model" in code
    first, *_ = _run_block(code, tmp_path).stdout.splitlines()
    removed, before, after, equal = first.split()
    assert removed == "40" and int(before) - int(after) == 40 * (64 + 1 + 10) and equal == "True"


def test_base_install_without_numpy_prints_no_warning(tmp_path):
    """numpy is optional: torch's "Failed to initialize NumPy" warning must not reach a deadrelu user."""
    code = ("import sys; sys.modules['numpy'] = None\n"
            "from deadrelu.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n")
    res = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env=_env())
    assert "usage" in res.stdout
    assert "NumPy" not in res.stderr and "Warning" not in res.stderr, res.stderr[-2000:]


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _without_seconds(line: str) -> str:
    return re.sub(r"\d+\.\d+ s\b", "<t> s", line)


@pytest.mark.skipif(not __import__("deadrelu._imports", fromlist=["available"]).available("sklearn"),
                    reason="the demo needs scikit-learn")
def test_demo_output_in_readme_matches_a_fresh_default_run(tmp_path):
    """A fresh `deadrelu demo` with every default (5 seeds, all strategies) gives the README's table and
    sentences. Pinned: every number except wall-clock seconds (the "train s" column and the seconds
    in the sentences) and the name of the cheapest rescue, which is a timing and may differ by noise.
    The run is without plots or HTML (they do not change a number). Its seeds train in two spawned
    worker processes, whose CPU kernels run_demo pins to their AVX2 code paths (lab/numerics.py): this
    process has computed already, so kernels pinned here would not take effect."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2", "AVX512"
    ):
        pytest.skip("the README's numbers are those of x86-64 AVX2 kernels; this CPU computes with others")
    from deadrelu.core.tables import render_plain
    from deadrelu.lab.demo import run_demo
    from deadrelu.lab.tables import result_table

    block = README.split("<!-- readme-demo -->", 1)[1]
    shown_table, shown_lines = re.findall(r"```text\n(.*?)\n```", block, flags=re.S)[:2]
    result = run_demo(out=tmp_path / "out", progress=False, plots=False, html=False, workers=2)
    printed = render_plain(result_table(result)).splitlines()
    shown = shown_table.splitlines()[1:]  # the first line is the title above the table
    assert len(printed) == len(shown)
    train_s = _cells(printed[0]).index("train s")
    for fresh, readme in zip(printed, shown):
        fresh_cells, readme_cells = _cells(fresh), _cells(readme)
        if set(fresh.strip()) <= {"-", " "}:
            continue
        assert fresh_cells[:train_s] + fresh_cells[train_s + 1:] == readme_cells[:train_s] + readme_cells[train_s + 1:]
    lines = [f"- {line}" for line in result["summary"]["lines"]]
    readme_lines = shown_lines.splitlines()
    assert len(lines) == len(readme_lines)
    for fresh, readme in zip(lines, readme_lines):
        if fresh.startswith("- Cost:"):
            assert readme.startswith("- Cost:") and re.search(r"is cheapest, \d+\.\d+ s for 20 epochs", readme)
            continue
        assert _without_seconds(fresh) == _without_seconds(readme)
    from deadrelu.cli.lab import demo_table_title

    assert shown_table.splitlines()[0] == demo_table_title(result)
