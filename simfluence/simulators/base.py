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


def fit_needs(simulator: Simulator | type[Simulator]) -> frozenset[str]:
    """What fitting a simulator (or class) needs besides logged runs: its ``tags["needs"]``."""
    cls = simulator if isinstance(simulator, type) else type(simulator)
    return frozenset(cls.tags.get("needs", frozenset()))


def is_per_base(simulator: Simulator | type[Simulator]) -> bool:
    """Whether a simulator (or class) is fitted around one base run (``runs=[base]``): its ``tags["per_base"]``."""
    cls = simulator if isinstance(simulator, type) else type(simulator)
    return bool(cls.tags.get("per_base", False))


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
    # What a model file must hold, checked by the loader (:meth:`check_saved`) before anything is built from it:
    # per saved array its kind ("float": a real dtype, "int": an integer dtype) and shape, each axis an int, the
    # name of an int of the saved state ("n_pool_", "n_test_", "n_step_terms_"), or another name ("n_steps"): a
    # size every array naming it must agree on; "n_steps+1" is one more than that size.
    _array_specs: ClassVar[dict[str, tuple[str, tuple[str | int, ...]]]] = {}
    # The kind of each JSON state value a later use reads (see ``_STATE_KINDS``), checked by the loader likewise.
    _state_specs: ClassVar[dict[str, str]] = {}
    # ``exact_loo``: leave-one-out effects are exact without re-simulation; ``needs``: what fitting needs besides
    # logged runs ("task", "checkpoints", "scores"); ``per_base``: fitted around one base run (``runs=[base]``)
    tags: ClassVar[dict[str, Any]] = {"exact_loo": False, "needs": frozenset(), "per_base": False}

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
    def fit(self, runset: RunSet, runs: Sequence[int] | None = None, *, task: Any = None) -> Simulator:
        """Fit to the runs at positions ``runs`` of ``runset`` (default all); returns self.

        ``task``: the :class:`~simfluence.task.Task` of the runs (or a ``"file.py:function"`` spec) for the
        methods whose ``tags["needs"]`` holds ``"task"``; the others accept and ignore it, so every caller
        calls ``fit(runset, runs, task=task)`` on whatever simulator it holds.
        """
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
        """Simulate a one-step curriculum: raises if loaded state or arrays are inconsistent (used by the loader,
        after :meth:`check_saved`; subclasses add the checks of their values, not of shapes)."""
        self.simulate(Curriculum.from_batches([[0]], n_pool=int(self.n_pool_)), np.zeros(int(self.n_test_)))

    @classmethod
    def check_saved(cls, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """Check a model file's arrays against ``_array_specs`` and its declared sizes, before any is used.

        Parameters
        ----------
        arrays : the file's arrays of this simulator (not of its parts).
        state : its JSON state.

        Raises
        ------
        SimfluenceError : one line naming the field at fault: a declared size that is not an int >= 0 (the pool
            >= 1), ids that are not a list of that many ints or strings, an array of another kind or shape than
            the declared sizes and the other arrays give. Without ``pool_ids_`` (``test_ids_``), an array must
            confirm ``n_pool_`` (``n_test_``): the ids are then made from it.
        """
        sizes = {name: _saved_size(state, name, minimum) for name, minimum in (("n_pool_", 1), ("n_test_", 0))}
        confirmed = set()
        for name, (kind, axes) in cls._array_specs.items():
            if name not in arrays:
                continue  # a missing array is the loader's error
            array = np.asarray(arrays[name])
            if array.dtype.kind not in _ARRAY_KINDS[kind]:
                raise SimfluenceError(f"array {name!r} has dtype {array.dtype}, expected {kind}")
            shown = f"({', '.join(str(axis) for axis in axes)}{',' if len(axes) == 1 else ''})"
            if array.ndim != len(axes):
                raise SimfluenceError(f"array {name!r} has shape {array.shape}, expected {shown}")
            expected = tuple(_expected_length(axis, length, state, sizes) for axis, length in zip(axes, array.shape,
                                                                                                  strict=True))
            if array.shape != expected:
                raise SimfluenceError(f"array {name!r} has shape {array.shape}, expected {shown} = {expected}")
            confirmed.update(axis for axis in axes if axis in ("n_pool_", "n_test_"))
        for ids, size in (("pool_ids_", "n_pool_"), ("test_ids_", "n_test_")):
            if ids in state:
                values = state[ids]
                if not isinstance(values, list) or len(values) != sizes[size]:
                    got = f"{len(values)} ids" if isinstance(values, list) else type(values).__name__
                    raise SimfluenceError(f"state {ids!r} must be a list of {size} = {sizes[size]} ids, got {got}")
                bad = next((value for value in values if isinstance(value, bool) or not isinstance(value, (int, str))),
                           None)
                if bad is not None:
                    raise SimfluenceError(f"state {ids!r} holds {bad!r}: ids are ints or strings")
            elif size not in confirmed:
                raise SimfluenceError(f"state {ids!r} is missing and no array confirms {size} = {sizes[size]}")
        runs = state.get("train_runs_", [])
        if not isinstance(runs, list) or not all(isinstance(run, str) for run in runs):
            raise SimfluenceError("state 'train_runs_' must be a list of run names")
        for name, kind in cls._state_specs.items():
            description, accepts = _STATE_KINDS[kind]
            if name in state and not accepts(state[name]):
                shown = repr(state[name])
                raise SimfluenceError(f"state {name!r} must be {description}, got "
                                      f"{shown if len(shown) <= 24 else shown[:21] + '...'}")

    def check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load a saved one")

    # --------------------------------------------------------------------- ids
    def _remember_ids(self, runset: RunSet, runs: Sequence[int]) -> None:
        """Record the run set's pool and test ids (and sizes) and the names of the runs fitted on."""
        self.n_pool_, self.n_test_ = runset.n_pool, runset.n_test
        self.pool_ids_, self.test_ids_ = list(runset.pool_ids), list(runset.test_ids)
        self.train_runs_ = [runset[i].name for i in runs]

    def check_matches(self, runset: RunSet, label: str | None = None) -> None:
        """Raise unless fitted on the pool and test ids of ``runset``, in order (compared as text, as saved).

        ``label`` names the simulator in the one-line error (default its class name).
        """
        self.check_fitted()
        if list(map(str, self.pool_ids_)) != list(map(str, runset.pool_ids)) or \
                list(map(str, self.test_ids_)) != list(map(str, runset.test_ids)):
            raise SimfluenceError(f"{label or type(self).__name__} was fitted on other pool or test ids than the run "
                                  f"set's ({len(self.pool_ids_)} pool / {len(self.test_ids_)} test examples vs "
                                  f"{runset.n_pool} / {runset.n_test})")

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


_ARRAY_KINDS = {"float": "fiu", "int": "iu"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# the kinds of JSON state values of ``Simulator._state_specs``: (description, test)
_STATE_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "number": ("a number", _is_number),
    "number|null": ("a number or null", lambda value: value is None or _is_number(value)),
    "str": ("a string", lambda value: isinstance(value, str)),
    "list": ("a list", lambda value: isinstance(value, list)),
    "range|null": ("null or [low, high] with low <= high", lambda value: value is None or (
        isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)) and value[0] <= value[1])),
}


