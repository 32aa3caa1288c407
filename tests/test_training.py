"""The training engine: real training runs of any Task, logged completely, reproducibly and resumably."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import RunLogError, TaskError
from simfluence.runlog import RunLogger, RunSet, run_status
from simfluence.training import WarmupCosine, generate_runs
from simfluence.workloads import digits_task
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


def test_an_overwrite_with_another_learning_rate_keeps_no_old_run_or_checkpoint(tmp_path, task, curricula):
    out = tmp_path / "rs"
    generate_runs(task, curricula, out, checkpoint_steps=(0, STEPS), workers=1, progress=False)
    faster = replace(task, lr_at=WarmupCosine(0.5, STEPS))
    again = generate_runs(faster, curricula[:2], out, overwrite=True, workers=1, progress=False)
    assert again.run_names == ["run-000", "run-001"]
    assert all(np.allclose(run.learning_rates, [faster.lr_at(s) for s in range(1, STEPS + 1)]) for run in again)
    assert not (out / "checkpoints").exists()
    assert sorted(os.listdir(tmp_path)) == ["rs"]


def test_a_failing_overwrite_keeps_the_old_set_whole(tmp_path, task, curricula, monkeypatch):
    from simfluence import training

    out = tmp_path / "rs"
    generate_runs(task, curricula, out, workers=1, progress=False)
    before = files_digest(out)
    calls = []

    def fail_second_run(self, job):
        calls.append(job.name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_call(self, job)

    real_call = training._Trainer.__call__
    monkeypatch.setattr(training._Trainer, "__call__", fail_second_run)
    with pytest.raises(OSError, match="disk full"):
        generate_runs(task, curricula[::-1], out, overwrite=True, workers=1, progress=False)
    assert files_digest(out) == before and sorted(os.listdir(tmp_path)) == ["rs"]


KILLED_OVERWRITE = r"""
import os, sys
from simfluence.training import generate_runs
from simfluence.workloads import digits_task
from simfluence.curriculum import random_curricula
out, crash_at = sys.argv[1], int(sys.argv[2])
task = digits_task(pool_size=40, test_size=10, n_steps=10)
real_replace, renames = os.replace, [0]
def replace(src, dst):  # the process dies at the crash_at-th rename that touches the run set's folder
    if out in (str(src), str(dst)):
        renames[0] += 1
        if renames[0] == crash_at:
            os._exit(9)
    real_replace(src, dst)
os.replace = replace
generate_runs(task, random_curricula(1, 40, 4, 10, subset_size=20, seed=7), out, overwrite=True, workers=1,
              progress=False)
"""


@pytest.mark.parametrize("crash_at", [1, 2])
def test_an_overwrite_killed_at_its_renames_leaves_the_old_set_or_the_new_one(tmp_path, task, curricula, crash_at):
    out = tmp_path / "rs"
    old = generate_runs(task, curricula, out, workers=1, progress=False)
    result = subprocess.run([sys.executable, "-c", KILLED_OVERWRITE, str(out), str(crash_at)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 9, result.stderr
    loaded = RunSet.load(out)  # the next open finishes a swap that was cut between its renames
    if crash_at == 1:
        assert loaded.run_names == old.run_names and loaded[0].curriculum == curricula[0]
    else:
        assert loaded.run_names == ["run-000"] and loaded[0].curriculum != curricula[0]
        assert sorted(os.listdir(tmp_path)) == ["rs"]


def files_digest(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and ".locks" not in path.parts}


# ------------------------------------------------------------------ checkpoints of a run another writer trains (22.4)
def test_a_second_generate_never_touches_the_checkpoints_of_a_run_being_trained(tmp_path, task, curricula):
    out = tmp_path / "rs"
    generate_runs(task, curricula, out, checkpoint_steps=(0,), workers=1, progress=False)
    checkpoint = out / "checkpoints" / "run-001" / "step-0.pt"
    with RunLogger(out, "run-001", metadata={"checkpoints": []}, overwrite=True):  # the first generate, training it
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"being written")
        with pytest.raises(RunLogError, match="run 'run-001' .* is being written by another RunLogger"):
            generate_runs(task, curricula, out, checkpoint_steps=(0,), workers=1, progress=False)
        assert checkpoint.read_bytes() == b"being written"


def test_a_run_trained_elsewhere_that_fails_validation_changes_nothing(tmp_path, task, curricula):
    from simfluence.runlog import export_run
    from simfluence.training import _install_trained

    out = tmp_path / "rs"
    generate_runs(task, curricula, out, checkpoint_steps=(0,), workers=1, progress=False)
    before = files_digest(out)
    files = export_run(out, "run-001")
    losses = np.frombuffer(files["losses.bin"], dtype="<f4").copy()
    losses[3] = np.nan
    bad = {"run": {**files, "losses.bin": losses.tobytes()}, "checkpoints": {"step-0.pt": b"other"}}
    with pytest.raises(RunLogError, match="loss of test .* is nan"):
        _install_trained(out, "run-001", bad)
    assert files_digest(out) == before


# ------------------------------------------------------------------ errors in task code (22.8), task fingerprint (22.3)
def _raising(*args, **kwargs):
    raise ValueError("broken on purpose\nsecond line")


def _exiting(*args, **kwargs):
    raise SystemExit(3)


@pytest.mark.parametrize("field, function", [("make_model", "make_model"), ("make_optimizer", "make_optimizer"),
                                             ("lr_at", "lr_at"), ("loss_fn", "model or loss_fn")])
def test_an_error_in_task_code_is_one_task_error_naming_the_function(tmp_path, task, curricula, field, function):
    broken = replace(task, **{field: _raising})
    with pytest.raises(TaskError, match=rf"^the task's {function}.* raised ValueError: broken on purpose second line$"):
        generate_runs(broken, curricula, tmp_path / field, workers=1, progress=False)
    exiting = replace(task, **{field: _exiting})
    with pytest.raises(TaskError, match=rf"^the task's (.* )?{function}.* raised SystemExit\(3\)$"):
        generate_runs(exiting, curricula, tmp_path / f"{field}-exit", workers=1, progress=False)


BROKEN_TASK = """
from dataclasses import replace
from simfluence.workloads.digits import digits_task

