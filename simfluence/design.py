"""From logged runs to the shared sparse design of the Simfluence regression.

Every simulator in the Simfluence-Linear family predicts a step's loss change from *step features*:
one row per training step, with the (optionally weighted) count of each pool example in the step's
batch, followed by optional one-hot step columns for terms shared across runs::

    features[t] = [ w_t * counts(c_t) (n_pool columns) | onehot(t) (n_step_terms columns) ]

``w_t`` is 1 in the paper's form; it becomes ``lr_t / lr_ref`` for learning-rate-scaled effects and
``1 / |c_t|`` for batch-mean effects. The same rows serve fitting (teacher-forced transitions between
consecutive logged steps, summed over the steps in between) and simulation (one row per step of each
curriculum), so the two can never disagree about what a step's features are.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog import Run, RunSet


@dataclass(frozen=True)
class FeatureSpec:
    """How a step becomes a feature row.

    Attributes
    ----------
    n_pool : pool size (number of example columns).
    n_step_terms : number of one-hot step columns (0 = no step terms); steps beyond it share the last.
    lr_reference : if set, example columns are scaled by ``lr_t / lr_reference``.
    batch_mean : divide example columns by the batch size (mean instead of the paper's sum).
    """

    n_pool: int
    n_step_terms: int = 0
    lr_reference: float | None = None
    batch_mean: bool = False

    @property
    def n_features(self) -> int:
        return self.n_pool + self.n_step_terms


def step_features(
    curricula: Sequence[Curriculum],
    spec: FeatureSpec,
    learning_rates: Sequence[np.ndarray] | None = None,
    n_steps: int | None = None,
) -> sp.csr_matrix:
    """Feature rows of every step of every curriculum.

    Parameters
    ----------
    curricula : the curricula (pool ids < spec.n_pool).
    spec : feature layout.
    learning_rates : per curriculum, (n_steps_c,) learning rate of each step; needed iff
        ``spec.lr_reference`` is set.
    n_steps : rows per curriculum (default: the longest); shorter curricula get empty rows after their end.

    Returns
    -------
    (n_curricula * n_steps, spec.n_features) csr; row ``c * n_steps + t - 1`` is curriculum c's step t.
    """
    lengths = np.array([cur.n_steps for cur in curricula], dtype=np.int64)
    n_steps = int(lengths.max(initial=0)) if n_steps is None else int(n_steps)
    if lengths.size and lengths.max() > n_steps:
        raise SimfluenceError(f"a curriculum has {int(lengths.max())} steps, more than n_steps={n_steps}")
    ids_list, rows_list, weights_list = [], [], []
    step_rows, step_cols = [], []
    for index, cur in enumerate(curricula):
        if cur.ids.size and cur.ids.max() >= spec.n_pool:
            raise SimfluenceError(
                f"curriculum {index} uses pool id {int(cur.ids.max())}, outside 0..{spec.n_pool - 1}"
            )
        entry_step = cur.step_of_entries()  # 1-based
        weight = np.ones(cur.ids.size)
        if spec.lr_reference is not None:
            if learning_rates is None:
                raise SimfluenceError("learning-rate-scaled features need the learning rate of every step")
            lrs = np.asarray(learning_rates[index], dtype=np.float64)
            if lrs.shape != (cur.n_steps,) or not np.isfinite(lrs).all():
                raise SimfluenceError(
                    f"curriculum {index}: need {cur.n_steps} finite learning rates, got shape {lrs.shape}"
                    + ("" if lrs.shape != (cur.n_steps,) else " with NaN (learning rate not logged?)")
                )
            weight = weight * (lrs[entry_step - 1] / spec.lr_reference)
        if spec.batch_mean:
            sizes = cur.batch_sizes
            weight = weight / sizes[entry_step - 1]
        ids_list.append(cur.ids)
        rows_list.append(index * n_steps + entry_step - 1)
        weights_list.append(weight)
        if spec.n_step_terms:
            steps = np.arange(1, cur.n_steps + 1)
            step_rows.append(index * n_steps + steps - 1)
            step_cols.append(spec.n_pool + np.minimum(steps, spec.n_step_terms) - 1)
    rows = np.concatenate(rows_list + step_rows) if rows_list else np.zeros(0, np.int64)
    cols = np.concatenate(ids_list + step_cols) if ids_list else np.zeros(0, np.int64)
    vals = np.concatenate(weights_list + [np.ones(r.size) for r in step_rows]) if rows_list else np.zeros(0)
    shape = (len(curricula) * n_steps, spec.n_features)
    return sp.csr_matrix((vals, (rows, cols)), shape=shape)  # duplicates are summed


def mean_lr_schedule(runs: Sequence[Run]) -> np.ndarray:
    """(max n_steps,) mean learning rate of each step over the runs that logged it (NaN where none did)."""
    horizon = max(run.n_steps for run in runs)
    schedule = np.full((len(runs), horizon), np.nan)
    for row, run in enumerate(runs):  # a loop over runs, each one row
        schedule[row, : run.n_steps] = run.learning_rates
    known = np.isfinite(schedule)
    counts = known.sum(axis=0)
    return np.divide(np.where(known, schedule, 0.0).sum(axis=0), counts, out=np.full(horizon, np.nan),
                     where=counts > 0)


def schedule_for(schedule: np.ndarray, n_steps: int) -> np.ndarray:
    """(n_steps,) learning rates of a curriculum from a per-step schedule; steps past its end repeat the last."""
    return schedule[np.minimum(np.arange(n_steps), schedule.size - 1)]


@dataclass
class Transitions:
    """Teacher-forced transitions between consecutive logged steps of many runs.

    Attributes
    ----------
    features : (n_transitions, n_features) csr, the sum of the step features of the steps in between.
    prev, next : (n_transitions, n_test) float64 losses at the start and end of each transition.
    run : (n_transitions,) index of the run (within the runs used) of each transition.
    start_step, end_step : (n_transitions,) logged steps at which each transition starts and ends.
    """

    features: sp.csr_matrix
    prev: np.ndarray
    next: np.ndarray
    run: np.ndarray
    start_step: np.ndarray
    end_step: np.ndarray

    @property
    def n_transitions(self) -> int:
        return int(self.prev.shape[0])

    def previous_change(self) -> np.ndarray:
        """(n_transitions, n_test) loss change of the preceding transition of the same run (0 for a run's first).

        Needed by momentum-aware simulators, whose velocity after step t-1 is the observed change
        ``L_{t-1} - L_{t-2}`` under teacher forcing.
        """
        change = self.next - self.prev
        previous = np.zeros_like(change)
        follows = np.zeros(self.n_transitions, dtype=bool)
        follows[1:] = (self.run[1:] == self.run[:-1]) & (self.start_step[1:] == self.end_step[:-1])
        previous[follows] = change[np.flatnonzero(follows) - 1]
        return previous


def build_transitions(runset: RunSet, spec: FeatureSpec, runs: Sequence[int] | None = None) -> Transitions:
    """Collect every transition (logged step s -> next logged step s') of the chosen runs.

    Losses logged every step give one transition per step; sparser logging gives transitions whose
    features sum the batches in between (exact for additive models, an approximation for multiplicative
    ones, documented in the simulators).
    """
    chosen = [runset[i] for i in (range(len(runset)) if runs is None else runs)]
    if not chosen:
        raise SimfluenceError("no runs to fit on")
    max_steps = max(run.n_steps for run in chosen)
    learning_rates = [run.learning_rates for run in chosen] if spec.lr_reference is not None else None
    if learning_rates is not None:
        for run, lrs in zip(chosen, learning_rates, strict=True):
            if not np.isfinite(lrs).all():
                step = int(np.flatnonzero(~np.isfinite(lrs))[0]) + 1
                raise SimfluenceError(
                    f"run {run.name!r}: learning rate of step {step} was not logged; "
                    "learning-rate-scaled simulators need it"
                )
    rows = step_features([run.curriculum for run in chosen], spec, learning_rates, n_steps=max_steps)
    agg_rows, agg_cols, prev, nxt, run_index, start_step, end_step = [], [], [], [], [], [], []
    n_trans = 0
    for index, run in enumerate(chosen):
        steps = run.logged_steps
        if len(steps) < 2:
            continue
        losses = np.asarray(run.losses, dtype=np.float64)
        starts, ends = steps[:-1], steps[1:]
        gaps = ends - starts
        # transition k covers steps starts[k]+1 .. ends[k]
        trans_of_step = np.repeat(np.arange(len(gaps)), gaps)
        first_of_trans = np.repeat(np.cumsum(gaps) - gaps, gaps)
        covered = np.repeat(starts, gaps) + np.arange(int(gaps.sum())) - first_of_trans + 1
        agg_rows.append(n_trans + trans_of_step)
        agg_cols.append(index * max_steps + covered - 1)
        prev.append(losses[:-1])
        nxt.append(losses[1:])
        run_index.append(np.full(len(gaps), index))
        start_step.append(starts)
        end_step.append(ends)
        n_trans += len(gaps)
    if n_trans == 0:
        raise SimfluenceError("the runs to fit on have no transitions (each needs at least two logged steps)")
    agg_rows_arr = np.concatenate(agg_rows)
    aggregate = sp.csr_matrix(
        (np.ones(agg_rows_arr.size), (agg_rows_arr, np.concatenate(agg_cols))),
        shape=(n_trans, rows.shape[0]),
    )
    return Transitions(
        features=(aggregate @ rows).tocsr(),
        prev=np.concatenate(prev),
        next=np.concatenate(nxt),
        run=np.concatenate(run_index),
        start_step=np.concatenate(start_step),
        end_step=np.concatenate(end_step),
    )
