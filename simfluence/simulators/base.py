"""The simulator protocol shared by every training-run simulator, and saving/loading without pickle.

A simulator is fitted to logged runs and then predicts the loss trajectory of every test example for
any curriculum, starting from given initial losses::

    sim = SimfluenceLinear().fit(runset, runs=range(40))
    trajectories = sim.simulate(curricula, initial_losses)   # (n_curricula, T + 1, n_test)

Hyper-parameters are ``__init__`` arguments (scikit-learn style, shown by ``repr``); fitted state lives
in attributes ending in ``_``. ``save`` writes one ``.npz`` file (arrays + JSON hyper-parameters) that
``load_simulator`` reads back with ``allow_pickle=False``.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from simfluence._io import atomic_savez, load_npz
from simfluence.curriculum import Curriculum
from simfluence.errors import ModelFileError, NotFittedError, SimfluenceError
from simfluence.runlog import RunSet

MODEL_FORMAT = "simfluence-simulator"
MODEL_VERSION = 1
REGISTRY: dict[str, type[Simulator]] = {}


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


def register(cls: type[Simulator]) -> type[Simulator]:
    """Class decorator: make a simulator class loadable by its ``kind``."""
    REGISTRY[cls.kind] = cls
    return cls


class Simulator:
    """Base class: the fit / simulate / save protocol. Subclasses set ``kind`` and the array attributes."""

    kind: ClassVar[str] = "simulator"
    _fitted_arrays: ClassVar[tuple[str, ...]] = ()

    # --------------------------------------------------------------------- scikit-learn-like params
    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [name for name in signature.parameters if name != "self"]

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as given to ``__init__``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        shown = [
            f"{name}={value!r}"
            for name, value in self.get_params().items()
            if defaults[name].default is inspect.Parameter.empty or defaults[name].default != value
        ]
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
        curricula : one curriculum or a sequence of n_curricula.
        initial_losses : (n_test,) or (n_curricula, n_test) losses at step 0.
        learning_rates : per curriculum, (n_steps,) learning rate of each step; only simulators that use
            learning rates read it (default: the schedule seen in fitting, by step).

        Returns
        -------
        (n_curricula, T + 1, n_test) float64, T the longest curriculum; a shorter curriculum's
        trajectory stays at its final value after its end.
        """
        raise NotImplementedError

    def check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load a saved one")

    # --------------------------------------------------------------------- persistence
    def _extra_state(self) -> dict[str, Any]:
        """JSON-able fitted state that is not an array (subclasses extend)."""
        return {}

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted simulator to one ``.npz`` file (atomic; no pickle)."""
        self.check_fitted()
        path = Path(path)
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "kind": self.kind,
            "params": self.get_params(),
            "state": self._extra_state(),
        }
        arrays = {name: getattr(self, name) for name in self._fitted_arrays}
        atomic_savez(path, arrays, meta)
        return path


def load_simulator(path: str | os.PathLike) -> Simulator:
    """Read a simulator written by ``Simulator.save`` (any registered kind)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{str(path)!r}: no such simulator file")
    try:
        arrays, meta = load_npz(path)
    except (OSError, ValueError) as err:
        raise ModelFileError(f"{str(path)!r} is not a simulator file: {err}") from None
    if not meta or meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{str(path)!r} is not a simfluence simulator file")
    if meta.get("version") != MODEL_VERSION:
        raise ModelFileError(f"{str(path)!r}: simulator format version {meta.get('version')!r} is not supported")
    kind = meta.get("kind")
    if kind not in REGISTRY:
        raise ModelFileError(f"{str(path)!r}: unknown simulator kind {kind!r}")
    cls = REGISTRY[kind]
    sim = cls(**meta["params"])
    missing = [name for name in cls._fitted_arrays if name not in arrays]
    if missing:
        raise ModelFileError(f"{str(path)!r}: missing arrays {missing}")
    for name in cls._fitted_arrays:
        setattr(sim, name, arrays[name])
    sim._set_extra_state(meta.get("state") or {})
    sim.fitted_ = True
    return sim


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
