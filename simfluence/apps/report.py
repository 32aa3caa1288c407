"""Markdown reports of an evaluation: the metric table, honest verdicts against the baseline, plots.

Used by ``simfluence demo`` and ``simfluence evaluate --report``. It reads an
:class:`~simfluence.evaluation.Evaluation` and writes files; it fits nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from simfluence._io import atomic_write_bytes, atomic_write_json
from simfluence.evaluation import Evaluation, metrics_json
from simfluence.methods import METHODS
from simfluence.metrics import format_markdown_table
from simfluence.runlog import RunSet

BASELINE = "mean_curve"


def verdicts(metrics: dict[str, dict[str, float]], baseline: str = BASELINE) -> list[str]:
    """One sentence per method comparing its held-out all-steps MSE and rho_runs with the baseline's."""
    if baseline not in metrics:
        return []
    base = metrics[baseline]["all_mse"]
    lines = []
    for method, scores in metrics.items():
        if method == baseline:
            continue
        mse = scores["all_mse"]
        if not np.isfinite(mse):
            lines.append(f"- **{method}** diverged on held-out runs (all-steps MSE is not finite).")
        elif mse < base:
            lines.append(f"- **{method}** beats the mean curve: all-steps MSE {mse:.4g} vs {base:.4g} "
                         f"({base / mse:.2f}x lower); rho_runs {scores['rho_runs']:.3f}.")
        else:
            lines.append(f"- **{method}** LOSES to the mean curve: all-steps MSE {mse:.4g} vs {base:.4g} "
                         f"({mse / base:.2f}x higher): its loss curves are further off than ignoring the curriculum "
                         f"altogether; rho_runs {scores['rho_runs']:.3f} says how well it still ranks curricula.")
    return lines


def write_report(
    evaluation: Evaluation,
    runset: RunSet,
    out_dir: str | os.PathLike,
    title: str = "simfluence evaluation",
    extra: str = "",
) -> Path:
    """Write ``report.md``, ``metrics.json`` and the PNG plots into ``out_dir``; returns the report path."""
    from simfluence.apps.plot import plot_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics_json(evaluation.metrics))
    pictures = plot_report(evaluation, out_dir, test_labels=runset.test_ids)
    fit_warnings = [f"- **{name}**: {message}" for name, simulator in evaluation.simulators.items()
                    for message in getattr(simulator, "fit_warnings_", [])]
    lines = [
        f"# {title}",
        "",
        f"Run set: `{runset.path or 'in memory'}` — {len(runset)} runs, pool of {runset.n_pool} examples, "
        f"{runset.n_test} test examples. Every method was fitted on the first {len(evaluation.train_runs)} runs "
        f"(hyper-parameters chosen on validation runs carved out of those) and scored on the last "
        f"{len(evaluation.heldout_runs)} runs ({evaluation.heldout_runs[0]} .. {evaluation.heldout_runs[-1]}), "
        "never seen in fitting, rolling out each held-out curriculum from its observed initial losses.",
        "",
        format_markdown_table(evaluation.metrics),
        "",
        "`all_mse`/`all_mae`: error over every logged step; `final_mse`: at the last step; `rho_final`: Spearman "
        "across test examples of the final loss (dominated by how hard each example is); `rho_delta`: the same for "
        "the loss change; **`rho_runs`: Spearman across held-out runs for each test example — does the simulator "
        "rank curricula right?** (NaN for the mean curve, which predicts the same for every curriculum).",
        "",
        "## Verdicts",
        "",
        *verdicts(evaluation.metrics),
        "",
        *(["## Fit warnings", "", *fit_warnings, ""] if fit_warnings else []),
        "## Methods",
        "",
        *[f"- `{name}`: {METHODS[name].description if name in METHODS else ''}" for name in evaluation.metrics],
        "",
    ]
    if extra:
        lines += [extra, ""]
    lines += [
        "## Simulated vs real loss curves (one held-out run)",
        "",
        f"![trajectories]({pictures['trajectories'].name})",
        "",
        "## Predicted vs actual final loss (all held-out runs)",
        "",
        f"![final scatter]({pictures['final_scatter'].name})",
        "",
        "## Error over training steps",
        "",
        f"![error over steps]({pictures['error_over_steps'].name})",
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path
