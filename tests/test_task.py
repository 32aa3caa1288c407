"""Your own task, end to end: a Task file the package does not ship generates runs, and verify retrains them.

The judged path: logistic regression on scikit-learn's wine data, written to a file here, generates runs
(``simfluence generate task``), they are exported to CSV and imported into a new run set that records no
task, and ``simfluence verify --task file.py:make_task`` retrains the held-out base run exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from simfluence.cli import main
from simfluence.errors import TaskError
from simfluence.runlog import RunSet
from simfluence.task import (
    REPLAY_TOLERANCE,
    ReplayWarning,
    Task,
    check_checkpoint_losses,
    check_recorded_settings,
    check_replay,
    fingerprint_change,
    fingerprint_digest,
    load_task,
    task_fingerprint,
    task_fingerprint_parts,
)
from simfluence.workloads import task_for_runset

# a task the package does not ship: examples/wine_task.py (the README's "Your own task"), written to a
# temporary folder so that nothing of the repository is on its import path
WINE_TASK = (Path(__file__).resolve().parent.parent / "examples" / "wine_task.py").read_text()


@pytest.fixture(scope="module")
def wine_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("task") / "wine_task.py"
    path.write_text(WINE_TASK)
    return f"{path}:make_task"


@pytest.fixture(scope="module")
def imported(wine_spec, tmp_path_factory) -> tuple[RunSet, RunSet]:
    """Six wine runs generated with the task, exported to CSV and imported into a run set recording no task."""
    folder = tmp_path_factory.mktemp("wine")
    assert main(["generate", "task", "--task", wine_spec, "--out", str(folder / "generated"), "--runs", "6",
                 "--steps", "30", "--batch-size", "8", "--subset-fraction", "0.5", "--seed", "3",
                 "--workers", "1"]) == 0
    generated = RunSet.load(folder / "generated")
    rates = pd.DataFrame({
        "run": np.repeat(generated.run_names, [run.n_steps for run in generated]),
        "step": np.concatenate([np.arange(1, run.n_steps + 1) for run in generated]),
        "lr": np.concatenate([run.learning_rates for run in generated]),
    })
    curriculum = generated.curriculum_frame().merge(rates, on=["run", "step"], how="left")
    curriculum.to_csv(folder / "curriculum.csv", index=False)
    generated.to_frame().to_csv(folder / "losses.csv", index=False)
    assert main(["import", str(folder / "curriculum.csv"), str(folder / "losses.csv"),
                 "--out", str(folder / "imported")]) == 0
    return generated, RunSet.load(folder / "imported")


def test_verify_retrains_an_imported_run_set_of_your_own_task_exactly(imported, wine_spec, tmp_path, capsys):
    generated, runset = imported
    assert "workload" not in runset.metadata and "generator" not in runset.metadata  # it records no task
    assert runset.pool_ids != generated.pool_ids  # other order (and only the used examples): ids must be matched
    assert generated.metadata["generator"]["init_seed"] == 7  # the task's init_seed, by default

    out = tmp_path / "verify"
    code = main(["verify", str(runset.path), "--task", wine_spec, "--holdout", "2", "--k", "3",
                 "--out", str(out), "--workers", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "verify.json").read_text())
    with capsys.disabled():
        print(f"\nwine task: retrained base run vs imported log, max |difference| = {report['base_reproduction']}")
    assert report["base_reproduction"] <= 1e-6
    assert report["run"] == runset.run_names[-1] and len(report["table"]) == 6
    assert "reproduces the logged run" in printed.out


def test_verify_without_a_task_is_one_line_naming_the_option_and_writes_nothing(imported, tmp_path, capsys):
    _, runset = imported
    out = tmp_path / "verify"
    assert main(["verify", str(runset.path), "--holdout", "2", "--k", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no task" in err[0] and "--task" in err[0]
    assert not out.exists()


def test_verify_with_a_task_lacking_an_id_names_it_and_writes_nothing(imported, wine_spec, tmp_path, capsys):
    _, runset = imported
    short = tmp_path / "short.py"
    short.write_text(Path(wine_spec.rpartition(":")[0]).read_text()
                     + "\n\ndef fewer_tests():\n    task = make_task()\n    return Task(**{**task.__dict__, "
                       "'test_inputs': task.test_inputs[1:], 'test_targets': task.test_targets[1:], "
                       "'test_ids': task.test_ids[1:]})\n")
    out = tmp_path / "verify"
    assert main(["verify", str(runset.path), "--task", f"{short}:fewer_tests", "--holdout", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test id 'w0'" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------- load_task
BROKEN_FILES = {
    "syntax.py": ("def make_task(:\n", "SyntaxError"),
    "imports.py": ("import simfluence_no_such_module\n", "ModuleNotFoundError"),
    "other_name.py": ("def something_else():\n    pass\n", "has no function 'make_task'"),
    "wrong_type.py": ("def make_task():\n    return 42\n", "returned a int, not a simfluence.task.Task"),
    "raises.py": ("def make_task():\n    raise ValueError('no data\\nhere')\n", "raised ValueError: no data here"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_a_broken_task_file_is_one_line_naming_the_spec(tmp_path, name):
    source, message = BROKEN_FILES[name]
    (tmp_path / name).write_text(source)
    spec = f"{tmp_path / name}:make_task"
    with pytest.raises(TaskError, match=message) as caught:
        load_task(spec)
    assert spec in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("spec, message", [
    ("wine_task.py", "is not of the form path/to/file.py:function"),
    ("{tmp}/missing.py:make_task", "no file"),
    ("simfluence_no_such_module:make_task", "importing module 'simfluence_no_such_module' failed"),
    ("simfluence.task:no_such_function", "has no function 'no_such_function'"),
])
def test_a_bad_task_spec_is_one_line_naming_it(tmp_path, spec, message):
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(TaskError, match=message) as caught:
        load_task(spec)
    assert spec in str(caught.value)


def test_load_task_takes_a_file_or_a_module(wine_spec):
    task = load_task(wine_spec)
    assert isinstance(task, Task) and (task.n_pool, task.n_test, task.init_seed) == (148, 30, 7)
    digits = load_task("simfluence.workloads.digits:digits_task")
    assert digits.metadata["workload"] == "digits"


def test_a_task_file_imports_modules_beside_it(tmp_path):
    (tmp_path / "wine_helpers_for_test.py").write_text("N_TEST = 30\n")
    (tmp_path / "uses_helper.py").write_text(
        WINE_TASK + "\n\nfrom wine_helpers_for_test import N_TEST\n\n\ndef checked():\n"
        "    task = make_task()\n    assert task.n_test == N_TEST\n    return task\n")
    assert load_task(f"{tmp_path / 'uses_helper.py'}:checked").n_test == 30


def test_generate_task_with_a_bad_spec_is_one_line(tmp_path, capsys):
    assert main(["generate", "task", "--task", "nowhere.py:make_task", "--out", str(tmp_path / "rs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'nowhere.py:make_task': no file 'nowhere.py'" in err[0]
    assert not (tmp_path / "rs").exists()


# ------------------------------------------------------------------------------------------- aligned_to
def _toy_task() -> Task:
    rows = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    return Task(make_model=None, pool_inputs=rows, pool_targets=torch.arange(10) * 10,
                test_inputs=rows[:4] + 0.5, test_targets=torch.arange(4), loss_fn=None, make_optimizer=None,
                lr_at=None, pool_ids=[100 + i for i in range(10)], test_ids=["a", "b", "c", "d"])


def test_aligned_rows_are_the_examples_the_run_set_ids_name():
    runset = RunSet([], pool_ids=["107", "102", "109"], test_ids=["d", "a"])  # str ids match int ids by text
    aligned = _toy_task().aligned_to(runset)
    assert aligned.pool_inputs[:, 0].tolist() == [7.0, 2.0, 9.0]
    assert aligned.pool_targets.tolist() == [70, 20, 90]
    assert aligned.test_inputs[:, 0].tolist() == [3.5, 0.5] and aligned.test_targets.tolist() == [3, 0]
    assert aligned.pool_ids == ["107", "102", "109"] and aligned.test_ids == ["d", "a"]


def test_aligning_to_the_tasks_own_order_changes_nothing():
    task = _toy_task()
    assert task.aligned_to(RunSet([], pool_ids=task.pool_ids, test_ids=task.test_ids)) is task


def test_an_id_the_task_lacks_is_one_line_naming_it():
    with pytest.raises(TaskError, match="has pool id 999, which the task does not have"):
        _toy_task().aligned_to(RunSet([], pool_ids=[101, 999], test_ids=["a"]))


def test_task_for_runset_needs_a_task_where_none_is_recorded():
    runset = RunSet([], pool_ids=range(10), test_ids=["a"])
    with pytest.raises(TaskError, match=r"records no task; pass --task path/to/file.py:function"):
        task_for_runset(runset)
    runset.metadata["workload"] = "my-own"
    with pytest.raises(TaskError, match="workload 'my-own', which is not built in"):
        task_for_runset(runset)
    task = task_for_runset(RunSet([], pool_ids=[103, 100], test_ids=["b"]), _toy_task())
    assert task.pool_inputs[:, 0].tolist() == [3.0, 0.0]


# ------------------------------------------------------------------------------------------- workers
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _is_worker(pid: int) -> bool:
    try:
        return b"--multiprocessing-fork" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_generation_leaves_no_worker_training(wine_spec, tmp_path):
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "simfluence", "generate", "task", "--task", wine_spec, "--out", str(out),
               "--runs", "4", "--steps", "1000000", "--log-every", "1000", "--workers", "2"]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline, workers, trained = time.monotonic() + 60, [], False
        while time.monotonic() < deadline and not (len(workers) == 2 and trained):
            time.sleep(0.2)
            workers = [pid for pid in _children(parent.pid) if _is_worker(pid)]
            trained = any(json.loads(info.read_text() or "{}").get("n_steps", 0) > 0
                          for info in out.glob("runs/*/run.json"))
        assert len(workers) == 2 and trained, "the workers did not start training the file task"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # anything of this session still there
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------------------- fingerprint
def _digits(**options) -> Task:
    from simfluence.workloads import digits_task

    return digits_task(pool_size=40, test_size=10, n_steps=20, **options)


def test_the_fingerprint_is_stable_and_names_the_part_that_changed():
    task = _digits()
    parts = task_fingerprint_parts(task)
    state = torch.random.get_rng_state()
    assert task_fingerprint(_digits()) == task_fingerprint(task) == fingerprint_digest(parts)
    assert torch.equal(torch.random.get_rng_state(), state)  # building the initial model leaves the RNG alone
    order = torch.arange(task.n_test).flip(0)
    changed = {
        "initial weights": dataclasses.replace(task, init_seed=1),
        "test data": dataclasses.replace(task, test_inputs=task.test_inputs[order]),
        "pool data": dataclasses.replace(task, pool_targets=(task.pool_targets + 1) % 10),
        "optimizer": _digits(momentum=0.0),
        "learning-rate schedule": _digits(lr=0.5),
        "loss function": dataclasses.replace(task, loss_fn=functools.partial(torch.nn.functional.cross_entropy,
                                                                             reduction="none", label_smoothing=0.1)),
    }
    for part, other in changed.items():
        assert fingerprint_change(parts, task_fingerprint_parts(other)) == part
        assert task_fingerprint(other) != task_fingerprint(task)


def test_the_fingerprint_of_a_task_file_does_not_depend_on_how_often_it_was_loaded(wine_spec):
    assert task_fingerprint(load_task(wine_spec)) == task_fingerprint(load_task(wine_spec))


def test_recorded_settings_that_the_task_contradicts_are_refused(tmp_path):
    from simfluence.synthetic import known_linear_runset

    runset, _, _ = known_linear_runset(n_pool=40, n_test=10, n_runs=1, n_steps=3)
    run = runset[0]
    task = _digits()  # SGD with momentum 0.9, no clipping, init seed 0
    check_recorded_settings(task, runset, run)  # nothing recorded that contradicts it
    for metadata, message in [
        ({"optimizer": "AdamW"}, "records optimizer = 'AdamW' but the task has 'SGD'"),
        ({"optimizer": {"kind": "sgd", "momentum": 0.0}}, "records momentum = 0.0 but the task has 0.9"),
        ({"max_grad_norm": 1.0}, "records max_grad_norm = 1.0 but the task has 0.0"),
        ({"weight_decay": 0.01}, "records weight_decay = 0.01 but the task has 0.0"),
        ({"init_seed": 5}, "records init_seed = 5 but the task has 0"),
    ]:
        run.metadata = metadata
        with pytest.raises(TaskError, match=f"run '{run.name}' {message}"):
            check_recorded_settings(task, runset, run)
    run.metadata = {"optimizer": "SGD", "momentum": 0.9, "max_grad_norm": None}
    check_recorded_settings(task, runset, run)


def test_a_replay_beyond_the_tolerance_is_an_error_and_a_raised_tolerance_warns():
    from simfluence.synthetic import known_linear_runset

    runset, _, _ = known_linear_runset(n_pool=10, n_test=4, n_runs=1, n_steps=5)
    run = runset[0]
    logged, _ = run.dense_losses()
    scale = np.abs(logged).mean()
    assert check_replay(runset, run, logged) == 0.0
    assert check_replay(runset, run, logged + 0.5 * REPLAY_TOLERANCE * scale) > 0  # within: float noise passes
    wrong = logged + 2 * REPLAY_TOLERANCE * scale
    with pytest.raises(TaskError, match="does not reproduce its log: test losses differ by up to"):
        check_replay(runset, run, wrong)
    with pytest.warns(ReplayWarning, match="NOT REPRODUCED"):
        assert check_replay(runset, run, wrong, tolerance=1.0) == pytest.approx(2 * REPLAY_TOLERANCE * scale)
    with pytest.raises(TaskError, match="differ by up to inf"):
        check_replay(runset, run, np.where(np.isfinite(logged), np.nan, 0.0), tolerance=1.0)
    run.metadata = {**run.metadata, "device": "cuda:0"}  # a run trained on a GPU: the message says why it differs
    with pytest.raises(TaskError, match="trained on 'cuda:0', whose rounding a CPU replay does not reproduce"):
        check_replay(runset, run, wrong)


def test_checkpoints_of_another_model_or_test_rows_are_refused(tmp_path):
    from simfluence.attribution import load_checkpoints
    from simfluence.curriculum import random_curricula
    from simfluence.training import generate_runs

    task = _digits()
    runset = generate_runs(task, random_curricula(1, 40, 4, 6, seed=0), tmp_path / "runs", checkpoint_steps=[0, 6],
                           workers=1, progress=False)
    checkpoints = load_checkpoints(runset, 0)
    assert check_checkpoint_losses(task, runset, runset[0], checkpoints) < 1e-5  # float32, other threads
    order = torch.arange(task.n_test).flip(0)
    flipped = dataclasses.replace(task, test_inputs=task.test_inputs[order])
    with pytest.raises(TaskError, match="evaluating the checkpoints of run 'run-000' .* does not reproduce its log"):
        check_checkpoint_losses(flipped, runset, runset[0], checkpoints)
    with pytest.raises(TaskError, match="checkpoint of run 'run-000' .* at step 0 does not fit the task's model"):
        check_checkpoint_losses(_digits(hidden=8), runset, runset[0], checkpoints)
