"""Simulators recover known models, simulate consistently and round-trip through save/load."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import FitWarning, ModelFileError, NotFittedError, SimfluenceError
from simfluence.methods import load_simulator, make_simulator
from simfluence.runlog import Run, RunSet
from simfluence.simulators import MeanCurve, SimfluenceAdditive, SimfluenceLinear, rollout_runs
from simfluence.synthetic import known_linear_runset


@pytest.fixture(scope="module")
def linear_runs():
    return known_linear_runset(n_pool=30, n_test=5, n_runs=12, n_steps=40, batch_size=4, seed=1)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_linear_fit_recovers_known_effects(linear_runs, solver):
    runset, A, B = linear_runs
    sim = SimfluenceLinear(lam=1e-10, solver=solver, tol=1e-13).fit(runset)
    np.testing.assert_allclose(sim.A_, A, rtol=1e-4, atol=1e-4 * np.abs(A).max())
    np.testing.assert_allclose(sim.B_, B, rtol=1e-4, atol=1e-4 * np.abs(B).max())


def test_the_torch_device_path_of_the_fit_gives_the_numpy_paths_effects(linear_runs):
    """``device`` moves the conjugate-gradient solves onto torch tensors (a GPU when one is named); on the CPU the
    fitted effects agree with the numpy path's to the solver's tolerance."""
    pytest.importorskip("torch")
    runset, A, _ = linear_runs
    numpy_fit = SimfluenceLinear(lam=1e-3, solver="cg", tol=1e-12, precision="float64").fit(runset)
    torch_fit = SimfluenceLinear(lam=1e-3, solver="cg", tol=1e-12, precision="float64", device="cpu").fit(runset)
    np.testing.assert_allclose(torch_fit.A_, numpy_fit.A_, rtol=1e-7, atol=1e-9 * np.abs(A).max())
    np.testing.assert_allclose(torch_fit.B_, numpy_fit.B_, rtol=1e-7, atol=1e-9 * np.abs(A).max())
    with pytest.raises(SimfluenceError, match="device"):
        SimfluenceLinear(device=3).fit(runset)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_additive_fit_recovers_known_effects(solver):
    runset, _, B = known_linear_runset(n_pool=30, n_test=5, n_runs=12, n_steps=40, multiplicative=False, seed=2)
    sim = SimfluenceAdditive(lam=1e-10, solver=solver, tol=1e-13).fit(runset)
    np.testing.assert_allclose(sim.B_, B, rtol=1e-4, atol=1e-4 * np.abs(B).max())
    assert np.all(sim.A_ == 0)


def _extended_runset(seed=3, n_runs=16, n_pool=20, n_test=3, n_steps=25, batch=3, momentum=0.0):
    """Runs from the time-aware model: alpha_t = 1 + w_t sum A + a_t, beta_t = w_t sum B + b_t (+ velocity)."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-0.01, 0.01, (n_pool, n_test))
    B = rng.uniform(-0.02, 0.01, (n_pool, n_test))
    a = rng.uniform(-0.02, 0.0, (n_steps, n_test))
    b = rng.uniform(-0.01, 0.01, (n_steps, n_test))
    lrs = np.concatenate([np.linspace(0.2, 1.0, 5), np.linspace(1.0, 0.1, n_steps - 5)])
    curricula = random_curricula(n_runs, n_pool, batch, n_steps, subset_size=12, seed=rng)
    initial = rng.uniform(1, 2, n_test)
    runs = []
    for index, cur in enumerate(curricula):
        counts = cur.to_csr(n_pool).toarray() * (lrs / lrs.mean())[:, None]
        losses, velocity = [initial], np.zeros(n_test)
        for t in range(n_steps):
            alpha = 1 + counts[t] @ A + a[t]
            velocity = momentum * velocity + (alpha - 1) * losses[-1] + counts[t] @ B + b[t]
            losses.append(losses[-1] + velocity)
        runs.append(Run(f"run-{index}", cur, np.arange(n_steps + 1), np.array(losses), learning_rates=lrs))
    return RunSet(runs, n_pool=n_pool, test_ids=range(n_test))


