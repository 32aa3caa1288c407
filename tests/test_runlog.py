"""The run-log format: save/load and RunLogger agree, a crash leaves a readable prefix, bad input is named."""
from __future__ import annotations

import json
import os
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
from simfluence.curriculum import Curriculum
from simfluence.errors import RunLogError
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


def log_run(runset_path: Path, run: Run, status: str | None = None) -> None:
    """Log ``run`` step by step with a RunLogger, as a training loop would."""
    logged = {int(step): row for step, row in zip(run.logged_steps, run.losses, strict=True)}
    log = RunLogger(runset_path, run.name, metadata=run.metadata)
    if 0 in logged:
        log.log_initial(logged[0])
    for step, batch in enumerate(run.curriculum.batches(), 1):
        learning_rate = run.learning_rates[step - 1]
        log.log_step(batch, losses=logged.get(step), learning_rate=None if np.isnan(learning_rate) else learning_rate)
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
        assert sorted(os.listdir(logged / "runs")) == sorted(os.listdir(saved / "runs"))
        for name in original.run_names:
            assert read(logged / "runs" / name / "run.json") == read(saved / "runs" / name / "run.json")
            for filename in BIN_FILES:
                logged_bytes = (logged / "runs" / name / filename).read_bytes()
                assert logged_bytes == (saved / "runs" / name / filename).read_bytes(), (name, filename)
        assert_same_runset(RunSet.load(logged), original)


def test_loaded_losses_are_read_only_memory_maps(tmp_runset):
    for run in tmp_runset:
        assert isinstance(run.losses, np.memmap)
        assert not run.losses.flags.writeable


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
    assert list(frame.columns) == ["run", "step", "example"]
    assert list(frame.itertuples(index=False, name=None)) == [
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
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["run-1"]  # nothing left of the old one


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
    log.log_step(batch, losses=plan["losses"].get(str(step)), learning_rate=lr)
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
        (lambda log: log.log_step([1, 4]), r"run 'run-1', step 1: pool id 4 outside 0\.\.3"),
        (lambda log: log.log_step([-1]), r"run 'run-1', step 1: pool id -1 outside 0\.\.3"),
        (lambda log: log.log_step([0.5]), r"run 'run-1', step 1: batch ids must be integers"),
        (lambda log: log.log_step(["x"]), r"run 'run-1', step 1: batch ids must be integers"),
        (lambda log: log.log_step([True]), r"run 'run-1', step 1: batch ids must be integers"),
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
    write_run, calls = runlog._write_run, []

    def fail_on_third_run(run_dir, run, n_test):
        calls.append(run.name)
        if len(calls) == 3:
            raise OSError("disk full")
        write_run(run_dir, run, n_test)

    monkeypatch.setattr(runlog, "_write_run", fail_on_third_run)
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
