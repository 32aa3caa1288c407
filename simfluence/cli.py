"""The ``simfluence`` command line: a thin layer over the library.

Each command parses its options, calls the library, prints a table and writes files atomically. Errors
the user can cause (a malformed log, an unknown id, a bad option) become one ``simfluence: error: ...``
line on stderr and exit status 2, with no traceback and nothing half-written.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import click
import numpy as np

from simfluence._io import atomic_write_bytes, atomic_write_json
from simfluence.apps.lds import DEFAULT_DRAWS, DEFAULT_MOVED, DEFAULT_PROTOCOLS
from simfluence.apps.verify import DEFAULT_EDIT_SIZE, DEFAULT_N_TARGETS
from simfluence.errors import SimfluenceError, SimfluenceWarning
from simfluence.evaluation import DEFAULT_HOLDOUT
from simfluence.methods import DEFAULT_METHOD, DEFAULT_METHODS
from simfluence.uncertainty import DEFAULT_LEVEL


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
@click.option("--overwrite", is_flag=True, help="Replace a run set (or an empty folder) at --out.")
def import_command(curriculum: str, losses: str, out: str, overwrite: bool) -> None:
    """Import long-form tables (CSV, JSONL or Parquet) into a run set.

    CURRICULUM has columns run, step, example (one row per batch entry, steps from 1) and optionally lr
    (the step's learning rate, the same on every row of a step); LOSSES has columns run, step, test, loss
    (step 0 = initial loss). Format details: runs/README.md.
    """
    from simfluence.importers import import_tables

    runset = import_tables(curriculum, losses, out=out, overwrite=overwrite)
    click.echo(
        f"imported {len(runset)} runs, pool {runset.n_pool}, {runset.n_test} test examples -> {out}"
    )
    click.echo(_learning_rate_note(runset.runs) or "learning rates: logged")


def _learning_rate_note(runs) -> str | None:
    """One line naming the first step without a learning rate and what that costs; None when every step has one."""
    from simfluence.methods import METHODS

    lacking = [run for run in runs if run.known_learning_rates is None]
    if not lacking:
        return None
    step = int(np.flatnonzero(~np.isfinite(lacking[0].learning_rates))[0]) + 1
    users = ", ".join(name for name, entry in METHODS.items() if entry.preset.get("lr_scaled") == "auto")
    return (f"learning rates not logged at every step ({len(lacking)} of {len(runs)} runs; first run "
            f"{lacking[0].name!r}, step {step}): {users} then assume a constant rate (no learning-rate scaling "
            "of example effects)")


# ------------------------------------------------------------------------------------------ generate
@cli.group("generate")
def generate_group() -> None:
    """Train real models on many curricula and log the runs (built-in workloads or your own task)."""


def _comma_separated(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[str, ...] | None:
    """Click callback: ``"a, b,c"`` -> ``("a", "b", "c")`` (blank parts dropped); None (not given) stays None."""
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def _comma_separated_ints(ctx: click.Context, param: click.Parameter, text: str) -> tuple[int, ...]:
    """Click callback: ``"10,20"`` -> ``(10, 20)``."""
    try:
        return tuple(int(part) for part in _comma_separated(ctx, param, text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of steps") from None


class _LibraryDefault(click.Option):
    """An option left unset (None) for the library to fill in with its own default: ``library_default`` names it,
    as ``"module:NAME"`` (a constant) or ``"module:function"`` (the default of its parameter named as the option's
    value, e.g. ``n_runs`` of ``--runs``). ``--help``
    shows its value, importing the module only then (it may import torch); the command passes on only the options
    given (:func:`_given`)."""

    def __init__(self, *args, library_default: str, **kwargs) -> None:
        super().__init__(*args, default=None, show_default=True, **kwargs)
        self.library_default = library_default

    def library_value(self):
        import importlib
        import inspect

        module, _, name = self.library_default.partition(":")
        value = getattr(importlib.import_module(module), name)
        return inspect.signature(value).parameters[self.name].default if inspect.isfunction(value) else value

    def get_help_extra(self, ctx: click.Context):
        return {**super().get_help_extra(ctx), "default": _shown(self.library_value())}


def _library_option(library_default: str):
    """``click.option`` for options whose defaults are the library's (:class:`_LibraryDefault`)."""
    return functools.partial(click.option, cls=_LibraryDefault, library_default=library_default)


_digits_option = _library_option("simfluence.workloads:generate_digits")
_facts_option = _library_option("simfluence.workloads:generate_facts")
_task_runs_option = _library_option("simfluence.training:generate_random_runs")


def _given(options: dict) -> dict:
    """The options the user gave (not None): the library's defaults apply to the others."""
    return {name: value for name, value in options.items() if value is not None}


def _shown(value) -> str:
    """A library default as the CLI writes it: a list comma-separated, a number in short form."""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _ray_option(what: str):
    """``--ray [ADDRESS]``: do ``what`` as Ray tasks (``backend="ray"``) instead of on this machine alone."""
    def to_backend(ctx: click.Context, param: click.Parameter, value: str | None) -> dict:
        if value is None:
            return {"backend": "local", "ray_address": None}
        return {"backend": "ray", "ray_address": None if value == "local" else value}

    return click.option(
        "--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]", callback=to_backend,
        help=f"{what} as Ray tasks: --ray alone starts Ray on this machine; --ray auto joins this "
        "machine's cluster; --ray ray://HOST:10001 a remote one (pip install 'simfluence[ray]').",
    )


_device_option = click.option(
    "--device", default=None, help="Torch device to train on, e.g. cuda (default: the CPU); a run trained off the "
    "CPU records it, since a CPU replay differs in the last bits.")


@generate_group.command("digits")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run-set folder (resumed if present).")
@_digits_option("--runs", "n_runs", type=int, help="Number of runs (curricula).")
@_digits_option("--steps", "n_steps", type=int, help="Training steps per run.")
@_digits_option("--batch-size", type=int)
@_digits_option("--pool", "pool_size", type=int, help="Training pool size.")
@_digits_option("--test", "test_size", type=int, help="Number of test (probe) examples.")
@_digits_option("--subset-fraction", type=float, help="Share of the pool each run trains on.")
@_digits_option("--optimizer", type=click.Choice(["sgd", "adam"]))
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: per optimizer).")
@_digits_option("--eps-root", type=float,
                help="Adam only: epsilon inside the square root (simfluence.optim.Adam); 0 = torch's Adam.")
