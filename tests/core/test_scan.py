"""scan()/Probe hygiene, streaming exactness, input handling and the Report round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.models import MLP, Bottleneck, Conv2dBNNet, FunctionalNet, TransformerBlock, data_for
from hypothesis import given, settings
from hypothesis import strategies as st

import deadrelu
from deadrelu import DataError, ForwardError, NoActivationSitesError, Report


def _hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_always_called", {}))
        for m in model.modules()
    )


def _modes_active() -> int:
    return torch._C._len_torch_function_stack()


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
    }


def _same(model: torch.nn.Module, snap: dict) -> bool:
    state = model.state_dict()
    return (
        state.keys() == snap["state"].keys()
        and all(torch.equal(state[k], v) for k, v in snap["state"].items())
        and [m.training for m in model.modules()] == snap["training"]
    )


@pytest.mark.parametrize("make", [MLP, Conv2dBNNet, Bottleneck, TransformerBlock], ids=lambda m: m.__name__)
@pytest.mark.parametrize("train", [False, True])
def test_model_bit_identical_after_scan(make, train):
    model = make()
    model.train()
    model.fc_mode_probe = None  # plain attribute, must survive
    list(model.modules())[-1].eval()  # mixed training flags must be restored per module
    snap = _snapshot(model)
    rng = torch.get_rng_state()
    grad_before = torch.is_grad_enabled()
    deadrelu.scan(model, data_for(model), batch_size=16, train=train)
    assert _same(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.is_grad_enabled() == grad_before
    assert _hooks(model) == 0 and _modes_active() == 0


def test_nothing_left_behind_when_forward_raises():
    model = MLP()
    snap = _snapshot(model)
    with pytest.raises(ForwardError) as info:
        deadrelu.scan(model, torch.randn(10, 7))  # wrong width: the first Linear rejects it
    assert "(10, 7)" in str(info.value)
    assert _same(model, snap) and _hooks(model) == 0 and _modes_active() == 0


def test_forward_error_names_last_site_reached():
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.act = torch.nn.ReLU()
            self.bad = torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.bad(self.act(self.fc(x)))

    model = Breaks()
    with pytest.raises(ForwardError, match=r"last activation site reached: act") as info:
        deadrelu.scan(model, torch.randn(8, 4))
    assert "input (8, 4)" in str(info.value)
    assert _hooks(model) == 0 and _modes_active() == 0


def test_probe_removes_hooks_after_exception_inside_block():
    model = MLP()
    with pytest.raises(RuntimeError):
        with deadrelu.Probe(model):
            model(torch.randn(3, 10))
            raise RuntimeError("user code failed")
    assert _hooks(model) == 0 and _modes_active() == 0
    out = model(torch.randn(3, 10))  # the model still works normally
    assert out.shape == (3, 3)


def test_probe_report_before_data_is_an_error():
    with deadrelu.Probe(MLP()) as probe:
        with pytest.raises(NoActivationSitesError):
            probe.report()


def test_probe_does_not_change_outputs_or_gradients():
    model = FunctionalNet()
    x = data_for(model)
    ref = copy.deepcopy(model)
    with deadrelu.Probe(model):
        out = model(x)
        out.sum().backward()
    ref_out = ref(x)
    ref_out.sum().backward()
    assert torch.equal(out, ref_out)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8))
def test_any_batch_split_gives_identical_statistics(sizes):
    torch.manual_seed(0)
    model = Conv2dBNNet().eval()
    x = torch.randn(sum(sizes), 3, 5, 5)
    whole = deadrelu.scan(model, x, batch_size=len(x))
    parts = deadrelu.scan(model, list(x.split(sizes)))
    assert parts.batches == len(sizes) and parts.samples == whole.samples
    for a, b in zip(whole.sites, parts.sites):
        assert a.observations == b.observations
        assert a.fired_counts == b.fired_counts
        assert a.nonfinite_counts == b.nonfinite_counts
        assert a.dead_units == b.dead_units
        assert a.mean_abs == pytest.approx(b.mean_abs, rel=1e-5, abs=1e-8)


def test_accumulators_merge_exactly():
    from deadrelu.core.stats import UnitStats

    x = torch.randn(50, 6).relu()
    whole, a, b = UnitStats(6), UnitStats(6), UnitStats(6)
    whole.update(x, 1)
    a.update(x[:20], 1)
    b.update(x[20:], 1)
    merged = a.merge(b).compute()
    assert merged.fired_counts == whole.compute().fired_counts
    assert merged.observations == 50
    with pytest.raises(deadrelu.DeadReluError):
        a.merge(UnitStats(5))


@pytest.mark.parametrize(
    "batches",
    [
        [(torch.randn(8, 10), torch.zeros(8))],  # (inputs, targets)
        [[torch.randn(8, 10), torch.zeros(8)]],
        [{"x": torch.randn(8, 10), "labels": torch.zeros(8)}],  # kwargs minus labels
    ],
    ids=["tuple", "list", "dict"],
)
def test_batch_input_rule(batches):
    class KW(MLP):
        def forward(self, x):  # accepts x= as a keyword
            return super().forward(x)

    report = deadrelu.scan(KW(), batches)
    assert report.samples == 8 and report.batches == 1


def test_input_fn_and_dataloader():
    ds = torch.utils.data.TensorDataset(torch.randn(40, 10), torch.zeros(40))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    report = deadrelu.scan(MLP(), loader, input_fn=lambda b: b[0] * 2)
    assert report.batches == 3 and report.samples == 40


def test_max_batches():
    report = deadrelu.scan(MLP(), torch.randn(100, 10), batch_size=10, max_batches=3)
    assert report.batches == 3 and report.site("1").observations == 30


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.randn(0, 10), "no samples"),
        ([], "no batches"),
        (["a", "b"], "cannot take model input"),
        (42, "data must be a tensor"),
        ([("text", 1)], "not a tensor"),
        ([{"labels": torch.zeros(3)}], "only label keys"),
    ],
)
def test_bad_data_gives_clear_error_and_leaves_model_intact(data, message):
    model = MLP()
    snap = _snapshot(model)
    with pytest.raises(DataError, match=message):
        deadrelu.scan(model, data)
    assert _same(model, snap) and _hooks(model) == 0 and _modes_active() == 0


def test_model_without_activations():
    from fixtures.models import NoActivations

    with pytest.raises(NoActivationSitesError, match="no activation sites"):
        deadrelu.scan(NoActivations(), torch.randn(4, 4))


def test_report_json_round_trip_and_diff(tmp_path):
    model = MLP()
    x = data_for(model)
    before = deadrelu.scan(model, x)
    path = tmp_path / "r.json"
    before.to_json(path)
    loaded = Report.from_json(path)
    assert loaded == before
    assert loaded.site("1").dead_units == (2, 5, 7)
    with torch.no_grad():  # kill unit 0 of layer 1, revive unit 5
        model[0].bias[0] = -1000.0
        model[0].bias[5] = 5.0
    after = deadrelu.scan(model, x)
    d = before.diff(after)
    s = next(s for s in d.sites if s.name == "1")
    assert s.died == (0,) and s.revived == (5,)
    assert "1 unit(s) died, 1 revived" in str(d)


def test_report_json_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"kind": "something else"}')
    with pytest.raises(deadrelu.DeadReluError, match="not a deadrelu report"):
        Report.from_json(bad)
    newer = deadrelu.scan(MLP(), torch.randn(4, 10)).to_dict()
    newer["schema_version"] = 99
    with pytest.raises(deadrelu.DeadReluError, match="schema_version"):
        Report.from_dict(newer)


def test_report_prints_a_table():
    text = str(deadrelu.scan(MLP(), torch.randn(64, 10)))
    assert "site" in text and "dead" in text
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("1 "))
    assert row.split()[:4] == ["1", "relu", "32", "3"]
    assert lines[-1].split()[0] == "total"


def test_import_needs_only_torch():
    import subprocess
    import sys

    # Whatever torch itself imports is fine; deadrelu must add no third-party module of its own.
    code = (
        "import sys, torch; before = set(sys.modules); import deadrelu; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - {'deadrelu', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    third_party = {"numpy", "matplotlib", "rich", "tqdm", "sklearn", "tensorboard", "wandb", "lightning"}
    assert set(eval(out.stdout)) & third_party == set()


def test_missing_extra_names_the_pip_command(monkeypatch):
    from deadrelu import _imports

    with pytest.raises(ModuleNotFoundError, match=r'pip install "deadrelu\[plot\]"'):
        _imports.require("matplotlib_not_installed_here", "plot")


def test_a_unit_firing_at_exactly_the_asleep_rate_is_asleep():
    from deadrelu.core.stats import classify

    assert classify([63, 64], 180, [0, 0], 0.35) == ["asleep", "active"]  # 63/180 == 0.35; 0.35 * 180 < 63 in floats


def test_a_site_that_saw_only_empty_tensors_is_reported_unobserved():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(4, 3)

        def forward(self, x):
            routed = x[x[:, 0] > 1e9]  # no row ever reaches this expert
            return torch.relu(self.a(x)).sum() + torch.nn.functional.gelu(self.b(routed)).sum()

    report = deadrelu.scan(Experts(), torch.randn(20, 4))
    empty = report.site("<root>:gelu")
    assert empty.observations == 0 and empty.unobserved == 3 and empty.dead == 0 and empty.dormant == 0
    assert report.site("<root>:relu").observations == 20
    assert deadrelu.Report.from_json(report.to_json()).site("<root>:gelu").observations == 0


def test_a_probe_reports_the_samples_it_saw():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    with deadrelu.Probe(model) as probe:
        for rows in (10, 22):
            model(torch.randn(rows, 4))
    report = probe.report()
    assert report.samples == 32 and report.batches == 2
    probe.reset()
    with probe:
        model(torch.randn(5, 4))
    assert probe.report().samples == 5


@pytest.mark.parametrize("threshold", [float("nan"), {"relu": float("nan")}, {"relu": "high"}, float("inf")])
def test_a_nan_threshold_is_refused_before_anything_runs(threshold):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(deadrelu.DeadReluError, match="threshold"):
        deadrelu.scan(model, torch.randn(8, 4), threshold=threshold)
    assert not calls


def test_softplus_with_a_negative_beta_counts_its_magnitudes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Softplus(beta=-1.0))
    x = torch.randn(50, 4)
    with torch.no_grad():
        h = model(x)
    site = deadrelu.scan(model, x).sites[0]
    assert site.mean_abs == pytest.approx(h.abs().mean(0).tolist(), rel=1e-6)


def test_a_packed_sequence_batch_is_one_input():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(4, 5, nonlinearity="relu")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, seq):
            return self.rnn(seq)[0].data

    seqs = [torch.randn(n, 4) for n in (5, 3, 2)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    with torch.no_grad():
        out = Net()(packed)
    report = deadrelu.scan(Net(), [packed, packed])
    site = report.sites[0]
    assert report.samples == 6 and site.observations == 2 * 10
    assert list(site.fired_counts) == (2 * (out > 0).sum(0)).tolist()
