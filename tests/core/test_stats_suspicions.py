"""Regressions for three suspicions about the statistics engine (core/stats.py, core/native.py):

1. the torch pass summed ``|h|`` in float32 partials (relative errors ~1e-7..1e-6) where the
   kernels sum in float64;
2. ``UnitStats.state_dict()`` dropped the statistics backend, so a restored accumulator counted
   its next batches with another one;
3. the native kernel's worker threads read subnormal activations under their own flush-to-zero
   state (set when the thread was made), not the caller's ``torch.set_flush_denormal``.

The truth is computed here from scratch: ``math.fsum`` of float64 values (correctly rounded),
Python-int counts, compared in float32 (float64 for float64 activations). The Triton cases of
2 and 3 are in kernel_cases.py (run under Triton's interpreter by test_kernels.py).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import deadrelu
from deadrelu.core import kernels, native, stats
from deadrelu.core.stats import UnitStats

BACKENDS = ["torch"] + (["native"] if native.available() else [])
DTYPES, DTYPE_IDS = [torch.float32, torch.bfloat16, torch.float16, torch.float64], ["fp32", "bf16", "fp16", "fp64"]


def exact_abs_sums(x: torch.Tensor, unit_dim: int) -> list[float]:
    """Per unit, the correctly rounded float64 sum of |x| (math.fsum of every value)."""
    flat = x.detach().movedim(unit_dim, -1).reshape(-1, x.shape[unit_dim]).double().abs()
    return [math.fsum(flat[:, u].tolist()) for u in range(flat.shape[1])]


def counted(x, unit_dim, threshold, backend, nonnegative=False):
    out = stats.StatTensors(x.shape[unit_dim]).state
    stats.accumulate(x, unit_dim, threshold, nonnegative, out, backend=backend)
    return out


def max_relative_error(got: torch.Tensor, truth: list[float]) -> float:
    t = torch.tensor(truth, dtype=torch.float64)
    return float(((got.double() - t).abs() / t.abs().clamp(min=1e-300)).max())


# -- 1. magnitude sums are float64 sums in every path --------------------------------------------


def _alternating(rows, big, small, period, units=3, dtype=torch.float32):
    x = torch.full((rows, units), small)
    x[::period] = big
    return x.to(dtype), 1


def _outlier(shape, value, where, unit_dim=1, dtype=torch.float32):
    x = torch.ones(shape)
    x[where] = value
    return x.to(dtype), unit_dim


def _lognormal(shape, sigma, dtype=torch.float32, unit_dim=1):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(shape, generator=g) * sigma).exp().to(dtype), unit_dim


MAGNITUDE_CASES = {
    # float32 partial sums lost 4e-7..6e-7 of these (one rows plan, 512 or 4096 rows)
    "1-and-3e-4-every-64th": _alternating(512, 1.0, 3e-4, 64),
    "1-and-3e-4-alternating": _alternating(4096, 1.0, 3e-4, 2),
    "1e8-then-ones": _outlier((4096, 3), 1e8, 0),
    "ones-then-2**24": _outlier((4096, 3), 2.0**24, -1),
    "1e30-next-to-ones": _outlier((4096, 3), 1e30, 7),  # the ones vanish in float64 too: exact anyway
    "a-million-0.1s-chunked": (torch.full((1 << 20, 2), 0.1), 1),
    "lognormal-sigma-8": _lognormal((4096, 5), 8.0),
    "nchw-1e6-outlier": _outlier((64, 4, 32, 32), 1e6, (0, slice(None), 0, 0)),
    "nchw-long-runs-chunked": _alternating(16 * 4096, 1.0, 0.37, 64, units=2),
    "fp16-rows": _lognormal((4096, 6), 2.0, torch.float16),
    "bf16-rows": _lognormal((1 << 16, 4), 4.0, torch.bfloat16),
    "bf16-nchw": _lognormal((32, 3, 40, 40), 4.0, torch.bfloat16),
    "float64-lognormal": _lognormal((4096, 5), 15.0, torch.float64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonnegative", [False, True], ids=["abs", "nonnegative"])
@pytest.mark.parametrize("case", list(MAGNITUDE_CASES))
def test_magnitude_sums_are_float64_sums_on_every_backend(case, nonnegative, backend):
    x, unit_dim = MAGNITUDE_CASES[case]
    got = counted(x, unit_dim, 0.0, backend, nonnegative)["abs_sum"]
    # A float64 sum of n values is within n * 2**-53 of the exact one: far below 1e-12 here,
    # where float32 partials were off by 1e-7 and more.
    assert max_relative_error(got, exact_abs_sums(x, unit_dim)) < 1e-12


@pytest.mark.skipif(len(BACKENDS) < 2, reason="the native CPU kernel does not build here")
@pytest.mark.parametrize("case", list(MAGNITUDE_CASES))
def test_torch_pass_and_native_kernel_agree_to_float64_rounding(case):
    x, unit_dim = MAGNITUDE_CASES[case]
    a, b = counted(x, unit_dim, 0.0, "torch"), counted(x, unit_dim, 0.0, "native")
    assert a["fired"].tolist() == b["fired"].tolist()
    assert float(((a["abs_sum"] - b["abs_sum"]).abs() / b["abs_sum"].abs()).max()) < 1e-12


@pytest.mark.parametrize(
    "shape,unit_dim",
    [((3, 5, 777), 1), ((2, 3, 2500), 1), ((50, 7, 13), 1), ((9, 2, 3, 41), 1), ((1, 1, 3001), 1), ((4001, 3), 1)],
    ids=["unit-blocks", "split-runs", "row-blocks", "nchw", "one-long-run", "rows"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_chunked_torch_pass_is_exact_on_ragged_tiles(shape, unit_dim, dtype, monkeypatch):
    # A chunk of 1000 values: a row that does not fit is split into blocks of units, a run that
    # does not fit into pieces; every ragged last tile must still count each value once.
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(stats, "_CHUNK_MIN_ELEMENTS", 2000)
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.logspace(-4, 4, shape[-1])).to(dtype)
    got = counted(x, unit_dim, 0.25, "torch")
    wide = x.movedim(unit_dim, -1).reshape(-1, x.shape[unit_dim]).double()
    assert got["fired"].tolist() == (wide > 0.25).sum(0).tolist()
    assert got["observations"].tolist() == [wide.shape[0]]
    assert max_relative_error(got["abs_sum"], exact_abs_sums(x, unit_dim)) < 1e-12


def test_torch_pass_scratch_stays_bounded_by_a_chunk():
    # One sample of 3 x 1024 x 1024 values is more than a chunk: it is counted in tiles, so the
    # scratch (a float32 mask and a float64 copy of one chunk) does not grow with the activation.
    stats.release_scratch()
    x = torch.rand(2, 3, 1024, 1024)
    got = counted(x, 1, 0.5, "torch", nonnegative=True)
    assert got["fired"].tolist() == (x > 0.5).sum((0, 2, 3)).tolist()
    held = sum(t.numel() * t.element_size() for t in stats._SCRATCH.pool.values())
    assert held <= 12 * stats._CHUNK_ELEMENTS < x.numel() * x.element_size() // 4
    stats.release_scratch()


# -- 2. a restored accumulator counts as the one it was saved from -------------------------------


def _batches():
    g = torch.Generator().manual_seed(11)
    scale = torch.logspace(-3, 3, 7)
    return [torch.randn(n, 7, generator=g) * scale for n in (1000, 777, 2048)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_keeps_the_backend_and_the_next_updates_equal(backend):
    first, *rest = _batches()
    a = UnitStats(7, threshold=0.25, backend=backend)
    a.update(first, 1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # settings are plain values: a weights-only load reads them
    buf.seek(0)
    b = UnitStats.from_state_dict(torch.load(buf, weights_only=True))
    assert (b.units, b.threshold, b.backend, b.device) == (a.units, a.threshold, a.backend, a.device)
    for x in rest:
        a.update(x, 1)
        b.update(x, 1)
        fused = [acc.relu_and_update(x - 0.1, 1) for acc in (a, b)]  # the fused ReLU, where there is one
        assert [y is None for y in fused] == [backend == "torch"] * 2
        if backend == "torch":
            a.update(torch.relu(x - 0.1), 1, nonnegative=True)
            b.update(torch.relu(x - 0.1), 1, nonnegative=True)
    for k in a.state:
        assert a.state[k].dtype == b.state[k].dtype
        assert torch.equal(a.state[k], b.state[k]), k  # bit for bit: the same backend sums the same way
    assert a.compute() == b.compute()


def test_state_dict_without_a_backend_restores_auto_and_bad_states_are_refused():
    a = UnitStats(3, 0.5, backend="torch")
    a.update(torch.tensor([[1.0, 0.0, 2.0]]), 1)
    old = {k: v for k, v in a.state_dict().items() if k != "backend"}  # as deadrelu <= this fix saved it
    assert UnitStats.from_state_dict(old).backend == "auto"
    assert UnitStats.from_state_dict(old).compute() == a.compute()
    with pytest.raises(deadrelu.DeadReluError, match="backend must be one of"):
        UnitStats.from_state_dict({**a.state_dict(), "backend": "cuda"})
    with pytest.raises(deadrelu.DeadReluError, match="lacks 'abs_sum'"):
        UnitStats.from_state_dict({k: v for k, v in a.state_dict().items() if k != "abs_sum"})


# -- 3. subnormal activations are read as the calling thread reads them --------------------------


@pytest.fixture
def flush_denormal():
    """Set the calling thread's flush-to-zero state for one test; restored after."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode torch can set")
    yield torch.set_flush_denormal
    torch.set_flush_denormal(False)


