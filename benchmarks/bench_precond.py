"""CG iterations against lam for the multiplicative Simfluence-Linear ridge solve, by preconditioner.

One synthetic run set (`simfluence.synthetic.known_linear_runset`, step terms on as in ``linear_mom``); one test
example's normal matrix ``H = X^T X + lam I`` with ``X = [diag(prev) F, F]`` is formed densely and solved by
float64 preconditioned CG to a relative residual of 1e-10 from zero:

- ``none``: plain CG;
- ``2x2 Jacobi``: the library's preconditioner (each feature's multiplicative and additive coefficient paired);
- ``+ top-k deflation``: 2x2 Jacobi followed by the *exact* top-k eigenvectors of the Jacobi-preconditioned matrix
  of this very test example (the Nystrom preconditioner of Frangella, Tropp & Udell at rank k with mu = the
  (k+1)-th eigenvalue). A Nystrom or sketched preconditioner shared across test examples can only be worse than
  this per-test, exact one, so its column bounds what any rank-k preconditioner can save;
- ``Kronecker``: ``S (x) F^T F + lam I`` with ``S`` the 2x2 matrix of the test's weighted loss moments, factored
  exactly (the shared-Gram preconditioner with the multiplicative block approximated by a scalar prev);
- ``library``: iterations of ``solve_ridge(..., solver="cg")`` as the simulators call it (float32 CG inside
  float64 refinement, the count summed over the refinement restarts), all test examples together.

The spectrum column gives the Jacobi-preconditioned matrix's bulk (the smallest eigenvalue above the near-null
directions of the step terms, the third largest) and its top: the bulk is a Marchenko-Pastur one whose lower edge
shrinks with lam as the unknowns (2 x (N + steps)) approach the transitions, which is what no low-rank
preconditioner removes.

    python benchmarks/bench_precond.py            # prints the table; replaces its section of RESULTS.md
    python benchmarks/bench_precond.py --quick    # a smaller problem, prints only
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Preconditioners: CG iterations against lam (multiplicative ridge, one test example)"
LAMS = (1.0, 0.1, 0.01, 0.001)
RANKS = (2, 50, 300)


def _pcg(matrix: np.ndarray, rhs: np.ndarray, inverse, tol: float = 1e-10, max_iter: int = 20000) -> int:
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    z = inverse(residual)
    direction = z.copy()
    rz = residual @ z
    for n_iter in range(max_iter):
        if np.linalg.norm(residual) <= tol * np.linalg.norm(rhs):
            return n_iter
        product = matrix @ direction
        step = rz / (direction @ product)
        x += step * direction
        residual -= step * product
        z = inverse(residual)
        rz, previous = residual @ z, rz
        direction = z + (rz / previous) * direction
    return max_iter


def run(quick: bool) -> str:
    from simfluence.design import FeatureSpec, build_transitions
    from simfluence.solvers import solve_ridge
    from simfluence.synthetic import known_linear_runset

    n_pool, n_runs, n_steps, batch = (250, 8, 100, 16) if quick else (500, 8, 200, 16)
    runset, _, _ = known_linear_runset(n_pool=n_pool, n_test=4, n_runs=n_runs, n_steps=n_steps, batch_size=batch,
                                       noise=1e-3, seed=0)
    transitions = build_transitions(runset, FeatureSpec(n_pool, n_steps))
    features = transitions.features.toarray()
    n_rows, n_features = features.shape
    target = transitions.next - transitions.prev
    prev = transitions.prev[:, 0]
    design = np.hstack([prev[:, None] * features, features])
    squared = features * features
    weights = squared.sum(axis=1)
    first, second = (weights * prev).sum() / weights.sum(), (weights * prev * prev).sum() / weights.sum()
    kronecker = np.kron(np.array([[second, first], [first, 1.0]]), features.T @ features)
    lines = [
        SECTION, "",
        f"Recorded {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by "
        f"`python benchmarks/bench_precond.py{' --quick' if quick else ''}` (load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores). Synthetic runs: N={n_pool}, {n_runs} x {n_steps} x {batch}, step terms on: "
        f"{n_rows} transitions, {2 * n_features} unknowns per test example. Float64 CG to a relative residual of "
        "1e-10; the deflation columns use the exact eigenvectors of this test example's own matrix (a bound for "
        "any rank-k Nystrom preconditioner, shared or not).", "",
        "| lam | none | 2x2 Jacobi (today) | " + " | ".join(f"+ top-{k} deflation" for k in RANKS)
        + " | Kronecker S (x) F^T F | library (float32 + refinement, 4 tests) | Jacobi-preconditioned spectrum: "
        "bulk, top |",
        "|---" * (6 + len(RANKS)) + "|",
    ]
    for lam in LAMS:
        matrix = design.T @ design + lam * np.eye(2 * n_features)
        rhs = design.T @ target[:, 0]
        block_a = squared.T @ (prev * prev) + lam
        block_b = squared.T @ prev
        block_d = squared.sum(axis=0) + lam
        l11 = np.sqrt(block_a)
        l21 = block_b / l11
        l22 = np.sqrt(block_d - l21**2)
        lower_inverse = np.zeros((2 * n_features, 2 * n_features))
        index = np.arange(n_features)
        lower_inverse[index, index] = 1 / l11
        lower_inverse[n_features + index, n_features + index] = 1 / l22
        lower_inverse[n_features + index, index] = -l21 / (l11 * l22)
        scaled = lower_inverse @ matrix @ lower_inverse.T
        scaled_rhs = lower_inverse @ rhs
        values, vectors = scipy.linalg.eigh(scaled)
        counts = [_pcg(matrix, rhs, lambda r: r), _pcg(scaled, scaled_rhs, lambda r: r)]
        for k in RANKS:
            top, tail = vectors[:, -k:], values[-k - 1]
            shrink = tail / values[-k:] - 1.0
            counts.append(_pcg(scaled, scaled_rhs, lambda r, top=top, shrink=shrink: r + top @ (shrink * (top.T @ r))))
        factor = scipy.linalg.cho_factor(kronecker + lam * np.eye(2 * n_features))
        counts.append(_pcg(matrix, rhs, lambda r, factor=factor: scipy.linalg.cho_solve(factor, r)))
        _, info = solve_ridge(transitions.features, transitions.prev, target, np.full(2 * n_features, lam), True,
                              solver="cg", tol=1e-10, dtype=np.float32)
        near_null = int((values < 10 * lam / np.median(block_d)).sum())
        lines.append(f"| {lam:g} | " + " | ".join(str(c) for c in counts) + f" | {info.n_iter} | "
                     f"{values[near_null]:.2g} .. {values[-3]:.2g}, {values[-1]:.3g} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller problem, not recorded")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    section = run(args.quick)
    print(section)
    if not args.quick:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
