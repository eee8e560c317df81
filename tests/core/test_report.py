"""Unit tests of core/report on hand-built sites: classification rules, evidence, merge, diff, JSON.

Every expected value here is computed by hand from the counts in the test, not by the code
under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deadrelu
from deadrelu import DeadReluError, Levels, Report, SiteReport
from deadrelu.core.report import format_count, format_rate, zero_rate_upper_bound


def site(fired, observations, *, nonfinite=None, mean_abs=None, name="s", levels=None, threshold=0.0):
    """A SiteReport from per-unit counts (mean_abs defaults to fired/observations)."""
    units = len(fired)
    if mean_abs is None:
        mean_abs = tuple(f / observations if observations else 0.0 for f in fired)
    return SiteReport(
        name=name, module=name, module_type="ReLU", function="relu", call=0, slot=0, unit_dim=1,
        shape=(observations, units), fire_threshold=threshold, observations=observations,
        fired_counts=tuple(fired), mean_abs=tuple(mean_abs),
        nonfinite_counts=tuple(nonfinite or (0,) * units), levels=levels or Levels(),
    )  # fmt: skip


def report(*sites, levels=None, **kw):
    return Report(sites=tuple(sites), levels=levels or Levels(), batches=kw.pop("batches", 1), **kw)


# -- classification ------------------------------------------------------------------------


def test_states_follow_the_rules_at_their_edges():
    # 100 observations, asleep_rate 0.05: 5 firings is asleep (<=), 6 is active.
    s = site([0, 1, 5, 6, 100, 3], 100, nonfinite=[0, 0, 0, 0, 0, 2])
    assert s.states == ("dead", "asleep", "asleep", "active", "active", "nonfinite")
    assert (s.dead, s.asleep, s.active, s.nonfinite, s.unobserved) == (1, 2, 2, 1, 0)
    assert s.dead_units == (0,) and s.nonfinite_units == (5,)


def test_asleep_rate_zero_makes_every_firing_unit_active():
    s = site([0, 1, 50], 100, levels=Levels(asleep_rate=0.0))
    assert s.states == ("dead", "active", "active")


def test_nonfinite_wins_over_dead_and_is_never_dormant():
    s = site([0, 0], 10, nonfinite=[10, 0], mean_abs=[math.nan, 0.0])
    assert s.states == ("nonfinite", "dead")
    assert math.isnan(s.dormancy[0]) and s.dormant_units == (1,)


def test_min_observations_makes_thin_evidence_unobserved_not_dead():
    lv = Levels(min_observations=50)
    thin = site([0, 3, 0], 49, levels=lv)  # 49 < 50
    assert thin.states == ("unobserved", "active", "unobserved")  # a unit that fired is alive
    assert thin.dead == 0 and thin.unobserved == 2 and thin.unobserved_units == (0, 2)
    assert thin.dormant_units == ()  # no verdict on unobserved units, dormant neither
    enough = site([0, 3, 0], 50, levels=lv)
    assert enough.states == ("dead", "active", "dead") and enough.unobserved == 0


def test_zero_observations_is_unobserved_whatever_min_observations():
    s = site([0, 0, 0], 0, mean_abs=[0.0, 0.0, 0.0])
    assert s.states == ("unobserved",) * 3
    assert s.dead == 0 and s.dormant == 0 and s.dead_rate_bound == 1.0


def test_dormancy_score_by_hand():
    # mean_abs 0, 1, 3 -> layer mean 4/3 -> scores 0, 0.75, 2.25; tau 0.8 makes units 0 and 1 dormant.
    s = site([0, 10, 10], 10, mean_abs=[0.0, 1.0, 3.0], levels=Levels(dormant_tau=0.8))
    assert s.dormancy == pytest.approx((0.0, 0.75, 2.25))
    assert s.dormant_units == (0, 1)


def brute_force_classes(s):
    """States, dormancy and dormant units unit by unit in plain Python, from the definitions."""
    lv, n = s.levels, s.observations
    states = []
    for f, bad in zip(s.fired_counts, s.nonfinite_counts):
        if bad:
            states.append("nonfinite")
        elif f == 0:
            states.append("dead" if n >= max(1, lv.min_observations) else "unobserved")
        else:
            states.append("asleep" if f / n <= lv.asleep_rate else "active")
    finite = [m for m, bad in zip(s.mean_abs, s.nonfinite_counts) if not bad]
    layer = sum(finite) / len(finite) if finite else 0.0
    dormancy = [math.nan if bad else (m / layer if layer > 0 else 0.0) for m, bad in zip(s.mean_abs, s.nonfinite_counts)]
    dormant = [i for i, d in enumerate(dormancy) if not math.isnan(d) and d <= lv.dormant_tau and states[i] != "unobserved"]
    return tuple(states), dormancy, tuple(dormant)


_MEANS = st.one_of(
    st.floats(0, 1e6, allow_nan=False),
    st.sampled_from([0.0, 5e-324, 1e-300, 1e300, 1.7e308, math.inf, math.nan]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(st.one_of(st.integers(0, 2**40), st.sampled_from(["edge-1", "edge", "edge+1"])),
                  st.sampled_from([0, 0, 0, 1, 7]), _MEANS),
        min_size=1, max_size=40,
    ),  # fmt: skip
    st.one_of(st.integers(0, 2**41), st.sampled_from([0, 20, 100, 180, 10**6])),
    st.sampled_from([0.0, 0.05, 0.35, 0.5]),
    st.sampled_from([0.0, 0.025, 1.0, 10.0]),
    st.sampled_from([1, 50, 2**40]),
)
def test_derived_values_equal_the_unit_by_unit_definitions(units, observations, asleep, tau, min_obs):
    # Vectorised classification against the definitions, exactly: the same float64 divisions and
    # comparisons, including at the edges (rate == asleep_rate, NaN/inf means, subnormal means).
    edge = {"edge-1": -1, "edge": 0, "edge+1": 1}  # firings at the asleep rate itself and either side
    fired = [
        min(max(round(asleep * observations) + edge[f], 0) if isinstance(f, str) else f, observations) for f, _, _ in units
    ]
    s = site(fired, observations, nonfinite=[b for _, b, _ in units], mean_abs=[m for _, _, m in units],
             levels=Levels(asleep_rate=asleep, dormant_tau=tau, min_observations=min_obs))  # fmt: skip
    states, dormancy, dormant = brute_force_classes(s)
    assert s.states == states
    assert [x if not math.isnan(x) else "nan" for x in s.dormancy] == [x if not math.isnan(x) else "nan" for x in dormancy]
    assert s.dormant_units == dormant
    for state in ("dead", "asleep", "active", "nonfinite", "unobserved"):
        assert getattr(s, f"{state}_units") == tuple(i for i, x in enumerate(states) if x == state)
    assert s.firing_rate == tuple(f / observations if observations else 0.0 for f in fired)


@pytest.mark.parametrize("scale", [2**50, 2**53 + 1, 2**62, 10**30], ids=["2^50", "2^53+1", "2^62", "1e30"])
def test_counts_too_large_for_float64_or_int64_classify_by_the_exact_rule(scale):
    # 5% of n exactly, one above and one below: Python's own division decides, as it always did.
    n = 20 * scale
    fired = [scale, scale + 1, scale - 1, 0, n]
    s = site(fired, n, mean_abs=[0.05, 0.05, 0.05, 0.0, 1.0])
    states, dormancy, dormant = brute_force_classes(s)
    assert s.states == states and s.dormant_units == dormant and list(s.dormancy) == dormancy
    assert s.dead_units == (3,) and s.asleep == states.count("asleep")


def test_numpy_counts_classify_as_python_ints():
    np = pytest.importorskip("numpy")
    s = site(list(np.array([0, 3, 10], dtype=np.int64)), 10, mean_abs=list(np.array([0.0, 0.3, 1.0])))
    assert s.states == ("dead", "active", "active") and s.dead_units == (0,)


def test_a_pickled_site_carries_its_fields_and_classifies_again():
    import copy
    import pickle

    s = site([0, 1, 50, 0], 100, nonfinite=[0, 0, 0, 3], mean_abs=[0.0, 0.01, 2.0, math.inf])
    before = (s.states, s.dead_units, s.dormant_units, s.asleep, s.dormancy[:3])
    data = pickle.dumps(s)
    assert b"torch" not in data  # the tensor cache stays behind: a report holds plain numbers
    for again in (pickle.loads(data), copy.deepcopy(s), copy.copy(s)):
        assert again == s
        assert (again.states, again.dead_units, again.dormant_units, again.asleep, again.dormancy[:3]) == before


def test_state_masks_match_the_index_tuples():
    s = site([0, 1, 50, 0, 7], 100, nonfinite=[0, 0, 0, 3, 0], mean_abs=[0.0, 0.01, 2.0, math.nan, 0.07])
    for state in ("active", "asleep", "dead", "unobserved", "nonfinite", "dormant"):
        mask = s.state_mask(state)
        assert mask.dtype == torch.bool and tuple(torch.nonzero(mask).flatten().tolist()) == getattr(s, f"{state}_units")
    s.state_mask("dead")[0] = False  # a new tensor each call: the report is unchanged
    assert s.dead_units == (0,)
    with pytest.raises(DeadReluError, match="unknown unit state 'alive'"):
        s.state_mask("alive")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"asleep_rate": 1.0}, "asleep_rate must be in"),
        ({"asleep_rate": math.nan}, "asleep_rate must be in"),
        ({"dormant_tau": -0.1}, "dormant_tau must be"),
        ({"dormant_tau": math.nan}, "dormant_tau must be"),
        ({"dormant_tau": math.inf}, "dormant_tau must be"),
        ({"min_observations": 0}, "min_observations must be"),
        ({"min_observations": 2.5}, "min_observations must be"),
        ({"min_observations": True}, "min_observations must be"),
    ],
)
def test_bad_levels_are_one_clear_error(kwargs, message):
    with pytest.raises(DeadReluError, match=message):
        Levels(**kwargs)


def test_levels_accept_numpy_integers():
    np = pytest.importorskip("numpy")
    assert Levels(min_observations=np.int64(7)).min_observations == 7


# -- evidence -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 59, 1000, 1_200_000, 10**12])
def test_upper_bound_is_the_exact_zero_success_bound(n):
    bound = zero_rate_upper_bound(n)
    # At the bound, seeing 0 firings in n tries has probability exactly 5%.
    assert math.exp(n * math.log1p(-bound)) == pytest.approx(0.05, rel=1e-9)
    assert bound == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)  # the textbook form
    if n >= 1000:
        assert bound == pytest.approx(3 / n, rel=0.01)  # the rule of three (-ln 0.05 = 2.996)


def test_dead_evidence_text():
    s = site([0, 7], 1_200_000)
    assert s.dead_evidence == "0 of 1.2M observations, rate < 2.5e-6"
    assert site([0, 1], 640).dead_evidence == "0 of 640 observations, rate < 0.0047"  # 1-0.05**(1/640)=0.004670


def test_display_roundings_never_overstate_the_evidence():
    assert format_count(1_299_999) == "1.2M"  # rounded down: never more observations than seen
    assert format_count(9_999) == "9999" and format_count(10_000) == "10k" and format_count(3 * 10**9) == "3G"
    assert format_rate(0.0024001) == "0.0025"  # rounded up: "rate < x" stays true
    assert format_rate(2.5e-6) == "2.5e-6" and format_rate(1.0) == "1" and format_rate(0.0995) == "0.1"
    for n in (7, 123, 4567, 89_012, 3_456_789):
        b = zero_rate_upper_bound(n)
        assert float(format_rate(b)) >= b


def test_report_dead_rate_bound_is_the_weakest_evidence():
    r = report(site([0, 5], 100, name="a"), site([0, 0], 10_000, name="b"), site([4, 5], 10, name="c"))
    assert r.dead_rate_bound == zero_rate_upper_bound(100)  # c has no dead unit, so its 10 do not count
    assert report(site([4], 10)).dead_rate_bound is None


def test_json_carries_the_evidence_of_every_dead_unit():
    r = report(site([0, 9, 0], 1000, name="a"))
    d = r.to_dict()
    ev = d["sites"][0]["summary"]["dead_evidence"]
    assert ev["observations"] == 1000 and ev["confidence"] == 0.95
    assert ev["rate_upper_bound"] == pytest.approx(1 - 0.05**0.001)
    assert ev["text"] == "0 of 1000 observations, rate < 0.003"
    assert d["totals"]["dead_rate_upper_bound"] == pytest.approx(1 - 0.05**0.001)
    assert d["levels"]["min_observations"] == 1


class _Branchy(torch.nn.Module):
    """fc1 -> relu always; fc2 -> relu2 only for batches of more than 4 rows. Planted dead:
    unit 0 of each layer (bias -100)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)
        self.relu, self.relu2 = torch.nn.ReLU(), torch.nn.ReLU()
        with torch.no_grad():
            self.fc1.bias[0] = self.fc2.bias[0] = -100.0
            self.fc1.bias[1:] = self.fc2.bias[1:] = 100.0  # the others always fire

    def forward(self, x):
        h = self.relu(self.fc1(x))
        return self.relu2(self.fc2(h)) if x.shape[0] > 4 else h


