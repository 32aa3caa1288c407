"""Benchmark: counterfactual predictions checked against real retraining, over several held-out base runs.

On the default digits run set (generated into a cache folder on first use), fits ``linear_mom`` on the
first 40 runs; for each chosen held-out base run, builds the counterfactual curricula of
``simfluence.apps.verify`` (remove the k predicted most harmful examples for the run's 10 highest-loss test
examples, remove k random ones, move the k most helpful to the last steps, reverse, greedy search),
trains real models on them and compares. Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_verify.py [--runs run-040 run-043 run-047] [--k 10]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Counterfactuals checked against real retraining (digits)"


def main(argv: list[str] | None = None) -> int:
    from simfluence.apps.verify import verify_counterfactuals
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_digits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/simfluence-bench-digits", help="digits run set (made if absent)")
    parser.add_argument("--runs", nargs="+", default=["run-040", "run-043", "run-047"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    generate_digits(args.cache, progress=False)
    runset = RunSet.load(args.cache)
    sim = make_simulator("linear_mom").fit(runset, runs=range(len(runset) - 8))
    rows, reproduction = {}, []
    for name in args.runs:
        base = runset[name]
        targets = [runset.test_ids[i] for i in np.argsort(-np.asarray(base.losses[-1]))[:10]]
        result = verify_counterfactuals(sim, runset, name, targets, k=args.k, progress=False)
        reproduction.append(result.base_reproduction)
        for _, row in result.table.iloc[1:].iterrows():
            rows.setdefault(row["edit"], []).append(row)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_verify.py` on {os.cpu_count()} cores. Default digits run set "
        f"({len(runset)} runs x {runset[0].n_steps} steps), `linear_mom` "
        f"(lam={sim.lam_:g}, momentum={sim.momentum_:g}) "
        f"fitted on the first {len(runset) - 8} runs; base runs {', '.join(args.runs)} (held out); targets = each "
        f"base run's 10 test examples with the highest final loss; k = {args.k}. Retraining each base curriculum "
        f"reproduces its logged losses to {max(reproduction):.1e}.",
        "",
        "Targets' mean change of final loss against the retrained base, predicted / actual, per base run; "
        "`rho` = Spearman across all test examples of predicted vs actual change; `mse` = all-steps MSE of the "
        "predicted trajectories.",
        "",
        "| counterfactual | " + " | ".join(args.runs) + " | mean predicted / actual | mean rho | mean mse |",
        "|---" * (len(args.runs) + 4) + "|",
    ]
    for edit, per_run in rows.items():
        cells = [f"{r['target_predicted_change']:+.3f} / {r['target_actual_change']:+.3f}" for r in per_run]
        pred = np.mean([r["target_predicted_change"] for r in per_run])
        act = np.mean([r["target_actual_change"] for r in per_run])
        rho = np.nanmean([r["rho_change"] for r in per_run])
        mse = np.mean([r["all_mse"] for r in per_run])
        lines.append(f"| {edit} | " + " | ".join(cells) + f" | {pred:+.3f} / {act:+.3f} | {rho:.2f} | {mse:.3f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