@click.option("--smooth", is_flag=True, help="The smooth training recipe, chosen by metasmoothness (SGD, larger "
              "batches: simfluence.workloads.digits.SMOOTH; see docs/smooth_training.md).")
@_digits_option("--label-noise", type=float, help="Fraction of pool labels flipped.")
@_digits_option("--seed", type=int, help="Seed of curricula and initial weights.")
@_digits_option("--log-every", type=int, help="Log test losses every k steps.")
@click.option("--checkpoint-steps", default="", callback=_comma_separated_ints,
              help="Comma-separated steps at which to save checkpoints.")
@click.option("--workers", type=int, default=None, help="Parallel processes (default: one per core).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run set at --out: the new one is built aside and swapped in when complete.")
@_ray_option("Train the runs")
@_device_option
def generate_digits_command(out: str, checkpoint_steps: tuple[int, ...], ray: dict, **options) -> None:
    """Digits MLP runs: scikit-learn's bundled digits, random pool subsets in random order."""
    from simfluence.workloads import generate_digits

    runset = generate_digits(out, checkpoint_steps=checkpoint_steps, progress=True, **ray, **_given(options))
    click.echo(f"{runset!r}")


@generate_group.command("facts")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run-set folder (resumed if present).")
@_facts_option("--tier", type=click.Choice(["mini", "default", "hard"]),
               help="World and model size (mini: seconds, for tests; default: a few minutes; hard: default sizes "
               "in a world of shared names, aliases and decoy sentences, where BM25 is not perfect).")
@click.option("--runs", "n_runs", type=int, default=None, help="Number of fine-tuning runs (default: per tier).")
@click.option("--smooth", is_flag=True, help="Fine-tune with the smooth training recipe, chosen by metasmoothness "
              "(AdamW with eps inside the square root: simfluence.workloads.facts.SMOOTH; see "
              "docs/smooth_training.md).")
@_facts_option("--seed", type=int, help="Seed of the curricula.")
@_facts_option("--data-seed", type=int, help="Seed of the synthetic fact world.")
@_facts_option("--log-every", type=int, help="Log query losses every k steps.")
@click.option("--checkpoint-steps", default="", callback=_comma_separated_ints,
              help="Comma-separated steps at which to save checkpoints.")
@click.option("--workers", type=int, default=None, help="Parallel processes (default: one per core).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run set at --out: the new one is built aside and swapped in when complete.")
@_ray_option("Train the runs")
@_device_option
def generate_facts_command(out: str, checkpoint_steps: tuple[int, ...], ray: dict, **options) -> None:
    """Tiny transformer LM fine-tuned on synthetic fact documents; test examples are fact queries."""
    from simfluence.workloads import generate_facts

    runset = generate_facts(out, checkpoint_steps=checkpoint_steps, progress=True, **ray, **_given(options))
    click.echo(f"{runset!r}")


@generate_group.command("task")
@click.option("--task", "task_spec", required=True,
              help="Your task: path/to/file.py:function (or package.module:function) returning a simfluence Task.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run-set folder (resumed if present).")
@_task_runs_option("--runs", "n_runs", type=int, help="Number of runs (curricula).")
@_task_runs_option("--steps", "n_steps", type=int, help="Training steps per run.")
@_task_runs_option("--batch-size", type=int)
@_task_runs_option("--subset-fraction", type=float, help="Share of the pool each run trains on.")
@_task_runs_option("--seed", type=int,
                   help="Seed of the curricula (the initial weights come from the task's init_seed).")
@_task_runs_option("--log-every", type=int, help="Log test losses every k steps.")
@click.option("--checkpoint-steps", default="", callback=_comma_separated_ints,
              help="Comma-separated steps at which to save checkpoints.")
@click.option("--workers", type=int, default=None, help="Parallel processes (default: one per core).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run set at --out: the new one is built aside and swapped in when complete.")
@_ray_option("Train the runs")
@_device_option
def generate_task_command(task_spec: str, out: str, checkpoint_steps: tuple[int, ...], ray: dict, **options) -> None:
    """Runs of your own task: random pool subsets in random order, all from the task's initial weights."""
    from simfluence.task import load_task
    from simfluence.training import generate_random_runs

    runset = generate_random_runs(load_task(task_spec), out, checkpoint_steps=checkpoint_steps,
                                  progress=True, **ray, **_given(options))
    click.echo(f"{runset!r}")


# ------------------------------------------------------------------------------------------ info
@cli.command("info")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
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
        click.echo(_learning_rate_note(runset.runs) or "learning rates logged: yes")
        if incomplete:
            click.echo(f"incomplete runs: {', '.join(incomplete)}")


# ------------------------------------------------------------------------------------------ shared options
def _runset_options(function):
    """--include-incomplete and --skip-corrupt, for commands that fit or score on a run set."""
    function = click.option("--skip-corrupt", is_flag=True,
                            help="Leave out runs that cannot be read (they are named) instead of stopping.")(function)
    return click.option("--include-incomplete", is_flag=True,
                        help="Also use runs whose logger never closed (left out by default).")(function)


def _load_runset(runset_dir: str, skip_corrupt: bool = False):
    """Open a run set; with ``skip_corrupt`` unreadable runs are left out and each is named on stderr."""
    from simfluence.runlog import RunSet

    if not skip_corrupt:
        return RunSet.load(runset_dir)
    runset = RunSet.load(runset_dir, skip_corrupt=True)
    for name, reason in runset.skipped:
        click.echo(f"simfluence: warning: left out corrupt run {name!r}: {reason}", err=True)
    return runset


