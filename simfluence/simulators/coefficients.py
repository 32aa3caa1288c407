"""The per-step coefficients of a curriculum under a linear-family simulator, and what a batch edit does to them.

:class:`StepCoefficients` is what :mod:`.dynamics` computes for a curriculum and what the exact leave-one-out
(:mod:`.loo`) reads; it lives here so that neither of those two modules imports the other's internals back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepCoefficients:
    """The per-step coefficients of one curriculum, with the pieces an edit of a batch needs.

    Attributes
    ----------
    alpha, beta : (T, n_test) full coefficients of every step.
    const_alpha, const_beta : (T, n_test) the parts that do not depend on the batch.
    pool_alpha, pool_beta : (T, n_test) ``w_t * sum_{i in c_t} A/B_{k(t)}[i]`` (before the batch divisor).
    lr_weight : (T,) ``w_t``.
    size : (T,) batch sizes.
    table : (T,) index k(t) of the effect table each step uses.
    batch_mean : whether pool sums are divided by the batch size.
    mult, add : (K, n_pool, n_test) effect tables (``mult`` None for additive simulators).
    momentum : velocity decay mu.
    """

    alpha: np.ndarray
    beta: np.ndarray
    const_alpha: np.ndarray
    const_beta: np.ndarray
    pool_alpha: np.ndarray
    pool_beta: np.ndarray
    lr_weight: np.ndarray
    size: np.ndarray
    table: np.ndarray
    batch_mean: bool
    mult: np.ndarray | None
    add: np.ndarray
    momentum: float = 0.0

    def without(
        self, examples: np.ndarray, steps: np.ndarray, counts: np.ndarray, cols: slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray]:
        """alpha_t, beta_t at 1-based ``steps`` with ``counts`` copies of ``examples`` removed: (n, n_cols) each."""
        index = steps - 1
        table = self.table[index]
        weight = (self.lr_weight[index] * counts)[:, None]
        pool_beta = self.pool_beta[index, cols] - weight * self.add[table, examples, cols]
        divisor = batch_divisor(self.size[index] - counts, self.batch_mean)[:, None]
        beta = self.const_beta[index, cols] + pool_beta / divisor
        if self.mult is None:
            alpha = self.const_alpha[index, cols]
        else:
            pool_alpha = self.pool_alpha[index, cols] - weight * self.mult[table, examples, cols]
            alpha = self.const_alpha[index, cols] + pool_alpha / divisor
        return alpha, beta


def batch_divisor(size: np.ndarray, batch_mean: bool) -> np.ndarray:
    """What pool sums are divided by: the batch size for batch-mean models (1 for an empty batch), else 1."""
    size = np.asarray(size, dtype=np.float64)
    if not batch_mean:
        return np.ones_like(size)
    return np.where(size > 0, size, 1.0)
