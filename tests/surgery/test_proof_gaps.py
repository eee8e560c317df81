"""Two gaps in the structural proof that rescue functions used to accept without ``data=``.

1. A pooling op pools across the units when the tensor's rank makes torch read it as unbatched:
   MaxPool1d on a (B, C) Linear output, MaxPool2d on a (B, C, L) Conv1d output (dim 0 is then
   taken as channels and the pool slides over dim 1, the units). Likewise a Conv2d reading a
   (B, C, L) tensor takes C as its height, not its channels.
2. Forward (pre-)hooks that torch.fx never sees: the root's (``symbolic_trace`` runs ``forward``,
   not ``__call__``), a traced-through block's or an off-chain leaf's, and global module hooks.

Each refusal names the reason, ends with "nothing was changed", and leaves the state_dict bit for
bit (and the hook dicts) as they were; the legitimate neighbours of each case still work.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu import RefusedError, nudge_bias, prune_dead, reinit_dead

DEAD = [1, 4]


def _plant(model: nn.Module) -> nn.Module:
    """Kill units 1 and 4 of the first Linear/Conv (bias -1e3) and put the model in eval mode."""
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))
    with torch.no_grad():
        first.bias[DEAD] = -1e3
    return model.eval()


def _state(model: nn.Module) -> dict:
    """The state_dict as bit patterns, plus every module's forward hook dicts."""
    bits = {k: (v.dtype, tuple(v.shape), v.detach().contiguous().view(-1).view(torch.uint8).clone())
            for k, v in model.state_dict().items()}  # fmt: skip
    hooks = {n: (list(m._forward_hooks.items()), list(m._forward_pre_hooks.items())) for n, m in model.named_modules()}
    return {"bits": bits, "hooks": hooks}


def _assert_same(before: dict, after: dict) -> None:
    assert before["bits"].keys() == after["bits"].keys()
    for k, (dtype, shape, raw) in before["bits"].items():
        assert after["bits"][k][:2] == (dtype, shape) and torch.equal(after["bits"][k][2], raw), k
    assert before["hooks"] == after["hooks"]


OPS = {
    "prune": lambda net, report: prune_dead(net, report),
    "reinit": lambda net, report: reinit_dead(net, report),
    "nudge": lambda net, report: nudge_bias(net, report),
}


def _refused(net: nn.Module, x: torch.Tensor, op: str, match: str) -> str:
    report = deadrelu.scan(net, x)
    before = _state(net)
    with pytest.raises(RefusedError, match=match) as info:
        OPS[op](net, report)
    message = str(info.value)
    assert "\n" not in message and message.endswith("; nothing was changed")
    _assert_same(before, _state(net))
    return message


# -- 1. pooling across the unit axis ----------------------------------------------------------------


class ConvPool(nn.Module):
    """Conv1d -> relu -> a pool or conv chosen by the test -> ... on a (B, C, L) tensor."""

    def __init__(self, middle, tail: nn.Module | None = None):
        super().__init__()
        self.c = nn.Conv1d(3, 8, 3, padding=1)
        self.middle = middle
        self.tail = tail if tail is not None else nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.tail(self.middle(F.relu(self.c(x))))


