"""The demo end to end at reduced epochs: CLI outputs, JSON contents, reproducibility, honest summary."""

from __future__ import annotations

import json

import pytest
import torch

import deadrelu
from deadrelu.cli.main import main
from deadrelu.lab.datasets import load_dataset
from deadrelu.lab.demo import CLASSIC_THRESHOLD, STRATEGIES, rescue_story, result_table, summarise

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _strip_times(obj):
    """The result without wall-clock fields (the only thing allowed to differ between two runs)."""
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items()
                if k not in ("seconds", "train_seconds", "surgery_seconds", "wall_seconds", "outputs")}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--epochs", "2", "--out", str(out), "--no-progress", "--seed", "3"])
    return code, buf.getvalue(), out


def test_demo_cli_writes_everything_and_says_where(demo_run):
    code, stdout, out = demo_run
    assert code == 0
    for name in ("results.json", "report.html", "demo-alive.png", "demo-heatmap.png", "demo-rescue.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
        assert name in stdout
    assert str(out.resolve()) in stdout
    assert "total wall time:" in stdout
    for strategy in ("no rescue (control)", "lower LR", "LeakyReLU", "re-initialise", "GELU"):
        assert strategy in stdout


def test_demo_json_has_per_epoch_dead_fractions_for_every_layer_and_strategy(demo_run):
    _, _, out = demo_run
    result = json.loads((out / "results.json").read_text())
    assert result["kind"] == "deadrelu.evidence" and result["experiment"] == "demo"
    assert result["config"]["epochs"] == 2 and result["config"]["lr"] == 0.5
    assert [r["epoch"] for r in result["baseline"]["epochs"]] == [1, 2]
    layers = [r["site"] for r in result["checkpoint"]["layers"]]
    assert len(layers) == 5
    assert set(result["strategies"]) == set(STRATEGIES)
    for name, strategy in result["strategies"].items():
        assert "skipped" not in strategy, f"{name} was skipped: {strategy.get('skipped')}"
        assert [r["epoch"] for r in strategy["epochs"]] == [3, 4]
        for record in strategy["epochs"]:
            assert [layer["site"] for layer in record["layers"]] == layers
            for layer in record["layers"]:
                assert layer["units"] == 128
                assert layer["dead_fraction"] == pytest.approx(layer["dead"] / 128)
    # The heatmap data agrees with the counts: a dead unit is exactly one with firing rate 0.
    for layer, rates in zip(result["checkpoint"]["layers"], result["checkpoint"]["firing_rates"]):
        assert len(rates) == 128
        assert sum(1 for r in rates if r == 0) == layer["dead"] + layer["nonfinite"] * 0
    swapped = {s: result["strategies"][s]["epochs"][-1]["layers"][0]["function"] for s in STRATEGIES}
    assert swapped["control"] == "relu" and swapped["lower_lr"] == "relu" and swapped["reinit"] == "relu"
    assert swapped["leaky_relu"] == "leaky_relu" and swapped["gelu"] == "gelu"
    assert result["strategies"]["lower_lr"]["lr"] == pytest.approx(0.05)


def test_checkpoint_numbers_match_an_independent_scan():
    """Retrain the first phase by hand and scan it: the story's checkpoint numbers are exactly that scan's."""
    ds = load_dataset("digits", seed=0)
    story = rescue_story(ds, epochs=2, seed=0, strategies=("control",), progress=False)
    from deadrelu.lab.training import build_mlp, train_epoch

    net = build_mlp(ds.features, (128,) * 5, 10, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_epoch(net, opt, ds, 64, gen)
    with torch.no_grad():
        pre = ds.x_train
        dead = []
        for layer in net:
            pre = layer(pre)
            if isinstance(layer, torch.nn.ReLU):
                dead.append(int(((pre > 0).sum(0) == 0).sum()))
    assert [r["dead"] for r in story["checkpoint"]["layers"]] == dead


def test_demo_is_reproducible_for_a_fixed_seed(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        deadrelu.lab.demo.run_demo(epochs=1, seed=5, out=out, progress=False, plots=False, html=False)
        runs.append(json.loads((out / "results.json").read_text()))
    assert _strip_times(runs[0]) == _strip_times(runs[1])


def _story_with_last_layer(fraction, diverged=False):
    layer = {"site": "9", "function": "relu", "units": 100, "dead": int(100 * fraction), "asleep": 0,
             "dormant": 0, "nonfinite": 0, "dead_fraction": fraction, "dormant_fraction": 0, "nonfinite_fraction": 0}
    first = dict(layer, site="1", dead=0, dead_fraction=0.0)
    rec = {"epoch": 1, "diverged": diverged, "layers": [first, layer], "val_accuracy": 0.5}
    strat = {"label": "no rescue (control)", "epochs": [rec], "final": rec["layers"], "final_dead_fraction": fraction / 2,
             "val_accuracy": 0.5, "diverged": False}
    return {"config": {"lr": 0.5, "epochs": 1},
            "baseline": {"epochs": [rec]},
            "checkpoint": {"epoch": 1, "layers": rec["layers"], "dead_fraction": fraction / 2, "diverged": diverged,
                           "val_accuracy": 0.5},
            "strategies": {"control": strat}}


def test_summary_says_when_the_classic_lesson_did_not_reproduce():
    low = summarise(_story_with_last_layer(0.10))
    assert low["classic_reproduced"] is False
    assert any("did not reproduce" in line for line in low["lines"])
    assert any("10/100" in line and "10.0%" in line for line in low["lines"])
    high = summarise(_story_with_last_layer(0.45))
    assert high["classic_reproduced"] is True
    assert any("reproduced on this run" in line for line in high["lines"])
    edge = summarise(_story_with_last_layer(CLASSIC_THRESHOLD))
    assert edge["classic_reproduced"] is False  # "more than 40%" means strictly more


def test_divergence_is_reported_as_divergence():
    story = rescue_story(load_dataset("digits"), epochs=2, lr=100.0, strategies=("control",), progress=False)
    assert story["checkpoint"]["diverged"] is True
    assert any("diverged" in line for line in story["summary"]["lines"])
    rows = result_table(story)
    assert rows[1][-3] == "0.0"  # NaN outputs are wrong answers, not a lucky 10% (argmax of NaN)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte" in err
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    with pytest.raises(deadrelu.DeadReluError, match="strategy"):
        rescue_story(load_dataset("digits"), epochs=1, strategies=("magic",), progress=False)
    with pytest.raises(deadrelu.DeadReluError, match="classification"):
        rescue_story(load_dataset("regression"), epochs=1, progress=False)


def test_summary_names_no_winner_when_nothing_beats_the_control():
    story = _story_with_last_layer(0.10)
    control = story["strategies"]["control"]
    story["strategies"]["gelu"] = dict(control, label="swap to GELU", val_accuracy=0.7)
    tie = summarise(story)
    assert tie["best_strategy"] is None
    assert any("No rescue ended with fewer dead units than the control" in line for line in tie["lines"])
    assert any("Highest validation accuracy: swap to GELU with 70.0%" in line for line in tie["lines"])
    story["strategies"]["gelu"]["final_dead_fraction"] = 0.0
    win = summarise(story)
    assert win["best_strategy"] == "gelu"
    assert any(line.startswith("Fewest dead units after 1 more epochs: swap to GELU with 0.0%") for line in win["lines"])


def test_demo_runs_on_mnist_idx_files(tmp_path, capsys):
    from deadrelu.lab.datasets import MNIST_FILES
    from deadrelu.lab.idx import write_idx

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (n, 28, 28), generator=g).to(torch.uint8) for n in (40, 20)]
    labels = [(torch.arange(n) % 10).to(torch.uint8) for n in (40, 20)]
    for name, t in zip(MNIST_FILES, (images[0], labels[0], images[1], labels[1])):
        write_idx(tmp_path / (name + ".gz"), t)
    out = tmp_path / "out"
    assert main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"]["name"] == "mnist" and result["dataset"]["train"] == 40
    assert result["dataset"]["features"] == 784
