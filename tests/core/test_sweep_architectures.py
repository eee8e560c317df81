"""Exactness sweep on hand-written architectures: each site's counts equal a brute-force reduction
of the activations the model itself recorded (grouped/depthwise/3-D/transposed convolutions,
channels_last, strided views, in-place calls, mixture-of-experts routing, step loops, einsum MLPs,
forward hooks of the user's, ``torch.func`` transforms inside the forward)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu


class Recorder:
    """What the model itself saw: each activation output (cloned at the call) under a key, with its unit dim."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[tuple[object, torch.Tensor, int]] = []

    def __call__(self, key: object, t: torch.Tensor, unit_dim: int) -> torch.Tensor:
        if self.on:
            with torch._C.DisableTorchFunction():  # the copy is no op of the model's
                self.calls.append((key, t.detach().clone(), unit_dim))
        return t


def truth(calls: list[tuple[object, torch.Tensor, int]]) -> dict[object, dict[str, object]]:
    """Per key: observations, per-unit fired counts (> 0) and mean |h|, over every recorded call."""
    out: dict[object, dict[str, object]] = {}
    for key, t, unit_dim in calls:
        a = t.movedim(unit_dim, -1).reshape(-1, t.shape[unit_dim]).double()
        e = out.setdefault(key, {"observations": 0, "fired": 0, "abs": 0})
        e["observations"] += a.shape[0]
        e["fired"] = e["fired"] + (a > 0).sum(0)
        e["abs"] = e["abs"] + a.abs().sum(0)
    return out


def assert_exact(model: nn.Module, rec: Recorder, batches: list, names: dict[object, str]) -> deadrelu.Report:
    """Scan ``batches``, run them again recording, and compare every named site with brute force."""
    rec.on = False
    report = deadrelu.scan(model, batches)
    rec.calls.clear()
    rec.on = True
    with torch.no_grad():
        for b in batches:
            model(b)
    rec.on = False
    for key, want in truth(rec.calls).items():
        site = report.site(names[key])
        assert site.observations == want["observations"], key
        assert list(site.fired_counts) == want["fired"].tolist(), key
        for got, ref in zip(site.mean_abs, (want["abs"] / max(want["observations"], 1)).tolist()):
            assert math.isclose(got, ref, rel_tol=1e-6, abs_tol=1e-9), key
    return report


def test_convolutions_of_every_kind_strided_views_and_in_place_calls_are_exact():
    rec = Recorder()

    class Convs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grouped = nn.Conv2d(4, 8, 3, groups=2, padding=1)
            self.depthwise = nn.Conv2d(8, 8, 3, groups=8, padding=1)
            self.up = nn.ConvTranspose2d(8, 7, 2, stride=2)
            self.c1 = nn.Conv1d(8, 6, 3)
            self.c3 = nn.Conv3d(2, 5, 2)
            self.act = nn.ReLU(inplace=True)
            with torch.no_grad():
                self.grouped.bias[:2] = -50.0
                self.depthwise.bias[3] = -50.0

        def forward(self, x):
            h = rec("grouped", F.relu(self.grouped(x)), 1)
            h = rec("depthwise", self.act(self.depthwise(h)), 1)
            rec("up", F.leaky_relu(self.up(h)), 1)
            rec("c1", self.c1(h.flatten(2)).relu_(), 1)
            v = x[:, :2].unsqueeze(2).expand(-1, -1, 3, -1, -1)  # an expanded view into a Conv3d
            rec("c3", F.gelu(self.c3(v), approximate="tanh"), 1)
            rec("permuted", torch.relu(h.permute(1, 0, 2, 3)), 0)
            rec("slice", F.silu(h[:, 1:6, ::2]), 1)
            return h

    model = Convs().eval()
    for i in (model.grouped, model.depthwise, model.up):
        i.to(memory_format=torch.channels_last)
    x = torch.randn(21, 4, 6, 6)
    batches = [x[:10].to(memory_format=torch.channels_last), x[10:20], x[20:]]  # channels_last, dense, batch of 1
    names = {"grouped": "<root>:relu.1", "depthwise": "act", "up": "<root>:leaky_relu", "c1": "<root>:relu.2",
             "c3": "<root>:gelu", "permuted": "<root>:relu.3", "slice": "<root>:silu"}  # fmt: skip
    report = assert_exact(model, rec, batches, names)
    assert 3 in report.site("act").dead_units
    assert report.site("<root>:relu.1").dead_units[:2] == (0, 1)


