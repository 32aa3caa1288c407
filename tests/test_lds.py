"""LDS verification: random edits of base runs, retrained for real, every method's predictions scored."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from simfluence.apps.lds import format_lds_table, lds_draws, lds_scores, run_lds, write_lds_report
from simfluence.cli import main
from simfluence.curriculum import Curriculum, shuffled_epochs
from simfluence.errors import SimfluenceError, TaskError
from simfluence.runlog import Run, RunSet
from simfluence.simulators import Simulator
from simfluence.task import task_fingerprint
from simfluence.workloads import digits_task, generate_digits, task_from_runset

PROTOCOLS = ["remove-10", "move-end"]


@pytest.fixture
def base() -> Curriculum:
    """60 of a pool of 100 examples, each seen about 4 times, in 60 steps of 4."""
    return shuffled_epochs(100, 4, 60, seed=0, pool_ids=list(range(20, 80)))


def _occurrences(curriculum: Curriculum) -> dict[int, list[int]]:
    steps = curriculum.step_of_entries()
    return {int(i): sorted(steps[curriculum.ids == i].tolist()) for i in np.unique(curriculum.ids)}


# ----------------------------------------------------------------------------------------------- draws
def test_draws_are_deterministic_and_more_draws_keep_the_first(base):
    for protocol in ("remove-5", "move-end", "move-start", "half"):
        first = lds_draws(base, protocol, 3, seed=1)
        assert first == lds_draws(base, protocol, 3, seed=1)
        assert lds_draws(base, protocol, 5, seed=1)[:3] == first
        assert lds_draws(base, protocol, 3, seed=2) != first


def test_remove_drops_the_stated_fraction_of_the_used_examples_everywhere(base):
    used = np.unique(base.ids)
    for percent, count in ((1, 1), (5, 3), (10, 6)):
        for draw in lds_draws(base, f"remove-{percent}", 4, seed=0):
            gone = np.setdiff1d(used, draw.ids)
            assert gone.size == count == round(max(1, percent / 100 * used.size))
            assert draw == base.remove(gone) and draw.n_steps == base.n_steps


def test_move_end_puts_every_occurrence_of_k_examples_in_the_last_steps_keeping_batch_sizes(base):
    before = _occurrences(base)
    for draw in lds_draws(base, "move-end", 5, seed=0, k=8):
        after = _occurrences(draw)
        assert set(after) == set(before) and all(len(after[i]) == len(before[i]) for i in before)
        assert np.array_equal(draw.batch_sizes, base.batch_sizes)
        n_moved = 8 * 4  # 8 examples, each seen 4 times in the base: they fill its last 8 steps of 4
        moved = np.unique(draw.ids[-n_moved:])
        assert moved.size == 8 and all(min(after[i]) > base.n_steps - 8 for i in moved)
        others = draw.ids[~np.isin(draw.ids, moved)]
        assert np.array_equal(others, base.ids[~np.isin(base.ids, moved)])  # the rest keep their order


def test_move_start_puts_them_in_the_first_steps(base):
    for draw in lds_draws(base, "move-start", 5, seed=0, k=8):
        after = _occurrences(draw)
        moved = np.unique(draw.ids[:32])
        assert moved.size == 8 and all(max(after[i]) <= 8 for i in moved)
        assert np.array_equal(draw.batch_sizes, base.batch_sizes)


def test_subset_trains_on_a_random_share_of_the_whole_pool_in_the_bases_batch_sizes(base):
    draws = lds_draws(base, "subset-50", 4, seed=0, n_pool=100)
    assert draws == lds_draws(base, "subset-50", 4, seed=0, n_pool=100)
    chosen = []
    for draw in draws:
        assert np.array_equal(draw.batch_sizes, base.batch_sizes) and draw.n_pool == 100
        ids, counts = np.unique(draw.ids, return_counts=True)
        assert ids.size == 50 and counts.max() - counts.min() <= 1  # 240 slots: shuffled epochs over 50 examples
        chosen.append(set(ids.tolist()))
    assert any(ids - set(range(20, 80)) for ids in chosen)  # the whole pool, not only what the base used
    assert len({frozenset(ids) for ids in chosen}) == 4
    with pytest.raises(SimfluenceError, match="draws from the whole pool: pass n_pool"):
        lds_draws(Curriculum(base.offsets, base.ids), "subset-50", 2)


def test_half_keeps_every_occurrence_of_a_random_half(base):
    used = np.unique(base.ids)
    kept_sets = []
    for draw in lds_draws(base, "half", 4, seed=0):
        kept = np.unique(draw.ids)
        assert kept.size == used.size // 2
        assert draw == base.keep_only(kept)
        kept_sets.append(tuple(kept))
    assert len(set(kept_sets)) == 4


@pytest.mark.parametrize("protocol, options, message", [
    ("shuffle", {}, "unknown LDS protocol 'shuffle'"),
    ("remove-100", {}, r"must lie in \(0, 100\)"),
    ("move-end", {"k": 500}, "moves k = 500 examples; the base run used 60"),
])
def test_bad_draws_are_errors(base, protocol, options, message):
    with pytest.raises(SimfluenceError, match=message):
        lds_draws(base, protocol, 2, **options)


# ----------------------------------------------------------------------------------------------- end to end
class Oracle(Simulator):
    """Predicts the losses the draws really had (looked up in the retrained run sets)."""

    kind = "oracle"

    def __init__(self, folders: tuple = ()) -> None:
        self.folders = folders

    def fit(self, runset, runs=None, *, task=None):
        self.lookup_ = {}
        for folder in self.folders:
            for run in RunSet.load(folder):
                key = (run.curriculum.offsets.tobytes(), run.curriculum.ids.tobytes())
                self.lookup_[key] = np.asarray(run.losses, dtype=np.float64)
        self._remember_ids(runset, runs)
        self.fitted_ = True
        return self

    def simulate(self, curricula, initial_losses, learning_rates=None):
        return np.stack([self.lookup_[(c.offsets.tobytes(), c.ids.tobytes())] for c in curricula])


class PerBase(Simulator):
    """Fitted around one base run: records which, predicts that the removed examples' count matters."""

    kind = "per_base_probe"
    tags = {"exact_loo": False, "per_base": True}
    fitted_on: list = []

    def __init__(self) -> None:
        pass

    def fit(self, runset, runs=None, *, task=None):
        PerBase.fitted_on.append(list(runs))
        self._remember_ids(runset, runs)
        self.fitted_ = True
        return self

    def simulate(self, curricula, initial_losses, learning_rates=None):
        sizes = np.array([c.n_entries for c in curricula], dtype=float)
        return np.broadcast_to(-sizes[:, None, None], (len(curricula), 21, len(self.test_ids_))).copy()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lds")
    generate_digits(folder / "runs", n_runs=8, n_steps=20, batch_size=4, pool_size=40, test_size=10, workers=1,
                    progress=False)
    return folder, RunSet.load(folder / "runs")


