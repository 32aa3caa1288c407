"""Effect-level hybrid: the linear family fitted with a gradient prior on every example's effect (``linear_mom_prior``).

The learned simulators (:mod:`simfluence.simulators.linear`) fit every example effect from the logs alone, shrunk
towards 0; the gradient simulators (:mod:`.simulators`) fix the effects to TracIn-style scores. Here the logs
correct a prior example by example (DESIGN.md section 9). Per test example z the additive effect of pool example i at
step t is::

    B_i(t) = delta_i + s_{k(t)} p_{k(t)}[i]          (p_k: the prior of checkpoint phase k, s_k: its fitted scale)

and the fit is the linear family's one ridge regression with the penalty on ``delta`` (and the multiplicative
effects and step terms) only, never on the scales::

    min_{theta, s}  ||y - X theta - U s||^2 + theta^T Lambda theta

``X`` is the family's design (``[diag(L_{t-1}) F, F]`` plus step columns), ``theta`` its unknowns (A, delta, step
terms), ``y`` its target (with the momentum term), and ``U`` has one column per phase: ``U[:, k] = F_k p_k``, the
prior's summed effect over the steps of each transition that lie in phase k. With a prior of zeros it is
``linear_mom`` exactly.

**The solve (exact, one batched ridge solve).** With ``M = X^T X + Lambda``, for fixed ``s`` the ridge answer is
``theta = a - b s`` with ``a = M^{-1} X^T y`` and ``b = M^{-1} X^T U``: one batched solve of the family's solver with
the K prior columns as extra right-hand sides. Profiling ``theta`` out leaves ``(y - U s)^T P (y - U s)``,
``P = I - X M^{-1} X^T``, so::

    s = (U^T U - U^T X b)^{-1} (U^T y - U^T X a)          (a K x K system per test; the Schur complement)

Alternating least squares would need several solves and converges only linearly; this is exact after one solve whose
cost is (1 + K / n_targets) times the family's. The answer is linear in ``y``, so the family's momentum basis (one
solve for every momentum) and warm starts carry over: a warm start ``(theta_0, s_0)`` is used by solving for
``y - U s_0`` (whose ridge answer is near ``theta_0``) and adding the correction to ``s_0``. A phase whose prior
column is zero for every test is left out of the solve (its scale is 0); a test whose K x K system is singular gets
the least-norm scales.

**Which block.** The prior enters the additive effects only: a gradient step on example i changes z's loss by
``-lr_t g_i . g_z / |c_t|`` to first order, a change independent of the loss before the step (the gradients are
taken where the model is, so the loss level is already in them). The multiplicative effects ``A`` model what a first
order prior has no term for (a change proportional to the current loss) and stay learned from the logs.

**The prior.** TracIn terms ``g_i(theta_k) . g_z(theta_k)`` at every checkpoint the first ``checkpoint_runs``
training runs saved (averaged over those runs), in the units of ``B``: ``p_k = -lr_ref g_i . g_z / b``, with
``lr_ref`` the learning-rate reference of the effects and ``b`` the mean batch size (1 for batch-mean effects), so
``s = 1`` is plain SGD's first-order theory (momentum SGD gives about ``1 / (1 - mu_opt)`` less the simulator's own
velocity). Step t uses the checkpoint nearest to the weights it starts from (step t - 1), as TracIn does.
``prior_phases="single"`` pools the checkpoints into one learning-rate-weighted prior (one column, TracIn-CP);
``prior_scale="global"`` fits one scale per phase shared by all tests. ``prior="influence"`` uses the influence
functions of :class:`~simfluence.attribution.simulators.InfluenceSimulator` (its defaults: the final checkpoint,
Gauss-Newton Hessian, damping) as one prior for every step, in the same units (the scores of the gradient
simulators all enter :class:`~simfluence.simulators.fixed_effects.FixedEffectsSimulator` as ``-lr_t score / |c_t|``
at ``s = 1``). :meth:`LinearPrior.set_prior` takes any precomputed effects instead.

**Penalties (options).** ``delta_lam_ratio`` multiplies ``lam`` on the rows of ``delta`` only (large: trust the
scaled prior more than the logs; the multiplicative effects and step terms keep ``lam``), ``mult_lam_ratio`` on the
rows of ``A`` (large: the per-example effects proportional to the loss, which the prior has no term for, pushed
towards 0; the multiplicative step terms stay). ``scale_lam > 0`` adds
``scale_lam |U_k|^2 (s_k - scale_center)^2`` per test (``|U_k|^2``: the prior column's own energy, so
``scale_lam`` is unit-free); the fit solves for ``s - scale_center`` with the prior at ``scale_center`` moved into the
first-order target, which keeps it linear in the previous change (the momentum basis) and exact.

``lam`` and ``momentum`` are chosen on validation runs as for the family; by default the scales have no penalty. Exact
leave-one-out works (the effects are K tables, one per phase); intervals and sharded fits do not (see the class).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from simfluence.design import FeatureSpec, Transitions, step_features
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import training_runs
from simfluence.simulators.linear import SimfluenceLinear, family_init

__all__ = ["LinearPrior", "nearest_checkpoint"]

PRIORS = ("tracin", "influence", "none")
PRIOR_PHASES = ("checkpoints", "single")
PRIOR_SCALES = ("per_test", "global")
SINGULAR_RCOND = 1e-10  # relative size below which a direction of a test's scale system counts as absent

# the hybrid's options after those of the linear family (documented in :class:`LinearPrior`)
PRIOR_OPTIONS: dict[str, tuple[str, Any]] = {
    "prior": ("str", "tracin"),
    "prior_phases": ("str", "checkpoints"),
    "prior_scale": ("str", "per_test"),
    "delta_lam_ratio": ("float", 1.0),
    "mult_lam_ratio": ("float", 1.0),
    "scale_lam": ("float", 0.0),
    "scale_center": ("float", 1.0),
    "params": ("str | Sequence[str]", "all"),
    "checkpoint_runs": ("int", 1),
    "chunk_size": ("int | None", None),
}


def nearest_checkpoint(steps: np.ndarray, checkpoint_steps: np.ndarray) -> np.ndarray:
    """Index of the checkpoint nearest to the weights each 1-based step starts from (step - 1); ties: the earlier.

    Parameters
    ----------
    steps : (n,) 1-based steps.
    checkpoint_steps : (K,) increasing steps the checkpoints were saved at.

    Returns
    -------
    (n,) int64 indices in ``0..K-1``.
    """
    at = np.asarray(steps) - 1
    if len(checkpoint_steps) == 1:
        return np.zeros(at.shape, np.int64)
    midpoints = (checkpoint_steps[:-1] + checkpoint_steps[1:]) / 2.0
    return np.searchsorted(midpoints, at, side="left").astype(np.int64)


@dataclasses.dataclass
class PriorTransitions(Transitions):
    """Transitions with the prior's columns: ``columns[j, k, z]`` = phase k's prior effect summed over transition j."""

    columns: np.ndarray | None = None  # (n_transitions, K, n_test)


class LinearPrior(SimfluenceLinear):
    """The linear family with a prior on the additive example effects (see the module docstring for the model).

    Parameters are those of :class:`SimfluenceLinear` (the registry's ``linear_mom_prior`` presets them as
    ``linear_mom``), plus

    prior : ``"tracin"`` (gradient dot products per checkpoint, from a task and the runs' checkpoints),
        ``"influence"`` (influence functions at the final checkpoint: one phase) or ``"none"`` (zeros: ``linear_mom``
        exactly). Ignored once :meth:`set_prior` gave one.
    prior_phases : ``"checkpoints"`` (one prior and one scale per checkpoint phase) or ``"single"`` (the phases'
        priors pooled, weighted by the learning rate summed over their steps: one column).
    prior_scale : ``"per_test"`` (the scales of each test example fitted separately) or ``"global"`` (one per phase
        for all tests).
    delta_lam_ratio : the penalty on ``delta`` is ``lam * delta_lam_ratio`` (the shrinkage towards the scaled prior).
    mult_lam_ratio : the penalty on the multiplicative effects ``A`` is ``lam * mult_lam_ratio``.
    scale_lam : penalty ``scale_lam |U_k|^2 (s_k - scale_center)^2`` on the scales (0: none).
    scale_center : where ``scale_lam`` pulls the scales (1: plain SGD's first-order theory).
    params : parameters the gradients are taken over: ``"all"``, ``"last_layer"`` or a list of names.
    checkpoint_runs : training runs whose checkpoint scores are averaged (the first ones).
    chunk_size : examples per vectorised gradient pass (default: about 64 MiB of gradients).

    Attributes
    ----------
    A_, B_ : (n_pool, n_test) multiplicative effects and the learned part ``delta`` of the additive effects.
    prior_ : (n_phases, n_pool, n_test) the prior effects ``p_k`` in the units of ``B_``.
    prior_steps_ : (n_phases,) checkpoint step of each phase's prior.
    prior_scale_ : (n_phases, n_test) fitted scale ``s_k`` of each phase's prior (tests on the last axis, as every
        per-test array of the family).
    step_alpha_, step_beta_, lam_, momentum_, validation_, ... : as :class:`SimfluenceLinear`.
    checkpoint_run_names_ : the runs whose checkpoints gave the prior (empty for a given or zero prior).

    Not supported: :class:`~simfluence.uncertainty.Bootstrap` intervals (members are refitted without a task, and
    the class needs one) and :func:`~simfluence.sharding.fit_sharded` (a block of tests is an in-memory run set,
    whose checkpoints cannot be found; with ``prior_scale="global"`` blocks would not share their scales either).
    """

    kind = "linear_mom_prior"
    tags = {**SimfluenceLinear.tags, "needs": frozenset({"task", "checkpoints"})}
    _fitted_arrays = (*SimfluenceLinear._fitted_arrays, "prior_", "prior_steps_", "prior_scale_")
    _test_axis_arrays = ()  # no sharded fits (see the class docstring)
    _array_specs = {**SimfluenceLinear._array_specs,
                    "prior_": ("float", ("n_phases", "n_pool_", "n_test_")), "prior_steps_": ("int", ("n_phases",)),
                    "prior_scale_": ("float", ("n_phases", "n_test_"))}
    _state_specs = {**SimfluenceLinear._state_specs, "checkpoint_run_names_": "list"}

    __init__ = family_init(extra=PRIOR_OPTIONS, after="precision")

    # ----------------------------------------------------------------------------------- the prior
    def set_prior(self, effects: np.ndarray, checkpoint_steps: Sequence[int] | None = None) -> LinearPrior:
        """Use precomputed prior effects instead of gradient scores; returns self.

        Parameters
        ----------
        effects : (n_pool, n_test), or (K, n_pool, n_test) with the K ``checkpoint_steps``: the additive effect of
            one occurrence of each pool example, in the units of ``B_`` (used as given, no sign or scale change).
        checkpoint_steps : (K,) increasing steps; step t uses the table whose step is nearest to t - 1.
        """
        effects = np.asarray(effects, dtype=np.float64)
        if effects.ndim == 2:
            effects = effects[None]
        if effects.ndim != 3 or not np.isfinite(effects).all():
            raise SimfluenceError(f"prior effects must be finite, (n_pool, n_test) or (K, n_pool, n_test), got shape "
                                  f"{effects.shape}")
        steps = np.zeros(1, np.int64) if checkpoint_steps is None else np.asarray(checkpoint_steps, np.int64)
        if steps.shape != (effects.shape[0],) or np.any(steps[1:] <= steps[:-1]):
            raise SimfluenceError(f"need {effects.shape[0]} increasing checkpoint steps, got {steps.tolist()}")
        self._given_prior = (effects, steps)
        return self

    def _gradient_prior(self, runset: RunSet, runs: list[int], task: Any) -> tuple[np.ndarray, np.ndarray, bool]:
        """(K, n_pool, n_test) raw prior, its K steps, and whether it is in score units (to be converted)."""
        given = getattr(self, "_given_prior", None)
        if given is not None:
            self.checkpoint_run_names_ = []
            return given[0], given[1], False
        if self.prior == "none":
            self.checkpoint_run_names_ = []
            return np.zeros((1, runset.n_pool, runset.n_test)), np.zeros(1, np.int64), False
        from simfluence.attribution.simulators import InfluenceSimulator, TracInSimulator

        if self.prior == "influence":  # its defaults (final checkpoint, Gauss-Newton, damping), as ``influence``
            method = InfluenceSimulator(params=self.params, **({} if self.chunk_size is None else
                                                                 {"chunk_size": self.chunk_size}))
        else:
            method = TracInSimulator(params=self.params, chunk_size=self.chunk_size)
        used = runs[: int(self.checkpoint_runs)]
        total, steps = None, None
        for position in used:
            scores, run_steps = method.compute_scores(runset, position, task)
            if steps is not None and list(run_steps) != list(steps):
                raise SimfluenceError(f"run {runset[position].name!r} saved checkpoints at {list(run_steps)}, "
                                      f"run {runset[used[0]].name!r} at {list(steps)}")
            total, steps = (scores if total is None else total + scores), run_steps
        self.checkpoint_run_names_ = [runset[i].name for i in used]
        return total / len(used), np.asarray(steps, np.int64), True

    def _phase_prior(self, raw: np.ndarray, steps: np.ndarray, from_scores: bool,
                     batch_size: float) -> tuple[np.ndarray, np.ndarray]:
        """The prior in the units of ``B_`` (scores: ``-lr_ref score / batch_size``), pooled if asked."""
        prior = raw
        if from_scores:
            rate = self.lr_reference_ if self.lr_reference_ is not None else float(np.nanmean(self.lr_schedule_))
            rate = rate if np.isfinite(rate) else 1.0
            prior = raw * (-rate / (1.0 if self.batch_mean else max(batch_size, 1.0)))
        if self.prior_phases == "single" and len(steps) > 1:
            horizon = self.lr_schedule_.size
            rates = np.nan_to_num(self.lr_schedule_, nan=1.0) if np.isfinite(self.lr_schedule_).any() else \
                np.ones(horizon)
            weights = np.bincount(nearest_checkpoint(np.arange(1, horizon + 1), steps), weights=rates,
                                  minlength=len(steps))
            prior = np.tensordot(weights / weights.sum(), prior, axes=1)[None]
            steps = steps[-1:]
        return prior, steps

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> LinearPrior:
        """Compute the prior (gradient scores on the training runs' checkpoints, unless :meth:`set_prior` gave one),
        then fit the effects and the prior's scales as the linear family does; returns self.

        Parameters
        ----------
        runset : the logged runs (loaded from disk, with checkpoints, for ``prior="tracin"``).
        runs : positions of the training runs (default all).
        task : the runs' :class:`~simfluence.task.Task` or a ``"file.py:function"`` spec; default: the built-in
            workload the run set records.
        """
        self._check_params()
        runs = training_runs(runset, runs)
        self._raw_prior = self._gradient_prior(runset, runs, task)
        if self._raw_prior[0].shape[1:] != (runset.n_pool, runset.n_test):
            raise SimfluenceError(f"the prior is for {self._raw_prior[0].shape[1]} pool / {self._raw_prior[0].shape[2]}"
                                  f" test examples, the run set has {runset.n_pool} / {runset.n_test}")
        return super().fit(runset, runs)

    def _check_params(self) -> None:
        super()._check_params()
        for name, allowed in (("prior", PRIORS), ("prior_phases", PRIOR_PHASES), ("prior_scale", PRIOR_SCALES)):
            if getattr(self, name) not in allowed:
                raise SimfluenceError(f"{type(self).__name__}: {name} must be one of {', '.join(allowed)}, got "
                                      f"{getattr(self, name)!r}")
        runs = self.checkpoint_runs
        if isinstance(runs, bool) or not isinstance(runs, int | np.integer) or runs < 1:
            raise SimfluenceError(f"{type(self).__name__}: checkpoint_runs must be an integer >= 1, got {runs!r}")
        for name, low in (("delta_lam_ratio", 0.0), ("mult_lam_ratio", 0.0), ("scale_lam", 0.0),
                          ("scale_center", -np.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not low <= value < np.inf:
                raise SimfluenceError(f"{type(self).__name__}: {name} must be a finite number"
                                      f"{' >= 0' if low == 0 else ''}, got {value!r}")

    def _prepare(self, runset: RunSet, runs: list[int]) -> None:
        super()._prepare(runset, runs)
        raw = getattr(self, "_raw_prior", None)
        if raw is not None:  # a candidate of the lam search adopts its parent's prior instead (``_candidate``)
            sizes = np.concatenate([runset[i].curriculum.batch_sizes for i in runs])
            self.prior_, self.prior_steps_ = self._phase_prior(*raw, float(sizes.mean()) if sizes.size else 1.0)

    def _candidate(self, runset: RunSet, runs: list[int], lam: float, tol: float, kernel: str,
                   momentum: float | None = None) -> LinearPrior:
        candidate = super()._candidate(runset, runs, lam, tol, kernel, momentum)
        candidate.prior_, candidate.prior_steps_ = self.prior_, self.prior_steps_
        return candidate

    def _candidate_tol(self, lam: float, previous: tuple[float, np.ndarray] | None, scale: np.ndarray) -> float:
        if previous is not None:  # the scales' rows have no penalty: the change of lam leaves them no residual
            previous = (previous[0], previous[1][: -len(self.prior_steps_)])
        return super()._candidate_tol(lam, previous, scale)

    def _penalty(self, lam: float) -> np.ndarray:
        """The family's penalty with the additive pool rows (``delta``) at ``lam * delta_lam_ratio`` and the
        multiplicative ones (``A``) at ``lam * mult_lam_ratio``."""
        penalty = super()._penalty(lam)
        start = self._spec().n_features if self.multiplicative else 0
        penalty[start: start + self.n_pool_] *= float(self.delta_lam_ratio)
        if self.multiplicative:
            penalty[: self.n_pool_] *= float(self.mult_lam_ratio)
        return penalty

    def _shifted_center(self) -> float:
        """The scales' penalty centre, solved for as an offset (0 when the scales have no penalty)."""
        return float(self.scale_center) if self.scale_lam > 0 else 0.0

    def _first_order_target(self, transitions: Transitions) -> np.ndarray:
        # with a penalty on the scales towards c the unknowns are s - c: the prior at scale c moves to the target
        # (only the first-order target: the fit stays linear in the previous change, as the momentum basis needs)
        target = super()._first_order_target(transitions)
        center = self._shifted_center()
        if center and isinstance(transitions, PriorTransitions):
            target = target - center * transitions.columns.sum(axis=1).astype(target.dtype, copy=False)
        return target

    def _transitions(self, runset: RunSet, runs: Sequence[int]) -> PriorTransitions:
        """The family's transitions with the prior's columns ``U``: phase k's effects summed over each transition."""
        base = super()._transitions(runset, runs)
        chosen = [runset[i] for i in runs]
        max_steps = max(run.n_steps for run in chosen)
        spec = FeatureSpec(self.n_pool_, 0, self.lr_reference_, self.batch_mean)  # the design's pool columns
        rates = [run.learning_rates for run in chosen] if spec.lr_reference is not None else None
        rows = step_features([run.curriculum for run in chosen], spec, rates, n_steps=max_steps)
        gaps = base.end_step - base.start_step
        transition = np.repeat(np.arange(base.n_transitions), gaps)  # every step covered, with its transition
        step = np.repeat(base.start_step, gaps) + np.arange(int(gaps.sum())) - np.repeat(np.cumsum(gaps) - gaps,
                                                                                            gaps) + 1
        row = base.run[transition] * max_steps + step - 1
        phase = nearest_checkpoint(step, self.prior_steps_)
        columns = np.zeros((base.n_transitions, len(self.prior_steps_), self.n_test_))
        for k in range(len(self.prior_steps_)):
            chosen_steps = phase == k
            aggregate = sp.csr_matrix((np.ones(int(chosen_steps.sum())), (transition[chosen_steps], row[chosen_steps])),
                                      shape=(base.n_transitions, rows.shape[0]))
            columns[:, k] = (aggregate @ rows) @ self.prior_[k]
        fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(Transitions)}
        return PriorTransitions(**fields, columns=columns)

    def _design_product(self, transitions: Transitions, theta: np.ndarray) -> np.ndarray:
        """``X theta`` for (n_params, m, n_test) ``theta``: (n_transitions, m, n_test)."""
        n_params, m, n_test = theta.shape
        features = transitions.features
        flat = theta.reshape(n_params, m * n_test)
        if not self.multiplicative:
            return np.asarray(features @ flat).reshape(-1, m, n_test)
        n_features = features.shape[1]
        mult = np.asarray(features @ flat[:n_features]).reshape(-1, m, n_test)
        add = np.asarray(features @ flat[n_features:]).reshape(-1, m, n_test)
        return mult * transitions.prev[:, None, :] + add

    def _solve(self, transitions: PriorTransitions, target: np.ndarray, lam: float, x0: np.ndarray | None):
        """The family's solve with the prior's columns: rows ``[theta; s]`` (n_params + K, n_targets * n_test).

        One batched solve for the targets and the K prior columns, then the K x K Schur complement per test (see the
        module docstring). ``x0`` is a warm start of the same layout.
        """
        columns = transitions.columns
        n_trans, n_phases, n_test = columns.shape
        n_targets = target.shape[1] // n_test
        y = np.asarray(target, dtype=np.float64).reshape(n_trans, n_targets, n_test)
        start_scale = np.zeros((n_phases, n_targets, n_test)) if x0 is None else \
            np.asarray(x0[-n_phases:], dtype=np.float64).reshape(n_phases, n_targets, n_test)
        active = np.flatnonzero(np.any(columns != 0, axis=(0, 2)))  # phases with a prior column for some test
        prior = columns[:, active]
        y = y - np.einsum("tjz,jbz->tbz", prior, start_scale[active])
        stacked = np.concatenate([y.reshape(n_trans, -1), prior.reshape(n_trans, -1)], axis=1)
        start = None
        if x0 is not None:
            start = np.concatenate([x0[:-n_phases], np.zeros((x0.shape[0] - n_phases, active.size * n_test))], axis=1)
        raw, info = super()._solve(transitions, stacked.astype(target.dtype, copy=False), lam, start)
        n_params = raw.shape[0]
        a = raw[:, : n_targets * n_test].reshape(n_params, n_targets, n_test)
        b = raw[:, n_targets * n_test:].reshape(n_params, active.size, n_test)
        scale = start_scale.copy()
        theta = a
        if active.size:
            # U^T P U = U^T U - U^T X b and U^T P y = U^T y - U^T X a, per test, written as sums that cannot cancel:
            # r^T r + b^T Lambda b and r^T e + b^T Lambda a (r = U - X b, e = y - X a); s = (U^T P U)^{-1} U^T P y
            penalty = self._penalty(lam)[:, None, None]
            residual = prior - self._design_product(transitions, b)
            gram = np.einsum("tjz,tkz->zjk", residual, residual) + np.einsum("pjz,pkz->zjk", b, penalty * b)
            moment = (np.einsum("tjz,tbz->zjb", residual, y - self._design_product(transitions, a))
                      + np.einsum("pjz,pbz->zjb", b, penalty * a))
            if self.scale_lam > 0:  # scale_lam * |U_k|^2 (s_k - c)^2: solved for s - c, from its start
                weight = float(self.scale_lam) * np.einsum("tjz,tjz->zj", prior, prior)
                gram = gram + weight[:, :, None] * np.eye(active.size)[None]
                moment = moment - weight[:, :, None] * start_scale[active].transpose(2, 0, 1)
            if self.prior_scale == "global":
                gram, moment = gram.sum(axis=0, keepdims=True), moment.sum(axis=0, keepdims=True)
            change = np.linalg.pinv(gram, rtol=SINGULAR_RCOND, hermitian=True) @ moment  # (n_test or 1, J, n_targets)
            change = np.broadcast_to(change, (n_test, active.size, n_targets))
            theta = a - np.einsum("pjz,zjb->pbz", b, change)
            scale[active] += change.transpose(1, 2, 0)
        return np.concatenate([theta.reshape(n_params, -1), scale.reshape(n_phases, -1)]), info

    def _set_theta(self, theta: np.ndarray) -> None:
        n_phases = len(self.prior_steps_)
        super()._set_theta(theta[:-n_phases])
        self.prior_scale_ = np.ascontiguousarray(theta[-n_phases:]) + self._shifted_center()

    # ----------------------------------------------------------------------------------- dynamics
    def _effect_tables(self) -> tuple[np.ndarray | None, np.ndarray]:
        key = (self.A_, self.B_, self.prior_, self.prior_scale_)
        cached = getattr(self, "_tables_cache", None)
        if cached is None or any(old is not new for old, new in zip(cached[0], key, strict=True)):
            add = self.B_[None] + self.prior_scale_[:, None, :] * self.prior_
            mult = np.broadcast_to(self.A_, add.shape) if self.multiplicative else None
            cached = (key, (mult, add))
            self._tables_cache = cached
        return cached[1]

    def _table_of_steps(self, steps: np.ndarray) -> np.ndarray:
        return nearest_checkpoint(steps, self.prior_steps_)

    def effects(self, step: int | None = None) -> np.ndarray:
        """(n_pool, n_test) additive effect ``delta + s_k p_k`` of the phase used at ``step`` (default: the last)."""
        self.check_fitted()
        k = len(self.prior_steps_) - 1 if step is None else int(self._table_of_steps(np.array([step]))[0])
        return self._effect_tables()[1][k]

    # ----------------------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "checkpoint_run_names_": list(getattr(self, "checkpoint_run_names_", []))}

    def _self_check(self) -> None:
        steps = self.prior_steps_
        if np.any(steps[1:] <= steps[:-1]):  # a comparison: differences of int64 can wrap
            raise SimfluenceError(f"prior_steps_ {steps.tolist()} are not increasing")
        super()._self_check()
