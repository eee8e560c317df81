"""Which statistics backend can count a tensor here, and the state a pass runs under.

:func:`deadrelu.core.stats.accumulate` and the fused ReLU ask these before they choose a kernel:
whether the C kernel of :mod:`deadrelu.core.native` counts a tensor (:func:`native_ready`), whether
an explicit ``backend="triton"`` can run (:func:`require_triton`), whether CPU tensors may reach the
fused ReLU at all (:func:`fused_on_cpu`) and whether ``DEADRELU_NO_FUSED_RELU=1`` switched it off
(:func:`fusion_off`); and the state a pass must respect: autocast, switched off inside the pass
(:func:`no_autocast`), and forward-mode AD, whose tangents only torch's ReLU records
(:func:`forward_ad_on`). Whether the Triton kernel failed here is remembered next to the code that
reads it, in :mod:`deadrelu.core.stats` (``_TRITON_FAILED``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch.autograd import forward_ad  # (asked on every fused ReLU: imported once)

from ..errors import DeadReluError
from . import kernels, native  # neither imports Triton: the kernels compile on first use
from .environment import env_is

__all__ = ["autocast_on", "forward_ad_on", "fused_on_cpu", "fusion_off", "native_ready", "no_autocast", "require_triton"]


def require_triton(x: torch.Tensor) -> None:
    """Refuse ``backend="triton"`` where its kernel cannot run on ``x`` (no Triton, or a CPU tensor outside the interpreter)."""
    if not kernels.available() or (x.device.type == "cpu" and not kernels.interpreting()):
        raise DeadReluError(
            f"the triton statistics backend cannot run on this {x.device.type} tensor: it needs Triton 3 or "
            "later (pip install 'triton>=3') and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
        )


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (False for a device type autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # device types autocast does not know, or torch < 2.4
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Switch autocast off where it is on (a matrix-vector count would run in bf16)."""
    enabled = autocast_on(device_type)
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def native_ready(x: torch.Tensor, backend: str) -> bool:
    """Whether the C kernel counts ``x`` (CPU, a dtype it knows); for ``backend="native"`` an
    error where it cannot."""
    if not x.is_cpu:
        if backend == "native":
            raise DeadReluError(f"the native statistics backend counts CPU tensors only, not {x.device.type}")
        return False
    if native.supports(x):
        return True
    if backend == "native":
        raise DeadReluError(f"the native statistics backend cannot count this {x.dtype} tensor: {native.status()}")
    return False


def fused_on_cpu() -> bool:
    """Whether CPU tensors may reach the fused ReLU at all: where the C kernel of
    :mod:`deadrelu.core.native` builds, or under Triton's interpreter (``TRITON_INTERPRET=1``,
    how the tests run the Triton kernel without a GPU, with ``backend="triton"``)."""
    return native.available() or kernels.interpreting()


@functools.lru_cache(maxsize=None)
def fusion_off() -> bool:
    """Whether ``DEADRELU_NO_FUSED_RELU=1`` turns the fused ReLU off."""
    return env_is("DEADRELU_NO_FUSED_RELU", "1")  # for A/B runs: the two passes, still on Triton


def forward_ad_on() -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level()``: a ReLU's tangent must be recorded."""
    return getattr(forward_ad, "_current_level", -1) >= 0
