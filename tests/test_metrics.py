from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from scipy import stats

from simfluence.metrics import METRIC_NAMES, bootstrap_intervals, format_table, spearman, trajectory_metrics


def _scipy_spearman_along(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    x_moved, y_moved = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    out = np.empty(x_moved.shape[:-1])
    for index in np.ndindex(out.shape):
        out[index] = stats.spearmanr(x_moved[index], y_moved[index]).statistic
    return out


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("with_ties", [False, True])
def test_spearman_matches_scipy_along_any_axis(axis, with_ties):
    rng = np.random.default_rng(0)
    shape = (5, 7, 6)
    if with_ties:
        x, y = rng.integers(0, 4, size=shape).astype(float), rng.integers(0, 3, size=shape).astype(float)
    else:
        x, y = rng.normal(size=shape), rng.normal(size=shape)
    x = x + 0.5 * y  # correlated, so the test is not only about rho near 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant slices; those slices are compared as NaN
        expected = _scipy_spearman_along(x, y, axis)
    got = spearman(x, y, axis=axis)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_spearman_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    np.testing.assert_allclose(spearman(np.exp(x), 3 * y + 1), spearman(x, y), rtol=1e-12)
    np.testing.assert_allclose(spearman(x, -y), -spearman(x, y), rtol=1e-12)


def test_spearman_is_nan_without_warning_on_constant_short_or_nan_input():
    x = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, np.nan, 3.0]])
    y = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho = spearman(x, y, axis=1)
        single = spearman(np.array([[1.0], [2.0]]), np.array([[3.0], [4.0]]), axis=1)
        empty = spearman(np.zeros((2, 0)), np.zeros((2, 0)))
    assert np.isnan(rho[0]) and np.isnan(rho[1]) and np.isnan(rho[3])
    assert rho[2] == pytest.approx(-1.0)
    assert single.shape == (2,) and np.isnan(single).all()
    assert empty.shape == (2,) and np.isnan(empty).all()


def test_spearman_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        spearman(np.zeros((3, 4)), np.zeros((4, 3)))


def _random_trajectories(seed: int, n_runs: int = 4, n_points: int = 6, n_test: int = 5):
    rng = np.random.default_rng(seed)
    actual = rng.uniform(0.5, 3.0, size=(n_runs, n_points, n_test))
    predicted = actual + rng.normal(scale=0.3, size=actual.shape)
    predicted[:, 0] = actual[:, 0]
    return predicted, actual


def test_metrics_return_every_name_as_python_float():
    predicted, actual = _random_trajectories(2)
    metrics = trajectory_metrics(predicted, actual)
    assert tuple(metrics) == METRIC_NAMES
    assert all(type(value) is float for value in metrics.values())


def test_perfect_prediction_has_zero_error_and_unit_rho():
    _, actual = _random_trajectories(3)
    metrics = trajectory_metrics(actual.copy(), actual)
    assert metrics["all_mse"] == 0.0 and metrics["all_mae"] == 0.0 and metrics["final_mse"] == 0.0
    for name in ("rho_final", "rho_delta", "rho_runs"):
        assert metrics[name] == pytest.approx(1.0)


def test_metrics_match_hand_computation_on_tiny_example():
    # (2 runs, steps 0..2, 3 test examples)
    actual = np.array(
        [
            [[3, 2, 1], [2, 2, 1], [1, 2, 0]],
            [[3, 2, 1], [3, 1, 1], [2, 1, 1]],
        ],
        dtype=float,
    )
    predicted = np.array(
        [
            [[3, 2, 1], [2, 1, 1], [2, 3, 0]],
            [[3, 2, 1], [3, 1, 3], [2, 1, 2]],
        ],
        dtype=float,
    )
    metrics = trajectory_metrics(predicted, actual)
    # errors at steps 1, 2: run 0: (0, -1, 0), (1, 1, 0); run 1: (0, 0, 2), (0, 0, 1)
    assert metrics["all_mse"] == pytest.approx(8 / 12)
    assert metrics["all_mae"] == pytest.approx(6 / 12)
    assert metrics["final_mse"] == pytest.approx(3 / 6)
    # run 0 finals rank identically; run 1: ranks (2.5, 1, 2.5) vs (3, 1.5, 1.5) -> 0.75 / sqrt(1.5 * 1.5)
    assert metrics["rho_final"] == pytest.approx((1 + 0.5) / 2)
    # deltas from (3, 2, 1): run 0: (-1, 1, -1) vs (-2, 0, -1) -> 1.5 / sqrt(1.5 * 2); run 1 identical ranks
    assert metrics["rho_delta"] == pytest.approx((1.5 / math.sqrt(3) + 1) / 2)
    # across runs: test 0 predicted constant (NaN, skipped), tests 1 and 2 ordered right
    assert metrics["rho_runs"] == pytest.approx(1.0)


