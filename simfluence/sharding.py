"""Fit a simulator in blocks of test examples — one after another here, or in parallel on a Ray cluster.

Given the shared design (which examples each step trained on), the linear family's ridge fit is one
independent regression per test example: the effects ``A[:, z]``, ``B[:, z]`` and step terms of test z are
fitted from z's losses alone. So the test examples can be split into blocks, each block fitted by its own
task on its own machine with only its loss columns, and the blocks put side by side into one model.

Automatic choices (``lam="auto"``, ``momentum="auto"``) are made once for the whole model, exactly as an
unsharded fit makes them: every block reports the validation error of every candidate on its tests, the
errors are combined (weighted by block size, which gives the all-tests mean), the best candidate is
chosen, and the blocks that had chosen differently on their own are refitted with it. The merged model then
equals the one-piece fit to the solver's tolerance, with the same ``lam_``, ``momentum_`` and
``validation_`` table.

    from simfluence.sharding import fit_sharded
    model = fit_sharded(make_simulator("linear_mom"), runset, n_blocks=16, backend="ray", ray_address="auto")
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from simfluence.errors import SimfluenceError
from simfluence.runlog import RunSet
from simfluence.simulators.base import Simulator, clone, training_runs

BACKENDS = ("local", "ray")


def split_tests(n_test: int, n_blocks: int) -> list[np.ndarray]:
    """Split test positions ``0..n_test-1`` into ``n_blocks`` contiguous blocks of near-equal size."""
    n_blocks = max(1, min(int(n_blocks), n_test))
    return [block for block in np.array_split(np.arange(n_test), n_blocks) if block.size]


def _fit_block(simulator: Simulator, block: RunSet, runs: list[int]) -> Simulator:
    """Fit one block (runs as a Ray task or in this process); returns the fitted simulator."""
    return simulator.fit(block, runs)


def fit_sharded(
    simulator: Simulator,
    runset: RunSet,
    runs: Sequence[int] | None = None,
    n_blocks: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    cpus_per_block: int = 1,
    progress: bool = False,
) -> Simulator:
    """Fit ``simulator`` on ``runset`` in blocks of test examples and merge them into ``simulator``; returns it.

    Parameters
    ----------
    simulator : an unfitted simulator of the linear family (``linear``, ``linear_mom``, ``additive`` ...; any
        class that declares ``_test_axis_arrays``). It is fitted in place, like ``simulator.fit``.
    runset : the logged runs.
    runs : positions of the runs to fit on (default all).
    n_blocks : number of test blocks (default: the cluster's CPUs / ``cpus_per_block`` with Ray, else the
        machine's cores).
    backend : ``"local"`` fits the blocks one after another in this process (bounding memory by a block);
        ``"ray"`` fits them as Ray tasks (:mod:`simfluence.cluster`) and only the block's loss columns and the
        curricula travel to the worker.
    ray_address : the Ray cluster (see :func:`simfluence.cluster.ray_session`).
    cpus_per_block : CPUs each Ray task asks for.
    progress : show a progress bar over blocks.

    Returns
    -------
    The fitted ``simulator``: effects ``(n_pool, n_test)`` and step terms over every test example of ``runset``,
    ``fit_seconds_`` the wall time of the whole sharded fit, ``solve_info_`` that of the slowest block.
    """
    if backend not in BACKENDS:
        raise SimfluenceError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not getattr(simulator, "_test_axis_arrays", None):
        raise SimfluenceError(f"{type(simulator).__name__} cannot be fitted in test blocks (only the linear family "
                              "can: linear, linear_step, linear_mom, additive ...)")
    runs = training_runs(runset, runs)
    start = time.perf_counter()
    if backend == "ray":
        from simfluence.cluster import ray_session

        with ray_session(ray_address) as ray:
            if n_blocks is None:
                n_blocks = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, cpus_per_block))
            fitted = _fit_blocks(simulator, runset, runs, n_blocks, "ray", cpus_per_block, progress)
    else:
        fitted = _fit_blocks(simulator, runset, runs, n_blocks or os.cpu_count() or 1, "local", 1, progress)
    _merge(simulator, fitted, runset)
    simulator.fit_seconds_ = time.perf_counter() - start
    return simulator


def _fit_blocks(simulator: Simulator, runset: RunSet, runs: list[int], n_blocks: int, backend: str,
                cpus: int, progress: bool) -> list[Simulator]:
    """Fit every block; make the automatic choices once for all blocks and refit blocks that chose otherwise."""
    blocks = split_tests(runset.n_test, n_blocks)
    fitted = _map_blocks(simulator, runset, runs, blocks, backend, cpus, progress)
    choice = _joint_choice(fitted, [block.size for block in blocks])
    if choice is not None:
        lam, momentum = choice
        redo = [i for i, sim in enumerate(fitted) if (sim.lam_, sim.momentum_) != (lam, momentum)]
        if redo:
            fixed = clone(simulator).set_params(lam=lam, momentum=momentum)
            again = _map_blocks(fixed, runset, runs, [blocks[i] for i in redo], backend, cpus, progress)
            for index, sim in zip(redo, again, strict=True):
                sim.validation_ = fitted[index].validation_
                fitted[index] = sim
    return fitted


def _map_blocks(template: Simulator, runset: RunSet, runs: list[int], blocks: list[np.ndarray],
                backend: str, cpus: int, progress: bool) -> list[Simulator]:
    """Fit a clone of ``template`` on the columns ``blocks[i]`` of ``runset`` for every i; results in block order."""
    results: list[Any] = [None] * len(blocks)
    bar = tqdm(total=len(blocks), desc="fitting test blocks", unit="block", disable=not progress)
    try:
        if backend == "ray":
            from simfluence.cluster import run_tasks

            arguments = [(clone(template), runset.select_tests(block), runs) for block in blocks]
            for index, sim in run_tasks(_fit_block, arguments, num_cpus=cpus):
                results[index] = sim
                bar.update()
        else:
            for index, block in enumerate(blocks):
                results[index] = _fit_block(clone(template), runset.select_tests(block), runs)
                bar.update()
    finally:
        bar.close()
    return results


def _joint_choice(fitted: list[Simulator], sizes: list[int]) -> tuple[float, float] | None:
    """The (lam, momentum) with the lowest all-tests validation error, or None when nothing was chosen.

    Each block's ``validation_`` holds the mean error over its tests of every candidate it tried; weighting by
    block size gives the mean over all tests. Blocks may extend the lam grid differently (a lam at the grid's
    edge extends it), so tables are matched by ``(lam, momentum)``, over the candidates every block tried; a
    candidate non-finite in any block is non-finite. Candidates are visited in the order an unsharded fit tries
    them (strong to weak lam, momenta in grid order) and the first strictly best one wins, as there.
    """
    if not fitted[0].validation_:
        return None
    tables = [{(entry["lam"], entry["momentum"]): entry["mse"] for entry in sim.validation_} for sim in fitted]
    combined = []
    for entry in fitted[0].validation_:
        key = (entry["lam"], entry["momentum"])
        if not all(key in table for table in tables):
            continue
        errors = [table[key] for table in tables]
        mse = None
        if all(error is not None for error in errors):
            mse = float(sum(error * size for error, size in zip(errors, sizes, strict=True)) / sum(sizes))
        combined.append({**entry, "mse": mse})
    momenta = list(dict.fromkeys(entry["momentum"] for entry in combined))
    best = None
    for lam in sorted({entry["lam"] for entry in combined}, reverse=True):
        for momentum in momenta:
            entry = next(e for e in combined if e["lam"] == lam and e["momentum"] == momentum)
            if entry["mse"] is not None and (best is None or entry["mse"] < best["mse"]):
                best = entry
    if best is None:
        raise SimfluenceError("every candidate lam/momentum gave a non-finite validation error")
    for sim in fitted:
        sim.validation_ = combined
    return best["lam"], best["momentum"]


def _merge(simulator: Simulator, fitted: list[Simulator], runset: RunSet) -> None:
    """Put the blocks' per-test arrays side by side into ``simulator`` and copy the shared state."""
    fitted_state = {name: value for name, value in vars(fitted[0]).items() if name.endswith("_")}
    vars(simulator).update(fitted_state)  # what every block shares: pool ids, runs, lam_, momentum_, schedule ...
    for name in simulator._test_axis_arrays:
        setattr(simulator, name, np.concatenate([getattr(sim, name) for sim in fitted], axis=-1))
    simulator.n_test_ = runset.n_test
    simulator.test_ids_ = list(runset.test_ids)
    floors = [sim.loss_floor_ for sim in fitted]  # the whole fit floors at 0 only if no block saw a negative loss
    simulator.loss_floor_ = floors[0] if all(floor == floors[0] for floor in floors) else None
    simulator.solve_info_ = max((sim.solve_info_ for sim in fitted), key=lambda info: info.n_iter)
    simulator.fitted_ = True
