"""Benchmark: are the prediction intervals calibrated against real retraining?

Reuses the LDS draws that ``bench_lds.py`` retrained for real (nothing is trained here): on the digits run set
(or the facts one with ``--workload facts`` or ``facts-smooth``), each method is fitted on the first runs (all but
the last 8, as in ``bench_lds.py``), a :class:`simfluence.uncertainty.Bootstrap` of it (20 members, 80% intervals,
seed 0) is fitted on the same runs, both with members on random halves of the runs (``half``, the default) and on runs
drawn with replacement (``runs``), and every retrained draw of every held-out base run is predicted by the
point simulator and by every member. Per method and protocol, over all (draw, test example) changes of the
final loss against the retrained base:

- coverage: share of the real changes inside the interval, uncalibrated (the members' raw spread) and
  calibrated (inflated by the factor fitted on validation runs carved from the training runs only; the
  retrained draws are never used to calibrate), for both resamplings; and calibrated on real retrains of the
  *other* base runs (leave one base out: ``Bootstrap.calibrate_on``'s route, for users who retrain a few);
- width: mean width of the calibrated (``half``) interval, next to the mean |real change|;
- flagged: share of the answers whose calibrated interval straddles zero, and how often the predicted sign is
  wrong among flagged and among unflagged answers (the flag is useful when the first is much larger);
- mean change: coverage of the change of the mean over test examples, one answer per draw (what a search
  reports).

Prints markdown and records it in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_intervals.py [--workload digits|facts|facts-smooth] [--members 20] [--level 0.8]
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = "## Prediction intervals against real retraining (digits)"
SECTION_FACTS = "## Prediction intervals against real retraining (facts language model)"
SECTION_FACTS_SMOOTH = "## Prediction intervals against real retraining (facts language model, smooth recipe)"
SECTIONS = {"digits": SECTION, "facts": SECTION_FACTS, "facts-smooth": SECTION_FACTS_SMOOTH}
METHODS = ("linear_mom", "additive")
RESAMPLINGS = ("half", "runs")
DEFAULTS = {
    "digits": {"cache": "/tmp/simfluence-bench-digits-ckpt", "lds": "/tmp/simfluence-bench-lds"},
    "facts": {"cache": "/tmp/facts-ckpt", "lds": "/tmp/simfluence-bench-lds-facts"},
    "facts-smooth": {"cache": "/tmp/facts-smooth-ckpt", "lds": "/tmp/simfluence-bench-lds-facts-smooth"},
}


def retrained_draws(folder: Path) -> dict[str, list[str]]:
    """{protocol: run names of its draws, in order} of one base run's retrained run set (complete runs only: a
    retraining stopped midway leaves a run of fewer steps, retrained when bench_lds.py resumes)."""
    from simfluence.runlog import RunSet

    protocols: dict[str, list[str]] = {}
    for name in RunSet.load(folder).complete_only().run_names:
        match = re.fullmatch(r"(.+)-(\d{3})", name)
        if match:
            protocols.setdefault(match.group(1), []).append(name)
    return {protocol: sorted(names) for protocol, names in protocols.items()}


def final_changes(trajectories: np.ndarray) -> np.ndarray:
    """(..., 1 + n, T + 1, n_test), base first -> (..., n, n_test) change of the final loss against the base."""
    final = trajectories[..., -1, :]
    return final[..., 1:, :] - final[..., :1, :]


def score(point: np.ndarray, members: np.ndarray, actual: np.ndarray, scale_raw: float, scale: float) -> dict:
    """Coverage, width and sign flags of one method's intervals on (n_answers,) real changes."""
    from simfluence.uncertainty import interval_bounds, straddles_zero

    low_raw, high_raw = interval_bounds(point, members, scale_raw)
    low, high = interval_bounds(point, members, scale)
    flagged = straddles_zero(low, high)
    wrong = np.sign(point) != np.sign(actual)
    return {
        "coverage_raw": float(np.mean((low_raw <= actual) & (actual <= high_raw))),
        "coverage": float(np.mean((low <= actual) & (actual <= high))),
        "width": float(np.mean(high - low)),
        "abs_actual": float(np.mean(np.abs(actual))),
        "flagged": float(np.mean(flagged)),
        "wrong_flagged": float(np.mean(wrong[flagged])) if flagged.any() else float("nan"),
        "wrong_unflagged": float(np.mean(wrong[~flagged])) if (~flagged).any() else float("nan"),
    }


