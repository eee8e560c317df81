"""The fused Triton kernels: the statistics pass (cases in kernel_cases.py) and the ReLU that
counts its own output (fused_cases.py).

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (float32/float16
there; float64 works too). Triton reads ``TRITON_INTERPRET`` when it is first imported and
other tests may import it earlier (torch.compile does), so the cases run in a fresh process
that sets it. With CUDA the same cases also run here, natively on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deadrelu.core import kernels

pytestmark = pytest.mark.skipif(not kernels._importable(), reason="Triton 3 or later is not installed")

CASES = [str(Path(__file__).with_name(name)) for name in ("kernel_cases.py", "fused_cases.py")]


def test_kernel_cases_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CASES],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from fused_cases import *  # noqa: F401,F403  (the same cases on the GPU)
    from kernel_cases import *  # noqa: F401,F403