def test_time_aware_extension_reproduces_runs_it_never_saw():
    runset = _extended_runset()
    train, heldout = list(range(12)), list(range(12, 16))
    sim = make_simulator("linear_step", lam=1e-9, step_lam_ratio=1.0, tol=1e-13).fit(runset, runs=train)
    predicted, actual, _ = rollout_runs(sim, runset, heldout)
    np.testing.assert_allclose(predicted, actual, rtol=1e-5)
    paper = SimfluenceLinear(lam=1e-9).fit(runset, runs=train)
    paper_pred, _, _ = rollout_runs(paper, runset, heldout)
    assert np.abs(paper_pred - actual).max() > 100 * np.abs(predicted - actual).max()


def test_momentum_model_is_recovered_and_its_momentum_chosen_on_validation():
    runset = _extended_runset(seed=5, n_runs=20, momentum=0.7)
    train, heldout = list(range(16)), list(range(16, 20))
    sim = make_simulator("linear_mom", lam_grid=(1e-9,), momentum_grid=(0.0, 0.4, 0.7, 0.9), tol=1e-13)
    sim.fit(runset, runs=train)
    assert sim.momentum_ == 0.7
    predicted, actual, _ = rollout_runs(sim, runset, heldout)
    np.testing.assert_allclose(predicted, actual, rtol=1e-5)
    assert [entry["momentum"] for entry in sim.validation_] == [0.0, 0.4, 0.7, 0.9]


def test_momentum_needs_every_step_logged():
    runset, _, _ = known_linear_runset(n_pool=10, n_test=2, n_runs=3, n_steps=6, seed=0)
    for run in runset.runs:
        run.logged_steps, run.losses = run.logged_steps[::2], run.losses[::2]
    with pytest.raises(SimfluenceError, match="momentum > 0 needs losses logged at every step"):
        SimfluenceLinear(lam=1.0, momentum=0.5).fit(runset)


def test_clip_negative_keeps_simulated_losses_non_negative():
    runset, _, _ = known_linear_runset(n_pool=30, n_test=5, n_runs=12, n_steps=40, batch_size=4, seed=1)
    for run in runset.runs:
        run.losses = run.losses - run.losses.min() + 0.1  # losses that were never negative
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0, clip_negative=True).fit(runset)
    sim.B_ = sim.B_ - 1.0  # force every step to push the loss down hard
    curves = sim.simulate(runset[0].curriculum, runset[0].initial_losses)
    assert curves.min() == 0.0
    assert SimfluenceLinear(lam=1.0).fit(runset).loss_floor_ is None  # the paper's form is left unclipped


def test_simulate_equals_the_recurrence(linear_runs):
    runset, A, B = linear_runs
    sim = SimfluenceLinear(lam=1.0).fit(runset)
    cur = runset[0].curriculum
    initial = runset[0].initial_losses
    expected = [initial]
    for batch in cur.batches():
        expected.append(sim.A_[batch].sum(0) * expected[-1] + sim.B_[batch].sum(0))
    np.testing.assert_allclose(sim.simulate(cur, initial)[0], np.array(expected), rtol=1e-12)


def test_simulate_batches_curricula_and_holds_after_the_end(linear_runs):
    runset, _, _ = linear_runs
    sim = SimfluenceLinear(lam=1.0).fit(runset)
    long, short = runset[0].curriculum, runset[1].curriculum.truncate(10)
    initial = np.stack([runset[0].initial_losses, runset[1].initial_losses])
    both = sim.simulate([long, short], initial)
    assert both.shape == (2, 41, 5)
    np.testing.assert_allclose(both[0], sim.simulate(long, initial[0])[0])
    np.testing.assert_allclose(both[1, :11], sim.simulate(short, initial[1])[0])
    np.testing.assert_allclose(both[1, 11:], np.broadcast_to(both[1, 10], (30, 5)))


def test_lam_auto_is_chosen_on_training_runs_only(linear_runs):
    runset, _, _ = linear_runs
    with pytest.warns(FitWarning):  # noise-free runs: the weakest lam wins, even of the extended grid
        sim = SimfluenceLinear(lam_grid=(1e-3, 1e-1, 10.0)).fit(runset, runs=range(10))
    assert {entry["lam"] for entry in sim.validation_} == {1e-6, 1e-5, 1e-4, 1e-3, 1e-1, 10.0}
    assert sim.lam_ == min(sim.validation_, key=lambda entry: entry["mse"])["lam"]
    # changing the runs outside the training set must not change the fit
    other = runset.select(list(range(10)))
    with pytest.warns(FitWarning):
        again = SimfluenceLinear(lam_grid=(1e-3, 1e-1, 10.0)).fit(other)
    np.testing.assert_allclose(sim.A_, again.A_)