class Functional(nn.Module):
    """Linear -> relu -> a functional op -> Linear on a (B, C) tensor."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.fn(F.relu(self.a(x))))


def _linear_pool(pool: nn.Module, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), pool, nn.Linear(width, 3))


UNBATCHED = r"pools over the last {} dim\(s\) of the {}-D tensor \(torch reads it as unbatched, dim 0 as channels\), across the units on dim 1"
POOL_CASES = {
    "MaxPool1d on (B, C)": (lambda: _linear_pool(nn.MaxPool1d(3, stride=1, padding=1)), (64, 6), "module '2' " + UNBATCHED.format(1, 2)),
    "AvgPool1d on (B, C)": (lambda: _linear_pool(nn.AvgPool1d(3, stride=1, padding=1)), (64, 6), "module '2' " + UNBATCHED.format(1, 2)),
    "AdaptiveMaxPool1d on (B, C)": (lambda: _linear_pool(nn.AdaptiveMaxPool1d(8), 8), (64, 6), "module '2' " + UNBATCHED.format(1, 2)),
    "F.max_pool1d on (B, C)": (lambda: Functional(lambda t: F.max_pool1d(t, 3, 1, 1)), (64, 6), r"max_pool1d\(\) " + UNBATCHED.format(1, 2)),
    "F.adaptive_avg_pool1d on (B, C)": (lambda: Functional(lambda t: F.adaptive_avg_pool1d(t, 16)), (64, 6), UNBATCHED.format(1, 2)),
    "MaxPool2d on (B, C, L)": (lambda: ConvPool(nn.MaxPool2d(3, stride=1, padding=1)), (32, 3, 10), "module 'middle' " + UNBATCHED.format(2, 3)),
    "AdaptiveAvgPool2d on (B, C, L)": (lambda: ConvPool(nn.AdaptiveAvgPool2d((8, 10))), (32, 3, 10), "module 'middle' " + UNBATCHED.format(2, 3)),
    "MaxPool1d on (B, T, C)": (
        lambda: _linear_pool(nn.MaxPool1d(3, stride=1, padding=1)), (8, 5, 6),
        r"module '2' pools over the last 1 dim\(s\) of the 3-D tensor, across the units on dim 2",
    ),
    "Conv2d consumer on (B, C, L)": (
        lambda: ConvPool(nn.Identity(), nn.Conv2d(8, 2, 3, padding=1)), (8, 3, 10),
        r"'tail' reads the 3-D tensor as unbatched, its channels on dim 0, not the units",
    ),
}  # fmt: skip


@pytest.mark.parametrize("op", ["prune", "reinit"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pooling_across_the_units_is_refused(case, op):
    make, shape, match = POOL_CASES[case]
    net = _plant(make())
    message = _refused(net, torch.randn(*shape), op, match)
    assert message.startswith(("prune_dead: site '", "reinit_dead: site '"))


def test_before_the_fix_pooling_across_units_changed_the_output():
    """What the refusal prevents: zeroing a dead unit's consumer column is not exact after the pool."""
    net, x = _plant(_linear_pool(nn.MaxPool1d(3, stride=1, padding=1))), torch.randn(64, 6)
    with torch.no_grad():
        before = net(x)
        net[3].weight[:, DEAD] = 0  # what reinit_dead does on the consumer side
        net[0].weight[DEAD] = torch.randn(2, 6)
        net[0].bias[DEAD] = 0
        assert (net(x) - before).abs().max() > 1e-2


def test_nudge_bias_ignores_the_consumer_side_pool():
    """nudge_bias proves the producer side only (a bias change is meant to change the output)."""
    net, x = _plant(_linear_pool(nn.MaxPool1d(3, stride=1, padding=1))), torch.randn(64, 6)
    (nudge,) = nudge_bias(net, deadrelu.scan(net, x))
    assert nudge.units == tuple(DEAD)


class ConvNet2d(nn.Module):
    def __init__(self, pool, flatten: bool):
        super().__init__()
        self.c, self.pool, self.flatten = nn.Conv2d(3, 8, 3, padding=1), pool, flatten
        self.tail = nn.Linear(8 * 4 * 4, 2) if flatten else nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.pool(torch.relu(self.c(x)))
        return self.tail(y.flatten(1) if self.flatten else y)


LEGIT = {
    "MaxPool2d on (B, C, H, W)": (lambda: ConvNet2d(nn.MaxPool2d(3, stride=1, padding=1), False), (16, 3, 8, 8)),
    "F.max_pool2d then flatten": (lambda: ConvNet2d(lambda t: F.max_pool2d(t, 2), True), (16, 3, 8, 8)),
    "AdaptiveAvgPool2d then flatten": (lambda: ConvNet2d(nn.AdaptiveAvgPool2d(4), True), (16, 3, 8, 8)),
    "MaxPool1d on (B, C, L)": (lambda: ConvPool(nn.MaxPool1d(3, stride=1, padding=1)), (32, 3, 10)),
    "Dropout1d on (B, C)": (lambda: _linear_pool(nn.Dropout1d(0.5)), (64, 6)),
    "Dropout2d on (B, C, L)": (lambda: ConvPool(nn.Dropout2d(0.5)), (32, 3, 10)),
    "Linear, ReLU, Linear": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (64, 6)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LEGIT))
def test_pooling_per_channel_and_plain_chains_still_work(case):
    make, shape = LEGIT[case]
    x = torch.randn(*shape)
    net = _plant(make())
    report = deadrelu.scan(net, x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dropout1d's unbatched-input note
        want = net(x)
        small = prune_dead(net, report).model
        assert sorted(prune_dead(net, report).removed[report.sites[0].name]) == DEAD
        assert (small(x) - want).abs().max() < 1e-5
        assert reinit_dead(net, report).units == len(DEAD)
        assert (net(x) - want).abs().max() < 1e-5
        assert nudge_bias(net, report)[0].units == tuple(DEAD)


# -- 2. hooks torch.fx does not see -------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = Block(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(x))


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return _plant(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))


def _penalty(mod, args, out):
    """A weight penalty added to the output: it reads the first layer's weights."""
    return out + 1e-2 * mod[0].weight.abs().sum()


ROOT = r"the model's root \(Sequential\) has 1 forward \(pre-\)hook\(s\) that are not deadrelu's \(e\.g\. {}\); torch\.fx does not trace them"