def _usable_runs(runset, include_incomplete: bool) -> list[int]:
    """Positions of the runs to use; says how many incomplete runs were left out."""
    from simfluence.evaluation import complete_positions

    used, excluded = complete_positions(runset, include_incomplete)
    if excluded:
        click.echo(f"left out {len(excluded)} incomplete run(s): {', '.join(excluded[:5])}"
                   + (" ..." if len(excluded) > 5 else "") + " (--include-incomplete uses them)", err=True)
    return used


def _check_output_file(path: str | None, option: str) -> None:
    """Before any work: ``path`` (of ``option``) can be written, its missing parent folders created later."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise SimfluenceError(f"{option} {path!r} is a folder, not a file")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SimfluenceError(f"{option} {path!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SimfluenceError(f"{option} {path!r}: folder {str(parent)!r} is not writable")


def _write_json_file(path: str, obj) -> None:
    """Write JSON atomically to ``path``, creating its parent folders (as ``--report`` does)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def _parse_value(text: str):
    """A hyper-parameter value: JSON (numbers, true/false, lists, quoted strings), else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_params(items: tuple[str, ...], prefixed: bool = False) -> dict:
    """``NAME=VALUE`` (or ``METHOD.NAME=VALUE`` when ``prefixed``) options into a dict (nested per method)."""
    params: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SimfluenceError(f"--param {item!r}: expected NAME=VALUE")
        if prefixed:
            method_name, dot, key = key.partition(".")
            if not dot or not key:
                raise SimfluenceError(f"--param {item!r}: expected METHOD.NAME=VALUE, e.g. linear.lam=1")
            params.setdefault(method_name, {})[key] = _parse_value(value)
        else:
            params[key] = _parse_value(value)
    return params


def _method_help() -> str:
    from simfluence.methods import METHODS

    return "; ".join(f"{name}: {entry.description}" for name, entry in METHODS.items())


def _task_option(function):
    """--task FILE.py:FUNCTION, the run set's task for what needs the model (passed on as the library's ``task=``)."""
    return click.option("--task", "task_spec", default=None,
                        help="Task of the run set, as path/to/file.py:function returning a simfluence Task (needed by "
                             "methods that use the model, when the run set records no built-in workload).")(function)


# ------------------------------------------------------------------------------------------ fit
def _lam(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    """Click callback: a ridge strength, or ``"auto"``."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'auto'") from None


@cli.command("fit")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help="Simulator (list: `simfluence methods`).")
@click.option("--lam", default=None, callback=_lam, help="Ridge strength, or 'auto' (chosen on validation runs).")
@click.option("--param", "param_items", multiple=True, metavar="NAME=VALUE",
              help="Any hyper-parameter of the method, e.g. --param momentum=0.8 (repeatable).")
@click.option("--holdout", default=0, show_default=True, help="Leave the last K runs out of fitting.")
@click.option("--run", "base_run", default=None,
              help="The one base run of a method fitted around a single run (unrolled).")
@_task_option
@_runset_options
@click.option("--blocks", "n_blocks", type=click.IntRange(min=1), default=None,
              help="Fit in this many blocks of test examples (linear family; with --ray, default one per CPU).")
@_ray_option("Fit the test blocks")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.npz).")
def fit_command(runset_dir: str, method: str, lam: float | str | None, param_items: tuple[str, ...], holdout: int,
                base_run: str | None, task_spec: str | None, include_incomplete: bool, skip_corrupt: bool,
                n_blocks: int | None, ray: dict, out: str) -> None:
    """Fit a simulator to a run set and save it.

    With --blocks or --ray the test examples are fitted in blocks (one after another, or as Ray tasks on a
    cluster) and merged into one model, equal to the one-piece fit (simfluence.sharding).
    """
    from simfluence.evaluation import split_runs
    from simfluence.methods import method as registry_entry
    from simfluence.simulators.base import is_per_base

    entry = registry_entry(method)
    params = _parse_params(param_items)
    if lam is not None:
        params["lam"] = lam
    simulator = entry.build(**params)
    if task_spec is not None and "task" not in entry.needs:
        raise SimfluenceError(f"method {method!r} does not use a model; --task is only for "
                              "tracin, influence, trackstar and their variants")
    runset = _load_runset(runset_dir, skip_corrupt)
    per_base = is_per_base(simulator)
    if per_base != (base_run is not None):
        raise SimfluenceError(f"method {method!r} is fitted around one base run: pass --run NAME" if per_base
                              else f"--run is only for methods fitted around one base run, not {method!r}")
    if per_base:
        train = [runset.position(base_run)]
    else:
        used = _usable_runs(runset, include_incomplete)
        train = [used[i] for i in split_runs(len(used), holdout)[0]] if holdout else used
    if n_blocks is not None or ray["backend"] == "ray":
        from simfluence.sharding import fit_sharded

        fit_sharded(simulator, runset, train, n_blocks=n_blocks, progress=True, **ray)
    else:
        simulator.fit(runset, runs=train, task=task_spec)
    if simulator.get_params().get("lr_scaled") == "auto" and (note := _learning_rate_note([runset[i] for i in train])):
        click.echo(f"simfluence: warning: {note}", err=True)
    simulator.save(out)
    chosen = getattr(simulator, "lam_", None)
    extra = f", lam={chosen:g}" if chosen is not None else ""
    click.echo(f"fitted {method} on {len(train)} runs{extra} -> {out}")


@cli.command("methods")
def methods_command() -> None:
    """List the methods: name, what each needs, description."""
    from simfluence.methods import DEFAULT_METHOD, METHODS

    for name, entry in METHODS.items():
        needs = f" [needs {', '.join(sorted(entry.needs))}]" if entry.needs else ""
        default = " (default)" if name == DEFAULT_METHOD else ""
        click.echo(f"{name:<24}{entry.description}{needs}{default}")


