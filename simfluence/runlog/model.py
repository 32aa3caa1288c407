"""The in-memory model of logged training runs: :class:`Run` and :class:`RunSet`.

A *run set* holds many logged training runs over one pool of training examples and one fixed set of test
(probe) examples. Each run records its curriculum (the pool positions of every step's batch), the loss of
every test example at the logged steps (step 0 = before training) and metadata (seed, optimizer, learning
rate per step where known). This module holds the runs, their ids and the checks of their values;
reading and writing folders is :mod:`simfluence.runlog.store` (``RunSet.load``, ``RunSet.save`` and
``RunSet.create`` call it), logging a run step by step is :mod:`simfluence.runlog.logger`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simfluence._io import atomic_write_json
from simfluence.curriculum import Curriculum
from simfluence.errors import RunLogError
from simfluence.ids import IdIndex
from simfluence.runlog.store import (
    _CHECK_CHUNK,
    FLOAT32_MAX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    RUNS_DIR,
    _check_json,
    _lock_set,
    _read_manifest,
    _read_run_arrays,
    _read_run_folder,
    _recover_interrupted_save,
    _run_folders,
    _RunFiles,
    _unlock,
    _write_run,
    built_aside,
    check_replaceable,
    check_run_name,
    is_runset,
    natural_key,
)

_LAZY_ARRAYS = ("curriculum", "logged_steps", "losses", "learning_rates")


def _json_ids(ids: Iterable[Any], what: str) -> list:
    """External ids as JSON scalars (int or str), checked unique."""
    out = []
    for value in ids:
        if isinstance(value, (bool, np.bool_)):
            raise RunLogError(f"{what} id {value!r} is a boolean; ids must be integers or strings")
        if isinstance(value, (int, np.integer)):
            out.append(int(value))
        elif isinstance(value, str):
            out.append(value)
        else:
            raise RunLogError(f"{what} id {value!r} has type {type(value).__name__}; ids must be integers or strings")
    if len(set(out)) != len(out):
        seen: set = set()
        dup = next(v for v in out if v in seen or seen.add(v))
        raise RunLogError(f"{what} id {dup!r} appears more than once")
    return out


class Run:
    """One logged training run.

    A run loaded from disk reads its arrays on first use of ``curriculum``, ``logged_steps``, ``losses`` or
    ``learning_rates`` (``name``, ``metadata``, ``complete``, ``n_steps`` and ``n_test`` come from its
    ``run.json``), so opening a run set of many runs costs no memory and no open file per run.

    Attributes
    ----------
    name : run name (unique within its run set).
    curriculum : the batches of steps 1..n_steps (internal pool ids).
    logged_steps : (n_logged,) int64, strictly increasing steps in [0, n_steps] at which losses were logged.
    losses : (n_logged, n_test) float32 test losses at ``logged_steps`` (memory-mapped read-only when loaded
        from disk; the mapping holds no open file).
    learning_rates : (n_steps,) float64 learning rate of each step, NaN where unknown.
    metadata : free JSON metadata (seed, optimizer, ...).
    complete : False for a run whose logger did not close (a readable prefix).
    """

    name: str
    curriculum: Curriculum
    logged_steps: np.ndarray
    losses: np.ndarray
    learning_rates: np.ndarray
    metadata: dict
    complete: bool

    def __init__(
        self,
        name: str,
        curriculum: Curriculum,
        logged_steps: np.ndarray | Sequence[int],
        losses: np.ndarray,
        learning_rates: np.ndarray | Sequence[float] | None = None,
        metadata: dict | None = None,
        complete: bool = True,
    ) -> None:
        self.name = check_run_name(name)
        self.curriculum = curriculum
        self.logged_steps = np.asarray(logged_steps, dtype=np.int64)
        self.losses = losses if isinstance(losses, np.memmap) else np.asarray(losses)
        if learning_rates is None:
            learning_rates = np.full(curriculum.n_steps, np.nan)
        self.learning_rates = np.asarray(learning_rates, dtype=np.float64)
        self.metadata = {} if metadata is None else metadata
        self.complete = complete

    @classmethod
    def _on_disk(cls, name: str, files: _RunFiles, metadata: dict, complete: bool) -> Run:
        """A run whose arrays are read from ``files`` on first use."""
        run = cls.__new__(cls)
        run.__dict__.update(name=name, metadata=metadata, complete=complete, _files=files)
        return run

    def __getattr__(self, attribute: str) -> Any:  # only called for attributes not set yet
        files = self.__dict__.get("_files")
        if files is None or attribute not in _LAZY_ARRAYS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")
        for key, value in _read_run_arrays(files).items():
            self.__dict__.setdefault(key, value)  # arrays set by the user meanwhile are kept
        return self.__dict__[attribute]

    @property
    def n_steps(self) -> int:
        files = self.__dict__.get("_files")
        if files is not None and "curriculum" not in self.__dict__:
            return files.n_steps
        return self.curriculum.n_steps

    @property
    def n_test(self) -> int:
        files = self.__dict__.get("_files")
        if files is not None and "losses" not in self.__dict__:
            return files.n_test
        return int(self.losses.shape[1])

    @property
    def initial_losses(self) -> np.ndarray:
        """(n_test,) losses at step 0 (raises if step 0 was not logged)."""
        if len(self.logged_steps) == 0 or self.logged_steps[0] != 0:
            raise RunLogError(f"run {self.name!r}: step 0 (initial losses) was not logged")
        return np.asarray(self.losses[0], dtype=np.float64)

    @property
    def final_step(self) -> int:
        """Last logged step."""
        return int(self.logged_steps[-1])

    @property
    def known_learning_rates(self) -> np.ndarray | None:
        """(n_steps,) float64 learning rate of every step, or None when the rate of any step is unknown (NaN)."""
        rates = self.learning_rates
        return rates if np.isfinite(rates).all() else None

    def dense_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """Losses on the full step grid.

        Returns
        -------
        losses : (n_steps + 1, n_test) float64, NaN at steps that were not logged.
        mask : (n_steps + 1,) bool, True at logged steps.
        """
        grid = np.full((self.n_steps + 1, self.n_test), np.nan)
        mask = np.zeros(self.n_steps + 1, dtype=bool)
        grid[self.logged_steps] = self.losses
        mask[self.logged_steps] = True
        return grid, mask

    def validate(self, n_pool: int, n_test: int, test_ids: Sequence | None = None, where: str = "") -> None:
        """Check ids, shapes, steps, learning rates and finite losses; raise ``RunLogError`` naming the
        run/step/id at fault. Memory use does not grow with the size of the loss matrix."""
        label = f"run {self.name!r}{where}"
        curriculum = self.curriculum
        if curriculum.ids.size and (curriculum.ids.min() < 0 or curriculum.ids.max() >= n_pool):
            bad = int(np.flatnonzero((curriculum.ids < 0) | (curriculum.ids >= n_pool))[0])
            step = int(np.searchsorted(curriculum.offsets, bad, side="right"))
            raise RunLogError(
                f"{label}: step {step} uses pool id {int(curriculum.ids[bad])}, outside 0..{n_pool - 1}"
            )
        steps = self.logged_steps
        if self.losses.ndim != 2 or self.losses.shape != (len(steps), n_test):
            raise RunLogError(
                f"{label}: losses have shape {tuple(self.losses.shape)}, expected ({len(steps)}, {n_test})"
            )
        if len(steps):
            outside = (steps < 0) | (steps > curriculum.n_steps)
            if outside.any():
                bad_step = int(steps[np.flatnonzero(outside)[0]])
                raise RunLogError(f"{label}: losses logged at step {bad_step}, outside 0..{curriculum.n_steps}")
            not_increasing = steps[1:] <= steps[:-1]  # a comparison, not a difference: no overflow
            if not_increasing.any():
                i = int(np.flatnonzero(not_increasing)[0])
                raise RunLogError(f"{label}: logged steps not strictly increasing at step {int(steps[i + 1])}")
        rows_per_chunk = max(1, _CHECK_CHUNK // max(n_test, 1))
        for start in range(0, len(steps), rows_per_chunk):
            chunk = np.asarray(self.losses[start : start + rows_per_chunk])
            finite = np.isfinite(chunk) & (np.abs(chunk) <= FLOAT32_MAX)
            if not finite.all():
                row, col = (int(v[0]) for v in np.nonzero(~finite))
                test = test_ids[col] if test_ids is not None else col
                raise RunLogError(
                    f"{label}: loss of test {test!r} at step {int(steps[start + row])} is {float(chunk[row, col])}"
                )
        rates = self.learning_rates
        if rates is not None and len(rates) != curriculum.n_steps:
            raise RunLogError(f"{label}: {len(rates)} learning rates for {curriculum.n_steps} steps")
        if rates is not None:
            bad_rate = ~np.isnan(rates) & ~(np.isfinite(rates) & (rates >= 0))
            if bad_rate.any():
                step = int(np.flatnonzero(bad_rate)[0]) + 1
                raise RunLogError(
                    f"{label}: learning rate of step {step} is {float(rates[step - 1])}; "
                    "it must be a finite number >= 0 (NaN = unknown)"
                )

    def __repr__(self) -> str:
        state = "" if self.complete else ", incomplete"
        return (
            f"Run({self.name!r}, n_steps={self.n_steps}, n_logged={len(self.logged_steps)}, "
            f"n_test={self.n_test}{state})"
        )


class RunSet:
    """Many logged runs over one pool of training examples and one set of test examples.

    Build one in memory from ``Run`` objects, or open a folder with :meth:`load`. External ids of pool
    and test examples (ints or strings) are kept in ``pool_ids`` / ``test_ids``; curricula and loss
    columns use internal positions ``0..n_pool-1`` and ``0..n_test-1``.

    Parameters
    ----------
    runs : the runs, in any order (kept in natural order of their names).
    n_pool : number of pool examples (defaults to ``len(pool_ids)``).
    pool_ids, test_ids : external ids (default ``range``).
    metadata : free JSON metadata about the run set (task, model, ...).

    Attributes
    ----------
    skipped : ``(run name, reason)`` of every corrupt run that ``load(..., skip_corrupt=True)`` left out.
    """

    def __init__(
        self,
        runs: Iterable[Run],
        n_pool: int | None = None,
        pool_ids: Sequence | None = None,
        test_ids: Sequence | None = None,
        metadata: dict | None = None,
        path: str | os.PathLike | None = None,
        validate: bool = True,
    ) -> None:
        runs = sorted(runs, key=lambda run: natural_key(run.name))
        if n_pool is None:
            if pool_ids is None:
                raise RunLogError("RunSet needs n_pool or pool_ids")
            n_pool = len(pool_ids)
        self.n_pool = int(n_pool)
        self.pool_ids = _json_ids(range(self.n_pool) if pool_ids is None else pool_ids, "pool")
        if len(self.pool_ids) != self.n_pool:
            raise RunLogError(f"{len(self.pool_ids)} pool ids for n_pool={self.n_pool}")
        if test_ids is None:
            if not runs:
                raise RunLogError("RunSet with no runs needs test_ids")
            test_ids = range(runs[0].n_test)
        self.test_ids = _json_ids(test_ids, "test")
        self.metadata = dict(metadata or {})
        self.path = Path(path) if path is not None else None
        names = [run.name for run in runs]
        if len(set(names)) != len(names):
            raise RunLogError(f"run name {next(n for n in names if names.count(n) > 1)!r} appears twice")
        self.runs: list[Run] = runs
        self.skipped: list[tuple[str, str]] = []
        if validate:
            for run in runs:
                run.validate(self.n_pool, self.n_test, self.test_ids)

    # ----------------------------------------------------------------------------------------- access
    @property
    def n_test(self) -> int:
        return len(self.test_ids)

    @property
    def run_names(self) -> list[str]:
        return [run.name for run in self.runs]

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def __getitem__(self, key: int | str) -> Run:
        if isinstance(key, str):
            return self.runs[self.position(key)]
        return self.runs[key]

    def position(self, run: int | str | Run, what: str = "run") -> int:
        """Position ``0..len(self) - 1`` of one run of this set.

        Parameters
        ----------
        run : its name, its position (negative counts from the end) or the :class:`Run` object itself.
        what : what the run is for, to name it in the error (``"base run"``, ``"train_runs"``).

        Raises
        ------
        RunLogError : one line naming ``run`` when it is none of this set's runs.
        """
        n_runs = len(self.runs)
        if isinstance(run, Run):
            for index, own in enumerate(self.runs):
                if own is run:
                    return index
            raise RunLogError(f"{what} {run.name!r} is not a run of the run set{self._where()} (a Run object of "
                              "another run set: pass its name)")
        if isinstance(run, str):
            for index, own in enumerate(self.runs):
                if own.name == run:
                    return index
            raise RunLogError(f"no run named {run!r} in run set{self._where()}")
        if isinstance(run, (int, np.integer)) and not isinstance(run, (bool, np.bool_)):
            if -n_runs <= int(run) < n_runs:
                return int(run) % n_runs
            span = f"positions are {-n_runs}..{n_runs - 1}" if n_runs else "it holds no runs"
            raise RunLogError(f"{what} {int(run)} is not a run of the run set{self._where()}: {span}")
        raise RunLogError(f"{what} {run!r} is not a run name or position")

    @property
    def pool_index(self) -> IdIndex:
        """Lookup of pool ids -> positions (:class:`~simfluence.ids.IdIndex`)."""
        return IdIndex(self.pool_ids, "pool")

    @property
    def test_index(self) -> IdIndex:
        """Lookup of test ids -> positions (:class:`~simfluence.ids.IdIndex`)."""
        return IdIndex(self.test_ids, "test")

    def pool_positions(self, ids: Iterable[Any] | str) -> np.ndarray:
        """(n,) internal positions of external pool ids; an unknown id is an error naming it."""
        return self.pool_index.positions(ids)

    def test_positions(self, ids: Iterable[Any] | str) -> np.ndarray:
        """(n,) internal positions (loss columns) of external test ids; an unknown id is an error naming it."""
        return self.test_index.positions(ids)

    def select(self, runs: Iterable[int | str] | slice) -> RunSet:
        """A run set with a subset of the runs (by position, name or slice); shares the arrays (and ``skipped``)."""
        chosen = self.runs[runs] if isinstance(runs, slice) else [self[key] for key in runs]
        subset = RunSet(chosen, self.n_pool, self.pool_ids, self.test_ids, self.metadata, self.path, validate=False)
        subset.skipped = list(self.skipped)
        return subset

    def select_tests(self, tests: Sequence[int] | slice) -> RunSet:
        """A run set with only some test examples (loss columns, by position or slice), in memory.

        The runs keep their curricula, learning rates and metadata; their losses are copied (only the chosen
        columns), so the result holds no open file and can be sent to another process or machine. It keeps the
        folder's ``path``, where the files of whole runs stay valid (checkpoints, a workload's corpus and base).
        """
        columns = np.arange(self.n_test)[tests]
        runs = [Run(run.name, run.curriculum, run.logged_steps, np.ascontiguousarray(run.losses[:, columns]),
                    run.learning_rates, run.metadata, run.complete) for run in self.runs]
        subset = RunSet(runs, self.n_pool, self.pool_ids, [self.test_ids[i] for i in columns], self.metadata,
                        self.path, validate=False)
        subset.skipped = list(self.skipped)
        return subset

    def complete_only(self) -> RunSet:
        """The runs whose logger closed normally (``run.complete``); shares the arrays.

        ``len(self) - len(self.complete_only())`` runs are left out: killed, aborted or still running.
        """
        return self.select([index for index, run in enumerate(self.runs) if run.complete])

    def _where(self) -> str:
        return f" {str(self.path)!r}" if self.path is not None else ""

    def __repr__(self) -> str:
        return f"RunSet(n_runs={len(self)}, n_pool={self.n_pool}, n_test={self.n_test}{self._where()})"

    # ----------------------------------------------------------------------------------------- frames
    def to_frame(self) -> pd.DataFrame:
        """Long table of every logged loss: columns ``run, step, test, loss`` (external test ids)."""
        frames = []
        test_ids = np.asarray(self.test_ids, dtype=object)
        for run in self.runs:
            n_logged = len(run.logged_steps)
            frames.append(
                pd.DataFrame(
                    {
                        "run": run.name,
                        "step": np.repeat(run.logged_steps, self.n_test),
                        "test": np.tile(test_ids, n_logged),
                        "loss": np.asarray(run.losses, dtype=np.float64).reshape(-1),
                    }
                )
            )
        if not frames:
            return pd.DataFrame({"run": [], "step": [], "test": [], "loss": []})
        return pd.concat(frames, ignore_index=True)

    def curriculum_frame(self) -> pd.DataFrame:
        """Long table of every batch entry: columns ``run, step, example, lr``.

        ``example`` holds external pool ids and ``lr`` the learning rate of the entry's step (NaN where it was
        not logged), so the table imports back with :func:`simfluence.importers.import_tables` rates and all.
        """
        pool_ids = np.asarray(self.pool_ids, dtype=object)
        frames = []
        for run in self.runs:
            steps = run.curriculum.step_of_entries()
            frames.append(pd.DataFrame({"run": run.name, "step": steps, "example": pool_ids[run.curriculum.ids],
                                        "lr": np.asarray(run.learning_rates, dtype=np.float64)[steps - 1]}))
        if not frames:
            return pd.DataFrame({"run": [], "step": [], "example": [], "lr": []})
        return pd.concat(frames, ignore_index=True)

    # ----------------------------------------------------------------------------------------- disk
    def manifest(self) -> dict:
        """The manifest dict written to ``manifest.json``."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n_pool": self.n_pool,
            "n_test": self.n_test,
            "pool_ids": self.pool_ids,
            "test_ids": self.test_ids,
            "metadata": self.metadata,
        }

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        n_pool: int | None = None,
        test_ids: Sequence | int | None = None,
        pool_ids: Sequence | None = None,
        metadata: dict | None = None,
        exist_ok: bool = False,
    ) -> RunSet:
        """Create an empty run set folder (manifest only) for :class:`RunLogger` to log runs into.

        ``test_ids`` may be a count. With ``exist_ok`` an existing run set with the same pool and test
        ids is opened instead; a different one is an error.
        """
        path = Path(path)
        _recover_interrupted_save(path)
        if isinstance(test_ids, (int, np.integer)):
            test_ids = range(int(test_ids))
        if test_ids is None:
            raise RunLogError("RunSet.create needs test_ids (a list of ids or a count)")
        empty = cls([], n_pool=n_pool, pool_ids=pool_ids, test_ids=test_ids, metadata=metadata, path=path)
        _check_json(empty.metadata, "run set metadata")
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise RunLogError(f"{str(path)!r} already holds a run set (use exist_ok=True to reuse it)")
            existing = cls.load(path, validate=False)
            if existing.pool_ids != empty.pool_ids or existing.test_ids != empty.test_ids:
                raise RunLogError(f"{str(path)!r} holds a run set with different pool or test ids")
            return existing
        path.mkdir(parents=True, exist_ok=True)
        (path / RUNS_DIR).mkdir(exist_ok=True)
        atomic_write_json(path / MANIFEST, empty.manifest())
        return empty

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the whole run set to a new folder ``path``.

        Everything is written to a temporary sibling folder that is renamed into place at the end, so an
        interrupted save leaves no half-written run set: ``path`` holds the old set or the new one, or (after a
        stop between the two final renames) the next open of ``path`` finishes the save. ``overwrite`` only
        ever replaces a run set or an empty folder; anything else at ``path`` is an error and is left alone.
        A run set is replaced under its exclusive lock: while a :class:`RunLogger` writes into it, it is not.
        """
        path = Path(path)
        _recover_interrupted_save(path)
        if os.path.lexists(path) and not overwrite:
            raise RunLogError(f"{str(path)!r} already exists (pass overwrite=True to replace it)")
        check_replaceable(path)
        _check_json(self.metadata, "run set metadata")
        for run in self.runs:
            _check_json(run.metadata, f"metadata of run {run.name!r}")
        lock = _lock_set(path, exclusive=True) if is_runset(path) else None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with built_aside(path) as tmp:
                (tmp / RUNS_DIR).mkdir()
                atomic_write_json(tmp / MANIFEST, self.manifest())
                for run in self.runs:
                    _write_run(tmp / RUNS_DIR / run.name, run, self.n_test)
        finally:
            _unlock(lock)
        self.path = path
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        validate: bool = True,
        include_incomplete: bool = True,
        skip_corrupt: bool = False,
    ) -> RunSet:
        """Open a run set folder. Each run's arrays are read on first use; losses are memory-mapped.

        Nothing outside the folder is read: a symbolic link in it (run folder, ``run.json``, array file) makes
        that run corrupt.

        Parameters
        ----------
        validate : check every run's ids, shapes, steps, learning rates and finite losses (names the
            run/step/id at fault). This reads every run's arrays now.
        include_incomplete : keep runs whose logger never closed (their committed prefix); see also
            :meth:`complete_only`.
        skip_corrupt : leave out runs that cannot be read or fail validation, listing them in ``skipped``
            as ``(run name, reason)``, instead of raising on the first. A corrupt manifest is always an error.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        try:
            empty = cls([], n_pool=manifest["n_pool"], pool_ids=manifest["pool_ids"],
                        test_ids=manifest["test_ids"], metadata=manifest.get("metadata") or {}, path=path)
        except RunLogError as err:
            raise RunLogError(f"{str(path / MANIFEST)!r}: {err}") from None
        runs, skipped = [], []
        for run_dir in _run_folders(path):
            try:
                run = _read_run(run_dir, n_test=empty.n_test, check_n_test=True)  # errors name the run's files
                if not (run.complete or include_incomplete):
                    continue
                if validate:
                    try:
                        run.validate(empty.n_pool, empty.n_test, empty.test_ids)
                    except RunLogError as err:
                        raise RunLogError(f"{str(path)!r}: {err}") from None
            except RunLogError as err:
                if not skip_corrupt:
                    raise
                skipped.append((run_dir.name, str(err)))
                continue
            runs.append(run)
        runset = cls(runs, empty.n_pool, empty.pool_ids, empty.test_ids, empty.metadata, path, validate=False)
        runset.skipped = skipped
        return runset


def read_run(run_dir: str | os.PathLike, n_test: int) -> Run:
    """Read one run folder (only the counts committed in its ``run.json``), with ``n_test`` loss columns."""
    return _read_run(Path(run_dir), n_test, check_n_test=False)


def _read_run(run_dir: Path, n_test: int, check_n_test: bool) -> Run:
    """``read_run``; with ``check_n_test`` the run's own ``n_test`` must match the manifest's.

    The folder is checked now (see :func:`~simfluence.runlog.store._read_run_folder`); the arrays are read on
    first use (see :class:`Run`).
    """
    name, files, metadata, complete = _read_run_folder(run_dir, n_test, check_n_test)
    return Run._on_disk(name, files, metadata, complete=complete)
