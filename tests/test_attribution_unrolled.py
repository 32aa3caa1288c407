"""Unrolled differentiation: exact derivatives through a replay of one run, and the ``unrolled`` simulator."""
from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.nn import functional

from simfluence.attribution.unrolled import replay_losses, unrolled_effects
from simfluence.attribution.unrolled_simulator import UnrolledSimulator
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import SimfluenceError, SimfluenceWarning, TaskError
from simfluence.methods import METHODS, load_simulator, make_simulator
from simfluence.simulators.base import Simulator
from simfluence.task import Task, check_replay
from simfluence.training import generate_runs
from simfluence.workloads import generate_digits, task_from_runset
from simfluence.workloads.tinylm import IGNORE, PAD, TinyLM, TinyLMConfig, token_nll


# ------------------------------------------------------------------ a tiny smooth float64 task
def tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def dropout_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)).double()


def batchnorm_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def shifted_mlp(seed: int) -> nn.Module:
    return tanh_mlp(seed + 1)


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.0, momentum=0.9)


def nesterov_weight_decay(params):
    return torch.optim.SGD(params, lr=0.0, momentum=0.9, nesterov=True, weight_decay=0.01)


def adam(params):
    return torch.optim.Adam(params, lr=0.0)


def adamw(params):
    return torch.optim.AdamW(params, lr=0.0, weight_decay=0.1)


def adam_amsgrad(params):
    return torch.optim.Adam(params, lr=0.0, amsgrad=True)


def rmsprop(params):
    return torch.optim.RMSprop(params, lr=0.0)


def decaying(step: int, peak: float) -> float:
    return peak * (1.0 - 0.5 * step / 40)


