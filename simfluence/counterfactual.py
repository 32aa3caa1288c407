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

Pool and test examples are addressed by internal position here; the CLI maps external ids.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators import Simulator
from simfluence.simulators.linear import SimfluenceLinear
from simfluence.simulators.loo import linear_loo

_EDIT_KINDS = ("remove", "keep", "duplicate", "move", "swap", "reverse", "replace", "truncate")


@dataclass(frozen=True)
class Edit:
    """One pure edit of a curriculum; ``apply`` returns the edited copy.

    Build them with :func:`parse_edit` (``"remove:12,40"``, ``"duplicate:5@10"``, ``"move:5@100"``,
    ``"swap:3,7"``, ``"reverse"``, ``"keep:1,2,3"``, ``"replace:3>9"``, ``"truncate:50"``) or directly,
    e.g. ``Edit("remove", (12, 40))``.
    """

    kind: str
    args: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in _EDIT_KINDS:
            raise CurriculumError(f"unknown edit {self.kind!r}; choose from {', '.join(_EDIT_KINDS)}")

    def apply(self, curriculum: Curriculum) -> Curriculum:
        args = self.args
        if self.kind == "remove":
            return curriculum.remove(list(args))
        if self.kind == "keep":
            return curriculum.keep_only(list(args))
        if self.kind == "duplicate":
            return curriculum.duplicate(args[0], step=args[1] if len(args) > 1 else None)
        if self.kind == "move":
            return curriculum.move(args[0], to_step=args[1])
        if self.kind == "swap":
            return curriculum.swap_batches(args[0], args[1])
        if self.kind == "reverse":
            return curriculum.reverse()
        if self.kind == "replace":
            return curriculum.replace(args[0], args[1])
        return curriculum.truncate(args[0])

    def __str__(self) -> str:
        if self.kind in ("remove", "keep", "swap"):
            return f"{self.kind}:{','.join(map(str, self.args))}"
        if self.kind in ("duplicate", "move"):
            return f"{self.kind}:{self.args[0]}" + (f"@{self.args[1]}" if len(self.args) > 1 else "")
        if self.kind == "replace":
            return f"replace:{self.args[0]}>{self.args[1]}"
        if self.kind == "truncate":
            return f"truncate:{self.args[0]}"
        return self.kind


def parse_edit(text: str) -> Edit:
    """Parse ``kind[:arguments]`` (see :class:`Edit`) into an edit of internal ids and steps."""
    kind, _, rest = text.strip().partition(":")
    try:
        if kind in ("remove", "keep", "swap"):
            args = tuple(int(part) for part in rest.split(",") if part.strip())
            if not args or (kind == "swap" and len(args) != 2):
                raise ValueError
        elif kind in ("duplicate", "move"):
            example, _, step = rest.partition("@")
            args = (int(example),) + ((int(step),) if step else ())
            if kind == "move" and len(args) != 2:
                raise ValueError
        elif kind == "replace":
            old, _, new = rest.partition(">")
            args = (int(old), int(new))
        elif kind == "truncate":
            args = (int(rest),)
        elif kind == "reverse" and not rest:
            args = ()
        else:
            raise CurriculumError(f"unknown edit {text!r}; choose from {', '.join(_EDIT_KINDS)}")
    except ValueError:
        raise CurriculumError(f"cannot parse edit {text!r} (examples: remove:12,40 duplicate:5@10 move:5@100 "
                              "swap:3,7 reverse keep:1,2 replace:3>9 truncate:50)") from None
    return Edit(kind, args)


def apply_edits(curriculum: Curriculum, edits: Sequence[Edit | str]) -> Curriculum:
    """Apply edits in order (strings are parsed with :func:`parse_edit`)."""
    for edit in edits:
        curriculum = (parse_edit(edit) if isinstance(edit, str) else edit).apply(curriculum)
    return curriculum


