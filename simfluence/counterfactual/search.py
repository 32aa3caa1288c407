"""Curriculum searches: which curriculum would lower (or raise) chosen test examples' final loss?

- :func:`search_curriculum`: greedily drop examples (or shrink to a subset), with the fast leave-one-out of
  the simulator as the inner step;
- :func:`search_order`: the same by reordering (moving an example's occurrences to the start or the end, batch
  sizes kept: :func:`~simfluence.counterfactual.edits.move_all`), evaluating all candidate moves of a round in
  one batched simulation.

Both take a base as the queries do (:func:`~simfluence.counterfactual.queries.resolve_base`) and ``intervals=``
(a :class:`~simfluence.uncertainty.Bootstrap` fitted around the simulator) for the interval of the change found.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from simfluence.counterfactual.edits import move_all
from simfluence.counterfactual.queries import (
    Base,
    _check_intervals,
    _require,
    resolve_base,
    warn_unseen_batch_sizes,
)
from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog import Run
from simfluence.simulators import Simulator
from simfluence.uncertainty import Bootstrap, Ensemble, straddles_zero


class _ObjectiveRounds:
    """What both searches share: ``objective`` per round (round 0 = the base) and, with intervals, the
    ``ensemble`` that bounds the final change."""

    objective: np.ndarray
    ensemble: Ensemble | None

    @property
    def predicted_change(self) -> float:
        return float(self.objective[-1] - self.objective[0])

    def change_interval(self) -> tuple[float, float]:
        """``(low, high)``: the interval of :attr:`predicted_change`."""
        return _final_change_interval(self.objective, _require(self.ensemble))


@dataclass
class SearchResult(_ObjectiveRounds):
    """Outcome of :func:`search_curriculum`.

    Attributes
    ----------
    curriculum : the curriculum found (pool positions).
    removed : external pool ids removed, in the order chosen.
    objective : (n_rounds + 1,) predicted mean final loss of the target tests after each round.
    n_removed : (n_rounds + 1,) number of examples removed after each round (0 first).
    ensemble : with intervals, every member's objective for the curriculum of each round (n_members,
        n_rounds + 1) and their interval rule.
    """

    curriculum: Curriculum
    removed: list
    objective: np.ndarray
    n_removed: np.ndarray | None = None
    ensemble: Ensemble | None = None

    def frame(self) -> pd.DataFrame:
        """One row per round: ``round, n_removed, objective, change`` (against round 0).

        With intervals also ``change_low, change_high, straddles_zero``.
        """
        extra = {} if self.n_removed is None else {"n_removed": np.asarray(self.n_removed)}
        return _rounds_frame(self.objective, self.ensemble, **extra)


def _member_objectives(
    intervals: Bootstrap, curricula: list[Curriculum], resolved: Base, columns: np.ndarray
) -> Ensemble:
    """Every member's mean final loss of the targets for each curriculum: (n_members, n_curricula)."""
    rates = None if resolved.learning_rates is None else [resolved.learning_rates] * len(curricula)
    members = intervals.simulate(curricula, resolved.initial_losses, rates)
    return intervals.ensemble(members[:, :, -1][:, :, columns].mean(axis=2))


def _final_change_interval(objective: np.ndarray, ensemble: Ensemble) -> tuple[float, float]:
    members = ensemble.members
    low, high = ensemble.bounds(np.array(objective[-1] - objective[0]), members[:, -1] - members[:, 0])
    return float(low), float(high)


def _rounds_frame(objective: np.ndarray, ensemble: Ensemble | None, **columns) -> pd.DataFrame:
    """``round, <columns>, objective, change`` (+ ``change_low, change_high, straddles_zero``) per round."""
    table = {"round": np.arange(objective.size), **columns, "objective": objective,
             "change": objective - objective[0]}
    if ensemble is not None:
        members = ensemble.members
        low, high = ensemble.bounds(table["change"], members - members[:, :1])
        table.update(change_low=low, change_high=high, straddles_zero=straddles_zero(low, high))
    return pd.DataFrame(table)


def _targets(simulator: Simulator, tests: Sequence) -> np.ndarray:
    columns = simulator.test_index.positions(tests)
    if columns.size == 0:
        raise SimfluenceError("search needs at least one target test example")
    return columns


