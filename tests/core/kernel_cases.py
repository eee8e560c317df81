"""Cases for the fused Triton statistics kernel, against brute force and the pure-torch pass.

Not collected on its own (see test_kernels.py, which runs it under Triton's interpreter in a
fresh process, and imports it on machines with CUDA). Tensors stay small: the interpreter
runs every program in Python.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from deadrelu.core import kernels, stats

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRETING else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def quiet_numpy():
    """The interpreter computes inf - inf in numpy (the NaN test): not a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def brute(x, unit_dim, threshold, mask=None):
    """Per-unit truths in float64 from the flattened tensor (independent of both backends)."""
    units = x.shape[unit_dim]
    if mask is not None:
        x, unit_dim = x[mask], unit_dim - mask.ndim + 1
    flat = x.movedim(unit_dim, -1).reshape(-1, units)
    wide = flat.double()
    thr = torch.tensor(threshold, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).double()
    return {
        "observations": [flat.shape[0]],
        "fired": (wide > thr).sum(0).tolist(),
        "nonfinite": (~torch.isfinite(wide)).sum(0).tolist(),
        "abs_sum": wide.abs().sum(0),
    }


def run(x, unit_dim, threshold, backend, nonnegative=False, mask=None):
    out = stats.StatTensors(x.shape[unit_dim], x.device).state
    stats.accumulate(x, unit_dim, threshold, nonnegative, out, mask=mask, backend=backend)
    return out


def assert_matches(got, truth):
    for key in ("observations", "fired", "nonfinite"):
        assert got[key].tolist() == truth[key], key
    assert torch.allclose(got["abs_sum"].cpu(), truth["abs_sum"], rtol=1e-12, atol=1e-12, equal_nan=True)


