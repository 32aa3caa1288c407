"""simfluence: training data attribution by simulating training runs.

Log training runs (which pool examples formed each batch, and the losses of fixed test examples),
fit a training-run simulator to them, and predict every test example's loss curve for any
counterfactual curriculum::

    from simfluence import RunSet, SimfluenceLinear, evaluate

    runset = RunSet.load("runs/digits-mini")
    sim = SimfluenceLinear().fit(runset, runs=range(40))
    curves = sim.simulate(runset[45].curriculum.remove([3, 17]), runset[45].initial_losses)
"""
from __future__ import annotations

from simfluence.curriculum import Curriculum, random_curricula, random_subset, shuffled_epochs
from simfluence.errors import (
    CurriculumError,
    ImportTableError,
    ModelFileError,
    NotFittedError,
    RunLogError,
    SimfluenceError,
)
from simfluence.evaluation import Evaluation, evaluate
from simfluence.methods import METHODS, load_simulator, make_simulator
from simfluence.metrics import trajectory_metrics
from simfluence.runlog import Run, RunLogger, RunSet
from simfluence.simulators import MeanCurve, SimfluenceAdditive, SimfluenceLinear, clone

__version__ = "0.1.0"

_LAZY = {  # imported on first use (torch only when a Task is used)
    "Task": "simfluence.task",
    "load_task": "simfluence.task",
    "WarmupCosine": "simfluence.training",
    "generate_runs": "simfluence.training",
    "generate_random_runs": "simfluence.training",
    "Bootstrap": "simfluence.uncertainty",
    "BlendSimulator": "simfluence.blend",
    "fit_sharded": "simfluence.sharding",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'simfluence' has no attribute {name!r}")

__all__ = [
    "METHODS",
    "BlendSimulator",
    "Bootstrap",
    "Curriculum",
    "CurriculumError",
    "Evaluation",
    "ImportTableError",
    "MeanCurve",
    "ModelFileError",
    "NotFittedError",
    "Run",
    "RunLogError",
    "RunLogger",
    "RunSet",
    "SimfluenceAdditive",
    "SimfluenceError",
    "SimfluenceLinear",
    "Task",
    "WarmupCosine",
    "clone",
    "evaluate",
    "fit_sharded",
    "generate_random_runs",
    "generate_runs",
    "load_simulator",
    "load_task",
    "make_simulator",
    "random_curricula",
    "random_subset",
    "shuffled_epochs",
    "trajectory_metrics",
]