def search_curriculum(
    simulator: Simulator,
    base: Run | Curriculum,
    tests: Sequence,
    drop: int | None = None,
    subset_size: int | None = None,
    maximize: bool = False,
    per_round: int = 1,
    initial_losses: np.ndarray | None = None,
    learning_rates: np.ndarray | None = None,
    intervals: Bootstrap | None = None,
) -> SearchResult:
    """Greedily remove pool examples to lower (``maximize=False``) or raise the targets' mean final loss.

    ``tests`` are external test ids. Exactly one budget: ``drop`` (remove at most that many examples; stops
    early when no removal helps) or ``subset_size`` (keep that many distinct examples of the base curriculum).
    Each round ranks every present example by its leave-one-out effect on the objective (fast and exact for
    linear simulators) and removes the best ``per_round``; the objective is then re-simulated, so the reported
    gains are the simulator's predictions for the curricula actually found.

    With ``intervals`` (a :class:`~simfluence.uncertainty.Bootstrap` fitted around ``simulator``) every member
    predicts the curriculum of each round, giving an interval of the change; it does not include the optimism of
    having chosen the removals that looked best to ``simulator``.
    """
    resolved = resolve_base(simulator, base, initial_losses, learning_rates)
    _check_intervals(intervals, simulator)
    columns = _targets(simulator, tests)
    if (drop is None) == (subset_size is None):
        raise SimfluenceError("give exactly one budget: drop=k or subset_size=m")
    sign = -1.0 if maximize else 1.0
    lrs = None if resolved.learning_rates is None else [resolved.learning_rates]

    def objective(cur: Curriculum) -> float:
        return float(simulator.simulate(cur, resolved.initial_losses, lrs)[0, -1, columns].mean())

    current = resolved.curriculum
    present_count = int((current.counts(simulator.n_pool_) > 0).sum())
    budget = drop if drop is not None else present_count - int(subset_size)
    if budget < 0 or (subset_size is not None and subset_size < 1):
        raise SimfluenceError(f"subset_size must lie in 1..{present_count} (the examples the base curriculum uses)")
    removed: list[int] = []
    values = [objective(current)]
    visited, n_removed = [current], [0]
    while len(removed) < budget:
        effects = simulator.leave_one_out(current, resolved.initial_losses, resolved.learning_rates)
        gain = sign * effects[:, columns].mean(axis=1)  # objective change if removed; want negative
        candidates = np.flatnonzero(current.counts(simulator.n_pool_) > 0)
        if candidates.size == 0:
            break
        order = candidates[np.argsort(gain[candidates], kind="stable")]
        take = order[: min(per_round, budget - len(removed))]
        if drop is not None:
            take = take[gain[take] < 0]  # a drop budget only removes what helps the objective
            if take.size == 0:
                break
        current = current.remove(take.tolist())
        removed.extend(int(i) for i in take)
        values.append(objective(current))
        visited.append(current)
        n_removed.append(len(removed))
    warn_unseen_batch_sizes(simulator, [current], ["the curriculum found"])
    ensemble = None if intervals is None else _member_objectives(intervals, visited, resolved, columns)
    return SearchResult(current, simulator.pool_index.ids_of(removed), np.array(values), np.array(n_removed),
                        ensemble)


@dataclass
class ReorderResult(_ObjectiveRounds):
    """Outcome of :func:`search_order`.

    Attributes
    ----------
    curriculum : the reordered curriculum (same examples, same counts).
    moves : ``(pool id, "start" | "end")`` in the order chosen.
    objective : (n_moves + 1,) predicted mean final loss of the targets after each move.
    ensemble : with intervals, every member's objective after each move (n_members, n_moves + 1) and their
        interval rule.
    """

    curriculum: Curriculum
    moves: list[tuple]
    objective: np.ndarray
    ensemble: Ensemble | None = None

    def frame(self) -> pd.DataFrame:
        """One row per move: ``round, move, objective, change`` (against the base; round 0 is the base).

        With intervals also ``change_low, change_high, straddles_zero``.
        """
        moves = [""] + [f"{pool_id} -> {where}" for pool_id, where in self.moves]
        return _rounds_frame(self.objective, self.ensemble, move=np.asarray(moves, dtype=object))


def search_order(
    simulator: Simulator,
    base: Run | Curriculum,
    tests: Sequence,
    moves: int = 5,
    candidates: int = 20,
    maximize: bool = False,
    initial_losses: np.ndarray | None = None,
    learning_rates: np.ndarray | None = None,
    intervals: Bootstrap | None = None,
) -> ReorderResult:
    """Greedy reordering: move one example's occurrences to the first or last step per round.

    ``tests`` are external test ids. Each round takes the ``candidates`` present examples with the largest
    leave-one-out effect on the targets, builds two curricula per candidate (all its occurrences moved to the
    first or the last entries, batch sizes kept: :func:`move_all`), simulates them all in one batched call and keeps
    the best, if it improves the objective. The set of examples (and how often each is seen) never changes — only
    when they are seen.
    ``intervals`` as in :func:`search_curriculum`.
    """
    resolved = resolve_base(simulator, base, initial_losses, learning_rates)
    _check_intervals(intervals, simulator)
    columns = _targets(simulator, tests)
    sign = -1.0 if maximize else 1.0

    def objectives(curricula: list[Curriculum]) -> np.ndarray:
        rates = None if resolved.learning_rates is None else [resolved.learning_rates] * len(curricula)
        return simulator.simulate(curricula, resolved.initial_losses, rates)[:, -1, columns].mean(axis=1)

    current, chosen = resolved.curriculum, []
    values = [float(objectives([current])[0])]
    visited = [current]
    moved: set[int] = set()
    for _ in range(moves):
        effects = simulator.leave_one_out(current, resolved.initial_losses, resolved.learning_rates)
        strength = np.abs(effects[:, columns].mean(axis=1))
        pool = [int(i) for i in np.flatnonzero(current.counts(simulator.n_pool_) > 0) if int(i) not in moved]
        if not pool:
            break
        picks = sorted(pool, key=lambda i: -strength[i])[:candidates]
        options = [(i, where) for i in picks for where in ("start", "end")]
        edited = [move_all(current, i, 1 if where == "start" else current.n_steps) for i, where in options]
        scores = objectives(edited)
        best = int(np.argmin(sign * scores))
        if sign * scores[best] >= sign * values[-1]:
            break  # no single move improves the objective
        current = edited[best]
        chosen.append(options[best])
        moved.add(options[best][0])
        values.append(float(scores[best]))
        visited.append(current)
    named = [(simulator.pool_ids_[i], where) for i, where in chosen]
    ensemble = None if intervals is None else _member_objectives(intervals, visited, resolved, columns)
    return ReorderResult(current, named, np.array(values), ensemble)
