"""Benchmark: the effect-level hybrid (``linear_mom_prior``) against ``linear_mom`` and ``blend_influence`` on digits.

On a digits run set with checkpoints at steps 0/50/100/150/200 (generated into ``--cache`` on first use), every method
is fitted on the first ``--train`` runs (16: the issue-19 budget; no replay) and scored on the held-out runs after them
(all-steps MSE, its ratio to the mean curve's, rho_runs), and by LDS against real retraining: ``--draws`` edits of each
of ``--bases`` held-out base runs per protocol (remove 5% of the examples the run used; move 8 examples' occurrences to
the last steps), each retrained for real from the base run's weights and seed (``simfluence.apps.lds.run_lds``,
resumable in ``--out``). The prior alone (a per-test scale, no learned correction) is ``tracin_offset`` /
``influence_offset``. Ablation (issue 19 item 3): each row changes one ingredient of the default
``linear_mom_prior`` and is fitted at the default's ``lam`` and ``momentum`` (chosen on validation runs), so that
the row measures the ingredient, not a different search: the prior source (influence functions at the final
checkpoint instead of TracIn per checkpoint), one pooled prior instead of one per phase, one scale per phase for all
tests, scales pulled to 1, ``delta`` shrunk harder towards the scaled prior, the multiplicative effects ``A`` shrunk
harder towards 0, both with the influence prior, an additive model, shrinkage towards 0 (no prior: the ``linear_mom``
model at the same lam and momentum), no momentum. Log space has no hybrid (the prior is an effect on
the loss, not on the log loss). Prints markdown and records it in ``benchmarks/RESULTS.md``.

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
DEFAULT = "linear_mom_prior"
# name shown -> (registry method, hyper-parameters)
METHODS = {
    "linear_mom": ("linear_mom", {}),
    "blend_influence": ("blend_influence", {}),
    "tracin_offset": ("tracin_offset", {}),
    "influence_offset": ("influence_offset", {}),
    DEFAULT: ("linear_mom_prior", {}),
}
# the ablation: name shown -> (what changes, hyper-parameters on top of the default's, at its lam and momentum)
ABLATION = {
    "prior: influence": ("prior source: influence functions (final checkpoint) instead of TracIn per checkpoint",
                         {"prior": "influence"}),
    "prior: single phase": ("one TracIn-CP prior pooled over the checkpoints instead of one per phase",
                            {"prior_phases": "single"}),
    "scale: global": ("one scale per phase for all tests instead of per test", {"prior_scale": "global"}),
    "scale: pulled to 1": ("scales penalised towards 1 (scale_lam 1) instead of free", {"scale_lam": 1.0}),
    "delta: 100x lam": ("delta shrunk 100x harder towards the scaled prior (delta_lam_ratio 100)",
                        {"delta_lam_ratio": 100.0}),
    "A: 100x lam": ("multiplicative effects A shrunk 100x harder towards 0 (mult_lam_ratio 100)",
                    {"mult_lam_ratio": 100.0}),
    "prior-led, influence": ("influence prior, delta and A both shrunk 100x harder",
                             {"prior": "influence", "delta_lam_ratio": 100.0, "mult_lam_ratio": 100.0}),
    "additive, influence-led": ("additive (no multiplicative block: alpha = 1), influence prior, delta shrunk 100x "
                                "harder",
                                {"prior": "influence", "multiplicative": False, "delta_lam_ratio": 100.0}),
    "shrink to 0": ("no prior: delta shrunk towards 0 (linear_mom's model at this lam and momentum)",
                    {"prior": "none"}),
    "no momentum": ("first order: momentum 0 instead of the chosen one", {"momentum": 0.0}),
}
TARGETS = "remove-5% LDS >= 0.8, move-to-end LDS >= 0.8, sign agreement >= 0.9, held-out MSE <= 0.4x mean curve's"


def ablation_table(default: str, labels: list[str], heldout_scores: dict, mean_mse: float, lds_table,
                   fitted: dict, validation: dict) -> str:
    """Markdown: the default and each ablation row, held-out metrics, LDS per protocol, sign agreement, scales."""
    import numpy as np

    header = ("| row | what changes | validation MSE | held-out MSE / mean curve's | rho_runs | "
              + " | ".join(f"LDS {protocol}" for protocol in PROTOCOLS) + " | sign agreement | median scales |")
    rows = [header, "|---" * (7 + len(PROTOCOLS)) + "|"]
    for label in [default, *labels]:
        metrics, sim = heldout_scores[label], fitted[label]
        mine = lds_table[lds_table["method"] == label].set_index("protocol")
        cells = [f"{mine.loc[protocol, 'lds']:.3f}" for protocol in PROTOCOLS]
        scales = " / ".join(f"{value:.2f}" for value in np.median(sim.prior_scale_, axis=1))
        what = "the default (TracIn per checkpoint phase, per-test scales, free)" if label == default else \
            ABLATION[label][0]
        rows.append(f"| {label} | {what} | {validation[label]:.4f} | {metrics['all_mse'] / mean_mse:.2f} | "
                    f"{metrics['rho_runs']:.3f} | "
                    + " | ".join(cells) + f" | {mine['sign_agreement'].mean():.2f} | {scales} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from simfluence.apps.lds import format_lds_table, run_lds
    from simfluence.evaluation import score
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet
    from simfluence.simulators.linear import validation_mse
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
    parser.add_argument("--ablation", nargs="*", default=list(ABLATION), choices=list(ABLATION),
                        help="ablation rows (need the default method among --methods)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only, leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    generate_digits(args.cache, n_runs=args.runs, checkpoint_steps=CHECKPOINT_STEPS, progress=False,
                    workers=args.workers)
    runset = RunSet.load(args.cache)
    train, heldout = list(range(args.train)), list(range(args.train, len(runset)))
    start = time.perf_counter()
    fitted, fit_seconds = {}, {}
    ablation = args.ablation if DEFAULT in args.methods else []
    priors = {}  # prior source -> (per-phase prior in effect units, steps): computed once, shared by the rows

    def ablation_row(label: str, runs: list[int]):
        chosen = {"lam": fitted[DEFAULT].lam_, "momentum": fitted[DEFAULT].momentum_}
        params = {**METHODS[DEFAULT][1], **chosen, **ABLATION.get(label, ("", {}))[1]}
        sim = make_simulator(METHODS[DEFAULT][0], **params)
        source = params.get("prior", "tracin")
        if source in priors:
            sim.set_prior(*priors[source])
        sim.fit(runset, runs)
        if source not in priors and source != "none" and params.get("prior_phases", "checkpoints") == "checkpoints":
            priors[source] = (sim.prior_, sim.prior_steps_)
        return sim

    for label in ["mean_curve", *args.methods, *ablation]:
        name, params = METHODS.get(label, (label, {}))
        began = time.perf_counter()
        fitted[label] = ablation_row(label, train) if label in ABLATION else \
            make_simulator(name, **params).fit(runset, train)
        fit_seconds[label] = time.perf_counter() - began
        if label == DEFAULT:
            priors["tracin"] = (fitted[label].prior_, fitted[label].prior_steps_)
        print(f"fitted {label} in {fit_seconds[label]:.1f} s", flush=True)
    validation = {}  # the ablation rows' validation error, as the family's search measures it (last 20% of train)
    if ablation:
        n_val = max(1, round(0.2 * len(train)))
        for label in [DEFAULT, *ablation]:
            validation[label] = validation_mse(ablation_row(label, train[:-n_val]), runset, train[-n_val:])
    heldout_scores = score(fitted, runset, heldout).metrics
    mean_mse = heldout_scores["mean_curve"]["all_mse"]
    print({label: round(metrics["all_mse"] / mean_mse, 3) for label, metrics in heldout_scores.items()}, flush=True)
    lds = run_lds(runset, {label: fitted[label] for label in [*args.methods, *ablation]},
                  base_runs=heldout[: args.bases], train_runs=train, protocols=PROTOCOLS, n_draws=args.draws,
                  out=Path(args.out) / "retrained", workers=args.workers, progress=False)
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
        format_lds_table(lds.table[lds.table["method"].isin(args.methods)]),
        "",
        f"Issue-19 targets with <= 16 training runs: {TARGETS}.",
        "",
    ]
    if ablation:
        lines += [f"Ablation of `{DEFAULT}` (each row changes one ingredient, at the default's lam "
                  f"{fitted[DEFAULT].lam_:g} and momentum {fitted[DEFAULT].momentum_:g}; LDS without intervals):",
                  "", ablation_table(DEFAULT, ablation, heldout_scores, mean_mse, lds.table, fitted, validation),
                  "", "Validation MSE: fitted on the first 80% of the training runs, rolled out on the rest (the "
                  "family's criterion for lam and momentum); the defaults are chosen by it, not by LDS.", ""]
    section = "\n".join(lines)
    print(section)
    if not args.no_record:
        write_section(args.results, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