def test_scan_certifies_with_per_site_observations():
    """A site reached by only some batches has its own observations, and so its own evidence."""
    data = [torch.randn(8, 3), torch.randn(4, 3), torch.randn(8, 3)]  # relu sees 20 rows, relu2 16
    r = deadrelu.scan(_Branchy(), data)
    relu, relu2 = r.site("relu"), r.site("relu2")
    assert (relu.observations, relu2.observations) == (20, 16)
    assert relu.dead_units == relu2.dead_units == (0,)
    assert relu.dead_rate_bound == pytest.approx(1 - 0.05 ** (1 / 20))
    assert relu2.dead_evidence == "0 of 16 observations, rate < 0.18"  # 1-0.05**(1/16) = 0.1709
    assert r.dead_rate_bound == relu2.dead_rate_bound  # the weaker evidence
    strict = deadrelu.scan(_Branchy(), data, min_observations=17)
    assert strict.site("relu").dead_units == (0,) and strict.site("relu").unobserved == 0
    assert strict.site("relu2").dead_units == () and strict.site("relu2").unobserved_units == (0,)
    assert (strict.dead, strict.unobserved) == (1, 1)


def test_probe_takes_min_observations():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with torch.no_grad():
        net[0].bias[:] = torch.tensor([-100.0, 0, 0, 0])
    with deadrelu.Probe(net, min_observations=20) as probe:
        net(torch.randn(10, 3))
    assert probe.report().sites[0].unobserved_units == (0,)
    with probe:
        net(torch.randn(10, 3))
    assert probe.report().sites[0].dead_units == (0,)  # 20 observations now


