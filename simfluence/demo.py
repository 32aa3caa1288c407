"""The end-to-end demo behind ``simfluence demo`` / ``make demo``.

Generates a run set, fits every method on all but the held-out runs, scores them on the held-out runs
and writes ``metrics.json`` (same schema as ``simfluence evaluate --json``) next to the run set.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from simfluence._io import atomic_write_json
from simfluence.evaluation import evaluate, metrics_json
from simfluence.metrics import format_table
from simfluence.runlog import RunSet
from simfluence.simulators import DEFAULT_METHODS
from simfluence.synthetic import known_linear_runset

HOLDOUT = 8


def run_demo(out: Path, echo: Callable[[str], None] = print) -> dict:
    """Run the demo into folder ``out``; returns the metrics dict."""
    out.mkdir(parents=True, exist_ok=True)
    runset_dir = out / "runs-synthetic"
    if (runset_dir / "manifest.json").exists():
        runset = RunSet.load(runset_dir)
        echo(f"reusing {runset_dir}")
    else:
        echo("generating 40 synthetic runs from a known Simfluence-Linear model (noise 0.01)")
        runset, _, _ = known_linear_runset(
            n_pool=200, n_test=50, n_runs=40, n_steps=100, batch_size=8, subset_size=100, noise=0.01, seed=0
        )
        runset.save(runset_dir)
    result = evaluate(runset, DEFAULT_METHODS, holdout=HOLDOUT, progress=True)
    echo(f"fit on {len(result.train_runs)} runs, scored on {len(result.heldout_runs)} held-out runs")
    echo(format_table(result.metrics))
    metrics = metrics_json(result.metrics)
    atomic_write_json(out / "metrics.json", metrics)
    echo(f"wrote {out / 'metrics.json'}")
    return metrics