@pytest.fixture
def fresh_native_pool(monkeypatch):
    """native's worker threads made anew in this test (and shut down after)."""
    pools: dict = {}
    monkeypatch.setattr(native, "_POOLS", pools)
    yield
    for pool in pools.values():
        pool.shutdown(wait=True)


def _with_subnormals(dtype, rows=4096, repeats=8):
    """Per unit of five, repeated: all subnormal (of the compare type), half subnormal and half
    zero, negative subnormals, one normal value in three, a few normal ones among subnormals; a
    float16 subnormal is a normal float32. Large enough (163840 values) for torch to split one
    op over its intra-op threads."""
    tiny = {torch.float64: 1e-310, torch.float16: 1e-7}.get(dtype, 1e-40)
    x = torch.zeros(rows, 5, dtype=torch.float64)
    x[:, 0] = tiny
    x[::2, 1] = tiny
    x[:, 2] = -tiny
    x[::3, 3] = 1.0
    x[:, 4] = tiny
    x[::5, 4] = 0.75
    return x.repeat(1, repeats).to(dtype)


def flushed_truth(x, threshold, flush, relu=False):
    """Fired counts and Σ|h| by value: with ``flush``, a value below the compare type's smallest
    normal number (float32's, or float64's for float64) is 0, as a flushing thread reads it."""
    wide = x.double()
    if relu:
        wide = wide.clamp(min=0)
    tiny = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).tiny
    if flush:
        wide = torch.where(wide.abs() < tiny, torch.zeros((), dtype=torch.float64), wide)
    return (wide > threshold).sum(0).tolist(), [math.fsum(c.abs().tolist()) for c in wide.t()]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flushed_truth_is_what_a_single_threaded_torch_compare_gives(dtype, flush_denormal):
    x = _with_subnormals(dtype)
    truth = {flush: flushed_truth(x, 0.0, flush)[0] for flush in (False, True)}  # by value, not flushing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's intra-op worker threads keep their own flush state
    try:
        for flush in (False, True):
            flush_denormal(flush)
            assert kernels.flushes_denormals() is flush
            compared = x if dtype == torch.float64 else x.float()  # (widening bits, not flushed)
            assert (compared > 0).sum(0).tolist() == truth[flush]
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


