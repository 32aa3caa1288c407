"""The one registry of methods: name, class and preset, one-line description, and what each needs.

The command line (``--method``, ``--methods``), :func:`simfluence.evaluation.evaluate`, the report, the
fact-tracing benchmark and :func:`load_simulator` all read :data:`METHODS`. A method is a simulator class with
preset hyper-parameters; keyword arguments override the preset, and a name the class does not take is an
error naming the method's options. Classes are named by import path and imported on first use, so the
registry costs nothing and the gradient methods' torch code loads only when one is built.

``needs`` says what fitting requires beyond logged runs: ``"task"`` (the model, data and loss: a
:class:`~simfluence.task.Task`), ``"checkpoints"`` (saved model states in the run set) or ``"scores"``
(precomputed); it is read from the class's ``tags`` (declared once there), as is ``per_base``.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simfluence._io import load_npz
from simfluence.errors import ModelFileError, SimfluenceError
from simfluence.simulators.base import MODEL_FORMAT, MODEL_VERSION, Simulator, fit_needs, is_per_base

__all__ = ["DEFAULT_METHODS", "DEFAULT_METHOD", "METHODS", "Method", "load_simulator", "make_simulator"]

_LINEAR = "simfluence.simulators.linear:SimfluenceLinear"
_LOG_LINEAR = "simfluence.simulators.log_space:LogLinear"
# the time-aware preset of the linear family: alpha shrunk towards 1, per-step terms, learning-rate-scaled effects
_STEP = {"alpha_center": 1.0, "step_terms": True, "lr_scaled": "auto"}


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Attributes
    ----------
    name : the method's name (``--method NAME``).
    cls : ``"module:Class"`` of the simulator.
    description : one line for help texts and reports.
    preset : hyper-parameters that differ from the class defaults (overridable).
    """

    name: str
    cls: str
    description: str
    preset: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs(self) -> frozenset[str]:
        """What fitting needs besides logged runs: the class's ``tags["needs"]`` (imports the class)."""
        return fit_needs(self.simulator_class())

    @property
    def per_base(self) -> bool:
        """Whether the method is fitted around one base run: the class's ``tags["per_base"]`` (imports the class)."""
        return is_per_base(self.simulator_class())

    def simulator_class(self) -> type[Simulator]:
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, **params: Any) -> Simulator:
        """A fresh (unfitted) simulator with the preset overridden by ``params``."""
        cls = self.simulator_class()
        options = cls._param_names()
        unknown = [name for name in params if name not in options]
        if unknown:
            listed = ", ".join(options) if options else "none"
            raise SimfluenceError(f"method {self.name!r} has no option {unknown[0]!r} (its options: {listed})")
        return cls(**{**self.preset, **params})


