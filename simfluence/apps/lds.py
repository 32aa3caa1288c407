"""Linear datamodeling score (LDS): every method's counterfactual predictions against real retraining.

For several held-out base runs, draw many random edits of each base curriculum (:func:`lds_draws`: remove
p% of the examples it used, MAGIC's protocol; move k random examples' occurrences to the last or first
steps; keep a random half, datamodels' protocol), retrain every draw for real with the base run's task,
initial weights and run seed, and ask each method to predict the same draws. Per (method, protocol), for
each test example, the Spearman correlation over draws between the predicted and the real change of its
final loss (both against the unedited base curriculum: the simulated base for predictions, the retrained
base for reality) is averaged over test examples and base runs
(:func:`~simfluence.metrics.lds_scores`); a bootstrap over
draws gives its 95% interval. Sign agreement of the mean change over test examples and |predicted| /
|actual| say whether the predictions also get the direction and the size right.

Before any draw is retrained, what each base run records (optimizer, weight decay, clipping, init seed) is
compared with the task, and each unedited base is retrained and compared with its log
(:func:`~simfluence.task.check_replay`): a task that does not reproduce the logged runs stops the LDS with one
error, since every "real" change would be measured on another model.

The retrained runs go to one run-set folder per base run (``out / <base run name>``, the unedited base as
``base``, draw d of a protocol as ``<protocol>-<d>``), so running again on the same folder trains only
what is missing. ``out / lds-state.json`` records the fingerprint of the task that retrained them
(:func:`~simfluence.task.task_fingerprint`) and the sha256 of every file of every finished run: a second call
with another task, or on a run whose files were edited since, is refused with one line saying what differs.
:func:`write_lds_report` writes report.md, lds.json and one predicted-vs-actual plot per protocol.

The score itself, and its conventions for degenerate cases (a method whose predictions never vary has an
undefined LDS), live in :mod:`simfluence.metrics.lds`; this module draws, retrains, predicts and reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from simfluence._io import atomic_write_bytes, atomic_write_json
from simfluence.counterfactual import move_all
from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError, TaskError, UnknownIdError
from simfluence.evaluation import complete_positions, split_runs
from simfluence.methods import METHODS
from simfluence.metrics import lds_scores
from simfluence.runlog import RUNS_DIR, RunSet, run_file_names, run_status
from simfluence.simulators import Simulator
from simfluence.simulators.base import clone, is_per_base

if TYPE_CHECKING:
    from simfluence.task import Task

__all__ = ["DEFAULT_DRAWS", "DEFAULT_MOVED", "DEFAULT_PROTOCOLS", "LDSResult", "describe_protocol",
           "format_lds_table", "lds_draws", "lds_json", "lds_scores", "run_lds", "write_lds_report"]

DEFAULT_PROTOCOLS = ("remove-1", "remove-5", "remove-10", "move-end", "half")
DEFAULT_DRAWS = 40
"""Draws per protocol and base run unless told otherwise (the field uses >= 40)."""
DEFAULT_MOVED = 8
"""Examples moved per draw by the move protocols unless told otherwise (``k``)."""
_REMOVE = re.compile(r"remove-(\d+(?:\.\d+)?)")
_SUBSET = re.compile(r"subset-(\d+(?:\.\d+)?)")
BASE_NAME = "base"
STATE_FILE = "lds-state.json"  # in the folder of the retrained runs: the task's fingerprint, the runs' checksums
STATE_FORMAT = "simfluence-lds-state"
TABLE_COLUMNS = ("method", "protocol", "lds", "lds_low", "lds_high", "sign_agreement", "magnitude_ratio",
                 "n_draws", "n_bases", "seconds")


def describe_protocol(protocol: str, k: int = DEFAULT_MOVED) -> str:
    """One line saying what a protocol's draws are; an unknown protocol is a ``SimfluenceError``."""
    removed = _REMOVE.fullmatch(protocol)
    if removed:
        percent = float(removed.group(1))
        if not 0.0 < percent < 100.0:
            raise SimfluenceError(f"protocol {protocol!r}: the percentage removed must lie in (0, 100)")
        return f"remove {percent:g}% of the examples the base run used (every occurrence)"
    if protocol == "move-end":
        return f"move every occurrence of {k} random examples of the base run to its last steps (batch sizes kept)"
    if protocol == "move-start":
        return f"move every occurrence of {k} random examples of the base run to its first steps (batch sizes kept)"
    if protocol == "half":
        return "keep a random half of the examples the base run used"
    subset = _SUBSET.fullmatch(protocol)
    if subset:
        percent = float(subset.group(1))
        if not 0.0 < percent <= 100.0:
            raise SimfluenceError(f"protocol {protocol!r}: the percentage of the pool must lie in (0, 100]")
        return (f"train on a random {percent:g}% of the whole pool in shuffled epochs, cut into the base run's "
                "batch sizes (TRAK's protocol at subset-50)")
    raise SimfluenceError(f"unknown LDS protocol {protocol!r}; choose from remove-P (P a percentage, e.g. "
                          "remove-1, remove-5, remove-10), move-end, move-start, half, subset-P (e.g. subset-50)")


