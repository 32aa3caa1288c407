"""Training-run logs on disk: ``RunSet``, ``Run`` and ``RunLogger``.

A *run set* is a folder holding many logged training runs over one pool of training examples and one
fixed set of test (probe) examples. Each run records its curriculum (the pool ids of every step's
batch), the loss of every test example at the logged steps (step 0 = before training) and metadata
(seed, optimizer, learning rate per step where known). The exact layout is versioned and documented
in ``runs/README.md``; in short::

    RUNSET/manifest.json                 format, version, pool and test ids, free metadata
    RUNSET/runs/<name>/run.json          status and committed counts, run metadata
    RUNSET/runs/<name>/batch_sizes.bin   int64 (n_steps,)          little-endian, append-only
    RUNSET/runs/<name>/batch_ids.bin     int64 (n_entries,)        internal pool ids 0..n_pool-1
    RUNSET/runs/<name>/learning_rates.bin float64 (n_steps,)       NaN where unknown
    RUNSET/runs/<name>/logged_steps.bin  int64 (n_logged,)         strictly increasing, 0..n_steps
    RUNSET/runs/<name>/losses.bin        float32 (n_logged, n_test) row-major, memory-mapped on load

The ``.bin`` files are append-only; ``run.json`` is rewritten atomically after every step and holds the
counts that are *committed*. A reader trusts only those counts, so a logger killed mid-step leaves a
run whose every completed step is readable. Runs are ordered by the natural sort of their names
(``run-2`` before ``run-10``).

A logger holds an exclusive lock on its run (``RUNSET/runs/.locks/<name>.lock``) and a shared lock on the whole
set (``RUNSET/runs/.locks/.runset.lock``), which a replacement of the set (:meth:`RunSet.save`,
:func:`runset_destination`) holds exclusively while it builds the new set aside and swaps it in. A reader never follows
a symbolic link, checks every count against the real file size before reading, reads a run's arrays on
first use and keeps no file open (losses are mapped without a descriptor), so hostile or corrupt files
end in one ``RunLogError`` and sets of many thousands of runs open under a small ``ulimit -n``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: loggers take no lock
    fcntl = None

from simfluence._io import atomic_write_json, map_readonly
from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, RunLogError
from simfluence.ids import IdIndex

FORMAT_NAME = "simfluence-runset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RUNS_DIR = "runs"
RUN_JSON = "run.json"
LOCKS_DIR = ".locks"  # in runs/: one lock file per run name, held by its RunLogger
SET_LOCK = ".runset.lock"  # in runs/.locks/: shared by every writer of runs, exclusive while the set is replaced
FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_JSON_BYTES = 1 << 30  # a manifest or run.json beyond this is not read (a sparse or runaway file)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: no trailing newline
_LAZY_ARRAYS = ("curriculum", "logged_steps", "losses", "learning_rates")
_CHECK_CHUNK = 1 << 20  # elements checked at a time: validation memory does not grow with a run's size
# An array file over this many bytes must occupy at least 1/_SPARSE_RATIO of them on disk: a sparse file that
# promises gigabytes in a few kilobytes is refused before anything proportional to its counts is allocated.
_SPARSE_MIN_BYTES = 1 << 24
_SPARSE_RATIO = 16
_FILES = {
    "batch_sizes": ("batch_sizes.bin", np.dtype("<i8")),
    "batch_ids": ("batch_ids.bin", np.dtype("<i8")),
    "learning_rates": ("learning_rates.bin", np.dtype("<f8")),
    "logged_steps": ("logged_steps.bin", np.dtype("<i8")),
    "losses": ("losses.bin", np.dtype("<f4")),
}


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically (``run-2`` before ``run-10``).

    Names equal but for leading zeros (``run-2``, ``run-02``) are ordered by the plain string, so the order
    never depends on the order the names came in.
    """
    parts = re.split(r"(\d+)", name)  # odd positions hold the runs of digits
    key = tuple((0, int(part), "") if index % 2 else (1, 0, part) for index, part in enumerate(parts))
    return key, name


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a valid run name (letters, digits, ``._-``; used as a folder name)."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise RunLogError(
            f"invalid run name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _check_json(value: Any, what: str) -> None:
    """Raise ``RunLogError`` unless ``value`` can be written as strict JSON (no NaN, no numpy scalars)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RunLogError(f"{what} cannot be written as JSON: {err}") from None


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
            for run in self.runs:
                if run.name == key:
                    return run
            raise RunLogError(f"no run named {key!r} in run set{self._where()}")
        return self.runs[key]

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
        columns), so the result holds no file and can be sent to another process or machine.
        """
        columns = np.arange(self.n_test)[tests]
        runs = [Run(run.name, run.curriculum, run.logged_steps, np.ascontiguousarray(run.losses[:, columns]),
                    run.learning_rates, run.metadata, run.complete) for run in self.runs]
        subset = RunSet(runs, self.n_pool, self.pool_ids, [self.test_ids[i] for i in columns], self.metadata,
                        validate=False)
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
            tmp = _hidden_dir(path.parent, path.name, ".tmp")
            try:
                (tmp / RUNS_DIR).mkdir()
                atomic_write_json(tmp / MANIFEST, self.manifest())
                for run in self.runs:
                    _write_run(tmp / RUNS_DIR / run.name, run, self.n_test)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _swap_in(tmp, path)
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


