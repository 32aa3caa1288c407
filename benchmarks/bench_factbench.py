"""Benchmark: fact tracing on the facts workload — which method finds the passages, which changes the prediction.

Generates (or reuses) the default facts run set with checkpoints at steps 0, 100 and 200, then runs
``simfluence.apps.factbench.run_factbench`` (BM25, TracIn, gradient cosine, TrackStar, gradient cosine at the
final checkpoint only — TrackStar's control, since TrackStar uses only that checkpoint —, and the learned
simulator ``linear_mom``'s leave-one-out influence; MRR, recall@10, strict recall@10, precision@10 per
frequency bucket, candidate-set reranking, tail-patch). Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_factbench.py [--cache DIR] [--data-seeds 0 1]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

METHODS = ("bm25", "tracin", "tracin_cos", "trackstar", "tracin_cos_final", "linear_mom")
SECTION = "## Fact tracing: attribution (finding the passages) vs influence (tail-patch), facts workload"


def _overall(frame, method: str) -> dict[str, float]:
    row = frame[(frame["setting"] == "full") & (frame["method"] == method) & (frame["bucket"] == "all")].iloc[0]
    return {"mrr": row["mrr"], "rec": row["recall@10"], "tp": row["tail_patch"]}


def main(argv: list[str] | None = None) -> int:
    from simfluence.apps.factbench import format_factbench, run_factbench
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_facts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/facts-ckpt", help="facts run set with checkpoints (made if absent)")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1],
                        help="fact worlds to run; the first is reported in full, all in the seed summary")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    frames = {}
    for data_seed in args.data_seeds:
        cache = args.cache if data_seed == 0 else f"{args.cache}-seed{data_seed}"
        generate_facts(cache, checkpoint_steps=(0, 100, 200), data_seed=data_seed, progress=False)
        start = time.perf_counter()
        frame = run_factbench(RunSet.load(cache), methods=METHODS)
        frames[data_seed] = (RunSet.load(cache), frame, time.perf_counter() - start)
    runset, frame, seconds = frames[args.data_seeds[0]]
    meta = runset.metadata
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_factbench.py` on {os.cpu_count()} cores ({seconds:.0f} s for "
        f"the benchmark). Run set: facts workload, default tier ({len(runset)} runs x {runset[0].n_steps} steps, "
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
    ])
    print(section)
    write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
