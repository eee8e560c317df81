"""Surgery proves or refuses: every case where a rewrite cannot be proven exact.

Each refusal must be a RefusedError naming the site and the reason, and leave the model
and optimizer bit-identical: parameters, buffers, every hook dict, and the optimizer's
state_dict (compared byte for byte).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import RefusedError, nudge_bias, prune_dead, reinit_dead, swap_activations
from deadrelu.core.report import Report
from fixtures import rescue_models as rm
from fixtures.unchanged import assert_unchanged, snapshot, trained_optimizer

OPERATIONS = {
    "reinit": lambda net, rep, opt, x: reinit_dead(net, rep, opt),
    "reinit_data": lambda net, rep, opt, x: reinit_dead(net, rep, opt, data=x),
    "prune": lambda net, rep, opt, x: prune_dead(net, rep, data=x),
    "prune_nodata": lambda net, rep, opt, x: prune_dead(net, rep),
    "nudge": lambda net, rep, opt, x: nudge_bias(net, rep, optimizer=opt),
}


def check_refused(net: nn.Module, op: str, match: str, site: str | None, x: torch.Tensor | None = None) -> None:
    """Scan, train one step, then ``op`` must refuse with ``match`` (naming ``site``) and change nothing."""
    x = rm.data() if x is None else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = trained_optimizer(net, x)
        report = deadrelu.scan(net, x)
        before = snapshot(net, opt)
        with pytest.raises(RefusedError, match=match) as info:
            OPERATIONS[op](net, report, opt, x)
    message = str(info.value)
    assert message.endswith("nothing was changed")
    if site is not None:
        assert f"site '{site}'" in message
    assert_unchanged(before, snapshot(net, opt))


# -- weights computed from other tensors ----------------------------------------------------------

@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "prune_nodata"])
@pytest.mark.parametrize("kind,text", [
    ("weight_norm", r"'2' is wrapped by the hook-based torch\.nn\.utils\.weight_norm"),
    ("spectral_norm", r"'2' is wrapped by the hook-based torch\.nn\.utils\.spectral_norm"),
    ("p_weight_norm", r"'2' is parametrized \(torch\.nn\.utils\.parametrize: weight \(_WeightNorm\)\)"),
    ("p_spectral_norm", r"'2' is parametrized \(torch\.nn\.utils\.parametrize: weight \(_SpectralNorm\)\)"),
    ("parametrize", r"'2' is parametrized \(torch\.nn\.utils\.parametrize: weight \(Doubled\)\)"),
])  # fmt: skip
def test_consumer_with_computed_weight_is_refused(kind, text, op):
    check_refused(rm.weight_normed(kind, layer=2), op, text, site="1")


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "nudge"])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "p_weight_norm", "parametrize"])
def test_producer_with_computed_weight_is_refused(kind, op):
    check_refused(rm.weight_normed(kind, layer=0), op, r"'0' is (wrapped by the hook-based|parametrized)", site="1")


def test_before_the_fix_weight_norm_consumer_changed_outputs():
    """Why the refusal matters: editing ``weight`` under the old weight_norm is undone at the next forward."""
    net, x = rm.weight_normed("weight_norm", layer=2), rm.data()
    before = net(x).detach()
    with torch.no_grad():
        net[2].weight[:, [1, 3, 7]] = 0  # what reinit_dead would write
        net[0].weight[[1, 3, 7]] = torch.randn(3, 6) * 3
        net[0].bias[[1, 3, 7]] = 0
    assert (net(x) - before).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_prune_of_a_model_with_an_old_weight_norm_elsewhere_is_refused_not_a_raw_error(kind):
    net = rm.weight_normed(kind, layer=4)  # the last layer, outside site '1''s chain
    x = rm.data()
    report = deadrelu.scan(net, x)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=rf"'4' is wrapped by the hook-based torch\.nn\.utils\.{kind}.*cannot be copied"):
        prune_dead(net, report, data=x, sites=["1"])
    with pytest.raises(RefusedError, match="cannot be copied"):
        swap_activations(net, copy=True)
    assert_unchanged(before, snapshot(net, None))


def test_swap_leaves_weight_normed_layers_alone_and_is_exact():
    """swap_activations edits only activations, so a weight-normed Linear is no reason to refuse."""
    net, x = rm.weight_normed("weight_norm", layer=2), rm.data()
    expected = nn.functional.leaky_relu
    with torch.no_grad():
        h = expected(net[0](x), 0.01)
        want = net[4](expected(net[2](h), 0.01))
    swap_activations(net, to="leaky_relu")
    assert torch.allclose(net(x), want, atol=1e-6)


# -- weights read outside the layer's own call ---------------------------------------------------

@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "nudge"])
def test_producer_weight_used_functionally_is_refused(op):
    check_refused(
        rm.ReusedProducerWeight(), op, r"'fc1\.weight' is also read directly in forward \(by linear\(\)\)", "<root>:relu"
    )


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune"])
def test_consumer_weight_used_elsewhere_is_refused(op):
    check_refused(rm.ReusedConsumerWeight(), op, r"'fc2\.weight' is also read directly in forward", "<root>:relu")


def test_before_the_fix_reused_weight_changed_outputs():
    """Without the refusal, re-drawing fc1's dead rows changes the functional F.linear(x, fc1.weight)."""
    net, x = rm.ReusedProducerWeight(), rm.data()
    before = net(x).detach()
    with torch.no_grad():
        net.fc1.weight[[1, 3, 7]] = torch.randn(3, 6)
        net.fc2.weight[:, [1, 3, 7]] = 0
    assert (net(x) - before).abs().max() > 1e-2