def test_mean_curve_predicts_the_average_change():
    cur = Curriculum.from_batches([[0], [1]], n_pool=2)
    runs = [
        Run("a", cur, [0, 1, 2], [[1.0], [0.8], [0.5]]),
        Run("b", cur, [0, 2], [[1.0], [0.7]]),  # step 1 not logged
    ]
    sim = MeanCurve().fit(RunSet(runs, n_pool=2))
    np.testing.assert_allclose(sim.mean_change_[:, 0], [0.0, -0.2, -0.4])
    np.testing.assert_allclose(sim.simulate(cur, [2.0])[0, :, 0], [2.0, 1.8, 1.6])


@pytest.mark.parametrize("name", ["mean_curve", "additive", "linear", "linear_res", "linear_step"])
def test_save_load_round_trip(linear_runs, tmp_path, name):
    runset, _, _ = linear_runs
    params = {} if name == "mean_curve" else {"lam": 0.5}
    sim = make_simulator(name, **params).fit(runset)
    path = sim.save(tmp_path / "model.npz")
    loaded = load_simulator(path)
    assert type(loaded) is type(sim) and loaded.get_params() == sim.get_params()
    cur, initial = runset[3].curriculum, runset[3].initial_losses
    np.testing.assert_array_equal(loaded.simulate(cur, initial), sim.simulate(cur, initial))
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert "meta_json" in data.files


def test_errors_are_clear(linear_runs, tmp_path):
    runset, _, _ = linear_runs
    with pytest.raises(NotFittedError):
        SimfluenceLinear().simulate(runset[0].curriculum, runset[0].initial_losses)
    with pytest.raises(ModelFileError, match="no such simulator file"):
        load_simulator(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="junk.npz"):
        load_simulator(tmp_path / "junk.npz")
    sim = SimfluenceLinear(lam=1.0).fit(runset)
    with pytest.raises(SimfluenceError, match="initial_losses has shape"):
        sim.simulate(runset[0].curriculum, np.ones(3))
    with pytest.raises(SimfluenceError, match="unknown method"):
        make_simulator("nope")
    with pytest.raises(SimfluenceError, match="lam must be a number > 0"):
        SimfluenceLinear(lam=0.0).fit(runset)


def test_repr_shows_changed_hyper_parameters():
    assert repr(SimfluenceLinear(lam=2.0)) == "SimfluenceLinear(lam=2.0)"
    assert repr(MeanCurve()) == "MeanCurve()"


def _thin(runset, every):
    """The same runs with losses logged every ``every`` steps (and at the last step)."""
    for run in runset.runs:
        keep = np.unique(np.concatenate([np.arange(0, run.n_steps + 1, every), [run.n_steps]]))
        run.logged_steps, run.losses = run.logged_steps[keep], np.asarray(run.losses)[keep]
    return runset


def test_sparse_logging_every_second_step_still_beats_the_mean_curve():
    runset = _thin(known_linear_runset(n_pool=30, n_test=5, n_runs=14, n_steps=40, batch_size=4, seed=3)[0], 2)
    train, heldout = list(range(11)), list(range(11, 14))
    errors = {}
    for name in ("mean_curve", "linear", "linear_mom"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)  # linear_mom says it drops the velocity (tested below)
            sim = make_simulator(name).fit(runset, runs=train)
        predicted, actual, mask = rollout_runs(sim, runset, heldout)
        mask[:, 0] = False
        errors[name] = float(((predicted - np.nan_to_num(actual))[mask] ** 2).mean())
        if name == "linear_mom":
            assert sim.momentum_ == 0.0  # no velocity without consecutive steps
    assert errors["linear"] < 0.5 * errors["mean_curve"]


def test_sparse_logging_recovers_an_additive_model_exactly():
    # a k-step transition of the additive model is exactly the sum of its batches' effects (k = 7 so that the
    # windows do not line up with the 5-step epochs, which would make every window's features identical)
    runset, _, B = known_linear_runset(n_pool=20, n_test=4, n_runs=16, n_steps=40, batch_size=4, seed=5,
                                       multiplicative=False)
    sim = SimfluenceAdditive(lam=1e-10, tol=1e-13).fit(_thin(runset, 7))
    np.testing.assert_allclose(sim.B_, B, rtol=0, atol=1e-6 * np.abs(B).max())


