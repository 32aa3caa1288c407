"""Benchmark: how many logged training runs does each simulator need?

For k = 4, 8, 16, 32, 64 training runs (random subsets of the run set's training runs, several per k below
the largest), every method is fitted on the k runs only (``lam`` / ``momentum`` chosen on validation runs
carved out of those k) and scored on the same held-out runs and base runs as ``bench_lds.py``:

- held-out all-steps MSE, relative to the mean curve of *all* the training runs (a fixed yardstick: the
  best estimate of the average trajectory), and ``rho_runs`` (does it rank the held-out curricula right?),
  from :mod:`simfluence.evaluation`, on the 8 held-out runs;
- LDS against real retraining (:func:`simfluence.apps.lds.run_lds`) on the base runs and draws that
  ``bench_lds.py`` already retrained (nothing is retrained here: the call checks that every draw is found).

Digits: 72 runs of the ``bench_lds.py`` workload in their own cache folder; the generator is deterministic per
seed, so runs 000-047 are those of the 48-run cache (checked when that cache exists) and the bases run-040,
run-043, run-047 and their retrained draws stay valid. Held out: run-040 .. run-047; the training runs are the
other 64. The reference is today's default, ``linear_mom`` fitted on run-000 .. run-039 (as in ``bench_lds.py``).
Facts (``--workload facts``): the 32-run language-model set of ``bench_lds.py --workload facts``; held out: the
last 8 (bases: the last 3); k up to the 24 training runs.

Digits, hybrid set (``--workload digits-hybrid``, issue 19): the 24-run set of ``bench_hybrid.py`` (checkpoints at
0/50/100/150/200) and its retrained draws (remove-5, move-end; run that script first); held out: run-016 ..
run-023 (bases: run-016, run-017, run-018); k up to its 16 training runs (32 would need a larger set and new
retrains); methods: ``linear_mom_prior`` next to ``linear_mom`` and ``blend_influence``; the issue-19 targets.

Prints markdown, records it in ``benchmarks/RESULTS.md``, keeps every number in ``--out``/results.json and draws
``docs/sample-efficiency.png`` from the results of the digits and facts workloads run so far.

    python benchmarks/bench_sample_efficiency.py [--workload digits|facts] [--sizes 4 8 16 32 64] [--subsets 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIGURE = ROOT / "docs" / "sample-efficiency.png"
METHODS = ("mean_curve", "additive", "linear", "linear_mom", "additive_log", "linear_log", "linear_mom_log",
           "tracin_offset", "blend", "blend_influence")
REFERENCE = "linear_mom"
TABLE_METRICS = (  # (key, title, format)
    ("mse_ratio", "held-out all-steps MSE / mean curve's (lower is better)", "{:.2f}"),
    ("rho_runs", "held-out rho_runs (higher is better)", "{:.2f}"),
    ("lds:remove-5", "LDS remove-5 (higher is better)", "{:.2f}"),
    ("lds:move-end", "LDS move-end (higher is better)", "{:.2f}"),
)
WORKLOADS = {
    "digits": {
        "section": "## Sample efficiency: fidelity against the number of training runs (digits)",
        "cache": "/tmp/simfluence-bench-digits-ckpt-72",
        "same_as": "/tmp/simfluence-bench-digits-ckpt",  # its runs must be the first runs of the cache
        "n_runs": 72,
        "heldout": [f"run-{i:03d}" for i in range(40, 48)],
        "bases": ["run-040", "run-043", "run-047"],
        "reference_runs": [f"run-{i:03d}" for i in range(40)],
        "lds_out": "/tmp/simfluence-bench-lds/retrained",
        "protocols": ("remove-1", "remove-5", "remove-10", "move-end", "half"),
        "draws": 40,
        "sizes": (4, 8, 16, 32, 64),
    },
    "facts": {
        "section": "## Sample efficiency: fidelity against the number of training runs (facts language model)",
        "cache": "/tmp/facts-ckpt",
        "same_as": None,
        "n_runs": 32,
        "heldout": [f"run-{i:03d}" for i in range(24, 32)],
        "bases": ["run-029", "run-030", "run-031"],
        "reference_runs": [f"run-{i:03d}" for i in range(24)],
        "lds_out": "/tmp/simfluence-bench-lds-facts/retrained",
        "protocols": ("remove-5", "move-end", "half"),
        "draws": 20,
        "sizes": (4, 8, 16, 24),
    },
    "digits-hybrid": {
        "section": "## Sample efficiency of the effect-level hybrid (digits, bench_hybrid.py's run set)",
        "cache": "/tmp/simfluence-bench-hybrid-digits",
        "same_as": None,
        "n_runs": 24,
        "heldout": [f"run-{i:03d}" for i in range(16, 24)],
        "bases": ["run-016", "run-017", "run-018"],
        "reference_runs": [f"run-{i:03d}" for i in range(16)],
        "lds_out": "/tmp/simfluence-bench-hybrid/retrained",
        "protocols": ("remove-5", "move-end"),
        "draws": 40,
        "sizes": (4, 8, 16),
        "methods": ("mean_curve", "linear_mom", "blend_influence", "linear_mom_prior"),
        "figure": False,  # not part of docs/sample-efficiency.png (a different run set)
        "issue": 19,
        "script": "bench_hybrid.py",
    },
}
# issue 19's targets on digits with <= 16 training runs: (metric, lower is better, threshold)
HYBRID_TARGETS = (("lds:remove-5", False, 0.8), ("lds:move-end", False, 0.8), ("mse_ratio", True, 0.4),
                  ("rho_runs", False, 0.7))


def make_runset(workload: str, cache: str):
    """The run set of a workload (generated into ``cache`` when missing) and a line on how it was checked."""
    from simfluence.runlog import RunSet

    config = WORKLOADS[workload]
    if workload == "facts":
        from simfluence.workloads import generate_facts

        return generate_facts(cache, checkpoint_steps=(0, 100, 200), progress=False), "the facts cache as it is"
    from simfluence.workloads import generate_digits

    runset = generate_digits(cache, n_runs=config["n_runs"], checkpoint_steps=(0, 50, 100, 150, 200),
                             progress=False)
    same_as = config["same_as"]
    if not same_as:
        return runset, "the cache as it is"
    if not Path(same_as, "manifest.json").is_file():
        return runset, f"no {same_as} to compare with"
    smaller = RunSet.load(same_as)
    for index, run in enumerate(smaller):
        mine = runset[index]
        same = (run.name == mine.name and np.array_equal(run.curriculum.ids, mine.curriculum.ids)
                and np.array_equal(run.curriculum.batch_sizes, mine.curriculum.batch_sizes)
                and np.array_equal(np.asarray(run.losses), np.asarray(mine.losses)))
        if not same:
            raise SystemExit(f"{cache}: {mine.name} differs from {same_as}'s; the retrained LDS draws do not apply")
    return runset, f"runs 000-{len(smaller) - 1:03d} identical (curricula and every loss) to `{same_as}`'s"


def subsets(pool: list[int], k: int, n_subsets: int) -> list[list[int]]:
    """``n_subsets`` random k-subsets of the training pool (one when k is the whole pool), reproducible per k."""
    if k >= len(pool):
        return [list(pool)]
    return [sorted(np.random.default_rng([k, seed]).choice(pool, k, replace=False).tolist())
            for seed in range(n_subsets)]


def fit(name: str, runset, runs: list[int], task) -> tuple[object, float, int]:
    """A fresh registry simulator fitted on ``runs``: (simulator, seconds, conjugate-gradient warnings)."""
    from simfluence.methods import make_simulator
    from simfluence.solvers import ConvergenceWarning

    simulator = make_simulator(name)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        simulator.fit(runset, runs=runs, task=task)
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return simulator, time.perf_counter() - start, unconverged


def score_subset(runset, methods, train: list[int], heldout: list[int], bases: list[str], config, task,
                 mean_mse: float) -> dict[str, dict[str, float]]:
    """Fit every method on ``train``; held-out trajectory metrics and LDS of each: {method: {metric: value}}."""
    from simfluence.apps.lds import run_lds
    from simfluence.evaluation import score

    fitted, scores = {}, {}
    for name in methods:
        simulator, seconds, unconverged = fit(name, runset, train, task)
        fitted[name] = simulator
        scores[name] = {"fit_seconds": seconds, "unconverged": unconverged}
    held = score(fitted, runset, heldout)
    lds = run_lds(runset, fitted, base_runs=bases, train_runs=train, protocols=config["protocols"],
                  n_draws=config["draws"], out=config["lds_out"], workers=1, progress=False, n_boot=0)
    if lds.n_trained:
        raise SystemExit(f"{lds.n_trained} LDS draws were missing from {config['lds_out']} and were retrained: "
                         "run bench_lds.py for this workload first")
    for name in methods:
        metrics = held.metrics[name]
        scores[name].update({"all_mse": metrics["all_mse"], "mse_ratio": metrics["all_mse"] / mean_mse,
                             "rho_runs": metrics["rho_runs"]})
        rows = lds.table[lds.table["method"] == name]
        for row in rows.itertuples():
            scores[name][f"lds:{row.protocol}"] = float(row.lds)
            scores[name][f"sign:{row.protocol}"] = float(row.sign_agreement)
            scores[name][f"magnitude:{row.protocol}"] = float(row.magnitude_ratio)
    return scores


def run(workload: str, args) -> dict:
    """Every (k, subset, method) score of one workload, the reference and the settings, as one JSON-able dict."""
    from simfluence.evaluation import score
    from simfluence.methods import make_simulator
    from simfluence.workloads import task_for_runset

    config = WORKLOADS[workload]
    overrides = {"lds_out": args.lds_out, "bases": args.bases, "draws": args.draws}
    config.update({key: value for key, value in overrides.items() if value is not None})
    runset, check = make_runset(workload, args.cache or config["cache"])
    names = runset.run_names
    heldout = [names.index(name) for name in config["heldout"]]
    pool = [index for index, run in enumerate(runset) if index not in heldout and run.complete]
    sizes = [k for k in (args.sizes or config["sizes"]) if k <= len(pool)]
    task = task_for_runset(runset)
    methods = list(args.methods or config.get("methods", METHODS))
    mean_curve = make_simulator("mean_curve").fit(runset, runs=pool)
    mean_mse = score({"mean_curve": mean_curve}, runset, heldout).metrics["mean_curve"]["all_mse"]

    start = time.perf_counter()
    reference_runs = [names.index(name) for name in config["reference_runs"]]
    results = []
    for k in sizes:
        for subset_index, train in enumerate(subsets(pool, k, args.subsets)):
            scores = score_subset(runset, methods, train, heldout, config["bases"], config, task, mean_mse)
            results.append({"k": k, "subset": subset_index, "train_runs": [names[i] for i in train],
                            "scores": scores})
            summary = ", ".join(f"{name} {s['mse_ratio']:.2f}/{s['rho_runs']:.2f}" for name, s in scores.items())
            print(f"k={k} subset {subset_index}: {summary}", flush=True)
    # the reference's runs may be a subset already scored (the hybrid set: all 16 training runs): not fitted twice
    same = [entry["scores"][REFERENCE] for entry in results
            if sorted(entry["train_runs"]) == sorted(config["reference_runs"]) and REFERENCE in entry["scores"]]
    reference = same[0] if same else score_subset(runset, [REFERENCE], reference_runs, heldout, config["bases"],
                                                  config, task, mean_mse)[REFERENCE]
    print(f"reference {REFERENCE} on {len(reference_runs)} runs: {reference}", flush=True)
    return {
        "workload": workload, "runset": args.cache or config["cache"], "n_runs": len(runset),
        "n_steps": runset[0].n_steps, "n_pool": runset.n_pool, "n_test": runset.n_test, "check": check,
        "heldout": config["heldout"], "bases": config["bases"], "n_pool_runs": len(pool), "sizes": sizes,
        "n_subsets": args.subsets, "methods": methods, "protocols": list(config["protocols"]),
        "draws": config["draws"], "lds_out": config["lds_out"], "mean_curve_mse": mean_mse,
        "reference": {"method": REFERENCE, "n_runs": len(reference_runs), "scores": reference},
        "results": results, "seconds": time.perf_counter() - start,
        "recorded": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summarise(data: dict, method: str, k: int, key: str) -> tuple[float, float, float, int]:
    """Median, smallest, largest and count over the subsets of size k, ignoring NaN.

    The median, not the mean: one subset whose fit diverges on the held-out runs (a ratio of 880 among ratios
    of 1.5) would otherwise stand for all of them; the range shows it.
    """
    values = np.array([entry["scores"][method].get(key, np.nan) for entry in data["results"]
                       if entry["k"] == k and method in entry["scores"]], dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan"), float("nan"), 0
    return float(np.median(values)), float(values.min()), float(values.max()), int(values.size)


def format_tables(data: dict) -> str:
    """One markdown table per metric: methods x k (median [range] over subsets), the reference in the last row."""
    blocks = []
    for key, title, fmt in TABLE_METRICS:
        header = "| method | " + " | ".join(f"k = {k}" for k in data["sizes"]) + " |"
        lines = [f"**{title}**", "", header, "|---" * (len(data["sizes"]) + 1) + "|"]
        for method in data["methods"]:
            cells = []
            for k in data["sizes"]:
                median, low, high, count = summarise(data, method, k, key)
                cell = "n/a" if count == 0 else fmt.format(median)
                if count > 1:
                    cell += f" [{fmt.format(low)}, {fmt.format(high)}]"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ref = data["reference"]
        value = ref["scores"].get(key, float("nan"))
        lines.append(f"| *{ref['method']} on {ref['n_runs']} runs (reference)* | "
                     + " | ".join(["—"] * (len(data["sizes"]) - 1) + [fmt.format(value)]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def hybrid_target_lines(data: dict) -> list[str]:
    """Issue 19's targets, met or missed, by each method's median at the largest k (<= 16 training runs)."""
    k = max(size for size in data["sizes"] if size <= 16)
    lines = []
    for key, lower, threshold in HYBRID_TARGETS:
        title = next(title for name, title, _ in TABLE_METRICS if name == key).split(" (")[0]
        cells = []
        for method in data["methods"]:
            value = summarise(data, method, k, key)[0]
            if method != "mean_curve" and np.isfinite(value):
                met = value <= threshold if lower else value >= threshold
                cells.append(f"`{method}` {value:.2f} ({'met' if met else 'missed'})")
        lines.append(f"- {title} {'<=' if lower else '>='} {threshold} with {k} runs: " + "; ".join(cells))
    return lines


def target_lines(data: dict) -> list[str]:
    """The issue's target, met or missed: with 8 runs, does the best method beat linear_mom fitted on 40?"""
    if WORKLOADS[data["workload"]].get("issue") == 19:
        return hybrid_target_lines(data)
    if 8 not in data["sizes"]:
        return []
    ref = data["reference"]
    lines = []
    for key, title, fmt in TABLE_METRICS:
        lower = key == "mse_ratio"
        ranked = [(summarise(data, method, 8, key)[0], method) for method in data["methods"]]
        ranked = [(value, method) for value, method in ranked if np.isfinite(value)]
        if not ranked:
            continue
        value, method = min(ranked) if lower else max(ranked)
        _, low, high, _ = summarise(data, method, 8, key)
        target = ref["scores"].get(key, float("nan"))
        worst = high if lower else low
        if not (value < target if lower else value > target):
            verdict = "**missed**"
        elif worst < target if lower else worst > target:
            verdict = "**met** (every subset)"
        else:
            verdict = "**met by the median only** (the subsets straddle the reference)"
        lines.append(f"- {title.split(' (')[0]}: best median with 8 runs `{method}` {fmt.format(value)} (subsets "
                     f"{fmt.format(low)} .. {fmt.format(high)}) vs {ref['method']} on {ref['n_runs']} runs "
                     f"{fmt.format(target)}: {verdict}")
    return lines


