"""Hostile report JSON: every malformed file is one ReportFormatError naming the field.

`Report.from_json` / `from_dict` read files that may be torn, hand-edited, from another
tool or written by an attacker. Each case below asserts the exact field path in the message;
the fuzz tests assert that no mutation of a valid report gives any other exception, and that
whatever loads is a self-consistent report.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deadrelu import DeadReluError, Levels, Report, ReportFormatError, SiteReport


def _site(name: str, fired, observations: int, nonfinite=None, mean_abs=None) -> SiteReport:
    units = len(fired)
    return SiteReport(
        name=name, module=name, module_type="ReLU", function="relu", call=0, slot=0, unit_dim=1,
        shape=(8, units), fire_threshold=0.0, observations=observations, fired_counts=tuple(fired),
        mean_abs=tuple(mean_abs or [f / observations for f in fired]),
        nonfinite_counts=tuple(nonfinite or [0] * units),
    )  # fmt: skip


GOOD = Report(
    sites=(
        _site("fc1.relu", [0, 3, 64, 1], 64),
        _site("fc2.relu", [0, 0, 10], 40, nonfinite=[0, 2, 0], mean_abs=[0.0, math.nan, 0.5]),
        _site("head", [5, 0], 64),
    ),
    levels=Levels(),
    batches=2,
    samples=64,
    model="Net",
)


def good() -> dict[str, Any]:
    """A fresh JSON-shaped copy of a valid report (as written to disk and read back)."""
    return json.loads(GOOD.to_json())


def test_good_report_loads():
    back = Report.from_dict(good())
    assert back.to_json() == GOOD.to_json() and back.site("fc2.relu").states == GOOD.site("fc2.relu").states


def _set(path: str, value: Any):
    """A mutation that sets the value at a dotted/indexed path like ``sites[1].fired_counts[2]``."""

    def mutate(d):
        *parents, last = _parse(path)
        for p in parents:
            d = d[p]
        d[last] = value

    return mutate


def _del(path: str):
    def mutate(d):
        *parents, last = _parse(path)
        for p in parents:
            d = d[p]
        del d[last]

    return mutate


def _parse(path: str) -> list[Any]:
    out: list[Any] = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        out.append(int(part) if part.isdigit() else part)
    return out


CASES = [
    (_del("sites.1.fired_counts"), "sites[1].fired_counts: missing"),
    (_del("sites.0.observations"), "sites[0].observations: missing"),
    (_del("levels"), "levels: missing"),
    (_del("kind"), "kind: not a deadrelu report"),
    (_del("schema_version"), "schema_version: expected 1 or 2"),
    (_del("sites"), "sites: missing"),
    (_del("model"), "model: missing"),
    (_set("sites.1.fired_counts.2", -1), "sites[1].fired_counts[2]: expected an integer in [0, 40] (at most the site's observations), got -1"),
    (_set("sites.1.fired_counts.2", 2.5), "sites[1].fired_counts[2]: expected an integer in [0, 40]"),
    (_set("sites.1.fired_counts.2", 3.0), "got 3.0"),
    (_set("sites.1.fired_counts.2", True), "got true"),
    (_set("sites.1.fired_counts.2", "3"), "got '3'"),
    (_set("sites.0.fired_counts.2", 65), "sites[0].fired_counts[2]: expected an integer in [0, 64]"),
    (_set("sites.0.nonfinite_counts.1", 65), "sites[0].nonfinite_counts[1]: expected an integer in [0, 64]"),
    (_set("sites.0.observations", 0), "sites[0].fired_counts[1]: expected an integer in [0, 0]"),
    (_set("sites.0.observations", -64), "sites[0].observations: expected a non-negative integer, got -64"),
    (_set("sites.0.observations", 1e20), "sites[0].observations: expected a non-negative integer, got 1e+20"),
    (_set("sites.0.mean_abs", [0.0, 0.1]), "sites[0].mean_abs: expected 4 values (one per unit, as in fired_counts), got 2"),
    (_set("sites.0.nonfinite_counts", [0, 0, 0, 0, 0]), "sites[0].nonfinite_counts: expected 4 values"),
    (_set("sites.0.mean_abs.1", "nan"), "sites[0].mean_abs[1]: NaN is only possible for a unit with non-finite outputs"),
    (_set("sites.0.mean_abs.1", -0.5), "sites[0].mean_abs[1]: expected a number >= 0, got -0.5"),
    (_set("sites.0.mean_abs.1", None), "sites[0].mean_abs[1]: expected a number, got null"),
    (_set("sites.0.fire_threshold", "nan"), "sites[0].fire_threshold: expected a number, not NaN"),
    (_set("sites.0.shape", [8, -4]), "sites[0].shape[1]: expected a non-negative integer, got -4"),
    (_set("sites.0.shape", "8x4"), "sites[0].shape: expected a list, got '8x4'"),
    (_set("sites.0.call", -1), "sites[0].call: expected a non-negative integer"),
    (_set("sites.0.name", 7), "sites[0].name: expected a string, got 7"),
    (_set("sites.2.name", "fc1.relu"), "sites[2].name: 'fc1.relu' is already the name of sites[0]"),
    (_set("sites.1", [1, 2]), "sites[1]: expected an object, got a list of 2"),
    (_set("sites", {"a": 1}), "sites: expected a list, got an object"),
    (_set("schema_version", 3), "schema_version: expected 1 or 2 (this deadrelu reads report versions 1 to 2), got 3"),
    (_set("schema_version", "2"), "schema_version: expected 1 or 2"),
    (_set("schema_version", 2.0), "schema_version: expected 1 or 2"),
    (_set("schema_version", 0), "schema_version: expected 1 or 2"),
    (_set("levels.asleep_rate", 1.5), "levels.asleep_rate: expected a number below 1, got 1.5"),
    (_set("levels.dormant_tau", "nan"), "levels.dormant_tau: expected a number, not NaN"),
    (_set("levels.dormant_tau", "inf"), "levels.dormant_tau: expected a finite number"),
    (_set("levels.min_observations", 0), "levels.min_observations: expected an integer >= 1, got 0"),
    (_set("levels", [0.05]), "levels: expected an object"),
    (_set("mode", "predict"), "mode: expected 'eval' or 'train', got 'predict'"),
    (_set("batches", -2), "batches: expected a non-negative integer, got -2"),
    (_set("samples", None), "samples: expected a non-negative integer, got null"),
    (_set("fingerprint", 12), "fingerprint: expected a string, got 12"),
]


@pytest.mark.parametrize("mutate, message", CASES, ids=[m for _, m in CASES])
def test_each_bad_field_is_named(mutate, message):
    d = good()
    mutate(d)
    with pytest.raises(ReportFormatError) as info:
        Report.from_dict(d)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_version_1_reads_thresholds_and_version_2_requires_levels():
    d = good()
    d["schema_version"] = 1
    with pytest.raises(ReportFormatError, match="thresholds: missing"):
        Report.from_dict(d)
    d["thresholds"] = d.pop("levels")
    assert Report.from_dict(d).to_json() == GOOD.to_json()


def test_zero_observations_with_nothing_counted_is_an_unobserved_site():
    """A Monitor window in which a site did not run has 0 observations: valid, and never "dead"."""
    d = good()
    d["sites"][2].update(observations=0, fired_counts=[0, 0], mean_abs=[0.0, 0.0])
    s = Report.from_dict(d).site("head")
    assert s.states == ("unobserved", "unobserved") and s.dead == 0
    d["sites"][2]["mean_abs"] = [0.0, 0.25]
    with pytest.raises(ReportFormatError, match=r"sites\[2\].mean_abs\[1\]: expected 0 \(the site has 0 observations\)"):
        Report.from_dict(d)


def test_unknown_keys_and_derived_summaries_are_ignored():
    d = good()
    d["future_field"] = {"x": 1}
    d["sites"][0]["a_future_site_field"] = "producer"  # (unit_axis_source is a known key now)
    d["totals"] = "garbage"
    d["sites"][1]["summary"] = {"dead": 999}
    del d["sites"][2]["summary"]
    assert Report.from_dict(d).to_json() == GOOD.to_json()


def test_site_from_dict_validates_too():
    with pytest.raises(ReportFormatError, match=r"site.observations: missing"):
        SiteReport.from_dict({"name": "a", "module": "", "module_type": "", "function": "relu", "call": 0,
                              "slot": 0, "unit_dim": 1, "shape": [], "fire_threshold": 0}, Levels())  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"kind": "deadrelu.Report", ', "report is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "report is not valid JSON"),
        ('{"n": ' + "1" * 5000 + "}", "report is not valid JSON"),
        ("[1, 2]", "report: expected an object, got a list of 2"),
        ('{"kind": "deadrelu.Report", "schema_version": 2, "levels": {"asleep_rate": NaN, "dormant_tau": 0}}',
         "levels.asleep_rate: expected a number, not NaN"),
    ],
)  # fmt: skip
def test_bad_text_is_one_format_error(text, message):
    with pytest.raises(ReportFormatError, match=message.replace("[", r"\[")):
        Report.from_json(text)


def test_bad_files(tmp_path):
    binary = tmp_path / "b.json"
    binary.write_bytes(b'{"kind": "\xff\xfe"}')
    with pytest.raises(ReportFormatError, match="not UTF-8"):
        Report.from_json(binary)
    empty = tmp_path / "e.json"
    empty.write_text("")
    with pytest.raises(ReportFormatError, match="not valid JSON"):
        Report.from_json(empty)
    with pytest.raises(DeadReluError, match="cannot read report"):
        Report.from_json(tmp_path / "missing.json")
    with pytest.raises(DeadReluError, match="cannot read report"):
        Report.from_json("bad\0name.json")
    with pytest.raises(DeadReluError, match="cannot read report"):
        Report.from_json(tmp_path)  # a directory
    with pytest.raises(ReportFormatError, match="not UTF-8"):
        Report.from_json(b'{"\xff": 1}')


# -- fuzz -------------------------------------------------------------------------------------

# Values a mutation may write anywhere: the types and edge values a broken or hostile file holds.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 64, 65, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["nan", "inf", "-inf", "", "relu", "2"])
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _parent(d: Any, path: tuple) -> Any:
    for p in path[:-1]:
        d = d[p]
    return d


@st.composite
def mutated_reports(draw) -> tuple[dict[str, Any], bool]:
    """A valid report's JSON data with 1-3 random mutations; also whether every mutation only
    touched what the loader ignores (derived summaries, unknown keys)."""
    d = good()
    neutral = True
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        path = draw(st.sampled_from(paths))
        parent = _parent(d, path)
        ignored = path[0] == "totals" or "summary" in path[:3]
        op = draw(st.sampled_from(["set", "delete", "add_key", "append"]))
        if op == "set":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add_key" and isinstance(parent, dict):
            key = draw(st.text(min_size=1, max_size=6))
            ignored = ignored or key not in parent
            ignored = ignored and not (parent is d and key in ("levels", "thresholds"))
            parent.setdefault(key, draw(JSON_VALUES))
        elif op == "append" and isinstance(parent[path[-1]], list):
            parent[path[-1]].append(draw(JSON_VALUES))
        neutral = neutral and ignored
    return d, neutral


def _self_consistent(r: Report) -> None:
    """Everything a loaded report offers works, and its counts obey the rules a scan guarantees."""
    assert isinstance(r, Report)
    names = [s.name for s in r.sites]
    assert len(set(names)) == len(names)
    for s in r.sites:
        assert len(s.fired_counts) == len(s.mean_abs) == len(s.nonfinite_counts) == s.units
        assert all(0 <= c <= s.observations for c in s.fired_counts + s.nonfinite_counts)
        assert len(s.states) == s.units and s.dead + s.unobserved + s.asleep + s.active + s.nonfinite == s.units
        assert s.dormancy is not None and s.dead_evidence
    str(r), repr(r), r.table_rows(), r.diff(r), r.advice(), str(r.advice())
    again = Report.from_json(r.to_json())
    assert again.to_json() == r.to_json()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_reports())
def test_fuzz_mutated_report_data_is_valid_or_one_format_error(case):
    data, neutral = case
    before = copy.deepcopy(data)
    try:
        r = Report.from_dict(data)
    except ReportFormatError as err:
        assert str(err) and "\n" not in str(err)
        assert not neutral, f"an ignorable change was refused: {err}"
    else:
        _self_consistent(r)
        if neutral:
            assert r.to_json() == GOOD.to_json()
    assert data == before or _has_nan(data)  # the loader never changes its input


def _has_nan(x: Any) -> bool:
    if isinstance(x, float):
        return math.isnan(x)
    if isinstance(x, dict):
        return any(_has_nan(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_nan(v) for v in x)
    return False


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_report_text_is_valid_or_one_format_error(data):
    text = GOOD.to_json(indent=None)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(1, len(text)))  # keep the leading "{": a text, not a path
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        ch = data.draw(st.sampled_from(list('{}[],:"-.0123456789eE \\nNaI') + ["\x00", "é"]))
        if op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "insert":
            text = text[:i] + ch + text[i:]
        else:
            text = text[:i] + ch + text[i + 1 :]
    try:
        r = Report.from_json(text)
    except ReportFormatError as err:
        assert "\n" not in str(err)
    else:
        _self_consistent(r)


@pytest.mark.parametrize("path", ["sites.0.observations", "batches", "samples", "sites.0.shape.0", "sites.0.call"])
def test_counts_beyond_int64_are_refused_at_load(path):
    # 10**400 is no float: accepted, every rate and the table raised a raw OverflowError later
    d = good()
    _set(path, 10**400)(d)
    with pytest.raises(ReportFormatError, match=r"at most 2\*\*63 - 1 \(a count fits int64\)") as info:
        Report.from_dict(d)
    assert "\n" not in str(info.value)
    d = good()
    _set(path, 2**63)(d)  # the first integer past int64 ...
    with pytest.raises(ReportFormatError, match="fits int64"):
        Report.from_dict(d)
    d = good()
    _set(path, 2**63 - 1)(d)  # ... and int64's largest, which a report can hold and print
    if path == "sites.0.observations":
        str(Report.from_dict(d))
    else:
        Report.from_dict(d)


def test_a_unit_dim_beyond_int64_is_refused():
    d = good()
    _set("sites.0.unit_dim", -(10**30))(d)
    with pytest.raises(ReportFormatError, match=r"sites\[0\].unit_dim: expected an integer that fits int64"):
        Report.from_dict(d)


@pytest.mark.parametrize("value", ["inf", "Infinity", 1e400])
def test_infinite_mean_abs_needs_nonfinite_outputs(value):
    # a unit without non-finite outputs has a finite mean |h|; "inf" made every other unit dormant
    d = good()
    _set("sites.0.mean_abs.1", value)(d)
    with pytest.raises(ReportFormatError, match=r"sites\[0\].mean_abs\[1\]: (infinity is only possible|expected a number)"):
        Report.from_dict(d)
    d = good()
    _set("sites.1.mean_abs.1", "inf")(d)  # fc2.relu unit 1 has 2 non-finite outputs: inf is possible
    assert Report.from_dict(d).site("fc2.relu").mean_abs[1] == math.inf
