"""Unrolled differentiation as a special-case simulator: exact first-order effects around one base run.

``UnrolledSimulator().fit(runset, runs=[base], task=task)`` replays the base run and differentiates every test
loss through it (:func:`simfluence.attribution.unrolled.unrolled_effects`); ``simulate`` then predicts, to
first order, the trajectory of any curriculum *near the base*: removals, duplications, reweighting, and
moves of occurrences between steps.

**From a curriculum to weight changes.** Step t's loss is ``(1 / |c_t|) * sum_{j in c_t} w_j * loss_j``. A
curriculum with batch c'_t at step t is the base with weights changed: occurrences are matched per step as
multisets; a removed occurrence has Delta w = -1; every occurrence of the new batch gets weight
``|c_t| / |c'_t|`` (the mean is renormalised), so a kept one has Delta w = |c_t| / |c'_t| - 1 and an added
one enters with weight |c_t| / |c'_t|. An added copy of an example the base batch already holds has exactly
the derivative of that example's occurrence; an example absent from the base batch uses the *insertion*
effect of the step, computed at the ``insertion_steps`` of the fit (an example added at another step is an
error naming the step). Summing per step, the predicted change of the test losses at target step s is

    Delta L_s = sum_t [ (|c_t| / |c'_t|) * sum_{j in c'_t} E_{t,j} - sum_{j in c_t} E_{t,j} ]

(E: occurrence or insertion effect; the first sum is 0 for an emptied batch, which is then treated as all
its weights going to 0, while real training would skip the step). The trajectory is that change
interpolated linearly in s between the target steps (0 at step 0), added to the replayed base trajectory,
shifted by the difference of the initial losses from the base's.

**Checking its own linearity.** ``fit`` (``check_linearity=True``) replays the base run once more with a few
random examples weighted 0 (5% of those it uses; batch sizes kept, the exact edit the occurrence effects
differentiate) and compares the real change of the final test losses with the first-order one
(:func:`simfluence.attribution.smoothness.linearity_check`). ``linearity_`` records both; when they disagree
(magnitude off by more than 2x either way, the mean change's sign wrong while it is not negligible, or
correlation across test examples below 0.5) ``fit`` issues a :class:`~simfluence.errors.NonlinearityWarning`: training
is not smooth enough here for first-order answers (docs/smoothness.md). Cost: one replay, about one training
run.

**Tests.** The tests differentiated are the run set's: a run set restricted to some tests
(:meth:`~simfluence.runlog.RunSet.select_tests`) with a task that has more probes differentiates only those (the
task's rows are matched by test id; an id the task does not have is a ``TaskError`` naming it). The cost of the
backward pass grows with the number of tests; ``cotangent_rank=k`` bounds it
(:func:`~simfluence.attribution.unrolled.unrolled_effects`: k rows pulled back instead of n_test, an orthonormal basis
of the top-k singular subspace of the final test gradients, exact for the part of each test gradient inside it).
``captured_energy_`` records that part per test, and ``fit`` issues a :class:`~simfluence.errors.SimfluenceWarning`
when a test keeps less than :data:`MIN_CAPTURED_ENERGY` of its gradient's squared norm: its effects are then those of
a gradient at more than ~18 degrees from its own (cosine below sqrt(0.9) = 0.95), off by about sqrt(1 - 0.9) = 0.3
of their size.

**Limits.** Curricula must have the base run's number of steps; learning rates are those of the task's
schedule (the ``learning_rates`` argument is ignored); a step that is empty in the base run cannot gain
examples. Far from the base (another random subset, a different order) a first-order prediction says little.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import NonlinearityWarning, SimfluenceError, SimfluenceWarning
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, as_curricula, as_initial, training_runs

__all__ = ["UnrolledSimulator"]

PRECISIONS = ("float64", "float32", "task")
# the replay must reproduce the logged step-0 losses at least this well, else the task is not the run's
INITIAL_RTOL, INITIAL_ATOL = 1e-3, 1e-4
MIN_CAPTURED_ENERGY = 0.9
"""With ``cotangent_rank``, the least fraction of a test gradient's squared norm the differentiated subspace must keep
before ``fit`` warns (see the module docstring)."""


class UnrolledSimulator(Simulator):
    """Exact first-order effects of data weights, by differentiating through a replay of one base run.

    Parameters
    ----------
    target_steps : steps at which the test losses are differentiated: ``"final"``, an int n (n evenly spaced
        steps ending at the last) or a list of steps (the last is always added); the trajectory in between is
        interpolated linearly.
    insertion_steps : steps at which adding an absent example is first order too: ``"ends"`` (the first and
        last tenth of the steps: moves to the start or the end), ``"all"``, ``"none"`` or a list of steps.
        Each costs one pass of per-example gradients over the pool and n_pool * K * n_test stored numbers.
    precision : ``"float64"`` (model and data converted), ``"float32"`` or ``"task"`` (as the task is).
    checkpoint_every : states stored every this many steps and segments recomputed in the backward pass
        (default: none when the kept graphs of every step fit in memory, else the segment length that fits).
    chunk_size : examples per vectorised pass of per-example gradients (default: about 64 MiB).
    deterministic : replay as the generator trains (one thread, deterministic algorithms).
    progress : progress bar over the backward pass.
    replay_tolerance : how far the replayed base run's test losses may differ from the logged ones, relative to
        the run's mean logged loss (default :data:`simfluence.task.REPLAY_TOLERANCE`); beyond it ``fit`` stops
        before the backward pass (a task that does not reproduce its run). Raising it lets a run pass with a
        ``ReplayWarning``.
    device : where the replay and its derivatives run (``None``: the CPU; ``"cuda"`` on a GPU, with
        ``deterministic=False``); the linearity check replays on the CPU.
    check_linearity : after the fit, replay one random removal of a few examples and compare it with the
        first-order prediction (one more replay); a bad disagreement issues a ``NonlinearityWarning``.
    cotangent_rank : None (exact: every test differentiated itself), or k: differentiate the top-k singular
        subspace of the test gradients at each target step (k rows in the backward pass instead of n_test; exact
        when k >= their rank, else the effects of the projected gradients; a ``SimfluenceWarning`` when a test keeps
        less than :data:`MIN_CAPTURED_ENERGY` of its gradient).

    Attributes
    ----------
    base_offsets_, base_ids_ : the base run's curriculum (offsets (T + 1,), ids (n_entries,)).
    base_losses_ : (T + 1, n_test) test losses of the replayed base run.
    target_steps_ : (K,) target steps, increasing, the last = T.
    occurrence_effects_ : (n_entries, K, n_test) dL_s / dw_j of every occurrence of the base curriculum.
    insertion_steps_ : (n_ins,) steps with insertion effects.
    insertion_effects_ : (n_ins, n_pool, K, n_test) float32 dL_s / du of example i entering step t.
    base_run_ : name of the base run; ``optimizer_`` the replayed optimizer; ``replay_error_`` the largest
        absolute difference between replayed and logged losses.
    captured_energy_ : (K, n_test) with a ``cotangent_rank``: the fraction ``||U^T g_z||^2 / ||g_z||^2`` of each
        test gradient inside the differentiated subspace at each target step (1: exact); None when exact.
    linearity_ : the linearity check (None when not run): ``removed`` (pool ids), ``predicted_mean`` /
        ``replayed_mean`` (mean change of the final test losses), ``magnitude_ratio`` (mean |predicted| / mean
        |replayed|), ``correlation`` (across test examples) and ``ok``.
    """

    kind = "unrolled"
    _fitted_arrays = ("base_offsets_", "base_ids_", "base_losses_", "target_steps_", "occurrence_effects_",
                      "insertion_steps_", "insertion_effects_")
    _array_specs = {"base_offsets_": ("int", ("n_steps+1",)), "base_ids_": ("int", ("n_entries",)),
                    "base_losses_": ("float", ("n_steps+1", "n_test_")), "target_steps_": ("int", ("n_targets",)),
                    "occurrence_effects_": ("float", ("n_entries", "n_targets", "n_test_")),
                    "insertion_steps_": ("int", ("n_insertions",)),
                    "insertion_effects_": ("float", ("n_insertions", "n_pool_", "n_targets", "n_test_")),
                    "captured_energy_": ("float", ("n_targets", "n_test_"))}
    _optional_arrays = ("captured_energy_",)  # saved with a cotangent_rank only
    _state_specs = {"base_run_": "str", "replay_error_": "number|null"}
    tags = {**Simulator.tags, "exact_loo": True, "needs": frozenset({"task"}), "per_base": True}  # see fit

    def __init__(self, target_steps: str | int | Sequence[int] = "final",
                 insertion_steps: str | Sequence[int] = "ends", precision: str = "float64",
                 checkpoint_every: int | None = None, chunk_size: int | None = None, deterministic: bool = True,
                 progress: bool = False, replay_tolerance: float | None = None, check_linearity: bool = True,
                 device: str | None = None, cotangent_rank: int | None = None) -> None:
        self.target_steps = target_steps
        self.insertion_steps = insertion_steps
        self.precision = precision
        self.checkpoint_every = checkpoint_every
        self.chunk_size = chunk_size
        self.deterministic = deterministic
        self.progress = progress
        self.replay_tolerance = replay_tolerance
        self.check_linearity = check_linearity
        self.device = device
        self.cotangent_rank = cotangent_rank

    # --------------------------------------------------------------------- fit
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> UnrolledSimulator:
        """Replay the one base run at ``runs`` and differentiate every test loss through it; returns self.

        Parameters
        ----------
        runset : the logged runs.
        runs : ``[position]`` of the base run (default: the only run of a one-run run set).
        task : the :class:`~simfluence.task.Task` of the runs, or a ``"file.py:function"`` spec; default: the
            built-in workload recorded in the run set. The initial weights come from the run set's recorded
            generator ``init_seed`` (else ``task.init_seed``), the torch seed from the run's ``seed`` (else
            ``init_seed + 1``; :func:`~simfluence.training.retraining_seeds`).
        """
        import torch

        from simfluence.attribution.unrolled import replay_losses, unrolled_effects
        from simfluence.task import check_recorded_settings, check_replay, check_schedule
        from simfluence.training import retraining_seeds
        from simfluence.workloads import task_for_runset

        start = time.perf_counter()
        if runs is None and len(runset) != 1:
            raise SimfluenceError(f"unrolled differentiates through one base run; the run set has {len(runset)} "
                                  "runs: pass runs=[position]")
        runs = training_runs(runset, runs)
        if len(runs) != 1:
            raise SimfluenceError(f"unrolled differentiates through exactly one base run, got {len(runs)} runs "
                                  f"({', '.join(runset[i].name for i in runs[:3])}{', ...' if len(runs) > 3 else ''})")
        if self.precision not in PRECISIONS:
            raise SimfluenceError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        run = runset[runs[0]]
        task = task_for_runset(runset, task)
        init_seed, seed = retraining_seeds(runset, task, run)  # the seeds verify and LDS retrain the run with
        check_schedule(task, run)
        check_recorded_settings(task, runset, run, init_seed)
        dtype = {"float64": torch.float64, "float32": torch.float32, "task": None}[self.precision]
        initial = replay_losses(task, run.curriculum.truncate(0), init_seed=init_seed, seed=seed, dtype=dtype,
                                deterministic=self.deterministic, device=self.device)[0]
        self._check_initial_losses(runset, run, initial)
        effects = unrolled_effects(
            task, run.curriculum, target_steps=self.target_steps, insertion_steps=self.insertion_steps,
            init_seed=init_seed, seed=seed, dtype=dtype, checkpoint_every=self.checkpoint_every,
            chunk_size=self.chunk_size, deterministic=self.deterministic, progress=self.progress, device=self.device,
            replay_check=lambda losses: check_replay(runset, run, losses, self.replay_tolerance),
            cotangent_rank=self.cotangent_rank)
        self.replay_error_ = self._replay_error(run, effects.losses)

        self._remember_ids(runset, runs)
        self.base_offsets_ = np.asarray(run.curriculum.offsets, dtype=np.int64)
        self.base_ids_ = np.asarray(run.curriculum.ids, dtype=np.int64)
        self.base_losses_ = effects.losses
        self.target_steps_ = effects.target_steps
        self.occurrence_effects_ = effects.occurrence
        self.insertion_steps_ = effects.insertion_steps
        self.insertion_effects_ = effects.insertion.astype(np.float32, copy=False)
        self.base_run_ = run.name
        self.optimizer_ = effects.optimizer
        self.captured_energy_ = effects.captured_energy
        if self.captured_energy_ is not None:
            self._check_captured_energy(run)
        self.init_seed_, self.seed_ = init_seed, seed
        self.linearity_ = self._linearity(task, run, dtype) if self.check_linearity else None
        self.fit_seconds_ = time.perf_counter() - start  # not saved: a model file does not depend on timing
        self.fitted_ = True
        return self

    def _linearity(self, task: Any, run, dtype) -> dict[str, Any]:
        """Replay a random removal of a few examples (weight 0, batch sizes kept); compare with first order."""
        from simfluence.attribution.smoothness import LINEARITY_FRACTION, linearity_check, weighted_replay

        used = np.unique(self.base_ids_)
        count = max(1, int(np.ceil(LINEARITY_FRACTION * used.size)))
        removed = np.sort(np.random.default_rng(0).choice(used, size=min(count, used.size), replace=False))
        weights = np.ones(self.n_pool_)
        weights[removed] = 0.0
        _, losses = weighted_replay(task, run.curriculum, weights, init_seed=self.init_seed_, seed=self.seed_,
                                    dtype=dtype, deterministic=self.deterministic)
        replayed = losses - self.base_losses_[-1]
        predicted = -self.occurrence_effects_[np.isin(self.base_ids_, removed), -1, :].sum(axis=0)
        check = linearity_check(predicted, replayed)
        check["removed"] = [self.pool_ids_[i] for i in removed]
        if not check["ok"]:
            warnings.warn(NonlinearityWarning(
                f"unrolled around run {run.name!r}: removing {removed.size} random example(s) changed the final test "
                f"losses by {check['replayed_mean']:+.3g} on average in a replay, the first-order prediction says "
                f"{check['predicted_mean']:+.3g} (magnitude x{check['magnitude_ratio']:.2g}, correlation "
                f"{check['correlation']:.2f}): training is not smooth enough here for first-order answers; "
                "see docs/smoothness.md and `simfluence smoothness`"), stacklevel=3)
        return check

    def _check_captured_energy(self, run) -> None:
        """Warn when a test keeps less than MIN_CAPTURED_ENERGY of its gradient in the differentiated subspace."""
        worst = self.captured_energy_.min(axis=0)  # (n_test,) over target steps
        low = np.flatnonzero(worst < MIN_CAPTURED_ENERGY)
        if low.size:
            lowest = int(low[np.argmin(worst[low])])
            warnings.warn(SimfluenceWarning(
                f"unrolled around run {run.name!r} with cotangent_rank={self.cotangent_rank}: {low.size} of "
                f"{self.n_test_} tests keep less than {MIN_CAPTURED_ENERGY:.0%} of their gradient in the "
                f"differentiated subspace (lowest {worst[lowest]:.2f}, test id {self.test_ids_[lowest]!r}); their "
                "effects are those of a projected gradient and may be far from exact: raise cotangent_rank (exact at "
                f"{self.n_test_}) or differentiate fewer tests (RunSet.select_tests)"), stacklevel=3)

    @staticmethod
    def _check_initial_losses(runset: RunSet, run, replayed: np.ndarray) -> None:
        """The task's step-0 test losses must be the run's logged ones, else the task is not the run's."""
        logged, mask = run.dense_losses()
        if not mask[0]:
            return
        gap = np.abs(replayed - logged[0])
        if not np.all(gap <= INITIAL_ATOL + INITIAL_RTOL * np.abs(logged[0])):
            worst = int(np.argmax(gap))
            raise SimfluenceError(
                f"run {run.name!r}: the task's initial losses differ from the logged ones (by {gap[worst]:.3g} for "
                f"test id {runset.test_ids[worst]!r}): is this the task and init_seed the run was trained with?")

    @staticmethod
    def _replay_error(run, replayed: np.ndarray) -> float | None:
        """Largest |replayed - logged| test loss over the run's logged steps."""
        logged, mask = run.dense_losses()
        return float(np.max(np.abs(replayed[mask] - logged[mask]))) if mask.any() else None

    # --------------------------------------------------------------------- simulate
    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """First-order trajectories of curricula near the base run.

        Parameters
        ----------
        curricula : one or n_curricula curricula of the base run's length T (pool positions).
        initial_losses : (n_test,) or (n_curricula, n_test); the trajectory is shifted by their difference
            from the base run's.
        learning_rates : ignored (the replay used the task's schedule).

        Returns
        -------
        (n_curricula, T + 1, n_test) float64: replayed base trajectory + interpolated first-order change.

        Raises
        ------
        SimfluenceError : a curriculum of another length, or one that adds an example at a step without
            insertion effects or at a step that is empty in the base run (the message names the step).
        """
        self.check_fitted()
        curricula = as_curricula(curricula)
        initial = as_initial(initial_losses, len(curricula), self.n_test_)
        n_steps = len(self.base_offsets_) - 1
        if not curricula:
            return np.zeros((0, n_steps + 1, self.n_test_))
        changes = self._target_changes(curricula)  # (n_curricula, K, n_test)
        trajectories = np.einsum("sk,ckm->csm", self._interpolation(), changes)
        trajectories += self.base_losses_[None]
        trajectories += (initial - self.base_losses_[0])[:, None, :]
        return trajectories

    def leave_one_out(
        self,
        curriculum: Curriculum,
        initial_losses: np.ndarray,
        learning_rates: np.ndarray | None = None,
        step: int | None = None,
        chunk: int = 256,
    ) -> np.ndarray:
        """First-order change at ``step`` when each pool example is removed from every batch of ``curriculum``.

        Vectorised over examples and equal to re-simulating each leave-one-out curriculum with
        :meth:`simulate` (the other occurrences of a batch renormalised). ``learning_rates`` and ``chunk``
        are ignored.

        Returns
        -------
        (n_pool, n_test) float64: loss without example i minus loss with it; zero rows for absent examples.
        """
        self.check_fitted()
        step = curriculum.n_steps if step is None else int(step)
        if not 0 <= step <= curriculum.n_steps:
            raise SimfluenceError(f"step {step} outside 0..{curriculum.n_steps}")
        n_targets = len(self.target_steps_)
        terms = self._step_terms(curriculum)
        n_entries = terms.steps.size
        effects = np.zeros((self.n_pool_, n_targets * self.n_test_))
        if n_entries:
            contributions = terms.count[:, None] * terms.effects  # x_e: (n_entries, K * n_test)
            per_step = np.zeros((len(terms.new_sizes), contributions.shape[1]))
            np.add.at(per_step, terms.steps, contributions)  # X_t
            new_sizes = terms.new_sizes[terms.steps].astype(np.float64)
            remaining = new_sizes - terms.count
            after = np.zeros_like(contributions)
            keep = remaining > 0
            after[keep] = (per_step[terms.steps[keep]] - contributions[keep]) / remaining[keep, None]
            change = terms.base_sizes[terms.steps, None] * (after - per_step[terms.steps] / new_sizes[:, None])
            np.add.at(effects, terms.ids, change)
        weights = self._interpolation()[step]  # (K,)
        return np.einsum("k,nkm->nm", weights, effects.reshape(self.n_pool_, n_targets, self.n_test_))

    def _self_check(self) -> None:
        """The loader's check of the values (shapes are checked by ``_array_specs``), then a simulation of the base
        curriculum (the only one certainly in range)."""
        n_steps = len(self.base_offsets_) - 1
        try:
            self._base()
        except SimfluenceError as err:
            raise SimfluenceError(f"base_offsets_, base_ids_: {err}") from None
        for name, last in (("target_steps_", True), ("insertion_steps_", False)):
            steps = getattr(self, name)
            if steps.size and (np.any(steps < 1) or np.any(steps > n_steps) or np.any(steps[1:] <= steps[:-1])
                               or (last and steps[-1] != n_steps)):  # comparisons: differences of int64 can wrap
                raise SimfluenceError(f"{name} must be increasing steps in 1..{n_steps}"
                                      f"{f' ending at {n_steps}' if last else ''}, got {steps.tolist()}")
        if self.target_steps_.size == 0:
            raise SimfluenceError("target_steps_ is empty")
        energy = getattr(self, "captured_energy_", None)  # absent from the files of exact fits
        self.captured_energy_ = energy
        if energy is not None and not np.all((energy >= 0) & (energy <= 1)):
            raise SimfluenceError("captured_energy_ must lie in [0, 1]")
        self.simulate(self._base(), self.base_losses_[0])

    # --------------------------------------------------------------------- internals
    def _base(self) -> Curriculum:
        return Curriculum(self.base_offsets_, self.base_ids_, self.n_pool_)

    def _interpolation(self) -> np.ndarray:
        """(T + 1, K) weights of the target-step changes at each step (linear in between, 0 at step 0)."""
        n_steps = len(self.base_offsets_) - 1
        knots = np.concatenate([[0], self.target_steps_]).astype(np.float64)
        grid = np.arange(n_steps + 1, dtype=np.float64)
        columns = [np.interp(grid, knots, np.eye(len(knots))[k + 1]) for k in range(len(self.target_steps_))]
        return np.stack(columns, axis=1)

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The base run's distinct (step, example) pairs: sorted keys ``(t - 1) * n_pool + i`` and their
        occurrence effect (n_pairs, K * n_test) (the mean over an example's copies in a batch; they are equal)."""
        cached = self.__dict__.get("_pair_cache")
        if cached is not None and cached[0] is self.occurrence_effects_:
            return cached[1], cached[2]
        base = self._base()
        entry_keys = (base.step_of_entries() - 1) * self.n_pool_ + base.ids
        keys, owner, copies = np.unique(entry_keys, return_inverse=True, return_counts=True)
        flat = self.occurrence_effects_.reshape(len(entry_keys), -1).astype(np.float64)
        effects = np.zeros((len(keys), flat.shape[1]))
        np.add.at(effects, owner, flat)
        effects /= copies[:, None]
        self._pair_cache = (self.occurrence_effects_, keys, effects)
        return keys, effects

    def _step_terms(self, curriculum: Curriculum) -> _StepTerms:
        """Per (step, example) entry of a curriculum: its count and effect E_{t,i} (n_entries, K * n_test)."""
        base_sizes = np.diff(self.base_offsets_)
        n_steps = len(base_sizes)
        if curriculum.n_steps != n_steps:
            raise SimfluenceError(f"a curriculum of {curriculum.n_steps} steps; the unrolled simulator predicts "
                                  f"curricula of its base run's length ({n_steps} steps) only")
        counts = curriculum.to_csr(self.n_pool_).tocoo()
        steps, ids, count = counts.row.astype(np.int64), counts.col.astype(np.int64), counts.data
        new_sizes = curriculum.batch_sizes
        gained = np.flatnonzero((base_sizes == 0) & (new_sizes > 0))
        if gained.size:
            raise SimfluenceError(f"step {gained[0] + 1} is empty in the base run {self.base_run_!r}: the unrolled "
                                  "simulator cannot add examples to it (the base makes no update there)")
        keys, pair_effects = self._pairs()
        entry_keys = steps * self.n_pool_ + ids
        position = np.minimum(np.searchsorted(keys, entry_keys), max(len(keys) - 1, 0))
        in_base = (keys[position] == entry_keys) if len(keys) else np.zeros(len(entry_keys), dtype=bool)
        effects = np.empty((len(entry_keys), pair_effects.shape[1]))
        effects[in_base] = pair_effects[position[in_base]]
        added = np.flatnonzero(~in_base)
        if added.size:
            row_of_step = np.full(n_steps, -1)
            row_of_step[self.insertion_steps_ - 1] = np.arange(len(self.insertion_steps_))
            rows = row_of_step[steps[added]]
            missing = added[rows < 0]
            if missing.size:
                first = missing[np.argmin(steps[missing])]
                raise SimfluenceError(
                    f"pool id {self.pool_ids_[ids[first]]!r} is added at step {steps[first] + 1}, where the unrolled "
                    f"simulator has no insertion effects (it has them at {_describe_steps(self.insertion_steps_)}); "
                    "fit with insertion_steps='all' or a list including that step")
            flat = self.insertion_effects_.reshape(len(self.insertion_steps_), self.n_pool_, -1)
            effects[added] = flat[rows, ids[added]]
        return _StepTerms(steps, ids, count.astype(np.float64), effects, base_sizes, new_sizes)

    def _target_changes(self, curricula: list[Curriculum]) -> np.ndarray:
        """(n_curricula, K, n_test) first-order change of the losses at the target steps."""
        n_targets = len(self.target_steps_)
        base = self._step_terms(self._base())
        changes = np.empty((len(curricula), n_targets * self.n_test_))
        base_total = _weighted_sum(base)
        for row, curriculum in enumerate(curricula):
            changes[row] = _weighted_sum(self._step_terms(curriculum)) - base_total
        return changes.reshape(len(curricula), n_targets, self.n_test_)

    def _extra_state(self) -> dict[str, Any]:
        return {"base_run_": self.base_run_, "optimizer_": self.optimizer_, "init_seed_": self.init_seed_,
                "seed_": self.seed_, "replay_error_": self.replay_error_,
                "linearity_": getattr(self, "linearity_", None)}


class _StepTerms:
    """The entries of a curriculum's (steps x pool) count matrix with their effects (see ``_step_terms``)."""

    def __init__(self, steps: np.ndarray, ids: np.ndarray, count: np.ndarray, effects: np.ndarray,
                 base_sizes: np.ndarray, new_sizes: np.ndarray) -> None:
        self.steps, self.ids, self.count, self.effects = steps, ids, count, effects
        self.base_sizes, self.new_sizes = base_sizes, new_sizes


def _weighted_sum(terms: _StepTerms) -> np.ndarray:
    """sum over entries of (|c_t| / |c'_t|) * count * E: (K * n_test,)."""
    if terms.steps.size == 0:
        return np.zeros(terms.effects.shape[1])
    ratio = terms.base_sizes[terms.steps] / terms.new_sizes[terms.steps]
    return (ratio * terms.count) @ terms.effects


def _describe_steps(steps: np.ndarray) -> str:
    if len(steps) == 0:
        return "no step"
    if len(steps) <= 6:
        return "steps " + ", ".join(str(int(step)) for step in steps)
    return f"{len(steps)} steps between {int(steps[0])} and {int(steps[-1])}"
