"""Plots draw what the evaluation or what-if result holds, skip unlogged steps, write PNGs atomically and leave
pyplot alone."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from simfluence.apps.plot import (
    error_over_steps,
    informative_tests,
    method_styles,
    plot_error_over_steps,
    plot_final_scatter,
    plot_report,
    plot_trajectories,
    plot_whatif,
)
from simfluence.counterfactual import WhatIf
from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.evaluation import Evaluation

N_RUNS, N_STEPS, N_TEST = 3, 20, 8
METHODS = ("mean_curve", "additive", "linear")


@pytest.fixture
def evaluation() -> Evaluation:
    """3 held-out runs of 20 steps, 8 test examples; run 1 logs every other step, run 2 stops after step 12."""
    rng = np.random.default_rng(0)
    steps = np.arange(N_STEPS + 1)[None, :, None]
    start = rng.uniform(1.0, 3.0, size=(N_RUNS, 1, N_TEST))
    rate = rng.uniform(0.02, 0.4, size=(1, 1, N_TEST))
    actual = start * np.exp(-rate * steps)
    predicted = {
        name: actual * np.exp(rng.normal(0.0, 0.1 * (k + 1), size=actual.shape)) for k, name in enumerate(METHODS)
    }
    mask = np.ones((N_RUNS, N_STEPS + 1), dtype=bool)
    mask[1, 1::2] = False
    mask[1, -1] = True
    mask[2, 13:] = False
    actual = np.where(mask[:, :, None], actual, np.nan)
    return Evaluation(
        metrics={name: {} for name in METHODS},
        train_runs=["run-000"],
        heldout_runs=["run-001", "run-002", "run-003"],
        predicted=predicted,
        actual=actual,
        mask=mask,
    )


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """Every test must leave pyplot's global figure list empty."""
    yield
    assert plt.get_fignums() == []


def visible_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def test_method_styles_are_stable_and_mark_the_baseline():
    styles = method_styles(["additive", "mean_curve", "linear"])
    assert styles["mean_curve"] == {"color": "0.5", "linestyle": "--"}
    assert styles["additive"]["color"] == "C0" and styles["linear"]["color"] == "C1"
    assert method_styles(["additive", "mean_curve", "linear"]) == styles


def test_trajectories_show_every_method_and_the_logged_curve(evaluation, tmp_path):
    path = tmp_path / "traj.png"
    fig = plot_trajectories(
        evaluation.predicted, evaluation.actual, evaluation.mask, test_labels=list("abcdefgh"), path=path
    )
    assert isinstance(fig, Figure)
    axes = visible_axes(fig)
    assert len(axes) == 6
    for ax in axes:
        assert len(ax.get_lines()) == len(METHODS) + 1
        assert ax.get_title().startswith("test ") and ax.get_title()[5:] in "abcdefgh"
    assert len(fig.legends) == 1
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [*METHODS, "actual (logged)"]
    assert path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["traj.png"]


def test_trajectories_draw_only_logged_steps_of_a_sparse_or_short_run(evaluation):
    for run, logged in ((1, np.flatnonzero(evaluation.mask[1])), (2, np.arange(13))):
        fig = plot_trajectories(evaluation.predicted, evaluation.actual, evaluation.mask, run=run, tests=[0, 5])
        axes = visible_axes(fig)
        assert len(axes) == 2
        for ax in axes:
            *method_lines, actual_line = ax.get_lines()
            np.testing.assert_array_equal(actual_line.get_xdata(), logged)
            assert np.isfinite(actual_line.get_ydata()).all()
            assert all(line.get_xdata()[-1] == logged[-1] for line in method_lines)


def test_trajectories_choose_informative_tests_deterministically(evaluation):
    chosen = informative_tests(evaluation.actual, evaluation.mask, run=0, count=4)
    change = evaluation.actual[0, -1] - evaluation.actual[0, 0]
    assert chosen[0] == np.argmin(change) and chosen[-1] == np.argmax(change)
    assert len(set(chosen)) == 4
    assert informative_tests(evaluation.actual, evaluation.mask, run=0, count=4) == chosen
    assert sorted(informative_tests(evaluation.actual, evaluation.mask, run=0, count=20)) == list(range(N_TEST))


