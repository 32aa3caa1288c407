"""Writers of single runs into an existing run set: :class:`RunLogger` (step by step, crash-safely) and
:func:`install_run` (a whole run exported elsewhere with :func:`~simfluence.runlog.store.export_run`).

Both hold the run set's shared lock and the run's exclusive lock while they write, so a run has one writer at a
time and a set is never replaced under a writer; the files they write are the layout of
:mod:`simfluence.runlog.store`.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from simfluence._io import atomic_write_json
from simfluence.errors import RunLogError
from simfluence.ids import IdIndex
from simfluence.runlog.model import _read_run
from simfluence.runlog.store import (
    _FILES,
    FLOAT32_MAX,
    MANIFEST,
    RUN_JSON,
    RUNS_DIR,
    _check_json,
    _hidden_dir,
    _lock_run,
    _lock_set,
    _read_manifest,
    _recover_interrupted_save,
    _remove_tree,
    _run_info,
    _short,
    _unlock,
    check_run_name,
    run_file_names,
)


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
