"""Benchmark: the learned simulators on other run sets than the demo's — replications the README quotes.

1. digits with a second curriculum seed (``generate_digits(seed=1)``) and with Adam instead of SGD
   (``optimizer="adam"``): every default method fitted on the first 40 runs, scored on the last 8;
2. the facts language-model workload (default tier, data seed 0, the run set bench_factbench.py uses): does
   fine-tuning teach the facts (mean final query loss when a gold document was in the run's curriculum vs
   when none was), and mean_curve / linear / linear_mom on its held-out runs.

Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_replications.py [--digits-cache DIR] [--facts-cache DIR]
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

SECTION = "## Replications: other curriculum seeds, Adam, and the language-model workload"


def _ratio_line(name: str, metrics: dict) -> str:
    best, base = metrics["linear_mom"], metrics["mean_curve"]
    return (f"| {name} | {best['all_mse']:.4f} | {base['all_mse']:.4f} | **{base['all_mse'] / best['all_mse']:.2f}x** "
            f"| {best['rho_runs']:.3f} | {metrics['linear']['rho_runs']:.3f} | {metrics['linear']['all_mse']:.4f} |")


def gold_split(runset, corpus) -> tuple[float, float]:
    """Mean final query loss over (run, query) pairs whose run saw a gold document, and pairs whose run did not."""
    seen, unseen = [], []
    for run in runset:
        present = run.curriculum.counts(runset.n_pool) > 0
        final = np.asarray(run.losses[-1], dtype=np.float64)
        for query, loss in zip(corpus["queries"], final, strict=True):
            (seen if present[query["gold"]].any() else unseen).append(loss)
    return float(np.mean(seen)), float(np.mean(unseen))


def main(argv: list[str] | None = None) -> int:
    from simfluence.evaluation import evaluate
    from simfluence.metrics import format_markdown_table
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_digits, generate_facts
    from simfluence.workloads.facts import load_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-cache", default="/tmp/simfluence-bench-replications")
    parser.add_argument("--facts-cache", default="/tmp/facts-ckpt", help="facts run set (made if absent)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    variants = {"digits, curriculum seed 1 (SGD)": {"seed": 1},
                "digits, Adam (curriculum seed 0)": {"optimizer": "adam"}}
    digits = {}
    for name, options in variants.items():
        folder = f"{args.digits_cache}-{'-'.join(f'{k}{v}' for k, v in options.items())}"
        generate_digits(folder, progress=False, **options)
        digits[name] = evaluate(RunSet.load(folder), holdout=8).metrics
    generate_facts(args.facts_cache, checkpoint_steps=(0, 100, 200), progress=False)
    facts = RunSet.load(args.facts_cache)
    with_gold, without_gold = gold_split(facts, load_corpus(facts))
    lm = evaluate(facts, ["mean_curve", "linear", "linear_mom"], holdout=8).metrics
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_replications.py` on {os.cpu_count()} cores. Every run set: "
        "fitted on all but the last 8 runs, scored on those 8 (hyper-parameters chosen on validation runs carved "
        "out of the training runs).",
        "",
        "| run set | linear_mom all_mse | mean_curve all_mse | mean curve / linear_mom | linear_mom rho_runs "
        "| linear (paper) rho_runs | linear (paper) all_mse |",
        "|---|---|---|---|---|---|---|",
        *[_ratio_line(name, metrics) for name, metrics in digits.items()],
        _ratio_line(f"facts LM ({len(facts)} runs x {facts[0].n_steps} steps, {facts.n_pool} documents, "
                    f"{facts.n_test} queries)", {**lm, "linear": lm["linear"]}),
        "",
        f"Facts workload: mean final query loss {with_gold:.3f} over (run, query) pairs whose run's curriculum "
        f"contained a gold document vs {without_gold:.3f} over pairs whose did not (fine-tuning teaches the facts).",
        "",
        "Facts workload, held-out metrics:",
        "",
        format_markdown_table(lm),
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