def _run_folders(path: Path) -> list[Path]:
    """The run entries of ``path/runs`` in natural order of their names (hidden entries and plain files left
    out; a symbolic link is listed, so that reading it fails naming it)."""
    runs_dir = path / RUNS_DIR
    if not os.path.lexists(runs_dir):
        return []
    if not _is_plain_dir(runs_dir):
        raise RunLogError(f"{str(runs_dir)!r} is not a folder (or is a symbolic link; run sets never follow links)")
    try:
        with os.scandir(runs_dir) as entries:
            names = [
                entry.name for entry in entries
                if not entry.name.startswith(".") and (entry.is_dir(follow_symlinks=False) or entry.is_symlink())
            ]
    except OSError as err:
        raise RunLogError(f"cannot list {str(runs_dir)!r}: {err.strerror or err}") from None
    return [runs_dir / name for name in sorted(names, key=natural_key)]


def _hidden_dir(parent: Path, name: str, suffix: str) -> Path:
    """Make a fresh hidden folder ``parent/.name.<random><suffix>`` (mode from the umask, unlike mkdtemp)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = parent / f".{name}.{uuid.uuid4().hex[:12]}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _lock_run(run_dir: Path) -> int | None:
    """Take the exclusive lock of one run (``runs/.locks/<name>.lock``); the open descriptor holds it.

    The lock file is never deleted (deleting it could let two writers lock two different files), so it
    outlives overwrites of the run. Without ``fcntl`` (Windows) there is no lock and None is returned.
    """
    if fcntl is None:
        return None
    locks = run_dir.parent / LOCKS_DIR
    path = locks / f"{run_dir.name}.lock"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW, 0o666)
    except OSError as err:
        raise RunLogError(f"cannot open the lock file {str(path)!r} of run {run_dir.name!r}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLogError(
            f"run {run_dir.name!r} in {str(run_dir.parent.parent)!r} is being written by another RunLogger "
            f"(it holds {str(path)!r}); a run has one writer at a time"
        ) from None
    except OSError as err:
        os.close(fd)
        raise RunLogError(f"cannot lock {str(path)!r} of run {run_dir.name!r}: {err.strerror}") from None
    return fd


def _unlock(lock: int | None) -> None:
    """Release a lock taken by :func:`_lock_run` (closing the descriptor releases the flock); returns None."""
    if lock is not None:
        os.close(lock)


def _remove_tree(path: Path) -> None:
    """Delete a folder by first renaming it to a hidden name, so an interrupted delete leaves no half folder."""
    trash = _hidden_dir(path.parent, path.name, ".old")
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _swap_in(new: Path, path: Path) -> None:
    """Put the complete run set ``new`` (a hidden sibling ``.<name>.<token>.tmp`` of ``path``) at ``path``.

    By renames only: ``path`` holds the old run set or the new one, never half of one (the old one is deleted
    only once the new one is in place). The old one is set aside under the token of the new one
    (``.<name>.<token>.old/<name>``), which tells a later open that the swap got that far
    (see :func:`_recover_interrupted_save`). If a rename fails, the old set is put back and ``new`` removed.
    """
    old = None
    try:
        if os.path.lexists(path):
            old = new.with_name(new.name[: -len(".tmp")] + ".old")
            old.mkdir()
            os.replace(path, old / path.name)
        os.replace(new, path)
    except BaseException:
        if old is not None and not os.path.lexists(path) and os.path.lexists(old / path.name):
            os.replace(old / path.name, path)
        if old is None or os.path.lexists(path):  # the old set is back (or there was none): ``new`` is not needed
            shutil.rmtree(new, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _lock_set(path: Path, exclusive: bool) -> int | None:
    """Take the lock of a whole run set (``runs/.locks/.runset.lock``): shared by writers of its runs
    (:class:`RunLogger`, :func:`install_run`, the run generator), exclusive while the set is replaced.

    Non-blocking: a conflicting holder is one ``RunLogError``. The lock file lives inside the set, so a set that
    was swapped for another between opening the file and locking it is detected (the path then names another
    file) and refused too. Without ``fcntl`` (Windows) there is no lock and None is returned.
    """
    if fcntl is None:
        return None
    if not (path / MANIFEST).is_file():
        raise RunLogError(f"{str(path)!r} is not a run set: {MANIFEST} not found")
    locks = path / RUNS_DIR / LOCKS_DIR
    lock_path = locks / SET_LOCK
    try:
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW, 0o666)
    except OSError as err:
        raise RunLogError(f"cannot open the lock file {str(lock_path)!r}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        held, current = os.fstat(fd), os.stat(lock_path, follow_symlinks=False)
    except BlockingIOError:
        os.close(fd)
        if exclusive:
            raise RunLogError(f"run set {str(path)!r} is being written (a RunLogger, generate or install holds "
                              f"{str(lock_path)!r}); replace it once no writer runs") from None
        raise RunLogError(f"run set {str(path)!r} is being replaced by another writer (an overwrite holds "
                          f"{str(lock_path)!r}); try again once it is done") from None
    except OSError as err:
        os.close(fd)
        raise RunLogError(f"cannot lock {str(lock_path)!r}: {err.strerror or err}") from None
    if (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
        os.close(fd)
        raise RunLogError(f"run set {str(path)!r} was replaced by another writer meanwhile; try again")
    return fd


@contextlib.contextmanager
def runset_writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the shared lock of the run set at ``path`` for a writer of several runs (the run generator): an
    overwrite of the set (exclusive) is refused meanwhile, and the writer is refused while one runs."""
    lock = _lock_set(Path(path), exclusive=False)
    try:
        yield
    finally:
        _unlock(lock)