def test_mean_curve_holds_the_last_logged_value():
    cur = Curriculum.from_batches([[0]] * 7, n_pool=1)
    run = Run("a", cur, [0, 2, 4, 6], [[0.0], [2.0], [4.0], [6.0]])
    sim = MeanCurve().fit(RunSet([run], n_pool=1))
    np.testing.assert_allclose(sim.mean_change_[:, 0], [0, 1, 2, 3, 4, 5, 6, 6])


def test_scikit_learn_conventions_params_clone_and_unchanged_arguments(linear_runs):
    from simfluence.simulators import clone

    grid = [0.1, 1.0]
    sim = SimfluenceLinear(lam="auto", lam_grid=grid, momentum="auto", momentum_grid=(0.0, 0.5))
    assert sim.lam_grid is grid  # __init__ stores its arguments unchanged
    copy = clone(sim)
    assert type(copy) is SimfluenceLinear and copy.get_params() == sim.get_params() and copy is not sim
    assert copy.set_params(lam=2.0) is copy and copy.lam == 2.0 and sim.lam == "auto"
    with pytest.raises(SimfluenceError, match="has no option 'bogus'"):
        copy.set_params(bogus=1)
    runset, _, _ = linear_runs
    with pytest.warns(FitWarning):  # noise-free runs: the weakest lam wins, even of the extended grid
        sim.fit(runset)
    # candidates of the grid are fitted on clones: the estimator's own parameters never change
    assert sim.lam == "auto" and sim.momentum == "auto" and sim.lam_grid == [0.1, 1.0]
    assert {e["lam"] for e in sim.validation_} >= set(grid) and sim.momentum_ in (0.0, 0.5)
    assert not getattr(copy, "fitted_", False)


def test_simulate_frame_uses_external_test_ids(linear_runs):
    runset, _, _ = linear_runs
    named = RunSet(runset.runs, pool_ids=[f"p{i}" for i in range(30)], test_ids=["a", "b", "c", "d", "e"])
    sim = SimfluenceLinear(lam=1.0).fit(named)
    frame = sim.simulate_frame([named[0].curriculum], named[0].initial_losses, names=["run-000"])
    assert list(frame.columns) == ["curriculum", "step", "test", "loss"]
    assert list(frame["test"].unique()) == ["a", "b", "c", "d", "e"]
    np.testing.assert_allclose(frame["loss"].to_numpy(),
                               sim.simulate(named[0].curriculum, named[0].initial_losses).ravel())
    assert sim.pool_ids_[:2] == ["p0", "p1"] and sim.train_runs_ == named.run_names


def test_the_simulator_core_imports_neither_torch_nor_workloads_nor_apps():
    import ast
    from pathlib import Path

    import simfluence.simulators as package

    forbidden = ("torch", "simfluence.workloads", "simfluence.attribution", "simfluence.apps", "simfluence.task",
                 "simfluence.methods", "simfluence.cli")
    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


def test_one_rollout_serves_every_linear_simulator():
    import inspect
    from pathlib import Path

    from simfluence.simulators import FixedEffectsSimulator, LinearDynamics

    for cls in (SimfluenceLinear, SimfluenceAdditive, FixedEffectsSimulator):
        assert issubclass(cls, LinearDynamics) and cls.tags["exact_loo"]
        assert "simulate" not in cls.__dict__ and "leave_one_out" not in cls.__dict__  # inherited, not rewritten
    assert not MeanCurve.tags["exact_loo"]
    root = Path(inspect.getfile(LinearDynamics)).parent.parent
    rollouts = [path.name for path in root.rglob("*.py") if "def unroll(" in path.read_text()]
    assert rollouts == ["dynamics.py"]


