"""Log-space simulators recover known log-loss models, never simulate a loss <= 0, and keep an exact leave-one-out."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.methods import load_simulator, make_simulator
from simfluence.runlog import Run, RunSet
from simfluence.simulators import LogAdditive, LogLinear, SimfluenceLinear, rollout_runs
from simfluence.synthetic import known_linear_runset


def _exp_runset(runset: RunSet) -> RunSet:
    """The same runs with every loss replaced by its exp: their log losses follow the generating model."""
    runs = [Run(run.name, run.curriculum, run.logged_steps, np.exp(run.losses), learning_rates=run.learning_rates)
            for run in runset]
    return RunSet(runs, n_pool=runset.n_pool, test_ids=runset.test_ids)


@pytest.fixture(scope="module")
def log_linear_runs():
    runset, A, B = known_linear_runset(n_pool=30, n_test=5, n_runs=12, n_steps=40, batch_size=4, seed=1)
    return _exp_runset(runset), A, B


@pytest.fixture(scope="module")
def momentum_runs():
    """Runs of the linear_mom model on log losses (momentum 0.6), with a learning-rate schedule."""
    schedule = np.linspace(0.1, 1.0, 30)
    runset = known_linear_runset(n_pool=25, n_test=4, n_runs=10, n_steps=30, batch_size=4, seed=0,
                                 lr_schedule=schedule)[0]
    truth = LogLinear(lam=1.0, alpha_center=1.0, step_terms=True, lr_scaled=True, momentum=0.6).fit(
        _exp_runset(runset))
    rng = np.random.default_rng(0)
    truth.A_ = rng.uniform(-0.01, 0.01, truth.A_.shape)
    truth.B_ = rng.uniform(-0.01, 0.005, truth.B_.shape)
    truth.step_alpha_ = rng.uniform(-0.01, 0.0, truth.step_alpha_.shape)
    truth.step_beta_ = rng.uniform(-0.02, 0.01, truth.step_beta_.shape)
    runs = [Run(run.name, run.curriculum, run.logged_steps,
                truth.simulate(run.curriculum, np.exp(run.initial_losses), [run.learning_rates])[0],
                learning_rates=run.learning_rates) for run in runset]
    return RunSet(runs, n_pool=runset.n_pool, test_ids=runset.test_ids), truth


def test_log_linear_fit_recovers_a_known_log_space_model(log_linear_runs):
    runset, A, B = log_linear_runs
    sim = LogLinear(lam=1e-10, solver="direct", tol=1e-13).fit(runset)
    np.testing.assert_allclose(sim.A_, A, rtol=1e-4, atol=1e-4 * np.abs(A).max())
    np.testing.assert_allclose(sim.B_, B, rtol=1e-4, atol=1e-4 * np.abs(B).max())
    predicted, actual, _ = rollout_runs(sim, runset, range(len(runset)))
    np.testing.assert_allclose(predicted, actual, rtol=1e-6)


def test_log_additive_fit_recovers_each_examples_factor():
    runset, _, B = known_linear_runset(n_pool=30, n_test=5, n_runs=12, n_steps=40, multiplicative=False, seed=2)
    sim = LogAdditive(lam=1e-10, solver="direct", tol=1e-13).fit(_exp_runset(runset))
    np.testing.assert_allclose(sim.B_, B, rtol=1e-4, atol=1e-4 * np.abs(B).max())
    # one step of example i multiplies the loss by exp(B_i)
    one = sim.simulate(runset[0].curriculum.keep_only([3]), np.ones(5))
    steps_with_3 = runset[0].curriculum.counts(30)[3]
    np.testing.assert_allclose(one[0, -1], np.exp(steps_with_3 * B[3]), rtol=1e-8)


def test_linear_mom_log_recovers_its_momentum_and_dynamics(momentum_runs):
    runset, truth = momentum_runs
    sim = make_simulator("linear_mom_log", lam_grid=(1e-9,), momentum_grid=(0.0, 0.3, 0.6, 0.9), tol=1e-13)
    sim.fit(runset, runs=range(8))
    assert sim.momentum_ == 0.6
    predicted, actual, _ = rollout_runs(sim, runset, [8, 9])
    np.testing.assert_allclose(predicted, actual, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear_log", "additive_log", "linear_mom_log"])
def test_simulated_losses_are_always_positive(log_linear_runs, name):
    runset, _, _ = log_linear_runs
    sim = make_simulator(name, lam=1.0).fit(runset)
    sim.B_ = sim.B_ - 0.2  # every step pushes the loss down hard: a loss-space model would go far below 0
    curves = sim.simulate([run.curriculum for run in runset], np.stack([run.initial_losses for run in runset]))
    assert np.all(curves > 0)
    assert np.all(sim.simulate(runset[0].curriculum, np.zeros(runset.n_test)) > 0)  # a zero loss is raised


def test_a_loss_space_simulator_does_go_negative_where_the_log_space_one_cannot(log_linear_runs):
    runset, _, _ = log_linear_runs
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(runset)
    sim.B_ = sim.B_ - 0.2
    assert sim.simulate(runset[0].curriculum, runset[0].initial_losses).min() < 0


def _brute_force(sim, curriculum, initial, step, rates=None):
    base = sim.simulate(curriculum, initial, rates)[0, step]
    edited = [curriculum.remove([i]) for i in range(sim.n_pool_)]
    return sim.simulate(edited, initial, None if rates is None else rates * len(edited))[:, step] - base


@pytest.mark.parametrize("name", ["linear_log", "additive_log", "linear_mom_log"])
@pytest.mark.parametrize("step", [None, 17])
def test_exact_leave_one_out_equals_re_simulation(momentum_runs, name, step):
    runset, _ = momentum_runs
    sim = make_simulator(name, lam=1.0, **({"momentum": 0.6} if name == "linear_mom_log" else {})).fit(runset)
    run = runset[0]
    curriculum = run.curriculum.keep_only(range(20)).duplicate(3, step=5)  # 5 absent; one id repeated in a batch
    rates = [run.learning_rates] if name == "linear_mom_log" else None
    fast = sim.leave_one_out(curriculum, run.initial_losses, None if rates is None else rates[0], step=step)
    brute = _brute_force(sim, curriculum, run.initial_losses, 30 if step is None else step, rates)
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-9 * max(1.0, np.abs(brute).max()))
    assert np.abs(brute).max() > 1e-4  # the check is not vacuous
    absent = np.flatnonzero(curriculum.counts(sim.n_pool_) == 0)
    assert absent.size and np.all(fast[absent] == 0)


@pytest.mark.parametrize("name", ["linear_log", "additive_log", "linear_mom_log"])
def test_save_load_round_trip(log_linear_runs, tmp_path, name):
    runset, _, _ = log_linear_runs
    sim = make_simulator(name, lam=0.5, min_loss=1e-4).fit(runset)
    loaded = load_simulator(sim.save(tmp_path / "model.npz"))
    assert type(loaded) is type(sim) and loaded.get_params() == sim.get_params()
    cur, initial = runset[3].curriculum, runset[3].initial_losses
    np.testing.assert_array_equal(loaded.simulate(cur, initial), sim.simulate(cur, initial))
    np.testing.assert_array_equal(loaded.leave_one_out(cur, initial), sim.leave_one_out(cur, initial))


def test_lam_is_chosen_by_the_validation_error_of_the_losses_not_the_log_losses(log_linear_runs):
    runset, _, _ = log_linear_runs
    sim = LogLinear(lam_grid=(1e-6, 1.0, 100.0)).fit(runset, runs=range(10))
    candidate = LogLinear(lam=sim.validation_[0]["lam"]).fit(runset, runs=range(8))
    predicted, actual, _ = rollout_runs(candidate, runset, [8, 9])
    assert sim.validation_[0]["mse"] == pytest.approx(float(((predicted - actual)[:, 1:] ** 2).mean()), rel=1e-4)


def test_negative_losses_and_bad_min_loss_are_clear_errors(log_linear_runs):
    runset, _, _ = log_linear_runs
    runs = [Run(run.name, run.curriculum, run.logged_steps, run.losses - 10.0) for run in runset]
    bad = RunSet(runs, n_pool=runset.n_pool, test_ids=runset.test_ids)
    with pytest.raises(SimfluenceError, match="run 'run-000' logged a negative loss at step 0"):
        LogLinear(lam=1.0).fit(bad)
    with pytest.raises(SimfluenceError, match="min_loss must be > 0"):
        LogLinear(lam=1.0, min_loss=0.0).fit(runset)
    sim = LogLinear(lam=1.0).fit(runset)
    with pytest.raises(SimfluenceError, match="initial_losses holds a negative loss"):
        sim.simulate(runset[0].curriculum, -np.ones(runset.n_test))
    with pytest.raises(SimfluenceError, match="NaN"):
        sim.simulate(runset[0].curriculum, np.full(runset.n_test, np.nan))
