"""The accumulator protocol of core/stats: declared statistics, exact sums, masks, precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deadrelu
from deadrelu.core import native, stats
from deadrelu.core.stats import STATISTICS, Statistic, StatTensors, UnitStats, per_unit_sum
from deadrelu.monitor.compiled import TensorWindowStats
from deadrelu.monitor.window import WindowStats


def brute(x, unit_dim, threshold=0.0, mask=None):
    units = x.shape[unit_dim]
    if mask is not None:
        x, unit_dim = x[mask], unit_dim - mask.ndim + 1
    flat = x.movedim(unit_dim, -1).reshape(-1, units).double()
    return flat.shape[0], (flat > threshold).sum(0).tolist(), flat.abs().sum(0), (~torch.isfinite(flat)).sum(0).tolist()


def accumulators(units, threshold=0.0, window=3):
    return [UnitStats(units, threshold), WindowStats(units, threshold, "cpu", window), TensorWindowStats(units, threshold, "cpu", window)]


def test_every_accumulator_holds_every_declared_statistic_by_name():
    for acc in accumulators(5):
        assert list(acc.state) == [s.name for s in STATISTICS]
        for s in STATISTICS:
            assert acc.state[s.name].dtype == s.dtype
            assert acc.state[s.name].shape[-1] == (5 if s.per_unit else 1)


def test_merge_reset_and_state_dict_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    whole, a, b = UnitStats(6, 0.1), UnitStats(6, 0.1), UnitStats(6, 0.1)
    whole.update(x, 1)
    a.update(x[:13], 1)
    b.update(x[13:], 1)
    a.merge(b)
    for k in whole.state:
        assert torch.allclose(whole.state[k].double(), a.state[k].double(), rtol=1e-12), k  # float64 sums, added in another order
    again = UnitStats.from_state_dict(a.state_dict())
    assert again.compute() == a.compute()
    with pytest.raises(deadrelu.DeadReluError, match="thresholds"):
        a.merge(UnitStats(6, 0.2))
    with pytest.raises(deadrelu.DeadReluError, match="6 units"):
        StatTensors(6).merge(StatTensors(5))
    a.reset()
    assert all(int(t.abs().sum()) == 0 for t in a.state.values())
    with pytest.raises(deadrelu.DeadReluError, match="no activations"):
        a.compute()


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(7, 3), (2, 5, 3), (3, 4, 2, 2), (5,)]),
    threshold=st.sampled_from([0.0, 0.5, -0.25]),
    nonnegative=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_cpu_pass_and_traceable_pass_equal_brute_force(shape, threshold, nonnegative, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if nonnegative:
        x = x.relu()
    unit_dim = 1 if len(shape) >= 2 else 0
    xb, ud = stats.as_unit_batch(x, unit_dim, shape[unit_dim])
    n, fired, mag, bad = brute(xb, ud, threshold)
    for got in (stats.batch_unit_sums(xb, ud, threshold, nonnegative), stats.traceable_batch_sums(xb, ud, threshold, nonnegative)):
        assert got["observations"].tolist() == [n] and got["fired"].tolist() == fired and got["nonfinite"].tolist() == bad
        assert torch.allclose(got["abs_sum"], mag, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_thirty_million_ones_in_one_batch_have_mean_one(dtype):
    # A float32 running sum stops growing at 2**24 (the old pass gave mean |h| = 0.559 here).
    x = torch.ones(30_000_000, 1, dtype=dtype)
    for acc in (UnitStats(1), WindowStats(1, 0.0, "cpu", window=2)):
        acc.update(x, 1, nonnegative=False)
        t = acc.compute() if isinstance(acc, UnitStats) else acc.totals("window")
        if isinstance(acc, UnitStats):
            assert t.mean_abs == (1.0,) and t.fired_counts == (30_000_000,) and t.observations == 30_000_000
        else:
            assert t.abs_sum.tolist() == [3e7] and t.fired.tolist() == [30_000_000] and t.observations == 3e7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,unit_dim", [((5000, 3), 1), ((8, 3, 40, 40), 1)])
def test_finite_values_near_float32_max_do_not_overflow(dtype, shape, unit_dim):
    x = torch.full(shape, 3.0e38).to(dtype)
    s = UnitStats(3)
    s.update(x, unit_dim, nonnegative=True)
    got = s.compute()
    assert got.nonfinite_counts == (0, 0, 0)
    assert got.mean_abs == pytest.approx([float(x.flatten()[0])] * 3, rel=1e-9)
    assert stats.classify(got.fired_counts, got.observations, got.nonfinite_counts, 0.05) == ["active"] * 3


def test_a_channel_firing_more_than_two_to_the_24_times_in_one_batch_is_counted_exactly():
    # 17 images of one 1024x1024 channel: per-image row sums are exact in float32, their sum
    # over images (17 * (2**20 - 1) > 2**24) is not unless it is split.
    x = torch.ones(17, 1, 1024, 1024)
    x[:, 0, 0, 0] = -1.0
    s = UnitStats(1)
    s.update(x, 1, nonnegative=False)
    t = s.compute()
    assert t.fired_counts == (17 * (2**20 - 1),) and t.observations == 17 * 2**20
    assert t.mean_abs == (1.0,)


def test_counts_stay_exact_under_cpu_bf16_autocast():
    # Under autocast a matrix-vector count would run in bf16, where 3001 rounds to 3008.
    x = torch.ones(3001, 4)
    s = UnitStats(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.update(x, 1)
    assert s.compute().fired_counts == (3001,) * 4


@pytest.mark.parametrize(
    "shape,unit_dim,mask_shape", [((4, 6, 5), 2, (4, 6)), ((4, 6, 5), 2, (4,)), ((5, 3, 2, 2), 1, (5,)), ((3, 4), 1, ())]
)
def test_mask_excludes_observations_in_every_accumulator(shape, unit_dim, mask_shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    x.view(-1)[0] = float("nan")
    mask = torch.rand(mask_shape, generator=g) > 0.5
    n, fired, mag, bad = brute(x, unit_dim, -0.2, mask)
    for acc in accumulators(shape[unit_dim], -0.2):
        acc.update(x, unit_dim, mask=mask)
        state = acc.state if isinstance(acc, UnitStats) else acc.totals("window").state
        assert state["observations"].tolist() == [n]
        assert state["fired"].tolist() == fired and state["nonfinite"].tolist() == bad
        assert torch.allclose(state["abs_sum"], mag, rtol=1e-12, equal_nan=True)


def test_mask_of_wrong_shape_is_refused():
    s = UnitStats(5)
    with pytest.raises(deadrelu.DeadReluError, match=r"mask of shape \(4, 5\)"):
        s.update(torch.randn(4, 6, 5), 2, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(deadrelu.DeadReluError, match="k <= 1"):
        s.update(torch.randn(4, 5, 6), 1, mask=torch.ones(4, 5, dtype=torch.bool))
    assert s.observations == 0  # nothing was counted


def test_adding_a_statistic_is_one_declaration(monkeypatch):
    # The module docstring's recipe: declare it in STATISTICS, and every accumulator carries it.
    square = Statistic("sq_sum", torch.float64, doc="sum of h²", batch=lambda b: per_unit_sum(b.x.double().square(), b.unit_dim))
    monkeypatch.setattr(stats, "STATISTICS", STATISTICS + (square,))
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, 3, generator=g) for _ in range(4)]
    mask = torch.tensor([True, False, True, True, False, True])
    unit, window, merged = UnitStats(3), WindowStats(3, 0.0, "cpu", window=2), UnitStats(3)
    for i, x in enumerate(xs):
        unit.update(x, 1, mask=mask)
        window.update(x, 1, mask=mask)
        part = UnitStats(3)
        part.update(x, 1, mask=mask)
        merged.merge(part)
    truth = lambda data: torch.cat([x[mask] for x in data]).double().square().sum(0)  # noqa: E731
    assert torch.allclose(unit.state["sq_sum"], truth(xs))
    assert torch.allclose(merged.state["sq_sum"], truth(xs))
    assert torch.allclose(window.totals("window").state["sq_sum"], truth(xs[-2:]))
    assert torch.allclose(window.totals("total").state["sq_sum"], truth(xs))


def test_internal_failure_names_site_shape_and_dtype(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Found dtype Float but expected BFloat16")

    monkeypatch.setattr(stats, "accumulate", broken)
    monkeypatch.setattr(native.Launch, "__call__", broken)  # the prepared kernel call of the CPU route
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU())
    with pytest.raises(deadrelu.DeadReluError) as info:
        deadrelu.scan(model, torch.randn(5, 3))
    message = str(info.value)
    assert not isinstance(info.value, deadrelu.ForwardError) and "model raised" not in message
    assert "activation site 1 (gelu" in message and "(5, 4)" in message and "torch.float32" in message
    assert "Found dtype Float" in message


def test_a_kernel_that_cannot_run_falls_back_to_the_torch_pass_once(monkeypatch):
    """A Triton/driver mismatch on some GPU must not stop a scan or a training run."""
    from deadrelu.core import kernels, stats

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX version not supported")

    monkeypatch.setattr(kernels, "unit_stats_into", broken)
    monkeypatch.setattr(stats, "_TRITON_FAILED", [])
    monkeypatch.setattr(stats, "_triton_ready", lambda x: not stats._TRITON_FAILED)  # as on a CUDA machine
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    first, second = stats.StatTensors(3, "cpu").state, stats.StatTensors(3, "cpu").state
    with pytest.warns(RuntimeWarning, match="Triton statistics kernel cannot run here"):
        stats.accumulate(x, 1, 0.0, False, first)
    stats.accumulate(x, 1, 0.0, False, second)  # no second attempt, no second warning
    assert len(calls) == 1 and stats._TRITON_FAILED
    for out in (first, second):
        assert out["fired"].tolist() == [1, 1, 1] and out["abs_sum"].tolist() == [1.0, 5.0, 1.5]
        assert out["observations"].tolist() == [2]
    with pytest.raises(RuntimeError, match="PTX"):  # backend="triton" asked for the kernel: its error shows
        stats._run_kernel(x, 1, 0.0, False, stats.StatTensors(3, "cpu").state, None, explicit=True)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # same shape, units no longer innermost: the general pass
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x.contiguous()


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from([((1, 300), 1), ((9, 5), 1), ((64, 200), 1), ((3, 7, 130), 2), ((4, 6, 3, 5), 1), ((2, 129, 2, 2), 1)]),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    threshold=st.sampled_from([0.0, 0.3]),
    nonnegative=st.booleans(),
    poison=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    seed=st.integers(0, 1000),
)
def test_cached_layout_plans_match_brute_force_on_every_route(case, layout, dtype, threshold, nonnegative, poison, seed):
    """The per-layout CPU plans (one row, narrow units, wide units, channels_last) against brute
    force, with NaN/Inf planted, called twice so the second call reuses the cached plan."""
    shape, unit_dim = case
    if layout == "channels_last" and len(shape) != 4 or layout == "transposed" and unit_dim != 1:
        layout = "contiguous"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if nonnegative:
        x = x.relu()
    if poison is not None and not (nonnegative and poison < 0):
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = poison
    x = _layout(x, layout)
    n, fired, mag, bad = brute(x, unit_dim, threshold)
    s = UnitStats(shape[unit_dim], threshold)
    for _ in range(2):
        s.update(x, unit_dim, nonnegative=nonnegative)
    assert s.state["observations"].tolist() == [2 * n]
    assert s.state["fired"].tolist() == [2 * f for f in fired] and s.state["nonfinite"].tolist() == [2 * b for b in bad]
    assert torch.allclose(s.state["abs_sum"], 2 * mag, rtol=1e-12, equal_nan=True)


def test_a_plan_is_not_reused_for_another_layout_of_the_same_shape():
    x = torch.arange(12.0).view(3, 4) - 5  # units on dim 1
    other = x.t().contiguous().t()  # same shape and values, different strides
    other[0, 0] = 100.0
    a, b = UnitStats(4), UnitStats(4)
    a.update(x, 1)
    b.update(other, 1)
    assert a.state["fired"].tolist() == [1, 1, 2, 2] and b.state["fired"].tolist() == [2, 1, 2, 2]
    assert b.state["abs_sum"].tolist() == [100.0 + 1 + 3, 4 + 0 + 4, 3 + 1 + 5, 2 + 2 + 6]