# The native kernel's worker threads are made under one flush state, then the caller counts under
# one: each with each (the pool plays no part in the torch pass).
POOLS = [("torch", False)] + [("native", made) for made in (False, True) if "native" in BACKENDS]


@pytest.mark.parametrize(
    "backend,pool_made_flushing", POOLS, ids=[f"{b}-pool-made-{'flushing' if m else 'plain'}" for b, m in POOLS]
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flush", [False, True], ids=["plain", "flush"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["abs", "nonnegative", "fused-relu"])
def test_subnormals_count_as_the_calling_thread_reads_them(
    backend, threads, pool_made_flushing, flush, dtype, mode, flush_denormal, fresh_native_pool, monkeypatch
):
    monkeypatch.setattr(native, "_MIN_SLICE_ELEMENTS", 1 << 10)  # several slices (threads) per batch
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.zeros(1 << 20).add_(1.0)  # torch's worker threads made now, if not before: not flushing
    try:
        x = _with_subnormals(dtype)
        src = x.abs() if mode == "nonnegative" else x
        fired, sums = flushed_truth(src, 0.0, flush, relu=mode == "fused-relu")  # computed not flushing
        if backend == "native":  # the pool's threads are made now, under this flush state
            flush_denormal(pool_made_flushing)
            UnitStats(x.shape[1], backend="native").update(x, 1)
        flush_denormal(flush)
        acc = UnitStats(x.shape[1], backend=backend)
        if mode == "fused-relu":
            y = acc.relu_and_update(x, 1)
            if y is None:
                y = torch.relu(x)
                acc.update(y, 1, nonnegative=True)
        else:
            acc.update(src, 1, nonnegative=mode == "nonnegative")
        torch.set_flush_denormal(False)
        assert acc.fired.tolist() == fired
        assert acc.observations == x.shape[0]
        assert acc.abs_sum.tolist() == pytest.approx(sums, rel=1e-12, abs=0.0)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(saved_threads)


def test_a_subnormal_threshold_is_read_as_the_calling_thread_reads_it(flush_denormal):
    # threshold -1e-40: 0.0 fires unless the threshold itself reads as 0
    x = torch.zeros(64, 2)
    x[:, 1] = -1.0
    for flush in (False, True):
        flush_denormal(flush)
        for backend in BACKENDS:
            assert counted(x, 1, -1e-40, backend)["fired"].tolist() == ([0, 0] if flush else [64, 0]), backend
