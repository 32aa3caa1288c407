"""Training-run simulators: fitted models that predict test-loss trajectories for any curriculum.

- :mod:`.base`: the protocol (fit / simulate / leave_one_out / save, get_params / set_params / clone);
- :mod:`.dynamics`: the linear (momentum) recurrence shared by the linear family, its rollout and exact
  leave-one-out (:mod:`.loo`), written once;
- :mod:`.coefficients`: the per-step coefficients of a curriculum, shared by :mod:`.dynamics` and :mod:`.loo`;
- :mod:`.linear`: Simfluence-Linear (the paper's form and its time-aware extensions) and Simfluence-Additive;
- :mod:`.log_space`: the same models fitted to log losses (multiplicative dynamics, losses > 0 by construction);
- :mod:`.fixed_effects`: additive simulators with fixed per-example scores and a calibrated scale (the form
  of TracIn, influence functions and TrackStar, whose scores :mod:`simfluence.attribution` computes);
- :mod:`.mean_curve`: the baseline that ignores the curriculum.

Methods are built by name from the one registry, :mod:`simfluence.methods`. Nothing here imports torch.
"""
from __future__ import annotations

from simfluence.simulators.base import Simulator, clone, fit_needs, is_per_base, rollout_runs
from simfluence.simulators.coefficients import StepCoefficients
from simfluence.simulators.dynamics import LinearDynamics
from simfluence.simulators.fixed_effects import FixedEffectsSimulator
from simfluence.simulators.linear import SimfluenceAdditive, SimfluenceLinear
from simfluence.simulators.log_space import LogAdditive, LogLinear
from simfluence.simulators.mean_curve import MeanCurve

__all__ = [
    "FixedEffectsSimulator",
    "LinearDynamics",
    "LogAdditive",
    "LogLinear",
    "MeanCurve",
    "SimfluenceAdditive",
    "SimfluenceLinear",
    "Simulator",
    "StepCoefficients",
    "clone",
    "fit_needs",
    "is_per_base",
    "rollout_runs",
]
