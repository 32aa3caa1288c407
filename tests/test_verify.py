"""Counterfactual verification retrains real models and compares them with the simulator."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.apps.verify import verify_counterfactuals
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators import SimfluenceLinear
from simfluence.synthetic import known_linear_runset
from simfluence.workloads import generate_digits, task_from_runset


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
    with pytest.raises(SimfluenceError, match="records no known workload"):
        task_from_runset(runset)


def test_verify_retrains_every_counterfactual(tiny_digits, tmp_path):
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(tiny_digits, runs=range(5))
    result = verify_counterfactuals(sim, tiny_digits, 5, tests=[0, 1], k=3, out=tmp_path / "cf", workers=1,
                                    progress=False)
    assert result.base_reproduction == 0.0  # retraining is deterministic: the base run comes back exactly
    assert len(result.table) == 6 and result.names[0] == "base"
    assert result.actual.shape == result.predicted.shape == (6, 21, 10)
    assert np.all(result.table.loc[0, ["target_predicted_change", "target_actual_change"]] == 0)
    assert np.isfinite(result.table["all_mse"]).all()
    assert len(RunSet.load(tmp_path / "cf")) == 6