def lds_draws(
    base: Curriculum,
    protocol: str,
    n_draws: int,
    seed: int = 0,
    n_pool: int | None = None,
    k: int = DEFAULT_MOVED,
) -> list[Curriculum]:
    """Random edits of a base curriculum under one LDS protocol.

    Draw ``d`` depends only on ``(seed, protocol, d)``, so asking for more draws keeps the first ones (and
    a resumed retraining finds them).

    Parameters
    ----------
    base : the base run's curriculum (pool positions).
    protocol : ``remove-P`` (remove ``round(P% x n_used)`` of the ``n_used`` distinct examples the base
        used, at least one, with all their occurrences), ``move-end`` / ``move-start`` (every occurrence of
        ``k`` random used examples goes, as one block, to the last / first slots of the curriculum; every
        batch keeps its size, the other entries keep their order: :func:`~simfluence.counterfactual.move_all`),
        ``half`` (keep ``n_used // 2`` random used examples, every occurrence; the others' batch slots are
        dropped), ``subset-P`` (TRAK's: ``round(P% x n_pool)`` random examples of the *whole* pool, used or not
        by the base, in shuffled epochs cut into the base's batch sizes; ``subset-50`` is TRAK's alpha = 0.5).
    n_draws : number of draws.
    seed : seed of the draws.
    n_pool : pool size the draws are over (default ``base.n_pool``); must agree with it where both are known.
    k : examples moved per draw (move protocols).

    Returns
    -------
    draws : ``n_draws`` curricula with the base's number of steps, over ``n_pool`` pool ids.

    Raises
    ------
    SimfluenceError : unknown protocol, ``n_draws < 1``, or the base uses too few examples for the edit.
    """
    describe_protocol(protocol, k)
    if n_draws < 1:
        raise SimfluenceError(f"n_draws must be >= 1, got {n_draws}")
    if n_pool is None:
        n_pool = base.n_pool
    elif base.n_pool is not None and base.n_pool != n_pool:
        raise SimfluenceError(f"the base curriculum is over {base.n_pool} pool ids, not n_pool = {n_pool}")
    if base.n_pool != n_pool:
        base = Curriculum(base.offsets, base.ids, n_pool)
    used = np.unique(base.ids)
    removed, subset = _REMOVE.fullmatch(protocol), _SUBSET.fullmatch(protocol)
    if subset:
        if n_pool is None:
            raise SimfluenceError(f"protocol {protocol!r} draws from the whole pool: pass n_pool")
        used = np.arange(n_pool)
        count = max(1, round(float(subset.group(1)) / 100.0 * n_pool))
    elif removed:
        count = max(1, round(float(removed.group(1)) / 100.0 * used.size))
        if count >= used.size:
            raise SimfluenceError(f"protocol {protocol!r} would remove all {used.size} examples the base run used")
    elif protocol == "half":
        count = used.size // 2
        if count < 1:
            raise SimfluenceError(f"protocol 'half' needs a base run that used >= 2 examples, it used {used.size}")
    else:
        count = k
        if not 1 <= k <= used.size:
            raise SimfluenceError(f"protocol {protocol!r} moves k = {k} examples; the base run used {used.size}")
    draws = []
    for draw in range(n_draws):
        rng = np.random.default_rng([int(seed), zlib.crc32(protocol.encode()), draw])
        chosen = rng.choice(used, size=count, replace=False)
        if subset:
            draws.append(_subset_curriculum(base, chosen, rng))
        elif removed:
            draws.append(base.remove(chosen))
        elif protocol == "half":
            draws.append(base.keep_only(chosen))
        else:
            draws.append(move_all(base, chosen, base.n_steps if protocol == "move-end" else 1))
    return draws


