"""Training-run simulators: fitted models that predict test-loss trajectories for any curriculum.

``make_simulator(name)`` builds one by the method name used on the command line; ``METHODS`` lists
them. Learned: ``additive``, ``linear`` (the paper's Simfluence-Linear) and the time-aware extensions;
baseline: ``mean_curve``; gradient-based attribution methods with fixed effects (``tracin``, ``tracin_cos``,
``influence``, ``trackstar``), which read the run set's checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from simfluence.errors import SimfluenceError
from simfluence.simulators.base import REGISTRY, Simulator, load_simulator, rollout_runs
from simfluence.simulators.gradient import (
    FixedEffectsSimulator,
    InfluenceSimulator,
    TracInSimulator,
    TrackStarSimulator,
)
from simfluence.simulators.linear import SimfluenceAdditive, SimfluenceLinear
from simfluence.simulators.mean_curve import MeanCurve


def preset(cls: type[Simulator], **fixed: Any) -> Callable[..., Simulator]:
    """A factory of ``cls`` with preset hyper-parameters that keyword arguments may override."""

    def build(**params: Any) -> Simulator:
        return cls(**{**fixed, **params})

    return build


METHODS: dict[str, Callable[..., Simulator]] = {
    "mean_curve": MeanCurve,
    "additive": SimfluenceAdditive,
    "linear": SimfluenceLinear,
    # alpha shrunk towards 1 instead of 0, otherwise the paper's model
    "linear_res": preset(SimfluenceLinear, alpha_center=1.0),
    # time-aware: per-step terms shared across runs, effects scaled by the learning rate
    "linear_step": preset(SimfluenceLinear, alpha_center=1.0, step_terms=True, lr_scaled="auto", clip_negative=True),
    # time- and optimizer-aware: linear_step plus a velocity (momentum) chosen on validation runs
    "linear_mom": preset(
        SimfluenceLinear, alpha_center=1.0, step_terms=True, lr_scaled="auto", momentum="auto", clip_negative=True
    ),
    # gradient-based attribution as additive simulators with fixed effects (read the run set's checkpoints)
    "tracin": TracInSimulator,
    "tracin_cos": preset(TracInSimulator, variant="cosine"),
    "influence": InfluenceSimulator,
    "trackstar": TrackStarSimulator,
}
DEFAULT_METHODS = ("mean_curve", "additive", "linear", "linear_step", "linear_mom")


def make_simulator(name: str, **params: Any) -> Simulator:
    """A fresh simulator for a method name of ``METHODS`` (extra hyper-parameters passed through)."""
    if name not in METHODS:
        raise SimfluenceError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](**params)


__all__ = [
    "DEFAULT_METHODS",
    "FixedEffectsSimulator",
    "InfluenceSimulator",
    "TracInSimulator",
    "TrackStarSimulator",
    "METHODS",
    "REGISTRY",
    "MeanCurve",
    "SimfluenceAdditive",
    "SimfluenceLinear",
    "Simulator",
    "load_simulator",
    "make_simulator",
    "rollout_runs",
]
