"""Counterfactual curricula: what would the model have done with a different curriculum?

Three questions, all answered by a fitted simulator, batched over curricula and test examples:

- ``whatif``: edit a base curriculum (remove, duplicate, move, swap, reverse, keep a subset, replace) in
  any number of named scenarios and predict every test example's trajectory under each, with the
  change against the base;
- ``loo_effects``: the effect of removing each pool example on every test example's loss, for all pool
  examples at once (exact and fast for the Simfluence-Linear family, see
  :mod:`simfluence.simulators.loo`; batched re-simulation for other simulators);
- ``influence_table``: the same leave-one-out effects as a tidy proponents / opponents table, for any
  simulator (learned or gradient-based);
- ``search_curriculum``: greedily drop examples (or shrink to a subset) to lower — or raise — the mean
  final loss of chosen test examples, with the fast leave-one-out as the inner step; ``search_order``
  does the same by reordering (moving an example's occurrences to the start or the end), evaluating all
  candidate moves of a round in one batched simulation.

Every edit that moves examples keeps every batch's size (:func:`move_all`): training used batches of a fixed
size, and a simulator fitted on them knows nothing of a batch of 100. A question about curricula whose batches
are far outside the sizes seen in training (more than ``BATCH_SIZE_FACTOR`` times the largest, or not empty and
less than the smallest divided by it) is answered with an :class:`~simfluence.errors.ExtrapolationWarning`.

How sure is an answer? ``whatif``, ``loo_effects`` and both searches take ``intervals=``, a
:class:`~simfluence.uncertainty.Bootstrap` fitted around the simulator: its members answer the same question,
the results keep their answers (``ensemble``) and the tables gain the interval of each change or effect and
``straddles_zero``, set where the interval contains zero (the sign of the answer is not sure).

Pool and test examples are named by their **external ids** everywhere here (the ids of the run set the
simulator was fitted on, ``simulator.pool_ids_`` / ``simulator.test_ids_``), as on the command line; results
carry external ids too. A base is a logged :class:`~simfluence.runlog.Run` (its curriculum, initial losses and
learning rates are used) or a :class:`~simfluence.curriculum.Curriculum` of pool positions with explicit
initial losses. An edit naming an example that the base curriculum does not contain is an error, never a
silent zero change.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, ExtrapolationWarning, SimfluenceError
from simfluence.ids import IdIndex
from simfluence.runlog import Run, RunSet
from simfluence.simulators import Simulator
from simfluence.uncertainty import Bootstrap, Ensemble, straddles_zero

_EDIT_KINDS = ("remove", "keep", "duplicate", "move", "swap", "reverse", "replace", "truncate")


_ID_EDITS = ("remove", "keep", "duplicate", "move", "replace")  # edits whose arguments name pool examples
BATCH_SIZE_FACTOR = 2.0  # batches more than this factor outside the training runs' sizes make a query warn


@dataclass(frozen=True)
class Edit:
    """One pure edit of a curriculum, naming pool examples by their external ids.

    Build them with :func:`parse_edit` (``"remove:12,40"``, ``"duplicate:5@10"``, ``"move:5@100"``,
    ``"swap:3,7"``, ``"reverse"``, ``"keep:1,2,3"``, ``"replace:3>9"``, ``"truncate:50"``; ids are pool ids,
    numbers after ``@`` and the arguments of swap / truncate are steps) or directly, e.g.
    ``Edit("remove", (12, 40))``. :meth:`apply` resolves the ids with the pool ids of a run set or fitted
    simulator.

    What each edit does:

    - ``remove:ID,...`` drops every occurrence (those batches shrink); ``keep:ID,...`` drops every other example;
    - ``duplicate:ID`` doubles every occurrence in place; ``duplicate:ID@T`` adds one occurrence to step T's batch
      (it grows by one);
    - ``move:ID@T`` moves **every** occurrence of ID to step T, ``move:ID#K@T`` only its K-th occurrence (K = 1,
      2, ... in curriculum order); ``Edit("move", (ID, T))`` / ``Edit("move", (ID, T, K))``. Moves keep every
      batch's size (:func:`move_all`): the moved occurrences fill step T's batch from its first slot (and the
      following steps when there are more of them than it holds; the last entries of the curriculum when even
      those run out), and the entries in between shift over by one slot per moved occurrence;
    - ``swap:A,B`` exchanges two steps' batches, ``reverse`` reverses their order, ``truncate:T`` keeps the first T
      steps, ``replace:OLD>NEW`` puts NEW wherever OLD was.
    """

    kind: str
    args: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in _EDIT_KINDS:
            raise CurriculumError(f"unknown edit {self.kind!r}; choose from {', '.join(_EDIT_KINDS)}")

    def apply(self, curriculum: Curriculum, pool: IdIndex) -> Curriculum:
        """The edited copy of ``curriculum`` (pool positions), resolving example ids with ``pool``.

        An example that must occur in the curriculum (remove, keep, move, replace's old id, duplicate without a
        step) and does not is a ``CurriculumError`` naming it.
        """
        args = self.args
        if self.kind in ("swap", "reverse", "truncate"):
            if self.kind == "swap":
                return curriculum.swap_batches(args[0], args[1])
            return curriculum.reverse() if self.kind == "reverse" else curriculum.truncate(args[0])
        present = curriculum.counts(len(pool)) > 0

        def occurring(example_id) -> int:
            position = pool.position(example_id)
            if not present[position]:
                raise CurriculumError(f"{self}: pool id {pool.ids[position]!r} does not occur in the base curriculum")
            return position

        if self.kind == "remove":
            return curriculum.remove([occurring(i) for i in args])
        if self.kind == "keep":
            return curriculum.keep_only([occurring(i) for i in args])
        if self.kind == "duplicate":
            if len(args) > 1:
                return curriculum.duplicate(pool.position(args[0]), step=args[1])
            return curriculum.duplicate(occurring(args[0]))
        if self.kind == "move":
            example = occurring(args[0])
            entries = np.flatnonzero(curriculum.ids == example)
            if len(args) > 2:
                occurrence = int(args[2])
                if not 1 <= occurrence <= entries.size:
                    raise CurriculumError(f"{self}: pool id {args[0]!r} occurs {entries.size} times in the base "
                                          f"curriculum, there is no occurrence {occurrence}")
                entries = entries[occurrence - 1: occurrence]
            return _move_entries(curriculum, entries, args[1])
        return curriculum.replace(occurring(args[0]), pool.position(args[1]))

    def __str__(self) -> str:
        if self.kind in ("remove", "keep", "swap"):
            return f"{self.kind}:{','.join(map(str, self.args))}"
        if self.kind == "move" and len(self.args) > 2:
            return f"move:{self.args[0]}#{self.args[2]}@{self.args[1]}"
        if self.kind in ("duplicate", "move"):
            return f"{self.kind}:{self.args[0]}" + (f"@{self.args[1]}" if len(self.args) > 1 else "")
        if self.kind == "replace":
            return f"replace:{self.args[0]}>{self.args[1]}"
        if self.kind == "truncate":
            return f"truncate:{self.args[0]}"
        return self.kind


def parse_edit(text: str) -> Edit:
    """Parse ``kind[:arguments]`` (see :class:`Edit`); example ids stay text, steps become ints."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip()
    try:
        if kind in ("remove", "keep"):
            args = tuple(part.strip() for part in rest.split(",") if part.strip())
            if not args:
                raise ValueError
        elif kind == "swap":
            args = tuple(int(part) for part in rest.split(",") if part.strip())
            if len(args) != 2:
                raise ValueError
        elif kind in ("duplicate", "move"):
            example, _, step = rest.partition("@")
            occurrence = ()
            if kind == "move" and "#" in example:
                example, _, number = example.partition("#")
                occurrence = (int(number),)
            if not example.strip():
                raise ValueError
            args = (example.strip(),) + ((int(step),) if step.strip() else ())
            if kind == "move" and len(args) != 2:
                raise ValueError
            args += occurrence
        elif kind == "replace":
            old, _, new = rest.partition(">")
            if not old.strip() or not new.strip():
                raise ValueError
            args = (old.strip(), new.strip())
        elif kind == "truncate":
            args = (int(rest),)
        elif kind == "reverse" and not rest.strip():
            args = ()
        else:
            raise CurriculumError(f"unknown edit {text!r}; choose from {', '.join(_EDIT_KINDS)}")
    except ValueError:
        raise CurriculumError(f"cannot parse edit {text!r} (examples: remove:12,40 duplicate:5@10 move:5@100 "
                              "move:5#2@100 swap:3,7 reverse keep:1,2 replace:3>9 truncate:50)") from None
    return Edit(kind, args)