def test_experts_that_see_some_tokens_or_none_count_only_their_own():
    rec = Recorder()

    class Expert(nn.Module):
        def __init__(self, e: int) -> None:
            super().__init__()
            self.e, self.up, self.act, self.down = e, nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)

        def forward(self, x):
            return self.down(rec(self.e, self.act(self.up(x)), -1))

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.experts = nn.Linear(6, 4), nn.ModuleList(Expert(e) for e in range(4))
            with torch.no_grad():
                self.gate.bias[3] = -100.0  # expert 3 is never chosen

        def forward(self, x):
            flat = x.reshape(-1, 6)
            choice, out = self.gate(flat).argmax(-1), torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                idx = (choice == e).nonzero().squeeze(-1)
                sel = flat.index_select(0, idx) if e % 2 else flat[choice == e]
                out.index_add_(0, idx, expert(sel))
            return out.view_as(x)

    torch.manual_seed(0)
    batches = list(torch.randn(13, 5, 6).split(4))
    report = assert_exact(MoE().eval(), rec, batches, {e: f"experts.{e}.act" for e in range(4)})
    never = report.site("experts.3.act")
    assert (never.observations, never.unobserved, never.dead) == (0, 10, 0)


def test_an_einsum_with_the_weight_first_counts_the_weights_units():
    rec = Recorder()

    class Einsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(6, 8))  # (in, hidden): "btd,dh->bth", units last
            self.w_out = nn.Parameter(torch.randn(5, 6))  # (out, in) as nn.Linear: "oc,btc->bot", units on dim 1
            with torch.no_grad():
                self.w_out[:2] = 0.0  # two units that never fire (relu(0) = 0)

        def forward(self, x):
            rec("last", F.relu(torch.einsum("btd,dh->bth", x, self.w_in)), -1)
            rec("first", F.relu(torch.einsum("oc,btc->bot", self.w_out, x)), 1)
            rec("list", F.relu(torch.einsum("oc,...c->...o", [self.w_out, x])), -1)
            rec("implicit", F.relu(torch.einsum("ac,btc", self.w_out, x)), 0)  # implicit output: sorted, "abt"
            return x

    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 6), torch.randn(2, 5, 6)]  # two sequence lengths: T is no unit axis
    names = {"last": "<root>:relu.1", "first": "<root>:relu.2", "list": "<root>:relu.3", "implicit": "<root>:relu.4"}
    report = assert_exact(Einsum().eval(), rec, batches, names)
    assert [s.units for s in report.sites] == [8, 5, 5, 5]
    assert [s.dead_units for s in report.sites[1:]] == [(0, 1)] * 3


def test_a_relu_module_whose_output_a_hook_replaces_counts_its_magnitudes():
    # |h| = h only for the ReLU's own output: a forward hook of the user's may return another tensor
    rec = Recorder()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(3, 5), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x))

    model = Net().eval()
    model.act.register_forward_hook(lambda m, args, out: rec("act", out - 0.5, -1))
    torch.manual_seed(0)
    report = assert_exact(model, rec, list(torch.randn(20, 3).split(6)), {"act": "act"})
    assert all(m >= 0 for m in report.site("act").mean_abs)


@pytest.mark.parametrize("transform", ["grad", "vmap", "vmap of grad"])
def test_activations_inside_torch_func_transforms_count_their_values(transform):
    # an energy model's forces (torch.func.grad), per-sample calls (vmap): a vmapped dim is more samples
    rec = Recorder()

    class Energy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(3, 5), nn.Linear(5, 1)
            with torch.no_grad():
                self.fc.bias[0] = -100.0

        def energy(self, x):
            return self.out(F.silu(self.fc(x))).sum()

        def forward(self, x):
            if transform == "grad":
                y = torch.func.grad(self.energy)(x)
            elif transform == "vmap":
                y = torch.func.vmap(lambda r: F.relu(self.fc(r)), in_dims=1)(x.T.contiguous())
            else:
                y = torch.func.vmap(torch.func.grad(self.energy))(x)
            with torch._C.DisableTorchFunction():  # the same activation, outside the transform
                rec("act", (F.relu if transform == "vmap" else F.silu)(self.fc(x)), -1)
            return y

    torch.manual_seed(0)
    name = "<root>:relu" if transform == "vmap" else "<root>:silu"
    report = assert_exact(Energy().eval(), rec, list(torch.randn(10, 3).split(4)), {"act": name})
    assert report.site(name).units == 5


def test_a_site_whose_output_changes_rank_between_batches_keeps_counting_its_units():
    # a Linear on (B, C) and then on (B, T, C) with T == units: the first batch's dim 1 counted positions
    rec = Recorder()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            with torch.no_grad():
                self.fc.bias[0] = -100.0

        def forward(self, x):
            return rec("fc", F.relu(self.fc(x)), -1)

    torch.manual_seed(0)
    report = assert_exact(Net().eval(), rec, [torch.randn(5, 3), torch.randn(2, 4, 3)], {"fc": "<root>:relu"})
    assert report.sites[0].dead_units == (0,)

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            with torch.no_grad():
                self.conv.bias[1] = -100.0

        def forward(self, x):
            return rec("conv", F.relu(self.conv(x)), 1 if x.ndim == 4 else 0)

    batches = [torch.randn(5, 3, 2, 2), torch.randn(3, 4, 2)]  # a batch, then one unbatched sample
    report = assert_exact(Unbatched().eval(), rec, batches, {"conv": "<root>:relu"})
    assert 1 in report.sites[0].dead_units