def evaluate_method(name, runset, train, bases, lds_dir, members, level, echo) -> tuple[list[dict], dict, dict]:
    """Rows per protocol for one method, {resampling: Bootstrap} and {resampling: seconds to fit it}."""
    from simfluence.methods import make_simulator
    from simfluence.runlog import RunSet
    from simfluence.uncertainty import Bootstrap, normal_quantile

    start = time.perf_counter()
    simulator = make_simulator(name).fit(runset, runs=train)
    fitted, seconds = {}, {}
    for resample in RESAMPLINGS:
        begin = time.perf_counter()
        fitted[resample] = Bootstrap(simulator, n_resamples=members, level=level, resample=resample, seed=0).fit(
            runset, runs=train)
        seconds[resample] = time.perf_counter() - begin
        echo(f"{name} {resample}: {fitted[resample].describe()} ({seconds[resample]:.0f} s)")
    answers: dict[str, dict[str, list[np.ndarray]]] = {}
    for base_name in bases:
        base = runset[base_name]
        folder = Path(lds_dir) / "retrained" / base_name
        retrained = RunSet.load(folder)
        for protocol, names in retrained_draws(folder).items():
            curricula = [base.curriculum] + [retrained[draw].curriculum for draw in names]
            rates = None if base.known_learning_rates is None else [base.known_learning_rates] * len(curricula)
            finals = np.stack([np.asarray(retrained[draw].losses[-1], dtype=np.float64)
                               for draw in ["base", *names]])
            got = answers.setdefault(protocol, {key: [] for key in ("point", "actual", *RESAMPLINGS)})
            got["point"].append(final_changes(simulator.simulate(curricula, base.initial_losses, rates)))
            got["actual"].append(finals[1:] - finals[:1])
            for resample, intervals in fitted.items():
                got[resample].append(final_changes(intervals.simulate(curricula, base.initial_losses, rates)))
    z = normal_quantile(level)
    other_bases = _other_bases_coverage(answers, len(bases), level)
    rows = []
    for protocol, got in answers.items():
        point, actual = np.concatenate(got["point"]), np.concatenate(got["actual"])  # (n_draws_all, n_test)
        row = {"method": name, "protocol": protocol, "n_draws": point.shape[0], "n_test": point.shape[1]}
        for resample in RESAMPLINGS:
            member = np.concatenate(got[resample], axis=1)  # (n_members, n_draws_all, n_test)
            scores = score(point.ravel(), member.reshape(member.shape[0], -1), actual.ravel(), z,
                           fitted[resample].scale_)
            row.update({f"{key}_{resample}": value for key, value in scores.items()})
            mean_scores = score(point.mean(axis=1), member.mean(axis=2), actual.mean(axis=1), z,
                                fitted[resample].scale_)
            row[f"coverage_mean_{resample}"] = mean_scores["coverage"]
        row["coverage_other_bases"], row["width_other_bases"] = other_bases[protocol]
        rows.append(row)
    echo(f"{name}: {time.perf_counter() - start:.0f} s")
    return rows, fitted, seconds


def _other_bases_coverage(answers: dict, n_bases: int, level: float) -> dict[str, tuple[float, float]]:
    """{protocol: (coverage, mean width)} of half members' intervals inflated on the other base runs' real changes.

    For each base run, one inflation is fitted by :func:`~simfluence.uncertainty.inflation_for` on every draw of
    every protocol of the other bases (what ``Bootstrap.calibrate_on`` does with a user's own retrains) and
    the intervals are scored on this base's draws: calibration and scoring never share a retrained run.
    """
    from simfluence.uncertainty import inflation_for, interval_bounds, normal_quantile

    inside: dict[str, list[np.ndarray]] = {protocol: [] for protocol in answers}
    widths: dict[str, list[np.ndarray]] = {protocol: [] for protocol in answers}
    for held in range(n_bases):
        others = [(got["point"][b], got["half"][b], got["actual"][b]) for got in answers.values()
                  for b in range(n_bases) if b != held]
        point = np.concatenate([item[0].ravel() for item in others])
        members = np.concatenate([item[1].reshape(item[1].shape[0], -1) for item in others], axis=1)
        actual = np.concatenate([item[2].ravel() for item in others])
        needed, _ = inflation_for(point, members, actual, level)
        if not np.isfinite(needed):  # members agree exactly on wrong answers (an order-free model's moves)
            return {protocol: (float("nan"), float("nan")) for protocol in answers}
        scale = max(1.0, needed) * normal_quantile(level)
        for protocol, got in answers.items():
            low, high = interval_bounds(got["point"][held], got["half"][held], scale)
            inside[protocol].append(((low <= got["actual"][held]) & (got["actual"][held] <= high)).ravel())
            widths[protocol].append((high - low).ravel())
    return {protocol: (float(np.concatenate(inside[protocol]).mean()), float(np.concatenate(widths[protocol]).mean()))
            for protocol in answers}


