"""Regressions for ten problems found in the rescue/surgery functions (each test failed before its fix).

1+2. a forward that branches on an optional argument's default (fx traces it as a proxy);
3. weights tied by shared storage, not by the same Parameter;
4. a functional ``F.prelu(h, weight)`` site (the slope is a graph node) and 5. ``nn.LeakyReLU(a)``'s slope
   for the He gain;
6. a constant unit before a BatchNorm without running statistics (batch statistics in eval);
7. ``selu_init=True`` on a layer whose weight is computed;
8. TorchScript modules;
9. ``swap_activations(nn.ReLU(), copy=True)``;
10. the default tolerance of ``prune_dead``'s check on data in half precision.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune is not imported by torch.nn.utils)
from torch import nn

import deadrelu
from deadrelu import RefusedError, nudge_bias, prune_dead, reinit_dead, swap_activations
from fixtures.unchanged import assert_unchanged, snapshot, trained_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

OPERATIONS = {
    "prune": lambda net, rep, opt, x: prune_dead(net, rep),
    "prune_data": lambda net, rep, opt, x: prune_dead(net, rep, data=x),
    "reinit": lambda net, rep, opt, x: reinit_dead(net, rep, opt),
    "reinit_data": lambda net, rep, opt, x: reinit_dead(net, rep, opt, data=x),
    "nudge": lambda net, rep, opt, x: nudge_bias(net, rep, optimizer=opt),
}


def refused(net: nn.Module, op: str, x: torch.Tensor, match: str) -> str:
    """``op`` must refuse with one RefusedError matching ``match`` and leave model and optimizer bit-identical."""
    opt = trained_optimizer(net, x)
    report = deadrelu.scan(net, x)
    before = snapshot(net, opt)
    with pytest.raises(RefusedError, match=match) as info:
        OPERATIONS[op](net, report, opt, x)
    assert str(info.value).endswith("; nothing was changed")
    assert_unchanged(before, snapshot(net, opt))
    return str(info.value)


# -- 1+2: branches on an optional argument's default -------------------------------------------------------


class OffsetWhenNone(nn.Module):
    """The usual call (offset=None) also reads the hidden units; fx's trace (offset a proxy) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)

    def forward(self, x, offset=None):
        h = self.act(self.fc1(x))
        out = self.fc2(h)
        if offset is None:
            offset = h.mean(dim=1, keepdim=True)
        return out + offset


class KeywordOnlyMask(nn.Module):
    """A keyword-only default: the trace multiplies by the mask, the default call does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)

    def forward(self, x, *, mask=None):
        h = self.act(self.fc1(x))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class HarmlessDefaults(nn.Module):
    """Defaults forward uses but does not branch on: the graph is the same either way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)

    def forward(self, x, scale=2.0, unused=None, dims=(1,)):
        return self.fc2(self.act(self.fc1(x))).sum(dim=dims, keepdim=True) * scale


