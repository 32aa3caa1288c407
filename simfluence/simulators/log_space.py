"""The linear family fitted to log losses: simulated losses are positive by construction.

:class:`SimfluenceLinear` and :class:`SimfluenceAdditive` step the loss itself, so a large enough step can
carry it below zero (their ``clip_negative`` only stops it at a floor of 0). Here the same recurrence
(:mod:`.dynamics`, momentum and every extension included) runs on ``x = log L``::

    x_t = alpha_t x_{t-1} + beta_t        <=>        L_t = L_{t-1} ** alpha_t * exp(beta_t)

so in loss space the dynamics are multiplicative and every simulated loss is ``exp(x) > 0`` (in floating point:
down to ``exp(-745)``, below which it rounds to 0; never negative). With
``alpha = 1`` (:class:`LogAdditive`) each example multiplies the loss by a fixed factor,
``L_t = L_{t-1} * prod_{i in c_t} exp(B_i)``: a relative effect, which suits losses that decay
geometrically (cross-entropy) and cannot overshoot zero.

- **Fit**: the transitions' losses are replaced by their logs (:meth:`_transitions`, the one hook into the
  linear family's fit); everything else — ridge solve, step terms, learning-rate weights, momentum — is the
  linear family's. ``lam="auto"`` and ``momentum="auto"`` are still chosen by the all-steps MSE *of the
  losses* on validation runs, because candidates are rolled out with :meth:`simulate`, which maps back.
- **Simulate**: initial losses go to log space, the log trajectory is rolled out, and ``exp`` maps it back.
- **Leave-one-out** stays exact: the log-space change ``d`` of every example (:mod:`.loo`) maps to the loss
  change ``exp(x_T + d) - exp(x_T) = exp(x_T) * expm1(d)`` exactly.

Losses below ``min_loss`` (for example an exact 0 of a squared error) are raised to it before the log;
negative losses are outside the model and an error.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.design import Transitions
from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.linear import ADDITIVE_FIXED, SimfluenceAdditive, SimfluenceLinear, family_init

DEFAULT_MIN_LOSS = 1e-6
_MIN_LOSS_OPTION = {"min_loss": ("float", DEFAULT_MIN_LOSS)}  # losses below it are raised to it before the log


class _LogSpace:
    """What a linear-family simulator changes to run on log losses (mixed in before the loss-space class)."""

    min_loss: float

    def _log(self, losses: np.ndarray, what: str) -> np.ndarray:
        """log(max(losses, min_loss)); negative losses are an error naming ``what``."""
        losses = np.asarray(losses)
        negative = losses < 0
        if np.any(negative):
            raise SimfluenceError(f"{type(self).__name__} models log losses: {what} holds a negative loss "
                                  f"({float(losses[negative].flat[0]):g})")
        return np.log(np.maximum(losses, self.min_loss))

    def _prepare(self, runset: RunSet, runs: list[int]) -> None:
        if isinstance(self.min_loss, str) or not float(self.min_loss) > 0:
            raise SimfluenceError(f"min_loss must be > 0, got {self.min_loss!r}")
        for position in runs:
            run = runset[position]
            if run.losses.size and float(np.min(run.losses)) < 0:
                step = int(run.logged_steps[np.flatnonzero(np.min(run.losses, axis=1) < 0)[0]])
                raise SimfluenceError(f"{type(self).__name__} models log losses: run {run.name!r} logged a "
                                      f"negative loss at step {step}")
        super()._prepare(runset, runs)
        self.loss_floor_ = None  # exp(x) > 0 already; a floor would break the exact leave-one-out

    def _transitions(self, runset: RunSet, runs: Sequence[int]) -> Transitions:
        transitions = super()._transitions(runset, runs)
        return replace(transitions, prev=self._log(transitions.prev, "a training run"),
                       next=self._log(transitions.next, "a training run"))

    def _rollout_log(
        self, curricula: Curriculum | Sequence[Curriculum], log_initial: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None,
    ) -> np.ndarray:
        return super().simulate(curricula, log_initial, learning_rates, clip=False)

    def simulate_log(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Log-loss trajectories ``log L`` (n_curricula, T + 1, n_test); see :meth:`simulate`."""
        log_initial = self._log(np.asarray(initial_losses, dtype=np.float64), "initial_losses")
        return self._rollout_log(curricula, log_initial, learning_rates)

    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
        clip: bool = True,
    ) -> np.ndarray:
        """Predict loss trajectories (see :meth:`Simulator.simulate`): ``exp`` of the log-space rollout, so every
        loss is > 0 (a diverging simulator gives inf). ``clip`` is accepted for the linear family's interface and
        has no effect (there is no floor to clip at)."""
        with np.errstate(over="ignore"):
            return np.exp(self.simulate_log(curricula, initial_losses, learning_rates))

    def leave_one_out(
        self,
        curriculum: Curriculum,
        initial_losses: np.ndarray,
        learning_rates: np.ndarray | None = None,
        step: int | None = None,
        chunk: int = 256,
    ) -> np.ndarray:
        """Exact leave-one-out effects in loss units (see :meth:`Simulator.leave_one_out` for the layout).

        The exact log-space change ``d`` of every example (:mod:`.loo`) is mapped to
        ``exp(x_step + d) - exp(x_step)``; equal (to rounding) to re-simulating every leave-one-out curriculum.
        """
        log_initial = self._log(np.asarray(initial_losses, dtype=np.float64), "initial_losses")
        log_change = super().leave_one_out(curriculum, log_initial, learning_rates, step, chunk)
        step = curriculum.n_steps if step is None else int(step)
        rates = None if learning_rates is None else [np.asarray(learning_rates, dtype=np.float64)]
        log_base = self._rollout_log(curriculum, log_initial, rates)[0, step]
        with np.errstate(over="ignore", invalid="ignore"):
            return np.exp(log_base) * np.expm1(log_change)


class LogLinear(_LogSpace, SimfluenceLinear):
    """Simfluence-Linear on log losses: ``log L_t = alpha_t log L_{t-1} + beta_t`` (see the module docstring).

    Parameters are those of :class:`SimfluenceLinear` (without ``clip_negative``: losses are positive by
    construction), plus

    min_loss : losses below it are raised to it before the log (> 0).

    Attributes are those of :class:`SimfluenceLinear`; ``A_``, ``B_`` and the step terms act on log losses, as do
    :meth:`step_coefficients` and :meth:`simulate_log`.
    """

    kind = "linear_log"
    __init__ = family_init(fixed={"clip_negative": False}, extra=_MIN_LOSS_OPTION, after="momentum")


class LogAdditive(_LogSpace, SimfluenceAdditive):
    """Simfluence-Additive on log losses: ``L_t = L_{t-1} * exp(sum_{i in c_t} B_i)``, order-free.

    Parameters are those of :class:`SimfluenceAdditive`, plus ``min_loss`` (see :class:`LogLinear`).
    """

    kind = "additive_log"
    __init__ = family_init(fixed=ADDITIVE_FIXED, extra=_MIN_LOSS_OPTION, after="batch_mean")
