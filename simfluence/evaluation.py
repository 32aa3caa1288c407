"""Score simulators on held-out runs: fit on the first runs of a run set, roll out the last ones.

Every method (learned simulators and the baselines) is fitted on the same training runs and scored on
the same held-out runs with the same metrics (:mod:`simfluence.metrics`), rolling out each held-out
curriculum from its observed initial losses. Held-out runs are never used for fitting or choosing
hyper-parameters: ``lam="auto"`` carves its validation runs out of the training runs.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from simfluence.errors import SimfluenceError
from simfluence.methods import DEFAULT_METHODS, METHODS, method
from simfluence.metrics import bootstrap_intervals, trajectory_metrics
from simfluence.runlog import RunSet
from simfluence.simulators import Simulator, rollout_runs

DEFAULT_HOLDOUT = 8
"""Held-out runs (the last ones) unless told otherwise: methods are fitted on the others and scored on these."""


@dataclass
class Evaluation:
    """Results of :func:`evaluate`.

    Attributes
    ----------
    metrics : {method: {metric: value, ..., "fit_seconds": s}}.
    train_runs, heldout_runs : run names used for fitting and for scoring.
    excluded_runs : names of the incomplete runs left out (see ``include_incomplete``).
    simulators : {method: fitted simulator}.
    predicted : {method: (n_heldout, T + 1, n_test) rolled-out trajectories}.
    actual : (n_heldout, T + 1, n_test) logged losses (NaN where not logged).
    mask : (n_heldout, T + 1) True where logged.
    intervals : {method: {metric: (low, high)}} 95% bootstrap interval of each metric over the held-out runs
        (:func:`~simfluence.metrics.bootstrap_intervals`; the same resamples for every method).
    """

    metrics: dict[str, dict[str, float]]
    train_runs: list[str]
    heldout_runs: list[str]
    simulators: dict[str, Simulator] = field(default_factory=dict)
    predicted: dict[str, np.ndarray] = field(default_factory=dict)
    actual: np.ndarray | None = None
    mask: np.ndarray | None = None
    excluded_runs: list[str] = field(default_factory=list)
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def best(self, metric: str = "all_mse") -> str:
        """Method with the lowest value of an error metric (highest for a ``rho_*`` metric)."""
        sign = -1.0 if metric.startswith("rho") else 1.0
        scored = {name: sign * m[metric] for name, m in self.metrics.items() if np.isfinite(m[metric])}
        if not scored:
            raise SimfluenceError(f"no method has a finite {metric}")
        return min(scored, key=scored.get)


def split_runs(n_runs: int, holdout: int) -> tuple[list[int], list[int]]:
    """Positions of training runs (all but the last ``holdout``) and held-out runs (the last ``holdout``)."""
    if not 1 <= holdout < n_runs:
        raise SimfluenceError(f"--holdout must be between 1 and {n_runs - 1} for a run set of {n_runs} runs")
    return list(range(n_runs - holdout)), list(range(n_runs - holdout, n_runs))


def complete_positions(runset: RunSet, include_incomplete: bool = False) -> tuple[list[int], list[str]]:
    """Positions of the runs to use and names of the incomplete runs left out (none if ``include_incomplete``)."""
    excluded = [] if include_incomplete else [run.name for run in runset if not run.complete]
    used = [index for index, run in enumerate(runset) if include_incomplete or run.complete]
    return used, excluded


def evaluate(
    runset: RunSet,
    methods: Iterable[str] = DEFAULT_METHODS,
    holdout: int = DEFAULT_HOLDOUT,
    params: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
    task: Any = None,
    include_incomplete: bool = False,
) -> Evaluation:
    """Fit every method on all but the last ``holdout`` runs and score it on those runs.

    Parameters
    ----------
    runset : the logged runs (in run-set order; the last ``holdout`` complete runs are held out).
    methods : method names (see :data:`simfluence.methods.METHODS`).
    holdout : number of held-out runs.
    params : optional extra hyper-parameters per method, e.g. ``{"linear": {"lam": 1.0}}``.
    progress : show a progress bar over methods.
    task : the :class:`~simfluence.task.Task` (or ``"file.py:function"``) for methods that need a model
        (gradient methods); default: the built-in workload recorded in the run set.
    include_incomplete : also use runs whose logger never closed (by default they are left out and listed in
        ``Evaluation.excluded_runs``: a killed run's prefix is not a run of the curriculum it logged).
    """
    methods = list(methods)
    if not methods:
        raise SimfluenceError("no methods to evaluate")
    if runset.n_test == 0:  # before any fit: nothing to predict, and every metric would be empty
        raise SimfluenceError("the run set has no test examples (n_test = 0): there are no losses to evaluate")
    simulators = {name: method(name).build(**(params or {}).get(name, {})) for name in methods}
    used, excluded = complete_positions(runset, include_incomplete)
    train, heldout = (([used[i] for i in part]) for part in split_runs(len(used), holdout))
    result = Evaluation(
        metrics={},
        train_runs=[runset[i].name for i in train],
        heldout_runs=[runset[i].name for i in heldout],
        excluded_runs=excluded,
    )
    for name in tqdm(methods, desc="fit + evaluate", disable=not progress, leave=False):
        simulator = simulators[name]
        start = time.perf_counter()
        simulator.fit(runset, runs=train, task=task)
        fit_seconds = time.perf_counter() - start
        _score_into(result, name, simulator, runset, heldout)
        result.metrics[name]["fit_seconds"] = fit_seconds
    return result


def score(simulators: dict[str, Simulator], runset: RunSet, runs: Sequence[int]) -> Evaluation:
    """Score already-fitted simulators (e.g. loaded from files) on the runs at positions ``runs``.

    The caller is responsible for ``runs`` not having been used to fit them; ``train_runs`` is left empty.
    """
    if not simulators:
        raise SimfluenceError("no simulators to score")
    runs = [int(i) for i in runs]
    if not runs:
        raise SimfluenceError("no runs to score on")
    result = Evaluation(metrics={}, train_runs=[], heldout_runs=[runset[i].name for i in runs])
    for name, simulator in simulators.items():
        _score_into(result, name, simulator, runset, runs)
    return result


def _score_into(result: Evaluation, name: str, simulator: Simulator, runset: RunSet, runs: Sequence[int]) -> None:
    simulator.check_matches(runset, name)
    predicted, actual, mask = rollout_runs(simulator, runset, runs)
    result.metrics[name] = trajectory_metrics(predicted, actual, mask=mask)
    result.intervals[name] = bootstrap_intervals(predicted, actual, mask=mask)
    result.simulators[name] = simulator
    result.predicted[name] = predicted
    result.actual, result.mask = actual, mask


def metrics_json(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Metrics with NaN/inf as None, ready for strict JSON."""
    return {
        method: {key: (float(value) if np.isfinite(value) else None) for key, value in scores.items()}
        for method, scores in metrics.items()
    }


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or a list into a list of method names (checked)."""
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise SimfluenceError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return names
