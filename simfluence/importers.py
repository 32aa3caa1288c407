"""Importers: bring training logs from any framework into a :class:`~simfluence.runlog.RunSet`.

A training framework need not know simfluence: it only has to write two long tables,

* a *curriculum table*, columns ``run, step, example`` (+ optional ``lr`` or ``learning_rate``): one row per
  example in the batch of step ``step`` (steps counted from 1; an example seen twice in a batch is two rows),
  and the step's learning rate on each of its rows (a rate belongs to a step, which these rows already
  describe, so it needs no table of its own; without it the learning-rate-scaled simulators assume a
  constant rate),
* a *loss table*, columns ``run, step, test, loss``: the loss of test example ``test`` after step ``step``
  (step 0 = before training), at any subset of steps, but covering every test example at each logged step,

as CSV, JSON lines, JSON records or Parquet (or hand them over as pandas DataFrames). :func:`import_tables`
checks them, maps external ids to internal positions and builds (and optionally saves) a run set. Every
problem raises :class:`~simfluence.errors.ImportTableError` with one line naming the file, run, step and
id at fault.

The GPTDynamics data set (GPTfluence paper) stores loss trajectories per test example; its readers
:func:`read_gptdynamics_losses` / :func:`read_gptdynamics_curriculum` turn them into the tables above and
:func:`import_gptdynamics` imports one of its run folders directly.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError, ImportTableError, RunLogError
from simfluence.runlog import Run, RunSet, check_replaceable, check_run_name, natural_key

__all__ = [
    "import_gptdynamics",
    "import_tables",
    "read_gptdynamics_curriculum",
    "read_gptdynamics_losses",
]

TableLike = str | os.PathLike | pd.DataFrame

CURRICULUM_COLUMNS = ("run", "step", "example")
LOSS_COLUMNS = ("run", "step", "test", "loss")
LR_COLUMNS = ("lr", "learning_rate")
GPTDYNAMICS_LOSSES = "all_loss_trajectory.out"
GPTDYNAMICS_CURRICULUM = "train_samples_id.json"

_COMPRESSION = (".gz", ".bz2", ".xz", ".zip", ".zst")
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".parquet": "parquet", ".pq": "parquet"}
_CANONICAL_INT = r"-?(?:0|[1-9][0-9]{0,17})"  # ints that survive str -> int -> str unchanged, within int64
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# pandas < 3 parses floats only approximately unless asked; pandas 3 is exact and deprecates the option
_CSV_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
_ID_COLUMNS = ("run", "example", "test")
_NA_TEXTS = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")  # pandas' missing-value texts, for numbers
_INT64_MAX = int(np.iinfo(np.int64).max)
# a run may have up to max(this, 100 x its rows) steps (guards against step typos), and all runs together up to
# max(this, 100 x all curriculum rows): each step costs 16 bytes on disk, so a tiny table cannot write gigabytes
_MIN_STEP_LIMIT = 1_000_000


# ------------------------------------------------------------------------------------------- public API
def import_tables(
    curriculum: TableLike,
    losses: TableLike,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    metadata: dict | None = None,
    pool_ids: Sequence | None = None,
    test_ids: Sequence | None = None,
) -> RunSet:
    """Build a run set from a curriculum table and a loss table.

    Parameters
    ----------
    curriculum : path (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.json`` records, ``.parquet``; optionally
        compressed, e.g. ``.csv.gz``) or DataFrame with columns ``run, step, example`` and optionally ``lr`` or
        ``learning_rate`` (one value per step: rows of a step must agree, NaN = unknown). One row per batch
        entry, in batch order; steps start at 1. A run has ``n_steps`` = its largest step; steps without rows
        in between are empty batches.
    losses : path or DataFrame with columns ``run, step, test, loss``. Steps in ``0..n_steps`` of the run;
        at every logged step each test example has exactly one loss.
    out : if given, the run set is saved there (atomically: on any failure nothing is left at ``out``) and
        re-loaded from disk.
    overwrite : replace an existing run set at ``out``.
    metadata : free JSON metadata of the run set.
    pool_ids, test_ids : the external ids, in internal order. By default the unique ``example`` / ``test``
        values in *natural order*: integers numerically; strings by :func:`~simfluence.runlog.natural_key`, so
        embedded numbers compare as numbers (``t2`` before ``t10``); a column mixing both is read as strings.
        So column j of a run set exported with ids ``t0..t11`` is column j again after the import. Given ids
        must cover every value in the tables; unused pool ids are fine.

    Returns
    -------
    RunSet whose ``pool_ids`` / ``test_ids`` hold the external ids and whose runs are named ``str(run)``.

    Notes
    -----
    Run, example and test values may be integers or strings. CSV has no types: there a value is an integer
    exactly when it is written as one canonically (``7``, not ``007`` or ``7.0``), everything else is a
    string; a given ``pool_ids`` / ``test_ids`` of strings still matches integers read from CSV by their text.
    Losses are stored as float32 (the on-disk format), so finite values beyond float32 range are an error.
    A step without rows has no learning rate (NaN), and a run ends at its last step that has rows. Without
    learning rates, simulators with ``lr_scaled="auto"`` (``linear_step``, ``linear_mom``, ``linear_mom_log``)
    assume a constant rate, which can cost much accuracy under a decaying schedule: log them when you can.

    Typed formats (JSON, Parquet) keep their types: a boolean is never a loss, step or learning rate, and an
    integer and a string with the same text (``7`` and ``"7"``) in one id column are an error, never merged.
    Every step costs 16 bytes on disk whether or not it has rows or losses, so the runs together may have at
    most ``max(1,000,000, 100 x curriculum rows)`` steps (and one run ``max(1,000,000, 100 x its rows)``):
    a small table cannot write a large run set.

    Raises
    ------
    ImportTableError : a table is unreadable or malformed (the message names the file, run, step and id).
    RunLogError : ``out`` exists and ``overwrite`` is False (checked before anything is read).
    """
    _check_out(out, overwrite)
    return _import(
        _read_table(curriculum, "curriculum"), _read_table(losses, "loss"), out,
        overwrite=overwrite, metadata=metadata, pool_ids=pool_ids, test_ids=test_ids,
    )


def read_gptdynamics_losses(
    path_or_records: str | os.PathLike | Iterable[dict], run: Any = "run-0"
) -> pd.DataFrame:
    """Read GPTDynamics loss trajectories into a loss table for :func:`import_tables`.

    GPTDynamics (the data set of the GPTfluence paper) stores, per test example, one record
    ``{"id": ..., "loss_trajectory": [{"step": s, "loss": l}, ...]}``, one JSON object per line
    (``all_loss_trajectory.out``) or as one JSON list. Such a file carries no curriculum: combine the
    result with a curriculum table, e.g. ::

        losses = read_gptdynamics_losses("boolq-run/all_loss_trajectory.out", run="seed-1")
        batches = read_gptdynamics_curriculum("boolq-run/train_samples_id.json", run="seed-1")
        runset = import_tables(batches, losses, "runs/boolq")

    Several runs are imported together by concatenating their frames (``pd.concat``) with distinct runs.

    Parameters
    ----------
    path_or_records : the file (``.gz`` allowed) or an iterable of records.
    run : run of records without a ``"run"`` key.

    Returns
    -------
    DataFrame with columns ``run, test, step, loss``, one row per trajectory point, records in file order.
    """
    records, label = _gptdynamics_records(path_or_records)
    tests, runs, trajectories = [], [], []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "id" not in record or "loss_trajectory" not in record:
            raise ImportTableError(f"{label}: record {number} is not an object with 'id' and 'loss_trajectory'")
        trajectory = record["loss_trajectory"]
        if not isinstance(trajectory, list) or not all(isinstance(point, dict) for point in trajectory):
            raise ImportTableError(
                f"{label}: test {record['id']!r}: loss_trajectory must be a list of {{'step', 'loss'}} objects"
            )
        tests.append(record["id"])
        runs.append(record.get("run", run))
        trajectories.append(trajectory)
    lengths = np.array([len(trajectory) for trajectory in trajectories], dtype=np.int64)
    points = pd.DataFrame([point for trajectory in trajectories for point in trajectory], columns=["step", "loss"])
    return pd.DataFrame(
        {
            "run": np.repeat(np.array(runs, dtype=object), lengths),
            "test": np.repeat(np.array(tests, dtype=object), lengths),
            "step": points["step"].to_numpy(),
            "loss": points["loss"].to_numpy(),
        }
    )


def read_gptdynamics_curriculum(
    path_or_records: str | os.PathLike | Iterable[dict], run: Any = "run-0"
) -> pd.DataFrame:
    """Read a GPTDynamics ``train_samples_id.json`` into a curriculum table for :func:`import_tables`.

    The file holds one record ``{"step": s, "samples_id": [pool ids of the batch of step s]}`` per line
    (or one JSON list); step ``s`` is the step whose losses are logged at ``s`` in the loss trajectories.

    Parameters
    ----------
    path_or_records : the file (``.gz`` allowed) or an iterable of records.
    run : run of records without a ``"run"`` key.

    Returns
    -------
    DataFrame with columns ``run, step, example``, one row per batch entry, in file order.
    """
    records, label = _gptdynamics_records(path_or_records)
    steps, runs, batches = [], [], []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "step" not in record or "samples_id" not in record:
            raise ImportTableError(f"{label}: record {number} is not an object with 'step' and 'samples_id'")
        batch = record["samples_id"]
        batch = list(batch) if isinstance(batch, (list, tuple, np.ndarray)) else [batch]
        steps.append(record["step"])
        runs.append(record.get("run", run))
        batches.append(batch)
    lengths = np.array([len(batch) for batch in batches], dtype=np.int64)
    examples = pd.Series([example for batch in batches for example in batch], dtype=object)
    return pd.DataFrame(
        {
            "run": np.repeat(np.array(runs, dtype=object), lengths),
            "step": pd.Series(np.repeat(np.array(steps, dtype=object), lengths), dtype=object).infer_objects(),
            "example": examples.infer_objects(),
        }
    )


def import_gptdynamics(
    path_or_records: str | os.PathLike | Iterable[dict],
    curriculum: TableLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    run: Any = "run-0",
    overwrite: bool = False,
    metadata: dict | None = None,
    pool_ids: Sequence | None = None,
    test_ids: Sequence | None = None,
) -> RunSet:
    """Import one GPTDynamics run: its loss trajectories plus a curriculum.

    Parameters
    ----------
    path_or_records : a GPTDynamics run folder (holding ``all_loss_trajectory.out`` and, when ``curriculum``
        is None, ``train_samples_id.json``), a loss-trajectory file, or its records
        (see :func:`read_gptdynamics_losses`).
    curriculum : a curriculum table as for :func:`import_tables` (path or DataFrame); a table in the
        GPTDynamics shape (columns ``step, samples_id``) is accepted too. Required unless
        ``path_or_records`` is a run folder: loss-trajectory files carry no curriculum.
    run : run name of records (and curriculum rows) without a ``run`` key.
    out, overwrite, metadata, pool_ids, test_ids : as for :func:`import_tables`.
    """
    _check_out(out, overwrite)
    loss_source = path_or_records
    if isinstance(path_or_records, (str, os.PathLike)) and Path(path_or_records).is_dir():
        loss_source = Path(path_or_records) / GPTDYNAMICS_LOSSES
        if curriculum is None:
            curriculum = Path(path_or_records) / GPTDYNAMICS_CURRICULUM
    if curriculum is None:
        raise ImportTableError(
            "GPTDynamics loss trajectories carry no curriculum: pass curriculum= (a table with columns "
            "run, step, example) or a GPTDynamics run folder holding train_samples_id.json"
        )
    curriculum_table = _read_table(curriculum, "curriculum")
    columns = set(curriculum_table.frame.columns)
    if "example" not in columns and {"step", "samples_id"} <= columns:
        records = curriculum_table.frame.to_dict("records")
        curriculum_table.frame = read_gptdynamics_curriculum(records, run=run)
    elif "run" not in columns:
        curriculum_table.frame = curriculum_table.frame.assign(run=run)
    losses = read_gptdynamics_losses(loss_source, run=run)
    label = f"{str(loss_source)!r}" if isinstance(loss_source, (str, os.PathLike)) else "GPTDynamics records"
    return _import(
        curriculum_table, _Table(losses, label), out,
        overwrite=overwrite, metadata=metadata, pool_ids=pool_ids, test_ids=test_ids,
    )


# ------------------------------------------------------------------------------------------- reading
@dataclass
class _Table:
    """One input table with the label its errors start with and, once checked, each row's run and step."""

    frame: pd.DataFrame
    label: str
    runs: np.ndarray | None = None
    steps: np.ndarray | None = None

    def at(self, row: int) -> str:
        """'run 'a', step 3' for one row (raw values until the run and step columns are checked)."""
        run = self.runs[row] if self.runs is not None else self.frame["run"].iat[row]
        step = self.steps[row] if self.steps is not None else self.frame["step"].iat[row]
        return f"run {str(run)!r}, step {step}"

    def fail(self, message: str, row: int | None = None) -> NoReturn:
        where = f" (row {row + 1})" if row is not None else ""
        raise ImportTableError(f"{self.label}: {message}{where}")


