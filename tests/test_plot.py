"""Plots draw what the evaluation holds, skip unlogged steps, write PNGs atomically and leave pyplot alone."""
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
)
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


def test_final_scatter_falls_back_to_linear_axes_for_non_positive_values(evaluation):
    predicted = dict(evaluation.predicted)
    predicted["linear"] = predicted["linear"] - 5.0
    fig = plot_final_scatter(predicted, evaluation.actual, evaluation.mask)
    assert {ax.get_xscale() for ax in visible_axes(fig)} == {"linear"}


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
