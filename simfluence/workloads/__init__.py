"""Built-in workloads: train real small torch models on many curricula and log the runs.

``generator`` is task-agnostic (a :class:`Task` plus curricula in, a logged :class:`~simfluence.runlog.RunSet`
out); each other module is one task. ``WORKLOADS`` maps a workload name to its generation function, which
takes the output folder first.
"""
from __future__ import annotations

from simfluence.workloads.digits import digits_task, generate_digits
from simfluence.workloads.generator import Task, WarmupCosine, generate_runs

__all__ = ["Task", "WarmupCosine", "generate_runs", "digits_task", "generate_digits", "WORKLOADS"]

WORKLOADS = {"digits": generate_digits}
