"""Importing curriculum and loss tables (CSV, JSON, Parquet, DataFrames, GPTDynamics) into run sets."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simfluence.curriculum import Curriculum
from simfluence.errors import ImportTableError, RunLogError
from simfluence.importers import (
    import_gptdynamics,
    import_tables,
    read_gptdynamics_curriculum,
    read_gptdynamics_losses,
)
from simfluence.runlog import Run, RunSet
from simfluence.synthetic import known_linear_runset


# ------------------------------------------------------------------------------------------- helpers
def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write a table in the format its extension names."""
    name = path.name
    if name.endswith((".csv", ".csv.gz")):
        frame.to_csv(path, index=False)
    elif name.endswith(".tsv"):
        frame.to_csv(path, index=False, sep="\t")
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    elif name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True, double_precision=15)
    elif name.endswith(".json"):
        frame.to_json(path, orient="records", double_precision=15)
    else:
        raise ValueError(name)
    return path


def export_curriculum(runset: RunSet) -> pd.DataFrame:
    """``curriculum_frame()`` plus each row's learning rate (column ``lr``)."""
    frame = runset.curriculum_frame()
    frame["lr"] = np.concatenate(
        [run.learning_rates[run.curriculum.step_of_entries() - 1] for run in runset] or [np.zeros(0)]
    )
    return frame


def external_batches(runset: RunSet, run: Run) -> list[list]:
    pool_ids = runset.pool_ids
    return [[pool_ids[i] for i in batch] for batch in run.curriculum.batches()]


def assert_same_runs(expected: RunSet, actual: RunSet) -> None:
    """Equal run names, external curricula, logged steps, losses (float32), learning rates and test ids."""
    assert actual.run_names == expected.run_names
    assert actual.test_ids == expected.test_ids
    for want, got in zip(expected, actual, strict=True):
        assert external_batches(actual, got) == external_batches(expected, want)
        np.testing.assert_array_equal(got.logged_steps, want.logged_steps)
        np.testing.assert_array_equal(np.asarray(got.losses), np.asarray(want.losses, dtype=np.float32))
        used = want.curriculum.batch_sizes > 0  # an empty step has no row to carry its learning rate
        np.testing.assert_array_equal(got.learning_rates[used], want.learning_rates[used])
        assert np.isnan(got.learning_rates[~used]).all()


def hand_runset(pool_ids: list, test_ids: list) -> RunSet:
    """Two runs with ragged batches, a repeated example, an empty step and losses logged every 2 steps."""
    a, b, c, d = range(4)
    run_1 = Run(
        "r1",
        Curriculum.from_batches([[a, b, b], [], [c], [d, a, c, b]]),
        logged_steps=[0, 2, 4],
        losses=np.array([[2.0, 3.0], [1.5, 2.5], [1.25, 2.0]]),
        learning_rates=[0.1, 0.1, 0.05, 0.05],
    )
    run_2 = Run(
        "r2",
        Curriculum.from_batches([[d], [c, c], [], [], [a]]),
        logged_steps=[0, 3, 5],
        losses=np.array([[2.0, 3.0], [1.0, 2.0], [0.5, 1.0]]),
    )
    return RunSet([run_1, run_2], pool_ids=pool_ids, test_ids=test_ids)