def test_initial_defaults_to_actual_step_zero_and_only_moves_rho_delta():
    predicted, actual = _random_trajectories(4)
    default = trajectory_metrics(predicted, actual)
    assert trajectory_metrics(predicted, actual, initial=actual[:, 0]) == default
    other_initial = np.random.default_rng(5).normal(size=actual[:, 0].shape)
    shifted = trajectory_metrics(predicted, actual, initial=other_initial)
    assert {k: v for k, v in shifted.items() if k != "rho_delta"} == {
        k: v for k, v in default.items() if k != "rho_delta"
    }
    assert shifted["rho_delta"] != default["rho_delta"]


def test_predicting_only_difficulty_scores_rho_final_but_not_rho_delta():
    rng = np.random.default_rng(6)
    difficulty = rng.uniform(1.0, 5.0, size=8)
    actual = np.empty((3, 5, 8))
    actual[:, 0] = difficulty
    actual[:, 1:] = difficulty * rng.uniform(0.7, 0.9, size=(3, 4, 8))
    actual[:, -1] = 0.8 * difficulty**0.9  # hard examples stay hard
    flat = np.broadcast_to(actual[:, :1], actual.shape).copy()  # "loss never moves": knows only difficulty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = trajectory_metrics(flat, actual)
    assert metrics["rho_final"] == pytest.approx(1.0)
    assert math.isnan(metrics["rho_delta"])


def test_mask_ignores_unlogged_steps_and_sets_each_runs_final_step():
    predicted, actual = _random_trajectories(7, n_runs=3, n_points=7, n_test=5)
    mask = np.array(
        [
            [1, 1, 0, 1, 1, 0, 1],  # final step 6
            [1, 0, 1, 1, 0, 0, 0],  # final step 3
            [1, 1, 1, 1, 1, 1, 0],  # final step 5
        ],
        dtype=bool,
    )
    final_step = np.array([6, 3, 5])
    metrics = trajectory_metrics(predicted, actual, mask=mask)

    garbled_predicted, garbled_actual = predicted.copy(), actual.copy()
    garbled_predicted[~mask] = 1e6
    garbled_actual[~mask] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trajectory_metrics(garbled_predicted, garbled_actual, mask=mask) == metrics

    runs = np.arange(3)
    predicted_final, actual_final = predicted[runs, final_step], actual[runs, final_step]
    logged = mask[:, 1:]
    errors = (predicted[:, 1:] - actual[:, 1:])[logged]
    assert metrics["all_mse"] == pytest.approx(np.mean(errors**2))
    assert metrics["all_mae"] == pytest.approx(np.mean(np.abs(errors)))
    assert metrics["final_mse"] == pytest.approx(np.mean((predicted_final - actual_final) ** 2))
    assert metrics["rho_final"] == pytest.approx(np.mean(spearman(predicted_final, actual_final)))
    assert metrics["rho_runs"] == pytest.approx(np.nanmean(spearman(predicted_final, actual_final, axis=0)))


def test_rho_runs_is_minus_one_when_curricula_are_ranked_backwards():
    rng = np.random.default_rng(8)
    n_runs, n_test = 5, 4
    actual = np.repeat(rng.uniform(1, 2, size=(1, 3, n_test)), n_runs, axis=0)
    curriculum_effect = np.arange(n_runs, dtype=float)[:, None]
    actual[:, -1] += curriculum_effect * rng.uniform(0.1, 0.5, size=n_test)
    predicted = actual.copy()
    predicted[:, -1] = actual[::-1, -1]  # same losses, run order reversed
    metrics = trajectory_metrics(predicted, actual)
    assert metrics["rho_runs"] == pytest.approx(-1.0)
    assert trajectory_metrics(actual.copy(), actual)["rho_runs"] == pytest.approx(1.0)