def _saved_size(state: dict[str, Any], name: str, minimum: int = 0) -> int:
    """The int ``state[name]`` of a model file (a declared size), checked to be an int >= ``minimum``."""
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**63:
        shown = repr(value)
        raise SimfluenceError(f"state {name!r} must be an int >= {minimum}, got "
                              f"{shown if len(shown) <= 24 else shown[:21] + '...'}")
    return value


def _expected_length(axis: str | int, length: int, state: dict[str, Any], sizes: dict[str, int]) -> int:
    """The length an axis of a spec (see ``Simulator._array_specs``) must have, where the array's is ``length``.

    ``sizes`` holds the sizes known so far; a size the spec names for the first time is taken from the state (a
    name ending in ``_``) or from ``length`` (any other name; ``"name+k"`` is ``k`` more than the size).
    """
    if isinstance(axis, int):
        return axis
    if axis.endswith("_"):
        if axis not in sizes:
            sizes[axis] = _saved_size(state, axis)
        return sizes[axis]
    base, _, plus = axis.partition("+")
    sizes.setdefault(base, max(length - int(plus or 0), 0))
    return sizes[base] + int(plus or 0)


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
    learning_rates = [run.known_learning_rates for run in chosen]
    if any(rates is None for rates in learning_rates):
        learning_rates = None
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