def planted_layout(shape, unit_dim, layout, dtype, seed=0):
    """Random values with unit 1 planted dead, laid out as ``layout`` names (one of LAYOUTS')."""
    g = torch.Generator().manual_seed(seed + sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    x.select(unit_dim, 1).fill_(-1.0)  # a planted dead unit
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(0, 2)
        unit_dim = 3
    return x, unit_dim


LAYOUTS = [
    ((37, 9), 1, "contiguous"),  # (N, C): units last
    ((3, 7, 10), 2, "contiguous"),  # (B, T, C): units last, reduced over batch and tokens
    ((3, 6, 5, 4), 1, "contiguous"),  # (N, C, H, W): channel dim 1
    ((3, 6, 5, 4), 1, "channels_last"),
    ((5, 4, 3, 6), 3, "transposed"),  # no single-stride view: copied once
    ((2, 300), 1, "contiguous"),  # more units than one block
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,unit_dim,layout", LAYOUTS, ids=[f"{s}-{layout}" for s, _, layout in LAYOUTS])
@pytest.mark.parametrize("threshold", [0.0, -0.25, 0.5])
def test_kernel_matches_brute_force_and_torch_pass(device, dtype, shape, unit_dim, layout, threshold):
    x, unit_dim = planted_layout(shape, unit_dim, layout, dtype)
    x = x.to(device)
    truth = brute(x.cpu(), unit_dim, threshold)
    assert truth["fired"][1] == 0
    assert_matches(run(x, unit_dim, threshold, "triton"), truth)
    assert_matches(run(x, unit_dim, threshold, "torch"), truth)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_float64_compares_in_float64(device):
    x = torch.tensor([[0.1, 0.2], [0.10000000001, 0.3]], dtype=torch.float64, device=device)
    got = run(x, 1, 0.1, "triton")
    assert got["fired"].tolist() == [1, 2]  # 0.10000000001 > 0.1 only in float64
    assert got["abs_sum"].tolist() == pytest.approx([0.20000000001, 0.5], rel=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_kernel_counts_subnormals_as_firing(device, dtype):
    # a value below the smallest normal is still > 0: a flushing conversion (bf16 to float32 in
    # Triton's interpreter) would count a unit that only ever outputs subnormals as dead
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([[tiny / 4, -tiny / 4, 0.0, 1.0]] * 3, dtype=dtype, device=device)
    assert x[0, 0] > 0 and x[0, 1] < 0
    got = run(x, 1, 0.0, "triton")
    truth = brute(x.cpu(), 1, 0.0)
    assert got["fired"].tolist() == truth["fired"] == [3, 0, 0, 3]
    assert got["abs_sum"].cpu().tolist() == truth["abs_sum"].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_counts_nan_and_inf_per_unit(device):
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    x[2, 0], x[5, 0], x[7, 3] = float("nan"), float("inf"), float("-inf")
    got = run(x.to(device), 1, 0.0, "triton")
    assert got["nonfinite"].tolist() == [2, 0, 0, 1]
    assert torch.isnan(got["abs_sum"][0]) and torch.isinf(got["abs_sum"][3])


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_magnitudes_do_not_overflow_near_float32_max(device):
    x = torch.full((64, 3), 3.0e38, device=device)  # each value finite; their float32 sum is not
    got = run(x, 1, 0.0, "triton", nonnegative=True)
    assert got["nonfinite"].tolist() == [0, 0, 0]
    assert got["abs_sum"].tolist() == pytest.approx([64 * 3.0e38] * 3, rel=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,unit_dim,mask_shape",
    [((4, 6, 5), 2, (4, 6)), ((4, 6, 5), 2, (4,)), ((4, 3, 2, 2), 1, (4,)), ((4, 6, 5), 1, ())],
)
def test_kernel_mask_selects_observations(device, shape, unit_dim, mask_shape):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    x.view(-1)[0] = float("nan")  # masked out or counted, as the mask says
    mask = torch.rand(mask_shape, generator=g) > 0.4
    truth = brute(x, unit_dim, -0.3, mask)
    for backend in ("triton", "torch"):
        assert_matches(run(x.to(device), unit_dim, -0.3, backend, mask=mask.to(device)), truth)
    traced = stats.traceable_batch_sums(x, unit_dim, -0.3, False, mask)
    assert_matches(traced, truth)


@pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")
def test_kernel_adds_into_existing_accumulators_without_reallocating():
    s = stats.UnitStats(3, backend="triton")
    before = {k: t.data_ptr() for k, t in s.state.items()}
    for _ in range(3):
        s.update(torch.tensor([[1.0, -1.0, 2.0]]), 1)
    assert {k: t.data_ptr() for k, t in s.state.items()} == before
    got = s.compute()
    assert got.fired_counts == (3, 0, 3) and got.observations == 3 and got.mean_abs == (1.0, 1.0, 2.0)


def test_plan_addresses_common_layouts_without_copies():
    x = torch.zeros(2, 3, 4, 5)
    assert kernels.plan(x, 1)[0] is x and kernels.plan(x, 1)[1:] == (2, 3, 20, 60, 20, 1)
    cl = x.to(memory_format=torch.channels_last)
    assert kernels.plan(cl, 1)[0] is cl and kernels.plan(cl, 1)[1:] == (40, 3, 1, 3, 1, 0)  # rows (N, H, W)
    seq = torch.zeros(2, 7, 8)
    assert kernels.plan(seq, 2)[1:] == (14, 8, 1, 8, 1, 0)


@pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")
def test_auto_backend_on_cpu_is_the_torch_pass(monkeypatch):
    # Even with the interpreter on, CPU tensors take the torch pass unless asked otherwise.
    calls = []
    monkeypatch.setattr(kernels, "unit_stats_into", lambda *a, **k: calls.append(a))
    stats.batch_unit_sums(torch.ones(2, 2), 1, 0.0)
    assert calls == []


# -- regressions of the statistics hunt (see test_stats_hunt_regressions.py for the CPU backends) --


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_reads_a_lazily_negated_view_by_its_values(device):
    # Its memory holds the negatives: read raw, every unit's counts came out of the wrong sign.
    g = torch.Generator().manual_seed(11)
    z = torch.randn(8, 5, dtype=torch.complex64, generator=g).to(device)
    for x in (z.conj().imag, torch._neg_view(torch.randn(9, 4, generator=g).to(device))):
        assert x.is_neg()
        assert_matches(run(x, 1, 0.1, "triton"), brute(x.resolve_neg().cpu(), 1, 0.1))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_adds_into_strided_accumulators_where_they_are(device):
    # A column of a (units, steps) table: the kernel added at fired_ptr + u, into other columns.
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(12)).to(device)
    tables = {
        "fired": torch.zeros(5, 3, dtype=torch.int64, device=device),
        "abs_sum": torch.zeros(5, 3, dtype=torch.float64, device=device),
        "nonfinite": torch.zeros(5, 3, dtype=torch.int64, device=device),
        "observations": torch.zeros(1, 3, dtype=torch.int64, device=device),
    }
    out = {k: t[:, 1] for k, t in tables.items()}
    assert not out["fired"].is_contiguous()
    stats.accumulate(x, 1, 0.0, False, out, backend="triton")
    assert_matches(out, brute(x.cpu(), 1, 0.0))
    for t in tables.values():
        assert not t[:, 0].any() and not t[:, 2].any()  # the neighbouring columns are untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unit_dim", [-1, -2])
def test_kernel_takes_a_negative_unit_dim(device, unit_dim):
    # -1 made the layout's trailing run the whole shape: reads past the tensor, heap corruption.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 5, 3, generator=g).to(device)
    mask = torch.tensor([True, False, True, True], device=device)
    for m in (None, mask):
        got = run(x, unit_dim, 0.1, "triton", mask=m)
        assert_matches(got, brute(x.cpu(), unit_dim % 3, 0.1, None if m is None else m.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_accumulator_restored_from_its_state_dict_counts_the_same(device):
    # The state dict dropped the backend: a "triton" accumulator came back as "auto", which on CPU
    # (and wherever the kernel once failed) is another pass with other last bits of Σ|h|.
    g = torch.Generator().manual_seed(14)
    first, second = (torch.randn(n, 6, generator=g).mul(torch.logspace(-3, 3, 6)).to(device) for n in (40, 33))
    a = stats.UnitStats(6, 0.25, backend="triton")
    a.update(first, 1)
    b = stats.UnitStats.from_state_dict(a.state_dict())
    assert (b.backend, b.threshold, b.device) == ("triton", 0.25, a.device)
    a.update(second, 1)
    b.update(second, 1)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_interpreted_kernel_reads_subnormals_as_the_calling_thread_does(device, dtype):
    # After torch.set_flush_denormal(True) a subnormal (of float32, the compare type) reads as 0 on
    # this thread, in torch's compare, the torch pass and the native kernel alike; the interpreter
    # computes on this thread too. A float16 subnormal is a normal float32: it still fires.
    tiny = 1e-7 if dtype == torch.float16 else 1e-40
    x = torch.tensor([[tiny, -tiny, 0.0, 1.0]] * 3, dtype=dtype)
    try:
        for flush in (False, True):
            if not torch.set_flush_denormal(flush):
                return  # no flush-to-zero mode on this CPU: nothing to follow
            got = run(x, 1, 0.0, "triton")
            flushed = flush and dtype != torch.float16
            assert got["fired"].tolist() == ([0, 0, 0, 3] if flushed else [3, 0, 0, 3])
            torch.set_flush_denormal(False)
            expected = [0.0, 0.0, 0.0, 3.0] if flushed else [3 * abs(float(x[0, 0])), 3 * abs(float(x[0, 0])), 0.0, 3.0]
            assert got["abs_sum"].tolist() == pytest.approx(expected, rel=1e-12, abs=0.0)
    finally:
        torch.set_flush_denormal(False)
