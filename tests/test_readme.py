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