@pytest.fixture(scope="module")
def first_lds(digits):
    folder, runset = digits
    result = run_lds(runset, ["mean_curve", "linear_mom"], holdout=3, protocols=PROTOCOLS, n_draws=6,
                     out=folder / "cli" / "retrained", workers=1, progress=False, n_boot=200)
    return folder / "cli" / "retrained", runset, result


def test_lds_retrains_every_draw_and_scores_every_method(first_lds):
    retrained, runset, result = first_lds
    assert result.bases == ["run-005", "run-006", "run-007"] and len(result.train_runs) == 5
    assert result.n_trained == 3 * (1 + 2 * 6)
    assert result.base_reproduction == 0.0  # the unedited base comes back exactly
    assert list(result.table.columns) == ["method", "protocol", "lds", "lds_low", "lds_high", "sign_agreement",
                                          "magnitude_ratio", "n_draws", "n_bases", "seconds"]
    assert len(result.table) == 4 and (result.table["n_draws"] == 6).all() and (result.table["n_bases"] == 3).all()
    assert result.actual["move-end"].shape == result.predicted["linear_mom"]["move-end"].shape == (3, 6, 10)
    mean_curve = result.table[result.table["method"] == "mean_curve"]
    assert mean_curve["lds"].isna().all() and (mean_curve["sign_agreement"] == 0).all()
    learned = result.table[result.table["method"] == "linear_mom"]
    assert np.isfinite(learned["lds"]).all() and (learned["lds_low"] <= learned["lds"]).all()
    draws = RunSet.load(retrained / "run-006")
    expected = lds_draws(runset["run-006"].curriculum, "remove-10", 6, seed=0, n_pool=40)
    assert draws["remove-10-003"].curriculum == expected[3] and draws["base"].curriculum == runset[6].curriculum