# -- hooks ----------------------------------------------------------------------------------------

def _add_hook(net: nn.Module, where: str, pre: bool) -> None:
    module = net.get_submodule(where)
    if pre:
        module.register_forward_pre_hook(lambda m, args: (args[0] * 1.5,))
    else:
        module.register_forward_hook(lambda m, args, out: out * 2)


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "nudge"])
@pytest.mark.parametrize("where,pre", [("0", True), ("0", False), ("1", False)])
def test_foreign_hooks_on_the_producer_side_are_refused(where, pre, op):
    net = rm.mlp()
    _add_hook(net, where, pre)
    check_refused(net, op, rf"'{where}' has 1 forward \(pre-\)hook\(s\) that are not deadrelu's", site="1")


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune"])
def test_foreign_hook_on_the_consumer_is_refused(op):
    net = rm.mlp()
    _add_hook(net, "2", pre=False)
    check_refused(net, op, r"'2' has 1 forward \(pre-\)hook\(s\) that are not deadrelu's", site="1")


def test_swap_refuses_to_drop_a_hook_on_a_relu_module():
    net = rm.mlp()
    _add_hook(net, "1", pre=False)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=r"swap_activations: '1' \(ReLU\) would be replaced: '1' has 1 forward"):
        swap_activations(net)
    assert_unchanged(before, snapshot(net, None))


def test_swap_refuses_to_rewrite_a_hooked_module_with_functional_relu():
    net = rm.Nested()
    net.block.register_forward_hook(lambda m, args, out: out + 1)
    before = snapshot(net, None)
    with pytest.raises(RefusedError, match=r"'block' \(Block\) would be rewritten as a torch\.fx\.GraphModule"):
        swap_activations(net)
    assert_unchanged(before, snapshot(net, None))


def test_swap_keeps_a_parametrized_weight_read_in_forward_live():
    """torch.fx calls the parametrization in the rewritten graph, so the swap is exact and stays trainable."""
    net, x = rm.FunctionalOverNormed(), rm.data()
    swapped = swap_activations(net, copy=True).model
    with torch.no_grad():
        want = nn.functional.linear(nn.functional.leaky_relu(net.fc1(x), 0.01), 2 * net.fc2.parametrizations.weight.original)
        assert torch.allclose(swapped(x), want, atol=1e-6)
        swapped.fc2.parametrizations.weight.original.mul_(3)  # the copy's own parameter, read live
        assert torch.allclose(swapped(x), 3 * want, atol=1e-5)


def test_deadrelu_own_hooks_are_not_a_reason_to_refuse(tmp_path):
    """A Probe or Monitor attached to the model is deadrelu's own: surgery works, and copies drop it."""
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x)
    with deadrelu.Probe(net):
        result = prune_dead(net, report, data=x)
        copied = swap_activations(net, copy=True).model
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in list(result.model.modules()) + list(copied.modules()))
    assert hooks == 0
    with deadrelu.Monitor(net, sinks=[str(tmp_path / "log.jsonl")], window=2):
        result = prune_dead(net, report, data=x)  # the monitor's open log file does not travel into the copy
        assert reinit_dead(net, report).units == 5
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in result.model.modules()) == 0


# -- a report from another model ----------------------------------------------------------------------

def _other_report() -> Report:
    """A report from a model with the same site names and widths but other parameter shapes (5 inputs, not 6)."""
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    rm.plant(other[0].bias, [1, 3, 7])
    return deadrelu.scan(other, torch.randn(64, 5))


