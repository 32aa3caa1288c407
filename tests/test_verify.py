"""Counterfactual verification retrains real models and compares them with the simulator."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.apps.verify import verify_counterfactuals
from simfluence.errors import TaskError
from simfluence.runlog import RunSet
from simfluence.simulators import SimfluenceLinear
from simfluence.synthetic import known_linear_runset
from simfluence.workloads import digits_task, generate_digits, task_from_runset


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "digits"
    generate_digits(out, n_runs=6, n_steps=20, pool_size=40, test_size=10, workers=1, progress=False)
    return RunSet.load(out)


def test_rebuilt_task_matches_the_run_set(tiny_digits):
    task = task_from_runset(tiny_digits)
    assert task.n_pool == 40 and task.n_test == 10
    assert task.metadata["pool_labels"] == tiny_digits.metadata["pool_labels"]


def test_task_from_a_foreign_run_set_is_a_clear_error():
    runset, _, _ = known_linear_runset(n_pool=5, n_test=2, n_runs=2, n_steps=3)
    with pytest.raises(TaskError, match="records no known workload .* pass --task path/to/file.py:function"):
        task_from_runset(runset)


def test_verify_retrains_every_counterfactual(tiny_digits, tmp_path):
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(tiny_digits, runs=range(5))
    result = verify_counterfactuals(sim, tiny_digits, 5, tests=[0, 1], k=3, out=tmp_path / "cf", workers=1,
                                    progress=False)
    assert result.base_reproduction == 0.0  # retraining is deterministic: the base run comes back exactly
    assert len(result.table) == 6 and result.names[0] == "base"
    assert result.actual.shape == result.predicted.shape == (6, 21, 10)
    assert np.isfinite(result.table["all_mse"]).all()
    retrained = RunSet.load(tmp_path / "cf")
    base = tiny_digits[5].curriculum
    assert retrained[0].curriculum == base and retrained[4].curriculum == base.reverse()  # the edits were trained
    for index in range(1, 6):  # and each edit really changed the trained model
        assert not np.array_equal(result.actual[index], result.actual[0]), result.names[index]


def test_verify_takes_a_task_where_the_run_set_records_none(tiny_digits, tmp_path):
    bare = RunSet(list(tiny_digits), tiny_digits.n_pool, tiny_digits.pool_ids, tiny_digits.test_ids, metadata={})
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(bare, runs=range(5))
    with pytest.raises(TaskError, match="records no task; pass --task"):
        verify_counterfactuals(sim, bare, 5, tests=[0, 1], k=3, workers=1, progress=False)
    task = digits_task(pool_size=40, test_size=10, n_steps=20)
    result = verify_counterfactuals(sim, bare, 5, tests=[0, 1], k=3, workers=1, progress=False, task=task)
    assert result.base_reproduction == 0.0


def test_a_task_with_another_schedule_is_refused(tiny_digits):
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(tiny_digits, runs=range(5))
    task = digits_task(pool_size=40, test_size=10, n_steps=20, lr=0.5)
    with pytest.raises(TaskError, match="learning rate at step 1 is .* but run 'run-005' logged"):
        verify_counterfactuals(sim, tiny_digits, 5, tests=[0, 1], k=3, workers=1, progress=False, task=task)
