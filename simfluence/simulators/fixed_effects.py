"""Gradient-based attribution methods as additive training-run simulators with fixed (not learned) effects.

Simfluence's claim is that TracIn and influence functions are special cases of its simulator. Here each
method's (n_pool, n_test) score matrix -- or one per checkpoint, (K, n_pool, n_test) -- becomes the per-example
effect of an additive simulator::

    L_t = L_{t-1} - s * sum_{i in c_t} w_t * score_{k(t)}[i]

- ``score`` follows the sign convention of :mod:`simfluence.attribution` (positive = the example lowers the
  test loss), hence the minus sign: with ``s > 0`` a proponent lowers the simulated loss;
- ``k(t)`` is the checkpoint nearest to the weights step t's gradient is taken at (step t - 1); a single score
  matrix is used at every step;
- ``w_t`` is ``lr_t / |c_t|`` (``weighting="lr"``: a step of SGD on the batch mean, TracIn's form, where
  ``s = 1`` is the first-order theory for plain SGD), ``1 / |c_t|`` (``"batch_mean"``) or 1 (``"sum"``);
- ``s`` is fitted by least squares on the **training runs only** (``calibrate``): one global scale
  (``scale="global"``, the special-case reading: it leaves every Spearman metric unchanged) or one per test
  example (``scale="per_test"``). By default it minimises the rolled-out all-steps error
  ``sum (L_t - L_0 - predicted change)^2`` (``calibration="rollout"``, the evaluation metric), or the per-step
  changes between logged steps (``"step"``). A fitted ``s <= 0`` means the scores point the wrong way.

``FixedEffectsSimulator`` takes any precomputed scores (``set_scores``, then ``fit`` = ``calibrate``). The
methods that compute their scores from a model (TracIn, influence functions, TrackStar) subclass it in
:mod:`simfluence.attribution.simulators`, which reaches the model through a :class:`~simfluence.task.Task`;
this module knows only numbers. The dynamics (rollout, loss floor, exact leave-one-out) are those of
:class:`~simfluence.simulators.dynamics.LinearDynamics`: an additive model whose effect table at step t is
``-s * score_{k(t)}``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.design import mean_lr_schedule
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import training_runs
from simfluence.simulators.dynamics import LinearDynamics
from simfluence.simulators.mean_curve import MeanCurve

WEIGHTINGS = ("lr", "batch_mean", "sum")
SCALES = ("global", "per_test")
CALIBRATIONS = ("rollout", "step")
OFFSETS = ("none", "mean_curve")


class FixedEffectsSimulator(LinearDynamics):
    """Additive simulator with fixed per-example scores and one fitted scale (see the module docstring).

    Parameters
    ----------
    weighting : ``"lr"`` (w_t = lr_t / |c_t|), ``"batch_mean"`` (1 / |c_t|) or ``"sum"`` (1).
    scale : ``"global"`` or ``"per_test"``.
    calibration : ``"rollout"`` or ``"step"``.
    clip_negative : keep simulated losses >= 0 when the training losses never were negative.
    offset : ``"none"`` (the special-case reading: the scores alone move the loss) or ``"mean_curve"`` (the
        average training-run loss change m_t is the baseline trajectory and the scores explain how a curriculum
        differs from the training runs' average: ``L_t = L_0 + m_t - s (R_t(c) - mean R_t)`` with ``R_t(c)`` the
        cumulative score effect of curriculum c; the role the per-step terms play in ``linear_mom``).

    Attributes
    ----------
    scores_ : (K, n_pool, n_test) scores (K = 1 for a single matrix).
    checkpoint_steps_ : (K,) step of the weights each score matrix was computed at.
    scale_ : (n_test,) fitted scale s (all equal for ``scale="global"``).
    lr_schedule_ : (n_steps_fit,) mean learning rate per step of the calibration runs (NaN where unknown).
    calibration_mse_ : the calibration objective per (run, step, test) at the fitted scale.
    offset_ : (n_steps_fit + 1, n_test) the baseline trajectory ``m_t + s mean R_t`` added to ``L_0`` (zeros for
        ``offset="none"``).
    """

    kind = "fixed_effects"
    tags = {**LinearDynamics.tags, "needs": frozenset({"scores"})}  # set_scores() before fit()
    _fitted_arrays = ("scores_", "checkpoint_steps_", "scale_", "lr_schedule_")
    _optional_arrays = ("offset_",)  # absent in files written before offsets existed: no offset
    _array_specs = {"scores_": ("float", ("n_checkpoints", "n_pool_", "n_test_")),
                    "checkpoint_steps_": ("int", ("n_checkpoints",)), "scale_": ("float", ("n_test_",)),
                    "lr_schedule_": ("float", ("n_steps",)), "offset_": ("float", ("n_steps+1", "n_test_"))}
    _state_specs = {"loss_floor_": "number|null", "calibration_mse_": "number|null"}

    def __init__(self, weighting: str = "lr", scale: str = "global", calibration: str = "rollout",
                 clip_negative: bool = True, offset: str = "none") -> None:
        self.weighting = weighting
        self.scale = scale
        self.calibration = calibration
        self.clip_negative = clip_negative
        self.offset = offset

    # ----------------------------------------------------------------------------------- scores
    def set_scores(self, scores: np.ndarray, checkpoint_steps: Sequence[int] | None = None) -> FixedEffectsSimulator:
        """Use ``scores`` (n_pool, n_test), or (K, n_pool, n_test) with the K ``checkpoint_steps``; returns self."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim == 2:
            scores = scores[None]
        if scores.ndim != 3:
            raise SimfluenceError(f"scores must be (n_pool, n_test) or (K, n_pool, n_test), got {scores.shape}")
        if not np.isfinite(scores).all():
            raise SimfluenceError("scores contain NaN or infinite values")
        steps = np.zeros(1, np.int64) if checkpoint_steps is None else np.asarray(checkpoint_steps, np.int64)
        if steps.shape != (scores.shape[0],) or np.any(np.diff(steps) <= 0):
            raise SimfluenceError(f"need {scores.shape[0]} increasing checkpoint steps, got {steps.tolist()}")
        self.scores_ = scores
        self.checkpoint_steps_ = steps
        return self

    def effects(self, step: int | None = None) -> np.ndarray:
        """(n_pool, n_test) per-example effect ``-s * score`` (of the checkpoint used at ``step``; default the last)."""
        self.check_fitted()
        k = len(self.scores_) - 1 if step is None else int(self._checkpoint_of_steps(np.array([step]))[0])
        return -self.scale_[None, :] * self.scores_[k]

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> FixedEffectsSimulator:
        """Calibrate the scale on the runs at positions ``runs`` (scores must be set); returns self."""
        if getattr(self, "scores_", None) is None:
            raise SimfluenceError(f"{type(self).__name__} has no scores: call set_scores() before fit()")
        return self.calibrate(runset, runs)

    def calibrate(self, runset: RunSet, runs: Sequence[int] | None = None) -> FixedEffectsSimulator:
        """Fit the scale s by least squares on the training runs ``runs``; returns self."""
        self._check_options()
        runs = training_runs(runset, runs)
        chosen = [runset[i] for i in runs]
        if runset.n_pool != self.scores_.shape[1] or runset.n_test != self.scores_.shape[2]:
            raise SimfluenceError(f"scores are for {self.scores_.shape[1]} pool / {self.scores_.shape[2]} test "
                                  f"examples, the run set has {runset.n_pool} / {runset.n_test}")
        horizon = max(run.n_steps for run in chosen)
        self.lr_schedule_ = mean_lr_schedule(chosen)
        mean_change = (MeanCurve().fit(runset, runs).mean_change_ if self.offset == "mean_curve"
                       else np.zeros((horizon + 1, runset.n_test)))
        rates = None
        if self.weighting == "lr":
            missing = next((run.name for run in chosen if run.known_learning_rates is None), None)
            if missing is not None:
                raise SimfluenceError(f"weighting='lr' needs the learning rate of every step; run {missing!r} "
                                      "did not log them all (use weighting='batch_mean')")
            rates = [run.learning_rates for run in chosen]
        # unscaled effects sum_{i in c_t} w_t score_{k(t)}[i] / d_t of every step: (R, T, n_test)
        _, raw, _, _, _ = self._coefficients([run.curriculum for run in chosen], rates, horizon,
                                             tables=(None, self.scores_))
        cumulative = np.concatenate([np.zeros_like(raw[:, :1]), np.cumsum(raw, axis=1)], axis=1)
        # with an offset the scores explain differences from the average curriculum: centre their effect too
        centre = cumulative.mean(axis=0) if self.offset == "mean_curve" else np.zeros_like(cumulative[0])
        numerator = np.zeros(runset.n_test)
        denominator = np.zeros(runset.n_test)
        pieces = []
        for row, run in enumerate(chosen):
            steps = run.logged_steps
            losses = np.asarray(run.losses, dtype=np.float64) - mean_change[steps]  # what the scores must explain
            effect = cumulative[row, steps] - centre[steps]
            if self.calibration == "rollout":
                target = losses[steps > 0] - run.initial_losses  # mean_change[0] is 0
                regressor = effect[steps > 0]
            else:
                target = np.diff(losses, axis=0)
                regressor = np.diff(effect, axis=0)
            numerator += (regressor * target).sum(axis=0)
            denominator += (regressor ** 2).sum(axis=0)
            pieces.append((target, regressor))
        if self.scale == "global":
            scale = -numerator.sum() / denominator.sum() if denominator.sum() > 0 else 0.0
            self.scale_ = np.full(runset.n_test, scale)
        else:
            self.scale_ = -np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
        self.offset_ = mean_change + self.scale_ * centre  # L_t = L_0 + offset_t - s R_t(c)
        squared = [((target + self.scale_ * regressor) ** 2) for target, regressor in pieces]
        total = sum(float(block.sum()) for block in squared)
        self.calibration_mse_ = total / max(sum(block.size for block in squared), 1)
        smallest = min(float(np.min(run.losses)) for run in chosen if run.losses.size)
        self.loss_floor_ = 0.0 if self.clip_negative and smallest >= 0 else None
        self._remember_ids(runset, runs)
        self.fitted_ = True
        return self

    def _check_options(self) -> None:
        for name, value, allowed in (("weighting", self.weighting, WEIGHTINGS), ("scale", self.scale, SCALES),
                                     ("calibration", self.calibration, CALIBRATIONS), ("offset", self.offset, OFFSETS)):
            if value not in allowed:
                raise SimfluenceError(f"{name} must be one of {allowed}, got {value!r}")

    # ----------------------------------------------------------------------------------- simulation
    def _checkpoint_of_steps(self, steps: np.ndarray) -> np.ndarray:
        """Index of the checkpoint nearest to the weights of step t (those after step t - 1); ties: earlier."""
        at = np.asarray(steps) - 1
        ckpt = self.checkpoint_steps_
        if len(ckpt) == 1:
            return np.zeros(at.shape, np.int64)
        midpoints = (ckpt[:-1] + ckpt[1:]) / 2.0
        return np.searchsorted(midpoints, at, side="left").astype(np.int64)

    # ----------------------------------------------------------------------------------- dynamics
    def _effect_tables(self) -> tuple[None, np.ndarray]:
        # keyed by the scale's values (a user may set ``scale_[:]`` in place; n_test numbers to compare) and the
        # scores' identity (replaced, never edited, by set_scores)
        cached = getattr(self, "_effects_cache", None)
        if cached is None or not np.array_equal(cached[0], self.scale_) or cached[1] is not self.scores_:
            cached = (np.array(self.scale_, copy=True), self.scores_, -self.scale_[None, None, :] * self.scores_)
            self._effects_cache = cached
        return None, cached[2]

    def _table_of_steps(self, steps: np.ndarray) -> np.ndarray:
        return self._checkpoint_of_steps(steps)

    def _step_constants(self, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        offset = getattr(self, "offset_", None)
        if offset is None or not offset.any():
            return np.ones((1, 1)), np.zeros((1, 1))
        increments = np.zeros((n_steps, offset.shape[1]))  # m_t - m_{t-1}; past the fitted horizon m is held
        known = min(n_steps, offset.shape[0] - 1)
        increments[:known] = np.diff(offset[: known + 1], axis=0)
        return np.ones((1, 1)), increments

    def _lr_reference(self) -> float | None:
        return 1.0 if self.weighting == "lr" else None

    def _batch_mean(self) -> bool:
        return self.weighting in ("lr", "batch_mean")

    def _momentum(self) -> float:
        return 0.0

    # ----------------------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        return {"loss_floor_": self.loss_floor_, "calibration_mse_": self.calibration_mse_,
                **self._method_state()}

    def _self_check(self) -> None:
        """The loader's check of the values (shapes are checked by ``_array_specs``), then a one-step simulation."""
        steps = self.checkpoint_steps_
        if np.any(steps[1:] <= steps[:-1]):  # a comparison: differences of int64 can wrap
            raise SimfluenceError(f"checkpoint_steps_ {self.checkpoint_steps_.tolist()} are not increasing")
        super()._self_check()

    def _method_state(self) -> dict[str, Any]:
        return {}


