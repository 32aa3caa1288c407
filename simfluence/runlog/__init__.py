"""Training-run logs: the run-set format, in three parts behind one import path.

- :mod:`~simfluence.runlog.model`: :class:`Run` and :class:`RunSet` in memory (ids, checks of values, frames);
- :mod:`~simfluence.runlog.store`: the on-disk format (manifest, run folders, locks, atomic save and swap,
  recovery of an interrupted save, moving runs between machines), documented in ``runs/README.md``;
- :mod:`~simfluence.runlog.logger`: :class:`RunLogger`, which appends one run step by step, crash-safely, and
  :func:`install_run`.

Every name below is importable from ``simfluence.runlog``.
"""
from simfluence.runlog.logger import RunLogger, install_run
from simfluence.runlog.model import Run, RunSet, read_run
from simfluence.runlog.store import (
    FLOAT32_MAX,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCKS_DIR,
    MANIFEST,
    RUN_JSON,
    RUNS_DIR,
    SET_LOCK,
    check_replaceable,
    check_run_name,
    export_run,
    is_runset,
    natural_key,
    run_file_names,
    run_status,
    runset_destination,
    runset_writer_lock,
)

__all__ = [
    "FLOAT32_MAX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LOCKS_DIR",
    "MANIFEST",
    "RUNS_DIR",
    "RUN_JSON",
    "SET_LOCK",
    "Run",
    "RunLogger",
    "RunSet",
    "check_replaceable",
    "check_run_name",
    "export_run",
    "install_run",
    "is_runset",
    "natural_key",
    "read_run",
    "run_file_names",
    "run_status",
    "runset_destination",
    "runset_writer_lock",
]