def _subset_curriculum(base: Curriculum, chosen: np.ndarray, rng: np.random.Generator) -> Curriculum:
    """Shuffled epochs over ``chosen`` pool positions, cut into the batch sizes of ``base``."""
    n_epochs = -(-base.n_entries // max(chosen.size, 1))
    order = np.concatenate([rng.permutation(chosen) for _ in range(max(n_epochs, 1))])[:base.n_entries]
    return Curriculum(np.asarray(base.offsets), order.astype(np.int64), base.n_pool)


# ----------------------------------------------------------------------------------------------- running
@dataclass
class LDSResult:
    """Result of :func:`run_lds`.

    Attributes
    ----------
    table : one row per (method, protocol): ``method, protocol, lds, lds_low, lds_high, sign_agreement,
        magnitude_ratio, n_draws, n_bases, seconds`` (``seconds``: wall time to fit the method and predict
        every draw of every protocol and base run; the same on each of the method's rows).
    predicted : {method: {protocol: (n_bases, n_draws, n_test) predicted change of the final loss}}.
    actual : {protocol: (n_bases, n_draws, n_test) real change of the final loss (retrained draw - retrained
        base)}.
    per_base : one row per (method, protocol, base): ``method, protocol, base, lds``.
    bases : names of the base runs, in the order of axis 0 of the change arrays.
    train_runs : names of the runs the methods (other than per-base ones) were fitted on.
    test_ids : external test ids (axis 2 of the change arrays).
    reproduction : {base: largest |retrained base - logged base| loss} (0 when retraining is deterministic).
    n_trained : runs trained by this call (0 when every draw was already retrained in ``out``).
    settings : n_draws, protocols, seed, k, n_boot, per-base methods, the folder of the retrained runs.
    """

    table: pd.DataFrame
    predicted: dict[str, dict[str, np.ndarray]]
    actual: dict[str, np.ndarray]
    per_base: pd.DataFrame
    bases: list[str]
    train_runs: list[str]
    test_ids: list
    reproduction: dict[str, float] = field(default_factory=dict)
    n_trained: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def base_reproduction(self) -> float:
        """Largest |retrained base - logged base| loss over the base runs."""
        return max(self.reproduction.values(), default=float("nan"))


def _choose_runs(runset: RunSet, base_runs: Sequence[int | str] | None, train_runs: Sequence[int | str] | None,
                 holdout: int) -> tuple[list[int], list[int]]:
    """Positions of the training runs and of the base runs (disjoint)."""
    used, _ = complete_positions(runset)
    if train_runs is None:
        train, heldout = ([used[i] for i in part] for part in split_runs(len(used), holdout))
    else:
        train = [runset.position(run, "train_runs") for run in train_runs]
        heldout = [position for position in used if position not in train]
    if base_runs is None:
        if len(heldout) < 3:
            raise SimfluenceError(f"LDS averages over at least 3 held-out base runs; the run set holds out "
                                  f"{len(heldout)} (hold out more runs or name the base runs)")
        bases = heldout
    else:
        bases = [runset.position(run, "base_runs") for run in base_runs]
    if not bases:
        raise SimfluenceError("no base runs to score on")
    if len(set(bases)) != len(bases):
        raise SimfluenceError("a base run is named twice")
    leaked = [runset[b].name for b in bases if b in train]
    if leaked:
        raise SimfluenceError(f"base run {leaked[0]!r} is a training run; an LDS must be measured on held-out runs")
    if not train:
        raise SimfluenceError("no training runs to fit the methods on")
    return train, bases


def _final_changes(trajectories: np.ndarray) -> np.ndarray:
    """(1 + n, T + 1, n_test) trajectories, base first -> (n, n_test) change of the final loss against the base."""
    final = np.asarray(trajectories, dtype=np.float64)[:, -1]
    with np.errstate(invalid="ignore"):  # inf - inf of a diverged prediction is NaN, scored as such
        return final[1:] - final[:1]



# ------------------------------------------------------------------------------------------- retraining state
def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _RetrainingState:
    """``lds-state.json`` of a folder of retrained runs: which task trained them, and the checksums of their files.

    A second call on the folder must bring the same task (:func:`~simfluence.task.task_fingerprint`), and every
    run it reuses must still hold the bytes it was recorded with; else one error line, before any training.
    """

    def __init__(self, root: Path, parts: dict[str, str], fingerprint: str) -> None:
        self.root, self.path = root, root / STATE_FILE
        self.state: dict[str, Any] = {"format": STATE_FORMAT, "version": 1, "task_fingerprint": fingerprint,
                                      "task_parts": parts, "runs": {}}

    @classmethod
    def open(cls, root: Path, task: Task, init_seed: int, bases: Sequence[str]) -> _RetrainingState:
        """Read and check the state of ``root`` (nothing is written); a new state when there is none.

        Raises
        ------
        TaskError : the runs in ``root`` were retrained with another task (the message names the parts that
            differ), or ``root`` holds retrained runs but no state file.
        SimfluenceError : the state file is unreadable, or a file of a reused run does not match its checksum.
        """
        from simfluence.task import fingerprint_change, fingerprint_digest, task_fingerprint_parts

        parts = task_fingerprint_parts(task, init_seed)
        self = cls(root, parts, fingerprint_digest(parts))
        if not self.path.is_file():
            stale = [base for base in bases if (root / base / RUNS_DIR).is_dir()]
            if stale:
                raise TaskError(f"{str(root)!r} holds retrained runs of {stale[0]!r} but no {STATE_FILE} saying which "
                                "task trained them; pass a fresh --out (Python: out=) to retrain")
            return self
        try:
            recorded = json.loads(self.path.read_bytes())
            if recorded.get("format") != STATE_FORMAT or not isinstance(recorded.get("runs"), dict):
                raise ValueError("not an LDS state file")
        except (OSError, ValueError, AttributeError) as err:
            raise SimfluenceError(f"{str(self.path)!r} is not a readable LDS state file ({err}); pass a fresh --out "
                                  "(Python: out=)") from None
        if recorded.get("task_fingerprint") != self.state["task_fingerprint"]:
            changed = fingerprint_change(recorded.get("task_parts") or {}, parts) or "task"
            raise TaskError(f"{str(root)!r} holds runs retrained with another task (its {changed} differ); pass a "
                            "fresh --out (Python: out=) to retrain, or the task they were retrained with")
        self.state["runs"] = {base: runs for base, runs in recorded["runs"].items() if isinstance(runs, dict)}
        files = set(run_file_names())
        for base in bases:  # only the folders and files this call reads: a crafted entry names nothing else
            runs = self.state["runs"].get(base, {})
            for name, checksums in runs.items():
                if not isinstance(checksums, dict) or run_status(root / base, name) != "complete":
                    continue  # missing or unfinished: it is retrained
                for filename, digest in checksums.items():
                    if filename not in files:
                        continue
                    path = root / base / RUNS_DIR / name / filename
                    if not path.is_file() or _file_sha256(path) != digest:
                        raise SimfluenceError(f"{str(path)!r} does not match its checksum in {str(self.path)!r} "
                                              f"(edited or corrupted); delete {str(path.parent)!r} to retrain that "
                                              "run")
        return self

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.state)

    def record(self, base: str, names: Sequence[str]) -> None:
        """Record the checksums of the (complete) runs ``names`` of base ``base`` and save."""
        folder = self.root / base / RUNS_DIR
        self.state["runs"][base] = {name: {filename: _file_sha256(folder / name / filename)
                                           for filename in run_file_names()} for name in names}
        self.save()


