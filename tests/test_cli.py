"""The command line end to end on a small synthetic run set, and its one-line errors."""
from __future__ import annotations

import json

import pytest

from simfluence.cli import main
from simfluence.synthetic import known_linear_runset


@pytest.fixture(scope="module")
def runset_dir(tmp_path_factory):
    runset, _, _ = known_linear_runset(n_pool=30, n_test=6, n_runs=10, n_steps=20, batch_size=4, noise=0.005)
    return str(runset.save(tmp_path_factory.mktemp("cli") / "runs"))


def test_evaluate_prints_table_and_writes_json(runset_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code = main(["evaluate", runset_dir, "--holdout", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for method in ("mean_curve", "additive", "linear", "linear_step", "linear_mom"):
        assert method in printed
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"mean_curve", "additive", "linear", "linear_step", "linear_mom"}
    for scores in metrics.values():
        assert {"all_mse", "final_mse", "rho_final", "rho_delta", "rho_runs", "fit_seconds"} <= set(scores)
    assert metrics["linear"]["all_mse"] < metrics["mean_curve"]["all_mse"]


def test_fit_then_simulate(runset_dir, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--holdout", "2", "--out", str(model)]) == 0
    csv = tmp_path / "sim.csv"
    assert main(["simulate", str(model), runset_dir, "--run", "run-009", "--out", str(csv)]) == 0
    lines = csv.read_text().splitlines()
    assert lines[0] == "step,test,predicted,actual"
    assert len(lines) == 1 + 21 * 6
    assert "simulated" in capsys.readouterr().out


def test_info(runset_dir, capsys):
    assert main(["info", runset_dir]) == 0
    assert "n_runs=10" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "{runs}", "--holdout", "10"], "--holdout must be between 1 and 9"),
        (["evaluate", "{runs}", "--methods", "linear,bogus"], "unknown method 'bogus'"),
        (["fit", "{runs}", "--method", "bogus", "--out", "{tmp}/m.npz"], "unknown method 'bogus'"),
        (["simulate", "{tmp}/none.npz", "{runs}", "--run", "run-0"], "does not exist"),
        (["evaluate", "{tmp}"], "not a run set"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(runset_dir, tmp_path, capsys, args, message):
    args = [a.format(runs=runset_dir, tmp=tmp_path) for a in args]
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.npz").exists()


def test_corrupt_run_names_the_file(runset_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runset_dir, broken)
    (broken / "runs" / "run-003" / "run.json").write_text("{not json")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(broken), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run-003" in err and "not valid JSON" in err
    assert not out.exists()