@dataclass
class WhatIf:
    """Predicted trajectories of a base curriculum and edited scenarios.

    Attributes
    ----------
    names : scenario names, ``"base"`` first.
    curricula : the curricula simulated, base first.
    trajectories : (n_scenarios + 1, T + 1, n_test) predicted losses (T = the longest curriculum).
    test_ids : external ids of the test examples (column labels).
    """

    names: list[str]
    curricula: list[Curriculum]
    trajectories: np.ndarray
    test_ids: list = field(default_factory=list)

    @property
    def change(self) -> np.ndarray:
        """(n_scenarios + 1, T + 1, n_test) predicted loss minus the base curriculum's at the same step."""
        return self.trajectories - self.trajectories[:1]

    def final(self) -> pd.DataFrame:
        """Predicted final loss, one row per scenario, one column per test example."""
        final = self.trajectories[:, -1]
        return pd.DataFrame(final, index=pd.Index(self.names, name="scenario"), columns=self._test_labels())

    def summary(self, tests: Sequence[int] | None = None) -> pd.DataFrame:
        """Per scenario: mean final loss and mean change vs base over ``tests`` (default all)."""
        cols = slice(None) if tests is None else list(tests)
        final = self.trajectories[:, -1][:, cols]
        return pd.DataFrame(
            {
                "mean_final_loss": final.mean(axis=1),
                "mean_change": (final - final[:1]).mean(axis=1),
                "improved_tests": (final < final[:1] - 1e-12).sum(axis=1),
                "worsened_tests": (final > final[:1] + 1e-12).sum(axis=1),
            },
            index=pd.Index(self.names, name="scenario"),
        )

    def frame(self) -> pd.DataFrame:
        """Tidy table: ``scenario, step, test, loss, change`` (change against the base at that step)."""
        n_scen, n_points, n_test = self.trajectories.shape
        scen, step, test = np.meshgrid(np.arange(n_scen), np.arange(n_points), np.arange(n_test), indexing="ij")
        return pd.DataFrame(
            {
                "scenario": np.asarray(self.names, dtype=object)[scen.ravel()],
                "step": step.ravel(),
                "test": np.asarray(self._test_labels(), dtype=object)[test.ravel()],
                "loss": self.trajectories.ravel(),
                "change": self.change.ravel(),
            }
        )

    def _test_labels(self) -> list:
        return list(self.test_ids) if self.test_ids else list(range(self.trajectories.shape[2]))


def whatif(
    simulator: Simulator,
    base: Curriculum,
    scenarios: Mapping[str, Sequence[Edit | str]] | Sequence[Sequence[Edit | str]],
    initial_losses: np.ndarray,
    learning_rates: np.ndarray | None = None,
    test_ids: Sequence | None = None,
) -> WhatIf:
    """Predict the base curriculum and every edited scenario in one batched ``simulate`` call.

    Parameters
    ----------
    simulator : a fitted simulator.
    base : the base curriculum (e.g. a logged run's).
    scenarios : ``{name: [edits]}`` or a list of edit lists (named by their edits).
    initial_losses : (n_test,) losses at step 0.
    learning_rates : (T,) learning rates of the base curriculum (reused by every scenario of the same length).
    test_ids : external test ids for table labels.
    """
    if not isinstance(scenarios, Mapping):
        scenarios = {" + ".join(str(e) for e in edits) or "unchanged": edits for edits in scenarios}
    names = ["base", *scenarios]
    curricula = [base] + [apply_edits(base, edits) for edits in scenarios.values()]
    lrs = None
    if learning_rates is not None:
        schedule = np.asarray(learning_rates, dtype=np.float64)
        last = schedule[-1] if schedule.size else np.nan
        lrs = [np.concatenate([schedule, np.full(max(0, c.n_steps - schedule.size), last)])[: c.n_steps]
               for c in curricula]
    trajectories = simulator.simulate(curricula, initial_losses, lrs)
    return WhatIf(names, curricula, trajectories, list(test_ids) if test_ids is not None else [])


@dataclass
class LooEffects:
    """Leave-one-out effects: ``effects[i, m]`` = loss of test m without pool example i minus with it.

    Positive: removing i raises the loss, so i *helps* (a proponent); negative: i hurts (an opponent).
    """

    effects: np.ndarray
    pool_ids: list
    test_ids: list
    present: np.ndarray

    def frame(self) -> pd.DataFrame:
        """Long table ``test, pool, effect, rank`` (rank 1 = most helpful for that test), present examples only."""
        rows = np.flatnonzero(self.present)
        sub = self.effects[rows]
        order = np.argsort(-sub, axis=0, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(1, rows.size + 1)[:, None], axis=0)
        n_test = sub.shape[1]
        return pd.DataFrame(
            {
                "test": np.repeat(np.asarray(self.test_ids, dtype=object), rows.size),
                "pool": np.tile(np.asarray(self.pool_ids, dtype=object)[rows], n_test),
                "effect": sub.T.ravel(),
                "rank": ranks.T.ravel(),
            }
        )

    def top(self, k: int = 10, tests: Sequence[int] | None = None) -> pd.DataFrame:
        """The k most helpful (effect > 0) and most harmful (effect < 0) present examples, mean over ``tests``."""
        cols = slice(None) if tests is None else list(tests)
        score = self.effects[:, cols].mean(axis=1)
        rows = np.flatnonzero(self.present)
        order = rows[np.argsort(-score[rows], kind="stable")]
        helps = order[score[order] > 0][:k]
        hurts = order[::-1][score[order[::-1]] < 0][:k]
        pick = np.concatenate([helps, hurts])
        kind = ["helps"] * helps.size + ["hurts"] * hurts.size
        return pd.DataFrame(
            {"pool": np.asarray(self.pool_ids, dtype=object)[pick], "effect": score[pick], "role": kind}
        )