def section(data: dict, command: str) -> str:
    config = WORKLOADS[data["workload"]]
    now = data.get("recorded") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sizes = ", ".join(str(k) for k in data["sizes"])
    unconverged = sum(s.get("unconverged", 0) for entry in data["results"] for s in entry["scores"].values())
    fits = sum(len(entry["scores"]) for entry in data["results"])
    lines = [
        config["section"],
        "",
        f"Recorded {now} by `{command}` on {os.cpu_count()} cores in {data['seconds']:.0f} s. Run set "
        f"`{data['runset']}`: {data['n_runs']} runs x {data['n_steps']} steps, pool {data['n_pool']}, "
        f"{data['n_test']} tests ({data['check']}). Held out: {data['heldout'][0]} .. {data['heldout'][-1]} "
        f"(all-steps MSE and rho_runs); LDS on the base runs {', '.join(data['bases'])} with the "
        f"{data['draws']} draws per protocol already retrained in `{data['lds_out']}` (nothing retrained here). "
        f"Training runs: random subsets of the other {data['n_pool_runs']} runs, k = {sizes}; "
        f"{data['n_subsets']} random subsets per k (one when k = {data['n_pool_runs']}, all of them); "
        "each method fitted on the k runs alone (lam and momentum chosen on validation runs carved out of them). "
        f"Cells: median [smallest, largest] over the subsets. MSE is relative to the mean curve of all "
        f"{data['n_pool_runs']} training runs (all-steps MSE {data['mean_curve_mse']:.4f}); the mean_curve row "
        f"is the mean curve of the k runs. Reference: today's default `{data['reference']['method']}` fitted on "
        f"{data['reference']['n_runs']} runs (as in `{config.get('script', 'bench_lds.py')}`). {unconverged} of "
        f"{fits} fits hit the conjugate-gradient iteration cap at some lam candidate (ConvergenceWarning; small k, "
        "weak lam).",
        "",
        format_tables(data),
        "",
        ("Targets of issue 19 (remove-5 and move-end LDS >= 0.8, held-out MSE <= 0.4x the mean curve's, "
         "rho_runs >= 0.7, with <= 16 training runs and no replay):"
         if config.get("issue") == 19 else
         "Target of issue 11 (with 8 training runs the best method beats today's linear_mom fitted on "
         f"{data['reference']['n_runs']}):"),
        "",
        *target_lines(data),
        "",
    ]
    return "\n".join(lines)


