"""The on-disk format of a run set: paths, manifest, run folders, locks, atomic writes and reads.

Everything here touches the disk; the in-memory model (:class:`~simfluence.runlog.model.Run`,
:class:`~simfluence.runlog.model.RunSet`) calls into it and this module knows no class of it. The layout is
versioned and documented in ``runs/README.md``; in short::

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

A writer of a run holds an exclusive lock on it (``RUNSET/runs/.locks/<name>.lock``) and a shared lock on the whole
set (``RUNSET/runs/.locks/.runset.lock``), which a replacement of the set (``RunSet.save``,
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: writers take no lock
    fcntl = None

from simfluence._io import atomic_write_json, map_readonly
from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, RunLogError

if TYPE_CHECKING:
    from simfluence.runlog.model import Run

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
        with built_aside(absolute) as staging:
            yield staging
            if not is_runset(staging):
                raise RunLogError(f"the replacement of {str(path)!r} holds no run set; the old set is kept")
    finally:
        _unlock(lock)


@contextlib.contextmanager
def built_aside(path: Path) -> Iterator[Path]:
    """A fresh hidden sibling folder of ``path`` to build a run set in: swapped in for ``path``
    (:func:`_swap_in`) when the ``with`` block ends normally, removed when it raises."""
    staging = _hidden_dir(path.parent, path.name, ".tmp")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, path)


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


def _read_run_folder(run_dir: Path, n_test: int, check_n_test: bool) -> tuple[str, _RunFiles, dict, bool]:
    """Check one run folder: ``(name, files, metadata, complete)``, with ``n_test`` loss columns; with
    ``check_n_test`` the run's own ``n_test`` must match the manifest's.

    Reads ``run.json``, checks every count against the real size of its file and checks the batch sizes;
    the other arrays are read on first use (see :class:`~simfluence.runlog.model.Run`).
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
    return name, files, metadata, info.get("status") == "complete"


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


# ----------------------------------------------------------------------------------------- moving runs
def run_file_names() -> list[str]:
    """The files of one run folder: ``run.json`` and the array files."""
    return [RUN_JSON, *(filename for filename, _ in _FILES.values())]


def export_run(runset_path: str | os.PathLike, name: str) -> dict[str, bytes]:
    """The files of a run as ``{file name: bytes}`` (to send a run trained on one machine to another).

    Read without following links, like every reader here; :func:`install_run` puts them into a run set.
    """
    run_dir = Path(runset_path) / RUNS_DIR / check_run_name(name)
    _read_run_folder(run_dir, n_test=0, check_n_test=False)  # a run folder, no links, counts within the files
    files = {}
    for filename in run_file_names():
        fd = _open_plain(run_dir / filename)
        with os.fdopen(fd, "rb") as handle:
            files[filename] = handle.read()
    return files
