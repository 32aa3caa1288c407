"""Property-based fuzzing of the run-set reader, the importers, ``install_run``, the model loader and the CLI with
mutated files.

The claim: whatever bytes a run set, an import table, an exported run or a saved model of any method holds,
reading it ends in a result or a ``SimfluenceError`` (on the command line: one ``simfluence: error:`` line and exit
status 2) -- never another exception, a crash, a hang or a write outside the target folder; a model that loads
answers every question (simulate, leave-one-out, what-if) with a result or a ``SimfluenceError``, and a run that
``install_run`` accepts leaves its run set loadable.

The budget is small by default (part of ``make test``). ``make fuzz`` raises it: the environment variable
``SIMFLUENCE_FUZZ_EXAMPLES`` sets the examples per test, and ``SIMFLUENCE_FUZZ_REPORT`` names a JSON file
that receives the count of inputs tried and of each outcome.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simfluence.cli import main
from simfluence.curriculum import Curriculum
from simfluence.design import FeatureSpec, build_transitions
from simfluence.errors import SimfluenceError
from simfluence.importers import import_gptdynamics, import_tables, read_gptdynamics_losses
from simfluence.runlog import Run, RunSet
from simfluence.simulators.base import Simulator

LONG = os.environ.get("SIMFLUENCE_FUZZ_EXAMPLES")
OUTCOMES: Counter = Counter()


def budget(short: int) -> settings:
    """``short`` examples in ``make test`` (derandomized: the same inputs every time), more with ``make fuzz``."""
    return settings(
        max_examples=int(LONG) if LONG else short,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def fuzz_report():
    yield
    report = os.environ.get("SIMFLUENCE_FUZZ_REPORT")
    if report:
        inputs = sum(count for outcome, count in OUTCOMES.items()  # uses of a loaded model are not inputs
                     if "skipped" not in outcome and ": use " not in outcome)
        summary = {"inputs_tried": inputs, "outcomes": dict(sorted(OUTCOMES.items()))}
        Path(report).write_text(json.dumps(summary, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (links not followed) with its kind, size and content hash."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            content = hash(path.read_bytes()) if path.is_file() and not path.is_symlink() else None
            entries[str(path.relative_to(folder))] = (info.st_mode, info.st_size, content)
    return entries


def exercise(runset: RunSet, validated: bool) -> None:
    """Use every array of every run the way fitting and the CLI do (unvalidated runs: only their structure,
    which ``validate=False`` still guarantees; their ids and steps may be anything)."""
    for run in runset:
        assert run.losses.shape == (len(run.logged_steps), runset.n_test)
        assert len(run.learning_rates) == run.n_steps
        float(np.asarray(run.losses, dtype=np.float64).sum())
        assert len(run.curriculum.step_of_entries()) == len(run.curriculum.ids)
        if validated:
            run.curriculum.to_csr(runset.n_pool)
            run.dense_losses()
            if len(run.logged_steps) and run.logged_steps[0] == 0:
                assert run.initial_losses.shape == (runset.n_test,)
    if validated:
        runset.to_frame()
        runset.curriculum_frame()
        with contextlib.suppress(SimfluenceError):  # e.g. "no transitions": a valid set need not be fittable
            build_transitions(runset, FeatureSpec(runset.n_pool))


def one_error_line(code: int, stderr: str) -> None:
    assert code in (0, 2), (code, stderr)
    if code == 2:
        assert stderr.startswith("simfluence: error:") and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr


def run_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


# ------------------------------------------------------------------------------------------- a base run set
def base_runset() -> RunSet:
    """Three runs: ragged and empty batches, string and int ids, losses at some steps, one run incomplete.

    Its tables import back (each run's last step has rows); ``test_the_unmutated_inputs_import`` checks that,
    so that the fuzz tests start from inputs that succeed."""
    rng = np.random.default_rng(0)
    runs = []
    for index, n_steps in enumerate((4, 6, 3)):
        batches = [list(rng.integers(0, 5, size=int(rng.integers(0, 4)))) for _ in range(n_steps - 1)]
        batches.append([index])  # a last step with rows: the tables carry the run's length
        logged = sorted({0, n_steps, *rng.integers(1, n_steps, size=2).tolist()})
        losses = rng.uniform(0.1, 3.0, size=(len(logged), 3)).astype(np.float32)
        rates = [np.nan if step % 3 == 0 else 0.1 / step for step in range(1, n_steps + 1)]
        runs.append(Run(f"run-{index}", Curriculum.from_batches(batches), logged, losses, rates,
                        {"seed": index, "checkpoints": []}, complete=index != 2))
    return RunSet(runs, pool_ids=["a", 7, "c", "d10", "d2"], test_ids=["t0", "t1", "t10"], metadata={"task": "fuzz"})


BASE = base_runset()

extreme_ints = st.sampled_from([0, 1, -1, 2, 3, 4, 5, 2**31, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), 10**30])
json_values = st.recursive(
    st.none() | st.booleans() | extreme_ints | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=5,
)


@st.composite
def mutation(draw, files: list[str]) -> tuple:
    """One change to one file of a run set (by relative path)."""
    target = draw(st.sampled_from(files))
    if target.endswith(".json"):
        kind = draw(st.sampled_from(["json-value", "json-drop", "bytes", "truncate", "deep", "replace"]))
    else:
        kind = draw(st.sampled_from(["bin-value", "bin-float", "bytes", "truncate", "append", "sparse", "delete",
                                     "symlink", "replace"]))
    return target, kind, draw(st.integers(0, 2**16)), draw(json_values), draw(st.binary(max_size=24))


def apply(root: Path, target: str, kind: str, number: int, value, data: bytes, outside: Path) -> None:
    path = root / target
    if not path.exists():
        return
    raw = path.read_bytes()
    if kind == "json-value" or kind == "json-drop":
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):  # already mutated into something else
            return
        if isinstance(obj, dict) and obj:
            key = sorted(obj)[number % len(obj)]
            if kind == "json-drop":
                del obj[key]
            elif isinstance(obj[key], list) and obj[key] and number % 2:
                obj[key][number % len(obj[key])] = value
            else:
                obj[key] = value
        path.write_text(json.dumps(obj, allow_nan=True))
    elif kind == "deep":
        path.write_text("[" * (1000 + number) + "]" * (1000 + number))
    elif kind == "bin-value" and len(raw) >= 8:
        array = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<i8").copy()
        array[number % len(array)] = [0, -1, 1, 2**62, 2**63 - 1, -(2**63), 2**31, 1000][number % 8]
        path.write_bytes(array.tobytes() + raw[len(array) * 8:])
    elif kind == "bin-float" and len(raw) >= 4:
        array = bytearray(raw)
        start = (number % (len(raw) // 4)) * 4
        array[start : start + 4] = np.float32([np.nan, np.inf, -np.inf, 3e38, -1.0][number % 5]).tobytes()
        path.write_bytes(bytes(array))
    elif kind == "bytes" and raw:
        array = bytearray(raw)
        for offset, byte in enumerate(data or b"\xff"):
            array[(number + offset * 7919) % len(array)] ^= byte or 0xFF
        path.write_bytes(bytes(array))
    elif kind == "truncate":
        path.write_bytes(raw[: number % (len(raw) + 1)])
    elif kind == "append":
        path.write_bytes(raw + data)
    elif kind == "sparse":
        with open(path, "r+b") as handle:
            handle.truncate(len(raw) + (number % 4 + 1) * 2**20)
    elif kind == "delete":
        path.unlink()
    elif kind == "symlink":
        path.unlink()
        path.symlink_to(outside)
    elif kind == "replace":
        path.write_bytes(data)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory) -> Path:
    return BASE.save(tmp_path_factory.mktemp("fuzz-base") / "rs")


def runset_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


@budget(150)
@given(data=st.data(), validate=st.booleans(), skip_corrupt=st.booleans())
def test_any_mutated_run_set_loads_or_fails_with_a_simfluence_error(saved_base, data, validate, skip_corrupt):
    files = runset_files(saved_base)
    changes = data.draw(st.lists(mutation(files), min_size=1, max_size=4))
    extra = data.draw(st.sampled_from([None, "file", "dir", "weird-dir", "link-dir"]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "rs"
        shutil.copytree(saved_base, root, symlinks=True)
        outside = tmp / "outside"
        outside.mkdir()
        (outside / "secret.bin").write_bytes(np.arange(256, dtype="<i8").tobytes())
        for target, kind, number, value, raw in changes:
            apply(root, target, kind, number, value, raw, outside / "secret.bin")
        if extra == "file":
            (root / "runs" / "stray.txt").write_text("x")
        elif extra == "dir":
            (root / "runs" / "empty-run").mkdir()
        elif extra == "weird-dir":
            shutil.copytree(root / "runs" / "run-1", root / "runs" / "run-1\n", symlinks=True)
        elif extra == "link-dir":
            (root / "runs" / "linked").symlink_to(outside, target_is_directory=True)
        before = snapshot(tmp)
        try:
            runset = RunSet.load(root, validate=validate, skip_corrupt=skip_corrupt)
            exercise(runset, validated=validate)
            OUTCOMES["runset: loaded"] += 1
            OUTCOMES["runset: runs skipped as corrupt"] += len(runset.skipped)
        except SimfluenceError as err:
            assert "\n" not in str(err), str(err)
            OUTCOMES["runset: SimfluenceError"] += 1
        assert snapshot(tmp) == before  # a reader writes nothing, anywhere


@budget(25)
@given(data=st.data())
def test_cli_info_on_a_mutated_run_set_is_a_result_or_one_error_line(saved_base, data):
    changes = data.draw(st.lists(mutation(runset_files(saved_base)), min_size=1, max_size=3))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rs"
        shutil.copytree(saved_base, root, symlinks=True)
        (Path(tmp) / "outside.bin").write_bytes(bytes(64))
        for target, kind, number, value, raw in changes:
            apply(root, target, kind, number, value, raw, Path(tmp) / "outside.bin")
        code, stderr = run_cli(["info", str(root)])
        one_error_line(code, stderr)
        OUTCOMES[f"cli info: exit {code}"] += 1


# ------------------------------------------------------------------------------------------- importers
def base_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    curriculum = BASE.curriculum_frame()
    curriculum["lr"] = np.concatenate([run.learning_rates[run.curriculum.step_of_entries() - 1] for run in BASE])
    return curriculum, BASE.to_frame()


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json"])
def test_the_unmutated_inputs_import(tmp_path, kind):
    paths = []
    for name, frame in zip(("curriculum", "losses"), base_tables(), strict=True):
        paths.append(tmp_path / f"{name}.{kind}")
        paths[-1].write_text(table_text(frame, kind))
    assert import_tables(*paths, out=tmp_path / "out").run_names == BASE.run_names


TOKENS = ["", "NA", "nan", "None", "-1", "0", "1e400", "-1e400", "9" * 30, "18446744073709551615", "1.5", "true",
          '"', ",", "\\n", "x y", "../up", "run-1\n", "[]", "{}", "null", "[[[[", "\x00", "é", "7.0", "007"]


@st.composite
def text_mutations(draw) -> list[tuple]:
    kinds = ["token", "token", "flip", "drop-line", "dup-line", "truncate", "insert"]
    return draw(st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 2**16), st.sampled_from(TOKENS)),
                         min_size=1, max_size=4))


def mutate_text(text: str, changes: list[tuple], separator: str) -> str:
    for kind, number, token in changes:
        lines = text.split("\n")
        line = number % len(lines)
        if kind == "token":
            cells = lines[line].split(separator)
            cells[number % len(cells)] = token
            lines[line] = separator.join(cells)
        elif kind == "flip" and text:
            position = number % len(text)
            text = text[:position] + chr((ord(text[position]) + 1 + number % 50) % 0x250) + text[position + 1 :]
            continue
        elif kind == "drop-line":
            del lines[line]
        elif kind == "dup-line":
            lines.insert(line, lines[line])
        elif kind == "truncate":
            text = text[: number % (len(text) + 1)]
            continue
        elif kind == "insert":
            lines.insert(line, token)
        text = "\n".join(lines)
    return text


def table_text(frame: pd.DataFrame, kind: str) -> str:
    if kind == "csv":
        return frame.to_csv(index=False)
    if kind == "tsv":
        return frame.to_csv(index=False, sep="\t")
    if kind == "jsonl":
        return frame.to_json(orient="records", lines=True)
    return frame.to_json(orient="records")


@budget(80)
@given(kind=st.sampled_from(["csv", "tsv", "jsonl", "json"]), which=st.sampled_from(["curriculum", "losses", "both"]),
       changes=text_mutations(), overwrite=st.booleans())
def test_any_mutated_import_table_imports_or_fails_with_a_simfluence_error(kind, which, changes, overwrite):
    curriculum, losses = base_tables()
    separator = "\t" if kind == "tsv" else ","
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for name, frame in (("curriculum", curriculum), ("losses", losses)):
            text = table_text(frame, kind)
            if which in (name, "both"):
                text = mutate_text(text, changes, separator)
            path = tmp / f"{name}.{kind}"
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            paths.append(path)
        out = tmp / "out"
        if overwrite:
            BASE.select([0]).save(out)
        before = snapshot(tmp)
        try:
            runset = import_tables(*paths, out=out, overwrite=overwrite)
            exercise(runset, validated=True)
            exercise(RunSet.load(out), validated=True)
            OUTCOMES["import: imported"] += 1
        except SimfluenceError as err:
            assert "\n" not in str(err), str(err)
            OUTCOMES["import: SimfluenceError"] += 1
            after = snapshot(tmp)
            assert after == before, set(after) ^ set(before)  # a failed import leaves everything as it was
        else:  # only out changed: no leftovers beside it
            assert {entry for entry in snapshot(tmp) if not entry.startswith("out")} == \
                {entry for entry in before if not entry.startswith("out")}


@budget(40)
@given(kind=st.sampled_from(["parquet", "csv.gz"]), which=st.sampled_from(["curriculum", "losses"]),
       flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 2**20))
def test_any_mutated_binary_table_imports_or_fails_with_a_simfluence_error(kind, which, flips, cut):
    curriculum, losses = base_tables()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for name, frame in (("curriculum", curriculum), ("losses", losses)):
            path = tmp / f"{name}.{kind}"
            if kind == "parquet":  # Parquet columns have one type: the mixed pool ids become text
                frame.astype({column: str for column in ("example", "test") if column in frame}).to_parquet(path)
            else:
                frame.to_csv(path, index=False)
            if name == which:
                raw = bytearray(path.read_bytes())
                for position, byte in flips:
                    raw[position % len(raw)] ^= byte
                path.write_bytes(bytes(raw[: cut % (len(raw) + 1)] if cut is not None else raw))
            paths.append(path)
        before = snapshot(tmp)
        try:
            exercise(import_tables(*paths, out=tmp / "out"), validated=True)
            OUTCOMES[f"{kind}: imported"] += 1
        except SimfluenceError as err:
            assert "\n" not in str(err), str(err)
            assert snapshot(tmp) == before
            OUTCOMES[f"{kind}: SimfluenceError"] += 1


@budget(40)
@given(changes=text_mutations(), as_list=st.booleans())
def test_any_mutated_gptdynamics_file_imports_or_fails_with_a_simfluence_error(changes, as_list):
    run = BASE[0]
    records = [{"id": test, "loss_trajectory": [{"step": int(s), "loss": float(v)}
                                                for s, v in zip(run.logged_steps, run.losses[:, j], strict=True)]}
               for j, test in enumerate(BASE.test_ids)]
    text = json.dumps(records) if as_list else "\n".join(json.dumps(record) for record in records)
    text = mutate_text(text, changes, ",")
    batches = [{"step": step, "samples_id": [BASE.pool_ids[i] for i in batch]}
               for step, batch in enumerate(run.curriculum.batches(), 1)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt"
        folder.mkdir()
        (folder / "all_loss_trajectory.out").write_text(text, encoding="utf-8", errors="surrogatepass")
        (folder / "train_samples_id.json").write_text("\n".join(json.dumps(batch) for batch in batches))
        try:
            read_gptdynamics_losses(folder / "all_loss_trajectory.out")
            runset = import_gptdynamics(folder, out=Path(tmp) / "out")
            exercise(runset, validated=True)
            OUTCOMES["gptdynamics: imported"] += 1
        except SimfluenceError as err:
            assert "\n" not in str(err), str(err)
            assert not (Path(tmp) / "out").exists()
            OUTCOMES["gptdynamics: SimfluenceError"] += 1


@budget(25)
@given(changes=text_mutations(), overwrite_kind=st.sampled_from([None, "runset", "user-folder", "file"]))
def test_cli_import_of_mutated_tables_is_a_result_or_one_error_line(changes, overwrite_kind):
    curriculum, losses = base_tables()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "c.csv").write_text(mutate_text(curriculum.to_csv(index=False), changes, ","))
        (tmp / "l.csv").write_text(losses.to_csv(index=False))
        out = tmp / "out"
        if overwrite_kind == "runset":
            BASE.select([1]).save(out)
        elif overwrite_kind == "user-folder":
            out.mkdir()
            (out / "precious.txt").write_text("keep me")
        elif overwrite_kind == "file":
            out.write_text("keep me")
        args = ["import", str(tmp / "c.csv"), str(tmp / "l.csv"), "--out", str(out)]
        code, stderr = run_cli(args + (["--overwrite"] if overwrite_kind else []))
        one_error_line(code, stderr)
        if overwrite_kind == "file":  # click itself refuses a file for --out: one line, exit 2, the file kept
            assert code == 2 and out.read_text() == "keep me"
            OUTCOMES["cli import: --out is a file, refused"] += 1
            return
        OUTCOMES[f"cli import: exit {code}"] += 1
        if overwrite_kind == "user-folder":
            assert code == 2 and (out / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- model files
# One fitted model of every method family, fitted on a small run set that follows a known linear model. The
# claim: whatever a model file holds, loading it ends in a ModelFileError (one line naming the file) or in a
# model whose every use (simulate, leave-one-out, what-if) gives a result or a SimfluenceError.
MODEL_KINDS = ("linear", "linear_mom", "additive", "linear_log", "additive_log", "linear_mom_log", "mean_curve",
               "sharded", "blend", "unrolled", "fixed_effects", "tracin", "influence", "trackstar")


def handmade_unrolled(runset: RunSet) -> Simulator:
    """An unrolled simulator around run 0 built from consistent arrays (a replay needs a model; the loader does not
    care where the numbers came from)."""
    from simfluence.attribution.unrolled_simulator import UnrolledSimulator

    rng = np.random.default_rng(0)
    base = runset[0].curriculum
    sim = UnrolledSimulator(target_steps=2, insertion_steps=[1, base.n_steps])
    sim.base_offsets_, sim.base_ids_ = np.asarray(base.offsets, np.int64), np.asarray(base.ids, np.int64)
    sim.base_losses_ = runset[0].dense_losses()[0]
    sim.target_steps_ = np.array([base.n_steps // 2, base.n_steps])
    sim.occurrence_effects_ = rng.normal(scale=0.01, size=(len(base.ids), 2, runset.n_test))
    sim.insertion_steps_ = np.array([1, base.n_steps])
    sim.insertion_effects_ = rng.normal(scale=0.01, size=(2, runset.n_pool, 2, runset.n_test)).astype(np.float32)
    sim._remember_ids(runset, [0])
    sim.base_run_, sim.optimizer_, sim.init_seed_, sim.seed_, sim.replay_error_ = runset[0].name, {}, 0, 0, 0.0
    sim.fitted_ = True
    return sim


def fitted_model(kind: str, runset: RunSet) -> Simulator:
    from simfluence.blend import BlendSimulator
    from simfluence.methods import make_simulator
    from simfluence.sharding import fit_sharded

    scores = np.random.default_rng(1).normal(size=(2, runset.n_pool, runset.n_test))
    gradient = {"weighting": "batch_mean", "offset": "mean_curve", "scale": "per_test"}
    if kind in ("tracin", "influence", "trackstar", "fixed_effects"):
        return make_simulator(kind, **gradient).set_scores(scores, [0, 4]).calibrate(runset)
    if kind == "unrolled":
        return handmade_unrolled(runset)
    if kind == "sharded":
        return fit_sharded(make_simulator("linear_mom", lam=1.0, momentum=0.5), runset, n_blocks=2)
    if kind == "blend":
        return BlendSimulator(members=("linear_mom_log", "additive"), weight_grid=5,
                              member_params={"linear_mom_log": {"lam": 1.0, "momentum": 0.5},
                                             "additive": {"lam": 1.0}}).fit(runset)
    fixed = {"lam": 1.0} if kind == "mean_curve" or "mom" not in kind else {"lam": 1.0, "momentum": 0.5}
    if kind == "linear":
        fixed["step_terms"] = True
    return make_simulator(kind, **({} if kind == "mean_curve" else fixed)).fit(runset)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(run set, {kind: saved model file}) for every kind of MODEL_KINDS."""
    from simfluence.synthetic import known_linear_runset

    runset, _, _ = known_linear_runset(n_pool=10, n_test=3, n_runs=4, n_steps=8, batch_size=3, seed=0)
    folder = tmp_path_factory.mktemp("models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit warnings (a lam at the grid's edge) say nothing about the files
        return runset, {kind: fitted_model(kind, runset).save(folder / f"{kind}.npz") for kind in MODEL_KINDS}


def json_dicts(meta: dict) -> list[dict]:
    """The JSON objects of a model file a mutation may edit: state and params, also those of blend members."""
    found = [meta["state"], meta["params"]]
    for member in meta["state"].get("members_", []):
        found += [member["state"], member["params"]]
    return found


def changed_array(array: np.ndarray, how: int, number: int) -> np.ndarray:
    """``array`` with its shape, dtype or one value changed (``how`` picks which, ``number`` where and to what)."""
    axis = number % max(array.ndim, 1)
    if how == 0 and array.ndim:  # one row fewer or more on one axis
        if number % 2 and array.shape[axis]:
            return np.delete(array, 0, axis=axis)
        return np.concatenate([array, np.take(array, [0], axis=axis) if array.shape[axis] else array], axis=axis)
    if how == 1:
        return [array.ravel(), array.reshape(array.shape[::-1]), np.asarray(array.ravel()[:1].sum()),
                array[None], np.zeros((0,) * max(array.ndim, 1), array.dtype)][number % 5]
    if how == 2:
        return array.astype([np.float32, np.int64, np.bool_, np.complex128, "<U3", np.uint8][number % 6])
    flat = array.ravel().copy()
    if flat.size:
        if flat.dtype.kind == "f":
            flat[number % flat.size] = [np.nan, np.inf, -np.inf, 1e308, -1.0, 0.0, 3e7][number % 7]
        elif flat.dtype.kind in "iu":
            flat[number % flat.size] = [0, -1, 1, 2**62, -(2**63), 3 * 10**7, 10**6][number % 7]
    return flat.reshape(array.shape)


def inflating_member(archive_path: Path, number: int, lying: bool) -> None:
    """Add a member that inflates to many MiB (a zip bomb) or whose header declares far more data than it holds."""
    import zipfile

    with zipfile.ZipFile(archive_path, "a", compression=zipfile.ZIP_STORED if lying else zipfile.ZIP_DEFLATED) as zf:
        with zf.open(f"extra{number}-{len(zf.namelist())}.npy", "w", force_zip64=True) as member:
            size = (number % 24 + 2) * 2**20
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (size * (1000 if lying else 1),)})
            for _ in range(1 if lying else size // 2**20):
                member.write(bytes(2**20))


MODEL_MUTATIONS = ("state-value", "state-drop", "param-value", "array-shape", "array-reshape", "array-dtype",
                   "array-value", "array-drop", "array-extra", "bytes", "truncate", "inflate", "lying-header")


def mutate_model(path: Path, kind: str, number: int, value, data: bytes) -> None:
    from simfluence._io import atomic_savez, load_npz

    if kind in ("bytes", "truncate"):
        raw = bytearray(path.read_bytes())
        if kind == "truncate":
            path.write_bytes(bytes(raw[: number % len(raw)]))
            return
        for offset, byte in enumerate(data):
            raw[(number + offset * 7919) % len(raw)] ^= byte or 0xFF
        path.write_bytes(bytes(raw))
        return
    if kind in ("inflate", "lying-header"):
        inflating_member(path, number, lying=kind == "lying-header")
        return
    arrays, meta = load_npz(path)
    if kind.startswith("array-"):
        names = sorted(arrays)
        name = names[number % len(names)]
        if kind == "array-drop":
            del arrays[name]
        elif kind == "array-extra":
            arrays[f"{name}x"] = np.zeros(2)
        else:
            how = {"array-shape": 0, "array-reshape": 1, "array-dtype": 2, "array-value": 3}[kind]
            arrays[name] = changed_array(arrays[name], how, number)
    else:
        targets = json_dicts(meta)
        target = targets[number % len(targets)] if kind != "param-value" else meta["params"]
        keys = sorted(target)
        key = keys[number % len(keys)] if keys else "n_pool_"
        if kind == "state-drop":
            target.pop(key, None)
        elif isinstance(target.get(key), list) and target[key] and number % 2:
            target[key][number % len(target[key])] = value
        else:
            target[key] = value
    with contextlib.suppress(TypeError, ValueError):  # values JSON cannot hold (NaN) leave the file as it was
        atomic_savez(path, arrays, meta)


def use_model(sim: Simulator, runset: RunSet, outcome: str) -> None:
    """Every use of a loaded model the command line makes: a result or a SimfluenceError, nothing else."""
    from simfluence.counterfactual import influence_table, loo_effects, whatif

    run = runset[0]
    everything = Curriculum.from_batches([list(range(runset.n_pool))] * (run.n_steps + 3), n_pool=runset.n_pool)
    uses = [
        lambda: sim.simulate([r.curriculum for r in runset], np.stack([r.initial_losses for r in runset])),
        lambda: sim.simulate(everything, run.initial_losses),
        lambda: sim.leave_one_out(run.curriculum, run.initial_losses),
        lambda: whatif(sim, run, {"edited": f"remove:{runset.pool_ids[1]};duplicate:{runset.pool_ids[2]}",
                                  "reversed": "reverse"}).summary(),
        lambda: loo_effects(sim, run).top(3),
        lambda: influence_table(sim, runset, run.name, tests=runset.test_ids[:2], top=2),
        lambda: sim.simulate_frame(run.curriculum, run.initial_losses),
    ]
    for use in uses:
        try:
            use()
            OUTCOMES[f"{outcome}: use gave a result"] += 1
        except SimfluenceError as err:
            assert "\n" not in str(err), str(err)
            OUTCOMES[f"{outcome}: use gave a SimfluenceError"] += 1


@pytest.mark.parametrize("model_kind", MODEL_KINDS)
@budget(8)
@given(changes=st.lists(st.tuples(st.sampled_from(MODEL_MUTATIONS), st.integers(0, 2**16),
                                  json_values | st.integers(-2, 40), st.binary(min_size=1, max_size=16)),
                        min_size=1, max_size=3))
def test_any_mutated_model_file_loads_or_fails_with_one_model_file_error(model_files, model_kind, changes):
    import tracemalloc

    from simfluence.errors import ModelFileError
    from simfluence.methods import load_simulator

    runset, files = model_files
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        shutil.copyfile(files[model_kind], path)
        for kind, number, value, data in changes:
            if path.stat().st_size:
                # a mutation of an already broken file may not apply; a cast of NaN to int is what it is
                with contextlib.suppress(Exception), np.errstate(all="ignore"):
                    mutate_model(path, kind, number, value, data)
        inflating = any(kind in ("inflate", "lying-header") for kind, *_ in changes)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # as outside the tests: numeric warnings are not errors
            if inflating:
                tracemalloc.start()
            try:
                sim = load_simulator(path)
            except ModelFileError as err:
                assert "\n" not in str(err) and str(err).startswith(repr(str(path))), str(err)
                OUTCOMES[f"model {model_kind}: ModelFileError"] += 1
                return
            finally:
                if inflating:
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    assert peak < 2 * path.stat().st_size + 32 * 2**20, peak  # no more than what the file holds
            OUTCOMES[f"model {model_kind}: loaded"] += 1
            use_model(sim, runset, f"model {model_kind}")


# ------------------------------------------------------------------------------------------- install_run
@budget(40)
@given(data=st.data(), replace=st.booleans(),
       structure=st.sampled_from([None, None, None, "drop", "extra", "text-value", "none-value"]))
def test_any_mutated_exported_run_installs_into_a_loadable_set_or_fails_with_a_simfluence_error(saved_base, data,
                                                                                                replace, structure):
    from simfluence.runlog import export_run, install_run

    files = export_run(saved_base, "run-1")
    changes = data.draw(st.lists(mutation(sorted(files)), min_size=0 if structure else 1, max_size=3))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "rs"
        shutil.copytree(saved_base, root, symlinks=True)
        if not replace:  # install as a new run
            shutil.rmtree(root / "runs" / "run-1")
        staging, outside = tmp / "staging", tmp / "outside.bin"
        staging.mkdir()
        outside.write_bytes(np.arange(32, dtype="<i8").tobytes())
        for filename, content in files.items():
            (staging / filename).write_bytes(content)
        for target, kind, number, value, raw in changes:
            apply(staging, target, kind, number, value, raw, outside)
        files = {path.name: path.read_bytes() for path in sorted(staging.iterdir()) if path.exists()}
        key = sorted(files)[0] if files else "run.json"
        if structure == "drop":
            files.pop(key, None)
        elif structure == "extra":
            files["extra.bin"] = b"x"
        elif structure == "text-value":
            files[key] = files.get(key, b"").decode("latin-1")
        elif structure == "none-value":
            files[key] = None
        before = {entry: value for entry, value in snapshot(root).items() if ".locks" not in entry}
        try:
            install_run(root, "run-1", files)
        except SimfluenceError as err:
            assert "\n" not in str(err), str(err)
            after = {entry: value for entry, value in snapshot(root).items() if ".locks" not in entry}
            assert after == before, set(after) ^ set(before)  # a refused run changes nothing
            OUTCOMES["install_run: SimfluenceError"] += 1
            return
        runset = RunSet.load(root)  # an installed run never breaks its run set
        exercise(runset, validated=True)
        OUTCOMES["install_run: installed"] += 1
