"""advise(): ranking and numbers checked against planted born-dead / died-in-training units."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import deadrelu
from deadrelu import Report, advise
from deadrelu.core.advice import Advice
from deadrelu.errors import DeadReluError
from fixtures import rescue_models as rm


def deep_mlp(dead: dict[int, list[int]]) -> nn.Sequential:
    """Five hidden ReLU layers of width 10 with planted dead units per layer index."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 6
    for _ in range(5):
        layers += [nn.Linear(width, 10), nn.ReLU()]
        width = 10
    net = nn.Sequential(*layers, nn.Linear(10, 2))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.fill_(1.0)  # every unplanted unit fires, so the planted sets are exact
    for layer, units in dead.items():
        rm.plant(net[2 * layer].bias, units)
    return net


def test_baseline_separates_born_dead_from_died():
    x = rm.data()
    init = deep_mlp({0: [1, 2]})
    baseline = deadrelu.scan(init, x)
    trained = deep_mlp({0: [1, 2], 3: [0, 4, 5, 6], 4: [7]})
    report = deadrelu.scan(trained, x)
    assert [s.dead_units for s in report.sites] == [(1, 2), (), (), (0, 4, 5, 6), (7,)]
    born, died = 2, 5
    advice = advise(report, baseline=baseline)
    assert (advice.born_dead, advice.died, advice.revived) == (born, died, 0)
    titles = [a.title for a in advice.actions]
    assert titles.index("Training killed units") < titles.index("Initialisation: units are born dead")
    text = str(advice)
    assert f"{born} born dead, {died} died in training, 0 revived" in text
    assert f"{born} of 50 units" in text and "were already dead in the baseline" in text
    killed = next(a for a in advice.actions if a.title == "Training killed units")
    assert killed.units == died and any("learning rate" in h for h in killed.how)
    assert any("reinit_dead" in h for h in killed.how) and any("leaky" in h for h in killed.how)
    assert "cannot be told" not in text


def test_born_dead_ranks_first_when_it_dominates():
    x = rm.data()
    baseline = deadrelu.scan(deep_mlp({0: [0, 1, 2, 3, 4, 5], 1: [1, 2, 3]}), x)
    report = deadrelu.scan(deep_mlp({0: [0, 1, 2, 3, 4, 5], 1: [1, 2, 3], 2: [9]}), x)
    advice = advise(report, baseline=baseline)
    assert advice.actions[0].title == "Initialisation: units are born dead"
    assert any("kaiming" in h for h in advice.actions[0].how)


def test_without_baseline_says_what_cannot_be_told():
    net, x = rm.mlp(), rm.data()
    report = deadrelu.scan(net, x)
    advice = report.advice()
    assert isinstance(advice, Advice)
    assert advice.born_dead is None and advice.died is None
    text = str(advice)
    assert "cannot be told" in text and "baseline=" in text
    assert "5 of 28 units (17.8%) never fired on 256 samples" in text
    prune = next(a for a in advice.actions if a.title.startswith("Prune"))
    assert prune.units == 5


def test_depth_trend_is_reported_with_numbers():
    x = rm.data()
    report = deadrelu.scan(deep_mlp({3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4, 5]}), x)
    # Five sites: the first two against the last two (0 and 10 dead of 20 units).
    first = sum(s.dead for s in report.sites[:2]) / 20
    last = sum(s.dead for s in report.sites[-2:]) / 20
    assert (first, last) == (0.0, 0.5)
    advice = advise(report)
    deep = next(a for a in advice.actions if a.title == "Dead units concentrate in deep layers")
    assert f"{100 * first:.1f}% in the first half of the sites vs {100 * last:.1f}% in the last half" in deep.evidence
    assert deep.units == 10
    lines = str(advice).splitlines()
    start = lines.index("Dead fraction by depth:")
    assert len(lines[start + 1 : start + 6]) == 5 and lines[start + 5].split()[1] == f"{report.sites[-1].dead}/10"


