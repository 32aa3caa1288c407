"""Unrolled-anchored simulation: ``unrolled``'s exact effects of one base run, rolled out for any curriculum.

:class:`~simfluence.attribution.unrolled_simulator.UnrolledSimulator` knows, for one replayed base run, the exact
derivative ``E_{t,i}`` of every final test loss with respect to the weight of example i at step t (occurrence effects
for the base's own (step, example) pairs, insertion effects of every pool example at its ``insertion_steps``). Its
answer is the first-order sum of those derivatives, and only for curricula of the base's length whose added examples
sit at insertion steps. Here the same numbers are re-expressed as the per-step example effects of a Simfluence-style
momentum rollout (the recurrence of :func:`simfluence.simulators.dynamics.unroll`), per test example z::

    v_t = mu v_{t-1} + (1 / |c'_t|) sum_{i in c'_t} X_{t,i} + c_t        L_t = L_{t-1} + v_t        (v_0 = 0)

**Anchoring.** ``X_{t,i} = |c_t| E_{t,i} / G_t`` is the *impulse* of example i at step t: its unrolled effect divided
by its propagation factor ``G_t = sum_{s=t}^{T} mu^(s - t)`` (how much of a unit impulse at step t reaches the final
loss), in the unit "example i alone in a batch". The drift ``c_t`` is the base run's own velocity less its examples'
impulses, so the base curriculum rolls out to the replayed base trajectory exactly, and for every curriculum of the
base's length the final losses *equal* unrolled's first-order answer: removals, duplications, moves, reweighting and
far edits alike, the batch renormalisation included (the rollout divides by the new batch size where unrolled
multiplies by ``|c_t| / |c'_t|``). ``mu`` is the replayed optimizer's momentum: it shapes only the trajectory between an
edit and the end (an impulse, then the optimizer's velocity, instead of unrolled's linear interpolation).

**Why it answers far from the base.** unrolled refuses curricula of other lengths, examples added at steps without
insertion effects and steps that are empty in its base; the rollout answers all of them: an example at a step without
insertion effects uses the impulse of the nearest insertion step (ties: the earlier; an impulse is comparable across
steps, an effect on the final loss is not: it shrinks towards the end as ``G_t`` does), a step beyond the base's
length repeats the base's last step (its drift and impulses), a shorter curriculum is the rollout's prefix. So one
replay of *any* run, a training run included, gives exact-derivative effects for every curriculum of the task, where
the learned simulators have only what the logs can separate. Measured on digits (``benchmarks/bench_anchored.py``,
LDS against retraining, remove 5% / move to the end / keep a half of three held-out runs): anchored on a training
run, 0.630 / 0.584 / 0.625, against 0.359 / 0.124 / 0.510 for ``linear_mom`` fitted on 16 runs (around each edited
run itself: unrolled's 0.883 / 0.846 / 0.796, the same answers to 1e-14). Impulses averaged per phase
(:meth:`AnchoredSimulator.phase_effects`) are a prior for the effect-level hybrid (``linear_mom_prior``,
:meth:`~simfluence.attribution.hybrid.LinearPrior.set_prior`), where the logs correct them (on digits it did not help:
0.316 / 0.144 / 0.484). What the rollout does not add is accuracy beyond first order for the base's own length:
a loss-proportional (multiplicative) form was tried on digits and made no gain (anchored the same way, its propagation
factors turn negative for some test examples, momentum or not; its second-order cross term alone, added to this
answer, lowered keep-a-half LDS from 0.81 to 0.80 on one base run's 20 draws).

Cost: one ``unrolled`` fit (one replay with insertion effects at ``insertion_steps``, ``"all"`` by default: about 23
bare runs on digits, and the linearity check's replay) and n_insertions x n_pool x n_test stored float32 effects.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, as_curricula, as_initial
from simfluence.simulators.dynamics import unroll

__all__ = ["AnchoredSimulator"]


class AnchoredSimulator(Simulator):
    """A momentum rollout whose per-step example impulses are ``unrolled``'s exact effects (see the module docstring).

    Parameters
    ----------
    momentum : velocity decay ``mu`` of the rollout, or ``"auto"``: the replayed optimizer's (SGD ``momentum``,
        Adam ``beta1``; 0 without one). It does not change the final losses of curricula of the base's length.
    insertion_steps, precision, deterministic, progress, replay_tolerance, check_linearity, device : passed to the
        :class:`~simfluence.attribution.unrolled_simulator.UnrolledSimulator` fitted on the base run
        (``insertion_steps="all"``: every step has its own insertion effects).

    Attributes
    ----------
    base_offsets_, base_ids_ : the base run's curriculum; ``base_losses_`` (T + 1, n_test) its replayed losses.
    insertion_steps_ : (n_ins,) steps with insertion effects; ``insertion_effects_`` (n_ins, n_pool, n_test) float32
        unrolled's effects on the final losses there; ``insertion_units_`` (n_ins,) the impulse of a unit effect at
        each, ``|c_t| / G_t``.
    pair_keys_ : (n_pairs,) sorted keys ``(t - 1) * n_pool + i`` of the base's (step, example) pairs;
        ``pair_impulses_`` (n_pairs, n_test) their impulses, from the exact occurrence effects.
    propagation_ : (T,) ``G_t``, the final-loss change per unit impulse at step t.
    drift_ : (T, n_test) ``c_t``; ``momentum_`` the velocity decay used.
    base_run_, replay_error_, linearity_ : as the unrolled simulator's.
    """

    kind = "unrolled_anchored"
    _fitted_arrays = ("base_offsets_", "base_ids_", "base_losses_", "insertion_steps_", "insertion_effects_",
                      "insertion_units_", "pair_keys_", "pair_impulses_", "propagation_", "drift_")
    _array_specs = {"base_offsets_": ("int", ("n_steps+1",)), "base_ids_": ("int", ("n_entries",)),
                    "base_losses_": ("float", ("n_steps+1", "n_test_")), "insertion_steps_": ("int", ("n_insertions",)),
                    "insertion_effects_": ("float", ("n_insertions", "n_pool_", "n_test_")),
                    "insertion_units_": ("float", ("n_insertions",)),
                    "pair_keys_": ("int", ("n_pairs",)), "pair_impulses_": ("float", ("n_pairs", "n_test_")),
                    "propagation_": ("float", ("n_steps",)), "drift_": ("float", ("n_steps", "n_test_"))}
    _state_specs = {"base_run_": "str", "momentum_": "number", "replay_error_": "number|null"}
    tags = {**Simulator.tags, "needs": frozenset({"task"}), "per_base": True}

    def __init__(self, momentum: float | str = "auto", insertion_steps: str | Sequence[int] = "all",
                 precision: str = "float64", deterministic: bool = True, progress: bool = False,
                 replay_tolerance: float | None = None, check_linearity: bool = True,
                 device: str | None = None) -> None:
        self.momentum = momentum
        self.insertion_steps = insertion_steps
        self.precision = precision
        self.deterministic = deterministic
        self.progress = progress
        self.replay_tolerance = replay_tolerance
        self.check_linearity = check_linearity
        self.device = device

    # --------------------------------------------------------------------- fit
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> AnchoredSimulator:
        """Fit ``unrolled`` (final target) on the one base run at ``runs`` and anchor the rollout on it; returns self.

        Parameters are those of :meth:`UnrolledSimulator.fit
        <simfluence.attribution.unrolled_simulator.UnrolledSimulator.fit>`.
        """
        from simfluence.attribution.unrolled_simulator import UnrolledSimulator

        self._check_params()
        unrolled = UnrolledSimulator(
            target_steps="final", insertion_steps=self.insertion_steps, precision=self.precision,
            deterministic=self.deterministic, progress=self.progress, replay_tolerance=self.replay_tolerance,
            check_linearity=self.check_linearity, device=self.device).fit(runset, runs, task=task)
        return self.fit_unrolled(unrolled)

    def fit_unrolled(self, unrolled: Any) -> AnchoredSimulator:
        """Anchor the rollout on an already fitted :class:`UnrolledSimulator` (its last target step); returns self.

        Parameters
        ----------
        unrolled : a fitted ``UnrolledSimulator`` whose last target step is its base run's last step (always so).
        """
        self._check_params()
        unrolled.check_fitted()
        offsets = np.asarray(unrolled.base_offsets_, dtype=np.int64)
        ids = np.asarray(unrolled.base_ids_, dtype=np.int64)
        n_steps, n_pool = len(offsets) - 1, int(unrolled.n_pool_)
        if n_steps < 1:
            raise SimfluenceError("the unrolled simulator's base run has no steps")
        losses = np.asarray(unrolled.base_losses_, dtype=np.float64)
        sizes = np.diff(offsets)
        steps = np.repeat(np.arange(n_steps), sizes)  # 0-based step of each entry
        occurrence = np.asarray(unrolled.occurrence_effects_[:, -1, :], dtype=np.float64)  # (n_entries, n_test)
        momentum = self._momentum_value(unrolled.optimizer_)
        propagation = (1.0 - momentum ** np.arange(n_steps, 0, -1)) / (1.0 - momentum) if momentum else \
            np.ones(n_steps)

        keys, owner, copies = np.unique(steps * n_pool + ids, return_inverse=True, return_counts=True)
        pair_effects = np.zeros((len(keys), losses.shape[1]))
        np.add.at(pair_effects, owner, occurrence)
        pair_steps = keys // n_pool
        self.pair_keys_ = keys
        self.pair_impulses_ = (pair_effects / copies[:, None]) * (sizes[pair_steps] / propagation[pair_steps])[:, None]
        self.insertion_steps_ = np.asarray(unrolled.insertion_steps_, dtype=np.int64)
        self.insertion_effects_ = np.ascontiguousarray(unrolled.insertion_effects_[:, :, -1, :], dtype=np.float32)
        rows = self.insertion_steps_ - 1
        self.insertion_units_ = sizes[rows] / propagation[rows]
        base_terms = np.zeros((n_steps, losses.shape[1]))  # the base's own example term: sum_j E_{t,j} / G_t
        np.add.at(base_terms, steps, occurrence)
        base_terms /= propagation[:, None]
        velocity = np.diff(losses, axis=0)
        previous = np.vstack([np.zeros((1, losses.shape[1])), velocity[:-1]])
        self.drift_ = velocity - momentum * previous - base_terms
        self.propagation_ = propagation
        self.momentum_ = momentum
        self.base_offsets_, self.base_ids_, self.base_losses_ = offsets, ids, losses
        self.n_pool_, self.n_test_ = n_pool, int(unrolled.n_test_)
        self.pool_ids_, self.test_ids_ = list(unrolled.pool_ids_), list(unrolled.test_ids_)
        self.train_runs_ = list(unrolled.train_runs_)
        self.base_run_ = unrolled.base_run_
        self.replay_error_ = unrolled.replay_error_
        self.linearity_ = getattr(unrolled, "linearity_", None)
        self.fitted_ = True
        return self

    def _check_params(self) -> None:
        momentum = self.momentum
        if momentum != "auto" and not (isinstance(momentum, int | float) and not isinstance(momentum, bool)
                                       and 0 <= momentum < 1):
            raise SimfluenceError(f"AnchoredSimulator: momentum must be a number in [0, 1) or 'auto', got "
                                  f"{momentum!r}")

    def _momentum_value(self, optimizer: dict) -> float:
        """``momentum`` as a number: ``"auto"`` reads the replayed optimizer (its first parameter group)."""
        if self.momentum != "auto":
            return float(self.momentum)
        group = ((optimizer or {}).get("groups") or [{}])[0]
        value = float(group.get("momentum", group.get("beta1", 0.0)))
        return value if 0 <= value < 1 else 0.0

    # --------------------------------------------------------------------- simulate
    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Roll out curricula of any length from the anchored impulses.

        Parameters
        ----------
        curricula : one or n_curricula curricula (pool positions), of any number of steps.
        initial_losses : (n_test,) or (n_curricula, n_test) losses at step 0.
        learning_rates : ignored (the replay used the task's schedule).

        Returns
        -------
        (n_curricula, T + 1, n_test) float64, T the longest curriculum (a shorter one stays at its final loss).

        Raises
        ------
        SimfluenceError : an example added to a base without insertion effects (the message names it and its step).
        """
        self.check_fitted()
        curricula = as_curricula(curricula)
        initial = as_initial(initial_losses, len(curricula), self.n_test_)
        if not curricula:
            return np.zeros((0, 1, self.n_test_))
        horizon = max(cur.n_steps for cur in curricula)
        base_steps = len(self.base_offsets_) - 1
        beta = np.zeros((len(curricula), horizon, self.n_test_))
        active = np.zeros((len(curricula), horizon), dtype=bool)
        for row, curriculum in enumerate(curricula):
            beta[row, : curriculum.n_steps] = self._example_terms(curriculum)
            active[row, : curriculum.n_steps] = True
        beta += self.drift_[np.minimum(np.arange(horizon), base_steps - 1)][None]
        return unroll(np.ones_like(beta), beta, initial, self.momentum_, active=active)

    def phase_effects(self, phase_steps: Sequence[int], learning_rates: np.ndarray | None = None) -> np.ndarray:
        """The impulses averaged per phase, as the additive effects of one occurrence in a batch sum.

        For :meth:`LinearPrior.set_prior <simfluence.attribution.hybrid.LinearPrior.set_prior>` (``linear_mom_prior``
        with this prior): step t belongs to the phase whose step is nearest to t - 1 (ties: the earlier), and the
        effect of example i in phase k is the mean over those base steps of ``E_{t,i} / (G_t w_t)``, ``w_t = lr_t /
        mean(lr)`` when ``learning_rates`` are given (the family's ``lr_scaled`` units), else 1. An example at a step
        without insertion effects counts with the nearest insertion step's impulse, as in :meth:`simulate`.

        Parameters
        ----------
        phase_steps : (K,) increasing steps (e.g. the checkpoint steps).
        learning_rates : (T,) learning rate of each base step, or None.

        Returns
        -------
        (K, n_pool, n_test) float64.
        """
        self.check_fitted()
        phase_steps = np.asarray(phase_steps, dtype=np.int64)
        if phase_steps.ndim != 1 or not phase_steps.size or np.any(phase_steps[1:] <= phase_steps[:-1]):
            raise SimfluenceError(f"phase_steps must be increasing steps, got {phase_steps.tolist()}")
        if not len(self.insertion_steps_):
            raise SimfluenceError(f"the anchored simulator of base run {self.base_run_!r} has no insertion effects: "
                                  "fit with insertion_steps='all' for phase effects")
        n_steps = len(self.base_offsets_) - 1
        weights = np.ones(n_steps)
        if learning_rates is not None:
            rates = np.asarray(learning_rates, dtype=np.float64)
            if rates.shape != (n_steps,) or not np.all(np.isfinite(rates)) or np.any(rates <= 0):
                raise SimfluenceError(f"learning_rates must be {n_steps} positive numbers, one per base step")
            weights = rates / rates.mean()
        steps = np.arange(1, n_steps + 1)
        phase = _nearest(phase_steps, steps - 1)
        rows = _nearest(self.insertion_steps_, steps)
        effects = np.zeros((len(phase_steps), self.n_pool_, self.n_test_))
        for t in range(n_steps):  # impulse per occurrence in a batch sum: E / G_t = X / |c_t|, over w_t
            effects[phase[t]] += self.insertion_effects_[rows[t]] * (self.insertion_units_[rows[t]]
                                                                    / self._base_size(rows[t]) / weights[t])
        counts = np.bincount(phase, minlength=len(phase_steps))
        return effects / np.maximum(counts, 1)[:, None, None]

    def _base_size(self, row: int) -> int:
        """The base batch size at insertion step ``insertion_steps_[row]`` (> 0: insertion steps are non-empty)."""
        step = int(self.insertion_steps_[row])
        return int(self.base_offsets_[step] - self.base_offsets_[step - 1])

    def _example_terms(self, curriculum: Curriculum) -> np.ndarray:
        """(T', n_test) the mean impulse of each batch of ``curriculum``, ``(1 / |c'_t|) sum_i X_{t,i}``."""
        base_steps = len(self.base_offsets_) - 1
        sizes = curriculum.batch_sizes
        steps = curriculum.step_of_entries() - 1
        ids = np.asarray(curriculum.ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_pool_):
            bad = int(ids.max() if ids.max() >= self.n_pool_ else ids.min())
            raise SimfluenceError(f"pool position {bad} outside 0..{self.n_pool_ - 1}")
        impulses = np.empty((ids.size, self.n_test_))
        keys = steps * self.n_pool_ + ids
        in_base = np.zeros(ids.size, dtype=bool)
        if len(self.pair_keys_):
            position = np.minimum(np.searchsorted(self.pair_keys_, keys), len(self.pair_keys_) - 1)
            in_base = (steps < base_steps) & (self.pair_keys_[position] == keys)
            impulses[in_base] = self.pair_impulses_[position[in_base]]
        added = np.flatnonzero(~in_base)
        if added.size:
            if not len(self.insertion_steps_):
                first = added[np.argmin(steps[added])]
                raise SimfluenceError(
                    f"pool id {self.pool_ids_[ids[first]]!r} is added at step {steps[first] + 1}, and the anchored "
                    f"simulator of base run {self.base_run_!r} has no insertion effects: fit with insertion_steps="
                    "'all' or a list of steps")
            rows = _nearest(self.insertion_steps_, np.minimum(steps[added], base_steps - 1) + 1)
            impulses[added] = self.insertion_effects_[rows, ids[added]] * self.insertion_units_[rows, None]
        totals = np.zeros((curriculum.n_steps, self.n_test_))
        np.add.at(totals, steps, impulses)
        return np.divide(totals, sizes[:, None], out=np.zeros_like(totals), where=sizes[:, None] > 0)

    def _self_check(self) -> None:
        """The loader's check of the values (shapes are checked by ``_array_specs``), then the base's rollout."""
        n_steps = len(self.base_offsets_) - 1
        offsets = self.base_offsets_
        if n_steps < 1 or offsets[0] != 0 or np.any(offsets[1:] < offsets[:-1]) or offsets[-1] != len(self.base_ids_):
            raise SimfluenceError("base_offsets_ are not the offsets of base_ids_")
        steps = self.insertion_steps_
        if np.any(steps < 1) or np.any(steps > n_steps) or np.any(steps[1:] <= steps[:-1]):
            raise SimfluenceError(f"insertion_steps_ must be increasing steps in 1..{n_steps}")
        keys = self.pair_keys_
        if np.any(keys < 0) or np.any(keys >= n_steps * self.n_pool_) or np.any(keys[1:] <= keys[:-1]):
            raise SimfluenceError("pair_keys_ must be increasing keys (t - 1) * n_pool + i of the base's steps")
        if not 0 <= self.momentum_ < 1:
            raise SimfluenceError(f"momentum_ {self.momentum_} outside [0, 1)")
        self.simulate(Curriculum(self.base_offsets_, self.base_ids_, self.n_pool_), self.base_losses_[0])

    def _extra_state(self) -> dict[str, Any]:
        return {"base_run_": self.base_run_, "momentum_": self.momentum_, "replay_error_": self.replay_error_,
                "linearity_": getattr(self, "linearity_", None)}


def _nearest(steps: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of the step of ``steps`` (increasing) nearest to each of ``wanted``; ties: the earlier."""
    if len(steps) == 1:
        return np.zeros(np.shape(wanted), np.int64)
    midpoints = (steps[:-1] + steps[1:]) / 2.0
    return np.searchsorted(midpoints, wanted, side="left").astype(np.int64)