# ------------------------------------------------------------------------------------------ simulate
def _interval_options(function):
    """--intervals N and --level, for the counterfactual commands."""
    function = click.option("--level", type=float, default=None,
                            help=f"Coverage of the intervals (default {DEFAULT_LEVEL:g}: "
                                 f"{100 * DEFAULT_LEVEL:g}% intervals).")(function)
    return click.option("--intervals", "n_intervals", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Prediction intervals from N members refitted on halves of the model's training runs "
                             "(calibrated on held-back runs; 0: off): the library's Bootstrap(model, "
                             "n_resamples=N, level=LEVEL); answers whose interval contains 0 are flagged.")(function)


def _intervals(simulator, runset, n_intervals: int, level: float | None):
    """``--intervals N --level L`` as the library's object: ``Bootstrap(simulator, n_resamples=N, level=L)`` fitted
    on ``runset`` (None with --intervals 0), described in one line. The one place the count becomes the object."""
    if n_intervals == 0:
        if level is not None:
            raise SimfluenceError("--level applies with --intervals N")
        return None
    from simfluence.uncertainty import Bootstrap

    intervals = Bootstrap(simulator, n_resamples=n_intervals, level=DEFAULT_LEVEL if level is None else level)
    intervals.fit(runset)
    click.echo(intervals.describe())
    return intervals


@cli.command("simulate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--run", "run_name", required=True, help="Run whose curriculum and initial losses to use.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write step, test, predicted, actual as CSV.")
@_interval_options
def simulate_command(model: str, runset_dir: str, run_name: str, out: str | None, n_intervals: int,
                     level: float | None) -> None:
    """Simulate a logged run's curriculum with a saved model and compare with the real losses."""
    simulator, runset, run = _load_model_and_run(model, runset_dir, run_name)
    rates = run.known_learning_rates
    frame = simulator.simulate_frame(run.curriculum, run.initial_losses, None if rates is None else [rates],
                                     intervals=_intervals(simulator, runset, n_intervals, level))
    actual, logged = run.dense_losses()
    frame = frame.drop(columns="curriculum").rename(columns={"loss": "predicted"})
    frame.insert(3, "actual", actual.ravel())
    bounded = "low" in frame
    shown = ["predicted", "actual"] + (["low", "high"] if bounded else [])
    step_means = {column: frame[column].to_numpy().reshape(actual.shape).mean(axis=1) for column in shown}
    steps = np.flatnonzero(logged)
    show = np.unique(np.linspace(0, steps.size - 1, min(steps.size, 6)).round().astype(int))
    click.echo(f"run {run_name}: mean test loss, simulated vs logged")
    click.echo(f"{'step':>6} {'simulated':>10} {'logged':>10}" + (f" {'low':>10} {'high':>10}" if bounded else ""))
    for step in steps[show]:
        click.echo(f"{step:>6}" + "".join(f" {step_means[column][step]:>10.4f}" for column in shown))
    if out:
        atomic_write_bytes(out, frame.to_csv(index=False).encode())
        click.echo(f"wrote {out}")


# ------------------------------------------------------------------------------------------ evaluate
@cli.command("evaluate")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--holdout", default=DEFAULT_HOLDOUT, show_default=True,
              help="Score on the last K runs, fit on the rest.")
@click.option("--methods", default=None, callback=_comma_separated,
              help=f"Comma-separated methods (default {_shown(DEFAULT_METHODS)}; list: `simfluence methods`).")
@click.option("--param", "param_items", multiple=True, metavar="METHOD.NAME=VALUE",
              help="A hyper-parameter of one method, e.g. --param linear.lam=1 (repeatable).")
@_task_option
@_runset_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Also write report.md, metrics.json and plots into this folder.")
def evaluate_command(runset_dir: str, holdout: int, methods: tuple[str, ...] | None, param_items: tuple[str, ...],
                     task_spec: str | None, include_incomplete: bool, skip_corrupt: bool, json_out: str | None,
                     report_dir: str | None) -> None:
    """Fit every method on all but the last K runs and score it on those K."""
    from simfluence.metrics import format_table

    _check_output_file(json_out, "--json")
    runset, result = _evaluate(runset_dir, holdout, methods, param_items, task_spec, include_incomplete,
                               skip_corrupt)
    click.echo(f"fit on {len(result.train_runs)} runs, scored on {len(result.heldout_runs)} held-out runs")
    click.echo(format_table(result.metrics))
    if json_out:
        from simfluence.evaluation import metrics_json

        _write_json_file(json_out, metrics_json(result.metrics))
        click.echo(f"wrote {json_out}")
    if report_dir:
        from simfluence.apps.report import write_report

        click.echo(f"wrote {write_report(result, runset, report_dir)}")


def _evaluate(runset_dir: str, holdout: int, methods: tuple[str, ...] | None, param_items: tuple[str, ...] = (),
              task_spec: str | None = None, include_incomplete: bool = False, skip_corrupt: bool = False):
    from simfluence.evaluation import evaluate, parse_methods

    names = parse_methods(methods or DEFAULT_METHODS)
    params = _parse_params(param_items, prefixed=True)
    stray = [name for name in params if name not in names]
    if stray:
        raise SimfluenceError(f"--param for {stray[0]!r}, which is not among the methods evaluated")
    runset = _load_runset(runset_dir, skip_corrupt)
    _usable_runs(runset, include_incomplete)
    return runset, evaluate(runset, names, holdout=holdout, params=params, progress=True, task=task_spec,
                            include_incomplete=include_incomplete)


# ------------------------------------------------------------------------------------------ plot
@cli.command("plot")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--holdout", default=DEFAULT_HOLDOUT, show_default=True,
              help="Fit on all but the last K runs, plot those K.")
@click.option("--methods", default=None, callback=_comma_separated,
              help="Comma-separated methods to fit (default: as in evaluate).")
