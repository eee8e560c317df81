"""Cases for the fused ReLU (core/fused.py): the ReLU and its statistics in one kernel.

Run with kernel_cases.py under Triton's interpreter in a fresh process (see test_kernels.py),
and natively where there is CUDA. The reference is always the two-pass route: torch's own
ReLU, then the pure-torch statistics pass, or brute force.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICES, LAYOUTS, assert_matches, brute
from torch import nn

import deadrelu
from deadrelu.core import fused, kernels, stats


@pytest.fixture(autouse=True)
def quiet_numpy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.fixture
def launches(monkeypatch):
    """Every fused launch, by input shape (a test that expects fusion checks it happened)."""
    seen: list[tuple[int, ...]] = []
    real = kernels.relu_stats_into

    def counting(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "relu_stats_into", counting)
    return seen


def use_kernel(monkeypatch, flag: bool) -> None:
    """Route the auto backend to the kernel (CPU tensors too: the interpreter runs them) or away from it
    (to the two passes of torch: the compiled CPU kernel of core/native.py is off here)."""
    monkeypatch.setenv("DEADRELU_NO_NATIVE", "1")
    monkeypatch.setattr(stats, "_triton_ready", lambda x: flag and kernels.available())


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN, and the same sign of zero (torch's ReLU keeps -0.0;
    a NaN's sign bit means nothing, and torch's bf16 ReLU does not keep it)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    numbers = ~torch.isnan(a)
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(torch.signbit(a[numbers]), torch.signbit(b[numbers]))


def planted(shape, unit_dim, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    x.select(unit_dim, 1).fill_(-1.0)  # a dead unit
    flat = x.view(-1)
    flat[0], flat[1], flat[3], flat[-1] = float("nan"), -0.0, float("inf"), float("-inf")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, unit_dim = x.transpose(0, 2), 3
    return x, unit_dim


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=["fp32", "fp16", "bf16", "fp64"]
)
@pytest.mark.parametrize("shape,unit_dim,layout", LAYOUTS, ids=[f"{s}-{layout}" for s, _, layout in LAYOUTS])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_fused_relu_writes_torch_relu_and_counts_it(device, dtype, shape, unit_dim, layout, inplace, masked):
    x, unit_dim = planted(shape, unit_dim, layout, dtype, sum(shape))
    x = x.to(device)
    mask = (torch.arange(x.shape[0]) % 3 != 1).to(device) if masked else None
    expected = torch.relu(x)
    out = stats.StatTensors(x.shape[unit_dim], x.device).state
    target = x.clone(memory_format=torch.preserve_format) if inplace else x
    y = kernels.relu_stats_into(target, unit_dim, 0.0, out, mask, inplace)
    if layout == "transposed":  # no single-stride view: left to the two passes, nothing launched
        assert y is None and not stats.fuses_relu(x, unit_dim, "triton")
        assert out["observations"].item() == 0
        return
    assert same_values(y, expected) and y.stride() == x.stride()
    assert (y is target) == inplace
    assert_matches(out, brute(expected.cpu(), unit_dim, 0.0, None if mask is None else mask.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_a_slice_or_an_expanded_tensor_is_left_to_torch_with_torchs_layout(device, inplace):
    base = torch.randn(9, 8, generator=torch.Generator().manual_seed(6)).to(device)
    for x in (base[:, :5], base[:, :1].expand(9, 5)):
        assert not stats.fuses_relu(x, 1, "triton", inplace)
        if inplace and x.stride()[1] == 0:
            continue  # torch refuses an in-place write to overlapping memory; so do we (by not fusing)
        expected = torch.relu(x)
        out = stats.StatTensors(5, x.device).state
        y = stats.relu_accumulate(x, 1, 0.0, out, backend="triton", inplace=inplace)
        assert same_values(y, expected) and (y.stride() == expected.stride() or inplace)
        assert_matches(out, brute(expected.cpu(), 1, 0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_fused_relu_counts_against_threshold_and_keeps_x(device, threshold):
    x = torch.randn(33, 7, generator=torch.Generator().manual_seed(1)).to(device)
    before = x.clone()
    out = stats.StatTensors(7, x.device).state
    y = stats.relu_accumulate(x, 1, threshold, out, backend="triton")
    assert torch.equal(x, before) and torch.equal(y, torch.relu(before))
    assert_matches(out, brute(torch.relu(before).cpu(), 1, threshold))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_fused_relu_gradients_are_torch_relus(device, inplace):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 5, generator=g).to(device).requires_grad_()
    inp = torch.randn(9, 6, generator=g).to(device)
    inp[0, 0] = float("nan")
    grads = []
    for fuse in (False, True):
        w.grad = None
        z = inp @ w  # a non-leaf, as in a network
        out = stats.StatTensors(5, z.device).state
        y = stats.relu_accumulate(z, 1, 0.0, out, backend="triton" if fuse else "torch", inplace=inplace)
        assert (y is z) == inplace
        (y * torch.arange(1.0, 6.0, device=device)).nansum().backward()
        grads.append(w.grad.clone())
    assert same_values(grads[0], grads[1])


@pytest.mark.parametrize("device", DEVICES)
def test_fused_inplace_relu_keeps_autograds_version_check(device):
    # sigmoid saves its output; overwriting that output in place must fail in backward, fused or not.
    for backend in ("torch", "triton"):
        x = torch.randn(4, 3, device=device, requires_grad=True)
        s = torch.sigmoid(x) - 0.5
        t = torch.sigmoid(s)
        stats.relu_accumulate(t, 1, 0.0, stats.StatTensors(3, t.device).state, backend=backend, inplace=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            t.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_inplace_relu_of_a_leaf_is_left_to_torch(device):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    assert not stats.fuses_relu(x, 1, "triton", inplace=True)
    assert stats.fuses_relu(x, 1, "triton") and stats.fuses_relu(x.detach(), 1, "triton", inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        stats.relu_accumulate(x, 1, 0.0, stats.StatTensors(3, x.device).state, backend="triton", inplace=True)


class Zoo(nn.Module):
    """Every way a ReLU is called: modules (plain, in place, reused), functional and method
    forms, in place, in a loop, after a conv with BatchNorm, and on a padded sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 12)
        self.act, self.act_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.seq = nn.Linear(6, 10)
        with torch.no_grad():
            self.fc1.bias[:4] = -50.0  # planted dead units
            self.conv.bias[:2] = -50.0

    def forward(self, x, img, tokens, attention_mask=None):
        h = self.act(self.fc1(x))
        h = self.act(self.fc2(h))  # the same module, a second site
        h = F.relu(self.fc2(h))
        h = torch.relu(self.fc2(h) - 0.1)
        h = self.fc2(h).relu_()
        for _ in range(2):
            h = F.relu(self.fc2(h), inplace=True)
        c = self.act_inplace(self.bn(self.conv(img)))
        s = F.relu(self.seq(tokens))  # (B, T, C), padded positions masked out
        return h.sum() + c.mean() + s.sum()


