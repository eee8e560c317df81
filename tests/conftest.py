"""Shared test settings: deterministic, single-threaded torch and a headless matplotlib."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "agg")
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
