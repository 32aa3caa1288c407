"""Counterfactual queries: what a fitted simulator predicts for edited curricula of a base run.

- :func:`whatif`: edit a base curriculum (:mod:`simfluence.counterfactual.edits`) in any number of named
  scenarios and predict every test example's trajectory under each, with the change against the base, in one
  batched ``simulate`` call;
- :func:`loo_effects`: the effect of removing each pool example on every test example's loss, for all pool
  examples at once (exact and fast for the Simfluence-Linear family, see :mod:`simfluence.simulators.loo`;
  batched re-simulation for other simulators);
- :func:`influence_table`: the same leave-one-out effects as a tidy proponents / opponents table, for any
  simulator (learned or gradient-based).

A base is a logged :class:`~simfluence.runlog.Run` (its curriculum, initial losses and learning rates are used)
or a :class:`~simfluence.curriculum.Curriculum` of pool positions with explicit initial losses
(:func:`resolve_base`). A question about curricula whose batches are far outside the sizes seen in training
(more than ``BATCH_SIZE_FACTOR`` times the largest, or not empty and less than the smallest divided by it) is
answered with an :class:`~simfluence.errors.ExtrapolationWarning` (:func:`warn_unseen_batch_sizes`).

``intervals=``, a :class:`~simfluence.uncertainty.Bootstrap` fitted around the simulator, makes its members
answer the same question: the results keep their answers (``ensemble``) and the tables gain the interval of
each change or effect and ``straddles_zero``, set where the interval contains zero.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from simfluence.counterfactual.edits import Edit, apply_edits, parse_scenario
from simfluence.curriculum import Curriculum
from simfluence.errors import ExtrapolationWarning, SimfluenceError
from simfluence.ids import IdIndex
from simfluence.runlog import Run, RunSet
from simfluence.simulators import Simulator
from simfluence.uncertainty import Bootstrap, Ensemble, straddles_zero

BATCH_SIZE_FACTOR = 2.0  # batches more than this factor outside the training runs' sizes make a query warn


@dataclass
class Base:
    """A base curriculum with what simulating it needs (see :func:`resolve_base`)."""

    curriculum: Curriculum
    initial_losses: np.ndarray
    learning_rates: np.ndarray | None
    name: str = "base"


def resolve_base(
    simulator: Simulator,
    base: Run | Curriculum,
    initial_losses: np.ndarray | None = None,
    learning_rates: np.ndarray | None = None,
) -> Base:
    """The base of a counterfactual question: a logged run, or a curriculum with explicit initial losses.

    For a run, its initial losses and (when logged at every step) its learning rates are used unless given.
    """
    simulator.check_fitted()
    if isinstance(base, Run):
        curriculum, name = base.curriculum, base.name
        if initial_losses is None:
            initial_losses = base.initial_losses
        if learning_rates is None:
            learning_rates = base.known_learning_rates
    elif isinstance(base, Curriculum):
        curriculum, name = base, "base"
        if initial_losses is None:
            raise SimfluenceError("a Curriculum base needs initial_losses (or pass the logged Run itself)")
    else:
        raise SimfluenceError(f"base must be a Run or a Curriculum, not {type(base).__name__}")
    if curriculum.ids.size and int(curriculum.ids.max()) >= simulator.n_pool_:
        raise SimfluenceError(f"the base curriculum uses pool position {int(curriculum.ids.max())}, but the "
                              f"simulator was fitted on {simulator.n_pool_} pool examples")
    initial = np.asarray(initial_losses, dtype=np.float64).reshape(-1)
    if initial.shape != (simulator.n_test_,):
        raise SimfluenceError(f"initial_losses has {initial.size} values for {simulator.n_test_} test examples")
    rates = None if learning_rates is None else np.asarray(learning_rates, dtype=np.float64)
    return Base(curriculum, initial, rates, name)


@dataclass
class WhatIf:
    """Predicted trajectories of a base curriculum and edited scenarios.

    Attributes
    ----------
    names : scenario names, ``"base"`` first.
    curricula : the curricula simulated, base first.
    trajectories : (n_scenarios + 1, T + 1, n_test) predicted losses (T = the longest curriculum).
    test_ids : external ids of the test examples (column labels).
    ensemble : with intervals, the members' trajectories (n_members, n_scenarios + 1, T + 1, n_test) and their
        interval rule; the tables then carry the interval of every change and whether it straddles zero.
    """

    names: list[str]
    curricula: list[Curriculum]
    trajectories: np.ndarray
    test_ids: list = field(default_factory=list)
    ensemble: Ensemble | None = None

    @property
    def change(self) -> np.ndarray:
        """(n_scenarios + 1, T + 1, n_test) predicted loss minus the base curriculum's at the same step."""
        return self.trajectories - self.trajectories[:1]

    def change_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)``, each (n_scenarios + 1, T + 1, n_test): the interval of :attr:`change`."""
        ensemble = _require(self.ensemble)
        members = ensemble.members
        return ensemble.bounds(self.change, members - members[:, :1])

    def final(self) -> pd.DataFrame:
        """Predicted final loss, one row per scenario, one column per test example (external ids)."""
        final = self.trajectories[:, -1]
        return pd.DataFrame(final, index=pd.Index(self.names, name="scenario"), columns=self._test_labels())

    def summary(self, tests: Sequence | None = None) -> pd.DataFrame:
        """Per scenario: mean final loss and mean change vs base over the test ids ``tests`` (default all).

        With intervals also ``mean_change_low, mean_change_high, straddles_zero`` (the interval of the mean
        change, from every member's mean change).
        """
        cols = slice(None) if tests is None else IdIndex(self._test_labels(), "test").positions(tests)
        final = self.trajectories[:, -1][:, cols]
        columns = {
            "mean_final_loss": final.mean(axis=1),
            "mean_change": (final - final[:1]).mean(axis=1),
            "improved_tests": (final < final[:1] - 1e-12).sum(axis=1),
            "worsened_tests": (final > final[:1] + 1e-12).sum(axis=1),
        }
        if self.ensemble is not None:
            members = self.ensemble.members[:, :, -1][:, :, cols]
            low, high = self.ensemble.bounds(columns["mean_change"], (members - members[:, :1]).mean(axis=2))
            columns.update(mean_change_low=low, mean_change_high=high, straddles_zero=straddles_zero(low, high))
        return pd.DataFrame(columns, index=pd.Index(self.names, name="scenario"))

    def frame(self) -> pd.DataFrame:
        """Tidy table: ``scenario, step, test, loss, change`` (change against the base at that step).

        With intervals also ``change_low, change_high, straddles_zero``.
        """
        n_scen, n_points, n_test = self.trajectories.shape
        scen, step, test = np.meshgrid(np.arange(n_scen), np.arange(n_points), np.arange(n_test), indexing="ij")
        columns = {
            "scenario": np.asarray(self.names, dtype=object)[scen.ravel()],
            "step": step.ravel(),
            "test": np.asarray(self._test_labels(), dtype=object)[test.ravel()],
            "loss": self.trajectories.ravel(),
            "change": self.change.ravel(),
        }
        if self.ensemble is not None:
            low, high = self.change_interval()
            columns.update(change_low=low.ravel(), change_high=high.ravel(),
                           straddles_zero=straddles_zero(low, high).ravel())
        return pd.DataFrame(columns)

    def _test_labels(self) -> list:
        return list(self.test_ids) if self.test_ids else list(range(self.trajectories.shape[2]))


def _require(ensemble: Ensemble | None) -> Ensemble:
    if ensemble is None:
        raise SimfluenceError("no intervals: ask again with intervals=Bootstrap(simulator).fit(runset)")
    return ensemble


def _check_intervals(intervals: Bootstrap | None, simulator: Simulator) -> None:
    if intervals is not None:
        if not isinstance(intervals, Bootstrap):
            raise SimfluenceError(f"intervals must be a fitted Bootstrap or None, not {type(intervals).__name__}")
        intervals.check_point(simulator)


def _schedules(learning_rates: np.ndarray | None, curricula: Sequence[Curriculum]) -> list[np.ndarray] | None:
    """The base's learning rates for every curriculum (extended with the last rate, or cut, to its length)."""
    if learning_rates is None:
        return None
    last = learning_rates[-1] if learning_rates.size else np.nan
    return [np.concatenate([learning_rates, np.full(max(0, c.n_steps - learning_rates.size), last)])[: c.n_steps]
            for c in curricula]


def whatif(
    simulator: Simulator,
    base: Run | Curriculum,
    scenarios: Mapping[str, Sequence[Edit | str] | str] | Sequence[Sequence[Edit | str]],
    initial_losses: np.ndarray | None = None,
    learning_rates: np.ndarray | None = None,
    intervals: Bootstrap | None = None,
) -> WhatIf:
    """Predict the base curriculum and every edited scenario in one batched ``simulate`` call.

    Parameters
    ----------
    simulator : a fitted simulator.
    base : a logged run, or a curriculum of pool positions (then ``initial_losses`` is needed).
    scenarios : ``{name: [edits]}`` (or ``{name: "edit;edit"}``), or a list of edit lists (named by their
        edits); edits name pool examples by external id.
    initial_losses : (n_test,) losses at step 0 (default: the run's).
    learning_rates : (T,) learning rates of the base (default: the run's), reused by every scenario.
    intervals : a :class:`~simfluence.uncertainty.Bootstrap` fitted around ``simulator``: every member simulates
        the same curricula, and the tables carry the interval of each change.
    """
    resolved = resolve_base(simulator, base, initial_losses, learning_rates)
    _check_intervals(intervals, simulator)
    if not isinstance(scenarios, Mapping):
        scenarios = {" + ".join(str(e) for e in edits) or "unchanged": edits for edits in scenarios}
    if not scenarios:
        raise SimfluenceError("no scenarios to simulate")
    pool = simulator.pool_index
    edited = {name: parse_scenario(edits) if isinstance(edits, str) else list(edits)
              for name, edits in scenarios.items()}
    names = ["base", *edited]
    curricula = [resolved.curriculum] + [apply_edits(resolved.curriculum, edits, pool) for edits in edited.values()]
    warn_unseen_batch_sizes(simulator, curricula[1:], list(edited))
    schedules = _schedules(resolved.learning_rates, curricula)
    trajectories = simulator.simulate(curricula, resolved.initial_losses, schedules)
    ensemble = None
    if intervals is not None:
        ensemble = intervals.ensemble(intervals.simulate(curricula, resolved.initial_losses, schedules))
    return WhatIf(names, curricula, trajectories, list(simulator.test_ids_), ensemble)


@dataclass
class LooEffects:
    """Leave-one-out effects: ``effects[i, m]`` = loss of test m without pool example i minus with it.

    Positive: removing i raises the loss, so i *helps* (a proponent); negative: i hurts (an opponent).
    Rows and columns are positions; ``pool_ids`` / ``test_ids`` name them, and every method takes ids.
    With intervals, ``ensemble`` holds every member's effects (n_members, n_pool, n_test) and the tables carry
    ``low, high, straddles_zero``: the interval of each effect and whether its sign is unsure.
    """

    effects: np.ndarray
    pool_ids: list
    test_ids: list
    present: np.ndarray
    ensemble: Ensemble | None = None

    def _test_columns(self, tests: Sequence | None):
        return slice(None) if tests is None else IdIndex(self.test_ids, "test").positions(tests)

    def effect(self, pool_id, test_id) -> float:
        """The effect of removing pool example ``pool_id`` on test ``test_id``."""
        return float(self.effects[IdIndex(self.pool_ids, "pool").position(pool_id),
                                  IdIndex(self.test_ids, "test").position(test_id)])

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)``, each (n_pool, n_test): the interval of every effect."""
        return _require(self.ensemble).bounds(self.effects)

    def frame(self) -> pd.DataFrame:
        """Long table ``test, pool, effect, rank`` (rank 1 = most helpful for that test), present examples only.

        With intervals also ``low, high, straddles_zero``.
        """
        rows = np.flatnonzero(self.present)
        sub = self.effects[rows]
        order = np.argsort(-sub, axis=0, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(1, rows.size + 1)[:, None], axis=0)
        n_test = sub.shape[1]
        columns = {
            "test": np.repeat(np.asarray(self.test_ids, dtype=object), rows.size),
            "pool": np.tile(np.asarray(self.pool_ids, dtype=object)[rows], n_test),
            "effect": sub.T.ravel(),
            "rank": ranks.T.ravel(),
        }
        if self.ensemble is not None:
            low, high = self.interval()
            columns.update(low=low[rows].T.ravel(), high=high[rows].T.ravel(),
                           straddles_zero=straddles_zero(low[rows], high[rows]).T.ravel())
        return pd.DataFrame(columns)

    def scores(self, tests: Sequence | None = None) -> np.ndarray:
        """(n_pool,) effect averaged over the test ids ``tests`` (default all)."""
        return self.effects[:, self._test_columns(tests)].mean(axis=1)

    def top(self, k: int = 10, tests: Sequence | None = None) -> pd.DataFrame:
        """The k most helpful (effect > 0) and most harmful (effect < 0) present examples, mean over ``tests``.

        ``tests`` are external test ids (default all); an unknown id is an error naming it. With intervals also
        ``low, high, straddles_zero`` of the mean effect (from every member's mean).
        """
        score = self.scores(tests)
        rows = np.flatnonzero(self.present)
        order = rows[np.argsort(-score[rows], kind="stable")]
        helps = order[score[order] > 0][:k]
        hurts = order[::-1][score[order[::-1]] < 0][:k]
        pick = np.concatenate([helps, hurts])
        kind = ["helps"] * helps.size + ["hurts"] * hurts.size
        columns = {"pool": np.asarray(self.pool_ids, dtype=object)[pick], "effect": score[pick], "role": kind}
        if self.ensemble is not None:
            members = self.ensemble.members[:, pick][:, :, self._test_columns(tests)].mean(axis=2)
            low, high = self.ensemble.bounds(score[pick], members)
            columns.update(low=low, high=high, straddles_zero=straddles_zero(low, high))
        return pd.DataFrame(columns)


def loo_effects(
    simulator: Simulator,
    base: Run | Curriculum,
    initial_losses: np.ndarray | None = None,
    learning_rates: np.ndarray | None = None,
    step: int | None = None,
    intervals: Bootstrap | None = None,
) -> LooEffects:
    """Effect on every test loss (at ``step``, default the final one) of removing each pool example.

    Exact and fast for simulators tagged ``exact_loo`` (the linear family and the gradient simulators: no
    re-simulation, the loss floor is not applied); others re-simulate the leave-one-out curricula in batches.
    With ``intervals`` (a :class:`~simfluence.uncertainty.Bootstrap` fitted around ``simulator``) every member
    computes the same effects, kept as (n_members, n_pool, n_test), and the tables carry their intervals.
    """
    resolved = resolve_base(simulator, base, initial_losses, learning_rates)
    _check_intervals(intervals, simulator)
    args = (resolved.curriculum, resolved.initial_losses, resolved.learning_rates, step)
    effects = simulator.leave_one_out(*args)
    present = resolved.curriculum.counts(simulator.n_pool_) > 0
    ensemble = None if intervals is None else intervals.ensemble(intervals.leave_one_out(*args))
    return LooEffects(effects, list(simulator.pool_ids_), list(simulator.test_ids_), present, ensemble)


def influence_table(
    simulator: Simulator,
    runset: RunSet,
    run: int | str,
    tests: Sequence | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    """Which pool examples of a run helped or hurt each test example, under any fitted simulator.

    The score of pool example i for test z is its leave-one-out effect on z's final loss along the run's
    curriculum (``loo_effects``): the same definition for learned and gradient-based simulators, in loss
    units. Positive = a *proponent* (removing it would raise the loss), negative = an *opponent*.

    Parameters
    ----------
    tests : external test ids to keep (default all).
    top : keep only the k strongest proponents and k strongest opponents of each test.

    Returns
    -------
    DataFrame ``test, pool, score, rank, role`` with external ids; rank 1 = strongest proponent per test.
    """
    frame = loo_effects(simulator, runset[run]).frame().rename(columns={"effect": "score"})
    if tests is not None:
        keep = simulator.test_index.ids_of(simulator.test_index.positions(tests))
        frame = frame[frame["test"].isin(keep)]
    frame["role"] = np.where(frame["score"] > 0, "proponent", np.where(frame["score"] < 0, "opponent", "neutral"))
    if top is not None:
        from_bottom = frame.groupby("test")["rank"].transform("max") - frame["rank"] + 1
        frame = frame[(frame["rank"] <= top) | (from_bottom <= top)]
    return frame.sort_values(["test", "rank"], kind="stable").reset_index(drop=True)


def warn_unseen_batch_sizes(simulator: Simulator, curricula: Sequence[Curriculum], names: Sequence[str]) -> None:
    """An :class:`~simfluence.errors.ExtrapolationWarning` for the first curriculum with a batch far outside the
    sizes of the simulator's training runs (``batch_size_range_``; simulators that do not record it are not checked).

    Far: larger than ``BATCH_SIZE_FACTOR`` times the largest training batch, or not empty and smaller than the
    smallest divided by it (a step emptied by removals is what a removal means, and is not warned about). The linear
    family sums example effects over a batch (the paper's form), so its predictions for such batches extrapolate
    beyond anything it was fitted on.
    """
    seen = getattr(simulator, "batch_size_range_", None)
    if not (isinstance(seen, list | tuple) and len(seen) == 2 and all(isinstance(size, int) for size in seen)):
        return  # not recorded (other simulators, older model files)
    smallest, largest = seen
    for name, curriculum in zip(names, curricula, strict=True):
        sizes = curriculum.batch_sizes
        outside = np.flatnonzero((sizes > BATCH_SIZE_FACTOR * largest)
                                 | ((sizes > 0) & (sizes < smallest / BATCH_SIZE_FACTOR)))
        if outside.size:
            step = int(outside[0])
            warnings.warn(
                f"{name!r}: step {step + 1} has a batch of {int(sizes[step])} examples; the training runs' batches "
                f"had {smallest}..{largest} ({outside.size} step(s) beyond a factor {BATCH_SIZE_FACTOR:g}), so the "
                "prediction extrapolates (edits that move examples keep batch sizes; duplicate, remove and keep "
                "do not)", ExtrapolationWarning, stacklevel=3)
            return
