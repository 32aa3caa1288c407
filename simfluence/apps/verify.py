"""Check counterfactual predictions against reality: retrain real models on edited curricula.

Starting from a logged run that the simulator never saw, build counterfactual curricula — remove the
k pool examples predicted most harmful for a set of target test examples, remove k random examples
(the control), move the k predicted most helpful examples to the last steps, reverse the order, and the
curriculum found by the greedy search — then train real models on them (same task, same initial
weights) and compare the simulator's predicted trajectories with the real ones.

Per edit type: ``all_mse`` of the predicted trajectories, ``rho_change`` (Spearman across test examples
of predicted vs actual change of the final loss against the retrained base curriculum) and, for the
targets, the predicted vs actual change of their mean final loss.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simfluence.counterfactual import loo_effects, move_all, search_curriculum
from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.metrics import spearman
from simfluence.runlog import RunSet
from simfluence.simulators import Simulator


@dataclass
class Verification:
    """Result of :func:`verify_counterfactuals`.

    Attributes
    ----------
    table : one row per curriculum: ``edit, all_mse, final_mse, rho_change, target_predicted_change,
        target_actual_change``.
    names : curriculum names (``base`` first).
    predicted, actual : (n_curricula, T + 1, n_test) trajectories.
    tests : target test positions.
    base_reproduction : largest |retrained base - logged base| loss (0 when retraining is deterministic).
    """

    table: pd.DataFrame
    names: list[str]
    predicted: np.ndarray
    actual: np.ndarray
    tests: list[int]
    base_reproduction: float = float("nan")


def counterfactual_curricula(
    simulator: Simulator,
    base: Curriculum,
    initial_losses: np.ndarray,
    learning_rates: np.ndarray | None,
    tests: list[int],
    k: int = 10,
    seed: int = 0,
) -> dict[str, Curriculum]:
    """The edited curricula to verify, by name (``base`` first)."""
    effects = loo_effects(simulator, base, initial_losses, learning_rates)
    present = np.flatnonzero(effects.present)
    if present.size <= k:
        raise SimfluenceError(f"the base curriculum uses only {present.size} examples; choose k < {present.size}")
    score = effects.effects[:, tests].mean(axis=1)  # > 0: removing raises the targets' loss (helpful)
    order = present[np.argsort(score[present], kind="stable")]
    harmful, helpful = order[:k], order[::-1][:k]
    rng = np.random.default_rng(seed)
    random_ids = rng.choice(present, size=k, replace=False)
    moved = base
    for rank, example in enumerate(helpful):  # every occurrence of a helpful example goes to one of the last 4 steps
        moved = move_all(moved, int(example), base.n_steps - rank % 4)
    searched = search_curriculum(simulator, base, initial_losses, tests, drop=k, learning_rates=learning_rates)
    return {
        "base": base,
        f"remove {k} most harmful": base.remove(harmful.tolist()),
        f"remove {k} random (control)": base.remove(random_ids.tolist()),
        f"move {k} most helpful to the end": moved,
        "reverse order": base.reverse(),
        f"searched (drop <= {k})": searched.curriculum,
    }


def verify_counterfactuals(
    simulator: Simulator,
    runset: RunSet,
    run: int | str,
    tests: list[int],
    k: int = 10,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> Verification:
    """Train real runs on counterfactual curricula of ``run`` and score the simulator's predictions.

    Parameters
    ----------
    simulator : fitted on runs that exclude ``run``.
    runset : a run set of a built-in workload (its task is rebuilt from the manifest).
    run : the base run (position or name).
    tests : target test positions for the harmful/helpful edits and the search.
    k : examples per edit.
    out : folder for the retrained runs (default: a temporary folder, removed afterwards).
    """
    from simfluence.workloads import generate_runs, task_from_runset
    from simfluence.workloads.generator import generator_init_seed

    base_run = runset[run]
    task = task_from_runset(runset)
    lrs = base_run.learning_rates if np.isfinite(base_run.learning_rates).all() else None
    initial = base_run.initial_losses
    curricula = counterfactual_curricula(simulator, base_run.curriculum, initial, lrs, tests, k, seed)
    names = list(curricula)
    predicted = simulator.simulate(list(curricula.values()), initial, None if lrs is None else [lrs] * len(names))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out) if out is not None else Path(scratch) / "verify"
        retrained = generate_runs(task, list(curricula.values()), folder,
                                  names=[f"cf-{i:02d}" for i in range(len(names))],
                                  init_seed=generator_init_seed(runset), workers=workers, progress=progress,
                                  overwrite=True)
        actual = np.stack([np.asarray(r.losses, dtype=np.float64) for r in retrained])
    logged, _ = base_run.dense_losses()
    reproduction = float(np.nanmax(np.abs(actual[0] - logged)))
    return Verification(_fidelity(names, predicted, actual, tests), names, predicted, actual, list(tests),
                        reproduction)


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
