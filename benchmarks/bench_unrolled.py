"""Cost of exact first-order effects (``unrolled``) for one base run, against the number of test examples.

**Digits.** The run set is the default digits workload (``generate_digits``: 48 runs x 200 steps, batch 8, pool
500, SGD with momentum and a warm-up + cosine schedule); the base is its first run. The test set is the
workload's own for 100 tests, its first 10 for 10 tests, and 1,000 held-out digits (the 100 first, same split,
standardised by the pool: ``digits_task(test_size=1000)``) for 1,000 tests. ``unrolled_effects`` differentiates
all test losses at the final step at once (no insertion steps) in float64 (the default) and float32 (the task's
own precision), then the ``unrolled`` simulator's ``fit`` with insertion effects at ``ends`` and ``all`` steps.

**Facts.** The facts language model (``facts_task``: a pretrained TinyLM fine-tuned with AdamW, batch 8, 200
steps, all its queries as test examples) on one random curriculum of the tier's length and batch size.

**Many queries (``--ranks``).** ``cotangent_rank=k`` pulls back an orthonormal basis of the top-k singular subspace of
the final test gradients instead of every test's gradient (``unrolled_effects``). On the facts *mini* tier (48
queries, 60 steps; run set generated into ``--mini-runset`` if absent) the ``unrolled`` simulator, exact and at each
rank, is fitted (timed) on the last run and compared with the exact one: the fraction of each query's gradient the
subspace keeps (captured energy), the correlation over the pool of each query's per-example effects with the exact
ones, and a real LDS (``run_lds``: remove-5% and half draws of that run, each retrained; ``agreement``: the same
score with the exact predictions in place of the retrained changes). On the default tier (240 queries) the cost of
``unrolled_effects`` in float32 at ``--facts-ranks`` is timed on the first ``--facts-steps`` steps of one curriculum
(exact beside it), and the energy each rank would keep is measured on the test gradients at the last checkpoint of a
run of ``--facts-runset`` (the one-off singular value decomposition that the fit makes at its final step).

The unit of cost is one training run of the same task: the bare training computation (``replay_losses`` in
the task's float32, one thread: the generator's arithmetic, with every step's test losses, without its logging).
Costs are CPU seconds of this process (``time.process_time``, one torch thread; the best of ``--repeats``), which
a busy shared machine disturbs less than wall-clock time; wall-clock seconds are shown beside. ``--baseline
FILE`` times another version of ``simfluence/attribution/unrolled.py`` (e.g. ``git show
COMMIT:simfluence/attribution/unrolled.py > old.py``) in the same run, float64 as it was run before. The script
prints markdown tables and records them in ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/bench_unrolled.py                      # generates the digits run set in a temporary folder
    python benchmarks/bench_unrolled.py --runset runs/digits --facts-base-cache runs/facts-base.pt
    python benchmarks/bench_unrolled.py --baseline old_unrolled.py --tests 10 100
    python benchmarks/bench_unrolled.py --ranks 4 8 16 32 --facts-ranks 8 16 32 --facts-steps 3
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from simfluence.attribution.unrolled import replay_losses, unrolled_effects
from simfluence.curriculum import random_curricula
from simfluence.methods import make_simulator
from simfluence.workloads import digits_task, generate_digits, generate_facts, task_from_runset
from simfluence.workloads.facts import TIERS, facts_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Unrolled: cost of exact first-order effects for one base run (digits)"
SECTION_RANKS = "## Unrolled: many queries through a low-rank cotangent (facts)"
PROTOCOLS_RANKS = ("remove-5", "half")  # removals only: no insertion effects needed


def best_time(function, repeats: int) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result) of the fastest of ``repeats`` calls (by CPU time)."""
    best, wall, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_wall = time.process_time(), time.perf_counter()
        result = function()
        seconds = time.process_time() - start
        if seconds < best:
            best, wall = seconds, time.perf_counter() - start_wall
    return best, wall, result


