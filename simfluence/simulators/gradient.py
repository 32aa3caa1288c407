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

``FixedEffectsSimulator`` takes any precomputed scores (``set_scores``, then ``fit`` = ``calibrate``).
``TracInSimulator``, ``InfluenceSimulator`` and ``TrackStarSimulator`` compute their scores in ``fit`` from the
run set's checkpoints: the model, data and loss come from the task the run set was generated with (rebuilt
from the manifest, :func:`simfluence.workloads.task_from_runset`) or a ``task=`` given to ``fit``.

**Which checkpoints.** Only training runs are used (held-out runs' checkpoints would leak their curricula):
scores are computed on the checkpoints of the first ``checkpoint_runs`` training runs and averaged. All runs
start from the same weights, so the step-0 checkpoint is shared; later ones differ by curriculum, and
averaging over a few runs removes some of that run-specific noise at proportional cost.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.design import FeatureSpec, mean_lr_schedule, schedule_for, step_features
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, as_curricula, as_initial, register
from simfluence.simulators.linear import unroll

WEIGHTINGS = ("lr", "batch_mean", "sum")
SCALES = ("global", "per_test")
CALIBRATIONS = ("rollout", "step")
_SIM_CHUNK_BYTES = 128 * 2**20


@register
class FixedEffectsSimulator(Simulator):
    """Additive simulator with fixed per-example scores and one fitted scale (see the module docstring).

    Parameters
    ----------
    weighting : ``"lr"`` (w_t = lr_t / |c_t|), ``"batch_mean"`` (1 / |c_t|) or ``"sum"`` (1).
    scale : ``"global"`` or ``"per_test"``.
    calibration : ``"rollout"`` or ``"step"``.
    clip_negative : keep simulated losses >= 0 when the training losses never were negative.

    Attributes
    ----------
    scores_ : (K, n_pool, n_test) scores (K = 1 for a single matrix).
    checkpoint_steps_ : (K,) step of the weights each score matrix was computed at.
    scale_ : (n_test,) fitted scale s (all equal for ``scale="global"``).
    lr_schedule_ : (n_steps_fit,) mean learning rate per step of the calibration runs (NaN where unknown).
    calibration_mse_ : the calibration objective per (run, step, test) at the fitted scale.
    """

    kind = "fixed_effects"
    _fitted_arrays = ("scores_", "checkpoint_steps_", "scale_", "lr_schedule_")

    def __init__(self, weighting: str = "lr", scale: str = "global", calibration: str = "rollout",
                 clip_negative: bool = True) -> None:
        self.weighting = weighting
        self.scale = scale
        self.calibration = calibration
        self.clip_negative = clip_negative

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
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None) -> FixedEffectsSimulator:
        """Calibrate the scale on the runs at positions ``runs`` (scores must be set); returns self."""
        if getattr(self, "scores_", None) is None:
            raise SimfluenceError(f"{type(self).__name__} has no scores: call set_scores() before fit()")
        return self.calibrate(runset, runs)

    def calibrate(self, runset: RunSet, runs: Sequence[int] | None = None) -> FixedEffectsSimulator:
        """Fit the scale s by least squares on the training runs ``runs``; returns self."""
        self._check_options()
        runs = list(range(len(runset))) if runs is None else [int(i) for i in runs]
        if not runs:
            raise SimfluenceError("no runs to calibrate on")
        chosen = [runset[i] for i in runs]
        if runset.n_pool != self.scores_.shape[1] or runset.n_test != self.scores_.shape[2]:
            raise SimfluenceError(f"scores are for {self.scores_.shape[1]} pool / {self.scores_.shape[2]} test "
                                  f"examples, the run set has {runset.n_pool} / {runset.n_test}")
        horizon = max(run.n_steps for run in chosen)
        self.lr_schedule_ = mean_lr_schedule(chosen)
        rates = [run.learning_rates for run in chosen] if self.weighting == "lr" else None
        raw = self._raw_effects([run.curriculum for run in chosen], rates, horizon)    # (R, T, n_test)
        cumulative = np.concatenate([np.zeros_like(raw[:, :1]), np.cumsum(raw, axis=1)], axis=1)
        numerator = np.zeros(runset.n_test)
        denominator = np.zeros(runset.n_test)
        pieces = []
        for row, run in enumerate(chosen):
            steps = run.logged_steps
            losses = np.asarray(run.losses, dtype=np.float64)
            if self.calibration == "rollout":
                target = losses[steps > 0] - run.initial_losses
                regressor = cumulative[row, steps[steps > 0]]
            else:
                target = np.diff(losses, axis=0)
                regressor = np.diff(cumulative[row, steps], axis=0)
            numerator += (regressor * target).sum(axis=0)
            denominator += (regressor ** 2).sum(axis=0)
            pieces.append((target, regressor))
        if self.scale == "global":
            scale = -numerator.sum() / denominator.sum() if denominator.sum() > 0 else 0.0
            self.scale_ = np.full(runset.n_test, scale)
        else:
            self.scale_ = -np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
        squared = [((target + self.scale_ * regressor) ** 2) for target, regressor in pieces]
        total = sum(float(block.sum()) for block in squared)
        self.calibration_mse_ = total / max(sum(block.size for block in squared), 1)
        smallest = min(float(np.min(run.losses)) for run in chosen if run.losses.size)
        self.loss_floor_ = 0.0 if self.clip_negative and smallest >= 0 else None
        self.n_pool_, self.n_test_ = runset.n_pool, runset.n_test
        self.fitted_ = True
        return self

    def _check_options(self) -> None:
        for name, value, allowed in (("weighting", self.weighting, WEIGHTINGS), ("scale", self.scale, SCALES),
                                     ("calibration", self.calibration, CALIBRATIONS)):
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

    def _raw_effects(self, curricula: list[Curriculum], learning_rates: Sequence[np.ndarray] | None,
                     horizon: int) -> np.ndarray:
        """(n_curricula, horizon, n_test) ``sum_{i in c_t} w_t score_{k(t)}[i]`` (unscaled)."""
        spec = FeatureSpec(self.scores_.shape[1], 0, 1.0 if self.weighting == "lr" else None,
                           self.weighting in ("lr", "batch_mean"))
        if self.weighting == "lr" and learning_rates is None:
            if not np.all(np.isfinite(getattr(self, "lr_schedule_", np.array([np.nan])))):
                raise SimfluenceError("weighting='lr' needs the learning rates of the steps (none logged in fitting)")
            learning_rates = [self._default_schedule(cur.n_steps) for cur in curricula]
        rows = step_features(curricula, spec, learning_rates, n_steps=horizon)
        which = np.tile(self._checkpoint_of_steps(np.arange(1, horizon + 1)), len(curricula))
        out = np.zeros((len(curricula) * horizon, self.scores_.shape[2]))
        for k in range(len(self.scores_)):
            selected = np.flatnonzero(which == k)
            if selected.size:
                out[selected] = np.asarray(rows[selected] @ self.scores_[k])
        return out.reshape(len(curricula), horizon, -1)

    def _default_schedule(self, n_steps: int) -> np.ndarray:
        return schedule_for(self.lr_schedule_, n_steps)

    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        self.check_fitted()
        curricula = as_curricula(curricula)
        n_test = self.scores_.shape[2]
        initial = as_initial(initial_losses, len(curricula), n_test)
        lengths = np.array([cur.n_steps for cur in curricula], dtype=np.int64)
        horizon = int(lengths.max(initial=0))
        if self.weighting != "lr":
            learning_rates = None
        out = np.empty((len(curricula), horizon + 1, n_test))
        chunk = max(1, _SIM_CHUNK_BYTES // (16 * max(horizon, 1) * n_test))
        for lo in range(0, len(curricula), chunk):
            hi = min(len(curricula), lo + chunk)
            rates = None if learning_rates is None else learning_rates[lo:hi]
            beta = -self.scale_ * self._raw_effects(curricula[lo:hi], rates, horizon)
            active = np.arange(1, horizon + 1)[None, :] <= lengths[lo:hi, None]
            out[lo:hi] = unroll(np.ones_like(beta), beta, initial[lo:hi], 0.0, active, self.loss_floor_)
        return out

    # ----------------------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        return {"loss_floor_": self.loss_floor_, "calibration_mse_": self.calibration_mse_,
                "n_pool_": self.n_pool_, "n_test_": self.n_test_, **self._method_state()}

    def _method_state(self) -> dict[str, Any]:
        return {}


