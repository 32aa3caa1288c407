"""Prediction intervals: how sure is a simulator's answer?

A fitted simulator answers every question with one number (a loss, a change against the base curriculum, a
leave-one-out effect). :class:`Bootstrap` refits the same simulator on resamples of its training runs; every
member answers the same question, and the spread of their answers around the simulator's own answer is the
interval::

    intervals = Bootstrap(simulator, n_resamples=20, level=0.8).fit(runset)
    members = intervals.simulate(curricula, initial_losses)          # (n_members, n_curricula, T + 1, n_test)
    low, high = intervals.bounds(point, members)                     # point +- inflation * z * sd(members)

The point prediction stays the simulator's; the interval is ``point +- inflation_ * z * sd``, with ``sd`` the
standard deviation of the members' answers and ``z`` the normal quantile of ``level`` (with 20 members the
10th and 90th percentiles would each rest on two members; the standard deviation uses all of them). Any
derived answer (a mean over test examples, a change between two curricula) gets its interval from the same
derivation applied to every member. An interval that contains zero says the sign of the answer is not sure:
the counterfactual functions flag it (``straddles_zero``).

Choices, measured on digits against real retraining (``benchmarks/bench_intervals.py``):

- **Resampling.** Members are fitted on random halves of the training runs (``resample="half"``, subsampling
  without replacement: for an average of n runs, a half sample's spread around the full-data estimate,
  ``1/(n/2) - 1/n = 1/n``, is the full-data estimate's own sampling variance), or on as many runs drawn with
  replacement (``resample="runs"``, the classic bootstrap over runs). Halves are cheaper per member, and their
  raw spread is closer to the real errors (on digits and on runs of a known model).
- **Frozen hyper-parameters.** What the point fit chose on its own (every ``"auto"`` hyper-parameter with a
  fitted value, e.g. ``lam`` and ``momentum`` of ``linear_mom``) is fixed in the members to the chosen value,
  so a member is one fixed solve, no search.
- **Calibration.** The members' spread covers only the estimation error (which runs happened to be logged),
  not the error of the model's form: raw 80% intervals of ``linear_mom`` on digits cover about half of the
  real changes. With ``calibrate=True`` one inflation factor is fitted on validation runs carved from the
  training runs only (the last ``val_fraction`` of them): a point fit and an ensemble on the remaining runs
  predict, for every pair of validation runs, the change of each test example's final loss from one run's
  curriculum to the other's (a counterfactual whose real answer was logged), and ``inflation_`` is the
  ``level``-quantile of ``|real - predicted| / (z sd)``: the calibrated intervals cover ``level`` of those
  validation changes. Calibration only widens (``inflation_ >= 1``): the members' spread is the estimation
  error alone, and a handful of validation changes must not shrink it. It cannot see a kind of edit that no
  difference between logged runs shows (smaller batches than in any logged run, or reorderings for an
  order-free simulator, whose members all answer 0). Where such edits matter and some were retrained for real
  (``simfluence verify``), :meth:`Bootstrap.calibrate_on` refits the inflation on those real answers.
- **Selection.** An answer chosen because it looked best to the point simulator (a curriculum search) is
  optimistic by selection; the interval does not include that bias.

Simulators that need more than logs to fit (a task, checkpoints, precomputed scores) or that are fitted
around one base run cannot be refitted on resampled runs; asking for their intervals is an error.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import NotFittedError, SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, clone, fit_needs, is_per_base, rollout_runs, training_runs

RESAMPLING = ("half", "runs")
DEFAULT_RESAMPLES = 20
"""Members of a :class:`Bootstrap` unless told otherwise (the CLI's ``--intervals N`` gives N)."""
DEFAULT_LEVEL = 0.8
"""Nominal coverage of the intervals unless told otherwise (0.8: 80% intervals; the CLI's ``--level``)."""


@dataclass(frozen=True)
class Ensemble:
    """The members' answers to one question and the rule that turns them into an interval.

    Attributes
    ----------
    members : (n_members, *shape) every member's answer.
    level : nominal coverage of the interval (0.8: an 80% interval).
    scale : half-width of the interval per standard deviation of the members (``inflation * z``).
    """

    members: np.ndarray
    level: float
    scale: float

    def bounds(self, point: np.ndarray, members: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` around ``point`` (shape ``shape``); ``members`` (n_members, *shape) default ``self.members``.

        Pass ``members`` for a quantity derived from the members' answers (a mean over tests, a difference):
        the same derivation applied to every member.
        """
        return interval_bounds(point, self.members if members is None else members, self.scale)


def interval_bounds(point: np.ndarray, members: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``point -+ scale * sd(members, axis 0)`` as ``(low, high)``.

    Parameters
    ----------
    point : (*shape) the point answer.
    members : (n_members, *shape) the members' answers.
    scale : half-width per standard deviation.
    """
    point = np.asarray(point, dtype=np.float64)
    members = np.asarray(members, dtype=np.float64)
    if members.shape[1:] != point.shape:
        raise SimfluenceError(f"members have shape {members.shape[1:]} per member, the point {point.shape}")
    with np.errstate(invalid="ignore"):  # a diverged member (inf) gives an unbounded interval, not a warning
        half = scale * members.std(axis=0, ddof=1)
    return point - half, point + half


def straddles_zero(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Whether each interval contains zero: the sign of the answer is not sure."""
    return (np.asarray(low) <= 0) & (np.asarray(high) >= 0)


class Bootstrap:
    """An ensemble of a simulator refitted on resampled training runs, for prediction intervals.

    Parameters
    ----------
    simulator : the point simulator. A fitted one (the usual case) stays the point predictor and its training
        runs are resampled; an unfitted one is cloned and fitted first.
    n_resamples : number of members (>= 2). This is the count the CLI's ``--intervals N`` takes: there
        ``--intervals N --level L`` is ``Bootstrap(model, n_resamples=N, level=L).fit(runset)`` around the saved
        model, built in one place (``simfluence.cli``); in Python the counterfactual functions and
        :meth:`~simfluence.simulators.Simulator.simulate_frame` take that fitted object as ``intervals=``.
    level : nominal coverage of the intervals, in (0, 1).
    resample : ``"half"`` (each member on a random half of the training runs, without replacement) or
        ``"runs"`` (as many runs drawn with replacement).
    calibrate : fit the inflation factor on validation runs carved from the training runs (see the module
        docstring); False: ``inflation_ = 1``, the raw spread of the members.
    val_fraction : share of the training runs held back to calibrate (at least 2 runs, at least 2 left).
    seed : seed of the resamples.

    Attributes
    ----------
    simulator_ : the fitted point simulator.
    members_ : the fitted members.
    frozen_params_ : hyper-parameters fixed in the members to the point fit's choices.
    inflation_ : calibrated factor on the members' spread (1 without calibration).
    calibration_ : ``validation_runs``, ``n_changes``, ``raw_coverage`` (of the uninflated intervals on the
        validation changes), ``needed`` (the inflation that covers ``level`` of them), ``inflation``
        (``max(1, needed)``); after :meth:`calibrate_on` also ``real_answers``; empty without calibration.
    train_runs_ : names of the runs resampled.
    """

    def __init__(
        self,
        simulator: Simulator,
        n_resamples: int = DEFAULT_RESAMPLES,
        level: float = DEFAULT_LEVEL,
        resample: str = "half",
        calibrate: bool = True,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.simulator = simulator
        self.n_resamples = n_resamples
        self.level = level
        self.resample = resample
        self.calibrate = calibrate
        self.val_fraction = val_fraction
        self.seed = seed

    def __repr__(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        shown = [f"{name}={getattr(self, name)!r}" for name in list(defaults)[2:]
                 if getattr(self, name) != defaults[name].default]
        return f"Bootstrap({', '.join([repr(self.simulator), *shown])})"

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None) -> Bootstrap:
        """Fit the members (and the calibration) on resamples of the training runs; returns self.

        Parameters
        ----------
        runset : the run set the simulator was (or is to be) fitted on.
        runs : positions of the training runs; default, for a fitted simulator, the runs it was fitted on (by
            name), else every run. For a fitted simulator other runs are an error.
        """
        self.fitted_ = False  # a failed refit leaves no half-fitted ensemble usable
        self._check_params()
        if not isinstance(self.simulator, Simulator):
            raise SimfluenceError(f"Bootstrap needs a Simulator, not {type(self.simulator).__name__}")
        _check_refittable(self.simulator)
        if getattr(self.simulator, "fitted_", False):
            point = self.simulator
            runs = _fitted_runs(point, runset, runs)
        else:
            runs = training_runs(runset, runs)
            point = clone(self.simulator).fit(runset, runs=runs)
        if len(runs) < 2:
            raise SimfluenceError(f"intervals resample the training runs: they need at least 2, got {len(runs)}")
        rng = np.random.default_rng(self.seed)
        self.simulator_ = point
        self.frozen_params_ = frozen_params(point)
        self.members_ = self._fit_members(runset, runs, rng)
        self.train_runs_ = [runset[i].name for i in runs]
        self.inflation_, self.calibration_ = 1.0, {}
        if self.calibrate:
            self._calibrate(runset, runs, rng)
        self.fitted_ = True
        return self

    def _check_params(self) -> None:
        if isinstance(self.n_resamples, bool) or not isinstance(self.n_resamples, int | np.integer) \
                or self.n_resamples < 2:
            raise SimfluenceError(f"n_resamples must be an integer >= 2 (a spread needs two members), "
                                  f"got {self.n_resamples!r}")
        if not isinstance(self.level, float | int) or not 0 < float(self.level) < 1:
            raise SimfluenceError(f"level must lie strictly between 0 and 1 (0.8: an 80% interval), got {self.level!r}")
        if self.resample not in RESAMPLING:
            raise SimfluenceError(f"resample must be one of {', '.join(RESAMPLING)}, got {self.resample!r}")
        if not 0 < float(self.val_fraction) < 1:
            raise SimfluenceError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}")

    def _resamples(self, runs: list[int], rng: np.random.Generator) -> list[list[int]]:
        """``n_resamples`` lists of run positions: random halves, or draws with replacement."""
        pool = np.asarray(runs)
        if self.resample == "half":
            size = max(1, pool.size // 2)
            return [sorted(rng.choice(pool, size=size, replace=False).tolist()) for _ in range(self.n_resamples)]
        return [sorted(rng.choice(pool, size=pool.size, replace=True).tolist()) for _ in range(self.n_resamples)]

    def _fit_members(self, runset: RunSet, runs: list[int], rng: np.random.Generator) -> list[Simulator]:
        template = clone(self.simulator_).set_params(**self.frozen_params_)
        return [clone(template).fit(runset, runs=subset) for subset in self._resamples(runs, rng)]

    def _calibrate(self, runset: RunSet, runs: list[int], rng: np.random.Generator) -> None:
        """Inflation so that the intervals cover ``level`` of the final-loss changes between validation runs."""
        n_val = max(2, round(float(self.val_fraction) * len(runs)))
        fit_runs, val_runs = runs[:-n_val], runs[-n_val:]
        if len(fit_runs) < 2:
            raise SimfluenceError(f"calibrating intervals holds back {n_val} validation runs and resamples the rest: "
                                  f"it needs at least {n_val + 2} training runs, got {len(runs)} (or calibrate=False)")
        template = clone(self.simulator_).set_params(**self.frozen_params_)
        point = _final_losses(clone(template).fit(runset, runs=fit_runs), runset, val_runs)
        members = np.stack([_final_losses(clone(template).fit(runset, runs=subset), runset, val_runs)
                            for subset in self._resamples(fit_runs, rng)])
        actual = np.stack([np.asarray(runset[i].losses[-1], dtype=np.float64) for i in val_runs])
        first, second = np.triu_indices(n_val, k=1)
        needed, raw_coverage = inflation_for(point[second] - point[first], members[:, second] - members[:, first],
                                             actual[second] - actual[first], self.level)
        if not np.isfinite(needed):
            raise SimfluenceError(f"cannot calibrate intervals of {self.simulator_!r}: its members agree exactly "
                                  "where the validation runs differ (it predicts no change between curricula)")
        self.inflation_ = max(1.0, needed)
        self.calibration_ = {
            "validation_runs": [runset[i].name for i in val_runs],
            "n_changes": int(first.size * actual.shape[1]),
            "raw_coverage": raw_coverage,
            "needed": needed,
            "inflation": self.inflation_,
        }

    def calibrate_on(self, point: np.ndarray, members: np.ndarray, actual: np.ndarray) -> Bootstrap:
        """Recalibrate the inflation on real answers, e.g. counterfactuals you retrained for real; returns self.

        Parameters
        ----------
        point : (*shape) the simulator's answers (e.g. predicted changes of final losses).
        members : (n_members, *shape) this ensemble's answers to the same questions.
        actual : (*shape) the real answers (retrained). Keep them apart from any answers you later use to
            judge the intervals.
        """
        self.check_fitted()
        point = np.asarray(point, dtype=np.float64)
        if np.shape(actual) != point.shape or np.shape(members) != (len(self.members_), *point.shape):
            raise SimfluenceError(f"calibrate_on needs point and actual of one shape and members of shape "
                                  f"({len(self.members_)}, *point.shape); got {point.shape}, {np.shape(actual)}, "
                                  f"{np.shape(members)}")
        needed, raw_coverage = inflation_for(point, members, actual, self.level)
        if not np.isfinite(needed):
            raise SimfluenceError("cannot calibrate on these answers: the members agree exactly where the real "
                                  "answers differ from the point")
        self.inflation_ = max(1.0, needed)
        self.calibration_ = {"validation_runs": [], "real_answers": int(point.size), "n_changes": int(point.size),
                             "raw_coverage": raw_coverage, "needed": needed, "inflation": self.inflation_}
        return self

    # ----------------------------------------------------------------------------------- members' answers
    def check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError("Bootstrap is not fitted: call fit(runset) first")

    def check_point(self, simulator: Simulator) -> None:
        """The intervals must have been built around ``simulator`` (they are centred on its answers)."""
        self.check_fitted()
        if self.simulator_ is not simulator:
            raise SimfluenceError("these intervals were fitted around another simulator; build them with "
                                  "Bootstrap(simulator).fit(runset) for the simulator asked")

    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Every member's :meth:`Simulator.simulate`: (n_members, n_curricula, T + 1, n_test)."""
        self.check_fitted()
        return np.stack([member.simulate(curricula, initial_losses, learning_rates) for member in self.members_])

    def leave_one_out(
        self,
        curriculum: Curriculum,
        initial_losses: np.ndarray,
        learning_rates: np.ndarray | None = None,
        step: int | None = None,
    ) -> np.ndarray:
        """Every member's :meth:`Simulator.leave_one_out`: (n_members, n_pool, n_test)."""
        self.check_fitted()
        return np.stack([member.leave_one_out(curriculum, initial_losses, learning_rates, step)
                         for member in self.members_])

    @property
    def scale_(self) -> float:
        """Half-width of an interval per standard deviation of the members: ``inflation_ * z(level)``."""
        self.check_fitted()
        return self.inflation_ * normal_quantile(self.level)

    def ensemble(self, members: np.ndarray) -> Ensemble:
        """The members' answers ``(n_members, *shape)`` with this ensemble's interval rule."""
        return Ensemble(np.asarray(members), float(self.level), self.scale_)

    def bounds(self, point: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` of the calibrated interval around ``point`` (*shape), members (n_members, *shape)."""
        return interval_bounds(point, members, self.scale_)

    def describe(self) -> str:
        """One line: members, resampling, level and calibration."""
        self.check_fitted()
        how = "halves" if self.resample == "half" else "resamples (with replacement)"
        line = (f"{100 * self.level:g}% intervals from {len(self.members_)} members refitted on {how} of "
                f"{len(self.train_runs_)} training runs")
        if self.calibration_:
            cal = self.calibration_
            source = (f"{cal['real_answers']} real answers" if "real_answers" in cal
                      else f"{len(cal['validation_runs'])} held-back runs")
            rough = "; few, so a rough calibration" if cal["n_changes"] < 100 else ""
            line += (f"; spread inflated x{self.inflation_:.2f}, calibrated on {source} (uninflated they covered "
                     f"{100 * cal['raw_coverage']:.0f}% of {cal['n_changes']} changes{rough})")
        else:
            line += "; not calibrated (raw spread)"
        return line


def inflation_for(
    point: np.ndarray, members: np.ndarray, actual: np.ndarray, level: float
) -> tuple[float, float]:
    """The inflation of the members' spread under which ``level`` of the real answers fall inside the interval.

    Parameters
    ----------
    point, actual : (*shape) predicted and real answers.
    members : (n_members, *shape) the members' answers.
    level : coverage wanted.

    Returns
    -------
    needed : the ``level``-quantile of ``|actual - point| / (z sd)`` (inf when members agree exactly where the
        answer is wrong).
    raw_coverage : share of the real answers inside the uninflated interval.
    """
    z = normal_quantile(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.abs(np.asarray(actual, dtype=np.float64) - point).ravel()
        half = z * np.asarray(members, dtype=np.float64).std(axis=0, ddof=1).ravel()
        ratio = np.where(half > 0, error / half, np.where(error > 0, np.inf, 0.0))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(np.quantile(ratio, float(level), method="higher")), float(np.mean(ratio <= 1.0))


def normal_quantile(level: float) -> float:
    """``z`` with P(|N(0, 1)| <= z) = level."""
    return NormalDist().inv_cdf(0.5 + float(level) / 2)


def frozen_params(simulator: Simulator) -> dict[str, Any]:
    """The ``"auto"`` hyper-parameters of a fitted simulator with the values its fit chose (``name_``)."""
    params = {}
    for name, value in simulator.get_params().items():
        chosen = getattr(simulator, f"{name}_", None)
        if isinstance(value, str) and value == "auto" and chosen is not None and not isinstance(chosen, str):
            params[name] = chosen
    return params


def _check_refittable(simulator: Simulator) -> None:
    """Only simulators fitted from logs alone can be refitted on resampled runs."""
    if is_per_base(simulator):
        raise SimfluenceError(f"{simulator.kind!r} is fitted around one base run: there are no runs to resample "
                              "for intervals")
    if needs := fit_needs(simulator):
        raise SimfluenceError(f"intervals refit the simulator on resampled runs; {simulator.kind!r} needs "
                              f"{', '.join(sorted(needs))} to fit, which a resample cannot give it")


def _fitted_runs(simulator: Simulator, runset: RunSet, runs: Sequence[int] | None) -> list[int]:
    """Positions in ``runset`` of the runs a fitted simulator was fitted on (``runs``, if given, must be those)."""
    simulator.check_matches(runset, repr(simulator))
    names = list(getattr(simulator, "train_runs_", []) or [])
    if runs is not None:
        chosen = training_runs(runset, runs)
        if names and sorted(runset[i].name for i in chosen) != sorted(names):
            raise SimfluenceError("the simulator was fitted on other runs than the runs given; intervals resample "
                                  "the runs it was fitted on (leave runs=None)")
        return chosen
    if not names:
        raise SimfluenceError("the simulator does not record the runs it was fitted on: pass runs=")
    missing = [name for name in dict.fromkeys(names) if name not in runset.run_names]
    if missing:
        raise SimfluenceError(f"the simulator was fitted on run {missing[0]!r}, which the run set does not hold")
    return [runset.position(name) for name in dict.fromkeys(names)]


def _final_losses(simulator: Simulator, runset: RunSet, runs: list[int]) -> np.ndarray:
    """(n_runs, n_test) loss each run's rollout predicts at its last logged step."""
    predicted, _, _ = rollout_runs(simulator, runset, runs)
    last = np.array([int(runset[i].logged_steps[-1]) for i in runs])
    return predicted[np.arange(len(runs)), last]