def zoo_data(n=3, channels_last=False, garbage=float("nan"), device="cpu"):
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        img = torch.randn(5, 3, 4, 4, generator=g)
        if channels_last:
            img = img.to(memory_format=torch.channels_last)
        mask = torch.ones(5, 7, dtype=torch.bool)
        mask[1:, 4:] = False
        tokens = torch.randn(5, 7, 6, generator=g)
        tokens[~mask] = garbage  # padding: masked, never counted
        batch = {"x": torch.randn(5, 6, generator=g), "img": img, "tokens": tokens, "attention_mask": mask}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def assert_same_reports(a, b):
    assert [s.name for s in a.sites] == [s.name for s in b.sites]
    for sa, sb in zip(a.sites, b.sites):
        assert (sa.units, sa.observations, sa.unit_dim) == (sb.units, sb.observations, sb.unit_dim), sa.name
        assert list(sa.fired_counts) == list(sb.fired_counts), sa.name
        assert list(sa.nonfinite_counts) == list(sb.nonfinite_counts), sa.name
        assert sa.mean_abs == pytest.approx(sb.mean_abs, rel=1e-6, abs=1e-12), sa.name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scan_with_fused_relus_matches_the_two_pass_scan(monkeypatch, launches, device, channels_last):
    torch.manual_seed(0)
    model = Zoo().eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = zoo_data(channels_last=channels_last, device=device)
    use_kernel(monkeypatch, False)
    reference = deadrelu.scan(model, data)
    assert not launches
    use_kernel(monkeypatch, True)
    got = deadrelu.scan(model, data)
    assert_same_reports(got, reference)
    # Every ReLU call went through the kernel except each plain module's first call (it makes the site).
    calls_per_batch = 9
    module_sites = [s for s in got.sites if s.module in ("act", "act_inplace")]
    assert len(module_sites) == 3
    assert len(launches) == calls_per_batch * len(data) - len(module_sites)
    seq = next(s for s in got.sites if s.module == "" and s.units == 10)
    assert seq.observations == 3 * (7 + 4 * 4) and sum(seq.nonfinite_counts) == 0  # padding masked
    assert got.sites[0].dead_units == (0, 1, 2, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_monitored_training_with_fused_relus_is_the_unfused_training(monkeypatch, launches, device):
    torch.manual_seed(0)
    base = Zoo().to(device)
    data = zoo_data(n=4, garbage=30.0, device=device)  # finite: the loss sums the padding too
    runs = []
    for fuse in (False, True):
        use_kernel(monkeypatch, fuse)
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with deadrelu.Monitor(model, window=3, log_every=2) as mon:
            for batch in data:
                opt.zero_grad()
                loss = model(**batch)
                loss.backward()
                opt.step()
                mon.step(loss)
            runs.append((mon.report("total"), mon.report("window"), [p.detach().clone() for p in model.parameters()]))
        assert bool(launches) == fuse
    (total0, window0, params0), (total1, window1, params1) = runs
    assert_same_reports(total1, total0)
    assert_same_reports(window1, window0)
    assert all(torch.equal(p, q) for p, q in zip(params0, params1))  # the same training, bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_a_relu_module_with_a_users_forward_hook_is_counted_on_what_the_hook_returns(monkeypatch, launches, device):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(7)).to(device)
    reports = []
    for fuse in (False, True):
        use_kernel(monkeypatch, fuse)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(device)
        model[1].register_forward_hook(lambda mod, args, out: out - 1.0)  # the output the site sees
        with deadrelu.Probe(model) as probe:
            for _ in range(3):
                model(x)
        reports.append(probe.report())
    assert_same_reports(reports[1], reports[0])
    assert not launches  # the hooked module is left to torch


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_ad_counts_each_batch_once_and_keeps_the_kernel(monkeypatch, device):
    import torch.autograd.forward_ad as fwAD

    use_kernel(monkeypatch, True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(device)
    x = torch.randn(7, 4, device=device)
    with deadrelu.Probe(model) as probe, fwAD.dual_level():
        tangents = []
        for _ in range(2):
            out = model(fwAD.make_dual(x, torch.ones_like(x)))
            tangents.append(fwAD.unpack_dual(out).tangent)
    assert probe.report().sites[0].observations == 14
    assert all(t is not None for t in tangents) and torch.equal(tangents[0], tangents[1])
    assert not stats._TRITON_FAILED


class LateGelu(nn.Module):
    """A GELU site that first runs on the second batch, after the fused ReLU module's output."""

    def __init__(self) -> None:
        super().__init__()
        self.l, self.act = nn.Linear(6, 5), nn.ReLU()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.act(self.l(x))
        return F.gelu(h) if self.calls > 1 else h


@pytest.mark.parametrize("device", DEVICES)
def test_a_fused_relu_modules_output_keeps_the_feature_axis(monkeypatch, device):
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(8)).to(device)
    reports = []
    for fuse in (False, True):
        use_kernel(monkeypatch, fuse)
        torch.manual_seed(0)
        model = LateGelu().to(device)
        reports.append(deadrelu.scan(model, [x, x, x]))
    assert_same_reports(reports[1], reports[0])
    assert reports[1].site("<root>:gelu").units == 5  # the Linear's features, not the rank rule's dim 1


@pytest.mark.parametrize("device", DEVICES)
def test_an_accumulator_subclass_with_its_own_update_sees_every_batch(monkeypatch, launches, device):
    from deadrelu.core.capture import ActivationCapture

    seen = []

    class Recording(stats.UnitStats):
        def update(self, activation, unit_dim, nonnegative=False, mask=None):
            seen.append(tuple(activation.shape))
            super().update(activation, unit_dim, nonnegative, mask)

    use_kernel(monkeypatch, True)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU()).to(device)
    with ActivationCapture(model, stats_factory=lambda u, t, d: Recording(u, t, d)):
        for _ in range(3):
            model(torch.randn(5, 4, device=device))
    assert seen == [(5, 6)] * 3 and not launches


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_float64_negatives_become_zero(device):
    x = torch.tensor([[-1e-50, -1e-300, -5e-46, 3.0, -0.0]], dtype=torch.float64, device=device)
    out = stats.StatTensors(5, x.device).state
    y = kernels.relu_stats_into(x, 1, 0.0, out)
    assert same_values(y, torch.relu(x)) and out["abs_sum"].tolist() == [0.0, 0.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_subnormals_get_torchs_relu_and_fire(device, dtype):
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([[-tiny / 4, tiny / 4, -tiny, 2.0]], dtype=dtype, device=device)
    out = stats.StatTensors(4, x.device).state
    y = kernels.relu_stats_into(x, 1, 0.0, out)
    assert same_values(y, torch.relu(x))  # a negative subnormal becomes 0, not itself
    assert out["fired"].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_an_in_place_relu_of_an_inference_tensor_outside_inference_mode_is_left_to_torch(device):
    with torch.inference_mode():
        x = torch.randn(4, 3, device=device)
    assert not stats.fuses_relu(x, 1, "triton", inplace=True)
    out = stats.StatTensors(3, x.device).state
    with pytest.raises(RuntimeError, match="[Ii]nference"):  # torch's own error, as without deadrelu
        stats.relu_accumulate(x, 1, 0.0, out, backend="triton", inplace=True)
    assert out["observations"].item() == 0  # nothing counted for a call that failed


# -- regressions of the statistics hunt ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_a_lazily_negated_view_is_left_to_torchs_relu(device, inplace):
    # A dense negated view was fused: the kernel wrote relu of the stored negatives as the output.
    base = torch.randn(9, 4, generator=torch.Generator().manual_seed(14)).to(device)
    x = torch._neg_view(base)
    expected = torch.relu(x.resolve_neg())
    assert not stats.fuses_relu(x, 1, "triton", inplace)
    out = stats.StatTensors(4, x.device).state
    target = torch._neg_view(base.clone()) if inplace else x
    y = stats.relu_accumulate(target, 1, 0.0, out, backend="triton", inplace=inplace)
    assert same_values(y.resolve_neg(), expected) and (y is target) == inplace
    assert_matches(out, brute(expected.cpu(), 1, 0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_fused_relu_with_a_negative_unit_dim(device, inplace):
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(15)).to(device)
    expected = torch.relu(x)
    out = stats.StatTensors(3, x.device).state
    assert stats.fuses_relu(x, -1, "triton", inplace)
    y = stats.relu_accumulate(x.clone(), -1, 0.0, out, backend="triton", inplace=inplace)
    assert same_values(y, expected)
    assert_matches(out, brute(expected.cpu(), 2, 0.0))