@pytest.mark.parametrize("op", ["reinit", "prune", "nudge", "swap"])
@pytest.mark.parametrize("via_json", [False, True])
def test_report_from_another_model_is_refused(op, via_json, tmp_path):
    net = rm.mlp()
    report = _other_report()
    assert [s.name for s in report.sites] == [s.name for s in deadrelu.scan(net, rm.data()).sites]
    if via_json:
        path = tmp_path / "r.json"
        report.to_json(path)
        assert json.loads(path.read_text())["fingerprint"] == report.fingerprint != ""
        report = Report.from_json(path)
    opt = trained_optimizer(net, rm.data())
    before = snapshot(net, opt)
    calls = {
        "reinit": lambda: reinit_dead(net, report, opt),
        "prune": lambda: prune_dead(net, report, data=rm.data()),
        "nudge": lambda: nudge_bias(net, report, optimizer=opt),
        "swap": lambda: swap_activations(net, to="prelu", report=report),
    }
    with pytest.raises(RefusedError, match="the report was made from a different model: its parameter names and shapes"):
        calls[op]()
    assert_unchanged(before, snapshot(net, opt))


def test_fingerprint_survives_training_and_reinit():
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x)
    reinit_dead(net, report)
    assert deadrelu.scan(net, x).fingerprint == report.fingerprint
    pruned = prune_dead(net, report, data=x).model
    with pytest.raises(RefusedError, match="different model"):
        reinit_dead(pruned, report)  # the old report does not describe the smaller model


# -- held-out verification -------------------------------------------------------------------------

class _GlobalHook:
    """A global module forward hook (invisible to per-module checks) that makes Linear outputs
    depend on their whole input: zeroing a consumer column then changes the function."""

    def __enter__(self):
        def hook(module, args, out):
            if isinstance(module, nn.Linear):
                return out + 0.1 * args[0].sum(dim=-1, keepdim=True) * module.weight.sum()
            return out

        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_held_out_check_rolls_back_a_rewrite_the_structure_did_not_catch():
    net, x = rm.mlp(), rm.data()
    with _GlobalHook():
        opt = trained_optimizer(net, x)
        report = deadrelu.scan(net, x)
        before = snapshot(net, opt)
        with pytest.raises(RefusedError, match="on held-out random inputs the rewritten model differs"):
            reinit_dead(net, report, opt, data=x)
        assert_unchanged(before, snapshot(net, opt))
        with pytest.raises(RefusedError, match="differ"):
            prune_dead(net, report, data=x)
        assert_unchanged(before, snapshot(net, opt))


def test_held_out_check_accepts_units_dead_on_the_data_but_alive_on_random_inputs():
    """The reference pins the removed units, so a unit that would fire on random inputs is no false alarm."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.zeros(128, 4)
    x[:, 0] = torch.rand(128) + 1.0  # feature 0 always positive ...
    with torch.no_grad():
        net[0].weight[2] = torch.tensor([-1.0, 0.0, 0.0, 0.0])  # ... so unit 2 (-x0, no bias) never fires
        net[0].bias[2] = 0.0
    report = deadrelu.scan(net, x)
    assert 2 in report.sites[0].dead_units
    result = prune_dead(net, report, data=x)
    assert 2 in result.removed["1"]
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 4, generator=g) * x.std() + x.mean()
    assert (net[0](y)[:, 2] > 0).any()  # it fires on inputs like the held-out ones
    state = torch.random.get_rng_state()
    reinit_dead(net, report, data=x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # held-out inputs do not touch the global RNG


# -- tensors read outside their layer's call without a get_attr node ------------------------------
# fx proxies only attributes read through Module.__getattr__ that are parameters; a buffer, a weight
# reached through self.parameters() or a plain attribute sharing a weight's storage is a real tensor,
# computed with once at trace time and baked into the graph as a constant.


class _BufferRead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear whose output also adds ``bn.running_var.sum()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn, self.r, self.b = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.bias[[1, 3]] = -100.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.r(self.bn(self.a(x)))) + self.bn.running_var.sum()


class _ParametersRead(nn.Module):
    """An MLP whose output adds an L2 penalty computed from ``self.parameters()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.r, self.b = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)
        rm.plant(self.a.bias, [1, 3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.r(self.a(x))) + sum(p.pow(2).sum() for p in self.parameters())


class _AliasRead(nn.Module):
    """An MLP with a plain tensor attribute that shares the consumer's weight storage, read in forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.r, self.b = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)
        rm.plant(self.a.bias, [1, 3])
        self.w = self.b.weight.data  # a plain attribute, not a buffer: the same storage as b.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.r(self.a(x))) + (x[:, :3] @ self.w[:, 1:4].T)


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "prune_nodata"])
def test_batchnorm_buffer_read_in_forward_is_refused(op):
    check_refused(_BufferRead(), op, r"'bn\.running_var' is also read directly in forward \(eagerly, by sum\(\)", "r")


def test_before_the_fix_a_buffer_read_in_forward_changed_outputs():
    """Without data, the old code reset running_var's dead channels and the output moved by 0.04."""
    net, x = _BufferRead(), rm.data()
    report = deadrelu.scan(net, x)
    assert report.sites[0].dead_units == (1, 3)
    ref = net(x).detach()
    twin = _BufferRead()
    twin.load_state_dict(net.state_dict())
    twin.bn.running_var[[1, 3]] = 1.0  # what reinit_dead writes there
    assert (twin(x) - ref).abs().max() > 1e-2  # so accepting it would change the outputs


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "prune_nodata", "nudge"])
def test_weights_read_through_parameters_in_forward_are_refused(op):
    check_refused(_ParametersRead(), op, r"'a\.weight' is also read directly in forward \(eagerly, by pow\(\)", "r")