def _template(task):
    """A model of the task's architecture (its weights are replaced by a checkpoint's); global RNG untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return task.make_model(0)


class _GradientMethod(FixedEffectsSimulator):
    """Shared ``fit`` of the methods that compute their scores from a run set's checkpoints."""

    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, task=None) -> _GradientMethod:
        """Compute scores on the training runs' checkpoints, then calibrate on the training runs; returns self.

        Parameters
        ----------
        runset : a run set loaded from disk whose runs saved checkpoints.
        runs : positions of the training runs (default all).
        task : the :class:`~simfluence.workloads.Task` (model, data, loss) of the runs; default: rebuilt
            from the run set's manifest (built-in workloads only).
        """
        from simfluence.workloads import task_from_runset

        start = time.perf_counter()
        runs = list(range(len(runset))) if runs is None else [int(i) for i in runs]
        if not runs:
            raise SimfluenceError("no runs to fit on")
        if not int(self.checkpoint_runs) >= 1:
            raise SimfluenceError(f"checkpoint_runs must be >= 1, got {self.checkpoint_runs!r}")
        task = task_from_runset(runset) if task is None else task
        if task.n_pool != runset.n_pool or task.n_test != runset.n_test:
            raise SimfluenceError(f"task has {task.n_pool} pool / {task.n_test} test examples, the run set "
                                  f"{runset.n_pool} / {runset.n_test}")
        total, steps = None, None
        used = runs[: int(self.checkpoint_runs)]
        for position in used:
            scores, run_steps = self._scores(task, runset, position)
            if steps is not None and list(run_steps) != list(steps):
                raise SimfluenceError(f"run {runset[position].name!r} saved checkpoints at {list(run_steps)}, "
                                      f"run {runset[used[0]].name!r} at {list(steps)}")
            total = scores if total is None else total + scores
            steps = run_steps
        self.set_scores(total / len(used), steps)
        self.checkpoint_run_names_ = [runset[i].name for i in used]
        self.score_seconds_ = time.perf_counter() - start
        return self.calibrate(runset, runs)

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        """(K, n_pool, n_test) scores and their K checkpoint steps, from one run's checkpoints."""
        raise NotImplementedError

    def _param_spec(self, model):
        from simfluence.attribution.gradients import last_layer

        if self.params == "all":
            return None
        if self.params == "last_layer":
            return last_layer(model)
        if isinstance(self.params, (list, tuple)):
            return list(self.params)
        raise SimfluenceError(f"params must be 'all', 'last_layer' or a list of names, got {self.params!r}")

    def _chosen_steps(self, runset: RunSet, position: int) -> list[int]:
        from simfluence.attribution.checkpoints import checkpoint_steps

        available = checkpoint_steps(runset, position)
        if self.checkpoints == "all":
            return available
        if self.checkpoints == "final":
            return available[-1:]
        wanted = [int(step) for step in self.checkpoints]
        missing = [step for step in wanted if step not in available]
        if missing:
            raise SimfluenceError(f"run {runset[position].name!r} has no checkpoint at step {missing[0]} "
                                  f"(it has {available})")
        return sorted(wanted)

    def _method_state(self) -> dict[str, Any]:
        return {"checkpoint_run_names_": getattr(self, "checkpoint_run_names_", []),
                "score_seconds_": getattr(self, "score_seconds_", None)}