def parse_scenario(text: str) -> list[Edit]:
    """Edits separated by ``;`` (``"remove:12,40;reverse"``)."""
    edits = [parse_edit(part) for part in text.split(";") if part.strip()]
    if not edits:
        raise CurriculumError(f"scenario {text!r} has no edits")
    return edits


def apply_edits(curriculum: Curriculum, edits: Sequence[Edit | str], pool: IdIndex) -> Curriculum:
    """Apply edits in order (strings are parsed with :func:`parse_edit`), resolving ids with ``pool``."""
    for edit in edits:
        curriculum = (parse_edit(edit) if isinstance(edit, str) else edit).apply(curriculum, pool)
    return curriculum


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
        if learning_rates is None and np.isfinite(base.learning_rates).all():
            learning_rates = base.learning_rates
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


@dataclass
class SearchResult:
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

    @property
    def predicted_change(self) -> float:
        return float(self.objective[-1] - self.objective[0])

    def change_interval(self) -> tuple[float, float]:
        """``(low, high)``: the interval of :attr:`predicted_change`."""
        return _final_change_interval(self.objective, _require(self.ensemble))

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


def move_all(curriculum: Curriculum, examples: int | Sequence[int], to_step: int) -> Curriculum:
    """Move every occurrence of the pool positions ``examples`` to ``to_step`` (1-based), keeping every batch's size.

    The moved occurrences are taken out of the sequence of all entries (step by step, each batch in its order) and
    put back, in their order, as one block that starts at the first slot of ``to_step``'s batch, or that ends at the
    last slot of the curriculum when it would not fit after that slot; the sequence is then cut into batches of the
    original sizes. So the examples and their counts are unchanged, every batch keeps its size, the other entries
    keep their order, and each moved occurrence shifts the entries between its old and new place by one slot (one
    entry crosses each batch boundary in between). ``to_step = n_steps`` moves them to the end: with batches of 8,
    123 occurrences fill the last 16 steps (not one batch of 123); ``to_step = 1`` moves them to the start.
    """
    examples = np.atleast_1d(np.asarray(examples, dtype=np.int64))
    return _move_entries(curriculum, np.flatnonzero(np.isin(curriculum.ids, examples)), to_step)


def _move_entries(curriculum: Curriculum, entries: np.ndarray, to_step: int) -> Curriculum:
    """The entries at indices ``entries`` of ``curriculum.ids`` moved to ``to_step`` as :func:`move_all` says."""
    to_step = int(to_step)
    if not 1 <= to_step <= curriculum.n_steps:
        raise CurriculumError(f"cannot move to step {to_step}: step {to_step} outside 1..{curriculum.n_steps}")
    moved = np.zeros(curriculum.ids.size, dtype=bool)
    moved[entries] = True
    rest = curriculum.ids[~moved]
    start = min(int(curriculum.offsets[to_step - 1]), rest.size)
    ids = np.concatenate([rest[:start], curriculum.ids[moved], rest[start:]])
    return Curriculum(curriculum.offsets, ids, curriculum.n_pool)


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


@dataclass
class ReorderResult:
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

    @property
    def predicted_change(self) -> float:
        return float(self.objective[-1] - self.objective[0])

    def change_interval(self) -> tuple[float, float]:
        """``(low, high)``: the interval of :attr:`predicted_change`."""
        return _final_change_interval(self.objective, _require(self.ensemble))

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