def test_float32_fit_gives_the_float64_effects(linear_runs):
    runset, _, _ = linear_runs
    double = SimfluenceLinear(lam=1e-3, solver="cg", precision="float64").fit(runset)
    single = SimfluenceLinear(lam=1e-3, solver="cg", precision="float32").fit(runset)
    assert single.solve_info_.dtype == "float32"
    for name in ("A_", "B_"):
        ref = getattr(double, name)
        np.testing.assert_allclose(getattr(single, name), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_one_solve_per_lam_gives_every_momentum_candidate():
    runset = _extended_runset(seed=5, n_runs=12, momentum=0.5)
    with pytest.warns(FitWarning, match="lam='auto' chose lam=1e-05"):  # noise-free: the weakest lam wins
        grid = make_simulator("linear_mom", lam_grid=(1e-2, 1.0), momentum_grid=(0.0, 0.5), tol=1e-12).fit(runset)
    lams = [1.0, 1e-2, 1e-3, 1e-4, 1e-5]  # the grid, then extended beyond its weakest value
    assert [(e["lam"], e["momentum"]) for e in grid.validation_] == [(lam, mu) for mu in (0.0, 0.5) for lam in lams]
    fixed = make_simulator("linear_mom", lam=grid.lam_, momentum=grid.momentum_, tol=1e-12).fit(runset)
    np.testing.assert_allclose(grid.A_, fixed.A_, rtol=0, atol=1e-8 * np.abs(fixed.A_).max())
    np.testing.assert_allclose(grid.B_, fixed.B_, rtol=0, atol=1e-8 * np.abs(fixed.B_).max())
    for entry in grid.validation_:  # each candidate's score is that of a direct fit at its (lam, momentum)
        direct = make_simulator("linear_mom", lam=entry["lam"], momentum=entry["momentum"], tol=1e-12)
        direct.fit(runset, runs=range(10))
        predicted, actual, mask = rollout_runs(direct, runset, [10, 11])
        mask[:, 0] = False
        assert entry["mse"] == pytest.approx(float(((predicted - actual)[mask] ** 2).mean()), rel=1e-4)


@pytest.mark.parametrize("options", [
    {},  # the paper's form: no step constants
    {"momentum": 0.6, "step_terms": True, "alpha_center": 1.0, "lr_scaled": True, "clip_negative": True},
    {"momentum": 0.9, "alpha_center": 1.0, "batch_mean": True, "lr_scaled": True},
    {"batch_mean": True},
    {"multiplicative": False, "alpha_center": 1.0, "step_terms": True},
    {"multiplicative": False, "alpha_center": 1.0, "momentum": 0.5, "lr_scaled": True, "clip_negative": True},
])
@pytest.mark.parametrize("given_rates", [True, False])
@pytest.mark.parametrize("block_bytes", [None, 200], ids=["one-block", "blocks-of-few-steps-and-curricula"])
def test_fast_rollout_equals_the_recurrence_on_the_coefficients(options, given_rates, block_bytes, monkeypatch):
    from simfluence.simulators import dynamics
    from simfluence.simulators.dynamics import unroll

    if block_bytes is not None:
        monkeypatch.setattr(dynamics, "_SIM_BLOCK_BYTES", block_bytes)
    runset = _extended_runset(seed=7)
    sim = SimfluenceLinear(lam=0.1, **options).fit(runset)
    base = runset[0].curriculum
    ragged = random_curricula(2, 20, 3, 25, subset_size=10, seed=1)  # epochs of 10 in batches of 3: last one of 1
    curricula = [base, base.truncate(17), base.reverse().duplicate(2, step=4), base.remove([1, 2]),
                 base.keep_only([5]), Curriculum([0], []), *ragged]  # batches of 0..4 entries, 0..25 steps
    initial = np.stack([runset[i % 4].initial_losses for i in range(len(curricula))])
    initial[5] = -0.5  # below the floor, in a curriculum without steps: held (and floored when clipping)
    rates = [runset[0].learning_rates[: cur.n_steps] for cur in curricula] if given_rates else None
    fast = sim.simulate(curricula, initial, rates)
    alpha, beta, _, _, _ = sim._coefficients(curricula, rates, fast.shape[1] - 1)
    active = np.arange(1, fast.shape[1])[None, :] <= np.array([cur.n_steps for cur in curricula])[:, None]
    reference = unroll(alpha, beta, initial, sim._momentum(), active, sim.loss_floor_)
    np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [2, 3])
