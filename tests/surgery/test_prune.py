"""prune_dead: equal outputs, exact parameter and MAC arithmetic, trainable/scriptable results, refusals."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from fixtures.models import same_state
from deadrelu import PruneResult, RefusedError, prune_dead
from deadrelu.errors import DataError, DeadReluError
from fixtures import rescue_models as rm


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py



CASES = [
    ("mlp", rm.mlp, rm.data),
    ("functional", rm.FunctionalMLP, rm.data),
    ("nested", rm.Nested, rm.data),
    ("cnn_bn", rm.cnn_bn, rm.images),
    ("conv_flatten", rm.conv_flatten, rm.images),
    ("view_flatten", rm.ViewFlatten, rm.images),
    ("post_bn", rm.post_bn, rm.data),
    ("functional_cnn", rm.FunctionalCNN, rm.images),
]


@pytest.mark.parametrize("name,build,inputs", CASES, ids=[c[0] for c in CASES])
def test_prune_gives_equal_outputs_and_leaves_original(name, build, inputs):
    net, x = build().eval(), inputs()
    before = copy.deepcopy(net.state_dict())
    report = deadrelu.scan(net, x)
    result = prune_dead(net, report, data=x)
    assert isinstance(result, PruneResult)
    assert result.removed == {s.name: s.dead_units for s in report.sites if s.dead_units}
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    # Independent check on the same data and on a fresh batch where the planted units stay dead.
    pruned = result.model.eval()
    with torch.no_grad():
        assert float((pruned(x) - net(x)).abs().max()) <= 1e-5
    assert same_state(net.state_dict(), before)
    assert type(pruned) is type(net)
    after = deadrelu.scan(pruned, x)
    assert [s.units for s in after.sites] == [s.units - len(s.dead_units) for s in report.sites]
    assert after.dead == 0
    assert result.params_after < result.params_before


def test_mlp_parameter_and_mac_arithmetic():
    net, x = rm.mlp(), rm.data()
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    # Layer widths 6 -> 16 -> 12 -> 3; removed 3 of 16 and 2 of 12.
    removed = 3 * (6 + 1) + 3 * 12 + 2 * (13 + 1) + 2 * 3
    assert result.params_before == 6 * 16 + 16 + 16 * 12 + 12 + 12 * 3 + 3
    assert result.params_before - result.params_after == removed
    assert result.macs_before == 6 * 16 + 16 * 12 + 12 * 3
    assert result.macs_after == 6 * 13 + 13 * 10 + 10 * 3
    p = result.model
    assert (p[0].out_features, p[2].in_features, p[2].out_features, p[4].in_features) == (13, 13, 10, 10)
    keep = [i for i in range(16) if i not in (1, 3, 7)]
    assert torch.equal(p[0].weight, net[0].weight[keep])
    assert torch.equal(p[2].weight, net[2].weight[[i for i in range(12) if i not in (2, 5)]][:, keep])


def test_cnn_bn_parameter_arithmetic():
    net, x = rm.cnn_bn(), rm.images()
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    # conv0 3->8 (k3) with BN(8), 2 channels removed; conv4 8->6 (k3) with BN(6), 1 removed; Linear 6->4.
    first = 2 * (3 * 9 + 1) + 2 * 2 + 2 * 6 * 9
    second = 1 * (6 * 9 + 1) + 1 * 2 + 1 * 4
    assert result.params_before - result.params_after == first + second
    p = result.model
    assert (p[0].out_channels, p[1].num_features, p[4].in_channels, p[4].out_channels, p[9].in_features) == (6, 6, 6, 5, 5)
    assert torch.equal(p[1].running_var, net[1].running_var[[0, 1, 3, 4, 6, 7]])
    # MACs: conv0 8x8 output, pool to 4x4, conv4 4x4 output, Linear.
    assert result.macs_before == 64 * 8 * 3 * 9 + 16 * 6 * 8 * 9 + 6 * 4
    assert result.macs_after == 64 * 6 * 3 * 9 + 16 * 5 * 6 * 9 + 5 * 4


def test_flatten_removes_the_whole_block_of_columns():
    net, x = rm.conv_flatten(), rm.images()
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    lin = result.model[3]
    assert lin.in_features == 3 * 36
    keep = [c * 36 + k for c in (0, 2, 4) for k in range(36)]
    assert torch.equal(lin.weight, net[3].weight[:, keep])
    assert result.params_before - result.params_after == 2 * (3 * 9 + 1) + 2 * 36 * 4


def test_post_bn_constant_folded_into_bias():
    net, x = rm.post_bn().eval(), rm.data()
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    bn, lin = net[2], net[3]
    c = bn.bias[[0, 6]] - bn.weight[[0, 6]] * bn.running_mean[[0, 6]] / torch.sqrt(bn.running_var[[0, 6]] + bn.eps)
    expected = lin.bias + (lin.weight[:, [0, 6]] * c).sum(1)
    torch.testing.assert_close(result.model[3].bias, expected.detach(), atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_pruned_model_trains_scripts_and_exports():
    for build, inputs in ((rm.cnn_bn, rm.images), (rm.FunctionalMLP, rm.data)):
        net, x = build().eval(), inputs()
        pruned = prune_dead(net, deadrelu.scan(net, x), data=x).model
        scripted = torch.jit.script(pruned)
        torch.testing.assert_close(scripted(x), pruned(x))
        exported = torch.export.export(pruned, (x[:8],))
        torch.testing.assert_close(exported.module()(x[:8]), pruned(x[:8]))
        pruned.train()
        opt = torch.optim.SGD(pruned.parameters(), lr=0.05)
        target = torch.zeros_like(pruned(x))
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.mse_loss(pruned(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]


def test_all_dead_site_keeps_one_unit():
    net, x = rm.mlp(dead={1: list(range(12))}), rm.data()
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    assert result.kept == {"3": (0,)}
    assert result.removed["3"] == tuple(range(1, 12))
    assert result.model[2].out_features == 1


def test_non_relu_sites_are_skipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    rm.plant(net[0].bias, [1])
    rm.plant(net[2].bias, [3])
    x = rm.data()
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    assert result.removed == {"3": (3,)}
    assert "leaky_relu" in result.skipped["1"]


def test_refuses_when_outputs_differ_on_the_data():
    net, x = rm.mlp(dead={}), rm.data()
    report = deadrelu.scan(net, x[:2])  # units silent on 2 samples fire on others
    assert report.dead > 0
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RefusedError, match="differ from the original's by up to"):
        prune_dead(net, report, data=x)
    assert same_state(net.state_dict(), before)
    assert prune_dead(net, report).max_abs_diff is None  # without data nothing is verified


@pytest.mark.parametrize(
    "build,why",
    [(rm.Residual, "residual"), (rm.SharedLayer, "called 2 times"), (rm.TiedWeights, "shares parameters"),
     (rm.unsupported, "LayerNorm"), (rm.Untraceable, "cannot trace")],
)  # fmt: skip
def test_refusals_leave_model_unchanged(build, why):
    net, x = build(), rm.data()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RefusedError, match=why) as err:
        prune_dead(net, deadrelu.scan(net, x), data=x)
    assert "nothing was changed" in str(err.value)
    assert same_state(net.state_dict(), before)


def test_refuses_nonzero_constant_into_padded_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1))
    rm.plant(net[0].bias, [1])
    x = rm.images()
    rm.settle_bn(net, x)
    with torch.no_grad():
        net[2].bias.fill_(0.5)
    with pytest.raises(RefusedError, match="zero-padded convolution '3'"):
        prune_dead(net, deadrelu.scan(net, x), data=x)
    net[3].padding = (0, 0)  # without padding the constant folds exactly
    result = prune_dead(net, deadrelu.scan(net, x), data=x)
    assert result.removed == {"1": (1,)} and result.max_abs_diff <= 1e-5


def test_bad_inputs():
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x)
    with pytest.raises(DeadReluError, match="tolerance"):
        prune_dead(net, report, data=x, tolerance=-1)
    with pytest.raises(DataError):
        prune_dead(net, report, data="not data")
    with pytest.raises(DeadReluError, match="torch.nn.Module"):
        prune_dead("net", report)  # type: ignore[arg-type]


def test_str_summarises():
    net, x = rm.mlp(), rm.data()
    text = str(prune_dead(net, deadrelu.scan(net, x), data=x))
    assert "removed 5 unit(s) at 2 site(s)" in text and "355 -> 264" in text and "324 -> 238" in text


@pytest.mark.parametrize(
    "build,inputs",
    [(rm.ReusedReLU, rm.data), (rm.ReusedFunctionalAct, rm.data), (rm.token_mlp, rm.tokens),
     (rm.conv1d_bn, lambda: rm.tokens().transpose(1, 2))],
    ids=["reused relu", "reused functional act", "tokens (N,T,F)", "conv1d+bn"],
)
def test_reused_activation_tokens_and_conv1d(build, inputs):
    net, x = build().eval(), inputs()
    report = deadrelu.scan(net, x)
    result = prune_dead(net, report, data=x)
    assert result.removed == {s.name: s.dead_units for s in report.sites if s.dead_units}
    with torch.no_grad():
        assert float((result.model(x) - net(x)).abs().max()) <= 1e-5
    assert deadrelu.scan(result.model, x).dead == 0


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_random_mlps_prune_to_brute_force_arithmetic(widths, fraction, seed):
    torch.manual_seed(seed)
    dims = [5, *widths, 3]
    layers: list[nn.Module] = []
    for i in range(len(widths)):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1])).eval()
    g = torch.Generator().manual_seed(seed)
    for i, w in enumerate(widths):
        planted = [u for u in range(w) if float(torch.rand((), generator=g)) < fraction]
        rm.plant(net[2 * i].bias, planted)
    x = rm.data(64, 5, seed)
    # Brute force: run layer by layer and mark units whose ReLU output is 0 on every sample.
    dead, h = [], x
    with torch.no_grad():
        for i in range(len(widths)):
            h = torch.relu(net[2 * i](h))
            dead.append([u for u in range(widths[i]) if bool((h[:, u] == 0).all())])
    report = deadrelu.scan(net, x)
    assert [list(s.dead_units) for s in report.sites] == dead
    result = prune_dead(net, report, data=x)
    new = [w - len(d) if len(d) < w else 1 for w, d in zip(widths, dead)]
    nd = [5, *new, 3]
    assert result.params_after == sum(nd[i] * nd[i + 1] + nd[i + 1] for i in range(len(nd) - 1))
    assert result.macs_after == sum(nd[i] * nd[i + 1] for i in range(len(nd) - 1))
    with torch.no_grad():
        assert float((result.model(x) - net(x)).abs().max()) <= 1e-5


def test_hard_coded_view_width_is_refused_with_advice():
    net, x = rm.TutorialNet(), rm.images(32, size=32)
    report = deadrelu.scan(net, x)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RefusedError, match=r"through \.view\(\) with a hard-coded width.*x\.flatten\(1\)"):
        prune_dead(net, report, data=x)
    assert same_state(net.state_dict(), before)
    # Sites after the view have no hard-coded width downstream and reinit_dead needs no shrinking.
    deadrelu.reinit_dead(net, report)


def test_sites_selects_what_is_pruned():
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x)
    result = prune_dead(net, report, data=x, sites=["3"])
    assert result.removed == {"3": (2, 5)} and result.model[0].out_features == 16
    assert result.params_before - result.params_after == 2 * (16 + 1) + 2 * 3
    with pytest.raises(DeadReluError, match="no site 'nope' in the report; sites are: 1, 3"):
        prune_dead(net, report, sites=["nope"])


def test_training_flags_are_kept():
    net, x = rm.cnn_bn(), rm.images()
    report = deadrelu.scan(net, x)
    net.train()
    net[3].eval()  # a mixed state must survive too
    flags = [m.training for m in net.modules()]
    result = prune_dead(net, report, data=x)
    assert [m.training for m in net.modules()] == flags
    assert [m.training for m in result.model.modules()] == flags


def test_non_relu_units_with_zero_incoming_weights_fold_their_constant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[[2, 5]] = 0.0  # pre-activation = bias, whatever the input
        net[0].bias[[2, 5]] = torch.tensor([-4.0, -2.5])  # GELU(-4), GELU(-2.5): tiny negative constants
        net[0].bias[[7]] = -100.0  # dead, but with live weights: not provably constant
    x = rm.data()
    report = deadrelu.scan(net, x)
    assert report.sites[0].dead_units == (2, 5, 7)
    result = prune_dead(net, report, data=x)
    assert result.removed == {"1": (2, 5)}
    assert "1 dead gelu unit(s) with non-zero incoming weights" in result.skipped["1"]
    c = F.gelu(torch.tensor([-4.0, -2.5], dtype=torch.float64))
    expected = net[2].bias.detach().double() + (net[2].weight.detach().double()[:, [2, 5]] * c).sum(1)
    torch.testing.assert_close(result.model[2].bias.double(), expected, atol=1e-7, rtol=0)
    assert result.max_abs_diff <= 1e-6


def test_constant_units_through_batchnorm_and_prelu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = rm.images()
    rm.settle_bn(net, x)
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[1].bias[1] = -3.0  # BN(bias) far below the channel's running mean: negative constant
        net[2].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    report = deadrelu.scan(net, x)
    assert 1 in report.sites[0].dead_units
    result = prune_dead(net, report, data=x, sites=["2"])
    assert result.removed == {"2": (1,)} and result.max_abs_diff <= 1e-5
    assert result.model[4].in_features == 3 * 36