def test_an_oracle_scores_one_and_a_second_call_retrains_nothing(first_lds):
    retrained, runset, _ = first_lds
    oracle = Oracle(tuple(sorted(str(path) for path in retrained.iterdir() if path.is_dir()))).fit(runset, runs=[0])
    result = run_lds(runset, {"oracle": oracle}, holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained,
                     workers=1, progress=False, n_boot=100)
    assert result.n_trained == 0
    assert (result.table["lds"] == 1.0).all() and (result.table["sign_agreement"] == 1.0).all()
    assert np.allclose(result.table["magnitude_ratio"], 1.0)


def test_a_per_base_method_is_fitted_on_each_base_run(first_lds):
    retrained, runset, _ = first_lds
    PerBase.fitted_on.clear()
    result = run_lds(runset, {"probe": PerBase()}, holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained,
                     workers=1, progress=False, n_boot=0)
    assert PerBase.fitted_on == [[5], [6], [7]] and result.settings["per_base_methods"] == ["probe"]
    assert result.n_trained == 0


def test_report_has_table_json_and_a_plot_per_protocol(first_lds, tmp_path):
    _, _, result = first_lds
    paths = write_lds_report(result, tmp_path / "report")
    text = paths["report"].read_text()
    assert format_lds_table(result.table) in text and "**linear_mom**" in text and "LDS undefined" in text
    data = json.loads(paths["json"].read_text())
    assert len(data["table"]) == 4 and data["table"][0]["lds"] is None and data["base_reproduction"] == 0.0
    assert paths["move-end"].stat().st_size > 0 and paths["remove-10"].stat().st_size > 0


