"""Evaluation fits on the first runs only and scores on the held-out last runs."""
from __future__ import annotations

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.evaluation import evaluate, metrics_json, parse_methods, split_runs
from simfluence.synthetic import known_linear_runset


def test_split_runs_holds_out_the_last_runs():
    assert split_runs(5, 2) == ([0, 1, 2], [3, 4])
    for bad in (0, 5):
        with pytest.raises(SimfluenceError, match="between 1 and 4"):
            split_runs(5, bad)


def test_evaluate_never_fits_on_heldout_runs():
    runset, _, _ = known_linear_runset(n_pool=20, n_test=4, n_runs=8, n_steps=15, noise=0.01, seed=4)
    result = evaluate(runset, ["mean_curve", "linear"], holdout=3)
    assert result.heldout_runs == ["run-005", "run-006", "run-007"]
    assert not set(result.train_runs) & set(result.heldout_runs)
    # corrupting the held-out losses changes the scores but not the fitted parameters
    for run in runset.runs[5:]:
        run.losses = run.losses + 1.0
    again = evaluate(runset, ["linear"], holdout=3)
    np.testing.assert_array_equal(again.simulators["linear"].A_, result.simulators["linear"].A_)
    assert again.metrics["linear"]["all_mse"] > 10 * result.metrics["linear"]["all_mse"]
    assert result.best("all_mse") == "linear"
    assert result.predicted["linear"].shape == (3, 16, 4)


def test_metrics_json_turns_nan_into_null():
    assert metrics_json({"m": {"a": float("nan"), "b": 1.0}}) == {"m": {"a": None, "b": 1.0}}


def test_parse_methods():
    assert parse_methods("linear, additive") == ["linear", "additive"]
    with pytest.raises(SimfluenceError, match="unknown method 'x'"):
        parse_methods("x")


def test_a_model_is_scored_only_on_a_run_set_with_its_pool_and_test_ids():
    """One check (Simulator.check_matches): the same sizes with other ids are refused, not scored by position."""
    import copy

    from simfluence.evaluation import score
    from simfluence.methods import make_simulator

    runset, _, _ = known_linear_runset(n_pool=10, n_test=3, n_runs=4, n_steps=8, batch_size=3, seed=0)
    simulator = make_simulator("mean_curve").fit(runset, runs=[0, 1])
    simulator.check_matches(runset)
    assert set(score({"mean_curve": simulator}, runset, [2, 3]).metrics) == {"mean_curve"}
    renamed = copy.copy(runset)
    renamed.pool_ids = [f"doc-{i}" for i in range(10)]
    with pytest.raises(SimfluenceError, match=r"^mean_curve was fitted on other pool or test ids than the run set's "
                                              r"\(10 pool / 3 test examples vs 10 / 3\)$"):
        score({"mean_curve": simulator}, renamed, [2, 3])
    other, _, _ = known_linear_runset(n_pool=12, n_test=3, n_runs=4, n_steps=8, batch_size=3, seed=0)
    with pytest.raises(SimfluenceError, match="MeanCurve was fitted on other pool or test ids"):
        simulator.check_matches(other)