def _seed_folders(base: str, n_seeds: int) -> list[str]:
    """Folders of a base run's retrainings, one per seed: ``<base>``, then ``<base>.seed-<s>``."""
    return [base] + [f"{base}.seed-{offset}" for offset in range(1, n_seeds)]


def run_lds(
    runset: RunSet,
    methods: Sequence[str] | Mapping[str, Simulator],
    base_runs: Sequence[int | str] | None = None,
    train_runs: Sequence[int | str] | None = None,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    n_draws: int = DEFAULT_DRAWS,
    task: Task | str | None = None,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    holdout: int = 8,
    k: int = DEFAULT_MOVED,
    n_boot: int = 1000,
    replay_tolerance: float | None = None,
    n_seeds: int = 1,
    tests: Sequence | None = None,
) -> LDSResult:
    """Score every method's counterfactual predictions against real retraining (LDS).

    Parameters
    ----------
    runset : the logged (or imported) runs.
    methods : method names of :data:`~simfluence.methods.METHODS` (a list or ``"a,b"``), or {name: simulator}.
        A fitted simulator is used as it is (it must not have seen the base runs); an unfitted one is fitted
        like a named method.
        Methods are fitted on the training runs, except per-base ones (:func:`~simfluence.simulators.is_per_base`, e.g.
        ``unrolled``), fitted on each base run in turn; methods that need a model get the ``task``.
    base_runs : base runs (positions or names); default every held-out run, at least 3.
    train_runs : runs to fit on (positions or names); default the complete runs but the last ``holdout``.
    protocols : protocols of :func:`lds_draws`.
    n_draws : draws per protocol and base run (>= 2; the field uses >= 40).
    task : the runs' task (a Task or ``file.py:function``); default the built-in workload the run set records.
    out : folder of the retrained runs, one run set per base run (``out / <base name>``); a second call on
        it trains only what is missing. Default: a temporary folder, removed afterwards.
    workers : training processes (see :func:`~simfluence.training.generate_runs`).
    seed : seed of the draws and of the bootstrap.
    progress : show progress bars.
    holdout : runs held out at the end of the run set when ``train_runs`` is not given.
    k : examples moved per draw (move protocols).
    n_boot : bootstrap resamples for the interval.
    replay_tolerance : largest accepted difference between a retrained unedited base run and its log, as a
        fraction of its mean loss (default :data:`~simfluence.task.REPLAY_TOLERANCE`; see
        :func:`~simfluence.task.check_replay`). Every base run is retrained and checked before any draw.
    n_seeds : retrain the base and every draw with this many seeds and average the real changes (TRAK's
        averaging over training randomness): seed s > 0 starts from ``make_model(init_seed + s)`` with run seed
        ``run seed + s``, into ``out / <base name>.seed-<s>``; 1 (default) retrains as the base was logged.
    tests : external test ids to score on (default: every test of the run set). Every method is fitted and scored
        on those only (:meth:`~simfluence.runlog.RunSet.select_tests`: per-test methods such as ``unrolled`` cost
        less), while the draws are retrained with the task's every probe, so the retrained runs in ``out`` are
        those of a call on all tests. Real changes are matched to predictions by test id, so ``runset`` may
        itself be restricted to some of the task's tests.

    Returns
    -------
    LDSResult

    Raises
    ------
    SimfluenceError : no methods, an unknown method or protocol, too few draws or base runs, a base run
        that is a training run, a retrained run in ``out`` whose files no longer match their checksums;
        ``TaskError`` when no task is known, it does not describe the base runs (recorded settings, schedule,
        or retraining a base run does not reproduce its log), or ``out`` holds runs retrained with another task.
    """
    from simfluence.task import check_recorded_settings, check_replay, check_schedule
    from simfluence.training import generate_runs, retraining_seeds
    from simfluence.workloads import task_for_runset

    protocols = list(dict.fromkeys(protocols))
    if not protocols:
        raise SimfluenceError("no LDS protocols given")
    for protocol in protocols:
        describe_protocol(protocol, k)
    if n_seeds < 1:
        raise SimfluenceError(f"n_seeds must be >= 1, got {n_seeds}")
    if n_draws < 2:
        raise SimfluenceError(f"an LDS correlates over draws: n_draws must be >= 2, got {n_draws}")
    simulators = _simulators(methods)
    task = task_for_runset(runset, task)  # before any work: a missing task is one error, nothing written
    scored = runset if tests is None else runset.select_tests(_test_columns(runset, tests))
    train, bases = _choose_runs(runset, base_runs, train_runs, holdout)
    base_list = [runset[position] for position in bases]
    seeds = {base.name: retraining_seeds(runset, task, base) for base in base_list}
    for base in base_list:
        check_schedule(task, base)
        check_recorded_settings(task, runset, base, seeds[base.name][0])

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(out) if out is not None else Path(scratch)
        init_seed = seeds[base_list[0].name][0]  # the run set's: the same for every base run
        folders = {base.name: _seed_folders(base.name, n_seeds) for base in base_list}
        state = _RetrainingState.open(root, task, init_seed, [name for names in folders.values() for name in names])
        draws = {base.name: [curriculum for protocol in protocols
                             for curriculum in lds_draws(base.curriculum, protocol, n_draws, seed, runset.n_pool, k)]
                 for base in base_list}
        predicted_changes, seconds = _predict(simulators, scored, train, bases, draws, task, progress)

        names = [BASE_NAME] + [f"{protocol}-{draw:03d}" for protocol in protocols for draw in range(n_draws)]
        n_trained = sum(run_status(root / folder, name) != "complete"
                        for base in base_list for folder in folders[base.name] for name in names)
        state.save()
        reproduction = {}
        for base in base_list:  # first each unedited base: a task that does not reproduce it stops here
            init_seed, run_seed = seeds[base.name]
            retrained = generate_runs(task, [base.curriculum], root / base.name, names=[BASE_NAME],
                                      init_seed=init_seed, seeds=[run_seed], workers=workers, progress=progress)
            replayed, _ = retrained[BASE_NAME].dense_losses()
            reproduction[base.name] = check_replay(runset, base, replayed, replay_tolerance)
        actual_changes = {}
        for base in base_list:
            init_seed, run_seed = seeds[base.name]
            changes = []
            for offset, folder in enumerate(folders[base.name]):
                retrained = generate_runs(task, [base.curriculum, *draws[base.name]], root / folder, names=names,
                                          init_seed=init_seed + offset, seeds=[run_seed + offset] * len(names),
                                          workers=workers, progress=progress)
                state.record(folder, names)
                columns = retrained.test_positions(scored.test_ids)  # the retrained runs log the task's probes
                finals = np.stack([np.asarray(retrained[name].losses[-1], dtype=np.float64)[columns]
                                   for name in names])
                changes.append(finals[1:] - finals[:1])
            actual_changes[base.name] = np.mean(changes, axis=0)

    n_test = scored.n_test
    shape = (len(bases), len(protocols), n_draws, n_test)
    actual = np.stack([actual_changes[base.name] for base in base_list]).reshape(shape)
    rows, per_base_rows, predicted_by_method = [], [], {}
    for name in simulators:
        predicted = np.stack([predicted_changes[name][base.name] for base in base_list]).reshape(shape)
        predicted_by_method[name] = {protocol: predicted[:, index] for index, protocol in enumerate(protocols)}
        for index, protocol in enumerate(protocols):
            scores = lds_scores(predicted[:, index], actual[:, index], n_boot=n_boot, seed=seed)
            rows.append({"method": name, "protocol": protocol, **scores, "n_draws": n_draws,
                         "n_bases": len(bases), "seconds": seconds[name]})
            for position, base in enumerate(base_list):
                one = lds_scores(predicted[position:position + 1, index], actual[position:position + 1, index],
                                 n_boot=0)
                per_base_rows.append({"method": name, "protocol": protocol, "base": base.name, "lds": one["lds"]})
    return LDSResult(
        table=pd.DataFrame(rows, columns=list(TABLE_COLUMNS)),
        predicted=predicted_by_method,
        actual={protocol: actual[:, index] for index, protocol in enumerate(protocols)},
        per_base=pd.DataFrame(per_base_rows, columns=["method", "protocol", "base", "lds"]),
        bases=[base.name for base in base_list],
        train_runs=[runset[position].name for position in train],
        test_ids=list(scored.test_ids),
        reproduction=reproduction,
        n_trained=int(n_trained),
        settings={"n_draws": n_draws, "protocols": protocols, "seed": seed, "k": k, "n_boot": n_boot,
                  "n_seeds": n_seeds, "n_tests": scored.n_test, "n_tests_logged": runset.n_test,
                  "per_base_methods": [name for name, sim in simulators.items() if _per_base(name, sim)],
                  "out": None if out is None else str(out)},
    )


