"""The LDS metric: per-test Spearman over draws, its mean and bootstrap interval, sign agreement, magnitude ratio."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.metrics import lds_scores, magnitude_ratio, sign_agreement


def test_an_exact_or_monotone_predictor_scores_one():
    actual = np.random.default_rng(0).normal(size=(3, 20, 7))
    exact = lds_scores(actual, actual, n_boot=200)
    assert exact["lds"] == exact["lds_low"] == exact["lds_high"] == 1.0
    assert exact["sign_agreement"] == 1.0 and exact["magnitude_ratio"] == 1.0
    cubed = lds_scores(2 * actual**3, actual, n_boot=0)
    assert cubed["lds"] == 1.0 and cubed["magnitude_ratio"] > 1.0
    assert lds_scores(-actual, actual, n_boot=0)["lds"] == -1.0


def test_a_noisy_predictor_gets_a_reproducible_interval_around_its_score():
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(3, 40, 20))
    predicted = actual + rng.normal(size=actual.shape)
    scores = lds_scores(predicted, actual, n_boot=300)
    assert 0.4 < scores["lds_low"] < scores["lds"] < scores["lds_high"] < 0.9
    assert lds_scores(predicted, actual, n_boot=300) == scores


def test_a_constant_predictor_is_undefined_not_a_warning():
    actual = np.random.default_rng(0).normal(size=(2, 10, 4))
    scores = lds_scores(np.zeros_like(actual), actual, n_boot=100)
    assert np.isnan(scores["lds"]) and np.isnan(scores["lds_low"]) and np.isnan(scores["lds_high"])
    assert scores["sign_agreement"] == 0.0 and scores["magnitude_ratio"] == 0.0


def test_a_test_the_predictor_ignores_counts_as_zero_and_a_test_that_never_moves_is_left_out():
    actual = np.random.default_rng(0).normal(size=(1, 10, 3))
    predicted = actual.copy()
    predicted[..., 1] = 0.0  # no opinion on test 1: correlation 0
    assert lds_scores(predicted, actual, n_boot=0)["lds"] == pytest.approx(2 / 3)
    actual[..., 2] = 0.5  # test 2 never moves: it cannot rank anything
    assert lds_scores(predicted, actual, n_boot=0)["lds"] == pytest.approx(1 / 2)


def test_sign_agreement_and_magnitude_ratio_match_a_hand_computation():
    actual = np.array([[[1.0, 1.0], [-1.0, -1.0]]])  # one base, two draws, two tests
    predicted = np.array([[[2.0, 2.0], [1.0, 1.0]]])  # right sign in draw 0 only, 1.5x the size on average
    assert sign_agreement(predicted, actual) == 0.5
    assert magnitude_ratio(predicted, actual) == 1.5
    scores = lds_scores(predicted, actual, n_boot=0)
    assert scores["sign_agreement"] == 0.5 and scores["magnitude_ratio"] == 1.5
    assert np.isnan(magnitude_ratio(predicted, np.zeros_like(actual)))


def test_the_lds_runner_scores_with_the_metrics_package():
    from simfluence.apps import lds

    assert lds.lds_scores is lds_scores  # one definition of the score, not a copy in the runner