@register
class TracInSimulator(_GradientMethod):
    """TracIn-CP as a simulator: step t's effect uses the gradients at the checkpoint nearest step t.

    Parameters
    ----------
    variant : ``"dot"`` or ``"cosine"``.
    checkpoints : ``"all"``, ``"final"`` or a list of saved steps.
    time_varying : one score matrix per checkpoint, used at the steps nearest it (TracIn read as a simulator);
        False: the single TracIn-CP matrix ``sum_k eta_k S_k / sum_k eta_k`` at every step.
    params : ``"all"``, ``"last_layer"`` or a list of parameter names.
    checkpoint_runs : number of training runs whose checkpoint scores are averaged.
    chunk_size : examples per vectorised gradient pass (default: about 64 MiB of gradients).
    weighting, scale, calibration, clip_negative : see :class:`FixedEffectsSimulator`.
    """

    kind = "tracin"

    def __init__(self, variant: str = "dot", checkpoints: str | Sequence[int] = "all", time_varying: bool = True,
                 params: str | Sequence[str] = "all", checkpoint_runs: int = 1, chunk_size: int | None = None,
                 weighting: str = "lr", scale: str = "global", calibration: str = "rollout",
                 clip_negative: bool = True) -> None:
        super().__init__(weighting=weighting, scale=scale, calibration=calibration, clip_negative=clip_negative)
        self.variant = variant
        self.checkpoints = checkpoints if isinstance(checkpoints, str) else [int(s) for s in checkpoints]
        self.time_varying = time_varying
        self.params = params if isinstance(params, str) else list(params)
        self.checkpoint_runs = checkpoint_runs
        self.chunk_size = chunk_size

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        from simfluence.attribution.checkpoints import load_checkpoints
        from simfluence.attribution.tracin import tracin_scores

        checkpoints = load_checkpoints(runset, position, self._chosen_steps(runset, position))
        model = _template(task)
        terms = tracin_scores(model, task.loss_fn, task.pool_inputs, task.pool_targets, task.test_inputs,
                              task.test_targets, checkpoints, variant=self.variant,
                              params=self._param_spec(model), per_checkpoint=True, chunk_size=self.chunk_size)
        steps = [c.step for c in checkpoints]
        if self.time_varying:
            return terms, steps
        rates = np.array([c.learning_rate for c in checkpoints])
        return (np.tensordot(rates, terms, axes=1) / rates.sum())[None], [steps[-1]]


