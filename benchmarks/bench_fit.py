"""Fit speed and accuracy: Simfluence-Linear (batched CG over all test examples) vs a per-test-example loop.

The reference is what a user without this library would write: for every test example m, build the
sparse design ``X_m = [diag(L_prev_m) C, C]`` from the shared batch-membership matrix C and fit
``sklearn.linear_model.Ridge(alpha=lam, fit_intercept=False)`` to ``L_next_m``. Both solve the same
problem (the paper's objective, teacher forcing, ridge penalty ``lam`` on A and B), so the solutions
must agree; the library should be much faster because it shares every sparse product across tests.

The reference is timed on a sample of test examples and scaled to all of them (its cost per test
example does not depend on the others). Every measured piece runs in its own subprocess, so its
peak resident memory (``ru_maxrss``) is its own. Timings are wall-clock (``time.perf_counter``) on
whatever else the machine is doing; the load average before and after is recorded with the results.

Usage::

    python benchmarks/bench_fit.py            # full size; replaces its section of benchmarks/RESULTS.md
    python benchmarks/bench_fit.py --quick    # smoke size; prints only (add --write to record)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Fit: Simfluence-Linear vs per-test-example scikit-learn Ridge"

FULL = {"n_pool": 5000, "n_test": 500, "n_runs": 64, "n_steps": 250, "batch_size": 16}
QUICK = {"n_pool": 300, "n_test": 24, "n_runs": 12, "n_steps": 40, "batch_size": 8}
# sklearn configurations timed per test example: (solver, tol). 'auto' resolves to 'sparse_cg' for sparse X
# without intercept, so it is not timed separately; 1e-4 is sklearn's default tol.
DEFAULT_REFS = ("sparse_cg:1e-4", "sparse_cg:1e-10", "sparse_cg:1e-11", "lsqr:1e-10", "lsqr:1e-12")
PRIMARY = "sparse_cg:1e-10"  # speed yardstick: sklearn's own choice for sparse X, at a tight tolerance
TIGHT = "lsqr:1e-12"  # accuracy yardstick: the tightest per-test solution
LAM_NOTE = "; a fixed strength, the same for the library and the reference"
TARGET_SPEEDUP = 50.0
TARGET_RELDIFF = 1e-5


# ------------------------------------------------------------------------------------------ helpers
def _current_rss_mib() -> float:
    """Resident memory now (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _max_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _make_runset(sizes: dict, noise: float, seed: int):
    from simfluence.synthetic import known_linear_runset

    return known_linear_runset(**sizes, noise=noise, seed=seed)


def _sample_tests(n_test: int, n_sample: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 12345)
    return np.sort(rng.choice(n_test, size=min(n_sample, n_test), replace=False))


# ------------------------------------------------------------------------------------------ workers
def worker_library(args: argparse.Namespace) -> dict:
    """Fit SimfluenceLinear once (timed, with tracemalloc on) and keep A, B of the sampled tests."""
    from simfluence.simulators.linear import SimfluenceLinear
    from simfluence.solvers import ConvergenceWarning

    sizes = json.loads(args.sizes)
    t0 = time.perf_counter()
    runset, _, _ = _make_runset(sizes, args.noise, args.seed)
    generate_s = time.perf_counter() - t0
    sample = _sample_tests(sizes["n_test"], args.n_sample, args.seed)
    model = SimfluenceLinear(lam=args.lam, solver="cg", tol=args.tol, max_iter=args.max_iter)
    rss_before = _current_rss_mib()
    maxrss_before = _max_rss_mib()
    tracemalloc.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        model.fit(runset)
        wall = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.savez(args.out, A=model.A_[:, sample], B=model.B_[:, sample], sample=sample)
    return {
        "wall_s": wall,
        "generate_s": generate_s,
        "n_iter": model.solve_info_.n_iter,
        "max_residual": model.solve_info_.max_residual,
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "rss_before_mib": rss_before,
        "maxrss_before_mib": maxrss_before,
        "maxrss_mib": _max_rss_mib(),
        "traced_peak_mib": traced_peak / 2**20,
    }


def worker_reference(args: argparse.Namespace) -> dict:
    """Per-test-example sklearn Ridge on the sampled tests: design build + fit timed per test."""
    import scipy.sparse as sp
    from sklearn.linear_model import Ridge

    from simfluence.design import FeatureSpec, build_transitions

    sizes = json.loads(args.sizes)
    runset, _, _ = _make_runset(sizes, args.noise, args.seed)
    sample = _sample_tests(sizes["n_test"], args.n_sample, args.seed)
    solver, tol = args.ref.split(":")
    tol = float(tol)
    rss_before = _current_rss_mib()
    maxrss_before = _max_rss_mib()
    start = time.perf_counter()
    transitions = build_transitions(runset, FeatureSpec(runset.n_pool))  # shared by every test example
    shared_s = time.perf_counter() - start
    C = transitions.features.tocsr()
    n_pool = C.shape[1]

    def one(j: int) -> tuple[np.ndarray, object]:
        design = sp.hstack([sp.diags(transitions.prev[:, j]) @ C, C], format="csr")
        ridge = Ridge(alpha=args.lam, fit_intercept=False, solver=solver, tol=tol, max_iter=args.ref_max_iter)
        ridge.fit(design, transitions.next[:, j])
        return ridge.coef_, ridge

    A = np.empty((n_pool, sample.size))
    B = np.empty((n_pool, sample.size))
    per_test, n_iters, solvers_used = [], [], set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, j in enumerate(sample):
            t = time.perf_counter()
            coef, ridge = one(int(j))
            per_test.append(time.perf_counter() - t)
            A[:, k], B[:, k] = coef[:n_pool], coef[n_pool:]
            solvers_used.add(getattr(ridge, "solver_", solver))
            if getattr(ridge, "n_iter_", None) is not None:
                n_iters.append(int(np.max(ridge.n_iter_)))
        # memory of one loop body (tracemalloc slows Python-heavy solvers, so it is not on while timing)
        tracemalloc.start()
        one(int(sample[0]))
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    np.savez(args.out, A=A, B=B, sample=sample)
    return {
        "shared_s": shared_s,
        "per_test_s": per_test,
        "n_iter": n_iters,
        "solver_used": sorted(solvers_used),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught}),
        "rss_before_mib": rss_before,
        "maxrss_before_mib": maxrss_before,
        "maxrss_mib": _max_rss_mib(),
        "traced_peak_mib": traced_peak / 2**20,
    }