@click.option("--model", "models", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Plot a saved model instead of fitting (repeatable); scored on the runs it was not fitted on.")
@click.option("--scenario", "scenarios", multiple=True,
              help="With one --model and --run: plot this what-if scenario of the run, edits separated by ';' "
                   "(e.g. 'remove:12,40;reverse'; repeatable).")
@click.option("--run", "run_name", default=None, help="Held-out run for the loss-curve panels (default: first).")
@click.option("--tests", default=None, help="Comma-separated test ids for the loss-curve panels.")
@_runset_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
def plot_command(runset_dir: str, holdout: int, methods: tuple[str, ...] | None, models: tuple[str, ...],
                 scenarios: tuple[str, ...], run_name: str | None, tests: str | None, include_incomplete: bool,
                 skip_corrupt: bool, out: str) -> None:
    """Simulated vs real loss curves, final-loss scatter and error over steps; or what-if scenarios of a run."""
    from simfluence.apps.plot import plot_report, plot_trajectories, plot_whatif

    if scenarios:
        if len(models) != 1 or run_name is None:
            raise SimfluenceError("--scenario needs exactly one --model and a --run")
        from simfluence.counterfactual import whatif

        simulator, runset, run = _load_model_and_run(models[0], runset_dir, run_name)
        result = whatif(simulator, run, {text: text for text in scenarios})
        actual, _ = run.dense_losses()
        path = Path(out) / "whatif.png"
        Path(out).mkdir(parents=True, exist_ok=True)
        plot_whatif(result, tests=tests, actual=actual, path=path)
        click.echo(f"wrote {path}")
        return
    if models:
        if methods:
            raise SimfluenceError("give --methods (fit them) or --model (saved ones), not both")
        runset, result = _score_saved(models, runset_dir, skip_corrupt, include_incomplete)
    else:
        runset, result = _evaluate(runset_dir, holdout, methods, include_incomplete=include_incomplete,
                                   skip_corrupt=skip_corrupt)
    paths = plot_report(result, out, test_labels=runset.test_ids)
    if run_name is not None or tests is not None:
        if run_name is not None and run_name not in result.heldout_runs:
            raise SimfluenceError(f"--run {run_name!r} is not one of the held-out runs {result.heldout_runs}")
        run = result.heldout_runs.index(run_name) if run_name is not None else 0
        chosen = None if tests is None else [int(i) for i in runset.test_positions(tests)]
        plot_trajectories(result.predicted, result.actual, result.mask, run=run, tests=chosen,
                          test_labels=runset.test_ids, run_label=result.heldout_runs[run],
                          path=paths["trajectories"])
    for path in paths.values():
        click.echo(f"wrote {path}")


def _score_saved(models: tuple[str, ...], runset_dir: str, skip_corrupt: bool, include_incomplete: bool):
    """Score saved models on the (complete) runs none of them was fitted on."""
    from simfluence.evaluation import score
    from simfluence.methods import load_simulator

    runset = _load_runset(runset_dir, skip_corrupt)
    simulators = {}
    for path in models:
        simulator = load_simulator(path)
        simulators[f"{simulator.kind} ({Path(path).stem})" if simulator.kind in simulators else simulator.kind] = \
            simulator
    fitted_on = set().union(*(set(sim.train_runs_) for sim in simulators.values()))
    runs = [i for i in _usable_runs(runset, include_incomplete) if runset[i].name not in fitted_on]
    if not runs:
        raise SimfluenceError("every run of the run set was used to fit the model(s); nothing held out to plot")
    return runset, score(simulators, runset, runs)


# ------------------------------------------------------------------------------------------ counterfactuals
def _load_model_and_run(model: str, runset_dir: str, run_name: str):
    from simfluence.methods import load_simulator
    from simfluence.runlog import RunSet

    simulator = load_simulator(model)
    runset = RunSet.load(runset_dir)
    simulator.check_matches(runset, f"model {model!r}")
    return simulator, runset, runset[run_name]


@cli.command("whatif")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--run", "run_name", required=True, help="Run whose curriculum is the base.")
@click.option("--remove", help="Pool ids to remove from every batch (comma-separated).")
@click.option("--keep", help="Keep only these pool ids.")
@click.option("--duplicate", help="ID or ID@STEP: add another occurrence.")
@click.option("--move", help="ID@STEP: move every occurrence of ID to STEP; ID#K@STEP: only its K-th occurrence "
                             "(batch sizes are kept: the entries in between shift over).")
@click.option("--swap", help="A,B: swap the batches of steps A and B.")
@click.option("--reverse", is_flag=True, help="Reverse the order of the batches.")
@click.option("--scenario", "scenarios", multiple=True,
              help="Extra scenario: edits separated by ';', e.g. 'remove:12,40;reverse' (repeatable).")
@click.option("--tests", help="Test ids to show (default: the 5 most changed).")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write scenario,step,test,loss,change.")
@_interval_options
def whatif_command(model, runset_dir, run_name, remove, keep, duplicate, move, swap, reverse, scenarios, tests,
                   csv_out, n_intervals, level) -> None:
    """Predict a logged run's curriculum with edits; compare every scenario with the base."""
    import pandas as pd

    from simfluence.counterfactual import whatif

    simulator, runset, run = _load_model_and_run(model, runset_dir, run_name)
    edits = [f"{kind}:{value}" for kind, value in
             (("remove", remove), ("keep", keep), ("duplicate", duplicate), ("move", move), ("swap", swap))
             if value] + (["reverse"] if reverse else [])
    named = {"edited": ";".join(edits)} if edits else {}
    named.update({text: text for text in scenarios})
    if not named:
        raise SimfluenceError("no edits given (use --remove, --keep, --duplicate, --move, --swap, --reverse "
                              "or --scenario)")
    result = whatif(simulator, run, named, intervals=_intervals(simulator, runset, n_intervals, level))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        click.echo(result.summary().to_string(float_format=lambda v: f"{v:.4f}"))
        final = result.final()
        if tests:
            columns = [int(i) for i in simulator.test_index.positions(tests)]
        else:
            columns = list(np.argsort(-np.abs(result.change[1:, -1]).max(axis=0))[:5])
        click.echo("\npredicted final loss of selected test examples:")
        click.echo(final.iloc[:, columns].to_string(float_format=lambda v: f"{v:.4f}"))
        if result.ensemble is not None:
            frame = result.frame()
            chosen = frame[(frame["step"] == result.trajectories.shape[1] - 1) & (frame["scenario"] != "base")
                           & frame["test"].isin([final.columns[i] for i in columns])]
            click.echo("\npredicted change of their final loss, with its interval (straddles_zero: sign not sure):")
            click.echo(chosen[["scenario", "test", "change", "change_low", "change_high", "straddles_zero"]]
                       .to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    if csv_out:
        atomic_write_bytes(csv_out, result.frame().to_csv(index=False).encode())
        click.echo(f"wrote {csv_out}")


@cli.command("loo")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--run", "run_name", required=True, help="Run whose curriculum is the base.")
@click.option("--top", default=10, show_default=True, help="How many helpful and harmful examples to list.")
@click.option("--tests", help="Average the effect over these test ids (default: all).")
@click.option("--step", type=int, default=None, help="Compare losses at this step (default: the final one).")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write test,pool,effect,rank for all.")
@_interval_options
def loo_command(model, runset_dir, run_name, top, tests, step, csv_out, n_intervals, level) -> None:
    """Leave-one-out effect of every pool example of a run's curriculum (exact and fast for linear models)."""
    from simfluence.counterfactual import loo_effects

    simulator, runset, run = _load_model_and_run(model, runset_dir, run_name)
    effects = loo_effects(simulator, run, step=step, intervals=_intervals(simulator, runset, n_intervals, level))
    target = "all test examples" if tests is None else f"test {tests}"
    table = effects.top(top, tests)  # ids as given: the library splits and looks them up
    click.echo(f"effect on the loss of {target} of removing each example (positive: it helps)")
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:+.5f}"))
    if csv_out:
        atomic_write_bytes(csv_out, effects.frame().to_csv(index=False).encode())
        click.echo(f"wrote {csv_out}")


@cli.command("influence")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--run", "run_name", required=True, help="Run whose curriculum the scores refer to.")
@click.option("--tests", help="Test ids to show (default: the first 3).")
@click.option("--top", default=5, show_default=True, help="Proponents and opponents per test example.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write the full table (all tests) as CSV.")
def influence_command(model, runset_dir, run_name, tests, top, csv_out) -> None:
    """Top proponents and opponents of test examples, for any saved simulator (learned or gradient-based)."""
    from simfluence.counterfactual import influence_table

    simulator, runset, run = _load_model_and_run(model, runset_dir, run_name)
    chosen = tests if tests else runset.test_ids[:3]
    table = influence_table(simulator, runset, run.name, tests=chosen, top=top)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:+.5f}"))
    if csv_out:
        atomic_write_bytes(csv_out, influence_table(simulator, runset, run.name).to_csv(index=False).encode())
        click.echo(f"wrote {csv_out}")


