"""Metasmoothness of a training setup, and the unrolled simulator's check of its own linearity."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.nn import functional

from simfluence.attribution.smoothness import (
    CHAOTIC_BELOW,
    SMOOTH_FROM,
    linearity_check,
    metasmoothness,
    replayed_removal_check,
    score_differences,
    weighted_replay,
)
from simfluence.attribution.unrolled import replay_losses, unrolled_effects
from simfluence.attribution.unrolled_simulator import UnrolledSimulator
from simfluence.curriculum import random_curricula
from simfluence.errors import NonlinearityWarning, SimfluenceError
from simfluence.methods import load_simulator
from simfluence.task import Task
from simfluence.training import generate_runs


# ------------------------------------------------------------------ tiny tasks: smooth and chaotic
def tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def sgd(params):
    return torch.optim.SGD(params, lr=0.0, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=0.0, eps=1e-8)


def constant(step: int, lr: float) -> float:
    return lr


def wine_task(make_optimizer=sgd, lr: float = 0.02) -> Task:
    """48 standardised wine rows (float64), a 13-8-3 tanh MLP. SGD lr 0.02: smooth; Adam lr 0.5: chaotic."""
    features, labels = load_wine(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    order = np.random.default_rng(0).permutation(len(labels))
    pool, test = order[:48], order[48:54]
    inputs, targets = torch.tensor(features), torch.tensor(labels)
    return Task(make_model=tanh_mlp, pool_inputs=inputs[pool], pool_targets=targets[pool],
                test_inputs=inputs[test], test_targets=targets[test],
                loss_fn=functools.partial(functional.cross_entropy, reduction="none"),
                make_optimizer=make_optimizer, lr_at=functools.partial(constant, lr=lr))


SMOOTH = functools.partial(wine_task, sgd, 0.02)
CHAOTIC = functools.partial(wine_task, adam, 0.5)


@pytest.fixture(scope="module")
def curriculum():
    return random_curricula(1, 48, 8, 30, seed=1)[0]


# ------------------------------------------------------------------ the score
def test_the_score_is_the_movement_weighted_sign_agreement_of_consecutive_differences():
    base = np.zeros(3)
    assert score_differences(base, np.array([1.0, -1, 2]), np.array([2.0, -2, 4])) == 1.0  # linear
    # the second parameter turns back: it moved 1 of a total movement of 1 + 3 = 4
    assert score_differences(base, np.array([1.0, -1, 0]), np.array([2.0, 0, 0])) == pytest.approx(1.0)
    assert score_differences(base, np.array([1.0, 2, 0]), np.array([2.0, 1, 0])) == pytest.approx((2 - 1) / 3)
    assert score_differences(base, base, base) == 1.0  # nothing moves


def test_unit_weights_replay_the_run_bit_for_bit(curriculum):
    task = SMOOTH()
    params, losses = weighted_replay(task, curriculum)
    np.testing.assert_array_equal(losses, replay_losses(task, curriculum)[-1])
    assert params.shape == (sum(p.numel() for p in task.make_model(0).parameters()),)


def test_example_weights_enter_the_batch_loss_as_unrolled_differentiates_them(curriculum):
    """(L(w = 1 + eps e_i) - L(w = 1 - eps e_i)) / 2 eps equals the exact derivative of all i's occurrences."""
    task = SMOOTH()
    exact = unrolled_effects(task, curriculum).per_example()[:, -1, :]  # (n_pool, n_test)
    for example in curriculum.ids[:3]:
        eps = 1e-5
        weights = np.ones(task.n_pool)
        weights[example] += eps
        _, up = weighted_replay(task, curriculum, weights)
        weights[example] -= 2 * eps
        _, down = weighted_replay(task, curriculum, weights)
        np.testing.assert_allclose((up - down) / (2 * eps), exact[example], rtol=1e-5, atol=1e-9)


def test_smooth_training_scores_about_one(curriculum):
    report = metasmoothness(SMOOTH(), curriculum, n_directions=2)
    assert report.score > 0.95 and np.all(report.loss_scores > 0.95)
    assert report.n_replays == 5 and report.scores.shape == (2,) and np.all(report.movement > 0)
    assert "can be trusted" in report.verdict and f">= {SMOOTH_FROM}" in report.verdict


