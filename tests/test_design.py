"""Step features and teacher-forced transitions match their definitions."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.curriculum import Curriculum
from simfluence.design import FeatureSpec, build_transitions, step_features
from simfluence.errors import SimfluenceError
from simfluence.runlog import Run, RunSet


def _runset(logged_steps=(0, 1, 2, 3), lrs=(0.1, 0.2, 0.4)):
    cur = Curriculum.from_batches([[0, 1], [1, 1, 2], [3]], n_pool=4)
    losses = np.arange(len(logged_steps) * 2, dtype=float).reshape(-1, 2) + 1.0
    run = Run("run-0", cur, logged_steps=list(logged_steps), losses=losses, learning_rates=list(lrs))
    return RunSet([run], n_pool=4, test_ids=["a", "b"])


def test_step_features_count_examples_and_one_hot_steps():
    cur = Curriculum.from_batches([[0, 1], [1, 1, 2], [3]], n_pool=4)
    rows = step_features([cur], FeatureSpec(4, n_step_terms=2)).toarray()
    expected = np.array([[1, 1, 0, 0, 1, 0], [0, 2, 1, 0, 0, 1], [0, 0, 0, 1, 0, 1]], dtype=float)
    np.testing.assert_array_equal(rows, expected)


def test_step_features_scale_by_learning_rate_and_batch_size():
    cur = Curriculum.from_batches([[0, 1], [1, 1, 2]], n_pool=3)
    rows = step_features([cur], FeatureSpec(3, lr_reference=0.2, batch_mean=True), [np.array([0.1, 0.4])])
    np.testing.assert_allclose(rows.toarray(), [[0.25, 0.25, 0], [0, 4 / 3, 2 / 3]])


def test_step_features_pad_short_curricula_with_empty_rows():
    short = Curriculum.from_batches([[0]], n_pool=2)
    long = Curriculum.from_batches([[1], [0], [1]], n_pool=2)
    rows = step_features([short, long], FeatureSpec(2)).toarray()
    assert rows.shape == (6, 2)
    np.testing.assert_array_equal(rows[:3], [[1, 0], [0, 0], [0, 0]])


def test_transitions_every_step():
    trans = build_transitions(_runset(), FeatureSpec(4))
    assert trans.n_transitions == 3
    np.testing.assert_array_equal(trans.features.toarray()[1], [0, 2, 1, 0])
    np.testing.assert_array_equal(trans.prev, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(trans.next, [[3, 4], [5, 6], [7, 8]])
    np.testing.assert_array_equal(trans.end_step, [1, 2, 3])


def test_transitions_sum_batches_between_sparse_logs():
    trans = build_transitions(_runset(logged_steps=(0, 3)), FeatureSpec(4))
    assert trans.n_transitions == 1
    np.testing.assert_array_equal(trans.features.toarray(), [[1, 3, 1, 1]])


def test_transitions_need_logged_learning_rates_when_scaled():
    runset = _runset(lrs=(0.1, np.nan, 0.4))
    with pytest.raises(SimfluenceError, match="learning rate of step 2"):
        build_transitions(runset, FeatureSpec(4, lr_reference=0.2))