@cli.command("search")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--run", "run_name", required=True, help="Run whose curriculum is the starting point.")
@click.option("--tests", required=True, help="Target test ids (comma-separated).")
@click.option("--drop", type=int, default=None, help="Remove at most K examples.")
@click.option("--subset", "subset_size", type=int, default=None, help="Keep M distinct examples.")
@click.option("--reorder", type=int, default=None, help="Instead of dropping: make up to K reordering moves.")
@click.option("--maximize", is_flag=True, help="Raise the targets' loss instead of lowering it.")
@click.option("--per-round", default=1, show_default=True, help="Examples removed per greedy round.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result as JSON.")
@_interval_options
def search_command(model, runset_dir, run_name, tests, drop, subset_size, reorder, maximize, per_round,
                   json_out, n_intervals, level) -> None:
    """Greedy curriculum search: which examples to drop (or when to show them) to lower or raise chosen test losses."""
    from simfluence.counterfactual import search_curriculum, search_order

    simulator, runset, run = _load_model_and_run(model, runset_dir, run_name)
    targets = tests
    target_ids = simulator.test_index.ids_of(simulator.test_index.positions(targets))
    if reorder is not None and (drop is not None or subset_size is not None):
        raise SimfluenceError("give one budget: --drop, --subset or --reorder")
    intervals = _intervals(simulator, runset, n_intervals, level)
    if reorder is not None:
        result = search_order(simulator, run, targets, moves=reorder, maximize=maximize, intervals=intervals)
        click.echo("moves: " + (", ".join(f"{pid} -> {where}" for pid, where in result.moves) or "none improves"))
        found = {"moves": [[pid, where] for pid, where in result.moves]}
    else:
        result = search_curriculum(simulator, run, targets, drop=drop, subset_size=subset_size, maximize=maximize,
                                   per_round=per_round, intervals=intervals)
        removed = result.removed
        click.echo(f"removed {len(removed)} examples: {', '.join(map(str, removed[:50]))}"
                   + (" ..." if len(removed) > 50 else ""))
        found = {"removed": removed}
    line = (f"predicted mean final loss of the targets: {result.objective[0]:.4f} -> {result.objective[-1]:.4f}"
            f" ({result.predicted_change:+.4f})")
    if result.ensemble is not None:
        low, high = result.change_interval()
        found.update(change_low=low, change_high=high, straddles_zero=bool(low <= 0 <= high))
        line += f", {100 * result.ensemble.level:g}% interval [{low:+.4f}, {high:+.4f}]"
        if low <= 0 <= high:
            line += " straddles zero: the sign of the change is not sure"
    click.echo(line)
    if json_out:
        atomic_write_json(json_out, {
            "run": run.name, "tests": target_ids, **found,
            "objective": [float(v) for v in result.objective], "predicted_change": result.predicted_change,
        })
        click.echo(f"wrote {json_out}")


