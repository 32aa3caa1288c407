"""Benchmark: exact fast leave-one-out vs N separate (batched) rollouts, and curricula simulated per second.

On the digits workload (generated into a cache folder on first use), fits a simulator on the training
runs, then for a held-out run's curriculum computes the effect of removing each of the N pool examples
(a) with the exact ``leave_one_out`` of the linear family (``simfluence.simulators.loo``) and (b) by
simulating the N leave-one-out curricula in batches, and reports both times and the largest difference.
Also times ``simulate`` on 1,000 random curricula of the default size. Prints a markdown table and
records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_counterfactual.py            # default digits sizes
    python benchmarks/bench_counterfactual.py --quick    # small smoke run (not recorded)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Counterfactuals: exact leave-one-out vs N rollouts; curricula per second"
BASELINE_REV = "c307773"  # the rollout before issue 13's fast simulation
TARGET_RATE = 10_000  # curricula per second (T=200, B=8, M=100)
TARGET_LOO_ROLLOUTS = 10  # exact leave-one-out for every pool example within this many single rollouts


def _time(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def throughput(cache: Path, n_cur: int, repeat: int) -> dict:
    """Curricula per second of ``linear_mom`` (lam=1, momentum=0.8) on random curricula, best of ``repeat``."""
    from simfluence.curriculum import random_curricula
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet

    runset = RunSet.load(cache)
    n = len(runset)
    sim = make_simulator("linear_mom", lam=1.0, momentum=0.8).fit(runset, runs=range(n - 1))
    curricula = random_curricula(n_cur, runset.n_pool, 8, runset[0].n_steps, subset_size=runset.n_pool // 2, seed=0)
    seconds, _ = _time(lambda: sim.simulate(curricula, runset[0].initial_losses), repeat=repeat)
    result = {"seconds": seconds, "n_cur": n_cur, "load": os.getloadavg()[0]}
    from simfluence.simulators import dynamics

    if hasattr(dynamics, "_SIM_MAX_THREADS"):  # the same on one thread (packages before threads had one)
        threads, dynamics._SIM_MAX_THREADS = dynamics._SIM_MAX_THREADS, 1
        try:
            result["one_thread_seconds"], _ = _time(lambda: sim.simulate(curricula, runset[0].initial_losses),
                                                    repeat=repeat)
        finally:
            dynamics._SIM_MAX_THREADS = threads
    return result


def _baseline_throughput(rev: str, cache: Path, n_cur: int, repeat: int) -> dict:
    """:func:`throughput` with the package as of git ``rev`` (extracted to a temporary folder)."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "simfluence"], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker-throughput", str(out), "--cache", str(cache), "--n-cur",
               str(n_cur), "--repeat", str(repeat)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": tmp}, cwd=tmp)
        return json.loads(out.read_text())