# -- merge ------------------------------------------------------------------------------------


def test_merge_adds_counts_and_weights_means():
    a = site([0, 1, 3], 10, mean_abs=[0.0, 1.0, 2.0], nonfinite=[0, 0, 1], name="x")
    b = site([0, 0, 4], 30, mean_abs=[0.0, 2.0, 4.0], name="x")
    m = a.merge(b)
    assert m.observations == 40 and m.fired_counts == (0, 1, 7) and m.nonfinite_counts == (0, 0, 1)
    assert m.mean_abs == pytest.approx((0.0, (10 * 1 + 30 * 2) / 40, (10 * 2 + 30 * 4) / 40))
    assert m.states == ("dead", "asleep", "nonfinite")  # 1/40 = 2.5% <= 5%


def test_merged_report_equals_the_scan_of_all_the_data():
    from fixtures.models import MLP, data_for

    model = MLP()
    x = data_for(model)
    whole = deadrelu.scan(model, x, batch_size=64)
    first, second = deadrelu.scan(model, x[:40], batch_size=64), deadrelu.scan(model, x[40:], batch_size=64)
    halves = first.merge(second)
    assert halves.samples == whole.samples == len(x) and halves.batches == first.batches + second.batches
    for h, w in zip(halves.sites, whole.sites):
        assert h.observations == w.observations and h.fired_counts == w.fired_counts
        assert h.nonfinite_counts == w.nonfinite_counts and h.states == w.states
        assert h.mean_abs == pytest.approx(w.mean_abs, rel=1e-5, abs=1e-7)