def test_nonfinite_ranks_first_and_clean_model_needs_nothing():
    net, x = rm.mlp(), rm.data()
    with torch.no_grad():
        net[2].weight[4] = float("nan")
    advice = advise(deadrelu.scan(net, x))
    assert advice.actions[0].title == "Fix non-finite activations first"
    assert "1 unit(s) produced NaN/Inf at 3 (1)" in advice.actions[0].evidence
    clean = rm.mlp(dead={})
    with torch.no_grad():
        for m in clean:
            if isinstance(m, nn.Linear):
                m.bias.fill_(5.0)  # everything fires
    text = str(advise(deadrelu.scan(clean, x)))
    assert "Nothing to do" in text


def test_advice_from_saved_json_is_identical(tmp_path):
    report = deadrelu.scan(rm.mlp(), rm.data())
    path = tmp_path / "r.json"
    report.to_json(path)
    assert str(advise(Report.from_json(path))) == str(advise(report))


def test_bad_arguments():
    with pytest.raises(DeadReluError, match="expected a deadrelu Report"):
        advise({"sites": []})  # type: ignore[arg-type]
    report = deadrelu.scan(rm.mlp(), rm.data())
    with pytest.raises(DeadReluError, match="baseline must be"):
        advise(report, baseline="init")  # type: ignore[arg-type]
    assert advise(report, min_fraction=0.99).actions == ()


def test_thinly_observed_units_are_named_not_counted():
    x = rm.data()  # 256 samples
    net = deep_mlp({0: [1, 2], 3: [0]})
    strict = deadrelu.scan(net, x, min_observations=257)  # one more than any site saw
    advice = advise(strict)
    assert advice.dead == 0 and not any(a.title.startswith(("Revive", "Prune")) for a in advice.actions)
    assert any("3 unit(s) never fired but were seen on fewer than min_observations=257" in n for n in advice.notes)
    assert advice.certainty == ""
    loose = advise(deadrelu.scan(net, x))
    assert loose.certainty == "dead = never fired; weakest evidence: 0 of 256 observations, rate < 0.012 (95%) at 1"
    # 1 - 0.05**(1/256) = 0.01163, shown rounded up


def test_unobserved_in_the_baseline_is_neither_born_dead_nor_died():
    """A unit with no verdict in the baseline cannot be called born dead or killed by training."""
    x = rm.data()
    # 10 observations < 11: the baseline's silent units 1, 2 of layer 0 have no verdict; layer 3's
    # unit 0 fired there, so it was alive (firing is proof of life however few the observations).
    baseline = deadrelu.scan(deep_mlp({0: [1, 2]}), x[:10], min_observations=11)
    assert baseline.site("1").unobserved_units == (1, 2) and baseline.dead == 0
    report = deadrelu.scan(deep_mlp({0: [1, 2], 3: [0]}), x, min_observations=11)
    advice = advise(report, baseline=baseline)
    assert (advice.born_dead, advice.died, advice.revived) == (0, 1, 0) and advice.dead == 3


def test_each_rule_is_a_named_function_of_the_evidence():
    from deadrelu.core.advice import RULES, Evidence

    report = deadrelu.scan(rm.mlp(), rm.data())
    ev = Evidence(report, None, None, report.units, tuple((s.name, s.dead, s.units) for s in report.sites))
    produced = {rule.__name__: list(rule(ev)) for rule in RULES}
    assert [type(f).__name__ for f in produced["prunable"]] == ["Action"]
    assert produced["born_dead"] == [] and produced["died_in_training"] == []  # no baseline
    assert all(rule.__doc__ for rule in RULES)


def test_a_baseline_of_another_model_is_refused_or_noted():
    x = rm.data()
    report = deadrelu.scan(deep_mlp({0: [1, 2]}), x)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x.shape[1], 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    foreign = deadrelu.scan(other, x)
    assert not {s.name for s in foreign.sites} & {s.name for s in report.sites}
    with pytest.raises(deadrelu.DeadReluError, match="shares no site with the report"):
        advise(report, baseline=foreign)  # "0 born dead, 0 died" before
    same_sites = dataclasses.replace(deadrelu.scan(deep_mlp({0: [1, 2]}), x), fingerprint="0" * 16)
    text = str(advise(report, baseline=same_sites))
    assert "other parameter names or shapes" in text and "2 born dead" in text
    assert "other parameter names" not in str(advise(report, baseline=deadrelu.scan(deep_mlp({}), x)))
