"""Plots: drawn from result dicts, with the lines, bars, labels and dead units the data says."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from deadrelu.lab import plots  # noqa: E402
from deadrelu.lab.datasets import load_dataset  # noqa: E402
from deadrelu.lab.demo import rescue_story  # noqa: E402
from deadrelu.lab.experiments import lr_sweep  # noqa: E402


@pytest.fixture(scope="module")
def story():
    return rescue_story(load_dataset("digits"), epochs=2, hidden=(16, 16, 16), progress=False)


def _decoded(png: bytes):
    import io

    import matplotlib.image as mpimg

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(png), format="png")


def test_alive_over_training_has_one_line_per_layer(story):
    fig = plots.alive_over_training(story)
    ax = fig.axes[0]
    lines = [l for l in ax.get_lines() if l.get_label().startswith("L")]
    assert [l.get_label() for l in lines] == ["L1", "L2", "L3"]
    # y values are alive % = 100 - dead %, epoch 0 (initialisation) to the checkpoint.
    layer0 = [100 * (1 - r["layers"][0]["dead_fraction"]) for r in [story["initial"], *story["baseline"]["epochs"]]]
    assert list(lines[0].get_ydata()) == pytest.approx(layer0)
    assert list(lines[0].get_xdata()) == [0, 1, 2]
    assert "alive" in ax.get_ylabel() and ax.get_xlabel() == "epoch" and "LR 0.5" in ax.get_title()
    image = _decoded(plots.figure_png(fig))
    assert image.std() > 0.01  # not a blank canvas


def test_firing_heatmap_marks_exactly_the_dead_units():
    rates = [[0.0, 0.5, 1.0, 0.0], [0.2, 0.3, 0.0, 0.9]]
    fig = plots.firing_heatmap(rates)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L1 (2 dead)", "L2 (1 dead)"]
    data = ax.get_images()[0].get_array()
    assert data.mask.tolist() == [[True, False, False, True], [False, False, True, False]]
    assert "firing rate" in fig.axes[1].get_ylabel()


def test_rescue_curves_draw_every_strategy_in_both_panels(story):
    fig = plots.rescue_curves(story)
    ax_dead, ax_acc = fig.axes[:2]
    labels = [v["label"] for v in story["strategies"].values() if "skipped" not in v]
    for ax in (ax_dead, ax_acc):
        drawn = [l.get_label() for l in ax.get_lines() if not l.get_label().startswith("_")]
        assert drawn == ["shared phase", *labels]
    assert "%" in ax_dead.get_ylabel() and "accuracy" in ax_acc.get_ylabel()
    for line in ax_dead.get_lines()[1:]:
        if not line.get_label().startswith("_"):
            assert list(line.get_xdata()) == [2, 3, 4]


def test_lr_sweep_bars_one_bar_per_layer_and_lr_with_divergence_marked():
    result = lr_sweep(lrs=(0.01, 1e4), seeds=(0,), epochs=1, progress=False)
    fig = plots.lr_sweep_bars(result)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "10000"]
    assert any("NaN in 1/1 seeds" in t.get_text() for t in ax.texts)


def test_plots_for_writes_pngs(story, tmp_path):
    story = dict(story, experiment="demo")
    paths = plots.plots_for(story, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["demo-alive.png", "demo-heatmap.png", "demo-rescue.png"]
    for p in paths.values():
        assert _decoded(p.read_bytes()).shape[0] > 100


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"deadrelu\[plot\]"):
        plots.firing_heatmap([[0.5]])