def _is_empty_dir(path: Path) -> bool:
    """True for a plain folder (not a link) with nothing in it."""
    if not _is_plain_dir(path):
        return False
    try:
        with os.scandir(path) as entries:
            return not any(True for _ in entries)
    except OSError as err:
        raise RunLogError(f"cannot read {str(path)!r}: {err.strerror or err}") from None


@contextlib.contextmanager
def runset_destination(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """The folder a writer of a run set at ``path`` writes into; one rule for every writer (generate, facts).

    - ``path`` absent or an empty folder: ``path`` itself (a new run set, resumable in place);
    - ``path`` a run set (a folder with a valid ``manifest.json`` of this format): ``path`` itself, to resume
      or add to it; with ``overwrite``, a fresh hidden sibling ``.<name>.<token>.tmp``, swapped in when the
      ``with`` block ends normally (:func:`_swap_in`), under the set's exclusive lock, held from the start:
      until the swap the old set stays whole; a writer of the old set meanwhile makes this fail at once, and one
      that comes later fails in its turn. An exception in the block removes the new folder and keeps the old set;
    - anything else (a folder holding other things, a file, a link): ``RunLogError`` before anything is created.
    """
    path = Path(path)
    _recover_interrupted_save(path)
    if not os.path.lexists(path) or _is_empty_dir(path):
        yield path
        return
    if not is_runset(path):
        check_replaceable(path)  # raises, naming what is there
    if not overwrite:
        yield path
        return
    absolute = Path(os.path.abspath(path))  # "." and ".." are renamed by their real names
    lock = _lock_set(absolute, exclusive=True)
    try:
        staging = _hidden_dir(absolute.parent, absolute.name, ".tmp")
        try:
            yield staging
            if not is_runset(staging):
                raise RunLogError(f"the replacement of {str(path)!r} holds no run set; the old set is kept")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _swap_in(staging, absolute)
    finally:
        _unlock(lock)


def _recover_interrupted_save(path: Path) -> None:
    """Finish a :meth:`RunSet.save` that stopped between its two renames, if that is what left ``path`` missing.

    ``save`` writes the new set to ``.<name>.<token>.tmp``, moves the old one to ``.<name>.<token>.old/<name>``,
    then renames the new one to ``path``. Only a stop between those renames leaves ``path`` missing with
    both folders of one token present; the new set was complete by then, so its rename is done now.
    """
    if not path.name or os.path.lexists(path):
        return
    prefix = f".{path.name}."
    try:
        with os.scandir(path.parent) as entries:
            aside = [entry.name for entry in entries if entry.name.startswith(prefix) and entry.name.endswith(".old")]
        for name in sorted(aside):
            token = name[len(prefix) : -len(".old")]
            old, new = path.parent / name, path.parent / f"{prefix}{token}.tmp"
            if _is_plain_dir(old / path.name) and _is_plain_dir(new) and (new / MANIFEST).is_file():
                os.replace(new, path)
                shutil.rmtree(old, ignore_errors=True)
                return
    except OSError:  # best effort: a concurrent save or no permission; the reader then reports the missing set
        return


def _is_plain_dir(path: Path) -> bool:
    """True for a folder that is not a symbolic link."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_runset(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder (not a link) holding a valid ``manifest.json`` of the run-set format (format
    name, supported version, the keys readers use with their types); a folder that merely has a file of that
    name is not one."""
    path = Path(path)
    if not _is_plain_dir(path):
        return False
    try:
        _check_manifest(path)
    except RunLogError:
        return False
    return True


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise ``RunLogError`` unless ``path`` may be replaced by a new run set: absent, an empty folder or a run set.

    Overwriting never deletes anything else (a user's folder, a file, a link).
    """
    path = Path(path)
    if not os.path.lexists(path) or is_runset(path):
        return
    if _is_plain_dir(path):
        if _is_empty_dir(path):
            return
        raise RunLogError(
            f"{str(path)!r} is not a run set (no valid {MANIFEST} of format {FORMAT_NAME!r}) and not empty; "
            "refusing to replace it or write a run set into it: choose another folder or delete it yourself"
        )
    kind = "a symbolic link" if os.path.islink(path) else "not a folder"
    raise RunLogError(f"{str(path)!r} is {kind}; refusing to replace it with a run set")


def _read_manifest(path: Path) -> dict:
    """Read and check ``path/manifest.json`` (see :func:`_check_manifest`), first finishing an interrupted save."""
    _recover_interrupted_save(path)
    return _check_manifest(path)


def _check_manifest(path: Path) -> dict:
    """Read and check ``path/manifest.json``: format name, version and the types of the keys readers use."""
    manifest_path = path / MANIFEST
    if not os.path.lexists(path):
        raise RunLogError(f"{str(path)!r} does not exist")
    if not os.path.lexists(manifest_path):
        raise RunLogError(f"{str(path)!r} is not a run set: {MANIFEST} not found")
    manifest = _read_json(manifest_path)
    if manifest.get("format") != FORMAT_NAME:
        raise RunLogError(f"{str(manifest_path)!r}: not a {FORMAT_NAME} manifest")
    version = manifest.get("version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise RunLogError(
            f"{str(manifest_path)!r}: format version {version!r} is not supported "
            f"(this simfluence reads version {FORMAT_VERSION})"
        )
    for key in ("n_pool", "pool_ids", "test_ids"):
        if key not in manifest:
            raise RunLogError(f"{str(manifest_path)!r}: missing key {key!r}")
    n_pool = manifest["n_pool"]
    if isinstance(n_pool, bool) or not isinstance(n_pool, int) or n_pool < 0:
        raise RunLogError(f"{str(manifest_path)!r}: n_pool must be an integer >= 0, got {n_pool!r}")
    for key in ("pool_ids", "test_ids"):
        if not isinstance(manifest[key], list):
            raise RunLogError(f"{str(manifest_path)!r}: {key} must be a list, got {type(manifest[key]).__name__}")
    if not isinstance(manifest.get("metadata") or {}, dict):
        raise RunLogError(f"{str(manifest_path)!r}: metadata must be a JSON object")
    return manifest


def _open_plain(path: Path, what: str = "file") -> int:
    """Open a regular file for reading without following a symbolic link; ``RunLogError`` for anything else.

    ``O_NONBLOCK`` keeps a FIFO planted in a run folder from blocking the reader; it changes nothing for
    regular files.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
    except FileNotFoundError:
        raise RunLogError(f"{str(path)!r} is missing") from None
    except OSError as err:
        if os.path.islink(path):
            raise RunLogError(f"{str(path)!r} is a symbolic link; run sets never follow links") from None
        raise RunLogError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode) or (_O_NOFOLLOW == 0 and os.path.islink(path)):
        os.close(fd)
        raise RunLogError(f"{str(path)!r} is not a regular {what}")
    return fd


def _read_json(path: Path) -> dict:
    """A JSON object from a regular file; every way it can be malformed is one ``RunLogError`` line."""
    fd = _open_plain(path)
    try:
        size = os.fstat(fd).st_size
        if size > _MAX_JSON_BYTES:
            raise RunLogError(f"{str(path)!r} holds {size} bytes, more than the {_MAX_JSON_BYTES} a JSON file may hold")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, too many digits in an int
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunLogError(f"{str(path)!r} is not valid JSON: {reason}") from None
    except RecursionError:
        raise RunLogError(f"{str(path)!r} is not valid JSON: nested too deeply") from None
    except OSError as err:
        raise RunLogError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        raise RunLogError(f"{str(path)!r}: expected a JSON object")
    return data


@dataclass(frozen=True)
class _RunFiles:
    """Where the arrays of one run live and how many elements of each ``run.json`` commits."""

    run_dir: Path
    n_steps: int
    n_entries: int
    n_logged: int
    n_test: int

    def count(self, key: str) -> tuple[int, ...]:
        """The committed shape of one array."""
        return {
            "batch_sizes": (self.n_steps,),
            "batch_ids": (self.n_entries,),
            "learning_rates": (self.n_steps,),
            "logged_steps": (self.n_logged,),
            "losses": (self.n_logged, self.n_test),
        }[key]


def _open_array(files: _RunFiles, key: str) -> tuple[int | None, tuple[int, ...]]:
    """Open one array file of a run after checking it holds the committed bytes: (fd or None if empty, shape).

    The size is checked against the file's real size before anything is allocated or mapped.
    """
    filename, dtype = _FILES[key]
    path = files.run_dir / filename
    shape = files.count(key)
    needed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for any count in run.json
    if needed == 0 and not os.path.lexists(path):
        return None, shape
    fd = _open_plain(path)
    info = os.fstat(fd)
    size = info.st_size
    if size < needed:
        os.close(fd)
        raise RunLogError(f"{str(path)!r} holds {size} bytes, run.json promises {needed} (file truncated?)")
    on_disk = getattr(info, "st_blocks", None)
    if needed >= _SPARSE_MIN_BYTES and on_disk is not None and on_disk * 512 * _SPARSE_RATIO < needed:
        os.close(fd)
        raise RunLogError(f"{str(path)!r} occupies {on_disk * 512} bytes on disk for the {needed} run.json promises "
                          "(a sparse file); refusing to read it")
    if needed == 0:
        os.close(fd)
        return None, shape
    return fd, shape


def _read_in_memory(files: _RunFiles, key: str) -> np.ndarray:
    """The committed prefix of one array file, read into a read-only in-memory array."""
    fd, shape = _open_array(files, key)
    dtype = _FILES[key][1]
    if fd is None:
        array = np.zeros(shape, dtype=dtype)
    else:
        with os.fdopen(fd, "rb") as handle:
            array = np.fromfile(handle, dtype=dtype, count=math.prod(shape)).reshape(shape)
    array.flags.writeable = False
    return array


def _map(files: _RunFiles, key: str) -> np.ndarray:
    """The committed prefix of one array file, memory-mapped read-only (no file stays open)."""
    fd, shape = _open_array(files, key)
    dtype = _FILES[key][1]
    if fd is None:
        array = np.zeros(shape, dtype=dtype)
        array.flags.writeable = False
        return array
    try:
        return map_readonly(fd, dtype, shape)
    except OSError as err:
        raise RunLogError(f"cannot map {str(files.run_dir / _FILES[key][0])!r}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _check_batch_sizes(files: _RunFiles, sizes: np.ndarray) -> None:
    """Every batch size in ``0..n_entries`` and their sum exactly ``n_entries``, without integer overflow.

    Checked in chunks (memory does not grow with ``n_steps``); a float sum per chunk rules out the int64
    wrap-around that could otherwise make a crafted file add up.
    """
    where = str(files.run_dir)
    total = 0
    for start in range(0, len(sizes), _CHECK_CHUNK):
        chunk = np.asarray(sizes[start : start + _CHECK_CHUNK])
        bad = (chunk < 0) | (chunk > files.n_entries)
        if bad.any():
            step = start + int(np.flatnonzero(bad)[0]) + 1
            raise RunLogError(
                f"{where!r}: step {step} has batch size {int(sizes[step - 1])} in batch_sizes.bin, outside "
                f"0..{files.n_entries} (the committed n_entries)"
            )
        if float(chunk.sum(dtype=np.float64)) > files.n_entries * (1 + 1e-9) + 1:
            break  # too large already; the int64 sum of this chunk might wrap
        total += int(chunk.sum())
        if total > files.n_entries:
            break
    if total != files.n_entries:
        raise RunLogError(f"{where!r}: batch sizes do not add up to {files.n_entries} entries")


def _offsets(files: _RunFiles) -> np.ndarray:
    """(n_steps + 1,) curriculum offsets from ``batch_sizes.bin``, checked (see :func:`_check_batch_sizes`)."""
    sizes = _read_in_memory(files, "batch_sizes")
    _check_batch_sizes(files, sizes)
    offsets = np.empty(len(sizes) + 1, dtype=np.int64)
    offsets[0] = 0
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def _read_run_arrays(files: _RunFiles) -> dict[str, Any]:
    """Read the arrays of one run (the committed prefixes); losses are mapped, the rest read into memory."""
    try:
        curriculum = Curriculum(_offsets(files), _read_in_memory(files, "batch_ids"))
    except CurriculumError as err:
        raise RunLogError(f"{str(files.run_dir)!r}: {err}") from None
    return {
        "curriculum": curriculum,
        "logged_steps": _read_in_memory(files, "logged_steps"),
        "losses": _map(files, "losses"),
        "learning_rates": _read_in_memory(files, "learning_rates"),
    }


def read_run(run_dir: str | os.PathLike, n_test: int) -> Run:
    """Read one run folder (only the counts committed in its ``run.json``), with ``n_test`` loss columns."""
    return _read_run(Path(run_dir), n_test, check_n_test=False)


def _read_run(run_dir: Path, n_test: int, check_n_test: bool) -> Run:
    """``read_run``; with ``check_n_test`` the run's own ``n_test`` must match the manifest's.

    Reads ``run.json``, checks every count against the real size of its file and checks the batch sizes;
    the other arrays are read on first use (see :class:`Run`).
    """
    if os.path.islink(run_dir):
        raise RunLogError(f"{str(run_dir)!r} is a symbolic link; run sets never follow links")
    if not _is_plain_dir(run_dir):
        raise RunLogError(f"{str(run_dir)!r} is not a run folder")
    info_path = run_dir / RUN_JSON
    if not os.path.lexists(info_path):
        raise RunLogError(f"{str(run_dir)!r}: {RUN_JSON} not found (not a run folder?)")
    info = _read_json(info_path)
    counts = {}
    for key in ("n_steps", "n_entries", "n_logged"):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RunLogError(f"{str(info_path)!r}: {key} must be an integer >= 0, got {_short(value)}")
        counts[key] = value
    n_steps, n_entries, n_logged = counts["n_steps"], counts["n_entries"], counts["n_logged"]
    if check_n_test and "n_test" in info and info["n_test"] != n_test:
        raise RunLogError(
            f"{str(info_path)!r}: the run logged {_short(info['n_test'])} test losses per step, "
            f"the manifest lists {n_test} test ids"
        )
    if n_logged > n_steps + 1:
        raise RunLogError(
            f"{str(info_path)!r}: {n_logged} logged steps in a run of {n_steps} steps "
            "(losses are logged at distinct steps in 0..n_steps)"
        )
    try:
        name = check_run_name(info.get("name", run_dir.name))
    except RunLogError as err:
        raise RunLogError(f"{str(info_path)!r}: {err}") from None
    if name != run_dir.name:
        raise RunLogError(f"{str(info_path)!r}: run name {name!r} differs from its folder name {run_dir.name!r}")
    metadata = info.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise RunLogError(f"{str(info_path)!r}: metadata must be a JSON object, got {type(metadata).__name__}")
    files = _RunFiles(run_dir, n_steps, n_entries, n_logged, n_test)
    for key in _FILES:
        fd, _ = _open_array(files, key)  # sizes and file types now, before any array is read
        if fd is not None:
            os.close(fd)
    _check_batch_sizes(files, _map(files, "batch_sizes"))  # mapped: nothing allocated for a huge claim
    return Run._on_disk(name, files, metadata, complete=info.get("status") == "complete")


def _short(value: Any) -> str:
    """``repr`` of a JSON value for a one-line message, cut to 60 characters."""
    if isinstance(value, int) and abs(value) >= 10**50:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _write_run(run_dir: Path, run: Run, n_test: int) -> None:
    """Write a whole in-memory run in the on-disk layout (used by ``RunSet.save``)."""
    run_dir.mkdir(parents=True)
    arrays = {
        "batch_sizes": run.curriculum.batch_sizes,
        "batch_ids": run.curriculum.ids,
        "learning_rates": run.learning_rates,
        "logged_steps": run.logged_steps,
        "losses": run.losses,
    }
    for key, values in arrays.items():
        filename, dtype = _FILES[key]
        np.ascontiguousarray(values, dtype=dtype).tofile(run_dir / filename)
    atomic_write_json(run_dir / RUN_JSON, _run_info(run.name, run.complete, run.curriculum.n_steps,
                                                    len(run.curriculum.ids), len(run.logged_steps), n_test,
                                                    run.metadata))


def _run_info(name: str, complete: bool, n_steps: int, n_entries: int, n_logged: int, n_test: int,
              metadata: dict, status: str | None = None) -> dict:
    return {
        "name": name,
        "status": status or ("complete" if complete else "running"),
        "n_steps": n_steps,
        "n_entries": n_entries,
        "n_logged": n_logged,
        "n_test": n_test,
        "metadata": metadata,
    }


def run_status(runset_path: str | os.PathLike, name: str) -> str | None:
    """Status of a run in a run set folder: ``"complete"``, ``"running"``, ``"aborted"`` or None if absent."""
    info_path = Path(runset_path) / RUNS_DIR / check_run_name(name) / RUN_JSON
    if not info_path.is_file():
        return None
    return str(_read_json(info_path).get("status"))


class RunLogger:
    """Append one run to a run set folder, step by step, crash-safely.

    Use as a context manager::

        RunSet.create("runs/my-task", n_pool=500, test_ids=100)
        with RunLogger("runs/my-task", "run-000", metadata={"seed": 0, "optimizer": "sgd"}) as log:
            log.log_initial(test_losses)                  # step 0, before training
            for batch in batches:
                ...train on batch...
                log.log_step(batch, losses=test_losses, learning_rate=lr)

    After every call the committed counts in ``run.json`` are rewritten atomically, so whatever happens
    to the process, every completed step stays readable. Leaving the ``with`` block normally marks the
    run ``complete``; an exception marks it ``aborted`` (still readable, its prefix is kept).

    A logger holds an exclusive lock on its run name (``flock`` on ``runs/.locks/<name>.lock``) from its creation
    to ``close``; a second logger of the same run, in any process, fails with ``RunLogError`` whatever
    ``overwrite`` says. The lock dies with the process that holds it.

    Parameters
    ----------
    runset_path : folder made by :meth:`RunSet.create`.
    name : run name (letters, digits, ``._-``).
    metadata : JSON metadata of the run (seed, optimizer, learning-rate schedule, checkpoint paths ...).
    overwrite : replace an existing run of that name (otherwise an existing run is an error); a run that another
        logger is writing is never replaced.
    fsync : fsync data and counts after every step (survives power loss, slower).
    """

    def __init__(
        self,
        runset_path: str | os.PathLike,
        name: str,
        metadata: dict | None = None,
        overwrite: bool = False,
        fsync: bool = False,
    ) -> None:
        self.runset_path = Path(runset_path)
        self.name = check_run_name(name)
        self._closed = True  # until the files are open
        self._lock = self._set_lock = None
        _recover_interrupted_save(self.runset_path)
        if not (self.runset_path / MANIFEST).is_file():
            raise RunLogError(f"{str(self.runset_path)!r} is not a run set (create it with RunSet.create)")
        self.metadata = dict(metadata or {})
        _check_json(self.metadata, f"metadata of run {self.name!r}")  # fail now, not at the first step
        self.fsync = fsync
        self.run_dir = self.runset_path / RUNS_DIR / self.name
        self.n_steps = 0
        self.n_entries = 0
        self.n_logged = 0
        self._last_logged = -1
        self._set_lock = _lock_set(self.runset_path, exclusive=False)  # the set is not replaced while we write
        try:
            manifest = _read_manifest(self.runset_path)  # read under the lock: the manifest of the set we write into
            self.n_pool = manifest["n_pool"]
            self.pool_ids = manifest["pool_ids"]
            self.test_ids = manifest["test_ids"]
            self.n_test = len(self.test_ids)
            self._lock = _lock_run(self.run_dir)
        except BaseException:
            self._set_lock = _unlock(self._set_lock)
            raise
        self._pool_index: IdIndex | None = None
        try:
            if os.path.lexists(self.run_dir):
                if not overwrite:
                    raise RunLogError(f"run {self.name!r} already exists in {str(self.runset_path)!r}")
                _remove_tree(self.run_dir)
            # The run folder appears complete with its first run.json (readers skip hidden folders), so a crash
            # here never leaves a run folder that makes the run set unreadable.
            staging = _hidden_dir(self.run_dir.parent, self.name, ".tmp")
            for filename, _ in _FILES.values():
                (staging / filename).touch()
            atomic_write_json(staging / RUN_JSON, self._info("running"), fsync=self.fsync)
            try:
                os.replace(staging, self.run_dir)
            except OSError as err:  # something that is no logger made the folder meanwhile
                shutil.rmtree(staging, ignore_errors=True)
                raise RunLogError(f"cannot create run {self.name!r} in {str(self.runset_path)!r}: {err}") from None
            self._handles = {key: open(self.run_dir / filename, "ab") for key, (filename, _) in _FILES.items()}
        except BaseException:
            self._lock = _unlock(self._lock)
            self._set_lock = _unlock(self._set_lock)
            raise
        self._closed = False

    # -------------------------------------------------------------------------------------- logging
    @property
    def step(self) -> int:
        """Number of completed training steps (the step the next ``log_losses`` refers to)."""
        return self.n_steps

    def log_initial(self, losses: np.ndarray) -> None:
        """Log the test losses before training (step 0)."""
        if self.n_steps != 0:
            raise RunLogError(f"run {self.name!r}: initial losses must be logged before step 1")
        self.log_losses(losses)

    def log_step(
        self,
        batch: Iterable[int] | None = None,
        losses: np.ndarray | None = None,
        learning_rate: float | None = None,
        *,
        positions: Iterable[int] | None = None,
        ids: Iterable[Any] | None = None,
    ) -> int:
        """Record one training step: its batch, optionally the test losses after it.

        Give the batch as exactly one of ``positions`` (pool positions ``0..n_pool-1``, rows of the manifest's
        ``pool_ids``) or ``ids`` (the external pool ids listed in the manifest). ``batch`` (the first argument)
        means positions and is accepted only where positions cannot be mistaken for ids: the pool ids are the
        default ``0..n_pool-1`` (ids and positions coincide) or are not integers. Returns the step number
        (1 for the first call).
        """
        self._check_open()
        step = self.n_steps + 1
        ids = self._batch_positions(batch, positions, ids, step)
        lr = self._check_learning_rate(learning_rate, step)
        loss_row = None if losses is None else self._check_losses(losses, step)
        self._append("batch_ids", ids)
        self._append("batch_sizes", np.array([ids.size]))
        self._append("learning_rates", np.array([lr]))
        self.n_steps = step
        self.n_entries += ids.size
        if loss_row is not None:
            self._append_losses(loss_row)
        self._commit()
        return step

    def log_losses(self, losses: np.ndarray) -> None:
        """Log test losses at the current step (after the last ``log_step``; step 0 before any)."""
        self._check_open()
        row = self._check_losses(losses, self.n_steps)
        self._append_losses(row)
        self._commit()

    def close(self, status: str = "complete") -> None:
        """Flush, mark the run ``status``, close the files and release the run's lock (idempotent)."""
        if self._closed:
            return
        for handle in self._handles.values():
            handle.close()
        self._closed = True
        try:
            self._commit(status)
        finally:
            self._lock = _unlock(self._lock)
            self._set_lock = _unlock(self._set_lock)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("complete" if exc_type is None else "aborted")

    def __del__(self) -> None:  # a forgotten close must not leave open handles; status stays "running"
        if not getattr(self, "_closed", True):
            for handle in self._handles.values():
                handle.close()
            self._closed = True
            self._lock = _unlock(self._lock)
            self._set_lock = _unlock(self._set_lock)

    # -------------------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise RunLogError(f"run {self.name!r}: logger is closed")

    def _batch_positions(self, batch: Any, positions: Any, ids: Any, step: int) -> np.ndarray:
        """(n,) int64 pool positions of one step's batch, from exactly one of ``batch``, ``positions``, ``ids``."""
        given = [name for name, value in (("batch", batch), ("positions", positions), ("ids", ids))
                 if value is not None]
        if len(given) != 1:
            raise RunLogError(f"run {self.name!r}, step {step}: give the batch as one of positions=... or ids=..., "
                              f"got {' and '.join(given) or 'none'}")
        if ids is not None:
            if self._pool_index is None:
                self._pool_index = IdIndex(self.pool_ids, "pool")
            values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
            return np.asarray(self._pool_index.positions(values), dtype=np.int64).reshape(-1)
        if batch is not None:
            integer_ids = any(isinstance(value, int) for value in self.pool_ids)
            if integer_ids and self.pool_ids != list(range(self.n_pool)):
                raise RunLogError(
                    f"run {self.name!r}, step {step}: the run set has integer pool ids of its own, so a batch "
                    "could mean ids or positions; pass positions=... (0..n_pool-1) or ids=... (its pool ids)"
                )
            positions = batch
        values = np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions)
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise RunLogError(f"run {self.name!r}, step {step}: batch positions must be integers, got {values.dtype}")
        values = values.reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= self.n_pool):  # before the cast: no uint64 wrap
            bad = values[(values < 0) | (values >= self.n_pool)][0]
            raise RunLogError(f"run {self.name!r}, step {step}: pool position {bad} outside 0..{self.n_pool - 1}")
        return values.astype(np.int64)

    def _check_learning_rate(self, learning_rate: Any, step: int) -> float:
        """The learning rate as a float: finite and >= 0, or NaN for None (unknown)."""
        if learning_rate is None:
            return float("nan")
        problem = None
        if isinstance(learning_rate, (bool, np.bool_, str, bytes)):
            problem = "is not a number"
        else:
            try:
                lr = float(learning_rate)
            except (TypeError, ValueError):
                problem = "is not a number"
            else:
                if not np.isnan(lr) and not (np.isfinite(lr) and lr >= 0):
                    problem = "must be a finite number >= 0 (or None when unknown)"
        if problem:
            raise RunLogError(f"run {self.name!r}, step {step}: learning rate {learning_rate!r} {problem}")
        return lr

    def _check_losses(self, losses: np.ndarray, step: int) -> np.ndarray:
        try:
            given = np.asarray(losses)
            if given.dtype.kind not in "iuf":  # bool, str, complex, object ...
                given = given.astype(np.float64) if given.dtype.kind == "O" else None
        except (TypeError, ValueError, OverflowError):
            given = None
        if given is None:
            raise RunLogError(
                f"run {self.name!r}, step {step}: losses must be numbers, got {_short(losses)}"
            )
        row = given.astype(np.float64).reshape(-1)
        if row.shape != (self.n_test,):
            raise RunLogError(
                f"run {self.name!r}, step {step}: {row.size} losses for {self.n_test} test examples"
            )
        storable = np.isfinite(row) & (np.abs(row) <= FLOAT32_MAX)
        if not storable.all():
            bad = int(np.flatnonzero(~storable)[0])
            raise RunLogError(
                f"run {self.name!r}, step {step}: loss of test {self.test_ids[bad]!r} (column {bad}) is {row[bad]}"
                + (", beyond the float32 range losses are stored in" if np.isfinite(row[bad]) else "")
            )
        if step <= self._last_logged:
            raise RunLogError(f"run {self.name!r}: losses of step {step} already logged")
        return row

    def _append_losses(self, row: np.ndarray) -> None:
        self._append("logged_steps", np.array([self.n_steps]))
        self._append("losses", row)
        self.n_logged += 1
        self._last_logged = self.n_steps

    def _append(self, key: str, values: np.ndarray) -> None:
        handle = self._handles[key]
        handle.write(np.ascontiguousarray(values, dtype=_FILES[key][1]).tobytes())

    def _commit(self, status: str = "running") -> None:
        """Make everything appended so far visible: flush the data, then rewrite run.json atomically."""
        if not self._closed:
            for handle in self._handles.values():
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
        atomic_write_json(self.run_dir / RUN_JSON, self._info(status), fsync=self.fsync)

    def _info(self, status: str) -> dict:
        return _run_info(self.name, False, self.n_steps, self.n_entries, self.n_logged, self.n_test,
                         self.metadata, status=status)


