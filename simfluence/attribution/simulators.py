"""Gradient-based attribution methods as training-run simulators: TracIn, influence functions, TrackStar.

Each method computes a (n_pool, n_test) score matrix -- or one per checkpoint -- from the checkpoints a run
saved, and becomes a :class:`~simfluence.simulators.fixed_effects.FixedEffectsSimulator`: an additive
simulator whose per-example effects are the scores times one scale fitted on the training runs. The model,
data and loss come from a :class:`~simfluence.task.Task`: the one given to ``fit(task=...)`` (or
``--task file.py:function`` on the command line), else the built-in workload recorded in the run set
(:func:`simfluence.workloads.task_for_runset`).

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
import torch

from simfluence.attribution.checkpoints import checkpoint_steps, load_checkpoints, model_at
from simfluence.attribution.gradients import last_layer
from simfluence.attribution.influence import influence_scores
from simfluence.attribution.tracin import tracin_scores
from simfluence.attribution.trackstar import trackstar_scores
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import training_runs
from simfluence.simulators.fixed_effects import FixedEffectsSimulator
from simfluence.task import check_checkpoint_losses

__all__ = ["InfluenceSimulator", "TracInSimulator", "TrackStarSimulator"]


def _template(task, device: str = "cpu"):
    """A model of the task's architecture on ``device`` (its weights are replaced by a checkpoint's); global RNG
    untouched."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SimfluenceError(f"device {device!r} is not a torch device: {err}") from None
    with torch.random.fork_rng(devices=[]):
        return task.make_model(0).to(where)


def _task_data(task) -> tuple:
    """``loss_fn, pool_inputs, pool_targets, test_inputs, test_targets`` of a task: the arguments every scoring
    function (:func:`tracin_scores`, :func:`influence_scores`, :func:`trackstar_scores`) takes after the model."""
    return task.loss_fn, task.pool_inputs, task.pool_targets, task.test_inputs, task.test_targets