def loo_effects(
    simulator: Simulator,
    curriculum: Curriculum,
    initial_losses: np.ndarray,
    learning_rates: np.ndarray | None = None,
    step: int | None = None,
    pool_ids: Sequence | None = None,
    test_ids: Sequence | None = None,
    chunk: int = 256,
) -> LooEffects:
    """Effect on every test loss (at ``step``, default the final one) of removing each pool example.

    Exact and fast for ``SimfluenceLinear`` and its variants (no re-simulation; clipping at zero is not
    applied); other simulators re-simulate the leave-one-out curricula in batches of ``chunk``.
    """
    n_pool = _n_pool(simulator, curriculum)
    present = curriculum.counts(n_pool) > 0
    if isinstance(simulator, SimfluenceLinear):
        effects = linear_loo(simulator, curriculum, initial_losses, learning_rates, step)
    else:
        effects = _loo_by_simulation(simulator, curriculum, initial_losses, learning_rates, step, present, chunk)
    return LooEffects(
        effects,
        list(pool_ids) if pool_ids is not None else list(range(n_pool)),
        list(test_ids) if test_ids is not None else list(range(effects.shape[1])),
        present,
    )


def influence_table(
    simulator: Simulator,
    runset: RunSet,
    run: int | str,
    tests: Sequence[int] | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    """Which pool examples of a run helped or hurt each test example, under any fitted simulator.

    The score of pool example i for test z is its leave-one-out effect on z's final loss along the run's
    curriculum (``loo_effects``): the same definition for learned and gradient-based simulators, in loss
    units. Positive = a *proponent* (removing it would raise the loss), negative = an *opponent*.

    Returns
    -------
    DataFrame ``test, pool, score, rank, role`` with external ids; rank 1 = strongest proponent per test.
    With ``top=k`` only the k strongest proponents and k strongest opponents of each test are kept.
    """
    chosen = runset[run]
    lrs = chosen.learning_rates if np.isfinite(chosen.learning_rates).all() else None
    effects = loo_effects(simulator, chosen.curriculum, chosen.initial_losses, lrs,
                          pool_ids=runset.pool_ids, test_ids=runset.test_ids)
    frame = effects.frame().rename(columns={"effect": "score"})
    if tests is not None:
        bad = [t for t in tests if not 0 <= int(t) < runset.n_test]
        if bad:
            raise SimfluenceError(f"test position {bad[0]} outside 0..{runset.n_test - 1}")
        keep = {runset.test_ids[i] for i in tests}
        frame = frame[frame["test"].isin(keep)]
    frame["role"] = np.where(frame["score"] > 0, "proponent", np.where(frame["score"] < 0, "opponent", "neutral"))
    if top is not None:
        from_bottom = frame.groupby("test")["rank"].transform("max") - frame["rank"] + 1
        frame = frame[(frame["rank"] <= top) | (from_bottom <= top)]
    return frame.sort_values(["test", "rank"], kind="stable").reset_index(drop=True)


def _n_pool(simulator: Simulator, curriculum: Curriculum) -> int:
    for name in ("A_", "B_"):
        if hasattr(simulator, name):
            return int(getattr(simulator, name).shape[0])
    if hasattr(simulator, "scores_"):  # fixed-effects simulators: (K, n_pool, n_test)
        return int(simulator.scores_.shape[-2])
    if curriculum.n_pool is not None:
        return int(curriculum.n_pool)
    return int(curriculum.ids.max(initial=-1)) + 1


def _loo_by_simulation(simulator, curriculum, initial_losses, learning_rates, step, present, chunk) -> np.ndarray:
    lrs = None if learning_rates is None else [np.asarray(learning_rates, dtype=np.float64)]
    step = curriculum.n_steps if step is None else int(step)
    if not 0 <= step <= curriculum.n_steps:
        raise SimfluenceError(f"step {step} outside 0..{curriculum.n_steps}")
    base = simulator.simulate(curriculum, initial_losses, lrs)[0, step]
    effects = np.zeros((present.size, base.size))
    candidates = np.flatnonzero(present)
    for lo in range(0, candidates.size, chunk):  # batches of leave-one-out curricula
        ids = candidates[lo : lo + chunk]
        edited = [curriculum.remove([int(i)]) for i in ids]
        out = simulator.simulate(edited, initial_losses, None if lrs is None else lrs * len(edited))
        effects[ids] = out[:, step] - base
    return effects


@dataclass
class SearchResult:
    """Outcome of :func:`search_curriculum`.

    Attributes
    ----------
    curriculum : the curriculum found.
    removed : pool positions removed, in the order chosen.
    objective : (n_rounds + 1,) predicted mean final loss of the target tests after each round.
    predicted_change : objective[-1] - objective[0].
    """

    curriculum: Curriculum
    removed: list[int]
    objective: np.ndarray

    @property
    def predicted_change(self) -> float:
        return float(self.objective[-1] - self.objective[0])


def search_curriculum(
    simulator: Simulator,
    base: Curriculum,
    initial_losses: np.ndarray,
    tests: Sequence[int],
    drop: int | None = None,
    subset_size: int | None = None,
    maximize: bool = False,
    per_round: int = 1,
    learning_rates: np.ndarray | None = None,
) -> SearchResult:
    """Greedily remove pool examples to lower (``maximize=False``) or raise the targets' mean final loss.

    Exactly one budget: ``drop`` (remove at most that many examples; stops early when no removal helps)
    or ``subset_size`` (keep that many distinct examples of the base curriculum). Each round ranks every
    present example by its leave-one-out effect on the objective (fast and exact for linear simulators)
    and removes the best ``per_round``; the objective is then re-simulated, so the reported gains are the
    simulator's predictions for the curricula actually found.
    """
    tests = list(tests)
    if not tests:
        raise SimfluenceError("search needs at least one target test example")
    if (drop is None) == (subset_size is None):
        raise SimfluenceError("give exactly one budget: drop=k or subset_size=m")
    sign = -1.0 if maximize else 1.0
    lrs = None if learning_rates is None else [np.asarray(learning_rates, dtype=np.float64)]

    def objective(cur: Curriculum) -> float:
        return float(simulator.simulate(cur, initial_losses, lrs)[0, -1, tests].mean())

    n_pool = _n_pool(simulator, base)
    present_count = int((base.counts(n_pool) > 0).sum())
    budget = drop if drop is not None else present_count - int(subset_size)
    if budget < 0 or (subset_size is not None and subset_size < 1):
        raise SimfluenceError(f"subset_size must lie in 1..{present_count} (the examples the base curriculum uses)")
    current, removed, values = base, [], [objective(base)]
    while len(removed) < budget:
        effects = loo_effects(simulator, current, initial_losses, learning_rates)
        gain = sign * effects.effects[:, tests].mean(axis=1)  # objective change if removed; want negative
        candidates = np.flatnonzero(effects.present)
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
    return SearchResult(current, removed, np.array(values))


def move_all(curriculum: Curriculum, example: int, to_step: int) -> Curriculum:
    """Move every occurrence of ``example`` into the batch of ``to_step`` (1-based)."""
    while True:
        steps = curriculum.step_of_entries()[curriculum.ids == example]
        steps = steps[steps != to_step]
        if steps.size == 0:
            return curriculum
        curriculum = curriculum.move(int(example), to_step=int(to_step), from_step=int(steps[0]))


@dataclass
class ReorderResult:
    """Outcome of :func:`search_order`.

    Attributes
    ----------
    curriculum : the reordered curriculum (same examples, same counts).
    moves : ``(pool position, "start" | "end")`` in the order chosen.
    objective : (n_moves + 1,) predicted mean final loss of the targets after each move.
    """

    curriculum: Curriculum
    moves: list[tuple[int, str]]
    objective: np.ndarray

    @property
    def predicted_change(self) -> float:
        return float(self.objective[-1] - self.objective[0])


def search_order(
    simulator: Simulator,
    base: Curriculum,
    initial_losses: np.ndarray,
    tests: Sequence[int],
    moves: int = 5,
    candidates: int = 20,
    maximize: bool = False,
    learning_rates: np.ndarray | None = None,
) -> ReorderResult:
    """Greedy reordering: move one example's occurrences to the first or last step per round.

    Each round takes the ``candidates`` present examples with the largest leave-one-out effect on the
    targets, builds two curricula per candidate (all its occurrences moved to step 1, or to the last step),
    simulates them all in one batched call and keeps the best, if it improves the objective. The set of
    examples (and how often each is seen) never changes — only when they are seen.
    """
    tests = list(tests)
    if not tests:
        raise SimfluenceError("search needs at least one target test example")
    sign = -1.0 if maximize else 1.0
    lrs = None if learning_rates is None else np.asarray(learning_rates, dtype=np.float64)

    def objectives(curricula: list[Curriculum]) -> np.ndarray:
        rates = None if lrs is None else [lrs] * len(curricula)
        return simulator.simulate(curricula, initial_losses, rates)[:, -1, tests].mean(axis=1)

    current, chosen = base, []
    values = [float(objectives([base])[0])]
    moved: set[int] = set()
    for _ in range(moves):
        effects = loo_effects(simulator, current, initial_losses, learning_rates)
        strength = np.abs(effects.effects[:, tests].mean(axis=1))
        pool = [int(i) for i in np.flatnonzero(effects.present) if int(i) not in moved]
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
    return ReorderResult(current, chosen, np.array(values))
