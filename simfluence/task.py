"""The Task: the one description of a model that everything which trains or differentiates takes.

A :class:`Task` holds what a logged run set does not: how to build the model (with fixed initial weights,
``make_model(init_seed)``), the pool and test data, the per-example loss, the optimizer, the learning-rate
schedule and the external ids of the pool and test examples. Run generation, counterfactual verification
(retraining for real) and the gradient-based methods all reach the model through a Task.

The built-in workloads (:mod:`simfluence.workloads`) are Tasks and are rebuilt from a run set's manifest.
Your own task is a function returning a Task, in a file of yours; :func:`load_task` loads it from
``path/to/file.py:function`` (the CLI's ``--task``), :meth:`Task.aligned_to` matches its rows to a run set's
ids (an imported run set may list only the examples it used, in another order), and
:func:`task_for_runset` picks the task of a run set: the one given, or the built-in one it records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from simfluence.errors import TaskError, UnknownIdError
from simfluence.ids import IdIndex

if TYPE_CHECKING:
    from simfluence.runlog import Run, RunSet

__all__ = ["Task", "check_schedule", "load_task", "recorded_init_seed", "task_for_runset"]

TASK_HINT = "pass --task path/to/file.py:function (Python: task=...)"


@dataclass(eq=False)
class Task:
    """Everything task-specific needed to train and evaluate one model on any curriculum.

    For ``workers > 1`` the task is pickled to the worker processes, so its callables must be picklable:
    module-level functions, ``functools.partial`` of them, or instances of module-level classes (no lambdas).
    Functions of a task file loaded with :func:`load_task` qualify.

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
    init_seed : seed of the initial weights every run starts from (``make_model(init_seed)``).
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
    init_seed: int = 0

    def __post_init__(self) -> None:
        if len(self.pool_inputs) != len(self.pool_targets):
            raise TaskError(f"task: {len(self.pool_inputs)} pool inputs but {len(self.pool_targets)} targets")
        if len(self.test_inputs) != len(self.test_targets):
            raise TaskError(f"task: {len(self.test_inputs)} test inputs but {len(self.test_targets)} targets")
        for what, ids, count in (("pool", self.pool_ids, self.n_pool), ("test", self.test_ids, self.n_test)):
            if ids is not None and len(ids) != count:
                raise TaskError(f"task: {len(ids)} {what} ids for {count} {what} examples")

    @property
    def n_pool(self) -> int:
        return len(self.pool_inputs)

    @property
    def n_test(self) -> int:
        return len(self.test_inputs)

    def external_pool_ids(self) -> list:
        """The pool ids in row order (``pool_ids``, or ``0..n_pool-1``)."""
        return list(range(self.n_pool)) if self.pool_ids is None else list(self.pool_ids)

    def external_test_ids(self) -> list:
        """The test ids in row order (``test_ids``, or ``0..n_test-1``)."""
        return list(range(self.n_test)) if self.test_ids is None else list(self.test_ids)

    def aligned_to(self, runset: RunSet) -> Task:
        """This task with its pool and test rows in the order (and subset) of a run set's ids.

        Row i of the aligned pool is the example with id ``runset.pool_ids[i]``, so the run set's curricula
        (internal positions) index it directly; likewise for the test rows and the loss columns. Ids match
        by value, or by their text when the types differ (an id 7 of the task matches ``"7"`` read from a
        CSV). ``metadata`` is kept as it is (per-example lists in it are not reordered).

        Parameters
        ----------
        runset : the run set whose ``pool_ids`` (n_pool,) and ``test_ids`` (n_test,) the rows must follow.

        Returns
        -------
        Task with ``runset.n_pool`` pool rows and ``runset.n_test`` test rows and the run set's ids; ``self``
        when the rows already are in that order.

        Raises
        ------
        TaskError : an id of the run set is not among the task's ids (the message names it).
        """
        pool = self._rows_of(runset.pool_ids, self.external_pool_ids(), "pool", runset)
        test = self._rows_of(runset.test_ids, self.external_test_ids(), "test", runset)
        if _is_identity(pool, self.n_pool) and _is_identity(test, self.n_test):
            return self
        pool_index, test_index = torch.as_tensor(pool), torch.as_tensor(test)
        return dataclasses.replace(
            self,
            pool_inputs=self.pool_inputs[pool_index], pool_targets=self.pool_targets[pool_index],
            test_inputs=self.test_inputs[test_index], test_targets=self.test_targets[test_index],
            pool_ids=list(runset.pool_ids), test_ids=list(runset.test_ids),
        )

    @staticmethod
    def _rows_of(wanted: Sequence, ids: list, what: str, runset: RunSet) -> np.ndarray:
        index = IdIndex(ids, what)
        try:
            return index.positions(wanted)
        except UnknownIdError:
            missing = next(value for value in wanted if value not in index)
            where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
            raise TaskError(f"{where} has {what} id {missing!r}, which the task does not have "
                            f"(the task has {len(ids)} {what} ids)") from None


def _is_identity(positions: np.ndarray, count: int) -> bool:
    return len(positions) == count and bool(np.array_equal(positions, np.arange(count)))