def broken_loss(outputs, targets):
    raise ValueError("broken in a worker")

def make_task():
    return replace(digits_task(pool_size=40, test_size=10, n_steps=10), loss_fn=broken_loss)
"""


def test_an_error_in_task_code_under_process_workers_names_its_cause(tmp_path, capsys):
    from simfluence.cli import main

    (tmp_path / "broken_task.py").write_text(BROKEN_TASK)
    args = ["generate", "task", "--task", f"{tmp_path / 'broken_task.py'}:make_task", "--runs", "2", "--steps", "3",
            "--out", str(tmp_path / "set"), "--workers", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err  # was BrokenProcessPool, or a traceback
    assert "Traceback" not in err and err.endswith(
        "\nsimfluence: error: the task's model or loss_fn (on the test examples) raised ValueError: broken in a "
        "worker\n"), err


def test_a_resume_with_another_initial_model_is_refused_naming_what_differs(tmp_path, task, curricula):
    out = tmp_path / "rs"
    generate_runs(task, curricula, out, workers=1, progress=False)
    wider = replace(task, make_model=functools.partial(mlp, sizes=(64, 48, 10)))
    with pytest.raises(TaskError, match=r"holds runs of another task \(initial weights, model differ\)"):
        generate_runs(wider, curricula, out, workers=1, progress=False)
    assert generate_runs(wider, curricula, out, overwrite=True, workers=1, progress=False)[0].complete


UNGUARDED_SCRIPT = """
from simfluence.training import generate_random_runs
from simfluence.workloads import digits_task
generate_random_runs(digits_task(pool_size=30, test_size=4, n_steps=3), {out!r}, n_runs=2, n_steps=3, workers=2,
                     progress=False)
