"""The training engine: train and retrain any :class:`~simfluence.task.Task` on many curricula, and log every run.

Everything that trains for real goes through here: ``simfluence generate`` (the built-in workloads of
:mod:`simfluence.workloads` and tasks of your own), counterfactual verification, the LDS runner and the
unrolled replay (:func:`single_thread_deterministic`, :func:`retraining_seeds`). Runs are logged with
:class:`~simfluence.runlog.RunLogger`.

A :class:`~simfluence.task.Task` says everything task-specific: how to build the model (and its initial
weights), the pool and test tensors, the per-example loss, the optimizer and the learning-rate schedule.
:func:`generate_runs` then trains one run per curriculum, every run starting from the *same* initial weights,
and logs for each step its batch, its learning rate and (every ``log_every`` steps) the loss of every test
example; :func:`generate_random_runs` draws random-subset curricula for it. Runs are spread over worker
processes, each single-threaded, so a run's losses do not depend on how many workers there were; a worker
ends as soon as the process that started it is gone (killed), so no orphan keeps writing.

A re-run over the same folder skips the runs that are already complete and redoes the others, so an
interrupted generation is resumed by calling :func:`generate_runs` again with the same arguments.

Checkpoints, when asked for, are ``torch.save`` dicts at ``RUNSET/checkpoints/<run>/step-<t>.pt`` with keys
``step``, ``learning_rate`` (the rate of step t; of step 1 for t = 0), ``model`` (state_dict) and
``optimizer`` (state_dict, e.g. Adam's ``exp_avg_sq``); they load with ``torch.load(weights_only=True)``.
Their paths, relative to the run set folder, are in each run's ``metadata["checkpoints"]``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simfluence._io import atomic_write_bytes
from simfluence.curriculum import Curriculum, random_curricula
from simfluence.errors import RunLogError, SimfluenceError, TaskError, one_line
from simfluence.runlog import (
    MANIFEST,
    Run,
    RunLogger,
    RunSet,
    export_run,
    install_run,
    read_run,
    run_status,
    runset_destination,
    runset_writer_lock,
)
from simfluence.task import (
    Task,
    fingerprint_change,
    import_task_files,
    loaded_task_files,
    recorded_init_seed,
    task_fingerprint_parts,
    torch_device,
)

__all__ = ["CHECKPOINTS_DIR", "WarmupCosine", "default_run_names", "generate_random_runs", "generate_runs",
           "random_runs_plan", "retraining_seeds", "single_thread_deterministic"]

CHECKPOINTS_DIR = "checkpoints"
FINGERPRINT_KEY = "task_fingerprint"  # run-set metadata: task_fingerprint_parts of the task that trained the runs
BACKENDS = ("local", "ray")
PARENT_POLL_SECONDS = 0.5  # how often a worker checks that the process that started it is still there


@dataclass
class WarmupCosine:
    """Learning rate of step t (1-based): linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay.

    The rate reaches ``peak`` at step ``warmup_steps`` and decays to ``peak * final_fraction`` at step
    ``n_steps``. A plain dataclass (not a lambda) so that a :class:`Task` holding it can be sent to workers.
    """

    peak: float
    n_steps: int
    warmup_steps: int = 0
    final_fraction: float = 0.1

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.peak * step / self.warmup_steps
        span = max(self.n_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        floor = self.peak * self.final_fraction
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> dict:
        """JSON description of the schedule (for run-set metadata)."""
        return {"kind": "warmup_cosine", "peak": self.peak, "n_steps": self.n_steps,
                "warmup_steps": self.warmup_steps, "final_fraction": self.final_fraction}


def default_run_names(n_runs: int) -> list[str]:
    """``run-000``, ``run-001``, ... zero-padded to the width of the largest index (at least 3 digits)."""
    width = max(3, len(str(max(n_runs - 1, 0))))
    return [f"run-{index:0{width}d}" for index in range(n_runs)]


def retraining_seeds(runset: RunSet, task: Task, run: Run) -> tuple[int, int]:
    """Seed of the run set's initial weights and torch seed of ``run``, as :func:`generate_runs` used them.

    The one rule for retraining a logged run the way it was trained (verification, LDS, unrolled replay): the
    init seed is the one the generator recorded (:func:`~simfluence.task.recorded_init_seed`, else
    ``task.init_seed``); the run seed is the run's ``metadata["seed"]``, else ``init_seed + 1`` (the seed
    :func:`generate_runs` gives a set's first run).

    Returns
    -------
    (init_seed, run_seed) : pass as ``generate_runs(..., init_seed=init_seed, seeds=[run_seed])``.
    """
    init_seed = recorded_init_seed(runset, task)
    return init_seed, int(run.metadata.get("seed", init_seed + 1))


# --------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def single_thread_deterministic() -> Iterator[None]:
    """One intra-op thread, deterministic algorithms and a private torch RNG, restored afterwards (in-process)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@contextlib.contextmanager