def _check_out(out: str | os.PathLike | None, overwrite: bool) -> None:
    """Before anything is read: ``out`` must be free, or (with ``overwrite``) a run set or an empty folder."""
    if out is None or not os.path.lexists(out):
        return
    if not overwrite:
        raise RunLogError(f"{str(out)!r} already exists (pass overwrite=True to replace it)")
    check_replaceable(out)


def _table_format(path: Path) -> str:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    kind = _FORMATS.get(suffixes[-1]) if suffixes else None
    if kind is None:
        raise ImportTableError(
            f"{str(path)!r}: unknown table format; use .csv, .tsv, .jsonl, .ndjson, .json or .parquet "
            "(optionally compressed, e.g. .csv.gz)"
        )
    return kind


def _read_table(source: TableLike, kind: str) -> _Table:
    """Read a path or take a DataFrame, as a ``_Table`` labelled for error messages."""
    if isinstance(source, pd.DataFrame):
        return _Table(source, f"{kind} table")
    if not isinstance(source, (str, os.PathLike)):
        raise ImportTableError(f"{kind} table must be a path or a pandas DataFrame, got {type(source).__name__}")
    path = Path(source)
    label = f"{str(path)!r}"
    if not path.is_file():
        raise ImportTableError(f"{label}: {kind} file not found")
    table_format = _table_format(path)
    if table_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportTableError(
                f"{label}: reading Parquet needs pyarrow: pip install simfluence[parquet]"
            ) from None
    try:
        with warnings.catch_warnings():  # the command line prints one line per problem, not pandas' notes
            warnings.simplefilter("ignore")
            if table_format in ("csv", "tsv"):
                sep = "\t" if table_format == "tsv" else ","
                header = pd.read_csv(path, sep=sep, nrows=0).columns
                # Ids are text: "NA", "None", "null", "nan" are ids like any other; only an empty field is missing
                missing = {column: [""] if column in _ID_COLUMNS else list(_NA_TEXTS) for column in header}
                frame = pd.read_csv(path, sep=sep, dtype={column: str for column in _ID_COLUMNS},
                                    keep_default_na=False, na_values=missing, **_CSV_FLOATS)
                for column in ("example", "test"):
                    if column in frame.columns:
                        frame[column] = _canonical_ints(frame[column])
            elif table_format == "parquet":
                frame = pd.read_parquet(path, engine="pyarrow")
                for column in frame.columns:  # decode text now: a corrupt page fails here, as unreadable
                    if not pd.api.types.is_numeric_dtype(frame[column].dtype):
                        frame[column].to_numpy(dtype=object)
            elif table_format == "jsonl":
                frame = pd.read_json(path, lines=True, orient="records", dtype=False, precise_float=True)
            else:
                try:
                    frame = pd.read_json(path, orient="records", dtype=False, precise_float=True)
                except ValueError:  # JSON lines named .json
                    frame = pd.read_json(path, lines=True, orient="records", dtype=False, precise_float=True)
    except Exception as err:  # pandas, pyarrow and the decompressors raise many types for a corrupt file
        raise ImportTableError(f"{label}: cannot read as {table_format}: {_reason(err)}") from None
    return _Table(frame, label)


