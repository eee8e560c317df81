"""Fixtures shared by the surgery tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch single-threaded for the test: the tiny models run fastest so, with workers sharing the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
