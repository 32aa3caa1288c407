"""The run-log format: save/load and RunLogger agree, a crash leaves a readable prefix, bad input is named."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import simfluence.runlog as runlog
import simfluence.runlog.model as runlog_model
import simfluence.runlog.store as runlog_store
from simfluence.curriculum import Curriculum
from simfluence.errors import RunLogError, SimfluenceError
from simfluence.runlog import MANIFEST, Run, RunLogger, RunSet, natural_key, run_status

BIN_FILES = ("batch_sizes.bin", "batch_ids.bin", "learning_rates.bin", "logged_steps.bin", "losses.bin")


def make_run(name, batches, logged_steps, losses, n_test=None, learning_rates=None, metadata=None, complete=True):
    """A Run from plain lists; losses are float32 (what the format stores)."""
    n_test = n_test if n_test is not None else len(losses[0])
    return Run(
        name,
        Curriculum.from_batches(batches),
        np.asarray(logged_steps, dtype=np.int64),
        np.asarray(losses, dtype=np.float32).reshape(len(logged_steps), n_test),
        learning_rates,
        metadata or {},
        complete,
    )


def assert_same_runset(got: RunSet, want: RunSet) -> None:
    assert got.n_pool == want.n_pool
    assert got.pool_ids == want.pool_ids and [type(i) for i in got.pool_ids] == [type(i) for i in want.pool_ids]
    assert got.test_ids == want.test_ids and [type(i) for i in got.test_ids] == [type(i) for i in want.test_ids]
    assert got.metadata == want.metadata
    assert got.run_names == want.run_names
    for got_run, want_run in zip(got, want, strict=True):
        assert got_run.curriculum == want_run.curriculum
        np.testing.assert_array_equal(got_run.logged_steps, want_run.logged_steps)
        assert got_run.losses.dtype == np.float32
        np.testing.assert_array_equal(got_run.losses, np.asarray(want_run.losses, dtype=np.float32))
        np.testing.assert_array_equal(got_run.learning_rates, want_run.learning_rates)  # NaN matches NaN
        assert got_run.metadata == want_run.metadata
        assert got_run.complete == want_run.complete


def visible(folder: Path) -> list[str]:
    """Names in a folder that readers look at (hidden names are staging, trash and locks)."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def log_run(runset_path: Path, run: Run, status: str | None = None) -> None:
    """Log ``run`` step by step with a RunLogger, as a training loop would."""
    logged = {int(step): row for step, row in zip(run.logged_steps, run.losses, strict=True)}
    log = RunLogger(runset_path, run.name, metadata=run.metadata)
    if 0 in logged:
        log.log_initial(logged[0])
    for step, batch in enumerate(run.curriculum.batches(), 1):
        learning_rate = run.learning_rates[step - 1]
        log.log_step(positions=batch, losses=logged.get(step),
                     learning_rate=None if np.isnan(learning_rate) else learning_rate)
    log.close(status or ("complete" if run.complete else "running"))


# ------------------------------------------------------------------------------------------ strategies
ids = st.one_of(st.integers(-(10**12), 10**12), st.text(max_size=6))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(st.text(max_size=5), json_values, max_size=3)
run_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,6}", fullmatch=True)


