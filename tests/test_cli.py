"""The command line end to end on a small synthetic run set, and its one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
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


def test_evaluate_json_into_a_new_folder_creates_it(runset_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "metrics.json"
    assert main(["evaluate", runset_dir, "--holdout", "3", "--methods", "mean_curve", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"mean_curve"}


def test_evaluate_json_that_cannot_be_written_fails_before_any_fitting(runset_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    code = main(["evaluate", runset_dir, "--holdout", "3", "--json", str(tmp_path / "a-file" / "metrics.json")])
    captured = capsys.readouterr()
    assert code == 2 and "a-file' is not a folder" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "fit on" not in captured.out  # nothing was fitted


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


def test_info_and_fit_say_when_learning_rates_are_missing_and_what_that_costs(runset_dir, tmp_path, capsys):
    assert main(["info", runset_dir]) == 0  # known_linear_runset logs no learning rates
    lines = [line for line in capsys.readouterr().out.splitlines() if "learning rates" in line]
    assert len(lines) == 1 and "not logged" in lines[0]
    assert "linear_mom" in lines[0] and "constant" in lines[0]  # who pays, and how
    model = str(tmp_path / "model.npz")
    assert main(["fit", runset_dir, "--lam", "0.1", "--param", "momentum=0", "--out", model]) == 0  # linear_mom
    err = capsys.readouterr().err
    assert err.startswith("simfluence: warning: learning rates not logged") and err.count("\n") == 1
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--out", model]) == 0
    assert capsys.readouterr().err == ""  # the paper's model does not use learning rates


def test_learning_rates_from_an_lr_column_are_imported_and_reported(tmp_path, capsys):
    from simfluence.runlog import RunSet

    schedule = np.linspace(0.2, 0.1, 8)
    runset, _, _ = known_linear_runset(n_pool=12, n_test=3, n_runs=4, n_steps=8, lr_schedule=schedule)
    curriculum = runset.curriculum_frame().drop(columns="lr")  # tables as a user without rates writes them
    files = [str(tmp_path / "curriculum.csv"), str(tmp_path / "losses.csv")]
    curriculum.to_csv(files[0], index=False)
    runset.to_frame().to_csv(files[1], index=False)
    out = str(tmp_path / "imported")
    assert main(["import", *files, "--out", out]) == 0
    assert "learning rates not logged" in capsys.readouterr().out  # the import says what the tables lack
    curriculum.assign(lr=schedule[curriculum["step"] - 1]).to_csv(files[0], index=False)
    assert main(["import", *files, "--out", out, "--overwrite"]) == 0
    assert "learning rates: logged" in capsys.readouterr().out
    np.testing.assert_allclose(RunSet.load(out)["run-000"].learning_rates, schedule)
    assert main(["info", out]) == 0
    assert "learning rates logged: yes" in capsys.readouterr().out
    assert main(["fit", out, "--lam", "0.1", "--param", "momentum=0", "--out", str(tmp_path / "m.npz")]) == 0
    assert capsys.readouterr().err == ""


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


def test_evaluate_report_and_plot_write_pictures(runset_dir, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["evaluate", runset_dir, "--holdout", "3", "--methods", "mean_curve,linear",
                 "--report", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "| linear |" in text and "## Verdicts" in text and "![trajectories](trajectories.png)" in text
    for name in ("trajectories.png", "final_scatter.png", "error_over_steps.png", "metrics.json"):
        assert (report / name).stat().st_size > 0
    pictures = tmp_path / "plots"
    assert main(["plot", runset_dir, "--holdout", "3", "--methods", "linear", "--run", "run-008",
                 "--tests", "1,2", "--out", str(pictures)]) == 0
    assert (pictures / "trajectories.png").stat().st_size > 0
    assert main(["plot", runset_dir, "--holdout", "3", "--methods", "linear", "--tests", "99",
                 "--out", str(pictures)]) == 2
    assert "unknown test id '99'" in capsys.readouterr().err


def test_import_csv_tables(runset_dir, tmp_path):
    from simfluence.runlog import RunSet

    original = RunSet.load(runset_dir)
    curriculum, losses = tmp_path / "curriculum.csv", tmp_path / "losses.csv"
    original.curriculum_frame().to_csv(curriculum, index=False)
    original.to_frame().to_csv(losses, index=False)
    out = tmp_path / "imported"
    assert main(["import", str(curriculum), str(losses), "--out", str(out)]) == 0
    imported = RunSet.load(out)
    assert imported.run_names == original.run_names
    assert imported[4].curriculum == original[4].curriculum
    np.testing.assert_allclose(imported[4].losses, original[4].losses, rtol=1e-6)
    assert main(["import", str(curriculum), str(losses), "--out", str(out)]) == 2  # exists, no --overwrite


def test_generate_digits_tiny(tmp_path):
    out = tmp_path / "digits"
    assert main(["generate", "digits", "--out", str(out), "--runs", "2", "--steps", "4", "--pool", "20",
                 "--test", "5", "--workers", "1"]) == 0
    from simfluence.runlog import RunSet

    runset = RunSet.load(out)
    assert len(runset) == 2 and runset[0].n_steps == 4 and runset.n_test == 5


def test_counterfactual_commands(runset_dir, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--holdout", "2", "--out", str(model)]) == 0
    csv = tmp_path / "whatif.csv"
    assert main(["whatif", str(model), runset_dir, "--run", "run-009", "--remove", "1,2", "--scenario", "reverse",
                 "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "edited" in out and "reverse" in out
    assert csv.read_text().splitlines()[0] == "scenario,step,test,loss,change"
    loo_csv = str(tmp_path / "loo.csv")
    assert main(["loo", str(model), runset_dir, "--run", "run-009", "--top", "3", "--csv", loo_csv]) == 0
    assert "helps" in capsys.readouterr().out
    result = tmp_path / "search.json"
    assert main(["search", str(model), runset_dir, "--run", "run-009", "--tests", "0,1", "--drop", "3",
                 "--json", str(result)]) == 0
    found = json.loads(result.read_text())
    assert found["predicted_change"] < 0 and 1 <= len(found["removed"]) <= 3 and found["tests"] == [0, 1]
    assert main(["search", str(model), runset_dir, "--run", "run-009", "--tests", "0,1", "--reorder", "2",
                 "--json", str(result)]) == 0
    reordered = json.loads(result.read_text())
    assert reordered["predicted_change"] < 0 and len(reordered["moves"]) >= 1
    assert main(["search", str(model), runset_dir, "--run", "run-009", "--tests", "0", "--reorder", "2",
                 "--drop", "1"]) == 2
    assert main(["whatif", str(model), runset_dir, "--run", "run-009", "--remove", "999"]) == 2
    assert "unknown pool id '999'" in capsys.readouterr().err
    assert main(["whatif", str(model), runset_dir, "--run", "run-009"]) == 2
    assert "no edits given" in capsys.readouterr().err
    assert main(["influence", str(model), runset_dir, "--run", "run-009", "--tests", "0", "--top", "2"]) == 0
    assert "rank" in capsys.readouterr().out
    assert main(["loo", str(model), runset_dir, "--run", "run-nope"]) == 2
    assert "no run named 'run-nope'" in capsys.readouterr().err


def test_generate_facts_mini(tmp_path):
    from simfluence.runlog import RunSet

    out = tmp_path / "facts"
    assert main(["generate", "facts", "--out", str(out), "--tier", "mini", "--runs", "2", "--workers", "1"]) == 0
    runset = RunSet.load(out)
    assert len(runset) == 2 and runset.metadata["workload"] == "facts"


# ------------------------------------------------------------------------------- a new user's own run set
@pytest.fixture(scope="module")
def imported_dir(tmp_path_factory):
    """A run set imported from CSV in which pool ids 0..7 are never used, and test ids t0..t11.

    So external pool id p sits at position p - 8 and test ids sort differently as text than as numbers.
    """
    import pandas as pd

    runset, _, _ = known_linear_runset(n_pool=30, n_test=12, n_runs=10, n_steps=20, batch_size=4, noise=0.005,
                                       subset_size=15)
    folder = tmp_path_factory.mktemp("own")
    curriculum = runset.curriculum_frame()
    curriculum["example"] = curriculum["example"] + 8
    losses = runset.to_frame()
    losses["test"] = "t" + losses["test"].astype(str)
    pd.DataFrame(curriculum).to_csv(folder / "curriculum.csv", index=False)
    losses.to_csv(folder / "losses.csv", index=False)
    out = folder / "imported"
    assert main(["import", str(folder / "curriculum.csv"), str(folder / "losses.csv"), "--out", str(out)]) == 0
    return str(out)


def test_a_new_users_ids_mean_the_same_in_python_and_on_the_command_line(imported_dir, tmp_path, capsys):
    from simfluence.counterfactual import loo_effects, whatif
    from simfluence.methods import load_simulator
    from simfluence.runlog import RunSet

    runset = RunSet.load(imported_dir)
    assert runset.pool_ids[0] == 8 and runset.test_ids[:3] == ["t0", "t1", "t2"]  # natural order, not t0,t1,t10
    model = tmp_path / "model.npz"
    assert main(["fit", imported_dir, "--holdout", "2", "--out", str(model)]) == 0  # no --method: linear_mom
    assert "fitted linear_mom" in capsys.readouterr().out
    sim = load_simulator(model)
    run = runset["run-009"]
    present = [runset.pool_ids[p] for p in np.flatnonzero(run.curriculum.counts(runset.n_pool) > 0)]
    chosen = present[:2]
    # Python: the id the user knows removes that example
    result = whatif(sim, run, {"drop": f"remove:{chosen[0]},{chosen[1]}"})
    expected = sim.simulate(run.curriculum.remove(runset.pool_positions(chosen)), run.initial_losses)[0, -1]
    np.testing.assert_allclose(result.trajectories[1, -1], expected)
    top = loo_effects(sim, run).top(5, tests=["t0"])
    assert set(top["pool"]) <= set(present)
    # the command line gives the same numbers for the same ids
    csv = tmp_path / "whatif.csv"
    assert main(["whatif", str(model), imported_dir, "--run", "run-009", "--remove", f"{chosen[0]},{chosen[1]}",
                 "--csv", str(csv)]) == 0
    import pandas as pd

    frame = pd.read_csv(csv)
    final = frame[(frame["scenario"] == "edited") & (frame["step"] == 20)]
    np.testing.assert_allclose(final["loss"].to_numpy(), expected, rtol=1e-12)
    assert list(final["test"]) == runset.test_ids
    # an example the run never used: an error, not a silent zero
    absent = next(p for p in runset.pool_ids if p not in present)
    capsys.readouterr()
    assert main(["whatif", str(model), imported_dir, "--run", "run-009", "--remove", str(absent)]) == 2
    err = capsys.readouterr().err
    assert f"pool id {absent} does not occur in the base curriculum" in err and len(err.splitlines()) == 1
    assert main(["loo", str(model), imported_dir, "--run", "run-009", "--tests", "t99"]) == 2
    assert "unknown test id 't99'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "{runs}", "--method", "tracin", "--lam", "1", "--out", "{tmp}/m.npz"],
         "method 'tracin' has no option 'lam'"),
        (["fit", "{runs}", "--method", "trackstar", "--lam", "1", "--out", "{tmp}/m.npz"],
         "method 'trackstar' has no option 'lam'"),
        (["fit", "{runs}", "--method", "mean_curve", "--lam", "1", "--out", "{tmp}/m.npz"],
         "method 'mean_curve' has no option 'lam'"),
        (["fit", "{runs}", "--method", "tracin", "--out", "{tmp}/m.npz"], "--task"),
        (["fit", "{runs}", "--param", "momentum", "--out", "{tmp}/m.npz"], "expected NAME=VALUE"),
        (["evaluate", "{runs}", "--param", "linear.lam=1", "--methods", "mean_curve"], "not among the methods"),
        (["fit", "{runs}", "--param", "lam_grid=[]", "--out", "{tmp}/m.npz"], "lam_grid must be a non-empty list"),
        (["fit", "{runs}", "--param", "lam_grid=abc", "--out", "{tmp}/m.npz"], "lam_grid must be a non-empty list"),
        (["fit", "{runs}", "--param", "alpha_center=x", "--out", "{tmp}/m.npz"], "alpha_center must be a number"),
    ],
)
def test_options_a_method_does_not_have_are_one_line_errors(runset_dir, tmp_path, capsys, args, message):
    args = [a.format(runs=runset_dir, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()


def test_fit_takes_any_hyper_parameter(runset_dir, tmp_path):
    from simfluence.methods import load_simulator

    model = tmp_path / "m.npz"
    assert main(["fit", runset_dir, "--method", "linear_mom", "--param", "momentum=0.5", "--param", "lam=0.1",
                 "--out", str(model)]) == 0
    sim = load_simulator(model)
    assert sim.momentum_ == 0.5 and sim.lam_ == 0.1


def test_incomplete_runs_are_left_out_and_counted(runset_dir, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(runset_dir, partial)
    info = json.loads((partial / "runs" / "run-009" / "run.json").read_text())
    info["status"] = "running"  # as a killed logger leaves it
    (partial / "runs" / "run-009" / "run.json").write_text(json.dumps(info))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(partial), "--holdout", "2", "--methods", "mean_curve", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left out 1 incomplete run(s): run-009" in captured.err
    assert "fit on 7 runs, scored on 2 held-out runs" in captured.out
    assert main(["evaluate", str(partial), "--holdout", "2", "--methods", "mean_curve", "--include-incomplete"]) == 0
    assert "fit on 8 runs" in capsys.readouterr().out


def test_plot_a_saved_model_and_what_if_scenarios_without_refitting(runset_dir, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--holdout", "2", "--out", str(model)]) == 0
    plots = tmp_path / "plots"
    assert main(["plot", runset_dir, "--model", str(model), "--out", str(plots)]) == 0
    for name in ("trajectories.png", "final_scatter.png", "error_over_steps.png"):
        assert (plots / name).stat().st_size > 0
    assert main(["plot", runset_dir, "--model", str(model), "--run", "run-009", "--scenario", "reverse",
                 "--scenario", "remove:1,2", "--out", str(plots)]) == 0
    assert (plots / "whatif.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["plot", runset_dir, "--model", str(model), "--scenario", "reverse", "--out", str(plots)]) == 2
    assert "--scenario needs exactly one --model and a --run" in capsys.readouterr().err


def test_methods_lists_the_registry(capsys):
    from simfluence.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS) and "linear_mom" in out and "(default)" in out


def test_fit_unrolled_around_one_base_run_and_ask_it(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["generate", "digits", "--out", str(out), "--runs", "3", "--steps", "6", "--pool", "20",
                 "--test", "5", "--batch-size", "4", "--workers", "1"]) == 0
    model = tmp_path / "unrolled.npz"
    capsys.readouterr()
    assert main(["fit", str(out), "--method", "unrolled", "--out", str(model)]) == 2
    assert "pass --run NAME" in capsys.readouterr().err
    assert main(["fit", str(out), "--method", "linear", "--run", "run-000", "--out", str(model)]) == 2
    assert main(["fit", str(out), "--method", "unrolled", "--run", "run-002", "--out", str(model)]) == 0
    assert main(["loo", str(model), str(out), "--run", "run-002", "--top", "2"]) == 0
    assert "helps" in capsys.readouterr().out


def test_smoothness_prints_the_score_and_what_it_implies(tmp_path, capsys):
    import json

    out = tmp_path / "digits"
    assert main(["generate", "digits", "--out", str(out), "--runs", "2", "--steps", "6", "--pool", "20",
                 "--test", "5", "--batch-size", "4", "--workers", "1"]) == 0
    capsys.readouterr()
    scores = tmp_path / "smoothness.json"
    assert main(["smoothness", str(out), "--run", "run-001", "--directions", "2", "--json", str(scores)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(scores.read_text())
    assert saved["run"] == "run-001" and len(saved["scores"]) == 2 and saved["n_replays"] == 5
    assert f"metasmoothness {saved['score']:.3f}" in printed and saved["verdict"] in printed
    assert "docs/smoothness.md" in saved["verdict"]
    assert main(["smoothness", str(out), "--run", "run-009"]) == 2
    assert "no run named 'run-009'" in capsys.readouterr().err


def test_counterfactual_commands_print_intervals_and_flag_unsure_signs(runset_dir, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--holdout", "2", "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["whatif", str(model), runset_dir, "--run", "run-009", "--remove", "1,2", "--intervals", "4"]) == 0
    out = capsys.readouterr().out
    assert "80% intervals from 4 members" in out and "mean_change_low" in out and "straddles_zero" in out
    csv = tmp_path / "loo.csv"
    assert main(["loo", str(model), runset_dir, "--run", "run-009", "--top", "2", "--intervals", "4", "--level",
                 "0.9", "--csv", str(csv)]) == 0
    assert "90% intervals" in capsys.readouterr().out
    assert csv.read_text().splitlines()[0] == "test,pool,effect,rank,low,high,straddles_zero"
    result = tmp_path / "search.json"
    assert main(["search", str(model), runset_dir, "--run", "run-009", "--tests", "0,1", "--drop", "2",
                 "--intervals", "4", "--json", str(result)]) == 0
    assert "80% interval [" in capsys.readouterr().out
    found = json.loads(result.read_text())
    assert found["change_low"] <= found["predicted_change"] <= found["change_high"]
    assert isinstance(found["straddles_zero"], bool)
    simulated = tmp_path / "simulated.csv"
    assert main(["simulate", str(model), runset_dir, "--run", "run-009", "--intervals", "4", "--out",
                 str(simulated)]) == 0
    assert "low" in capsys.readouterr().out
    frame = pd.read_csv(simulated)
    assert list(frame.columns) == ["step", "test", "predicted", "actual", "low", "high"]
    assert (frame["low"] <= frame["predicted"]).all() and (frame["predicted"] <= frame["high"]).all()
    assert (frame["high"] > frame["low"]).any()
    assert main(["loo", str(model), runset_dir, "--run", "run-009", "--level", "0.9"]) == 2
    assert "--level applies with --intervals N" in capsys.readouterr().err
    assert main(["loo", str(model), runset_dir, "--run", "run-009", "--intervals", "1"]) == 2
    assert "n_resamples must be an integer >= 2" in capsys.readouterr().err


def test_fit_says_on_one_line_when_it_falls_back_and_the_model_keeps_it(tmp_path, capsys):
    from simfluence.methods import load_simulator

    runset, _, _ = known_linear_runset(n_pool=20, n_test=3, n_runs=6, n_steps=20, batch_size=4, seed=1)
    for run in runset.runs:  # losses logged every 5 steps, as a Trainer callback with log_every=5 does
        run.logged_steps, run.losses = run.logged_steps[::5], np.asarray(run.losses)[::5]
    runs = str(runset.save(tmp_path / "runs"))
    assert main(["fit", runs, "--method", "linear_mom", "--param", "lam_grid=[1.0]", "--out",
                 str(tmp_path / "m.npz")]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if line.startswith("simfluence: warning: SimfluenceLinear:")]
    assert len(warned) == 1 and "momentum='auto' fell back to 0" in warned[0] and "every 5 steps" in warned[0]
    assert load_simulator(tmp_path / "m.npz").fit_warnings_ == [warned[0].removeprefix("simfluence: warning: ")]


def test_a_run_set_without_test_examples_is_refused_in_one_line(tmp_path, capsys):
    from simfluence.curriculum import Curriculum
    from simfluence.runlog import Run, RunSet

    cur = Curriculum.from_batches([[0, 1], [1, 2]], n_pool=3)
    runs = RunSet([Run(f"r{i}", cur, [0, 1, 2], np.zeros((3, 0))) for i in range(4)], n_pool=3, test_ids=[])
    folder = str(runs.save(tmp_path / "runs"))
    for args in (["fit", folder, "--out", str(tmp_path / "m.npz")], ["evaluate", folder, "--holdout", "1"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "no test examples (n_test = 0)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("args, message", [
    (["--param", "bogus=1"], "has no option 'bogus'"),
    (["--protocol", "lds", "--param", "linear_mom.bogus=1"], "has no option 'bogus'"),
    (["--protocol", "lds", "--methods", "linear", "--param", "linear_mom.lam=1"], "not among the methods scored"),
    (["--protocol", "lds", "--param", "lam=1"], "expected METHOD.NAME=VALUE"),
])
def test_verify_refuses_bad_params_in_one_line_before_any_work(runset_dir, tmp_path, capsys, args, message):
    assert main(["verify", runset_dir, "--holdout", "3", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_verify_fits_the_method_with_the_params_given(runset_dir, tmp_path, monkeypatch):
    import simfluence.apps.lds
    import simfluence.apps.verify
    import simfluence.workloads
    from simfluence.errors import SimfluenceError

    seen = {}

    def stop(key):
        def record(first, *args, **kwargs):
            seen[key] = first
            raise SimfluenceError("stopped before retraining")
        return record

    monkeypatch.setattr(simfluence.workloads, "task_for_runset", lambda runset, spec: None)
    monkeypatch.setattr(simfluence.apps.verify, "verify_counterfactuals", stop("targeted"))
    monkeypatch.setattr(simfluence.apps.lds, "run_lds", lambda runset, methods, **kwargs: stop("lds")(methods))
    out = str(tmp_path / "out")
    assert main(["verify", runset_dir, "--holdout", "3", "--param", "momentum=0.5", "--param", "lam=0.1",
                 "--out", out]) == 2
    assert seen["targeted"].momentum_ == 0.5 and seen["targeted"].lam_ == 0.1
    assert main(["verify", runset_dir, "--protocol", "lds", "--methods", "mean_curve,linear_mom", "--holdout", "3",
                 "--param", "linear_mom.momentum=0.5", "--out", out]) == 2
    assert set(seen["lds"]) == {"mean_curve", "linear_mom"} and seen["lds"]["linear_mom"].momentum == 0.5


def test_whatif_moves_every_occurrence_or_one_and_warns_about_unseen_batch_sizes(runset_dir, tmp_path, capsys):
    from simfluence.runlog import RunSet

    model = tmp_path / "model.npz"
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--holdout", "2", "--out", str(model)]) == 0
    run = RunSet.load(runset_dir)["run-009"]
    example = int(run.curriculum.ids[0])
    csv = tmp_path / "whatif.csv"
    capsys.readouterr()
    assert main(["whatif", str(model), runset_dir, "--run", "run-009", "--move", f"{example}@{run.n_steps}",
                 "--scenario", f"move:{example}#1@{run.n_steps}", "--csv", str(csv)]) == 0
    assert "warning" not in capsys.readouterr().err  # moves keep the batch sizes of training (4)
    crowded = ";".join([f"duplicate:{example}@3"] * 6)
    assert main(["whatif", str(model), runset_dir, "--run", "run-009", "--scenario", crowded]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simfluence: warning: ") and "step 3 has a batch of 10" in err[0]


def test_simulate_prints_and_writes_the_library_simulate_frame_with_its_intervals(runset_dir, tmp_path, capsys):
    """`simulate --intervals N` is simulate_frame(intervals=Bootstrap(model, n_resamples=N)) plus the logged losses."""
    from simfluence.methods import load_simulator
    from simfluence.runlog import RunSet
    from simfluence.uncertainty import Bootstrap

    model, csv = tmp_path / "model.npz", tmp_path / "sim.csv"
    assert main(["fit", runset_dir, "--method", "linear", "--lam", "0.1", "--holdout", "2", "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(model), runset_dir, "--run", "run-009", "--intervals", "3", "--out", str(csv)]) == 0
    printed = capsys.readouterr().out.splitlines()
    runset, simulator = RunSet.load(runset_dir), load_simulator(str(model))
    run = runset["run-009"]
    expected = simulator.simulate_frame(run.curriculum, run.initial_losses, [run.learning_rates],
                                        intervals=Bootstrap(simulator, n_resamples=3).fit(runset))
    frame = pd.read_csv(csv)
    assert np.allclose(frame["predicted"], expected["loss"]) and np.allclose(frame["low"], expected["low"])
    assert np.allclose(frame["high"], expected["high"])
    assert np.allclose(frame["actual"], run.dense_losses()[0].ravel())
    last = printed[-2].split()  # the final step's means: step, simulated, logged, low, high
    assert int(last[0]) == 20 and np.allclose([float(v) for v in last[1:]],
                                              [expected[expected.step == 20][c].mean() for c in ("loss",)]
                                              + [run.losses[-1].mean()]
                                              + [expected[expected.step == 20][c].mean() for c in ("low", "high")],
                                              atol=1e-4)


def test_cli_defaults_are_the_library_defaults():
    """The CLI restates no library default: its options' defaults are the library's constants."""
    import inspect
    from pathlib import Path

    import simfluence.cli as cli_module
    from simfluence.evaluation import DEFAULT_HOLDOUT
    from simfluence.methods import DEFAULT_METHOD

    def default(command: str, option: str):
        return next(p.default for p in cli_module.cli.commands[command].params if p.name == option)

    assert default("fit", "method") == default("verify", "method") == DEFAULT_METHOD
    assert default("evaluate", "holdout") == default("plot", "holdout") == default("verify", "holdout") \
        == DEFAULT_HOLDOUT
    commands = [*cli_module.cli.commands.values(), *cli_module.cli.commands["generate"].commands.values()]
    left_to_the_library = [param for command in commands for param in command.params
                           if isinstance(param, cli_module._LibraryDefault)]
    assert len(left_to_the_library) >= 20
    for param in left_to_the_library:  # each names a library default that exists, which --help shows
        assert param.default is None and param.library_value() is not inspect.Parameter.empty, param.name
    source = Path(cli_module.__file__).read_text()
    for literal in (f'"{DEFAULT_METHOD}"', "default 0.8", "0.8 if", "8 if k", "10 if k", "40 if", "bm25,tracin",
                    "default=48", "default=200", "default=0.5"):
        assert literal not in source, literal
