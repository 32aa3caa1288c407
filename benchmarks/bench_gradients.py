"""Speed of the gradient engine and of every gradient-based attribution method on the digits MLP.

1. Per-example gradient throughput: ``simfluence.attribution.per_example_gradients`` (``vmap(grad)`` over
   ``functional_call``, chunked, and the linear fast path it picks by default for this all-Linear MLP: one
   batched forward and one backward pass, gradients as outer products delta_i a_i^T) against what a user
   without the library writes, a loop of one forward and one backward pass per example. All must give the
   same gradients (max abs difference from the loop reported).
2. Scores per second of each method on a pool x test problem: TracIn-CP (dot and cosine) over 3 checkpoints,
   influence functions (Gauss-Newton Hessian, dense solve; all parameters and last layer only) and
   TrackStar (projection to 512 dims, mixed task-specific Hessian, unit normalisation).

The model is the digits workload's 64-64-10 MLP (4,810 parameters) on its real data; the checkpoints are its
initial weights plus small random perturbations (speed does not depend on how well they are trained).
Timings are the best of ``--repeats`` wall-clock runs (``time.perf_counter``) on whatever else the machine
is doing. The script prints a markdown table and records it in ``benchmarks/RESULTS.md`` (not with ``--quick``).

Usage::

    python benchmarks/bench_gradients.py            # 1,000 pool x 200 test
    python benchmarks/bench_gradients.py --quick    # 200 x 50 smoke size
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from simfluence.attribution import last_layer, per_example_gradients
from simfluence.attribution.checkpoints import Checkpoint
from simfluence.attribution.gradients import gradient_method
from simfluence.attribution.influence import influence_scores
from simfluence.attribution.tracin import tracin_scores
from simfluence.attribution.trackstar import trackstar_scores
from simfluence.workloads import digits_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

TARGET_SPEEDUP = 10.0
SECTION = "## Gradients: per-example gradient engine and attribution scores per second"


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def loop_gradients(model, loss_fn, inputs, targets) -> torch.Tensor:
    """The naive reference: one backward pass per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[None]), y[None]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size (200 pool x 50 test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a small shared machine a second thread mostly "
                             "adds synchronisation to these small operations)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    n_pool, n_test = (200, 50) if args.quick else (1000, 200)
    task = digits_task(pool_size=n_pool, test_size=n_test)
    model = task.make_model(0)
    model.eval()
    loss_fn = task.loss_fn
    n_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    checkpoints = [
        Checkpoint(step=step, learning_rate=0.02,
                   model_state={name: value + 0.05 * torch.randn(value.shape, generator=generator)
                                for name, value in model.state_dict().items()})
        for step in (0, 100, 200)
    ]
    final = model
    final.load_state_dict(checkpoints[-1].model_state)
    n_examples = n_pool + n_test
    inputs = torch.cat([task.pool_inputs, task.test_inputs])
    targets = torch.cat([task.pool_targets, task.test_targets])

    loop_seconds, reference = best_time(lambda: loop_gradients(final, loss_fn, inputs, targets), args.repeats)
    engine_seconds, engine = best_time(lambda: per_example_gradients(final, loss_fn, inputs, targets,
                                                                     method="vmap"), args.repeats)
    fast_seconds, fast = best_time(lambda: per_example_gradients(final, loss_fn, inputs, targets), args.repeats)
    assert gradient_method(final) == "linear"

    def row(name: str, seconds: float, gradients: torch.Tensor) -> str:
        speedup = loop_seconds / seconds
        verdict = "(target >= 10x met)" if speedup >= TARGET_SPEEDUP else "(below the 10x target)"
        difference = float((gradients - reference).abs().max())
        return (f"| {name} | {seconds:.4f} | {n_examples / seconds:,.0f} | {speedup:.1f}x {verdict} "
                f"| {difference:.1e} |")

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Recorded {now} by `python benchmarks/bench_gradients.py{' --quick' if args.quick else ''}`.",
        "",
        f"Digits MLP 64-64-10 ({n_params:,} parameters), {n_pool:,} pool x {n_test:,} test examples; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.machine()}; load average {os.getloadavg()[0]:.2f}; best of {args.repeats}.",
        "",
        "| per-example gradients | seconds | examples / s | speed-up | max abs diff |",
        "|---|---:|---:|---:|---:|",
        f"| loop of single backward passes | {loop_seconds:.3f} | {n_examples / loop_seconds:,.0f} | 1.0x | - |",
        row('`per_example_gradients(method="vmap")` (automatic chunks)', engine_seconds, engine),
        row("`per_example_gradients` (default: linear fast path, automatic chunks)", fast_seconds, fast),
        "",
    ]

    common = (task.pool_inputs, task.pool_targets, task.test_inputs, task.test_targets)
    methods = {
        "TracIn-CP, dot (3 checkpoints)": lambda: tracin_scores(model, loss_fn, *common, checkpoints),
        "TracIn-CP, cosine (3 checkpoints)": lambda: tracin_scores(model, loss_fn, *common, checkpoints,
                                                                   variant="cosine"),
        "influence, Gauss-Newton, all params, dense solve": lambda: influence_scores(
            final, loss_fn, *common, damping=0.01, hessian="gauss_newton"),
        "influence, exact Hessian, last layer, dense solve": lambda: influence_scores(
            final, loss_fn, *common, damping=0.01, params=last_layer(final)),
        "influence, Gauss-Newton, last layer, CG": lambda: influence_scores(
            final, loss_fn, *common, damping=0.01, hessian="gauss_newton", solver="cg",
            params=last_layer(final), cg_tol=1e-6),
        "TrackStar (d = 512, mixed Hessian, 1 checkpoint)": lambda: trackstar_scores(
            model, loss_fn, *common, checkpoints[-1:], projection_dim=512),
    }
    lines += ["| method | seconds | scores / s |", "|---|---:|---:|"]
    for name, run in methods.items():
        seconds, scores = best_time(run, args.repeats)
        assert scores.shape == (n_pool, n_test)
        lines.append(f"| {name} | {seconds:.3f} | {n_pool * n_test / seconds:,.0f} |")
    print("\n".join(lines))
    if not args.quick:
        write_section(Path(__file__).resolve().parent / "RESULTS.md", SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