@st.composite
def runsets(draw) -> RunSet:
    """Small run sets: ragged and empty batches, losses at any subset of steps (also none), NaN learning rates."""
    n_pool = draw(st.integers(1, 6))
    pool_ids = draw(st.lists(ids, min_size=n_pool, max_size=n_pool, unique=True))
    n_test = draw(st.integers(0, 3))
    test_ids = draw(st.lists(ids, min_size=n_test, max_size=n_test, unique=True))
    runs = []
    for name in draw(st.lists(run_names, max_size=3, unique=True)):
        batches = draw(st.lists(st.lists(st.integers(0, n_pool - 1), max_size=4), max_size=6))
        logged = sorted(draw(st.sets(st.integers(0, len(batches)))))
        losses = draw(arrays(np.float32, (len(logged), n_test),
                             elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
        learning_rates = draw(st.none() | st.lists(st.just(np.nan) | st.floats(0, 10), min_size=len(batches),
                                                   max_size=len(batches)))
        runs.append(make_run(name, batches, logged, losses, n_test, learning_rates, draw(json_objects),
                             draw(st.booleans())))
    return RunSet(runs, n_pool, pool_ids, test_ids, draw(json_objects))


# ------------------------------------------------------------------------------------------ round trip
def test_save_then_load_gives_back_every_field(tmp_path):
    runs = [
        make_run("run-b", [[0, 2, 2], [], [1]], [0, 1, 3], [[1.5, 2.0], [1.25, 1.75], [1.0, 0.5]],
                 learning_rates=[0.1, np.nan, 0.05],
                 metadata={"seed": 3, "optimizer": "adam", "checkpoints": ["ckpt/step-3.pt"]}),
        make_run("run-a", [[3]], [1], [[0.25, 0.125]], complete=False),
    ]
    original = RunSet(runs, pool_ids=["ex-a", "ex-b", 7, "ex-d"], test_ids=["probe-1", 42], metadata={"task": "toy"})
    assert original.save(tmp_path / "runset") == tmp_path / "runset"
    loaded = RunSet.load(tmp_path / "runset")
    assert_same_runset(loaded, original)
    assert loaded.path == tmp_path / "runset"
    assert np.isnan(loaded["run-a"].learning_rates).all()


def test_synthetic_runset_round_trips_up_to_float32(tmp_runset, small_runset):
    assert_same_runset(tmp_runset, small_runset)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(original=runsets())
def test_any_small_runset_survives_save_and_load(original):
    with tempfile.TemporaryDirectory() as tmp:
        original.save(Path(tmp) / "runset")
        assert_same_runset(RunSet.load(Path(tmp) / "runset"), original)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(original=runsets())
def test_logger_writes_byte_for_byte_what_save_writes(original):
    with tempfile.TemporaryDirectory() as tmp:
        saved, logged = Path(tmp) / "saved", Path(tmp) / "logged"
        original.save(saved)
        RunSet.create(logged, pool_ids=original.pool_ids, test_ids=original.test_ids, metadata=original.metadata)
        for run in original:
            log_run(logged, run)
        read = lambda path: json.loads(path.read_text(encoding="utf-8"))  # noqa: E731
        assert read(logged / MANIFEST) == read(saved / MANIFEST)
        assert visible(logged / "runs") == visible(saved / "runs")
        for name in original.run_names:
            assert read(logged / "runs" / name / "run.json") == read(saved / "runs" / name / "run.json")
            for filename in BIN_FILES:
                logged_bytes = (logged / "runs" / name / filename).read_bytes()
                assert logged_bytes == (saved / "runs" / name / filename).read_bytes(), (name, filename)
        assert_same_runset(RunSet.load(logged), original)


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(path: Path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_loaded_losses_are_read_only_memory_maps_that_hold_no_open_file(tmp_runset):
    before = open_files()
    runset = RunSet.load(tmp_runset.path)
    for run in runset:
        assert not run.losses.flags.writeable and not run.losses.flags.owndata
        assert mapped(tmp_runset.path / "runs" / run.name / "losses.bin")
        assert not run.curriculum.ids.flags.writeable and not run.learning_rates.flags.writeable
        with pytest.raises(ValueError):
            run.losses.flags.writeable = True
    assert open_files() == before


def test_logger_run_with_some_steps_logged_loads_as_logged(tmp_path):
    RunSet.create(tmp_path, n_pool=4, test_ids=["a", "b"])
    with RunLogger(tmp_path, "run-1", metadata={"seed": 1}) as log:
        assert log.log_step([0, 1], learning_rate=0.5) == 1  # no initial losses, none at step 1
        assert log.log_step([]) == 2                            # an empty batch is a step
        log.log_losses([1.0, 2.0])                              # losses at step 2
        log.log_step([3, 3, 2], losses=[0.5, 1.5])
    assert run_status(tmp_path, "run-1") == "complete"
    run = RunSet.load(tmp_path)["run-1"]
    assert run.complete and run.metadata == {"seed": 1}
    assert [batch.tolist() for batch in run.curriculum.batches()] == [[0, 1], [], [3, 3, 2]]
    np.testing.assert_array_equal(run.logged_steps, [2, 3])
    np.testing.assert_array_equal(run.losses, [[1.0, 2.0], [0.5, 1.5]])
    np.testing.assert_array_equal(run.learning_rates, [0.5, np.nan, np.nan])
    with pytest.raises(RunLogError, match="step 0"):
        _ = run.initial_losses


# ------------------------------------------------------------------------------------------ tables and order
def test_to_frame_has_one_row_per_logged_loss_with_external_test_ids():
    runs = [make_run("run-10", [[0], [1]], [0, 2], [[1, 2], [3, 4]]), make_run("run-2", [[1]], [1], [[5, 6]])]
    frame = RunSet(runs, n_pool=2, test_ids=["x", 9]).to_frame()
    assert list(frame.columns) == ["run", "step", "test", "loss"]
    assert list(frame.itertuples(index=False, name=None)) == [
        ("run-2", 1, "x", 5.0), ("run-2", 1, 9, 6.0),
        ("run-10", 0, "x", 1.0), ("run-10", 0, 9, 2.0), ("run-10", 2, "x", 3.0), ("run-10", 2, 9, 4.0),
    ]


def test_to_frame_matches_the_loss_matrices(tmp_runset):
    frame = tmp_runset.to_frame()
    assert len(frame) == sum(len(run.logged_steps) for run in tmp_runset) * tmp_runset.n_test
    for run in tmp_runset:
        rows = frame[frame["run"] == run.name]
        np.testing.assert_array_equal(rows["loss"].to_numpy().reshape(-1, tmp_runset.n_test), run.losses)
        np.testing.assert_array_equal(rows["step"].to_numpy()[:: tmp_runset.n_test], run.logged_steps)
        assert list(rows["test"][: tmp_runset.n_test]) == tmp_runset.test_ids


def test_curriculum_frame_has_one_row_per_batch_entry_with_external_pool_ids():
    runs = [make_run("b", [[2, 0, 0], [], [1]], [0], [[1.0]]), make_run("a", [[1]], [0], [[1.0]])]
    frame = RunSet(runs, pool_ids=["p", "q", 5]).curriculum_frame()
    assert list(frame.columns) == ["run", "step", "example", "lr"]
    assert list(frame[["run", "step", "example"]].itertuples(index=False, name=None)) == [
        ("a", 1, "q"), ("b", 1, 5), ("b", 1, "p"), ("b", 1, "p"), ("b", 3, "q"),
    ]


def test_empty_runset_gives_empty_tables():
    runset = RunSet([], n_pool=3, test_ids=["t"])
    assert len(runset) == 0 and len(runset.to_frame()) == 0 and len(runset.curriculum_frame()) == 0


def test_runs_are_in_natural_order_of_their_names(tmp_path):
    names = ["run-10", "run-2", "run-100", "run-1", "run-9"]
    runset = RunSet([make_run(name, [[0]], [1], [[1.0]]) for name in names], n_pool=1)
    assert runset.run_names == ["run-1", "run-2", "run-9", "run-10", "run-100"]
    runset.save(tmp_path / "saved")
    assert RunSet.load(tmp_path / "saved").run_names == runset.run_names
    RunSet.create(tmp_path / "logged", n_pool=1, test_ids=1)
    for name in names:
        log_run(tmp_path / "logged", runset[name])
    assert RunSet.load(tmp_path / "logged").run_names == runset.run_names


def test_natural_key_orders_numbers_numerically_and_never_ties():
    names = ["b", "a10", "a", "a2", "a02", "a2x"]
    assert sorted(names, key=natural_key) == ["a", "a02", "a2", "a2x", "a10", "b"]
    assert sorted(reversed(names), key=natural_key) == sorted(names, key=natural_key)


def test_select_by_name_position_and_slice_shares_the_arrays(tmp_runset):
    by_name = tmp_runset.select(["run-003", "run-001"])
    assert by_name.run_names == ["run-001", "run-003"]
    assert by_name["run-003"].losses is tmp_runset["run-003"].losses
    assert tmp_runset.select([0, 2]).run_names == ["run-000", "run-002"]
    assert tmp_runset.select(slice(1, 3)).run_names == ["run-001", "run-002"]
    sub = tmp_runset.select([1])
    assert (sub.pool_ids, sub.test_ids, sub.n_pool, sub.path) == (
        tmp_runset.pool_ids, tmp_runset.test_ids, tmp_runset.n_pool, tmp_runset.path)
    with pytest.raises(RunLogError, match="no run named 'run-999'"):
        tmp_runset.select(["run-999"])


def test_position_resolves_a_name_a_position_or_a_run_of_the_set_to_one_index(tmp_runset):
    n_runs = len(tmp_runset)
    assert tmp_runset.position("run-002") == 2
    assert tmp_runset.position(1) == tmp_runset.position(np.int64(1)) == 1
    assert tmp_runset.position(-1) == n_runs - 1
    assert tmp_runset.position(tmp_runset["run-003"]) == 3
    assert tmp_runset.select([2, 3]).position("run-003") == 1  # positions are within the set asked


@pytest.mark.parametrize("run, message", [
    ("run-999", "no run named 'run-999' in run set"),
    (99, "base run 99 is not a run of the run set .*: positions are -4..3"),
    (-5, "base run -5 is not a run of the run set"),
    (True, "base run True is not a run name or position"),
    (1.0, "base run 1.0 is not a run name or position"),
])
def test_position_of_anything_else_is_one_error_naming_it(tmp_runset, run, message):
    assert len(tmp_runset) == 4
    with pytest.raises(RunLogError, match=message):
        tmp_runset.position(run, what="base run")


def test_position_of_a_run_of_another_set_is_an_error(tmp_runset):
    other = make_run("run-001", [[0]], [0, 1], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    with pytest.raises(RunLogError, match="run 'run-001' is not a run of the run set"):
        tmp_runset.position(other)


def test_known_learning_rates_are_the_rates_only_when_every_step_has_one():
    batches = [[0], [1], [0]]
    known = make_run("run-1", batches, [0, 3], [[1.0], [0.5]], learning_rates=[0.1, 0.2, 0.0])
    assert known.known_learning_rates.tolist() == [0.1, 0.2, 0.0]
    assert make_run("run-2", batches, [0, 3], [[1.0], [0.5]], learning_rates=[0.1, np.nan, 0.1]).known_learning_rates \
        is None
    assert make_run("run-3", batches, [0, 3], [[1.0], [0.5]]).known_learning_rates is None  # none logged
    assert make_run("run-4", [], [0], [[1.0]]).known_learning_rates.shape == (0,)  # no steps: all known


def test_create_with_exist_ok_reopens_the_same_runset_only(tmp_path):
    RunSet.create(tmp_path, pool_ids=["a", "b"], test_ids=2)
    assert RunSet.create(tmp_path, pool_ids=["a", "b"], test_ids=2, exist_ok=True).pool_ids == ["a", "b"]
    with pytest.raises(RunLogError, match="different pool or test ids"):
        RunSet.create(tmp_path, pool_ids=["a", "c"], test_ids=2, exist_ok=True)
    with pytest.raises(RunLogError, match="already holds a run set"):
        RunSet.create(tmp_path, pool_ids=["a", "b"], test_ids=2)


def test_logger_overwrite_replaces_an_existing_run(tmp_path):
    RunSet.create(tmp_path, n_pool=2, test_ids=1)
    with RunLogger(tmp_path, "run-1") as log:
        log.log_step([0, 0, 1], losses=[3.0])
    with RunLogger(tmp_path, "run-1", overwrite=True) as log:
        log.log_step([1], losses=[2.0])
    run = RunSet.load(tmp_path)["run-1"]
    assert run.curriculum.ids.tolist() == [1] and run.losses.tolist() == [[2.0]]
    assert visible(tmp_path / "runs") == ["run-1"]  # nothing left of the old one


# ------------------------------------------------------------------------------------------ crash safety
N_POOL, N_TEST, N_STEPS = 5, 3, 6
LOGGED = [0, 2, 3, 5, 6]
PLAN = {
    "batches": [[(3 * step + k) % N_POOL for k in range(step % 3)] for step in range(1, N_STEPS + 1)],
    "losses": {str(step): [2.0 - 0.125 * step + 0.5 * test for test in range(N_TEST)] for step in LOGGED},
    "learning_rates": [None if step == 3 else 0.01 * step for step in range(1, N_STEPS + 1)],
}

# Logs the PLAN into run "run-crashed" and dies without closing the logger. Modes: "exit" (os._exit after
# the last step), "sigkill" (SIGKILL after appending garbage past the committed counts of every file),
# "kill-in-commit" (SIGKILL just before the KILL_AT-th rename of a run.json into place).
CRASHING_LOGGER = r"""
import json, os, signal, sys
from simfluence.runlog import RunLogger

path, mode, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
plan = json.load(sys.stdin)
if mode == "kill-in-commit":
    real_replace, commits = os.replace, [0]
    def replace(src, dst):
        if os.path.basename(dst) == "run.json":
            commits[0] += 1
            if commits[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
log = RunLogger(path, "run-crashed", metadata={"seed": 7})
log.log_initial(plan["losses"]["0"])
for step, (batch, lr) in enumerate(zip(plan["batches"], plan["learning_rates"]), 1):
    log.log_step(positions=batch, losses=plan["losses"].get(str(step)), learning_rate=lr)
if mode == "exit":
    os._exit(1)
for name, junk in [("losses.bin", b"\xff" * 10), ("logged_steps.bin", bytes(8)), ("batch_ids.bin", b"\x07" * 3),
                   ("batch_sizes.bin", b"\x09" * 8), ("learning_rates.bin", b"\xff" * 8)]:
    with open(os.path.join(path, "runs", "run-crashed", name), "ab") as handle:
        handle.write(junk)
os.kill(os.getpid(), signal.SIGKILL)
"""


def planned_prefix(n_steps: int, initial_logged: bool) -> Run:
    """The PLAN's run as committed after its first ``n_steps`` steps."""
    logged = [step for step in LOGGED if step <= n_steps and (step > 0 or initial_logged)]
    return make_run(
        "run-crashed", PLAN["batches"][:n_steps], logged, [PLAN["losses"][str(step)] for step in logged] or [],
        n_test=N_TEST, learning_rates=[np.nan if lr is None else lr for lr in PLAN["learning_rates"][:n_steps]],
        metadata={"seed": 7}, complete=False,
    )


@pytest.mark.parametrize(
    ("mode", "kill_at", "n_steps", "initial_logged"),
    [
        ("exit", 0, N_STEPS, True),
        ("sigkill", 0, N_STEPS, True),             # with garbage appended to every file
        ("kill-in-commit", 2, 0, False),           # run.json of step 0 never landed
        ("kill-in-commit", 6, 3, True),            # step 4's data is on disk, its counts are not
        ("kill-in-commit", 2 + N_STEPS, N_STEPS - 1, True),
    ],
)
def test_killed_logger_leaves_every_committed_step_readable(tmp_path, mode, kill_at, n_steps, initial_logged):
    RunSet.create(tmp_path, n_pool=N_POOL, test_ids=["t0", "t1", "t2"])
    log_run(tmp_path, make_run("run-done", [[0]], [0, 1], [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]))
    result = subprocess.run([sys.executable, "-c", CRASHING_LOGGER, str(tmp_path), mode, str(kill_at)],
                            input=json.dumps(PLAN), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr

    assert run_status(tmp_path, "run-crashed") == "running"
    loaded = RunSet.load(tmp_path)
    assert loaded.run_names == ["run-crashed", "run-done"]
    assert not loaded["run-crashed"].complete and loaded["run-done"].complete
    expected = RunSet([planned_prefix(n_steps, initial_logged), loaded["run-done"]], n_pool=N_POOL,
                      test_ids=["t0", "t1", "t2"])
    assert_same_runset(loaded, expected)
    assert RunSet.load(tmp_path, include_incomplete=False).run_names == ["run-done"]


def test_logger_killed_before_its_first_commit_leaves_no_visible_run(tmp_path):
    RunSet.create(tmp_path, n_pool=N_POOL, test_ids=N_TEST)
    result = subprocess.run([sys.executable, "-c", CRASHING_LOGGER, str(tmp_path), "kill-in-commit", "1"],
                            input=json.dumps(PLAN), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert run_status(tmp_path, "run-crashed") is None
    assert RunSet.load(tmp_path).run_names == []
    with RunLogger(tmp_path, "run-crashed") as log:  # the name is free to log again
        log.log_step([1], losses=[1.0, 2.0, 3.0])
    assert RunSet.load(tmp_path).run_names == ["run-crashed"]


def test_exception_inside_with_marks_the_run_aborted_and_keeps_its_prefix(tmp_path):
    RunSet.create(tmp_path, n_pool=3, test_ids=2)
    with pytest.raises(KeyError, match="diverged"):
        with RunLogger(tmp_path, "run-1") as log:
            log.log_initial([1.0, 2.0])
            log.log_step([0, 1], losses=[0.5, 1.5])
            raise KeyError("diverged")
    assert run_status(tmp_path, "run-1") == "aborted"
    run = RunSet.load(tmp_path)["run-1"]
    assert not run.complete and run.n_steps == 1
    np.testing.assert_array_equal(run.losses, [[1.0, 2.0], [0.5, 1.5]])
    assert RunSet.load(tmp_path, include_incomplete=False).run_names == []


def test_forgotten_logger_stays_running_and_readable(tmp_path):
    RunSet.create(tmp_path, n_pool=3, test_ids=1)
    log = RunLogger(tmp_path, "run-1")
    log.log_step([2], losses=[4.0])
    del log
    assert run_status(tmp_path, "run-1") == "running"
    np.testing.assert_array_equal(RunSet.load(tmp_path)["run-1"].losses, [[4.0]])


def test_rejected_calls_leave_the_logger_usable_and_the_files_consistent(tmp_path):
    RunSet.create(tmp_path, n_pool=3, test_ids=2)
    with RunLogger(tmp_path, "run-1") as log:
        log.log_initial([1.0, 1.0])
        for bad_call in (lambda: log.log_step([0], losses=[np.nan, 1.0]), lambda: log.log_step([7]),
                         lambda: log.log_step([0], losses=[1.0]), lambda: log.log_losses([2.0, 2.0])):
            with pytest.raises(RunLogError):
                bad_call()
        log.log_step([2], losses=[0.5, 0.25])
    run = RunSet.load(tmp_path)["run-1"]
    assert run.curriculum.ids.tolist() == [2]
    np.testing.assert_array_equal(run.logged_steps, [0, 1])


# ------------------------------------------------------------------------------------------ bad files
def write_raw_run(run_dir: Path, batches, logged_steps, losses, learning_rates=None, status="complete") -> None:
    """Write a run folder by hand, following runs/README.md (not through the library's writer)."""
    run_dir.mkdir(parents=True)
    losses = np.asarray(losses, dtype="<f4")
    ids = [i for batch in batches for i in batch]
    np.asarray([len(batch) for batch in batches], dtype="<i8").tofile(run_dir / "batch_sizes.bin")
    np.asarray(ids, dtype="<i8").tofile(run_dir / "batch_ids.bin")
    rates = learning_rates if learning_rates is not None else [np.nan] * len(batches)
    np.asarray(rates, dtype="<f8").tofile(run_dir / "learning_rates.bin")
    np.asarray(logged_steps, dtype="<i8").tofile(run_dir / "logged_steps.bin")
    losses.tofile(run_dir / "losses.bin")
    info = {"name": run_dir.name, "status": status, "n_steps": len(batches), "n_entries": len(ids),
            "n_logged": len(logged_steps), "n_test": losses.shape[1], "metadata": {}}
    (run_dir / "run.json").write_text(json.dumps(info), encoding="utf-8")


def write_raw_runset(path: Path, **manifest_changes) -> Path:
    """A run set written by hand: pool of 4, test ids 'probe-a', 'probe-b', one run 'run-1' of 3 steps."""
    path.mkdir()
    manifest = {"format": "simfluence-runset", "version": 1, "n_pool": 4, "n_test": 2,
                "pool_ids": [10, 11, 12, 13], "test_ids": ["probe-a", "probe-b"], "metadata": {"task": "toy"}}
    manifest.update(manifest_changes)
    (path / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    write_raw_run(path / "runs" / "run-1", [[0, 1], [], [3, 3]], [0, 1, 3], [[1, 2], [0.5, 1.5], [0.25, 1]],
                  learning_rates=[0.1, 0.1, np.nan])
    return path


def test_hand_written_runset_in_the_documented_layout_loads(tmp_path):
    runset = RunSet.load(write_raw_runset(tmp_path / "rs"))
    expected = RunSet([make_run("run-1", [[0, 1], [], [3, 3]], [0, 1, 3], [[1, 2], [0.5, 1.5], [0.25, 1]],
                                learning_rates=[0.1, 0.1, np.nan])],
                      pool_ids=[10, 11, 12, 13], test_ids=["probe-a", "probe-b"], metadata={"task": "toy"})
    assert_same_runset(runset, expected)


@pytest.mark.parametrize(
    ("manifest_text", "message"),
    [
        (None, r"manifest\.json not found"),
        ("{not json", r"manifest\.json' is not valid JSON"),
        (b"\xff\xfe{", r"manifest\.json' is not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"format": "other-format", "version": 1}', "not a simfluence-runset manifest"),
        ('{"format": "simfluence-runset", "version": 2}', "format version 2 is not supported"),
        ('{"format": "simfluence-runset", "version": 1, "n_pool": 4, "test_ids": []}', "missing key 'pool_ids'"),
        ('{"format": "simfluence-runset", "version": 1, "n_pool": "4", "pool_ids": [], "test_ids": []}',
         "n_pool must be an integer"),
        ('{"format": "simfluence-runset", "version": 1, "n_pool": 1, "pool_ids": 5, "test_ids": []}',
         "pool_ids must be a list"),
    ],
)
def test_bad_manifest_is_named(tmp_path, manifest_text, message):
    path = write_raw_runset(tmp_path / "rs")
    if manifest_text is None:
        (path / MANIFEST).unlink()
    else:
        data = manifest_text if isinstance(manifest_text, bytes) else manifest_text.encode()
        (path / MANIFEST).write_bytes(data)
    with pytest.raises(RunLogError, match=message) as error:
        RunSet.load(path)
    assert str(path) in str(error.value)
    with pytest.raises(RunLogError) as error:  # a logger refuses to append to it
        RunLogger(path, "run-2")
    assert str(path) in str(error.value)
    assert not (path / "runs" / "run-2").exists()


def test_missing_run_json_is_named(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    (path / "runs" / "run-1" / "run.json").unlink()
    with pytest.raises(RunLogError, match=r"run-1'.*run\.json not found"):
        RunSet.load(path)


@pytest.mark.parametrize(("key", "value"), [("n_logged", -1), ("n_steps", "3"), ("n_entries", None)])
def test_bad_count_in_run_json_is_named(tmp_path, key, value):
    path = write_raw_runset(tmp_path / "rs")
    info_path = path / "runs" / "run-1" / "run.json"
    info = json.loads(info_path.read_text())
    info[key] = value
    info_path.write_text(json.dumps(info))
    with pytest.raises(RunLogError, match=rf"run-1.*run\.json'.*{key} must be an integer"):
        RunSet.load(path)


def test_run_with_another_number_of_test_losses_than_the_manifest_is_named(tmp_path):
    path = write_raw_runset(tmp_path / "rs", test_ids=["probe-a"])
    with pytest.raises(RunLogError, match=r"run-1.*logged 2 test losses per step, the manifest lists 1"):
        RunSet.load(path)


def test_truncated_losses_file_is_named(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    losses = path / "runs" / "run-1" / "losses.bin"
    losses.write_bytes(losses.read_bytes()[:-3])
    with pytest.raises(RunLogError, match=r"run-1.losses\.bin' holds 21 bytes, run\.json promises 24"):
        RunSet.load(path)


def test_batch_sizes_that_do_not_add_up_are_named(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    np.asarray([2, 0, 1], dtype="<i8").tofile(path / "runs" / "run-1" / "batch_sizes.bin")
    with pytest.raises(RunLogError, match=r"run-1'.*batch sizes do not add up to 4 entries"):
        RunSet.load(path)


def test_pool_id_out_of_range_names_run_step_and_id(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    np.asarray([0, 1, 3, 9], dtype="<i8").tofile(path / "runs" / "run-1" / "batch_ids.bin")
    with pytest.raises(RunLogError, match=r"run 'run-1': step 3 uses pool id 9, outside 0\.\.3") as error:
        RunSet.load(path)
    assert str(path) in str(error.value)


def test_nan_loss_on_disk_names_test_id_and_step(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    np.asarray([[1, 2], [0.5, np.nan], [0.25, 1]], dtype="<f4").tofile(path / "runs" / "run-1" / "losses.bin")
    with pytest.raises(RunLogError, match=r"run 'run-1': loss of test 'probe-b' at step 1 is nan"):
        RunSet.load(path)
    assert np.isnan(RunSet.load(path, validate=False)["run-1"].losses[1, 1])  # validate=False reads it as is


@pytest.mark.parametrize(("steps", "message"), [([0, 2, 1], "not strictly increasing at step 1"),
                                                ([0, 1, 1], "not strictly increasing at step 1"),
                                                ([0, 1, 4], "logged at step 4, outside 0..3")])
def test_bad_logged_steps_are_named(tmp_path, steps, message):
    path = write_raw_runset(tmp_path / "rs")
    np.asarray(steps, dtype="<i8").tofile(path / "runs" / "run-1" / "logged_steps.bin")
    with pytest.raises(RunLogError, match=rf"run 'run-1': .*{message}"):
        RunSet.load(path)


def test_invalid_run_name_on_disk_is_named(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    info_path = path / "runs" / "run-1" / "run.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "name": "../escape"}))
    with pytest.raises(RunLogError, match=r"run-1.run\.json'.*invalid run name '\.\./escape'"):
        RunSet.load(path)


# ------------------------------------------------------------------------------------------ bad logger input
@pytest.fixture
def logger(tmp_path):
    RunSet.create(tmp_path, n_pool=4, test_ids=["a", "b", "c"])
    log = RunLogger(tmp_path, "run-1")
    yield log
    log.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda log: log.log_step([0], losses=[1.0, np.nan, 1.0]), r"run 'run-1', step 1: loss of test 'b'.* is nan"),
        (lambda log: log.log_initial([1.0, 2.0, np.inf]), r"run 'run-1', step 0: loss of test 'c'.* is inf"),
        (lambda log: log.log_step([0], losses=[1.0, 2.0]), r"run 'run-1', step 1: 2 losses for 3 test examples"),
        (lambda log: log.log_step([1, 4]), r"run 'run-1', step 1: pool position 4 outside 0\.\.3"),
        (lambda log: log.log_step([-1]), r"run 'run-1', step 1: pool position -1 outside 0\.\.3"),
        (lambda log: log.log_step([0.5]), r"run 'run-1', step 1: batch positions must be integers"),
        (lambda log: log.log_step(["x"]), r"run 'run-1', step 1: batch positions must be integers"),
        (lambda log: log.log_step([True]), r"run 'run-1', step 1: batch positions must be integers"),
        (lambda log: log.log_step([0], learning_rate="fast"), r"run 'run-1', step 1: learning rate 'fast'"),
    ],
)
def test_logger_rejects_bad_steps_naming_run_step_and_id(logger, call, message):
    with pytest.raises(RunLogError, match=message):
        call(logger)


def test_logger_rejects_losses_logged_twice_at_one_step(logger):
    logger.log_initial([1.0, 1.0, 1.0])
    with pytest.raises(RunLogError, match="run 'run-1': losses of step 0 already logged"):
        logger.log_initial([1.0, 1.0, 1.0])
    logger.log_step([0], losses=[1.0, 1.0, 1.0])
    with pytest.raises(RunLogError, match="run 'run-1': losses of step 1 already logged"):
        logger.log_losses([2.0, 2.0, 2.0])
    with pytest.raises(RunLogError, match="initial losses must be logged before step 1"):
        logger.log_initial([1.0, 1.0, 1.0])


def test_closed_logger_rejects_more_steps(logger):
    logger.close()
    with pytest.raises(RunLogError, match="run 'run-1': logger is closed"):
        logger.log_step([0])


@pytest.mark.parametrize("name", ["", "has space", "../up", ".hidden", "a/b", "x" * 129, 7])
def test_logger_rejects_invalid_run_names(tmp_path, name):
    RunSet.create(tmp_path, n_pool=1, test_ids=1)
    with pytest.raises(RunLogError, match="invalid run name"):
        RunLogger(tmp_path, name)


def test_logger_refuses_an_existing_run_without_overwrite(tmp_path):
    RunSet.create(tmp_path, n_pool=1, test_ids=1)
    RunLogger(tmp_path, "run-1").close()
    with pytest.raises(RunLogError, match="run 'run-1' already exists"):
        RunLogger(tmp_path, "run-1")


def test_logger_needs_a_runset_and_json_metadata(tmp_path):
    with pytest.raises(RunLogError, match="is not a run set"):
        RunLogger(tmp_path, "run-1")
    RunSet.create(tmp_path, n_pool=1, test_ids=1)
    with pytest.raises(RunLogError, match="metadata of run 'run-1' cannot be written as JSON"):
        RunLogger(tmp_path, "run-1", metadata={"seed": np.int64(3)})
    assert run_status(tmp_path, "run-1") is None


# ------------------------------------------------------------------------------------------ bad runset input
def test_create_rejects_duplicate_test_ids_and_writes_nothing(tmp_path):
    with pytest.raises(RunLogError, match="test id 'q' appears more than once"):
        RunSet.create(tmp_path / "rs", n_pool=2, test_ids=["p", "q", "q"])
    with pytest.raises(RunLogError, match="pool id 1 appears more than once"):
        RunSet.create(tmp_path / "rs", pool_ids=[1, 2, 1], test_ids=1)
    with pytest.raises(RunLogError, match="run set metadata cannot be written as JSON"):
        RunSet.create(tmp_path / "rs", n_pool=2, test_ids=1, metadata={"lr": float("nan")})
    assert not (tmp_path / "rs").exists()


def test_save_refuses_an_existing_path_without_overwrite(tmp_path, small_runset):
    (tmp_path / "rs").mkdir()
    with pytest.raises(RunLogError, match="already exists"):
        small_runset.save(tmp_path / "rs")
    small_runset.save(tmp_path / "rs", overwrite=True)
    assert_same_runset(RunSet.load(tmp_path / "rs"), small_runset)


def test_save_over_the_runset_it_was_loaded_from(tmp_runset):
    subset = tmp_runset.select([0, 1])
    subset.save(tmp_runset.path, overwrite=True)
    assert RunSet.load(tmp_runset.path).run_names == ["run-000", "run-001"]
    assert os.listdir(tmp_runset.path.parent) == ["runset"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_the_destination_as_it_was(tmp_path, small_runset, monkeypatch, existing):
    before = RunSet([make_run("old", [[0]], [1], [[1.0, 2.0, 3.0]])], n_pool=small_runset.n_pool, test_ids=range(3))
    if existing:
        before.save(tmp_path / "rs")
    write_run, calls = runlog_model._write_run, []

    def fail_on_third_run(run_dir, run, n_test):
        calls.append(run.name)
        if len(calls) == 3:
            raise OSError("disk full")
        write_run(run_dir, run, n_test)

    monkeypatch.setattr(runlog_model, "_write_run", fail_on_third_run)
    with pytest.raises(OSError, match="disk full"):
        small_runset.save(tmp_path / "rs", overwrite=True)
    assert os.listdir(tmp_path) == (["rs"] if existing else [])
    if existing:
        assert_same_runset(RunSet.load(tmp_path / "rs"), before)


def test_save_failing_at_the_final_rename_keeps_the_old_runset(tmp_path, small_runset, monkeypatch):
    before = RunSet([make_run("old", [[0]], [1], [[1.0, 2.0, 3.0]])], n_pool=small_runset.n_pool, test_ids=range(3))
    before.save(tmp_path / "rs")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "rs" and Path(src).name.endswith(".tmp"):
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="interrupted"):
        small_runset.save(tmp_path / "rs", overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["rs"]
    assert_same_runset(RunSet.load(tmp_path / "rs"), before)


def test_save_rejects_metadata_that_is_not_json_before_writing(tmp_path, small_runset):
    small_runset["run-001"].metadata["seed"] = np.int64(1)
    with pytest.raises(RunLogError, match="metadata of run 'run-001' cannot be written as JSON"):
        small_runset.save(tmp_path / "rs")
    assert os.listdir(tmp_path) == []


def test_in_memory_runset_checks_its_runs():
    with pytest.raises(RunLogError, match="run name 'a' appears twice"):
        RunSet([make_run("a", [[0]], [1], [[1.0]]), make_run("a", [[0]], [1], [[1.0]])], n_pool=1)
    with pytest.raises(RunLogError, match=r"run 'a': losses have shape \(1, 1\), expected \(1, 2\)"):
        RunSet([make_run("a", [[0]], [1], [[1.0]])], n_pool=1, test_ids=["x", "y"])
    with pytest.raises(RunLogError, match=r"run 'a': 2 learning rates for 1 steps"):
        RunSet([make_run("a", [[0]], [1], [[1.0]], learning_rates=[0.1, 0.2])], n_pool=1)


# ------------------------------------------------------------------------------------------ hostile files
def set_run_json(path: Path, **changes) -> None:
    info_path = path / "runs" / "run-1" / "run.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), **changes}))


def cli_error(*args: str) -> str:
    """Run the CLI in a fresh process; it must exit 2 with one ``simfluence: error:`` line and no traceback."""
    result = subprocess.run([sys.executable, "-m", "simfluence.cli", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("simfluence: error:") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize("sizes", [[2**62, 2**62, 2**62, 2**62 + 4], [-1, 5, 0], [2**63 - 1, 2**63 - 1, 6]])
def test_batch_sizes_whose_sum_wraps_around_are_rejected(tmp_path, sizes):
    path = write_raw_runset(tmp_path / "rs")  # n_entries = 4 over 3 steps
    set_run_json(path, n_steps=len(sizes))
    np.asarray(sizes, dtype="<i8").tofile(path / "runs" / "run-1" / "batch_sizes.bin")
    np.zeros(len(sizes), dtype="<f8").tofile(path / "runs" / "run-1" / "learning_rates.bin")
    with pytest.raises(RunLogError, match=r"run-1'.*(outside 0\.\.4|do not add up)"):
        RunSet.load(path, validate=False)
    assert "batch size" in cli_error("info", str(path))  # was: "0 entries", then a segfault in fit


def test_offsets_that_decrease_never_pass_as_increasing_logged_steps(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    np.asarray([0, 2**62 + 1, -(2**62)], dtype="<i8").tofile(path / "runs" / "run-1" / "logged_steps.bin")
    with pytest.raises(RunLogError, match="run 'run-1'.*outside 0..3"):
        RunSet.load(path)


def sparse_file(path: Path, nbytes: int, tail: bytes = b"") -> None:
    with open(path, "wb") as handle:
        handle.truncate(nbytes - len(tail))
        handle.seek(nbytes - len(tail))
        handle.write(tail)


def test_sparse_huge_losses_are_rejected_without_allocating(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(runlog_store, "_SPARSE_MIN_BYTES", 1 << 62)  # the chunked checks, as for a real file this large
    n_test, n_logged = 1024, 2**17  # losses.bin: 512 MiB of holes (a few KB on disk), a NaN in the last cell
    path = write_raw_runset(tmp_path / "rs", test_ids=[f"t{j}" for j in range(n_test)], n_test=n_test)
    run_dir = path / "runs" / "run-1"
    set_run_json(path, n_steps=n_logged - 1, n_entries=0, n_logged=n_logged, n_test=n_test)
    sparse_file(run_dir / "batch_sizes.bin", 8 * (n_logged - 1))
    sparse_file(run_dir / "learning_rates.bin", 8 * (n_logged - 1))
    np.arange(n_logged, dtype="<i8").tofile(run_dir / "logged_steps.bin")
    sparse_file(run_dir / "losses.bin", 4 * n_logged * n_test, tail=np.float32(np.nan).tobytes())
    tracemalloc.start()
    try:
        with pytest.raises(RunLogError, match=rf"loss of test 't{n_test - 1}' at step {n_logged - 1} is nan"):
            RunSet.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # was 1.24 GB
    set_run_json(path, n_steps=10)  # more logged steps than steps: rejected before anything is read
    with pytest.raises(RunLogError, match=rf"{n_logged} logged steps in a run of 10 steps"):
        RunSet.load(path, validate=False)


def test_sparse_huge_batch_sizes_are_checked_without_allocating(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(runlog_store, "_SPARSE_MIN_BYTES", 1 << 62)  # the chunked checks, as for a real file this large
    path = write_raw_runset(tmp_path / "rs")  # n_entries = 4; the sparse sizes add up to 0
    run_dir = path / "runs" / "run-1"
    set_run_json(path, n_steps=2**25)
    for name in ("batch_sizes.bin", "learning_rates.bin"):
        sparse_file(run_dir / name, 8 * 2**25)  # 256 MiB each, a few KB on disk
    tracemalloc.start()
    try:
        with pytest.raises(RunLogError, match="batch sizes do not add up to 4 entries"):
            RunSet.load(path, validate=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak


@pytest.mark.parametrize("n_steps", [3 * 10**8, 5 * 10**7])
def test_a_sparse_run_declaring_huge_counts_is_one_error_before_allocating(tmp_path, n_steps):
    import tracemalloc

    path = write_raw_runset(tmp_path / "rs")  # a valid run of n_steps empty steps at rate 0, in a few KB on disk
    run_dir = path / "runs" / "run-1"
    set_run_json(path, n_steps=n_steps, n_entries=0)
    for name in ("batch_sizes.bin", "learning_rates.bin"):
        sparse_file(run_dir / name, 8 * n_steps)
    if os.stat(run_dir / "batch_sizes.bin").st_blocks * 512 >= 8 * n_steps // 16:
        pytest.skip("this file system does not keep sparse files sparse")
    tracemalloc.start()
    try:
        with pytest.raises(RunLogError, match=r"batch_sizes\.bin' occupies \d+ bytes on disk for the "
                                              rf"{8 * n_steps} run\.json promises \(a sparse file\)"):
            RunSet.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # was a MemoryError traceback (3e8 steps) or 1.27 GB (5e7 steps)
    if n_steps == 3 * 10**8:
        assert "sparse file" in cli_error("info", str(path))


def test_counts_beyond_any_file_size_are_rejected_before_allocating(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    set_run_json(path, n_logged=3, n_steps=10**30)
    with pytest.raises(RunLogError, match=r"batch_sizes\.bin' holds 24 bytes, run\.json promises 8"):
        RunSet.load(path)


@pytest.mark.parametrize("name", ["seed-0\n", "a\n", "run-1\r"])
def test_run_names_with_a_trailing_newline_are_rejected(tmp_path, name):
    RunSet.create(tmp_path, n_pool=1, test_ids=1)
    with pytest.raises(RunLogError, match="invalid run name"):
        RunLogger(tmp_path, name)
    assert visible(tmp_path / "runs") == []
    path = write_raw_runset(tmp_path / "rs")
    os.rename(path / "runs" / "run-1", path / "runs" / name)
    set_run_json_at = path / "runs" / name / "run.json"
    set_run_json_at.write_text(json.dumps({**json.loads(set_run_json_at.read_text()), "name": name}))
    with pytest.raises(RunLogError, match="invalid run name"):
        RunSet.load(path)


@pytest.mark.parametrize("where", ["manifest", "run"])
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"n_pool": ' + "9" * 5000 + "}",
                                  '{"a": ' + "{" * 50_000 + "}" * 50_000 + "}"])
def test_deeply_nested_or_huge_int_json_is_one_error_line(tmp_path, where, text):
    path = write_raw_runset(tmp_path / "rs")
    target = path / MANIFEST if where == "manifest" else path / "runs" / "run-1" / "run.json"
    target.write_text(text)
    with pytest.raises(RunLogError, match="(not valid JSON|expected a JSON object)") as error:
        RunSet.load(path)
    assert "\n" not in str(error.value)
    cli_error("info", str(path))


@pytest.mark.parametrize("metadata", [[1, 2], "text", 5])
def test_run_metadata_that_is_not_an_object_is_rejected_at_load(tmp_path, metadata):
    path = write_raw_runset(tmp_path / "rs")
    set_run_json(path, metadata=metadata)
    with pytest.raises(RunLogError, match=r"run-1.run\.json'.*metadata must be a JSON object"):
        RunSet.load(path)


def test_run_name_that_differs_from_its_folder_is_rejected(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    set_run_json(path, name="run-2")
    with pytest.raises(RunLogError, match="run name 'run-2' differs from its folder name 'run-1'"):
        RunSet.load(path)


@pytest.mark.parametrize("target", ["losses.bin", "run.json", "batch_ids.bin", "run folder", "runs folder"])
def test_symbolic_links_are_never_followed(tmp_path, target):
    path = write_raw_runset(tmp_path / "rs")
    elsewhere = write_raw_runset(tmp_path / "elsewhere")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(64, dtype="<f4").tobytes())
    if target == "run folder":
        shutil.rmtree(path / "runs" / "run-1")
        (path / "runs" / "run-1").symlink_to(elsewhere / "runs" / "run-1", target_is_directory=True)
    elif target == "runs folder":
        shutil.rmtree(path / "runs")
        (path / "runs").symlink_to(elsewhere / "runs", target_is_directory=True)
    else:
        file = path / "runs" / "run-1" / target
        source = secret if target.endswith(".bin") else elsewhere / "runs" / "run-1" / "run.json"
        file.unlink()
        file.symlink_to(source)
    with pytest.raises(RunLogError, match="symbolic link"):
        RunSet.load(path, validate=False)
    if target != "runs folder":
        runset = RunSet.load(path, skip_corrupt=True)
        assert len(runset) == 0 and runset.skipped[0][0] == "run-1" and "symbolic link" in runset.skipped[0][1]


def test_a_fifo_in_place_of_an_array_file_is_an_error_not_a_hang(tmp_path):
    path = write_raw_runset(tmp_path / "rs")
    losses = path / "runs" / "run-1" / "losses.bin"
    losses.unlink()
    os.mkfifo(losses)
    with pytest.raises(RunLogError, match="losses.bin' is not a regular file"):
        RunSet.load(path)


# ------------------------------------------------------------------------------------------ corrupt runs
def three_runs_one_corrupt(tmp_path: Path) -> Path:
    RunSet.create(tmp_path / "rs", n_pool=3, test_ids=["a", "b"])
    for name in ("run-1", "run-2", "run-10"):
        with RunLogger(tmp_path / "rs", name) as log:
            log.log_initial([1.0, 2.0])
            log.log_step([0, 1], losses=[0.5, 1.5], learning_rate=0.1)
    with RunLogger(tmp_path / "rs", "run-3") as log:
        log.log_step([2], losses=[0.5, 1.5])
        log.close("running")
    (tmp_path / "rs" / "runs" / "run-2" / "losses.bin").write_bytes(b"\x00" * 5)  # truncated
    return tmp_path / "rs"


def test_a_corrupt_run_is_named_or_skipped_and_listed(tmp_path):
    path = three_runs_one_corrupt(tmp_path)
    with pytest.raises(RunLogError, match=r"run-2.losses\.bin' holds 5 bytes"):
        RunSet.load(path)
    runset = RunSet.load(path, skip_corrupt=True)
    assert runset.run_names == ["run-1", "run-3", "run-10"]
    assert [name for name, _ in runset.skipped] == ["run-2"]
    assert "holds 5 bytes" in runset.skipped[0][1] and "\n" not in runset.skipped[0][1]
    assert RunSet.load(path, skip_corrupt=True, include_incomplete=False).run_names == ["run-1", "run-10"]
    np.testing.assert_array_equal(runset["run-10"].losses, [[1.0, 2.0], [0.5, 1.5]])
    (path / "runs" / "run-1" / "logged_steps.bin").write_bytes(np.array([0, 0], dtype="<i8").tobytes())
    runset = RunSet.load(path, skip_corrupt=True)  # also runs that fail validation
    assert [name for name, _ in runset.skipped] == ["run-1", "run-2"]
    assert "not strictly increasing" in runset.skipped[0][1]


def test_complete_only_leaves_out_incomplete_runs(tmp_path):
    path = three_runs_one_corrupt(tmp_path)
    runset = RunSet.load(path, skip_corrupt=True)
    complete = runset.complete_only()
    assert complete.run_names == ["run-1", "run-10"] and len(runset) - len(complete) == 1
    assert complete.skipped == runset.skipped and complete.path == runset.path
    assert complete["run-1"].losses is runset["run-1"].losses


# ------------------------------------------------------------------------------------------ many runs
MANY_RUNS = r"""
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from simfluence.runlog import RunSet
runset = RunSet.load(sys.argv[1])
held = [(run.losses, run.curriculum, run.logged_steps, run.learning_rates) for run in runset]
total = sum(float(np.asarray(losses).sum()) for losses, *_ in held)
frame = runset.to_frame()
print(len(runset), len(frame), round(total, 3))
"""


def test_a_set_of_2000_runs_opens_and_is_used_under_256_open_files(tmp_path):
    runs = [make_run(f"run-{i}", [[i % 3], [(i + 1) % 3]], [0, 2], [[1.0, 2.0], [0.5, 1.0]]) for i in range(2000)]
    RunSet(runs, n_pool=3, test_ids=["a", "b"]).save(tmp_path / "rs")
    result = subprocess.run([sys.executable, "-c", MANY_RUNS, str(tmp_path / "rs")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2000", str(2000 * 4), "9000.0"]


def test_runs_read_their_arrays_on_first_use(tmp_path):
    runs = [make_run(f"run-{i}", [[0], [1]], [0, 2], [[1.0], [0.5]]) for i in range(3)]
    RunSet(runs, n_pool=2, test_ids=["a"]).save(tmp_path / "rs")
    runset = RunSet.load(tmp_path / "rs", validate=False)
    run = runset["run-1"]
    assert "losses" not in vars(run) and run.n_steps == 2 and run.n_test == 1 and run.complete
    assert run.losses.tolist() == [[1.0], [0.5]] and "curriculum" in vars(run)
    assert "losses" not in vars(runset["run-2"])


# ------------------------------------------------------------------------------------------ concurrent writers
SECOND_WRITER = r"""
import sys
from simfluence.errors import RunLogError, SimfluenceError
from simfluence.runlog import RunLogger
try:
    RunLogger(sys.argv[1], "run-1", overwrite=sys.argv[2] == "1")
except RunLogError as err:
    print(err)
    sys.exit(3)
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_writer_of_a_run_is_refused_while_the_first_writes(tmp_path, overwrite):
    RunSet.create(tmp_path, n_pool=2, test_ids=1)
    first = RunLogger(tmp_path, "run-1")
    first.log_initial([2.0])
    with pytest.raises(RunLogError, match="run 'run-1' .* is being written by another RunLogger"):
        RunLogger(tmp_path, "run-1", overwrite=overwrite)
    other = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(tmp_path), str(int(overwrite))],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 3 and "being written by another RunLogger" in other.stdout, other.stderr
    for step in range(1, 4):
        first.log_step([step % 2], losses=[2.0 - step / 4])
    first.close()
    run = RunSet.load(tmp_path)["run-1"]
    assert run.complete and run.n_steps == 3 and run.logged_steps.tolist() == [0, 1, 2, 3]
    with RunLogger(tmp_path, "run-1", overwrite=True) as again:  # free once closed (generate resumes so)
        again.log_step([0], losses=[1.0])
    assert RunSet.load(tmp_path)["run-1"].n_steps == 1


KILLED_WRITER = r"""
import os, signal, sys
from simfluence.runlog import RunLogger
log = RunLogger(sys.argv[1], "run-1")
log.log_initial([1.0])
log.log_step([0], losses=[0.5])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_of_a_killed_writer_is_released(tmp_path):
    RunSet.create(tmp_path, n_pool=2, test_ids=1)
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], timeout=60)
    assert run_status(tmp_path, "run-1") == "running"
    with RunLogger(tmp_path, "run-1", overwrite=True) as log:
        log.log_step([1], losses=[0.25])
    assert RunSet.load(tmp_path)["run-1"].complete


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda log: log.log_step([0], learning_rate=float("inf")), r"learning rate inf must be a finite number >= 0"),
        (lambda log: log.log_step([0], learning_rate=-1), r"learning rate -1 must be a finite number >= 0"),
        (lambda log: log.log_step([0], learning_rate=True), r"learning rate True is not a number"),
        (lambda log: log.log_step([0], learning_rate="0.1"), r"learning rate '0\.1' is not a number"),
        (lambda log: log.log_step([0], losses=["a", "b", "c"]), r"step 1: losses must be numbers"),
        (lambda log: log.log_step([0], losses=[True, False, True]), r"step 1: losses must be numbers"),
        (lambda log: log.log_initial([[1.0], [1.0, 2.0]]), r"step 0: losses must be numbers"),
        (lambda log: log.log_initial({"a": 1}), r"step 0: losses must be numbers"),
    ],
)
def test_logger_rejects_bad_learning_rates_and_losses_and_stays_usable(logger, call, message):
    with pytest.raises(RunLogError, match=message):
        call(logger)
    logger.log_step([0], losses=[1.0, 2.0, 3.0], learning_rate=0.0)
    logger.log_step([1], learning_rate=np.float32(0.5))
    logger.close()
    run = RunSet.load(logger.runset_path)["run-1"]
    assert run.n_steps == 2 and run.learning_rates.tolist() == [0.0, 0.5]


# ------------------------------------------------------------------------------------------ crashed save
CRASHING_SAVE = r"""
import os, sys
from simfluence.runlog import RunSet
path, crash_at = sys.argv[1], int(sys.argv[2])
runset = RunSet.load(path).select([0])
real_replace, renames = os.replace, [0]
def replace(src, dst):  # the process dies at the crash_at-th of save's two renames that touch the target
    if path in (str(src), str(dst)):
        renames[0] += 1
        if renames[0] == crash_at:
            os._exit(9)
    real_replace(src, dst)
os.replace = replace
runset.save(path, overwrite=True)
"""


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_save_killed_between_its_renames_is_finished_by_the_next_open(tmp_runset, crash_at):
    path = tmp_runset.path
    result = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(path), str(crash_at)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    if crash_at == 1:  # before the old set was moved: it is still there
        assert RunSet.load(path).run_names == tmp_runset.run_names
    else:  # the old set was moved aside, the new one not yet in place: the target is missing until an open
        assert not path.exists()
        assert RunSet.load(path).run_names == tmp_runset.run_names[:1]
        assert os.listdir(path.parent) == ["runset"]  # the old set aside is deleted


def test_save_after_an_interrupted_save_recovers_first(tmp_runset):
    path = tmp_runset.path
    subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(path), "2"], capture_output=True, timeout=120)
    assert not path.exists()
    with pytest.raises(RunLogError, match="already exists"):
        tmp_runset.select([1]).save(path)
    assert RunSet.load(path).run_names == tmp_runset.run_names[:1]


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("where", ["../secret.pt", "{abs}", "checkpoints/link.pt", "checkpoints/../../secret.pt"])
def test_checkpoint_paths_outside_the_run_set_are_refused_before_opening(tmp_path, monkeypatch, where):
    torch = pytest.importorskip("torch")
    from simfluence.attribution import checkpoints as checkpoint_module
    from simfluence.errors import SimfluenceError

    secret = tmp_path / "secret.pt"
    torch.save({"step": 0, "learning_rate": 0.1, "model": {"w": torch.zeros(1)}}, secret)
    relative = where.format(abs=str(secret))
    run = make_run("run-1", [[0]], [0, 1], [[1.0], [0.5]],
                   metadata={"checkpoints": [{"step": 0, "path": relative}, {"step": 1, "path": "checkpoints/ok.pt"}]})
    path = RunSet([run], n_pool=1, test_ids=["a"]).save(tmp_path / "rs")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "link.pt").symlink_to(secret)
    torch.save({"step": 1, "learning_rate": 0.1, "model": {"w": torch.ones(1)}}, path / "checkpoints" / "ok.pt")
    opened = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load",
                        lambda file, **options: opened.append(file) or real_load(file, **options))
    runset = RunSet.load(path)
    with pytest.raises(SimfluenceError, match="(leads outside the run-set folder|is absolute)"):
        checkpoint_module.load_checkpoints(runset, "run-1", steps=[0])
    assert opened == []
    (ok,) = checkpoint_module.load_checkpoints(runset, "run-1", steps=[1])
    assert ok.step == 1 and ok.model_state["w"].item() == 1.0 and opened == [path.resolve() / "checkpoints" / "ok.pt"]


@pytest.mark.parametrize("entries", [{"step": 0}, ["step-0.pt"], [{"step": "0", "path": "a.pt"}],
                                     [{"step": 0, "path": 5}], [{"step": True, "path": "a.pt"}]])
def test_malformed_checkpoint_lists_are_one_error(tmp_path, entries):
    pytest.importorskip("torch")
    from simfluence.attribution.checkpoints import checkpoint_steps, load_checkpoints
    from simfluence.errors import SimfluenceError

    run = make_run("run-1", [[0]], [0, 1], [[1.0], [0.5]], metadata={"checkpoints": entries})
    runset = RunSet.load(RunSet([run], n_pool=1, test_ids=["a"]).save(tmp_path / "rs"))
    for call in (checkpoint_steps, load_checkpoints):
        with pytest.raises(SimfluenceError, match="run 'run-1'"):
            call(runset, 0)


# ------------------------------------------------------------------ moving runs between machines, test subsets
def test_an_exported_run_installs_into_another_run_set_byte_for_byte(tmp_runset, tmp_path):
    other = tmp_path / "other"
    RunSet.create(other, n_pool=tmp_runset.n_pool, test_ids=tmp_runset.test_ids)
    name = tmp_runset.run_names[1]
    files = runlog.export_run(tmp_runset.path, name)
    assert sorted(files) == sorted(runlog.run_file_names())
    runlog.install_run(other, name, files)
    for filename in files:
        original = tmp_runset.path / "runs" / name / filename
        assert (other / "runs" / name / filename).read_bytes() == original.read_bytes()
    loaded = RunSet.load(other)[name]
    np.testing.assert_array_equal(loaded.losses, tmp_runset[name].losses)
    runlog.install_run(other, name, files)  # a second install replaces the run
    assert RunSet.load(other).run_names == [name]


@pytest.mark.parametrize("damage, message", [
    (lambda files: files.pop("losses.bin"), "expected the files"),
    (lambda files: files.update({"evil.sh": b""}), "expected the files"),
    (lambda files: files.update({"losses.bin": files["losses.bin"][:-4]}), "truncated"),
    (lambda files: files.update({"run.json": b"{"}), "run.json"),
])
def test_a_damaged_run_is_refused_and_the_run_set_is_unchanged(tmp_runset, tmp_path, damage, message):
    other = tmp_path / "other"
    RunSet.create(other, n_pool=tmp_runset.n_pool, test_ids=tmp_runset.test_ids)
    name = tmp_runset.run_names[0]
    good = runlog.export_run(tmp_runset.path, name)
    runlog.install_run(other, name, good)
    files = dict(good)
    damage(files)
    with pytest.raises(RunLogError, match=message):
        runlog.install_run(other, name, files)
    assert (other / "runs" / name / "losses.bin").read_bytes() == good["losses.bin"]
    assert sorted(p.name for p in (other / "runs").iterdir()) == [".locks", name]  # no staging left behind


def test_a_run_with_other_test_examples_or_pool_is_refused(tmp_runset, tmp_path):
    name = tmp_runset.run_names[0]
    files = runlog.export_run(tmp_runset.path, name)
    RunSet.create(tmp_path / "wider", n_pool=tmp_runset.n_pool, test_ids=tmp_runset.n_test + 1)
    with pytest.raises(RunLogError, match="test"):
        runlog.install_run(tmp_path / "wider", name, files)
    RunSet.create(tmp_path / "smaller", n_pool=2, test_ids=tmp_runset.test_ids)
    with pytest.raises(RunLogError, match="outside the run set's 0..1"):
        runlog.install_run(tmp_path / "smaller", name, files)


def test_a_run_being_logged_is_never_replaced_by_an_install(tmp_runset, tmp_path):
    files = runlog.export_run(tmp_runset.path, tmp_runset.run_names[0])
    with RunLogger(tmp_runset.path, "busy"):
        with pytest.raises(RunLogError, match="being written by another RunLogger"):
            runlog.install_run(tmp_runset.path, "busy", files)


def test_select_tests_keeps_runs_and_takes_only_the_chosen_loss_columns(tmp_runset):
    subset = tmp_runset.select_tests([2, 0])
    assert subset.test_ids == [tmp_runset.test_ids[2], tmp_runset.test_ids[0]]
    # the losses are copied; the folder is kept for the files of whole runs (checkpoints, a workload's corpus)
    assert subset.run_names == tmp_runset.run_names and subset.path == tmp_runset.path
    assert all(isinstance(run.losses, np.ndarray) and not isinstance(run.losses, np.memmap) for run in subset)
    for mine, theirs in zip(subset, tmp_runset, strict=True):
        np.testing.assert_array_equal(mine.losses, np.asarray(theirs.losses)[:, [2, 0]])
        assert mine.curriculum == theirs.curriculum


# ------------------------------------------------------------------ install_run validates like a load (issue 22.6)
def _patched(files: dict, filename: str, dtype: str, index: int, value) -> dict:
    array = np.frombuffer(files[filename], dtype=dtype).copy()
    array[index] = value
    return {**files, filename: array.tobytes()}


@pytest.mark.parametrize("damage, message", [
    (lambda f: _patched(f, "losses.bin", "<f4", 1, np.nan), r"loss of test .* is nan"),
    (lambda f: _patched(f, "logged_steps.bin", "<i8", 2, 1), "logged steps not strictly increasing"),
    (lambda f: _patched(f, "learning_rates.bin", "<f8", 0, -1.0), "learning rate of step 1 is -1.0"),
    (lambda f: {**f, "losses.bin": list(f["losses.bin"])}, "the content of losses.bin must be bytes, got list"),
    (lambda f: {**f, "run.json": "{}"}, "the content of run.json must be bytes, got str"),
])
def test_install_run_refuses_what_a_load_refuses_and_changes_nothing(tmp_runset, tmp_path, damage, message):
    other = tmp_path / "other"
    RunSet.create(other, n_pool=tmp_runset.n_pool, test_ids=tmp_runset.test_ids)
    name = tmp_runset.run_names[0]
    good = runlog.export_run(tmp_runset.path, name)
    runlog.install_run(other, name, good)
    replaced = []
    with pytest.raises(RunLogError, match=message):
        runlog.install_run(other, name, damage(dict(good)), before_replace=lambda: replaced.append(True))
    assert replaced == []  # the hook that replaces the run's checkpoints never ran
    for filename, data in good.items():
        assert (other / "runs" / name / filename).read_bytes() == data
    assert sorted(p.name for p in (other / "runs").iterdir()) == [".locks", name]
    RunSet.load(other)  # still loads


# ------------------------------------------------------------------ ids and positions in log_step (issue 21.8)
def test_log_step_takes_ids_or_positions_and_never_confuses_them(tmp_path):
    RunSet.create(tmp_path, pool_ids=[5, 3, 9, 0], test_ids=1)
    with RunLogger(tmp_path, "run-1") as log:
        with pytest.raises(RunLogError, match="could mean ids or positions; pass positions=.* or ids="):
            log.log_step([0, 3], losses=[1.0])  # ids 0 and 3 exist, and so do positions 0 and 3
        log.log_step(ids=[0, 3], losses=[1.0])
        log.log_step(positions=[0, 3], losses=[0.5])
        with pytest.raises(RunLogError, match="give the batch as one of positions=... or ids=..., got positions and"):
            log.log_step(positions=[0], ids=[5])
        with pytest.raises(SimfluenceError, match="7"):
            log.log_step(ids=[7])
    run = RunSet.load(tmp_path)["run-1"]
    assert run.curriculum.ids.tolist() == [3, 1, 0, 3] and run.n_steps == 2


def test_log_step_with_default_or_text_pool_ids_keeps_taking_positions(tmp_path):
    RunSet.create(tmp_path / "default", n_pool=3, test_ids=1)
    RunSet.create(tmp_path / "text", pool_ids=["a", "b", "c"], test_ids=1)
    for folder in ("default", "text"):
        with RunLogger(tmp_path / folder, "run-1") as log:
            log.log_step([2, 0], losses=[1.0])
        assert RunSet.load(tmp_path / folder)["run-1"].curriculum.ids.tolist() == [2, 0]
    with RunLogger(tmp_path / "text", "run-2") as log:
        log.log_step(ids=["c", "a"])
    assert RunSet.load(tmp_path / "text")["run-2"].curriculum.ids.tolist() == [2, 0]


# ------------------------------------------------------------------ replacing a whole run set (issue 22.1, 22.2)
def test_a_folder_with_a_foreign_manifest_is_not_a_run_set(tmp_path):
    for text in ('{"name": "PWA"}', '{"format": "simfluence-runset"}', '{"format": "simfluence-runset", '
                 '"version": 99, "n_pool": 1, "pool_ids": [0], "test_ids": [0]}'):
        (tmp_path / MANIFEST).write_text(text)
        assert not runlog.is_runset(tmp_path)
        with pytest.raises(RunLogError, match="is not a run set .*refusing to replace it or write a run set into"):
            runlog.check_replaceable(tmp_path)


def test_a_run_set_is_not_replaced_while_a_logger_writes_and_no_logger_starts_while_it_is(tmp_runset):
    path = tmp_runset.path
    with RunLogger(path, "busy"):
        with pytest.raises(RunLogError, match="is being written .*replace it once no writer runs"):
            tmp_runset.select([0]).save(path, overwrite=True)
        with pytest.raises(RunLogError, match="is being written"), runlog.runset_destination(path, overwrite=True):
            pass
    assert RunSet.load(path).run_names == ["busy", *tmp_runset.run_names]
    with runlog.runset_destination(path, overwrite=True) as staging:
        assert staging.parent == path.parent and staging.name.startswith(".runset.")
        with pytest.raises(RunLogError, match="is being replaced by another writer"):
            RunLogger(path, "late")
        with pytest.raises(RunLogError, match="is being replaced by another writer"):
            runlog.install_run(path, "late", runlog.export_run(path, tmp_runset.run_names[0]))
        tmp_runset.select([1]).save(staging, overwrite=True)
    assert RunSet.load(path).run_names == tmp_runset.run_names[1:2]
    assert sorted(os.listdir(path.parent)) == ["runset"]


def test_an_error_while_building_aside_or_at_any_rename_keeps_the_old_set_or_puts_the_new_one(tmp_runset,
                                                                                               monkeypatch):
    path = tmp_runset.path
    with pytest.raises(OSError, match="disk full"), runlog.runset_destination(path, overwrite=True) as staging:
        tmp_runset.select([1]).save(staging, overwrite=True)
        raise OSError("disk full")
    assert RunSet.load(path).run_names == tmp_runset.run_names and os.listdir(path.parent) == ["runset"]
    real_replace = os.replace
    for crash_at in (1, 2):
        renames = [0]

        def replace(src, dst, crash_at=crash_at, renames=renames):
            if str(path) in (str(src), str(dst)):
                renames[0] += 1
                if renames[0] == crash_at:
                    raise OSError("interrupted")
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="interrupted"), runlog.runset_destination(path, overwrite=True) as staging:
            tmp_runset.select([1]).save(staging, overwrite=True)
        monkeypatch.undo()
        assert RunSet.load(path).run_names == tmp_runset.run_names, crash_at  # the old set, whole
        assert os.listdir(path.parent) == ["runset"]
    real_rmtree = shutil.rmtree

    def rmtree(folder, *args, **kwargs):  # the old set, moved aside, cannot be deleted
        if Path(folder).name.startswith(".runset.") and Path(folder).name.endswith(".old"):
            raise OSError("busy")
        real_rmtree(folder, *args, **kwargs)

    monkeypatch.setattr(runlog_store.shutil, "rmtree", rmtree)
    with pytest.raises(OSError, match="busy"), runlog.runset_destination(path, overwrite=True) as staging:
        tmp_runset.select([1]).save(staging, overwrite=True)
    monkeypatch.undo()
    assert RunSet.load(path).run_names == tmp_runset.run_names[1:2]  # the new set, complete (the old one aside)


def test_the_command_line_reaches_a_set_whose_save_was_killed_between_its_renames(tmp_runset, capsys):
    from simfluence.cli import main

    path = tmp_runset.path
    subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(path), "2"], capture_output=True, timeout=120)
    assert not path.exists()
    assert main(["info", str(path)]) == 0
    assert "n_runs=1" in capsys.readouterr().out
    assert main(["info", str(path.parent / "missing")]) == 2
    assert capsys.readouterr().err == f"simfluence: error: {str(path.parent / 'missing')!r} does not exist\n"