def with_dead(net: nn.Module, units=(0, 1, 2, 3)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = net.eval()
    with torch.no_grad():
        net.fc1.bias[list(units)] = -50.0
    return net, torch.randn(64, 8)


@pytest.mark.parametrize("op", ["prune", "prune_data", "reinit", "reinit_data", "nudge"])
@pytest.mark.parametrize("model,arg", [(OffsetWhenNone, "'offset' (default None)"), (KeywordOnlyMask, "'mask' (default None)")])
def test_a_forward_branching_on_an_optional_argument_is_refused(op, model, arg):
    net, x = with_dead(model())
    message = refused(net, op, x, "branches on its optional argument")
    assert arg in message and model.__name__ in message


def test_before_the_fix_the_optional_argument_branch_changed_outputs():
    # What the refusal prevents: the trace's chain (fc1 -> relu -> fc2 only) is not the default call's.
    net, x = with_dead(OffsetWhenNone())
    gm = torch.fx.symbolic_trace(net)
    assert not any(n.op == "call_method" and n.target == "mean" for n in gm.graph.nodes)
    with torch.no_grad():
        h = torch.relu(net.fc1(x))
        expected = net.fc2(h) + h.mean(dim=1, keepdim=True)
        assert torch.allclose(net(x), expected)


def test_defaults_forward_does_not_branch_on_are_no_reason_to_refuse():
    net, x = with_dead(HarmlessDefaults())
    report = deadrelu.scan(net, x)
    small = prune_dead(net, report, data=x).model
    with torch.no_grad():
        keep = list(range(4, 16))
        h = torch.relu(x @ net.fc1.weight[keep].T + net.fc1.bias[keep])
        expected = (h @ net.fc2.weight[:, keep].T + net.fc2.bias).sum(dim=1, keepdim=True) * 2.0
        assert small.fc1.out_features == 12
        assert torch.allclose(small(x), expected, atol=1e-6)
    before = net(x).detach()
    reinit_dead(net, report)
    assert torch.allclose(net(x), before, atol=1e-6)


class ScaledBlock(nn.Module):
    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.fc, self.out, self.branch = nn.Linear(8, 8), nn.Linear(8, 8), branch

    def forward(self, x, scale=None):
        h = F.relu(self.fc(x))
        if self.branch and scale is not None:
            h = h * scale
        return self.out(h)


class Wrapper(nn.Module):
    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.block, self.head = ScaledBlock(branch), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_swap_refuses_a_module_whose_forward_branches_on_an_optional_argument():
    torch.manual_seed(0)
    net, x = Wrapper(branch=True), torch.randn(5, 8)
    before = snapshot(net, None)
    out = net(x).detach()
    with pytest.raises(RefusedError, match=r"block \(ScaledBlock\).*'scale' \(default None\)") as info:
        swap_activations(net, to="leaky_relu")
    assert str(info.value).endswith("; nothing was changed")
    assert_unchanged(before, snapshot(net, None))
    assert torch.equal(net(x), out)
    with pytest.raises(RefusedError, match="'scale'"):
        swap_activations(net, to="leaky_relu", copy=True)


def test_swap_rewrites_a_module_with_a_default_it_does_not_branch_on():
    torch.manual_seed(0)
    net, x = Wrapper(branch=False), torch.randn(5, 8)
    result = swap_activations(net, to="leaky_relu", negative_slope=0.1)
    b = net.block
    expected = net.head(b.out(F.leaky_relu(b.fc(x), 0.1)))
    assert isinstance(net.block, torch.fx.GraphModule)
    assert torch.allclose(result.model(x), expected)


# -- 3: weights tied by shared storage -----------------------------------------------------------------


class StorageTied(nn.Module):
    def __init__(self, overlap: bool) -> None:
        super().__init__()
        self.enc, self.act, self.mid, self.dec = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 16)
        if overlap:
            self.dec.weight = nn.Parameter(self.enc.weight.data)  # a second Parameter on the same memory
        else:  # one flat buffer, two disjoint views: not tied
            flat = torch.randn(16 * 8 + 8 * 16) * 0.3
            self.enc.weight = nn.Parameter(flat[: 16 * 8].view(16, 8))
            self.dec.weight = nn.Parameter(flat[16 * 8 :].view(16, 8))

    def forward(self, x):
        return self.dec(self.mid(self.act(self.enc(x))))


def storage_tied(overlap: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = StorageTied(overlap).eval()
    with torch.no_grad():
        net.enc.bias[:4] = -50.0
    return net, torch.randn(64, 8)


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "nudge", "prune"])
def test_weights_sharing_storage_are_tied_and_refused(op):
    net, x = storage_tied(overlap=True)
    assert net.enc.weight is not net.dec.weight
    message = refused(net, op, x, "shares parameters with")
    assert "'enc'" in message and "dec" in message