def _task_code(function: str) -> Iterator[None]:
    """Run a piece of the task's own code: its errors (also ``SystemExit``) become one ``TaskError`` naming
    ``function``, so that they cross process boundaries and reach the command line as one line."""
    try:
        yield
    except SimfluenceError:
        raise
    except (Exception, SystemExit) as err:
        raise TaskError(f"the task's {function} raised {one_line(err)}") from err


@dataclass(frozen=True)
class _Job:
    name: str
    offsets: np.ndarray
    ids: np.ndarray
    seed: int


class _Trainer:
    """Trains and logs runs of one task; one instance per worker process (or one in-process)."""

    def __init__(self, task: Task, runset_path: Path, init_seed: int, log_every: int,
                 checkpoint_steps: tuple[int, ...], device: str | None = None) -> None:
        self.task = task
        self.runset_path = runset_path
        self.init_seed = init_seed
        self.log_every = log_every
        self.checkpoint_steps = frozenset(checkpoint_steps)
        self.device = torch_device(device)
        if self.device.type == "cuda":  # deterministic cuBLAS needs a fixed workspace, set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(init_seed)
        with _task_code("make_model"):
            self.model = task.make_model(init_seed).to(self.device)
        self.initial_state = copy.deepcopy(self.model.state_dict())
        # the data lives where the model does (moved once; on the CPU these are the task's own tensors)
        self.pool_inputs, self.pool_targets, self.test_inputs, self.test_targets = (
            _on_device(data, self.device) for data in (task.pool_inputs, task.pool_targets, task.test_inputs,
                                                       task.test_targets))

    def test_losses(self) -> np.ndarray:
        """(n_test,) float64 loss of every test example, one forward pass."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), _task_code("model or loss_fn (on the test examples)"):
            losses = self.task.loss_fn(self.model(self.test_inputs), self.test_targets)
            losses = losses.detach().to(torch.float64).cpu().numpy().reshape(-1)
        self.model.train(was_training)
        return losses

    def learning_rate(self, step: int) -> float:
        with _task_code("lr_at"):
            return float(self.task.lr_at(step))

    def save_checkpoint(self, name: str, step: int, optimizer: torch.optim.Optimizer) -> str:
        relative = f"{CHECKPOINTS_DIR}/{name}/step-{step}.pt"
        buffer = io.BytesIO()
        torch.save({"step": step, "learning_rate": self.learning_rate(max(step, 1)),  # saved on the CPU, any device
                    "model": _on_device(self.model.state_dict(), CPU),
                    "optimizer": _on_device(optimizer.state_dict(), CPU)}, buffer)
        atomic_write_bytes(self.runset_path / relative, buffer.getvalue())
        return relative

    def __call__(self, job: _Job) -> str:
        task = self.task
        curriculum = Curriculum(job.offsets, job.ids, task.n_pool)
        n_steps = curriculum.n_steps
        # a Task trained by a framework's own loop (simfluence.integrations.huggingface.TrainerTask)
        # saves the checkpoints after step 0 itself: the manifest's generator settings list the steps
        train_logged_run = getattr(task, "train_logged_run", None)
        checkpoint_dir = self.runset_path / CHECKPOINTS_DIR / job.name
        torch.manual_seed(job.seed)
        self.model.load_state_dict(self.initial_state)
        self.model.train()
        with _task_code("make_optimizer"):
            optimizer = task.make_optimizer(self.model.parameters())
        metadata = {"seed": job.seed, "init_seed": self.init_seed, "checkpoints": []}
        if self.device.type != "cpu":  # the losses of another device differ in the last bits: a replay must know
            metadata["device"] = str(self.device)
        with RunLogger(self.runset_path, job.name, metadata=metadata, overwrite=True) as logger:
            # the run's lock is held from here: the checkpoints of a run another writer trains are never touched
            if checkpoint_dir.exists():
                shutil.rmtree(checkpoint_dir)
            checkpoints = logger.metadata["checkpoints"]  # committed with every step
            logger.log_initial(self.test_losses())
            if 0 in self.checkpoint_steps:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                checkpoints.append({"step": 0, "path": self.save_checkpoint(job.name, 0, optimizer)})
            if train_logged_run is not None:
                with _task_code("train_logged_run"):
                    train_logged_run(self.model, curriculum, logger, self.log_every, job.seed)
                return job.name
            for step in range(1, n_steps + 1):
                lr = self.learning_rate(step)
                batch = curriculum.ids[curriculum.offsets[step - 1]:curriculum.offsets[step]]
                if batch.size:  # an empty batch has no data: no update at all
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    index = torch.tensor(batch, device=self.device)
                    optimizer.zero_grad(set_to_none=True)
                    with _task_code("model, loss_fn or optimizer (on a training batch)"):
                        outputs = self.model(self.pool_inputs[index])
                        task.loss_fn(outputs, self.pool_targets[index]).mean().backward()
                        optimizer.step()
                log_now = step % self.log_every == 0 or step == n_steps
                logger.log_step(positions=batch, losses=self.test_losses() if log_now else None,
                                learning_rate=lr)
                if step in self.checkpoint_steps:
                    checkpoint_dir.mkdir(parents=True, exist_ok=True)
                    checkpoints.append(
                        {"step": step, "path": self.save_checkpoint(job.name, step, optimizer)})
        return job.name


CPU = torch.device("cpu")


def _on_device(value, device: torch.device):
    """``value`` (a tensor, or dicts / lists / tuples of them, as in a state_dict) with its tensors on ``device``;
    tensors already there are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_on_device(item, device) for item in value)
    return value


