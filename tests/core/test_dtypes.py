"""Scan and Monitor are exact in every floating dtype and under CPU bf16 autocast.

The truth is computed independently: forward hooks on the activation modules keep every
output, and per-unit counts and magnitudes are taken from them in float64 (firing compared
in float32, or float64 for float64 models, as documented in core/stats).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
IDS = ["fp32", "fp16", "bf16", "fp64"]


class MLP(nn.Module):
    """GELU, SiLU and ReLU sites, each with planted dead units (weight row 0 and bias -50)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act1 = nn.Linear(6, 16), nn.GELU()
        self.l2, self.act2 = nn.Linear(16, 16), nn.SiLU()
        self.l3, self.act3 = nn.Linear(16, 12), nn.ReLU()
        self.out = nn.Linear(12, 3)
        with torch.no_grad():
            for lin, dead in ((self.l1, (0, 5)), (self.l2, (3,)), (self.l3, (1, 2))):
                for u in dead:
                    lin.weight[u].zero_()
                    lin.bias[u] = -50.0

    def forward(self, x):
        return self.out(self.act3(self.l3(self.act2(self.l2(self.act1(self.l1(x)))))))


class ConvNet(nn.Module):
    """4-D activations with units on dim 1 (GELU module) and a 3-D token activation (SiLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3), nn.GELU()
        self.proj, self.act2 = nn.Linear(36, 10), nn.SiLU()
        with torch.no_grad():
            self.conv.weight[2].zero_()
            self.conv.bias[2] = -50.0

    def forward(self, x):
        h = self.act(self.conv(x))  # (N, 8, 6, 6)
        return self.act2(self.proj(h.flatten(2)))  # (N, 8, 10): units last


def data(model, n, g):
    return torch.randn(n, 6, generator=g) if isinstance(model, MLP) else torch.randn(n, 3, 8, 8, generator=g)


def recorded_outputs(model, batches, context=contextlib.nullcontext, grad=False):
    """Every activation module's outputs for each batch, recorded by plain forward hooks."""
    outs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: outs.setdefault(name, []).append(o.detach().clone()))
        for name, m in model.named_modules()
        if isinstance(m, (nn.GELU, nn.SiLU, nn.ReLU))
    ]
    try:
        with context(), torch.set_grad_enabled(grad):
            for xb in batches:
                model(xb)
    finally:
        for h in handles:
            h.remove()
    return outs


def truth(outputs, unit_dim):
    units = outputs[0].shape[unit_dim]
    flat = torch.cat([o.movedim(unit_dim, -1).reshape(-1, units) for o in outputs])
    wide = flat.double()
    compared = wide if flat.dtype == torch.float64 else flat.float()
    return {
        "observations": flat.shape[0],
        "fired": tuple((compared > 0).sum(0).tolist()),
        "mean_abs": (wide.abs().sum(0) / flat.shape[0]).tolist(),
    }


def unit_dim_of(name, out):
    return 1 if out.ndim == 4 else out.ndim - 1


def check(report_sites, outs):
    by_name = {s.name: s for s in report_sites}
    assert set(by_name) == set(outs)
    for name, outputs in outs.items():
        t = truth(outputs, unit_dim_of(name, outputs[0]))
        s = by_name[name]
        assert s.observations == t["observations"], name
        assert s.fired_counts == t["fired"], name
        assert s.mean_abs == pytest.approx(t["mean_abs"], rel=1e-6, abs=1e-12), name
        assert s.nonfinite_counts == (0,) * len(t["fired"])


PLANTED = {MLP: {"act1": (0, 5), "act2": (3,), "act3": (1, 2)}, ConvNet: {"act": (2,)}}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "model_cls,channels_last", [(MLP, False), (ConvNet, False), (ConvNet, True)], ids=["mlp", "conv", "conv-nhwc"]
)
def test_scan_is_exact_in_every_dtype(dtype, model_cls, channels_last):
    g = torch.Generator().manual_seed(0)
    model = model_cls().to(dtype).eval()
    batches = [data(model, n, g).to(dtype) for n in (7, 5)]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batches = [b.to(memory_format=torch.channels_last) for b in batches]
    report = deadrelu.scan(model, batches)
    check(report.sites, recorded_outputs(model, batches))
    for name, dead in PLANTED[model_cls].items():
        assert set(dead) <= set(report.site(name).dead_units), name


@pytest.mark.parametrize("model_cls", [MLP, ConvNet])
def test_scan_under_cpu_bf16_autocast_is_exact(model_cls):
    g = torch.Generator().manual_seed(1)
    model = model_cls().eval()
    batches = [data(model, 6, g) for _ in range(2)]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with autocast():
        report = deadrelu.scan(model, batches)
    outs = recorded_outputs(model, batches, autocast)
    assert any(o[0].dtype == torch.bfloat16 for o in outs.values())  # autocast really changed the dtype
    check(report.sites, outs)


def test_float64_model_on_the_chunked_cpu_path():
    # A batch above a million values takes the chunked pass, which crashed in addmv_ for float64.
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU()).double().eval()
    x = torch.randn(1100, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    report = deadrelu.scan(model, x, batch_size=1100)
    check(report.sites, {"1": recorded_outputs(model, [x])["1"]})


def train_monitored(model, batches, context):
    mon = deadrelu.Monitor(model, window=2, log_every=100)
    with mon, context():
        for xb in batches:
            model(xb).float().sum().backward()
            mon.step()
        reports = mon.report("window"), mon.report("total")
    return reports


@pytest.mark.filterwarnings("ignore::deadrelu.monitor.monitor.DeadUnitWarning")  # the planted dead units
@pytest.mark.parametrize(
    "dtype,autocast",
    [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.float64, False), (torch.float32, True)],
    ids=["fp32", "fp16", "bf16", "fp64", "bf16-autocast"],
)
@pytest.mark.parametrize("model_cls", [MLP, ConvNet])
def test_monitor_is_exact_in_every_dtype_and_under_autocast(dtype, autocast, model_cls):
    g = torch.Generator().manual_seed(3)
    model = model_cls().to(dtype)
    batches = [data(model, n, g).to(dtype) for n in (4, 6, 5)]
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    window, total = train_monitored(model, batches, context)
    outs = recorded_outputs(model, batches, context, grad=True)  # parameters are unchanged: no optimiser
    check(total.sites, outs)
    check(window.sites, {name: o[-2:] for name, o in outs.items()})


def test_functional_gelu_and_silu_in_half_precision_are_observed():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            h = self.lin(x)
            return F.gelu(h) + F.silu(h)

    model = Functional().to(torch.bfloat16).eval()
    x = torch.randn(9, 4).to(torch.bfloat16)
    report = deadrelu.scan(model, x)
    h = model.lin(x).detach()
    assert [s.function for s in report.sites] == ["gelu", "silu"]
    for s, out in zip(report.sites, (F.gelu(h), F.silu(h))):
        assert s.fired_counts == tuple((out.float() > 0).sum(0).tolist())
