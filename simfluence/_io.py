"""Atomic file writes shared by every module that saves something, and read-only file mappings.

A write goes to a temporary file in the destination folder, is flushed, then renamed over the target,
so a reader sees either the old file or the complete new one, never a half-written file.

:func:`map_readonly` maps a file prefix into memory without keeping a file descriptor open (``np.memmap``
keeps one per array), so a process can hold the arrays of many thousands of files under a small
``ulimit -n``.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np


def _umask_mode() -> int:
    """The mode a plain new file gets under the current umask (mkstemp would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Save arrays (and a JSON metadata dict under the key ``meta_json``) to an ``.npz`` file atomically.

    Only numeric and fixed-width string arrays are stored, so ``np.load(path, allow_pickle=False)`` reads it.
    """
    path = Path(path)
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in payload.items():
        if value.dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle")
    if meta is not None:
        payload["meta_json"] = np.array(json.dumps(meta, allow_nan=False))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.fchmod(fd, _umask_mode())
    os.close(fd)
    try:
        np.savez(tmp, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
    """Load an ``.npz`` written by :func:`atomic_savez`: (arrays, meta or None). Never unpickles."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta_json = arrays.pop("meta_json", None)
    meta = json.loads(str(meta_json)) if meta_json is not None else None
    return arrays, meta


# ------------------------------------------------------------------------------------------- mappings
def _libc_mmap() -> tuple[Any, Any] | None:
    """libc's ``mmap`` and ``munmap`` on 64-bit Linux and macOS, else None (then np.memmap is used)."""
    if sys.platform not in ("linux", "darwin") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        map_file, unmap = libc.mmap, libc.munmap
    except (OSError, AttributeError):
        return None
    map_file.restype = ctypes.c_void_p
    map_file.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    unmap.restype = ctypes.c_int
    unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return map_file, unmap


_LIBC_MMAP = _libc_mmap()
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """The base object of an array over a shared read-only mapping; unmaps when the last view is gone."""

    def __init__(self, address: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.__array_interface__ = {"data": (address, True), "shape": shape, "typestr": dtype.str, "version": 3}
        finalizer = weakref.finalize(self, _LIBC_MMAP[1], address, nbytes)
        finalizer.atexit = False  # at exit the OS unmaps; an early munmap could pull pages from under a reader


def map_readonly(fd: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array over the first ``prod(shape)`` elements of the open file ``fd``.

    The file must hold at least that many bytes and ``shape`` must not be empty of bytes (the caller
    checks both). The mapping holds no file descriptor, so ``fd`` may be closed right after; it stays
    valid while any view of the array exists. Where libc's ``mmap`` is not reachable (Windows), this is an
    ``np.memmap``, which keeps a descriptor.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if _LIBC_MMAP is None:
        with os.fdopen(os.dup(fd), "rb") as handle:
            return np.memmap(handle, dtype=dtype, mode="r", shape=shape)
    address = _LIBC_MMAP[0](None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    array = np.asarray(_Mapping(address, nbytes, dtype, tuple(shape)))
    array.flags.writeable = False
    return array
