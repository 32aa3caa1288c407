"""Benchmark: fact tracing on the facts workload — which method finds the passages, which changes the prediction.

Generates (or reuses) a facts run set (``--tier``: ``default``, the simple world, or ``hard``, the same sizes in
the hard world of shared names, aliases and decoys) with checkpoints at steps 0, 100 and 200, then runs
``simfluence.apps.factbench.run_factbench`` (BM25, TracIn, gradient cosine, TrackStar, gradient cosine at the
final checkpoint only — TrackStar's control, since TrackStar uses only that checkpoint —, and the learned
simulator ``linear_mom``'s leave-one-out influence; MRR, recall@10, strict recall@10, precision@10 per
frequency bucket, candidate-set reranking, tail-patch), and BM25 alone on both worlds (cheap: no training).
Prints markdown and records it in ``benchmarks/RESULTS.md``, one section per tier.

    python benchmarks/bench_factbench.py [--tier default|hard] [--cache DIR] [--data-seeds 0 1] [--n-runs N]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

METHODS = ("bm25", "tracin", "tracin_cos", "trackstar", "tracin_cos_final", "linear_mom")
SECTION = "## Fact tracing: attribution (finding the passages) vs influence (tail-patch), facts workload"
SECTIONS = {"default": SECTION, "hard": SECTION + ", hard world"}
WORLDS = {"default": "the simple world: unique names", "hard": (
    "the hard world: first and last names each shared by about four people, an alias per person used in some "
    "mentions, five training paraphrases per relation, 0-2 decoy sentences per fact naming the person and "
    "(80%) the fact's object without stating it, in the words of the relation's queries")}


def _overall(frame, method: str) -> dict[str, float]:
    row = frame[(frame["setting"] == "full") & (frame["method"] == method) & (frame["bucket"] == "all")].iloc[0]
    return {"mrr": row["mrr"], "rec": row["recall@10"], "tp": row["tail_patch"]}


def _bm25_by_world(data_seeds: list[int]) -> list[str]:
    """Markdown rows: BM25 MRR / recall@10 of every tier's world (default sizes) for each data seed."""
    from simfluence.apps.factbench import bm25_scores, gold_matrix, query_statements
    from simfluence.metrics import retrieval_metrics
    from simfluence.workloads.facts import TIERS, build_corpus

    rows = []
    for tier in SECTIONS:
        cells = []
        for data_seed in data_seeds:
            corpus = build_corpus(TIERS[tier], data_seed)
            scores = bm25_scores([doc["text"] for doc in corpus["documents"]], query_statements(corpus))
            metrics = retrieval_metrics(scores, gold_matrix(corpus), 10)
            cells.append(f"{np.mean(metrics['mrr']):.3f} / {np.mean(metrics['recall@10']):.3f} "
                         f"({len(corpus['documents'])} docs)")
        rows.append(f"| {tier} ({TIERS[tier].world}) | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    from simfluence.apps.factbench import format_factbench, run_factbench
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_facts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="hard", choices=sorted(SECTIONS), help="facts tier (its world and sizes)")
    parser.add_argument("--cache", default=None,
                        help="facts run set with checkpoints, made if absent (default /tmp/facts[-hard]-ckpt)")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1],
                        help="fact worlds to run; the first is reported in full, all in the seed summary")
    parser.add_argument("--n-runs", type=int, default=None, help="runs per run set (default: the tier's, 32)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    base_cache = args.cache or ("/tmp/facts-ckpt" if args.tier == "default" else f"/tmp/facts-{args.tier}-ckpt")
    frames = {}
    for data_seed in args.data_seeds:
        cache = base_cache if data_seed == 0 else f"{base_cache}-seed{data_seed}"
        generate_facts(cache, tier=args.tier, n_runs=args.n_runs, checkpoint_steps=(0, 100, 200),
                       data_seed=data_seed, progress=False)
        start = time.perf_counter()
        frame = run_factbench(RunSet.load(cache), methods=METHODS)
        frames[data_seed] = (RunSet.load(cache), frame, time.perf_counter() - start)
    runset, frame, seconds = frames[args.data_seeds[0]]
    meta = runset.metadata
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_runs_flag = "" if args.n_runs is None else f" --n-runs {args.n_runs}"
    section = "\n".join([
        SECTIONS[args.tier],
        "",
        f"Recorded {now} by `python benchmarks/bench_factbench.py --tier {args.tier} --data-seeds "
        f"{' '.join(map(str, args.data_seeds))}{n_runs_flag}` on {os.cpu_count()} cores ({seconds:.0f} s for "
        f"the benchmark). Run set: facts workload, {args.tier} tier, {WORLDS[args.tier]} ({len(runset)} runs x "
        f"{runset[0].n_steps} steps, "
        f"{runset.n_pool} documents, {runset.n_test} queries, data seed {meta.get('data_seed', 0)}), gradient methods "
        "on run 0's checkpoints (steps 0/100/200), `linear_mom` fitted on all runs, its score for a document = the "
        "document's leave-one-out effect on the query's final loss averaged over the runs that contain it. "
        "Tail-patch = mean increase of the target's probability after one AdamW step from the pretrained base on "
        "each of a method's top-10 documents. One data seed and one curriculum seed.",
        "",
        format_factbench(frame),
        "",
        f"Across fact worlds (data seeds {', '.join(map(str, args.data_seeds))}; curriculum seed 0), full ranking, "
        "all buckets — MRR / recall@10 / tail-patch:",
        "",
        "| method | " + " | ".join(f"data seed {seed}" for seed in args.data_seeds) + " |",
        "|---" * (len(args.data_seeds) + 1) + "|",
        *[
            f"| {method} | " + " | ".join(
                "{mrr:.3f} / {rec:.3f} / {tp:+.3f}".format(**_overall(frames[seed][1], method))
                for seed in args.data_seeds
            ) + " |"
            for method in frame["method"].unique()
        ],
        "",
        "BM25 alone on each world (default sizes; data seeds as above) — MRR / recall@10:",
        "",
        "| tier (world) | " + " | ".join(f"data seed {seed}" for seed in args.data_seeds) + " |",
        "|---" * (len(args.data_seeds) + 1) + "|",
        *_bm25_by_world(args.data_seeds),
        "",
    ])
    print(section)
    write_section(args.results, SECTIONS[args.tier], section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
