"""The accuracy profile (the paper's Figure 3) draws what the runs say."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import keras_mgda as km  # noqa: E402


def _run(method, seed, left, right, **extra):
    return {
        "method": method, "seed": seed, "left_acc": left, "right_acc": right,
        "authors_left_acc": left + 0.001, "authors_right_acc": right + 0.002, **extra,
    }


def _results():
    runs = [
        _run("mgda_ub", 0, 0.970, 0.958), _run("mgda_ub", 1, 0.974, 0.960),
        _run("uniform", 0, 0.964, 0.950), _run("uniform", 1, 0.966, 0.948),
        _run("single_task", 0, 0.972, 0.959),
        _run("pcgrad", 0, 0.965, 0.951),
    ]
    for w in (0.25, 0.5, 0.75):  # two seeds per grid point, given out of order
        for seed in (0, 1):
            runs.append(_run("grid", seed, 0.95 + 0.02 * w, 0.97 - 0.02 * w + 0.001 * seed,
                             weights={"left": w, "right": 1.0 - w}))
    runs.append(_run("grid", 0, 0.96, 0.96, weights={"left": 0.1, "right": 0.9}))
    return {"runs": runs[::-1]}


def _containers(ax):
    """The errorbar containers by legend label."""
    return {container.get_label(): container for container in ax.containers}


def test_accuracy_profile_draws_one_marker_per_method_and_the_grid_curve():
    results = _results()
    figure = km.plots.accuracy_profile(results)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "left accuracy (%)" and ax.get_ylabel() == "right accuracy (%)"
    drawn = _containers(ax)
    assert set(drawn) == {"MGDA-UB", "uniform", "pcgrad", "single task", "grid (static weights)"}
    for label in ("MGDA-UB", "uniform", "pcgrad", "single task"):
        line = drawn[label].lines[0]
        assert len(line.get_xdata()) == 1, label  # one marker per method
    # MGDA-UB at the mean over its two seeds, with the std as error bars.
    line = drawn["MGDA-UB"].lines[0]
    np.testing.assert_allclose([line.get_xdata()[0], line.get_ydata()[0]], [97.2, 95.9])
    segments = drawn["MGDA-UB"].lines[2][0].get_segments()  # x error bar
    np.testing.assert_allclose(segments[0][:, 0], [97.0, 97.4])
    # The grid: one point per weight vector (4 of them), joined, ordered by
    # the left weight.
    grid = drawn["grid (static weights)"].lines[0]
    assert grid.get_linestyle() == "-"
    assert len(grid.get_xdata()) == 4
    np.testing.assert_allclose(np.asarray(grid.get_xdata(), float), [96.0, 95.5, 96.0, 96.5])
    np.testing.assert_allclose(np.asarray(grid.get_ydata(), float), [96.0, 96.55, 96.05, 95.55])
    # The single task point is a star.
    assert drawn["single task"].lines[0].get_marker() == "*"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(legend) == 5 and "MGDA-UB" in legend
    plt.close(figure)


def test_accuracy_profile_takes_an_axes_and_the_authors_selection():
    results = _results()["runs"]  # the list works as well as the dict
    figure, (left_ax, right_ax) = plt.subplots(1, 2)
    returned = km.plots.accuracy_profile(
        results, ax=right_ax, selection="authors", percent=False,
        references={"MGDA-UB (paper)": (0.9726, 0.9590)},
    )
    assert returned is figure
    assert not left_ax.containers and len(right_ax.containers) == 5
    assert right_ax.get_xlabel() == "left accuracy"
    line = _containers(right_ax)["uniform"].lines[0]
    np.testing.assert_allclose([line.get_xdata()[0], line.get_ydata()[0]], [0.966, 0.951])
    paper = [line for line in right_ax.lines if line.get_label() == "MGDA-UB (paper)"]
    assert len(paper) == 1 and paper[0].get_xdata()[0] == 0.9726
    assert "authors" in right_ax.get_title()
    plt.close(figure)


def test_summarize_and_errors():
    summary = km.plots.summarize(_results())
    assert summary["uniform"]["seeds"] == 2 and summary["pcgrad"]["std"] == [0.0, 0.0]
    assert [entry["weights"]["left"] for entry in summary["grid"]] == [0.1, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="No run"):
        km.plots.accuracy_profile({"runs": []})
    with pytest.raises(ValueError, match="two tasks"):
        km.plots.accuracy_profile(_results(), tasks=("left",))
    with pytest.raises(ValueError, match="selection"):
        km.plots.summarize(_results(), selection="best")