def run(args: argparse.Namespace) -> str:
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_digits

    sizes = dict(n_runs=12, n_steps=60, pool_size=120, test_size=30) if args.quick else {}
    cache = Path(args.cache)
    generate_digits(cache, progress=False, **sizes)
    runset = RunSet.load(cache)
    n = len(runset)
    rows = []
    for method in args.methods:
        sim = make_simulator(method, lam=1.0, **({"momentum": 0.8} if method == "linear_mom" else {}))
        sim.fit(runset, runs=range(n - 8 if n > 8 else n - 1))
        run = runset[n - 1]
        cur, initial, lrs = run.curriculum, run.initial_losses, run.learning_rates
        fast_s, fast = _time(lambda sim=sim, cur=cur, initial=initial, lrs=lrs: sim.leave_one_out(cur, initial, lrs),
                             repeat=7)
        one_s, _ = _time(lambda sim=sim, cur=cur, initial=initial, lrs=lrs: sim.simulate(cur, initial, [lrs]),
                         repeat=7)
        n_pool = runset.n_pool
        present = np.flatnonzero(cur.counts(n_pool) > 0)  # absent examples have no effect: not re-simulated
        edited = [cur.remove([int(i)]) for i in present]

        def brute(sim=sim, cur=cur, initial=initial, lrs=lrs, edited=edited):
            base = sim.simulate(cur, initial, [lrs], clip=False)[0, -1]
            out = sim.simulate(edited, initial, [lrs] * len(edited), clip=False)[:, -1]
            return out - base

        brute_s, slow = _time(brute, repeat=2)
        diff = float(np.abs(fast[present] - slow).max())
        rows.append((method, f"{present.size} of {n_pool}", cur.n_steps, runset.n_test, brute_s, fast_s,
                     brute_s / fast_s, diff, float(np.abs(slow).max()), one_s))

    n_cur = 200 if args.quick else 1000
    before = _baseline_throughput(args.baseline, cache, n_cur, args.repeat) if args.baseline else None
    after = throughput(cache, n_cur, args.repeat)
    sim_s = after["seconds"]

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_counterfactual.py{' --quick' if args.quick else ''}` on "
        f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, numpy {np.__version__}.",
        f"Run set: digits workload, {n} runs x {runset[0].n_steps} steps, pool {runset.n_pool}, "
        f"{runset.n_test} test examples; simulator fitted on the first runs, queries on the last run's curriculum.",
        "",
        "| simulator | examples in the curriculum | T | tests | N batched rollouts (s) | exact LOO (s) | speed-up "
        "| one rollout (s) | exact LOO in rollouts | max abs diff | max abs effect |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, n_pool, steps, n_test, brute_s, fast_s, ratio, diff, scale, one_s in rows:
        lines.append(f"| {method} | {n_pool} | {steps} | {n_test} | {brute_s:.3f} | {fast_s:.4f} | {ratio:.0f}x | "
                     f"{one_s:.4f} | {fast_s / one_s:.1f} | {diff:.1e} | {scale:.3g} |")
    rate = n_cur / sim_s
    lines += [
        "",
        f"Simulation throughput (`linear_mom`, {n_cur} random curricula of {runset[0].n_steps} steps x batch 8, "
        f"{runset.n_test} test examples, one batched call, best of {args.repeat}, load {after['load']:.1f}): "
        f"{sim_s:.3f} s = **{rate:,.0f} curricula/s** (target >= {TARGET_RATE:,}: "
        f"{'meets' if rate >= TARGET_RATE else 'MISSES'} at this load: the rate falls on a busy machine; "
        "curricula simulated in parallel threads, one per core"
        + ("" if "one_thread_seconds" not in after else
           f"; on one thread {n_cur / after['one_thread_seconds']:,.0f} curricula/s")
        + ")"
        + ("" if before is None else
           f"; the package at git `{args.baseline}`, same run set and curricula, measured just before in this run "
           f"(load {before['load']:.1f}): {before['seconds']:.3f} s = {n_cur / before['seconds']:,.0f} curricula/s, "
           f"so **{before['seconds'] / sim_s:.1f}x** faster")
        + ".",
        "",
        "Targets: exact leave-one-out >= 100x faster than N batched rollouts, same answers (1e-8) (issue 5): "
        + ", ".join(f"{r[0]} {r[6]:.0f}x, {r[7]:.0e} ({'meets' if r[6] >= 100 and r[7] <= 1e-8 else 'MISSES'})"
                    for r in rows) + "; "
        f"exact leave-one-out for all pool examples within {TARGET_LOO_ROLLOUTS} single rollouts' time "
        "(`one rollout` = `simulate` of the base curriculum alone, best of 7) (issue 13): "
        + ", ".join(f"{r[0]} {r[5] / r[9]:.1f} ({'meets' if r[5] / r[9] <= TARGET_LOO_ROLLOUTS else 'MISSES'})"
                    for r in rows) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, not recorded")
    parser.add_argument("--methods", nargs="+", default=["linear", "linear_mom"])
    parser.add_argument("--cache", default="/tmp/simfluence-bench-digits", help="digits run set (made if absent)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision whose simulation throughput is "
                        f"measured for comparison (default {BASELINE_REV}; empty: none)")
    parser.add_argument("--repeat", type=int, default=5, help="throughput: best of this many calls")
    parser.add_argument("--n-cur", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--worker-throughput", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_throughput:
        args.worker_throughput.write_text(json.dumps(throughput(Path(args.cache), args.n_cur, args.repeat)))
        return 0
    if args.quick:
        args.cache = args.cache + "-quick"
    section = run(args)
    print(section)
    if not args.quick:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
