"""Simfluence-Linear, Simfluence-Additive and the time-aware extension, as one estimator family.

The paper's model (Guu et al. 2023), one independent simulator per test example z::

    L_t(z) = alpha_t(z) * L_{t-1}(z) + beta_t(z)
    alpha_t = sum_{i in c_t} A_i(z)          beta_t = sum_{i in c_t} B_i(z)

fitted by ridge regression on teacher-forced transitions of the training runs (the observed
``L_{t-1}`` is the regressor). ``SimfluenceLinear()`` with default arguments is exactly that model.

The paper's model has no notion of time, yet learning-rate warm-up and decay make the same batch act
differently at step 10 and at step 500, and its ridge penalty pulls ``alpha`` towards 0 ("forget
everything") where the truth is close to 1. The general form, of which the paper's is a special case::

    alpha_t = alpha_center + w_t * sum_{i in c_t} A_i + a_step(t)
    beta_t  =                w_t * sum_{i in c_t} B_i + b_step(t)

- ``alpha_center=1`` shrinks alpha towards 1 (keep the loss) instead of 0;
- ``step_terms=True`` adds per-step terms ``a_step, b_step`` shared across runs (they capture the
  average dynamics of the schedule; the example effects then explain how curricula differ);
- ``lr_scaled=True`` sets ``w_t = lr_t / mean(lr)``: an example's effect scales with the step's
  learning rate, as a gradient step does;
- ``batch_mean=True`` sets ``w_t = 1 / |c_t|`` (mean over the batch instead of the paper's sum).
- ``momentum=mu`` makes the simulator second order, like the optimizer it imitates: with momentum
  SGD (or Adam's first moment) a batch keeps moving the weights for many steps after it was seen, so
  its effect on a test loss is spread over the following steps. The loss then moves with a velocity::

      v_t = mu * v_{t-1} + (alpha_t - 1) * L_{t-1} + beta_t        L_t = L_{t-1} + v_t

  ``momentum=0`` is the first-order model above. Under teacher forcing the observed change
  ``L_{t-1} - L_{t-2}`` is the previous velocity, so the fit stays one batched ridge regression with
  target ``L_t - L_{t-1} - mu * (L_{t-1} - L_{t-2})``. ``momentum="auto"`` picks mu on validation runs.

``SimfluenceAdditive`` is ``alpha = 1``: ``L_t = L_{t-1} + sum B_i``, order-free.

Losses logged every k steps give transitions of k steps whose features sum the batches in between; the
multiplicative part is then fitted to the first-order k-step form ``alpha = 1 + k (alpha_center - 1) +
sum A`` (exact for additive models, an approximation for multiplicative ones).

Ridge strength ``lam="auto"`` (and ``momentum="auto"``) are chosen on validation runs carved out of the
training runs (the last ``val_fraction`` of them), scored by rolled-out all-steps MSE; the final fit
uses all training runs. When the strongest or weakest ``lam`` of the grid wins, the grid is extended
``LAM_EDGE_DECADES`` decades beyond it and the choice made again; a fit never falls back silently: when the
extended edge still wins, or ``momentum="auto"`` must drop the velocity because the losses are not logged at
every step, it issues a :class:`~simfluence.errors.FitWarning` and keeps the message in ``fit_warnings_``.
The search costs about as much as one or two fixed-``lam`` fits: candidates are
solved strong to weak ``lam``, each warm-starting the next and cutting only the residual that the change
of ``lam`` leaves (by ``SELECTION_REDUCTION``, never tighter than ``SELECTION_TOL``: validation errors
need three digits, not ten); the fit is linear in its target, so one solve per ``lam`` with two
right-hand sides (first-order target and previous change) gives the effects of every momentum
(``theta(mu) = theta_0 + mu * theta_1``); and the final fit starts from the chosen candidate.
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from simfluence.design import FeatureSpec, Transitions, build_transitions, mean_lr_schedule
from simfluence.errors import FitWarning, SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, clone, rollout_runs, training_runs
from simfluence.simulators.dynamics import LinearDynamics
from simfluence.solvers import solve_ridge

DEFAULT_LAM_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_MOMENTUM_GRID = (0.0, 0.5, 0.8, 0.9)
SELECTION_TOL = 1e-6  # the tightest CG tolerance of a lam/momentum candidate (validation MSE to ~3 digits)
SELECTION_REDUCTION = 1e-3  # a candidate cuts its warm start's residual at the new lam by this factor
PRECISIONS = ("float32", "float64")
SOLVERS = ("auto", "direct", "cg")
LAM_EDGE_DECADES = 3  # decades the lam grid is extended by when its strongest or weakest value wins

# The options of the linear family, in signature order: name -> (annotation, default), written once. Each class
# takes all of them or fewer (see ``family_init``); they are documented in :class:`SimfluenceLinear`.
LINEAR_OPTIONS: dict[str, tuple[str, Any]] = {
    "lam": ("float | str", "auto"),
    "multiplicative": ("bool", True),
    "alpha_center": ("float", 0.0),
    "step_terms": ("bool", False),
    "lr_scaled": ("bool | str", False),
    "batch_mean": ("bool", False),
    "momentum": ("float | str", 0.0),
    "clip_negative": ("bool", False),
    "step_lam_ratio": ("float", 1.0),
    "lam_grid": ("Sequence[float]", DEFAULT_LAM_GRID),
    "momentum_grid": ("Sequence[float]", DEFAULT_MOMENTUM_GRID),
    "val_fraction": ("float", 0.2),
    "solver": ("str", "auto"),
    "tol": ("float", 1e-10),
    "max_iter": ("int", 5000),
    "precision": ("str", "float32"),
    "device": ("str | None", None),
}
# what an additive model holds fixed instead of taking as options
ADDITIVE_FIXED: dict[str, Any] = {"multiplicative": False, "alpha_center": 1.0, "momentum": 0.0,
                                  "clip_negative": False, "momentum_grid": DEFAULT_MOMENTUM_GRID}


def family_init(
    fixed: Mapping[str, Any] | None = None,
    extra: Mapping[str, tuple[str, Any]] | None = None,
    after: str | None = None,
) -> Callable[..., None]:
    """The ``__init__`` of a class of the linear family: :data:`LINEAR_OPTIONS` as its signature.

    Parameters
    ----------
    fixed : options the class does not take, with the value it holds instead (left out of the signature).
    extra : further options of the class, name -> (annotation, default), placed after the option ``after``.

    Every option is stored as an attribute of the same name (scikit-learn's convention), so ``get_params``,
    ``set_params``, ``clone`` and the model files read the signature as for a hand-written ``__init__``.
    """
    fixed = dict(fixed or {})
    options = [(name, spec) for name, spec in LINEAR_OPTIONS.items() if name not in fixed]
    if extra:
        at = [name for name, _ in options].index(after) + 1
        options[at:at] = list(extra.items())
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter("self", keyword),
         *(inspect.Parameter(name, keyword, default=default, annotation=annotation)
           for name, (annotation, default) in options)],
        return_annotation="None")

    def __init__(self, *args: Any, **params: Any) -> None:
        bound = signature.bind(self, *args, **params)
        bound.apply_defaults()
        for name, value in {**fixed, **bound.arguments}.items():
            if name != "self":
                setattr(self, name, value)

    __init__.__signature__ = signature
    return __init__


class SimfluenceLinear(LinearDynamics):
    """Simfluence-Linear and its time-aware variants (see the module docstring for the model).

    Parameters
    ----------
    lam : ridge strength on the example effects A, B, or ``"auto"`` (chosen on validation runs).
    multiplicative : learn per-example multiplicative effects A (False: additive model).
    alpha_center : value alpha is shrunk towards: 0 (the paper) or 1 (keep the previous loss).
    step_terms : add per-step terms shared across runs.
    lr_scaled : scale example effects by the step's learning rate relative to the mean (``"auto"``: when
        every training step's learning rate is logged).
    batch_mean : average effects over the batch instead of summing (for varying batch sizes).
    momentum : velocity decay ``mu`` of the second-order simulator (0: the first-order model), or
        ``"auto"`` (chosen from ``momentum_grid`` on validation runs). Needs losses logged every step
        (``"auto"`` falls back to 0 otherwise, with a ``FitWarning``).
    clip_negative : keep simulated losses >= 0 when the training losses never were negative (a step
        that would cross 0 stops there). Off in the paper's form.
    step_lam_ratio : ridge strength of the step terms relative to ``lam``.
    lam_grid : candidate strengths for ``lam="auto"`` (extended ``LAM_EDGE_DECADES`` decades beyond its strongest or
        weakest value when that one wins).
    momentum_grid : candidate ``mu`` for ``momentum="auto"``.
    val_fraction : share of the training runs held out to choose ``lam`` (at least one run).
    solver : ``"auto"``, ``"direct"`` or ``"cg"`` (see :mod:`simfluence.solvers`).
    tol, max_iter : conjugate-gradient tolerance (on the residual relative to the right-hand side; 1e-10 gives
        effects within ~1e-6 relative of the exact ridge solution on the fit benchmark, 1e-8 only ~2e-4) and
        iteration cap.
    precision : ``"float32"``: conjugate-gradient iterations in single precision inside float64 iterative
        refinement, so ``tol`` holds for the float64 residual as with ``"float64"`` (about 2x faster; a loose
        ``tol`` >= 1e-5 skips the refinement and the float64 copies of the losses); ``"float64"``: double only.
    device : ``None`` (default): the conjugate gradient on numpy arrays; a torch device (``"cpu"``, ``"cuda"``):
        the same solves on torch tensors there (see :func:`simfluence.solvers.solve_ridge`); the direct solver
        ignores it.

    Attributes
    ----------
    A_, B_ : (n_pool, n_test) multiplicative and additive effect of each pool example.
    step_alpha_, step_beta_ : (n_step_terms, n_test) per-step terms (zero rows when unused).
    lam_, momentum_ : the ridge strength and velocity decay used.
    validation_ : list of ``{"lam", "momentum", "mse"}``, the validation all-steps MSE of every
        candidate tried (empty when nothing was chosen).
    lr_schedule_ : (n_steps_fit,) mean learning rate per step in the training runs (NaN if unknown).
    pool_ids_, test_ids_ : external ids of the pool and test examples of the run set fitted on.
    batch_size_range_ : [smallest, largest] batch size of the training runs (queries far outside it warn).
    fit_warnings_ : list of str, every :class:`~simfluence.errors.FitWarning` the fit issued (a fallback from
        what was asked, a ridge strength at the edge of even the extended grid); empty when none.
    """

    kind = "linear"
    _kernel = "auto"  # sparse-product kernel of the solves (the lam search keeps the one its first solve timed best)
    _fitted_arrays = ("A_", "B_", "step_alpha_", "step_beta_", "lr_schedule_")
    _test_axis_arrays = ("A_", "B_", "step_alpha_", "step_beta_")  # last axis = test examples (sharded fits)
    _array_specs = {"A_": ("float", ("n_pool_", "n_test_")), "B_": ("float", ("n_pool_", "n_test_")),
                    "step_alpha_": ("float", ("n_step_terms_", "n_test_")),
                    "step_beta_": ("float", ("n_step_terms_", "n_test_")), "lr_schedule_": ("float", ("n_steps_fit",))}
    _state_specs = {"lam_": "number", "momentum_": "number", "lr_reference_": "number|null",
                    "loss_floor_": "number|null", "validation_": "list", "batch_size_range_": "range|null",
                    "fit_warnings_": "list"}

    __init__ = family_init()  # the options of LINEAR_OPTIONS, documented above

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> SimfluenceLinear:
        """Fit A, B (and step terms) on the runs at positions ``runs`` (default: all); returns self."""
        self._check_params()
        runs = training_runs(runset, runs)
        if runset.n_test == 0:
            raise SimfluenceError(f"{type(self).__name__}: the run set has no test examples (n_test = 0), so there "
                                  "are no losses to fit")
        start = time.perf_counter()
        self.fit_warnings_ = []
        self._prepare(runset, runs)
        lams = tuple(float(v) for v in self.lam_grid) if self.lam == "auto" else (float(self.lam),)
        momenta = tuple(float(v) for v in self.momentum_grid) if self.momentum == "auto" else (float(self.momentum),)
        if self.momentum == "auto" and len(momenta) > 1 and not _every_step_logged(runset, runs):
            momenta = (0.0,)  # the velocity needs consecutive steps; sparser logs fall back to first order
            self._warn(f"momentum='auto' fell back to 0 (no velocity: the first-order model, like linear_step): "
                       f"{_logging_gaps(runset, runs)}, and the momentum term needs losses logged at every step")
        self.validation_ = []
        start_theta = None
        if len(lams) * len(momenta) > 1:
            lam, momentum, start_theta = self._choose(runset, runs, lams, momenta)
            if len(set(lams)) > 1 and lam in (max(lams), min(lams)):
                lam, momentum, start_theta = self._choose_beyond_edge(runset, runs, lams, momenta,
                                                                      (lam, momentum, start_theta))
        else:
            lam, momentum = lams[0], momenta[0]
        self.momentum_ = momentum
        self._fit_fixed(self._transitions(runset, runs), lam, momentum, x0=start_theta)
        self.lam_ = lam
        self.fit_seconds_ = time.perf_counter() - start
        self.fitted_ = True
        return self

    def _check_params(self) -> None:
        """Every hyper-parameter checked before any work: a bad one is one error naming it (as ``--param`` gives it)."""
        name = type(self).__name__

        def fail(param: str, value: Any, expected: str) -> None:
            raise SimfluenceError(f"{name}: {param} must be {expected}, got {value!r}")

        if self.lam != "auto" and not (_is_number(self.lam) and self.lam > 0):
            fail("lam", self.lam, "a number > 0 or 'auto'")
        if self.momentum != "auto" and not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            fail("momentum", self.momentum, "a number in [0, 1) or 'auto'")
        for param, low, high in (("lam_grid", 0.0, math.inf), ("momentum_grid", 0.0, 1.0)):
            grid = getattr(self, param)
            closed = param == "momentum_grid"  # momentum 0 is allowed, lam 0 is not
            if (isinstance(grid, str | bytes) or not isinstance(grid, Sequence) or not grid
                    or not all(_is_number(v) and (low <= v if closed else low < v) and v < high for v in grid)):
                fail(param, grid, "a non-empty list of numbers " + ("in [0, 1)" if closed else "> 0"))
        if not _is_number(self.alpha_center):
            fail("alpha_center", self.alpha_center, "a number")
        if not (_is_number(self.step_lam_ratio) and self.step_lam_ratio >= 0):
            fail("step_lam_ratio", self.step_lam_ratio, "a number >= 0")
        if not (_is_number(self.val_fraction) and 0 < self.val_fraction < 1):
            fail("val_fraction", self.val_fraction, "a number in (0, 1)")
        for param in ("multiplicative", "step_terms", "batch_mean", "clip_negative"):
            if not isinstance(getattr(self, param), bool | np.bool_):
                fail(param, getattr(self, param), "true or false")
        if not (isinstance(self.lr_scaled, bool | np.bool_) or self.lr_scaled == "auto"):
            fail("lr_scaled", self.lr_scaled, "true, false or 'auto'")
        if self.solver not in SOLVERS:
            fail("solver", self.solver, f"one of {', '.join(SOLVERS)}")
        if not (_is_number(self.tol) and 0 < self.tol < 1):
            fail("tol", self.tol, "a number in (0, 1)")
        if not (isinstance(self.max_iter, int | np.integer) and not isinstance(self.max_iter, bool)
                and self.max_iter >= 1):
            fail("max_iter", self.max_iter, "an integer >= 1")
        if self.precision not in PRECISIONS:
            fail("precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if self.device is not None and not isinstance(self.device, str):
            fail("device", self.device, "None or a torch device name such as 'cuda'")

    def _warn(self, message: str) -> None:
        """Issue a :class:`FitWarning` and keep its message in ``fit_warnings_`` (saved with the model)."""
        message = f"{type(self).__name__}: {message}"
        self.fit_warnings_.append(message)
        warnings.warn(message, FitWarning, stacklevel=3)

    def _prepare(self, runset: RunSet, runs: list[int]) -> None:
        """Fix the feature layout (horizon, learning-rate reference) from the training runs."""
        chosen = [runset[i] for i in runs]
        self._remember_ids(runset, runs)
        sizes = np.concatenate([run.curriculum.batch_sizes for run in chosen])
        self.batch_size_range_ = [int(sizes.min()), int(sizes.max())] if sizes.size else [0, 0]
        horizon = max(run.n_steps for run in chosen)
        self.lr_schedule_ = mean_lr_schedule(chosen)
        every_step_known = all(run.known_learning_rates is not None for run in chosen)
        self.lr_reference_ = None
        use_lr = self.lr_scaled
        if use_lr == "auto":
            use_lr = every_step_known and bool(np.all(self.lr_schedule_ > 0))
        if use_lr:
            if not np.isfinite(self.lr_schedule_).any():
                raise SimfluenceError("lr_scaled=True needs learning rates logged in the training runs")
            self.lr_reference_ = float(np.nanmean(self.lr_schedule_))
            if not self.lr_reference_ > 0:
                raise SimfluenceError("lr_scaled=True needs positive learning rates")
        self.n_step_terms_ = horizon if self.step_terms else 0
        # losses that were never negative in training (cross-entropy, squared error) are kept >= 0
        smallest = min(float(np.min(run.losses)) for run in chosen if run.losses.size)
        self.loss_floor_ = 0.0 if self.clip_negative and smallest >= 0 else None

    def _transitions(self, runset: RunSet, runs: Sequence[int]) -> Transitions:
        """The teacher-forced transitions the effects are fitted to (a subclass may transform their losses:
        :mod:`.log_space` fits log losses)."""
        return build_transitions(runset, self._spec(), runs)

    def _spec(self) -> FeatureSpec:
        return FeatureSpec(self.n_pool_, self.n_step_terms_, self.lr_reference_, self.batch_mean)

    def _penalty(self, lam: float) -> np.ndarray:
        spec = self._spec()
        per_feature = np.concatenate(
            [np.full(spec.n_pool, lam), np.full(spec.n_step_terms, lam * self.step_lam_ratio)]
        )
        return np.tile(per_feature, 2) if self.multiplicative else per_feature

    def _first_order_target(self, transitions: Transitions) -> np.ndarray:
        # over a transition of k steps (losses logged every k steps) the first-order alpha of the whole gap is
        # 1 + k (alpha_center - 1) + (summed features) . A; for one-step transitions this is alpha_center + F . A
        gap = (transitions.end_step - transitions.start_step)[:, None]
        return transitions.next - (1.0 + gap * (self.alpha_center - 1.0)) * transitions.prev

    @staticmethod
    def _previous_change(transitions: Transitions) -> np.ndarray:
        if np.any(transitions.end_step - transitions.start_step != 1):
            raise SimfluenceError("momentum > 0 needs losses logged at every step of the training runs")
        return transitions.previous_change()

    def _solve(self, transitions: Transitions, target: np.ndarray, lam: float, x0: np.ndarray | None):
        return solve_ridge(
            transitions.features, transitions.prev, target, self._penalty(lam), multiplicative=self.multiplicative,
            solver=self.solver, tol=self.tol, max_iter=self.max_iter, x0=x0,
            dtype=np.float32 if self.precision == "float32" else np.float64, kernel=self._kernel,
            device=self.device,
        )

    def _fit_fixed(
        self, transitions: Transitions, lam: float, momentum: float, x0: np.ndarray | None = None,
        basis: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Fit the effects at (lam, momentum); ``basis`` = the solutions for the first-order target and for the
        previous change at this lam (:meth:`_momentum_basis`), whose combination is the answer for any momentum."""
        if basis is not None:
            theta = basis[0] + momentum * basis[1]
        else:
            theta, self.solve_info_ = self._solve(transitions, self._target(transitions, momentum), lam, x0)
        self._set_theta(theta)
        return theta

    def _momentum_basis(
        self, transitions: Transitions, lam: float, x0: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Effects for the first-order target and for the previous change (target ``-(L_{t-1} - L_{t-2})``), one
        batched solve of 2 n_test columns: the fit at momentum mu is ``basis[0] + mu * basis[1]``.
        ``x0``: a warm start, (n_params, 2 n_test), the two halves side by side."""
        theta, self.solve_info_ = self._solve(transitions, self._target(transitions, None), lam, x0)
        n_test = theta.shape[1] // 2
        return theta[:, :n_test], theta[:, n_test:]

    def _target(self, transitions: Transitions, momentum: float | None) -> np.ndarray:
        """(n_transitions, n_test) regression target at ``momentum``; ``None``: the momentum basis' two targets side
        by side, (n_transitions, 2 n_test) (the first-order target and ``-(L_{t-1} - L_{t-2})``)."""
        target = self._first_order_target(transitions)
        if momentum is None:
            return np.concatenate([target, -self._previous_change(transitions).astype(target.dtype, copy=False)],
                                  axis=1)
        return target - momentum * self._previous_change(transitions) if momentum else target

    def _rhs_norms(self, transitions: Transitions, target: np.ndarray) -> np.ndarray:
        """(n_columns,) norm of every column's normal-equations right-hand side ``X_m^T y_m`` (what CG's relative
        residual is measured against)."""
        adjoint = transitions.features.T.tocsr()
        squared = np.square(np.linalg.norm(adjoint @ target, axis=0))
        if self.multiplicative:
            prev = np.tile(transitions.prev, (1, target.shape[1] // transitions.prev.shape[1]))
            squared += np.square(np.linalg.norm(adjoint @ (prev * target), axis=0))
        return np.sqrt(squared)

    def _candidate(self, runset: RunSet, runs: list[int], lam: float, tol: float, kernel: str,
                   momentum: float | None = None) -> SimfluenceLinear:
        """A clone of this estimator that fits one candidate of the search (see :meth:`_choose`)."""
        candidate = clone(self).set_params(lam=lam, tol=tol)
        if momentum is not None:
            candidate.momentum = momentum  # additive models have no momentum option; the value is 0 then
        candidate._kernel = kernel
        candidate._prepare(runset, runs)
        return candidate

    def _candidate_tol(self, lam: float, previous: tuple[float, np.ndarray] | None, scale: np.ndarray) -> float:
        """CG tolerance of a candidate: cut the residual of its warm start at ``lam`` by ``SELECTION_REDUCTION``.

        Warm-started from the effects ``previous = (lam_0, theta_0)`` solved at ``lam_0``, the residual at ``lam`` is
        ``(penalty(lam) - penalty(lam_0)) * theta_0`` (plus that solve's own, smaller, residual): the tolerance,
        relative to the right-hand side norms ``scale`` like CG's, is that times ``SELECTION_REDUCTION`` in the worst
        column. A fixed tolerance relative to the right-hand side would be too tight for strong lam and, for weak
        lam (small changes of the penalty), met before the warm start had moved. Never tighter than
        ``SELECTION_TOL`` or ``tol``; the first candidate (no warm start) is solved to ``SELECTION_REDUCTION``.
        """
        floor = max(float(self.tol), SELECTION_TOL)
        if previous is None:
            return max(floor, SELECTION_REDUCTION)
        previous_lam, start = previous
        change = np.linalg.norm((self._penalty(lam) - self._penalty(previous_lam))[:, None] * start, axis=0)
        ratio = np.divide(change, scale, out=np.full_like(change, np.inf), where=scale > 0)
        return max(floor, SELECTION_REDUCTION * min(1.0, float(ratio.min(initial=np.inf))))

    def _set_theta(self, theta: np.ndarray) -> None:
        n_features = self._spec().n_features
        n_pool = self.n_pool_
        if self.multiplicative:
            mult, add = theta[:n_features], theta[n_features:]
        else:
            mult, add = np.zeros_like(theta), theta
        self.A_, self.B_ = mult[:n_pool], add[:n_pool]
        self.step_alpha_, self.step_beta_ = mult[n_pool:], add[n_pool:]

    def _choose(
        self, runset: RunSet, runs: list[int], lams: Sequence[float], momenta: Sequence[float]
    ) -> tuple[float, float, np.ndarray]:
        """Pick (lam, momentum) by rolled-out all-steps MSE on the last ``val_fraction`` of the training runs.

        Returns the chosen lam and momentum and the chosen candidate's effects (a warm start for the final fit).
        """
        if len(runs) < 2:
            raise SimfluenceError("choosing lam or momentum needs at least 2 training runs (one is for validation)")
        n_val = min(len(runs) - 1, max(1, round(self.val_fraction * len(runs))))
        fit_runs, val_runs = runs[:-n_val], runs[-n_val:]
        transitions = self._transitions(runset, fit_runs)
        basis_wanted = len(momenta) > 1  # one solve for every momentum (the fit is linear in its target)
        scale = self._rhs_norms(transitions, self._target(transitions, None if basis_wanted else momenta[0]))
        entries, best, best_theta = [], None, None
        previous, kernel = None, "auto"  # the last solve (lam, effects) warm-starts the next; its kernel is kept
        for lam in sorted(lams, reverse=True):  # strong to weak: each solution warm-starts the next
            tol = self._candidate_tol(lam, previous, scale)
            start = None if previous is None else previous[1]
            basis = None
            if basis_wanted:
                solver = self._candidate(runset, runs, lam, tol, kernel)
                basis = solver._momentum_basis(transitions, lam, start)
                previous, kernel = (lam, np.concatenate(basis, axis=1)), solver.solve_info_.kernel or "auto"
            for momentum in momenta:
                candidate = self._candidate(runset, runs, lam, tol, kernel, momentum)
                theta = candidate._fit_fixed(transitions, lam, momentum, x0=start, basis=basis)
                if basis is None:
                    previous, kernel = (lam, theta), candidate.solve_info_.kernel or "auto"
                candidate.momentum_, candidate.lam_, candidate.fitted_ = momentum, lam, True
                mse = validation_mse(candidate, runset, val_runs)
                entries.append({"lam": lam, "momentum": momentum, "mse": mse if np.isfinite(mse) else None})
                if np.isfinite(mse) and (best is None or mse < best["mse"]):
                    best, best_theta = entries[-1], theta
        del transitions
        # reported in the order momentum by momentum, each from strong to weak lam
        order = {momentum: index for index, momentum in enumerate(momenta)}
        self.validation_ = sorted(entries, key=lambda entry: (order[entry["momentum"]], -entry["lam"]))
        if best is None:
            raise SimfluenceError("every candidate lam/momentum gave a non-finite validation error")
        return best["lam"], best["momentum"], best_theta

    def _choose_beyond_edge(
        self, runset: RunSet, runs: list[int], lams: Sequence[float], momenta: Sequence[float],
        chosen: tuple[float, float, np.ndarray],
    ) -> tuple[float, float, np.ndarray]:
        """The strongest or weakest ``lam`` of the grid won (``chosen``: it, its momentum and effects): choose again
        among ``LAM_EDGE_DECADES`` decades beyond it, keep whichever validates best (``validation_`` keeps the errors
        of both searches), and warn if the farthest value wins."""
        lam, momentum = chosen[0], chosen[1]
        first = self.validation_

        def error(entries: list[dict], lam: float, momentum: float) -> float:
            return next(entry["mse"] for entry in entries if (entry["lam"], entry["momentum"]) == (lam, momentum))

        stronger = lam == max(lams)
        beyond = [lam * 10.0**k if stronger else lam / 10.0**k for k in range(1, LAM_EDGE_DECADES + 1)]
        extended = self._choose(runset, runs, beyond, momenta)
        better = error(self.validation_, *extended[:2]) < error(first, lam, momentum)
        order = {value: index for index, value in enumerate(momenta)}
        self.validation_ = sorted(first + self.validation_, key=lambda entry: (order[entry["momentum"]], -entry["lam"]))
        if not better:
            return chosen
        if extended[0] == beyond[-1]:
            side = "strongest" if stronger else "weakest"
            self._warn(f"lam='auto' chose lam={extended[0]:g}, the {side} value even of lam_grid extended "
                       f"{LAM_EDGE_DECADES} decades beyond its edge {lam:g}: the validation error may still improve "
                       "further out; give a lam_grid that reaches beyond it")
        return extended

    # ----------------------------------------------------------------------------------- dynamics
    def _effect_tables(self) -> tuple[np.ndarray | None, np.ndarray]:
        return (self.A_[None] if self.multiplicative else None), self.B_[None]

    def _step_constants(self, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.n_step_terms_:
            return np.full((1, 1), float(self.alpha_center)), np.zeros((1, 1))
        index = np.minimum(np.arange(1, n_steps + 1), self.n_step_terms_) - 1
        return self.alpha_center + self.step_alpha_[index], self.step_beta_[index]

    def _lr_reference(self) -> float | None:
        return self.lr_reference_

    def _batch_mean(self) -> bool:
        return bool(self.batch_mean)

    # ----------------------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        return {
            "n_step_terms_": self.n_step_terms_,
            "lr_reference_": self.lr_reference_,
            "lam_": self.lam_,
            "momentum_": self.momentum_,
            "loss_floor_": self.loss_floor_,
            "validation_": self.validation_,
            # files saved before these were recorded load with none
            "batch_size_range_": getattr(self, "batch_size_range_", None),
            "fit_warnings_": list(getattr(self, "fit_warnings_", [])),
        }


class SimfluenceAdditive(SimfluenceLinear):
    """Simfluence-Additive: ``L_t = L_{t-1} + sum_{i in c_t} B_i`` (alpha fixed at 1, order-free).

    Parameters are those of :class:`SimfluenceLinear` that apply to an additive model.
    """

    kind = "additive"
    __init__ = family_init(fixed=ADDITIVE_FIXED)


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool, not a string)."""
    return (isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value))


def _logging_gaps(runset: RunSet, runs: Sequence[int]) -> str:
    """Words for how sparsely the runs log their losses, e.g. "run 'run-003' logs losses every 5 steps"."""
    for i in runs:
        gaps = np.diff(runset[i].logged_steps)
        if np.any(gaps != 1):
            common = np.bincount(gaps).argmax()
            every = f"every {common} steps" if np.all(gaps[:-1] == common) else f"with gaps of up to {gaps.max()} steps"
            return f"run {runset[i].name!r} logs losses {every}"
    return "the runs do not log losses at every step"


def _every_step_logged(runset: RunSet, runs: Sequence[int]) -> bool:
    """Whether every run logs its losses at every step (needed for the momentum model's velocity)."""
    return all(np.array_equal(runset[i].logged_steps, np.arange(runset[i].n_steps + 1)) for i in runs)


def validation_mse(simulator: Simulator, runset: RunSet, runs: Sequence[int]) -> float:
    """All-steps MSE (logged steps >= 1) of ``simulator`` rolled out over ``runs`` from their observed L_0."""
    predicted, actual, mask = rollout_runs(simulator, runset, runs)
    mask = mask.copy()
    mask[:, 0] = False
    with np.errstate(over="ignore", invalid="ignore"):
        errors = (predicted - np.nan_to_num(actual))[mask] ** 2
    return float(errors.mean()) if errors.size else float("nan")