@pytest.fixture
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curriculum and loss tables of a small valid run set with string runs and mixed-case ids."""
    runset = hand_runset(["p0", "p1", "p2", "p3"], ["q0", "q1"])
    curriculum = export_curriculum(runset)
    curriculum["lr"] = np.nan
    return curriculum, runset.to_frame()


def expect_error(curriculum, losses, out: Path, *fragments: str, **kwargs) -> str:
    """Importing must raise ImportTableError naming every fragment, and leave nothing at ``out``."""
    with pytest.raises(ImportTableError) as info:
        import_tables(curriculum, losses, out, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not out.exists()
    return message


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("extension", ["csv", "csv.gz", "tsv", "jsonl", "json", "parquet"])
def test_round_trip_through_files_keeps_curricula_losses_and_ids(tmp_path, extension):
    runset, _, _ = known_linear_runset(n_pool=15, n_test=4, n_runs=3, n_steps=8, batch_size=3, noise=0.01)
    curriculum = write_table(export_curriculum(runset), tmp_path / f"curriculum.{extension}")
    losses = write_table(runset.to_frame(), tmp_path / f"losses.{extension}")
    imported = import_tables(curriculum, losses, tmp_path / "runs", pool_ids=runset.pool_ids, metadata={"x": 1})
    assert imported.path == tmp_path / "runs"
    assert imported.pool_ids == runset.pool_ids and imported.metadata == {"x": 1}
    assert_same_runs(runset, imported)
    for want, got in zip(runset, imported, strict=True):
        assert got.curriculum == want.curriculum


def test_default_pool_is_the_sorted_examples_that_occur(tmp_path):
    runset = hand_runset([30, 4, 100, 7], [12, 3])
    imported = import_tables(export_curriculum(runset), runset.to_frame())
    assert imported.pool_ids == [4, 7, 30, 100]  # numerically, not as text
    assert imported.test_ids == [3, 12]
    csv_imported = import_tables(
        write_table(export_curriculum(runset), tmp_path / "c.csv"), write_table(runset.to_frame(), tmp_path / "l.csv")
    )
    for result in (imported, csv_imported):
        for want, got in zip(runset, result, strict=True):
            assert external_batches(result, got) == external_batches(runset, want)
            columns = [runset.test_ids.index(test) for test in result.test_ids]
            np.testing.assert_array_equal(got.losses, np.asarray(want.losses, dtype=np.float32)[:, columns])


def test_string_ids_round_trip_through_csv(tmp_path):
    runset = hand_runset(["ex-b", "ex-a", "007", "ex-c"], ["q1", "q0"])
    curriculum = write_table(export_curriculum(runset), tmp_path / "c.csv")
    losses = write_table(runset.to_frame(), tmp_path / "l.csv")
    imported = import_tables(curriculum, losses, pool_ids=runset.pool_ids, test_ids=runset.test_ids)
    assert imported.pool_ids == ["ex-b", "ex-a", "007", "ex-c"]  # "007" is not read as the integer 7
    assert_same_runs(runset, imported)
    assert import_tables(curriculum, losses).pool_ids == ["007", "ex-a", "ex-b", "ex-c"]


def test_string_pool_ids_match_integers_read_from_csv(tmp_path):
    runset = hand_runset([10, 11, 12, 13], [0, 1])
    curriculum = write_table(export_curriculum(runset), tmp_path / "c.csv")
    losses = write_table(runset.to_frame(), tmp_path / "l.csv")
    imported = import_tables(curriculum, losses, pool_ids=["10", "11", "12", "13"], test_ids=["0", "1"])
    assert imported.pool_ids == ["10", "11", "12", "13"]
    for want, got in zip(runset, imported, strict=True):
        assert got.curriculum == want.curriculum


def test_mixed_int_and_string_ids_are_read_as_strings():
    curriculum = pd.DataFrame({"run": [0, 0, 0], "step": [1, 1, 2], "example": [10, "a", 9]})
    losses = pd.DataFrame({"run": [0, 0], "step": [0, 2], "test": ["t", "t"], "loss": [1.0, 0.5]})
    imported = import_tables(curriculum, losses)
    assert imported.pool_ids == ["9", "10", "a"]  # natural order: numbers in the text compare as numbers
    assert imported.run_names == ["0"]
    assert external_batches(imported, imported["0"]) == [["10", "a"], ["9"]]


def test_logged_test_ids_keep_their_column_order_through_csv(tmp_path):
    runset, _, _ = known_linear_runset(n_pool=6, n_test=12, n_runs=2, n_steps=3, batch_size=2)
    named = RunSet(runset.runs, pool_ids=[f"ex{i}" for i in range(6)], test_ids=[f"t{j}" for j in range(12)])
    curriculum = write_table(export_curriculum(named), tmp_path / "c.csv")
    losses = write_table(named.to_frame(), tmp_path / "l.csv")
    imported = import_tables(curriculum, losses)
    assert imported.test_ids == named.test_ids  # t0, t1, ..., t9, t10, t11: not t0, t1, t10, t11, t2, ...
    assert imported.pool_ids == named.pool_ids
    for want, got in zip(named, imported, strict=True):
        np.testing.assert_array_equal(got.losses, np.asarray(want.losses, dtype=np.float32))
        assert got.curriculum == want.curriculum


def test_default_ids_are_in_natural_order():
    curriculum = pd.DataFrame({"run": "r", "step": [1, 1, 1, 1], "example": ["b10", "b2", "a", "b02"]})
    losses = pd.DataFrame({"run": "r", "step": 0, "test": [100, 20, 3], "loss": [1.0, 2.0, 3.0]})
    imported = import_tables(curriculum, losses)
    assert imported.pool_ids == ["a", "b02", "b2", "b10"]
    assert imported.test_ids == [3, 20, 100]
    assert imported["r"].losses.tolist() == [[3.0, 2.0, 1.0]]


def test_ragged_batches_empty_steps_and_repeats_are_kept(tables):
    curriculum, losses = tables
    interleaved = curriculum.sort_values("step", kind="stable")  # runs mixed, batch order within a step kept
    assert interleaved["run"].tolist() != curriculum["run"].tolist()
    imported = import_tables(interleaved, losses)
    assert [len(batch) for batch in imported["r1"].curriculum.batches()] == [3, 0, 1, 4]
    assert external_batches(imported, imported["r1"]) == [["p0", "p1", "p1"], [], ["p2"], ["p3", "p0", "p2", "p1"]]
    assert imported["r2"].n_steps == 5 and imported["r2"].curriculum.batch_sizes.tolist() == [1, 2, 0, 0, 1]


def test_losses_logged_every_k_steps():
    runset, _, _ = known_linear_runset(n_pool=10, n_test=3, n_runs=2, n_steps=12)
    losses = runset.to_frame()
    every_4 = losses[losses["step"] % 4 == 0]
    imported = import_tables(export_curriculum(runset), every_4, pool_ids=runset.pool_ids)
    for want, got in zip(runset, imported, strict=True):
        assert got.logged_steps.tolist() == [0, 4, 8, 12]
        np.testing.assert_array_equal(got.losses, np.asarray(want.losses, dtype=np.float32)[[0, 4, 8, 12]])
        assert got.n_steps == 12


@pytest.mark.parametrize("column", ["lr", "learning_rate"])
def test_learning_rate_column_gives_one_rate_per_step(tables, column):
    curriculum, losses = tables
    curriculum = curriculum.drop(columns="lr")
    curriculum[column] = curriculum["step"] * 0.1
    curriculum.loc[curriculum.index[1], column] = np.nan  # an unknown value in a step that has a known one
    imported = import_tables(curriculum, losses)
    np.testing.assert_allclose(imported["r1"].learning_rates, [0.1, np.nan, 0.3, 0.4])
    np.testing.assert_allclose(imported["r2"].learning_rates, [0.1, 0.2, np.nan, np.nan, 0.5])
    assert np.isnan(import_tables(curriculum.drop(columns=column), losses)["r1"].learning_rates).all()


def test_import_gives_the_same_run_set_in_memory_and_saved(tables, tmp_path):
    curriculum, losses = tables
    in_memory = import_tables(curriculum, losses)
    saved = import_tables(curriculum, losses, tmp_path / "runs")
    assert saved.path == tmp_path / "runs" and not saved["r1"].losses.flags.owndata  # mapped from disk
    assert_same_runs(in_memory, saved)
    assert RunSet.load(tmp_path / "runs").pool_ids == in_memory.pool_ids


def test_tables_with_only_a_header_are_an_error(tables, tmp_path):
    curriculum, losses = tables
    expect_error(curriculum.iloc[:0], losses.iloc[:0], tmp_path / "runs", "curriculum table", "no rows",
                 test_ids=["q0", "q1"])
    files = write_table(curriculum.iloc[:0], tmp_path / "c.csv"), write_table(losses.iloc[:0], tmp_path / "l.csv")
    expect_error(*files, tmp_path / "runs", "c.csv", "only a header")
    expect_error(curriculum, losses.iloc[:0], tmp_path / "runs", "run 'r1'", "no losses")


def test_existing_out_needs_overwrite(tables, tmp_path):
    curriculum, losses = tables
    out = tmp_path / "runs"
    import_tables(curriculum, losses, out)
    with pytest.raises(RunLogError, match="already exists"):
        import_tables(curriculum, losses, out)
    replaced = import_tables(curriculum[curriculum["run"] == "r1"], losses[losses["run"] == "r1"], out, overwrite=True)
    assert RunSet.load(out).run_names == replaced.run_names == ["r1"]


# ------------------------------------------------------------------------------------------- errors
def test_missing_column_is_named(tables, tmp_path):
    curriculum, losses = tables
    expect_error(curriculum.drop(columns="example"), losses, tmp_path / "o", "curriculum table", "'example'")
    expect_error(curriculum, losses.drop(columns="loss"), tmp_path / "o", "loss table", "'loss'")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_or_huge_loss_names_run_step_and_test(tables, tmp_path, bad):
    curriculum, losses = tables
    row = losses.index[(losses["run"] == "r2") & (losses["step"] == 3) & (losses["test"] == "q1")][0]
    losses.loc[row, "loss"] = bad
    expect_error(curriculum, losses, tmp_path / "o", "run 'r2', step 3, test 'q1'")


def test_error_names_the_file(tables, tmp_path):
    curriculum, losses = tables
    losses.loc[losses.index[4], "loss"] = np.nan
    curriculum_file = write_table(curriculum, tmp_path / "c.csv")
    losses_file = write_table(losses, tmp_path / "l.csv")
    message = expect_error(curriculum_file, losses_file, tmp_path / "o", str(losses_file), "run 'r1', step 4")
    assert "(row 5)" in message


def test_negative_step_is_an_error(tables, tmp_path):
    curriculum, losses = tables
    losses.loc[(losses["run"] == "r2") & (losses["step"] == 3), "step"] = -1
    expect_error(curriculum, losses, tmp_path / "o", "loss table", "run 'r2'", "step -1")


def test_step_zero_in_curriculum_is_an_error(tables, tmp_path):
    curriculum, losses = tables
    curriculum.loc[curriculum.index[-1], "step"] = 0
    expect_error(curriculum, losses, tmp_path / "o", "curriculum table", "run 'r2'", "step 0")


@pytest.mark.parametrize("bad", [1.5, "three", None])
def test_non_integer_step_is_an_error(tables, tmp_path, bad):
    curriculum, losses = tables
    curriculum["step"] = curriculum["step"].astype(object)
    curriculum.loc[curriculum.index[3], "step"] = bad
    expect_error(curriculum, losses, tmp_path / "o", "run 'r1'", "step", "(row 4)")


def test_integral_float_steps_are_accepted(tables):
    curriculum, losses = tables
    curriculum["step"] = curriculum["step"].astype(float)
    assert import_tables(curriculum, losses)["r1"].n_steps == 4


def test_missing_loss_at_a_logged_step_names_the_test(tables, tmp_path):
    curriculum, losses = tables
    losses = losses[~((losses["run"] == "r1") & (losses["step"] == 2) & (losses["test"] == "q1"))]
    expect_error(curriculum, losses, tmp_path / "o", "run 'r1', step 2, test 'q1'", "no loss")


def test_duplicate_loss_names_run_step_and_test(tables, tmp_path):
    curriculum, losses = tables
    duplicate = losses[(losses["run"] == "r2") & (losses["step"] == 5) & (losses["test"] == "q0")]
    expect_error(curriculum, pd.concat([losses, duplicate]), tmp_path / "o", "run 'r2', step 5, test 'q0'", "more than")


def test_run_without_losses_or_without_curriculum_is_named(tables, tmp_path):
    curriculum, losses = tables
    expect_error(curriculum, losses[losses["run"] != "r2"], tmp_path / "o", "run 'r2'", "no losses")
    expect_error(curriculum[curriculum["run"] != "r1"], losses, tmp_path / "o", "run 'r1'", "no curriculum rows")


def test_loss_after_the_last_step_is_an_error(tables, tmp_path):
    curriculum, losses = tables
    curriculum = curriculum[~((curriculum["run"] == "r2") & (curriculum["step"] == 5))]
    expect_error(curriculum, losses, tmp_path / "o", "run 'r2'", "step 5", "last step 2")


def test_unknown_example_or_test_is_named(tables, tmp_path):
    curriculum, losses = tables
    expect_error(curriculum, losses, tmp_path / "o", "'p3'", "pool_ids", pool_ids=["p0", "p1", "p2"])
    expect_error(curriculum, losses, tmp_path / "o", "'q1'", "test_ids", test_ids=["q0"])
    expect_error(curriculum, losses, tmp_path / "o", "'q2'", "no loss", test_ids=["q0", "q1", "q2"])


def test_invalid_run_name_is_an_error(tables, tmp_path):
    curriculum, losses = tables
    curriculum["run"] = curriculum["run"].replace("r1", "bad run")
    losses["run"] = losses["run"].replace("r1", "bad run")
    expect_error(curriculum, losses, tmp_path / "o", "invalid run name 'bad run'")


def test_missing_example_is_an_error(tables, tmp_path):
    curriculum, losses = tables
    curriculum.loc[curriculum.index[2], "example"] = None
    expect_error(curriculum, losses, tmp_path / "o", "run 'r1', step 1", "missing example id")


def test_conflicting_learning_rates_in_a_step_are_an_error(tables, tmp_path):
    curriculum, losses = tables
    curriculum["lr"] = 0.1
    curriculum.loc[(curriculum["run"] == "r1") & (curriculum["step"] == 4), "lr"] = [0.1, 0.1, 0.2, 0.1]
    expect_error(curriculum, losses, tmp_path / "o", "run 'r1', step 4", "learning rate")
    expect_error(curriculum.assign(learning_rate=0.1), losses, tmp_path / "o", "both 'lr' and 'learning_rate'")


def test_unreadable_inputs_are_named(tables, tmp_path):
    curriculum, losses = tables
    expect_error(tmp_path / "absent.csv", losses, tmp_path / "o", "absent.csv", "not found")
    odd = tmp_path / "c.xlsx"
    odd.write_text("x")
    expect_error(odd, losses, tmp_path / "o", "c.xlsx", "unknown table format")
    broken = tmp_path / "c.jsonl"
    broken.write_text('{"run": "r1", "step": 1,\n')
    expect_error(broken, losses, tmp_path / "o", "c.jsonl", "cannot read")


def test_parquet_without_pyarrow_says_how_to_install(tables, tmp_path, monkeypatch):
    curriculum, losses = tables
    path = write_table(curriculum, tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    expect_error(path, losses, tmp_path / "o", "pip install simfluence[parquet]")


# ------------------------------------------------------------------------------------------- GPTDynamics
def gptdynamics_folder(folder: Path, runset: RunSet) -> Path:
    """Write one run of ``runset`` in the GPTDynamics layout (JSON lines, test-major trajectories)."""
    run = runset[0]
    folder.mkdir()
    with open(folder / "train_samples_id.json", "w") as handle:
        for step, batch in enumerate(external_batches(runset, run), 1):
            print(json.dumps({"step": step, "samples_id": batch}), file=handle)
    with open(folder / "all_loss_trajectory.out", "w") as handle:
        for column, test in enumerate(runset.test_ids):
            points = zip(run.logged_steps, run.losses[:, column], strict=True)
            trajectory = [{"step": int(step), "loss": float(loss)} for step, loss in points]
            print(json.dumps({"id": test, "loss_trajectory": trajectory}), file=handle)
    return folder


def test_gptdynamics_losses_become_a_loss_table(tmp_path):
    records = [
        {"id": 7, "loss_trajectory": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]},
        {"id": 3, "run": "seed-2", "loss_trajectory": [{"step": 1, "loss": 0.5}]},
    ]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(records))
    as_lines = tmp_path / "lines.out"
    as_lines.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    for source in (records, as_list, as_lines):
        frame = read_gptdynamics_losses(source, run="seed-1")
        assert frame.columns.tolist() == ["run", "test", "step", "loss"]
        assert frame.values.tolist() == [["seed-1", 7, 1, 2.0], ["seed-1", 7, 2, 1.5], ["seed-2", 3, 1, 0.5]]
    with pytest.raises(ImportTableError, match="record 2"):
        read_gptdynamics_losses([records[0], {"id": 1}])


def test_gptdynamics_folder_imports_with_its_curriculum(tmp_path):
    runset, _, _ = known_linear_runset(n_pool=12, n_test=3, n_runs=1, n_steps=6, batch_size=2)
    runset.runs[0].logged_steps = runset.runs[0].logged_steps[1:]  # GPTDynamics logs from step 1
    runset.runs[0].losses = runset.runs[0].losses[1:]
    folder = gptdynamics_folder(tmp_path / "boolq-seed-1", runset)
    imported = import_gptdynamics(folder, run="seed-1", pool_ids=runset.pool_ids, out=tmp_path / "runs")
    assert imported.run_names == ["seed-1"]
    assert imported[0].curriculum == runset[0].curriculum
    np.testing.assert_array_equal(imported[0].logged_steps, np.arange(1, 7))
    np.testing.assert_array_equal(imported[0].losses, np.asarray(runset[0].losses, dtype=np.float32))
    table = read_gptdynamics_curriculum(folder / "train_samples_id.json", run="seed-1")
    via_table = import_gptdynamics(folder / "all_loss_trajectory.out", table, run="seed-1", pool_ids=runset.pool_ids)
    assert via_table[0].curriculum == runset[0].curriculum
    with pytest.raises(ImportTableError, match="carry no curriculum"):
        import_gptdynamics(folder / "all_loss_trajectory.out")


# ------------------------------------------------------------------------------------------- property
@st.composite
def small_runsets(draw) -> RunSet:
    use_strings = draw(st.booleans())
    n_pool = draw(st.integers(1, 6))
    n_test = draw(st.integers(1, 3))
    if use_strings:
        labels = st.text("abc07", min_size=1, max_size=3)
        pool_ids = draw(st.lists(labels, min_size=n_pool, max_size=n_pool, unique=True))
        test_ids = draw(st.lists(labels, min_size=n_test, max_size=n_test, unique=True))
    else:
        pool_ids = draw(st.lists(st.integers(-50, 50), min_size=n_pool, max_size=n_pool, unique=True))
        test_ids = draw(st.lists(st.integers(0, 99), min_size=n_test, max_size=n_test, unique=True))
    runs = []
    for index in range(draw(st.integers(1, 3))):
        batch = st.lists(st.integers(0, n_pool - 1), max_size=4)
        batches = draw(st.lists(batch, min_size=0, max_size=4))
        batches.append(draw(st.lists(st.integers(0, n_pool - 1), min_size=1, max_size=4)))  # last step non-empty
        n_steps = len(batches)
        logged = sorted(draw(st.sets(st.integers(0, n_steps), min_size=1, max_size=n_steps + 1)))
        losses = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=len(logged) * n_test,
                               max_size=len(logged) * n_test))
        rates = draw(st.lists(st.one_of(st.just(np.nan), st.floats(0, 1)), min_size=n_steps, max_size=n_steps))
        runs.append(Run(f"run-{index}", Curriculum.from_batches(batches), logged,
                        np.array(losses, dtype=np.float32).reshape(len(logged), n_test), rates))
    return RunSet(runs, pool_ids=pool_ids, test_ids=test_ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runset=small_runsets(), through_csv=st.booleans())
def test_any_run_set_survives_export_and_import(runset, through_csv):
    curriculum = export_curriculum(runset)
    losses = runset.to_frame()
    with tempfile.TemporaryDirectory() as folder:
        if through_csv:
            curriculum = write_table(curriculum, Path(folder) / "c.csv")
            losses = write_table(losses, Path(folder) / "l.csv")
        imported = import_tables(curriculum, losses, pool_ids=runset.pool_ids, test_ids=runset.test_ids)
        inferred = import_tables(curriculum, losses)
    assert imported.pool_ids == runset.pool_ids
    assert_same_runs(runset, imported)
    for want, got in zip(runset, imported, strict=True):
        assert got.curriculum == want.curriculum
    for want, got in zip(runset, inferred, strict=True):
        assert [[str(i) for i in b] for b in external_batches(inferred, got)] == \
            [[str(i) for i in b] for b in external_batches(runset, want)]
        order = [list(map(str, inferred.test_ids)).index(str(test)) for test in runset.test_ids]
        np.testing.assert_array_equal(np.asarray(got.losses)[:, order], want.losses)


# ------------------------------------------------------------------------------------------- hostile inputs
def test_overwrite_never_replaces_a_folder_that_is_not_a_run_set(tables, tmp_path):
    curriculum, losses = tables
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "chapter1.tex").write_text("years of work")
    with pytest.raises(RunLogError, match="is not a run set.*refusing to replace it"):
        import_tables(curriculum, losses, users, overwrite=True)
    assert (users / "chapter1.tex").read_text() == "years of work"
    plain_file = tmp_path / "notes.txt"
    plain_file.write_text("keep")
    with pytest.raises(RunLogError, match="not a folder"):
        import_tables(curriculum, losses, plain_file, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(users, target_is_directory=True)
    with pytest.raises(RunLogError, match="symbolic link"):
        import_tables(curriculum, losses, link, overwrite=True)
    assert plain_file.read_text() == "keep" and link.is_symlink() and (users / "chapter1.tex").exists()
    (tmp_path / "empty").mkdir()
    assert import_tables(curriculum, losses, tmp_path / "empty", overwrite=True).run_names == ["r1", "r2"]


def test_cli_import_overwrite_of_a_folder_that_is_not_a_run_set_is_one_error_line(tables, tmp_path, capsys):
    from simfluence.cli import main

    curriculum, losses = tables
    files = [str(write_table(curriculum, tmp_path / "c.csv")), str(write_table(losses, tmp_path / "l.csv"))]
    users = tmp_path / "somedir"
    users.mkdir()
    (users / "data.bin").write_bytes(b"\x00" * 10)
    assert main(["import", *files, "--out", str(users), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simfluence: error:") and err.count("\n") == 1 and "not a run set" in err
    assert (users / "data.bin").read_bytes() == b"\x00" * 10


@pytest.mark.parametrize("extension", ["jsonl", "json", "parquet"])
def test_ids_beyond_int64_are_kept_exactly(tmp_path, extension):
    big = [2**63, 2**64 - 1, 2**63 + 7]
    curriculum = pd.DataFrame({"run": "r", "step": [1, 1, 2], "example": np.array(big, dtype=np.uint64)})
    losses = pd.DataFrame({"run": "r", "step": [0, 0], "test": np.array(big[:2], dtype=np.uint64),
                           "loss": [1.0, 2.0]})
    if extension == "parquet":
        files = write_table(curriculum, tmp_path / "c.parquet"), write_table(losses, tmp_path / "l.parquet")
    else:  # pandas cannot write uint64 >= 2**63 as JSON: write the text by hand
        files = []
        for frame, name in ((curriculum, "c"), (losses, "l")):
            records = [json.dumps({k: (int(v) if isinstance(v, np.integer) else v) for k, v in row.items()})
                       for row in frame.to_dict("records")]
            path = tmp_path / f"{name}.{extension}"
            path.write_text("\n".join(records) if extension == "jsonl" else "[" + ",".join(records) + "]")
            files.append(path)
    imported = import_tables(*files, out=tmp_path / "runs")
    assert imported.pool_ids == [2**63, 2**63 + 7, 2**64 - 1] and imported.test_ids == [2**63, 2**64 - 1]
    assert external_batches(imported, imported["r"]) == [[2**63, 2**64 - 1], [2**63 + 7]]
    assert RunSet.load(tmp_path / "runs").pool_ids == imported.pool_ids  # JSON ints survive exactly


def test_uint64_step_beyond_int64_is_an_error(tables, tmp_path):
    curriculum, losses = tables
    curriculum["step"] = curriculum["step"].astype(np.uint64)
    curriculum.loc[curriculum.index[3], "step"] = np.uint64(2**64 - 1)
    expect_error(curriculum, losses, tmp_path / "o", "run 'r1'", "too large", "(row 4)")


def test_na_like_texts_are_ids_and_an_empty_field_is_missing(tmp_path):
    names = ["NA", "None", "null", "nan", "N/A", "NaN"]
    curriculum = tmp_path / "c.csv"
    curriculum.write_text("run,step,example,lr\n" + "".join(f"NA,1,{name},\n" for name in names))
    losses = tmp_path / "l.csv"
    losses.write_text("run,step,test,loss\n" + "".join(f"NA,{step},{test},1.5\n" for step in (0, 1)
                                                          for test in ("None", "null")))
    imported = import_tables(curriculum, losses)
    assert imported.run_names == ["NA"] and sorted(imported.pool_ids) == sorted(names)
    assert imported.test_ids == ["None", "null"] and np.isnan(imported["NA"].learning_rates).all()
    curriculum.write_text("run,step,example\nNA,1,\n")
    expect_error(curriculum, losses, tmp_path / "o", "missing example id")
    curriculum.write_text("run,step,example\nNA,1,a\n")
    losses.write_text("run,step,test,loss\nNA,0,x,NA\n")
    expect_error(curriculum, losses, tmp_path / "o", "run 'NA', step 0, test 'x'", "not finite")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[" + "9" * 5000 + "]",
                                  '{"id": ' + "7" * 5000 + ', "loss_trajectory": []}'])
def test_deep_or_huge_json_is_one_import_error(tmp_path, text):
    path = tmp_path / "all_loss_trajectory.out"
    path.write_text(text)
    with pytest.raises(ImportTableError) as info:
        read_gptdynamics_losses(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    table = tmp_path / "c.json"
    table.write_text(text)
    with pytest.raises(ImportTableError):
        import_tables(table, table)


# ------------------------------------------------------------------------------------------- hostile tables
def write_jsonl(path: Path, records: list[dict]) -> Path:
    """JSON lines written by hand, so each value keeps its JSON type (pandas would unify a column)."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_total_steps_are_bounded_by_the_input_not_per_run(tmp_path):
    """Runs of one row each at step 999,999 pass a per-run bound; together they would write 16 MB per run."""
    curriculum = tmp_path / "c.csv"
    curriculum.write_text("run,step,example\n" + "".join(f"r{run},999999,0\n" for run in range(3)))
    losses = tmp_path / "l.csv"
    losses.write_text("run,step,test,loss\n" + "".join(f"r{run},0,0,1.0\n" for run in range(3)))
    message = expect_error(curriculum, losses, tmp_path / "o", "c.csv'", "steps in all", "3 curriculum rows",
                           "is the step column right")
    assert "run 'r" in message
    one_run = tmp_path / "one.csv"
    one_run.write_text("run,step,example\nr0,999999,0\n")  # a single sparse run within the bound is still fine
    one_loss = pd.DataFrame({"run": ["r0"], "step": [0], "test": [0], "loss": [1.0]})
    assert import_tables(one_run, one_loss)["r0"].n_steps == 999_999


