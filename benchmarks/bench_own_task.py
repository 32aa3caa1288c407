"""Benchmark: the "your own task" path of the README, end to end, on a task the package does not ship.

``examples/wine_task.py`` (logistic regression on scikit-learn's bundled wine data, SGD with a step-decay
schedule, dataset-row pool ids, string test ids) generates 32 runs of 60 steps on random half-pool subsets;
the runs are exported to CSV and imported into a run set that records no task (as a user logging from their
own trainer would have); every learned simulator is scored on the last 4 runs; ``linear_mom`` fitted on the
first 28 is then verified by retraining real models on counterfactual curricula of the last run, with the
task given as ``examples/wine_task.py:make_task``. Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_own_task.py
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Your own task: wine logistic regression, imported from CSV, verified with --task"


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from simfluence.apps.verify import verify_counterfactuals
    from simfluence.evaluation import evaluate
    from simfluence.importers import import_tables
    from simfluence.methods import make_simulator
    from simfluence.metrics import format_markdown_table
    from simfluence.task import load_task
    from simfluence.training import generate_random_runs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    spec = f"{ROOT / 'examples' / 'wine_task.py'}:make_task"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        generated = generate_random_runs(load_task(spec), folder / "generated", n_runs=32, n_steps=60,
                                         batch_size=8, subset_fraction=0.5, seed=0, progress=False)
        rates = pd.DataFrame({
            "run": np.repeat(generated.run_names, [run.n_steps for run in generated]),
            "step": np.concatenate([np.arange(1, run.n_steps + 1) for run in generated]),
            "lr": np.concatenate([run.learning_rates for run in generated]),
        })
        generated.curriculum_frame().merge(rates, on=["run", "step"]).to_csv(folder / "curriculum.csv", index=False)
        generated.to_frame().to_csv(folder / "losses.csv", index=False)
        runset = import_tables(folder / "curriculum.csv", folder / "losses.csv", out=folder / "imported")
        result = evaluate(runset, holdout=4)
        simulator = make_simulator("linear_mom").fit(runset, runs=range(len(runset) - 4))
        base = runset[-1]
        targets = [runset.test_ids[i] for i in np.argsort(-np.asarray(base.losses[-1]))[:5]]
        verification = verify_counterfactuals(simulator, runset, base.name, targets, k=5, progress=False, task=spec)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = verification.table.iloc[1:]
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_own_task.py` on {os.cpu_count()} cores. Task "
        f"`examples/wine_task.py:make_task` ({runset.n_pool} pool / {runset.n_test} test wines); "
        f"{len(runset)} runs x {runset[0].n_steps} steps of batch 8 on random half-pool subsets, exported to CSV "
        "and imported (the imported run set records no task). Held-out evaluation on the last 4 runs:",
        "",
        format_markdown_table(result.metrics),
        "",
        f"Verification by retraining (`verify --task examples/wine_task.py:make_task`): base run {base.name}, "
        f"targets = its 5 highest-loss test wines ({', '.join(map(str, targets))}), k = 5; `linear_mom` "
        f"(lam={simulator.lam_:g}, momentum={simulator.momentum_:g}) fitted on the first {len(runset) - 4} runs. "
        f"Retraining the imported base curriculum reproduces its logged losses to "
        f"{verification.base_reproduction:.1e}.",
        "",
        "| counterfactual | targets' change, predicted / actual | rho (all tests) |",
        "|---|---|---|",
        *[f"| {row.edit} | {row.target_predicted_change:+.4f} / {row.target_actual_change:+.4f} | "
          f"{row.rho_change:.2f} |" for row in table.itertuples()],
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
