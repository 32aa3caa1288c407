"""Counterfactual verification retrains real models and compares them with the simulator."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from simfluence.apps.verify import verify_counterfactuals
from simfluence.cli import main
from simfluence.errors import TaskError
from simfluence.runlog import Run, RunSet
from simfluence.simulators import SimfluenceLinear
from simfluence.synthetic import known_linear_runset
from simfluence.task import ReplayWarning
from simfluence.workloads import digits_task, generate_digits, task_from_runset
from simfluence.workloads.digits import _sgd


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


def _imported(runset: RunSet) -> RunSet:
    """The run set as an import from CSV sees it: no task, no seeds, no optimizer settings recorded."""
    runs = [Run(run.name, run.curriculum, run.logged_steps, np.asarray(run.losses), run.learning_rates)
            for run in runset]
    return RunSet(runs, runset.n_pool, runset.pool_ids, runset.test_ids, metadata={})


def _wrong_tasks() -> dict:
    task = digits_task(pool_size=40, test_size=10, n_steps=20)
    shuffled = torch.randperm(task.n_test, generator=torch.Generator().manual_seed(0))
    return {
        "wrong init seed": dataclasses.replace(task, init_seed=3),
        "missing momentum": dataclasses.replace(task, make_optimizer=functools.partial(_sgd, momentum=0.0)),
        "shuffled test rows": dataclasses.replace(task, test_inputs=task.test_inputs[shuffled],
                                                  test_targets=task.test_targets[shuffled]),
    }


@pytest.mark.parametrize("case", ["wrong init seed", "missing momentum", "shuffled test rows"])
def test_a_task_that_does_not_reproduce_the_base_run_is_refused_before_any_edit(tiny_digits, tmp_path, case):
    bare = _imported(tiny_digits)
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(bare, runs=range(5))
    with pytest.raises(TaskError, match=r"retraining run 'run-005' with the task does not reproduce its log: test "
                                        r"losses differ by up to \d"):
        verify_counterfactuals(sim, bare, 5, tests=[0, 1], k=3, out=tmp_path / "cf", workers=1, progress=False,
                               task=_wrong_tasks()[case])
    assert RunSet.load(tmp_path / "cf").run_names == ["cf-00"]  # only the base was retrained


def test_a_raised_replay_tolerance_goes_on_with_a_loud_warning(tiny_digits):
    bare = _imported(tiny_digits)
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(bare, runs=range(5))
    with pytest.warns(ReplayWarning, match="reproduces its log only to .* beyond the default tolerance"):
        result = verify_counterfactuals(sim, bare, 5, tests=[0, 1], k=3, workers=1, progress=False,
                                        task=_wrong_tasks()["shuffled test rows"], replay_tolerance=1e6)
    assert result.base_reproduction > 0.1 and len(result.table) == 6


@pytest.mark.parametrize("case, message", [
    ("wrong init seed", "records init_seed = 0 but the task has 3"),  # an imported set: the run records it
    ("missing momentum", "records momentum = 0.9 but the task has 0.0"),
])
def test_settings_the_run_set_records_are_compared_before_any_retraining(tiny_digits, tmp_path, case, message):
    sim = SimfluenceLinear(lam=1.0, alpha_center=1.0).fit(tiny_digits, runs=range(5))
    runset = tiny_digits
    if case == "wrong init seed":  # the generator's record would override the task's seed: keep only the run's
        runset = RunSet(list(tiny_digits), tiny_digits.n_pool, tiny_digits.pool_ids, tiny_digits.test_ids,
                        metadata={})
    with pytest.raises(TaskError, match=message):
        verify_counterfactuals(sim, runset, 5, tests=[0, 1], k=3, out=tmp_path / "cf", workers=1, progress=False,
                               task=_wrong_tasks()[case])
    assert not (tmp_path / "cf").exists()


SHUFFLED_TASK = '''
import torch
from simfluence.workloads import digits_task


def make_task():
    task = digits_task(pool_size=40, test_size=10, n_steps=20)
    task.test_inputs, task.test_targets = task.test_inputs.flip(0), task.test_targets.flip(0)
    return task
'''


def test_cli_verify_stops_on_a_task_that_does_not_reproduce_and_warns_when_told_to_go_on(tiny_digits, tmp_path,
                                                                                         capsys):
    spec = tmp_path / "shuffled.py"
    spec.write_text(SHUFFLED_TASK)
    args = ["verify", str(tiny_digits.path), "--holdout", "1", "--k", "3", "--workers", "1",
            "--task", f"{spec}:make_task"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "does not reproduce its log" in err and "--replay-tolerance" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--out", str(tmp_path / "forced"), "--replay-tolerance", "1000"]) == 0
    captured = capsys.readouterr()
    assert "simfluence: warning: NOT REPRODUCED: retraining run 'run-005'" in captured.err
    assert (tmp_path / "forced" / "verify.json").is_file()