@pytest.mark.parametrize("column, table", [("loss", "loss"), ("step", "loss"), ("step", "curriculum"),
                                           ("lr", "curriculum")])
def test_booleans_are_not_numbers(tmp_path, column, table):
    """JSON ``true`` among numbers is an error, not 1.0 (nor step 1)."""
    curriculum = [{"run": "a", "step": 1, "example": 0, "lr": 0.1}, {"run": "a", "step": 2, "example": 1, "lr": 0.1}]
    losses = [{"run": "a", "step": step, "test": 0, "loss": 0.5} for step in (0, 1, 2)]
    records = losses if table == "loss" else curriculum
    records[-1][column] = True
    files = write_jsonl(tmp_path / "c.jsonl", curriculum), write_jsonl(tmp_path / "l.jsonl", losses)
    expect_error(*files, tmp_path / "o", f"{files[table == 'loss'].name}'", "True", "run 'a'")


def test_booleans_are_not_numbers_in_parquet(tables, tmp_path):
    curriculum, losses = tables
    losses["loss"] = losses["loss"] > 1
    files = write_table(curriculum, tmp_path / "c.parquet"), write_table(losses, tmp_path / "l.parquet")
    expect_error(*files, tmp_path / "o", "l.parquet'", "loss", "is not a number")