def test_chaotic_training_scores_low_and_says_so(curriculum):
    report = metasmoothness(CHAOTIC(), curriculum, n_directions=2)
    assert report.score < CHAOTIC_BELOW
    assert report.verdict.startswith("attribution of single examples is unreliable on this setup")
    assert "docs/smoothness.md" in report.summary()


def test_a_run_set_is_scored_around_its_run_with_the_seeds_it_was_trained_with(tmp_path, curriculum):
    task = SMOOTH()
    runset = generate_runs(task, [curriculum, curriculum], tmp_path / "runs", workers=1, progress=False)
    from_runset = metasmoothness(task, runset, "run-001", n_directions=1)
    init_seed, seed = task.init_seed, runset[1].metadata["seed"]
    direct = metasmoothness(task, curriculum, n_directions=1, init_seed=init_seed, run_seed=seed)
    assert from_runset.run == "run-001" and from_runset.score == direct.score


def test_bad_options_are_named(curriculum):
    with pytest.raises(SimfluenceError, match="n_directions"):
        metasmoothness(SMOOTH(), curriculum, n_directions=0)
    with pytest.raises(SimfluenceError, match="h must be"):
        metasmoothness(SMOOTH(), curriculum, h=0.0)
    with pytest.raises(SimfluenceError, match="needs the Task"):
        metasmoothness(None, curriculum)
    with pytest.raises(SimfluenceError, match="one weight per pool example"):
        weighted_replay(SMOOTH(), curriculum, np.ones(3))


# ------------------------------------------------------------------ the unrolled simulator checks itself
def test_the_linearity_check_compares_sign_magnitude_and_correlation():
    replayed = np.array([0.1, 0.2, -0.05, 0.3])
    assert linearity_check(replayed * 1.5, replayed)["ok"]
    assert not linearity_check(replayed * 3, replayed)["ok"]  # magnitude off by more than 2x
    assert not linearity_check(-replayed, replayed)["ok"]  # wrong sign
    assert not linearity_check(replayed[::-1].copy(), replayed)["ok"]  # same size, uncorrelated


@pytest.mark.parametrize("make_task, nonlinear", [(SMOOTH, False), (CHAOTIC, True)])
def test_unrolled_warns_when_a_replayed_removal_disagrees_with_first_order(make_task, nonlinear, tmp_path,
                                                                          curriculum):
    task = make_task()
    runset = generate_runs(task, [curriculum], tmp_path / "runs", workers=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = UnrolledSimulator(insertion_steps="none").fit(runset, runs=[0], task=task)
    fired = [w for w in caught if issubclass(w.category, NonlinearityWarning)]
    assert bool(fired) == nonlinear and sim.linearity_["ok"] == (not nonlinear)
    assert len(sim.linearity_["removed"]) == 3  # 5% of the 48 examples the run uses, rounded up
    if nonlinear:
        assert "not smooth enough" in str(fired[0].message)
    else:
        assert sim.linearity_["correlation"] > 0.9
    sim.save(tmp_path / "model.npz")
    assert load_simulator(tmp_path / "model.npz").linearity_ == sim.linearity_


def test_the_linearity_check_can_be_switched_off(tmp_path, curriculum):
    task = CHAOTIC()
    runset = generate_runs(task, [curriculum], tmp_path / "runs", workers=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonlinearityWarning)
        sim = UnrolledSimulator(insertion_steps="none", check_linearity=False).fit(runset, runs=[0], task=task)
    assert sim.linearity_ is None


@pytest.mark.parametrize("make_task, nonlinear", [(SMOOTH, False), (CHAOTIC, True)])
def test_any_simulator_can_check_an_answer_against_a_replayed_removal(make_task, nonlinear, tmp_path, curriculum):
    task = make_task()
    runset = generate_runs(task, [curriculum], tmp_path / "runs", workers=1, progress=False)
    sim = UnrolledSimulator(insertion_steps="none", check_linearity=False).fit(runset, runs=[0], task=task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = replayed_removal_check(sim, runset, "run-000", task=task)
    assert check["ok"] == (not nonlinear) and len(check["removed"]) == 3
    assert any(issubclass(w.category, NonlinearityWarning) for w in caught) == nonlinear
    edited = curriculum.remove([runset.pool_ids.index(i) for i in check["removed"]])
    real = replay_losses(task, edited, dtype=None)[-1] - replay_losses(task, curriculum, dtype=None)[-1]
    assert check["replayed_mean"] == pytest.approx(real.mean(), rel=1e-9)
