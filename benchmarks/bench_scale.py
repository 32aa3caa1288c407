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
    python benchmarks/bench_scale.py --compare       # every point before and after the solver's kernel fix
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


def worker(point: tuple[int, ...], out: Path, variant: str = "after") -> None:
    from simfluence import solvers
    from simfluence.methods import make_simulator
    from simfluence.synthetic import known_linear_runset

    if variant == "before":  # the solver as it was: torch on every thread whatever the load
        solvers.free_cores = lambda: os.cpu_count() or 1
        if hasattr(solvers, "_RELIABLE_UPDATES"):
            solvers._RELIABLE_UPDATES = False

    n_pool, n_test, n_runs, n_steps, batch = point
    start = time.perf_counter()
    runset, _, _ = known_linear_runset(n_pool=n_pool, n_test=n_test, n_runs=n_runs, n_steps=n_steps,
                                       batch_size=batch, noise=1e-3, seed=0)
    generate_s = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sim = make_simulator("linear_mom")
    _record_solves()
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
        "load_after": os.getloadavg()[0], "variant": variant, "threads": _torch_threads_used(),
        "cg_iterations": [entry["n_iter"] for entry in _SOLVES],
    }))


_SOLVES: list[dict] = []


def _torch_threads_used() -> int:
    return max((entry["threads"] for entry in _SOLVES if entry["kernel"] == "torch"), default=0)


def _record_solves() -> None:
    """Wrap the solver the simulators call so that every solve's iterations and torch threads are kept."""
    import simfluence.simulators.linear as linear

    original = linear.solve_ridge

    def recorded(*args, **kwargs):
        theta, info = original(*args, **kwargs)
        _SOLVES.append({"n_iter": info.n_iter, "kernel": info.kernel, "threads": info.threads})
        return theta, info

    linear.solve_ridge = recorded


def _measure(point: tuple[int, ...], tmp: Path, variant: str = "after") -> dict:
    out = tmp / ("-".join(map(str, point)) + f"-{variant}.json")
    print(f"  N={point[0]} M={point[1]} {point[2]}x{point[3]}x{point[4]} ({variant}) ...", flush=True)
    cmd = [sys.executable, __file__, "--worker", *map(str, point), "--out", str(out), "--variant", variant]
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
    curve = [CURVE[index] for index in args.curve_points] if args.curve_points is not None else CURVE
    points = [tuple(p) for p in (QUICK if args.quick else curve)] + [tuple(p) for p in args.point]
    load_before = os.getloadavg()
    variants = ("before", "after") if args.compare else ("after",)
    results, before = [], {}
    with tempfile.TemporaryDirectory() as tmpdir:
        for point in points:  # the variants of a point back to back, so that they see the same load
            for variant in variants:
                result = _measure(point, Path(tmpdir), variant)
                (results if variant == "after" else before.setdefault("all", [])).append(result)
                if variant == "before":
                    before[tuple(point)] = result
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
        "final fit), synthetic runs with noise 1e-3."
        + (" `before`: the solver with torch's kernel on every thread whatever the load (as before the fix); "
           "`after`: torch on the cores free when the solve starts (one on a loaded machine), the kernel timed "
           "against scipy's; the two variants of a point ran back to back." if args.compare else ""),
        "",
        "| N | M | runs x steps x batch | solver | fit (s) | transitions (s) | CG solves (s) | validation rollouts (s) "
        "| peak RSS (MiB) | lam, momentum chosen | CG iterations, final fit | CG iterations, every solve | precision, "
        "kernel (torch threads) | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in [entry for point_results in zip(before.get("all", results), results, strict=True)
                for entry in (point_results if args.compare else point_results[1:])]:
        n_pool, n_test, n_runs, n_steps, batch = res["point"]
        st = res["stages"]
        kernel = res["kernel"] + (f" ({res['threads']})" if res["kernel"] == "torch" else "")
        lines.append(
            f"| {n_pool:,} | {n_test:,} | {n_runs} x {n_steps} x {batch} | {res['variant']} | {res['fit_s']:.1f} | "
            f"{st['transitions']:.1f} | {st['CG solves']:.1f} | {st['validation rollouts']:.1f} | "
            f"{res['peak_rss_mib']:.0f} | {res['lam']:g}, {res['momentum']:g} | {res['final_iterations']} | "
            f"{' '.join(map(str, res['cg_iterations']))} | {res['dtype']}, {kernel} | {res['load_after']:.1f} |")
    if args.compare:
        ratios = [before[tuple(res["point"])]["fit_s"] / res["fit_s"] for res in results]
        lines += ["", "Fit time before / after, point by point: " + ", ".join(f"{r:.2f}x" for r in ratios) + "."]
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