def _registry(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


METHODS: dict[str, Method] = _registry(
    Method("mean_curve", "simfluence.simulators.mean_curve:MeanCurve",
           "baseline: the average training-run loss change, whatever the curriculum"),
    Method("additive", "simfluence.simulators.linear:SimfluenceAdditive",
           "Simfluence-Additive (alpha = 1): L_t = L_{t-1} + sum B_i"),
    Method("linear", _LINEAR,
           "Simfluence-Linear exactly as the paper: L_t = (sum A_i) L_{t-1} + sum B_i, ridge towards 0"),
    Method("linear_res", _LINEAR, "the paper's model with alpha shrunk towards 1 instead of 0",
           {"alpha_center": 1.0}),
    Method("linear_step", _LINEAR,
           "alpha shrunk towards 1, per-step terms shared across runs, effects scaled by the learning rate",
           {**_STEP, "clip_negative": True}),
    Method("linear_mom", _LINEAR,
           "linear_step plus a velocity (momentum) term, second-order like the optimizer; mu chosen on "
           "validation runs",
           {**_STEP, "momentum": "auto", "clip_negative": True}),
    # the linear family on log losses: multiplicative dynamics, every simulated loss > 0 by construction
    Method("linear_log", _LOG_LINEAR,
           "Simfluence-Linear on log losses (the paper's form there): L_t = L_{t-1}^(sum A_i) exp(sum B_i), "
           "always > 0"),
    Method("additive_log", "simfluence.simulators.log_space:LogAdditive",
           "Simfluence-Additive on log losses: L_t = L_{t-1} exp(sum B_i), each example multiplies the loss by a "
           "factor; always > 0"),
    Method("linear_mom_log", _LOG_LINEAR,
           "linear_mom on log losses: multiplicative dynamics, simulated losses > 0 by construction",
           {**_STEP, "momentum": "auto"}),
    Method("linear_mom_prior", "simfluence.attribution.hybrid:LinearPrior",
           "linear_mom whose additive effects are shrunk towards TracIn per checkpoint phase times a scale fitted per "
           "test example (effect-level hybrid), lam and mu chosen on validation runs",
           {**_STEP, "momentum": "auto", "clip_negative": True}),
    Method("fixed_effects", "simfluence.simulators.fixed_effects:FixedEffectsSimulator",
           "any precomputed (n_pool, n_test) scores as an additive simulator, scale fitted on training runs "
           "(Python only: set_scores() before fit())"),
    Method("tracin", "simfluence.attribution.simulators:TracInSimulator",
           "TracIn-CP (gradient dot products x learning rate) as an additive simulator, scale fitted on training "
           "runs"),
    Method("tracin_cos", "simfluence.attribution.simulators:TracInSimulator",
           "TracIn-CP with gradient cosine similarity", {"variant": "cosine"}),
    Method("influence", "simfluence.attribution.simulators:InfluenceSimulator",
           "influence functions (Gauss-Newton Hessian + damping, final checkpoint) as an additive simulator"),
    Method("trackstar", "simfluence.attribution.simulators:TrackStarSimulator",
           "TrackStar-style unit-normalised, projected, Hessian-corrected gradient similarity"),
    # the fair variants: the mean training-run change as the baseline trajectory (the role linear_mom's step terms
    # play) and one scale per test example, fitted on training runs only; TrackStar on every saved checkpoint
    Method("tracin_offset", "simfluence.attribution.simulators:TracInSimulator",
           "TracIn-CP explaining the runs' differences from the mean curve, one scale per test example",
           {"offset": "mean_curve", "scale": "per_test"}),
    Method("tracin_cos_offset", "simfluence.attribution.simulators:TracInSimulator",
           "gradient cosine (TracIn-CP) explaining the differences from the mean curve, per-test scale",
           {"variant": "cosine", "offset": "mean_curve", "scale": "per_test"}),
    Method("influence_offset", "simfluence.attribution.simulators:InfluenceSimulator",
           "influence functions explaining the differences from the mean curve, per-test scale",
           {"offset": "mean_curve", "scale": "per_test"}),
    Method("trackstar_offset", "simfluence.attribution.simulators:TrackStarSimulator",
           "TrackStar averaged over every saved checkpoint, explaining the differences from the mean curve, "
           "per-test scale", {"checkpoints": "all", "offset": "mean_curve", "scale": "per_test"}),
    Method("tracin_cos_final", "simfluence.attribution.simulators:TracInSimulator",
           "control for TrackStar: plain gradient cosine at the final checkpoint only",
           {"variant": "cosine", "checkpoints": "final"}),
    Method("tracin_cos_final_offset", "simfluence.attribution.simulators:TracInSimulator",
           "control for TrackStar: plain gradient cosine at the final checkpoint only, mean-curve offset, "
           "per-test scale", {"variant": "cosine", "checkpoints": "final", "offset": "mean_curve",
                              "scale": "per_test"}),
    Method("trackstar_no_opt", "simfluence.attribution.simulators:TrackStarSimulator",
           "TrackStar without the optimizer second-moment correction", {"optimizer_correction": False}),
    Method("trackstar_no_hessian", "simfluence.attribution.simulators:TrackStarSimulator",
           "TrackStar without the task-specific Hessian", {"hessian": "none"}),
    Method("trackstar_train_hessian", "simfluence.attribution.simulators:TrackStarSimulator",
           "TrackStar with the training-gradient Hessian only", {"hessian": "train"}),
    Method("trackstar_no_unit", "simfluence.attribution.simulators:TrackStarSimulator",
           "TrackStar without unit normalisation (inner products, not cosines)", {"unit_normalize": False}),
    Method("unrolled", "simfluence.attribution.unrolled_simulator:UnrolledSimulator",
           "exact first-order effects by differentiating through a replay of one base run (fit on that run only)"),
    Method("unrolled_anchored", "simfluence.attribution.anchored:AnchoredSimulator",
           "unrolled's exact effects of one base run as the impulses of a momentum rollout: any curriculum, any "
           "length; unrolled's final losses for the base's length (fit on that run only)"),
    Method("blend", "simfluence.blend:BlendSimulator",
           "convex blend of linear_mom_log's and tracin_offset's trajectories, one weight chosen on validation runs "
           "carved from the training runs"),
    Method("blend_influence", "simfluence.blend:BlendSimulator",
           "convex blend of linear_mom_log's and influence_offset's trajectories (influence functions cost more "
           "than TracIn), one weight chosen on validation runs", {"members": ("linear_mom_log", "influence_offset")}),
)

# the methods `simfluence evaluate` runs by default (learned simulators and the baseline: no model needed)
DEFAULT_METHODS = ("mean_curve", "additive", "linear", "linear_step", "linear_mom")
# the method `simfluence fit` uses by default: the best of the demo on held-out runs
DEFAULT_METHOD = "linear_mom"


def method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name is an error listing the known ones."""
    if name not in METHODS:
        raise SimfluenceError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def make_simulator(name: str, **params: Any) -> Simulator:
    """A fresh simulator for a method name of :data:`METHODS` (hyper-parameters override its preset)."""
    return method(name).build(**params)


def load_simulator(path: str | os.PathLike) -> Simulator:
    """Read a simulator written by :meth:`Simulator.save` (any kind); never unpickles.

    Every field is checked before use: an unknown kind, a parameter the class does not take, state that is
    not a JSON object or names an attribute that is not part of the saved state, missing or extra arrays are
    each one ``ModelFileError`` naming the file.
    """
    path = Path(path)
    label = repr(str(path))
    if not path.is_file():
        raise ModelFileError(f"{label}: no such simulator file")
    try:
        _check_archive(path, label)
        arrays, meta = load_npz(path)
    except ModelFileError:
        raise
    except (OSError, ValueError, RecursionError, EOFError) as err:
        raise ModelFileError(f"{label} is not a simulator file: {err}") from None
    except Exception as err:  # zip/npz readers raise many types on corrupt input
        raise ModelFileError(f"{label} is not a simulator file ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{label} is not a simfluence simulator file")
    if meta.get("version") != MODEL_VERSION:
        raise ModelFileError(f"{label}: simulator format version {meta.get('version')!r} is not supported")
    return _restore(label, meta, arrays)


# the arrays of a model file may hold at most this many times the file's bytes (np.savez stores them uncompressed;
# a compressed member that would inflate past it, a zip bomb, is refused before it is read)
MAX_INFLATION = 16
_SMALL_FILE = 2**20  # bytes below which any inflation is allowed


def _check_archive(path: Path, label: str) -> None:
    """Refuse a model file whose arrays would take more memory than the file can honestly hold, before reading it.

    The uncompressed sizes the zip directory declares must total at most ``MAX_INFLATION`` times the file's size
    (or ``_SMALL_FILE``), and every member's ``.npy`` header must declare no more data than the member holds.
    """
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        declared = sum(member.file_size for member in members)
        limit = max(MAX_INFLATION * path.stat().st_size, _SMALL_FILE)
        if declared > limit:
            raise ModelFileError(f"{label}: its arrays would inflate to {declared} bytes, more than {limit} "
                                 f"({MAX_INFLATION}x the file)")
        for member in members:
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                wanted = math.prod(shape) * dtype.itemsize
                if wanted > member.file_size - handle.tell():
                    raise ModelFileError(f"{label}: array {member.filename!r} declares {wanted} bytes of data, "
                                         f"its member holds {member.file_size - handle.tell()}")


def _restore(label: str, meta: Any, arrays: dict) -> Simulator:
    """A simulator from its saved ``kind``, ``params`` and ``state`` and its arrays, every field checked.

    Composite simulators rebuild their parts through :meth:`Simulator._restore_parts`, which calls back here.
    """
    if not isinstance(meta, dict):
        raise ModelFileError(f"{label}: a saved simulator must be a JSON object")
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in METHODS:
        raise ModelFileError(f"{label}: unknown simulator kind {kind!r}")
    cls = METHODS[kind].simulator_class()
    params, state = meta.get("params"), meta.get("state")
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise ModelFileError(f"{label}: 'params' and 'state' must be JSON objects")
    unknown = [name for name in params if name not in cls._param_names()]
    if unknown:
        raise ModelFileError(f"{label}: {cls.__name__} has no parameter {unknown[0]!r}")
    defaults = inspect.signature(cls.__init__).parameters
    params = {name: tuple(value) if isinstance(value, list) and isinstance(defaults[name].default, tuple) else value
              for name, value in params.items()}  # JSON has no tuples
    try:
        sim = cls(**params)
    except (TypeError, ValueError, SimfluenceError) as err:
        raise ModelFileError(f"{label}: bad parameters: {err}") from None
    try:
        arrays, state = sim._restore_parts(arrays, state, lambda part, saved, part_arrays: _restore(
            f"{label} {part}", saved, part_arrays))
    except ModelFileError:
        raise
    except Exception as err:  # noqa: BLE001 - as for the self-check below: one clear line, whatever breaks
        raise ModelFileError(f"{label}: bad parts ({type(err).__name__}: {err})") from None
    expected, optional = set(cls._fitted_arrays), set(getattr(cls, "_optional_arrays", ()))
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected - optional)
    if missing or extra:
        problem = f"missing arrays {missing}" if missing else f"unexpected arrays {extra}"
        raise ModelFileError(f"{label}: {problem}")
    bad_state = [name for name in state if not (isinstance(name, str) and name.endswith("_") and name.isidentifier()
                                                and not name.startswith("_"))]
    if bad_state:
        raise ModelFileError(f"{label}: state key {bad_state[0]!r} is not a fitted attribute")
    try:
        cls.check_saved(arrays, state)
    except SimfluenceError as err:
        raise ModelFileError(f"{label}: {err}") from None
    for name in (*cls._fitted_arrays, *optional):
        if name in arrays:
            setattr(sim, name, arrays[name])
    sim._set_state(state)
    if "pool_ids_" not in state:  # files of version 1 written before ids were saved (an array confirmed the size)
        sim.pool_ids_ = list(range(state["n_pool_"]))
    if "test_ids_" not in state:
        sim.test_ids_ = list(range(state["n_test_"]))
    if "train_runs_" not in state:
        sim.train_runs_ = []
    try:
        allowed = sim.state_names()
    except (AttributeError, KeyError, TypeError) as err:
        raise ModelFileError(f"{label}: incomplete state ({err})") from None
    unexpected = sorted(set(state) - allowed)
    if unexpected:
        raise ModelFileError(f"{label}: unexpected state {unexpected[0]!r} for {cls.__name__}")
    sim.fitted_ = True
    try:
        sim._self_check()
    except Exception as err:  # noqa: BLE001 - whatever untrusted state breaks, the caller gets one clear line
        raise ModelFileError(f"{label}: the saved state is inconsistent ({type(err).__name__}: {err})") from None
    return sim
