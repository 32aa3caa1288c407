"""Run sets generated from a known Simfluence-Linear model, for tests, benchmarks and the offline demo.

Because the true effects A, B are known, a fit can be checked for exact recovery (no noise) and the
evaluation pipeline exercised end to end without training any model.
"""
from __future__ import annotations

import numpy as np

from simfluence.curriculum import random_curricula
from simfluence.runlog import Run, RunSet


def known_linear_runset(
    n_pool: int = 40,
    n_test: int = 6,
    n_runs: int = 12,
    n_steps: int = 30,
    batch_size: int = 4,
    subset_size: int | None = None,
    multiplicative: bool = True,
    noise: float = 0.0,
    lr_schedule: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[RunSet, np.ndarray | None, np.ndarray]:
    """Runs simulated exactly by ``L_t = (sum_{i in c_t} A_i) L_{t-1} + sum_{i in c_t} B_i`` (+ noise).

    A_i is drawn around ``1 / batch_size`` (so alpha stays near 1 and losses stay bounded) and B_i small,
    with both positive and negative effects; initial losses are the same in every run, as when all runs
    start from the same weights. With ``multiplicative=False`` the runs follow the additive model
    ``L_t = L_{t-1} + sum B_i`` (alpha = 1 whatever the batch size) and A is returned as None.

    Returns
    -------
    runset : in-memory run set (n_runs runs of n_steps steps, losses logged at every step).
    A, B : (n_pool, n_test) the true effects (A is None for the additive model).
    """
    rng = np.random.default_rng(seed)
    if multiplicative:
        A = (1.0 + rng.uniform(-0.04, 0.02, size=(n_pool, n_test))) / batch_size
    else:
        A = None
    B = rng.uniform(-0.03, 0.015, size=(n_pool, n_test))
    initial = rng.uniform(1.0, 3.0, size=n_test)
    curricula = random_curricula(n_runs, n_pool, batch_size, n_steps, subset_size=subset_size, seed=rng)
    runs = []
    for index, cur in enumerate(curricula):
        counts = cur.to_csr(n_pool)
        alpha = np.asarray(counts @ A) if A is not None else np.ones((n_steps, n_test))
        beta = np.asarray(counts @ B)
        losses = np.empty((n_steps + 1, n_test))
        losses[0] = initial
        for t in range(n_steps):
            losses[t + 1] = alpha[t] * losses[t] + beta[t] + noise * rng.standard_normal(n_test)
        runs.append(
            Run(
                name=f"run-{index:03d}",
                curriculum=cur,
                logged_steps=np.arange(n_steps + 1),
                losses=losses.astype(np.float32) if noise > 0 else losses,
                learning_rates=lr_schedule,
                metadata={"seed": seed, "generator": "known_linear_runset"},
            )
        )
    return RunSet(runs, n_pool=n_pool, test_ids=range(n_test), metadata={"source": "synthetic"}), A, B