def test_simulating_in_threads_gives_the_same_bits(threads, monkeypatch):
    from simfluence.simulators import dynamics

    runset = _extended_runset(seed=3)
    sim = SimfluenceLinear(lam=0.1, momentum=0.6, step_terms=True, alpha_center=1.0, lr_scaled=True,
                           clip_negative=True).fit(runset)
    curricula = random_curricula(7, 20, 3, 25, subset_size=10, seed=2) + [runset[0].curriculum.truncate(9)] * 2
    initial = np.stack([runset[i % 4].initial_losses for i in range(len(curricula))])
    rates = [runset[0].learning_rates[: cur.n_steps] for cur in curricula]
    monkeypatch.setattr(dynamics, "_SIM_MIN_PER_THREAD", 2)
    monkeypatch.setattr(dynamics, "_SIM_MAX_THREADS", 1)
    serial = sim.simulate(curricula, initial, rates)
    monkeypatch.setattr(dynamics, "_SIM_MAX_THREADS", threads)
    monkeypatch.setattr(dynamics.os, "cpu_count", lambda: threads)
    assert len(dynamics._thread_parts(len(curricula))) == threads
    np.testing.assert_array_equal(sim.simulate(curricula, initial, rates), serial)


def test_rollout_without_curricula_or_steps_keeps_the_initial_losses(linear_runs):
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(linear_runs[0])  # an empty batch keeps the loss
    assert sim.simulate([], np.ones((0, 5))).shape == (0, 1, 5)
    empty = [Curriculum([0], []), Curriculum([0, 0, 0], [])]  # no steps; two empty batches
    np.testing.assert_array_equal(sim.simulate(empty, np.ones(5)), np.ones((2, 3, 5)))


@pytest.mark.parametrize("every", [5, 10])
def test_auto_momentum_on_sparse_logs_says_it_drops_the_velocity_and_the_model_file_keeps_it(every, tmp_path):
    runset = _thin(known_linear_runset(n_pool=20, n_test=3, n_runs=8, n_steps=30, batch_size=4, seed=3)[0], every)
    with pytest.warns(FitWarning, match=rf"momentum='auto' fell back to 0 .*logs losses every {every} steps"):
        sim = make_simulator("linear_mom", lam_grid=(1.0,)).fit(runset)
    assert sim.momentum_ == 0.0
    assert len(sim.fit_warnings_) == 1 and f"every {every} steps" in sim.fit_warnings_[0]
    assert load_simulator(sim.save(tmp_path / "m.npz")).fit_warnings_ == sim.fit_warnings_
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)  # every step logged: nothing to say
        quiet = make_simulator("linear_mom", lam_grid=(1.0,), momentum_grid=(0.0, 0.5)).fit(
            known_linear_runset(n_pool=20, n_test=3, n_runs=8, n_steps=30, batch_size=4, seed=3)[0])
    assert quiet.fit_warnings_ == []


def _noisy_runs():
    """Runs whose validation error is lowest at lam = 1 (noise 0.02; see the grid in the test)."""
    return known_linear_runset(n_pool=20, n_test=3, n_runs=10, n_steps=20, batch_size=4, noise=0.02, seed=4)[0]


def test_lam_at_the_edge_of_its_grid_extends_the_grid_and_chooses_again():
    # the weakest value of the grid wins; three decades further down the best one (lam = 1) lies inside
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)
        sim = SimfluenceLinear(lam="auto", alpha_center=1.0, lam_grid=(100.0, 1000.0)).fit(_noisy_runs())
    assert sim.lam_ == pytest.approx(1.0)
    tried = sorted(entry["lam"] for entry in sim.validation_)
    np.testing.assert_allclose(tried, [0.1, 1.0, 10.0, 100.0, 1000.0])
    assert sim.fit_warnings_ == []


@pytest.mark.parametrize("grid, side, chosen", [((1e3, 1e4), "weakest", 1.0), ((1e-2, 1e-1), "strongest", 100.0)])
def test_lam_at_the_edge_even_of_the_extended_grid_warns_and_is_recorded(grid, side, chosen):
    with pytest.warns(FitWarning, match=rf"lam='auto' chose lam={chosen:g}, the {side} value even of lam_grid"):
        sim = SimfluenceLinear(lam="auto", alpha_center=1.0, lam_grid=grid).fit(_noisy_runs() if side == "weakest"
                                                                               else _pure_noise_runs())
    assert sim.lam_ == pytest.approx(chosen)
    assert len(sim.fit_warnings_) == 1 and side in sim.fit_warnings_[0]


