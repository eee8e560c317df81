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


# A loop bounded by a kernel argument, the shape of every loop in deadrelu's kernels. Triton 3.6's
# interpreter (torch 2.11's) hands scalar arguments over as 1-element NumPy arrays, which NumPy 2
# refuses as a range bound ("only 0-dimensional arrays can be converted to Python scalars"); compiled
# kernels on a GPU are not affected.
_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def probe(out_ptr, n):
    acc = 0
    for _ in range(0, n, 1):
        acc += 1
    tl.store(out_ptr, acc)

out = torch.zeros(1, dtype=torch.int32)
probe[(1,)](out, 3)
assert out.item() == 3
"""


@pytest.mark.parametrize("sums", ["tile", "rows"])
def test_kernel_cases_under_the_triton_interpreter(sums):
    """Both reductions of the kernel (``DEADRELU_TRITON_SUMS``: a sum per tile position, the
    default, or each tile's rows as it goes, kept for timing side by side) give the brute force's numbers."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", DEADRELU_TRITON_SUMS=sums)
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode and "only 0-dimensional arrays can be converted" in probe.stderr:
        import numpy
        import triton

        pytest.skip(
            f"Triton {triton.__version__}'s interpreter cannot run a loop bounded by an argument "
            f"under NumPy {numpy.__version__}"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CASES],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from fused_cases import *  # noqa: F401,F403  (the same cases on the GPU)
    from kernel_cases import *  # noqa: F401,F403