def floor(point: tuple[int, ...] = TARGET, repeats: int = 2) -> str:
    """Seconds of one CG iteration (the normal operator on every column, test block by test block, as ``solve_ridge``
    runs it in float32 with the kernel it times best) at ``point``'s size, on random batches and losses: what each
    iteration of each solve costs there, whatever the iteration count."""
    import scipy.sparse as sp

    from simfluence import solvers

    n_pool, n_test, n_runs, n_steps, batch = point
    rng = np.random.default_rng(0)
    n_rows = n_runs * n_steps
    ids = rng.integers(0, n_pool, size=n_rows * batch)
    rows = np.repeat(np.arange(n_rows), batch)
    steps = np.arange(n_rows) % n_steps  # one-hot step terms, as linear_mom has
    features = sp.csr_matrix((np.ones(ids.size + n_rows), (np.concatenate([rows, np.arange(n_rows)]),
                                                           np.concatenate([ids, n_pool + steps]))),
                             shape=(n_rows, n_pool + n_steps))
    n_features, n_columns = features.shape[1], 2 * n_test  # linear_mom solves two right-hand sides per test example
    per_column = 4 * (n_rows * 7 + n_features * 18)  # as solvers._cg budgets a float32 solve with refinement
    block = max(1, min(n_columns, solvers._CG_BLOCK_BYTES // per_column))
    start = time.perf_counter()
    products = solvers.fastest_products(features, np.float32, width=min(4 * block, 256))
    prev = rng.uniform(0.5, 3.0, size=(n_rows, block)).astype(np.float32)
    operator = solvers._NormalOperator(products, prev, np.full(2 * n_features, 1e-2),
                                       features.multiply(features).T.tocsr())
    setup = time.perf_counter() - start
    direction = rng.normal(size=(n_features, 2, block)).astype(np.float32)
    seconds = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        operator.apply(direction)
        seconds = min(seconds, time.perf_counter() - start)
    n_blocks = -(-n_columns // block)
    return (f"One CG iteration at N={n_pool:,}, M={n_test:,}, {n_runs} x {n_steps} x {batch} ({features.nnz:,} "
            f"non-zeros, {2 * n_features:,} unknowns x {n_columns:,} columns in {n_blocks} blocks of {block}): "
            f"{seconds:.2f} s per block, {seconds * n_blocks:,.0f} s for every column (measured on one block, "
            f"{products.kernel} kernel, {products.threads} thread(s), load {os.getloadavg()[0]:.1f}; setup "
            f"{setup:.1f} s).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny points {QUICK}, not recorded")
    parser.add_argument("--point", type=int, nargs=5, action="append", default=[], metavar=("N", "M", "R", "T", "B"),
                        help="an extra point to measure (repeatable)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--curve-points", type=int, nargs="+", metavar="INDEX",
                        help=f"measure only these points of the default curve (0-{len(CURVE) - 1}, in its order)")
    parser.add_argument("--compare", action="store_true",
                        help="run every point with the solver before and after the kernel fix, back to back")
    parser.add_argument("--worker", type=int, nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="after", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true",
                        help="only time one CG iteration at the target size (prints, not recorded)")
    args = parser.parse_args(argv)
    if args.floor:
        print(floor())
        return 0
    if args.worker:
        worker(tuple(args.worker), args.out, args.variant)
        return 0
    section = run(args)
    print(section)
    if not args.quick:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