def test_disjoint_views_of_one_buffer_are_not_tied():
    net, x = storage_tied(overlap=False)
    report = deadrelu.scan(net, x)
    dec = net.dec.weight.detach().clone()
    with torch.no_grad():
        before = net(x)
    reinit_dead(net, report)
    with torch.no_grad():
        assert torch.equal(net.dec.weight, dec)
        assert torch.allclose(net(x), before, atol=1e-6)


# -- 4+5: the He gain of leaky, parametric and randomized ReLU sites ----------------------------------------


class FunctionalPReLU(nn.Module):
    def __init__(self, slopes: torch.Tensor, computed: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 3)
        self.w = nn.Parameter(slopes.clone())
        self.computed = computed

    def forward(self, x):
        return self.b(F.prelu(self.a(x), self.w.clamp(min=0.0) if self.computed else self.w))


def gain_used(net: nn.Module, producer: nn.Module, units=(0, 1, 2, 3)) -> float:
    """Plant constant dead units, re-initialise them with a seeded generator, and read the gain back."""
    with torch.no_grad():
        producer.weight[list(units)] = 0
        producer.bias[list(units)] = -5.0
    x = torch.randn(256, producer.in_features)
    report = deadrelu.scan(net, x)
    assert report.sites[0].dead_units == tuple(units)
    reinit_dead(net, report, generator=torch.Generator().manual_seed(1))
    raw = torch.randn((len(units), producer.in_features), generator=torch.Generator().manual_seed(1))
    return float((producer.weight[list(units)].detach() * math.sqrt(producer.in_features) / raw).mean())


def he(slope_squared: float) -> float:
    return math.sqrt(2.0 / (1.0 + slope_squared))


def test_functional_prelu_reads_the_slope_parameter():
    torch.manual_seed(0)
    net = FunctionalPReLU(torch.full((16,), 0.5))
    assert gain_used(net, net.a) == pytest.approx(he(0.25), rel=1e-5)


def test_functional_per_channel_prelu_uses_the_mean_square_slope_of_the_units():
    torch.manual_seed(0)
    slopes = torch.linspace(0.0, 1.5, 16)
    net = FunctionalPReLU(slopes)
    expected = he(float((slopes[:4] ** 2).mean()))
    assert gain_used(net, net.a) == pytest.approx(expected, rel=1e-5)


def test_functional_prelu_with_a_computed_slope_uses_torchs_default():
    torch.manual_seed(0)
    net = FunctionalPReLU(torch.full((16,), 0.9), computed=True)
    assert gain_used(net, net.a) == pytest.approx(he(0.25**2), rel=1e-5)


@pytest.mark.parametrize("act,slope", [(nn.LeakyReLU(0.5), 0.5), (nn.LeakyReLU(1.0), 1.0), (nn.RReLU(0.1, 0.3), 0.2),
                                       (nn.PReLU(16, init=0.7), 0.7)])  # fmt: skip
def test_activation_modules_give_their_own_slope(act, slope):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), act, nn.Linear(16, 3)).eval()
    assert gain_used(net, net[0]) == pytest.approx(he(slope**2), rel=1e-5)


def test_functional_leaky_relu_with_a_tensor_slope_is_no_raw_error():
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 3)
            self.register_buffer("slope", torch.tensor(0.5))

        def forward(self, x):
            return self.b(F.leaky_relu(self.a(x), self.slope))  # the slope is a graph node in the trace

    torch.manual_seed(0)
    net = Leaky()
    assert gain_used(net, net.a) == pytest.approx(he(0.25), rel=1e-5)


# -- 6: a BatchNorm without running statistics ------------------------------------------------------------


