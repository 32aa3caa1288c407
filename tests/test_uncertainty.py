"""Prediction intervals from a bootstrap over runs: coverage of a known truth, shrinking, frames, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.counterfactual import loo_effects, search_curriculum, search_order, whatif
from simfluence.errors import NotFittedError, SimfluenceError
from simfluence.simulators import FixedEffectsSimulator, MeanCurve, SimfluenceLinear
from simfluence.synthetic import known_linear_runset
from simfluence.uncertainty import Bootstrap, frozen_params, interval_bounds, straddles_zero


def noisy_and_truth(seed: int, n_runs: int = 25, noise: float = 0.02):
    """Noisy runs of a known Simfluence-Linear model, and a simulator holding the true effects."""
    options = dict(n_pool=30, n_test=10, n_runs=n_runs, n_steps=30, batch_size=4, subset_size=20, seed=seed)
    noisy, true_a, _ = known_linear_runset(noise=noise, **options)
    clean, _, _ = known_linear_runset(noise=0.0, **options)
    truth = SimfluenceLinear(lam=1e-9, solver="direct").fit(clean, runs=range(n_runs - 1))
    assert np.allclose(truth.A_, true_a, atol=1e-5)  # noise-free runs give the true model back
    return noisy, truth


@pytest.fixture(scope="module")
def fitted():
    runset, _, _ = known_linear_runset(n_pool=25, n_test=4, n_runs=14, n_steps=30, batch_size=4, noise=0.01, seed=0)
    simulator = SimfluenceLinear(alpha_center=1.0, momentum=0.3).fit(runset, runs=range(12))
    return runset, simulator, Bootstrap(simulator, n_resamples=8, seed=0).fit(runset)


def test_raw_80_percent_intervals_cover_the_true_effects_about_80_percent_of_the_time():
    covered = []
    for seed in range(6):
        noisy, truth = noisy_and_truth(seed)
        point = SimfluenceLinear(lam=1e-3).fit(noisy, runs=range(24))
        base = noisy[24]
        estimate = loo_effects(point, base,
                               intervals=Bootstrap(point, n_resamples=20, calibrate=False, seed=seed).fit(noisy))
        low, high = estimate.interval()
        true = truth.leave_one_out(base.curriculum, base.initial_losses)
        covered.append(((low <= true) & (true <= high))[estimate.present])
    coverage = np.concatenate(covered).mean()
    assert 0.65 <= coverage <= 0.92


def test_intervals_shrink_with_more_runs():
    noisy, _ = noisy_and_truth(0, n_runs=33)
    widths = []
    for n_runs in (8, 32):
        point = SimfluenceLinear(lam=1e-3).fit(noisy, runs=range(n_runs))
        intervals = Bootstrap(point, n_resamples=10, calibrate=False).fit(noisy)
        low, high = loo_effects(point, noisy[32], intervals=intervals).interval()
        widths.append(np.mean(high - low))
    assert widths[1] < 0.6 * widths[0]


def test_members_differ_and_keep_the_hyper_parameters_the_point_fit_chose(fitted):
    runset, simulator, intervals = fitted
    assert intervals.simulator_ is simulator
    assert frozen_params(simulator) == intervals.frozen_params_ == {"lam": simulator.lam_}
    assert all(member.lam == simulator.lam_ and member.momentum == 0.3 for member in intervals.members_)
    assert len(intervals.members_) == 8
    assert not np.allclose(intervals.members_[0].B_, intervals.members_[1].B_)
    assert all(len(member.train_runs_) == 6 for member in intervals.members_)  # halves of the 12 training runs
    again = Bootstrap(simulator, n_resamples=8, seed=0).fit(runset)
    assert np.array_equal(again.members_[3].B_, intervals.members_[3].B_) and again.inflation_ == intervals.inflation_


def test_calibration_only_widens_and_is_recorded(fitted):
    _, _, intervals = fitted
    calibration = intervals.calibration_
    assert intervals.inflation_ == max(1.0, calibration["needed"]) >= 1.0
    assert calibration["validation_runs"] == ["run-010", "run-011"]  # carved from the training runs only
    assert "calibrated on 2 held-back runs" in intervals.describe()


def test_interval_is_point_plus_minus_the_scaled_spread():
    members = np.array([[1.0, -1.0], [3.0, 1.0]])
    low, high = interval_bounds(np.array([2.0, 0.5]), members, scale=1.0)
    spread = members.std(axis=0, ddof=1)
    assert np.allclose(low, [2.0, 0.5] - spread) and np.allclose(high, [2.0, 0.5] + spread)
    assert straddles_zero(low, high).tolist() == [False, True]


def test_frames_carry_intervals_and_flags(fitted):
    runset, simulator, intervals = fitted
    base = runset[13]
    result = whatif(simulator, base, {"drop": "remove:1,2", "rev": "reverse"}, intervals=intervals)
    frame = result.frame()
    assert {"change_low", "change_high", "straddles_zero"} <= set(frame.columns)
    assert ((frame["change_low"] <= frame["change"] + 1e-12) & (frame["change"] <= frame["change_high"] + 1e-12)).all()
    assert frame["straddles_zero"].equals((frame["change_low"] <= 0) & (frame["change_high"] >= 0))
    summary = result.summary(tests=[0, 1])
    assert {"mean_change_low", "mean_change_high", "straddles_zero"} <= set(summary.columns)
    assert (summary["mean_change_low"] <= summary["mean_change"]).all()

    effects = loo_effects(simulator, base, intervals=intervals)
    assert effects.ensemble.members.shape == (8, 25, 4)
    assert {"low", "high", "straddles_zero"} <= set(effects.frame().columns)
    top = effects.top(3, tests=[1])
    assert ((top["low"] <= top["effect"]) & (top["effect"] <= top["high"])).all()

    found = search_curriculum(simulator, base, [0, 1], drop=2, intervals=intervals)
    rounds = found.frame()
    assert list(rounds.columns) == ["round", "n_removed", "objective", "change", "change_low", "change_high",
                                    "straddles_zero"]
    low, high = found.change_interval()
    assert low <= found.predicted_change <= high
    assert (low, high) == pytest.approx((rounds["change_low"].iloc[-1], rounds["change_high"].iloc[-1]))
    reordered = search_order(simulator, base, [0, 1], moves=2, intervals=intervals).frame()
    assert {"move", "change_low", "change_high", "straddles_zero"} <= set(reordered.columns)

    curves = simulator.simulate_frame([base.curriculum], base.initial_losses, intervals=intervals)
    assert ((curves["low"] <= curves["loss"]) & (curves["loss"] <= curves["high"])).all()


def test_without_intervals_the_tables_are_unchanged(fitted):
    runset, simulator, _ = fitted
    result = whatif(simulator, runset[13], {"drop": "remove:1"})
    assert list(result.frame().columns) == ["scenario", "step", "test", "loss", "change"]
    assert list(loo_effects(simulator, runset[13]).frame().columns) == ["test", "pool", "effect", "rank"]
    with pytest.raises(SimfluenceError, match="no intervals"):
        result.change_interval()


@pytest.mark.parametrize("options, message", [
    ({"n_resamples": 1}, "n_resamples must be an integer >= 2"),
    ({"level": 1.0}, "level must lie strictly between 0 and 1"),
    ({"level": 0}, "level must lie strictly between 0 and 1"),
    ({"resample": "jackknife"}, "resample must be one of half, runs"),
    ({"val_fraction": 0.0}, "val_fraction must lie strictly between 0 and 1"),
])
def test_bad_options_are_one_clear_error(fitted, options, message):
    runset, simulator, _ = fitted
    with pytest.raises(SimfluenceError, match=message):
        Bootstrap(simulator, **options).fit(runset)


def test_what_cannot_be_bootstrapped_is_one_clear_error(fitted):
    runset, simulator, intervals = fitted
    with pytest.raises(SimfluenceError, match="needs scores to fit"):
        Bootstrap(FixedEffectsSimulator()).fit(runset)
    with pytest.raises(SimfluenceError, match="predicts no change between curricula"):
        Bootstrap(MeanCurve().fit(runset, runs=range(12))).fit(runset)
    with pytest.raises(SimfluenceError, match="at least 4 training runs"):
        Bootstrap(SimfluenceLinear(lam=1.0).fit(runset, runs=range(3))).fit(runset)
    with pytest.raises(SimfluenceError, match="fitted on other runs"):
        Bootstrap(simulator).fit(runset, runs=range(5))
    other = SimfluenceLinear(lam=1.0).fit(runset, runs=range(12))
    with pytest.raises(SimfluenceError, match="fitted around another simulator"):
        whatif(other, runset[13], {"drop": "remove:1"}, intervals=intervals)
    with pytest.raises(NotFittedError):
        loo_effects(simulator, runset[13], intervals=Bootstrap(simulator))


def test_calibrate_on_real_answers_widens_to_cover_them(fitted):
    runset, simulator, _ = fitted
    intervals = Bootstrap(simulator, n_resamples=8, calibrate=False).fit(runset)
    base = runset[13]
    curricula = [base.curriculum.remove([i]) for i in range(1, 9)]
    point = simulator.simulate(curricula, base.initial_losses)[:, -1]
    members = intervals.simulate(curricula, base.initial_losses)[:, :, -1]
    spread = members.std(axis=0, ddof=1)
    actual = point + 3.0 * spread * np.where(np.arange(point.size).reshape(point.shape) % 2, 1, -1)
    intervals.calibrate_on(point, members, actual)
    low, high = intervals.bounds(point, members)
    assert intervals.inflation_ > 2 and np.mean((low <= actual) & (actual <= high)) >= 0.8
    assert "calibrated on 32 real answers" in intervals.describe()
    with pytest.raises(SimfluenceError, match="calibrate_on needs"):
        intervals.calibrate_on(point, members[:3], actual)