@pytest.mark.parametrize("options, message", [
    ({"n_draws": 1}, "n_draws must be >= 2"),
    ({"protocols": ["shuffle"]}, "unknown LDS protocol"),
    ({"base_runs": ["run-001"]}, "base run 'run-001' is a training run"),
    ({"holdout": 2}, "at least 3 held-out base runs"),
])
def test_bad_lds_requests_are_errors_before_any_training(digits, tmp_path, options, message):
    _, runset = digits
    with pytest.raises(SimfluenceError, match=message):
        run_lds(runset, ["linear"], **{"holdout": 3, **options}, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_cli_lds_resumes_and_writes_the_report(first_lds, capsys):
    retrained, _, _ = first_lds
    out, runs = retrained.parent, retrained.parent.parent / "runs"
    json_file = out / "table.json"
    code = main(["verify", str(runs), "--protocol", "lds", "--methods", "mean_curve,linear_mom", "--holdout", "3",
                 "--draws", "6", "--protocols", ",".join(PROTOCOLS), "--workers", "1", "--out", str(out),
                 "--json", str(json_file)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| linear_mom |" in printed and "retrained 0 run(s)" in printed
    assert (out / "report.md").is_file() and (out / "lds_move-end.png").is_file()
    assert len(json.loads(json_file.read_text())["table"]) == 4


@pytest.mark.parametrize("args, message", [
    (["--protocol", "lds", "--draws", "1"], "n_draws must be >= 2"),
    (["--protocol", "lds", "--protocols", "remove-1,shuffle"], "unknown LDS protocol 'shuffle'"),
    (["--protocol", "lds", "--methods", "nope"], "unknown method 'nope'"),
    (["--protocol", "lds", "--run", "run-007"], "--run and --tests apply to --protocol targeted"),
    (["--protocol", "lds", "--bases", "9"], "--bases must be between 1 and 3"),
    (["--draws", "5"], "--draws applies to --protocol lds"),
])
def test_cli_lds_errors_are_one_line(digits, tmp_path, capsys, args, message):
    folder, _ = digits
    code = main(["verify", str(folder / "runs"), "--holdout", "3", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _shuffled_test_rows():
    task = digits_task(pool_size=40, test_size=10, n_steps=20)
    order = torch.randperm(task.n_test, generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(task, test_inputs=task.test_inputs[order], test_targets=task.test_targets[order])


def test_resuming_with_another_task_is_refused_naming_what_changed(first_lds):
    retrained, runset, _ = first_lds
    state = json.loads((retrained / "lds-state.json").read_text())
    assert state["task_fingerprint"] == task_fingerprint(task_from_runset(runset))
    with pytest.raises(TaskError, match=r"holds runs retrained with another task \(its test data differ\); pass a "
                                        "fresh --out"):
        run_lds(runset, ["linear"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained, workers=1,
                progress=False, task=_shuffled_test_rows())
    imported = RunSet([Run(run.name, run.curriculum, run.logged_steps, np.asarray(run.losses), run.learning_rates)
                       for run in runset], runset.n_pool, runset.pool_ids, runset.test_ids, metadata={})
    with pytest.raises(TaskError, match=r"its initial weights differ"):  # no seed recorded: the task's is used
        run_lds(imported, ["linear"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained, workers=1,
                progress=False, task=dataclasses.replace(task_from_runset(runset), init_seed=4))


def test_retrained_runs_without_a_state_file_are_not_trusted(digits, tmp_path):
    _, runset = digits
    (tmp_path / "out" / "run-006" / "runs").mkdir(parents=True)
    with pytest.raises(TaskError, match="holds retrained runs of 'run-006' but no lds-state.json"):
        run_lds(runset, ["linear"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=tmp_path / "out", workers=1,
                progress=False)


def test_an_edited_retrained_run_is_an_error_naming_its_file(first_lds, tmp_path):
    retrained, runset, _ = first_lds
    copy = tmp_path / "retrained"
    shutil.copytree(retrained, copy)
    losses = copy / "run-006" / "runs" / "remove-10-002" / "losses.bin"
    data = bytearray(losses.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()
    losses.write_bytes(bytes(data))
    with pytest.raises(SimfluenceError, match=r"remove-10-002/losses.bin' does not match its checksum in .*"
                                              r"lds-state.json' \(edited or corrupted\); delete"):
        run_lds(runset, ["linear"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=copy, workers=1, progress=False)
    shutil.rmtree(losses.parent)  # as the message says: the run is retrained, the rest reused
    result = run_lds(runset, ["linear"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=copy, workers=1,
                     progress=False, n_boot=0)
    assert result.n_trained == 1


def test_lds_refuses_a_task_that_does_not_reproduce_the_base_runs_before_any_draw(digits, tmp_path):
    _, runset = digits
    with pytest.raises(TaskError, match="retraining run 'run-005' of .* does not reproduce its log"):
        run_lds(runset, ["linear"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=tmp_path / "out", workers=1,
                progress=False, task=_shuffled_test_rows())
    assert RunSet.load(tmp_path / "out" / "run-005").run_names == ["base"]


def test_multi_seed_lds_averages_the_real_changes_over_seeds(digits, tmp_path):
    _, runset = digits
    result = run_lds(runset, ["linear"], base_runs=["run-007"], holdout=3, protocols=["remove-10", "subset-50"],
                     n_draws=3, out=tmp_path / "out", workers=1, progress=False, n_boot=0, n_seeds=2)
    assert result.n_trained == 2 * (1 + 2 * 3) and result.settings["n_seeds"] == 2
    changes = []
    for folder, init_seed in (("run-007", 0), ("run-007.seed-1", 1)):
        retrained = RunSet.load(tmp_path / "out" / folder)
        assert retrained.metadata["generator"]["init_seed"] == init_seed
        finals = np.stack([np.asarray(retrained[f"remove-10-{draw:03d}"].losses[-1]) for draw in range(3)])
        changes.append(finals - np.asarray(retrained["base"].losses[-1]))
    assert not np.allclose(changes[0], changes[1])  # another seed, another model
    np.testing.assert_allclose(result.actual["remove-10"][0], np.mean(changes, axis=0), atol=1e-6)
    assert result.base_reproduction == 0.0  # the logged seed still reproduces the base exactly


def test_cli_lds_resumed_with_another_task_file_is_one_line_and_trains_nothing(first_lds, tmp_path, capsys):
    retrained, _, _ = first_lds
    out, runs = retrained.parent, retrained.parent.parent / "runs"
    spec = tmp_path / "other.py"
    spec.write_text("from simfluence.workloads import digits_task\n\n\ndef make_task():\n"
                    "    task = digits_task(pool_size=40, test_size=10, n_steps=20)\n"
                    "    task.test_inputs, task.test_targets = task.test_inputs.flip(0), task.test_targets.flip(0)\n"
                    "    return task\n")
    before = sorted(path.name for path in (retrained / "run-005" / "runs").iterdir())
    args = ["verify", str(runs), "--protocol", "lds", "--methods", "linear", "--holdout", "3", "--draws", "6",
            "--protocols", ",".join(PROTOCOLS), "--workers", "1", "--out", str(out)]
    assert main([*args, "--task", f"{spec}:make_task"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "holds runs retrained with another task (its test data differ); pass a fresh --out" in err
    assert sorted(path.name for path in (retrained / "run-005" / "runs").iterdir()) == before


def test_lds_on_some_tests_equals_the_full_lds_restricted_to_them_and_retrains_nothing(first_lds):
    retrained, runset, _ = first_lds
    full = run_lds(runset, ["additive"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained, workers=1,
                   progress=False, n_boot=0)
    chosen = [runset.test_ids[7], runset.test_ids[2], runset.test_ids[5]]  # not in column order: matched by id
    subset = run_lds(runset, ["additive"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained, workers=1,
                     progress=False, n_boot=0, tests=chosen)
    assert subset.n_trained == 0  # the draws retrained with every probe serve any subset of the tests
    assert subset.test_ids == chosen and subset.settings["n_tests"] == 3
    for protocol in PROTOCOLS:
        np.testing.assert_allclose(subset.actual[protocol], full.actual[protocol][..., [7, 2, 5]], rtol=0, atol=0)
        np.testing.assert_allclose(subset.predicted["additive"][protocol],
                                   full.predicted["additive"][protocol][..., [7, 2, 5]], rtol=1e-9, atol=1e-12)
    # additive is order-free: its move-end predictions are rounding noise, so only remove-10 has ranks to compare
    restricted = lds_scores(full.predicted["additive"]["remove-10"][..., [7, 2, 5]],
                            full.actual["remove-10"][..., [7, 2, 5]], n_boot=0)["lds"]
    scored = subset.table[subset.table["protocol"] == "remove-10"]["lds"].item()
    assert np.isfinite(scored) and scored == pytest.approx(restricted, abs=1e-12)
    with pytest.raises(SimfluenceError, match="tests: unknown test id 'nope'"):
        run_lds(runset, ["additive"], holdout=3, protocols=PROTOCOLS, n_draws=6, out=retrained, progress=False,
                tests=[chosen[0], "nope"])
