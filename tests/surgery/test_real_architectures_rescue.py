"""prune_dead, reinit_dead and nudge_bias on the shapes real models come in.

Each model has planted dead units (a zero row and a bias of -1: dead for every input). The truth
is brute force: the outputs of an independent deep copy of the original, and "nothing was
changed" is a byte-for-byte comparison of every state_dict tensor (and the optimizer's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import RefusedError
from fixtures.models import same_state


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def plant(layer: nn.Module, units: list[int]) -> None:
    """Make ``units`` of ``layer`` dead for every input: zero incoming weights, bias -1."""
    with torch.no_grad():
        layer.weight[units] = 0
        layer.bias[units] = -1.0


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    plant(net[0], [1, 3])
    plant(net[2], [0, 5])
    return net


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- torch.compile's OptimizedModule at the root ------------------------------------------------
# scan and swap_activations looked through the wrapper; the other rescues traced the wrapper itself
# and refused with torch.fx's "Module [OptimizedModule] is missing the required forward function".


def test_prune_of_a_compiled_model_prunes_the_module_inside_and_stays_compiled():
    net = mlp()
    x = torch.randn(64, 6)
    expected = copy.deepcopy(net)(x)
    compiled = torch.compile(net, backend="eager")
    before = state(net)
    result = deadrelu.prune_dead(compiled, deadrelu.scan(compiled, x), data=x)
    assert type(result.model) is type(compiled)
    assert result.removed == {"1": (1, 3), "3": (0, 5)}
    assert result.model._orig_mod[0].out_features == 14 and result.model._orig_mod[2].in_features == 14
    with torch.no_grad():
        assert torch.allclose(result.model(x), expected, atol=1e-6)
    assert same_state(state(net), before)


def test_reinit_and_nudge_of_a_compiled_model_edit_the_parameters_it_runs_with():
    net = mlp()
    x = torch.randn(64, 6)
    compiled = torch.compile(net, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    compiled(x).sum().backward()
    opt.step()
    opt.zero_grad()
    report = deadrelu.scan(compiled, x)
    with torch.no_grad():
        expected = copy.deepcopy(net)(x)
    result = deadrelu.reinit_dead(compiled, report, opt, data=x, generator=torch.Generator().manual_seed(0))
    assert {c.site for c in result.changes} == {"1", "3"}
    assert result.optimizer_entries > 0
    assert not torch.equal(net[0].weight[[1, 3]], torch.zeros(2, 6))  # re-drawn in the module compile runs
    with torch.no_grad():
        assert torch.equal(compiled(x), expected)
    nudges = deadrelu.nudge_bias(compiled, report, value=0.5, sites=["1"])
    assert [(n.parameter, n.units) for n in nudges] == [("0.bias", (1, 3))]
    assert torch.equal(net[0].bias[[1, 3]], torch.full((2,), 0.5))


# --- a weight handed to Python code in forward (T5's DenseReluDense) ----------------------------
# T5DenseActDense.forward asks isinstance(self.wo.weight, torch.Tensor) before casting to wo's dtype.
# While tracing, the weight is a proxy, so the test is False and the get_attr node has no user; that
# read was refused as "read directly in forward (by nothing) ... would change that computation too".


class IsinstanceBranch(nn.Module):
    """Reads ``out.weight`` as T5 does; ``sneaky`` adds ``out.weight.sum()`` only when it is a real tensor."""

    def __init__(self, sneaky: bool = False) -> None:
        super().__init__()
        self.fc, self.act, self.out, self.sneaky = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3), sneaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        if isinstance(self.out.weight, torch.Tensor) and h.dtype != self.out.weight.dtype:
            h = h.to(self.out.weight.dtype)
        y = self.out(h)
        if self.sneaky and isinstance(self.out.weight, torch.Tensor):
            y = y + self.out.weight.sum()
        return y


def t5_dense_relu_dense() -> nn.Module:
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    config = t5.T5Config(d_model=8, d_ff=16, dropout_rate=0.0, feed_forward_proj="relu")
    return t5.T5DenseActDense(config).eval()


@pytest.mark.parametrize("build", [IsinstanceBranch, t5_dense_relu_dense], ids=["isinstance", "t5"])
def test_weight_inspected_by_python_code_is_checked_on_data(build):
    torch.manual_seed(0)
    model = build()
    producer, consumer = (model.fc, model.out) if isinstance(model, IsinstanceBranch) else (model.wi, model.wo)
    with torch.no_grad():
        producer.weight[[1, 3]] = 0
        if producer.bias is not None:
            producer.bias[[1, 3]] = -1.0
    x = torch.randn(32, 5, 8) if producer.in_features == 8 else torch.randn(32, 6)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    report = deadrelu.scan(model, x)
    assert [s.dead_units for s in report.sites] == [(1, 3)]
    result = deadrelu.prune_dead(model, report, data=x)
    assert result.removed == {report.sites[0].name: (1, 3)}
    with torch.no_grad():
        assert torch.allclose(result.model(x), expected, atol=1e-6)
    deadrelu.reinit_dead(model, report, data=x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(producer.weight[[1, 3]], torch.zeros(2, producer.in_features))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert torch.equal(consumer.weight[:, [1, 3]], torch.zeros(consumer.out_features, 2))


@pytest.mark.parametrize("op", ["prune", "reinit"])
def test_weight_inspected_by_python_code_without_data_is_refused_saying_why(op):
    torch.manual_seed(0)
    model = IsinstanceBranch()
    plant(model.fc, [1, 3])
    report = deadrelu.scan(model, torch.randn(32, 6))
    before = state(model)
    with pytest.raises(RefusedError, match=r"'out.weight' is read in forward .* Python code torch.fx cannot follow.*pass data="):
        if op == "prune":
            deadrelu.prune_dead(model, report)
        else:
            deadrelu.reinit_dead(model, report)
    assert same_state(state(model), before)


@pytest.mark.parametrize("op", ["prune", "reinit"])
def test_a_branch_the_trace_skipped_is_caught_on_data(op):
    # The real model adds out.weight.sum(), which the rewrite changes; the trace never saw it.
    torch.manual_seed(0)
    model = IsinstanceBranch(sneaky=True)
    plant(model.fc, [1, 3])
    with torch.no_grad():
        model.out.weight[:, [1, 3]] = 1.0
    x = torch.randn(32, 6)
    report = deadrelu.scan(model, x)
    before = state(model)
    with pytest.raises(RefusedError, match="nothing was changed") as err:
        if op == "prune":
            deadrelu.prune_dead(model, report, data=x)
        else:
            deadrelu.reinit_dead(model, report, data=x)
    assert same_state(state(model), before)
    if op == "prune":  # the removed units are dead on x: the refusal blames what the trace missed, not the report
        assert "its traced graph does not show" in str(err.value) and "report" not in str(err.value)


# --- weights on the meta device ----------------------------------------------------------------
# prune_dead with data (or with a zero-weight GELU unit to fold) raised torch's raw "Tensor.item()
# cannot be called on meta tensors", nudge_bias a "write failed" refusal, and reinit_dead without
# data reported units re-initialised that have no values.


def _gelu_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    plant(net[0], [1, 3])
    with torch.no_grad():
        net[0].bias[[1, 3]] = -10.0  # GELU(-10) is 0 to float precision: dead
    return net


@pytest.mark.parametrize(
    "op",
    [
        lambda m, r, x: deadrelu.prune_dead(m, r, data=x),
        lambda m, r, x: deadrelu.prune_dead(m, r),
        lambda m, r, x: deadrelu.reinit_dead(m, r),
        lambda m, r, x: deadrelu.reinit_dead(m, r, data=x),
        lambda m, r, x: deadrelu.nudge_bias(m, r),
    ],
    ids=["prune-data", "prune", "reinit", "reinit-data", "nudge"],
)
@pytest.mark.parametrize("build", [mlp, _gelu_net], ids=["relu", "gelu"])
@pytest.mark.parametrize("where", ["all", "one layer"])
def test_meta_weights_are_one_clear_error_before_any_work(op, build, where):
    net = build()
    x = torch.randn(32, 6)
    report = deadrelu.scan(net, x)
    assert report.sites[0].dead_units == (1, 3)
    if where == "all":
        net.to("meta")
    else:
        net[2].to("meta")
    with pytest.raises(deadrelu.DeadReluError, match=r"on the meta device .*materialise it first.*nothing was changed"):
        op(net, report, x)


# --- transformers' Conv1D (GPT-2), a transposed Linear fx traces into ------------------------------
# The refusal named only the last op fx saw, ".view()", not the layer that made the units.


def test_gpt2_conv1d_producer_is_refused_naming_the_layer_and_nothing_changes():
    gpt2 = pytest.importorskip("transformers.models.gpt2.modeling_gpt2")
    torch.manual_seed(0)
    config = gpt2.GPT2Config(n_embd=8, n_layer=1, n_head=2, activation_function="relu", resid_pdrop=0.0)
    mlp_block = gpt2.GPT2MLP(32, config).eval()
    with torch.no_grad():
        mlp_block.c_fc.weight[:, [1, 3]] = 0  # Conv1D's weight is (in, out)
        mlp_block.c_fc.bias[[1, 3]] = -1.0
    x = torch.randn(4, 5, 8)
    report = deadrelu.scan(mlp_block, x)
    assert report.sites[0].dead_units == (1, 3)
    opt = torch.optim.Adam(mlp_block.parameters())
    mlp_block(x).sum().backward()
    opt.step()
    before, before_opt = state(mlp_block), copy.deepcopy(opt.state_dict())
    for op in (
        lambda: deadrelu.prune_dead(mlp_block, report, data=x),
        lambda: deadrelu.reinit_dead(mlp_block, report, opt, data=x),
        lambda: deadrelu.nudge_bias(mlp_block, report, optimizer=opt),
    ):
        with pytest.raises(RefusedError, match=r"in module 'c_fc' \(Conv1D\), not from an nn.Linear"):
            op()
        assert same_state(state(mlp_block), before) and same_state(opt.state_dict(), before_opt)


# --- nn.DataParallel ------------------------------------------------------------------------------
# The refusal quoted torch.fx's "Proxy object cannot be iterated" and said nothing of the wrapper.


def test_data_parallel_is_refused_saying_to_rescue_its_module():
    net = mlp()
    wrapped = nn.DataParallel(net)
    x = torch.randn(32, 6)
    report = deadrelu.scan(wrapped, x)
    before = state(wrapped)
    for op in (deadrelu.prune_dead, deadrelu.reinit_dead, deadrelu.nudge_bias):
        with pytest.raises(RefusedError, match=r"DataParallel only runs copies of its .module: scan model.module"):
            op(wrapped, report)
        assert same_state(state(wrapped), before)
    inner = deadrelu.prune_dead(net, deadrelu.scan(net, x), data=x)  # what the message says to do
    assert inner.removed == {"1": (1, 3), "3": (0, 5)}


# --- channels_last CNNs -----------------------------------------------------------------------------
# The pruned convolutions came back contiguous (NCHW): the same outputs, but not the layout chosen for speed.


@pytest.mark.parametrize("rank", [2, 3])
def test_pruned_convolutions_keep_channels_last(rank):
    torch.manual_seed(0)
    conv, fmt = (nn.Conv2d, torch.channels_last) if rank == 2 else (nn.Conv3d, torch.channels_last_3d)
    net = nn.Sequential(conv(3, 8, 3), nn.ReLU(), conv(8, 4, 3)).to(memory_format=fmt)
    plant(net[0], [1, 5])
    x = torch.randn(4, 3, *[6] * rank).to(memory_format=fmt)
    with torch.no_grad():
        expected = copy.deepcopy(net)(x)
    result = deadrelu.prune_dead(net, deadrelu.scan(net, x), data=x)
    assert result.removed == {"1": (1, 5)}
    for layer in (result.model[0], result.model[2]):
        assert layer.weight.is_contiguous(memory_format=fmt)
    with torch.no_grad():
        assert torch.allclose(result.model(x), expected, atol=1e-5)


# --- transformers' Llama: the gated MLP block is rescued, the whole model stays refused -------------
# LlamaMLP's down(act(gate(x)) * up(x)) was refused ("mul() ... not a supported consumer"); the whole
# LlamaModel cannot be traced by plain torch.fx and stays refused, its MLP block rescued on its own.


def test_llama_model_is_refused_whole_and_its_gated_mlp_block_is_rescued():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    config = llama.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        hidden_act="relu", vocab_size=50,
    )  # fmt: skip
    model = llama.LlamaModel(config).eval()
    block = model.layers[0].mlp
    with torch.no_grad():
        block.gate_proj.weight[[1, 4]] = 0  # bias-free: relu(0) never fires
    ids = torch.randint(0, 50, (4, 6))
    report = deadrelu.scan(model, ids)
    assert [(s.name, s.dead_units) for s in report.sites] == [("layers.0.mlp.act_fn", (1, 4))]
    opt = torch.optim.Adam(model.parameters())
    before, before_opt = state(model), copy.deepcopy(opt.state_dict())
    for op in (lambda: deadrelu.prune_dead(model, report, data=ids), lambda: deadrelu.reinit_dead(model, report, opt)):
        with pytest.raises(RefusedError, match=r"cannot trace LlamaModel with torch.fx.*nothing was changed"):
            op()
        assert same_state(state(model), before) and same_state(opt.state_dict(), before_opt)
    hidden = torch.randn(4, 6, 32)
    block_report = deadrelu.scan(block, hidden)
    assert block_report.sites[0].dead_units == (1, 4)
    result = deadrelu.prune_dead(block, block_report, data=hidden)
    assert result.model.gate_proj.out_features == result.model.up_proj.out_features == 62
    assert result.model.down_proj.in_features == 62
    with torch.no_grad():
        assert torch.allclose(result.model(hidden), block(hidden), atol=1e-6)
        expected = copy.deepcopy(block)(hidden)
    deadrelu.reinit_dead(block, block_report, data=hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(block(hidden), expected)
    assert torch.equal(block.down_proj.weight[:, [1, 4]], torch.zeros(32, 2))