@cli.command("verify")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--protocol", type=click.Choice(["targeted", "lds"]), default="targeted", show_default=True,
              help="targeted: hand-picked edits of one base run for one method; lds: many random edits of every "
                   "held-out run, every method scored by LDS.")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help="Simulator to check (targeted).")
@click.option("--methods", default=None, callback=_comma_separated,
              help=f"Comma-separated methods to score (lds; default: {_shown(DEFAULT_METHODS)}).")
@click.option("--holdout", default=DEFAULT_HOLDOUT, show_default=True, help="Fit on all but the last K runs.")
@click.option("--run", "run_name", default=None, help="Held-out base run (targeted; default: the last run).")
@click.option("--tests", default=None,
              help=f"Target test ids (targeted; default: the {DEFAULT_N_TARGETS} with the highest final loss).")
@click.option("--k", type=int, default=None,
              help=f"Examples per edit (targeted, default {DEFAULT_EDIT_SIZE}) or moved per draw (lds move protocols, "
                   f"default {DEFAULT_MOVED}).")
@click.option("--draws", type=int, default=None,
              help=f"Draws per protocol and base run (lds; default {DEFAULT_DRAWS}).")
@click.option("--protocols", default=None, callback=_comma_separated,
              help="Comma-separated LDS protocols: remove-P (P% of the examples used), move-end, move-start, half, "
                   "subset-P (a random P% of the whole pool; subset-50 is TRAK's) "
                   f"(lds; default: {_shown(DEFAULT_PROTOCOLS)}).")
@click.option("--bases", type=int, default=None, help="Score on the last K held-out runs (lds; default: all of them).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random edits.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for results and retrained runs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--workers", type=int, default=None, help="Parallel training processes.")
@_task_option
@click.option("--param", "param_items", multiple=True, metavar="NAME=VALUE",
              help="A hyper-parameter of the method, as for fit: NAME=VALUE (targeted, e.g. --param momentum=0.8) or "
                   "METHOD.NAME=VALUE (lds, e.g. --param linear_mom.lam=1; repeatable).")
@click.option("--replay-tolerance", type=click.FloatRange(min=0.0), cls=_LibraryDefault,
              library_default="simfluence.task:REPLAY_TOLERANCE",
              help="Largest accepted difference between a retrained base run and its log, as a fraction of its mean "
                   "loss; beyond it verify stops: the task is not the one that trained the runs. "
                   "Raising it goes on with a warning.")
@click.option("--retrain-seeds", type=click.IntRange(min=1), default=None,
              help="Retrain the base and every draw with this many seeds and average the real changes (lds; "
                   "default 1: as the base was logged).")
