"""The demo end to end at reduced size: CLI outputs, the results.json contract, brute-force agreement,
diverged seeds shown as diverged, and verdicts that follow the numbers."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

import deadrelu
from deadrelu.cli.main import main
from deadrelu.lab.datasets import load_dataset
from deadrelu.lab.demo import STRATEGIES, DemoSetting, rescue_story, result_table, run_demo, seeds_story
from deadrelu.lab.training import build_mlp, torch_threads, train_epoch
from deadrelu.lab.verdicts import aggregate, summarise

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SEEDS = (3, 4)


def _strip_times(obj):
    """The result without wall-clock fields (the only thing allowed to differ between two runs)."""
    timed = ("seconds", "train_seconds", "surgery_seconds", "wall_seconds", "outputs", "seconds_by_seed",
             "train_seconds_by_seed", "lines", "verdicts")
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if k not in timed}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--seeds", "2", "--seed", "3", "--checkpoint-epoch", "1", "--epochs", "2",
                     "--out", str(out), "--no-progress", "--no-live"])
    return code, buf.getvalue(), out, json.loads((out / "results.json").read_text())


def _resummarised(story):
    """The story re-aggregated and re-summarised from its (possibly edited) per-seed runs."""
    story = dict(story, **aggregate(story["runs"]))
    story["summary"] = summarise(story)
    return story


def test_demo_cli_writes_everything_and_says_where(demo_run):
    code, stdout, out, _ = demo_run
    assert code == 0
    for name in ("results.json", "report.html", "demo-layers.png", "demo-heatmap.png", "demo-rescue.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
        assert name in stdout
    assert str(out.resolve()) in stdout
    assert "total wall time:" in stdout and "median [min-max] of 2 seeds" in stdout
    for strategy in ("no rescue (control)", "lower LR", "LeakyReLU", "re-initialise", "GELU"):
        assert strategy in stdout
    for claim in ("Accuracy:", "Cost:", "Robustness:", "Lower LR:", "LeakyReLU left"):
        assert claim in stdout


def test_results_json_contract(demo_run):
    *_, result = demo_run
    assert result["kind"] == "deadrelu.evidence" and result["experiment"] == "demo"
    cfg = result["config"]
    assert cfg["lr"] == 0.5 and cfg["batch_size"] == 64 and cfg["checkpoint_epoch"] == 1 and cfg["epochs"] == 2
    assert cfg["seeds"] == list(SEEDS) and cfg["inputs"] == "in [0, 1]" and cfg["standardize"] is False
    assert len(result["runs"]) == 2 and [r["seed"] for r in result["runs"]] == list(SEEDS)
    summary = result["summary"]
    by_seed = summary["last_layer_dead_fraction_by_seed"]
    assert by_seed == [r["checkpoint"]["layers"][-1]["dead_fraction"] for r in result["runs"]]
    assert summary["last_layer_dead_fraction"] == pytest.approx(sum(by_seed) / 2)  # median of two
    assert set(result["strategies"]) == set(STRATEGIES)
    for name, strategy in result["strategies"].items():
        assert "skipped" not in strategy, f"{name} was skipped: {strategy.get('skipped')}"
        finals = [r["strategies"][name] for r in result["runs"]]
        assert strategy["val_accuracy_by_seed"] == [None if f["diverged"] else f["val_accuracy"] for f in finals]
        assert strategy["last_layer_dead_fraction_by_seed"] == [
            None if f["diverged"] else f["final"][-1]["dead_fraction"] for f in finals]
        for run in result["runs"]:
            records = run["strategies"][name]["epochs"]
            assert [r["epoch"] for r in records] == [2, 3]
            for record in records:
                for key in ("layers", "val_layers"):
                    assert [layer["site"] for layer in record[key]] == ["h1", "h2", "h3", "h4", "h5"]
                    for layer in record[key]:
                        assert layer["units"] == 128 and layer["dead_fraction"] == pytest.approx(layer["dead"] / 128)
    swapped = {s: result["runs"][0]["strategies"][s]["final"][0]["function"] for s in STRATEGIES}
    assert swapped == {"control": "relu", "lower_lr": "relu", "reinit": "relu", "leaky_relu": "leaky_relu",
                       "gelu": "gelu"}
    assert result["strategies"]["lower_lr"]["lr"] == pytest.approx(0.05)
    # The heatmap data agrees with the counts: a dead unit is exactly one with firing rate 0.
    cp = result["runs"][0]["checkpoint"]
    for layer, rates in zip(cp["layers"], cp["firing_rates"]):
        assert len(rates) == 128 and sum(1 for r in rates if r == 0) == layer["dead"]


def _dead_by_hand(net, x):
    """Per ReLU layer, units with no positive output over all of ``x`` (brute force over the full tensor)."""
    with torch.no_grad():
        h, dead, alive = x, [], []
        for layer in net:
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                dead.append(int(((h > 0).sum(0) == 0).sum()))
                alive.append((h > 0).any(0))
    return dead, alive


def test_numbers_match_an_independent_rerun_on_both_splits(demo_run):
    """Retrain seed 3 by hand, no monitor: checkpoint and control numbers are exactly brute-force counts."""
    *_, result = demo_run
    run = result["runs"][0]
    ds = load_dataset("digits", seed=3)
    with torch_threads(1):
        net = build_mlp(ds.features, (128,) * 5, 10, seed=3)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        train_epoch(net, opt, ds, 64, torch.Generator().manual_seed(3))
        assert [r["dead"] for r in run["checkpoint"]["layers"]] == _dead_by_hand(net, ds.x_train)[0]
        assert [r["dead"] for r in run["checkpoint"]["val_layers"]] == _dead_by_hand(net, ds.x_val)[0]
        _, alive_before = _dead_by_hand(net, ds.x_train)
        state = copy.deepcopy(net.state_dict())
        finals = {}
        for name, lr in (("control", 0.5), ("lower_lr", 0.05)):
            net.load_state_dict(state)
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            batches = torch.Generator().manual_seed(3 + 1)  # the batches every strategy of seed 3 sees
            for _ in range(2):
                train_epoch(net, opt, ds, 64, batches)
            finals[name] = _dead_by_hand(net, ds.x_train)
            assert [r["dead"] for r in run["strategies"][name]["final"]] == finals[name][0], name
    # Resurrected: dead at the checkpoint, firing at the end, per layer.
    revived = [int((~b & a).sum()) for b, a in zip(alive_before, finals["control"][1])]
    assert run["strategies"]["control"]["resurrected"] == revived


def _planted(weights, bias):
    net = torch.nn.Sequential(torch.nn.Linear(3, len(bias)), torch.nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weights))
        net[0].bias.copy_(torch.tensor(bias))
    return net


def test_a_non_finite_unit_is_neither_dead_nor_resurrected():
    from deadrelu.lab.demo import _resurrected
    from deadrelu.lab.training import firing_rates

    nan, big = float("nan"), 3e38  # big * x overflows to inf for the samples with x > ~1.13
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    # checkpoint: unit 0 all NaN, units 1 and 2 dead, unit 3 alive
    before = deadrelu.scan(_planted([[nan] * 3, [0, 0, 0], [0, 0, 0], [0, 0, 1]], [0, -1, -1, 9]), x)
    # end: unit 0 fires (finite), unit 1 fires but overflows to inf on some samples, unit 2 fires
    after = deadrelu.scan(_planted([[0, 0, 0], [big, 0, 0], [0, 0, 0], [0, 0, 1]], [1, 0, 1, 9]), x)
    assert before.sites[0].states == ("nonfinite", "dead", "dead", "active")
    assert after.sites[0].states[:3] == ("active", "nonfinite", "active") and after.sites[0].fired_counts[1] > 0
    rates = firing_rates(before)
    assert rates[0][0] is None and rates[0][1:3] == [0.0, 0.0] and rates[0][3] == 1.0
    assert json.loads(json.dumps(rates, allow_nan=False)) == rates  # null in results.json
    assert firing_rates(after)[0][1] is None
    # only unit 2 was dead at the checkpoint (the report's count) and fires, finite, at the end
    assert before.dead == 2 and _resurrected(before, after) == [1]


def test_a_rate_from_a_single_firing_is_never_saved_as_0():
    from deadrelu.lab.training import firing_rates

    x = torch.cat([torch.ones(1, 3), -torch.ones(2_999_999, 3)])  # unit 0 fires on 1 of 3,000,000 samples
    report = deadrelu.scan(_planted([[1, 0, 0]], [0]), x, batch_size=1_000_000, progress=False)
    assert report.sites[0].states == ("asleep",)
    assert firing_rates(report)[0][0] == pytest.approx(1 / 3_000_000, rel=1e-5)


def test_a_diverged_seed_is_shown_as_diverged_never_as_a_number(demo_run):
    *_, result = demo_run
    story = copy.deepcopy(result)
    story["runs"][1]["strategies"]["gelu"]["diverged"] = True  # planted: seed 4's GELU run went NaN
    story = _resummarised(story)
    gelu = story["strategies"]["gelu"]
    assert gelu["val_accuracy_by_seed"][1] is None and gelu["last_layer_dead_fraction_by_seed"][1] is None
    assert gelu["diverged_seeds"] == 1 and gelu["diverged"] is False
    assert gelu["val_accuracy"] == story["runs"][0]["strategies"]["gelu"]["val_accuracy"]  # the median of one
    row = next(r for r in result_table(story) if r[0] == "swap to GELU")
    assert row[10] == "1/2"
    assert "swap to GELU 1/2" in next(line for line in story["summary"]["lines"] if line.startswith("Robustness"))
    json.dumps(story, allow_nan=False)  # null, never NaN, in results.json


def test_divergence_everywhere_is_reported_as_divergence():
    with torch_threads(1):
        story = seeds_story(load_dataset("digits"), seeds=(0, 1), progress=False, setting=DemoSetting(
            checkpoint_epoch=2, epochs=1, lr=100.0, strategies=("control",)))
    assert story["checkpoint"]["diverged"] is True
    assert story["summary"]["last_layer_dead_fraction_by_seed"] == [None, None]
    assert story["summary"]["last_layer_dead_fraction"] is None
    assert any("diverged" in line for line in story["summary"]["lines"])
    rows = result_table(story)
    checkpoint = rows[2]
    assert checkpoint[5] == "diverged" and checkpoint[6] == "-" and checkpoint[8] == "diverged"
    assert checkpoint[10] == "2/2" and rows[3][10] == "2/2"


def _plant(story, name, key, values):
    for run, value in zip(story["runs"], values):
        run["strategies"][name][key] = value


def test_verdicts_follow_the_numbers(demo_run):
    *_, result = demo_run
    story = copy.deepcopy(result)
    for name in STRATEGIES:
        _plant(story, name, "val_accuracy", [0.5, 0.5])
    _plant(story, "lower_lr", "val_accuracy", [0.9, 0.8])
    verdicts = _resummarised(story)["summary"]["verdicts"]
    assert verdicts["accuracy"]["winner"] == "lower_lr"
    assert "lower LR (÷10) wins with a median 85.0%" in verdicts["accuracy"]["text"]
    _plant(story, "gelu", "val_accuracy", [0.95, 0.99])
    assert _resummarised(story)["summary"]["verdicts"]["accuracy"]["winner"] == "gelu"
    for name in STRATEGIES:
        _plant(story, name, "val_accuracy", [0.9, 0.9])
    _plant(story, "control", "val_accuracy", [0.95, 0.95])
    verdict = _resummarised(story)["summary"]["verdicts"]["accuracy"]
    assert verdict["winner"] is None and "no rescue beat the control" in verdict["text"]

    _plant(story, "leaky_relu", "diverged", [True, True])
    _plant(story, "gelu", "diverged", [True, False])
    verdict = _resummarised(story)["summary"]["verdicts"]["robustness"]
    assert sorted(verdict["winner"]) == ["lower_lr", "reinit"]
    assert "swap to LeakyReLU 2/2" in verdict["text"] and "swap to GELU 1/2" in verdict["text"]

    for run in story["runs"]:
        for name in STRATEGIES:
            run["strategies"][name]["cost"]["train_seconds"] = 2.0
        run["strategies"]["reinit"]["cost"]["train_seconds"] = 0.5
    assert _resummarised(story)["summary"]["verdicts"]["cost"]["winner"] == "reinit"


def test_lower_lr_and_leaky_relu_verdicts_count_units(demo_run):
    *_, result = demo_run
    story = copy.deepcopy(result)
    dead = [sum(layer["dead"] for layer in r["checkpoint"]["layers"]) for r in story["runs"]]
    _plant(story, "lower_lr", "resurrected", [[0] * 5, [0] * 5])
    verdict = _resummarised(story)["summary"]["verdicts"]["lower_lr_resurrects"]
    assert verdict["answer"] == "no" and f"0 of the {sum(dead)} units" in verdict["text"]
    _plant(story, "lower_lr", "resurrected", [[d, 0, 0, 0, 0] for d in dead])
    assert _resummarised(story)["summary"]["verdicts"]["lower_lr_resurrects"]["answer"] == "yes"
    real = result["summary"]["verdicts"]["lower_lr_resurrects"]
    revived = sum(sum(r["strategies"]["lower_lr"]["resurrected"]) for r in result["runs"])
    assert f"{revived} of the {sum(dead)} units" in real["text"]

    # A control that diverged in seed 1: both numbers count seed 0 only (one denominator, said so).
    _plant(story, "lower_lr", "resurrected", [[1, 0, 0, 0, 0], [2, 0, 0, 0, 0]])
    _plant(story, "control", "resurrected", [[3, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    _plant(story, "control", "diverged", [False, True])
    text = _resummarised(story)["summary"]["verdicts"]["lower_lr_resurrects"]["text"]
    assert f"1 of the {dead[0]} units dead" in text and f"3 of the same {dead[0]} revived" in text, text
    assert "over the 1 of 2 seeds" in text, text

    leaky = result["summary"]["verdicts"]["leaky_relu_never_positive"]
    never = [r["strategies"]["leaky_relu"]["final_dead_fraction"] for r in result["runs"]]
    assert leaky["answer"] == ("yes" if max(never) > 0 else "no")
    _plant(story, "leaky_relu", "final_dead_fraction", [0.0, 0.0])
    assert _resummarised(story)["summary"]["verdicts"]["leaky_relu_never_positive"]["answer"] == "no"


def test_demo_is_reproducible_for_a_fixed_seed(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        run_demo(epochs=1, checkpoint_epoch=1, seeds=1, seed=5, out=out, progress=False, plots=False, html=False)
        runs.append(json.loads((out / "results.json").read_text()))
    assert _strip_times(runs[0]) == _strip_times(runs[1])


def test_standardize_flag_standardises_the_inputs(tmp_path):
    out = tmp_path / "std"
    assert main(["demo", "--standardize", "--seeds", "1", "--checkpoint-epoch", "1", "--epochs", "1",
                 "--out", str(out), "--no-progress", "--no-live"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["standardize"] is True and result["config"]["inputs"] == "standardised"
    assert "standardised" in result["dataset"]["source"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte" in err
    for bad in (["--epochs", "0"], ["--seeds", "0"], ["--checkpoint-epoch", "0"]):
        with pytest.raises(SystemExit):
            main(["demo", *bad])
    with pytest.raises(deadrelu.DeadReluError, match="strategy"):
        rescue_story(load_dataset("digits"), setting=DemoSetting(strategies=("magic",)), progress=False)
    with pytest.raises(deadrelu.DeadReluError, match="classification"):
        rescue_story(load_dataset("regression"), progress=False)


def test_demo_runs_on_mnist_idx_files(tmp_path):
    from deadrelu.lab.datasets import MNIST_FILES
    from deadrelu.lab.idx import write_idx

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (n, 28, 28), generator=g).to(torch.uint8) for n in (40, 20)]
    labels = [(torch.arange(n) % 10).to(torch.uint8) for n in (40, 20)]
    for name, t in zip(MNIST_FILES, (images[0], labels[0], images[1], labels[1])):
        write_idx(tmp_path / (name + ".gz"), t)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path), "--seeds", "1", "--epochs", "1",
                     "--checkpoint-epoch", "1", "--out", str(out), "--no-progress", "--no-live"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"]["name"] == "mnist" and result["dataset"]["train"] == 40
    assert result["dataset"]["features"] == 784
