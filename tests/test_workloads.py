"""The built-in workloads (digits, facts): their metadata, and where ``simfluence generate`` may write."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from simfluence.errors import RunLogError
from simfluence.runlog import RunSet
from simfluence.workloads import WORKLOADS, generate_digits

POOL, TEST = 40, 10


def test_generate_digits_records_noisy_labels(tmp_path):
    runs = WORKLOADS["digits"](tmp_path / "rs", n_runs=2, n_steps=5, pool_size=POOL, test_size=TEST,
                               label_noise=0.25, workers=1, progress=False)
    assert isinstance(runs, RunSet) and len(runs) == 2
    meta = runs.metadata
    noisy = np.array(meta["noisy_pool_ids"])
    assert noisy.size == 10
    labels, clean = np.array(meta["pool_labels"]), np.array(meta["pool_clean_labels"])
    assert np.array_equal(np.flatnonzero(labels != clean), noisy)
    assert set(meta["pool_dataset_rows"]).isdisjoint(meta["test_dataset_rows"])
    assert generate_digits is WORKLOADS["digits"]


# ------------------------------------------------------------------ where generate may write (issues 22.1, 22.2)
TINY = ["--runs", "2", "--steps", "3", "--pool", "60", "--test", "10", "--workers", "1"]


def user_folder(root: Path) -> dict[str, str]:
    """The attack of issue 22.1: a web app whose manifest.json is not a run set's."""
    (root / "src").mkdir(parents=True)
    (root / "manifest.json").write_text('{"name":"PWA"}')
    (root / "src" / "index.js").write_text("x")
    return {"manifest.json": '{"name":"PWA"}', "src/index.js": "x"}


def files_of(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("workload", [["digits"], ["facts", "--tier", "mini"]])
def test_generate_never_writes_into_or_replaces_a_folder_that_is_not_a_run_set(tmp_path, capsys, overwrite,
                                                                              workload):
    from simfluence.cli import main

    expected = user_folder(tmp_path / "webapp")
    tiny = TINY if workload == ["digits"] else ["--runs", "2", "--workers", "1"]
    assert main(["generate", *workload, "--out", str(tmp_path / "webapp"), *overwrite, *tiny]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simfluence: error: ") and err.count("\n") == 1 and "is not a run set" in err, err
    assert files_of(tmp_path / "webapp") == expected
    assert sorted(os.listdir(tmp_path)) == ["webapp"]  # nothing created beside it either


def test_generate_into_the_working_directory_refuses_unless_it_is_empty_or_a_run_set(tmp_path, capsys,
                                                                                     monkeypatch):
    from simfluence.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        assert main(["generate", "digits", "--out", ".", *overwrite, *TINY]) == 2
        assert "is not a run set" in capsys.readouterr().err
    assert files_of(tmp_path) == {"notes.txt": "mine"}
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert main(["generate", "digits", "--out", ".", *TINY]) == 0
    assert main(["generate", "digits", "--out", ".", "--overwrite", "--lr", "0.05", *TINY]) == 0
    runs = RunSet.load(tmp_path / "empty")
    assert len(runs) == 2 and all(np.nanmax(run.learning_rates) == pytest.approx(0.05) for run in runs)
    assert sorted(os.listdir(tmp_path)) == ["empty", "notes.txt"]  # nothing left beside the set


def test_a_facts_overwrite_is_built_aside_with_its_corpus_and_base_and_swapped_in(tmp_path):
    from simfluence.workloads.facts import BASE_FILE, CORPUS_FILE, generate_facts

    out = tmp_path / "facts"
    generate_facts(out, tier="mini", n_runs=1, workers=1, progress=False)
    with pytest.raises(RunLogError, match="different task settings"):  # the old corpus is not written over
        generate_facts(out, tier="mini", n_runs=1, data_seed=1, workers=1, progress=False)
    corpus = (out / CORPUS_FILE).read_bytes()
    again = generate_facts(out, tier="mini", n_runs=1, data_seed=1, workers=1, progress=False, overwrite=True)
    assert again.metadata["data_seed"] == 1 and again[0].complete and (out / BASE_FILE).is_file()
    assert (out / CORPUS_FILE).read_bytes() != corpus
    assert sorted(os.listdir(tmp_path)) == ["facts"]