def _pure_noise_runs():
    """Losses that random-walk whatever the curriculum (examples have no effect): the strongest ridge (keep the
    loss, alpha_center = 1) validates best."""
    runset = known_linear_runset(n_pool=20, n_test=3, n_runs=10, n_steps=20, batch_size=4, seed=4)[0]
    rng = np.random.default_rng(0)
    for run in runset.runs:
        run.losses = 2.0 + np.cumsum(0.05 * rng.standard_normal(np.shape(run.losses)), axis=0)
    return runset


@pytest.mark.parametrize("param, value, expected", [
    ("lam_grid", [], "lam_grid must be a non-empty list of numbers > 0, got []"),
    ("lam_grid", "abc", "lam_grid must be a non-empty list of numbers > 0, got 'abc'"),
    ("lam_grid", [1.0, -2.0], "lam_grid must be a non-empty list"),
    ("momentum_grid", [0.5, 1.5], "momentum_grid must be a non-empty list of numbers in [0, 1)"),
    ("alpha_center", "x", "alpha_center must be a number, got 'x'"),
    ("alpha_center", float("nan"), "alpha_center must be a number"),
    ("lam", "strong", "lam must be a number > 0 or 'auto', got 'strong'"),
    ("momentum", 1.0, "momentum must be a number in [0, 1) or 'auto'"),
    ("val_fraction", 0, "val_fraction must be a number in (0, 1)"),
    ("step_terms", "yes", "step_terms must be true or false"),
    ("lr_scaled", "sometimes", "lr_scaled must be true, false or 'auto'"),
    ("solver", "magic", "solver must be one of auto, direct, cg"),
    ("max_iter", 2.5, "max_iter must be an integer >= 1"),
    ("tol", "1e-8", "tol must be a number in (0, 1)"),
])
def test_bad_hyper_parameters_are_one_error_naming_the_parameter(linear_runs, param, value, expected):
    sim = make_simulator("linear_mom").set_params(**{param: value})
    with pytest.raises(SimfluenceError, match=re.escape(expected)) as caught:
        sim.fit(linear_runs[0])
    assert "\n" not in str(caught.value) and str(caught.value).startswith("SimfluenceLinear: ")


def test_a_run_set_without_test_examples_is_one_clear_error():
    cur = Curriculum.from_batches([[0, 1], [1, 2]], n_pool=3)
    runs = [Run(f"r{i}", cur, [0, 1, 2], np.zeros((3, 0))) for i in range(3)]
    runset = RunSet(runs, n_pool=3, test_ids=[])
    for name in ("linear", "linear_mom", "additive", "linear_mom_log"):
        with pytest.raises(SimfluenceError, match=r"no test examples \(n_test = 0\)"):
            make_simulator(name).fit(runset)


def test_the_linear_family_takes_its_options_from_one_table():
    """One signature (LINEAR_OPTIONS): every class of the family takes those options, or fewer with fixed values."""
    import inspect

    from simfluence.simulators import LogAdditive, LogLinear
    from simfluence.simulators.linear import ADDITIVE_FIXED, LINEAR_OPTIONS

    table = {name: default for name, (_, default) in LINEAR_OPTIONS.items()}
    for cls, extra in ((SimfluenceLinear, {}), (SimfluenceAdditive, {}), (LogLinear, {"min_loss": 1e-6}),
                       (LogAdditive, {"min_loss": 1e-6})):
        params = cls().get_params()
        assert params == {name: default for name, default in {**table, **extra}.items() if name in params}, cls
        assert [name for name in params if name != "min_loss"] == [name for name in table if name in params], cls
        assert inspect.signature(cls).parameters.keys() == params.keys(), cls
    assert set(SimfluenceAdditive().get_params()) == set(table) - set(ADDITIVE_FIXED)
    additive = SimfluenceAdditive(0.5, True)  # positional, in signature order
    assert (additive.lam, additive.step_terms) == (0.5, True)
    assert (additive.multiplicative, additive.alpha_center, additive.momentum) == (False, 1.0, 0.0)
    assert "clip_negative" not in LogLinear().get_params() and LogLinear().clip_negative is False
    with pytest.raises(TypeError, match="momentum"):
        SimfluenceAdditive(momentum=0.5)
