"""Edge cases of arguments and states at the core (and the lab functions built on it), each with its exact message:

* ``advise(min_fraction=)`` is a number in [0, 1], and advice that leaves actions out says so (it said
  "Nothing to do: no dead or non-finite units" while units were dead);
* an int too large for a float as ``threshold`` (scan, Probe, Monitor, a mapping's value, a callable's answer)
  is one DeadReluError, not a bare OverflowError;
* ``Report.diff`` (and ``advise(baseline=)``) never counts a non-finite unit as died or revived;
* the lab's experiments refuse a learning rate that is not positive before any training;
* the rescue table's "train s" and "unit resets" medians leave diverged seeds out, as its title says.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import advise
from deadrelu.errors import DeadReluError, ForwardError
from fixtures import rescue_models as rm

HUGE = 10**400  # an int no float holds: float(HUGE) raises OverflowError


def _five_of_sixteen_dead() -> deadrelu.Report:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    rm.plant(net[0].bias, [0, 1, 2, 3, 4])
    return deadrelu.scan(net, torch.randn(200, 8), progress=False)


# -- advise(min_fraction=) ---------------------------------------------------------------------------------
def test_advice_that_leaves_every_action_out_says_so_and_not_that_nothing_is_dead():
    report = _five_of_sixteen_dead()
    assert report.dead == 5
    advice = advise(report, min_fraction=0.5)
    text = str(advice)
    assert advice.actions == () and advice.left_out == 2 and advice.min_fraction == 0.5
    assert "Nothing to do" not in text and "no dead or non-finite units" not in text
    assert "  No action scores above min_fraction=0.5; 2 action(s) left out (pass a lower min_fraction to see them)." in text
    # some shown, some left out: the count of those left out follows the list
    some = advise(report, min_fraction=0.2)
    assert len(some.actions) == 1 and some.left_out == 1
    assert "  (1 more action(s) score at most min_fraction=0.2)" in str(some)
    # the default leaves nothing out, and the text is as before
    assert advise(report).left_out == 0 and "more action(s)" not in str(advise(report))


@pytest.mark.parametrize("value", [math.nan, 2.0, -1.0, 1.0000001, pytest.param(HUGE, id="10**400"), True, "0.5", None,
                                   math.inf])
def test_min_fraction_outside_zero_to_one_is_refused(value):
    report = _five_of_sixteen_dead()
    with pytest.raises(DeadReluError, match=r"^advise: min_fraction must be a number in \[0, 1\] \(a share of the units\), got "):
        advise(report, min_fraction=value)


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, 0.25])
def test_min_fraction_at_the_ends_of_the_range_is_accepted(value):
    assert advise(_five_of_sixteen_dead(), min_fraction=value).min_fraction == float(value)


def test_advice_without_actions_for_dead_units_the_baseline_cannot_compare_says_why():
    """Dead GELU units (not prunable) at a site the baseline lacks: no action follows, yet units are dead."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias.fill_(5.0)  # every unplanted unit fires, so the dead set is exactly the planted one
        net[2].bias.fill_(5.0)
    rm.plant(net[2].bias, [0, 1])
    x = rm.data()
    report = deadrelu.scan(net, x, progress=False)
    baseline = deadrelu.scan(net[:2], x, progress=False)  # its only site is the ReLU one
    assert [s.name for s in report.sites] == ["1", "3"] and report.dead == 2
    advice = advise(report, baseline=baseline)
    assert advice.actions == () and advice.left_out == 0
    text = str(advice)
    assert "Nothing to do" not in text
    assert ("  No action: none of the dead units could be compared with the baseline "
            "(unobserved or non-finite there, or at a site it lacks).") in text
    assert "Note: sites not in both reports were not compared: 3" in text


# -- threshold: an int too large for a float --------------------------------------------------------------
def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU())


@pytest.mark.parametrize("spec, name", [
    pytest.param(HUGE, "threshold", id="10**400"),
    pytest.param(-HUGE, "threshold", id="-10**400"),
    pytest.param({"relu": HUGE}, "threshold['relu']", id="mapping"),
    pytest.param(10**5000, "threshold", id="10**5000"),  # past 4300 digits even its repr raises
])
def test_a_huge_int_threshold_is_one_error_naming_the_option(spec, name):
    x = torch.randn(32, 4)
    expected = f"{name} must be a number a float can hold, got an int too large for a float"
    for make in (lambda: deadrelu.scan(_net(), x, threshold=spec, progress=False),
                 lambda: deadrelu.Probe(_net(), threshold=spec),
                 lambda: deadrelu.Monitor(_net(), threshold=spec)):
        with pytest.raises(DeadReluError) as caught:
            make()
        assert str(caught.value) == expected


def test_a_threshold_callable_answering_a_huge_int_is_named():
    with pytest.raises(DeadReluError) as caught:
        deadrelu.scan(_net(), torch.randn(8, 4), threshold=lambda info: HUGE, progress=False)
    assert not isinstance(caught.value, ForwardError)
    assert str(caught.value).startswith("threshold gave an int too large for a float for activation site 1 (relu")
    assert str(caught.value).endswith(": it must be a number a float can hold, or None")