@pytest.mark.parametrize("op", list(OPS))
def test_root_forward_hook_is_refused(op):
    net = _mlp()
    net.register_forward_hook(_penalty)
    _refused(net, torch.randn(64, 6), op, "^" + {"prune": "prune_dead", "reinit": "reinit_dead", "nudge": "nudge_bias"}[op] + ": " + ROOT.format("_penalty"))


@pytest.mark.parametrize("op", list(OPS))
def test_root_forward_pre_hook_is_refused(op):
    net = _mlp()
    net.register_forward_pre_hook(lambda mod, args: (args[0] + mod[0].weight.sum(),))
    _refused(net, torch.randn(64, 6), op, ROOT.format(r"test_root_forward_pre_hook_is_refused\.<locals>\.<lambda>"))


@pytest.mark.parametrize("op", ["prune", "reinit"])
def test_root_hook_is_refused_with_data_too(op):
    """The structural refusal comes first and says why, rather than a bare output mismatch."""
    net, x = _mlp(), torch.randn(64, 6)
    net.register_forward_hook(_penalty)
    report = deadrelu.scan(net, x)
    before = _state(net)
    call = prune_dead if op == "prune" else reinit_dead
    with pytest.raises(RefusedError, match=ROOT.format("_penalty")):
        call(net, report, data=x)
    _assert_same(before, _state(net))


@pytest.mark.parametrize("op", list(OPS))
def test_hook_on_a_traced_through_block_is_in_the_proof(op):
    """fx runs a non-leaf submodule's __call__, hooks included, so what they read is in the graph."""
    torch.manual_seed(0)
    net = _plant(Nested())
    net.block.register_forward_hook(lambda mod, args, out: out * mod.fc1.weight.norm())
    _refused(net, torch.randn(64, 6), op, r"site 'block:relu': 'block\.fc1\.weight' is also read directly in forward")


def test_harmless_hook_on_a_traced_through_block_is_not_refused():
    torch.manual_seed(0)
    net, x = _plant(Nested()), torch.randn(64, 6)
    net.block.register_forward_hook(lambda mod, args, out: out * 2)
    report = deadrelu.scan(net, x)
    with torch.no_grad():
        want = net(x)
        assert (prune_dead(net, report).model(x) - want).abs().max() < 1e-5
        assert reinit_dead(net, report).units == len(DEAD)
        assert (net(x) - want).abs().max() < 1e-5


@pytest.mark.parametrize("op", list(OPS))
def test_hook_on_an_off_chain_leaf_is_refused(op):
    """A leaf's hook runs only at call time; through a closure it may read any layer."""
    net = _plant(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3), nn.Tanh()))
    net[3].register_forward_hook(lambda mod, args, out: out + net[0].weight.sum())
    _refused(net, torch.randn(64, 6), op, r"module '3' \(Tanh\) has 1 forward \(pre-\)hook\(s\)")


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("op", list(OPS))
def test_global_module_hook_is_refused_without_data(op, pre):
    net, x = _mlp(), torch.randn(64, 6)
    report = deadrelu.scan(net, x)
    before = _state(net)
    if pre:
        handle = nn.modules.module.register_module_forward_pre_hook(lambda mod, args: None)
    else:
        handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        with pytest.raises(RefusedError, match=r"1 global module forward \(pre-\)hook\(s\) .* pass data= to check"):
            OPS[op](net, report)
    finally:
        handle.remove()
    _assert_same(before, _state(net))


def test_deadrelu_monitor_and_probe_are_not_refused(tmp_path):
    net, x = _mlp(), torch.randn(64, 6)
    report = deadrelu.scan(net, x)
    with torch.no_grad():
        want = net(x)
    with deadrelu.Monitor(net, sinks=[str(tmp_path / "log.jsonl")], window=2):
        assert sorted(prune_dead(net, report).removed["1"]) == DEAD
        assert reinit_dead(net, report).units == len(DEAD)
    with deadrelu.Probe(net):
        assert nudge_bias(net, report, value=-1e3)[0].units == tuple(DEAD)  # keeps them dead
    with torch.no_grad():
        assert (net(x) - want).abs().max() < 1e-5


def test_torch_weight_norm_on_an_off_chain_layer_is_not_refused():
    """torch.nn.utils' hook-based weight_norm recomputes only its own layer's weight."""
    torch.manual_seed(0)
    net = _plant(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-based weight_norm is deprecated
        nn.utils.weight_norm(net[4])
    x = torch.randn(64, 6)
    report = deadrelu.scan(net, x)
    with torch.no_grad():
        want = net(x)
        assert reinit_dead(net, report).units == len(DEAD)
        assert (net(x) - want).abs().max() < 1e-5
