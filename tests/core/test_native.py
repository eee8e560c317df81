"""The compiled CPU kernel (core/native.py, core/unit_stats.c) against brute force and torch.

Brute force is the flattened float64 computation of kernel_cases.py; the ReLU output is
compared bit for bit with ``torch.relu``. Skipped where no C compiler builds the kernel
(the torch pass then counts, and the rest of the suite covers it).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kernel_cases import LAYOUTS, assert_matches, brute, run
from kernel_cases import planted_layout as make
from torch import nn

import deadrelu
from deadrelu.core import native, stats
from deadrelu.errors import DeadReluError

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native kernel here: {native.status()}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,unit_dim,layout", LAYOUTS, ids=[f"{s}-{layout}" for s, _, layout in LAYOUTS])
@pytest.mark.parametrize("threshold", [0.0, -0.25, 0.5])
def test_statistics_match_brute_force(dtype, shape, unit_dim, layout, threshold):
    x, unit_dim = make(shape, unit_dim, layout, dtype)
    got = run(x, unit_dim, threshold, "native")
    assert_matches(got, brute(x, unit_dim, threshold))
    # and the pure-torch pass counts the same
    want = run(x, unit_dim, threshold, "torch")
    for key in ("observations", "fired", "nonfinite"):
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,unit_dim,layout", LAYOUTS, ids=[f"{s}-{layout}" for s, _, layout in LAYOUTS])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_relu_output_is_torch_relu_bit_for_bit(dtype, shape, unit_dim, layout, inplace):
    x, unit_dim = make(shape, unit_dim, layout, dtype, seed=3)
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is not None and flat.numel() >= 6:  # the values a ReLU must keep as they are
        flat[:6] = torch.tensor([float("nan"), -0.0, float("-inf"), float("inf"), 1e-40, -1e-40]).to(dtype)
    want = torch.relu(x)
    truth = brute(want, unit_dim, 0.0)
    out = stats.StatTensors(x.shape[unit_dim]).state
    source = x.clone(memory_format=torch.preserve_format)
    y = native.relu_stats_into(source, unit_dim, 0.0, out, inplace=inplace)
    if layout == "transposed":
        assert y is None  # a layout the kernel would copy: left to torch's ReLU
        return
    assert y is not None and (y is source) == inplace
    assert y.stride() == want.stride()
    assert torch.equal(y.view(torch.int16 if dtype.itemsize == 2 else torch.int32 if dtype.itemsize == 4 else torch.int64),
                       want.view(torch.int16 if dtype.itemsize == 2 else torch.int32 if dtype.itemsize == 4 else torch.int64))  # fmt: skip
    assert_matches(out, truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_and_subnormals_are_counted_exactly(dtype, layout):
    x = torch.zeros(6, 4, 3, 5).to(dtype)
    tiny = torch.finfo(dtype).tiny / 4  # a subnormal: it fires (> 0), flushed or not elsewhere
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 2, 1] = float("inf")
    x[2, 2, 1, 1] = float("-inf")
    x[3, 1, 0, 0] = tiny
    x[4, 3, 2, 4] = -tiny
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    for nonnegative in (False, True):
        assert_matches(run(x, 1, 0.0, "native", nonnegative=nonnegative) if not nonnegative else run(x.relu(), 1, 0.0, "native", True),
                       brute(x if not nonnegative else x.relu(), 1, 0.0))  # fmt: skip
    got = run(x, 1, 0.0, "native")
    assert got["nonfinite"].tolist() == [2, 0, 1, 0]
    assert got["fired"].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("relu", [False, True])
def test_a_float64_run_whose_sum_overflows_has_no_nan_or_inf(relu):
    # The run loops count NaN/Inf only once a run's sum is not finite; a float64 sum of finite
    # values can overflow too, and then the recount must find none.
    x = torch.full((2, 3, 4), 1e308, dtype=torch.float64)
    x[1, 2, 3] = float("nan")  # one real NaN, in unit 2
    out = stats.StatTensors(3).state
    if relu:
        native.relu_stats_into(x, 1, 0.0, out)
    else:
        native.unit_stats_into(x, 1, 0.0, False, out)
    assert out["nonfinite"].tolist() == [0, 0, 1]
    assert out["fired"].tolist() == [8, 8, 7]
    assert out["abs_sum"][:2].tolist() == [float("inf")] * 2 and out["abs_sum"][2].isnan()


@pytest.mark.parametrize(
    "shape,unit_dim,mask_dims", [((5, 7, 6), 2, 2), ((5, 7, 6), 2, 1), ((4, 6, 3, 3), 1, 1), ((9, 1100), 1, 1)]
)  # the last: three blocks of units in the kernel's (rows, units) loop
@pytest.mark.parametrize("relu", [False, True])
def test_masks_select_observations(shape, unit_dim, mask_dims, relu):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    mask = torch.rand(shape[:mask_dims], generator=g) > 0.4
    if relu:
        out = stats.StatTensors(shape[unit_dim]).state
        y = native.relu_stats_into(x, unit_dim, 0.0, out, mask=mask)
        assert torch.equal(y, torch.relu(x))  # every position gets its ReLU; only kept ones count
        assert_matches(out, brute(torch.relu(x), unit_dim, 0.0, mask))
    else:
        assert_matches(run(x, unit_dim, 0.1, "native", mask=mask), brute(x, unit_dim, 0.1, mask))


def test_expanded_and_sliced_inputs_are_read_through_their_strides():
    base = torch.randn(1, 9)
    x = base.expand(40, 9)  # stride 0 over rows: every row counts
    assert_matches(run(x, 1, 0.0, "native"), brute(x, 1, 0.0))
    sliced = torch.randn(30, 12)[:, 2:11]
    assert_matches(run(sliced, 1, 0.0, "native"), brute(sliced, 1, 0.0))
    out = stats.StatTensors(9).state
    assert native.relu_stats_into(sliced, 1, 0.0, out) is None  # not dense: torch's ReLU lays out the output


def test_row_slices_on_threads_give_the_single_thread_numbers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 3, 16, 24, generator=g)  # 9.4M values: above the per-thread slice size
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, 1, 0.0, "native")
        torch.set_num_threads(4)
        many = run(x, 1, 0.0, "native")
        assert os.getpid() in native._POOLS  # the slices ran on the pool
    finally:
        torch.set_num_threads(threads)
    for key in ("observations", "fired", "nonfinite"):
        assert torch.equal(one[key], many[key])
    assert torch.allclose(one["abs_sum"], many["abs_sum"], rtol=1e-12)
    assert_matches(many, brute(x, 1, 0.0))


def test_float64_sums_do_not_lose_a_large_batch():
    x = torch.ones(3 * 10**6, 1)  # float32 partial sums would stop at 2**24
    got = run(x, 1, 0.0, "native")
    assert got["abs_sum"].item() == 3 * 10**6 and got["fired"].item() == 3 * 10**6


def test_scan_matches_the_torch_pass(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 24), nn.ReLU(inplace=True))
    with torch.no_grad():
        model[0].bias[:5] = -50.0  # planted dead units
    data = torch.randn(300, 12)
    calls = []
    real = native._run
    monkeypatch.setattr(native, "_run", lambda layout, y, *a: calls.append(y is not None) or real(layout, y, *a))
    launched = native.Launch.__call__  # a layout seen before: the prepared call (same kernel, same arguments)
    monkeypatch.setattr(native.Launch, "__call__", lambda self, x: calls.append(self._relu) or launched(self, x))
    fast = deadrelu.scan(model, data, batch_size=64)
    assert calls.count(True) >= 2 * 4 and calls.count(False) >= 5  # fused ReLUs, and GELU/first calls counted
    calls.clear()
    monkeypatch.setenv("DEADRELU_NO_NATIVE", "1")
    slow = deadrelu.scan(model, data, batch_size=64)
    assert not calls
    assert [s.dead_units for s in fast.sites] == [s.dead_units for s in slow.sites]
    assert fast.sites[0].dead_units[:5] == (0, 1, 2, 3, 4)
    for a, b in zip(fast.sites, slow.sites):
        assert (a.units, a.observations) == (b.units, b.observations)
        assert list(a.fired_counts) == list(b.fired_counts)
        assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-6, abs=1e-12)


def test_training_through_the_fused_relu_keeps_the_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    x = torch.randn(32, 8)
    with deadrelu.Monitor(model, every=1) as mon:
        for _ in range(2):
            model(x).square().mean().backward()
            mon.step()
    for _ in range(2):
        twin(x).square().mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_explicit_native_backend_refuses_what_it_cannot_count(monkeypatch):
    x = torch.randn(4, 3)
    out = stats.StatTensors(3).state
    monkeypatch.setenv("DEADRELU_NO_NATIVE", "1")
    with pytest.raises(DeadReluError, match="native statistics backend cannot count"):
        stats.accumulate(x, 1, 0.0, False, out, backend="native")
    assert out["observations"].item() == 0  # nothing was counted
    assert "DEADRELU_NO_NATIVE=1" in native.status()


def test_no_compiler_means_the_torch_pass(tmp_path):
    """A machine without a working C compiler: the kernel is unavailable (status says why) and
    a scan still counts, with the torch pass."""
    script = (
        "import torch, deadrelu\n"
        "from deadrelu.core import native\n"
        "assert not native.available()\n"
        "print(native.status())\n"
        "r = deadrelu.scan(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()), torch.randn(10, 3))\n"
        "print(r.sites[0].units)\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), DEADRELU_CACHE_DIR=str(tmp_path / "cache"), PATH="/nonexistent")
    env.pop("DEADRELU_NO_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "native CPU kernel unavailable (RuntimeError: no C compiler found" in done.stdout
    assert done.stdout.strip().endswith("4")
    assert not any(Path(tmp_path / "cache").glob("*.so")) if (tmp_path / "cache").exists() else True


def test_an_unwritable_cache_falls_back_to_a_private_temp_folder(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the user cache lies under a file: it cannot be created
    env = dict(os.environ, XDG_CACHE_HOME=str(blocker / "cache"), TMPDIR=str(tmp_path / "tmp"))
    env.pop("DEADRELU_CACHE_DIR", None)
    env.pop("DEADRELU_NO_NATIVE", None)
    (tmp_path / "tmp").mkdir()
    script = (
        "import logging\nlogging.basicConfig(level=logging.INFO)\n"
        "from deadrelu.core import native\nassert native.available(), native.status()\nprint(native.status())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    folder = tmp_path / "tmp" / f"deadrelu-{os.getuid()}"
    assert str(folder) in done.stdout
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    assert "compiling the CPU statistics kernel" in done.stderr  # the once-per-machine pause is explained


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_counts_on_threads_of_its_own():
    """A DataLoader-style fork after the pool exists: the child's slices must not wait for threads
    that only the parent has."""
    x = torch.randn(8192, 3, 16, 24)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(x, 1, 0.0, "native")  # the parent's pool now exists
        pid = os.fork()
        if pid == 0:  # the child: count, and exit with 0 only if the numbers are right
            try:
                # torch's own OpenMP threads do not survive a fork (DataLoader workers run torch on one
                # thread): the kernel is still told of two, so it splits the batch over its pool
                torch.set_num_threads(1)
                torch.get_num_threads = lambda: 2
                got = run(x, 1, 0.0, "native")
                os._exit(0 if got["fired"].tolist() == (x > 0).sum((0, 2, 3)).tolist() else 1)
            except BaseException:
                os._exit(2)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung on the parent's thread pool")
            time.sleep(0.05)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(threads)


# -- prepared launches (native.Launch): a layout seen before skips the per-call checks ----------


def _counted_twice(x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool, relu: bool) -> tuple[dict, list]:
    """A UnitStats fed ``x`` three times (the first call prepares the launch) and the outputs it gave."""
    s = stats.UnitStats(x.shape[unit_dim], threshold=threshold)
    outs = []
    for _ in range(3):
        if not relu:
            s.update(x, unit_dim, nonnegative=nonnegative)
            continue
        y = s.relu_and_update(x, unit_dim)
        if y is None:  # not fused here: the caller applies the ReLU and counts it (as the capture does)
            y = torch.relu(x)
            s.update(y, unit_dim, nonnegative=True)
        outs.append(y)
    return {k: t.clone() for k, t in s.state.items()}, outs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,unit_dim,layout", LAYOUTS, ids=[f"{s}-{layout}" for s, _, layout in LAYOUTS])
@pytest.mark.parametrize("relu", [False, True], ids=["stats", "relu"])
def test_prepared_launch_adds_what_the_general_call_adds_bit_for_bit(dtype, shape, unit_dim, layout, relu, monkeypatch):
    x, unit_dim = make(shape, unit_dim, layout, dtype, seed=5)
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is not None and flat.numel() >= 4:
        flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -3.0]).to(dtype)
    launched = []
    real = native.Launch.__call__
    monkeypatch.setattr(native.Launch, "__call__", lambda self, t: launched.append(1) or real(self, t))
    threshold, nonnegative = 0.25, False
    got, outs = _counted_twice(x, unit_dim, threshold, nonnegative, relu)
    # the general call, three times, into fresh state
    want = stats.StatTensors(x.shape[unit_dim]).state
    for _ in range(3):
        if relu:
            y = native.relu_stats_into(x, unit_dim, threshold, want)
            if y is None:  # a layout the kernel would copy: torch's ReLU, then the statistics
                y = torch.relu(x)
                native.unit_stats_into(y, unit_dim, threshold, True, want)
        else:
            native.unit_stats_into(x, unit_dim, threshold, nonnegative, want)
    for key in want:  # bit for bit, NaN where NaN
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True, msg=key)
    if relu:
        for y in outs:
            torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0, equal_nan=True)
            assert y.stride() == torch.relu(x).stride()
    # every call but the first of a layout the kernel addresses as it is was the prepared one
    assert len(launched) == (0 if layout == "transposed" else 3)


def test_a_prepared_launch_follows_a_replaced_state_and_the_thread_count():
    x = torch.randn(16, 8)
    s = stats.UnitStats(8)
    s.update(x, 1)
    old = s.fired
    s.fired = torch.zeros(8, dtype=torch.int64)  # a new state tensor: the launch made for the old one must not add into it
    s.update(x, 1)
    assert torch.equal(old, (x > 0).sum(0)) and torch.equal(s.fired, (x > 0).sum(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
        s.update(x, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(s.fired, 2 * (x > 0).sum(0)) and s.observations == 3 * 16


def test_prepared_launches_leave_masks_grad_and_env_to_the_general_route(monkeypatch):
    x = torch.randn(6, 5, requires_grad=True)
    s = stats.UnitStats(5)
    y = s.relu_and_update(x, 1)
    assert y.requires_grad  # recorded by autograd: the fused autograd op, not the prepared call
    s.update(x, 1, mask=torch.tensor([True, False, True, True, False, True]))
    with torch.no_grad():
        s.relu_and_update(x, 1)
        monkeypatch.setenv("DEADRELU_NO_NATIVE", "1")
        calls = []
        monkeypatch.setattr(native.Launch, "__call__", lambda self, t: calls.append(1))
        assert s.relu_and_update(x, 1) is None  # no kernel to fuse with: the caller's ReLU and update()
        s.update(x, 1)
        assert not calls
    h = torch.relu(x.detach())
    assert torch.equal(s.fired, 3 * (h > 0).sum(0) + (h[[0, 2, 3, 5]] > 0).sum(0))
    assert s.observations == 3 * 6 + 4
