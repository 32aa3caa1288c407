"""The end-to-end demo behind ``simfluence demo`` / ``make demo``.

Generates (or reuses) the default digits run set — real MLPs trained on 48 curricula, with checkpoints
for the gradient-based methods — fits every method (learned simulators, baselines, TracIn, influence
functions, TrackStar) on all but the last 8 runs, scores them on those 8 held-out runs and writes ``report.md``,
``metrics.json`` (same schema as ``simfluence evaluate --json``) and the plots into the output folder.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from simfluence.apps.report import write_report
from simfluence.evaluation import evaluate
from simfluence.methods import DEFAULT_METHODS
from simfluence.metrics import format_table
from simfluence.runlog import RunSet

HOLDOUT = 8
GRADIENT_METHODS = ("tracin", "tracin_cos", "influence", "trackstar")
CHECKPOINT_STEPS = (0, 50, 100, 150, 200)


def run_demo(out: Path, echo: Callable[[str], None] = print, n_runs: int = 48) -> dict:
    """Run the demo into folder ``out``; returns the metrics dict."""
    from simfluence.workloads import generate_digits

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runset_dir = out / "runs-digits"
    echo(f"training {n_runs} digits MLPs on random curricula (resumes {runset_dir} if present)")
    generate_digits(runset_dir, n_runs=n_runs, checkpoint_steps=CHECKPOINT_STEPS, progress=True)
    runset = RunSet.load(runset_dir)
    methods = DEFAULT_METHODS + GRADIENT_METHODS
    echo(f"fitting {', '.join(methods)} on {len(runset) - HOLDOUT} runs; scoring on {HOLDOUT} held-out runs")
    result = evaluate(runset, methods, holdout=HOLDOUT, progress=True)
    echo(format_table(result.metrics))
    report = write_report(result, runset, out, title="simfluence demo: digits MLP, held-out runs")
    echo(f"wrote {report}, {out / 'metrics.json'} and plots in {out} ({time.perf_counter() - start:.0f} s)")
    return result.metrics
