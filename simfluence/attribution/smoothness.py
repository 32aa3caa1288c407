"""Metasmoothness: is the training map smooth enough in the data weights for any attribution to work?

    metasmoothness(task, runset_or_curriculum, run=None, *, n_directions=3, h=0.1, seed=0,
                   dtype=torch.float64, init_seed=None, run_seed=None, deterministic=True) -> SmoothnessReport

The published definition (Engstrom et al. 2025, "Optimizing ML training with metagradient descent",
definition 2, as EleutherAI bergson's ``metasmoothness`` computes it): give every pool example i a weight w_i in
its batches' losses (``(1 / |c_t|) * sum_{j in c_t} w_j * loss_j``, base: all w = 1), draw a direction
``v ~ N(0, I)`` over the pool, and retrain the base run with weights ``1``, ``1 + h v`` and ``1 + 2h v`` to final
parameters theta_0, theta_1, theta_2. With ``d = |theta_2 - theta_0|`` the score is

    S = sum_p (d_p / sum(d)) * sign(theta_1 - theta_0)_p * sign(theta_2 - theta_1)_p

the agreement of the two consecutive finite differences' signs, weighted by how far each parameter moves:
1 when the final parameters respond linearly to the data weights (first-order attribution can work), about 0
when the response is chaotic (no method can predict single-example effects). The score is averaged over
``n_directions`` directions; the same formula over the final *test losses* is reported alongside.

The retrains are weighted replays of the base run (:class:`simfluence.attribution.unrolled._Replay`: same
initial weights, torch seed, optimizer and schedule as the generator's training, in ``dtype``), so the base
replay reproduces the logged run and differences come from the weights only. Cost: ``1 + 2 * n_directions``
replays, each about one training run (forward and backward of every batch, no second derivatives).

Any fitted simulator can check one of its own answers the same way: :func:`replayed_removal_check` retrains
(replays) a base run without a few random examples and compares the real change of the final test losses with
the simulator's prediction (``UnrolledSimulator.fit`` runs its own version of it by default).

    replayed_removal_check(simulator, runset, run=None, *, task=None, fraction=0.05, seed=0,
                           warn=True) -> dict
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simfluence.attribution.unrolled import _Replay, _State
from simfluence.curriculum import Curriculum
from simfluence.errors import NonlinearityWarning, SimfluenceError
from simfluence.runlog import RunSet
from simfluence.task import Task
from simfluence.training import single_thread_deterministic

__all__ = ["CHAOTIC_BELOW", "SMOOTH_FROM", "SmoothnessReport", "linearity_check", "metasmoothness",
           "replayed_removal_check", "score_differences", "weighted_replay"]

# thresholds of the one-line verdict (docs/smoothness.md: measured against unrolled LDS on the workloads)
SMOOTH_FROM = 0.7
CHAOTIC_BELOW = 0.4
DOCS = "docs/smoothness.md"

# the linearity check: a random removal of this fraction of the examples the base run uses (at least one) ...
LINEARITY_FRACTION = 0.05
# ... fails when |predicted| / |replayed| (mean over test examples) leaves [1 / RATIO, RATIO], when the mean
# change's sign is wrong while both means are at least SIGN_SHARE of their mean |change|, or when predicted and replayed
# changes correlate below MIN_CORRELATION across test examples (docs/smoothness.md: the measurements behind them)
LINEARITY_RATIO = 2.0
LINEARITY_SIGN_SHARE = 0.25
LINEARITY_MIN_CORRELATION = 0.5


@dataclass
class SmoothnessReport:
    """Metasmoothness of one training setup around one base run.

    Attributes
    ----------
    score : mean of ``scores`` (1 = smooth, about 0 = chaotic).
    scores : (n_directions,) movement-weighted sign agreement of the final parameters' finite differences.
    loss_scores : (n_directions,) the same agreement over the final test losses (the outputs attribution predicts).
    movement : (n_directions,) L1 norm of theta(1 + 2h v) - theta(1): how far the parameters moved.
    h : finite-difference step of the data weights.
    n_replays : replays of the run made (``1 + 2 * n_directions``), each about one training run.
    seconds : wall time of all replays.
    run : name of the base run (or ``"curriculum"``).
    """

    score: float
    scores: np.ndarray
    loss_scores: np.ndarray
    movement: np.ndarray
    h: float
    n_replays: int
    seconds: float
    run: str = "curriculum"

    @property
    def verdict(self) -> str:
        """One line: what the score implies for attributing single examples on this setup."""
        value = f"metasmoothness {self.score:.2f}"
        if self.score >= SMOOTH_FROM:
            return (f"first-order attribution of single examples can be trusted on this setup ({value} >= "
                    f"{SMOOTH_FROM}): see {DOCS}")
        if self.score >= CHAOTIC_BELOW:
            return (f"attribution of single examples is only partly reliable on this setup ({value} < {SMOOTH_FROM}): "
                    f"trust rankings and groups of examples more than single effects; see {DOCS}")
        return (f"attribution of single examples is unreliable on this setup ({value} < {CHAOTIC_BELOW}): "
                f"see {DOCS}")

    def summary(self) -> str:
        """Score, spread, cost and the verdict, on a few lines."""
        return (f"run {self.run}: metasmoothness {self.score:.3f} (per direction "
                f"{', '.join(f'{s:.3f}' for s in self.scores)}; test losses {np.mean(self.loss_scores):.3f}); "
                f"h={self.h:g}, {self.n_replays} replays in {self.seconds:.1f} s\n{self.verdict}")


def score_differences(base: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """Movement-weighted sign agreement of consecutive finite differences (definition 2).

    Parameters
    ----------
    base, first, second : (n,) the quantity at weights 1, 1 + h v and 1 + 2h v.

    Returns
    -------
    ``sum(d * sign(first - base) * sign(second - first)) / sum(d)`` with ``d = |second - base|``; 1.0 when
    nothing moves.
    """
    movement = np.abs(second - base)
    total = movement.sum()
    if total == 0:
        return 1.0
    return float(np.sum(movement * np.sign(first - base) * np.sign(second - first)) / total)


class _WeightedReplay(_Replay):
    """A replay whose every occurrence of pool example i has weight ``example_weights[i]`` in its batch loss."""

    example_weights: torch.Tensor

    def _batch_data(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets, weights = super()._batch_data(batch)
        return inputs, targets, self.example_weights[torch.tensor(batch)].to(weights)


def weighted_replay(task: Task, curriculum: Curriculum, example_weights: np.ndarray | None = None,
                    init_seed: int | None = None, seed: int | None = None,
                    dtype: torch.dtype | None = torch.float64,
                    deterministic: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Replay one run with a weight per pool example in every batch loss; the final parameters and test losses.

    Parameters
    ----------
    task : the model, data, loss, optimizer and schedule.
    curriculum : the run's batches (pool rows of ``task``).
    example_weights : (n_pool,) weight of each pool example's occurrences (``(1 / |c_t|) * sum_j w_j loss_j``;
        the batch size stays |c_t|); None: all 1, the run itself.
    init_seed, seed : initial-weight seed (default ``task.init_seed``) and the run's torch seed.
    dtype : compute precision (default float64); None: the task's own.
    deterministic : one thread, deterministic algorithms, as the generator trains.

    Returns
    -------
    params : (n_params,) float64 final trainable parameters, flattened.
    losses : (n_test,) float64 final test losses.
    """
    with single_thread_deterministic() if deterministic else contextlib.nullcontext():
        replay = _WeightedReplay(task, curriculum, task.init_seed if init_seed is None else int(init_seed), seed,
                                 dtype, None)
        weights = np.ones(task.n_pool) if example_weights is None else np.asarray(example_weights, dtype=np.float64)
        if weights.shape != (task.n_pool,):
            raise SimfluenceError(f"example_weights must have one weight per pool example ({task.n_pool}), "
                                  f"got shape {weights.shape}")
        first = next(iter(replay.initial_params.values()))
        replay.example_weights = torch.as_tensor(weights, dtype=first.dtype, device=first.device)
        state: _State = replay.start()
        for step in range(1, curriculum.n_steps + 1):
            state = replay.advance(state, step)
        params = torch.cat([state.params[name].detach().reshape(-1) for name in replay.optimizer.names])
        return params.to(torch.float64).cpu().numpy(), replay.test_losses(state.params)


