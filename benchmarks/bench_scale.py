"""Fit at scale: `linear_mom` with its automatic choices (lam and momentum on validation runs), time and memory
over the pool size N, the number of test examples M and the logged data (runs x steps x batch).

Every point is a fresh subprocess that generates a synthetic run set from a known Simfluence-Linear model
(`simfluence.synthetic.known_linear_runset`, noise 1e-3), fits ``make_simulator("linear_mom")`` on all its
runs and reports the wall time of ``fit``, the subprocess's peak resident memory (``ru_maxrss``, the run set
included) and where the time went (cProfile, by stage: building the transitions, the CG solves, the
validation rollouts). The issue's target size (N=100,000, M=1,000, 256 x 1,000 x 32) is extrapolated from
the measured points with a power law per axis fitted to the points that vary that axis alone -- an
extrapolation, not a measurement, and labelled so.

    python benchmarks/bench_scale.py                 # the default curve; replaces its section of RESULTS.md
    python benchmarks/bench_scale.py --quick         # two tiny points, prints only
    python benchmarks/bench_scale.py --point 20000 200 64 500 16   # one extra point (N M R T B)
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Scale: linear_mom with automatic lam and momentum, over N, M and runs x steps x batch"
# N, M, runs, steps, batch. The base keeps the target's shape: more transitions (runs x steps) than unknowns per
# test example (2 N + 2 steps), ratio ~0.7 (target: 202,000 / 256,000 = 0.79); N grows together with the runs so
# that the ratio, and with it the conditioning, stays put.
BASE = (2000, 50, 32, 200, 16)
CURVE = [  # two points per axis (about 15 min on 2 shared cores); --point adds more
    BASE,
    (4000, 50, 64, 200, 16),  # N and runs together
    (2000, 200, 32, 200, 16),  # M
    (2000, 50, 64, 200, 16),  # runs (more data, same N)
]
QUICK = [(300, 10, 8, 50, 8), (600, 10, 8, 50, 8)]
TARGET = (100_000, 1000, 256, 1000, 32)
STAGES = {  # cProfile entries (file suffix, function) whose cumulative time is a stage
    "transitions": ("design.py", "build_transitions"),
    "CG solves": ("solvers.py", "solve_ridge"),
    "validation rollouts": ("linear.py", "validation_mse"),
}


def worker(point: tuple[int, ...], out: Path) -> None:
    from simfluence.methods import make_simulator
    from simfluence.synthetic import known_linear_runset

    n_pool, n_test, n_runs, n_steps, batch = point
    start = time.perf_counter()
    runset, _, _ = known_linear_runset(n_pool=n_pool, n_test=n_test, n_runs=n_runs, n_steps=n_steps,
                                       batch_size=batch, noise=1e-3, seed=0)
    generate_s = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sim = make_simulator("linear_mom")
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    sim.fit(runset)
    profile.disable()
    fit_s = time.perf_counter() - start
    stats = pstats.Stats(profile).stats
    stages = {}
    for name, (suffix, function) in STAGES.items():
        stages[name] = sum(entry[3] for (path, _, func), entry in stats.items()
                           if path.endswith(suffix) and func == function)
    info = sim.solve_info_
    out.write_text(json.dumps({
        "point": list(point), "generate_s": generate_s, "fit_s": fit_s, "stages": stages,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_fit_mib": rss_before,
        "lam": sim.lam_, "momentum": sim.momentum_, "n_candidates": len(sim.validation_),
        "final_iterations": info.n_iter, "kernel": info.kernel, "dtype": info.dtype, "n_blocks": info.n_blocks,
        "load_after": os.getloadavg()[0],
    }))


def _measure(point: tuple[int, ...], tmp: Path) -> dict:
    out = tmp / ("-".join(map(str, point)) + ".json")
    print(f"  N={point[0]} M={point[1]} {point[2]}x{point[3]}x{point[4]} ...", flush=True)
    cmd = [sys.executable, __file__, "--worker", *map(str, point), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"point {point} failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(out.read_text())
    print(f"    fit {result['fit_s']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def _exponent(results: list[dict], axis: slice, joint: bool = False) -> float | None:
    """Power-law exponent of fit time along ``axis`` of the point (size: its first entry), from points equal to
    BASE elsewhere (``joint``: N and runs scaled by the same factor, M at the base)."""
    base = np.array(BASE)
    chosen = []
    for res in results:
        point = np.array(res["point"])
        other = np.ones(len(base), dtype=bool)
        other[axis] = False
        if joint:
            scale = point[0] / base[0]
            if point[1] == base[1] and point[2] == base[2] * scale and np.array_equal(point[3:], base[3:]):
                chosen.append((float(point[0]), res["fit_s"]))
        elif np.array_equal(point[other], base[other]):
            chosen.append((float(point[axis][0]), res["fit_s"]))
    if len({size for size, _ in chosen}) < 2:
        return None
    sizes, seconds = np.log([c[0] for c in chosen]), np.log([c[1] for c in chosen])
    return float(np.polyfit(sizes, seconds, 1)[0])


def run(args: argparse.Namespace) -> str:
    points = [tuple(p) for p in (QUICK if args.quick else CURVE)] + [tuple(p) for p in args.point]
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for point in points:
            results.append(_measure(point, Path(tmpdir)))
    load_after = os.getloadavg()
    lines = [
        SECTION,
        "",
        f"Recorded {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by "
        f"`python benchmarks/bench_scale.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on "
        f"{os.cpu_count()} cores shared with other jobs ({platform.machine()}, Python {platform.python_version()}); "
        f"load average (1/5/15 min) before {' '.join(f'{v:.1f}' for v in load_before)}, after "
        f"{' '.join(f'{v:.1f}' for v in load_after)}. Each point: one subprocess, one fit "
        "(`make_simulator('linear_mom').fit(runset)`: 7 lams x 4 momenta on the last 20% of the runs, then the "
        "final fit), synthetic runs with noise 1e-3.",
        "",
        "| N | M | runs x steps x batch | fit (s) | transitions (s) | CG solves (s) | validation rollouts (s) | "
        "peak RSS (MiB) | lam, momentum chosen | final CG iterations | precision, kernel | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        n_pool, n_test, n_runs, n_steps, batch = res["point"]
        st = res["stages"]
        lines.append(
            f"| {n_pool:,} | {n_test:,} | {n_runs} x {n_steps} x {batch} | {res['fit_s']:.1f} | "
            f"{st['transitions']:.1f} | {st['CG solves']:.1f} | {st['validation rollouts']:.1f} | "
            f"{res['peak_rss_mib']:.0f} | {res['lam']:g}, {res['momentum']:g} | {res['final_iterations']} | "
            f"{res['dtype']}, {res['kernel']} | {res['load_after']:.1f} |")
    exponents = {"N and runs together": _exponent(results, slice(0, 3), joint=True),
                 "M": _exponent(results, slice(1, 2)), "runs": _exponent(results, slice(2, 3))}
    lines += ["", "Fitted power laws (fit time ~ size^k along one axis, the others at N={:,}, M={}, {}x{}x{}): "
              .format(*BASE) + ", ".join(f"{axis}: k = {k:.2f}" if k is not None else f"{axis}: n/a"
                                         for axis, k in exponents.items()) + "."]
    base = next((res for res in results if tuple(res["point"]) == BASE), None)
    if base is not None and all(k is not None for k in exponents.values()):
        n_pool, n_test, n_runs, n_steps, batch = TARGET
        size = n_pool / BASE[0]  # N and the data together (the target's data grows 40x for 50x the pool)
        data = (n_runs * n_steps) / (BASE[2] * BASE[3]) / size
        factor = (size ** exponents["N and runs together"] * (n_test / BASE[1]) ** exponents["M"]
                  * data ** exponents["runs"] * (batch / BASE[4]))  # batch: non-zeros grow linearly (not measured)
        projected = base["fit_s"] * factor
        lines += ["", f"**Extrapolated, not measured**: N={n_pool:,}, M={n_test:,}, {n_runs} x {n_steps} x {batch} "
                  f"-> {projected:,.0f} s ({projected / 60:,.0f} min) on this machine at this load, against the "
                  "target of 10 min (products of the per-axis power laws from the base point: N with the runs, "
                  "then M, then the remaining data factor, batch size taken as linear in the number of non-zeros; "
                  "interactions between the axes are not in it, and the target's 1,000 steps add 2,000 step "
                  "terms that the base's 200 steps do not show)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny points {QUICK}, not recorded")
    parser.add_argument("--point", type=int, nargs=5, action="append", default=[], metavar=("N", "M", "R", "T", "B"),
                        help="an extra point to measure (repeatable)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--worker", type=int, nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(tuple(args.worker), args.out)
        return 0
    section = run(args)
    print(section)
    if not args.quick:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
