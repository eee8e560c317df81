"""Regressions from a numerical-exactness hunt on the statistics engine (core/stats.py, the native
CPU kernel). The truth is computed here from scratch: float64 values, int64 counts, compared in
float32 (float64 for float64 input) as core/stats documents. The Triton cases of the same bugs
are in kernel_cases.py and fused_cases.py (run under Triton's interpreter by test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

import deadrelu
from deadrelu.core import native, stats

BACKENDS = ["torch"] + (["native"] if native.available() else [])


def truth(x, unit_dim, threshold, mask=None):
    """observations, fired, nonfinite (lists) and the float64 abs_sum, per unit, by brute force."""
    unit_dim %= x.ndim
    keep = torch.ones(x.shape, dtype=torch.bool)
    if mask is not None:
        keep &= mask.reshape(*mask.shape, *([1] * (x.ndim - mask.ndim)))
    units = x.shape[unit_dim]
    wide = x.detach().double().movedim(unit_dim, 0).reshape(units, -1)
    keep = keep.movedim(unit_dim, 0).reshape(units, -1)
    compare_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    thr = torch.tensor(threshold, dtype=torch.float64).to(compare_dtype).double()
    return {
        "observations": [int(keep[0].sum())],
        "fired": ((wide > thr) & keep).sum(1).tolist(),
        "nonfinite": ((~torch.isfinite(wide)) & keep).sum(1).tolist(),
        "abs_sum": torch.where(keep, wide.abs(), torch.zeros((), dtype=torch.float64)).sum(1),
    }


def counted(x, unit_dim, threshold, backend, mask=None, nonnegative=False):
    out = stats.StatTensors(x.shape[unit_dim]).state
    stats.accumulate(x, unit_dim, threshold, nonnegative, out, mask=mask, backend=backend)
    return out


def assert_same(got, want, rtol=1e-12):  # float64 sums, in another order
    for key in ("observations", "fired", "nonfinite"):
        assert got[key].tolist() == want[key], key
    assert torch.allclose(got["abs_sum"], want["abs_sum"], rtol=rtol, atol=0, equal_nan=True)


# -- a negative unit dim (-1: the last) ----------------------------------------------------------
# The native kernel took shape[unit_dim + 1:] of -1 as the whole shape: it read past the tensor
# (counts of 1200 observations for 20, and heap corruption from the Triton kernel's atomics), and
# a mask was refused outright.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,unit_dim", [((4, 5, 3), -1), ((4, 5, 3), -2), ((6, 3, 2, 2), -3), ((7, 4), -1)])
def test_a_negative_unit_dim_counts_as_its_positive_index(backend, shape, unit_dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    x.view(-1)[2] = float("nan")
    assert_same(counted(x, unit_dim, 0.1, backend), truth(x, unit_dim, 0.1))
    mask = torch.rand(shape[:1], generator=g) > 0.4
    if unit_dim % len(shape) >= 1:
        assert_same(counted(x, unit_dim, 0.1, backend, mask=mask), truth(x, unit_dim, 0.1, mask))
    s = stats.UnitStats(shape[unit_dim], 0.1, backend=backend)
    s.update(x, unit_dim)
    assert s.fired.tolist() == truth(x, unit_dim, 0.1)["fired"] and s.observations == truth(x, unit_dim, 0.1)["observations"][0]


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_a_fused_relu_with_a_negative_unit_dim_counts_its_output(backend, inplace):
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(2))
    want_y = torch.relu(x)
    out = stats.StatTensors(3).state
    y = stats.relu_accumulate(x.clone(), -1, 0.0, out, backend=backend, inplace=inplace)
    assert torch.equal(y, want_y)
    assert_same(out, truth(want_y, -1, 0.0))


# -- a lazily negated view -----------------------------------------------------------------------
# Its memory holds the values' negatives: the kernels read it raw (every count of the wrong sign
# on the Triton path; the native backend refused it).


def negated_views():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 5, dtype=torch.complex64, generator=g)
    return [z.conj().imag, torch._neg_view(torch.randn(8, 5, generator=g))]


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_a_lazily_negated_view_is_counted_by_its_values(backend):
    for x in negated_views():
        assert x.is_neg()
        assert_same(counted(x, 1, 0.0, backend), truth(x.resolve_neg(), 1, 0.0))
        out = stats.StatTensors(5).state
        y = stats.relu_accumulate(x, 1, 0.0, out, backend=backend)
        assert torch.equal(y, torch.relu(x.resolve_neg()))
        assert_same(out, truth(torch.relu(x.resolve_neg()), 1, 0.0))
        assert not stats.fuses_relu(x, 1, backend)  # no kernel writes through a negated view


# -- the torch pass, long spatial runs: float32 activations compared in float32 ---------------------
# A unit's run of 2**24 or more values is reduced in float64; the threshold was left unrounded
# there, so float32(0.1) > 0.1 fired on the torch pass and not on the kernels.


def test_a_float32_run_of_two_to_the_24_values_is_compared_in_float32():
    x = torch.full((1, 1, 2**24), 0.1)  # every value is float32(0.1) == the threshold as float32
    x[0, 0, :5] = 0.2
    got = counted(x, 1, 0.1, "torch", nonnegative=True)
    assert got["fired"].tolist() == [5] and got["observations"].tolist() == [2**24]
    if native.available():
        assert counted(x, 1, 0.1, "native", nonnegative=True)["fired"].tolist() == [5]


# -- the torch pass, wide layers: magnitudes keep torch's cascade-sum precision ---------------------
# Counts of a wide layer are column sums by BLAS matrix-vector product (exact for 0/1); magnitudes
# went the same way, where BLAS adds a column's 4096 float32 values one after another: one large
# value ahead of 4095 ones lost all of them (relative error 2.4e-4; the cascade sum keeps 1e-6).


@pytest.mark.parametrize("rows,units,big_every", [(4096, 200, 4096), (8192, 200, 1310), (3, 200, 1)])
def test_magnitudes_of_a_wide_layer_are_summed_to_float32_cascade_precision(rows, units, big_every):
    x = torch.ones(rows, units)
    x[::big_every] = 2.0**24
    want = truth(x, 1, 0.0)
    got = counted(x, 1, 0.0, "torch")
    assert got["fired"].tolist() == want["fired"]
    assert torch.allclose(got["abs_sum"], want["abs_sum"], rtol=2e-6, atol=0)
    s = stats.UnitStats(units, backend="torch")
    for _ in range(2):  # the second batch reuses the cached layout plan
        s.update(x, 1)
    assert torch.allclose(s.abs_sum, 2 * want["abs_sum"], rtol=2e-6, atol=0)


def test_scan_of_a_wide_layer_with_an_outlier_unit_has_its_mean_magnitude(monkeypatch):
    monkeypatch.setenv("DEADRELU_NO_NATIVE", "1")  # the torch pass
    model = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)
        model[0].bias[:2] = -1.0  # planted dead units
    data = torch.zeros(4096, 4)
    data[0, 0] = 1.0
    with torch.no_grad():
        model[0].weight[2:, 0] = 2.0**24 - 1.0  # row 0 of every live unit is 2**24, the rest 1
    report = deadrelu.scan(model, data, batch_size=4096)
    site = report.sites[0]
    assert site.dead_units[:2] == (0, 1)
    assert site.mean_abs[2] == pytest.approx((2.0**24 + 4095) / 4096, rel=2e-6)


# -- batch_unit_sums of a 0-D tensor --------------------------------------------------------------
# It gave the 0-D case one unit, then every backend indexed its missing unit dim (IndexError).


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [2.0, -1.0, float("inf")])
def test_batch_unit_sums_of_a_0d_tensor_is_one_observation_of_one_unit(backend, value):
    got = stats.batch_unit_sums(torch.tensor(value), 0, 0.0, backend=backend)
    assert got["observations"].tolist() == [1]
    assert got["fired"].tolist() == [int(value > 0)] and got["nonfinite"].tolist() == [int(value == float("inf"))]
    assert got["abs_sum"].tolist() == [abs(value)]