# ----------------------------------------------------------------------------------------- moving runs
def run_file_names() -> list[str]:
    """The files of one run folder: ``run.json`` and the array files."""
    return [RUN_JSON, *(filename for filename, _ in _FILES.values())]


def export_run(runset_path: str | os.PathLike, name: str) -> dict[str, bytes]:
    """The files of a run as ``{file name: bytes}`` (to send a run trained on one machine to another).

    Read without following links, like every reader here; :func:`install_run` puts them into a run set.
    """
    run_dir = Path(runset_path) / RUNS_DIR / check_run_name(name)
    read_run(run_dir, n_test=0)  # a run folder, no links, counts within the files
    files = {}
    for filename in run_file_names():
        fd = _open_plain(run_dir / filename)
        with os.fdopen(fd, "rb") as handle:
            files[filename] = handle.read()
    return files


def install_run(runset_path: str | os.PathLike, name: str, files: dict[str, bytes],
                before_replace: Callable[[], None] | None = None) -> None:
    """Put a run exported by :func:`export_run` into the run set at ``runset_path``, atomically.

    The files are written to a hidden folder and read back as a run of this run set, with every check of
    :meth:`RunSet.load` (counts, sizes, batch ids, its number of test losses, and the per-run validation:
    finite losses, strictly increasing logged steps, learning rates >= 0), then renamed into place, replacing a
    run of that name; a reader sees the old run or the new one, never a mix. A run that fails a check changes
    nothing. Holds the run set's shared lock and the run's lock meanwhile, so a run that a :class:`RunLogger` is
    writing is never replaced. ``before_replace`` is called under those locks once the run has passed every check,
    right before it replaces the old one (the run generator replaces the run's checkpoints there).
    """
    runset_path = Path(runset_path)
    name = check_run_name(name)
    expected = set(run_file_names())
    if not isinstance(files, dict) or set(files) != expected:
        got = sorted(map(str, files)) if isinstance(files, dict) else type(files).__name__
        raise RunLogError(f"run {name!r}: expected the files {sorted(expected)}, got {got}")
    for filename, data in files.items():
        if not isinstance(data, (bytes, bytearray)):
            raise RunLogError(f"run {name!r}: the content of {filename} must be bytes, got {type(data).__name__}")
    _read_manifest(runset_path)  # a run set, before any lock file is made in it
    set_lock = _lock_set(runset_path, exclusive=False)
    try:
        manifest = _read_manifest(runset_path)
        run_dir = runset_path / RUNS_DIR / name
        lock = _lock_run(run_dir)
        try:
            holder = _hidden_dir(run_dir.parent, name, ".tmp")
            try:
                staging = holder / name
                staging.mkdir()
                for filename, data in files.items():
                    (staging / filename).write_bytes(data)
                run = _read_run(staging, len(manifest["test_ids"]), check_n_test=True)
                if run.curriculum.ids.size and int(run.curriculum.ids.max()) >= manifest["n_pool"]:
                    raise RunLogError(f"run {name!r} uses pool id {int(run.curriculum.ids.max())}, outside the "
                                      f"run set's 0..{manifest['n_pool'] - 1}")
                run.validate(manifest["n_pool"], len(manifest["test_ids"]), manifest["test_ids"])
                del run
                if before_replace is not None:
                    before_replace()
                if os.path.lexists(run_dir):
                    _remove_tree(run_dir)
                os.replace(staging, run_dir)
            finally:
                shutil.rmtree(holder, ignore_errors=True)
        finally:
            _unlock(lock)
    finally:
        _unlock(set_lock)