def batch_stats_net(affine: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(16, track_running_stats=False, affine=affine)
    net = nn.Sequential(nn.Linear(6, 16), nn.ELU(), bn, nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[0].weight[:3] = 0
        net[0].bias[:3] = -5.0  # three constant ELU units
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return net, torch.randn(256, 6)


def exact_output(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model in exact arithmetic: a channel constant over the batch comes out of the BatchNorm as its bias."""
    bn = net[2]
    h = F.elu(net[0](x)).double()
    z = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
    z[:, :3] = 0.0
    if bn.affine:
        z = z * bn.weight.double() + bn.bias.double()
    return z @ net[3].weight.double().T + net[3].bias.double()


@pytest.mark.parametrize("affine", [True, False])
def test_constant_units_before_a_batch_statistics_batchnorm_fold_to_its_bias(affine):
    net, x = batch_stats_net(affine)
    report = deadrelu.scan(net, x)
    with torch.no_grad():
        exact = exact_output(net, x)
        small = prune_dead(net, report)
        assert small.removed == {"1": (0, 1, 2)}
        assert torch.allclose(small.model(x).double(), exact, atol=1e-5)
        twin = copy.deepcopy(net)
        reinit_dead(twin, report)
        assert torch.allclose(twin(x).double(), exact, atol=1e-5)


def test_with_data_the_refusal_names_the_batch_statistics_and_a_tolerance_accepts():
    net, x = batch_stats_net(affine=True)
    report = deadrelu.scan(net, x)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=r"BatchNorm '2' has no running statistics") as info:
        prune_dead(net, report, data=x)
    assert "traced graph does not show" not in str(info.value)
    assert_unchanged(before, snapshot(net, None))
    result = prune_dead(net, report, data=x, tolerance=1e-2)
    assert result.max_abs_diff <= 1e-2


# -- 7: selu_init on a computed weight ----------------------------------------------------------------------


def computed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    if kind == "parametrizations.weight_norm":
        nn.utils.parametrizations.weight_norm(net[0])
    elif kind == "hook weight_norm":
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(net[0])
    elif kind == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(net[2])
    else:
        nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.3)
    return net


@pytest.mark.parametrize("kind,where", [("parametrizations.weight_norm", "'0'"), ("hook weight_norm", "'0'"),
                                        ("spectral_norm", "'2'"), ("torch.nn.utils.prune", "'0'")])  # fmt: skip
def test_selu_init_on_a_computed_weight_is_refused_before_any_change(kind, where):
    net = computed(kind).eval()  # in training mode each spectral-normed forward runs a power iteration
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = net(x)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=rf"selu_init=True cannot re-initialise {where}") as info:
        swap_activations(net, to="selu", selu_init=True)
    assert str(info.value).endswith("; nothing was changed")
    assert_unchanged(before, snapshot(net, None))
    assert type(net[1]) is nn.ReLU
    with torch.no_grad():
        assert torch.equal(net(x), out)


# -- 8: TorchScript ----------------------------------------------------------------------------------------


def scripted_mlp() -> nn.Module:
    torch.manual_seed(0)
    return torch.jit.script(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("copy_", [False, True])
def test_swap_refuses_a_torchscript_model(copy_):
    sm = scripted_mlp()
    x = torch.randn(4, 8)
    out = sm(x)
    with pytest.raises(RefusedError, match="is a TorchScript module") as info:
        swap_activations(sm, to="leaky_relu", copy=copy_)
    assert str(info.value).endswith("; nothing was changed")
    assert torch.equal(sm(x), out)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("op", ["prune", "reinit", "nudge"])
def test_rescue_of_a_torchscript_model_names_the_real_reason(op):
    sm = scripted_mlp()
    with torch.no_grad():
        sm[0].bias[:4] = -50.0
    x = torch.randn(32, 8)
    report = deadrelu.scan(sm, x)
    with pytest.raises(RefusedError, match="cannot trace RecursiveScriptModule with torch.fx: it is a TorchScript") as info:
        OPERATIONS[op](sm, report, None, x)
    assert "OrderedDictWrapper" not in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_swap_leaves_a_scripted_submodule_without_relu_alone_and_refuses_one_with_relu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), torch.jit.script(nn.Sequential(nn.Linear(16, 2), nn.Tanh())))
    x = torch.randn(4, 8)
    result = swap_activations(net, to="leaky_relu")
    assert [c.site for c in result.changes] == ["1"]
    assert torch.allclose(net(x), net[2](F.leaky_relu(net[0](x), 0.01)))
    with_relu = nn.Sequential(nn.Linear(8, 16), torch.jit.script(nn.Sequential(nn.ReLU(), nn.Linear(16, 2))))
    before = snapshot(with_relu, None)
    with pytest.raises(RefusedError, match=r"'1' \(RecursiveScriptModule\) is a TorchScript module"):
        swap_activations(with_relu, to="leaky_relu")
    assert_unchanged(before, snapshot(with_relu, None))


# -- 9: the model is an nn.ReLU ---------------------------------------------------------------------------


@pytest.mark.parametrize("to,reference", [("leaky_relu", lambda x: F.leaky_relu(x, 0.2)), ("elu", F.elu)])
def test_swap_of_a_bare_relu_with_copy_returns_the_new_activation(to, reference):
    relu = nn.ReLU()
    result = swap_activations(relu, to=to, copy=True, negative_slope=0.2)
    x = torch.randn(50)
    assert result.model is not relu and type(relu) is nn.ReLU
    assert torch.equal(result.model(x), reference(x))
    assert [(c.site, c.kind, c.old) for c in result.changes] == [("<root>", "module", "ReLU()")]


def test_swap_of_a_bare_relu_in_place_is_refused_with_a_true_message():
    with pytest.raises(RefusedError, match="pass copy=True to get the new activation as result.model") as info:
        swap_activations(nn.ReLU(), to="leaky_relu")
    assert str(info.value).endswith("; nothing was changed")


# -- 10: half precision ------------------------------------------------------------------------------------


def half_net(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].bias[[1, 4]] = -50
        net[2].running_mean.uniform_(-1, 1)
        net[2].running_var.uniform_(0.5, 2)
    return net.to(dtype).eval(), torch.randn(128, 10).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fold_is_accepted_at_the_default_tolerance(dtype):
    net, x = half_net(dtype)
    report = deadrelu.scan(net, x)
    result = prune_dead(net, report, data=x)
    assert result.removed == {"1": (1, 4)}
    with torch.no_grad():
        # Independent: the original in float64 (the two units are dead on x, so pruning changes nothing there).
        ref = copy.deepcopy(net).double()
        expected = ref(x.double())
        assert (result.model(x).double() - expected).abs().max() <= 2e-2 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_explicit_tolerance_is_kept_as_given(dtype):
    net, x = half_net(dtype)
    report = deadrelu.scan(net, x)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=r"tolerance 1e-05; rounding in the outputs' dtype alone may reach"):
        prune_dead(net, report, data=x, tolerance=1e-5)
    assert_unchanged(before, snapshot(net, None))


# -- a forward that runs other layers in each mode ---------------------------------------------------


class _ModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(5, 8)  # the training-time path
        self.fb = nn.Linear(5, 8)  # the eval-time path
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fa(x)) if self.training else F.relu(self.fb(x))
        return self.out(h)


def _planted(make: Callable[[], nn.Module], layer: str, inputs: tuple[int, int]) -> tuple[nn.Module, torch.Tensor]:
    """A model (seed 0) whose ``layer`` has units 1 and 2 planted dead, and random inputs of that shape."""
    torch.manual_seed(0)
    net = make()
    with torch.no_grad():
        net.get_submodule(layer).bias[[1, 2]] = -50.0
    return net, torch.randn(*inputs)


@pytest.mark.parametrize("op", ["prune", "reinit", "nudge"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_forward_branching_on_self_training_is_refused_and_left_as_it_was(op, mode):
    net, x = _planted(_ModeBranch, "fb", (64, 5))
    report = deadrelu.scan(net, x)  # eval mode: fb's units 1 and 2 are dead
    assert report.sites[0].dead_units == (1, 2)
    net.train(mode == "train")
    flags = [m.training for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = {
        "prune": lambda: deadrelu.prune_dead(net, report),
        "reinit": lambda: deadrelu.reinit_dead(net, report, data=x),
        "nudge": lambda: deadrelu.nudge_bias(net, report),
    }[op]
    with pytest.raises(RefusedError, match="other operations in training and in eval mode"):
        run()  # before: in train mode the trace took fa for fb, pruning or editing the wrong layer
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# -- what a pruned layer, built anew, would lose --------------------------------------------------------


def _planted_mlp() -> tuple[nn.Module, torch.Tensor]:
    return _planted(lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), "0", (64, 5))


@pytest.mark.parametrize(
    "attach, reason",
    [(lambda n: n[0].register_full_backward_hook(lambda m, gi, go: None), "backward \\(pre-\\)hook"),
     (lambda n: n[2].weight.register_hook(lambda g: g), "'2' \\(Linear\\).weight has a tensor hook"),
     (lambda n: n[0].register_buffer("amax", torch.ones(8)), "holds a tensor 'amax'")],
    ids=["backward hook", "tensor hook", "extra buffer"],
)  # fmt: skip
def test_prune_refuses_a_layer_whose_attachments_the_smaller_layer_would_lose(attach, reason):
    net, x = _planted_mlp()
    attach(net)
    report = deadrelu.scan(net, x)
    with pytest.raises(RefusedError, match=reason):
        prune_dead(net, report, data=x)  # before: the pruned copy silently dropped it


def test_prune_carries_plain_attributes_and_a_frozen_models_new_bias_stays_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2, bias=False))
    with torch.no_grad():  # a dead unit's BatchNorm output is a constant: folded into a new consumer bias
        net[2].running_mean.uniform_(0, 1)
        net[2].bias.uniform_(-1, 1)
        net[0].bias[1] = -50.0
    net[0].no_decay = True  # a tag the training script reads
    net.requires_grad_(False).eval()
    x = torch.randn(64, 5)
    small = prune_dead(net, deadrelu.scan(net, x), data=x).model
    assert small[0].no_decay is True and small[0].out_features == 7
    assert small[3].bias is not None and not any(p.requires_grad for p in small.parameters())
    assert torch.allclose(small(x), net(x), atol=1e-5)


class _Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.out(F.relu(self.fc(x)))


@pytest.mark.parametrize("op", ["prune", "reinit"])
def test_a_forward_under_autocast_is_checked_at_the_precision_it_computes_in(op):
    """The held-out reference is an fx trace, which drops autocast (float32); the model computes in
    bfloat16: it was refused for a bfloat16 rounding difference measured at float32's tolerance."""
    net, x = _planted(_Autocast, "fc", (32, 8))
    report = deadrelu.scan(net, x)
    before = copy.deepcopy(net)
    if op == "prune":
        small = prune_dead(net, report, data=x).model
        assert small.fc.out_features == 6
    else:
        reinit_dead(net, report, data=x)
        small = net
    with torch.no_grad():
        assert torch.allclose(small(x).float(), before(x).float(), atol=2e-2)


class _InplaceStatement(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.relu_()  # the consumer below reads the rectified h
        return self.out(h)


def test_an_in_place_relu_written_as_a_statement_is_a_chain_to_its_consumer():
    net, x = _planted(_InplaceStatement, "fc", (64, 5))
    report = deadrelu.scan(net, x)
    small = prune_dead(net, report, data=x).model  # before: refused as a 'residual' use of the pre-activation
    assert small.fc.out_features == 6 and small.out.in_features == 6
    with torch.no_grad():
        assert torch.allclose(small(x), net(x), atol=1e-5)