def _test_columns(runset: RunSet, tests: Sequence) -> np.ndarray:
    """Loss columns of the external test ids ``tests`` (distinct, at least one; an unknown id is an error naming
    it)."""
    try:
        columns = runset.test_positions(tests)
    except UnknownIdError as err:
        raise SimfluenceError(f"tests: {err} (the run set has {runset.n_test} test ids)") from None
    if columns.size == 0:
        raise SimfluenceError("tests: no test ids to score on")
    if np.unique(columns).size != columns.size:
        raise SimfluenceError("tests: a test id is named twice")
    return columns


def _simulators(methods: Sequence[str] | Mapping[str, Simulator]) -> dict[str, Simulator | None]:
    """{name: given simulator, or None for a method built from the registry}; names checked."""
    if isinstance(methods, str):
        methods = [part.strip() for part in methods.split(",") if part.strip()]
    if isinstance(methods, Mapping):
        chosen = dict(methods)
        for name, simulator in chosen.items():
            if not isinstance(simulator, Simulator):
                raise SimfluenceError(f"methods[{name!r}] is a {type(simulator).__name__}, not a Simulator")
    else:
        chosen = {}
        for name in methods:
            if name not in METHODS:
                raise SimfluenceError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
            chosen[name] = None
    if not chosen:
        raise SimfluenceError("no methods to score")
    return chosen