_WORKER_TRAINER: _Trainer | None = None
_WORKER_ERROR: SimfluenceError | None = None  # why the worker could not be set up, raised with its first job


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker process at once when ``parent_pid`` is no longer its parent (the parent was killed)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="simfluence-parent-watch", daemon=True).start()


def _worker_task(task_files: dict[str, str], task_bytes: bytes) -> Task:
    """Set a worker process up (one thread, deterministic algorithms, the task's files imported so that their
    functions unpickle) and unpickle the task: the same for local workers and Ray tasks, so runs are identical."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with _task_code("file (imported in the worker)"):
        import_task_files(task_files)
    with _task_code("unpickling (in the worker)"):
        return pickle.loads(task_bytes)


def _init_worker(parent_pid: int, task_files: dict[str, str], task_bytes: bytes, *args) -> None:
    """Set up a worker process. An error is kept and raised with the worker's first job: an initializer that
    raises would break the whole pool and hide the cause behind ``BrokenProcessPool``."""
    global _WORKER_TRAINER, _WORKER_ERROR
    _exit_with_parent(parent_pid)
    try:
        _WORKER_TRAINER = _Trainer(_worker_task(task_files, task_bytes), *args)
    except SimfluenceError as err:
        _WORKER_ERROR = err
    except (Exception, SystemExit) as err:
        _WORKER_ERROR = TaskError(f"a worker process could not be set up: {one_line(err)}")


def _run_in_worker(job: _Job) -> str:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    assert _WORKER_TRAINER is not None, "worker was not initialised"
    return _WORKER_TRAINER(job)


def _task_files_used(task_bytes: bytes) -> dict[str, str]:
    """The task files (module name -> path) that the pickled task refers to: what a worker must import to unpickle
    it. Not every file this process loaded: another task's file may import helpers a worker cannot find."""
    return {name: path for name, path in loaded_task_files().items()
            if re.search(re.escape(name.encode()) + rb"(?![A-Za-z0-9_])", task_bytes)}


