"""Convex blends of simulators: one weight per member, chosen on validation runs carved from the training runs.

A blend predicts the weighted sum of its members' trajectories, ``sum_m w_m sim_m(c)``, with ``w`` on the simplex
(non-negative, summing to 1): a blend of simulators that never predict a negative loss never does either. Members
are methods of the registry (:data:`simfluence.methods.METHODS`) built by name, for example a learned simulator
and a gradient one (by default ``linear_mom_log`` and ``tracin_offset``), whose errors differ.

Fitting with ``weight="auto"``: every member is fitted on the training runs minus the last ``val_fraction`` of
them and rolled out over those validation runs from their observed initial losses; the weight vector of a simplex
grid (``weight_grid`` points per member, step ``1 / (weight_grid - 1)``) with the lowest all-steps MSE (logged
steps >= 1) is chosen; then every member is refitted on all the training runs. As the weights sum to 1 the
blend's residual is the weighted sum of the members' residuals, so its squared error is ``w^T G w`` with ``G`` the
Gram matrix of those residuals, and every grid point is scored at once.

The blend is linear in its members' trajectories, so its leave-one-out effects are the same weighted sum of the
members' own (:meth:`~simfluence.simulators.base.Simulator.leave_one_out`): exact when every member's is, which
a fitted blend declares in its ``tags["exact_loo"]``.

This module sits above the registry (it builds members by name) and below the applications; the model loader
(:func:`simfluence.methods.load_simulator`) rebuilds the members of a saved blend through
:meth:`BlendSimulator._restore_parts`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.methods import method
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, rollout_runs, training_runs

__all__ = ["BlendSimulator", "blend_errors", "simplex_grid"]

MAX_CANDIDATES = 100_000  # weight vectors a simplex grid may have (each is scored on the validation runs at once)
_MEMBER_PREFIX = "member{index}."  # a member's arrays in a model file: "member0.A_", "member1.scores_", ...


def simplex_grid(n_members: int, n_points: int) -> np.ndarray:
    """Every weight vector of ``n_members`` non-negative multiples of ``1 / (n_points - 1)`` summing to 1.

    Returns
    -------
    (n_candidates, n_members) float64, ``C(n_points + n_members - 2, n_members - 1)`` rows; for two members the
    weight of the first increases from 0 to 1 down the rows.
    """
    steps = n_points - 1
    slots = steps + n_members - 1
    chosen = list(combinations(range(slots), n_members - 1))
    bars = np.array(chosen, dtype=np.int64).reshape(len(chosen), n_members - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), slots)], axis=1)
    return (np.diff(edges, axis=1) - 1) / steps


def blend_errors(residuals: Sequence[np.ndarray], mask: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """All-steps MSE of every candidate blend from its members' residuals.

    Parameters
    ----------
    residuals : per member, (n_runs, T + 1, n_test) predicted minus actual loss.
    mask : (n_runs, T + 1) bool, the (run, step) cells scored.
    candidates : (n_candidates, n_members) weight vectors summing to 1.

    Returns
    -------
    (n_candidates,) MSE; infinite where a member with a positive weight has non-finite residuals.
    """
    flat = np.stack([np.asarray(r, dtype=np.float64)[mask].ravel() for r in residuals])  # (n_members, n_cells)
    if flat.shape[1] == 0:
        raise SimfluenceError("the validation runs logged no loss after step 0")
    broken = ~np.isfinite(flat).all(axis=1)
    flat[broken] = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        gram = flat @ flat.T
        errors = np.einsum("km,mn,kn->k", candidates, gram, candidates) / flat.shape[1]
    errors[(candidates[:, broken] > 0).any(axis=1) | ~np.isfinite(errors)] = np.inf
    return np.maximum(errors, 0.0)


class BlendSimulator(Simulator):
    """Convex blend of registry methods' trajectories (see the module docstring).

    Parameters
    ----------
    members : method names of :data:`~simfluence.methods.METHODS` (no method fitted around one base run, none
        that needs precomputed scores).
    weight : ``"auto"`` (chosen on validation runs) or one non-negative weight per member, summing to 1.
    weight_grid : points per member of the simplex grid searched by ``"auto"`` (21: steps of 0.05).
    val_fraction : share of the training runs held out to choose the weights (at least one run).
    member_params : optional ``{member name: {option: value}}`` overriding members' presets.

    Attributes
    ----------
    weights_ : (n_members,) the weights used.
    members_ : the members, fitted on all the training runs.
    candidates_ : (n_candidates, n_members) the weight vectors tried (``weight="auto"`` only, else None).
    validation_mse_ : (n_candidates,) their validation all-steps MSE (``inf``: a member's rollout was not finite).
    val_runs_ : names of the validation runs (empty with fixed weights).
    tags : set by ``fit``/loading: ``exact_loo`` True when every member's leave-one-out is exact.
    """

    kind = "blend"
    _fitted_arrays = ("weights_",)
    _optional_arrays = ("candidates_", "validation_mse_")
    _array_specs = {"weights_": ("float", ("n_members",)), "candidates_": ("float", ("n_candidates", "n_members")),
                    "validation_mse_": ("float", ("n_candidates",))}
    _state_specs = {"val_runs_": "list"}
    # exact_loo unknown before fitting (a fitted blend sets its own); the default members need a model
    tags = {**Simulator.tags, "needs": frozenset({"task", "checkpoints"})}

    def __init__(self, members: Sequence[str] = ("linear_mom_log", "tracin_offset"),
                 weight: str | Sequence[float] = "auto", weight_grid: int = 21, val_fraction: float = 0.2,
                 member_params: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.members = members
        self.weight = weight
        self.weight_grid = weight_grid
        self.val_fraction = val_fraction
        self.member_params = member_params

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> BlendSimulator:
        """Choose the weights on validation runs (unless fixed), then fit every member on ``runs``; returns self.

        ``task`` is passed to the members that need a model (see :class:`~simfluence.task.Task`).
        """
        runs = training_runs(runset, runs)
        names = self._member_names()
        fixed = self._fixed_weights(len(names))
        n_points = self._grid_points(len(names))  # every option checked before any member is fitted
        val_fraction = self._val_fraction()
        for name in names:
            self._build_member(name)  # an option a member does not take is an error naming it
        self.candidates_ = self.validation_mse_ = None
        self.val_runs_ = []
        if fixed is None:
            if len(runs) < 2:
                raise SimfluenceError("choosing blend weights needs at least 2 training runs (one is for validation)")
            n_val = min(len(runs) - 1, max(1, round(val_fraction * len(runs))))
            fit_runs, val_runs = runs[:-n_val], runs[-n_val:]
            residuals, mask = [], None
            for name in names:
                predicted, actual, mask = rollout_runs(self._fit_member(name, runset, fit_runs, task), runset, val_runs)
                with np.errstate(over="ignore", invalid="ignore"):
                    residuals.append(predicted - np.nan_to_num(actual))
            mask = mask.copy()
            mask[:, 0] = False
            self.candidates_ = simplex_grid(len(names), n_points)
            self.validation_mse_ = blend_errors(residuals, mask, self.candidates_)
            if not np.isfinite(self.validation_mse_).any():
                raise SimfluenceError("every member's rollout of the validation runs was not finite")
            fixed = self.candidates_[int(np.argmin(self.validation_mse_))]
            self.val_runs_ = [runset[i].name for i in val_runs]
        self.weights_ = np.asarray(fixed, dtype=np.float64)
        self.members_ = [self._fit_member(name, runset, runs, task) for name in names]
        self._set_tags()
        self._remember_ids(runset, runs)
        self.fitted_ = True
        return self

    def _member_names(self) -> list[str]:
        members = self.members
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise SimfluenceError(f"members must be a non-empty list of method names, got {members!r}")
        names = [str(name) for name in members]
        if len(set(names)) != len(names):
            raise SimfluenceError(f"members name a method twice: {names}")
        for name in names:
            entry = method(name)  # an unknown name is an error listing the known ones
            if "scores" in entry.needs or entry.per_base:
                raise SimfluenceError(f"method {name!r} cannot be a blend member: it needs precomputed scores or is "
                                      "fitted around one base run")
        params = self.member_params
        if params is not None and (not isinstance(params, Mapping) or any(name not in names for name in params)
                                   or not all(isinstance(value, Mapping) for value in params.values())):
            raise SimfluenceError(f"member_params must map member names to options, got {self.member_params!r}")
        return names

    def _fixed_weights(self, n_members: int) -> np.ndarray | None:
        if isinstance(self.weight, str) and self.weight == "auto":
            return None
        try:
            weights = np.asarray(self.weight, dtype=np.float64)
        except (TypeError, ValueError):
            weights = None
        if (weights is None or weights.shape != (n_members,) or not np.isfinite(weights).all() or (weights < 0).any()
                or abs(weights.sum() - 1.0) > 1e-6):
            raise SimfluenceError(f"weight must be 'auto' or {n_members} non-negative numbers summing to 1, "
                                  f"got {self.weight!r}")
        return weights / weights.sum()

    def _grid_points(self, n_members: int) -> int:
        """``weight_grid``, checked: an integer >= 2 whose simplex grid has at most ``MAX_CANDIDATES`` points."""
        points = self.weight_grid
        if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
            raise SimfluenceError(f"weight_grid must be an integer >= 2, got {points!r}")
        n_candidates = math.comb(int(points) + n_members - 2, n_members - 1)
        if n_candidates > MAX_CANDIDATES:
            raise SimfluenceError(f"weight_grid={points} gives {n_candidates} weight vectors for {n_members} members, "
                                  f"more than {MAX_CANDIDATES}: use a coarser grid")
        return int(points)

    def _val_fraction(self) -> float:
        fraction = self.val_fraction
        if isinstance(fraction, (bool, str)) or not isinstance(fraction, (int, float, np.number)) \
                or not 0 < float(fraction) < 1:
            raise SimfluenceError(f"val_fraction must be a number in (0, 1), got {fraction!r}")
        return float(fraction)

    def _build_member(self, name: str) -> Simulator:
        return method(name).build(**dict((self.member_params or {}).get(name, {})))

    def _fit_member(self, name: str, runset: RunSet, runs: list[int], task: Any) -> Simulator:
        return self._build_member(name).fit(runset, runs=runs, task=task)

    def _set_tags(self) -> None:
        self.tags = {**type(self).tags, "exact_loo": all(type(m).tags.get("exact_loo", False) for m in self.members_)}

    # ----------------------------------------------------------------------------------- prediction
    def _weighted(self, predict: Callable[[Simulator], np.ndarray]) -> np.ndarray:
        """``sum_m w_m predict(member_m)`` over the members with a positive weight."""
        self.check_fitted()
        total = None
        for weight, member in zip(self.weights_, self.members_, strict=True):
            if weight > 0:
                part = weight * predict(member)
                total = part if total is None else total + part
        return total

    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        return self._weighted(lambda member: member.simulate(curricula, initial_losses, learning_rates))

    def leave_one_out(
        self,
        curriculum: Curriculum,
        initial_losses: np.ndarray,
        learning_rates: np.ndarray | None = None,
        step: int | None = None,
        chunk: int = 256,
    ) -> np.ndarray:
        """The weighted sum of the members' leave-one-out effects (see :meth:`Simulator.leave_one_out`)."""
        return self._weighted(lambda member: member.leave_one_out(curriculum, initial_losses, learning_rates,
                                                                  step=step, chunk=chunk))

    # ----------------------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        members = [{"kind": m.kind, "params": m.get_params(), "state": m._state()} for m in self.members_]
        return {"members_": members, "val_runs_": self.val_runs_}

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        arrays = super()._saved_arrays()
        for index, member in enumerate(self.members_):
            prefix = _MEMBER_PREFIX.format(index=index)
            arrays.update({prefix + name: value for name, value in member._saved_arrays().items()})
        return arrays

    def _restore_parts(self, arrays: dict[str, np.ndarray], state: dict[str, Any],
                       restore: Callable[[str, Any, dict[str, np.ndarray]], Simulator]):
        saved = state.get("members_")
        if not isinstance(saved, list) or not saved:
            raise SimfluenceError("state 'members_' must be a non-empty list")
        prefixes = [_MEMBER_PREFIX.format(index=index) for index in range(len(saved))]
        self.members_ = [restore(f"member {index}", meta, {name[len(prefix):]: value for name, value in arrays.items()
                                                           if name.startswith(prefix)})
                         for index, (prefix, meta) in enumerate(zip(prefixes, saved, strict=True))]
        self._set_tags()
        rest = {name: value for name, value in arrays.items() if not name.startswith(tuple(prefixes))}
        return rest, {name: value for name, value in state.items() if name != "members_"}

    def _self_check(self) -> None:
        names = self._member_names()
        weights = np.asarray(self.weights_)
        if weights.shape != (len(self.members_),) or len(names) != len(self.members_):
            raise SimfluenceError(f"{len(names)} member names, {len(self.members_)} members, weights {weights.shape}")
        if not np.isfinite(weights).all() or (weights < 0).any() or abs(weights.sum() - 1.0) > 1e-6:
            raise SimfluenceError(f"weights {weights.tolist()} are not convex")
        for name, member in zip(names, self.members_, strict=True):
            if type(member) is not method(name).simulator_class():
                raise SimfluenceError(f"member {name!r} is a {type(member).__name__}")
            if (member.n_pool_, member.n_test_) != (self.n_pool_, self.n_test_):
                raise SimfluenceError(f"member {name!r} is for {member.n_pool_} pool / {member.n_test_} test examples")
        super()._self_check()
