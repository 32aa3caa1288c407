"""Train real torch models on many curricula and log every run with :class:`~simfluence.runlog.RunLogger`.

A :class:`Task` says everything task-specific: how to build the model, the pool and test tensors, the
per-example loss, the optimizer and the learning-rate schedule. :func:`generate_runs` then trains one run per
curriculum, every run starting from the *same* initial weights, and logs for each step its batch, its learning
rate and (every ``log_every`` steps) the loss of every test example. Runs are spread over worker processes,
each single-threaded, so a run's losses do not depend on how many workers there were.

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
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from simfluence._io import atomic_write_bytes
from simfluence.curriculum import Curriculum
from simfluence.errors import RunLogError, SimfluenceError
from simfluence.runlog import MANIFEST, RunLogger, RunSet, read_run, run_status

__all__ = ["Task", "WarmupCosine", "generate_runs", "default_run_names"]

CHECKPOINTS_DIR = "checkpoints"


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


@dataclass(eq=False)
class Task:
    """Everything task-specific that :func:`generate_runs` needs to train and evaluate one model.

    For ``workers > 1`` the task is pickled to the worker processes, so its callables must be picklable:
    module-level functions, ``functools.partial`` of them, or instances of module-level classes (no lambdas).

    Attributes
    ----------
    make_model : ``make_model(seed) -> nn.Module``; called under ``torch.manual_seed(seed)``.
    pool_inputs : (n_pool, ...) inputs of the training pool; a curriculum id i is row i.
    pool_targets : (n_pool, ...) their targets.
    test_inputs : (n_test, ...) inputs of the test (probe) examples.
    test_targets : (n_test, ...) their targets.
    loss_fn : ``loss_fn(outputs, targets) -> (batch,)`` per-example loss (``reduction='none'``); the training
        loss of a step is its mean over the batch.
    make_optimizer : ``make_optimizer(params) -> torch.optim.Optimizer``; the learning rate it sets is
        overwritten every step with ``lr_at(step)``.
    lr_at : ``lr_at(step) -> float`` learning rate of step ``step`` (1-based).
    metadata : JSON description of the task (stored in the run-set manifest).
    pool_ids, test_ids : external ids of pool and test examples (default ``range``).
    """

    make_model: Callable[[int], nn.Module]
    pool_inputs: torch.Tensor
    pool_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    lr_at: Callable[[int], float]
    metadata: dict = field(default_factory=dict)
    pool_ids: Sequence | None = None
    test_ids: Sequence | None = None

    def __post_init__(self) -> None:
        if len(self.pool_inputs) != len(self.pool_targets):
            raise RunLogError(f"task: {len(self.pool_inputs)} pool inputs but {len(self.pool_targets)} targets")
        if len(self.test_inputs) != len(self.test_targets):
            raise RunLogError(f"task: {len(self.test_inputs)} test inputs but {len(self.test_targets)} targets")

    @property
    def n_pool(self) -> int:
        return len(self.pool_inputs)

    @property
    def n_test(self) -> int:
        return len(self.test_inputs)


def default_run_names(n_runs: int) -> list[str]:
    """``run-000``, ``run-001``, ... zero-padded to the width of the largest index (at least 3 digits)."""
    width = max(3, len(str(max(n_runs - 1, 0))))
    return [f"run-{index:0{width}d}" for index in range(n_runs)]


# --------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def _single_thread_deterministic() -> Iterator[None]:
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


@dataclass(frozen=True)
class _Job:
    name: str
    offsets: np.ndarray
    ids: np.ndarray
    seed: int


class _Trainer:
    """Trains and logs runs of one task; one instance per worker process (or one in-process)."""

    def __init__(self, task: Task, runset_path: Path, init_seed: int, log_every: int,
                 checkpoint_steps: tuple[int, ...]) -> None:
        self.task = task
        self.runset_path = runset_path
        self.init_seed = init_seed
        self.log_every = log_every
        self.checkpoint_steps = frozenset(checkpoint_steps)
        torch.manual_seed(init_seed)
        self.model = task.make_model(init_seed)
        self.initial_state = copy.deepcopy(self.model.state_dict())

    def test_losses(self) -> np.ndarray:
        """(n_test,) float64 loss of every test example, one forward pass."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            losses = self.task.loss_fn(self.model(self.task.test_inputs), self.task.test_targets)
        self.model.train(was_training)
        return losses.detach().to(torch.float64).numpy().reshape(-1)

    def save_checkpoint(self, name: str, step: int, optimizer: torch.optim.Optimizer) -> str:
        relative = f"{CHECKPOINTS_DIR}/{name}/step-{step}.pt"
        buffer = io.BytesIO()
        torch.save({"step": step, "learning_rate": float(self.task.lr_at(max(step, 1))),
                    "model": self.model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        atomic_write_bytes(self.runset_path / relative, buffer.getvalue())
        return relative

    def __call__(self, job: _Job) -> str:
        task = self.task
        curriculum = Curriculum(job.offsets, job.ids, task.n_pool)
        n_steps = curriculum.n_steps
        checkpoint_dir = self.runset_path / CHECKPOINTS_DIR / job.name
        if checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        torch.manual_seed(job.seed)
        self.model.load_state_dict(self.initial_state)
        self.model.train()
        optimizer = task.make_optimizer(self.model.parameters())
        metadata = {"seed": job.seed, "init_seed": self.init_seed, "checkpoints": []}
        with RunLogger(self.runset_path, job.name, metadata=metadata, overwrite=True) as logger:
            checkpoints = logger.metadata["checkpoints"]  # committed with every step
            logger.log_initial(self.test_losses())
            if 0 in self.checkpoint_steps:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                checkpoints.append({"step": 0, "path": self.save_checkpoint(job.name, 0, optimizer)})
            for step in range(1, n_steps + 1):
                lr = float(task.lr_at(step))
                batch = curriculum.ids[curriculum.offsets[step - 1]:curriculum.offsets[step]]
                if batch.size:  # an empty batch has no data: no update at all
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    index = torch.tensor(batch)
                    optimizer.zero_grad(set_to_none=True)
                    outputs = self.model(task.pool_inputs[index])
                    task.loss_fn(outputs, task.pool_targets[index]).mean().backward()
                    optimizer.step()
                log_now = step % self.log_every == 0 or step == n_steps
                logger.log_step(batch, losses=self.test_losses() if log_now else None, learning_rate=lr)
                if step in self.checkpoint_steps:
                    checkpoint_dir.mkdir(parents=True, exist_ok=True)
                    checkpoints.append(
                        {"step": step, "path": self.save_checkpoint(job.name, step, optimizer)})
        return job.name


_WORKER_TRAINER: _Trainer | None = None


def _init_worker(*args) -> None:
    global _WORKER_TRAINER
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    _WORKER_TRAINER = _Trainer(*args)


def _run_in_worker(job: _Job) -> str:
    assert _WORKER_TRAINER is not None, "worker was not initialised"
    return _WORKER_TRAINER(job)


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
    init_seed: int = 0,
    log_every: int = 1,
    checkpoint_steps: Iterable[int] = (),
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> RunSet:
    """Train one run of ``task`` per curriculum, all from the same initial weights, and log them to ``out``.

    Each step sets the learning rate ``task.lr_at(step)``, takes one optimizer step on the mean loss of the
    batch, and logs the batch ids, the learning rate and, every ``log_every`` steps and at the last step, the
    loss of every test example (step 0 is always logged). Training is deterministic: run r uses torch seed
    ``init_seed + 1 + r`` (for any randomness of the model itself, e.g. dropout), one thread and
    deterministic algorithms, so the same arguments give the same losses for any number of workers.

    Parameters
    ----------
    task : the model, data, loss, optimizer and schedule.
    curricula : one curriculum per run, over ``task.n_pool`` pool ids.
    out : run-set folder. If it already holds a run set made with the same task, complete runs are skipped
        and the others (missing, running, aborted) are retrained from scratch.
    names : run names (default ``run-000``, ``run-001``, ...).
    init_seed : seed of the shared initial weights (``make_model(init_seed)`` under ``torch.manual_seed``).
    log_every : log test losses every this many steps (and always at steps 0 and n_steps).
    checkpoint_steps : steps after which to save model and optimizer state (0 = initial state).
    workers : worker processes (default ``min(os.cpu_count(), runs to train)``); 1 trains in this process.
    progress : show a tqdm progress bar over runs.
    overwrite : delete an existing run set at ``out`` first and regenerate every run.

    Returns
    -------
    RunSet loaded from ``out`` (losses memory-mapped).
    """
    out = Path(out)
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
    if log_every < 1:
        raise RunLogError(f"log_every must be >= 1, got {log_every}")
    checkpoint_steps = tuple(sorted({int(step) for step in checkpoint_steps}))
    if checkpoint_steps and checkpoint_steps[0] < 0:
        raise RunLogError(f"checkpoint step {checkpoint_steps[0]} is negative")

    metadata = _normalised_json({
        **task.metadata,
        "generator": {"init_seed": init_seed, "log_every": log_every, "checkpoint_steps": list(checkpoint_steps)},
    })
    if overwrite and (out / MANIFEST).is_file():
        shutil.rmtree(out)
    pool_ids = task.pool_ids if task.pool_ids is not None else range(task.n_pool)
    test_ids = task.test_ids if task.test_ids is not None else range(task.n_test)
    runset = RunSet.create(out, n_pool=task.n_pool, pool_ids=pool_ids, test_ids=test_ids, metadata=metadata,
                           exist_ok=True)
    if _normalised_json(runset.metadata) != metadata:
        raise RunLogError(f"{str(out)!r} holds a run set generated with different task settings "
                          "(pass overwrite=True to regenerate it)")

    seeds = [init_seed + 1 + index for index in range(len(curricula))]
    jobs = _pending_jobs(out, names, curricula, seeds)
    trainer_args = (task, out, init_seed, log_every, checkpoint_steps)
    bar = tqdm(total=len(curricula), initial=len(curricula) - len(jobs), desc=f"training {out.name}",
               unit="run", disable=not progress)
    n_workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else min(int(workers), max(len(jobs), 1))
    try:
        if jobs and n_workers <= 1:
            with _single_thread_deterministic():
                trainer = _Trainer(*trainer_args)
                for job in jobs:
                    trainer(job)
                    bar.update()
        elif jobs:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker,
                                     initargs=trainer_args) as pool:
                futures = [pool.submit(_run_in_worker, job) for job in jobs]
                try:
                    for future in as_completed(futures):
                        future.result()  # a worker's error is raised here
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # runs in flight finish, the rest never start
                    raise
    finally:
        bar.close()
    return RunSet.load(out)


def generator_init_seed(runset: RunSet) -> int:
    """The seed of the initial weights shared by a run set's runs (recorded by :func:`generate_runs`)."""
    generator = runset.metadata.get("generator") or {}
    if "init_seed" not in generator:
        raise SimfluenceError("run-set metadata records no generator init_seed (not made by generate_runs?)")
    return int(generator["init_seed"])