def _task_bytes(task: Task) -> bytes:
    """The pickled task for worker processes or Ray tasks; one clear error when it cannot be pickled."""
    try:
        return pickle.dumps(task)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TaskError(f"the task cannot be sent to worker processes ({err}); use module-level "
                        "functions (no lambdas) in it, or workers=1") from None


def _train_elsewhere(task_files: dict[str, str], task_bytes: bytes, manifest: dict, trainer_args: tuple,
                     job: _Job) -> dict[str, dict[str, bytes]]:
    """Train one run in a scratch run set on whatever machine runs this (a Ray task); return its files.

    Returns ``{"run": {file name: bytes}, "checkpoints": {file name: bytes}}``. The worker is set up as a
    local worker process is (:func:`_worker_task`), so the bytes are those the local backend writes.
    """
    task = _worker_task(task_files, task_bytes)
    with tempfile.TemporaryDirectory(prefix="simfluence-ray-") as scratch:
        scratch = Path(scratch)
        RunSet.create(scratch, n_pool=manifest["n_pool"], pool_ids=manifest["pool_ids"],
                      test_ids=manifest["test_ids"], metadata=manifest["metadata"])
        _Trainer(task, scratch, *trainer_args)(job)
        checkpoint_dir = scratch / CHECKPOINTS_DIR / job.name
        checkpoints = ({path.name: path.read_bytes() for path in sorted(checkpoint_dir.iterdir())}
                       if checkpoint_dir.is_dir() else {})
        return {"run": export_run(scratch, job.name), "checkpoints": checkpoints}


def _install_trained(out: Path, name: str, files: dict[str, dict[str, bytes]]) -> None:
    """Write a run trained elsewhere into ``out``: the run is checked first (:func:`install_run`), then, under its
    lock, its checkpoints replace the old ones and the run replaces the old run; a refused run changes nothing."""
    checkpoint_files = files.get("checkpoints") if isinstance(files, dict) else None
    if not isinstance(checkpoint_files, dict):
        raise RunLogError(f"run {name!r}: the trained run came back without its checkpoint files")
    for filename, data in checkpoint_files.items():
        if not isinstance(filename, str) or Path(filename).name != filename or not filename.endswith(".pt"):
            raise RunLogError(f"run {name!r}: unexpected checkpoint file name {filename!r}")
        if not isinstance(data, (bytes, bytearray)):
            raise RunLogError(f"run {name!r}: checkpoint {filename} must be bytes, got {type(data).__name__}")

    def replace_checkpoints() -> None:
        checkpoint_dir = out / CHECKPOINTS_DIR / name
        if checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        if checkpoint_files:
            checkpoint_dir.mkdir(parents=True)
            for filename, data in checkpoint_files.items():
                atomic_write_bytes(checkpoint_dir / filename, bytes(data))

    install_run(out, name, files.get("run"), before_replace=replace_checkpoints)


def _train_on_ray(task: Task, jobs: list[_Job], runset: RunSet, trainer_args: tuple, address: str | None,
                  bar: tqdm) -> None:
    """Train ``jobs`` as Ray tasks and install each run into the run set as it comes back."""
    from simfluence.cluster import ray_session, run_tasks

    out = trainer_args[0]
    manifest = {"n_pool": runset.n_pool, "pool_ids": runset.pool_ids, "test_ids": runset.test_ids,
                "metadata": runset.metadata}
    task_bytes = _task_bytes(task)
    shared = (_task_files_used(task_bytes), task_bytes, manifest, trainer_args[1:])
    with ray_session(address):
        for index, files in run_tasks(_train_elsewhere, [(*shared, job) for job in jobs]):
            _install_trained(out, jobs[index].name, files)
            bar.update()


