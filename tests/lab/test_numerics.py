"""The lab's CPU kernels are pinned to one instruction set, so its numbers do not depend on the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from deadrelu.lab import numerics

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="the pins are for x86-64 kernels")
def test_pins_the_unset_variables_and_keeps_the_users(monkeypatch):
    for name in numerics.PINNED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    in_force = numerics.pin_cpu_numerics()
    assert in_force == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_changes_nothing_off_x86(monkeypatch):
    monkeypatch.setattr(numerics.platform, "machine", lambda: "aarch64")
    before = {name: os.environ.get(name) for name in numerics.PINNED}
    for name in numerics.PINNED:
        monkeypatch.delenv(name, raising=False)
    assert numerics.pin_cpu_numerics() == {}
    assert all(name not in os.environ for name in numerics.PINNED)
    for name, value in before.items():
        if value is not None:
            monkeypatch.setenv(name, value)


@pytest.mark.skipif(not X86, reason="the pins are for x86-64 kernels")
def test_a_process_pinned_before_it_computes_runs_the_avx2_kernels():
    """Pinned after `import torch` but before any arithmetic (as run_demo does), ATen takes the pin;
    a process that computed first keeps the kernels it chose (why the workers are spawned pinned)."""
    code = (
        "import torch, os\n"
        "import sys\n"
        "if sys.argv[1] == 'late': torch.ones(3).sum()\n"
        "os.environ['ATEN_CPU_CAPABILITY'] = 'default'  # what a pin to the plainest kernels does\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED}
    early = subprocess.run([sys.executable, "-c", code, "early"], env=env, capture_output=True, text=True, check=True)
    late = subprocess.run([sys.executable, "-c", code, "late"], env=env, capture_output=True, text=True, check=True)
    plainest = ("DEFAULT", "NO AVX")  # what torch >= 2.3 and torch 2.2 call the plainest kernels
    assert early.stdout.strip() in plainest
    assert late.stdout.strip() not in plainest


@pytest.mark.skipif(not X86, reason="the pins are for x86-64 kernels")
def test_the_lab_pins_while_it_trains_and_leaves_the_callers_environment_as_it_was(monkeypatch):
    # Left set, ATEN_CPU_CAPABILITY would steer a later torch.compile in the caller's process onto
    # Inductor cache entries built for other kernels (they computed wrong outputs on torch 2.13).
    from deadrelu.lab import experiments

    for name in numerics.PINNED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # the user's own setting stays
    seen = {}

    def fake(lrs=(0.1,)):
        seen.update({name: os.environ.get(name) for name in numerics.PINNED})
        return {"experiment": "fake"}

    monkeypatch.setitem(experiments.EXPERIMENTS, "fake", fake)
    assert experiments.run_experiment("fake", lrs=(0.2,)) == {"experiment": "fake"}
    assert seen == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert {name: os.environ.get(name) for name in numerics.PINNED} == {
        "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": None, "ONEDNN_MAX_CPU_ISA": None,
    }  # fmt: skip


@pytest.mark.skipif(not X86, reason="the pins are for x86-64 kernels")
def test_the_pins_are_removed_when_the_run_fails(monkeypatch):
    for name in numerics.PINNED:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        with numerics.cpu_numerics_pinned() as in_force:
            assert in_force["ATEN_CPU_CAPABILITY"] == "avx2" == os.environ["ATEN_CPU_CAPABILITY"]
            raise RuntimeError("boom")
    assert not any(name in os.environ for name in numerics.PINNED)
