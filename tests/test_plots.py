"""The accuracy profile (the paper's Figure 3) draws what the runs say."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import keras_mgda as km  # noqa: E402

# Figures from results: once, under torch (tests/conftest.py); the callbacks
# that read a training step are `all_backends`.
pytestmark = pytest.mark.one_backend


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


def test_accuracy_profile_names_coinciding_references_once():
    """The paper's MGDA-UB and single-task points are 0.03 apart: one name
    for both, not two printed over each other; a distinct point keeps its
    own."""
    figure = km.plots.accuracy_profile(
        _results(),
        references={"mgda_ub": (97.26, 95.90), "single_task": (97.23, 95.90), "uniform": (96.46, 94.99)},
    )
    ax = figure.axes[0]
    assert sorted(text.get_text() for text in ax.texts) == ["mgda_ub, single_task", "uniform"]
    assert sum(line.get_label() in ("mgda_ub", "single_task", "uniform") for line in ax.lines) == 3
    plt.close(figure)


def test_accuracy_profile_of_a_full_campaign_keeps_methods_apart():
    """Thirty methods within a point of each other: each its own marker and
    colour, the legend beside the axes (inside it would cover them), and a
    reference name near the right edge runs leftwards."""
    runs = [_run(f"method{i:02d}", 0, 0.960 + 0.0003 * i, 0.950 - 0.0002 * i) for i in range(30)]
    figure = km.plots.accuracy_profile(runs, references={"paper": (96.87, 94.4)})
    ax = figure.axes[0]
    styles = [(c.lines[0].get_marker(), c.lines[0].get_color()) for c in ax.containers]
    assert len(styles) == 30 and len(set(styles)) == 30
    figure.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1
    assert [text.get_ha() for text in ax.texts] == ["right"]
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


# Training figures and callbacks ----------------------------------------------


def _two_task_model(weighting="mgda"):
    import keras

    import keras_mgda as km

    keras.utils.set_random_seed(0)
    x = keras.Input((6,))
    z = keras.layers.Dense(8, activation="tanh")(x)
    outputs = {"a": keras.layers.Dense(1, name="a")(z), "b": keras.layers.Dense(1, name="b")(z)}
    model = km.MultiTaskModel(x, outputs, weighting=km.weighting.MGDA(normalization="none")
                              if weighting == "mgda" else weighting)
    model.compile("sgd", loss={"a": "mse", "b": "mse"})
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(32, 6)).astype("float32")
    return model, xs, {"a": xs[:, :1], "b": -xs[:, :1] + 0.1 * xs[:, 1:2]}


def test_task_weights_draws_one_line_per_task_from_history_and_csv(tmp_path):
    import keras

    from keras_mgda import plots

    model, x, y = _two_task_model()
    csv = tmp_path / "history.csv"
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[keras.callbacks.CSVLogger(str(csv))])
    for source in (history, history.history, str(csv)):
        ax = plots.task_weights(source).axes[0]
        assert [line.get_label() for line in ax.lines] == ["a", "b"]
        np.testing.assert_allclose(ax.lines[0].get_ydata(), history.history["a_alpha"], rtol=1e-6)
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
        assert ax.get_xlabel() == "epoch"
    with pytest.raises(ValueError, match="_alpha"):
        plots.task_weights({"loss": [1.0]})


def test_radar_closes_one_line_per_method():
    from keras_mgda import plots

    scores = {"MGDA-UB": {"s": 0.1, "m": 0.02, "y": 0.12}, "uniform": {"s": 0.2, "m": 0.03, "y": 0.1}}
    ax = plots.radar(scores, percent=True).axes[0]
    assert [line.get_label() for line in ax.lines] == ["MGDA-UB", "uniform"]
    radii = ax.lines[0].get_ydata()
    np.testing.assert_allclose(radii, [10.0, 2.0, 12.0, 10.0])  # closed: back to the first
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s", "m", "y"]
    with pytest.raises(ValueError, match="no score"):
        plots.radar({"a": {"s": 1.0}}, tasks=["s", "m"])


def test_cosine_matrix_and_heatmap():
    from keras_mgda import plots

    g = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])
    cosine = plots.cosine_matrix(g @ g.T)
    np.testing.assert_allclose(cosine, [[1, -np.sqrt(0.5), 0], [-np.sqrt(0.5), 1, 0], [0, 0, 1]], atol=1e-12)
    figure = plots.conflict_heatmap(g @ g.T, ["a", "b", "c"])
    image = figure.axes[0].images[0]
    np.testing.assert_allclose(image.get_array(), cosine)
    assert image.get_clim() == (-1.0, 1.0)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["a", "b", "c"]


@pytest.mark.all_backends  # reads the backend's train step
def test_gram_recorder_keeps_the_step_gram_matrix():
    """The recorded matrix is the one the step solved: MGDA's weights from
    it are the logged weights (one step per epoch)."""
    import keras_mgda as km

    model, x, y = _two_task_model()
    recorder = km.callbacks.GramRecorder(every_n_steps=1)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[recorder])
    assert recorder.steps == [1, 2] and recorder.task_names == ["a", "b"]
    for gram, a, b in zip(recorder.grams, history.history["a_alpha"], history.history["b_alpha"], strict=True):
        assert gram.shape == (2, 2) and np.allclose(gram, gram.T) and np.all(np.diag(gram) > 0)
        np.testing.assert_allclose(np.asarray(km.solvers.min_norm(gram)), [a, b], rtol=1e-4, atol=1e-6)
    loss_based, x, y = _two_task_model("uniform")
    with pytest.raises(ValueError, match="computes none"):
        loss_based.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[km.callbacks.GramRecorder(1)])


@pytest.mark.all_backends  # reads the backend's train step
def test_task_tensorboard_writes_weights_and_the_conflict_image(tmp_path):
    pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import keras_mgda as km

    model, x, y = _two_task_model()
    callback = km.callbacks.TaskTensorBoard(str(tmp_path), every_n_steps=1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    events = EventAccumulator(str(tmp_path / "train"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"task_weights/a", "task_weights/b"} <= set(tags["tensors"]) | set(tags["scalars"])
    assert "task_conflict" in set(tags["tensors"]) | set(tags["images"])


def test_accuracy_profile_lists_a_diverged_method_off_the_axes():
    """A run at chance (11% / 11%) would squeeze every other method into a
    corner: it is named in the legend with its accuracies instead, unless
    failed_below=None asks for every point."""
    results = _results()
    results["runs"].append(_run("fairgrad", 0, 0.1135, 0.1128))
    ax = km.plots.accuracy_profile(results).axes[0]
    assert ax.get_xlim()[0] > 90 and ax.get_ylim()[0] > 90, (ax.get_xlim(), ax.get_ylim())
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    failed = "fairgrad: 11.35 / 11.28, off the axes"
    assert labels[3:5] == [failed, "pcgrad"], labels  # in its place among the methods
    assert np.isnan(np.asarray(_containers(ax)[failed].lines[0].get_xdata(), float)).all()
    ax = km.plots.accuracy_profile(results, failed_below=None).axes[0]
    assert "fairgrad" in _containers(ax) and ax.get_xlim()[0] < 12
    plt.close("all")


# Figures that fit: nothing a reader needs is cut off by the saved figure --


def _inside_figure(figure, artist):
    """The artist's drawn box lies within the figure's (to a pixel)."""
    figure.canvas.draw()
    box, frame = artist.get_window_extent(figure.canvas.get_renderer()), figure.bbox
    return box.x0 >= frame.x0 - 1 and box.y0 >= frame.y0 - 1 and box.x1 <= frame.x1 + 1 and box.y1 <= frame.y1 + 1


def test_conflict_heatmap_of_two_tasks_keeps_its_title_and_colour_bar_label():
    figure = km.plots.conflict_heatmap([[1.0, -0.5], [-0.5, 2.0]], ["left", "right"])
    ax, colour_bar = figure.axes
    assert _inside_figure(figure, ax.title)
    assert colour_bar.get_ylabel() == "cosine" and _inside_figure(figure, colour_bar.yaxis.label)
    # The cosines are written in their cells.
    assert sorted(text.get_text() for text in ax.texts) == ["-0.35", "-0.35", "1.00", "1.00"]
    plt.close(figure)


def test_radar_legend_and_title_stay_inside_the_figure():
    scores = {"MGDA-UB": {"s": 10.0, "m": 2.0, "y": 12.0}, "uniform": {"s": 20.0, "m": 3.0, "y": 10.0}}
    figure = km.plots.radar(scores, title="error", percent=True)
    ax = figure.axes[0]
    assert _inside_figure(figure, ax.get_legend()) and _inside_figure(figure, ax.title)
    figure.canvas.draw()
    assert all(label.get_text().endswith("%") for label in ax.get_yticklabels() if label.get_text())
    plt.close(figure)


def test_task_weights_ticks_are_whole_epochs():
    figure = km.plots.task_weights({"a_alpha": [0.4, 0.5, 0.6], "b_alpha": [0.6, 0.5, 0.4]})
    ax = figure.axes[0]
    figure.canvas.draw()
    ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    assert _inside_figure(figure, ax.get_legend())
    plt.close(figure)


def test_accuracy_profile_of_the_weightings_splits_them_by_family():
    """More than ten of the library's methods: one panel per family, each
    with the static curve and the single-task star, every method once,
    distinct colours within a panel and every legend inside the figure."""
    names = ["uniform", "mgda_ub", "dwa", "gls", "famo", "stch", "pcgrad", "upgrad", "nashmtl", "imtlg",
             "crmogm", "graddrop", "moco"]
    runs = [_run(name, 0, 0.960 + 0.0005 * i, 0.950 - 0.0003 * i) for i, name in enumerate(names)]
    runs += [_run("single_task", 0, 0.97, 0.957),
             _run("grid", 0, 0.955, 0.955, weights={"left": 0.5, "right": 0.5}),
             _run("grid", 0, 0.965, 0.945, weights={"left": 0.7, "right": 0.3})]
    figure = km.plots.accuracy_profile(runs, references={"paper": (96.5, 95.0)})
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert list(panels) == ["Sener & Koltun's comparison", "loss-based methods", "Gram-matrix methods",
                            "gradient aggregators"]
    drawn = []
    for title, ax in panels.items():
        labels = set(_containers(ax))
        assert {"grid (static weights)", "single task"} <= labels, title
        methods = [c for label, c in _containers(ax).items() if label not in ("grid (static weights)", "single task")]
        colours = [tuple(np.ravel(matplotlib.colors.to_rgba(c.lines[0].get_color()))) for c in methods]
        assert len(set(colours)) == len(colours), title
        drawn += [label for label in labels if label not in ("grid (static weights)", "single task")]
        assert _inside_figure(figure, ax.get_legend()), title
    assert len(drawn) == len(names) and "MGDA-UB" in drawn and "graddrop" in drawn
    assert [t.get_text() for t in panels["Sener & Koltun's comparison"].texts] == ["paper"]
    assert km.plots.accuracy_profile(runs, groups=None).axes[0].get_title().startswith("Accuracy profile")
    with pytest.raises(ValueError, match="groups"):
        km.plots.accuracy_profile(runs, groups="kind")
    plt.close("all")
