"""The simulator protocol shared by every training-run simulator, and saving/loading without pickle.

A simulator is fitted to logged runs and then predicts the loss trajectory of every test example for
any curriculum, starting from given initial losses::

    sim = SimfluenceLinear().fit(runset, runs=range(40))
    trajectories = sim.simulate(curricula, initial_losses)   # (n_curricula, T + 1, n_test)

scikit-learn conventions: hyper-parameters are ``__init__`` arguments stored unchanged (checked in
``fit``), shown by ``repr`` and read/written by ``get_params`` / ``set_params``; :func:`clone` makes an
unfitted copy; fitted state lives in attributes ending in ``_``. A fitted simulator remembers the external
ids of the pool and test examples it was fitted on (``pool_ids_``, ``test_ids_``), so that questions can be
asked with the ids a user knows. Capabilities are declared in the class attribute ``tags`` (for example
``tags["exact_loo"]``: leave-one-out effects are computed exactly without re-simulation), never discovered
with ``isinstance``.

``save`` writes one ``.npz`` file (arrays + JSON hyper-parameters and state) that
:func:`simfluence.methods.load_simulator` reads back with ``allow_pickle=False``.
"""
from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from simfluence._io import atomic_savez
from simfluence.curriculum import Curriculum
from simfluence.errors import NotFittedError, SimfluenceError
from simfluence.ids import IdIndex
from simfluence.runlog import RunSet

MODEL_FORMAT = "simfluence-simulator"
MODEL_VERSION = 1


def as_curricula(curricula: Curriculum | Sequence[Curriculum]) -> list[Curriculum]:
    """A single curriculum or a sequence of them, as a list."""
    if isinstance(curricula, Curriculum):
        return [curricula]
    curricula = list(curricula)
    for index, cur in enumerate(curricula):
        if not isinstance(cur, Curriculum):
            raise SimfluenceError(f"curricula[{index}] is a {type(cur).__name__}, not a Curriculum")
    return curricula


def as_initial(initial_losses: np.ndarray, n_curricula: int, n_test: int) -> np.ndarray:
    """Initial losses broadcast to (n_curricula, n_test) float64."""
    initial = np.asarray(initial_losses, dtype=np.float64)
    if initial.ndim == 1:
        initial = np.broadcast_to(initial, (n_curricula, initial.shape[0]))
    if initial.shape != (n_curricula, n_test):
        raise SimfluenceError(
            f"initial_losses has shape {np.shape(initial_losses)}, expected ({n_test},) or ({n_curricula}, {n_test})"
        )
    if not np.isfinite(initial).all():
        raise SimfluenceError("initial_losses contain NaN or infinite values")
    return initial


def training_runs(runset: RunSet, runs: Sequence[int] | None) -> list[int]:
    """Positions of the runs to fit on (default all), checked non-empty and in range."""
    chosen = list(range(len(runset))) if runs is None else [int(i) for i in runs]
    if not chosen:
        raise SimfluenceError("no runs to fit on")
    bad = [i for i in chosen if not 0 <= i < len(runset)]
    if bad:
        raise SimfluenceError(f"run position {bad[0]} outside 0..{len(runset) - 1}")
    return chosen