def test_trajectories_use_a_log_axis_only_for_losses_spanning_orders_of_magnitude(evaluation):
    change = evaluation.actual[0, -1] / evaluation.actual[0, 0]
    wide, narrow = int(np.argmin(change)), int(np.argmax(change))
    fig = plot_trajectories(evaluation.predicted, evaluation.actual, evaluation.mask, tests=[wide, narrow])
    assert [ax.get_yscale() for ax in visible_axes(fig)] == ["log", "linear"]


def test_final_scatter_has_one_panel_per_method_with_every_run_and_test(evaluation, tmp_path):
    fig = plot_final_scatter(evaluation.predicted, evaluation.actual, evaluation.mask, path=tmp_path / "s.png")
    axes = visible_axes(fig)
    assert len(axes) == len(METHODS)
    for ax, name in zip(axes, METHODS, strict=True):
        (points,) = ax.collections
        assert points.get_offsets().shape == (N_RUNS * N_TEST, 2)
        assert np.isfinite(np.asarray(points.get_offsets())).all()
        assert ax.get_title().startswith(name) and "MSE" in ax.get_title()
        assert ax.get_xscale() == ax.get_yscale() == "log"
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_final_scatter_falls_back_to_linear_axes_in_a_panel_with_non_positive_values(evaluation):
    predicted = dict(evaluation.predicted)
    predicted["linear"] = predicted["linear"] - 5.0
    fig = plot_final_scatter(predicted, evaluation.actual, evaluation.mask)
    scales = {name: (ax.get_xscale(), ax.get_yscale()) for name, ax in zip(METHODS, visible_axes(fig), strict=True)}
    assert scales == {"mean_curve": ("log", "log"), "additive": ("log", "log"), "linear": ("linear", "linear")}