def _pct(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{100 * value:.0f}%"


def format_table(rows: list[dict], level: float) -> str:
    nominal = f"{100 * level:g}%"
    header = ["method", "protocol", "coverage raw (half)", "coverage calibrated (half)", "coverage raw (runs)",
              "coverage calibrated (runs)", "coverage calibrated on other bases' retrains (mean width)", "mean width",
              "mean abs real change", "flagged (straddles 0)",
              "sign wrong: flagged", "sign wrong: unflagged", "coverage of mean change"]
    lines = [f"Nominal coverage {nominal}.", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [row["method"], row["protocol"], _pct(row["coverage_raw_half"]), _pct(row["coverage_half"]),
                 _pct(row["coverage_raw_runs"]), _pct(row["coverage_runs"]),
                 f"{_pct(row['coverage_other_bases'])} ({row['width_other_bases']:.3g})",
                 f"{row['width_half']:.4f}",
                 f"{row['abs_actual_half']:.4f}", _pct(row["flagged_half"]), _pct(row["wrong_flagged_half"]),
                 _pct(row["wrong_unflagged_half"]), _pct(row["coverage_mean_half"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from simfluence.runlog import RunSet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(DEFAULTS), default="digits")
    parser.add_argument("--cache", default=None, help="the run set (default: bench_lds.py's for the workload)")
    parser.add_argument("--lds", default=None, help="bench_lds.py's --out folder, holding retrained/<base>/")
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--level", type=float, default=0.8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args(argv)
    cache = args.cache or DEFAULTS[args.workload]["cache"]
    lds_dir = Path(args.lds or DEFAULTS[args.workload]["lds"])
    if not (lds_dir / "retrained").is_dir():
        parser.error(f"{lds_dir}/retrained does not exist: run bench_lds.py"
                     + (f" --workload {args.workload}" if args.workload != "digits" else "") + " first")
    runset = RunSet.load(cache)
    train = list(range(len(runset) - 8))
    bases = sorted(path.name for path in (lds_dir / "retrained").iterdir() if path.is_dir())
    start = time.perf_counter()
    rows, described = [], []
    for name in args.methods:
        method_rows, fitted, seconds = evaluate_method(name, runset, train, bases, lds_dir, args.members, args.level,
                                              lambda line: print(line, file=sys.stderr))
        rows.extend(method_rows)
        for resample, intervals in fitted.items():
            cal = intervals.calibration_
            described.append(f"{name} / {resample}: inflation x{intervals.inflation_:.2f} (uninflated intervals "
                             f"covered {_pct(cal['raw_coverage'])} of the {cal['n_changes']} validation changes), "
                             f"bootstrap fitted in {seconds[resample]:.0f} s")
    wall = time.perf_counter() - start
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    arguments = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/bench_intervals.py", *arguments])
    n_draws = ", ".join(f"{row['protocol']} {row['n_draws']}" for row in rows if row["method"] == rows[0]["method"])
    lines = [
        SECTIONS[args.workload],
        "",
        f"Recorded {now} by `{command}` on {os.cpu_count()} cores in {wall:.0f} s. Run set `{cache}` "
        f"({len(runset)} runs, pool {runset.n_pool}, {runset.n_test} tests); methods and their bootstraps fitted on "
        f"the first {len(train)} runs; real changes: the draws `bench_lds.py` retrained for real in "
        f"`{lds_dir}/retrained` (bases {', '.join(bases)}; draws over all bases: {n_draws}), none of them used to "
        f"fit or calibrate. {args.members} members per bootstrap, seed 0. Calibration (validation runs carved from "
        "the training runs): " + "; ".join(described) + ".",
        "",
        "Coverage: share of the (draw, test) real changes of the final loss inside the interval around the point "
        "prediction (point -+ inflation x z x sd of the members). Raw: inflation 1; calibrated: the inflation "
        "above. half: members on random halves of the training runs (the default); runs: on as many runs drawn "
        "with replacement. Calibrated on other bases' retrains: half members, one inflation fitted on the real "
        "changes of every draw of the other base runs (what `Bootstrap.calibrate_on` does with a user's own "
        "retrains), scored on this base's draws; n/a where no finite inflation covers 80% (members that agree "
        "exactly on wrong answers). Width, flags and sign errors: calibrated half intervals (on "
        "validation runs); sign wrong = the point "
        "prediction's sign differs from the real change's. Coverage of mean change: the change of the mean over "
        "test examples, one answer per draw.",
        "",
        format_table(rows, args.level),
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.results, SECTIONS[args.workload], section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
