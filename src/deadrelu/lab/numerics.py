"""The same experiment numbers on every x86-64 machine: CPU kernels pinned to one instruction set.

A training run is chaotic: one different rounding in a sum and, two epochs later, other units
have died. On the CPU both libraries that do the arithmetic pick their kernels by the processor
they find — MKL's matrix products (AVX2 or AVX-512 code, other blockings on AMD) and ATen's
vectorised reductions (8 or 16 floats at a time) — so the same seed gives different dead
fractions on an Intel and an AMD machine (measured: 21.1% and 2.3% dead in the last hidden
layer of the same digits seed). Pinning both to their AVX2 code paths, which every x86-64
processor of the last decade runs, makes the numbers depend on the seed alone:

* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility, the AVX2 branch;
* ``ATEN_CPU_CAPABILITY=avx2``: ATen's kernels for AVX2 even where AVX-512 is there;
* ``ONEDNN_MAX_CPU_ISA=AVX2``: the same for oneDNN's convolutions.

Each is read once, when the library first computes, so :func:`pin_cpu_numerics` must run before
the process does any tensor arithmetic — the lab's CLI verbs call it first, and its worker
processes are spawned with it in their environment. A variable the user has set is left as it is.
Elsewhere (ARM, or arithmetic already done in this process) it changes nothing, and the numbers
are reproducible on that machine only.

The lab's Python entry points pin only while they run (:func:`cpu_numerics_pinned`): left set,
``ATEN_CPU_CAPABILITY`` would also steer a later ``torch.compile`` in the caller's process, and
torch's Inductor cache does not key its CPU kernels by it — a kernel cached by an unpinned run and
loaded under the pin computed wrong outputs (torch 2.13, measured: off by 2.9 on a small MLP).
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Iterator

__all__ = ["PINNED", "cpu_numerics_pinned", "pin_cpu_numerics"]

PINNED = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_numerics() -> dict[str, str]:
    """Set the variables of :data:`PINNED` that are unset (x86-64 only); returns the ones in force.

    Example:
        >>> sorted(pin_cpu_numerics()) in ([], sorted(PINNED))  # [] off x86-64
        True
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    for name, value in PINNED.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in PINNED}


@contextlib.contextmanager
def cpu_numerics_pinned() -> Iterator[dict[str, str]]:
    """:func:`pin_cpu_numerics` for the duration of a ``with`` block: the variables it set are
    removed again at the end (those the user had set stay as they were).

    Example:
        >>> import os
        >>> before = {k: os.environ.get(k) for k in PINNED}
        >>> with cpu_numerics_pinned() as in_force:
        ...     pass
        >>> {k: os.environ.get(k) for k in PINNED} == before
        True
    """
    added = [name for name in PINNED if name not in os.environ]
    try:
        yield pin_cpu_numerics()
    finally:
        for name in added:
            os.environ.pop(name, None)