def verify_command(runset_dir, protocol, method, methods, holdout, run_name, tests, k, draws, protocols, bases, seed,
                   out, json_out, workers, task_spec, param_items, replay_tolerance, retrain_seeds) -> None:
    """Retrain real models on counterfactual curricula and compare with the simulators' predictions.

    With --protocol lds every draw is retrained into OUT/retrained/<base run> (a second call trains only what
    is missing) and OUT gets report.md, lds.json and one predicted-vs-actual plot per protocol.
    """
    import pandas as pd

    from simfluence.apps.plot import plot_verification
    from simfluence.apps.verify import verify_counterfactuals
    from simfluence.evaluation import split_runs
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet
    from simfluence.workloads import task_for_runset

    lds_only = {"--methods": methods, "--draws": draws, "--protocols": protocols, "--bases": bases,
                "--retrain-seeds": retrain_seeds}
    _check_output_file(json_out, "--json")
    if protocol == "lds":
        from simfluence.apps.lds import format_lds_table, lds_json, run_lds, write_lds_report
        from simfluence.evaluation import parse_methods

        if run_name or tests:
            raise SimfluenceError("--run and --tests apply to --protocol targeted (lds edits every held-out run)")
        runset = RunSet.load(runset_dir)
        names = parse_methods(DEFAULT_METHODS if methods is None else methods)
        params = _parse_params(param_items, prefixed=True)
        stray = [name for name in params if name not in names]
        if stray:
            raise SimfluenceError(f"--param for {stray[0]!r}, which is not among the methods scored")
        if params:  # the methods with their hyper-parameters, fitted by run_lds as the registry's would be
            names = {name: make_simulator(name, **params.get(name, {})) for name in names}
        chosen = list(protocols or DEFAULT_PROTOCOLS)
        used = _usable_runs(runset, include_incomplete=False)
        train, heldout = ([used[i] for i in part] for part in split_runs(len(used), holdout))
        if bases is not None and not 1 <= bases <= len(heldout):
            raise SimfluenceError(f"--bases must be between 1 and {len(heldout)} (the held-out runs)")
        result = run_lds(runset, names, base_runs=None if bases is None else heldout[-bases:], train_runs=train,
                         protocols=chosen, n_draws=DEFAULT_DRAWS if draws is None else draws, task=task_spec,
                         out=Path(out) / "retrained", workers=workers, seed=seed, k=DEFAULT_MOVED if k is None else k,
                         replay_tolerance=replay_tolerance, n_seeds=retrain_seeds or 1)
        paths = write_lds_report(result, out)
        click.echo(format_lds_table(result.table))
        click.echo(f"retrained {result.n_trained} run(s); retraining each base curriculum reproduces its logged run "
                   f"to {result.base_reproduction:.1e}")
        if json_out:
            _write_json_file(json_out, lds_json(result))
        click.echo(f"wrote {paths['report']}, {paths['json']} and {len(chosen)} plot(s)"
                   + (f"; {json_out}" if json_out else ""))
        return
    given = [option for option, value in lds_only.items() if value is not None]
    if given:
        raise SimfluenceError(f"{given[0]} applies to --protocol lds")
    simulator = make_simulator(method, **_parse_params(param_items))  # bad options fail here, before any work
    k = DEFAULT_EDIT_SIZE if k is None else k
    runset = RunSet.load(runset_dir)
    task = task_for_runset(runset, task_spec)  # before any work: a missing task is one line, nothing written
    used = _usable_runs(runset, include_incomplete=False)
    train, heldout = ([used[i] for i in part] for part in split_runs(len(used), holdout))
    base = runset[run_name] if run_name else runset[heldout[-1]]
    if runset.position(base) in train:
        raise SimfluenceError(f"--run {base.name!r} is a training run; choose one of the last {holdout} runs")
    targets = (tests if tests
               else [runset.test_ids[i] for i in np.argsort(-np.asarray(base.losses[-1]))[:DEFAULT_N_TARGETS]])
    click.echo(f"fitting {method} on {len(train)} runs")
    simulator.fit(runset, runs=train)
    out_dir = Path(out)  # created when retraining starts, so a failure before it leaves nothing behind
    result = verify_counterfactuals(simulator, runset, base.name, targets, k=k, out=out_dir / "retrained",
                                    seed=seed, workers=workers, task=task, replay_tolerance=replay_tolerance)
    out_dir.mkdir(parents=True, exist_ok=True)
    with pd.option_context("display.width", 160):
        click.echo(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    click.echo(f"retraining the base curriculum reproduces the logged run to {result.base_reproduction:.1e}")
    summary = {
        "method": method, "run": base.name, "targets": result.tests, "k": k,
        "base_reproduction": result.base_reproduction,
        "table": [{key: (None if isinstance(value, float) and not np.isfinite(value) else value)
                   for key, value in row.items()} for row in result.table.to_dict(orient="records")],
    }
    atomic_write_json(out_dir / "verify.json", summary)
    if json_out:
        _write_json_file(json_out, summary)
    plot_verification(result.names, result.predicted, result.actual, result.test_columns,
                      path=out_dir / "verify.png")
    click.echo(f"wrote {out_dir / 'verify.json'} and {out_dir / 'verify.png'}")


# ------------------------------------------------------------------------------------------ smoothness
_smoothness_option = _library_option("simfluence.attribution.smoothness:metasmoothness")


@cli.command("smoothness")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--run", "run_name", default=None, help="Base run to perturb (default: the first run).")
@_task_option
@_smoothness_option("--directions", "n_directions", type=click.IntRange(min=1),
                    help="Random data-weight directions; each costs two replays of the run.")
@_smoothness_option("--h", "h", type=click.FloatRange(min=0.0, min_open=True),
                    help="Finite-difference step of the data weights.")
@_smoothness_option("--seed", "seed", type=int, help="Seed of the directions.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the scores as JSON to this file.")
def smoothness_command(runset_dir, run_name, task_spec, n_directions, h, seed, json_out) -> None:
    """Metasmoothness of the training setup around one run: can any method attribute single examples here?

    Replays the run with data weights 1, 1 + h v and 1 + 2h v along random directions v and scores the sign
    agreement of the two finite differences of the final parameters (1 = smooth, about 0 = chaotic).
    """
    from simfluence.attribution.smoothness import metasmoothness
    from simfluence.runlog import RunSet

    _check_output_file(json_out, "--json")
    runset = RunSet.load(runset_dir)
    report = metasmoothness(task_spec, runset, run_name,
                            **_given({"n_directions": n_directions, "h": h, "seed": seed}))
    click.echo(report.summary())
    if json_out:
        _write_json_file(json_out, {"run": report.run, "score": report.score, "scores": report.scores.tolist(),
                                    "loss_scores": report.loss_scores.tolist(), "h": report.h,
                                    "n_replays": report.n_replays, "seconds": report.seconds,
                                    "verdict": report.verdict})


# ------------------------------------------------------------------------------------------ trace
@cli.command("trace")
@click.argument("runset_dir", type=click.Path(file_okay=False))  # RunSet.load checks (and recovers)
@click.option("--methods", cls=_LibraryDefault, library_default="simfluence.apps.factbench:DEFAULT_METHODS",
              callback=_comma_separated,
              help="Comma-separated: bm25 and any method of `simfluence methods` (gradient methods score from "
                   "checkpoints, learned simulators by leave-one-out), e.g. trackstar_no_opt, linear.")
@click.option("--run", "run_index", default=0, show_default=True, help="Run whose checkpoints gradient methods use.")
@_task_option
@click.option("--no-tail-patch", is_flag=True, help="Skip the tail-patch (one-step influence) column.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the table as JSON records.")
def trace_command(runset_dir, methods, run_index, task_spec, no_tail_patch, json_out) -> None:
    """Fact tracing on a facts run set: MRR, recall@10, precision@10 and tail-patch per method and bucket."""
    from simfluence.apps import factbench
    from simfluence.runlog import RunSet

    frame = factbench.run_factbench(RunSet.load(runset_dir),
                                    methods=factbench.DEFAULT_METHODS if methods is None else list(methods),
                                    run=run_index, tail_patch=not no_tail_patch,
                                    echo=lambda message: click.echo(message, err=True), task=task_spec)
    click.echo(factbench.format_factbench(frame))
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
    """Entry point: run the CLI, turning library errors into one stderr line and exit status 2 (and the library's
    warnings into one ``simfluence: warning: ...`` line each)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", SimfluenceWarning)
        show_others = warnings.showwarning

        def show(message, category, *args, **kwargs) -> None:
            if issubclass(category, SimfluenceWarning):
                click.echo(f"simfluence: warning: {message}", err=True)
            else:
                show_others(message, category, *args, **kwargs)

        warnings.showwarning = show
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="simfluence", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        return int(exit_.exit_code)
    except click.UsageError as err:  # a bad option or argument: one line too, like every other error
        if isinstance(err, getattr(click.exceptions, "NoArgsIsHelpError", ())) and err.ctx is not None:
            click.echo(err.ctx.get_help())  # a bare command group: its help, as click prints it
            return err.exit_code
        command = err.ctx.command_path if err.ctx is not None else "simfluence"
        return _print_error(f"{err.format_message()} (see `{command} --help`)")
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
