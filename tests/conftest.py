"""Shared test settings: deterministic torch with pinned CPU kernels and a headless matplotlib."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from deadrelu.lab.numerics import pin_cpu_numerics

os.environ.setdefault("MPLBACKEND", "agg")
# Before any test computes: the lab pins its spawned workers' CPU kernels to AVX2, and a test that
# retrains a seed by hand in this process must run the same kernels (on an AVX-512 machine the
# unpinned kernels round differently and, epochs later, other units have died).
pin_cpu_numerics()
# Inductor's cache does not tell kernels built under another ATEN_CPU_CAPABILITY apart: a kernel
# cached by an unpinned run (AVX-512) and loaded under the pin computed wrong outputs (torch 2.13),
# so the suite keeps a cache of its own for each pin.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"torchinductor-deadrelu-tests-{getattr(os, 'getuid', lambda: 0)()}-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}",
    ),
)
sys.path.insert(0, str(Path(__file__).parent))  # so tests can `from fixtures.models import ...`


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    # Golden outputs (tests/golden/*.out) are rewritten only on request, never by a plain run.
    parser.addoption(
        "--overwrite-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*.out from the current output (or set DEADRELU_OVERWRITE_GOLDEN=1)",
    )