def draw(datasets: list[dict], path: Path) -> None:
    """One row per workload, one panel per metric; x = training runs (log scale), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a log-space method is drawn dashed in the colour of its loss-space counterpart
    families = list(dict.fromkeys(method.removesuffix("_log") for method in METHODS))
    colors = dict(zip(families, plt.get_cmap("tab10").colors, strict=False))
    reference_label = f"reference: {REFERENCE} on " + ", ".join(
        f"{data['reference']['n_runs']} runs ({data['workload']})" for data in datasets)
    fig, axes = plt.subplots(len(datasets), len(TABLE_METRICS), figsize=(3.2 * len(TABLE_METRICS),
                                                                          2.7 * len(datasets)), squeeze=False)
    for row, data in zip(axes, datasets, strict=True):
        for ax, (key, title, _) in zip(row, TABLE_METRICS, strict=True):
            for method in data["methods"]:
                stats = [summarise(data, method, k, key) for k in data["sizes"]]
                medians = np.array([s[0] for s in stats])
                if not np.isfinite(medians).any():
                    continue
                spread = np.array([[m - s[1] for m, s in zip(medians, stats, strict=True)],
                                   [s[2] - m for m, s in zip(medians, stats, strict=True)]])
                log = method.endswith("_log")
                ax.errorbar(data["sizes"], medians, yerr=spread, label=method, marker="o", markersize=3,
                            color=colors.get(method.removesuffix("_log")), linewidth=1.3, capsize=2,
                            linestyle="--" if log else "-")
            ref = data["reference"]
            value = ref["scores"].get(key, float("nan"))
            if np.isfinite(value):
                ax.axhline(value, color="black", linestyle=":", linewidth=1, label=reference_label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(data["sizes"], [str(k) for k in data["sizes"]])
            ax.minorticks_off()
            if key == "mse_ratio":
                ax.set_yscale("log")
                ax.set_ylim(0.3, 12.0)  # a diverging subset's range runs off the top (the table has it)
                ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{data['workload']}: {title.split(' (')[0]}", fontsize=8)
            ax.set_xlabel("training runs", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if len(datasets) > 1 else 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--cache", default=None, help="run set (default: the workload's cache, made if absent)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="numbers of training runs")
    parser.add_argument("--subsets", type=int, default=3, help="random subsets per number of runs")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--lds-out", default=None, help="retrained LDS draws (default: the workload's)")
    parser.add_argument("--bases", nargs="+", default=None, help="LDS base runs (names; default: the workload's)")
    parser.add_argument("--draws", type=int, default=None, help="LDS draws per protocol and base")
    parser.add_argument("--out", type=Path, default=Path("/tmp/simfluence-bench-sample-efficiency"),
                        help="results.json per workload (<out>/<workload>.json)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section and the figure from the saved results (nothing is fitted)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / f"{args.workload}.json"
    if args.report_only:
        data = json.loads(saved.read_text())
    else:
        data = run(args.workload, args)
        arguments = argv if argv is not None else sys.argv[1:]
        data["command"] = " ".join(["python benchmarks/bench_sample_efficiency.py", *arguments])
        saved.write_text(json.dumps(data, indent=1))
    text = section(data, data.get("command", "python benchmarks/bench_sample_efficiency.py"))
    print(text)
    write_section(args.results, WORKLOADS[args.workload]["section"], text)
    if not WORKLOADS[args.workload].get("figure", True):
        return 0
    datasets = [json.loads((args.out / f"{name}.json").read_text()) for name, config in WORKLOADS.items()
                if config.get("figure", True) and (args.out / f"{name}.json").is_file()]
    draw(datasets, args.figure)
    print(f"figure: {args.figure} ({args.figure.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
