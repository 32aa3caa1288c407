"""Atomic file writes shared by every module that saves something.

A write goes to a temporary file in the destination folder, is flushed, then renamed over the target,
so a reader sees either the old file or the complete new one, never a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
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
