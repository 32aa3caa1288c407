"""Benchmark: the effect-level hybrid (``linear_mom_prior``) against ``linear_mom`` and ``blend_influence`` on digits.

On a digits run set with checkpoints at steps 0/50/100/150/200 (generated into ``--cache`` on first use), every method
is fitted on the first ``--train`` runs (16: the issue-19 budget; no replay) and scored on the held-out runs after them
(all-steps MSE, its ratio to the mean curve's, rho_runs), and by LDS against real retraining: ``--draws`` edits of each
of ``--bases`` held-out base runs per protocol (remove 5% of the examples the run used; move 8 examples' occurrences to
the last steps), each retrained for real from the base run's weights and seed (``simfluence.apps.lds.run_lds``,
resumable in ``--out``). Ablations of the hybrid: one pooled prior instead of one per checkpoint phase
(``prior_phases=single``), one scale per phase for all tests (``prior_scale=global``), the prior alone with a per-test
scale and no learned correction (``tracin_offset``). Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_hybrid.py [--cache DIR] [--out DIR] [--train 16] [--draws 40] [--workers 2]
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

SECTION = "## Effect-level hybrid (linear_mom_prior) on digits"
CHECKPOINT_STEPS = (0, 50, 100, 150, 200)
PROTOCOLS = ("remove-5", "move-end")
# name shown -> (registry method, hyper-parameters)
METHODS = {
    "linear_mom": ("linear_mom", {}),
    "blend_influence": ("blend_influence", {}),
    "tracin_offset": ("tracin_offset", {}),
    "linear_mom_prior": ("linear_mom_prior", {}),
    "linear_mom_prior single phase": ("linear_mom_prior", {"prior_phases": "single"}),
    "linear_mom_prior global scale": ("linear_mom_prior", {"prior_scale": "global"}),
}
TARGETS = "remove-5% LDS >= 0.8, move-to-end LDS >= 0.8, sign agreement >= 0.9, held-out MSE <= 0.4x mean curve's"


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from simfluence.apps.lds import format_lds_table, run_lds
    from simfluence.evaluation import score
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet
    from simfluence.workloads import generate_digits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/simfluence-bench-hybrid-digits", help="run set (made if absent)")
    parser.add_argument("--out", default="/tmp/simfluence-bench-hybrid", help="retrained draws")
    parser.add_argument("--runs", type=int, default=24, help="runs in the run set (training + held out)")
    parser.add_argument("--train", type=int, default=16, help="training runs (the first ones)")
    parser.add_argument("--bases", type=int, default=3, help="held-out base runs of the LDS")
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only, leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    generate_digits(args.cache, n_runs=args.runs, checkpoint_steps=CHECKPOINT_STEPS, progress=False,
                    workers=args.workers)
    runset = RunSet.load(args.cache)
    train, heldout = list(range(args.train)), list(range(args.train, len(runset)))
    start = time.perf_counter()
    fitted, fit_seconds = {}, {}
    for label in ["mean_curve", *args.methods]:
        name, params = METHODS.get(label, (label, {}))
        began = time.perf_counter()
        fitted[label] = make_simulator(name, **params).fit(runset, train)
        fit_seconds[label] = time.perf_counter() - began
        print(f"fitted {label} in {fit_seconds[label]:.1f} s", flush=True)
    heldout_scores = score(fitted, runset, heldout).metrics
    mean_mse = heldout_scores["mean_curve"]["all_mse"]
    print({label: round(metrics["all_mse"] / mean_mse, 3) for label, metrics in heldout_scores.items()}, flush=True)
    lds = run_lds(runset, {label: fitted[label] for label in args.methods}, base_runs=heldout[: args.bases],
                  train_runs=train, protocols=PROTOCOLS, n_draws=args.draws, out=Path(args.out) / "retrained",
                  workers=args.workers, progress=False)
    wall = time.perf_counter() - start
    rows = ["| method | held-out all-steps MSE | / mean curve's | rho_runs | fit s | details |", "|---" * 6 + "|"]
    for label in ["mean_curve", *args.methods]:
        metrics, sim = heldout_scores[label], fitted[label]
        details = ""
        if hasattr(sim, "prior_scale_"):
            scale = sim.prior_scale_
            details = (f"lam {sim.lam_:g}, mu {sim.momentum_:g}; median prior scale per phase "
                       + " / ".join(f"{value:.2f}" for value in np.median(scale, axis=1)))
        elif hasattr(sim, "lam_"):
            details = f"lam {sim.lam_:g}, mu {sim.momentum_:g}"
        rows.append(f"| {label} | {metrics['all_mse']:.4g} | {metrics['all_mse'] / mean_mse:.2f} | "
                    f"{metrics['rho_runs']:.3f} | {fit_seconds[label]:.1f} | {details} |")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python benchmarks/bench_hybrid.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `{command}` on {os.cpu_count()} cores ({wall:.0f} s, {lds.n_trained} retrains by this "
        f"call). Digits run set ({len(runset)} runs x {runset[0].n_steps} steps, pool {runset.n_pool}, "
        f"{runset.n_test} tests, SGD momentum 0.9, warm-up + cosine; checkpoints at steps "
        f"{'/'.join(map(str, CHECKPOINT_STEPS))}). Every method fitted on the first {len(train)} runs (no replay); "
        f"held-out metrics on the {len(heldout)} runs after them; LDS on base runs {', '.join(lds.bases)} with "
        f"{args.draws} retrained draws per protocol and base (retraining reproduces each base to "
        f"{lds.base_reproduction:.1e}).",
        "",
        "\n".join(rows),
        "",
        format_lds_table(lds.table),
        "",
        f"Issue-19 targets with <= 16 training runs: {TARGETS}.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_record:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