# --------------------------------------------------------------------------------------------- driver
def _normalised_json(obj: dict) -> dict:
    return json.loads(json.dumps(obj, allow_nan=False))


def _pending_jobs(out: Path, names: list[str], curricula: list[Curriculum], seeds: list[int]) -> list[_Job]:
    """Jobs of the runs that are not complete; a complete run must hold the curriculum asked for."""
    jobs = []
    for name, curriculum, seed in zip(names, curricula, seeds, strict=True):
        if run_status(out, name) == "complete":
            logged = read_run(out / "runs" / name, n_test=0).curriculum
            if logged != curriculum:
                raise RunLogError(
                    f"run {name!r} in {str(out)!r} is complete but was trained on a different curriculum "
                    "(pass overwrite=True to regenerate the run set)"
                )
            continue
        jobs.append(_Job(name, np.asarray(curriculum.offsets), np.asarray(curriculum.ids), seed))
    return jobs


def generate_runs(
    task: Task,
    curricula: Sequence[Curriculum],
    out: str | os.PathLike,
    names: Sequence[str] | None = None,
    init_seed: int | None = None,
    log_every: int = 1,
    checkpoint_steps: Iterable[int] = (),
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    seeds: Sequence[int] | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    device: str | None = None,
) -> RunSet:
    """Train one run of ``task`` per curriculum, all from the same initial weights, and log them to ``out``.

    Each step sets the learning rate ``task.lr_at(step)``, takes one optimizer step on the mean loss of the
    batch, and logs the batch ids, the learning rate and, every ``log_every`` steps and at the last step, the
    loss of every test example (step 0 is always logged). Training is deterministic: run r uses torch seed
    ``seeds[r]`` (default ``init_seed + 1 + r``; for any randomness of the model itself, e.g. dropout), one
    thread and deterministic algorithms, so the same arguments give the same losses for any number of workers.

    Parameters
    ----------
    task : the model, data, loss, optimizer and schedule.
    curricula : one curriculum per run, over ``task.n_pool`` pool ids.
    out : run-set folder. If it already holds a run set made with the same task (same settings and task
        fingerprint, recorded in its metadata), complete runs are skipped and the others (missing, running,
        aborted) are retrained from scratch; a set made with another task is refused, naming what differs.
    names : run names (default ``run-000``, ``run-001``, ...).
    init_seed : seed of the shared initial weights (``make_model(init_seed)`` under ``torch.manual_seed``);
        default ``task.init_seed``.
    log_every : log test losses every this many steps (and always at steps 0 and n_steps).
    checkpoint_steps : steps after which to save model and optimizer state (0 = initial state).
    workers : worker processes (default ``min(os.cpu_count(), runs to train)``); 1 trains in this process.
    progress : show a tqdm progress bar over runs.
    overwrite : replace a run set at ``out`` by a new one: it is built in a hidden sibling folder and swapped in
        when complete, under the set's lock (the old set stays whole until then; a writer of it meanwhile is
        refused). Without it, a run set at ``out`` is resumed. ``out`` must be absent, an empty folder or a run
        set: anything else is refused before anything is written (with or without ``overwrite``).
    seeds : (n_runs,) torch seed of each run (recorded as the run's ``metadata["seed"]``); default
        ``init_seed + 1 + r``.
    backend : ``"local"`` (worker processes on this machine) or ``"ray"``: every run is a Ray task that trains
        on some machine of the cluster and sends its files back here, so the workers need no shared file
        system; the run set is byte for byte the one the local backend writes (``workers`` is ignored, Ray
        gives each task one CPU). Needs ``pip install 'simfluence[ray]'``, and simfluence on every node.
    ray_address : the Ray cluster (:func:`simfluence.cluster.ray_session`): None or ``"local"`` starts one on
        this machine, ``"auto"`` joins the cluster this machine is part of, ``"ray://host:10001"`` a remote one.
    device : torch device to train on (default: the CPU), e.g. ``"cuda"``; the model and the task's tensors are
        moved there once per worker, checkpoints are saved on the CPU, and a run trained elsewhere than on the CPU
        records its device in ``metadata["device"]`` (its losses differ from a CPU replay's in the last bits).
        Local backend only.

    Returns
    -------
    RunSet loaded from ``out`` (losses memory-mapped).
    """
    out = Path(out)
    request = check_request(task, curricula, names, init_seed, log_every, checkpoint_steps, seeds, backend,
                            device=device)
    final = out if out.name not in ("", "..") else Path(os.path.abspath(out))  # "." is replaced by its real name
    with runset_destination(out, overwrite) as target:  # refuses a folder that is not a run set, creating nothing
        train_into(target, request, workers, progress, backend, ray_address)
    return RunSet.load(final)


