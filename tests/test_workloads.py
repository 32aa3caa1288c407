"""The run generator and the digits workload: real training runs, logged completely, reproducibly, resumably."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import RunLogError
from simfluence.runlog import RunSet, run_status
from simfluence.workloads import WORKLOADS, digits_task, generate_digits, generate_runs
from simfluence.workloads.digits import mlp

POOL, TEST, RUNS, STEPS, BATCH = 40, 10, 3, 10, 4


@pytest.fixture
def task():
    return digits_task(pool_size=POOL, test_size=TEST, n_steps=STEPS)


@pytest.fixture
def curricula():
    return random_curricula(RUNS, POOL, BATCH, STEPS, subset_size=20, seed=1)


def test_runs_are_logged_completely_with_their_curricula(tmp_path, task, curricula):
    runs = generate_runs(task, curricula, tmp_path / "rs", workers=1, progress=False)
    assert runs.run_names == ["run-000", "run-001", "run-002"]
    assert (runs.n_pool, runs.n_test) == (POOL, TEST)
    for run, curriculum in zip(runs, curricula, strict=True):
        assert run.complete
        assert run.curriculum == curriculum
        assert np.array_equal(run.logged_steps, np.arange(STEPS + 1))
        assert np.allclose(run.learning_rates, [task.lr_at(step) for step in range(1, STEPS + 1)])
        assert np.isfinite(run.losses).all()
    assert runs.metadata["workload"] == "digits"
    assert len(runs.metadata["pool_labels"]) == POOL and len(runs.metadata["test_labels"]) == TEST


def test_all_runs_start_from_the_same_weights_and_training_lowers_the_loss(tmp_path, task, curricula):
    runs = generate_runs(task, curricula, tmp_path / "rs", workers=1, progress=False)
    initial = np.stack([run.initial_losses for run in runs])
    assert np.array_equal(initial, np.broadcast_to(initial[0], initial.shape))
    final = np.stack([np.asarray(run.losses[-1]) for run in runs])
    assert final.mean() < initial.mean()


def test_log_every_logs_every_kth_step_and_the_last(tmp_path, task, curricula):
    runs = generate_runs(task, curricula, tmp_path / "rs", log_every=4, workers=1, progress=False)
    assert runs[0].logged_steps.tolist() == [0, 4, 8, 10]


def test_same_seed_gives_identical_losses_in_process_and_across_workers(tmp_path, task, curricula):
    one = generate_runs(task, curricula, tmp_path / "one", workers=1, progress=False)
    again = generate_runs(task, curricula, tmp_path / "again", workers=1, progress=False)
    two = generate_runs(task, curricula, tmp_path / "two", workers=2, progress=False)
    for a, b, c in zip(one, again, two, strict=True):
        assert np.array_equal(a.losses, b.losses)
        np.testing.assert_allclose(a.losses, c.losses, rtol=0, atol=1e-6)


def test_initial_weights_come_from_the_tasks_init_seed_unless_given(tmp_path, curricula):
    task = digits_task(pool_size=POOL, test_size=TEST, n_steps=STEPS)
    task.init_seed = 5
    own = generate_runs(task, curricula[:1], tmp_path / "own", workers=1, progress=False)
    task.init_seed = 0
    given = generate_runs(task, curricula[:1], tmp_path / "given", init_seed=5, workers=1, progress=False)
    zero = generate_runs(task, curricula[:1], tmp_path / "zero", workers=1, progress=False)
    assert own.metadata["generator"]["init_seed"] == 5 and zero.metadata["generator"]["init_seed"] == 0
    assert np.array_equal(own[0].losses, given[0].losses)
    assert not np.array_equal(own[0].initial_losses, zero[0].initial_losses)


def test_run_seeds_can_be_given_per_run(tmp_path, task, curricula):
    runs = generate_runs(task, curricula, tmp_path / "rs", seeds=[11, 12, 13], workers=1, progress=False)
    assert [run.metadata["seed"] for run in runs] == [11, 12, 13]
    with pytest.raises(RunLogError, match="2 seeds for 3 curricula"):
        generate_runs(task, curricula, tmp_path / "other", seeds=[1, 2], workers=1, progress=False)
    assert not (tmp_path / "other").exists()


def test_rerun_redoes_only_incomplete_runs(tmp_path, task, curricula):
    out = tmp_path / "rs"
    first = generate_runs(task, curricula, out, workers=1, progress=False)
    losses = {run.name: np.array(run.losses) for run in first}
    info_path = out / "runs" / "run-001" / "run.json"
    info = json.loads(info_path.read_text())
    info["status"], info["n_logged"] = "running", 3
    info_path.write_text(json.dumps(info))
    mtimes = {name: (out / "runs" / name / "run.json").stat().st_mtime_ns for name in ("run-000", "run-002")}

    again = generate_runs(task, curricula, out, workers=1, progress=False)
    assert all(run_status(out, name) == "complete" for name in again.run_names)
    assert {name: (out / "runs" / name / "run.json").stat().st_mtime_ns for name in mtimes} == mtimes
    for run in again:
        assert np.array_equal(run.losses, losses[run.name])


def test_resuming_with_other_settings_or_curricula_is_an_error(tmp_path, task, curricula):
    out = tmp_path / "rs"
    generate_runs(task, curricula, out, workers=1, progress=False)
    with pytest.raises(RunLogError, match="different task settings"):
        generate_runs(task, curricula, out, log_every=2, workers=1, progress=False)
    with pytest.raises(RunLogError, match="different curriculum"):
        generate_runs(task, curricula[::-1], out, workers=1, progress=False)
    rerun = generate_runs(task, curricula[::-1], out, workers=1, progress=False, overwrite=True)
    assert rerun[0].curriculum == curricula[-1]


def test_checkpoints_hold_model_and_adam_state(tmp_path, curricula):
    task = digits_task(pool_size=POOL, test_size=TEST, n_steps=STEPS, optimizer="adam")
    out = tmp_path / "rs"
    runs = generate_runs(task, curricula, out, checkpoint_steps=(0, 5, STEPS), workers=1, progress=False)
    run = runs["run-001"]
    assert [entry["step"] for entry in run.metadata["checkpoints"]] == [0, 5, STEPS]
    paths = {entry["step"]: out / entry["path"] for entry in run.metadata["checkpoints"]}
    middle = torch.load(paths[5], weights_only=True)
    assert middle["step"] == 5 and middle["learning_rate"] == pytest.approx(task.lr_at(5))
    assert all("exp_avg_sq" in state for state in middle["optimizer"]["state"].values())
    final = torch.load(paths[STEPS], weights_only=True)
    model = mlp(0, sizes=(64, 64, 10))
    model.load_state_dict(final["model"])
    with torch.no_grad():
        losses = task.loss_fn(model(task.test_inputs), task.test_targets).numpy()
    np.testing.assert_allclose(losses, run.losses[-1], rtol=1e-5, atol=1e-6)


def test_empty_batches_are_logged_without_an_update(tmp_path, task):
    curriculum = Curriculum([0, 2, 2, 4], [0, 1, 2, 3], n_pool=POOL)
    run = generate_runs(task, [curriculum], tmp_path / "rs", workers=1, progress=False)[0]
    assert run.curriculum.batch_sizes.tolist() == [2, 0, 2]
    assert np.array_equal(run.losses[1], run.losses[2])


def test_generate_digits_records_noisy_labels(tmp_path):
    runs = WORKLOADS["digits"](tmp_path / "rs", n_runs=2, n_steps=5, pool_size=POOL, test_size=TEST,
                               label_noise=0.25, workers=1, progress=False)
    assert isinstance(runs, RunSet) and len(runs) == 2
    meta = runs.metadata
    noisy = np.array(meta["noisy_pool_ids"])
    assert noisy.size == 10
    labels, clean = np.array(meta["pool_labels"]), np.array(meta["pool_clean_labels"])
    assert np.array_equal(np.flatnonzero(labels != clean), noisy)
    assert set(meta["pool_dataset_rows"]).isdisjoint(meta["test_dataset_rows"])
    assert generate_digits is WORKLOADS["digits"]