def wine_task(make_optimizer=sgd_momentum, lr: float = 0.02, n_pool: int = 48, n_test: int = 6) -> Task:
    """Wine rows (standardised, float64), a 13-8-3 tanh MLP, a decaying learning rate."""
    features, labels = load_wine(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    order = np.random.default_rng(0).permutation(len(labels))
    pool, test = order[:n_pool], order[n_pool:n_pool + n_test]
    inputs, targets = torch.tensor(features), torch.tensor(labels)
    return Task(make_model=tanh_mlp, pool_inputs=inputs[pool], pool_targets=targets[pool],
                test_inputs=inputs[test], test_targets=targets[test],
                loss_fn=functools.partial(functional.cross_entropy, reduction="none"),
                make_optimizer=make_optimizer, lr_at=functools.partial(decaying, peak=lr))


def retrain(task: Task, curriculum: Curriculum, weights=None, added=None, seed: int | None = None) -> np.ndarray:
    """Train for real with the task's torch optimizer, occurrence j weighted ``weights[j]`` in its batch's loss
    ``sum_j w_j loss_j / |c_t|``; ``added = {step: (example, u)}`` adds ``u * loss_example / |c_t|``.

    ``seed``: the run's torch seed, set after the model is built (as the generator does). Returns (T + 1, n_test)
    test losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the generator trains (and fast for a tiny model on a busy machine)
    try:
        return _retrain(task, curriculum, weights, added, seed)
    finally:
        torch.set_num_threads(threads)


def _retrain(task: Task, curriculum: Curriculum, weights, added, seed) -> np.ndarray:
    torch.manual_seed(task.init_seed)
    model = task.make_model(task.init_seed)
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = task.make_optimizer(model.parameters())
    weights = np.ones(curriculum.n_entries) if weights is None else weights

    def test_losses():
        model.eval()
        with torch.no_grad():
            losses = task.loss_fn(model(task.test_inputs), task.test_targets).numpy()
        model.train()
        return losses

    losses = [test_losses()]
    for step in range(1, curriculum.n_steps + 1):
        lo, hi = curriculum.offsets[step - 1], curriculum.offsets[step]
        ids, step_weights = list(curriculum.ids[lo:hi]), list(weights[lo:hi])
        if step in (added or {}):
            ids.append(added[step][0])
            step_weights.append(added[step][1])
        if hi > lo:
            for group in optimizer.param_groups:
                group["lr"] = task.lr_at(step)
            index = torch.tensor(ids)
            optimizer.zero_grad(set_to_none=True)
            per_example = task.loss_fn(model(task.pool_inputs[index]), task.pool_targets[index])
            ((torch.tensor(step_weights) * per_example).sum() / (hi - lo)).backward()
            optimizer.step()
        losses.append(test_losses())
    return np.stack(losses)


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(estimate - truth).max() / np.abs(truth).max())


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize("make_optimizer", [sgd_momentum, nesterov_weight_decay, adam, adamw])
def test_effects_equal_finite_differences_of_real_retraining(make_optimizer):
    lr = 0.05 if make_optimizer in (sgd_momentum, nesterov_weight_decay) else 0.01
    task = wine_task(make_optimizer, lr=lr, n_pool=24, n_test=5)
    batches = [list(batch) for batch in random_curricula(1, 24, 4, 12, seed=0)[0].batches()]
    batches[3] = []  # an empty batch: no update at all
    curriculum = Curriculum.from_batches(batches, 24)
    effects = unrolled_effects(task, curriculum, target_steps=[6], insertion_steps=[2, 12], checkpoint_every=5)
    np.testing.assert_allclose(effects.losses, retrain(task, curriculum), rtol=0, atol=1e-12)
    assert list(effects.target_steps) == [6, 12]

    h = 1e-5
    for entry in (0, 7, 13, curriculum.n_entries - 1):
        up, down = np.ones(curriculum.n_entries), np.ones(curriculum.n_entries)
        up[entry] += h
        down[entry] -= h
        difference = (retrain(task, curriculum, up) - retrain(task, curriculum, down)) / (2 * h)
        for k, step in enumerate(effects.target_steps):
            if curriculum.step_of_entries()[entry] > step:
                assert np.all(effects.occurrence[entry, k] == 0)
            else:
                assert relative_error(effects.occurrence[entry, k], difference[step]) < 1e-6
    for row, step in enumerate(effects.insertion_steps):
        for example in (3, 11):
            difference = (retrain(task, curriculum, added={int(step): (example, h)})
                          - retrain(task, curriculum, added={int(step): (example, -h)})) / (2 * h)
            assert relative_error(effects.insertion[row, example, -1], difference[-1]) < 1e-6


def test_per_example_effects_are_the_derivative_of_all_occurrences_together():
    task = wine_task(n_pool=24, n_test=5)
    curriculum = random_curricula(1, 24, 4, 12, seed=1)[0]
    effects = unrolled_effects(task, curriculum)
    example = int(curriculum.ids[0])
    mask = (curriculum.ids == example).astype(float)
    h = 1e-5
    difference = (retrain(task, curriculum, 1 + h * mask) - retrain(task, curriculum, 1 - h * mask)) / (2 * h)
    assert relative_error(effects.per_example()[example, -1], difference[-1]) < 1e-6


def test_a_model_with_dropout_is_replayed_with_the_runs_seed(tmp_path):
    task = dataclasses.replace(wine_task(n_pool=24, n_test=5), make_model=dropout_mlp)
    curriculum = random_curricula(1, 24, 4, 10, seed=2)[0]
    run = generate_runs(task, [curriculum], tmp_path / "dropout", workers=1, progress=False, seeds=[5])[0]
    np.testing.assert_array_equal(replay_losses(task, curriculum, seed=5).astype(np.float32), run.losses)
    effects = unrolled_effects(task, curriculum, seed=5)
    h, entry = 1e-5, 6
    up, down = np.ones(curriculum.n_entries), np.ones(curriculum.n_entries)
    up[entry] += h
    down[entry] -= h
    difference = (retrain(task, curriculum, up, seed=5) - retrain(task, curriculum, down, seed=5)) / (2 * h)
    assert relative_error(effects.occurrence[entry, -1], difference[-1]) < 1e-6


def tiny_lm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=11, max_len=6, d_model=8, n_layers=1, n_heads=2, d_ff=16)).double()


def tiny_lm_task(n_pool: int = 16, n_test: int = 4) -> Task:
    """Random 6-token sequences (pads after a random length, prompt tokens of the tests ignored), a one-block
    TinyLM in float64, torch's AdamW, a decaying learning rate."""
    rng = np.random.default_rng(0)
    tokens = torch.tensor(rng.integers(3, 11, size=(n_pool + n_test, 6)))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = IGNORE
    for row, length in enumerate(rng.integers(3, 7, size=n_pool + n_test)):
        tokens[row, length:] = PAD
        targets[row, length - 1:] = IGNORE
    targets[n_pool:, :2] = IGNORE  # queries: only the continuation of a prompt counts
    return Task(make_model=tiny_lm, pool_inputs=tokens[:n_pool], pool_targets=targets[:n_pool],
                test_inputs=tokens[n_pool:], test_targets=targets[n_pool:], loss_fn=token_nll,
                make_optimizer=adamw, lr_at=functools.partial(decaying, peak=0.02))


def test_transformer_effects_equal_finite_differences_of_real_retraining():
    task = tiny_lm_task()
    curriculum = random_curricula(1, 16, 3, 8, seed=4)[0]
    effects = unrolled_effects(task, curriculum, target_steps=[4])
    np.testing.assert_allclose(effects.losses, retrain(task, curriculum), rtol=0, atol=1e-12)
    h = 1e-5
    for entry in (0, 10, curriculum.n_entries - 1):
        up, down = np.ones(curriculum.n_entries), np.ones(curriculum.n_entries)
        up[entry] += h
        down[entry] -= h
        difference = (retrain(task, curriculum, up) - retrain(task, curriculum, down)) / (2 * h)
        assert relative_error(effects.occurrence[entry, -1], difference[-1]) < 1e-6
        if curriculum.step_of_entries()[entry] <= 4:
            assert relative_error(effects.occurrence[entry, 0], difference[4]) < 1e-6


def test_a_low_rank_cotangent_is_exact_at_the_rank_of_the_test_gradients():
    task = tiny_lm_task(n_test=6)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])  # eight tests, two of them copies: the gradients have rank <= 6
    task = dataclasses.replace(task, test_inputs=task.test_inputs[rows], test_targets=task.test_targets[rows])
    curriculum = random_curricula(1, 16, 3, 8, seed=4)[0]
    exact = unrolled_effects(task, curriculum, target_steps=[4], insertion_steps=[2, 8])  # torch's AdamW
    assert exact.captured_energy is None
    for rank in (6, 20):  # the rank, and more than the tests (as many as there are)
        low = unrolled_effects(task, curriculum, target_steps=[4], insertion_steps=[2, 8], cotangent_rank=rank)
        assert relative_error(low.occurrence, exact.occurrence) < 1e-8
        assert relative_error(low.insertion, exact.insertion) < 1e-5  # stored in float32
        np.testing.assert_allclose(low.captured_energy, 1.0, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(low.losses, exact.losses)
    with pytest.raises(SimfluenceError, match="cotangent_rank must be None"):
        unrolled_effects(task, curriculum, cotangent_rank=0)


def test_low_rank_errors_shrink_as_the_rank_grows():
    task = wine_task(adamw, lr=0.01, n_pool=24, n_test=12)
    curriculum = random_curricula(1, 24, 4, 12, seed=5)[0]
    exact = unrolled_effects(task, curriculum, target_steps=[6])
    errors, energies = [], []
    for rank in (1, 2, 4, 8, 12):
        low = unrolled_effects(task, curriculum, target_steps=[6], cotangent_rank=rank)
        errors.append(relative_error(low.occurrence, exact.occurrence))
        energies.append(low.captured_energy)
    # measured: 0.83, 0.46, 0.30, 0.20, 2e-15 (largest error relative to the largest effect)
    assert errors[0] > 0.5 and all(later < earlier for earlier, later in zip(errors[:-1], errors[1:], strict=True))
    assert errors[-1] < 1e-8
    energies = np.stack(energies)  # nested subspaces: every test keeps more of its gradient as the rank grows
    assert np.all(np.diff(energies, axis=0) >= -1e-12) and energies[0].min() < 0.1
    np.testing.assert_allclose(energies[-1], 1.0, rtol=0, atol=1e-10)


def test_recomputed_segments_give_the_same_effects_as_a_kept_forward_pass():
    task = wine_task(adam, lr=0.01, n_pool=24, n_test=5)
    curriculum = random_curricula(1, 24, 4, 12, seed=5)[0]
    kept = unrolled_effects(task, curriculum, target_steps=3, insertion_steps=[3, 12])  # fits: no recomputation
    for bounded in (unrolled_effects(task, curriculum, target_steps=3, insertion_steps=[3, 12], memory=1),
                    unrolled_effects(task, curriculum, target_steps=3, insertion_steps=[3, 12], checkpoint_every=5,
                                     device="cpu")):
        np.testing.assert_array_equal(bounded.occurrence, kept.occurrence)
        np.testing.assert_array_equal(bounded.insertion, kept.insertion)
        np.testing.assert_array_equal(bounded.losses, kept.losses)
    assert np.abs(kept.occurrence).max() > 0 and np.abs(kept.insertion).max() > 0


def test_a_model_that_updates_buffers_in_training_is_refused():
    task = dataclasses.replace(wine_task(n_pool=24), make_model=batchnorm_mlp)
    with pytest.raises(SimfluenceError, match="BatchNorm"):
        unrolled_effects(task, random_curricula(1, 24, 4, 3, seed=0)[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_replay_reproduces_the_logged_run_exactly(tmp_path, optimizer):
    runset = generate_digits(tmp_path / optimizer, n_runs=1, n_steps=20, batch_size=4, pool_size=40, test_size=10,
                             optimizer=optimizer, seed=3, workers=1, progress=False)
    run = runset[0]
    task = task_from_runset(runset)
    replayed = replay_losses(task, run.curriculum, init_seed=3, seed=run.metadata["seed"], dtype=None)
    np.testing.assert_array_equal(replayed.astype(np.float32), run.losses)


def test_an_unsupported_optimizer_is_named():
    task = wine_task(rmsprop, n_pool=24)
    with pytest.raises(SimfluenceError, match="RMSprop"):
        unrolled_effects(task, random_curricula(1, 24, 4, 3, seed=0)[0])
    with pytest.raises(SimfluenceError, match="amsgrad"):
        unrolled_effects(wine_task(adam_amsgrad, n_pool=24), random_curricula(1, 24, 4, 3, seed=0)[0])


# ------------------------------------------------------------------ the simulator
@pytest.fixture(scope="module")
def wine_runs(tmp_path_factory):
    """Two logged runs of 30 steps (batch 8, pool 48) of the SGD-momentum wine task; run 0 is the base."""
    task = wine_task()
    curricula = random_curricula(2, 48, 8, 30, seed=1)
    runset = generate_runs(task, curricula, tmp_path_factory.mktemp("wine") / "runs", workers=1, progress=False)
    return task, runset


@pytest.fixture(scope="module")
def fitted(wine_runs):
    task, runset = wine_runs
    return make_simulator("unrolled", target_steps=3, insertion_steps="all").fit(runset, runs=[0], task=task)


def test_the_registry_builds_the_unrolled_simulator():
    assert isinstance(make_simulator("unrolled"), UnrolledSimulator)
    assert METHODS["unrolled"].needs == frozenset({"task"})


def test_simulating_the_base_curriculum_returns_the_replayed_trajectory(fitted, wine_runs):
    _, runset = wine_runs
    base = runset[0].curriculum
    np.testing.assert_allclose(fitted.simulate(base, fitted.base_losses_[0])[0], fitted.base_losses_,
                               rtol=0, atol=1e-12)
    shifted = fitted.simulate(base, fitted.base_losses_[0] + 0.1)[0]
    np.testing.assert_allclose(shifted, fitted.base_losses_ + 0.1, rtol=0, atol=1e-12)
    assert fitted.replay_error_ < 1e-5  # float64 replay of a float64 task, losses logged in float32


def test_first_order_predictions_match_retraining(fitted, wine_runs, tmp_path):
    task, runset = wine_runs
    base = runset[0].curriculum
    examples = [int(i) for i in base.ids[::13][:6]]
    edits = {"remove": [base.remove([i]) for i in examples],
             "duplicate": [base.duplicate(i) for i in examples],
             "move_to_end": [_move_to_end(base, i) for i in examples]}
    curricula = [c for edited in edits.values() for c in edited]
    retrained = generate_runs(task, curricula, tmp_path / "edits", workers=1, progress=False)
    predicted = fitted.simulate(curricula, fitted.base_losses_[0])[:, -1]
    errors = {name: [] for name in edits}
    for row, name in enumerate(name for name, edited in edits.items() for _ in edited):
        actual = retrained[row].losses[-1] - fitted.base_losses_[-1]
        change = predicted[row] - fitted.base_losses_[-1]
        errors[name].append(np.linalg.norm(change - actual) / np.linalg.norm(actual))
    # measured: relative error of the change, median (max): removal 0.06 (0.09), duplication 0.04 (0.07),
    # move to the end 0.05 (0.06)
    for name, values in errors.items():
        assert np.median(values) < 0.1 and max(values) < 0.2, (name, values)


def _move_to_end(curriculum: Curriculum, example: int) -> Curriculum:
    """Every occurrence of ``example`` moved to the last steps, one per step from the end."""
    moved = curriculum
    for k in range(int(np.sum(curriculum.ids == example))):
        moved = moved.move(example, to_step=curriculum.n_steps - k, from_step=None)
    return moved


@pytest.mark.parametrize("step", [None, 15])
def test_leave_one_out_equals_generic_resimulation(fitted, wine_runs, step):
    _, runset = wine_runs
    base = runset[0].curriculum
    example = int(base.ids[5])
    for curriculum in (base, _move_to_end(base.duplicate(int(base.ids[0])), example)):
        initial = fitted.base_losses_[0]
        fast = fitted.leave_one_out(curriculum, initial, step=step)
        generic = Simulator.leave_one_out(fitted, curriculum, initial, step=step)
        np.testing.assert_allclose(fast, generic, rtol=1e-9, atol=1e-14)
        assert np.abs(generic).max() > 1e-4


def test_save_and_load_round_trip(fitted, wine_runs, tmp_path):
    _, runset = wine_runs
    path = fitted.save(tmp_path / "unrolled.npz")
    loaded = load_simulator(path)
    assert isinstance(loaded, UnrolledSimulator) and loaded.get_params() == fitted.get_params()
    assert loaded.base_run_ == runset[0].name and loaded.optimizer_ == fitted.optimizer_
    edited = runset[0].curriculum.remove([int(runset[0].curriculum.ids[2])])
    np.testing.assert_array_equal(loaded.simulate(edited, runset[0].initial_losses),
                                  fitted.simulate(edited, runset[0].initial_losses))
    assert path.stat().st_size < 2_000_000


def test_the_simulator_differentiates_only_its_run_sets_tests_matched_by_id(fitted, wine_runs):
    task, runset = wine_runs  # the task has all 6 probes; the run set keeps two, in another order
    sim = make_simulator("unrolled", target_steps=3, insertion_steps="all").fit(runset.select_tests([4, 1]),
                                                                                 runs=[0], task=task)
    assert sim.test_ids_ == [runset.test_ids[4], runset.test_ids[1]]
    np.testing.assert_allclose(sim.occurrence_effects_, fitted.occurrence_effects_[..., [4, 1]], rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(sim.insertion_effects_, fitted.insertion_effects_[..., [4, 1]], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(sim.base_losses_, fitted.base_losses_[:, [4, 1]])
    renamed = dataclasses.replace(task, test_ids=[f"q{i}" for i in range(task.n_test)])
    with pytest.raises(TaskError, match="has test id 4, which the task does not have"):
        UnrolledSimulator(insertion_steps="none").fit(runset.select_tests([4, 1]), runs=[0], task=renamed)


@pytest.mark.filterwarnings("ignore::simfluence.errors.NonlinearityWarning")  # rank 1: the removal check fails too
def test_a_low_rank_fit_records_the_captured_energy_and_warns_when_a_test_loses_it(wine_runs, tmp_path):
    task, runset = wine_runs
    with pytest.warns(SimfluenceWarning, match=r"cotangent_rank=1: [1-6] of 6 tests keep less than 90% of their"):
        low = UnrolledSimulator(insertion_steps="none", cotangent_rank=1).fit(runset, runs=[0], task=task)
    assert low.captured_energy_.shape == (1, 6) and low.captured_energy_.min() < 0.9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = UnrolledSimulator(insertion_steps="none", cotangent_rank=6).fit(runset, runs=[0], task=task)
    assert not [w for w in caught if "cotangent_rank" in str(w.message)]
    exact = UnrolledSimulator(insertion_steps="none").fit(runset, runs=[0], task=task)
    assert exact.captured_energy_ is None
    np.testing.assert_allclose(full.occurrence_effects_, exact.occurrence_effects_, rtol=0,
                               atol=1e-10 * np.abs(exact.occurrence_effects_).max())
    loaded = load_simulator(low.save(tmp_path / "low.npz"))
    np.testing.assert_array_equal(loaded.captured_energy_, low.captured_energy_)
    assert loaded.get_params()["cotangent_rank"] == 1
    assert load_simulator(exact.save(tmp_path / "exact.npz")).captured_energy_ is None


def test_fitting_needs_exactly_one_run_of_the_right_task(wine_runs):
    task, runset = wine_runs
    with pytest.raises(SimfluenceError, match="exactly one base run"):
        UnrolledSimulator().fit(runset, runs=[0, 1], task=task)
    with pytest.raises(SimfluenceError, match="pass runs=\\[position\\]"):
        UnrolledSimulator().fit(runset, task=task)
    other = dataclasses.replace(task, make_model=shifted_mlp)  # other initial weights
    with pytest.raises(SimfluenceError, match="initial losses differ"):
        UnrolledSimulator(insertion_steps="none").fit(runset, runs=[0], task=other)


def test_curricula_it_cannot_predict_are_clear_errors(wine_runs):
    task, runset = wine_runs
    sim = UnrolledSimulator(insertion_steps=[30]).fit(runset, runs=[0], task=task)
    base = runset[0].curriculum
    absent = int(np.setdiff1d(np.arange(48), base.batch(10))[0])
    sim.simulate(base.duplicate(absent, step=30), sim.base_losses_[0])  # an insertion step: fine
    sim.simulate(base.duplicate(int(base.batch(10)[0]), step=10), sim.base_losses_[0])  # a duplicate: fine
    with pytest.raises(SimfluenceError, match="added at step 10"):
        sim.simulate(base.duplicate(absent, step=10), sim.base_losses_[0])
    with pytest.raises(SimfluenceError, match="base run's length"):
        sim.simulate(base.truncate(20), sim.base_losses_[0])


def test_a_task_that_does_not_reproduce_the_run_stops_before_the_backward_pass(wine_runs):
    task, runset = wine_runs
    run = runset[0]
    check = functools.partial(check_replay, runset, run)
    effects = unrolled_effects(task, run.curriculum, seed=run.metadata["seed"], replay_check=check)  # float64
    assert check(effects.losses) < 1e-5 * np.abs(effects.losses).mean()  # the float64 replay of a float32 run
    no_momentum = dataclasses.replace(task, make_optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    with pytest.raises(TaskError, match="retraining run 'run-000' .* does not reproduce its log"):
        unrolled_effects(no_momentum, run.curriculum, seed=run.metadata["seed"], replay_check=check,
                         insertion_steps="all")