def test_undefined_metrics_are_nan_without_warning():
    actual = np.ones((1, 1, 3))  # one run, only step 0, constant losses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = trajectory_metrics(actual.copy(), actual)
    assert math.isnan(metrics["all_mse"]) and math.isnan(metrics["all_mae"])
    assert metrics["final_mse"] == 0.0
    assert all(math.isnan(metrics[name]) for name in ("rho_final", "rho_delta", "rho_runs"))


_TRAJ = np.zeros((2, 3, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"predicted": _TRAJ, "actual": np.zeros((2, 3, 5))}, "actual has shape"),
        ({"predicted": np.zeros((3, 4)), "actual": np.zeros((3, 4))}, "predicted must have shape"),
        ({"predicted": _TRAJ, "actual": _TRAJ, "initial": np.zeros((2, 3))}, "initial must have shape"),
        ({"predicted": _TRAJ, "actual": _TRAJ, "mask": np.ones((2, 4), bool)}, "mask must have shape"),
        ({"predicted": _TRAJ, "actual": _TRAJ, "mask": np.array([[1, 1, 1], [0, 0, 0]])}, r"run\(s\) \[1\]"),
    ],
)
def test_shape_mismatch_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trajectory_metrics(**kwargs)


def test_format_table_aligns_columns_and_marks_missing_and_nan():
    results = {
        "simfluence-linear": {"all_mse": 0.0123456, "rho_final": float("nan")},
        "mean": {"all_mse": 12345.678},
    }
    table = format_table(results, columns=("all_mse", "rho_final", "fit_seconds"))
    lines = table.splitlines()
    assert lines[0].split() == ["method", "all_mse", "rho_final", "fit_seconds"]
    assert lines[2].split() == ["simfluence-linear", "0.01235", "nan", "-"]
    assert lines[3].split() == ["mean", "1.235e+04", "-", "-"]
    cell_ends = [[match.end() for match in re.finditer(r"\S+", line)][1:] for line in lines]
    assert cell_ends[0] == cell_ends[2] == cell_ends[3]  # numbers right-aligned under their headers


def test_format_table_default_columns_are_the_metrics_and_fit_time():
    header = format_table({}).splitlines()[0].split()
    assert header == ["method", *METRIC_NAMES, "fit_seconds"]


def test_bootstrap_intervals_are_the_percentiles_of_the_metrics_of_resampled_runs():
    rng = np.random.default_rng(3)
    actual = rng.random((6, 9, 5))
    predicted = actual + 0.3 * rng.standard_normal(actual.shape)
    mask = np.ones((6, 9), dtype=bool)
    mask[1, 5:] = False  # a run logged up to step 4 only
    mask[2, ::2] = False
    mask[2, 0] = True
    actual[~mask] = np.nan
    intervals = bootstrap_intervals(predicted, actual, mask=mask, n_boot=50, seed=1)
    resamples = np.random.default_rng([1, 6]).integers(0, 6, size=(50, 6))
    brute = [trajectory_metrics(predicted[runs], actual[runs], actual[runs, 0], mask[runs]) for runs in resamples]
    for name in METRIC_NAMES:
        samples = np.array([scores[name] for scores in brute])
        expected = np.percentile(samples[np.isfinite(samples)], [2.5, 97.5])
        np.testing.assert_allclose(intervals[name], expected, rtol=1e-12, err_msg=name)
    full = trajectory_metrics(predicted, actual, mask=mask)
    assert intervals["all_mse"][0] < full["all_mse"] < intervals["all_mse"][1]


def test_evaluation_reports_a_bootstrap_interval_per_method_and_metric():
    from simfluence.evaluation import evaluate
    from simfluence.synthetic import known_linear_runset

    runset, _, _ = known_linear_runset(n_pool=20, n_test=4, n_runs=8, n_steps=10, batch_size=4, noise=0.01)
    result = evaluate(runset, ["mean_curve", "linear"], holdout=4, progress=False)
    for name in ("mean_curve", "linear"):
        low, high = result.intervals[name]["all_mse"]
        assert low <= result.metrics[name]["all_mse"] <= high and set(result.intervals[name]) == set(METRIC_NAMES)