def _reason(err: BaseException) -> str:
    """First line of an exception's message (its type for an empty one or a RecursionError)."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _canonical_ints(column: pd.Series) -> pd.Series:
    """A text column as int64 when every value is a canonically written integer, else unchanged."""
    if column.isna().any() or len(column) == 0:
        return column
    if bool(column.str.fullmatch(_CANONICAL_INT).all()):
        return column.astype(np.int64)
    return column


def _gptdynamics_records(source: str | os.PathLike | Iterable[dict]) -> tuple[list, str]:
    """Records of a GPTDynamics file (JSON lines or one JSON list) or an iterable, and a label for errors."""
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, dict):
            source = [source]
        return list(source), "GPTDynamics records"
    path = Path(source)
    label = f"{str(path)!r}"
    if not path.is_file():
        raise ImportTableError(f"{label}: GPTDynamics file not found")
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:  # a truncated or corrupt .gz, too
        raise ImportTableError(f"{label}: cannot read: {_reason(err)}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except (ValueError, RecursionError) as err:  # also ints of too many digits, nesting too deep
            raise ImportTableError(f"{label}: not valid JSON: {_reason(err)}") from None
        if not isinstance(records, list):
            raise ImportTableError(f"{label}: expected a JSON list of records")
        return records, label
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError) as err:
                raise ImportTableError(f"{label}: line {number} is not valid JSON: {_reason(err)}") from None
    return records, label


# ------------------------------------------------------------------------------------------- columns
def _check_columns(table: _Table, required: Sequence[str]) -> None:
    missing = [column for column in required if column not in table.frame.columns]
    if missing:
        found = ", ".join(repr(str(column))[1:-1] for column in table.frame.columns) or "none"  # escaped: one line
        found = found if len(found) <= 200 else found[:197] + "..."
        table.fail(f"missing column {missing[0]!r} (columns found: {found})")


def _show(value: Any) -> str:
    """A cell value for a message: numpy scalars as plain Python values (``'x'``, ``1.5``, ``nan``)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _booleans(values: pd.Series) -> np.ndarray:
    """Mask of the boolean cells (JSON ``true``/``false``), which pandas would silently read as 1 and 0."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return np.ones(len(values), dtype=bool)
    if values.dtype != object:
        return np.zeros(len(values), dtype=bool)
    return values.map(lambda value: isinstance(value, (bool, np.bool_))).to_numpy(dtype=bool)


def _id_values(table: _Table, column: str) -> np.ndarray:
    """One id column as int64 (all integers) or an object array of str (strings, or a mix of both in which no
    integer and string have the same text: ``7`` and ``"7"`` are an error, never one id)."""
    values = table.frame[column]
    what = "run" if column == "run" else f"{column} id"
    where = (lambda row: "") if column == "run" else (lambda row: f"{table.at(row)}: ")
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = pd.Series(np.asarray(values, dtype=object), dtype=object)
    missing = values.isna().to_numpy()
    if missing.any():
        row = _first(missing)
        table.fail(f"{where(row)}missing {what}", row)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    if pd.api.types.is_bool_dtype(values.dtype):
        table.fail(f"{where(0)}{what} {_show(values.iat[0])} is a boolean; ids must be integers or strings", 0)
    if pd.api.types.is_integer_dtype(values.dtype):
        if pd.api.types.is_unsigned_integer_dtype(values.dtype) and int(values.max()) > _INT64_MAX:
            return _exact_ints(values)
        return values.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(values.dtype):
        numbers = values.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers)) | (np.abs(numbers) > 2.0**53)
        if bad.any():
            row = _first(bad)
            table.fail(f"{where(row)}{what} {_show(numbers[row])} is not an integer or a string", row)
        return numbers.astype(np.int64)
    inferred = pd.api.types.infer_dtype(values, skipna=False)
    if inferred == "string":
        return values.to_numpy(dtype=object)
    if inferred == "integer":
        try:
            return values.to_numpy(dtype=np.int64)
        except OverflowError:
            return _exact_ints(values)
    allowed = values.map(lambda v: isinstance(v, (str, int, np.integer)) and not isinstance(v, (bool, np.bool_)))
    ok = allowed.to_numpy(dtype=bool)
    if not ok.all():
        row = _first(~ok)
        value = values.iat[row]
        kind = type(value).__name__
        table.fail(f"{where(row)}{what} {_show(value)} has type {kind}; ids must be integers or strings", row)
    texts = values.astype(str)
    is_text = values.map(lambda value: isinstance(value, str)).to_numpy(dtype=bool)
    clashing = texts.isin(set(texts[~is_text])).to_numpy() & is_text  # "7" where 7 occurs too: not merged
    if clashing.any():
        row = _first(clashing)
        number_row = _first(~is_text & (texts == texts.iat[row]).to_numpy())
        table.fail(
            f"{where(row)}{what} {texts.iat[row]!r} (string) and {values.iat[number_row]} (integer) are different ids "
            f"written alike (the integer in row {number_row + 1}); write each id with one type", row,
        )
    return texts.to_numpy(dtype=object)


def _exact_ints(values: pd.Series) -> np.ndarray:
    """Integer ids beyond int64 (uint64 hashes, say) as an object array of Python ints: kept exactly, never
    wrapped around."""
    return np.array([int(value) for value in values], dtype=object)


def _numbers(
    table: _Table, column: str, what: str, allow_missing: bool, where: Callable[[int], str] | None = None
) -> np.ndarray:
    """A numeric column as float64; non-numeric values (and missing ones unless allowed) are errors.

    ``where(row)`` says where a bad value is (default: its run and step).
    """
    where = where or table.at
    values = table.frame[column]
    booleans = _booleans(values)
    if booleans.all():
        numbers = np.full(len(values), np.nan)
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    was_missing = values.isna().to_numpy()
    bad = (np.isnan(numbers) & ~was_missing) | booleans
    if not allow_missing:
        bad |= was_missing
    if bad.any():
        row = _first(bad)
        table.fail(f"{where(row)}: {what} {_show(values.iat[row])} is not a number", row)
    return numbers


def _check_runs_and_steps(table: _Table, first_step: int) -> None:
    """Set ``table.runs`` (str run names, checked) and ``table.steps`` (int64 >= first_step)."""
    runs = _id_values(table, "run")
    if runs.dtype != object:
        runs = runs.astype(str).astype(object)
    elif not all(isinstance(run, str) for run in pd.unique(runs)):  # integers beyond int64
        runs = np.array([str(run) for run in runs], dtype=object)
    for name in pd.unique(runs):
        try:
            check_run_name(name)
        except RunLogError as err:  # runs become folder names
            table.fail(str(err), next(row for row, run in enumerate(runs) if run == name))  # not ==: numpy
            # would compare as fixed-width text and drop trailing NULs
    table.runs = runs
    values = table.frame["step"]
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        if pd.api.types.is_unsigned_integer_dtype(values.dtype) and len(values) and int(values.max()) > _INT64_MAX:
            row = _first(values.to_numpy() > _INT64_MAX)
            table.fail(f"run {str(runs[row])!r}: step {values.iat[row]} is too large", row)
        steps = values.to_numpy(dtype=np.int64)
    else:
        booleans = _booleans(values)
        numbers = np.full(len(values), np.nan)
        if not booleans.all():
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers)) | (np.abs(numbers) > 2.0**53) | booleans
        if bad.any():
            row = _first(bad)
            problem = "missing" if pd.isna(values.iat[row]) else f"{_show(values.iat[row])} is not an integer"
            table.fail(f"run {str(runs[row])!r}: step {problem}", row)
        steps = numbers.astype(np.int64)
    if steps.size and steps.min() < first_step:
        row = _first(steps < first_step)
        rule = "steps start at 1 (step 0 is only for initial losses)" if first_step == 1 else "steps must be >= 0"
        table.fail(f"run {str(runs[row])!r}: step {int(steps[row])} is not allowed: {rule}", row)
    table.steps = steps


def _natural_id_key(value: int | str) -> tuple:
    """Natural order of ids: integers numerically, then strings with embedded numbers compared as numbers."""
    return (0, value, ()) if isinstance(value, int) else (1, 0, natural_key(value))


def _id_codes(table: _Table, column: str, given: Sequence | None, what: str) -> tuple[np.ndarray, list]:
    """Internal positions of one id column and the external ids in internal order."""
    values = _id_values(table, column)
    if given is None:
        if values.dtype != object:  # int64: numeric order
            codes, uniques = pd.factorize(values, sort=True)
            return codes.astype(np.int64), [v.item() for v in uniques]
        uniques = sorted(pd.unique(values), key=_natural_id_key)
        return pd.Index(uniques, dtype=object).get_indexer(values).astype(np.int64), uniques
    known = [v.item() if isinstance(v, np.generic) else v for v in given]
    index = pd.Index(known, dtype=object)
    if not index.is_unique:
        duplicate = index[index.duplicated()][0]
        raise ImportTableError(f"{what}_ids: id {duplicate!r} appears more than once")
    codes = index.get_indexer(values).astype(np.int64)
    if (codes < 0).any():  # CSV has no types: match "7" and 7 by their text when that is unambiguous
        text_index = pd.Index([str(v) for v in known], dtype=object)
        if text_index.is_unique:
            as_text = pd.Series(values).astype(str).to_numpy(dtype=object)
            codes = np.where(codes < 0, text_index.get_indexer(as_text), codes)
    if (codes < 0).any():
        row = _first(codes < 0)
        table.fail(f"{table.at(row)}: {column} {_show(values[row])} is not in {what}_ids", row)
    return codes, known


# ------------------------------------------------------------------------------------------- building
def _import(
    curriculum: _Table,
    losses: _Table,
    out: str | os.PathLike | None,
    *,
    overwrite: bool,
    metadata: dict | None,
    pool_ids: Sequence | None,
    test_ids: Sequence | None,
) -> RunSet:
    """Check both tables, build the runs, make (and optionally save) the run set."""
    try:
        json.dumps(metadata or {}, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ImportTableError(f"metadata is not JSON-serializable: {err}") from None
    _check_columns(curriculum, CURRICULUM_COLUMNS)
    _check_columns(losses, LOSS_COLUMNS)
    lr_columns = [column for column in LR_COLUMNS if column in curriculum.frame.columns]
    if len(lr_columns) > 1:
        curriculum.fail("has both 'lr' and 'learning_rate' columns; keep one")
    if len(curriculum.frame) == 0:
        curriculum.fail("has no rows (only a header?): there is no run to import")
    _check_runs_and_steps(curriculum, first_step=1)
    _check_runs_and_steps(losses, first_step=0)

    names = sorted(set(pd.unique(curriculum.runs)), key=natural_key)
    loss_names = set(pd.unique(losses.runs))
    without_losses = sorted(set(names) - loss_names, key=natural_key)
    if without_losses:
        losses.fail(f"run {without_losses[0]!r} has curriculum rows in {curriculum.label} but no losses")
    without_curriculum = sorted(loss_names - set(names), key=natural_key)
    if without_curriculum:
        curriculum.fail(f"run {without_curriculum[0]!r} has losses in {losses.label} but no curriculum rows")
    run_index = pd.Index(names, dtype=object)

    example_codes, pool = _id_codes(curriculum, "example", pool_ids, "pool")
    test_codes, tests = _id_codes(losses, "test", test_ids, "test")
    lrs = (
        _numbers(curriculum, lr_columns[0], lr_columns[0], allow_missing=True)
        if lr_columns else np.full(len(curriculum.frame), np.nan)
    )
    if np.isinf(lrs).any() or (lrs < 0).any():
        row = _first(np.isinf(lrs) | (lrs < 0))
        curriculum.fail(f"{curriculum.at(row)}: learning rate {lrs[row]} is not a finite number >= 0", row)

    def loss_at(row: int) -> str:
        return f"{losses.at(row)}, test {tests[test_codes[row]]!r}"

    loss_values = _numbers(losses, "loss", "loss", allow_missing=True, where=loss_at)
    bad = ~np.isfinite(loss_values) | (np.abs(loss_values) > _FLOAT32_MAX)
    if bad.any():
        row = _first(bad)
        kind = "beyond float32 range" if np.isfinite(loss_values[row]) else "missing or not finite"
        losses.fail(f"{loss_at(row)}: loss {loss_values[row]} is {kind}", row)

    batches = _curricula(curriculum, run_index.get_indexer(curriculum.runs), example_codes, lrs, names, len(pool))
    logs = _loss_logs(losses, run_index.get_indexer(losses.runs), test_codes, loss_values, names, tests)
    runs = []
    for name, (cur, learning_rates), (logged_steps, run_losses) in zip(names, batches, logs, strict=True):
        if len(logged_steps) and logged_steps[-1] > cur.n_steps:
            row = _first((losses.runs == name) & (losses.steps == logged_steps[-1]))
            losses.fail(
                f"run {name!r}: loss logged at step {int(logged_steps[-1])}, after the run's last step "
                f"{cur.n_steps} in {curriculum.label}", row,
            )
        runs.append(Run(name, cur, logged_steps, run_losses, learning_rates))
    try:
        runset = RunSet(runs, n_pool=len(pool), pool_ids=pool, test_ids=tests, metadata=metadata)
    except RunLogError as err:
        raise ImportTableError(f"{curriculum.label} / {losses.label}: {err}") from None
    if out is None:
        return runset
    runset.save(out, overwrite=overwrite)
    return RunSet.load(out)


def _curricula(
    table: _Table, run_codes: np.ndarray, example_codes: np.ndarray, lrs: np.ndarray, names: list[str], n_pool: int
) -> list[tuple[Curriculum, np.ndarray]]:
    """Per run: its curriculum (rows in file order within a step) and its learning rate per step."""
    order = np.lexsort((table.steps, run_codes))  # stable: batch order within a step is kept
    runs, steps, ids, rates = run_codes[order], table.steps[order], example_codes[order], lrs[order]
    group_start = np.flatnonzero(np.r_[True, (runs[1:] != runs[:-1]) | (steps[1:] != steps[:-1])])[: len(runs)]
    if len(group_start):
        low = np.fmin.reduceat(rates, group_start)
        high = np.fmax.reduceat(rates, group_start)
        conflict = low != high  # NaN only where a whole step is NaN, and NaN != NaN: mask those out
        conflict &= ~np.isnan(low)
        if conflict.any():
            start = group_start[_first(conflict)]
            table.fail(
                f"{table.at(order[start])}: rows disagree on the learning rate ({low[_first(conflict)]} vs "
                f"{high[_first(conflict)]})", int(order[start]),
            )
        step_rates = low
    else:
        step_rates = np.zeros(0)
    bounds = np.searchsorted(runs, np.arange(len(names) + 1))
    group_bounds = np.searchsorted(group_start, bounds)
    run_lengths = steps[bounds[1:] - 1]  # every run has rows: its largest step is its number of steps
    total_steps, total_limit = sum(map(int, run_lengths)), max(_MIN_STEP_LIMIT, 100 * len(steps))  # ints: no wrap
    if total_steps > total_limit:
        longest = int(np.argmax(run_lengths))
        table.fail(
            f"run {names[longest]!r}: step {int(run_lengths[longest])} makes {total_steps:,} steps in all "
            f"runs for only {len(steps):,} curriculum rows (at most {total_limit:,}); is the step column right?",
            int(order[bounds[longest + 1] - 1]),
        )
    out = []
    for index, name in enumerate(names):
        lo, hi = bounds[index], bounds[index + 1]
        run_steps = steps[lo:hi]
        n_steps = int(run_steps[-1])
        if n_steps > max(_MIN_STEP_LIMIT, 100 * (hi - lo)):
            table.fail(
                f"run {name!r}: step {n_steps} with only {hi - lo} rows; is the step column right?", int(order[hi - 1])
            )
        offsets = np.concatenate([[0], np.cumsum(np.bincount(run_steps, minlength=n_steps + 1)[1:])])
        try:
            cur = Curriculum(offsets, ids[lo:hi], n_pool=n_pool)
        except CurriculumError as err:  # cannot happen for checked codes; keep the message clear anyway
            table.fail(f"run {name!r}: {err}")
        learning_rates = np.full(n_steps, np.nan)
        groups = group_start[group_bounds[index] : group_bounds[index + 1]]
        learning_rates[steps[groups] - 1] = step_rates[group_bounds[index] : group_bounds[index + 1]]
        out.append((cur, learning_rates))
    return out


def _loss_logs(
    table: _Table, run_codes: np.ndarray, test_codes: np.ndarray, losses: np.ndarray, names: list[str], tests: list
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per run: logged steps (increasing) and the (n_logged, n_test) float32 loss matrix."""
    n_test = len(tests)
    order = np.lexsort((test_codes, table.steps, run_codes))
    runs, steps, test_sorted, values = run_codes[order], table.steps[order], test_codes[order], losses[order]
    same_group = (runs[1:] == runs[:-1]) & (steps[1:] == steps[:-1])
    duplicate = same_group & (test_sorted[1:] == test_sorted[:-1])
    if duplicate.any():
        row = int(order[_first(duplicate) + 1])
        table.fail(f"{table.at(row)}, test {tests[test_codes[row]]!r}: more than one loss", row)
    group_start = np.flatnonzero(np.r_[True, ~same_group]) if len(runs) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[group_start, len(runs)])
    short = sizes != n_test
    if short.any():
        group = _first(short)
        start = group_start[group]
        present = test_sorted[start : start + sizes[group]]
        missing = np.setdiff1d(np.arange(n_test), present)[0]
        row = int(order[start])
        table.fail(
            f"{table.at(row)}, test {tests[missing]!r}: no loss (a logged step needs the loss of every test example)"
        )
    bounds = np.searchsorted(runs, np.arange(len(names) + 1))
    out = []
    for index in range(len(names)):
        lo, hi = bounds[index], bounds[index + 1]
        out.append((steps[lo:hi:n_test].copy() if n_test else np.zeros(0, dtype=np.int64),
                    values[lo:hi].astype(np.float32).reshape(-1, n_test)))
    return out
