"""Ray backend: runs trained as Ray tasks are byte for byte those of local workers; errors come back as one line.

One local Ray instance with 2 CPUs serves the whole module (starting one takes a few seconds).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from simfluence.cli import main
from simfluence.errors import SimfluenceError, TaskError
from simfluence.runlog import RunSet
from simfluence.workloads import generate_digits

ray = pytest.importorskip("ray")

WINE_TASK = (Path(__file__).resolve().parent.parent / "examples" / "wine_task.py").read_text()


@pytest.fixture(scope="module")
def local_ray():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except Exception as err:  # noqa: BLE001 - a machine where Ray cannot start at all (not a simfluence failure)
        pytest.skip(f"a local Ray instance cannot start on this machine: {err}")
    yield ray
    ray.shutdown()


def test_a_session_starts_its_own_local_ray_and_closes_it():  # first in the file: no Ray is running yet
    from simfluence.cluster import ray_session, run_tasks
    from simfluence.training import default_run_names  # any function the workers can import

    assert not ray.is_initialized()
    with ray_session(None, num_cpus=2):
        results = dict(run_tasks(default_run_names, [(n,) for n in range(4)]))
        assert results == {n: default_run_names(n) for n in range(4)}
    assert not ray.is_initialized()


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a run set (lock files left out)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and ".locks" not in path.parts}


def test_runs_trained_on_ray_are_byte_identical_to_local_ones_with_checkpoints(local_ray, tmp_path):
    settings = dict(n_runs=3, n_steps=20, pool_size=40, test_size=6, checkpoint_steps=(0, 10), progress=False)
    generate_digits(tmp_path / "local", workers=1, **settings)
    ray_set = generate_digits(tmp_path / "ray", backend="ray", **settings)
    local, remote = digests(tmp_path / "local"), digests(tmp_path / "ray")
    assert len(local) == 1 + 3 * 6 + 3 * 2  # manifest, 6 files per run, 2 checkpoints per run
    assert remote == local
    assert [run.complete for run in ray_set] == [True] * 3


def test_a_ray_generation_resumes_and_redoes_only_missing_runs(local_ray, tmp_path):
    settings = dict(n_steps=12, pool_size=30, test_size=4, progress=False)
    generate_digits(tmp_path / "set", n_runs=2, backend="ray", **settings)
    before = digests(tmp_path / "set")
    generate_digits(tmp_path / "set", n_runs=3, backend="ray", **settings)
    after = digests(tmp_path / "set")
    assert {key: after[key] for key in before if key != "manifest.json"} == \
        {key: value for key, value in before.items() if key != "manifest.json"}
    assert len(RunSet.load(tmp_path / "set")) == 3
    generate_digits(tmp_path / "local", n_runs=3, workers=1, **settings)
    assert digests(tmp_path / "local") == after


def test_your_own_task_file_on_ray_from_the_cli(local_ray, tmp_path):
    task_file = tmp_path / "wine_task.py"
    task_file.write_text(WINE_TASK)
    common = ["generate", "task", "--task", f"{task_file}:make_task", "--runs", "2", "--steps", "10", "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")


FAILING_TASK = """
from dataclasses import replace
from simfluence.errors import TaskError
from simfluence.workloads.digits import digits_task

def no_loss(outputs, targets):  # fails in the Ray task that trains (the task's fingerprint never calls it)
    raise TaskError("no loss for you")

def make_task():
    return replace(digits_task(pool_size=30, test_size=4, n_steps=5), loss_fn=no_loss)
"""


def test_a_failing_task_is_the_same_one_error_as_locally(local_ray, tmp_path):
    from simfluence.task import load_task
    from simfluence.training import generate_random_runs

    (tmp_path / "failing_task.py").write_text(FAILING_TASK)
    task = load_task(f"{tmp_path / 'failing_task.py'}:make_task")
    with pytest.raises(TaskError, match="^no loss for you$"):
        generate_random_runs(task, tmp_path / "set", n_runs=2, n_steps=5, backend="ray", progress=False)
    assert RunSet.load(tmp_path / "set").run_names == []  # nothing half-written


def test_an_unknown_backend_is_one_error(tmp_path):
    with pytest.raises(SimfluenceError, match="backend must be one of"):
        generate_digits(tmp_path / "set", n_runs=1, n_steps=2, pool_size=10, test_size=2, backend="dask",
                        progress=False)


def test_sharded_fit_on_ray_equals_the_local_sharded_fit(local_ray, tmp_path):
    from simfluence.methods import make_simulator
    from simfluence.sharding import fit_sharded

    runset = generate_digits(tmp_path / "set", n_runs=6, n_steps=30, pool_size=40, test_size=9, workers=1,
                             progress=False)
    local = fit_sharded(make_simulator("linear").set_params(lam=1e-2), runset, n_blocks=3)
    remote = fit_sharded(make_simulator("linear").set_params(lam=1e-2), runset, n_blocks=3, backend="ray")
    np.testing.assert_allclose(remote.A_, local.A_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(remote.B_, local.B_, rtol=1e-7, atol=1e-10)
    assert remote.test_ids_ == list(runset.test_ids)