class Simulator:
    """Base class: the fit / simulate / leave-one-out / save protocol.

    Subclasses set ``kind`` (the name of the method in :data:`simfluence.methods.METHODS` that builds the
    class with default parameters), ``_fitted_arrays`` (attributes saved as arrays) and ``tags``.
    """

    kind: ClassVar[str] = "simulator"
    _fitted_arrays: ClassVar[tuple[str, ...]] = ()
    tags: ClassVar[dict[str, Any]] = {"exact_loo": False}

    # --------------------------------------------------------------------- scikit-learn-like params
    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [name for name in signature.parameters if name != "self"]

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as given to ``__init__``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Simulator:
        """Set hyper-parameters (unknown names are an error naming them); returns self."""
        unknown = [name for name in params if name not in self._param_names()]
        if unknown:
            raise SimfluenceError(
                f"{type(self).__name__} has no option {unknown[0]!r} (options: {', '.join(self._param_names())})"
            )
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        shown = []
        for name, value in self.get_params().items():
            default = defaults[name].default
            try:
                same = default is not inspect.Parameter.empty and bool(default == value)
            except (TypeError, ValueError):
                same = False
            if not same:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # --------------------------------------------------------------------- protocol
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None) -> Simulator:
        """Fit to the runs at positions ``runs`` of ``runset`` (default all); returns self."""
        raise NotImplementedError

    def simulate(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Predict loss trajectories.

        Parameters
        ----------
        curricula : one curriculum or a sequence of n_curricula (pool positions, as in ``Run.curriculum``).
        initial_losses : (n_test,) or (n_curricula, n_test) losses at step 0.
        learning_rates : per curriculum, (n_steps,) learning rate of each step; only simulators that use
            learning rates read it (default: the schedule seen in fitting, by step).

        Returns
        -------
        (n_curricula, T + 1, n_test) float64, T the longest curriculum; a shorter curriculum's
        trajectory stays at its final value after its end.
        """
        raise NotImplementedError

    def simulate_frame(
        self,
        curricula: Curriculum | Sequence[Curriculum],
        initial_losses: np.ndarray,
        learning_rates: Sequence[np.ndarray] | None = None,
        names: Sequence[str] | None = None,
        intervals: Any = None,
    ):
        """:meth:`simulate` as a tidy DataFrame ``curriculum, step, test, loss`` with external test ids.

        ``intervals``: a :class:`simfluence.uncertainty.Bootstrap` fitted around this simulator; the table then
        also has ``low, high``, the interval of each predicted loss.
        """
        import pandas as pd

        curricula = as_curricula(curricula)
        if intervals is not None:
            intervals.check_point(self)
        predicted = self.simulate(curricula, initial_losses, learning_rates)
        names = [str(i) for i in range(len(curricula))] if names is None else list(names)
        if len(names) != len(curricula):
            raise SimfluenceError(f"{len(names)} names for {len(curricula)} curricula")
        n_cur, n_points, n_test = predicted.shape
        cur, step, test = np.meshgrid(np.arange(n_cur), np.arange(n_points), np.arange(n_test), indexing="ij")
        columns = {
            "curriculum": np.asarray(names, dtype=object)[cur.ravel()],
            "step": step.ravel(),
            "test": np.asarray(self.test_ids_, dtype=object)[test.ravel()],
            "loss": predicted.ravel(),
        }
        if intervals is not None:
            low, high = intervals.bounds(predicted, intervals.simulate(curricula, initial_losses, learning_rates))
            columns.update(low=low.ravel(), high=high.ravel())
        return pd.DataFrame(columns)

    def leave_one_out(
        self,
        curriculum: Curriculum,
        initial_losses: np.ndarray,
        learning_rates: np.ndarray | None = None,
        step: int | None = None,
        chunk: int = 256,
    ) -> np.ndarray:
        """Loss change at ``step`` (default the last) when each pool example is removed from every batch.

        This generic version re-simulates the leave-one-out curricula of the examples present, in batches of
        ``chunk``; simulators tagged ``exact_loo`` override it with an exact method that needs no re-simulation.

        Returns
        -------
        (n_pool, n_test) float64: loss without example i minus loss with it (positive: i helps); zero rows for
        examples absent from the curriculum.
        """
        self.check_fitted()
        step = curriculum.n_steps if step is None else int(step)
        if not 0 <= step <= curriculum.n_steps:
            raise SimfluenceError(f"step {step} outside 0..{curriculum.n_steps}")
        lrs = None if learning_rates is None else [np.asarray(learning_rates, dtype=np.float64)]
        base = self.simulate(curriculum, initial_losses, lrs)[0, step]
        present = np.flatnonzero(curriculum.counts(self.n_pool_) > 0)
        effects = np.zeros((self.n_pool_, base.size))
        for lo in range(0, present.size, chunk):
            ids = present[lo : lo + chunk]
            edited = [curriculum.remove([int(i)]) for i in ids]
            out = self.simulate(edited, initial_losses, None if lrs is None else lrs * len(edited))
            effects[ids] = out[:, step] - base
        return effects

    def _self_check(self) -> None:
        """Simulate a one-step curriculum: raises if loaded state or arrays are inconsistent (used by the loader)."""
        self.simulate(Curriculum.from_batches([[0]], n_pool=int(self.n_pool_)), np.zeros(int(self.n_test_)))

    def check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load a saved one")

    # --------------------------------------------------------------------- ids
    def _remember_ids(self, runset: RunSet, runs: Sequence[int]) -> None:
        """Record the run set's pool and test ids (and sizes) and the names of the runs fitted on."""
        self.n_pool_, self.n_test_ = runset.n_pool, runset.n_test
        self.pool_ids_, self.test_ids_ = list(runset.pool_ids), list(runset.test_ids)
        self.train_runs_ = [runset[i].name for i in runs]

    @property
    def pool_index(self) -> IdIndex:
        """Lookup of the fitted pool ids -> positions."""
        self.check_fitted()
        return IdIndex(self.pool_ids_, "pool")

    @property
    def test_index(self) -> IdIndex:
        """Lookup of the fitted test ids -> positions."""
        self.check_fitted()
        return IdIndex(self.test_ids_, "test")

    # --------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        """JSON-able fitted state that is not an array (subclasses extend)."""
        return {}

    def _state(self) -> dict[str, Any]:
        return {"n_pool_": self.n_pool_, "n_test_": self.n_test_, "pool_ids_": self.pool_ids_,
                "test_ids_": self.test_ids_, "train_runs_": self.train_runs_, **self._extra_state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore the JSON state written by :meth:`save` (only attributes ending in ``_``)."""
        for name, value in state.items():
            setattr(self, name, value)

    def state_names(self) -> set[str]:
        """Names of the JSON state attributes :meth:`save` writes (what a loader may set)."""
        return set(self._state())

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        """The arrays :meth:`save` writes: ``_fitted_arrays`` and the ``_optional_arrays`` that are set."""
        optional = getattr(self, "_optional_arrays", ())
        arrays = {name: getattr(self, name) for name in self._fitted_arrays}
        arrays.update({name: getattr(self, name) for name in optional if getattr(self, name, None) is not None})
        return arrays

    def _restore_parts(self, arrays: dict[str, np.ndarray], state: dict[str, Any],
                       restore: Callable[[str, Any, dict[str, np.ndarray]], Simulator]):
        """Rebuild the parts of a composite simulator from a model file; plain simulators have none.

        The loader calls this before it checks the arrays and state; ``restore(part, meta, arrays)`` rebuilds
        one saved simulator (``meta``: its kind, params and state) with every check of the loader. Returns the
        arrays and state that belong to this simulator itself.
        """
        return arrays, state

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted simulator to one ``.npz`` file (atomic; no pickle)."""
        self.check_fitted()
        path = Path(path)
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "kind": self.kind,
            "params": _jsonable(self.get_params()),
            "state": _jsonable(self._state()),
        }
        atomic_savez(path, self._saved_arrays(), meta)
        return path


def _jsonable(value: Any) -> Any:
    """Tuples as lists and numpy scalars as Python numbers, recursively (JSON round-trips as the same value)."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def clone(simulator: Simulator) -> Simulator:
    """An unfitted simulator of the same class with (deep copies of) the same hyper-parameters."""
    return type(simulator)(**copy.deepcopy(simulator.get_params()))


def rollout_runs(
    simulator: Simulator, runset: RunSet, runs: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roll a simulator out over logged runs from their observed initial losses.

    Returns
    -------
    predicted, actual : (n_runs, T + 1, n_test), actual NaN where not logged.
    mask : (n_runs, T + 1) bool, True where the run logged its losses.
    """
    chosen = [runset[i] for i in runs]
    horizon = max(run.n_steps for run in chosen)
    learning_rates = None
    if all(np.isfinite(run.learning_rates).all() for run in chosen):
        learning_rates = [run.learning_rates for run in chosen]
    predicted = simulator.simulate(
        [run.curriculum for run in chosen], np.stack([run.initial_losses for run in chosen]), learning_rates
    )
    actual = np.full((len(chosen), horizon + 1, runset.n_test), np.nan)
    mask = np.zeros((len(chosen), horizon + 1), dtype=bool)
    for row, run in enumerate(chosen):
        dense, logged = run.dense_losses()
        actual[row, : run.n_steps + 1] = dense
        mask[row, : run.n_steps + 1] = logged
    return predicted, actual, mask