def test_merge_keeps_sites_of_one_report_with_their_own_observations():
    r = report(site([0, 2], 10, name="a")).merge(report(site([0, 1], 20, name="a"), site([0], 5, name="b")))
    assert [s.name for s in r.sites] == ["a", "b"]
    assert r.site("a").observations == 30 and r.site("b").observations == 5
    u = Report(sites=(), uncaptured=("x", "y")).merge(Report(sites=(), uncaptured=("y", "z")))
    assert u.uncaptured == ("x", "y", "z")


@pytest.mark.parametrize(
    "other, message",
    [
        (site([0, 2, 3], 10, name="a"), "units"),
        (site([0, 2], 10, name="a", threshold=0.5), "fire_threshold"),
        (site([0, 2], 10, name="a", levels=Levels(asleep_rate=0.1)), "levels"),
        (site([0, 2], 10, name="b"), "name"),
    ],
)
def test_merge_refuses_sites_that_do_not_match(other, message):
    with pytest.raises(DeadReluError, match=message):
        site([0, 2], 10, name="a").merge(other)


def test_merge_refuses_reports_with_other_levels():
    with pytest.raises(DeadReluError, match="levels"):
        report(site([0], 4)).merge(report(site([0], 4), levels=Levels(min_observations=3)))


# -- diff -------------------------------------------------------------------------------------