class _GradientMethod(FixedEffectsSimulator):
    """Shared ``fit`` of the methods that compute their scores from a run set's checkpoints."""

    tags = {**FixedEffectsSimulator.tags, "needs": frozenset({"task", "checkpoints"})}

    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> _GradientMethod:
        """Compute scores on the training runs' checkpoints, then calibrate on the training runs; returns self.

        Parameters
        ----------
        runset : a run set loaded from disk whose runs saved checkpoints.
        runs : positions of the training runs (default all).
        task : the :class:`~simfluence.task.Task` (model, data, loss) of the runs, or a
            ``"file.py:function"`` spec; default: the built-in workload recorded in the run set.
        """
        from simfluence.workloads import task_for_runset

        start = time.perf_counter()
        runs = training_runs(runset, runs)
        if isinstance(self.checkpoint_runs, bool) or not int(self.checkpoint_runs) >= 1:
            raise SimfluenceError(f"checkpoint_runs must be >= 1, got {self.checkpoint_runs!r}")
        task = task_for_runset(runset, task)
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
        self.score_seconds_ = time.perf_counter() - start  # not saved: a model file does not depend on timing
        self.calibrate(runset, runs)
        self.linearity_ = None
        if self.check_linearity:  # two replays of the first training run: a real small removal vs the prediction
            from simfluence.attribution.smoothness import replayed_removal_check

            try:
                self.linearity_ = replayed_removal_check(self, runset, runs[0], task=task)
            except SimfluenceError as err:  # a task the exact replay does not support (e.g. a Trainer's loop)
                self.linearity_ = {"ok": None, "skipped": str(err)}
        return self

    def compute_scores(self, runset: RunSet, run: int | str = 0, task=None) -> tuple[np.ndarray, list[int]]:
        """This method's raw scores from one run's checkpoints (no calibration; the simulator stays unfitted).

        Returns
        -------
        scores : (K, n_pool, n_test), positive = proponent.
        steps : the K checkpoint steps the score matrices belong to.
        """
        from simfluence.workloads import task_for_runset

        position = runset.position(run)
        return self._scores(task_for_runset(runset, task), runset, position)

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        """(K, n_pool, n_test) scores and their K checkpoint steps, from one run's checkpoints."""
        raise NotImplementedError

    def _param_spec(self, model):
        if self.params == "all":
            return None
        if self.params == "last_layer":
            return last_layer(model)
        if isinstance(self.params, (list, tuple)):
            return list(self.params)
        raise SimfluenceError(f"params must be 'all', 'last_layer' or a list of names, got {self.params!r}")

    def _chosen_steps(self, runset: RunSet, position: int) -> list[int]:
        available = checkpoint_steps(runset, position)
        if self.checkpoints == "all":
            return available
        if self.checkpoints == "final":
            return available[-1:]
        if isinstance(self.checkpoints, str):
            raise SimfluenceError(f"checkpoints must be 'all', 'final' or a list of steps, got {self.checkpoints!r}")
        wanted = [int(step) for step in self.checkpoints]
        missing = [step for step in wanted if step not in available]
        if missing:
            raise SimfluenceError(f"run {runset[position].name!r} has no checkpoint at step {missing[0]} "
                                  f"(it has {available})")
        return sorted(wanted)

    def _method_state(self) -> dict[str, Any]:
        return {"checkpoint_run_names_": getattr(self, "checkpoint_run_names_", []),
                "linearity_": getattr(self, "linearity_", None)}


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
    weighting, scale, calibration, clip_negative, offset : see :class:`FixedEffectsSimulator`.
    device : where the gradients are computed (``"cpu"``, ``"cuda"``, ...); the scores do not depend on it
        beyond floating-point rounding.
    check_linearity : after the fit, remove 5% of the examples of the first training run, retrain it (two exact
        replays) and compare the real change of the final test losses with this method's prediction
        (:func:`~simfluence.attribution.smoothness.replayed_removal_check`, kept in ``linearity_``); a bad
        disagreement issues a :class:`~simfluence.errors.NonlinearityWarning`. Tasks that the exact replay does
        not support (a Hugging Face Trainer's loop) skip it, and ``linearity_["skipped"]`` says why.
    """

    kind = "tracin"

    def __init__(self, variant: str = "dot", checkpoints: str | Sequence[int] = "all", time_varying: bool = True,
                 params: str | Sequence[str] = "all", checkpoint_runs: int = 1, chunk_size: int | None = None,
                 weighting: str = "lr", scale: str = "global", calibration: str = "rollout",
                 clip_negative: bool = True, offset: str = "none", device: str = "cpu",
                 check_linearity: bool = True) -> None:
        super().__init__(weighting=weighting, scale=scale, calibration=calibration, clip_negative=clip_negative,
                         offset=offset)
        self.device = device
        self.check_linearity = check_linearity
        self.variant = variant
        self.checkpoints = checkpoints
        self.time_varying = time_varying
        self.params = params
        self.checkpoint_runs = checkpoint_runs
        self.chunk_size = chunk_size

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        checkpoints = load_checkpoints(runset, position, self._chosen_steps(runset, position))
        check_checkpoint_losses(task, runset, runset[position], checkpoints)
        model = _template(task, self.device)
        terms = tracin_scores(model, *_task_data(task), checkpoints, variant=self.variant,
                              params=self._param_spec(model), per_checkpoint=True, chunk_size=self.chunk_size)
        steps = [c.step for c in checkpoints]
        if self.time_varying:
            return terms, steps
        rates = np.array([c.learning_rate for c in checkpoints])
        return (np.tensordot(rates, terms, axes=1) / rates.sum())[None], [steps[-1]]


class InfluenceSimulator(_GradientMethod):
    """Influence functions as a simulator: fixed effects ``g_test^T (H + dI)^{-1} g_i`` at one checkpoint.

    Parameters
    ----------
    checkpoint : ``"final"`` (the last saved step) or a saved step.
    damping : added to the Hessian's diagonal.
    hessian : ``"gauss_newton"`` (default: positive semi-definite away from a minimum) or ``"exact"``.
    solver : ``"auto"`` (a dense solve for small models, conjugate gradient above
        ``influence.DENSE_MAX_PARAMS`` parameters), ``"exact"``, ``"cg"`` or ``"lissa"`` (see
        :mod:`simfluence.attribution.influence`).
    params : ``"all"``, ``"last_layer"`` or a list of parameter names.
    checkpoint_runs : number of training runs whose scores are averaged.
    chunk_size : examples per vectorised pass.
    weighting, scale, calibration, clip_negative, offset : see :class:`FixedEffectsSimulator`.
    device : where the gradients are computed (``"cpu"``, ``"cuda"``, ...); the scores do not depend on it
        beyond floating-point rounding.
    check_linearity : after the fit, remove 5% of the examples of the first training run, retrain it (two exact
        replays) and compare the real change of the final test losses with this method's prediction
        (:func:`~simfluence.attribution.smoothness.replayed_removal_check`, kept in ``linearity_``); a bad
        disagreement issues a :class:`~simfluence.errors.NonlinearityWarning`. Tasks that the exact replay does
        not support (a Hugging Face Trainer's loop) skip it, and ``linearity_["skipped"]`` says why.
    """

    kind = "influence"

    def __init__(self, checkpoint: str | int = "final", damping: float = 0.01, hessian: str = "gauss_newton",
                 solver: str = "auto", params: str | Sequence[str] = "all", checkpoint_runs: int = 1,
                 chunk_size: int = 64, weighting: str = "lr", scale: str = "global", calibration: str = "rollout",
                 clip_negative: bool = True, offset: str = "none", device: str = "cpu",
                 check_linearity: bool = True) -> None:
        super().__init__(weighting=weighting, scale=scale, calibration=calibration, clip_negative=clip_negative,
                         offset=offset)
        self.device = device
        self.check_linearity = check_linearity
        self.checkpoint = checkpoint
        self.damping = damping
        self.hessian = hessian
        self.solver = solver
        self.params = params
        self.checkpoint_runs = checkpoint_runs
        self.chunk_size = chunk_size

    @property
    def checkpoints(self) -> str | list[int]:
        return "final" if self.checkpoint == "final" else [int(self.checkpoint)]

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        (checkpoint,) = load_checkpoints(runset, position, self._chosen_steps(runset, position))
        check_checkpoint_losses(task, runset, runset[position], [checkpoint])
        model = model_at(_template(task, self.device), checkpoint)
        scores = influence_scores(model, *_task_data(task), params=self._param_spec(model), damping=self.damping,
                                  hessian=self.hessian, solver=self.solver, chunk_size=self.chunk_size)
        return scores[None], [checkpoint.step]


class TrackStarSimulator(_GradientMethod):
    """TrackStar-style gradient similarity as a simulator (see :mod:`simfluence.attribution.trackstar`).

    Scores are cosines, not loss units; the calibrated scale maps them to loss changes.

    Parameters
    ----------
    checkpoints : ``"final"``, ``"all"`` or a list of saved steps (scores averaged; one matrix at every step).
    optimizer_correction : divide by Adam's second moment (skipped, with a note in ``info_``, for SGD runs).
    projection_dim : random projection dimension (None: none).
    hessian : ``"mixed"``, ``"train"`` or ``"none"``.
    hessian_mix : weight of the evaluation-gradient Hessian in the mixed one, or ``"auto"``.
    crossing_k : component of the eigenvalue crossing (default automatic).
    damping : relative damping of R.
    unit_normalize : cosine scores.
    params : ``"all"``, ``"last_layer"`` or a list of parameter names.
    seed : projection seed.
    checkpoint_runs : number of training runs whose scores are averaged.
    chunk_size : examples per vectorised gradient pass (default: about 64 MiB of gradients).
    weighting, scale, calibration, clip_negative, offset : see :class:`FixedEffectsSimulator`.
    device : where the gradients are computed (``"cpu"``, ``"cuda"``, ...); the scores do not depend on it
        beyond floating-point rounding.
    check_linearity : after the fit, remove 5% of the examples of the first training run, retrain it (two exact
        replays) and compare the real change of the final test losses with this method's prediction
        (:func:`~simfluence.attribution.smoothness.replayed_removal_check`, kept in ``linearity_``); a bad
        disagreement issues a :class:`~simfluence.errors.NonlinearityWarning`. Tasks that the exact replay does
        not support (a Hugging Face Trainer's loop) skip it, and ``linearity_["skipped"]`` says why.
    """

    kind = "trackstar"

    def __init__(self, checkpoints: str | Sequence[int] = "final", optimizer_correction: bool = True,
                 projection_dim: int | None = 512, hessian: str = "mixed", hessian_mix: float | str = "auto",
                 crossing_k: int | None = None, damping: float = 1e-3, unit_normalize: bool = True,
                 params: str | Sequence[str] = "all", seed: int = 0, checkpoint_runs: int = 1,
                 chunk_size: int | None = None, weighting: str = "lr", scale: str = "global",
                 calibration: str = "rollout", clip_negative: bool = True, offset: str = "none",
                 device: str = "cpu", check_linearity: bool = True) -> None:
        super().__init__(weighting=weighting, scale=scale, calibration=calibration, clip_negative=clip_negative,
                         offset=offset)
        self.device = device
        self.check_linearity = check_linearity
        self.checkpoints = checkpoints
        self.optimizer_correction = optimizer_correction
        self.projection_dim = projection_dim
        self.hessian = hessian
        self.hessian_mix = hessian_mix
        self.crossing_k = crossing_k
        self.damping = damping
        self.unit_normalize = unit_normalize
        self.params = params
        self.seed = seed
        self.checkpoint_runs = checkpoint_runs
        self.chunk_size = chunk_size

    def _scores(self, task, runset: RunSet, position: int) -> tuple[np.ndarray, list[int]]:
        checkpoints = load_checkpoints(runset, position, self._chosen_steps(runset, position))
        check_checkpoint_losses(task, runset, runset[position], checkpoints)
        model = _template(task, self.device)
        scores, info = trackstar_scores(
            model, *_task_data(task), checkpoints, optimizer_correction=self.optimizer_correction,
            projection_dim=self.projection_dim,
            hessian=self.hessian, lam=self.hessian_mix, crossing_k=self.crossing_k, damping=self.damping,
            unit_normalize=self.unit_normalize, params=self._param_spec(model), seed=self.seed,
            chunk_size=self.chunk_size, return_info=True,
        )
        self.info_ = info["checkpoints"]
        return scores[None], [checkpoints[-1].step]

    def _method_state(self) -> dict[str, Any]:
        return {**super()._method_state(), "info_": getattr(self, "info_", [])}
