"""Metasmoothness of the shipped workloads, its cost, and how well first order predicts replayed edits there.

For each setting (the wine example, digits with its SGD and Adam recipes and with SGD at 8x its learning rate,
facts mini and default) the base run is the first run the workload's generator would train
(``random_runs_plan``: a random half of the pool in shuffled epochs; the generator's first seeds). Printed per
setting:

- ``metasmoothness`` (:func:`simfluence.attribution.smoothness.metasmoothness`, ``--directions`` directions,
  h = 0.1) over the final parameters, and the same agreement over the final test losses;
- its cost: the replays it made, their wall time, and their CPU time in units of one bare training run's
  (``replay_losses`` in the task's own precision, one thread: the generator's arithmetic without its logging;
  CPU time, so that other load on the machine does not enter the ratio);
- ``first-order LDS``: ``--draws`` random removals of 5% of the examples the run uses, each replayed for real
  (weight 0, batch sizes kept: the edit the unrolled derivatives describe), against the ``unrolled`` first-order
  prediction; Spearman over draws per test example, averaged over test examples. This is how well *any*
  first-order answer can do on the setting, the yardstick the smoothness thresholds are set against;
- the ``unrolled`` simulator's own linearity check (``linearity_``: magnitude ratio and whether it warned).

Usage::

    python benchmarks/bench_smoothness.py                    # every setting, recorded in RESULTS.md
    python benchmarks/bench_smoothness.py --settings wine digits-sgd --no-record
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from simfluence.attribution.smoothness import LINEARITY_FRACTION, metasmoothness, weighted_replay
from simfluence.attribution.unrolled import replay_losses
from simfluence.attribution.unrolled_simulator import UnrolledSimulator
from simfluence.errors import NonlinearityWarning
from simfluence.training import generate_runs, random_runs_plan
from simfluence.workloads.digits import DEFAULT_PEAK_LR, digits_task
from simfluence.workloads.facts import TIERS, facts_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Smoothness: metasmoothness of the workloads against first-order accuracy"
ROOT = Path(__file__).resolve().parent.parent


def wine_task():
    spec = importlib.util.spec_from_file_location("wine_task", ROOT / "examples" / "wine_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_task()


def facts(tier: str, workdir: Path):
    return facts_task(tier, base_cache=workdir / f"facts-{tier}-base.pt")


# name -> (description, task factory(workdir), n_steps, batch_size, subset_fraction)
SETTINGS = {
    "wine": ("examples/wine_task.py: logistic regression, SGD", lambda _: wine_task(), 60, 8, 0.5),
    "digits-sgd": ("digits MLP, SGD momentum 0.9 (default)", lambda _: digits_task(), 200, 8, 0.5),
    "digits-adam": ("digits MLP, Adam eps 1e-8", lambda _: digits_task(optimizer="adam"), 200, 8, 0.5),
    "digits-sgd-lr8x": ("digits MLP, SGD at 8x the learning rate",
                        lambda _: digits_task(lr=8 * DEFAULT_PEAK_LR["sgd"]), 200, 8, 0.5),
    "facts-mini": ("facts mini: transformer, AdamW eps 1e-8, batch 8", functools.partial(facts, "mini"),
                   TIERS["mini"].n_steps, TIERS["mini"].batch_size, TIERS["mini"].subset_fraction),
    "facts": ("facts default: transformer, AdamW eps 1e-8, batch 8", functools.partial(facts, "default"),
              TIERS["default"].n_steps, TIERS["default"].batch_size, TIERS["default"].subset_fraction),
}


def first_order_lds(task, curriculum, seed: int, sim: UnrolledSimulator, n_draws: int) -> float:
    """Spearman over random 5% removals (replayed, weight 0) of first-order vs replayed final-loss changes."""
    per_example = np.zeros((task.n_pool, task.n_test))  # d final loss / d weight of all of i's occurrences
    np.add.at(per_example, sim.base_ids_, sim.occurrence_effects_[:, -1, :])
    used = np.unique(curriculum.ids)
    count = max(1, int(np.ceil(LINEARITY_FRACTION * used.size)))
    rng = np.random.default_rng(1)
    predicted, replayed = [], []
    for _ in range(n_draws):
        removed = rng.choice(used, size=count, replace=False)
        weights = np.ones(task.n_pool)
        weights[removed] = 0.0
        _, losses = weighted_replay(task, curriculum, weights, init_seed=task.init_seed, seed=seed)
        predicted.append(-per_example[removed].sum(axis=0))
        replayed.append(losses - sim.base_losses_[-1])
    predicted, replayed = np.array(predicted), np.array(replayed)
    rhos = [spearmanr(predicted[:, z], replayed[:, z])[0] for z in range(task.n_test)
            if np.ptp(predicted[:, z]) > 0 and np.ptp(replayed[:, z]) > 0]
    return float(np.mean(rhos)) if rhos else float("nan")


def measure(name: str, workdir: Path, n_directions: int, n_draws: int) -> dict:
    description, make_task, n_steps, batch_size, fraction = SETTINGS[name]
    task = make_task(workdir)
    task, curricula = random_runs_plan(task, 1, n_steps, batch_size, fraction, seed=0)
    curriculum, seed = curricula[0], task.init_seed + 1
    bare = float("inf")
    for _ in range(2):  # the first call also pays torch's lazy set-up
        start = time.process_time()
        replay_losses(task, curriculum, seed=seed, dtype=None)
        bare = min(bare, time.process_time() - start)
    start = time.process_time()
    report = metasmoothness(task, curriculum, n_directions=n_directions, run_seed=seed)
    cpu = time.process_time() - start
    runset = generate_runs(task, curricula, workdir / f"{name}-runs", workers=1, progress=False, overwrite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a chaotic run's float64 replay drifts from its float32 log: that is the finding, not a wrong task
        sim = UnrolledSimulator(insertion_steps="none", replay_tolerance=float("inf")).fit(runset, runs=[0],
                                                                                             task=task)
    warned = any(issubclass(w.category, NonlinearityWarning) for w in caught)
    lds = first_order_lds(task, curriculum, seed, sim, n_draws)
    return {"setting": name, "description": description, "score": report.score, "scores": report.scores,
            "loss_score": float(np.mean(report.loss_scores)), "replays": report.n_replays,
            "seconds": report.seconds, "runs": cpu / bare, "bare": bare, "lds": lds,
            "ratio": sim.linearity_["magnitude_ratio"], "warned": warned, "verdict": report.verdict}


def table(rows: list[dict], n_draws: int) -> str:
    lines = ["| setting | metasmoothness (per direction) | on test losses | replays | wall s | x bare run (CPU) | "
             f"first-order LDS ({n_draws} removals) | unrolled linearity_ ratio | warns |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        per = ", ".join(f"{s:.2f}" for s in row["scores"])
        lines.append(f"| {row['setting']}: {row['description']} | {row['score']:.3f} ({per}) | {row['loss_score']:.3f} "
                     f"| {row['replays']} | {row['seconds']:.1f} | {row['runs']:.1f} | {row['lds']:.3f} | "
                     f"{row['ratio']:.2f} | {'yes' if row['warned'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--directions", type=int, default=3)
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for run sets and facts bases")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.settings:
            rows.append(measure(name, workdir, args.directions, args.draws))
            print(f"{name}: {rows[-1]['verdict']}\n{table(rows[-1:], args.draws).splitlines()[-1]}", flush=True)
    text = table(rows, args.draws)
    print(text)
    if args.no_record:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    chosen = "" if args.settings == list(SETTINGS) else f"--settings {' '.join(args.settings)} "
    intro = (f"Recorded {stamp} by `python benchmarks/bench_smoothness.py {chosen}--directions {args.directions} "
             f"--draws {args.draws}` on {os.cpu_count()} cores, one torch thread, load average before "
             f"{load_before:.2f}. "
             "Each setting's base run is the first run its generator would train (a random half of the pool in "
             "shuffled epochs). Metasmoothness (Engstrom et al. 2025, def. 2; h = 0.1) replays the run in float64 "
             "with data weights 1, 1 + h v, 1 + 2h v per direction v; cost: CPU time in units of one bare training "
             "run of the task (float32, no logging). First-order LDS: random removals of 5% of the examples the "
             "run uses, replayed for real (weight 0, batch sizes kept), against the unrolled first-order "
             "prediction (Spearman over draws per test example, averaged). Linearity ratio: the `unrolled` fit's "
             "own check (|predicted| / |replayed| of one such removal); warns: it issued a NonlinearityWarning. "
             "See docs/smoothness.md.")
    write_section(args.results, SECTION, f"{SECTION}\n\n{intro}\n\n{text}\n")


if __name__ == "__main__":
    main()
