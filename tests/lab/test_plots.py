"""Plots: drawn from result dicts, with the lines, bars, labels and dead units the data says."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from deadrelu.lab import plots  # noqa: E402
from deadrelu.lab.datasets import load_dataset  # noqa: E402
from deadrelu.lab.experiments import lr_sweep  # noqa: E402


@pytest.fixture(scope="module")
def story():
    from deadrelu.lab.demo import DemoSetting, seeds_story

    return seeds_story(load_dataset("digits"), seeds=(0, 1, 2), progress=False,
                       setting=DemoSetting(checkpoint_epoch=2, epochs=2, hidden=(16, 16, 16)))


def _decoded(png: bytes):
    import io

    import matplotlib.image as mpimg

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(png), format="png")


def _band_values(ax, label):
    """The median line's y values and the band's (min, max) at each x of the named line."""
    import numpy as np

    line = next(l for l in ax.get_lines() if l.get_label() == label)
    index = [l.get_label() for l in ax.get_lines()].index(label)
    band = ax.collections[index].get_paths()[0].vertices
    xs = list(line.get_xdata())
    lo = [band[:, 1][np.isclose(band[:, 0], x)].min() for x in xs]
    hi = [band[:, 1][np.isclose(band[:, 0], x)].max() for x in xs]
    return xs, list(line.get_ydata()), lo, hi


def test_dead_by_layer_is_the_median_and_range_over_seeds_on_both_splits(story):
    import statistics

    fig = plots.dead_by_layer(story)
    ax_train, ax_val = fig.axes[:2]
    for ax, key in ((ax_train, "layers"), (ax_val, "val_layers")):
        assert [l.get_label() for l in ax.get_lines() if not l.get_label().startswith("_")] == ["h1", "h2", "h3"]
        xs, med, lo, hi = _band_values(ax, "h3")
        assert xs == [0, 1, 2, 3, 4]  # initialisation, the shared phase to the checkpoint, then the control
        per_seed = []
        for run in story["runs"]:
            records = [run["initial"], *run["baseline"]["epochs"], *run["strategies"]["control"]["epochs"]]
            per_seed.append([100 * r[key][2]["dead_fraction"] for r in records])
        for e in range(5):
            at = [s[e] for s in per_seed]
            assert med[e] == pytest.approx(statistics.median(at))
            assert lo[e] == pytest.approx(min(at)) and hi[e] == pytest.approx(max(at))
    assert "training set" in ax_train.get_title() and "validation set" in ax_val.get_title()
    assert _decoded(plots.figure_png(fig)).std() > 0.01  # not a blank canvas


def test_firing_heatmap_marks_exactly_the_dead_units():
    rates = [[0.0, 0.5, 1.0, 0.0], [0.2, 0.3, 0.0, 0.9]]
    fig = plots.firing_heatmap(rates)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["h1 (2 dead)", "h2 (1 dead)"]
    data = ax.get_images()[0].get_array()
    assert data.mask.tolist() == [[True, False, False, True], [False, False, True, False]]
    assert "firing rate" in fig.axes[1].get_ylabel()


def test_firing_heatmap_never_draws_or_counts_a_non_finite_unit_as_dead():
    import math

    # None: how firing_rates saves a NaN/Inf unit; NaN: the same from a caller's own list; h2 is shorter.
    rates = [[0.0, None, 0.5, math.nan], [0.0, 0.2]]
    fig = plots.firing_heatmap(rates)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["h1 (1 dead, 2 non-finite)", "h2 (1 dead)"]
    rate_layer, state_layer = ax.get_images()
    # the colour scale shows only the finite rates; dead, non-finite and padding cells are left to the layer below
    assert rate_layer.get_array().mask.tolist() == [[True, True, False, True], [True, False, True, True]]
    states = state_layer.get_array()  # 0: dead (black), 1: non-finite (red), masked: neither
    assert states.mask.tolist() == [[False, False, True, False], [False, True, True, True]]
    assert states.filled(-1).tolist() == [[0.0, 1.0, -1, 1.0], [0.0, -1, -1, -1]]
    assert state_layer.cmap(1.0)[:3] != state_layer.cmap(0.0)[:3] == (0.0, 0.0, 0.0)
    assert "non-finite" in ax.get_title()
    finite_only = plots.firing_heatmap([[0.0, 0.5]]).axes[0]
    assert "non-finite" not in finite_only.get_title() + finite_only.get_yticklabels()[0].get_text()


def test_rescue_panels_one_per_strategy_on_the_same_axes(story):
    fig = plots.rescue_panels(story)
    labels = [v["label"] for v in story["strategies"].values()]
    dead_row, acc_row = fig.axes[: len(labels)], fig.axes[len(labels):]
    assert [ax.get_title().split("\n")[0] for ax in dead_row] == labels
    assert all("seeds diverged" in ax.get_title() for ax in dead_row)
    # Same axes in every panel of a row, so no strategy's line hides or dwarfs another's.
    assert len({ax.get_ylim() for ax in dead_row}) == 1 and len({ax.get_ylim() for ax in acc_row}) == 1
    assert len({ax.get_xlim() for ax in fig.axes}) == 1
    xs, med, lo, hi = _band_values(dead_row[3], "median")  # re-initialise dead units
    assert xs == [2, 3, 4]
    import statistics

    final = [100 * r["strategies"]["reinit"]["final"][-1]["dead_fraction"] for r in story["runs"]]
    assert med[-1] == pytest.approx(statistics.median(final))
    assert lo[-1] == pytest.approx(min(final)) and hi[-1] == pytest.approx(max(final))


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
    assert sorted(p.name for p in paths.values()) == ["demo-heatmap.png", "demo-layers.png", "demo-rescue.png"]
    for p in paths.values():
        assert _decoded(p.read_bytes()).shape[0] > 100


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"deadrelu\[plot\]"):
        plots.firing_heatmap([[0.5]])