"""


def test_a_script_without_a_main_guard_under_process_workers_is_told_what_to_do(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT.format(out=str(tmp_path / "set")))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]  # was an empty RuntimeError / BrokenProcessPool
    assert last.startswith("simfluence.errors.TaskError: a worker process ended abruptly") and \
        'put that call under `if __name__ == "__main__":`' in last, result.stderr
    assert "generate_runs was called while a worker process imported the script" in result.stderr


def test_a_generate_and_an_overwrite_of_the_same_set_never_run_together(tmp_path, task, curricula):
    from simfluence.runlog import runset_destination

    out = tmp_path / "rs"
    generate_runs(task, curricula, out, workers=1, progress=False)
    before = files_digest(out)
    with RunLogger(out, "extra"):  # a writer of the set (another generate, a logger)
        with pytest.raises(RunLogError, match="is being written .*replace it once no writer runs"):
            generate_runs(task, curricula[:1], out, overwrite=True, workers=1, progress=False)
    with pytest.raises(RunLogError, match="holds no run set; the old set is kept"), \
            runset_destination(out, overwrite=True):  # an overwrite in progress (that writes nothing)
        with pytest.raises(RunLogError, match="is being replaced by another writer"):
            generate_runs(task, curricula, out, workers=1, progress=False)
        assert (out / "manifest.json").is_file() and (out / "runs" / ".locks").is_dir()
    assert {key: value for key, value in files_digest(out).items() if "extra" not in key} == before


# ------------------------------------------------------------------ the engine's public rules (issue 20)
def test_retraining_seeds_are_the_seeds_generate_runs_trained_with(tmp_path, task, curricula):
    from simfluence.training import retraining_seeds

    runs = generate_runs(task, curricula, tmp_path / "rs", init_seed=7, workers=1, progress=False)
    assert [retraining_seeds(runs, task, run) for run in runs] == [(7, 8), (7, 9), (7, 10)]
    unseeded = runs[2]
    del unseeded.metadata["seed"]  # an imported run records no seed: the first run's seed of the rule
    assert retraining_seeds(runs, task, unseeded) == (7, 8)


def test_moving_the_schedule_class_keeps_recorded_task_fingerprints(task):
    """A WarmupCosine of simfluence.training fingerprints as the one of the former simfluence.workloads.generator."""
    import dataclasses

    from simfluence.task import task_fingerprint_parts

    former = dataclasses.make_dataclass(
        "WarmupCosine", [("peak", float), ("n_steps", int), ("warmup_steps", int, 0), ("final_fraction", float, 0.1)],
        namespace={"__call__": WarmupCosine.__call__})
    former.__module__ = "simfluence.workloads.generator"
    before_the_move = replace(task, lr_at=former(**dataclasses.asdict(task.lr_at)))
    assert isinstance(task.lr_at, WarmupCosine)
    assert task_fingerprint_parts(task) == task_fingerprint_parts(before_the_move)


def test_workers_import_only_the_task_file_their_task_comes_from(tmp_path):
    """Workers unpickle the task, so they import its task file; a file loaded earlier in the same process for
    another task is not theirs to import (its helpers may be unimportable there: an error that is not the task's)."""
    import pickle

    from simfluence.task import load_task
    from simfluence.training import _task_files_used

    example = Path(__file__).resolve().parent.parent / "examples" / "wine_task.py"
    other = tmp_path / "other" / "wine_task.py"
    other.parent.mkdir()
    other.write_text(example.read_text())
    load_task(f"{other}:make_task")  # loaded first, for another task
    task = load_task(f"{example}:make_task")
    used = _task_files_used(pickle.dumps(task))
    assert list(used.values()) == [str(example)]


def test_training_on_the_cpu_device_is_training_as_before(tmp_path, task, curricula):
    plain = generate_runs(task, curricula, tmp_path / "plain", checkpoint_steps=(STEPS,), workers=1, progress=False)
    on_cpu = generate_runs(task, curricula, tmp_path / "cpu", checkpoint_steps=(STEPS,), workers=1, progress=False,
                           device="cpu")
    for a, b in zip(plain, on_cpu, strict=True):
        assert np.array_equal(a.losses, b.losses)
        assert "device" not in b.metadata  # only a run trained off the CPU records where
        saved = [torch.load(folder / run.metadata["checkpoints"][0]["path"], weights_only=True)
                 for folder, run in ((tmp_path / "plain", a), (tmp_path / "cpu", b))]
        assert all(torch.equal(saved[0]["model"][key], saved[1]["model"][key]) for key in saved[0]["model"])


@pytest.mark.parametrize("device, message", [("gpu7", "is not a torch device"),
                                             ("cuda:64", "not available")])
def test_a_device_this_machine_lacks_is_one_task_error_before_anything_is_written(tmp_path, task, curricula,
                                                                                  device, message):
    with pytest.raises(TaskError, match=message) as error:
        generate_runs(task, curricula, tmp_path / "rs", workers=1, progress=False, device=device)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "rs").exists()


def test_ray_training_refuses_a_device_it_would_ignore(tmp_path, task, curricula, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TaskError, match="Ray workers train on the CPU"):
        generate_runs(task, curricula, tmp_path / "rs", progress=False, backend="ray", device="cuda")
    assert not (tmp_path / "rs").exists()
