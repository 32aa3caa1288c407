"""Benchmark: LDS of every method on digits — random edits of held-out runs, each retrained for real.

On the default digits run set with checkpoints at steps 0/50/100/150/200 (generated into a cache folder on
first use; the same cache as ``bench_methods.py``), fits every method on the first 40 runs (``unrolled``,
when the registry has it, around each base run instead), draws 40 random edits of each of 3 held-out base
runs per protocol (remove 1 / 5 / 10% of the examples the run used, move 8 examples' occurrences to the
last steps, keep a random half), retrains every draw for real (same initial weights and seed as the base;
3 x 5 x 40 = 600 runs, resumable in ``--out``) and reports per method and protocol the LDS with its
bootstrap 95% interval, sign agreement of the mean change, |predicted| / |actual| and wall time
(``simfluence.apps.lds.run_lds``). Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_lds.py [--cache DIR] [--out DIR] [--workers 2] [--draws 40] [--tests K]

``--tests K`` scores every method on one seeded random subset of K tests (its own section, "on K of N queries"):
per-query methods such as ``unrolled`` then cost K / N as much, and the draws retrained with every query serve it.
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

SECTION = "## LDS: counterfactual predictions against real retraining (digits)"
LEARNED = ("mean_curve", "additive", "linear", "linear_step", "linear_mom", "linear_mom_log")
# gradient methods (scored when the registry has them): TracIn in both forms, the fair forms of the others
OPTIONAL = ("tracin", "tracin_offset", "tracin_cos_offset", "influence_offset", "trackstar_offset", "unrolled",
            "blend", "blend_influence")
SECTION_FACTS = "## LDS: counterfactual predictions against real retraining (facts language model)"
SECTION_FACTS_SMOOTH = ("## LDS: counterfactual predictions against real retraining (facts language model, smooth "
                        "recipe)")
FACTS_CACHES = {"facts": "/tmp/facts-ckpt", "facts-smooth": "/tmp/facts-smooth-ckpt"}
PROTOCOLS = ("remove-1", "remove-5", "remove-10", "move-end", "half")
CHECKPOINT_STEPS = (0, 50, 100, 150, 200)


def without_self_checks(name: str):
    """The registry's simulator ``name`` with ``check_linearity`` off (also in a blend's members): its predictions
    are unchanged, only the replayed-removal check after the fit (one or two exact replays) is skipped."""
    from simfluence.methods import make_simulator

    simulator = make_simulator(name)
    params = simulator.get_params()
    if "check_linearity" in params:
        simulator.set_params(check_linearity=False)
    if "members" in params and "member_params" in params:
        checked = {member: {**(params["member_params"] or {}).get(member, {}), "check_linearity": False}
                   for member in params["members"] if "check_linearity" in make_simulator(member).get_params()}
        simulator.set_params(member_params={**(params["member_params"] or {}), **checked})
    return simulator


def main(argv: list[str] | None = None) -> int:
    from simfluence.apps.lds import describe_protocol, format_lds_table, run_lds, write_lds_report
    from simfluence.methods import METHODS
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_digits, generate_facts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/simfluence-bench-digits-ckpt", help="run set (made if absent)")
    parser.add_argument("--out", default="/tmp/simfluence-bench-lds", help="retrained draws and the report")
    parser.add_argument("--bases", nargs="+", default=["run-040", "run-043", "run-047"])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workload", choices=["digits", "facts", "facts-smooth"], default="digits",
                        help="facts: the language-model workload (default tier, checkpoints 0/100/200; cache "
                        "/tmp/facts-ckpt, the one bench_factbench.py uses), with --protocols and --methods; "
                        "facts-smooth: the same fine-tuned with the smooth recipe (tier default-smooth, cache "
                        "/tmp/facts-smooth-ckpt)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
    parser.add_argument("--methods", nargs="+", default=None, help="default: every learned and gradient method")
    parser.add_argument("--tests", type=int, default=None,
                        help="score every method on the same seeded random subset of this many tests (e.g. to "
                        "afford unrolled on facts); the draws are retrained with every test, as without it")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    facts = args.workload.startswith("facts")
    if facts:
        cache = args.cache if args.cache != parser.get_default("cache") else FACTS_CACHES[args.workload]
        generate_facts(cache, checkpoint_steps=(0, 100, 200), progress=False, workers=args.workers,
                       smooth=args.workload == "facts-smooth")
        if args.out == parser.get_default("out"):
            args.out = f"/tmp/simfluence-bench-lds-{args.workload}"
    else:
        cache = args.cache
        generate_digits(cache, checkpoint_steps=CHECKPOINT_STEPS, progress=False)
    runset = RunSet.load(cache)
    if args.bases == parser.get_default("bases") and facts:
        args.bases = runset.run_names[-3:]
    methods = args.methods or list(LEARNED) + [name for name in OPTIONAL if name in METHODS]
    # the truth here is real retraining: the methods' own self-checks (extra exact replays after a fit) are left out
    methods = {name: without_self_checks(name) for name in methods}
    protocols = tuple(args.protocols)
    tests = None
    if args.tests is not None and args.tests < runset.n_test:
        chosen = np.random.default_rng(0).choice(runset.n_test, size=args.tests, replace=False)
        tests = [runset.test_ids[column] for column in np.sort(chosen)]
    start = time.perf_counter()
    result = run_lds(runset, methods, base_runs=args.bases, train_runs=range(len(runset) - 8),
                     protocols=protocols, n_draws=args.draws, out=Path(args.out) / "retrained", workers=args.workers,
                     tests=tests)
    wall = time.perf_counter() - start
    write_lds_report(result, args.out)
    per_base = result.settings["per_base_methods"]
    n_retrained = len(result.bases) * (1 + len(protocols) * args.draws)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    arguments = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/bench_lds.py", *arguments])
    described = (f"Default digits run set ({len(runset)} runs x {runset[0].n_steps} steps, pool {runset.n_pool}, "
                 f"{runset.n_test} tests, SGD momentum 0.9, warm-up + cosine; checkpoints at steps 0/50/100/150/200)"
                 if args.workload == "digits" else
                 f"Facts language-model run set ({'smooth recipe: ' if args.workload == 'facts-smooth' else ''}default "
                 f"tier: {len(runset)} runs x {runset[0].n_steps} steps of a tiny transformer fine-tuned with AdamW"
                 + (" with eps 1e-6 inside the square root" if args.workload == "facts-smooth" else "")
                 + f", {runset.n_pool} documents, {runset.n_test} fact queries; checkpoints at steps 0/100/200)")
    section_title = {"digits": SECTION, "facts": SECTION_FACTS, "facts-smooth": SECTION_FACTS_SMOOTH}[args.workload]
    n_scored = result.settings["n_tests"]
    if tests is not None:  # its own section: the table on all tests stays
        section_title = f"{section_title[:-1]}, on {n_scored} of {runset.n_test} queries)"
    lines = [
        section_title,
        "",
        f"Recorded {now} by `{command}` on {os.cpu_count()} cores. {described}. Methods fitted on the first "
        f"{len(result.train_runs)} runs" + (f" ({', '.join(per_base)}: around each base run)" if per_base else "")
        + f"; base runs {', '.join(result.bases)} (held out); {args.draws} draws per protocol and base run, every "
        f"one retrained for real from the base run's initial weights and seed: {n_retrained} runs in "
        f"`{args.out}/retrained`, {result.n_trained} of them trained by this call, which took {wall:.0f} s with "
        f"{args.workers} workers (a fresh `--out` retrains all of them). Retraining each base reproduces its log to "
        f"{result.base_reproduction:.1e}. Report and plots: `{args.out}/report.md`.",
        "",
        "Protocols: " + "; ".join(f"`{protocol}` {describe_protocol(protocol)}" for protocol in protocols) + ".",
        "",
        "LDS = per test example, Spearman over draws of predicted vs real change of its final loss (against the "
        f"unedited base), averaged over the {n_scored} test examples"
        + (f" (on {n_scored} of {runset.n_test}: a random subset of seed 0, the same for every method)"
           if tests is not None else "") + " and the base runs; [bootstrap 95% "
        "interval: resampled draws, recentred on the score]. Sign agreement: fraction of draws where the "
        "predicted mean change over test examples has the real one's sign; magnitude ratio: mean |predicted "
        "change| / mean |real change| (both averaged over protocols); n/a: the predictions never vary. Seconds: "
        "fit + predict every draw.",
        "",
        format_lds_table(result.table),
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, section_title, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
