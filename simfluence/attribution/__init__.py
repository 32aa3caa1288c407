"""Gradient-based training data attribution: per-example gradients, projection, TracIn, influence, TrackStar.

The journey of this subpackage: a model and its per-example loss ``--gradients-->`` (n, n_params) per-example
gradients (``torch.func``) ``--projection-->`` optional (n, d) random projections ``--tracin / influence /
trackstar-->`` (n_pool, n_test) score matrices. Scores use one sign convention throughout: **positive means
a proponent**, i.e. training on the pool example is predicted to *lower* the test example's loss.
:mod:`simfluence.attribution.simulators` turns score matrices into additive training-run simulators
(:class:`~simfluence.simulators.fixed_effects.FixedEffectsSimulator`).

The scoring functions take a model and tensors only. What reads run sets: :mod:`~simfluence.attribution.checkpoints`
(the saved model and optimizer states of a run); the simulators built on the scores
(:mod:`~simfluence.attribution.simulators`, :mod:`~simfluence.attribution.unrolled_simulator` and
:class:`~simfluence.attribution.hybrid.LinearPrior`, ``linear_mom_prior``: the linear family fitted from run logs
with a gradient prior); and :func:`~simfluence.attribution.smoothness.metasmoothness`, which replays a run to
measure whether any attribution can work on its training setup.
"""
from __future__ import annotations

from simfluence.attribution.checkpoints import Checkpoint, load_checkpoints
from simfluence.attribution.gradients import (
    ParameterSelection,
    iter_per_example_gradients,
    last_layer,
    per_example_gradients,
    select_parameters,
)
from simfluence.attribution.influence import influence_scores
from simfluence.attribution.projection import GaussianProjection, projected_gradients
from simfluence.attribution.smoothness import SmoothnessReport, metasmoothness
from simfluence.attribution.tracin import tracin_scores
from simfluence.attribution.trackstar import trackstar_scores

__all__ = [
    "Checkpoint",
    "GaussianProjection",
    "ParameterSelection",
    "SmoothnessReport",
    "influence_scores",
    "iter_per_example_gradients",
    "last_layer",
    "load_checkpoints",
    "metasmoothness",
    "per_example_gradients",
    "projected_gradients",
    "select_parameters",
    "tracin_scores",
    "trackstar_scores",
]
