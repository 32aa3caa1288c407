"""Cost of fitting the ``unrolled`` simulator (exact first-order effects) on one base run of the digits workload.

The run set is the default digits workload (``generate_digits``: 48 runs x 200 steps, batch 8, pool 500, 100
test examples, SGD with momentum and a warm-up + cosine schedule); the base is its first run. Fitting replays
that run in float64 and differentiates all 100 test losses through it at once, with insertion effects at
``none``, the first and last tenth of the steps (``ends``, the default) or ``all`` steps.

The unit of cost is one training run of the same task, measured two ways: the bare training computation
(``replay_losses`` in the task's float32, one thread: the generator's arithmetic without its logging), and one
run logged by ``generate_runs`` (one worker, every step's batch and test losses written to disk). Timings are
the best of ``--repeats`` wall-clock runs on whatever else the machine is doing, one torch thread (as the
generator trains). The script prints a markdown table and records it in ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/bench_unrolled.py                      # generates the run set in a temporary folder
    python benchmarks/bench_unrolled.py --runset runs/digits # reuse (or create) a run set there
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from simfluence.attribution.unrolled import replay_losses
from simfluence.methods import make_simulator
from simfluence.training import generate_runs
from simfluence.workloads import generate_digits, task_from_runset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Unrolled: cost of exact first-order effects for one base run (digits)"


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runset", type=Path, help="digits run-set folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--insertion", nargs="+", default=["none", "ends", "all"],
                        help="insertion_steps settings to time")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.runset if args.runset is not None else Path(scratch) / "digits"
        runset = generate_digits(folder, progress=False)
        task = task_from_runset(runset)
        base = runset[0]
        seed = base.metadata.get("seed")
        training, _ = best_time(lambda: replay_losses(task, base.curriculum, seed=seed, dtype=None), args.repeats)
        logged, _ = best_time(lambda: generate_runs(task, [base.curriculum], Path(scratch) / "one", workers=1,
                                                    progress=False, overwrite=True, seeds=[seed]), args.repeats)
        rows = []
        for insertion in args.insertion:
            simulator = make_simulator("unrolled", insertion_steps=insertion)
            seconds, _ = best_time(lambda simulator=simulator: simulator.fit(runset, runs=[0]), args.repeats)
            size = simulator.save(Path(scratch) / f"unrolled-{insertion}.npz").stat().st_size / 2**20
            rows.append((insertion, len(simulator.insertion_steps_), seconds, size))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_unrolled.py` on {os.cpu_count()} cores, one torch thread, load "
        f"average before {load_before:.2f}, best of {args.repeats}. Digits: {runset.n_pool} pool x {runset.n_test} "
        f"test, {base.n_steps} steps, base run {base.name!r}; one training run {training:.3f} s bare, {logged:.3f} s "
        "logged by generate_runs. `fit` replays the run in float64 and differentiates all test losses at once.",
        "",
        "| insertion_steps | insertion steps | fit s | x bare training run | x logged run | file MiB |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {insertion} | {n_insertion} | {seconds:.2f} | {seconds / training:.1f} | {seconds / logged:.1f} "
          f"| {size:.1f} |" for insertion, n_insertion, seconds, size in rows],
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