def test_diff_by_hand():
    before = report(site([0, 0, 5, 5, 0], 100, name="a"), site([1], 100, name="gone"))
    after = report(site([0, 5, 0, 5, 3], 100, name="a"), site([1], 100, name="new"))
    d = before.diff(after)
    (a,) = d.sites
    assert a.died == (2,) and a.revived == (1, 4) and a.stayed_dead == (0,)
    assert (a.dead_before, a.dead_after) == (3, 2)
    assert d.only_before == ("gone",) and d.only_after == ("new",)
    assert str(d).splitlines() == [
        "1 unit(s) died, 2 revived",
        "  a: dead 3 -> 2 (died 2; revived 1, 4)",
        "  gone: only in the earlier report",
        "  new: only in the later report",
    ]


def test_unobserved_units_neither_die_nor_revive():
    lv = Levels(min_observations=50)
    before = report(site([0, 0, 9], 100, name="a", levels=lv), levels=lv)
    after = report(site([0, 3, 0], 10, name="a", levels=lv), levels=lv)  # 10 < 50: no verdict on 0 and 2
    (a,) = before.diff(after).sites
    assert a.died == () and a.revived == (1,) and a.unobserved == (0, 2) and a.stayed_dead == ()
    assert "2 unit(s) unobserved in one report, not compared" in str(before.diff(after))


def test_diff_refuses_other_widths():
    with pytest.raises(DeadReluError, match="cannot diff site 's': units is 2 in one report, 3 in the other"):
        report(site([0, 1], 10)).diff(report(site([0, 1, 2], 10)))


def _gelu(s):
    return dataclasses.replace(s, function="gelu", module_type="GELU")


@pytest.mark.parametrize(
    "after, message",
    [
        # threshold 0 vs 100 on the same model and data: every unit "died", though nothing changed
        (report(site([0, 0, 0], 10, name="a", threshold=100.0)), "fire_threshold is 0.0 in one report, 100.0"),
        (report(_gelu(site([0, 4, 4], 10, name="a"))), "function is 'relu' in one report, 'gelu'"),
        (report(site([0, 4, 4], 10, name="a", levels=Levels(asleep_rate=0.2)), levels=Levels(asleep_rate=0.2)),
         "levels"),
        (report(site([0, 4, 4], 10, name="a"), mode="train"), "mode 'eval' and 'train'"),
    ],
)
def test_diff_refuses_what_merge_refuses(after, message):
    before = report(site([4, 4, 4], 10, name="a"))
    for verb, call in (("diff", before.diff), ("merge", before.merge)):
        with pytest.raises(DeadReluError, match=message) as info:
            call(after)
        assert str(info.value).startswith(f"cannot {verb} ")