@register
class InfluenceSimulator(_GradientMethod):
    """Influence functions as a simulator: fixed effects ``g_test^T (H + dI)^{-1} g_i`` at one checkpoint.

    Parameters
    ----------
    checkpoint : ``"final"`` (the last saved step) or a saved step.
    damping : added to the Hessian's diagonal.
    hessian : ``"gauss_newton"`` (default: positive semi-definite away from a minimum) or ``"exact"``.
    solver : ``"exact"``, ``"cg"`` or ``"lissa"`` (see :mod:`simfluence.attribution.influence`).
    params : ``"all"``, ``"last_layer"`` or a list of parameter names.
    checkpoint_runs : number of training runs whose scores are averaged.
    chunk_size : examples per vectorised pass.
    weighting, scale, calibration, clip_negative : see :class:`FixedEffectsSimulator`.
    """

    kind = "influence"

    def __init__(self, checkpoint: str | int = "final", damping: float = 0.01, hessian: str = "gauss_newton",
                 solver: str = "exact", params: str | Sequence[str] = "all", checkpoint_runs: int = 1,
                 chunk_size: int = 64, weighting: str = "lr", scale: str = "global", calibration: str = "rollout",
                 clip_negative: bool = True) -> None:
        super().__init__(weighting=weighting, scale=scale, calibration=calibration, clip_negative=clip_negative)
        self.checkpoint = checkpoint
        self.damping = damping
        self.hessian = hessian
        self.solver = solver
        self.params = params if isinstance(params, str) else list(params)
        self.checkpoint_runs = checkpoint_runs
        self.chunk_size = chunk_size

    @property
    def checkpoints(self) -> str | list[int]:
        return "final" if self.checkpoint == "final" else [int(self.checkpoint)]

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        from simfluence.attribution.checkpoints import load_checkpoints, model_at
        from simfluence.attribution.influence import influence_scores

        (checkpoint,) = load_checkpoints(runset, position, self._chosen_steps(runset, position))
        model = model_at(_template(task), checkpoint)
        scores = influence_scores(model, task.loss_fn, task.pool_inputs, task.pool_targets, task.test_inputs,
                                  task.test_targets, params=self._param_spec(model), damping=self.damping,
                                  hessian=self.hessian, solver=self.solver, chunk_size=self.chunk_size)
        return scores[None], [checkpoint.step]


