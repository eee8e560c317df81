"""Golden outputs: the printed report table (rich and plain), the diff and the advice, pinned.

The reports are built from fixed counts (no training, no randomness), so any change in these
files is a formatting change. A mismatch fails with a unified diff of expected vs printed;
after checking it, rewrite the files with::

    python -m pytest tests/core/test_golden.py --overwrite-golden
    # or: DEADRELU_OVERWRITE_GOLDEN=1 python -m pytest tests/core/test_golden.py
"""

from __future__ import annotations

import difflib
import io
import math
import os
from pathlib import Path

import pytest

from deadrelu import Levels, Report, SiteReport, advise

GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.fixture
def golden(request):
    """``golden(name, text)``: compare ``text`` with ``tests/golden/name`` (or rewrite it on request)."""
    overwrite = request.config.getoption("--overwrite-golden") or os.environ.get("DEADRELU_OVERWRITE_GOLDEN") == "1"

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        text = text.rstrip("\n") + "\n"
        if overwrite:
            path.write_text(text, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"no golden file {path}; create it with --overwrite-golden")
        expected = path.read_text(encoding="utf-8")
        if text != expected:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(keepends=True), text.splitlines(keepends=True),
                    fromfile=f"golden/{name}", tofile="printed now",
                )
            )  # fmt: skip
            pytest.fail(f"output differs from golden/{name} (rerun with --overwrite-golden if intended):\n{diff}")

    return check


def _site(name, function, fired, observations, *, nonfinite=None, mean_abs=None, levels, threshold=0.0):
    units = len(fired)
    if mean_abs is None:
        mean_abs = [round(f / observations, 6) if observations else 0.0 for f in fired]
    module = name.split(":")[0]
    return SiteReport(
        name=name, module=module, module_type="Block", function=function, call=0, slot=0, unit_dim=1,
        shape=(32, units), fire_threshold=threshold, observations=observations, fired_counts=tuple(fired),
        mean_abs=tuple(mean_abs), nonfinite_counts=tuple(nonfinite or [0] * units), levels=levels,
    )  # fmt: skip


def _net(after: bool) -> Report:
    """A small fixed "network": four sites with every state, before or after "training"."""
    lv = Levels(min_observations=1000)
    n1, n2 = 1_228_800, 40_960
    l1 = [0, 0, 10, 400_000, 1_228_800, 500, 61_000, 0] if after else [0, 9, 10, 400_000, 1_228_800, 500, 61_000, 7]
    l2 = [0, 0, 0, 900, 40_960, 2_000, 100, 3_000] if after else [0, 5, 8, 900, 40_960, 2_000, 100, 3_000]
    l3 = [0, 120, 0, 64]  # a branch that ran on few batches: 640 observations < 1000
    sites = [
        _site("features.1", "relu", l1, n1, levels=lv),
        _site("features.4", "relu", l2, n2, levels=lv),
        _site("branch:relu", "relu", l3, 640, levels=lv),
        _site("head:gelu", "gelu", [0, 30_000, 20_000], 40_960, nonfinite=[0, 3, 0] if after else None,
              mean_abs=[0.0, math.nan, 0.4] if after else None, levels=lv, threshold=-0.05),
    ]  # fmt: skip
    return Report(sites=tuple(sites), levels=lv, batches=150, samples=4800, mode="eval", model="SmallNet")


def test_report_plain_table(golden):
    golden("report_plain.out", str(_net(after=True)))


def test_report_rich_table(golden):
    rich_console = pytest.importorskip("rich.console")
    buf = io.StringIO()
    console = rich_console.Console(file=buf, width=120, color_system=None, force_terminal=False, legacy_windows=False)
    console.print(_net(after=True))
    golden("report_rich.out", "\n".join(line.rstrip() for line in buf.getvalue().splitlines()))


def test_report_without_dead_units(golden):
    lv = Levels()
    r = Report(sites=(_site("fc:relu", "relu", [5, 9, 100], 100, levels=lv),), levels=lv, batches=1, samples=100)
    golden("report_alive.out", str(r) + "\n\n" + str(r.advice()))


def test_diff_printout(golden):
    golden("diff.out", str(_net(after=False).diff(_net(after=True))))


def test_advice_printout(golden):
    golden("advice_baseline.out", str(advise(_net(after=True), baseline=_net(after=False))))


def test_advice_without_baseline(golden):
    golden("advice.out", str(_net(after=True).advice()))
