"""Check counterfactual predictions against reality: retrain real models on edited curricula.

Starting from a logged run that the simulator never saw, build counterfactual curricula — remove the
k pool examples predicted most harmful for a set of target test examples, remove k random examples
(the control), move the k predicted most helpful examples to the last steps, reverse the order, and the
curriculum found by the greedy search — then train real models on them (same task, same initial
weights, same run seed) and compare the simulator's predicted trajectories with the real ones.

Before the edits are trained, the settings the base run records (optimizer, weight decay, clipping, init
seed) are compared with the task and the unedited base curriculum is retrained and compared with the log
(:func:`~simfluence.task.check_replay`, tolerance :data:`~simfluence.task.REPLAY_TOLERANCE` of the mean loss):
a task that does not reproduce the logged run is one error, not a table that reads like a confirmation.

The model comes from a :class:`~simfluence.task.Task`: the one given (``task=``; a Task of your own, or a
``file.py:function`` spec), else the built-in workload the run set records
(:func:`~simfluence.workloads.task_for_runset`). An imported run set records none, so there a task must be given.

Per edit type: ``all_mse`` of the predicted trajectories, ``rho_change`` (Spearman across test examples
of predicted vs actual change of the final loss against the retrained base curriculum) and, for the
targets, the predicted vs actual change of their mean final loss.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from simfluence.counterfactual import loo_effects, move_all, search_curriculum
from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.metrics import spearman
from simfluence.runlog import Run, RunSet
from simfluence.simulators import Simulator

if TYPE_CHECKING:
    from simfluence.task import Task

DEFAULT_EDIT_SIZE = 10
"""Examples per edit (``k``: removed, moved, dropped by the search) unless told otherwise."""
DEFAULT_N_TARGETS = 10
"""Target test examples when none are named: the base run's highest final losses (the CLI's default)."""


@dataclass
class Verification:
    """Result of :func:`verify_counterfactuals`.

    Attributes
    ----------
    table : one row per curriculum: ``edit, all_mse, final_mse, rho_change, target_predicted_change,
        target_actual_change``.
    names : curriculum names (``base`` first).
    predicted, actual : (n_curricula, T + 1, n_test) trajectories.
    tests : target test ids.
    test_columns : their positions (loss columns of ``predicted`` / ``actual``).
    base_reproduction : largest |retrained base - logged base| loss (0 when retraining is deterministic).
    """

    table: pd.DataFrame
    names: list[str]
    predicted: np.ndarray
    actual: np.ndarray
    tests: list
    test_columns: list[int]
    base_reproduction: float = float("nan")


def counterfactual_curricula(
    simulator: Simulator,
    base: Run,
    tests: Sequence,
    k: int = DEFAULT_EDIT_SIZE,
    seed: int = 0,
) -> dict[str, Curriculum]:
    """The edited curricula to verify, by name (``base`` first); ``tests`` are the target test ids."""
    effects = loo_effects(simulator, base)
    present = np.flatnonzero(effects.present)
    if present.size <= k:
        raise SimfluenceError(f"the base curriculum uses only {present.size} examples; choose k < {present.size}")
    score = effects.scores(tests)  # > 0: removing raises the targets' loss (helpful)
    order = present[np.argsort(score[present], kind="stable")]
    harmful, helpful = order[:k], order[::-1][:k]
    rng = np.random.default_rng(seed)
    random_ids = rng.choice(present, size=k, replace=False)
    curriculum = base.curriculum
    moved = move_all(curriculum, helpful, curriculum.n_steps)  # every occurrence to the last steps, sizes kept
    searched = search_curriculum(simulator, base, tests, drop=k)
    return {
        "base": curriculum,
        f"remove {k} most harmful": curriculum.remove(harmful.tolist()),
        f"remove {k} random (control)": curriculum.remove(random_ids.tolist()),
        f"move {k} most helpful to the end": moved,
        "reverse order": curriculum.reverse(),
        f"searched (drop <= {k})": searched.curriculum,
    }


def verify_counterfactuals(
    simulator: Simulator,
    runset: RunSet,
    run: int | str,
    tests: Sequence,
    k: int = DEFAULT_EDIT_SIZE,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    task: Task | str | None = None,
    replay_tolerance: float | None = None,
) -> Verification:
    """Train real runs on counterfactual curricula of ``run`` and score the simulator's predictions.

    Every retrained run starts from the run set's initial weights (the init seed its generator recorded,
    else ``task.init_seed``) and uses the torch seed the base run was logged with (its ``metadata["seed"]``,
    else ``init_seed + 1``), so retraining the unedited base reproduces the log (``base_reproduction``).

    Parameters
    ----------
    simulator : fitted on runs that exclude ``run``.
    runset : the logged (or imported) runs.
    run : the base run (position or name).
    tests : target test ids for the harmful/helpful edits and the search.
    k : examples per edit.
    out : folder for the retrained runs (default: a temporary folder, removed afterwards); created only
        when training starts.
    seed : seed of the random (control) edit.
    workers : training processes (see :func:`~simfluence.training.generate_runs`).
    progress : show a progress bar.
    task : the runs' task (a Task or ``file.py:function``); default: the built-in workload the run set records.
    replay_tolerance : largest accepted difference between the retrained base curriculum and the logged run,
        as a fraction of its mean loss (default :data:`~simfluence.task.REPLAY_TOLERANCE`; see
        :func:`~simfluence.task.check_replay`). The base is retrained and checked before any edit.

    Raises
    ------
    TaskError : no task given and the run set records none, the task lacks an id of the run set, its
        learning-rate schedule or a setting the base run records (optimizer, weight decay, clipping, init
        seed) differs from the run's, or retraining the base curriculum does not reproduce the logged run.
    """
    from simfluence.task import check_recorded_settings, check_replay, check_schedule
    from simfluence.training import generate_runs, retraining_seeds
    from simfluence.workloads import task_for_runset

    base_run = runset[run]
    task = task_for_runset(runset, task)
    init_seed, run_seed = retraining_seeds(runset, task, base_run)
    check_schedule(task, base_run)
    check_recorded_settings(task, runset, base_run, init_seed)
    lrs = base_run.known_learning_rates
    initial = base_run.initial_losses
    columns = [int(i) for i in simulator.test_index.positions(tests)]
    curricula = counterfactual_curricula(simulator, base_run, tests, k, seed)
    names = list(curricula)
    predicted = simulator.simulate(list(curricula.values()), initial, None if lrs is None else [lrs] * len(names))
    run_names = [f"cf-{i:02d}" for i in range(len(names))]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out) if out is not None else Path(scratch) / "verify"
        retrained = generate_runs(task, [curricula["base"]], folder, names=run_names[:1], init_seed=init_seed,
                                  seeds=[run_seed], workers=1, progress=False, overwrite=True)
        replayed, _ = retrained[0].dense_losses()
        reproduction = check_replay(runset, base_run, replayed, replay_tolerance)  # before training the edits
        retrained = generate_runs(task, list(curricula.values()), folder, names=run_names, init_seed=init_seed,
                                  seeds=[run_seed] * len(names), workers=workers, progress=progress)
        actual = np.stack([np.asarray(r.losses, dtype=np.float64) for r in retrained])
    return Verification(_fidelity(names, predicted, actual, columns), names, predicted, actual,
                        simulator.test_index.ids_of(columns), columns, reproduction)


def _fidelity(names: list[str], predicted: np.ndarray, actual: np.ndarray, tests: list[int]) -> pd.DataFrame:
    pred_change = predicted[:, -1] - predicted[:1, -1]
    act_change = actual[:, -1] - actual[:1, -1]
    with np.errstate(invalid="ignore"):
        rho = spearman(pred_change, act_change, axis=1)
    rows = {
        "edit": names,
        "all_mse": ((predicted[:, 1:] - actual[:, 1:]) ** 2).mean(axis=(1, 2)),
        "final_mse": ((predicted[:, -1] - actual[:, -1]) ** 2).mean(axis=1),
        "rho_change": rho,
        "target_predicted_change": pred_change[:, tests].mean(axis=1),
        "target_actual_change": act_change[:, tests].mean(axis=1),
    }
    return pd.DataFrame(rows)