# -- Report.diff: non-finite units are neither dead nor alive ----------------------------------------------
def _dead_then_nan() -> tuple[deadrelu.Report, deadrelu.Report]:
    """Unit 0 dead in the first report and NaN (non-finite) in the second; unit 1 dead in both."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(64, 4)
    rm.plant(net[0].bias, [0, 1])
    before = deadrelu.scan(net, x, progress=False)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    return before, deadrelu.scan(net, x, progress=False)


def test_a_dead_unit_gone_non_finite_is_not_revived_nor_a_non_finite_one_gone_dead_died():
    before, after = _dead_then_nan()
    assert before.sites[0].dead_units == (0, 1) and after.sites[0].nonfinite_units == (0,)
    forward, backward = before.diff(after).sites[0], after.diff(before).sites[0]
    assert forward.revived == () and forward.died == () and forward.stayed_dead == (1,)
    assert backward.died == () and backward.revived == () and backward.stayed_dead == (1,)
    assert forward.nonfinite == backward.nonfinite == (0,)
    assert str(before.diff(after)) == "0 unit(s) died, 0 revived"
    advice = advise(after, baseline=before)
    assert (advice.born_dead, advice.died, advice.revived) == (1, 0, 0)
    assert "vs baseline: 1 born dead, 0 died in training, 0 revived" in str(advice)
    assert advise(before, baseline=after).died == 0


# -- lab: lr ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["activations", "init", "preprocessing", "rescue"])
@pytest.mark.parametrize("lr, message", [
    (-1.0, "lr must be a positive finite number, got -1.0"),
    (0, "lr must be a positive finite number, got 0"),
    (math.nan, "lr must be a positive finite number, got nan"),
    (math.inf, "lr must be a positive finite number, got inf"),
    ("0.1", "lr must be a positive number, got '0.1'"),
    (True, "lr must be a positive number, got True"),
    pytest.param(HUGE, "lr must be a positive number a float can hold, got an int too large for a float", id="10**400"),
])
def test_run_experiment_refuses_a_bad_lr_before_any_training(name, lr, message, monkeypatch):
    from deadrelu.lab import experiments

    def no_data(*args, **kwargs):
        raise AssertionError("the data set was loaded: lr was checked too late")

    monkeypatch.setattr(experiments, "load_dataset", no_data)
    with pytest.raises(DeadReluError) as caught:
        experiments.run_experiment(name, epochs=1, lr=lr, progress=False)
    assert str(caught.value) == message


# -- lab: the rescue table leaves diverged seeds out of its cost medians ------------------------------------
@pytest.fixture(scope="module")
def one_run():
    from deadrelu.lab.datasets import load_dataset
    from deadrelu.lab.demo import DemoSetting, rescue_story

    setting = DemoSetting(checkpoint_epoch=1, epochs=1, hidden=(16, 16), strategies=("control", "reinit"))
    return rescue_story(load_dataset("digits"), seed=0, setting=setting, progress=False)


def _story(one_run, diverged: list[bool]):
    """Three seeds made from one run: a diverged seed has 1000 unit resets and 50 s, the others 10 and 1 s."""
    from deadrelu.lab.verdicts import aggregate

    runs = []
    for d in diverged:
        run = copy.deepcopy(one_run)
        run["checkpoint"]["diverged"] = d
        run["baseline"]["train_seconds"] = 50.0 if d else 1.0
        for name, strategy in run["strategies"].items():
            strategy["diverged"] = d
            strategy["cost"].update(train_seconds=50.0 if d else 1.0, surgery_seconds=0.0)
            if name == "reinit":
                strategy["cost"]["units_reinitialised"] = 1000 if d else 10
        runs.append(run)
    return {**aggregate(runs), "runs": runs}


def _rows(story) -> dict[str, dict[str, str]]:
    from deadrelu.lab.tables import rescue_table

    header, *rows = rescue_table(story)
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_rescue_table_cost_medians_leave_diverged_seeds_out(one_run):
    rows = _rows(_story(one_run, [False, True, True]))
    reinit, control, checkpoint = rows["re-initialise dead units"], rows["no rescue (control)"], rows["checkpoint (epoch 1)"]
    assert reinit["diverged"] == "2/3"
    assert reinit["extra"] == "10 unit resets (median)"  # not 1000, the median over all three seeds
    assert reinit["train s"] == control["train s"] == checkpoint["train s"] == "1.0"  # not 50.0


def test_rescue_table_shows_no_cost_number_when_every_seed_diverged(one_run):
    rows = _rows(_story(one_run, [True, True, True]))
    reinit, checkpoint = rows["re-initialise dead units"], rows["checkpoint (epoch 1)"]
    assert reinit["train s"] == checkpoint["train s"] == "diverged"
    assert reinit["extra"] == "unit resets: diverged"
    # and no seed diverged: every seed counts, as before
    rows = _rows(_story(one_run, [False, False, False]))
    assert rows["re-initialise dead units"]["extra"] == "10 unit resets (median)"
    assert rows["re-initialise dead units"]["train s"] == "1.0"