@dataclass(frozen=True)
class TrainingRequest:
    """A checked request of :func:`generate_runs`: what to train, and the run-set metadata it goes with.

    :func:`check_request`, :func:`check_resumable` and :func:`train_into` are the steps of :func:`generate_runs`,
    public for a writer that prepares the run-set folder itself between them (the built-in ``facts`` workload
    writes its corpus and pretrained base there).
    """

    task: Task
    curricula: list[Curriculum]
    names: list[str]
    seeds: list[int]
    init_seed: int
    log_every: int
    checkpoint_steps: tuple[int, ...]
    metadata: dict
    device: str | None = None


def check_request(task: Task, curricula: Sequence[Curriculum], names: Sequence[str] | None, init_seed: int | None,
                   log_every: int, checkpoint_steps: Iterable[int], seeds: Sequence[int] | None,
                   backend: str, device: str | None = None) -> TrainingRequest:
    """Every check of the arguments of :func:`generate_runs` that needs no disk: done before anything is written."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # a spawned worker importing the script
        raise TaskError(f"generate_runs was called while a worker process imported the script that started it: "
                        f"{_UNGUARDED}")
    if backend not in BACKENDS:
        raise SimfluenceError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(task, Task):
        raise TaskError(f"task must be a simfluence.task.Task, got a {type(task).__name__}")
    device = None if device is None else str(torch_device(device))
    if device not in (None, "cpu") and (backend == "ray" or getattr(task, "train_logged_run", None) is not None):
        raise TaskError(f"device {device!r}: " + ("Ray workers train on the CPU; use backend='local'"
                                                  if backend == "ray" else
                                                  "this task trains with its own loop, which chooses its device"))
    init_seed = int(task.init_seed if init_seed is None else init_seed)
    curricula = list(curricula)
    names = default_run_names(len(curricula)) if names is None else list(names)
    if len(names) != len(curricula):
        raise RunLogError(f"{len(names)} run names for {len(curricula)} curricula")
    if len(set(names)) != len(names):
        raise RunLogError(f"run name {next(n for n in names if names.count(n) > 1)!r} appears twice")
    for index, curriculum in enumerate(curricula):
        if not isinstance(curriculum, Curriculum):
            raise RunLogError(f"curricula[{index}] is a {type(curriculum).__name__}, not a Curriculum")
        if curriculum.n_pool is not None and curriculum.n_pool != task.n_pool:
            raise RunLogError(f"curricula[{index}] is over {curriculum.n_pool} pool ids, the task has {task.n_pool}")
        if curriculum.ids.size and curriculum.ids.max() >= task.n_pool:
            raise RunLogError(f"curricula[{index}] uses pool id {int(curriculum.ids.max())}, "
                              f"outside 0..{task.n_pool - 1}")
    check_curricula = getattr(task, "check_curricula", None)  # a task with its own training loop refuses here
    if check_curricula is not None:
        check_curricula(curricula)
    seeds = [init_seed + 1 + index for index in range(len(curricula))] if seeds is None else \
        [int(seed) for seed in seeds]
    if len(seeds) != len(curricula):
        raise RunLogError(f"{len(seeds)} seeds for {len(curricula)} curricula")
    if log_every < 1:
        raise RunLogError(f"log_every must be >= 1, got {log_every}")
    checkpoint_steps = tuple(sorted({int(step) for step in checkpoint_steps}))
    if checkpoint_steps and checkpoint_steps[0] < 0:
        raise RunLogError(f"checkpoint step {checkpoint_steps[0]} is negative")
    metadata = _normalised_json({
        **task.metadata,
        "generator": {"init_seed": init_seed, "log_every": log_every, "checkpoint_steps": list(checkpoint_steps)},
    })
    return TrainingRequest(task, curricula, names, seeds, init_seed, log_every, checkpoint_steps, metadata, device)


def check_resumable(out: Path, request: TrainingRequest) -> None:
    """``out`` holds no run set, or one generated with the same settings (before anything is written to it)."""
    if not (out / MANIFEST).is_file():
        return
    recorded = {key: value for key, value in RunSet.load(out, validate=False).metadata.items()
                if key != FINGERPRINT_KEY}
    if _normalised_json(recorded) != request.metadata:
        raise RunLogError(f"{str(out)!r} holds a run set generated with different task settings "
                          "(pass overwrite=True to regenerate it)")


def train_into(out: Path, request: TrainingRequest, workers: int | None, progress: bool, backend: str,
                ray_address: str | None) -> None:
    """Create (or resume) the run set at ``out`` and train the runs it lacks, under the set's shared lock.

    The task's fingerprint (:func:`~simfluence.task.task_fingerprint_parts`: initial weights, model, data, loss,
    optimizer, schedule) is recorded in the run-set metadata; resuming a set recorded with another one is refused,
    naming the parts that differ.
    """
    task = request.task
    check_resumable(out, request)
    with _task_code("make_model, make_optimizer or lr_at (fingerprinting the task)"):  # an exit, say
        fingerprint = task_fingerprint_parts(task, request.init_seed)
    pool_ids = task.pool_ids if task.pool_ids is not None else range(task.n_pool)
    test_ids = task.test_ids if task.test_ids is not None else range(task.n_test)
    runset = RunSet.create(out, n_pool=task.n_pool, pool_ids=pool_ids, test_ids=test_ids,
                           metadata={**request.metadata, FINGERPRINT_KEY: fingerprint}, exist_ok=True)
    with runset_writer_lock(out):
        check_resumable(out, request)  # again under the lock: the set is the one we write into
        recorded = runset.metadata.get(FINGERPRINT_KEY)
        if isinstance(recorded, dict) and recorded != fingerprint:
            raise TaskError(f"{str(out)!r} holds runs of another task ({fingerprint_change(recorded, fingerprint)} "
                            "differ); pass overwrite=True to regenerate it, or use another folder")
        _train_pending(out, runset, request, workers, progress, backend, ray_address)


def _train_pending(out: Path, runset: RunSet, request: TrainingRequest, workers: int | None, progress: bool,
                   backend: str, ray_address: str | None) -> None:
    """Train the runs of ``request`` that ``out`` does not hold complete, locally or on Ray."""
    task, curricula = request.task, request.curricula
    jobs = _pending_jobs(out, request.names, curricula, request.seeds)
    trainer_args = (out, request.init_seed, request.log_every, request.checkpoint_steps, request.device)
    bar = tqdm(total=len(curricula), initial=len(curricula) - len(jobs), desc=f"training {out.name}",
               unit="run", disable=not progress)
    n_workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else min(int(workers), max(len(jobs), 1))
    try:
        if jobs and backend == "ray":
            _train_on_ray(task, jobs, runset, trainer_args, ray_address, bar)
        elif jobs and n_workers <= 1:
            with single_thread_deterministic():
                trainer = _Trainer(task, *trainer_args)
                for job in jobs:
                    trainer(job)
                    bar.update()
        elif jobs:
            _train_in_processes(task, jobs, trainer_args, n_workers, bar)
    finally:
        bar.close()


def _train_in_processes(task: Task, jobs: list[_Job], trainer_args: tuple, n_workers: int, bar: tqdm) -> None:
    """Train ``jobs`` in ``n_workers`` spawned worker processes; a worker's error is raised here."""
    task_bytes = _task_bytes(task)
    context = multiprocessing.get_context("spawn")
    initargs = (os.getpid(), _task_files_used(task_bytes), task_bytes, *trainer_args)
    try:
        with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker,
                                 initargs=initargs) as pool:
            futures = [pool.submit(_run_in_worker, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    future.result()  # a worker's error is raised here
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # runs in flight finish, the rest never start
                raise
    except BrokenProcessPool:
        raise TaskError(f"a worker process ended abruptly while starting or training (killed, out of memory, or it "
                        f"exited); if a script calls generate_runs directly, {_UNGUARDED}") from None


_UNGUARDED = ("put that call under `if __name__ == \"__main__\":` (each worker process imports the script and "
              "would train again), or pass workers=1")


def generate_random_runs(
    task: Task,
    out: str | os.PathLike,
    n_runs: int = 48,
    n_steps: int = 200,
    batch_size: int = 8,
    subset_fraction: float = 0.5,
    seed: int = 0,
    init_seed: int | None = None,
    log_every: int = 1,
    checkpoint_steps: Iterable[int] = (),
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    device: str | None = None,
) -> RunSet:
    """Train ``n_runs`` runs of ``task``, each on a random subset of its pool in random order, and log them.

    Run r trains on ``round(subset_fraction * task.n_pool)`` pool examples drawn afresh, in shuffled epochs of
    ``batch_size`` (:func:`~simfluence.curriculum.random_curricula` seeded with ``seed``); every run starts
    from the same initial weights. The curriculum settings are added to the run-set metadata
    (``batch_size``, ``n_steps``, ``subset_size``, ``curriculum_seed``).

    Parameters
    ----------
    task : the model, data, loss, optimizer and schedule.
    out : run-set folder (resumed when it holds the same generation; see :func:`generate_runs`).
    n_runs, n_steps, batch_size : number of runs, steps per run, examples per step.
    subset_fraction : share of the pool each run trains on, in (0, 1].
    seed : seed of the curricula.
    init_seed : seed of the initial weights (default ``task.init_seed``).
    log_every, checkpoint_steps, workers, progress, overwrite, backend, ray_address, device : as for
        :func:`generate_runs`.

    Returns
    -------
    RunSet of ``n_runs`` runs of ``n_steps`` steps, ``task.n_test`` test losses per logged step.
    """
    task, curricula = random_runs_plan(task, n_runs, n_steps, batch_size, subset_fraction, seed)
    return generate_runs(task, curricula, out, init_seed=init_seed, log_every=log_every,
                         checkpoint_steps=checkpoint_steps, workers=workers, progress=progress, overwrite=overwrite,
                         backend=backend, ray_address=ray_address, device=device)


def random_runs_plan(task: Task, n_runs: int, n_steps: int, batch_size: int, subset_fraction: float,
                     seed: int) -> tuple[Task, list[Curriculum]]:
    """The curricula of :func:`generate_random_runs`, and the task with the curriculum settings in its metadata."""
    if not 0.0 < subset_fraction <= 1.0:
        raise SimfluenceError(f"subset_fraction must lie in (0, 1], got {subset_fraction}")
    subset_size = max(1, round(subset_fraction * task.n_pool))
    curricula = random_curricula(n_runs, task.n_pool, batch_size, n_steps, subset_size=subset_size,
                                 seed=np.random.default_rng([seed, 2]))
    task = replace(task, metadata={**task.metadata, "batch_size": batch_size, "n_steps": n_steps,
                                   "subset_size": subset_size, "curriculum_seed": seed})
    return task, curricula
