"""Built-in workloads: train real small torch models on many curricula and log the runs.

``generator`` is task-agnostic (a :class:`~simfluence.task.Task` plus curricula in, a logged
:class:`~simfluence.runlog.RunSet` out); each other module is one built-in task. ``WORKLOADS`` maps a workload
name to its generation function, which takes the output folder first. Your own task trains the same way:
:func:`generate_random_runs` (random-subset curricula) or :func:`generate_runs` (curricula of your own).
"""
from __future__ import annotations

from simfluence.errors import TaskError
from simfluence.runlog import RunSet
from simfluence.task import TASK_HINT, Task
from simfluence.workloads.digits import digits_task, digits_task_from_runset, generate_digits
from simfluence.workloads.facts import facts_task, facts_task_from_runset, generate_facts
from simfluence.workloads.generator import WarmupCosine, generate_random_runs, generate_runs

__all__ = ["Task", "WarmupCosine", "generate_runs", "generate_random_runs", "digits_task",
           "digits_task_from_runset", "generate_digits", "facts_task", "facts_task_from_runset", "generate_facts",
           "task_from_runset", "WORKLOADS", "TASK_FROM_RUNSET"]

WORKLOADS = {"digits": generate_digits, "facts": generate_facts}
# workload name (manifest metadata "workload") -> rebuilds the Task a run set was generated with
TASK_FROM_RUNSET = {"digits": digits_task_from_runset, "facts": facts_task_from_runset}


def task_from_runset(runset: RunSet) -> Task:
    """The :class:`~simfluence.task.Task` (model, data, loss) a built-in workload's run set was generated with.

    Its ``init_seed`` is the one the run set records (``metadata["generator"]["init_seed"]``) when there is one.
    For any run set, with or without a task of your own, use :func:`simfluence.task.task_for_runset`.
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
    return task
