"""The ``simfluence`` command line: a thin layer over the library.

Each command parses its options, calls the library, prints a table and writes files atomically. Errors
the user can cause (a malformed log, an unknown id, a bad option) become one ``simfluence: error: ...``
line on stderr and exit status 2, with no traceback and nothing half-written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from simfluence._io import atomic_write_bytes, atomic_write_json
from simfluence.errors import SimfluenceError


def _fail(message: str) -> None:
    raise click.exceptions.Exit(_print_error(message))


def _print_error(message: str) -> int:
    click.echo(f"simfluence: error: {message}", err=True)
    return 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="simfluence")
def cli() -> None:
    """Training data attribution by simulating training runs (Simfluence)."""


# ------------------------------------------------------------------------------------------ import
@cli.command("import")
@click.argument("curriculum", type=click.Path(exists=True, dir_okay=False))
@click.argument("losses", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run-set folder to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder at --out.")
def import_command(curriculum: str, losses: str, out: str, overwrite: bool) -> None:
    """Import long-form tables (CSV, JSONL or Parquet) into a run set.

    CURRICULUM has columns run, step, example (one row per batch entry, steps from 1); LOSSES has
    columns run, step, test, loss (step 0 = initial loss).
    """
    from simfluence.importers import import_tables

    runset = import_tables(curriculum, losses, out=out, overwrite=overwrite)
    click.echo(
        f"imported {len(runset)} runs, pool {runset.n_pool}, {runset.n_test} test examples -> {out}"
    )


# ------------------------------------------------------------------------------------------ generate
@cli.group("generate")
def generate_group() -> None:
    """Train real models on many curricula and log the runs (built-in workloads)."""


@generate_group.command("digits")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run-set folder (resumed if present).")
@click.option("--runs", "n_runs", default=48, show_default=True, help="Number of runs (curricula).")
@click.option("--steps", "n_steps", default=200, show_default=True, help="Training steps per run.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--pool", "pool_size", default=500, show_default=True, help="Training pool size.")
@click.option("--test", "test_size", default=100, show_default=True, help="Number of test (probe) examples.")
@click.option("--subset-fraction", default=0.5, show_default=True, help="Share of the pool each run trains on.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: per optimizer).")
@click.option("--label-noise", default=0.0, show_default=True, help="Fraction of pool labels flipped.")
@click.option("--seed", default=0, show_default=True, help="Seed of curricula and initial weights.")
@click.option("--log-every", default=1, show_default=True, help="Log test losses every k steps.")
@click.option("--checkpoint-steps", default="", help="Comma-separated steps at which to save checkpoints.")
@click.option("--workers", type=int, default=None, help="Parallel processes (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Delete an existing run set at --out first.")
def generate_digits_command(out: str, checkpoint_steps: str, **options) -> None:
    """Digits MLP runs: scikit-learn's bundled digits, random pool subsets in random order."""
    from simfluence.workloads import generate_digits

    try:
        steps = tuple(int(part) for part in checkpoint_steps.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{checkpoint_steps!r} is not a comma-separated list of steps") from None
    runset = generate_digits(out, checkpoint_steps=steps, progress=True, **options)
    click.echo(f"{runset!r}")


@generate_group.command("facts")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run-set folder (resumed if present).")
@click.option("--tier", type=click.Choice(["mini", "default"]), default="default", show_default=True,
              help="World and model size (mini: seconds, for tests; default: a few minutes).")
@click.option("--runs", "n_runs", type=int, default=None, help="Number of fine-tuning runs (default: per tier).")
@click.option("--seed", default=0, show_default=True, help="Seed of the curricula.")
@click.option("--data-seed", default=0, show_default=True, help="Seed of the synthetic fact world.")
@click.option("--log-every", default=1, show_default=True, help="Log query losses every k steps.")
@click.option("--checkpoint-steps", default="", help="Comma-separated steps at which to save checkpoints.")
@click.option("--workers", type=int, default=None, help="Parallel processes (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Delete an existing run set at --out first.")
def generate_facts_command(out: str, checkpoint_steps: str, **options) -> None:
    """Tiny transformer LM fine-tuned on synthetic fact documents; test examples are fact queries."""
    from simfluence.workloads import generate_facts

    try:
        steps = tuple(int(part) for part in checkpoint_steps.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{checkpoint_steps!r} is not a comma-separated list of steps") from None
    runset = generate_facts(out, checkpoint_steps=steps, progress=True, **options)
    click.echo(f"{runset!r}")


# ------------------------------------------------------------------------------------------ info
@cli.command("info")
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
def info_command(runset_dir: str) -> None:
    """Summarise a run set: sizes, steps, logging, learning rates."""
    from simfluence.runlog import RunSet

    runset = RunSet.load(runset_dir)
    click.echo(repr(runset))
    if len(runset):
        steps = np.array([run.n_steps for run in runset])
        logged = np.array([len(run.logged_steps) for run in runset])
        incomplete = [run.name for run in runset if not run.complete]
        click.echo(f"steps per run: {steps.min()}..{steps.max()}; logged steps per run: {logged.min()}..{logged.max()}")
        click.echo(f"runs: {runset.run_names[0]} .. {runset.run_names[-1]}")
        has_lr = all(np.isfinite(run.learning_rates).all() for run in runset)
        click.echo(f"learning rates logged: {'yes' if has_lr else 'no (or partly)'}")
        if incomplete:
            click.echo(f"incomplete runs: {', '.join(incomplete)}")


# ------------------------------------------------------------------------------------------ fit
def _parse_lam(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'auto'") from None


@cli.command("fit")
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--method", default="linear_step", show_default=True, help="Simulator (see `evaluate --help`).")
@click.option("--lam", default=None, help="Ridge strength, or 'auto' (chosen on validation runs).")
@click.option("--holdout", default=0, show_default=True, help="Leave the last K runs out of fitting.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.npz).")
def fit_command(runset_dir: str, method: str, lam: str | None, holdout: int, out: str) -> None:
    """Fit a simulator to a run set and save it."""
    from simfluence.evaluation import split_runs
    from simfluence.runlog import RunSet
    from simfluence.simulators import make_simulator

    runset = RunSet.load(runset_dir)
    params = {} if lam is None or method == "mean_curve" else {"lam": _parse_lam(lam)}
    simulator = make_simulator(method, **params)
    train = split_runs(len(runset), holdout)[0] if holdout else list(range(len(runset)))
    simulator.fit(runset, runs=train)
    simulator.save(out)
    chosen = getattr(simulator, "lam_", None)
    extra = f", lam={chosen:g}" if chosen is not None else ""
    click.echo(f"fitted {method} on {len(train)} runs{extra} -> {out}")


# ------------------------------------------------------------------------------------------ simulate
@cli.command("simulate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_name", required=True, help="Run whose curriculum and initial losses to use.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write step, test, predicted, actual as CSV.")
def simulate_command(model: str, runset_dir: str, run_name: str, out: str | None) -> None:
    """Simulate a logged run's curriculum with a saved model and compare with the real losses."""
    import pandas as pd

    from simfluence.runlog import RunSet
    from simfluence.simulators import load_simulator, rollout_runs

    simulator = load_simulator(model)
    runset = RunSet.load(runset_dir)
    index = runset.run_names.index(runset[run_name].name)
    predicted, actual, mask = rollout_runs(simulator, runset, [index])
    predicted, actual, mask = predicted[0], actual[0], mask[0]
    steps = np.flatnonzero(mask)
    show = np.unique(np.linspace(0, steps.size - 1, min(steps.size, 6)).round().astype(int))
    click.echo(f"run {run_name}: mean test loss, simulated vs logged")
    click.echo(f"{'step':>6} {'simulated':>10} {'logged':>10}")
    for step in steps[show]:
        click.echo(f"{step:>6} {predicted[step].mean():>10.4f} {actual[step].mean():>10.4f}")
    if out:
        grid_steps, grid_tests = np.meshgrid(np.arange(predicted.shape[0]), np.arange(predicted.shape[1]),
                                             indexing="ij")
        frame = pd.DataFrame({
            "step": grid_steps.ravel(),
            "test": np.asarray(runset.test_ids, dtype=object)[grid_tests.ravel()],
            "predicted": predicted.ravel(),
            "actual": actual.ravel(),
        })
        atomic_write_bytes(out, frame.to_csv(index=False).encode())
        click.echo(f"wrote {out}")


# ------------------------------------------------------------------------------------------ evaluate
@cli.command("evaluate")
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--holdout", default=8, show_default=True, help="Score on the last K runs, fit on the rest.")
@click.option("--methods", default=None,
              help="Comma-separated methods (default mean_curve,additive,linear,linear_step,linear_mom). "
                   "Also: linear_res; with checkpoints in the run set: tracin, tracin_cos, influence, trackstar.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Also write report.md, metrics.json and plots into this folder.")
def evaluate_command(
    runset_dir: str, holdout: int, methods: str | None, json_out: str | None, report_dir: str | None
) -> None:
    """Fit every method on all but the last K runs and score it on those K."""
    from simfluence.metrics import format_table

    runset, result = _evaluate(runset_dir, holdout, methods)
    click.echo(f"fit on {len(result.train_runs)} runs, scored on {len(result.heldout_runs)} held-out runs")
    click.echo(format_table(result.metrics))
    if json_out:
        from simfluence.evaluation import metrics_json

        atomic_write_json(json_out, metrics_json(result.metrics))
        click.echo(f"wrote {json_out}")
    if report_dir:
        from simfluence.apps.report import write_report

        click.echo(f"wrote {write_report(result, runset, report_dir)}")


def _evaluate(runset_dir: str, holdout: int, methods: str | None):
    from simfluence.evaluation import evaluate, parse_methods
    from simfluence.runlog import RunSet
    from simfluence.simulators import DEFAULT_METHODS

    names = parse_methods(methods) if methods else list(DEFAULT_METHODS)
    runset = RunSet.load(runset_dir)
    return runset, evaluate(runset, names, holdout=holdout, progress=True)


# ------------------------------------------------------------------------------------------ plot
@cli.command("plot")
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--holdout", default=8, show_default=True, help="Fit on all but the last K runs, plot those K.")
@click.option("--methods", default=None, help="Comma-separated methods (default: as in evaluate).")
@click.option("--run", "run_name", default=None, help="Held-out run for the loss-curve panels (default: first).")
@click.option("--tests", default=None, help="Comma-separated test ids for the loss-curve panels.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
def plot_command(
    runset_dir: str, holdout: int, methods: str | None, run_name: str | None, tests: str | None, out: str
) -> None:
    """Simulated vs real loss curves, final-loss scatter and error over steps on held-out runs."""
    from simfluence.apps.plot import plot_report, plot_trajectories

    runset, result = _evaluate(runset_dir, holdout, methods)
    paths = plot_report(result, out, test_labels=runset.test_ids)
    if run_name is not None or tests is not None:
        if run_name is not None and run_name not in result.heldout_runs:
            raise SimfluenceError(f"--run {run_name!r} is not one of the held-out runs {result.heldout_runs}")
        run = result.heldout_runs.index(run_name) if run_name is not None else 0
        chosen = None
        if tests is not None:
            lookup = {str(test): index for index, test in enumerate(runset.test_ids)}
            unknown = [part for part in tests.split(",") if part.strip() not in lookup]
            if unknown:
                raise SimfluenceError(f"unknown test id {unknown[0]!r}")
            chosen = [lookup[part.strip()] for part in tests.split(",")]
        plot_trajectories(result.predicted, result.actual, result.mask, run=run, tests=chosen,
                          test_labels=runset.test_ids, run_label=result.heldout_runs[run],
                          path=paths["trajectories"])
    for path in paths.values():
        click.echo(f"wrote {path}")


# ------------------------------------------------------------------------------------------ counterfactuals
def _id_lookup(ids: list, what: str) -> dict[str, int]:
    return {str(value): index for index, value in enumerate(ids)}


def _internal_ids(text: str, lookup: dict[str, int], what: str) -> list[int]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in parts if part not in lookup]
    if unknown:
        raise SimfluenceError(f"unknown {what} id {unknown[0]!r}")
    return [lookup[part] for part in parts]


def _translate_edit(text: str, pool: dict[str, int]) -> str:
    """An edit written with external pool ids -> the same edit with internal positions."""
    kind, _, rest = text.strip().partition(":")
    if kind in ("remove", "keep"):
        return f"{kind}:" + ",".join(map(str, _internal_ids(rest, pool, "pool")))
    if kind in ("duplicate", "move"):
        example, sep, step = rest.partition("@")
        return f"{kind}:{_internal_ids(example, pool, 'pool')[0]}{sep}{step}"
    if kind == "replace":
        old, _, new = rest.partition(">")
        return f"replace:{_internal_ids(old, pool, 'pool')[0]}>{_internal_ids(new, pool, 'pool')[0]}"
    return text.strip()


def _load_model_and_run(model: str, runset_dir: str, run_name: str):
    from simfluence.runlog import RunSet
    from simfluence.simulators import load_simulator

    simulator = load_simulator(model)
    runset = RunSet.load(runset_dir)
    run = runset[run_name]
    lrs = run.learning_rates if np.isfinite(run.learning_rates).all() else None
    return simulator, runset, run, lrs


@cli.command("whatif")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_name", required=True, help="Run whose curriculum is the base.")
@click.option("--remove", help="Pool ids to remove from every batch (comma-separated).")
@click.option("--keep", help="Keep only these pool ids.")
@click.option("--duplicate", help="ID or ID@STEP: add another occurrence.")
@click.option("--move", help="ID@STEP: move the first occurrence of ID to STEP.")
@click.option("--swap", help="A,B: swap the batches of steps A and B.")
@click.option("--reverse", is_flag=True, help="Reverse the order of the batches.")
@click.option("--scenario", "scenarios", multiple=True,
              help="Extra scenario: edits separated by ';', e.g. 'remove:12,40;reverse' (repeatable).")
@click.option("--tests", help="Test ids to show (default: the 5 most changed).")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write scenario,step,test,loss,change.")
def whatif_command(model, runset_dir, run_name, remove, keep, duplicate, move, swap, reverse, scenarios, tests,
                   csv_out) -> None:
    """Predict a logged run's curriculum with edits; compare every scenario with the base."""
    import pandas as pd

    from simfluence.counterfactual import whatif

    simulator, runset, run, lrs = _load_model_and_run(model, runset_dir, run_name)
    pool = _id_lookup(runset.pool_ids, "pool")
    edits = [f"{kind}:{value}" for kind, value in
             (("remove", remove), ("keep", keep), ("duplicate", duplicate), ("move", move), ("swap", swap))
             if value] + (["reverse"] if reverse else [])
    named = {}
    if edits:
        named["edited"] = [_translate_edit(edit, pool) for edit in edits]
    for text in scenarios:
        named[text] = [_translate_edit(edit, pool) for edit in text.split(";") if edit.strip()]
    if not named:
        raise SimfluenceError("no edits given (use --remove, --keep, --duplicate, --move, --swap, --reverse "
                              "or --scenario)")
    result = whatif(simulator, run.curriculum, named, run.initial_losses, lrs, test_ids=runset.test_ids)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        click.echo(result.summary().to_string(float_format=lambda v: f"{v:.4f}"))
        final = result.final()
        if tests:
            columns = _internal_ids(tests, _id_lookup(runset.test_ids, "test"), "test")
        else:
            columns = list(np.argsort(-np.abs(result.change[1:, -1]).max(axis=0))[:5])
        click.echo("\npredicted final loss of selected test examples:")
        click.echo(final.iloc[:, columns].to_string(float_format=lambda v: f"{v:.4f}"))
    if csv_out:
        atomic_write_bytes(csv_out, result.frame().to_csv(index=False).encode())
        click.echo(f"wrote {csv_out}")


@cli.command("loo")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_name", required=True, help="Run whose curriculum is the base.")
@click.option("--top", default=10, show_default=True, help="How many helpful and harmful examples to list.")
@click.option("--tests", help="Average the effect over these test ids (default: all).")
@click.option("--step", type=int, default=None, help="Compare losses at this step (default: the final one).")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write test,pool,effect,rank for all.")
def loo_command(model, runset_dir, run_name, top, tests, step, csv_out) -> None:
    """Leave-one-out effect of every pool example of a run's curriculum (exact and fast for linear models)."""
    from simfluence.counterfactual import loo_effects

    simulator, runset, run, lrs = _load_model_and_run(model, runset_dir, run_name)
    chosen = _internal_ids(tests, _id_lookup(runset.test_ids, "test"), "test") if tests else None
    effects = loo_effects(simulator, run.curriculum, run.initial_losses, lrs, step=step,
                          pool_ids=runset.pool_ids, test_ids=runset.test_ids)
    target = "all test examples" if chosen is None else f"test {tests}"
    click.echo(f"effect on the loss of {target} of removing each example (positive: it helps)")
    click.echo(effects.top(top, chosen).to_string(index=False, float_format=lambda v: f"{v:+.5f}"))
    if csv_out:
        atomic_write_bytes(csv_out, effects.frame().to_csv(index=False).encode())
        click.echo(f"wrote {csv_out}")


@cli.command("influence")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_name", required=True, help="Run whose curriculum the scores refer to.")
@click.option("--tests", help="Test ids to show (default: the first 3).")
@click.option("--top", default=5, show_default=True, help="Proponents and opponents per test example.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write the full table (all tests) as CSV.")
def influence_command(model, runset_dir, run_name, tests, top, csv_out) -> None:
    """Top proponents and opponents of test examples, for any saved simulator (learned or gradient-based)."""
    from simfluence.counterfactual import influence_table

    simulator, runset, run, _ = _load_model_and_run(model, runset_dir, run_name)
    chosen = (_internal_ids(tests, _id_lookup(runset.test_ids, "test"), "test") if tests
              else list(range(min(3, runset.n_test))))
    table = influence_table(simulator, runset, run.name, tests=chosen, top=top)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:+.5f}"))
    if csv_out:
        atomic_write_bytes(csv_out, influence_table(simulator, runset, run.name).to_csv(index=False).encode())
        click.echo(f"wrote {csv_out}")


@cli.command("search")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_name", required=True, help="Run whose curriculum is the starting point.")
@click.option("--tests", required=True, help="Target test ids (comma-separated).")
@click.option("--drop", type=int, default=None, help="Remove at most K examples.")
@click.option("--subset", "subset_size", type=int, default=None, help="Keep M distinct examples.")
@click.option("--reorder", type=int, default=None, help="Instead of dropping: make up to K reordering moves.")
@click.option("--maximize", is_flag=True, help="Raise the targets' loss instead of lowering it.")
@click.option("--per-round", default=1, show_default=True, help="Examples removed per greedy round.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result as JSON.")
def search_command(model, runset_dir, run_name, tests, drop, subset_size, reorder, maximize, per_round,
                   json_out) -> None:
    """Greedy curriculum search: which examples to drop (or when to show them) to lower or raise chosen test losses."""
    from simfluence.counterfactual import search_curriculum, search_order

    simulator, runset, run, lrs = _load_model_and_run(model, runset_dir, run_name)
    targets = _internal_ids(tests, _id_lookup(runset.test_ids, "test"), "test")
    if reorder is not None:
        if drop is not None or subset_size is not None:
            raise SimfluenceError("give one budget: --drop, --subset or --reorder")
        order = search_order(simulator, run.curriculum, run.initial_losses, targets, moves=reorder,
                             maximize=maximize, learning_rates=lrs)
        moves = [(runset.pool_ids[i], where) for i, where in order.moves]
        click.echo("moves: " + (", ".join(f"{pid} -> {where}" for pid, where in moves) or "none improves"))
        click.echo(f"predicted mean final loss of the targets: {order.objective[0]:.4f} -> {order.objective[-1]:.4f}"
                   f" ({order.predicted_change:+.4f})")
        if json_out:
            atomic_write_json(json_out, {
                "run": run.name, "tests": [runset.test_ids[i] for i in targets],
                "moves": [[pid, where] for pid, where in moves],
                "objective": [float(v) for v in order.objective], "predicted_change": order.predicted_change,
            })
            click.echo(f"wrote {json_out}")
        return
    result = search_curriculum(simulator, run.curriculum, run.initial_losses, targets, drop=drop,
                               subset_size=subset_size, maximize=maximize, per_round=per_round,
                               learning_rates=lrs)
    removed = [runset.pool_ids[i] for i in result.removed]
    click.echo(f"removed {len(removed)} examples: {', '.join(map(str, removed[:50]))}"
               + (" ..." if len(removed) > 50 else ""))
    click.echo(f"predicted mean final loss of the targets: {result.objective[0]:.4f} -> {result.objective[-1]:.4f}"
               f" ({result.predicted_change:+.4f})")
    if json_out:
        atomic_write_json(json_out, {
            "run": run.name, "tests": [runset.test_ids[i] for i in targets], "removed": removed,
            "objective": [float(v) for v in result.objective], "predicted_change": result.predicted_change,
        })
        click.echo(f"wrote {json_out}")


@cli.command("verify")
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--method", default="linear_mom", show_default=True, help="Simulator to check.")
@click.option("--holdout", default=8, show_default=True, help="Fit on all but the last K runs.")
@click.option("--run", "run_name", default=None, help="Held-out base run (default: the last run).")
@click.option("--tests", default=None, help="Target test ids (default: the 10 with the highest final loss).")
@click.option("--k", default=10, show_default=True, help="Examples per edit.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for results and retrained runs.")
@click.option("--workers", type=int, default=None, help="Parallel training processes.")
def verify_command(runset_dir, method, holdout, run_name, tests, k, out, workers) -> None:
    """Retrain real models on counterfactual curricula and compare with the simulator's predictions."""
    import pandas as pd

    from simfluence.apps.plot import plot_verification
    from simfluence.apps.verify import verify_counterfactuals
    from simfluence.evaluation import split_runs
    from simfluence.runlog import RunSet
    from simfluence.simulators import make_simulator

    runset = RunSet.load(runset_dir)
    train, heldout = split_runs(len(runset), holdout)
    base = runset[run_name] if run_name else runset[heldout[-1]]
    if runset.run_names.index(base.name) in train:
        raise SimfluenceError(f"--run {base.name!r} is a training run; choose one of the last {holdout} runs")
    targets = (_internal_ids(tests, _id_lookup(runset.test_ids, "test"), "test") if tests
               else [int(i) for i in np.argsort(-np.asarray(base.losses[-1]))[:10]])
    click.echo(f"fitting {method} on {len(train)} runs")
    simulator = make_simulator(method).fit(runset, runs=train)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = verify_counterfactuals(simulator, runset, base.name, targets, k=k, out=out_dir / "retrained",
                                    workers=workers)
    with pd.option_context("display.width", 160):
        click.echo(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    click.echo(f"retraining the base curriculum reproduces the logged run to {result.base_reproduction:.1e}")
    atomic_write_json(out_dir / "verify.json", {
        "method": method, "run": base.name, "targets": [runset.test_ids[i] for i in targets], "k": k,
        "base_reproduction": result.base_reproduction,
        "table": [{key: (None if isinstance(value, float) and not np.isfinite(value) else value)
                   for key, value in row.items()} for row in result.table.to_dict(orient="records")],
    })
    plot_verification(result.names, result.predicted, result.actual, result.tests, path=out_dir / "verify.png")
    click.echo(f"wrote {out_dir / 'verify.json'} and {out_dir / 'verify.png'}")


# ------------------------------------------------------------------------------------------ trace
@cli.command("trace")
@click.argument("runset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--methods", default="bm25,tracin,cosine,trackstar,simfluence", show_default=True,
              help="Comma-separated methods (also trackstar-no-opt, trackstar-no-hessian, trackstar-train-hessian, "
                   "trackstar-no-unit).")
@click.option("--run", "run_index", default=0, show_default=True, help="Run whose checkpoints gradient methods use.")
@click.option("--simulator", "simulator_method", default="linear_mom", show_default=True,
              help="Simulator behind the simfluence method.")
@click.option("--no-tail-patch", is_flag=True, help="Skip the tail-patch (one-step influence) column.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the table as JSON records.")
def trace_command(runset_dir, methods, run_index, simulator_method, no_tail_patch, json_out) -> None:
    """Fact tracing on a facts run set: MRR, recall@10, precision@10 and tail-patch per method and bucket."""
    from simfluence.apps.factbench import format_factbench, run_factbench
    from simfluence.runlog import RunSet

    chosen = [method.strip() for method in methods.split(",") if method.strip()]
    frame = run_factbench(RunSet.load(runset_dir), methods=chosen, run=run_index, simulator_method=simulator_method,
                          tail_patch=not no_tail_patch, echo=lambda message: click.echo(message, err=True))
    click.echo(format_factbench(frame))
    if json_out:
        atomic_write_json(json_out, frame.to_dict(orient="records"))
        click.echo(f"wrote {json_out}")


# ------------------------------------------------------------------------------------------ demo
@cli.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the run set and metrics.json.")
def demo_command(out: str) -> None:
    """Generate a run set, fit every method, score it on held-out runs, print the table."""
    from simfluence.apps.demo import run_demo

    run_demo(Path(out), echo=click.echo)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning library errors into one stderr line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="simfluence", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        return int(exit_.exit_code)
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        return _print_error("aborted")
    except SimfluenceError as err:
        return _print_error(str(err))
    except OSError as err:
        return _print_error(f"{type(err).__name__}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
