"""Each experiment at reduced size: structure, exact agreement with brute force, divergence, reproducibility."""

from __future__ import annotations

import json

import pytest
import torch

from deadrelu.cli.main import main
from deadrelu.lab.datasets import load_dataset
from deadrelu.errors import DeadReluError
from deadrelu.lab.experiments import activations, init_depth, lr_sweep, result_table, run_experiment
from deadrelu.lab.schema import DEMO_SCHEMA_VERSION

pytest.importorskip("sklearn")


def _brute_dead(model: torch.nn.Sequential, x: torch.Tensor) -> list[int]:
    """Dead units per ReLU layer, straight from the full activation tensor."""
    dead = []
    with torch.no_grad():
        h = x
        for layer in model:
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                dead.append(int(((h > 0).sum(0) == 0).sum()))
    return dead


def test_lr_sweep_counts_match_brute_force_and_divergence_is_reported():
    result = lr_sweep(lrs=(0.05, 1e4), seeds=(0, 1), epochs=2, progress=False)
    assert [r["lr"] for r in result["rows"]] == [0.05, 1e4]
    assert len(result["runs"]) == 4
    # An absurd learning rate diverges in every seed, and no dead count is invented for it.
    huge = result["rows"][1]
    assert huge["diverged"] == 2 and huge["dead_fraction_mean"] == [None, None]
    assert any("diverged (NaN) in all 2 seeds" in line for line in result["summary"]["lines"])
    # Re-run one setting by hand: the reported dead units are exactly the brute-force count.
    from deadrelu.lab.training import build_mlp, torch_threads, train_epoch

    ds = load_dataset("regression", seed=0)
    run = next(r for r in result["runs"] if r["lr"] == 0.05 and r["seed"] == 1)
    with torch_threads(1):  # the experiment trains single-threaded; match its arithmetic
        model = build_mlp(4, (64, 32), 1, init="default", seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            train_epoch(model, opt, ds, 1, gen)
    assert [layer["dead"] for layer in run["layers"]] == _brute_dead(model, ds.x_train)
    rows = result_table(result)
    assert rows[0][0] == "LR" and rows[2][-2] == "2/2"


def test_lr_sweep_is_reproducible():
    a = lr_sweep(lrs=(0.1,), seeds=(3,), epochs=2, progress=False)
    b = lr_sweep(lrs=(0.1,), seeds=(3,), epochs=2, progress=False)
    assert a["runs"] == b["runs"]


def test_activations_uses_each_function_and_lecun_for_selu():
    result = activations(names=("relu", "prelu", "selu"), epochs=1, hidden=(16, 16), progress=False)
    rows = {r["activation"]: r for r in result["rows"]}
    assert [layer["function"] for layer in rows["relu"]["layers"]] == ["relu", "relu"]
    assert [layer["function"] for layer in rows["selu"]["layers"]] == ["selu", "selu"]
    assert rows["selu"]["init"] == "lecun" and rows["relu"]["init"] == "he"
    # PReLU adds exactly one learnable slope per layer; nothing else changes the parameter count.
    assert rows["prelu"]["params"] == rows["relu"]["params"] + 2
    for r in result["rows"]:
        assert 0.0 <= r["dead_fraction"] <= 1.0 and 0.0 <= r["dormant_fraction"] <= 1.0
        assert r["diverged"] or 0.0 <= r["val_accuracy"] <= 1.0
    assert len(result_table(result)) == 4


def test_init_born_dead_matches_brute_force_and_is_scale_invariant():
    result = init_depth(inits=("default", "he", "lecun"), depths=(1, 4), width=32, epochs=1, progress=False)
    assert len(result["rows"]) == 6
    ds = load_dataset("digits")
    from deadrelu.lab.training import build_mlp

    for row in result["rows"]:
        model = build_mlp(64, (32,) * row["depth"], 10, init=row["init"], seed=0)
        assert [round(f * 32) for f in row["born_dead_per_layer"]] == _brute_dead(model, ds.x_train)
    # With zero biases, He and LeCun differ only by a positive scale, which never flips a ReLU's sign:
    # the same units are born dead.
    he = {r["depth"]: r["born_dead_per_layer"] for r in result["rows"] if r["init"] == "he"}
    lecun = {r["depth"]: r["born_dead_per_layer"] for r in result["rows"] if r["init"] == "lecun"}
    assert he == lecun
    assert result_table(result)[0][:3] == ["init", "depth", "born dead%"]


def test_rescue_experiment_runs_the_story():
    result = run_experiment("rescue", epochs=1, checkpoint_epoch=1, seeds=(0,), progress=False)
    assert result["experiment"] == "rescue" and result["dataset"]["name"] == "digits"
    assert set(result["strategies"]) == {"control", "lower_lr", "leaky_relu", "reinit", "gelu"}


def test_a_saved_rescue_result_is_read_back_by_the_report_and_later_experiments(tmp_path, capsys):
    # rescue.json has the demo's schema (it is the demo's comparison); it used to be refused as
    # "newer than this deadrelu reads", which broke `deadrelu report DIR` and every later experiment in DIR.
    out = tmp_path / "res"
    assert main(["experiment", "rescue", "--epochs", "1", "--seeds", "1", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "rescue.json").read_text())["schema_version"] == DEMO_SCHEMA_VERSION
    capsys.readouterr()
    assert main(["report", str(out)]) == 0, capsys.readouterr().err
    assert main(["experiment", "lr-sweep", "--epochs", "1", "--seeds", "1", "--out", str(out), "--no-progress"]) == 0
    page = (out / "report.html").read_text()
    assert "Rescue comparison on digits" in page and "Dead units vs learning rate" in page


def test_preprocessing_compares_the_same_seeds_with_both_scalings_exactly():
    result = run_experiment("preprocessing", epochs=1, seeds=(0, 1), hidden=(32, 32), progress=False)
    assert [(r["inputs"], r["epoch"]) for r in result["rows"]] == [
        ("in [0, 1]", 0), ("in [0, 1]", 1), ("standardised", 0), ("standardised", 1)]
    from deadrelu.lab.training import build_mlp

    # Born dead (epoch 0) is a pure function of weights and inputs: check it by brute force for both scalings.
    for standardize, row in ((False, result["rows"][0]), (True, result["rows"][2])):
        ds = load_dataset("digits", seed=0, standardize=standardize)
        last = [_brute_dead(build_mlp(64, (32, 32), 10, seed=s), ds.x_train)[-1] / 32 for s in (0, 1)]
        assert row["last_layer_dead_fraction_by_seed"] == pytest.approx(last)
        assert row["dead_fraction_median"][-1] == pytest.approx(sum(last) / 2)
    assert len(result["summary"]["lines"]) == 4
    table = result_table(result)
    assert table[0][:3] == ["inputs", "epoch", "dead% h1"] and len(table) == 5
    pytest.importorskip("matplotlib")
    from deadrelu.lab import plots

    ax = plots.preprocessing_bands(result).axes[0]
    line = next(l for l in ax.get_lines() if l.get_label() == "inputs standardised")
    assert list(line.get_ydata()) == pytest.approx([100 * m[-1] for m in
                                                    (r["dead_fraction_median"] for r in result["rows"][2:])])


def test_preprocessing_describes_both_scalings_it_compares():
    # its dataset.source (the report's meta line) used to describe the standardised data set only
    result = run_experiment("preprocessing", epochs=1, seeds=(0,), hidden=(8, 8), progress=False)
    source = result["dataset"]["source"]
    assert "in [0, 1]" in source and "standardised" in source, source


def test_run_experiment_rejects_bad_names_and_options():
    with pytest.raises(DeadReluError, match="choose one of"):
        run_experiment("nope")
    with pytest.raises(DeadReluError, match="does not take dataset"):
        run_experiment("lr-sweep", dataset="digits")
    with pytest.raises(DeadReluError, match="unknown activation"):
        activations(names=("tanhh",), progress=False)


def test_experiment_cli_writes_json_plot_and_report(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["experiment", "lr-sweep", "--epochs", "1", "--seeds", "1", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    data = json.loads((out / "lr-sweep.json").read_text())
    assert data["experiment"] == "lr-sweep" and data["config"]["seeds"] == [0]
    for name in ("lr-sweep.json", "lr-sweep-bars.png", "report.html"):
        assert (out / name).is_file() and name in stdout
    assert str(out.resolve()) in stdout
    assert main(["experiment", "lr-sweep", "--dataset", "digits", "--out", str(out)]) == 2
    assert "drop --dataset" in capsys.readouterr().err


def test_experiment_cli_rejects_options_the_experiment_does_not_take(tmp_path, capsys):
    assert main(["experiment", "init", "--seeds", "3", "--out", str(tmp_path)]) == 2
    assert "--seeds applies to lr-sweep, rescue and preprocessing" in capsys.readouterr().err
    assert main(["experiment", "init", "--standardize", "--out", str(tmp_path)]) == 2
    assert "--standardize applies to rescue only" in capsys.readouterr().err
    assert main(["experiment", "lr-sweep", "--seed", "3", "--out", str(tmp_path)]) == 2
    assert "--seeds N" in capsys.readouterr().err


def test_a_diverged_activation_is_shown_as_diverged_not_as_zero():
    row = {"activation": "elu", "init": "he", "dead_fraction": 0.0, "dormant_fraction": 0.0, "nonfinite_fraction": 1.0,
           "val_accuracy": 0.0, "diverged": True, "train_seconds": 1.0, "params": 10}
    table = result_table({"experiment": "activations", "rows": [row]})
    assert table[1][:6] == ["elu", "he", "diverged", "-", "100.0", "-"]
