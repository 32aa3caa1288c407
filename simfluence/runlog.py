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
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simfluence._io import atomic_write_json
from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, RunLogError
from simfluence.ids import IdIndex

FORMAT_NAME = "simfluence-runset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RUNS_DIR = "runs"
RUN_JSON = "run.json"
FLOAT32_MAX = float(np.finfo(np.float32).max)

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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
    if not isinstance(name, str) or not _RUN_NAME.match(name):
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


@dataclass(eq=False)
class Run:
    """One logged training run.

    Attributes
    ----------
    name : run name (unique within its run set).
    curriculum : the batches of steps 1..n_steps (internal pool ids).
    logged_steps : (n_logged,) int64, strictly increasing steps in [0, n_steps] at which losses were logged.
    losses : (n_logged, n_test) float32 test losses at ``logged_steps`` (memory-mapped when loaded from disk).
    learning_rates : (n_steps,) float64 learning rate of each step, NaN where unknown.
    metadata : free JSON metadata (seed, optimizer, ...).
    complete : False for a run whose logger did not close (a readable prefix).
    """

    name: str
    curriculum: Curriculum
    logged_steps: np.ndarray
    losses: np.ndarray
    learning_rates: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    complete: bool = True

    def __post_init__(self) -> None:
        check_run_name(self.name)
        self.logged_steps = np.asarray(self.logged_steps, dtype=np.int64)
        self.losses = np.asarray(self.losses) if not isinstance(self.losses, np.memmap) else self.losses
        if self.learning_rates is None:
            self.learning_rates = np.full(self.curriculum.n_steps, np.nan)
        self.learning_rates = np.asarray(self.learning_rates, dtype=np.float64)

    @property
    def n_steps(self) -> int:
        return self.curriculum.n_steps

    @property
    def n_test(self) -> int:
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
        """Check ids, shapes, steps and finiteness; raise ``RunLogError`` naming the run/step/id at fault."""
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
            if steps[0] < 0 or steps[-1] > curriculum.n_steps:
                bad_step = int(steps[0] if steps[0] < 0 else steps[-1])
                raise RunLogError(f"{label}: losses logged at step {bad_step}, outside 0..{curriculum.n_steps}")
            if np.any(np.diff(steps) <= 0):
                i = int(np.flatnonzero(np.diff(steps) <= 0)[0])
                raise RunLogError(f"{label}: logged steps not strictly increasing at step {int(steps[i + 1])}")
        finite = np.isfinite(self.losses) & (np.abs(self.losses) <= FLOAT32_MAX)
        if not finite.all():
            row, col = (int(v[0]) for v in np.nonzero(~finite))
            test = test_ids[col] if test_ids is not None else col
            raise RunLogError(
                f"{label}: loss of test {test!r} at step {int(steps[row])} is {float(self.losses[row, col])}"
            )
        if self.learning_rates is not None and len(self.learning_rates) != curriculum.n_steps:
            raise RunLogError(
                f"{label}: {len(self.learning_rates)} learning rates for {curriculum.n_steps} steps"
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
        """A run set with a subset of the runs (by position, name or slice); shares the arrays."""
        chosen = self.runs[runs] if isinstance(runs, slice) else [self[key] for key in runs]
        return RunSet(chosen, self.n_pool, self.pool_ids, self.test_ids, self.metadata, self.path, validate=False)

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
        """Long table of every batch entry: columns ``run, step, example`` (external pool ids)."""
        pool_ids = np.asarray(self.pool_ids, dtype=object)
        frames = [
            pd.DataFrame(
                {
                    "run": run.name,
                    "step": run.curriculum.step_of_entries(),
                    "example": pool_ids[run.curriculum.ids],
                }
            )
            for run in self.runs
        ]
        if not frames:
            return pd.DataFrame({"run": [], "step": [], "example": []})
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
        interrupted save leaves no half-written run set.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise RunLogError(f"{str(path)!r} already exists (pass overwrite=True to replace it)")
        _check_json(self.metadata, "run set metadata")
        for run in self.runs:
            _check_json(run.metadata, f"metadata of run {run.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _hidden_dir(path.parent, path.name, ".tmp")
        old = None
        try:
            (tmp / RUNS_DIR).mkdir()
            atomic_write_json(tmp / MANIFEST, self.manifest())
            for run in self.runs:
                _write_run(tmp / RUNS_DIR / run.name, run, self.n_test)
            # Swap by renames only: ``path`` holds the old run set or the new one, never half of one (the old
            # one is deleted only once the new one is in place).
            if path.exists():
                old = _hidden_dir(path.parent, path.name, ".old")
                os.replace(path, old / path.name)
            os.replace(tmp, path)
        except BaseException:
            if old is not None and not path.exists():
                os.replace(old / path.name, path)
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, validate: bool = True, include_incomplete: bool = True) -> RunSet:
        """Open a run set folder; loss arrays are memory-mapped.

        Parameters
        ----------
        validate : check every run's ids, shapes, steps and finite losses (names the run/step/id at fault).
        include_incomplete : keep runs whose logger never closed (their committed prefix).
        """
        path = Path(path)
        manifest = _read_manifest(path)
        runs_dir = path / RUNS_DIR
        runs = []
        if runs_dir.is_dir():
            for run_dir in sorted(runs_dir.iterdir(), key=lambda p: natural_key(p.name)):
                if not run_dir.is_dir() or run_dir.name.startswith("."):
                    continue
                run = _read_run(run_dir, n_test=len(manifest["test_ids"]), check_n_test=True)
                if run.complete or include_incomplete:
                    runs.append(run)
        try:
            return cls(
                runs,
                n_pool=manifest["n_pool"],
                pool_ids=manifest["pool_ids"],
                test_ids=manifest["test_ids"],
                metadata=manifest.get("metadata") or {},
                path=path,
                validate=validate,
            )
        except RunLogError as err:
            raise RunLogError(f"{str(path)!r}: {err}") from None


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


def _remove_tree(path: Path) -> None:
    """Delete a folder by first renaming it to a hidden name, so an interrupted delete leaves no half folder."""
    trash = _hidden_dir(path.parent, path.name, ".old")
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(path: Path) -> dict:
    """Read and check ``path/manifest.json``: format name, version and the types of the keys readers use."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
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


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunLogError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RunLogError(f"{str(path)!r}: expected a JSON object")
    return data


def _read_array(run_dir: Path, key: str, count: int, n_cols: int | None = None) -> np.ndarray:
    """Memory-map the committed prefix of one append-only file of a run."""
    filename, dtype = _FILES[key]
    file = run_dir / filename
    shape = (count,) if n_cols is None else (count, n_cols)
    needed = int(np.prod(shape)) * dtype.itemsize
    if not file.is_file():
        if needed == 0:
            return np.zeros(shape, dtype=dtype)
        raise RunLogError(f"{str(file)!r} is missing")
    size = file.stat().st_size
    if size < needed:
        raise RunLogError(f"{str(file)!r} holds {size} bytes, run.json promises {needed} (file truncated?)")
    if needed == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=shape)


def read_run(run_dir: str | os.PathLike, n_test: int) -> Run:
    """Read one run folder (only the counts committed in its ``run.json``), with ``n_test`` loss columns."""
    return _read_run(Path(run_dir), n_test, check_n_test=False)


def _read_run(run_dir: Path, n_test: int, check_n_test: bool) -> Run:
    """``read_run``; with ``check_n_test`` the run's own ``n_test`` must match the manifest's."""
    info_path = run_dir / RUN_JSON
    if not info_path.is_file():
        raise RunLogError(f"{str(run_dir)!r}: {RUN_JSON} not found (not a run folder?)")
    info = _read_json(info_path)
    counts = {}
    for key in ("n_steps", "n_entries", "n_logged"):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RunLogError(f"{str(info_path)!r}: {key} must be an integer >= 0, got {value!r}")
        counts[key] = value
    n_steps, n_entries, n_logged = counts["n_steps"], counts["n_entries"], counts["n_logged"]
    if check_n_test and "n_test" in info and info["n_test"] != n_test:
        raise RunLogError(
            f"{str(info_path)!r}: the run logged {info['n_test']!r} test losses per step, "
            f"the manifest lists {n_test} test ids"
        )
    batch_sizes = np.asarray(_read_array(run_dir, "batch_sizes", n_steps))
    if np.any(batch_sizes < 0) or int(batch_sizes.sum()) != n_entries:
        raise RunLogError(f"{str(run_dir)!r}: batch sizes do not add up to {n_entries} entries")
    offsets = np.concatenate([[0], np.cumsum(batch_sizes)])
    ids = np.asarray(_read_array(run_dir, "batch_ids", n_entries))
    try:
        curriculum = Curriculum(offsets, ids)
    except CurriculumError as err:
        raise RunLogError(f"{str(run_dir)!r}: {err}") from None
    try:
        name = check_run_name(info.get("name", run_dir.name))
    except RunLogError as err:
        raise RunLogError(f"{str(info_path)!r}: {err}") from None
    return Run(
        name=name,
        curriculum=curriculum,
        logged_steps=np.asarray(_read_array(run_dir, "logged_steps", n_logged)),
        losses=_read_array(run_dir, "losses", n_logged, n_test),
        learning_rates=np.asarray(_read_array(run_dir, "learning_rates", n_steps)),
        metadata=info.get("metadata") or {},
        complete=info.get("status") == "complete",
    )


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

    Parameters
    ----------
    runset_path : folder made by :meth:`RunSet.create`.
    name : run name (letters, digits, ``._-``).
    metadata : JSON metadata of the run (seed, optimizer, learning-rate schedule, checkpoint paths ...).
    overwrite : replace an existing run of that name (otherwise an existing run is an error).
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
        if not (self.runset_path / MANIFEST).is_file():
            raise RunLogError(f"{str(self.runset_path)!r} is not a run set (create it with RunSet.create)")
        manifest = _read_manifest(self.runset_path)
        self.n_pool = manifest["n_pool"]
        self.test_ids = manifest["test_ids"]
        self.n_test = len(self.test_ids)
        self.metadata = dict(metadata or {})
        _check_json(self.metadata, f"metadata of run {self.name!r}")  # fail now, not at the first step
        self.fsync = fsync
        self.run_dir = self.runset_path / RUNS_DIR / self.name
        if self.run_dir.exists():
            if not overwrite:
                raise RunLogError(f"run {self.name!r} already exists in {str(self.runset_path)!r}")
            _remove_tree(self.run_dir)
        self.n_steps = 0
        self.n_entries = 0
        self.n_logged = 0
        self._last_logged = -1
        self._closed = True  # until the files are open
        # The run folder appears complete with its first run.json (readers skip hidden folders), so a crash
        # here never leaves a run folder that makes the run set unreadable.
        staging = _hidden_dir(self.run_dir.parent, self.name, ".tmp")
        for filename, _ in _FILES.values():
            (staging / filename).touch()
        atomic_write_json(staging / RUN_JSON, self._info("running"), fsync=self.fsync)
        os.replace(staging, self.run_dir)
        self._handles = {key: open(self.run_dir / filename, "ab") for key, (filename, _) in _FILES.items()}
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
        self, batch: Iterable[int], losses: np.ndarray | None = None, learning_rate: float | None = None
    ) -> int:
        """Record one training step: its batch (internal pool ids), optionally the test losses after it.

        Returns the step number (1 for the first call).
        """
        self._check_open()
        ids = np.asarray(list(batch) if not isinstance(batch, np.ndarray) else batch)
        step = self.n_steps + 1
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise RunLogError(f"run {self.name!r}, step {step}: batch ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_pool):
            bad = int(ids[(ids < 0) | (ids >= self.n_pool)][0])
            raise RunLogError(f"run {self.name!r}, step {step}: pool id {bad} outside 0..{self.n_pool - 1}")
        try:
            lr = np.nan if learning_rate is None else float(learning_rate)
        except (TypeError, ValueError):
            raise RunLogError(
                f"run {self.name!r}, step {step}: learning rate {learning_rate!r} is not a number"
            ) from None
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
        """Flush, mark the run ``status`` and close the files (idempotent)."""
        if self._closed:
            return
        for handle in self._handles.values():
            handle.close()
        self._closed = True
        self._commit(status)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("complete" if exc_type is None else "aborted")

    def __del__(self) -> None:  # a forgotten close must not leave open handles; status stays "running"
        if not getattr(self, "_closed", True):
            for handle in self._handles.values():
                handle.close()
            self._closed = True

    # -------------------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise RunLogError(f"run {self.name!r}: logger is closed")

    def _check_losses(self, losses: np.ndarray, step: int) -> np.ndarray:
        row = np.asarray(losses, dtype=np.float64).reshape(-1)
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
