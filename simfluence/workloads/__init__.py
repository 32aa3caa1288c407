"""Built-in workloads: the Tasks simfluence ships (digits, facts), and finding the task of a run set.

Each module is one built-in task; the engine that trains any task is :mod:`simfluence.training`.
``WORKLOADS`` maps a workload name to its generation function, which takes the output folder first. Your own
task trains the same way: :func:`simfluence.training.generate_random_runs` (random-subset curricula) or
:func:`simfluence.training.generate_runs` (curricula of your own). :func:`task_for_runset` picks the task of a
run set: the one given, or the built-in one it records.
"""
from __future__ import annotations

from simfluence.errors import TaskError
from simfluence.runlog import RunSet
from simfluence.task import TASK_HINT, Task, load_task
from simfluence.workloads.digits import digits_task, digits_task_from_runset, generate_digits
from simfluence.workloads.facts import facts_task, facts_task_from_runset, generate_facts

__all__ = ["digits_task", "digits_task_from_runset", "generate_digits", "facts_task", "facts_task_from_runset",
           "generate_facts", "task_for_runset", "task_from_runset", "WORKLOADS", "TASK_FROM_RUNSET"]

WORKLOADS = {"digits": generate_digits, "facts": generate_facts}
# workload name (manifest metadata "workload") -> rebuilds the Task a run set was generated with
TASK_FROM_RUNSET = {"digits": digits_task_from_runset, "facts": facts_task_from_runset}


def task_from_runset(runset: RunSet) -> Task:
    """The :class:`~simfluence.task.Task` (model, data, loss) a built-in workload's run set was generated with.

    Its test rows are the run set's (a run set of some of the tests, :meth:`~simfluence.runlog.RunSet.select_tests`,
    gets those rows, in its order). Its ``init_seed`` is the one the run set records
    (``metadata["generator"]["init_seed"]``) when there is one. For any run set, with or without a task of your own,
    use :func:`task_for_runset`.
    """
    workload = runset.metadata.get("workload")
    if workload not in TASK_FROM_RUNSET:
        where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
        known = ", ".join(TASK_FROM_RUNSET)
        raise TaskError(f"{where} records no known workload (metadata 'workload'={workload!r}; known: {known}), "
                        f"so its task cannot be rebuilt; {TASK_HINT}")
    task = TASK_FROM_RUNSET[workload](runset)
    recorded = (runset.metadata.get("generator") or {}).get("init_seed")
    if recorded is not None:
        task.init_seed = int(recorded)
    return task.aligned_to(runset)  # itself, unless the run set holds some of the tests (RunSet.select_tests)


def task_for_runset(runset: RunSet, task: Task | str | None = None) -> Task:
    """The task of a run set, its rows aligned to the run set's pool and test ids.

    Parameters
    ----------
    runset : the logged (or imported) runs.
    task : a Task, or a spec for :func:`~simfluence.task.load_task`; it is aligned to the run set
        (:meth:`~simfluence.task.Task.aligned_to`).
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
    workload = runset.metadata.get("workload")
    where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
    if workload is None:
        raise TaskError(f"{where} records no task; {TASK_HINT}")
    if workload not in TASK_FROM_RUNSET:
        raise TaskError(f"{where} records workload {workload!r}, which is not built in "
                        f"(built in: {', '.join(TASK_FROM_RUNSET)}); {TASK_HINT}")
    return task_from_runset(runset)
