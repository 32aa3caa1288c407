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
              help="Comma-separated methods (default mean_curve,additive,linear,linear_step). "
                   "Available: mean_curve, additive, linear, linear_res, linear_step.")
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
        from simfluence.report import write_report

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
    from simfluence.plot import plot_report, plot_trajectories

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


# ------------------------------------------------------------------------------------------ demo
@cli.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the run set and metrics.json.")
def demo_command(out: str) -> None:
    """Generate a run set, fit every method, score it on held-out runs, print the table."""
    from simfluence.demo import run_demo

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