def test_diff_compares_the_shared_sites_of_another_model():
    # advise's baseline may be of another model: diff compares what both have (merge refuses it)
    before = report(site([4, 0], 10, name="a"), fingerprint="1" * 16)
    after = report(site([0, 0], 10, name="a"), fingerprint="2" * 16)
    assert before.diff(after).sites[0].died == (0,)
    with pytest.raises(DeadReluError, match="fingerprint"):
        before.merge(after)


@pytest.mark.parametrize("other", [5, None, "report.json", {"sites": []}])
def test_diff_and_merge_of_a_non_report_is_one_error(other):
    r = report(site([0, 2], 10, name="a"))
    kind = type(other).__name__
    with pytest.raises(DeadReluError, match=f"cannot diff reports: expected a deadrelu Report, got {kind}$"):
        r.diff(other)
    with pytest.raises(DeadReluError, match=f"cannot merge reports: expected a deadrelu Report, got {kind}$"):
        r.merge(other)
    with pytest.raises(DeadReluError, match=f"expected a deadrelu SiteReport, got {kind}$"):
        r.sites[0].merge(other)


# -- JSON round trip --------------------------------------------------------------------------


def test_json_round_trip_keeps_every_field_and_state(tmp_path):
    lv = Levels(asleep_rate=0.1, dormant_tau=0.5, min_observations=20)
    r = report(
        site([0, 1, 4, 2], 20, nonfinite=[0, 0, 0, 3], mean_abs=[0.0, 0.1, 5.0, math.inf], name="a", levels=lv),
        site([0, 0], 5, nonfinite=[0, 1], mean_abs=[0.0, math.nan], name="b", levels=lv),
        levels=lv, samples=7, mode="train", model="Net",
    )  # fmt: skip
    path = tmp_path / "r.json"
    r.to_json(path)
    back = Report.from_json(path)
    assert back.site("a") == r.site("a") and back.levels == lv
    assert math.isnan(back.site("b").mean_abs[1])  # NaN != NaN, so compare the rest field by field
    assert back.site("b").states == r.site("b").states == ("unobserved", "nonfinite")
    assert (back.samples, back.mode, back.model, back.batches) == (7, "train", "Net", 1)
    assert back.to_json() == r.to_json()


def test_version_1_files_still_load():
    r = report(site([0, 3], 10, name="a"), samples=4)
    d = r.to_dict()
    d["schema_version"] = 1
    d["thresholds"] = d.pop("levels")
    del d["thresholds"]["min_observations"]  # version 1 never had it
    assert Report.from_dict(d) == r


def test_table_shows_the_new_columns():
    lv = Levels(min_observations=50)
    r = report(site([0, 1, 9], 100, name="a", levels=lv), site([0, 5], 10, name="b", levels=lv), levels=lv)
    rows = r.table_rows()
    assert rows[0][3:5] == ("dead", "unobserved") and rows[0][-2:] == ("obs", "dead rate <")
    assert rows[1][3:5] == ("1", "0") and rows[1][-2:] == ("100", "0.03")  # 1-0.05**0.01 = 0.0295
    assert rows[2][3:5] == ("0", "1") and rows[2][-2:] == ("10", "")
    assert rows[-1][0] == "total" and rows[-1][3:5] == ("1", "1") and rows[-1][-1] == "0.03"
    text = str(r)
    assert "dead needs >= 50 observations" in text and "unobserved: never fired" in text
    assert text.splitlines()[-1].startswith("total")


def test_monitor_reports_take_min_observations():
    """Window of 2 batches of 8 rows = 16 observations; total = 32 over 4 batches."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with torch.no_grad():
        net[0].bias[:] = torch.tensor([-100.0, 100.0, 100.0, 100.0])
    with deadrelu.Monitor(net, window=2, log_every=100, min_observations=20, warn_at=()) as mon:
        for _ in range(4):
            net(torch.randn(8, 3)).sum().backward()
            mon.step()
        window, total = mon.report("window"), mon.report("total")
    assert window.sites[0].observations == 16 and window.sites[0].unobserved_units == (0,) and window.dead == 0
    assert total.sites[0].observations == 32 and total.sites[0].dead_units == (0,)
    assert total.sites[0].dead_evidence == "0 of 32 observations, rate < 0.09"  # 1-0.05**(1/32) = 0.0893