@pytest.mark.parametrize("log", [True, False])
def test_final_scatter_gives_each_panel_its_own_range_with_its_diagonal(evaluation, log):
    final = evaluation.actual[0, -1]
    wild = evaluation.predicted["mean_curve"].copy()
    wild[0, -1, :2] = 1e3 * final[:2]  # two outliers, far above every other point
    predicted = {"close": evaluation.predicted["linear"], "wild": wild}
    fig = plot_final_scatter(predicted, evaluation.actual, evaluation.mask, log=log)
    close_ax, wild_ax = visible_axes(fig)
    assert close_ax.get_xlim()[1] < wild_ax.get_xlim()[1] / 50
    for ax in (close_ax, wild_ax):
        (points,) = ax.collections
        x, y = np.asarray(points.get_offsets()).T
        (low, high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
        assert (low, high) == (y_low, y_high)
        assert low < x.min() and x.max() < high and low < y.min() and y.max() < high
        (diagonal,) = ax.get_lines()
        np.testing.assert_array_equal(diagonal.get_xdata(), [low, high])
        np.testing.assert_array_equal(diagonal.get_ydata(), [low, high])


def test_error_over_steps_averages_only_logged_entries(evaluation):
    mse = error_over_steps(evaluation.predicted, evaluation.actual, evaluation.mask)
    step = 15  # logged by run 0 only (run 1 skips odd steps, run 2 stopped)
    expected = np.mean((evaluation.predicted["linear"][0, step] - evaluation.actual[0, step]) ** 2)
    assert mse["linear"][step] == pytest.approx(expected)
    assert np.isfinite(mse["linear"]).all()
    fig = plot_error_over_steps(evaluation.predicted, evaluation.actual, evaluation.mask)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == len(METHODS)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(METHODS)
    assert ax.get_yscale() == "log"
    assert ax.get_lines()[0].get_xdata()[0] == 1


def test_plot_report_writes_three_pngs(evaluation, tmp_path):
    paths = plot_report(evaluation, tmp_path / "report", test_labels=[f"id{i}" for i in range(N_TEST)])
    assert set(paths) == {"trajectories", "final_scatter", "error_over_steps"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in paths.values())


def test_plots_reject_mismatched_or_empty_inputs(evaluation):
    with pytest.raises(SimfluenceError, match="shape"):
        plot_final_scatter({"linear": evaluation.predicted["linear"][:, :5]}, evaluation.actual, evaluation.mask)
    with pytest.raises(SimfluenceError, match="out of range"):
        plot_trajectories(evaluation.predicted, evaluation.actual, evaluation.mask, run=3)
    with pytest.raises(SimfluenceError, match="no trajectories"):
        plot_report(Evaluation(metrics={}, train_runs=[], heldout_runs=[]), "unused")


def make_whatif(test_ids: list) -> WhatIf:
    """A base and two scenarios over 10 steps and 8 test examples; scenario "drop" lowers test j by 0.1 j."""
    rng = np.random.default_rng(1)
    base = rng.uniform(1.0, 2.0, size=(1, 1, N_TEST)) * np.exp(-0.1 * np.arange(11))[None, :, None]
    drop = base - 0.1 * np.arange(N_TEST) * np.linspace(0.0, 1.0, 11)[None, :, None]
    rev = base + rng.normal(0.0, 0.01, size=base.shape)
    curriculum = Curriculum.from_batches([[step % 5, 5] for step in range(10)])
    return WhatIf(
        names=["base", "drop", "rev"],
        curricula=[curriculum, curriculum.remove([5]), curriculum.reverse()],
        trajectories=np.concatenate([base, drop, rev]),
        test_ids=test_ids,
    )


def test_whatif_draws_every_scenario_of_the_chosen_tests_as_given(tmp_path):
    whatif = make_whatif([f"t{j}" for j in range(N_TEST)])
    path = tmp_path / "whatif.png"
    fig = plot_whatif(whatif, tests=["t3", "t0"], path=path)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["test t3", "test t0"]
    for ax, column in zip(axes, (3, 0), strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == whatif.names
        for line, trajectory in zip(lines, whatif.trajectories[:, :, column], strict=True):
            np.testing.assert_array_equal(line.get_xdata(), np.arange(11))
            np.testing.assert_array_equal(line.get_ydata(), trajectory)
        base = lines[0]
        assert base.get_color() == "black" and base.get_linestyle() == "-"
        assert all(line.get_color() != "black" for line in lines[1:])
        assert ax.get_xlabel() == "step"
    assert axes[0].get_ylabel() == "predicted test loss"
    assert len(fig.legends) == 1
    assert [text.get_text() for text in fig.legends[0].get_texts()] == whatif.names
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["whatif.png"]


def test_whatif_defaults_to_the_six_tests_whose_final_loss_changes_most():
    fig = plot_whatif(make_whatif(list(range(100, 100 + N_TEST))))
    assert [ax.get_title() for ax in visible_axes(fig)] == [f"test {100 + j}" for j in (7, 6, 5, 4, 3, 2)]


def test_whatif_draws_the_logged_base_run_as_dots_at_its_logged_steps():
    whatif = make_whatif([])
    actual = whatif.trajectories[0] + 0.05
    actual[1::2] = np.nan
    fig = plot_whatif(whatif, tests=[2], actual=actual)
    (ax,) = visible_axes(fig)
    assert ax.get_title() == "test 2"  # no test ids: positions serve as ids
    dots = ax.get_lines()[-1]
    assert dots.get_linestyle() == "None" and dots.get_marker() == "o"
    np.testing.assert_array_equal(dots.get_xdata(), np.arange(0, 11, 2))
    np.testing.assert_array_equal(dots.get_ydata(), actual[::2, 2])
    assert "actual" in dots.get_label()


def test_whatif_rejects_an_unknown_test_id_by_name():
    whatif = make_whatif([f"t{j}" for j in range(N_TEST)])
    with pytest.raises(SimfluenceError, match="t99"):
        plot_whatif(whatif, tests=["t1", "t99"])
    with pytest.raises(SimfluenceError, match="shape"):
        plot_whatif(whatif, actual=np.ones((11, N_TEST + 1)))
