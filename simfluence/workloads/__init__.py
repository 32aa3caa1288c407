"""Built-in workloads: train real small torch models on many curricula and log the runs.

``generator`` is task-agnostic (a :class:`Task` plus curricula in, a logged :class:`~simfluence.runlog.RunSet`
out); each other module is one task. ``WORKLOADS`` maps a workload name to its generation function, which
takes the output folder first.
"""
from __future__ import annotations

from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.workloads.digits import digits_task, digits_task_from_runset, generate_digits
from simfluence.workloads.facts import facts_task, facts_task_from_runset, generate_facts
from simfluence.workloads.generator import Task, WarmupCosine, generate_runs

__all__ = ["Task", "WarmupCosine", "generate_runs", "digits_task", "digits_task_from_runset", "generate_digits",
           "facts_task", "facts_task_from_runset", "generate_facts", "task_from_runset", "WORKLOADS",
           "TASK_FROM_RUNSET"]

WORKLOADS = {"digits": generate_digits, "facts": generate_facts}
# workload name (manifest metadata "workload") -> rebuilds the Task a run set was generated with
TASK_FROM_RUNSET = {"digits": digits_task_from_runset, "facts": facts_task_from_runset}


def task_from_runset(runset: RunSet) -> Task:
    """The :class:`Task` (model, data, loss) a built-in workload's run set was generated with."""
    workload = runset.metadata.get("workload")
    if workload not in TASK_FROM_RUNSET:
        where = f"run set {str(runset.path)!r}" if runset.path is not None else "the run set"
        known = ", ".join(TASK_FROM_RUNSET)
        raise SimfluenceError(
            f"{where} records no known workload (metadata 'workload'={workload!r}; known: {known}), so its model "
            "and data cannot be rebuilt; pass task=... to fit() instead"
        )
    return TASK_FROM_RUNSET[workload](runset)