@pytest.mark.parametrize("op", ["reinit", "prune_nodata"])
def test_plain_attribute_sharing_a_weight_is_refused(op):
    check_refused(_AliasRead(), op, r"'b\.weight' is also read directly in forward", "r")


class _OffChainBuffer(nn.Module):
    """An MLP that adds a buffer of its own, computed with eagerly: no layer on a chain is read."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.r, self.b = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)
        rm.plant(self.a.bias, [1, 3])
        self.register_buffer("offset", torch.arange(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.r(self.a(x))) + self.offset * 2 + torch.ones(3)


def test_eager_reads_off_the_chain_and_constants_are_still_accepted():
    net, x = _OffChainBuffer(), rm.data()
    report = deadrelu.scan(net, x)
    ref = net(x).detach()
    small = prune_dead(net, report, data=x)
    assert small.removed == {"r": (1, 3)}
    assert torch.allclose(small.model(x), ref, atol=1e-5)
    result = reinit_dead(net, report, data=x, generator=torch.Generator().manual_seed(0))
    assert result.units == 2
    assert torch.allclose(net(x), ref, atol=1e-5)


# -- tracing leaves the user's model as it was ----------------------------------------------------


def _attributes(model: nn.Module) -> dict[str, set[str]]:
    return {path: set(vars(m)) for path, m in model.named_modules()}


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "prune_nodata", "nudge"])
def test_tracing_adds_no_attribute_to_the_model_when_refused(op):
    """fx stored a `_tensor_constant0` on the traced root; then copy.deepcopy(model) raised."""
    import copy

    net = _ParametersRead()
    before = _attributes(net)
    check_refused(net, op, "is also read directly in forward", "r")
    assert _attributes(net) == before
    copy.deepcopy(net)  # raised RuntimeError (a non-leaf constant) before the fix


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "prune", "prune_nodata", "nudge"])
def test_tracing_adds_no_attribute_to_the_model_when_accepted(op):
    import copy

    net, x = _OffChainBuffer(), rm.data()
    opt = trained_optimizer(net, x)
    report = deadrelu.scan(net, x)
    before = _attributes(net)
    OPERATIONS[op](net, report, opt, x)
    assert _attributes(net) == before
    assert not any(k.startswith("_tensor_constant") for m in net.modules() for k in vars(m))
    copy.deepcopy(net)


class _Inner(nn.Module):
    """User code with a tensor constant in forward; with ``relu`` it is rewritten, else only traced."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.fc, self.relu = nn.Linear(6, 6), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) + torch.ones(6)
        return torch.nn.functional.relu(y) if self.relu else y


def test_swap_adds_no_attribute_to_the_modules_it_traces():
    import copy

    x = rm.data()
    plain, rewritten, root = _Inner(relu=False), _Inner(relu=True), _Inner(relu=True)
    net = nn.Sequential(plain, nn.ReLU(), rewritten, nn.Linear(6, 3))
    ref = net(x).detach()
    before = {m: set(vars(m)) for m in (plain, rewritten, root)}
    result = swap_activations(net, to="leaky_relu", negative_slope=0.0)  # LeakyReLU(0) computes ReLU
    assert isinstance(net[2], torch.fx.GraphModule) and net[0] is plain
    with pytest.raises(RefusedError, match="in <root>"):
        swap_activations(root, to="elu")  # the root's own functional call cannot be rewritten in place
    for m, names in before.items():
        assert set(vars(m)) == names  # fx stored `_tensor_constant0` on each before the fix
        copy.deepcopy(m)
    assert torch.equal(result.model(x), ref)


def test_swap_refuses_a_report_that_is_not_a_report():
    net = rm.mlp()
    before = snapshot(net, None)
    for copy_ in (True, False):
        with pytest.raises(RefusedError, match="swap_activations: expected a deadrelu Report, got str; nothing was changed"):
            swap_activations(net, to="prelu", report="not a report", copy=copy_)  # type: ignore[arg-type]
    assert_unchanged(before, snapshot(net, None))
    assert isinstance(net[1], nn.ReLU)