def metasmoothness(
    task: Task | str | None,
    runset_or_curriculum: RunSet | Curriculum,
    run: str | int | None = None,
    *,
    n_directions: int = 3,
    h: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    init_seed: int | None = None,
    run_seed: int | None = None,
    deterministic: bool = True,
) -> SmoothnessReport:
    """Metasmoothness of a training setup around one base run (Engstrom et al. 2025, definition 2).

    Parameters
    ----------
    task : the run's Task, a ``"file.py:function"`` spec, or None for the built-in workload a run set records.
    runset_or_curriculum : a run set (the base run is ``run``) or the base curriculum itself (then ``task``
        must be a Task).
    run : name or position of the base run in the run set (default: the first run).
    n_directions : random directions ``v ~ N(0, I)`` over the pool; the score is their mean.
    h : finite-difference step of the data weights (bergson's default 0.1).
    seed : seed of the directions.
    dtype : replay precision (default float64, so rounding does not pass for chaos); None: the task's own.
    init_seed, run_seed : seeds of the initial weights and of the run (a run set: those it was trained with;
        a curriculum: default ``task.init_seed`` and ``init_seed + 1``, the generator's first run).
    deterministic : one thread, deterministic algorithms, as the generator trains.

    Returns
    -------
    SmoothnessReport : ``score``, per-direction scores, the test-loss version, cost and ``verdict``.

    Raises
    ------
    SimfluenceError : n_directions < 1, h <= 0, a base curriculum with no examples, or what the replay
        refuses (an unsupported optimizer, a task with its own training loop).
    """
    if int(n_directions) < 1:
        raise SimfluenceError(f"n_directions must be >= 1, got {n_directions}")
    if not h > 0:
        raise SimfluenceError(f"h must be > 0, got {h}")
    name = "curriculum"
    if isinstance(runset_or_curriculum, RunSet):
        from simfluence.training import retraining_seeds
        from simfluence.workloads import task_for_runset

        runset = runset_or_curriculum
        task = task_for_runset(runset, task)
        base = runset[0 if run is None else run]
        recorded_init, recorded_seed = retraining_seeds(runset, task, base)
        init_seed = recorded_init if init_seed is None else init_seed
        run_seed = recorded_seed if run_seed is None else run_seed
        curriculum, name = base.curriculum, base.name
    else:
        if not isinstance(task, Task):
            raise SimfluenceError("metasmoothness of a bare curriculum needs the Task itself")
        curriculum = runset_or_curriculum
        init_seed = task.init_seed if init_seed is None else init_seed
        run_seed = init_seed + 1 if run_seed is None else run_seed
    if curriculum.n_entries == 0:
        raise SimfluenceError(f"run {name!r} trains on no example: nothing to perturb")
    start = time.perf_counter()

    def replay(weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return weighted_replay(task, curriculum, weights, init_seed=init_seed, seed=run_seed, dtype=dtype,
                               deterministic=deterministic)

    params0, losses0 = replay(None)
    rng = np.random.default_rng(seed)
    scores, loss_scores, movement = [], [], []
    for _ in range(int(n_directions)):
        direction = rng.standard_normal(task.n_pool)
        params1, losses1 = replay(1.0 + h * direction)
        params2, losses2 = replay(1.0 + 2.0 * h * direction)
        scores.append(score_differences(params0, params1, params2))
        loss_scores.append(score_differences(losses0, losses1, losses2))
        movement.append(float(np.abs(params2 - params0).sum()))
    scores_array = np.asarray(scores)
    return SmoothnessReport(score=float(scores_array.mean()), scores=scores_array, loss_scores=np.asarray(loss_scores),
                            movement=np.asarray(movement), h=float(h), n_replays=1 + 2 * int(n_directions),
                            seconds=time.perf_counter() - start, run=name)


def replayed_removal_check(simulator: Any, runset: RunSet, run: str | int | None = None, *,
                           task: Task | str | None = None, fraction: float = 0.05, seed: int = 0,
                           warn: bool = True) -> dict[str, Any]:
    """Check a fitted simulator's answer to one small edit against real retraining of it (two replays).

    A random ``fraction`` of the examples the base run uses (at least one) is removed from every batch (the
    batches' means renormalised, as real training does); the run and the edited run are replayed exactly as the
    generator trains them (the task's own precision) and the real change of the final test losses is compared
    with ``simulator.simulate``'s (:func:`linearity_check`).

    Parameters
    ----------
    simulator : any fitted simulator of the run set.
    runset : the logged runs; run : name or position of the base run (default: the first).
    task : the runs' Task or a ``"file.py:function"`` spec (default: the built-in workload recorded).
    fraction : share of the used examples removed; seed : seed of the choice.
    warn : issue a :class:`~simfluence.errors.NonlinearityWarning` when the check fails.

    Returns
    -------
    dict : ``removed`` (pool ids), ``predicted_mean``, ``replayed_mean``, ``magnitude_ratio``, ``correlation``,
    ``sign_ok`` and ``ok``.
    """
    from simfluence.attribution.unrolled import replay_losses
    from simfluence.training import retraining_seeds
    from simfluence.workloads import task_for_runset

    if not 0 < fraction < 1:
        raise SimfluenceError(f"fraction must lie in (0, 1), got {fraction}")
    task = task_for_runset(runset, task)
    base = runset[0 if run is None else run]
    init_seed, run_seed = retraining_seeds(runset, task, base)
    used = np.unique(base.curriculum.ids)
    count = min(used.size, max(1, int(np.ceil(fraction * used.size))))
    removed = np.sort(np.random.default_rng(seed).choice(used, size=count, replace=False))
    edited = base.curriculum.remove(removed)
    real = [replay_losses(task, curriculum, init_seed=init_seed, seed=run_seed, dtype=None)[-1]
            for curriculum in (base.curriculum, edited)]
    initial = base.dense_losses()[0][0]
    simulated = simulator.simulate([base.curriculum, edited], initial)[:, -1]
    check = linearity_check(simulated[1] - simulated[0], real[1] - real[0])
    check["removed"] = [runset.pool_ids[i] for i in removed]
    if warn and not check["ok"]:
        warnings.warn(NonlinearityWarning(
            f"{type(simulator).__name__} around run {base.name!r}: removing {count} random example(s) changed the "
            f"final test losses by {check['replayed_mean']:+.3g} on average when retrained, the prediction says "
            f"{check['predicted_mean']:+.3g} (magnitude x{check['magnitude_ratio']:.2g}, correlation "
            f"{check['correlation']:.2f}): its answers about single examples are unreliable here; see "
            f"{DOCS} and `simfluence smoothness`"), stacklevel=2)
    return check


def linearity_check(predicted: np.ndarray, replayed: np.ndarray) -> dict[str, Any]:
    """Compare a first-order prediction of an edit with its replay.

    Parameters
    ----------
    predicted, replayed : (n_test,) changes of the final test losses.

    Returns
    -------
    dict with ``predicted_mean``, ``replayed_mean``, ``magnitude_ratio`` (mean |predicted| / mean |replayed|),
    ``correlation`` (Pearson across test examples; 1.0 with fewer than two or constant values), ``sign_ok`` and
    ``ok`` (see the module's thresholds).
    """
    scale = float(np.mean(np.abs(replayed)))
    ratio = float(np.mean(np.abs(predicted)) / scale) if scale > 0 else (1.0 if not np.any(predicted) else np.inf)
    predicted_mean, replayed_mean = float(np.mean(predicted)), float(np.mean(replayed))
    sign_ok = bool(np.sign(predicted_mean) == np.sign(replayed_mean)  # a mean near 0 on either side has no sign
                   or abs(replayed_mean) < LINEARITY_SIGN_SHARE * scale
                   or abs(predicted_mean) < LINEARITY_SIGN_SHARE * float(np.mean(np.abs(predicted))))
    if predicted.size > 1 and np.std(predicted) > 0 and np.std(replayed) > 0:
        correlation = float(np.corrcoef(predicted, replayed)[0, 1])
    else:
        correlation = 1.0
    ok = bool(1 / LINEARITY_RATIO <= ratio <= LINEARITY_RATIO and sign_ok and correlation >= LINEARITY_MIN_CORRELATION)
    return {"predicted_mean": predicted_mean, "replayed_mean": replayed_mean, "magnitude_ratio": ratio,
            "correlation": correlation, "sign_ok": sign_ok, "ok": ok}