def _run_worker(kind: str, args: argparse.Namespace, sizes: dict, tmp: Path, label: str, **extra) -> tuple[dict, dict]:
    out = tmp / f"{label}.npz"
    result = tmp / f"{label}.json"
    cmd = [
        sys.executable, __file__, "--worker", kind, "--sizes", json.dumps(sizes), "--lam", repr(args.lam),
        "--noise", repr(args.noise), "--seed", str(args.seed), "--n-sample", str(args.n_sample),
        "--max-iter", str(args.max_iter), "--ref-max-iter", str(args.ref_max_iter),
        "--out", str(out), "--result", str(result),
    ]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print(f"  running {label} ...", flush=True)
    env = dict(os.environ)
    if args.blas_threads > 0:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.blas_threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {label} failed:\n{proc.stdout}\n{proc.stderr}")
    with np.load(out) as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(result.read_text()), arrays


# ------------------------------------------------------------------------------------------ report
def _rel_diff(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per test (column): max |x - ref| / max |ref|."""
    return np.abs(x - ref).max(axis=0) / np.maximum(np.abs(ref).max(axis=0), np.finfo(float).tiny)


def _fmt_s(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _fmt_memory(res: dict) -> str:
    """'RSS delta / tracemalloc peak' in MiB; '<=' when the piece did not raise the process's earlier peak."""
    if res["maxrss_mib"] > res["maxrss_before_mib"] + 1:
        rss = f"{max(0.0, res['maxrss_mib'] - res['rss_before_mib']):.0f}"
    else:
        rss = f"<= {max(0.0, res['maxrss_before_mib'] - res['rss_before_mib']):.0f}"
    return f"{rss} / {res['traced_peak_mib']:.0f}"


def _fmt_ratio(value: float) -> str:
    return f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


def run_benchmark(args: argparse.Namespace) -> str:
    sizes = dict(QUICK if args.quick else FULL)
    n_test = sizes["n_test"]
    refs = list(args.refs)
    for needed in (PRIMARY, TIGHT):
        if needed not in refs:
            refs.append(needed)
    load_before = _loadavg()
    t0 = time.perf_counter()
    _make_runset(sizes, args.noise, args.seed)
    generate_s = time.perf_counter() - t0
    print(f"sizes {sizes}, noise {args.noise}, lam {args.lam}; run set generated in {generate_s:.2f} s", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        lib_results = []
        for tol in args.tol:
            best = None
            for rep in range(args.repeat):
                res, arrays = _run_worker("lib", args, sizes, tmp, f"lib-{tol:g}-{rep}", tol=tol)
                if best is None or res["wall_s"] < best[0]["wall_s"]:
                    best = (res, arrays)
            lib_results.append((tol, *best))
        ref_results = {}
        for ref in refs:
            ref_results[ref] = _run_worker("ref", args, sizes, tmp, f"ref-{ref.replace(':', '-')}", ref=ref)
    load_after = _loadavg()

    tight_A, tight_B = ref_results[TIGHT][1]["A"], ref_results[TIGHT][1]["B"]
    primary_A, primary_B = ref_results[PRIMARY][1]["A"], ref_results[PRIMARY][1]["B"]
    sample = ref_results[TIGHT][1]["sample"]
    primary_res = ref_results[PRIMARY][0]
    primary_per_test = (primary_res["shared_s"] + n_test * float(np.mean(primary_res["per_test_s"]))) / n_test

    verdicts = []
    for tol, res, arrays in lib_results:
        per_test = res["wall_s"] / n_test
        rd_a, rd_b = _rel_diff(arrays["A"], tight_A), _rel_diff(arrays["B"], tight_B)
        rp_a, rp_b = _rel_diff(arrays["A"], primary_A), _rel_diff(arrays["B"], primary_B)
        speedup = primary_per_test / per_test
        rows.append({
            "method": "simfluence `SimfluenceLinear` (batched PCG, all tests at once)",
            "config": f"cg, tol={tol:g}, {res['n_iter']} iterations" + ("" if res["converged"] else " (NOT converged)"),
            "total": f"{_fmt_s(res['wall_s'])} (measured)",
            "per_test": per_test,
            "memory": _fmt_memory(res),
            "speedup": speedup,
            "rd_a": float(rd_a.max()), "rd_b": float(rd_b.max()), "library": True,
        })
        ok_speed = speedup >= TARGET_SPEEDUP
        worst = max(rd_a.max(), rd_b.max())
        ok_acc = worst <= TARGET_RELDIFF
        verdicts.append(
            f"- library tol={tol:g}: speed-up per test example vs sklearn `{PRIMARY}` **{speedup:.1f}x** "
            f"({'meets' if ok_speed else 'MISSES'} the >= {TARGET_SPEEDUP:g}x target); max relative difference of "
            f"A, B vs the tight reference **{worst:.1e}** ({'meets' if ok_acc else 'MISSES'} the "
            f"<= {TARGET_RELDIFF:g} target); vs `{PRIMARY}` itself: A {rp_a.max():.1e}, B {rp_b.max():.1e}. "
            f"{res['n_iter']} CG iterations, {1e3 * res['wall_s'] / max(res['n_iter'], 1):.3g} ms per iteration for "
            f"all {n_test} tests ({1e3 * res['wall_s'] / max(res['n_iter'], 1) / n_test:.3g} ms per test, fit "
            "overheads included). "
            f"Per sampled test (A, B vs tight): "
            + ", ".join(f"{a:.1e}/{b:.1e}" for a, b in zip(rd_a, rd_b, strict=True))
        )
    for ref in refs:
        res, arrays = ref_results[ref]
        solver, tol = ref.split(":")
        mean = float(np.mean(res["per_test_s"]))
        total = res["shared_s"] + n_test * mean
        rd_a, rd_b = _rel_diff(arrays["A"], tight_A), _rel_diff(arrays["B"], tight_B)
        iters = f", {min(res['n_iter'])}-{max(res['n_iter'])} iterations" if res["n_iter"] else ""
        note = " (accuracy yardstick)" if ref == TIGHT else " (speed yardstick)" if ref == PRIMARY else ""
        if solver == "sparse_cg" and float(tol) == 1e-4:
            note += " (sklearn default tol)"
        rows.append({
            "method": "scikit-learn `Ridge`, loop over test examples" + note,
            "config": f"{'/'.join(res['solver_used'])}, tol={float(tol):g}{iters}",
            "total": f"{_fmt_s(total)} (scaled from {len(res['per_test_s'])} tests)",
            "per_test": total / n_test,
            "memory": _fmt_memory(res),
            "speedup": primary_per_test / (total / n_test),
            "rd_a": float(rd_a.max()), "rd_b": float(rd_b.max()), "library": False,
        })

    # matched accuracy: the fastest configuration of each side whose answers are within the target
    def fastest(library: bool) -> dict | None:
        ok = [r for r in rows if r["library"] == library and max(r["rd_a"], r["rd_b"]) <= TARGET_RELDIFF]
        return min(ok, key=lambda r: r["per_test"]) if ok else None

    lib_best, ref_best = fastest(True), fastest(False)
    if lib_best and ref_best:
        ratio = ref_best["per_test"] / lib_best["per_test"]
        verdicts.append(
            f"- at matched accuracy (fastest configuration of each side within {TARGET_RELDIFF:g} of the tight "
            f"reference): library `{lib_best['config']}` {lib_best['per_test']:.3g} s per test vs sklearn "
            f"`{ref_best['config']}` {ref_best['per_test']:.3g} s per test: **{ratio:.1f}x** "
            f"({'meets' if ratio >= TARGET_SPEEDUP else 'MISSES'} the >= {TARGET_SPEEDUP:g}x target)."
        )
    else:
        verdicts.append(f"- no library configuration reached {TARGET_RELDIFF:g} of the tight reference"
                        if not lib_best else f"- no sklearn configuration reached {TARGET_RELDIFF:g}")

    lines = [
        SECTION,
        "",
        f"Recorded {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by "
        f"`{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/bench_fit.py', *sys.argv[1:]])}`.",
        "",
        f"Machine: 2 cores (shared, noisy), {platform.machine()}, Python {platform.python_version()}, "
        f"{_versions()}. Load average (1/5/15 min) before {load_before}, after {load_after}.",
        "",
        f"Problem: `known_linear_runset(n_pool={sizes['n_pool']}, n_test={n_test}, n_runs={sizes['n_runs']}, "
        f"n_steps={sizes['n_steps']}, batch_size={sizes['batch_size']}, noise={args.noise:g}, seed={args.seed})` "
        f"(generated in {generate_s:.2f} s): {sizes['n_runs'] * sizes['n_steps']} transitions, "
        f"{2 * sizes['n_pool']} unknowns per test example, fixed `lam={args.lam:g}` "
        "(ridge on A and B, paper objective, teacher forcing, `alpha_center=0`)"
        + (LAM_NOTE if args.lam == 0.01 and not args.quick else "")
        + ". Reference design per test: "
        f"`X_m = [diag(L_prev_m) C, C]`, {sizes['n_runs'] * sizes['n_steps']} x {2 * sizes['n_pool']} sparse, "
        f"from `build_transitions(runset, FeatureSpec({sizes['n_pool']}))`; reference timed on "
        f"{len(sample)} sampled test examples (ids {', '.join(map(str, sample))}) and scaled to {n_test} "
        "(once the shared `build_transitions` + per test: design build and `Ridge.fit`).",
        "",
        f"| method | solver, tol | seconds total ({n_test} tests) | seconds per test | peak memory MiB "
        f"(RSS delta / tracemalloc) | speed-up per test vs sklearn {PRIMARY} | max rel. diff A | max rel. diff B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['config']} | {row['total']} | {row['per_test']:.3g} | {row['memory']} | "
            f"{_fmt_ratio(row['speedup'])} | {row['rd_a']:.1e} | {row['rd_b']:.1e} |"
        )
    lines += [
        "",
        f"Targets: library >= {TARGET_SPEEDUP:g}x faster per test example than the per-test loop, and A, B equal "
        f"to the reference to {TARGET_RELDIFF:g} relative.",
        "",
        *verdicts,
        "",
        "Notes:",
        "",
        f"- *max rel. diff*: per sampled test, max_i |x_i - ref_i| / max_i |ref_i| over the {sizes['n_pool']} pool "
        f"examples, separately for A and B, against the tight per-test solution (`{TIGHT}`); the table shows the "
        "largest over the sampled tests.",
        "- *peak memory*: RSS delta = the measuring subprocess's `ru_maxrss` after the measured piece minus its "
        "resident memory just before it (it misses memory that was freed and reused, and includes allocator and "
        "library overhead; '<= x' = the piece did not raise the peak the subprocess had already reached while "
        "generating the run set, so only a bound is known); tracemalloc = peak of Python-tracked allocations "
        "(numpy buffers included) during it. "
        "Library: the whole `fit` for all tests (tracemalloc on while timing: the fit runs few Python calls). "
        "Reference: RSS delta covers the shared `build_transitions` and the per-test loop, whose memory does not "
        "grow with the number of tests; tracemalloc covers one extra, untimed loop body (design + fit).",
        "- *seconds*: library = one `SimfluenceLinear(lam, solver='cg', tol).fit(runset)` (includes building the "
        "transitions) "
        + (f"(best of {args.repeat})" if args.repeat > 1 else "(single run)")
        + "; sklearn = shared `build_transitions` + n_test x mean per-test time. sklearn's `solver='auto'` is "
        "`sparse_cg` for sparse X without intercept, so it is the `sparse_cg` rows.",
        f"- BLAS/OpenMP threads pinned to {args.blas_threads} in every measuring subprocess"
        + (" (0 = not pinned)" if args.blas_threads == 0 else "")
        + ": on 2 shared cores, multi-threaded OpenBLAS on the per-test vectors of `lsqr` made its time per "
        "test vary 1.1-6.5 s between identical calls at full size; the library's fit and `sparse_cg` spend their "
        "time in scipy's single-threaded sparse products.",
    ]
    for ref in refs:
        res = ref_results[ref][0]
        if res["warnings"]:
            lines.append(f"- warnings from `{ref}`: " + "; ".join(res["warnings"]))
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import scipy
    import sklearn

    return f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-learn {sklearn.__version__}"



# ------------------------------------------------------------------------------------------ issue 13 targets
TARGETS_SECTION = "## Fit targets: batched CG vs per-test sparse normal equations, and the cost of lam='auto'"
TARGETS_SIZES = {"n_pool": 1500, "n_test": 200, "n_runs": 40, "n_steps": 200, "batch_size": 8}
TARGETS_TRAIN = 32  # runs fitted on; the other 8 are held out for the validation MSE
BASELINE_REV = "c307773"  # the implementation before issue 13's fast fit


def worker_targets(args: argparse.Namespace) -> dict:
    """Fit at a fixed lam and with lam='auto' ``args.repeat`` times with whatever `simfluence` is importable."""
    import simfluence
    from simfluence.simulators.linear import SimfluenceLinear, validation_mse

    sizes = json.loads(args.sizes)
    runset, _, _ = _make_runset(sizes, args.noise, args.seed)
    train, held_out = range(TARGETS_TRAIN), range(TARGETS_TRAIN, sizes["n_runs"])
    extra = {} if args.precision == "default" else {"precision": args.precision}
    result = {"package": str(Path(simfluence.__file__).parent), "fixed_s": [], "auto_s": []}
    # one untimed fit of a tiny run set first: one-off costs (importing torch for the product kernel, ~2 s) would
    # otherwise be charged to whichever fit runs first, the fixed-lam one, and flatter the auto / fixed ratio
    tiny = {"n_pool": 40, "n_test": 4, "n_runs": 4, "n_steps": 20, "batch_size": 4}
    SimfluenceLinear(lam="auto", solver="cg", **extra).fit(_make_runset(tiny, args.noise, args.seed)[0])
    for _ in range(args.repeat):
        fixed = SimfluenceLinear(lam=args.lam, solver="cg", **extra)
        start = time.perf_counter()
        fixed.fit(runset, runs=train)
        result["fixed_s"].append(time.perf_counter() - start)
        auto = SimfluenceLinear(lam="auto", solver="cg", **extra)
        start = time.perf_counter()
        auto.fit(runset, runs=train)
        result["auto_s"].append(time.perf_counter() - start)
    info = fixed.solve_info_
    result.update({
        "fixed_mse": validation_mse(fixed, runset, held_out), "auto_mse": validation_mse(auto, runset, held_out),
        "auto_lam": auto.lam_, "n_iter": info.n_iter, "solver": getattr(info, "kernel", "scipy") or "scipy",
        "dtype": getattr(info, "dtype", "float64"),
    })
    np.savez(args.out, A=fixed.A_, B=fixed.B_, auto_A=auto.A_, auto_B=auto.B_)
    return result


def _baseline_package(rev: str, tmp: Path) -> Path:
    """The `simfluence` package as of git revision ``rev``, extracted into ``tmp`` (read-only use of git)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "simfluence"], capture_output=True, check=True)
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    return tmp


def _normal_equations_loop(transitions, lam: float, tests: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """The per-test reference: X_m = [diag(L_prev_m) C, C], (X^T X + lam I) x = X^T y by sparse LU (spsolve)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    C = transitions.features.tocsr()
    n_pool = C.shape[1]
    identity = sp.identity(2 * n_pool, format="csc")
    A, B, seconds = np.empty((n_pool, tests.size)), np.empty((n_pool, tests.size)), []
    for k, m in enumerate(tests):
        start = time.perf_counter()
        design = sp.hstack([sp.diags(transitions.prev[:, m]) @ C, C], format="csr")
        gram = (design.T @ design + lam * identity).tocsc()
        coef = spl.spsolve(gram, design.T @ transitions.next[:, m], permc_spec="MMD_AT_PLUS_A")
        seconds.append(time.perf_counter() - start)
        A[:, k], B[:, k] = coef[:n_pool], coef[n_pool:]
    return A, B, seconds


def run_targets(args: argparse.Namespace) -> str:
    from simfluence.design import FeatureSpec, build_transitions

    sizes = dict(TARGETS_SIZES)
    n_test = sizes["n_test"]
    load_before = _loadavg()
    runset, _, _ = _make_runset(sizes, args.noise, args.seed)
    transitions = build_transitions(runset, FeatureSpec(runset.n_pool), range(TARGETS_TRAIN))
    sample = _sample_tests(n_test, args.n_sample, args.seed)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        baseline = _baseline_package(args.baseline, tmp / "baseline") if args.baseline else None
        configs = [("before", baseline, "default")] if baseline else []
        configs += [("after", None, "float32"), ("after", None, "float64")]
        results = {}
        for rep in range(args.rounds):  # alternate the implementations so that load changes hit both alike
            for label, path, precision in configs:
                key = f"{label}-{precision}"
                print(f"  round {rep + 1}: {key} ...", flush=True)
                env = dict(os.environ)
                if path is not None:
                    env["PYTHONPATH"] = str(path)
                out, result = tmp / f"{key}.npz", tmp / f"{key}.json"
                cmd = [sys.executable, __file__, "--worker", "targets", "--sizes", json.dumps(sizes), "--lam",
                       repr(args.lam), "--noise", repr(args.noise), "--seed", str(args.seed), "--repeat", "1",
                       "--precision", precision, "--out", str(out), "--result", str(result)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
                if proc.returncode != 0:
                    raise RuntimeError(f"worker {key} failed:\n{proc.stdout}\n{proc.stderr}")
                res = json.loads(result.read_text())
                with np.load(out) as data:
                    res["arrays"] = {name: data[name] for name in data.files}
                if key in results:
                    res["fixed_s"] = results[key]["fixed_s"] + res["fixed_s"]
                    res["auto_s"] = results[key]["auto_s"] + res["auto_s"]
                results[key] = res
        print("  reference loop ...", flush=True)
        ref_A, ref_B, ref_seconds = _normal_equations_loop(transitions, args.lam, sample)
    load_after = _loadavg()
    ref_per_test = float(np.min(ref_seconds))  # best single test: the most favourable reading of the reference
    ref_total = ref_per_test * n_test

    def rel(x: np.ndarray, ref: np.ndarray) -> float:
        return float(_rel_diff(x, ref).max())

    before = results.get("before-default")
    lines = [
        TARGETS_SECTION,
        "",
        f"Recorded {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by "
        f"`{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/bench_fit.py', *sys.argv[1:]])}`.",
        "",
        f"Machine: {os.cpu_count()} cores (shared with other jobs), {platform.machine()}, Python "
        f"{platform.python_version()}, {_versions()}. Load average (1/5/15 min) before {load_before}, after "
        f"{load_after}.",
        "",
        f"Problem: `known_linear_runset({', '.join(f'{k}={v}' for k, v in sizes.items())}, noise={args.noise:g}, "
        f"seed={args.seed})`; fitted on the first {TARGETS_TRAIN} runs ({TARGETS_TRAIN * sizes['n_steps']} "
        f"transitions, {2 * sizes['n_pool']} unknowns per test example), validation MSE = all-steps rollout MSE on "
        f"the other {sizes['n_runs'] - TARGETS_TRAIN}. Fixed `lam={args.lam:g}`, `SimfluenceLinear(solver='cg')` "
        "defaults otherwise (tol 1e-10). *before* = the package at git "
        f"`{args.baseline}` (float64 PCG, scipy products), *after* = this tree. Each configuration ran in its own "
        f"subprocess, {args.rounds} rounds alternating before/after; times are the best round.",
        "",
        "| implementation | precision, kernel | CG iterations | fixed-lam fit (s) | `lam='auto'` fit (s) "
        "| auto / fixed | lam chosen | validation MSE fixed lam | validation MSE auto | max rel. diff A, B vs before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, res in results.items():
        fixed_s, auto_s = min(res["fixed_s"]), min(res["auto_s"])
        diff = "-"
        if before is not None and key != "before-default":
            arrays, old = res["arrays"], before["arrays"]
            diff = f"{max(rel(arrays['A'], old['A']), rel(arrays['B'], old['B'])):.1e}"
        lines.append(
            f"| {key.split('-')[0]} | {res['dtype']}, {res['solver']} | {res['n_iter']} | {fixed_s:.2f} | "
            f"{auto_s:.2f} | {auto_s / fixed_s:.1f}x | {res['auto_lam']:g} | {res['fixed_mse']:.5e} | "
            f"{res['auto_mse']:.5e} | {diff} |")
    lines += [
        "",
        f"Reference: per test example, `X_m = [diag(L_prev_m) C, C]`, `(X^T X + lam I) x = X^T y` by "
        f"`scipy.sparse.linalg.spsolve(..., permc_spec='MMD_AT_PLUS_A')` (scipy has no sparse Cholesky; "
        f"SuperLU with the symmetric ordering), design build included; timed on {sample.size} sampled test "
        f"examples, best one {ref_per_test:.3f} s (all: {', '.join(f'{s:.2f}' for s in ref_seconds)} s) -> "
        f"{ref_total:.0f} s for {n_test} tests.",
        "",
    ]
    for key, res in results.items():
        if not key.startswith("after"):
            continue
        cols = np.searchsorted(np.arange(n_test), sample)
        fixed_s = min(res["fixed_s"])
        worst = max(rel(res["arrays"]["A"][:, cols], ref_A), rel(res["arrays"]["B"][:, cols], ref_B))
        speed = ref_total / fixed_s
        ratio = min(res["auto_s"]) / fixed_s
        lines.append(
            f"- after, {res['dtype']}: **{speed:.0f}x** the reference loop at the same lam "
            f"({'meets' if speed >= 20 else 'MISSES'} >= 20x), max relative difference of A, B from the "
            f"reference's exact solution {worst:.1e}; "
            f"`lam='auto'` costs **{ratio:.1f}x** the fixed-lam fit ({'meets' if ratio <= 3 else 'MISSES'} <= 3x)"
            + ("" if before is None else
               f"; {min(before['fixed_s']) / fixed_s:.1f}x faster fixed-lam and "
               f"{min(before['auto_s']) / min(res['auto_s']):.1f}x faster auto than before; validation MSE at the "
               f"fixed lam {100 * (res['fixed_mse'] / before['fixed_mse'] - 1):+.4f}% vs before (target within 1%)")
            + ".")
    if before is not None:
        lines.append(f"- before: `lam='auto'` cost {min(before['auto_s']) / min(before['fixed_s']):.1f}x its "
                     f"fixed-lam fit; {ref_total / min(before['fixed_s']):.0f}x the reference loop.")
    lines += [
        "",
        "Where the time went (after): the lam grid's candidates are solved from strong to weak lam, each "
        "warm-starting the next; each candidate's CG stops when the residual its warm start has at the new lam "
        "(the change of the penalty times the previous effects) is cut by `SELECTION_REDUCTION` = 1e-3, never "
        "tighter than `SELECTION_TOL` = 1e-6 (validation MSE to ~3 digits); the search keeps the product kernel its "
        "first solve timed best, and the final fit (tol 1e-10, all training runs) starts from the chosen candidate. "
        "float32 CG iterations inside float64 iterative refinement halve the cost of the sparse products at the "
        "same tol; the product kernel is the faster of scipy and torch, timed at the start of each solve (torch's "
        "threads lose badly on oversubscribed cores). Each worker makes one untimed fit of a tiny run set first, so "
        "one-off costs (importing torch) are charged to neither fit.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke size {QUICK} (default: {FULL})")
    parser.add_argument("--lam", type=float, default=None,
                        help="fixed ridge strength (default 0.01)")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-8, 1e-9, 1e-10],
                        help="library CG tolerance(s), one row each (default: 1e-8, 1e-9 and 1e-10 = the library "
                        "default)")
    parser.add_argument("--noise", type=float, default=1e-3, help="noise of the synthetic runs (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sample", type=int, default=None, help="test examples the reference is timed on "
                        "(default 8, quick 3)")
    parser.add_argument("--refs", nargs="+", default=list(DEFAULT_REFS),
                        help=f"sklearn solver:tol configurations (default {' '.join(DEFAULT_REFS)}; "
                        f"{PRIMARY} and {TIGHT} are always added)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS/OpenMP threads in the measuring subprocesses (default 1; 0 = leave as is)")
    parser.add_argument("--repeat", type=int, default=1, help="library fits per tolerance; the fastest is kept")
    parser.add_argument("--max-iter", type=int, default=5000, help="library CG iteration cap")
    parser.add_argument("--ref-max-iter", type=int, default=100000, help="sklearn max_iter")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", dest="write", action="store_true", default=None,
                       help="record the table in RESULTS.md (default: full size only)")
    group.add_argument("--no-write", dest="write", action="store_false")
    # internal: measured pieces run in subprocesses
    parser.add_argument("--targets", action="store_true",
                        help=f"issue 13's targets instead: {TARGETS_SIZES}, before/after, lam='auto' cost, vs a "
                        "per-test sparse normal-equations loop (own section of RESULTS.md; --lam defaults to 1e-3)")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision of the 'before' package for "
                        f"--targets (default {BASELINE_REV}; empty: none)")
    parser.add_argument("--rounds", type=int, default=2, help="--targets: rounds alternating before/after")
    parser.add_argument("--precision", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["lib", "ref", "targets"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n_sample is None:
        args.n_sample = 3 if args.quick else 8
    if args.lam is None:
        args.lam = 1e-3 if args.targets or args.worker == "targets" else 0.01

    if args.worker == "targets":
        Path(args.result).write_text(json.dumps(worker_targets(args)))
        return 0
    if args.targets:
        section = run_targets(args)
        print()
        print(section)
        if args.write is not False:
            write_section(args.results, TARGETS_SECTION, section)
            print(f"recorded in {args.results}")
        return 0
    if args.worker:
        if args.worker == "lib":
            args.tol = args.tol[0]
            result = worker_library(args)
        else:
            result = worker_reference(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    section = run_benchmark(args)
    print()
    print(section)
    write = (not args.quick) if args.write is None else args.write
    if write:
        write_section(args.results, SECTION, section)
        print(f"recorded in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
