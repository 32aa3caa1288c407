"""GPU check (issues 18 and 23): the torch paths give the CPU's answers on a device, and what they cost there.

Run by ``benchmarks/device_check.sh`` on a lent accelerator machine; ``--device cpu --small`` runs the same
script here in seconds (a dry run of the script itself, not a measurement). It prints two markdown tables:

1. **Agreement**: each torch path on ``--device`` against the CPU on the same small problem -- the batched ridge
   solve (``solve_ridge(device=...)`` against the numpy path), TracIn scores on digits checkpoints
   (``TracInSimulator(device=...)``), exact unrolled effects on digits (``unrolled_effects(device=...)``, float64),
   and the training engine (``generate_digits(device=...)``: the losses it logs, in the task's float32).
   Maximum relative difference; a float64 path passes below 1e-6, float32 training (whose rounding compounds
   over the steps) below 1e-3.
2. **Cost**: ``unrolled`` effects of every test loss for one digits run (100 tests) and for the facts language
   model (all its queries), in units of one bare training run on the CPU (``replay_losses`` in the task's float32),
   and one ``linear_mom`` fit on a synthetic run set (``simfluence.synthetic.known_linear_runset``) of the size
   given by ``--fit-point N M R T B`` with the solves on the device.

    python benchmarks/bench_device.py --device cuda                    # on the device machine
    python benchmarks/bench_device.py --device cpu --small             # dry run of the script here
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FLOAT64_TOLERANCE = 1e-6
FLOAT32_TRAINING_TOLERANCE = 1e-3


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def agreement(device: str, workdir: Path, small: bool) -> list[tuple[str, float, float]]:
    """(check, max relative difference to the CPU, tolerance) for each torch path."""
    from simfluence.attribution.simulators import TracInSimulator
    from simfluence.attribution.unrolled import unrolled_effects
    from simfluence.design import FeatureSpec, build_transitions
    from simfluence.solvers import solve_ridge
    from simfluence.synthetic import known_linear_runset
    from simfluence.workloads import generate_digits, task_from_runset

    rows = []
    runset, _, _ = known_linear_runset(n_pool=200, n_test=20, n_runs=16, n_steps=60, batch_size=8, seed=0)
    transitions = build_transitions(runset, FeatureSpec(n_pool=runset.n_pool))
    target = transitions.next
    penalty = np.full(2 * runset.n_pool, 1e-2)
    on_cpu = solve_ridge(transitions.features, transitions.prev, target, penalty, solver="cg", tol=1e-10)
    on_device = solve_ridge(transitions.features, transitions.prev, target, penalty, solver="cg", tol=1e-10,
                            device=device)
    rows.append(("solve_ridge (CG, 20 tests)", _relative(on_device[0], on_cpu[0]), FLOAT64_TOLERANCE))

    digits = generate_digits(workdir / "digits", n_runs=2, n_steps=40 if small else 200, batch_size=8,
                             pool_size=100 if small else 500, test_size=20 if small else 100,
                             checkpoint_steps=(0, 20) if small else (0, 100, 200), workers=1, progress=False)
    reference, _ = TracInSimulator().compute_scores(digits, 0)
    scores, _ = TracInSimulator(device=device).compute_scores(digits, 0)
    rows.append(("TracIn scores (digits checkpoints)", _relative(scores, reference), FLOAT64_TOLERANCE))

    task = task_from_runset(digits)
    curriculum = digits[0].curriculum
    cpu_effects = unrolled_effects(task, curriculum).occurrence
    device_effects = unrolled_effects(task, curriculum, device=device, deterministic=device == "cpu").occurrence
    rows.append(("unrolled occurrence effects (digits, float64)", _relative(device_effects, cpu_effects),
                 FLOAT64_TOLERANCE))

    trained = generate_digits(workdir / "digits-device", n_runs=2, n_steps=40 if small else 200, batch_size=8,
                              pool_size=100 if small else 500, test_size=20 if small else 100, workers=1,
                              progress=False, device=device)
    rows.append(("training: logged test losses (digits, float32)",
                 _relative(np.asarray(trained[0].losses), np.asarray(digits[0].losses)), FLOAT32_TRAINING_TOLERANCE))
    return rows


def _bare_run_seconds(task, curriculum) -> float:
    from simfluence.attribution.unrolled import replay_losses

    start = time.perf_counter()
    replay_losses(task, curriculum, dtype=None)
    return time.perf_counter() - start


def _unrolled_seconds(task, curriculum, device: str, dtype) -> float:
    from simfluence.attribution.unrolled import unrolled_effects

    _synchronise(device)
    start = time.perf_counter()
    unrolled_effects(task, curriculum, dtype=dtype, device=device, deterministic=device == "cpu")
    _synchronise(device)
    return time.perf_counter() - start


def cost(device: str, workdir: Path, small: bool, fit_point: tuple[int, ...]) -> list[tuple[str, str]]:
    from simfluence.curriculum import random_curricula
    from simfluence.methods import make_simulator
    from simfluence.synthetic import known_linear_runset
    from simfluence.workloads import task_from_runset
    from simfluence.workloads.digits import generate_digits
    from simfluence.workloads.facts import TIERS, facts_task

    rows = []
    digits = generate_digits(workdir / "digits-cost", n_runs=1, n_steps=40 if small else 200, batch_size=8,
                             pool_size=100 if small else 500, test_size=20 if small else 100, workers=1,
                             progress=False)
    task, curriculum = task_from_runset(digits), digits[0].curriculum
    bare = _bare_run_seconds(task, curriculum)
    for dtype, name in ((torch.float64, "float64"), (None, "float32")):
        seconds = _unrolled_seconds(task, curriculum, device, dtype)
        rows.append((f"unrolled, digits, {task.n_test} tests, {name}",
                     f"{seconds:.2f} s = {seconds / bare:.1f} bare runs"))

    tier = "mini" if small else "default"
    settings = TIERS[tier]
    facts = facts_task(tier, base_cache=workdir / f"facts-{tier}-base.pt")
    (facts_curriculum,) = random_curricula(1, facts.n_pool, settings.batch_size, settings.n_steps, seed=0)
    bare = _bare_run_seconds(facts, facts_curriculum)
    seconds = _unrolled_seconds(facts, facts_curriculum, device, None)
    rows.append((f"unrolled, facts {tier}, {facts.n_test} queries, float32",
                 f"{seconds:.2f} s = {seconds / bare:.1f} bare runs"))

    n_pool, n_test, n_runs, n_steps, batch = fit_point
    runset, _, _ = known_linear_runset(n_pool=n_pool, n_test=n_test, n_runs=n_runs, n_steps=n_steps,
                                       batch_size=batch, seed=0, noise=1e-3)
    start = time.perf_counter()
    simulator = make_simulator("linear_mom", device=device).fit(runset)
    seconds = time.perf_counter() - start
    rows.append((f"linear_mom fit, N={n_pool:,} M={n_test:,} {n_runs}x{n_steps}x{batch}, solves on {device}",
                 f"{seconds:.1f} s (lam {simulator.lam_:g}, momentum {simulator.momentum_:g})"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small problems: a dry run of the script")
    parser.add_argument("--fit-point", type=int, nargs=5, default=None, metavar=("N", "M", "R", "T", "B"),
                        help="size of the linear_mom fit (default 20,000 200 64 500 16; --small: 300 10 8 50 8)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device here")
    fit_point = tuple(args.fit_point or ((300, 10, 8, 50, 8) if args.small else (20_000, 200, 64, 500, 16)))
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        checks = agreement(args.device, workdir, args.small)
        print(f"Device {args.device} ({where}), torch {torch.__version__}\n")
        print("| check | max relative difference to the CPU | tolerance | agrees |\n|---|---:|---:|---|")
        for name, difference, tolerance in checks:
            print(f"| {name} | {difference:.1e} | {tolerance:.0e} | {'yes' if difference < tolerance else 'NO'} |")
        print("\n| cost | on the device |\n|---|---|")
        for name, value in cost(args.device, workdir, args.small, fit_point):
            print(f"| {name} | {value} |")
    return 0 if all(difference < tolerance for _, difference, tolerance in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
