"""The mean-curve baseline: every curriculum gets the average training-run loss change.

It knows nothing about curricula, so a simulator that does not beat it on held-out runs has learned
nothing about which examples matter. Predictions are ``L_0 + mean_t(L_t - L_0)``, the average change
over the training runs added to the given initial losses (with the shared initial weights of a typical
run set this is exactly the average trajectory). Steps never logged in training are interpolated
linearly; steps past the fitted horizon keep the last value.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, as_curricula, as_initial, training_runs


def _interpolate_missing(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill rows of ``values`` (n_steps + 1, n_test) where ``known`` is False by linear interpolation."""
    steps = np.arange(values.shape[0])
    known_steps = steps[known]
    right = np.clip(np.searchsorted(known_steps, steps), 0, known_steps.size - 1)
    left = np.clip(right - 1, 0, known_steps.size - 1)
    left = np.where(known_steps[right] < steps, right, left)  # past the last known step: hold it
    lo, hi = known_steps[left], known_steps[right]
    span = np.where(hi > lo, hi - lo, 1)
    weight = np.where(hi > lo, (steps - lo) / span, 0.0)[:, None]
    filled = (1 - weight) * values[lo] + weight * values[hi]
    return np.where(known[:, None], values, filled)


class MeanCurve(Simulator):
    """Baseline simulator: the average training-run loss change, whatever the curriculum."""

    kind = "mean_curve"
    _fitted_arrays = ("mean_change_",)
    _array_specs = {"mean_change_": ("float", ("n_steps+1", "n_test_"))}

    def __init__(self) -> None:
        pass

    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> MeanCurve:
        """Average the loss change of the runs at positions ``runs`` (default all); returns self."""
        runs = training_runs(runset, runs)
        chosen = [runset[i] for i in runs]
        horizon = max(run.n_steps for run in chosen)
        total = np.zeros((horizon + 1, runset.n_test))
        count = np.zeros(horizon + 1)
        for run in chosen:  # a loop over runs (not test examples); each adds one (steps, n_test) block
            initial = run.initial_losses
            total[run.logged_steps] += np.asarray(run.losses, dtype=np.float64) - initial
            count[run.logged_steps] += 1
        known = count > 0
        mean = np.divide(total, count[:, None], out=np.zeros_like(total), where=known[:, None])
        self.mean_change_ = _interpolate_missing(mean, known)
        self._remember_ids(runset, runs)
        self.fitted_ = True
        return self

    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        self.check_fitted()
        curricula = as_curricula(curricula)
        initial = as_initial(initial_losses, len(curricula), self.mean_change_.shape[1])
        lengths = np.array([cur.n_steps for cur in curricula])
        horizon = int(lengths.max(initial=0))
        steps = np.arange(horizon + 1)
        # each curriculum reads the mean change at min(step, its own length, fitted horizon)
        index = np.minimum(np.minimum(steps[None, :], lengths[:, None]), self.mean_change_.shape[0] - 1)
        return initial[:, None, :] + self.mean_change_[index]
