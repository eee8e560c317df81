"""Edge cases of the surgery functions' arguments, each one DeadReluError with its exact message and nothing changed:

* an int too large for a float as ``swap_activations(negative_slope=)`` or ``nudge_bias(value=)`` (a bare
  OverflowError, or past 4300 digits a ValueError from printing it, before);
* an optimizer that holds none of the parameters to change — one made before a ``copy.deepcopy`` —
  is refused by ``reinit_dead`` and ``nudge_bias`` (it was accepted: nothing reset, stale momentum kept);
  one that holds only some of them (a frozen part left out) still works.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import nudge_bias, reinit_dead, swap_activations
from deadrelu.errors import DeadReluError, RefusedError
from fixtures import rescue_models as rm
from fixtures.unchanged import assert_unchanged, snapshot, trained_optimizer

HUGE = 10**400


# -- an int too large for a float ----------------------------------------------------------------------
@pytest.mark.parametrize("slope", [pytest.param(HUGE, id="10**400"), pytest.param(-(10**5000), id="-10**5000")])
def test_a_huge_int_negative_slope_is_one_error(slope):
    net = rm.mlp()
    before = snapshot(net, None)
    with pytest.raises(DeadReluError) as caught:
        swap_activations(net, negative_slope=slope)
    assert str(caught.value) == "swap_activations: negative_slope must be a finite number, got an int too large for a float"
    assert_unchanged(before, snapshot(net, None))


def test_a_non_finite_or_non_number_negative_slope_keeps_its_message():
    with pytest.raises(DeadReluError, match=r"^swap_activations: negative_slope must be a finite number, got nan$"):
        swap_activations(rm.mlp(), negative_slope=float("nan"))
    with pytest.raises(DeadReluError, match=r"^swap_activations: negative_slope must be a finite number, got '0.1'$"):
        swap_activations(rm.mlp(), negative_slope="0.1")


@pytest.mark.parametrize("value", [pytest.param(HUGE, id="10**400"), pytest.param(10**5000, id="10**5000")])
def test_a_huge_int_bias_value_is_one_error(value):
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x, progress=False)
    before = snapshot(net, None)
    with pytest.raises(DeadReluError) as caught:
        nudge_bias(net, report, value=value)
    assert str(caught.value) == "nudge_bias: value must be a finite number, got an int too large for a float"
    assert_unchanged(before, snapshot(net, None))


# -- an optimizer that holds none of the parameters to change --------------------------------------------
def _copied_after_training():
    """A planted MLP, its Adam (with state) and a deep copy of the model: the optimizer holds the original's."""
    net, x = rm.mlp(), rm.data()
    opt = trained_optimizer(net, x)
    model = copy.deepcopy(net)
    return model, opt, deadrelu.scan(model, x, progress=False), x


FOREIGN = ("the optimizer holds none of the model's parameters (was it made for another model, or before a "
           "copy.deepcopy?), so none of its state would be reset; pass the optimizer that trains this model, or "
           "optimizer=None")


@pytest.mark.parametrize("op", ["reinit", "reinit_data", "nudge"])
def test_an_optimizer_of_another_copy_of_the_model_is_refused(op):
    model, opt, report, x = _copied_after_training()
    calls = {
        "reinit": lambda: reinit_dead(model, report, opt),
        "reinit_data": lambda: reinit_dead(model, report, opt, data=x),
        "nudge": lambda: nudge_bias(model, report, optimizer=opt),
    }
    what = "nudge_bias" if op == "nudge" else "reinit_dead"
    before = snapshot(model, opt)
    with pytest.raises(DeadReluError) as caught:
        calls[op]()
    assert not isinstance(caught.value, RefusedError)
    assert str(caught.value) == f"{what}: {FOREIGN}"
    assert_unchanged(before, snapshot(model, opt))


def test_an_optimizer_of_other_parameters_of_the_model_is_refused_naming_them():
    """The optimizer trains the model's last layer only, the dead units' layers (trainable) are not in it."""
    net, x = rm.mlp(dead={0: [1, 3]}), rm.data()
    opt = torch.optim.SGD(net[4].parameters(), lr=0.1, momentum=0.9)
    report = deadrelu.scan(net, x, progress=False)
    before = snapshot(net, opt)
    with pytest.raises(DeadReluError) as caught:
        reinit_dead(net, report, opt)
    assert str(caught.value) == (
        "reinit_dead: the optimizer holds none of the parameters to change (0.weight, 0.bias, 2.weight), so their "
        "optimizer state (momentum, Adam moments) would be left stale; pass the optimizer that trains them, or "
        "optimizer=None; nothing was changed"
    )
    with pytest.raises(DeadReluError, match=r"^nudge_bias: the optimizer holds none of the parameters to change \(0\.bias\)"):
        nudge_bias(net, report, optimizer=opt)
    assert_unchanged(before, snapshot(net, opt))


def test_an_optimizer_holding_some_of_the_parameters_to_change_still_works():
    """A frozen first layer left out of the optimizer: the consumer's state is still reset."""
    net, x = rm.mlp(dead={0: [1, 3]}), rm.data()
    net[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    net(x).square().mean().backward()
    opt.step()
    report = deadrelu.scan(net, x, progress=False)
    result = reinit_dead(net, report, opt)
    assert result.units == 2 and result.optimizer_entries == 1  # 2.weight's momentum columns
    assert (opt.state[net[2].weight]["momentum_buffer"][:, [1, 3]] == 0).all()


def test_an_optimizer_of_the_model_whose_parameters_to_change_are_frozen_still_works():
    """Dead units inside a frozen (requires_grad=False) part: no optimizer holds state for it, none is asked to."""
    net, x = rm.mlp(dead={0: [1, 3]}), rm.data()
    net[0].requires_grad_(False)
    net[2].requires_grad_(False)
    opt = torch.optim.SGD(net[4].parameters(), lr=0.1, momentum=0.9)
    report = deadrelu.scan(net, x, progress=False)
    assert reinit_dead(net, report, opt).units == 2
    assert len(nudge_bias(net, report, optimizer=opt)) == 1