def load_baseline(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_unrolled", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def relative_difference(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(estimate - reference).max() / np.abs(reference).max())


def digits_rows(runset, tests: list[int], repeats: int, baseline) -> tuple[list[str], float]:
    task = task_from_runset(runset)
    base = runset[0]
    seed = base.metadata.get("seed")
    wide = digits_task(pool_size=runset.n_pool, test_size=max(tests))
    rows, unit_100 = [], None
    for n_test in tests:
        sized = task if n_test == task.n_test else dataclasses.replace(
            task, test_inputs=wide.test_inputs[:n_test], test_targets=wide.test_targets[:n_test])
        bare, bare_wall, _ = best_time(lambda t=sized: replay_losses(t, base.curriculum, seed=seed, dtype=None),
                                       repeats)
        if n_test == 100 or unit_100 is None:
            unit_100 = bare
        timed = {}
        for name, dtype in (("float64", torch.float64), ("float32", None)):
            timed[name] = best_time(lambda t=sized, d=dtype: unrolled_effects(t, base.curriculum, seed=seed, dtype=d),
                                    repeats)
        if baseline is not None:
            timed["before"] = best_time(lambda t=sized: baseline.unrolled_effects(t, base.curriculum, seed=seed),
                                        repeats)
        reference = timed["float64"][2].occurrence
        for name, (seconds, wall, effects) in timed.items():
            difference = relative_difference(effects.occurrence, reference)
            rows.append(f"| digits | {n_test} | {name if name != 'before' else 'float64, before'} | {bare:.2f} "
                        f"| {seconds:.2f} | {wall:.2f} | {seconds / bare:.1f} | {seconds / unit_100:.1f} "
                        f"| {difference:.1e} |")
    return rows, unit_100


def facts_rows(tier: str, base_cache: str | None, repeats: int, precisions: list[str],
               n_steps: int | None) -> tuple[list[str], str]:
    task = facts_task(tier, base_cache=base_cache)
    settings = TIERS[tier]
    curriculum = random_curricula(1, task.n_pool, settings.batch_size, settings.n_steps, seed=0)[0]
    if n_steps is not None:
        curriculum = curriculum.truncate(n_steps)  # the first steps of a run of the tier's schedule
    bare, _, _ = best_time(lambda: replay_losses(task, curriculum, seed=1, dtype=None), repeats)
    timed = {}
    for name in precisions:
        dtype = {"float64": torch.float64, "float32": None}[name]
        timed[name] = best_time(lambda d=dtype: unrolled_effects(task, curriculum, seed=1, dtype=d), repeats)
    rows = []
    for name, (seconds, wall, effects) in timed.items():
        difference = (f"{relative_difference(effects.occurrence, timed['float64'][2].occurrence):.1e}"
                      if "float64" in timed else "not run")
        rows.append(f"| facts {tier} | {task.n_test} | {name} | {bare:.2f} | {seconds:.2f} | {wall:.2f} "
                    f"| {seconds / bare:.1f} | {seconds / bare:.1f} | {difference} |")
    described = (f"facts tier {tier!r}: {task.n_pool} documents x {task.n_test} queries, TinyLM d_model "
                 f"{settings.d_model}, {settings.n_layers} layers, AdamW, batch {settings.batch_size}, one random "
                 f"curriculum: its first {curriculum.n_steps} of {settings.n_steps} steps, the bare run as long")
    return rows, described


def per_example(simulator) -> np.ndarray:
    """(n_pool, n_test) final-step effect of all occurrences of each pool example of a fitted ``unrolled``."""
    effects = np.zeros((simulator.n_pool_, simulator.n_test_))
    np.add.at(effects, simulator.base_ids_, simulator.occurrence_effects_[:, -1, :])
    return effects


def mini_rank_rows(folder: Path, ranks: list[int], draws: int) -> tuple[list[str], str]:
    """The rank study on the facts mini tier: cost, captured energy, effect correlation, LDS (see the docstring)."""
    import warnings

    from simfluence.apps.lds import lds_scores, run_lds
    from simfluence.attribution.unrolled_simulator import MIN_CAPTURED_ENERGY, UnrolledSimulator

    runset = generate_facts(folder, tier="mini", checkpoint_steps=(0, 30, 60), progress=False, workers=1)
    task = task_from_runset(runset)
    base = runset[len(runset) - 1]
    bare, _, _ = best_time(lambda: replay_losses(task, base.curriculum, seed=base.metadata.get("seed"), dtype=None),
                           2)  # the best of two: the first warms up
    used = np.unique(base.curriculum.ids)
    fitted, timed = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the low ranks warn (captured energy, linearity): the table shows it
        for rank in [None, *ranks]:
            name = "exact" if rank is None else f"rank {rank}"
            simulator = UnrolledSimulator(insertion_steps="none", cotangent_rank=rank)
            timed[name] = best_time(lambda s=simulator: s.fit(runset, runs=[len(runset) - 1], task=task), 1)[:2]
            fitted[name] = simulator
        result = run_lds(runset, fitted, base_runs=[base.name], train_runs=range(len(runset) - 1),
                         protocols=PROTOCOLS_RANKS, n_draws=draws, out=folder / "lds", workers=1,
                         progress=False, n_boot=0)  # fitted around the base already: used as they are
    table = result.table.set_index(["method", "protocol"])["lds"]
    reference = per_example(fitted["exact"])[used]
    rows = []
    for name, simulator in fitted.items():
        seconds, wall = timed[name]
        energy = np.ones(task.n_test) if simulator.captured_energy_ is None else simulator.captured_energy_[-1]
        estimate = per_example(simulator)[used]
        correlations = [np.corrcoef(estimate[:, z], reference[:, z])[0, 1] for z in range(task.n_test)]
        agreement = [lds_scores(result.predicted[name][protocol], result.predicted["exact"][protocol], n_boot=0)["lds"]
                     for protocol in PROTOCOLS_RANKS]
        rows.append(f"| {'all (exact)' if name == 'exact' else name.split()[1]} | {seconds:.1f} | {wall:.1f} "
                    f"| {seconds / bare:.1f} | {energy.mean():.3f} | {energy.min():.3f} "
                    f"| {int((energy < MIN_CAPTURED_ENERGY).sum())} | {np.median(correlations):.3f} "
                    f"| {np.min(correlations):.3f} | {table[(name, 'remove-5')]:.3f} | {table[(name, 'half')]:.3f} "
                    f"| {agreement[0]:.3f} | {agreement[1]:.3f} |")
    described = (f"facts tier 'mini': {task.n_pool} documents x {task.n_test} queries, {base.n_steps} steps, AdamW; "
                 f"the `unrolled` simulator's fit (float64, no insertion steps, with its replay checks) around "
                 f"run {base.name!r}, bare run {bare:.2f} CPU s; LDS over {draws} draws per protocol of that run, "
                 f"each retrained ({result.n_trained} trained by this call)")
    return rows, described


def default_rank_rows(tier: str, base_cache: str | None, ranks: list[int], n_steps: int, repeats: int,
                      energy_runset: Path | None) -> tuple[list[str], str]:
    """Cost of all the default tier's queries at each rank on the first ``n_steps`` steps (float32), and the energy
    each rank keeps of the test gradients at the last checkpoint of the last run of ``energy_runset``."""
    from simfluence.attribution.checkpoints import checkpoint_steps, load_checkpoints, model_at
    from simfluence.attribution.gradients import per_example_gradients
    from simfluence.attribution.unrolled_simulator import MIN_CAPTURED_ENERGY
    from simfluence.runlog import RunSet

    task = facts_task(tier, base_cache=base_cache)
    settings = TIERS[tier]
    curriculum = random_curricula(1, task.n_pool, settings.batch_size, settings.n_steps, seed=0)[0].truncate(n_steps)
    bare, _, _ = best_time(lambda: replay_losses(task, curriculum, seed=1, dtype=None), repeats + 1)  # 1st: warm-up
    energies, where = {}, "not measured"
    if energy_runset is not None:
        runset = RunSet.load(energy_runset)
        run = runset[len(runset) - 1]
        last = load_checkpoints(runset, run, [checkpoint_steps(runset, run)[-1]])[0]
        model = model_at(task_from_runset(runset).make_model(0), last).eval()
        gradients = per_example_gradients(model, task.loss_fn, task.test_inputs, task.test_targets,
                                          dtype=torch.float64)
        left, singular, _ = torch.linalg.svd(gradients, full_matrices=False)
        coefficients = (left * singular).square()  # (n_test, r): each query's energy along each singular direction
        total = gradients.square().sum(dim=1)
        for rank in ranks:
            energies[rank] = (coefficients[:, :rank].sum(dim=1) / total).numpy()
        where = f"test gradients at step {last.step} of run {run.name!r} of {str(energy_runset)!r}"
    rows = []
    for rank in [None, *ranks]:
        seconds, wall, _ = best_time(lambda r=rank: unrolled_effects(task, curriculum, seed=1, dtype=None,
                                                                     cotangent_rank=r), repeats)
        energy = np.ones(task.n_test) if rank is None else energies.get(rank)
        kept = ("n/a | n/a | n/a" if energy is None else
                f"{energy.mean():.3f} | {energy.min():.3f} | {int((energy < MIN_CAPTURED_ENERGY).sum())}")
        rows.append(f"| {'all (exact)' if rank is None else rank} | {seconds:.2f} | {wall:.2f} | {seconds / bare:.1f} "
                    f"| {kept} |")
    described = (f"facts tier {tier!r}: {task.n_pool} documents x {task.n_test} queries, float32, the first "
                 f"{curriculum.n_steps} of {settings.n_steps} steps of one random curriculum, bare run as long "
                 f"{bare:.2f} CPU s; captured energy of the {where}")
    return rows, described


def rank_section(args, load_before: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python benchmarks/bench_unrolled.py", *sys.argv[1:]])
    default = None
    if args.facts_ranks:  # first: the shorter part
        default = default_rank_rows(args.facts_tier or "default", args.facts_base_cache, args.facts_ranks,
                                    args.facts_steps or 3, args.repeats, args.facts_runset)
        print(default[1], *default[0], sep="\n", flush=True)  # kept in the log should the mini part fail
    mini, mini_described = mini_rank_rows(args.mini_runset, args.ranks, args.mini_draws)
    lines = [
        SECTION_RANKS,
        "",
        f"Recorded {now} by `{command}` on {os.cpu_count()} cores, one torch thread, load average before "
        f"{load_before:.2f}, best of {args.repeats} by CPU time. `cotangent_rank=k` differentiates the top-k singular "
        "subspace of the final test gradients (k rows in the backward pass instead of one per query; exact for the "
        "part of each query's gradient inside it). Captured energy: ||U^T g_z||^2 / ||g_z||^2 per query (mean, "
        "least, and how many queries keep less than 0.9, where `fit` warns); effect correlation: per query, over the "
        "pool examples the run used, correlation of its per-example effects with the exact ones (median, least); "
        "LDS: against real retraining; agreement: the same score against the exact predictions.",
        "",
        f"Mini tier ({mini_described}):",
        "",
        "| rank k | fit CPU s | wall s | x bare run | energy mean | energy least | queries < 0.9 "
        "| effect corr. median | effect corr. least | LDS remove-5 | LDS half | agreement remove-5 "
        "| agreement half |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *mini,
        "",
    ]
    if default is not None:
        rows, described = default
        lines += [
            f"Default tier, all queries ({described}):",
            "",
            "| rank k | unrolled CPU s | wall s | x bare run | energy mean | energy least | queries < 0.9 |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runset", type=Path, help="digits run-set folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tests", type=int, nargs="+", default=[10, 100, 1000], help="digits test-set sizes")
    parser.add_argument("--insertion", nargs="*", default=["ends", "all"],
                        help="insertion_steps settings of the simulator's fit to time (float64, 100 tests)")
    parser.add_argument("--facts-tier", default="default", help="facts tier ('' to skip facts)")
    parser.add_argument("--facts-base-cache", help="cache file of the facts tier's pretrained base")
    parser.add_argument("--facts-precisions", nargs="+", default=["float32", "float64"])
    parser.add_argument("--facts-steps", type=int, help="time the first this many steps only (default: all)")
    parser.add_argument("--baseline", type=Path, help="another unrolled.py to time in the same run (digits)")
    parser.add_argument("--ranks", type=int, nargs="+", help="study cotangent_rank at these ranks on the facts mini "
                        "tier (and the default tier at --facts-ranks) instead of the exact costs")
    parser.add_argument("--mini-runset", type=Path, default=Path("/tmp/simfluence-bench-facts-mini"),
                        help="facts mini run set for --ranks (generated if absent)")
    parser.add_argument("--mini-draws", type=int, default=20, help="LDS draws per protocol and base run (--ranks)")
    parser.add_argument("--facts-ranks", type=int, nargs="*", default=[8, 16, 32],
                        help="with --ranks: ranks timed on the default tier's queries ('' to skip)")
    parser.add_argument("--facts-runset", type=Path, default=Path("/tmp/facts-ckpt"),
                        help="with --ranks: default-tier run set whose last checkpoint gives the energy per rank")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    if args.ranks:
        if not args.facts_runset.is_dir():
            args.facts_runset = None
        section = rank_section(args, load_before)
        print(section)
        write_section(args.results, SECTION_RANKS, section)
        return
    baseline = load_baseline(args.baseline) if args.baseline is not None else None
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.runset if args.runset is not None else Path(scratch) / "digits"
        runset = generate_digits(folder, progress=False, workers=1)
        rows, unit_100 = digits_rows(runset, args.tests, args.repeats, baseline)
        fits = []
        for insertion in args.insertion:
            simulator = make_simulator("unrolled", insertion_steps=insertion)
            seconds, wall, _ = best_time(lambda simulator=simulator: simulator.fit(runset, runs=[0]), args.repeats)
            size = simulator.save(Path(scratch) / f"unrolled-{insertion}.npz").stat().st_size / 2**20
            fits.append(f"| {insertion} | {len(simulator.insertion_steps_)} | {seconds:.2f} | {wall:.2f} "
                        f"| {seconds / unit_100:.1f} | {size:.1f} |")
    facts_described = ""
    if args.facts_tier:
        facts, facts_described = facts_rows(args.facts_tier, args.facts_base_cache, args.repeats,
                                            args.facts_precisions, args.facts_steps)
        rows += facts

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_unrolled.py{' --baseline ...' if baseline else ''}` on "
        f"{os.cpu_count()} cores, one torch thread, load average before {load_before:.2f}, best of {args.repeats} "
        f"by CPU time. Digits: {runset.n_pool} pool, {runset[0].n_steps} steps x batch 8, base run "
        f"{runset[0].name!r}, all test losses differentiated at the final step at once, no insertion steps"
        + (f"; {facts_described}" if facts_described else "") + ". `bare run`: CPU seconds of one training run of "
        "the same task (same test set); `x bare run`: unrolled CPU time in those units; `x bare run (100 tests)`: "
        "in units of the 100-test run; `vs float64`: largest difference of the occurrence effects from the "
        "float64 ones, relative to their largest magnitude.",
        "",
        "| task | tests | precision | bare run CPU s | unrolled CPU s | wall s | x bare run | x bare run (100 tests) "
        "| vs float64 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    if fits:
        lines += [
            "The `unrolled` simulator's `fit` (float64, 100 tests, with its replay checks) with insertion effects:",
            "",
            "| insertion_steps | insertion steps | fit CPU s | wall s | x bare run | file MiB |",
            "|---|---:|---:|---:|---:|---:|",
            *fits,
            "",
        ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