def _per_base(name: str, given: Simulator | None) -> bool:
    """Whether to fit the method around each base run (never for a simulator given already fitted)."""
    if given is None:
        return METHODS[name].per_base
    return not getattr(given, "fitted_", False) and is_per_base(given)


def _predict(
    simulators: dict[str, Simulator | None],
    runset: RunSet,
    train: list[int],
    bases: list[int],
    draws: dict[str, list[Curriculum]],
    task: Task,
    progress: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Fit each method and predict every draw of every base: {method: {base: (n, n_test) changes}}, seconds."""
    changes: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name, given in tqdm(simulators.items(), desc="fit + predict", disable=not progress, leave=False):
        start = time.perf_counter()
        template = METHODS[name].build() if given is None else given
        per_base = _per_base(name, given)
        fitted = None
        if not per_base:
            if given is not None and getattr(given, "fitted_", False):
                fitted = given
            else:
                fitted = clone(template).fit(runset, runs=train, task=task)
            fitted.check_matches(runset, f"method {name!r}")
        changes[name] = {}
        for position in bases:
            base = runset[position]
            simulator = fitted
            if per_base:
                simulator = clone(template).fit(runset, runs=[position], task=task)
                simulator.check_matches(runset, f"method {name!r}")
            curricula = [base.curriculum, *draws[base.name]]
            rates = None if base.known_learning_rates is None else [base.known_learning_rates] * len(curricula)
            trajectories = simulator.simulate(curricula, base.initial_losses, rates)
            changes[name][base.name] = _final_changes(trajectories)
        seconds[name] = time.perf_counter() - start
    return changes, seconds


# ----------------------------------------------------------------------------------------------- reporting
def _cell(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def format_lds_table(table: pd.DataFrame) -> str:
    """The table of :class:`LDSResult` as markdown: one row per method, one LDS column per protocol, then
    sign agreement, magnitude ratio |predicted| / |actual| (both averaged over protocols) and seconds.

    Each LDS cell is ``lds [low, high]``; ``n/a`` where it is undefined (predictions that never vary).
    """
    protocols = list(dict.fromkeys(table["protocol"]))
    header = ["method", *(f"LDS {protocol}" for protocol in protocols), "sign agreement", "magnitude ratio",
              "fit + predict s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, rows in table.groupby("method", sort=False):
        by_protocol = {row["protocol"]: row for _, row in rows.iterrows()}
        cells = [name]
        for protocol in protocols:
            row = by_protocol.get(protocol)
            if row is None or not np.isfinite(row["lds"]):
                cells.append("n/a")
            else:
                cells.append(f"{row['lds']:.3f} [{_cell(row['lds_low'], 2)}, {_cell(row['lds_high'], 2)}]")
        cells.append(_cell(_mean(rows["sign_agreement"]), 2))
        cells.append(_cell(_mean(rows["magnitude_ratio"]), 2))
        cells.append(f"{rows['seconds'].iloc[0]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(values: pd.Series) -> float:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else float("nan")


def _quality(lds: float) -> str:
    if lds >= 0.9:
        return "near-exact"
    if lds >= 0.7:
        return "good"
    if lds >= 0.4:
        return "partial"
    if lds >= 0.1:
        return "weak"
    return "no"


def _describe_method(name: str, rows: pd.DataFrame) -> str:
    """One plain-language line on a method's rows of the LDS table."""
    scored = rows[np.isfinite(rows["lds"].astype(float))]
    if scored.empty:
        return (f"**{name}** predicts the same change for every draw, so it cannot rank edited curricula "
                "(LDS undefined).")
    best = scored.loc[scored["lds"].idxmax()]
    worst = scored.loc[scored["lds"].idxmin()]
    parts = [f"**{name}** ranks the draws of {best['protocol']} best ({_quality(best['lds'])} ranking, "
             f"LDS {best['lds']:.2f})"]
    if worst["protocol"] != best["protocol"]:
        parts.append(f"those of {worst['protocol']} worst ({_quality(worst['lds'])}, LDS {worst['lds']:.2f})")
    sign = _mean(rows["sign_agreement"])
    ratio = _mean(rows["magnitude_ratio"])
    line = "; ".join(parts)
    line += f"; it gets the direction of the mean change right in {100 * sign:.0f}% of the draws"
    if np.isfinite(ratio):
        line += f", and its predicted changes are {ratio:.2f}x the real ones in size"
    return line + "."


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def lds_json(result: LDSResult) -> dict[str, Any]:
    """The result without the per-draw arrays, as strict JSON (NaN as null)."""
    return _jsonable({
        "settings": result.settings,
        "bases": result.bases,
        "train_runs": result.train_runs,
        "base_reproduction": result.base_reproduction,
        "reproduction": result.reproduction,
        "n_trained": result.n_trained,
        "table": result.table.to_dict(orient="records"),
        "per_base": result.per_base.to_dict(orient="records"),
    })


def write_lds_report(result: LDSResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, lds.json and ``lds_<protocol>.png`` (predicted vs real change) into ``folder``.

    Returns
    -------
    paths : {"report": ..., "json": ..., protocol: png path, ...}.
    """
    from simfluence.apps.plot import plot_lds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"report": folder / "report.md", "json": folder / "lds.json"}
    settings = result.settings
    lines = [
        "# LDS: counterfactual predictions against real retraining",
        "",
        f"Base runs (held out): {', '.join(result.bases)}. Methods fitted on {len(result.train_runs)} training "
        f"run(s)" + (f"; fitted around each base run: {', '.join(settings['per_base_methods'])}"
                     if settings.get("per_base_methods") else "") + ".",
        f"{settings.get('n_draws')} draws per protocol and base run, every one retrained for real from the base "
        f"run's initial weights and seed"
        + (f" and with {settings['n_seeds'] - 1} more seed(s) (initial weights and run seed), the real changes "
           "averaged over the seeds" if settings.get("n_seeds", 1) > 1 else "")
        + f"; retraining each unedited base reproduces its log to {result.base_reproduction:.1e}.",
        "",
        "Protocols:",
        "",
        *(f"- `{protocol}`: {describe_protocol(protocol, settings.get('k', 8))}" for protocol in settings["protocols"]),
        "",
        "LDS: for each test example, the Spearman correlation over draws between the predicted and the real "
        "change of its final loss, averaged over test examples and base runs, with a bootstrap "
        "95% interval over draws. Sign agreement: how often the predicted mean change over test examples has "
        "the real one's sign. Magnitude ratio: mean absolute predicted change over the mean absolute real one.",
        "",
        format_lds_table(result.table),
        "",
        *(f"- {_describe_method(name, rows)}" for name, rows in result.table.groupby("method", sort=False)),
        "",
    ]
    for protocol in settings["protocols"]:
        path = folder / f"lds_{protocol}.png"
        scores = {row["method"]: row["lds"] for _, row in result.table[result.table["protocol"] == protocol].iterrows()}
        plot_lds({name: changes[protocol] for name, changes in result.predicted.items()}, result.actual[protocol],
                 protocol, scores=scores, path=path)
        paths[protocol] = path
        lines.append(f"![{protocol}]({path.name})")
    atomic_write_bytes(paths["report"], ("\n".join(lines) + "\n").encode())
    atomic_write_json(paths["json"], lds_json(result))
    return paths