@register
class TrackStarSimulator(_GradientMethod):
    """TrackStar-style gradient similarity as a simulator (see :mod:`simfluence.attribution.trackstar`).

    Scores are cosines, not loss units; the calibrated scale maps them to loss changes.

    Parameters
    ----------
    checkpoints : ``"final"``, ``"all"`` or a list of saved steps (scores averaged; one matrix at every step).
    optimizer_correction : divide by Adam's second moment (skipped, with a note in ``info_``, for SGD runs).
    projection_dim : random projection dimension (None: none).
    hessian : ``"mixed"``, ``"train"`` or ``"none"``.
    lam : mixing weight or ``"auto"``; crossing_k : component of the eigenvalue crossing (default automatic).
    damping : relative damping of R.
    unit_normalize : cosine scores.
    params : ``"all"``, ``"last_layer"`` or a list of parameter names.
    seed : projection seed.
    checkpoint_runs : number of training runs whose scores are averaged.
    chunk_size : examples per vectorised gradient pass (default: about 64 MiB of gradients).
    weighting, scale, calibration, clip_negative : see :class:`FixedEffectsSimulator`.
    """

    kind = "trackstar"

    def __init__(self, checkpoints: str | Sequence[int] = "final", optimizer_correction: bool = True,
                 projection_dim: int | None = 512, hessian: str = "mixed", lam: float | str = "auto",
                 crossing_k: int | None = None, damping: float = 1e-3, unit_normalize: bool = True,
                 params: str | Sequence[str] = "all", seed: int = 0, checkpoint_runs: int = 1,
                 chunk_size: int | None = None, weighting: str = "lr", scale: str = "global",
                 calibration: str = "rollout", clip_negative: bool = True) -> None:
        super().__init__(weighting=weighting, scale=scale, calibration=calibration, clip_negative=clip_negative)
        self.checkpoints = checkpoints if isinstance(checkpoints, str) else [int(s) for s in checkpoints]
        self.optimizer_correction = optimizer_correction
        self.projection_dim = projection_dim
        self.hessian = hessian
        self.lam = lam
        self.crossing_k = crossing_k
        self.damping = damping
        self.unit_normalize = unit_normalize
        self.params = params if isinstance(params, str) else list(params)
        self.seed = seed
        self.checkpoint_runs = checkpoint_runs
        self.chunk_size = chunk_size

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        from simfluence.attribution.checkpoints import load_checkpoints
        from simfluence.attribution.trackstar import trackstar_scores

        checkpoints = load_checkpoints(runset, position, self._chosen_steps(runset, position))
        model = _template(task)
        scores, info = trackstar_scores(
            model, task.loss_fn, task.pool_inputs, task.pool_targets, task.test_inputs, task.test_targets,
            checkpoints, optimizer_correction=self.optimizer_correction, projection_dim=self.projection_dim,
            hessian=self.hessian, lam=self.lam, crossing_k=self.crossing_k, damping=self.damping,
            unit_normalize=self.unit_normalize, params=self._param_spec(model), seed=self.seed,
            chunk_size=self.chunk_size, return_info=True,
        )
        self.info_ = info["checkpoints"]
        return scores[None], [checkpoints[-1].step]

    def _method_state(self) -> dict[str, Any]:
        return {**super()._method_state(), "info_": getattr(self, "info_", [])}
