"""Fixtures shared by the monitor tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def dynamo():
    dyn = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    dyn.reset()
    counters.clear()
    yield counters
    dyn.reset()