# ------------------------------------------------------------------------------------------- loading
_MODULE_NUMBERS = itertools.count()
# module name -> task file, of every file loaded by load_task; worker processes load them again under the
# same names so that the task's functions unpickle there
_TASK_FILES: dict[str, str] = {}


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _import_file(path: Path, name: str) -> Any:
    """Execute ``path`` as the module ``name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {str(path)!r} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def loaded_task_files() -> dict[str, str]:
    """Module name -> path of the task files :func:`load_task` loaded in this process (for worker processes)."""
    return dict(_TASK_FILES)


def import_task_files(files: dict[str, str]) -> None:
    """Load task files under the module names they had in the parent process (worker start-up)."""
    for name, path in files.items():
        if name not in sys.modules:
            _import_file(Path(path), name)


def load_task(spec: str) -> Task:
    """Load a task from ``path/to/file.py:function`` or ``package.module:function``.

    The file is executed as a fresh module (a unique name, so a file called ``task.py`` shadows nothing)
    and the function is called with no arguments. The file's folder is appended to ``sys.path`` (if it is
    not there yet), so the file can import modules that lie beside it, as it could when run as a script.

    Parameters
    ----------
    spec : ``FILE.py:FUNCTION`` (a path, relative to the working directory) or ``MODULE:FUNCTION``.

    Returns
    -------
    The Task the function returns.

    Raises
    ------
    TaskError : one line naming ``spec``: no colon, missing file, an error while loading the file or the
        module, no such function, the function raising, or returning something that is not a Task.
    """
    target, colon, function_name = str(spec).rpartition(":")
    if not colon or not target or not function_name.isidentifier():
        raise TaskError(f"task {spec!r} is not of the form path/to/file.py:function or package.module:function")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise TaskError(f"task {spec!r}: no file {target!r}")
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        name = f"_simfluence_task_{digest}_{next(_MODULE_NUMBERS)}"
        try:
            module = _import_file(path, name)
        except Exception as err:
            raise TaskError(f"task {spec!r}: loading {target!r} failed: {_one_line(err)}") from None
        _TASK_FILES[name] = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise TaskError(f"task {spec!r}: importing module {target!r} failed: {_one_line(err)}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskError(f"task {spec!r}: {target!r} has no function {function_name!r}")
    try:
        task = function()
    except Exception as err:
        raise TaskError(f"task {spec!r}: {function_name}() raised {_one_line(err)}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task {spec!r}: {function_name}() returned a {type(task).__name__}, not a "
                        "simfluence.task.Task")
    return task


def task_for_runset(runset: RunSet, task: Task | str | None = None) -> Task:
    """The task of a run set, its rows aligned to the run set's pool and test ids.

    Parameters
    ----------
    runset : the logged (or imported) runs.
    task : a Task, or a spec for :func:`load_task`; it is aligned to the run set (:meth:`Task.aligned_to`).
        Default: the built-in workload the run set records (manifest metadata ``"workload"``), rebuilt.

    Returns
    -------
    Task whose pool / test rows are the run set's pool / test positions.

    Raises
    ------
    TaskError : no task given and the run set records no built-in workload (the message says to pass
        ``--task``), or the given task lacks an id of the run set.
    """
    if isinstance(task, str):
        task = load_task(task)
    if task is not None:
        if not isinstance(task, Task):
            raise TaskError(f"task must be a simfluence.task.Task or a 'file.py:function' spec, "
                            f"got a {type(task).__name__}")
        return task.aligned_to(runset)
    from simfluence.workloads import TASK_FROM_RUNSET, task_from_runset  # workloads build on this module

    workload = runset.metadata.get("workload")
    where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
    if workload is None:
        raise TaskError(f"{where} records no task; {TASK_HINT}")
    if workload not in TASK_FROM_RUNSET:
        raise TaskError(f"{where} records workload {workload!r}, which is not built in "
                        f"(built in: {', '.join(TASK_FROM_RUNSET)}); {TASK_HINT}")
    return task_from_runset(runset)


def recorded_init_seed(runset: RunSet, task: Task) -> int:
    """Seed of the initial weights a run set's runs share: the one its generator recorded, else ``task.init_seed``."""
    recorded = (runset.metadata.get("generator") or {}).get("init_seed")
    return int(task.init_seed if recorded is None else recorded)


def check_schedule(task: Task, run: Run) -> None:
    """The task's learning rates must be the ones ``run`` logged (where it logged them), else a replay differs.

    Raises
    ------
    TaskError : naming the first step whose rates differ.
    """
    logged = np.asarray(run.learning_rates, dtype=np.float64)
    steps = np.flatnonzero(np.isfinite(logged)) + 1
    if steps.size == 0:
        return
    rates = np.array([float(task.lr_at(int(step))) for step in steps])
    wrong = np.flatnonzero(~np.isclose(rates, logged[steps - 1], rtol=1e-6, atol=0.0))
    if wrong.size:
        step = int(steps[wrong[0]])
        raise TaskError(f"the task's learning rate at step {step} is {rates[wrong[0]]:g} but run {run.name!r} "
                        f"logged {logged[step - 1]:g}: the task does not describe this run")