@pytest.mark.parametrize("column", ["example", "test", "run"])
def test_integer_and_string_ids_with_the_same_text_are_an_error(tmp_path, column):
    """JSON ids ``7`` and ``"7"`` are two values: never silently merged into one."""
    curriculum = [{"run": "a", "step": 1, "example": 7}, {"run": "a", "step": 1, "example": "x"}]
    losses = [{"run": "a", "step": step, "test": 7} for step in (0, 1)]
    for record in losses:
        record["loss"] = 0.5
    if column == "run":
        curriculum = [{**record, "run": 5} for record in curriculum] + [{"run": "5", "step": 1, "example": 7}]
        losses = [{**record, "run": 5} for record in losses] + [{**losses[0], "run": "5"}]
    else:
        records = curriculum if column == "example" else losses
        records.append({**records[0], column: "7", "step": 1 if column == "example" else 2})
        if column == "test":
            curriculum.append({"run": "a", "step": 2, "example": 7})
    files = write_jsonl(tmp_path / "c.jsonl", curriculum), write_jsonl(tmp_path / "l.jsonl", losses)
    value = "5" if column == "run" else "7"
    expect_error(*files, tmp_path / "o", f"{value} (integer)", f"'{value}' (string)")


def test_integer_and_string_ids_with_different_texts_are_still_read_as_strings(tmp_path):
    curriculum = write_jsonl(tmp_path / "c.jsonl", [{"run": "a", "step": 1, "example": 7},
                                                   {"run": "a", "step": 1, "example": "x"}])
    losses = write_jsonl(tmp_path / "l.jsonl", [{"run": "a", "step": 0, "test": 0, "loss": 0.5}])
    assert import_tables(curriculum, losses).pool_ids == ["7", "x"]


def test_negative_learning_rate_names_the_curriculum_row(tables, tmp_path):
    curriculum, losses = tables
    curriculum.loc[curriculum.index[1], "lr"] = -0.1
    message = expect_error(curriculum, losses, tmp_path / "o", "curriculum table: run 'r1', step 1",
                           "learning rate -0.1", "(row 2)")
    assert "loss table" not in message


def test_exported_tables_carry_the_learning_rates_back(tmp_path):
    runset = hand_runset(["p0", "p1", "p2", "p3"], ["q0", "q1"])
    runset.curriculum_frame().to_csv(tmp_path / "c.csv", index=False)
    assert_same_runs(runset, import_tables(tmp_path / "c.csv", runset.to_frame(), pool_ids=runset.pool_ids))
